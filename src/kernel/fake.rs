//! An in-memory nf_tables for tests: it applies a [`Plan`] to a held rule set the way the kernel
//! would (all or nothing, references checked, the generation bumped per commit), reads back like
//! the netlink read-back, and can be told to reject a transaction, to lose a commit's ack, to
//! fail a generation query, or to be changed by "someone else". It holds the real rules, so the
//! packet tracer (`crate::trace`) can check flows against what the fake kernel holds.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Commit, Commits, Kernel};
use crate::conntrack::stale::{FlowKey, UdpTargets};
use crate::nft::consts::{NF_ACCEPT, NFT_TABLE_F_PERSIST};
use crate::nft::encode::{Owner, describe};
use crate::nft::{ApplyStats, NftError, Result};
use crate::plan::{KernelState, Op, Plan, as_kernel_state};
use crate::ruleset::{Element, Ruleset, SetKind, Stmt, TABLE, shard_of_table, split_name};

/// What the fake kernel holds, and the knobs a test turns. Fields are public: a test changes
/// them through [`FakeKernel::foreign`] (a commit by someone else) or [`FakeKernel::with`].
#[derive(Debug, Clone, Default)]
pub struct FakeState {
    pub generation: u32,
    /// Our tables that exist, with their flags.
    pub tables: BTreeMap<String, u32>,
    /// Chains (with their real rules) and sets, named as the compiler names them.
    pub ruleset: Ruleset,
    /// Base chains whose policy is not accept.
    pub policies: BTreeMap<String, u32>,
    /// UDP conntrack entries.
    pub flows: Vec<FlowKey>,
    /// How many times conntrack was read (one per stale-flow cleanup).
    pub conntrack_reads: usize,
    /// The next transaction is rejected with this errno.
    pub reject_next: Option<i32>,
    /// `(n, errno)`: the transaction after the next `n` is rejected with `errno`.
    pub reject_later: Option<(usize, i32)>,
    /// The next transaction commits, but its answer is lost (an error is returned).
    pub lose_next_ack: bool,
    /// So many generation queries fail from now on.
    pub failing_generation_reads: usize,
    /// The generation query right after the next commit fails (the commit stands).
    pub fail_generation_after_commit: bool,
    /// Every committed plan, in order.
    pub committed: Vec<Plan>,
    /// Whether an nf_tables event monitor runs (off: `Kernel::commits` answers `None`).
    pub monitor: bool,
    /// The commits announced and not yet taken by `Kernel::commits`.
    pub events: Vec<Commit>,
    /// Events were dropped since they were last taken.
    pub events_lost: bool,
    /// How many tables each read-back read (a whole read-back counts all of ours).
    pub tables_read: Vec<usize>,
}

/// A handle on one fake kernel; clones share it (an engine restarted over the same kernel).
#[derive(Debug, Clone, Default)]
pub struct FakeKernel(Arc<Mutex<FakeState>>);

impl FakeKernel {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        crate::lock(&self.0)
    }

    /// Runs `f` on the state without committing anything.
    pub fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.lock())
    }

    /// A fake kernel whose nf_tables event monitor runs.
    pub fn with_monitor() -> Self {
        let k = FakeKernel::default();
        k.with(|s| s.monitor = true);
        k
    }

    /// Someone else commits: `f` changes the state, the generation moves, and (with a monitor)
    /// the commit is announced with the tables of ours it changed.
    pub fn foreign(&self, f: impl FnOnce(&mut FakeState)) {
        let mut s = self.lock();
        let before = s.clone();
        f(&mut s);
        s.generation = s.generation.wrapping_add(1);
        if s.monitor {
            let tables =
                (0..crate::ruleset::MAX_SHARDS).filter(|k| before.table_view(*k) != s.table_view(*k)).collect();
            let commit = Commit { generation: s.generation, own: false, tables, by: "nft[1]".into() };
            s.events.push(commit);
        }
    }

    /// The rules the fake kernel holds (for the tracer).
    pub fn ruleset(&self) -> Ruleset {
        self.lock().ruleset.clone()
    }
}

