//! Which Services changed since the last sync. Watch events name the object that changed; this
//! turns them into Service keys (an EndpointSlice belongs to the Service its
//! `kubernetes.io/service-name` label names), so that a sync at 10,000 Services resolves, compiles
//! and diffs the one Service that changed instead of all of them. Pure: no I/O.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{Protocol, Service, ServiceId, Snapshot};

use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::k8s;
use super::{API_ORIGIN, InputError, InputErrors, Objects, Origin};

/// What a sync has to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Anything may have changed (first sync, a re-list, the Node, a source that cannot tell).
    All,
    /// Only these Services (possibly none).
    Services(BTreeSet<ServiceId>),
}

impl Changed {
    fn mark(&mut self, id: ServiceId) {
        if let Changed::Services(ids) = self {
            ids.insert(id);
        }
    }
}

/// Collects changes from watch events until the agent takes them.
#[derive(Debug)]
pub struct Tracker {
    changed: Changed,
    /// EndpointSlice `(namespace, name)` -> the Service it belongs to.
    owner: HashMap<(String, String), ServiceId>,
    /// Service -> the names of its EndpointSlices (same namespace).
    slices: HashMap<ServiceId, BTreeSet<String>>,
}

impl Default for Tracker {
    fn default() -> Self {
        // Nothing has been synced yet: the first sync looks at everything.
        Tracker { changed: Changed::All, owner: HashMap::new(), slices: HashMap::new() }
    }
}

impl Tracker {
    /// A Service was added, changed or deleted.
    pub fn service(&mut self, id: ServiceId) {
        self.changed.mark(id);
    }

    /// An EndpointSlice was added or changed; `owner` is the Service its label names. A slice
    /// relabelled to another Service changes both.
    pub fn slice_applied(&mut self, namespace: &str, name: &str, owner: Option<ServiceId>) {
        self.slice_deleted(namespace, name);
        if let Some(owner) = owner {
            self.slices.entry(owner.clone()).or_default().insert(name.to_string());
            self.owner.insert((namespace.to_string(), name.to_string()), owner.clone());
            self.changed.mark(owner);
        }
    }

    pub fn slice_deleted(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.owner.remove(&(namespace.to_string(), name.to_string())) {
            if let Some(names) = self.slices.get_mut(&old) {
                names.remove(name);
                if names.is_empty() {
                    self.slices.remove(&old);
                }
            }
            self.changed.mark(old);
        }
    }

    /// After a re-list the store is the truth: rebuild the slice index from it, and look at
    /// everything (objects deleted while the watch was down produced no event).
    pub fn slices_relisted<'a>(&mut self, slices: impl IntoIterator<Item = (&'a str, &'a str, Option<ServiceId>)>) {
        self.owner.clear();
        self.slices.clear();
        for (namespace, name, owner) in slices {
            self.slice_applied(namespace, name, owner);
        }
        self.everything();
    }

    pub fn everything(&mut self) {
        self.changed = Changed::All;
    }

    /// What changed since the last call.
    pub fn take(&mut self) -> Changed {
        std::mem::replace(&mut self.changed, Changed::Services(BTreeSet::new()))
    }

    /// The names of the EndpointSlices of `id`.
    pub fn slices_of(&self, id: &ServiceId) -> impl Iterator<Item = &str> {
        self.slices.get(id).into_iter().flatten().map(String::as_str)
    }
}

/// The objects of the Services `ids`, looked up by key in a source's stores: each Service by its
/// id, each of its EndpointSlices by `(namespace, name)` (converted to what resolve reads).
pub fn objects_of(
    tracker: &Tracker,
    ids: &BTreeSet<ServiceId>,
    origin: &Origin,
    service: impl Fn(&ServiceId) -> Option<Arc<K8sService>>,
    slice: impl Fn(&str, &str) -> Option<Arc<EndpointSlice>>,
) -> Objects {
    let mut objects = Objects::default();
    for id in ids {
        objects.services.extend(service(id).map(|s| (origin.clone(), Arc::new(k8s::Service::from(&*s)))));
        for name in tracker.slices_of(id) {
            let found = slice(&id.namespace, name);
            objects.slices.extend(found.map(|s| (origin.clone(), Arc::new(k8s::EndpointSlice::from(&*s)))));
        }
    }
    objects
}

