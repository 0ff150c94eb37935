//! The seam between the sync engine and the kernel: what the engine needs from nf_tables and
//! conntrack, as a trait. [`LiveKernel`] is the real one (netlink); [`fake::FakeKernel`] is an
//! in-memory nf_tables that applies plans to a held rule set, so the engine's decisions (full,
//! partial, unchanged, repair, failure recovery, restart verification) are tested without root.

pub mod fake;

use std::collections::BTreeSet;

use crate::conntrack::Conntrack;
use crate::conntrack::stale::UdpTargets;
use crate::nft::encode::Encoded;
use crate::nft::monitor::Monitor;
use crate::nft::{self, ApplyStats, Netlink};
use crate::plan::{KernelState, Plan};
use crate::ruleset::Element;

/// What the engine asks of the kernel.
pub trait Kernel {
    /// The nf_tables ruleset generation (moves with every commit by anyone).
    fn generation(&mut self) -> nft::Result<u32>;
    /// Everything in our tables.
    fn read_table(&mut self) -> nft::Result<KernelState>;
    /// The names of our tables that exist.
    fn tables(&mut self) -> nft::Result<Vec<String>>;
    /// Everything in those of our tables (by shard number, 0: `nftproxy`) that exist; the
    /// others are left out as if they did not exist. `expected`: the chains (qualified names)
    /// the engine wants there, which the live kernel asks for by name (see
    /// [`Netlink::read_tables`]); chains not named are found all the same.
    fn read_tables(&mut self, shards: &BTreeSet<u32>, expected: &[&str]) -> nft::Result<KernelState>;
    /// The commits the nf_tables event monitor saw since the last call. With `upto`, waits
    /// briefly for the end of commit `upto` when it was not seen yet (the generation moves
    /// before a commit's events are sent). `None`: there is no monitor, so only the generation
    /// tells that someone committed.
    fn commits(&mut self, upto: Option<u32>) -> Option<Commits>;
    /// The elements of one set of our main table; `None` when it does not exist.
    fn read_elements(&mut self, set: &str) -> nft::Result<Option<Vec<Element>>>;
    /// One atomic transaction; on error nothing of it was committed (as far as we can tell).
    fn apply(&mut self, plan: &Plan) -> nft::Result<ApplyStats>;
    /// What makes a plan ready to commit without the kernel, on any thread (the live kernel
    /// encodes it): a big first sync readies its next stage while the kernel commits this one.
    fn readier(&self) -> fn(Plan) -> Ready {
        Ready::unencoded
    }
    /// [`Kernel::apply`] of a plan made ready by [`Kernel::readier`].
    fn apply_ready(&mut self, ready: &Ready) -> nft::Result<ApplyStats> {
        self.apply(&ready.plan)
    }
    /// Deletes the UDP conntrack entries `targets` calls stale; returns how many went. Failures
    /// are logged, never fatal: the rules are already committed.
    fn clean_udp(&mut self, targets: &UdpTargets) -> usize;
}

/// A plan and, when the kernel wants it, its encoding (see [`Kernel::readier`]).
pub struct Ready {
    pub plan: Plan,
    encoded: Option<Encoded>,
}

impl Ready {
    pub fn unencoded(plan: Plan) -> Ready {
        Ready { plan, encoded: None }
    }

    fn encoded(plan: Plan) -> Ready {
        let encoded = (!plan.is_empty()).then(|| nft::encode::encode_plan(&plan, 0));
        Ready { plan, encoded }
    }
}

/// One commit as the nf_tables events announced it (NFT_MSG_NEWGEN and the object events
/// before it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    /// The ruleset generation it produced.
    pub generation: u32,
    /// Sent by this process's own nf_tables socket.
    pub own: bool,
    /// Our tables (by shard number) any of its events named.
    pub tables: BTreeSet<u32>,
    /// Who committed, as the kernel names it (`nft[1234]`), for logs.
    pub by: String,
}

/// What the event monitor saw since it was last asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commits {
    /// Events were dropped (the socket's buffer overflowed): anything may have changed.
    pub lost: bool,
    pub commits: Vec<Commit>,
}

/// Commits of more messages than this are not watched by our own event monitor (see `apply`).
const PAUSE_ABOVE_MESSAGES: usize = 1000;

