//! The gate: the first rule of each table's base chains, one lookup per family,
//!
//! ```text
//! ip daddr vmap @addresses-v4    10.96.0.10 : goto cluster-ip-v4     (a ClusterIP)
//!                                192.0.2.1  : goto node-ip-v4        (a node-port address)
//!                                203.0.113.7: goto external-ip-v4    (an external or LB IP)
//! ```
//!
//! so that a packet that is not Service traffic (pod to pod, node to internet) leaves each table
//! after one hash lookup: with many shard tables, that lookup is what every new connection on the
//! node pays per table (issue 18, docs/benchmark.md "The first packet").
//!
//! An address can be held by more than one owner: two Services sharing a load-balancer IP (one
//! for TCP, one for UDP), an external IP that is also a node address. So the gate is not part of
//! any one Service's objects: it counts its holders per table and address, and an element goes
//! only with its last holder. A ClusterIP wins over a node address, which wins over an external
//! address (the chain of a node address also serves the external dispatch).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::{Options, gate_map};
use crate::model::{Family, Service};
use crate::plan::Op;
use crate::ruleset::{Element, Fnv, Ruleset, SetKind, ip_bytes, ip_from_bytes, local_name, qualify};

/// What an address in the gate is, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Cluster,
    Node,
    External,
}

impl Role {
    const ALL: [Role; 3] = [Role::Cluster, Role::Node, Role::External];

    /// The chain (in each table) that handles an address of this role.
    pub fn chain(self, family: Family) -> String {
        let v = match family {
            Family::V4 => "v4",
            Family::V6 => "v6",
        };
        match self {
            Role::Cluster => format!("cluster-ip-{v}"),
            Role::Node => format!("node-ip-{v}"),
            Role::External => format!("external-ip-{v}"),
        }
    }

    /// The role and address of a gate element as the kernel holds it (read back).
    pub fn of_element(e: &Element) -> Option<(Role, IpAddr)> {
        let ip = ip_from_bytes(&e.key)?;
        let chain = local_name(e.goto.as_deref()?);
        Role::ALL.into_iter().find(|r| r.chain(Family::of(&ip)) == chain).map(|r| (r, ip))
    }
}

/// Every address in a ruleset's gates (as read back from the kernel), with its kind.
pub fn roles(rs: &Ruleset) -> impl Iterator<Item = (Role, IpAddr)> + '_ {
    rs.sets
        .values()
        .filter(|s| matches!(s.kind, SetKind::Gate(_)))
        .flat_map(|s| &s.elements)
        .filter_map(Role::of_element)
}

/// How many Services hold an address of one table, as a ClusterIP and as an external address.
#[derive(Debug, Clone, Copy, Default)]
struct Holders {
    cluster: u32,
    external: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Gate {
    held: BTreeMap<(u32, IpAddr), Holders>,
    node_ips: BTreeSet<IpAddr>,
    shards: u32,
    /// Per table, the XOR of its elements' hashes (kept as elements change).
    digests: BTreeMap<u32, u64>,
}

/// An element before and after a change (none: absent).
type Step = (Option<Element>, Option<Element>);

/// The gate elements a sync changes: per (map, key), the element before and after.
#[derive(Debug, Default)]
pub struct GateDelta(BTreeMap<(String, Vec<u8>), Step>);

impl GateDelta {
    fn record(&mut self, map: String, key: Vec<u8>, before: Option<Element>, after: Option<Element>) {
        self.0.entry((map, key)).or_insert((before, None)).1 = after;
    }

