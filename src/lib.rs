//! nftproxy: Kubernetes ClusterIP Services on nftables, programmed over netlink.
//!
//! Pure parts: [`model`] (what to serve), [`source`] (manifests -> model), [`compile`]
//! (model -> nftables objects), [`plan`] (kernel objects vs wanted objects -> smallest change),
//! [`report`]. I/O at the edge: [`nft`] (netlink), [`sync`] (one pass from input to kernel).

pub mod agent;
pub mod compile;
pub mod config;
pub mod conntrack;
pub mod dns;
pub mod healthcheck;
pub mod inspect;
pub mod kernel;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod oneshot;
pub mod plan;
pub mod report;
pub mod ruleset;
pub mod source;
pub mod sync;
pub mod sysctl;
pub mod trace;

/// Every way a sync can fail, one variant per step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid input, nothing was applied:\n{0}")]
    Input(#[from] source::InputErrors),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Input(_) => "input",
            Error::Nft(_) => "nftables",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Locks `m`, also after a holder panicked: what our mutexes guard (caches, counts, the last
/// read) has no invariant a panic halfway could break, and the agent must keep going.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
