//! Old vs new -> the smallest change. Pure: the kernel state comes in as a value read back by
//! `nft::read_table`, the plan goes out as a list of operations for `nft::apply`.
//!
//! Granularity is the object: a chain whose rules differ (by their expressions and comments as
//! the kernel holds them, see `nft::expr::fingerprint`) is flushed and refilled, a set element
//! that differs (key or verdict) is deleted and added, a base chain with another policy or a
//! table with flags (dormant) is updated in place, untouched chains keep their handles. Operations
//! are ordered so that every reference exists when it is made and is gone before its target is
//! deleted; the whole plan is one kernel transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::nft::consts::{NF_ACCEPT, NFT_TABLE_F_DORMANT, NFT_TABLE_F_OWNER, NFT_TABLE_F_PERSIST};
use crate::nft::expr::rule_fingerprint;
use crate::ruleset::*;

/// One chain as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChain {
    pub base: Option<BaseChain>,
    /// A base chain's policy (NF_ACCEPT, NF_DROP).
    pub policy: Option<u32>,
    /// The fingerprint of each rule (`nft::expr::fingerprint`), in order.
    pub rules: Vec<u64>,
}

/// One set as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSet {
    pub shape: SetShape,
    pub extras: SetExtras,
    pub elements: Vec<Element>,
}

/// What a set carries beyond its type. We never set any of it: a size limit, a default
/// timeout or a set expression (`quota`, `limit`, `counter` copied onto every element) is
/// someone else's, and the set is rebuilt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetExtras {
    pub size: u32,
    pub timeout: bool,
    pub expressions: bool,
}

/// The size the kernel gives a set filled by a dynset rule when none was asked for.
const DYNAMIC_SET_SIZE: u32 = 0xffff;

/// Our table as the kernel has it; `Default` is "no table".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Whether `table inet nftproxy` exists.
    pub table_exists: bool,
    /// Our shard tables that exist (`nftproxy-1`, ...).
    pub shard_tables: BTreeSet<String>,
    /// The flags of those of our tables that have any (dormant, owner, persist).
    pub table_flags: BTreeMap<String, u32>,
    /// Named stateful objects (counters, quotas, limits) in our tables, with their type: we make
    /// none, so every one is someone else's.
    pub objects: BTreeMap<String, u32>,
    pub chains: BTreeMap<String, KernelChain>,
    pub sets: BTreeMap<String, KernelSet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Deletes a table and everything in it: a shard no longer used, or our main table when
    /// someone reshaped it (it is rebuilt in the same transaction).
    DelTable(String),
    AddTable {
        name: String,
        flags: u32,
    },
    /// Sets an existing table's flags: wakes a dormant table, adopts an orphaned owned one.
    UpdateTable {
        name: String,
        flags: u32,
    },
    AddSet {
        name: String,
        kind: SetKind,
    },
    AddChain {
        name: String,
        base: Option<BaseChain>,
    },
    /// Resends an existing base chain: resets its policy to accept.
    UpdateChain {
        name: String,
        base: Option<BaseChain>,
    },
    FlushChain(String),
    AddRules {
        chain: String,
        rules: std::sync::Arc<[Rule]>,
    },
    DelElements {
        set: String,
        kind: SetKind,
        elements: Vec<Element>,
    },
    AddElements {
        set: String,
        kind: SetKind,
        elements: Vec<Element>,
    },
    DelChain(String),
    DelSet(String),
    DelObject {
        name: String,
        kind: u32,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
}

impl KernelState {
    /// Our tables that exist: the main table, then the shards.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.table_exists.then_some(TABLE).into_iter().chain(self.shard_tables.iter().map(String::as_str))
    }

    /// A table's flags (0 when it has none).
    fn flags_of(&self, table: &str) -> u32 {
        self.table_flags.get(table).copied().unwrap_or(0)
    }
}