/// The real kernel: nf_tables and conntrack over netlink.
pub struct LiveKernel {
    nl: Netlink,
    /// The nf_tables event monitor; `None` when it could not be opened (every commit by someone
    /// else then means a read-back of all our tables, as the generation is all we know).
    monitor: Option<Monitor>,
    /// Opened on first use; `Err` after it failed to open (cleanup is then skipped).
    conntrack: Option<Result<Conntrack, ()>>,
}

impl LiveKernel {
    pub fn open() -> nft::Result<Self> {
        Ok(Netlink::open()?.into())
    }

    /// Commits `plan` with `commit`, the event monitor away meanwhile if the plan is big.
    fn unwatched_if_big(
        &mut self,
        plan: &Plan,
        commit: impl FnOnce(&mut Netlink) -> nft::Result<ApplyStats>,
    ) -> nft::Result<ApplyStats> {
        // A big commit's own events (a full sync: a hundred thousand) would overflow the
        // monitor's buffer: it leaves the group meanwhile. A commit by someone else in that
        // window shows as a generation no event accounts for, which the engine treats as lost
        // events. A small commit's events are read and recognised as ours (our port id), so
        // others' commits beside it stay accounted for.
        let pause = plan.message_count() > PAUSE_ABOVE_MESSAGES;
        if let Some(m) = self.monitor.as_mut().filter(|_| pause) {
            m.pause();
        }
        let result = commit(&mut self.nl);
        if let Some(m) = self.monitor.as_mut().filter(|_| pause) {
            m.resume();
        }
        result
    }
}

impl From<Netlink> for LiveKernel {
    fn from(nl: Netlink) -> Self {
        let monitor = Monitor::open(nl.portid())
            .map_err(|e| tracing::warn!(error = %e, "cannot follow nf_tables events; any commit by another program will mean a read-back"))
            .ok();
        LiveKernel { nl, monitor, conntrack: None }
    }
}

impl Kernel for LiveKernel {
    fn generation(&mut self) -> nft::Result<u32> {
        self.nl.generation()
    }

    fn read_table(&mut self) -> nft::Result<KernelState> {
        self.nl.read_table()
    }

    fn tables(&mut self) -> nft::Result<Vec<String>> {
        self.nl.our_tables()
    }

    fn read_tables(&mut self, shards: &BTreeSet<u32>, expected: &[&str]) -> nft::Result<KernelState> {
        self.nl.read_tables(Some(shards), Some(expected))
    }

    fn commits(&mut self, upto: Option<u32>) -> Option<Commits> {
        self.monitor.as_mut().map(|m| m.take(upto))
    }

    fn read_elements(&mut self, set: &str) -> nft::Result<Option<Vec<Element>>> {
        self.nl.read_elements(set)
    }

    fn apply(&mut self, plan: &Plan) -> nft::Result<ApplyStats> {
        self.unwatched_if_big(plan, |nl| nl.apply(plan))
    }

    fn readier(&self) -> fn(Plan) -> Ready {
        Ready::encoded
    }

    fn apply_ready(&mut self, ready: &Ready) -> nft::Result<ApplyStats> {
        match &ready.encoded {
            Some(enc) => self.unwatched_if_big(&ready.plan, |nl| nl.apply_encoded(enc, &ready.plan)),
            None => self.apply(&ready.plan),
        }
    }

    fn clean_udp(&mut self, targets: &UdpTargets) -> usize {
        let ct = self.conntrack.get_or_insert_with(|| {
            Conntrack::open()
                .map_err(|e| tracing::warn!(error = %e, "conntrack unavailable; stale UDP flows will not be cleared"))
        });
        let Ok(ct) = ct else { return 0 };
        // Streamed: the kernel sends the entries to the targets, the stale ones are deleted in
        // batches as they arrive; nothing is collected.
        let done = match ct.clean_udp(targets) {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(error = %e, "cleaning stale UDP conntrack entries failed");
                return 0;
            }
        };
        if let Some(e) = &done.error {
            tracing::warn!(error = %e, failed = done.failed, "deleting stale conntrack entries failed");
        }
        if done.answers_lost {
            tracing::warn!("some conntrack delete answers were lost; the deleted count may be slightly high");
        }
        let deleted = done.deleted;
        if deleted > 0 {
            tracing::info!(deleted, examined = done.examined, "deleted stale UDP conntrack entries");
        }
        deleted
    }
}
