//! The sync engine: brings the kernel to a snapshot with the smallest transaction.
//!
//! - Full sync (first run, after any failure, or when the ruleset generation moved because
//!   someone else committed): read our table back, diff everything, repair whatever drifted.
//! - Partial sync (the generation is the one our last commit left): the kernel still holds what
//!   we last wrote, so only the Services whose model changed are compiled and diffed.
//! - Unchanged: no Service changed and the generation did not move: one GETGEN round trip.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::compile::{self, Options, ServiceObjects};
use crate::compile::{STATE_SET, StateRecord};
use crate::conntrack::stale::UdpTargets;
use crate::kernel::Kernel;
use crate::model::{Family, Service, ServiceId, Snapshot};
use crate::nft::ApplyStats;
use crate::plan::{self, Op, Plan};
use crate::ruleset::{Element, SetKind};
use crate::ruleset::{RULE_FORMAT, Ruleset};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Read back and diffed everything.
    Full,
    /// Diffed only the changed Services against what we last committed.
    Partial,
    /// Nothing changed anywhere; nothing was read or sent.
    Unchanged,
}

/// Whether a kernel release (`6.18.44-...`) keeps owned tables after their owner exits:
/// NFT_TABLE_F_PERSIST and table adoption came with Linux 6.9.
pub fn kernel_has_persist(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 9)
}

/// Node addresses in the one order the skeleton and its digest are built from.
fn sorted(mut ips: Vec<std::net::IpAddr>) -> Vec<std::net::IpAddr> {
    ips.sort();
    ips.dedup();
    ips
}

/// The outcome of one sync.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub kind: SyncKind,
    pub plan: Plan,
    pub stats: ApplyStats,
    pub services_changed: usize,
    pub endpoints_changed: usize,
    pub read_back: Duration,
    /// Stale UDP conntrack entries deleted after the commit, and the time that took.
    pub conntrack_deleted: usize,
    pub conntrack_time: Duration,
    /// The same per IP family (only families that had something to reconcile).
    pub conntrack: Vec<ConntrackReconcile>,
    pub total: Duration,
}

/// One family's stale-UDP conntrack cleanup after a commit.
#[derive(Debug, Clone)]
pub struct ConntrackReconcile {
    pub family: Family,
    pub deleted: usize,
    pub time: Duration,
}

pub struct Engine {
    kernel: Box<dyn Kernel>,
    opts: Options,
    skeleton: Ruleset,
    /// What we last committed, per Service, with the digest of its objects.
    /// (Their objects are not kept: a partial sync recompiles the old model of each changed
    /// Service, which costs microseconds and saves tens of MiB at 10,000 Services.)
    services: BTreeMap<ServiceId, (Service, u64)>,
    skeleton_digest: u64,
    /// XOR of the digests in `services`.
    services_digest: u64,
    /// The state element(s) our table holds, as far as we know.
    state: Vec<Element>,
    /// The ruleset generation our last commit (or verified full sync) left, if we trust it.
    generation: Option<u32>,
    /// `services` holds exactly the models of the last snapshot synced: a caller's list of
    /// changed Services can be trusted. False after a failed sync.
    models_current: bool,
    /// With `--own-tables`, whether this process's socket owns our tables: nobody else can
    /// have changed them, so other programs' commits need no read-back.
    owns_tables: bool,
    /// No sync of this process has succeeded yet. Only then may the state record stand in for a
    /// read-back (a restart): afterwards the engine knows what it committed, and a generation
    /// that moved means someone else committed, perhaps writing that record too.
    restarting: bool,
}

fn endpoint_changes(old: Option<&Service>, new: Option<&Service>) -> usize {
    let set = |s: Option<&Service>| -> BTreeSet<String> {
        s.into_iter()
            .flat_map(|s| {
                s.ports
                    .iter()
                    .flat_map(move |p| p.endpoints.iter().map(move |e| format!("{}/{}/{e:?}", p.port, p.protocol)))
            })
            .collect()
    };
    set(old).symmetric_difference(&set(new)).count()
}