    /// The operations: per map, the elements that go, then those that come (a changed verdict
    /// is a delete and an add of the same key, in that order, in one transaction).
    pub fn into_ops(self) -> Vec<Op> {
        let mut dels: BTreeMap<String, Vec<Element>> = BTreeMap::new();
        let mut adds: BTreeMap<String, Vec<Element>> = BTreeMap::new();
        for ((map, _), (before, after)) in self.0 {
            if before == after {
                continue;
            }
            if let Some(e) = before {
                dels.entry(map.clone()).or_default().push(e);
            }
            if let Some(e) = after {
                adds.entry(map).or_default().push(e);
            }
        }
        let kind =
            |elements: &[Element]| SetKind::Gate(if elements[0].key.len() == 4 { Family::V4 } else { Family::V6 });
        let dels = dels.into_iter().map(|(set, elements)| Op::DelElements { set, kind: kind(&elements), elements });
        let adds = adds.into_iter().map(|(set, elements)| Op::AddElements { set, kind: kind(&elements), elements });
        dels.chain(adds).collect()
    }
}

/// The addresses a Service puts in the gate of its table: its ClusterIPs, and its external and
/// load-balancer IPs of each family it has a ClusterIP of (the dispatch entries the compiler
/// makes for them need a port).
fn addresses(svc: &Service) -> Vec<(IpAddr, Role)> {
    let mut out: Vec<(IpAddr, Role)> = svc.cluster_ips.iter().map(|ip| (*ip, Role::Cluster)).collect();
    if !svc.ports.is_empty() {
        let families: BTreeSet<Family> = svc.cluster_ips.iter().map(Family::of).collect();
        let external = svc.external.external_ips.iter().chain(&svc.external.load_balancer_ips);
        out.extend(external.filter(|ip| families.contains(&Family::of(ip))).map(|ip| (*ip, Role::External)));
    }
    out.sort();
    out.dedup();
    out
}

fn element_hash(map: &str, e: &Element) -> u64 {
    let mut h = Fnv::default();
    h.write(map.as_bytes());
    h.write(&e.key);
    h.write(e.goto.as_deref().unwrap_or("").as_bytes());
    h.0
}

impl Gate {
    /// The gate of no Service: this node's addresses in every table.
    pub fn new(opts: &Options) -> Gate {
        let mut gate = Gate { shards: opts.shards(), ..Gate::default() };
        gate.set_node_ips(&opts.node_ips);
        gate
    }

    /// The gate of these Services.
    pub fn of<'a>(opts: &Options, services: impl IntoIterator<Item = &'a Service>) -> Gate {
        let mut gate = Gate::new(opts);
        for svc in services {
            gate.change(None, Some(svc), opts, None);
        }
        gate
    }

    fn map(shard: u32, ip: &IpAddr) -> String {
        qualify(shard, &gate_map(Family::of(ip)))
    }

    fn role(&self, shard: u32, ip: &IpAddr) -> Option<Role> {
        let h = self.held.get(&(shard, *ip)).copied().unwrap_or_default();
        if h.cluster > 0 {
            Some(Role::Cluster)
        } else if self.node_ips.contains(ip) {
            Some(Role::Node)
        } else {
            (h.external > 0).then_some(Role::External)
        }
    }

    fn element(&self, shard: u32, ip: &IpAddr) -> Option<Element> {
        let role = self.role(shard, ip)?;
        Some(Element { key: ip_bytes(ip), goto: Some(qualify(shard, &role.chain(Family::of(ip)))) })
    }

    /// Accounts for one Service changing from `old` to `new` (either absent: added or
    /// deleted), recording the elements that change in `delta` (if the caller needs them: a
    /// sync that plans from a read-back takes the whole gate instead).
    pub fn change(
        &mut self,
        old: Option<&Service>,
        new: Option<&Service>,
        opts: &Options,
        mut delta: Option<&mut GateDelta>,
    ) {
        let Some(id) = new.or(old).map(|s| &s.id) else { return };
        let shard = opts.shard_of(id);
        let (gone, came) = (old.map(addresses).unwrap_or_default(), new.map(addresses).unwrap_or_default());
        let ips: BTreeSet<IpAddr> = gone.iter().chain(&came).map(|(ip, _)| *ip).collect();
        let before: Vec<Option<Element>> = ips.iter().map(|ip| self.element(shard, ip)).collect();
        for ((ip, role), step) in gone.iter().map(|a| (a, -1i64)).chain(came.iter().map(|a| (a, 1))) {
            let h = self.held.entry((shard, *ip)).or_default();
            let n = if *role == Role::Cluster { &mut h.cluster } else { &mut h.external };
            *n = (i64::from(*n) + step).max(0) as u32;
            if h.cluster == 0 && h.external == 0 {
                self.held.remove(&(shard, *ip));
            }
        }
        for (ip, before) in ips.iter().zip(before) {
            let after = self.element(shard, ip);
            if before != after {
                let map = Self::map(shard, ip);
                let d = self.digests.entry(shard).or_insert(0);
                for e in before.iter().chain(&after) {
                    *d ^= element_hash(&map, e);
                }
                if let Some(delta) = delta.as_deref_mut() {
                    delta.record(map, ip_bytes(ip), before, after);
                }
            }
        }
    }