/// The node ports a Service holds, each with the field it comes from (a health-check port is TCP).
fn node_ports(svc: &Service) -> impl Iterator<Item = ((u16, Protocol), String)> + '_ {
    let ports = svc.ports.iter().enumerate();
    let ports = ports.filter_map(|(i, p)| p.node_port.map(|n| ((n, p.protocol), format!("spec.ports[{i}].nodePort"))));
    let health = svc.external.health_check_node_port.map(|n| ((n, Protocol::Tcp), "spec.healthCheckNodePort".into()));
    ports.chain(health)
}

/// The snapshot the agent keeps between syncs, with the owner of each ClusterIP and node port, so
/// that replacing a few Services costs O(changed), not O(all).
#[derive(Debug, Default)]
pub struct Desired {
    snapshot: Snapshot,
    owners: HashMap<IpAddr, ServiceId>,
    node_port_owners: HashMap<(u16, Protocol), ServiceId>,
    /// Who serves each external and load-balancer address entry (first come, first served).
    external_owners: HashMap<crate::model::DispatchKey, ServiceId>,
}

impl Desired {
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn replace_all(&mut self, snapshot: Snapshot) {
        self.owners =
            snapshot.services.values().flat_map(|s| s.cluster_ips.iter().map(|ip| (*ip, s.id.clone()))).collect();
        self.node_port_owners =
            snapshot.services.values().flat_map(|s| node_ports(s).map(|(key, _)| (key, s.id.clone()))).collect();
        self.external_owners =
            snapshot.services.values().flat_map(|s| s.external_keys().into_iter().map(|k| (k, s.id.clone()))).collect();
        self.snapshot = snapshot;
    }

