//! The sync engine: brings the kernel to a snapshot with the smallest transaction.
//!
//! - Full sync (first run, after any failure, or when the ruleset generation moved because
//!   someone else committed): read our table back, diff everything, repair whatever drifted.
//! - Partial sync (the generation is the one our last commit left): the kernel still holds what
//!   we last wrote, so only the Services whose model changed are compiled and diffed.
//! - Unchanged: no Service changed and the generation did not move: one GETGEN round trip.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::compile::STATE_SET;
use crate::compile::{self, Gate, GateDelta, Options, ServiceObjects, TableDigests};
use crate::conntrack::stale::UdpTargets;
use crate::kernel::{Commit, Kernel, Ready};
use crate::model::{Family, Service, ServiceId, Snapshot};
use crate::nft::ApplyStats;
use crate::plan::{self, Op, Plan};
use crate::ruleset::{Element, SetKind, shard_of_table};
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
    /// The tables read back (none when the kernel was trusted or verified by its state record).
    pub tables_read: Vec<String>,
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

/// What a sync must read back before it plans.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// Nothing: the kernel holds what we last committed (no commit by anyone else touched it).
    Trusted,
    /// These tables (by shard number): someone else's commits touched them, or (a restart)
    /// their digests in the state record differ from what we want. Empty on a restart: every
    /// table verified by the state record.
    Tables(BTreeSet<u32>),
    /// Everything.
    All,
}

pub struct Engine {
    kernel: Box<dyn Kernel>,
    opts: Options,
    skeleton: Ruleset,
    /// What we last committed, per Service, with the digest of its objects in each table.
    /// (Their objects are not kept: a partial sync recompiles the old model of each changed
    /// Service, which costs microseconds and saves tens of MiB at 10,000 Services.)
    services: BTreeMap<ServiceId, (Service, TableDigests)>,
    /// The skeleton's digest per table (by shard number).
    skeleton_digests: BTreeMap<u32, u64>,
    /// Per table, the XOR of the digests of the Services' objects in it.
    service_digests: BTreeMap<u32, u64>,
    /// The addresses each table's gate holds, with their holders: of `services` between syncs.
    gate: Gate,
    /// The state element(s) our table holds, as far as we know.
    state: Vec<Element>,
    /// The ruleset generation our last commit (or verified full sync) left, if we trust it.
    generation: Option<u32>,
    /// Our tables (by shard number) that other programs' commits touched after `generation`
    /// was trusted (seen by the event monitor): the next sync reads them back.
    dirty: BTreeSet<u32>,
    /// Commits the event monitor announced that no sync has accounted for yet, by generation.
    seen: BTreeMap<u32, Commit>,
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
    /// See [`STAGE_ABOVE_CHAINS`] and [`STAGE_MESSAGES`].
    stage_above_chains: usize,
    stage_messages: usize,
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn endpoint_changes(old: Option<&Service>, new: Option<&Service>) -> usize {
    // Borrowed, not formatted: a first sync counts every endpoint of the cluster here.
    fn set(s: Option<&Service>) -> BTreeSet<(u16, crate::model::Protocol, &crate::model::Endpoint)> {
        s.into_iter()
            .flat_map(|s| s.ports.iter().flat_map(|p| p.endpoints.iter().map(move |e| (p.port, p.protocol, e))))
            .collect()
    }
    set(old).symmetric_difference(&set(new)).count()
}

/// Counts in `gate` the `changed` Services going from what `services` held to what `snapshot`
/// has, with the elements that change in `delta` when a partial plan needs them.
fn count_gate(
    gate: &mut Gate,
    services: &BTreeMap<ServiceId, (Service, TableDigests)>,
    snapshot: &Snapshot,
    changed: &[ServiceId],
    opts: &Options,
    mut delta: Option<&mut GateDelta>,
) {
    for id in changed {
        gate.change(services.get(id).map(|(s, _)| s), snapshot.services.get(id), opts, delta.as_deref_mut());
    }
}

/// `acc` with `digests` XORed into their tables.
fn xor_into(acc: &mut BTreeMap<u32, u64>, digests: &TableDigests) {
    for (k, d) in digests {
        *acc.entry(*k).or_insert(0) ^= d;
    }
}

/// A first sync (the kernel holds none of our tables) of more chains than this creates what no
/// packet reaches yet in transactions of about [`STAGE_MESSAGES`] messages, each compiled just
/// before it is sent, then makes it reachable in one last transaction (base chains and their
/// rules). One batch would be alive next to everything it was encoded from (169 MiB of batch at
/// 5,000 Services x 50 endpoints: peak RSS 416 MiB, staged 96 MiB), and the kernel commits
/// small transactions of new chains faster (10,000 x 5: 0.82 s against 0.87 s; 44,000 x 1:
/// 1.24 s against 1.46 s; docs/benchmark.md).
pub const STAGE_ABOVE_CHAINS: usize = 10_000;
/// Overrides [`STAGE_ABOVE_CHAINS`] (the tests stage small rule sets).
pub const STAGE_ABOVE_ENV: &str = "NFTPROXY_STAGE_ABOVE_CHAINS";
/// Messages per staging transaction (about 8 MiB of batch).
pub const STAGE_MESSAGES: usize = 32_768;
/// Overrides [`STAGE_MESSAGES`].
pub const STAGE_MESSAGES_ENV: &str = "NFTPROXY_STAGE_MESSAGES";

/// What a staged first sync committed before its last transaction.
#[derive(Default)]
struct Staged {
    commits: u32,
    stats: ApplyStats,
    /// Every Service with its digests, as the engine keeps them once the sync is done: made by
    /// the thread that compiles the stages, which waits on the kernel anyway.
    models: Option<BTreeMap<ServiceId, (Service, TableDigests)>>,
}

/// The chains these Services compile to, about (see `compile::chain_estimate`).
fn chains_of<'a>(services: impl Iterator<Item = &'a Service>) -> usize {
    services.map(|s| s.ports.iter().map(|p| 1 + p.endpoints.len()).sum::<usize>() * s.cluster_ips.len().max(1)).sum()
}

