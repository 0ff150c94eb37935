//! The seam between the sync engine and the kernel: what the engine needs from nf_tables and
//! conntrack, as a trait. [`LiveKernel`] is the real one (netlink); [`fake::FakeKernel`] is an
//! in-memory nf_tables that applies plans to a held rule set, so the engine's decisions (full,
//! partial, unchanged, repair, failure recovery, restart verification) are tested without root.

pub mod fake;

use crate::conntrack::Conntrack;
use crate::conntrack::stale::UdpTargets;
use crate::nft::{self, ApplyStats, Netlink};
use crate::plan::{KernelState, Plan};
use crate::ruleset::Element;

/// What the engine asks of the kernel.
pub trait Kernel {
    /// The nf_tables ruleset generation (moves with every commit by anyone).
    fn generation(&mut self) -> nft::Result<u32>;
    /// Everything in our tables.
    fn read_table(&mut self) -> nft::Result<KernelState>;
    /// The elements of one set of our main table; `None` when it does not exist.
    fn read_elements(&mut self, set: &str) -> nft::Result<Option<Vec<Element>>>;
    /// One atomic transaction; on error nothing of it was committed (as far as we can tell).
    fn apply(&mut self, plan: &Plan) -> nft::Result<ApplyStats>;
    /// Deletes the UDP conntrack entries `targets` calls stale; returns how many went. Failures
    /// are logged, never fatal: the rules are already committed.
    fn clean_udp(&mut self, targets: &UdpTargets) -> usize;
}

/// The real kernel: nf_tables and conntrack over netlink.
pub struct LiveKernel {
    nl: Netlink,
    /// Opened on first use; `Err` after it failed to open (cleanup is then skipped).
    conntrack: Option<Result<Conntrack, ()>>,
}

impl LiveKernel {
    pub fn open() -> nft::Result<Self> {
        Ok(Netlink::open()?.into())
    }
}

impl From<Netlink> for LiveKernel {
    fn from(nl: Netlink) -> Self {
        LiveKernel { nl, conntrack: None }
    }
}

impl Kernel for LiveKernel {
    fn generation(&mut self) -> nft::Result<u32> {
        self.nl.generation()
    }

    fn read_table(&mut self) -> nft::Result<KernelState> {
        self.nl.read_table()
    }

    fn read_elements(&mut self, set: &str) -> nft::Result<Option<Vec<Element>>> {
        self.nl.read_elements(set)
    }

    fn apply(&mut self, plan: &Plan) -> nft::Result<ApplyStats> {
        self.nl.apply(plan)
    }

    fn clean_udp(&mut self, targets: &UdpTargets) -> usize {
        let ct = self.conntrack.get_or_insert_with(|| {
            Conntrack::open()
                .map_err(|e| tracing::warn!(error = %e, "conntrack unavailable; stale UDP flows will not be cleared"))
        });
        let Ok(ct) = ct else { return 0 };
        // Streamed: only the stale entries are kept, however many UDP entries there are.
        let flows = match ct.udp_flows_where(|k| targets.is_stale(k)) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "dumping conntrack failed");
                return 0;
            }
        };
        let mut deleted = 0;
        for f in &flows {
            match ct.delete(f) {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, flow = ?f.key, "deleting a stale conntrack entry failed"),
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "deleted stale UDP conntrack entries");
        }
        deleted
    }
}