impl Op {
    /// The table the operation is about.
    pub fn table(&self) -> &str {
        match self {
            Op::DelTable(t) | Op::AddTable { name: t, .. } | Op::UpdateTable { name: t, .. } => t,
            Op::AddSet { name, .. }
            | Op::AddChain { name, .. }
            | Op::UpdateChain { name, .. }
            | Op::FlushChain(name)
            | Op::DelChain(name)
            | Op::DelSet(name)
            | Op::DelObject { name, .. }
            | Op::AddRules { chain: name, .. }
            | Op::DelElements { set: name, .. }
            | Op::AddElements { set: name, .. } => split_name(name).0,
        }
    }
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of netlink messages the plan becomes (one per rule and per op otherwise).
    pub fn message_count(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::AddRules { rules, .. } => rules.len(),
                _ => 1,
            })
            .sum()
    }

    /// Chains the plan creates, rewrites or deletes.
    pub fn touched_chains(&self) -> BTreeSet<&str> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::AddChain { name, .. }
                | Op::UpdateChain { name, .. }
                | Op::FlushChain(name)
                | Op::DelChain(name) => Some(name.as_str()),
                Op::AddRules { chain, .. } => Some(chain.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Splits a plan for a kernel that holds none of our objects into what no packet can reach
    /// until the rest is committed (tables, sets and their elements, regular chains and their
    /// rules) and the rest (base chains, their rules, anything that is not an addition), each in
    /// the plan's order. The first part may then go in several transactions before the second:
    /// until that one commits, no hook leads into any of it, so traffic sees all or nothing.
    pub fn split_reachable(self) -> (Plan, Plan) {
        let base: BTreeSet<String> = self
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::AddChain { name, base: Some(_) } => Some(name.clone()),
                _ => None,
            })
            .collect();
        let (unreached, rest) = self.ops.into_iter().partition(|op| match op {
            Op::AddTable { .. } | Op::AddSet { .. } | Op::AddElements { .. } => true,
            Op::AddChain { base, .. } => base.is_none(),
            Op::AddRules { chain, .. } => !base.contains(chain),
            _ => false,
        });
        (Plan { ops: unreached }, Plan { ops: rest })
    }
}

impl KernelState {
    /// No table of ours exists (a node's first sync, or after `--cleanup`).
    pub fn holds_nothing(&self) -> bool {
        !self.table_exists && self.shard_tables.is_empty()
    }
}

fn set_shape_ok(want: &Set, have: &KernelSet) -> bool {
    let size_ok =
        have.extras.size == 0 || (matches!(want.kind, SetKind::Affinity(_)) && have.extras.size == DYNAMIC_SET_SIZE);
    have.shape == want.kind.shape() && size_ok && !have.extras.timeout && !have.extras.expressions
}

/// The fingerprints of a chain's rules as the kernel would hold them.
fn fingerprints(chain: &Chain, scratch: &mut Vec<u8>) -> Vec<u64> {
    chain.rules.iter().map(|r| rule_fingerprint(r, scratch)).collect()
}

/// The shard tables a ruleset's qualified names live in.
pub fn shard_tables_of(rs: &Ruleset) -> BTreeSet<String> {
    rs.chains
        .keys()
        .chain(rs.sets.keys())
        .map(|n| split_name(n).0)
        .filter(|t| *t != TABLE)
        .map(str::to_string)
        .collect()
}

