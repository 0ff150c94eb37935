//! Services, EndpointSlices and our own Node from the Kubernetes API, through kube-rs
//! reflectors. The stores keep the last state when the API goes away; the watchers re-list
//! with backoff (also after 410 Gone); each outage is logged once, not in a loop.

use std::fmt::Debug;
use std::path::Path;
use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{Change, InputErrors, Objects, Origin, Source};

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
}

fn change_time<K: Resource>(obj: &K) -> SystemTime {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME))
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(SystemTime::from)
        .unwrap_or_else(SystemTime::now)
}

fn spawn_reflector<K>(api: Api<K>, config: watcher::Config, kind: &'static str, tx: mpsc::Sender<Change>) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
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
                    let at = match &event {
                        watcher::Event::Apply(o) | watcher::Event::Delete(o) => Some(change_time(o)),
                        watcher::Event::InitDone => Some(SystemTime::now()),
                        _ => None,
                    };
                    if let Some(at) = at {
                        // Capacity 1: a pending notification already covers this change.
                        let _ = tx.try_send(Change { at });
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
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_SELECTOR),
            "Service",
            tx.clone(),
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            "EndpointSlice",
            tx.clone(),
        );
        let node = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            "Node",
            tx,
        );
        KubeSource { services, slices, node }
    }

    /// Waits until Services and EndpointSlices have been listed once.
    pub async fn wait_ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        // Our Node only gives the zone; do not wait long for it.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.node.wait_until_ready()).await;
    }

    /// This node's `topology.kubernetes.io/zone` label, once the Node has been seen.
    pub fn zone(&self) -> Option<String> {
        self.node.state().first().and_then(|n| n.metadata.labels.as_ref()?.get("topology.kubernetes.io/zone").cloned())
    }
}

impl Source for KubeSource {
    fn objects(&self) -> Result<Objects, InputErrors> {
        let origin = Origin("the Kubernetes API".into());
        Ok(Objects {
            services: self.services.state().iter().map(|s| (origin.clone(), (**s).clone())).collect(),
            slices: self.slices.state().iter().map(|s| (origin.clone(), (**s).clone())).collect(),
            ..Default::default()
        })
    }
}
