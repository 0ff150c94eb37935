//! Where desired state comes from. Manifest files and the Kubernetes API produce the
//! same [`Objects`], and [`resolve::resolve`] turns them into a [`crate::model::Snapshot`].

pub mod changes;
pub mod k8s;
pub mod manifest;
pub mod node_addrs;
pub mod resolve;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use k8s::{EndpointSlice, Endpoints, Namespace, Node, Pod, Service};

use crate::model::ServiceId;

/// The origin named in errors about objects read from the Kubernetes API.
pub const API_ORIGIN: &str = "the Kubernetes API";

/// Where an object came from: `file.yaml (document 2)`, or [`API_ORIGIN`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin(pub String);

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The Kubernetes objects nftproxy reads (the fields it reads, see [`k8s`]), each with its
/// origin. Shared, not copied: the manifest cache hands out the objects it holds, and gathering
/// files into one `Objects` moves pointers, not the objects.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: Vec<(Origin, Arc<Service>)>,
    pub slices: Vec<(Origin, Arc<EndpointSlice>)>,
    pub endpoints: Vec<(Origin, Arc<Endpoints>)>,
    pub pods: Vec<(Origin, Arc<Pod>)>,
    pub namespaces: Vec<(Origin, Arc<Namespace>)>,
    /// `v1 Node` objects (manifest mode): this node's gives the `primary` node-port addresses.
    pub nodes: Vec<(Origin, Arc<Node>)>,
}

impl Objects {
    /// Appends `other`'s objects (moved).
    pub fn append(&mut self, mut other: Objects) {
        self.services.append(&mut other.services);
        self.slices.append(&mut other.slices);
        self.endpoints.append(&mut other.endpoints);
        self.pods.append(&mut other.pods);
        self.namespaces.append(&mut other.namespaces);
        self.nodes.append(&mut other.nodes);
    }

    /// Makes room for `other`'s objects (so that appending file after file allocates once).
    pub fn reserve_for(&mut self, other: &Objects) {
        self.services.reserve(other.services.len());
        self.slices.reserve(other.slices.len());
        self.endpoints.reserve(other.endpoints.len());
        self.pods.reserve(other.pods.len());
        self.namespaces.reserve(other.namespaces.len());
        self.nodes.reserve(other.nodes.len());
    }

    /// Appends `other`'s objects (shared with it).
    pub fn extend_from(&mut self, other: &Objects) {
        self.services.extend_from_slice(&other.services);
        self.slices.extend_from_slice(&other.slices);
        self.endpoints.extend_from_slice(&other.endpoints);
        self.pods.extend_from_slice(&other.pods);
        self.namespaces.extend_from_slice(&other.namespaces);
        self.nodes.extend_from_slice(&other.nodes);
    }

    /// About how many chains these objects' Services make: one per Service and one per
    /// endpoint of their EndpointSlices (`--table-shards auto` sizes tables by it).
    pub fn chain_estimate(&self) -> usize {
        let endpoints = self.slices.iter().map(|(_, s)| s.endpoints.len()).sum();
        crate::compile::chain_estimate(self.services.len(), endpoints)
    }

    /// The `InternalIP` addresses of Node `name`, when the objects hold that Node.
    pub fn node_internal_ips(&self, name: &str) -> Option<Vec<std::net::IpAddr>> {
        let (_, node) = self.nodes.iter().find(|(_, n)| n.metadata.name.as_deref() == Some(name))?;
        let addresses = node.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default();
        Some(addresses.iter().filter(|a| a.type_ == "InternalIP").filter_map(|a| a.address.parse().ok()).collect())
    }
}

/// Bad input: names the place, the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {object}: {field}: {message}")]
pub struct InputError {
    pub origin: String,
    /// `Service default/web`
    pub object: String,
    /// `spec.ports[0].port`
    pub field: String,
    pub message: String,
}

/// All the input errors of one run (reported together, nothing applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct InputErrors(pub Vec<InputError>);

/// Something changed in the input: a wake-up for the agent's loop. What changed is asked of
/// the source (`take_changed`, `take_pending`), so notifications can coalesce.
#[derive(Debug, Clone, Copy)]
pub struct Change;