impl Engine {
    pub fn new(kernel: impl Kernel + 'static, mut opts: Options) -> Self {
        opts.node_ips = sorted(std::mem::take(&mut opts.node_ips));
        if opts.own_tables {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            if !kernel_has_persist(release.trim()) {
                tracing::warn!(
                    kernel = release.trim(),
                    "--own-tables needs Linux 6.9 or later (owned tables that outlive their owner); \
                     running without it: drift is repaired by the periodic check instead"
                );
                opts.own_tables = false;
            }
        }
        let skeleton = compile::skeleton(&opts);
        let skeleton_digest = compile::skeleton_digest(&skeleton);
        Engine {
            kernel: Box::new(kernel),
            opts,
            skeleton,
            services: BTreeMap::new(),
            skeleton_digest,
            services_digest: 0,
            state: Vec::new(),
            generation: None,
            models_current: false,
            owns_tables: false,
            restarting: true,
        }
    }

    /// The node's addresses that serve node ports changed: the next sync rewrites the node
    /// address sets (a full sync).
    pub fn set_node_ips(&mut self, ips: Vec<std::net::IpAddr>) {
        let ips = sorted(ips);
        if ips != self.opts.node_ips {
            tracing::info!(?ips, "node-port addresses");
            self.opts.node_ips = ips;
            self.skeleton = compile::skeleton(&self.opts);
            self.skeleton_digest = compile::skeleton_digest(&self.skeleton);
            self.generation = None;
        }
    }