fn table_of(name: &str) -> &str {
    split_name(name).0
}

/// Chains a rule jumps to or goes to, and sets it reads.
fn references(stmts: &[Stmt]) -> (Vec<&str>, Vec<&str>) {
    let (mut chains, mut sets) = (Vec::new(), Vec::new());
    for s in stmts {
        match s {
            Stmt::Jump(c) | Stmt::Goto(c) => chains.push(c.as_str()),
            Stmt::DaddrInSet { set, .. }
            | Stmt::SaddrInSet { set, .. }
            | Stmt::HairpinInSet { set, .. }
            | Stmt::UpdateSaddrSet { set, .. }
            | Stmt::DaddrVmap { map: set, .. }
            | Stmt::DispatchVmap { map: set, .. }
            | Stmt::NodePortVmap { map: set } => sets.push(set.as_str()),
            _ => {}
        }
    }
    (chains, sets)
}

/// What one table holds, for comparing before and after a commit.
type TableView<'a> = (
    Option<u32>,
    Vec<(&'a String, &'a crate::ruleset::Chain)>,
    Vec<(&'a String, &'a crate::ruleset::Set)>,
    Vec<(&'a String, &'a u32)>,
);

impl FakeState {
    fn table_view(&self, shard: u32) -> TableView<'_> {
        let here = |n: &String| shard_of_table(table_of(n)) == Some(shard);
        (
            self.tables.get(&crate::ruleset::shard_table(shard)).copied(),
            self.ruleset.chains.iter().filter(|(n, _)| here(n)).collect(),
            self.ruleset.sets.iter().filter(|(n, _)| here(n)).collect(),
            self.policies.iter().filter(|(n, _)| here(n)).collect(),
        )
    }

    fn need_table(&self, name: &str) -> std::result::Result<(), i32> {
        if self.tables.contains_key(table_of(name)) { Ok(()) } else { Err(libc::ENOENT) }
    }

    fn chain_used(&self, name: &str) -> bool {
        let by_rule =
            self.ruleset.chains.values().flat_map(|c| c.rules.iter()).any(|r| references(&r.stmts).0.contains(&name));
        let by_element = self.ruleset.sets.values().flat_map(|s| &s.elements).any(|e| e.goto.as_deref() == Some(name));
        by_rule || by_element
    }

    fn set_flags(&mut self, name: &str, flags: u32) -> std::result::Result<(), i32> {
        if let Some(old) = self.tables.get(name)
            && (old ^ flags) & NFT_TABLE_F_PERSIST != 0
        {
            return Err(libc::EOPNOTSUPP);
        }
        self.tables.insert(name.to_string(), flags);
        Ok(())
    }

    /// One operation, as the kernel validates it; `Err(errno)` rejects the transaction.
    fn apply_op(&mut self, op: &Op) -> std::result::Result<(), i32> {
        let rs = &mut self.ruleset;
        match op {
            Op::DelTable(t) => {
                self.tables.remove(t).ok_or(libc::ENOENT)?;
                self.ruleset.chains.retain(|n, _| table_of(n) != t);
                self.ruleset.sets.retain(|n, _| table_of(n) != t);
                self.policies.retain(|n, _| table_of(n) != t);
            }
            Op::AddTable { name, flags } => self.set_flags(name, *flags)?,
            Op::UpdateTable { name, flags } => {
                self.tables.get(name).ok_or(libc::ENOENT)?;
                self.set_flags(name, *flags)?;
            }
            Op::AddSet { name, kind } => {
                self.need_table(name)?;
                let rs = &mut self.ruleset;
                rs.sets.entry(name.clone()).or_insert_with(|| crate::ruleset::Set { kind: *kind, elements: vec![] });
            }
            Op::AddChain { name, base } => {
                self.need_table(name)?;
                let rs = &mut self.ruleset;
                rs.chains
                    .entry(name.clone())
                    .or_insert_with(|| crate::ruleset::Chain { base: *base, rules: vec![].into() });
            }
            Op::UpdateChain { name, .. } => {
                rs.chains.get(name).ok_or(libc::ENOENT)?;
                self.policies.remove(name);
            }
            Op::FlushChain(name) => rs.chains.get_mut(name).ok_or(libc::ENOENT)?.rules = vec![].into(),
            Op::AddRules { chain, rules } => {
                for r in rules.iter() {
                    let (chains, sets) = references(&r.stmts);
                    if chains.iter().any(|c| !rs.chains.contains_key(*c))
                        || sets.iter().any(|s| !rs.sets.contains_key(*s))
                    {
                        return Err(libc::ENOENT);
                    }
                }
                let c = rs.chains.get_mut(chain).ok_or(libc::ENOENT)?;
                c.rules = c.rules.iter().chain(rules.iter()).cloned().collect();
            }
            Op::DelElements { set, elements, .. } => {
                let s = rs.sets.get_mut(set).ok_or(libc::ENOENT)?;
                for e in elements {
                    let at = s.elements.iter().position(|have| have.key == e.key).ok_or(libc::ENOENT)?;
                    s.elements.remove(at);
                }
            }
            Op::AddElements { set, elements, .. } => {
                if elements.iter().filter_map(|e| e.goto.as_deref()).any(|c| !rs.chains.contains_key(c)) {
                    return Err(libc::ENOENT);
                }
                let s = rs.sets.get_mut(set).ok_or(libc::ENOENT)?;
                for e in elements {
                    match s.elements.iter().find(|have| have.key == e.key) {
                        Some(have) if have != e => return Err(libc::EEXIST),
                        Some(_) => {}
                        None => s.elements.push(e.clone()),
                    }
                }
            }
            Op::DelChain(name) => {
                let c = rs.chains.get(name).ok_or(libc::ENOENT)?;
                if !c.rules.is_empty() || self.chain_used(name) {
                    return Err(libc::EBUSY);
                }
                self.ruleset.chains.remove(name);
                self.policies.remove(name);
            }
            Op::DelSet(name) => {
                rs.sets.get(name).ok_or(libc::ENOENT)?;
                let used = rs
                    .chains
                    .values()
                    .flat_map(|c| c.rules.iter())
                    .any(|r| references(&r.stmts).1.contains(&name.as_str()));
                if used {
                    return Err(libc::EBUSY);
                }
                self.ruleset.sets.remove(name);
            }
            Op::DelObject { .. } => return Err(libc::ENOENT),
        }
        Ok(())
    }

    /// What the netlink read-back would return.
    fn read(&self) -> KernelState {
        let mut ks = as_kernel_state(&self.ruleset);
        ks.table_exists = self.tables.contains_key(TABLE);
        ks.shard_tables = self.tables.keys().filter(|t| *t != TABLE).cloned().collect();
        ks.table_flags = self.tables.iter().filter(|(_, f)| **f != 0).map(|(t, f)| (t.clone(), *f)).collect();
        for (name, chain) in &mut ks.chains {
            if chain.base.is_some() {
                chain.policy = Some(self.policies.get(name).copied().unwrap_or(NF_ACCEPT));
            }
        }
        // The data path's sets (affinity) are never read back.
        for (name, set) in &mut ks.sets {
            if matches!(self.ruleset.sets.get(name).map(|s| s.kind), Some(SetKind::Affinity(_))) {
                set.elements.clear();
            }
        }
        ks
    }
}

