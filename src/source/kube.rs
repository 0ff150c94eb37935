//! Services, EndpointSlices and our own Node from the Kubernetes API, through kube-rs
//! reflectors. The stores keep the last state when the API goes away; the watchers re-list
//! with backoff (also after 410 Gone); each outage is logged once, not in a loop.

use crate::lock;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::changes::{self, Changed, Tracker};
use super::resolve::LABEL_SERVICE_NAME;
use super::{API_ORIGIN, Change, InputErrors, Objects, Origin, Pending, Source, k8s};
use crate::model::{Family, ServiceId};

/// kube-proxy's server-side filter on Services.
pub const SERVICE_SELECTOR: &str = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// EndpointSlice annotation with the time of the change that triggered it.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, kube::Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.map_err(kube::Error::InferKubeconfig)?
        }
        None => kube::Config::infer().await.map_err(kube::Error::InferConfig)?,
    };
    Client::try_from(config)
}

pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    changes: Arc<Mutex<Tracker>>,
    pending: Arc<Mutex<Pending>>,
}

/// Tells the EndpointSlice events that changed endpoints (kube-proxy's rule for counting them
/// and for the programming-latency metric) from those that did not.
#[derive(Default)]
struct SliceChanges {
    /// `(namespace, name)` -> a hash of the slice's endpoints and ports.
    seen: HashMap<(String, String), u64>,
}

impl SliceChanges {
    /// Records `slice`; true when its endpoints or ports differ from the last version seen.
    fn applied(&mut self, slice: &EndpointSlice) -> bool {
        let (namespace, name) = key_of(&slice.metadata);
        let mut h = std::hash::DefaultHasher::new();
        format!("{:?}{:?}", slice.endpoints, slice.ports).hash(&mut h);
        let hash = h.finish();
        self.seen.insert((namespace.to_string(), name.to_string()), hash) != Some(hash)
    }

    fn deleted(&mut self, slice: &EndpointSlice) {
        let (namespace, name) = key_of(&slice.metadata);
        self.seen.remove(&(namespace.to_string(), name.to_string()));
    }
}

/// The trigger time a slice update contributes to the programming-latency metric: its
/// annotation, when later than `started`.
fn trigger_of(slice: &EndpointSlice, started: SystemTime) -> Option<(SystemTime, Family)> {
    let at = slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME)?.parse::<k8s_openapi::jiff::Timestamp>().ok()?;
    let at = SystemTime::from(at);
    let family = if slice.address_type == "IPv6" { Family::V6 } else { Family::V4 };
    (at > started).then_some((at, family))
}

/// (namespace, name) of an object.
fn key_of(meta: &ObjectMeta) -> (&str, &str) {
    (meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or_default())
}

fn service_id(meta: &ObjectMeta) -> ServiceId {
    let (namespace, name) = key_of(meta);
    ServiceId::new(namespace, name)
}

/// The Service an EndpointSlice belongs to, by its `kubernetes.io/service-name` label.
fn slice_owner(slice: &EndpointSlice) -> Option<ServiceId> {
    let name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ServiceId::new(key_of(&slice.metadata).0, name.as_str()))
}

/// Runs a reflector for `K`; `observe` sees each event after the store has taken it (and
/// records what changed) before the loop is notified.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    tx: mpsc::Sender<Change>,
    mut observe: impl FnMut(&watcher::Event<K>, &Store<K>) + Send + 'static,
) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    let store = reader.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut down = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if down {
                        tracing::info!(kind, "Kubernetes API watch recovered");
                        down = false;
                    }
                    observe(&event, &store);
                    if matches!(event, watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone)
                    {
                        // Capacity 1: a pending notification already covers this change.
                        let _ = tx.try_send(Change);
                    }
                }
                Err(e) if !down => {
                    tracing::warn!(kind, error = %e, "Kubernetes API watch failed; serving the last known state, retrying with backoff");
                    down = true;
                }
                Err(_) => {}
            }
        }
    });
    reader
}