    /// This node's addresses changed: the next sync is a full one, which takes every element.
    pub fn set_node_ips(&mut self, ips: &[IpAddr]) {
        self.node_ips = ips.iter().copied().collect();
        self.digests.clear();
        for (map, e) in self.elements() {
            let shard = crate::ruleset::shard_of_table(crate::ruleset::split_name(&map).0).unwrap_or(0);
            *self.digests.entry(shard).or_insert(0) ^= element_hash(&map, &e);
        }
    }

    /// Every element, with the map (qualified name) it lives in.
    pub fn elements(&self) -> Vec<(String, Element)> {
        let mut keys: BTreeSet<(u32, IpAddr)> = self.held.keys().copied().collect();
        keys.extend((0..self.shards.max(1)).flat_map(|k| self.node_ips.iter().map(move |ip| (k, *ip))));
        keys.into_iter().filter_map(|(k, ip)| Some((Self::map(k, &ip), self.element(k, &ip)?))).collect()
    }

    /// Per table (by shard number), a digest of its gate elements.
    pub fn digests(&self) -> &BTreeMap<u32, u64> {
        &self.digests
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServiceId, ServicePort};

    fn svc(name: &str, cluster: &str, external: &[&str]) -> Service {
        let port = ServicePort {
            name: String::new(),
            port: 80,
            protocol: crate::model::Protocol::Tcp,
            node_port: None,
            endpoints: vec![],
        };
        let mut s = Service::new(ServiceId::new("default", name), vec![cluster.parse().unwrap()], vec![port]);
        s.external.external_ips = external.iter().map(|ip| ip.parse().unwrap()).collect();
        s
    }

    fn roles(gate: &Gate) -> Vec<(String, Role)> {
        gate.elements().iter().map(|(_, e)| Role::of_element(e).unwrap()).map(|(r, ip)| (ip.to_string(), r)).collect()
    }

    #[test]
    fn a_shared_external_address_goes_with_its_last_holder() {
        let opts = Options { node_ips: vec!["192.0.2.1".parse().unwrap()], ..Options::default() };
        let (a, b) = (svc("a", "10.96.0.1", &["203.0.113.7"]), svc("b", "10.96.0.2", &["203.0.113.7", "192.0.2.1"]));
        let mut gate = Gate::of(&opts, [&a, &b]);
        let ext = |s: &str| (s.to_string(), Role::External);
        assert_eq!(
            roles(&gate),
            vec![
                ("10.96.0.1".into(), Role::Cluster),
                ("10.96.0.2".into(), Role::Cluster),
                ("192.0.2.1".into(), Role::Node),
                ext("203.0.113.7")
            ]
        );
        let mut delta = GateDelta::default();
        gate.change(Some(&a), None, &opts, Some(&mut delta));
        let ops = delta.into_ops();
        assert_eq!(ops.len(), 1, "only a's ClusterIP goes: {ops:?}");
        let mut delta = GateDelta::default();
        gate.change(Some(&b), None, &opts, Some(&mut delta));
        let ops = delta.into_ops();
        let Op::DelElements { elements, .. } = &ops[0] else { panic!("{ops:?}") };
        assert_eq!(elements.len(), 2, "b's ClusterIP and the external address; the node address stays: {ops:?}");
        assert_eq!(roles(&gate), vec![("192.0.2.1".into(), Role::Node)]);
        assert_eq!(gate.digests(), Gate::new(&opts).digests(), "digests follow the elements");
    }

    #[test]
    fn a_changed_role_is_a_delete_then_an_add_and_steps_that_cancel_send_nothing() {
        let opts = Options::default();
        let a = svc("a", "10.96.0.1", &["203.0.113.7"]);
        let b = svc("b", "203.0.113.7", &[]);
        let mut gate = Gate::of(&opts, [&a]);
        let mut delta = GateDelta::default();
        gate.change(None, Some(&b), &opts, Some(&mut delta));
        let ops = delta.into_ops();
        assert!(
            matches!(&ops[..], [Op::DelElements { .. }, Op::AddElements { elements, .. }] if elements[0].goto.as_deref() == Some("cluster-ip-v4")),
            "{ops:?}"
        );
        let mut delta = GateDelta::default();
        gate.change(Some(&b), None, &opts, Some(&mut delta));
        gate.change(None, Some(&b), &opts, Some(&mut delta));
        assert!(delta.into_ops().is_empty());
        assert_eq!(gate.digests(), Gate::of(&opts, [&a, &b]).digests());
    }
}