/// The operations that turn `have` into `want`. Takes `want` by value: its objects move into
/// the plan (at 10,000 Services, copying them would be tens of MiB at the sync's peak).
pub fn plan(have: &KernelState, want: Ruleset) -> Plan {
    let mut ops = Vec::new();
    let want_shards = shard_tables_of(&want);
    // Shard tables no longer used go whole.
    let stale: BTreeSet<&str> =
        have.shard_tables.iter().map(String::as_str).filter(|t| !want_shards.contains(*t)).collect();
    for t in &stale {
        ops.push(Op::DelTable(t.to_string()));
    }
    // A base chain on the wrong hook or a set of the wrong shape cannot be fixed in place: rebuild
    // that table in the same transaction (the hooks are re-registered at commit). Only our main
    // table is rebuilt this way; a reshaped shard is dropped and recreated likewise.
    let reshaped: BTreeSet<String> = want
        .sets
        .iter()
        .filter(|(n, s)| have.sets.get(*n).is_some_and(|h| !set_shape_ok(s, h)))
        .map(|(n, _)| split_name(n).0.to_string())
        .chain(
            want.chains
                .iter()
                .filter(|(n, c)| have.chains.get(*n).is_some_and(|h| h.base != c.base))
                .map(|(n, _)| split_name(n).0.to_string()),
        )
        // The kernel cannot turn `persist` on or off in place (--own-tables switched).
        .chain(
            have.tables()
                .filter(|t| (have.flags_of(t) ^ want.table_flags) & NFT_TABLE_F_PERSIST != 0)
                .map(str::to_string),
        )
        .filter(|t| !stale.contains(t.as_str()))
        .collect();
    for t in &reshaped {
        ops.push(Op::DelTable(t.clone()));
    }
    let gone = |name: &String| stale.contains(split_name(name).0) || reshaped.contains(split_name(name).0);
    let filtered;
    let have = if stale.is_empty() && reshaped.is_empty() {
        have
    } else {
        filtered = KernelState {
            table_exists: have.table_exists && !reshaped.contains(TABLE),
            table_flags: have
                .table_flags
                .iter()
                .filter(|(t, _)| !reshaped.contains(*t))
                .map(|(t, f)| (t.clone(), *f))
                .collect(),
            shard_tables: have
                .shard_tables
                .iter()
                .filter(|t| !stale.contains(t.as_str()) && !reshaped.contains(t.as_str()))
                .cloned()
                .collect(),
            objects: have.objects.iter().filter(|(n, _)| !gone(n)).map(|(n, k)| (n.clone(), *k)).collect(),
            chains: have.chains.iter().filter(|(n, _)| !gone(n)).map(|(n, c)| (n.clone(), c.clone())).collect(),
            sets: have.sets.iter().filter(|(n, _)| !gone(n)).map(|(n, s)| (n.clone(), s.clone())).collect(),
        };
        &filtered
    };
    let flags = want.table_flags;
    if !have.table_exists {
        ops.push(Op::AddTable { name: TABLE.to_string(), flags });
    }
    for t in want_shards.iter().filter(|t| !have.shard_tables.contains(*t)) {
        ops.push(Op::AddTable { name: t.clone(), flags });
    }
    for t in have.tables().filter(|t| *t == TABLE || want_shards.contains(*t)) {
        if have.flags_of(t) != flags {
            ops.push(Op::UpdateTable { name: t.to_string(), flags });
        }
    }
    let gone_chains: Vec<&String> = have.chains.keys().filter(|n| !want.chains.contains_key(*n)).collect();
    let gone_sets: Vec<&String> = have.sets.keys().filter(|n| !want.sets.contains_key(*n)).collect();
    // Order: sets, chains, rules (which name both), element deletions, element additions.
    let (mut rules, mut dels, mut adds) = (Vec::new(), Vec::new(), Vec::new());
    for (name, set) in want.sets {
        if !have.sets.contains_key(&name) {
            ops.push(Op::AddSet { name: name.clone(), kind: set.kind });
        }
        if !set.kind.managed_elements() {
            continue;
        }
        let have_elems: BTreeSet<&Element> =
            have.sets.get(&name).map(|s| s.elements.iter().collect()).unwrap_or_default();
        let want_elems: BTreeSet<&Element> = set.elements.iter().collect();
        let del: Vec<Element> = have_elems.difference(&want_elems).map(|e| (*e).clone()).collect();
        let add: Vec<Element> = set.elements.into_iter().filter(|e| !have_elems.contains(e)).collect();
        if !del.is_empty() {
            dels.push(Op::DelElements { set: name.clone(), kind: set.kind, elements: del });
        }
        if !add.is_empty() {
            adds.push(Op::AddElements { set: name, kind: set.kind, elements: add });
        }
    }
    let mut scratch = Vec::new();
    for (name, chain) in want.chains {
        if let Some(h) = have.chains.get(&name)
            && chain.base.is_some()
            && h.policy != Some(NF_ACCEPT)
        {
            ops.push(Op::UpdateChain { name: name.clone(), base: chain.base });
        }
        let rewrite = match have.chains.get(&name) {
            Some(h) if h.rules == fingerprints(&chain, &mut scratch) => false,
            Some(_) => {
                rules.push(Op::FlushChain(name.clone()));
                true
            }
            None => {
                ops.push(Op::AddChain { name: name.clone(), base: chain.base });
                !chain.rules.is_empty()
            }
        };
        if rewrite {
            rules.push(Op::AddRules { chain: name, rules: chain.rules });
        }
    }
    // Deletions first: a changed element (same key, other verdict) is deleted, then added.
    ops.extend(rules.into_iter().chain(dels).chain(adds));
    // Flush gone chains first (their rules may name gone sets), then the gone sets (a map may
    // jump to a gone chain), then the chains, then named objects nothing refers to any more.
    for name in &gone_chains {
        if !have.chains[*name].rules.is_empty() {
            ops.push(Op::FlushChain((*name).clone()));
        }
    }
    for name in gone_sets {
        ops.push(Op::DelSet(name.clone()));
    }
    for name in gone_chains {
        ops.push(Op::DelChain(name.clone()));
    }
    for (name, kind) in &have.objects {
        ops.push(Op::DelObject { name: name.clone(), kind: *kind });
    }
    Plan { ops }
}