    /// This node's zone changed (the Node's label): topology hints pick other endpoints, so
    /// the next sync compiles and compares everything (a full sync).
    pub fn set_zone(&mut self, zone: Option<String>) {
        if zone != self.opts.locality.zone {
            tracing::info!(?zone, "this node's zone");
            self.opts.locality.zone = zone;
            self.generation = None;
            self.models_current = false;
        }
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Forgets what the kernel holds: the next sync is a full one that reads everything back.
    pub fn distrust(&mut self) {
        self.generation = None;
    }

    pub fn sync(&mut self, snapshot: &Snapshot) -> crate::Result<Outcome> {
        self.sync_changed(snapshot, None)
    }

    /// Like [`Engine::sync`], told that only the Services `changed` can differ from the last
    /// snapshot synced: the others are not even compared. Ignored (everything is compared) after
    /// a failed sync, when what the engine holds may lag behind the caller's snapshots.
    pub fn sync_changed(
        &mut self,
        snapshot: &Snapshot,
        changed: Option<&BTreeSet<ServiceId>>,
    ) -> crate::Result<Outcome> {
        let hint = changed.filter(|_| self.models_current);
        self.models_current = false;
        let result = self.try_sync(snapshot, hint);
        match result {
            Ok(_) => {
                self.models_current = true;
                self.restarting = false;
            }
            Err(_) => {
                self.generation = None;
                self.owns_tables = false;
            }
        }
        result
    }

    /// The operations that make this process's socket the owner of our tables (adopting them
    /// from an agent that exited, or from a `--sync-once` run).
    fn adoption(&self) -> Vec<Op> {
        (0..self.opts.shards())
            .map(|k| Op::UpdateTable { name: crate::ruleset::shard_table(k), flags: self.skeleton.table_flags })
            .collect()
    }

    /// The Services whose model differs from what we last synced, and how many endpoints that is.
    fn changed_services(&self, snapshot: &Snapshot, hint: Option<&BTreeSet<ServiceId>>) -> (Vec<ServiceId>, usize) {
        let mut changed: Vec<ServiceId> = Vec::new();
        let mut endpoints_changed = 0;
        if let Some(ids) = hint {
            for id in ids {
                let (n, o) = (snapshot.services.get(id), self.services.get(id).map(|(s, _)| s));
                if n != o {
                    endpoints_changed += endpoint_changes(o, n);
                    changed.push(id.clone());
                }
            }
            return (changed, endpoints_changed);
        }
        // One ordered walk over both maps: added, removed and changed Services.
        let (mut new, mut old) = (snapshot.services.iter().peekable(), self.services.iter().peekable());
        loop {
            let (n, o) = match (new.peek(), old.peek()) {
                (None, None) => break,
                (Some((nk, _)), Some((ok, _))) => match nk.cmp(ok) {
                    Ordering::Less => (new.next(), None),
                    Ordering::Greater => (None, old.next()),
                    Ordering::Equal => (new.next(), old.next()),
                },
                (Some(_), None) => (new.next(), None),
                (None, Some(_)) => (None, old.next()),
            };
            let (n, o) = (n.map(|(_, s)| s), o.map(|(_, (s, _))| s));
            if let Some(svc) = n.or(o).filter(|_| n != o) {
                endpoints_changed += endpoint_changes(o, n);
                changed.push(svc.id.clone());
            }
        }
        (changed, endpoints_changed)
    }

    fn try_sync(&mut self, snapshot: &Snapshot, hint: Option<&BTreeSet<ServiceId>>) -> crate::Result<Outcome> {
        let start = Instant::now();
        let generation = self.kernel.generation()?;
        let (changed, endpoints_changed) = self.changed_services(snapshot, hint);
        let mut compiled: BTreeMap<ServiceId, ServiceObjects> = changed
            .iter()
            .filter_map(|id| Some((id.clone(), compile::compile_service(snapshot.services.get(id)?, &self.opts))))
            .collect();
        let digests: BTreeMap<ServiceId, u64> = compiled.iter().map(|(id, o)| (id.clone(), o.digest())).collect();
        // The digest of everything wanted: the skeleton's and each Service's, combined (XOR, so
        // only the changed Services' parts need updating).
        let digest = changed.iter().fold(self.skeleton_digest ^ self.services_digest, |acc, id| {
            let old = self.services.get(id).map_or(0, |(_, d)| *d);
            acc ^ old ^ digests.get(id).copied().unwrap_or(0)
        });

        // Owned tables can only have been changed by us: other programs' commits move the
        // generation but need no read-back.
        let trusted = self.generation == Some(generation) || (self.owns_tables && self.generation.is_some());
        let (kind, mut plan, read_back, record_state) = if trusted {
            if changed.is_empty() {
                return Ok(self.outcome(
                    SyncKind::Unchanged,
                    Plan::default(),
                    ApplyStats::default(),
                    0,
                    0,
                    Duration::ZERO,
                    start,
                ));
            }
            let old = changed
                .iter()
                .filter_map(|id| self.services.get(id))
                .map(|(s, _)| compile::compile_service(s, &self.opts));
            let plan = plan::plan_services(old, std::mem::take(&mut compiled).into_values(), &self.skeleton);
            let record = !plan.is_empty();
            (SyncKind::Partial, plan, Duration::ZERO, record)
        } else {
            let recorded = self
                .kernel
                .read_elements(STATE_SET)?
                .and_then(|e| if e.len() == 1 { compile::parse_state_element(&e[0]) } else { None });
            let wanted = StateRecord { generation, format: RULE_FORMAT, digest };
            if self.restarting && recorded == Some(wanted) {
                // Nobody committed anything since our last commit (the generation is the one it
                // produced) and that commit left exactly what we want (same digest): verified.
                self.state = vec![compile::state_element(generation, digest)];
                // Owned tables left by a previous run are orphaned: adopt them (one commit).
                let adopt = self.opts.own_tables && !self.owns_tables;
                let plan = Plan { ops: if adopt { self.adoption() } else { Vec::new() } };
                (SyncKind::Full, plan, start.elapsed(), adopt)
            } else {
                if let Some(r) = recorded.filter(|r| r.format != RULE_FORMAT) {
                    tracing::info!(
                        from = r.format,
                        to = RULE_FORMAT,
                        "the rules in the kernel were written in another rule format; rewriting what differs"
                    );
                }
                let have = self.kernel.read_table()?;
                let read_back = start.elapsed();
                let mut want = self.skeleton.clone();
                for (id, svc) in &snapshot.services {
                    let objs = compiled.remove(id).unwrap_or_else(|| compile::compile_service(svc, &self.opts));
                    compile::merge(&mut want, objs);
                }
                let plan = plan::plan(&have, want);
                let rebuilt = plan.ops.contains(&Op::DelTable(crate::ruleset::TABLE.to_string()));
                self.state = match have.sets.get(STATE_SET) {
                    Some(s) if !rebuilt => s.elements.clone(),
                    _ => Vec::new(),
                };
                // Recorded even when nothing else changes, so that the next restart is quick.
                (SyncKind::Full, plan, read_back, true)
            }
        };
        let new_state = compile::state_element(generation.wrapping_add(1), digest);
        if record_state {
            let old = std::mem::take(&mut self.state);
            if !old.is_empty() {
                plan.ops.push(Op::DelElements { set: STATE_SET.into(), kind: SetKind::State, elements: old });
            }
            plan.ops.push(Op::AddElements {
                set: STATE_SET.into(),
                kind: SetKind::State,
                elements: vec![new_state.clone()],
            });
        }
        let stats = self.kernel.apply(&plan)?;
        if record_state {
            self.state = vec![new_state];
        }
        // A full sync's plan sets every table's flags, so after it we own them.
        self.owns_tables = self.opts.own_tables && (self.owns_tables || kind == SyncKind::Full);
        self.generation = if plan.is_empty() {
            Some(generation)
        } else {
            match self.kernel.generation() {
                // Another commit slipped in between ours and the check: trust nothing (unless
                // the tables are ours alone).
                Ok(after) => (after == generation.wrapping_add(1) || self.owns_tables).then_some(after),
                // The commit stands (the rules, conntrack and bookkeeping below follow it); only
                // the shortcut is lost: the next sync reads everything back.
                Err(e) => {
                    tracing::warn!(error = %e, "committed, but reading the generation afterwards failed");
                    None
                }
            }
        };
        // Stale UDP flows go after the commit, so that new packets already meet the new rules.
        let mut targets = UdpTargets::default();
        for id in &changed {
            if let Some((old, _)) = self.services.get(id)
                && !snapshot.services.contains_key(id)
            {
                targets.add(old, true, &self.opts.node_ips);
            }
        }
        let reconcile: Box<dyn Iterator<Item = &Service>> = match kind {
            SyncKind::Full => Box::new(snapshot.services.values()),
            _ => Box::new(changed.iter().filter_map(|id| snapshot.services.get(id))),
        };
        for svc in reconcile {
            targets.add(svc, false, &self.opts.node_ips);
        }
        // One reconcile per IP family, as kube-proxy's metrics count them (`ip_family`).
        let mut conntrack = Vec::new();
        for family in [Family::V4, Family::V6] {
            let of_family = |((ip, _), _): &(&(IpAddr, u16), _)| Family::of(ip) == family;
            let part = UdpTargets(targets.0.iter().filter(of_family).map(|(k, v)| (*k, v.clone())).collect());
            if !part.is_empty() {
                let ct_start = Instant::now();
                let deleted = self.kernel.clean_udp(&part);
                conntrack.push(ConntrackReconcile { family, deleted, time: ct_start.elapsed() });
            }
        }
        for id in &changed {
            let replaced = match (snapshot.services.get(id), digests.get(id)) {
                (Some(svc), Some(&d)) => {
                    self.services_digest ^= d;
                    self.services.insert(id.clone(), (svc.clone(), d))
                }
                _ => self.services.remove(id),
            };
            if let Some((_, d)) = replaced {
                self.services_digest ^= d;
            }
        }
        let mut outcome = self.outcome(kind, plan, stats, changed.len(), endpoints_changed, read_back, start);
        outcome.conntrack_deleted = conntrack.iter().map(|c| c.deleted).sum();
        outcome.conntrack_time = conntrack.iter().map(|c| c.time).sum();
        outcome.conntrack = conntrack;
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &self,
        kind: SyncKind,
        plan: Plan,
        stats: ApplyStats,
        services_changed: usize,
        endpoints_changed: usize,
        read_back: Duration,
        start: Instant,
    ) -> Outcome {
        Outcome {
            kind,
            plan,
            stats,
            services_changed,
            endpoints_changed,
            read_back,
            conntrack_deleted: 0,
            conntrack_time: Duration::ZERO,
            conntrack: Vec::new(),
            total: start.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn owned_tables_need_linux_6_9() {
        for (release, has) in [
            ("6.18.44-fc-v669", true),
            ("6.9.0", true),
            ("7.0", true),
            ("6.8.12-amd64", false),
            ("5.15.0-91", false),
            ("", false),
        ] {
            assert_eq!(super::kernel_has_persist(release), has, "{release}");
        }
    }
}