/// Most commits by others between two syncs that are accounted for one by one; more (a
/// generation far ahead) means a read-back.
const MAX_ACCOUNTED: u32 = 1 << 20;

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
        let skeleton_digests = compile::skeleton_digests(&skeleton);
        let gate = Gate::new(&opts);
        Engine {
            gate,
            kernel: Box::new(kernel),
            opts,
            skeleton,
            services: BTreeMap::new(),
            skeleton_digests,
            service_digests: BTreeMap::new(),
            state: Vec::new(),
            generation: None,
            dirty: BTreeSet::new(),
            seen: BTreeMap::new(),
            models_current: false,
            owns_tables: false,
            restarting: true,
            stage_above_chains: env_or(STAGE_ABOVE_ENV, STAGE_ABOVE_CHAINS),
            stage_messages: env_or(STAGE_MESSAGES_ENV, STAGE_MESSAGES).max(1),
        }
    }

    /// The node's addresses that serve node ports changed: the next sync rewrites the node
    /// address sets (a full sync).
    pub fn set_node_ips(&mut self, ips: Vec<std::net::IpAddr>) {
        let ips = sorted(ips);
        if ips != self.opts.node_ips {
            tracing::info!(?ips, "node-port addresses");
            self.gate.set_node_ips(&ips);
            self.opts.node_ips = ips;
            self.skeleton = compile::skeleton(&self.opts);
            self.skeleton_digests = compile::skeleton_digests(&self.skeleton);
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

    /// Stage first syncs of more than `above_chains` chains, `messages` per transaction (see
    /// [`STAGE_ABOVE_CHAINS`]).
    pub fn set_staging(&mut self, above_chains: usize, messages: usize) {
        (self.stage_above_chains, self.stage_messages) = (above_chains, messages.max(1));
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
                // The gate counted this sync's changes: count again from what was committed.
                self.gate = Gate::of(&self.opts, self.services.values().map(|(s, _)| s));
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

    /// Accounts for every commit that produced a generation in `(from, to]` with the events
    /// the monitor announced: `Some(our tables others touched)` when each such commit was seen,
    /// or is one of the `ours_unseen` commits of our own the monitor did not watch; `None` when
    /// that cannot be told (no monitor, lost events, a commit nobody announced).
    fn account(&mut self, from: u32, to: u32, ours_unseen: u32) -> Option<BTreeSet<u32>> {
        let span = to.wrapping_sub(from);
        let commits = self.kernel.commits(Some(to))?;
        if commits.lost {
            tracing::info!("nf_tables events were lost; reading all our tables back");
            self.seen.clear();
            return None;
        }
        for c in commits.commits {
            self.seen.insert(c.generation, c);
        }
        // Commits at or before `from` are accounted for already.
        self.seen.retain(|g, _| g.wrapping_sub(from) as i32 > 0);
        if span > MAX_ACCOUNTED {
            return None;
        }
        let (mut touched, mut unseen) = (BTreeSet::new(), 0);
        for g in (1..=span).map(|i| from.wrapping_add(i)) {
            match self.seen.remove(&g) {
                Some(c) if !c.own => {
                    if !c.tables.is_empty() {
                        tracing::info!(by = %c.by, generation = g, tables = ?c.tables, "another program changed our tables");
                    }
                    touched.extend(c.tables);
                }
                Some(_) => {}
                None => unseen += 1,
            }
        }
        (unseen <= ours_unseen).then_some(touched)
    }

    /// What this sync must read back, given the generation now and the digests we want per table.
    fn scope(&mut self, generation: u32, wanted: &BTreeMap<u32, u64>) -> crate::Result<(Scope, Option<Vec<Element>>)> {
        // Owned tables can only have been changed by us: other programs' commits move the
        // generation but need no read-back.
        if self.owns_tables && self.generation.is_some() {
            return Ok((Scope::Trusted, None));
        }
        if let Some(last) = self.generation {
            if last == generation && self.dirty.is_empty() {
                return Ok((Scope::Trusted, None));
            }
            let Some(mut touched) = self.account(last, generation, 0) else {
                return Ok((Scope::All, None));
            };
            touched.append(&mut self.dirty);
            if touched.is_empty() {
                tracing::debug!(from = last, to = generation, "other programs committed, none to our tables");
                return Ok((Scope::Trusted, None));
            }
            return Ok((Scope::Tables(touched), None));
        }
        if !self.restarting {
            return Ok((Scope::All, None));
        }
        let elements = self.kernel.read_elements(STATE_SET)?.unwrap_or_default();
        let Some((record, recorded)) = compile::parse_state(&elements) else {
            return Ok((Scope::All, None));
        };
        if record.format != RULE_FORMAT {
            tracing::info!(
                from = record.format,
                to = RULE_FORMAT,
                "the rules in the kernel were written in another rule format; rewriting what differs"
            );
            return Ok((Scope::All, None));
        }
        if record.generation != generation || recorded.is_empty() {
            return Ok((Scope::All, None));
        }
        // Nobody committed anything since our last commit (the generation is the one it
        // produced): the tables whose digest is what we want hold it.
        let differ: BTreeSet<u32> =
            recorded.keys().chain(wanted.keys()).filter(|k| recorded.get(k) != wanted.get(k)).copied().collect();
        Ok((Scope::Tables(differ), Some(elements)))
    }

    /// Each table's digest with the `changed` Services' parts replaced by `digests` (the
    /// skeleton's, the gate's and each Service's parts, combined by XOR so that only the changed
    /// ones need updating): the Services' part alone, and the whole.
    fn wanted_digests(
        &self,
        changed: &[ServiceId],
        digests: &BTreeMap<ServiceId, TableDigests>,
    ) -> (BTreeMap<u32, u64>, BTreeMap<u32, u64>) {
        let mut services_now = self.service_digests.clone();
        for id in changed {
            if let Some((_, old)) = self.services.get(id) {
                xor_into(&mut services_now, old);
            }
            if let Some(new) = digests.get(id) {
                xor_into(&mut services_now, new);
            }
        }
        let mut wanted = self.skeleton_digests.clone();
        xor_into(&mut wanted, &services_now.iter().map(|(k, d)| (*k, *d)).collect());
        xor_into(&mut wanted, &self.gate.digests().iter().map(|(k, d)| (*k, *d)).collect());
        (services_now, wanted)
    }

    /// Whether the state record could verify the kernel on this sync (a restart, the record
    /// ours, in this rule format and from this generation): only then does [`Engine::scope`]
    /// need the digests wanted before anything is read back.
    fn record_may_verify(&mut self, generation: u32) -> crate::Result<bool> {
        if !self.restarting {
            return Ok(false);
        }
        let elements = self.kernel.read_elements(STATE_SET)?.unwrap_or_default();
        Ok(compile::parse_state(&elements)
            .is_some_and(|(r, recorded)| r.format == RULE_FORMAT && r.generation == generation && !recorded.is_empty()))
    }

    /// The skeleton and every Service, compiled (reusing `compiled`), cut to the tables `shards`
    /// (all when `None`).
    fn want(
        &self,
        snapshot: &Snapshot,
        compiled: &mut BTreeMap<ServiceId, ServiceObjects>,
        shards: Option<&BTreeSet<u32>>,
        mut digests: Option<&mut BTreeMap<ServiceId, TableDigests>>,
    ) -> Ruleset {
        let mut want = self.skeleton.clone();
        if let Some(shards) = shards {
            want.chains.retain(|n, _| crate::plan::in_tables(n, shards));
            want.sets.retain(|n, _| crate::plan::in_tables(n, shards));
        }
        for (id, svc) in &snapshot.services {
            // A Service's objects all live in its shard's table (the main one is shard 0):
            // only those of the tables read are compiled and held, as holding every Service's
            // at once is what made a restart at 5,000 x 50 peak above 200 MiB.
            if shards.is_some_and(|s| !s.contains(&self.opts.shard_of(id))) {
                continue;
            }
            let objs = compiled.remove(id).unwrap_or_else(|| compile::compile_service(svc, &self.opts));
            if let Some(d) = digests.as_deref_mut() {
                // Those of a changed Service were taken before planning.
                d.entry(id.clone()).or_insert_with(|| objs.table_digests());
            }
            compile::merge(&mut want, objs);
        }
        compile::merge_gate(&mut want, &self.gate);
        want
    }

    fn try_sync(&mut self, snapshot: &Snapshot, hint: Option<&BTreeSet<ServiceId>>) -> crate::Result<Outcome> {
        let start = Instant::now();
        if self.generation.is_none() {
            // Everything before this sync's generation is read back or verified: the events
            // queued so far (and any loss among them) do not matter.
            let _ = self.kernel.commits(None);
            self.seen.clear();
        }
        let generation = self.kernel.generation()?;
        let (changed, endpoints_changed) = self.changed_services(snapshot, hint);
        // A big sync keeps only each changed Service's digests: its objects are compiled again
        // where they are planned (microseconds each), so that they are never all alive at once.
        let big = chains_of(changed.iter().filter_map(|id| snapshot.services.get(id))) > self.stage_above_chains;
        // A big sync that will read everything back anyway (no trusted generation, no state
        // record to verify against) needs no digests before it plans: they are taken from the
        // objects as they are planned, so that nothing is compiled twice.
        let defer = big && self.generation.is_none() && !self.record_may_verify(generation)?;
        let mut compiled: BTreeMap<ServiceId, ServiceObjects> = BTreeMap::new();
        let mut digests: BTreeMap<ServiceId, TableDigests> = BTreeMap::new();
        for id in changed.iter().filter(|_| !defer) {
            if let Some(svc) = snapshot.services.get(id) {
                let objects = compile::compile_service(svc, &self.opts);
                digests.insert(id.clone(), objects.table_digests());
                if !big {
                    compiled.insert(id.clone(), objects);
                }
            }
        }
        // The gate's elements are shared by Services: it counts their holders (see gate.rs).
        let mut gate = GateDelta::default();
        if !defer {
            count_gate(&mut self.gate, &self.services, snapshot, &changed, &self.opts, Some(&mut gate));
        }
        let early = (!defer).then(|| self.wanted_digests(&changed, &digests));
        let (scope, recorded) = match &early {
            Some((_, wanted)) => self.scope(generation, wanted)?,
            None => (Scope::All, None),
        };
        let mut taken = defer.then_some(&mut digests);
        // Commits made before the plan below (a big first sync's unreachable objects).
        let mut staged = Staged::default();
        let (kind, mut plan, read_back, tables_read, record_state) = match scope {
            Scope::Trusted => {
                if changed.is_empty() {
                    self.generation = Some(generation);
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
                let plan = self.partial_plan(snapshot, &changed, &mut compiled, gate, &BTreeSet::new());
                let record = !plan.is_empty();
                (SyncKind::Partial, plan, Duration::ZERO, Vec::new(), record)
            }
            Scope::Tables(shards) if shards.is_empty() => {
                // A restart over rules we left, each table's digest what we want: verified.
                self.state = recorded.unwrap_or_default();
                // Owned tables left by a previous run are orphaned: adopt them (one commit).
                let adopt = self.opts.own_tables && !self.owns_tables;
                let plan = Plan { ops: if adopt { self.adoption() } else { Vec::new() } };
                (SyncKind::Full, plan, start.elapsed(), Vec::new(), adopt)
            }
            Scope::Tables(shards) => {
                // Read back only these tables; the changed Services elsewhere get a partial plan
                // (not on a restart: it knows no old models, the other tables are verified).
                let mut others = if self.restarting {
                    Plan::default()
                } else {
                    self.partial_plan(snapshot, &changed, &mut compiled, gate, &shards)
                };
                // What is wanted first: the chains it names are asked for by name.
                let want = self.want(snapshot, &mut compiled, Some(&shards), None);
                let expected: Vec<&str> = want.chains.keys().map(String::as_str).collect();
                let mut have = self.kernel.read_tables(&shards, &expected)?;
                drop(expected);
                let read_back = start.elapsed();
                let mut plan = plan::plan_tables(&mut have, want, &shards);
                if shards.contains(&0) {
                    self.take_state(&have, &plan);
                } else if let Some(recorded) = recorded {
                    self.state = recorded;
                }
                plan.ops.append(&mut others.ops);
                let names: Vec<String> = shards.iter().map(|k| crate::ruleset::shard_table(*k)).collect();
                tracing::info!(tables = ?names, "read back");
                (SyncKind::Full, plan, read_back, names, true)
            }
            Scope::All => {
                self.dirty.clear();
                let tables = self.kernel.tables()?;
                // Recorded even when nothing else changes, so that the next restart is quick.
                if tables.is_empty() && chains_of(snapshot.services.values()) > self.stage_above_chains {
                    tracing::info!(tables = ?tables, "read back");
                    let read_back = start.elapsed();
                    let (plan, done) = self.stage_first_sync(snapshot, &changed, defer, &mut compiled, taken.take())?;
                    staged = done;
                    self.state = Vec::new();
                    (SyncKind::Full, plan, read_back, tables, true)
                } else {
                    if defer {
                        count_gate(&mut self.gate, &self.services, snapshot, &changed, &self.opts, None);
                    }
                    let before = start.elapsed();
                    let (plan, names, reading) =
                        self.plan_each_table(snapshot, &tables, &mut compiled, taken.take())?;
                    tracing::info!(tables = ?names, "read back");
                    (SyncKind::Full, plan, before + reading, names, true)
                }
            }
        };
        let (services_now, wanted) = early.unwrap_or_else(|| self.wanted_digests(&changed, &digests));
        let new_state = compile::state_elements(generation.wrapping_add(1 + staged.commits), &wanted);
        if record_state {
            let old = std::mem::take(&mut self.state);
            let gone: Vec<Element> = old.iter().filter(|e| !new_state.contains(e)).cloned().collect();
            let added: Vec<Element> = new_state.iter().filter(|e| !old.contains(e)).cloned().collect();
            if !gone.is_empty() {
                plan.ops.push(Op::DelElements { set: STATE_SET.into(), kind: SetKind::State, elements: gone });
            }
            if !added.is_empty() {
                plan.ops.push(Op::AddElements { set: STATE_SET.into(), kind: SetKind::State, elements: added });
            }
        }
        let mut stats = self.kernel.apply(&plan)?;
        stats.messages += staged.stats.messages;
        stats.bytes += staged.stats.bytes;
        stats.kernel += staged.stats.kernel;
        let commits = staged.commits + u32::from(!plan.is_empty());
        if record_state {
            self.state = new_state;
        }
        // A full sync's plan sets every table's flags, so after it we own them.
        self.owns_tables = self.opts.own_tables && (self.owns_tables || kind == SyncKind::Full);
        self.generation = if commits == 0 {
            Some(generation)
        } else {
            match self.kernel.generation() {
                Ok(after) if after == generation.wrapping_add(commits) || self.owns_tables => Some(after),
                // Another commit slipped in between ours and the check: the events tell which
                // tables it touched (ours went unseen); without them, trust nothing.
                Ok(after) => self.account(generation, after, commits).map(|touched| {
                    self.dirty.extend(touched);
                    after
                }),
                // The commit stands (the rules, conntrack and bookkeeping below follow it); only
                // the shortcut is lost: the next sync reads everything back.
                Err(e) => {
                    tracing::warn!(error = %e, "committed, but reading the generation afterwards failed");
                    None
                }
            }
        };
        // Stale UDP flows go after the commit, so that new packets already meet the new rules.
        // Conntrack is read only for changes that can strand a flow (a UDP endpoint gone, a UDP
        // port from none to some, a UDP Service deleted), and on a process's first sync, which
        // cannot know what went away while no agent ran.
        let mut targets = UdpTargets::default();
        for id in &changed {
            let old = self.services.get(id).map(|(s, _)| s);
            let new = snapshot.services.get(id);
            if !(self.restarting || crate::conntrack::stale::may_leave_stale(old, new)) {
                continue;
            }
            match (new, old) {
                (Some(svc), _) => targets.add(svc, false, &self.opts.node_ips),
                (None, Some(old)) => targets.add(old, true, &self.opts.node_ips),
                (None, None) => {}
            }
        }
        // One reconcile per IP family, as kube-proxy's metrics count them (`ip_family`).
        let mut conntrack = Vec::new();
        for family in [Family::V4, Family::V6] {
            let part = targets.of_family(family);
            if !part.is_empty() {
                let ct_start = Instant::now();
                let deleted = self.kernel.clean_udp(&part);
                conntrack.push(ConntrackReconcile { family, deleted, time: ct_start.elapsed() });
            }
        }
        match staged.models.take() {
            // A staged first sync made the whole map on its compiling thread.
            Some(models) => self.services = models,
            None => {
                for id in &changed {
                    match (snapshot.services.get(id), digests.remove(id)) {
                        (Some(svc), Some(d)) => {
                            self.services.insert(id.clone(), (svc.clone(), d));
                        }
                        _ => {
                            self.services.remove(id);
                        }
                    }
                }
            }
        }
        self.service_digests = services_now;
        let mut outcome = self.outcome(kind, plan, stats, changed.len(), endpoints_changed, read_back, start);
        outcome.tables_read = tables_read;
        outcome.conntrack_deleted = conntrack.iter().map(|c| c.deleted).sum();
        outcome.conntrack_time = conntrack.iter().map(|c| c.time).sum();
        outcome.conntrack = conntrack;
        Ok(outcome)
    }

    /// The change for the `changed` Services from what we last committed for them, leaving out
    /// the tables `skip` (planned from a read-back instead).
    fn partial_plan(
        &self,
        snapshot: &Snapshot,
        changed: &[ServiceId],
        compiled: &mut BTreeMap<ServiceId, ServiceObjects>,
        gate: GateDelta,
        skip: &BTreeSet<u32>,
    ) -> Plan {
        let old =
            changed.iter().filter_map(|id| self.services.get(id)).map(|(s, _)| compile::compile_service(s, &self.opts));
        // The tables in `skip` are planned from `compiled` afterwards (see `want`): keep it then.
        let new: Vec<ServiceObjects> = changed
            .iter()
            .filter_map(|id| {
                let kept = if skip.is_empty() { compiled.remove(id) } else { compiled.get(id).cloned() };
                kept.or_else(|| Some(compile::compile_service(snapshot.services.get(id)?, &self.opts)))
            })
            .collect();
        let mut plan = plan::plan_services(old, new, &self.skeleton);
        plan.ops.extend(gate.into_ops());
        plan.ops.retain(|op| !shard_of_table(op.table()).is_some_and(|k| skip.contains(&k)));
        plan
    }

    /// A first sync in stages (see [`STAGE_ABOVE_CHAINS`]): commits the tables, sets and
    /// regular chains of the skeleton, then every Service's objects a few thousand at a time,
    /// each compiled, planned, encoded and sent before the next is compiled; returns the plan
    /// that makes them reachable (the base chains and their rules), still to be committed.
    /// If a stage fails, what was committed stays unreachable and the failed sync's successor
    /// reads it back like anything else.
    ///
    /// With `gate_later`, the gate is counted here for the `changed` Services while the first
    /// stage compiles, and its elements go in a transaction of their own after the skeleton.
    fn stage_first_sync(
        &mut self,
        snapshot: &Snapshot,
        changed: &[ServiceId],
        gate_later: bool,
        compiled: &mut BTreeMap<ServiceId, ServiceObjects>,
        mut digests: Option<&mut BTreeMap<ServiceId, TableDigests>>,
    ) -> crate::Result<(Plan, Staged)> {
        let mut skeleton = self.skeleton.clone();
        if !gate_later {
            compile::merge_gate(&mut skeleton, &self.gate);
        }
        let (unreached, last) = plan::plan(&Default::default(), skeleton).split_reachable();
        let mut staged = Staged::default();
        let ready = self.kernel.readier();
        let (gate, services) = (&mut self.gate, &self.services);
        let (kernel, opts, base, limit) = (&mut self.kernel, &self.opts, &self.skeleton, self.stage_messages);
        let mut commit = |stage: &Ready| -> crate::Result<()> {
            if !stage.plan.is_empty() {
                let stats = kernel.apply_ready(stage)?;
                staged.commits += 1;
                staged.stats.messages += stats.messages;
                staged.stats.bytes += stats.bytes;
                staged.stats.kernel += stats.kernel;
            }
            Ok(())
        };
        // The stages are compiled, planned and made ready (encoded) on one thread and freed on
        // another while this one commits, so that on two cores or more the stages cost about
        // what their commits cost. One stage waits in the channel: at most four are alive.
        let models = std::thread::scope(|scope| -> crate::Result<_> {
            let (next, stages) = std::sync::mpsc::sync_channel::<Ready>(1);
            let producer = scope.spawn(move || {
                let (mut chunk, mut messages, mut models) = (Vec::new(), 0, Vec::new());
                for (id, svc) in &snapshot.services {
                    let objects = compiled.remove(id).unwrap_or_else(|| compile::compile_service(svc, opts));
                    let d = objects.table_digests();
                    if let Some(digests) = digests.as_deref_mut() {
                        digests.insert(id.clone(), d.clone());
                    }
                    models.push((id.clone(), (svc.clone(), d)));
                    messages += objects.chains.values().map(|c| 1 + c.rules.len()).sum::<usize>() + objects.sets.len();
                    chunk.push(objects);
                    if messages >= limit {
                        messages = 0;
                        // A failed commit drops the receiver: nothing more to compile.
                        if next.send(ready(plan::plan_services([], std::mem::take(&mut chunk), base))).is_err() {
                            return None;
                        }
                    }
                }
                let _ = next.send(ready(plan::plan_services([], chunk, base)));
                Some(models.into_iter().collect())
            });
            let (freed, to_free) = std::sync::mpsc::channel::<Ready>();
            scope.spawn(move || to_free.into_iter().for_each(drop));
            // The tables, sets and chains first, while the first stage is compiled; the gate
            // is counted meanwhile too.
            commit(&Ready::unencoded(unreached))?;
            if gate_later {
                count_gate(gate, services, snapshot, changed, opts, None);
                let mut elements = base.clone();
                elements.chains.clear();
                elements.sets.retain(|_, s| matches!(s.kind, SetKind::Gate(_)));
                compile::merge_gate(&mut elements, gate);
                let ops = elements.sets.into_iter().filter(|(_, s)| !s.elements.is_empty());
                let ops = ops.map(|(set, s)| Op::AddElements { set, kind: s.kind, elements: s.elements });
                // Committed now, while nothing reaches the maps: in the last transaction, with
                // the base chains, the same elements made it 0.2 s longer at 44,000 Services.
                commit(&Ready::unencoded(Plan { ops: ops.collect() }))?;
            }
            for stage in stages {
                commit(&stage)?;
                let _ = freed.send(stage);
            }
            Ok(producer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })?;
        tracing::info!(
            transactions = staged.commits,
            messages = staged.stats.messages,
            kernel_ms = staged.stats.kernel.as_secs_f64() * 1e3,
            "first sync staged"
        );
        staged.models = models;
        Ok((last, staged))
    }

    /// Every table read back and planned one at a time, so that what is read and what is
    /// wanted are held for one table, not for all (a read-back of everything at 5,000 x 50
    /// held both for 255,000 chains). Tables of shards no longer used go whole, unread.
    /// Returns the plan, the tables read and the time spent reading.
    fn plan_each_table(
        &mut self,
        snapshot: &Snapshot,
        tables: &[String],
        compiled: &mut BTreeMap<ServiceId, ServiceObjects>,
        mut digests: Option<&mut BTreeMap<ServiceId, TableDigests>>,
    ) -> crate::Result<(Plan, Vec<String>, Duration)> {
        let shards = self.opts.shards();
        let unused = |t: &&String| crate::ruleset::shard_of_table(t).is_none_or(|k| k >= shards);
        let mut ops: Vec<Op> = tables.iter().filter(unused).map(|t| Op::DelTable(t.clone())).collect();
        let (mut read, mut reading) = (Vec::new(), Duration::ZERO);
        for k in 0..shards {
            let one = BTreeSet::from([k]);
            let want = self.want(snapshot, compiled, Some(&one), digests.as_deref_mut());
            let expected: Vec<&str> = want.chains.keys().map(String::as_str).collect();
            let t0 = Instant::now();
            let mut have = self.kernel.read_tables(&one, &expected)?;
            reading += t0.elapsed();
            drop(expected);
            // In table order, as one read-back planned them: the main table first.
            read.extend(have.tables().map(str::to_string));
            let plan = plan::plan_tables(&mut have, want, &one);
            if k == 0 {
                self.take_state(&have, &plan);
            }
            ops.extend(plan.ops);
        }
        Ok((Plan { ops }, read, reading))
    }

    /// The state elements a read-back of the main table found, unless the plan rebuilds it.
    fn take_state(&mut self, have: &crate::plan::KernelState, plan: &Plan) {
        let rebuilt = plan.ops.contains(&Op::DelTable(crate::ruleset::TABLE.to_string()));
        self.state = match have.sets.get(STATE_SET) {
            Some(s) if !rebuilt => s.elements.clone(),
            _ => Vec::new(),
        };
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
            tables_read: Vec::new(),
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