impl Kernel for FakeKernel {
    fn generation(&mut self) -> Result<u32> {
        let mut s = self.lock();
        if s.failing_generation_reads > 0 {
            s.failing_generation_reads -= 1;
            return Err(NftError::ReadBack {
                what: "generation",
                source: io::Error::other("fake: generation read fails"),
            });
        }
        Ok(s.generation)
    }

    fn read_table(&mut self) -> Result<KernelState> {
        let mut s = self.lock();
        let n = s.tables.len();
        s.tables_read.push(n);
        Ok(s.read())
    }

    fn tables(&mut self) -> Result<Vec<String>> {
        Ok(self.lock().tables.keys().filter(|t| shard_of_table(t).is_some()).cloned().collect())
    }

    fn read_tables(&mut self, shards: &BTreeSet<u32>, _expected: &[&str]) -> Result<KernelState> {
        let mut s = self.lock();
        let mut ks = s.read();
        let ours = |name: &str| shard_of_table(table_of(name)).is_some_and(|k| shards.contains(&k));
        let our_table = |t: &str| shard_of_table(t).is_some_and(|k| shards.contains(&k));
        ks.table_exists &= shards.contains(&0);
        ks.shard_tables.retain(|t| our_table(t));
        ks.table_flags.retain(|t, _| our_table(t));
        ks.chains.retain(|n, _| ours(n));
        ks.sets.retain(|n, _| ours(n));
        ks.objects.retain(|n, _| ours(n));
        let n = s.tables.keys().filter(|t| our_table(t)).count();
        s.tables_read.push(n);
        Ok(ks)
    }