impl KubeSource {
    pub fn start(client: Client, node_name: &str, tx: mpsc::Sender<Change>) -> KubeSource {
        let changes = Arc::new(Mutex::new(Tracker::default()));
        let pending = Arc::new(Mutex::new(Pending::default()));
        let started = SystemTime::now();
        let c = changes.clone();
        let p = pending.clone();
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_SELECTOR),
            "Service",
            tx.clone(),
            move |event, _| match event {
                watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                    lock(&p).services += 1;
                    lock(&c).service(service_id(&s.metadata))
                }
                watcher::Event::InitDone => lock(&c).everything(),
                watcher::Event::Init | watcher::Event::InitApply(_) => {}
            },
        );
        let c = changes.clone();
        let p = pending.clone();
        let mut seen = SliceChanges::default();
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            "EndpointSlice",
            tx.clone(),
            move |event, store| match event {
                watcher::Event::Apply(s) => {
                    let (namespace, name) = key_of(&s.metadata);
                    lock(&c).slice_applied(namespace, name, slice_owner(s));
                    if seen.applied(s) {
                        let mut p = lock(&p);
                        p.endpoints += 1;
                        p.trigger(trigger_of(s, started));
                    }
                }
                watcher::Event::Delete(s) => {
                    let (namespace, name) = key_of(&s.metadata);
                    lock(&c).slice_deleted(namespace, name);
                    seen.deleted(s);
                    lock(&p).endpoints += 1;
                }
                watcher::Event::InitApply(s) => {
                    // A (re-)list: remember the slice; its trigger time, if new, counts.
                    if seen.applied(s) {
                        lock(&p).trigger(trigger_of(s, started));
                    }
                }
                watcher::Event::InitDone => {
                    let all = store.state();
                    let index = all.iter().map(|s| {
                        let (namespace, name) = key_of(&s.metadata);
                        (namespace, name, slice_owner(s))
                    });
                    lock(&c).slices_relisted(index);
                }
                watcher::Event::Init => {}
            },
        );
        let c = changes.clone();
        let node = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            "Node",
            tx,
            move |event, _| {
                if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    lock(&c).everything();
                }
            },
        );
        KubeSource { services, slices, node, changes, pending }
    }

    /// Waits until Services and EndpointSlices have been listed once.
    pub async fn wait_ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        // Our Node only gives the zone; do not wait long for it.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.node.wait_until_ready()).await;
    }

    /// This node's `InternalIP` addresses from the Node's status, once the Node has been seen:
    /// the `primary` node-port addresses in API mode, as kube-proxy takes them.
    pub fn node_ips(&self) -> Vec<std::net::IpAddr> {
        let node = self.node.state();
        let addresses = node.first().and_then(|n| n.status.as_ref()?.addresses.clone()).unwrap_or_default();
        addresses.iter().filter(|a| a.type_ == "InternalIP").filter_map(|a| a.address.parse().ok()).collect()
    }

    /// This node's `topology.kubernetes.io/zone` label, once the Node has been seen.
    pub fn zone(&self) -> Option<String> {
        self.node.state().first().and_then(|n| n.metadata.labels.as_ref()?.get("topology.kubernetes.io/zone").cloned())
    }
}

impl Source for KubeSource {
    fn objects(&self) -> Result<Objects, InputErrors> {
        let origin = Origin(API_ORIGIN.into());
        Ok(Objects {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (origin.clone(), Arc::new(k8s::Service::from(&**s))))
                .collect(),
            slices: self
                .slices
                .state()
                .iter()
                .map(|s| (origin.clone(), Arc::new(k8s::EndpointSlice::from(&**s))))
                .collect(),
            ..Default::default()
        })
    }

    fn service_count(&self) -> usize {
        self.services.state().len()
    }

    fn chain_estimate(&self) -> usize {
        let endpoints = self.slices.state().iter().map(|s| s.endpoints.len()).sum();
        crate::compile::chain_estimate(self.services.state().len(), endpoints)
    }

    fn skips_bad_objects(&self) -> bool {
        true
    }

    fn take_pending(&self) -> Pending {
        std::mem::take(&mut *lock(&self.pending))
    }

    fn pending_counts(&self) -> (usize, usize) {
        let p = lock(&self.pending);
        (p.services, p.endpoints)
    }

    fn zone(&self) -> Option<String> {
        KubeSource::zone(self)
    }

    fn node_internal_ips(&self) -> Option<Vec<std::net::IpAddr>> {
        Some(self.node_ips())
    }

    fn node_eligible(&self) -> bool {
        let node = self.node.state();
        let Some(n) = node.first() else { return true };
        let tainted = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
        n.metadata.deletion_timestamp.is_none() && !tainted
    }

    fn take_changed(&self) -> Changed {
        lock(&self.changes).take()
    }

    fn objects_of(&self, ids: &BTreeSet<ServiceId>) -> Option<Objects> {
        let origin = Origin(API_ORIGIN.into());
        let changes = lock(&self.changes);
        Some(changes::objects_of(
            &changes,
            ids,
            &origin,
            |id| self.services.get(&ObjectRef::new(&id.name).within(&id.namespace)),
            |ns, name| self.slices.get(&ObjectRef::new(name).within(ns)),
        ))
    }
}