/// Changes seen since the last sync, as kube-proxy counts them for its metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    /// Service events (`kubeproxy_sync_proxy_rules_service_changes_pending`).
    pub services: usize,
    /// EndpointSlice events that changed endpoints, and deletions.
    pub endpoints: usize,
    /// For `kubeproxy_network_programming_duration_seconds`: the
    /// `endpoints.kubernetes.io/last-change-trigger-time` of each slice update that changed its
    /// endpoints, when later than the agent's start, with the slice's address family. Never
    /// for deletions or Service changes, as kube-proxy.
    pub triggers: Vec<(std::time::SystemTime, crate::model::Family)>,
}

/// Most trigger times kept between two syncs.
pub const MAX_TRIGGERS: usize = 4096;

impl Pending {
    /// Keeps a slice update's trigger time (at most [`MAX_TRIGGERS`] between two syncs).
    pub fn trigger(&mut self, at: Option<(std::time::SystemTime, crate::model::Family)>) {
        if self.triggers.len() < MAX_TRIGGERS {
            self.triggers.extend(at);
        }
    }
}

/// Where the agent's loop reads the current objects from.
pub trait Source: Send + Sync {
    fn objects(&self) -> Result<Objects, InputErrors>;

    /// How many Services there are; 0 when the input is unreadable.
    fn service_count(&self) -> usize {
        self.objects().map_or(0, |o| o.services.len())
    }

    /// About how many chains the Services make (for `--table-shards auto`, see
    /// [`Objects::chain_estimate`]); 0 when the input is unreadable.
    fn chain_estimate(&self) -> usize {
        self.objects().map_or(0, |o| o.chain_estimate())
    }

    /// The Services changed since the last call; `All` when this source cannot tell.
    fn take_changed(&self) -> changes::Changed {
        changes::Changed::All
    }

    /// Only the Services `ids` and the objects that give their endpoints, or `None` when this
    /// source cannot narrow its read (the caller then reads and resolves everything).
    fn objects_of(&self, _ids: &BTreeSet<ServiceId>) -> Option<Objects> {
        None
    }

    /// This node's zone as the source knows it now (the Node's `topology.kubernetes.io/zone`
    /// label in API mode); `None` when it does not know.
    fn zone(&self) -> Option<String> {
        None
    }

    /// This node's InternalIPs as the source knows them now (the Node object in API mode);
    /// `None` when it does not know.
    fn node_internal_ips(&self) -> Option<Vec<std::net::IpAddr>> {
        None
    }

    /// Whether this node should still receive load-balancer traffic: false while its Node is
    /// being deleted or carries the `ToBeDeletedByClusterAutoscaler` taint (KEP-3836).
    fn node_eligible(&self) -> bool {
        true
    }

    /// The changes since the last `take_pending` (none for sources that cannot tell).
    fn take_pending(&self) -> Pending {
        Pending::default()
    }

    /// How many Service and endpoint changes wait for a sync now.
    fn pending_counts(&self) -> (usize, usize) {
        (0, 0)
    }

    /// Whether a bad object is skipped on its own (the API: objects come and go independently)
    /// rather than failing the whole input (manifests: a file is one unit a person just edited).
    fn skips_bad_objects(&self) -> bool {
        false
    }

    /// Told, after every successful sync, what is now served (cluster DNS answers from it).
    fn served(&self, _snapshot: &crate::model::Snapshot) {}
}

/// Manifest files. The agent keeps each file's objects and re-reads only the files that
/// changed; a one-shot run reads each file once and keeps nothing.
pub struct Manifests {
    paths: Vec<std::path::PathBuf>,
    cache: Option<std::sync::Mutex<manifest::ManifestCache>>,
}

impl Manifests {
    /// `keep`: cache each file's objects between reads (the agent).
    pub fn new(paths: Vec<std::path::PathBuf>, keep: bool) -> Self {
        Manifests { paths, cache: keep.then(Default::default) }
    }
}

impl Source for Manifests {
    fn objects(&self) -> Result<Objects, InputErrors> {
        match &self.cache {
            Some(cache) => crate::lock(cache).load(&self.paths),
            None => manifest::load(&self.paths),
        }
    }
}

pub mod kube;