    /// Replaces the Services `ids` with those of `partial` (a Service of `ids` missing from
    /// `partial` was deleted). A ClusterIP or node port already used by a Service outside `ids` is
    /// an input error, and then nothing changes.
    pub fn apply_partial(&mut self, ids: &BTreeSet<ServiceId>, mut partial: Snapshot) -> Result<(), InputErrors> {
        let mut errors = Vec::new();
        for svc in partial.services.values() {
            for ip in &svc.cluster_ips {
                if let Some(other) = self.owners.get(ip).filter(|o| !ids.contains(*o)) {
                    errors.push(InputError {
                        origin: API_ORIGIN.into(),
                        object: format!("Service {}", svc.id),
                        field: "spec.clusterIP".into(),
                        message: format!(
                            "ClusterIP {ip} is already used by Service {other}; every ClusterIP must be unique"
                        ),
                    });
                }
            }
            for ((port, protocol), field) in node_ports(svc) {
                if let Some(other) = self.node_port_owners.get(&(port, protocol)).filter(|o| !ids.contains(*o)) {
                    let what = field.rsplit('.').next().unwrap_or_default();
                    errors.push(InputError {
                        origin: API_ORIGIN.into(),
                        object: format!("Service {}", svc.id),
                        field: field.clone(),
                        message: format!(
                            "{what} {port}/{protocol} is already used by Service {other}; every node port must be unique"
                        ),
                    });
                }
            }
        }
        if !errors.is_empty() {
            return Err(InputErrors(errors));
        }
        // External addresses another Service (outside `ids`) serves, or a ClusterIP holds, are
        // dropped from the newcomer and reported as not served.
        // Looked up, not collected: a change to one Service must not cost a walk over all.
        let incoming: HashMap<IpAddr, ServiceId> =
            partial.services.values().flat_map(|s| s.cluster_ips.iter().map(|ip| (*ip, s.id.clone()))).collect();
        let outside = |o: &&ServiceId| !ids.contains(*o);
        for svc in partial.services.values_mut() {
            let id = svc.id.clone();
            svc.drop_taken_external(|k| {
                let cluster = incoming.get(&k.0).or_else(|| self.owners.get(&k.0).filter(outside));
                crate::source::resolve::holder_of(&id, cluster, self.external_owners.get(k).filter(outside))
            });
        }
        for id in ids {
            let new = partial.services.remove(id);
            let old = match new {
                Some(svc) => self.snapshot.services.insert(id.clone(), svc),
                None => self.snapshot.services.remove(id),
            };
            for ip in old.iter().flat_map(|s| &s.cluster_ips) {
                self.owners.remove(ip);
            }
            for (key, _) in old.iter().flat_map(node_ports) {
                self.node_port_owners.remove(&key);
            }
            for key in old.iter().flat_map(|s| s.external_keys()) {
                self.external_owners.remove(&key);
            }
        }
        for id in ids {
            for ip in self.snapshot.services.get(id).iter().flat_map(|s| &s.cluster_ips) {
                self.owners.insert(*ip, id.clone());
            }
            for (key, _) in self.snapshot.services.get(id).into_iter().flat_map(node_ports) {
                self.node_port_owners.insert(key, id.clone());
            }
            for key in self.snapshot.services.get(id).into_iter().flat_map(|s| s.external_keys()) {
                self.external_owners.insert(key, id.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServicePort;

    fn id(name: &str) -> ServiceId {
        ServiceId::new("default", name)
    }

    fn ids(names: &[&str]) -> Changed {
        Changed::Services(names.iter().map(|n| id(n)).collect())
    }

    #[test]
    fn first_take_is_everything_then_only_what_events_named() {
        let mut t = Tracker::default();
        t.service(id("web"));
        assert_eq!(t.take(), Changed::All);
        assert_eq!(t.take(), ids(&[]));
        t.service(id("web"));
        t.slice_applied("default", "db-abc", Some(id("db")));
        assert_eq!(t.take(), ids(&["db", "web"]));
        assert_eq!(t.slices_of(&id("db")).collect::<Vec<_>>(), ["db-abc"]);
    }

    #[test]
    fn a_relabelled_or_deleted_slice_changes_its_old_service() {
        let mut t = Tracker::default();
        t.slice_applied("default", "s1", Some(id("a")));
        t.take();
        t.slice_applied("default", "s1", Some(id("b")));
        assert_eq!(t.take(), ids(&["a", "b"]));
        assert_eq!(t.slices_of(&id("a")).count(), 0);
        t.slice_deleted("default", "s1");
        assert_eq!(t.take(), ids(&["b"]));
        assert_eq!(t.slices_of(&id("b")).count(), 0);
        // A slice without the label belongs to no Service.
        t.slice_applied("default", "s2", None);
        assert_eq!(t.take(), ids(&[]));
    }

    #[test]
    fn a_relist_rebuilds_the_index_and_changes_everything() {
        let mut t = Tracker::default();
        t.slice_applied("default", "gone", Some(id("a")));
        t.take();
        t.slices_relisted([("default", "s1", Some(id("b")))]);
        assert_eq!(t.take(), Changed::All);
        assert_eq!(t.slices_of(&id("a")).count(), 0);
        assert_eq!(t.slices_of(&id("b")).collect::<Vec<_>>(), ["s1"]);
    }

    fn svc(name: &str, ip: &str) -> Service {
        Service::new(id(name), vec![ip.parse().unwrap()], vec![])
    }

    #[test]
    fn partial_updates_replace_adds_and_deletes_only_the_named_services() {
        let mut snap = Snapshot::default();
        for (n, ip) in [("a", "10.96.0.1"), ("b", "10.96.0.2"), ("c", "10.96.0.3")] {
            snap.services.insert(id(n), svc(n, ip));
        }
        let mut desired = Desired::default();
        desired.replace_all(snap);
        let mut partial = Snapshot::default();
        partial.services.insert(id("a"), svc("a", "10.96.0.9"));
        partial.services.insert(id("d"), svc("d", "10.96.0.2"));
        // "b" is named and absent: deleted, so "d" may take its address.
        let named: BTreeSet<_> = ["a", "b", "d"].iter().map(|n| id(n)).collect();
        desired.apply_partial(&named, partial).unwrap();
        let left: Vec<_> =
            desired.snapshot().services.values().map(|s| (s.id.name.as_str(), s.cluster_ips[0].to_string())).collect();
        assert_eq!(left, [("a", "10.96.0.9".into()), ("c", "10.96.0.3".into()), ("d", "10.96.0.2".into())]);
    }

    #[test]
    fn a_partial_update_refuses_a_clusterip_of_another_service_and_changes_nothing() {
        let mut snap = Snapshot::default();
        snap.services.insert(id("a"), svc("a", "10.96.0.1"));
        let mut desired = Desired::default();
        desired.replace_all(snap.clone());
        let mut partial = Snapshot::default();
        partial.services.insert(id("b"), svc("b", "10.96.0.1"));
        let err = desired.apply_partial(&[id("b")].into(), partial.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the Kubernetes API: Service default/b: spec.clusterIP: ClusterIP 10.96.0.1 is already used by \
             Service default/a; every ClusterIP must be unique"
        );
        assert_eq!(desired.snapshot(), &snap);
        // Once "a" gives the address up, "b" may have it.
        let named: BTreeSet<_> = [id("a"), id("b")].into();
        desired.apply_partial(&named, partial).unwrap();
        assert_eq!(desired.snapshot().services.keys().collect::<Vec<_>>(), [&id("b")]);
    }

    /// A Service with ClusterIP `ip` and one TCP port with node port `node_port`, maybe a
    /// health-check port.
    fn with_node_port(name: &str, ip: &str, node_port: u16, health: Option<u16>) -> Service {
        let port = ServicePort {
            name: String::new(),
            port: 80,
            protocol: Protocol::Tcp,
            node_port: Some(node_port),
            endpoints: vec![],
        };
        let mut svc = Service::new(id(name), vec![ip.parse().unwrap()], vec![port]);
        svc.external.health_check_node_port = health;
        svc
    }

    #[test]
    fn a_partial_update_does_not_serve_an_external_address_another_service_serves() {
        let mut a = with_node_port("a", "10.96.0.1", 30080, None);
        a.external.external_ips = vec!["203.0.113.10".parse().unwrap()];
        let mut snap = Snapshot::default();
        snap.services.insert(id("a"), a);
        let mut desired = Desired::default();
        desired.replace_all(snap);
        let mut b = with_node_port("b", "10.96.0.2", 30081, None);
        b.external.external_ips = vec!["203.0.113.10".parse().unwrap(), "203.0.113.11".parse().unwrap()];
        let mut partial = Snapshot::default();
        partial.services.insert(id("b"), b);
        desired.apply_partial(&[id("b")].into(), partial).unwrap();
        let b = &desired.snapshot().services[&id("b")];
        assert_eq!(b.external.external_ips, ["203.0.113.11".parse::<IpAddr>().unwrap()]);
        assert_eq!(b.unserved(), ["external address 203.0.113.10:80/tcp is already served by Service default/a"]);
        // Once a is gone, b's next update takes the address.
        desired.apply_partial(&[id("a")].into(), Snapshot::default()).unwrap();
        let mut b = with_node_port("b", "10.96.0.2", 30081, None);
        b.external.external_ips = vec!["203.0.113.10".parse().unwrap()];
        let mut partial = Snapshot::default();
        partial.services.insert(id("b"), b);
        desired.apply_partial(&[id("b")].into(), partial).unwrap();
        assert!(desired.snapshot().services[&id("b")].unserved().is_empty());
    }

    #[test]
    fn a_partial_update_refuses_a_node_port_of_another_service_and_changes_nothing() {
        let mut snap = Snapshot::default();
        snap.services.insert(id("a"), with_node_port("a", "10.96.0.1", 30080, Some(31000)));
        let mut desired = Desired::default();
        desired.replace_all(snap.clone());
        // (the new Service, the error)
        let cases = [
            (
                with_node_port("b", "10.96.0.2", 30080, None),
                "the Kubernetes API: Service default/b: spec.ports[0].nodePort: nodePort 30080/tcp is already used by \
                 Service default/a; every node port must be unique",
            ),
            (
                with_node_port("b", "10.96.0.2", 30081, Some(30080)),
                "the Kubernetes API: Service default/b: spec.healthCheckNodePort: healthCheckNodePort 30080/tcp is \
                 already used by Service default/a; every node port must be unique",
            ),
            (
                with_node_port("b", "10.96.0.2", 31000, None),
                "the Kubernetes API: Service default/b: spec.ports[0].nodePort: nodePort 31000/tcp is already used by \
                 Service default/a; every node port must be unique",
            ),
        ];
        for (b, want) in cases {
            let mut partial = Snapshot::default();
            partial.services.insert(id("b"), b);
            let err = desired.apply_partial(&[id("b")].into(), partial).unwrap_err();
            assert_eq!(err.to_string(), want);
            assert_eq!(desired.snapshot(), &snap);
        }
        // The same number over UDP is another node port.
        let mut udp = with_node_port("b", "10.96.0.2", 30080, None);
        udp.ports[0].protocol = Protocol::Udp;
        let mut partial = Snapshot::default();
        partial.services.insert(id("b"), udp);
        desired.apply_partial(&[id("b")].into(), partial).unwrap();
        // Once "a" changes its node port, "c" may have the old one; "a" may not take "b"'s.
        let mut partial = Snapshot::default();
        partial.services.insert(id("a"), with_node_port("a", "10.96.0.1", 30090, None));
        desired.apply_partial(&[id("a")].into(), partial).unwrap();
        let mut partial = Snapshot::default();
        partial.services.insert(id("c"), with_node_port("c", "10.96.0.3", 30080, Some(31000)));
        desired.apply_partial(&[id("c")].into(), partial).unwrap();
        let mut partial = Snapshot::default();
        partial.services.insert(id("a"), with_node_port("a", "10.96.0.1", 31000, None));
        assert!(desired.apply_partial(&[id("a")].into(), partial).is_err());
    }
}