    fn commits(&mut self, _upto: Option<u32>) -> Option<Commits> {
        let mut s = self.lock();
        s.monitor.then(|| Commits { lost: std::mem::take(&mut s.events_lost), commits: std::mem::take(&mut s.events) })
    }

    fn read_elements(&mut self, set: &str) -> Result<Option<Vec<Element>>> {
        Ok(self.lock().ruleset.sets.get(set).map(|s| s.elements.clone()))
    }

    fn apply(&mut self, plan: &Plan) -> Result<ApplyStats> {
        if plan.is_empty() {
            return Ok(ApplyStats::default());
        }
        let mut s = self.lock();
        let rejected = |op: usize, errno: i32| NftError::Rejected {
            what: describe(plan, &Owner { seq: 0, op: op as u32, item: 0, count: 1 }),
            source: io::Error::from_raw_os_error(errno),
            others: 0,
        };
        if let Some((n, errno)) = s.reject_later {
            s.reject_later = n.checked_sub(1).map(|n| (n, errno));
            if n == 0 {
                s.reject_next = Some(errno);
            }
        }
        if let Some(errno) = s.reject_next.take() {
            return Err(rejected(0, errno));
        }
        let mut next = s.clone();
        for (i, op) in plan.ops.iter().enumerate() {
            next.apply_op(op).map_err(|errno| rejected(i, errno))?;
        }
        next.generation = next.generation.wrapping_add(1);
        next.committed.push(plan.clone());
        // Our own commit is announced too (the live kernel's monitor leaves the group meanwhile,
        // so the engine must not need it; tests see that it copes with both).
        if next.monitor {
            let commit = Commit { generation: next.generation, own: true, tables: BTreeSet::new(), by: String::new() };
            next.events.push(commit);
        }
        let lost = std::mem::take(&mut next.lose_next_ack);
        if std::mem::take(&mut next.fail_generation_after_commit) {
            next.failing_generation_reads += 1;
        }
        *s = next;
        if lost {
            return Err(NftError::Receive(io::Error::other("fake: the commit's answer was lost")));
        }
        Ok(ApplyStats { messages: plan.message_count(), bytes: 0, kernel: std::time::Duration::ZERO })
    }

    fn clean_udp(&mut self, targets: &UdpTargets) -> usize {
        let mut s = self.lock();
        s.conntrack_reads += 1;
        let before = s.flows.len();
        s.flows.retain(|f| !targets.is_stale(f));
        before - s.flows.len()
    }
}