impl fmt::Display for Plan {
    /// The dry-run listing: `+` adds, `-` deletes, `~` rewrites.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ops.is_empty() {
            return writeln!(f, "no change");
        }
        for op in &self.ops {
            match op {
                Op::DelTable(t) => writeln!(f, "- table inet {t}")?,
                Op::AddTable { name, flags } => writeln!(f, "+ table inet {name}{}", flags_text(*flags))?,
                Op::UpdateTable { name, flags: 0 } => writeln!(f, "~ table inet {name} (flags cleared)")?,
                Op::UpdateTable { name, flags } => writeln!(f, "~ table inet {name}{}", flags_text(*flags))?,
                Op::AddSet { name, kind } => writeln!(f, "+ set {name} ({kind:?})")?,
                Op::AddChain { name, base: Some(b) } => writeln!(
                    f,
                    "+ chain {name} (type {} hook {} priority {})",
                    b.hook.chain_type(),
                    format!("{:?}", b.hook).to_lowercase(),
                    b.priority
                )?,
                Op::AddChain { name, base: None } => writeln!(f, "+ chain {name}")?,
                Op::UpdateChain { name, .. } => writeln!(f, "~ chain {name} (policy accept)")?,
                Op::FlushChain(name) => writeln!(f, "~ flush chain {name}")?,
                Op::AddRules { chain, rules } => {
                    for r in rules.iter() {
                        writeln!(f, "+ rule {chain}: {r}")?;
                    }
                }
                Op::DelElements { set, kind, elements } => {
                    for e in elements {
                        writeln!(f, "- element {set}: {}", e.describe(*kind))?;
                    }
                }
                Op::AddElements { set, kind, elements } => {
                    for e in elements {
                        writeln!(f, "+ element {set}: {}", e.describe(*kind))?;
                    }
                }
                Op::DelChain(name) => writeln!(f, "- chain {name}")?,
                Op::DelSet(name) => writeln!(f, "- set {name}")?,
                Op::DelObject { name, kind } => writeln!(f, "- object {name} (type {kind})")?,
            }
        }
        Ok(())
    }
}

/// ` { flags owner,persist; }` as nft writes table flags, or nothing.
fn flags_text(flags: u32) -> String {
    let names: Vec<&str> =
        [(NFT_TABLE_F_DORMANT, "dormant"), (NFT_TABLE_F_OWNER, "owner"), (NFT_TABLE_F_PERSIST, "persist")]
            .into_iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, name)| name)
            .collect();
    if names.is_empty() { String::new() } else { format!(" {{ flags {}; }}", names.join(",")) }
}

/// What the kernel would hold after a plan built from `want` is applied: `want` itself, as read back.
pub fn as_kernel_state(want: &Ruleset) -> KernelState {
    let mut scratch = Vec::new();
    let shard_tables = shard_tables_of(want);
    let tables = std::iter::once(TABLE.to_string()).chain(shard_tables.iter().cloned());
    KernelState {
        table_exists: true,
        table_flags: tables.filter(|_| want.table_flags != 0).map(|t| (t, want.table_flags)).collect(),
        objects: BTreeMap::new(),
        shard_tables,
        chains: want
            .chains
            .iter()
            .map(|(n, c)| {
                let policy = c.base.map(|_| NF_ACCEPT);
                (n.clone(), KernelChain { base: c.base, policy, rules: fingerprints(c, &mut scratch) })
            })
            .collect(),
        sets: want
            .sets
            .iter()
            .map(|(n, s)| {
                let set =
                    KernelSet { shape: s.kind.shape(), extras: SetExtras::default(), elements: s.elements.clone() };
                (n.clone(), set)
            })
            .collect(),
    }
}

/// Whether an object name lives in one of the tables `shards` (by shard number).
pub fn in_tables(name: &str, shards: &BTreeSet<u32>) -> bool {
    shard_of_table(split_name(name).0).is_some_and(|k| shards.contains(&k))
}

/// The plan for only our tables `shards` (by shard number), from a read-back of just those
/// tables (`have`): `want` is cut to them, and the others are taken to hold what we want (so
/// `have` is told, without a copy, that the main table exists when it was not read).
pub fn plan_tables(have: &mut KernelState, mut want: Ruleset, shards: &BTreeSet<u32>) -> Plan {
    want.chains.retain(|n, _| in_tables(n, shards));
    want.sets.retain(|n, _| in_tables(n, shards));
    if !shards.contains(&0) {
        have.table_exists = true;
        if want.table_flags != 0 {
            have.table_flags.insert(TABLE.to_string(), want.table_flags);
        }
    }
    plan(have, want)
}

/// A partial sync: the change from `old` to `new` objects of some Services, trusting that the
/// kernel holds exactly `old` for them (checked with the ruleset generation beforehand).
pub fn plan_services(
    old: impl IntoIterator<Item = crate::compile::ServiceObjects>,
    new: impl IntoIterator<Item = crate::compile::ServiceObjects>,
    skeleton: &Ruleset,
) -> Plan {
    let (old, new): (Vec<_>, Vec<_>) = (old.into_iter().collect(), new.into_iter().collect());
    // Only the skeleton's sets these Services have elements in (of hundreds with many shards),
    // empty on both sides: the plan then holds just the element changes.
    let touched: BTreeSet<String> =
        old.iter().chain(&new).flat_map(|o| o.elements.iter().map(|(set, _)| set.clone())).collect();
    let collect = |objs: Vec<crate::compile::ServiceObjects>| {
        let sets = touched
            .iter()
            .filter_map(|n| skeleton.sets.get(n).map(|s| (n.clone(), Set { kind: s.kind, elements: vec![] })))
            .collect();
        let mut rs = Ruleset { chains: BTreeMap::new(), sets, ..Default::default() };
        for o in objs {
            crate::compile::merge(&mut rs, o);
        }
        rs
    };
    let have = as_kernel_state(&collect(old));
    let want = collect(new);
    plan(&have, want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{self, CHAIN_FORWARD, CHAIN_OUTPUT, Options};
    use crate::model::{Endpoint, Family, Protocol, Service, ServiceId, ServicePort, Snapshot};

    /// The demo-like rule set: one Service with two endpoints, one shard.
    fn wanted() -> Ruleset {
        let eps = ["10.244.1.2", "10.244.1.3"].map(|ip| Endpoint::ready(ip.parse().unwrap(), 8080));
        let port = ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            node_port: None,
            endpoints: eps.to_vec(),
        };
        let svc = Service::new(ServiceId::new("default", "web"), vec!["10.96.0.80".parse().unwrap()], vec![port]);
        let mut snap = Snapshot::default();
        snap.services.insert(svc.id.clone(), svc);
        compile::compile(
            &snap,
            &Options { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], ..Default::default() },
        )
    }

    const SVC: &str = "svc4/default/web/tcp/80";

    #[test]
    fn a_kernel_holding_what_we_want_needs_nothing() {
        assert_eq!(plan(&as_kernel_state(&wanted()), wanted()), Plan::default());
    }

    #[test]
    fn a_rule_with_other_content_under_the_same_comment_is_rewritten() {
        let mut have = as_kernel_state(&wanted());
        // What `nft replace rule` leaves: same position, same comment, another target.
        let mut hijacked = wanted().chains[SVC].rules.to_vec();
        hijacked[1].stmts[0] = Stmt::Goto("ep4/default/other/tcp/80/10.244.9.9/80".into());
        have.chains.get_mut(SVC).unwrap().rules =
            fingerprints(&Chain { base: None, rules: hijacked.into() }, &mut Vec::new());
        let p = plan(&have, wanted());
        assert_eq!(p.touched_chains(), BTreeSet::from([SVC]));
        assert_eq!(p.ops[0], Op::FlushChain(SVC.into()));
        assert!(matches!(&p.ops[1], Op::AddRules { chain, rules } if chain == SVC && rules.len() == 2));
    }

    #[test]
    fn rules_in_another_order_are_rewritten() {
        let mut have = as_kernel_state(&wanted());
        have.chains.get_mut(SVC).unwrap().rules.reverse();
        assert_eq!(plan(&have, wanted()).touched_chains(), BTreeSet::from([SVC]));
    }

    #[test]
    fn a_base_chain_policy_is_reset_in_place() {
        for chain in [CHAIN_FORWARD, CHAIN_OUTPUT] {
            let mut have = as_kernel_state(&wanted());
            have.chains.get_mut(chain).unwrap().policy = Some(0); // NF_DROP
            let p = plan(&have, wanted());
            let base = wanted().chains[chain].base;
            assert_eq!(p.ops, vec![Op::UpdateChain { name: chain.into(), base }], "{chain}");
        }
    }

    #[test]
    fn a_dormant_table_is_woken_in_place() {
        let mut have = as_kernel_state(&wanted());
        have.table_flags.insert(TABLE.into(), NFT_TABLE_F_DORMANT);
        assert_eq!(plan(&have, wanted()).ops, vec![Op::UpdateTable { name: TABLE.into(), flags: 0 }]);
    }

    #[test]
    fn a_map_element_with_another_verdict_is_replaced() {
        let mut have = as_kernel_state(&wanted());
        let map = have.sets.get_mut("service-ips-v4").unwrap();
        let want_elem = map.elements[0].clone();
        map.elements[0].goto = Some(format!("jump {SVC}"));
        let p = plan(&have, wanted());
        let kind = SetKind::Dispatch(Family::V4);
        let mut jump = want_elem.clone();
        jump.goto = Some(format!("jump {SVC}"));
        assert_eq!(
            p.ops,
            vec![
                Op::DelElements { set: "service-ips-v4".into(), kind, elements: vec![jump] },
                Op::AddElements { set: "service-ips-v4".into(), kind, elements: vec![want_elem] },
            ]
        );
        assert!(p.to_string().contains(&format!("- element service-ips-v4: 10.96.0.80 . tcp . 80 : jump {SVC}")));
    }

    #[test]
    fn a_set_of_another_type_rebuilds_the_table_in_the_same_transaction() {
        let mut have = as_kernel_state(&wanted());
        have.sets.get_mut("addresses-v4").unwrap().shape.flags |= crate::nft::consts::NFT_SET_TIMEOUT;
        let p = plan(&have, wanted());
        assert_eq!(p.ops[0], Op::DelTable(TABLE.into()));
        assert_eq!(p.ops[1], Op::AddTable { name: TABLE.into(), flags: 0 });
        assert_eq!(plan(&Default::default(), wanted()).ops, p.ops[1..].to_vec(), "then built as on an empty kernel");
    }

    #[test]
    fn a_renamed_endpoint_chain_is_unreferenced_before_it_is_deleted() {
        // `nft rename chain ... zz`: the Service chain now says `goto zz`.
        let want = wanted();
        let ep = "ep4/default/web/tcp/80/10.244.1.3/8080";
        let mut have = as_kernel_state(&want);
        let renamed = have.chains.remove(ep).unwrap();
        have.chains.insert("zz".into(), renamed);
        let mut rules = want.chains[SVC].rules.to_vec();
        rules[1].stmts[0] = Stmt::Goto("zz".into());
        have.chains.get_mut(SVC).unwrap().rules =
            fingerprints(&Chain { base: None, rules: rules.into() }, &mut Vec::new());
        let p = plan(&have, want);
        let at = |op: &Op| p.ops.iter().position(|o| o == op).unwrap();
        assert!(at(&Op::FlushChain(SVC.into())) < at(&Op::DelChain("zz".into())));
        assert!(at(&Op::AddChain { name: ep.into(), base: None }) < at(&Op::FlushChain(SVC.into())));
    }

    #[test]
    fn owned_tables_are_adopted_in_place_and_rebuilt_when_persist_must_change() {
        const OWNED: u32 = NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST;
        let owned = || Ruleset { table_flags: OWNED, ..wanted() };
        // Left by an agent that exited: persist, no owner. Adopted with one update.
        let mut orphan = as_kernel_state(&wanted());
        orphan.table_flags.insert(TABLE.into(), NFT_TABLE_F_PERSIST);
        assert_eq!(plan(&orphan, owned()).ops, vec![Op::UpdateTable { name: TABLE.into(), flags: OWNED }]);
        assert_eq!(plan(&as_kernel_state(&owned()), owned()), Plan::default(), "already ours");
        // Switched on or off: the kernel cannot change persist in place, so the table is rebuilt.
        for (have, want) in [(wanted(), owned()), (owned(), wanted())] {
            let flags = want.table_flags;
            let p = plan(&as_kernel_state(&have), want);
            assert_eq!(p.ops[..2], [Op::DelTable(TABLE.into()), Op::AddTable { name: TABLE.into(), flags }]);
            assert!(p.ops.iter().all(|op| !matches!(op, Op::UpdateTable { .. })));
        }
    }

    #[test]
    fn a_set_with_a_size_timeout_or_expression_is_rebuilt() {
        let extras = [
            SetExtras { size: 2, ..Default::default() },
            SetExtras { timeout: true, ..Default::default() },
            SetExtras { expressions: true, ..Default::default() },
        ];
        for x in extras {
            let mut have = as_kernel_state(&wanted());
            have.sets.get_mut("service-ips-v4").unwrap().extras = x;
            assert_eq!(plan(&have, wanted()).ops[0], Op::DelTable(TABLE.into()), "{x:?}");
        }
    }

    #[test]
    fn foreign_objects_are_removed_in_an_order_the_kernel_accepts() {
        let mut have = as_kernel_state(&wanted());
        // A foreign map jumping to a foreign chain, and a named counter.
        have.chains.insert("evil".into(), KernelChain { base: None, policy: None, rules: vec![1] });
        let shape = SetShape { key_type: 7, key_len: 4, flags: crate::nft::consts::NFT_SET_MAP, data_type: 0 };
        have.sets.insert("evilmap".into(), KernelSet { shape, extras: SetExtras::default(), elements: vec![] });
        have.objects.insert("c1".into(), 1);
        let p = plan(&have, wanted());
        assert_eq!(
            p.ops,
            vec![
                Op::FlushChain("evil".into()),
                Op::DelSet("evilmap".into()),
                Op::DelChain("evil".into()),
                Op::DelObject { name: "c1".into(), kind: 1 },
            ]
        );
    }

    #[test]
    fn foreign_names_with_the_shard_separator_stay_in_their_table() {
        // `victim@c` read back from our main table is ours to delete, not table victim's chain c.
        let name = qualify(0, "victim@c");
        assert_eq!(split_name(&name), (TABLE, "victim@c"));
        assert_eq!(split_name(&qualify(1, "victim@c")), ("nftproxy-1", "victim@c"));
        assert_eq!(qualify(0, "services"), "services", "our own names stay short");
    }

    #[test]
    fn shard_tables_no_longer_used_go_whole_and_new_ones_come_first() {
        let three = || {
            let eps = [Endpoint::ready("10.244.1.2".parse().unwrap(), 80)];
            let mut snap = Snapshot::default();
            for i in 0..6 {
                let port = ServicePort {
                    name: "".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    node_port: None,
                    endpoints: eps.to_vec(),
                };
                let id = ServiceId::new("default", format!("s{i}"));
                snap.services
                    .insert(id.clone(), Service::new(id, vec![format!("10.96.0.{i}").parse().unwrap()], vec![port]));
            }
            snap
        };
        let sharded = |k| compile::compile(&three(), &Options { table_shards: k, ..Default::default() });
        // Three tables -> one: the shard tables are deleted first, whole.
        let p = plan(&as_kernel_state(&sharded(3)), sharded(1));
        assert_eq!(p.ops[..2], [Op::DelTable("nftproxy-1".into()), Op::DelTable("nftproxy-2".into())]);
        assert!(p.ops[2..].iter().all(|op| !matches!(op, Op::DelTable(_))));
        // One -> three: the new tables are created before anything goes into them.
        let p = plan(&as_kernel_state(&sharded(1)), sharded(3));
        let at = |op: &Op| p.ops.iter().position(|o| o == op).unwrap();
        let first_use = p
            .ops
            .iter()
            .position(|op| matches!(op, Op::AddSet { name, .. } if name.starts_with("nftproxy-1@")))
            .unwrap();
        assert!(at(&Op::AddTable { name: "nftproxy-1".into(), flags: 0 }) < first_use);
    }

    #[test]
    fn dry_runs_print_each_base_chain_type() {
        let text = plan(&Default::default(), wanted()).to_string();
        assert!(text.contains("+ chain filter-forward (type filter hook forward priority 0)"), "{text}");
        assert!(text.contains("+ chain nat-output (type nat hook output priority -100)"), "{text}");
    }
}
