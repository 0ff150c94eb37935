//! Old vs new -> the smallest change. Pure: the kernel state comes in as a value read back by
//! `nft::read_table`, the plan goes out as a list of operations for `nft::apply`.
//!
//! Granularity is the object: a chain whose rule comments differ is flushed and refilled, a set
//! element that differs is deleted and added, untouched chains keep their handles. Operations
//! are ordered so that every reference exists when it is made and is gone before its target is
//! deleted; the whole plan is one kernel transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::ruleset::*;

/// One chain as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChain {
    pub base: Option<BaseChain>,
    /// The comment of each rule, in order ("" for a rule without one: not ours).
    pub rules: Vec<String>,
}

/// One set as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSet {
    pub key_len: u32,
    pub is_map: bool,
    pub elements: Vec<Element>,
}

/// Our table as the kernel has it; `Default` is "no table".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Whether `table inet nftproxy` exists.
    pub table_exists: bool,
    /// Our shard tables that exist (`nftproxy-1`, ...).
    pub shard_tables: BTreeSet<String>,
    pub chains: BTreeMap<String, KernelChain>,
    pub sets: BTreeMap<String, KernelSet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Deletes a table and everything in it: a shard no longer used, or our main table when
    /// someone reshaped it (it is rebuilt in the same transaction).
    DelTable(String),
    AddTable(String),
    AddSet {
        name: String,
        kind: SetKind,
    },
    AddChain {
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
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
                Op::AddChain { name, .. } | Op::FlushChain(name) | Op::DelChain(name) => Some(name.as_str()),
                Op::AddRules { chain, .. } => Some(chain.as_str()),
                _ => None,
            })
            .collect()
    }
}

fn set_shape_ok(want: &Set, have: &KernelSet) -> bool {
    have.key_len == want.kind.key_len() && have.is_map == matches!(want.kind, SetKind::Dispatch(_))
}

fn comments(chain: &Chain) -> Vec<String> {
    chain.rules.iter().map(Rule::comment).collect()
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
            shard_tables: have
                .shard_tables
                .iter()
                .filter(|t| !stale.contains(t.as_str()) && !reshaped.contains(t.as_str()))
                .cloned()
                .collect(),
            chains: have.chains.iter().filter(|(n, _)| !gone(n)).map(|(n, c)| (n.clone(), c.clone())).collect(),
            sets: have.sets.iter().filter(|(n, _)| !gone(n)).map(|(n, s)| (n.clone(), s.clone())).collect(),
        };
        &filtered
    };
    if !have.table_exists {
        ops.push(Op::AddTable(TABLE.to_string()));
    }
    for t in want_shards.iter().filter(|t| !have.shard_tables.contains(*t)) {
        ops.push(Op::AddTable(t.clone()));
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
    for (name, chain) in want.chains {
        let rewrite = match have.chains.get(&name) {
            Some(h) if h.rules == comments(&chain) => false,
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
    for name in &gone_chains {
        if !have.chains[*name].rules.is_empty() {
            ops.push(Op::FlushChain((*name).clone()));
        }
    }
    for name in gone_chains {
        ops.push(Op::DelChain(name.clone()));
    }
    for name in gone_sets {
        ops.push(Op::DelSet(name.clone()));
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
                Op::AddTable(t) => writeln!(f, "+ table inet {t}")?,
                Op::AddSet { name, kind } => writeln!(f, "+ set {name} ({kind:?})")?,
                Op::AddChain { name, base: Some(b) } => {
                    writeln!(f, "+ chain {name} (type nat hook {:?} priority {})", b.hook, b.priority)?
                }
                Op::AddChain { name, base: None } => writeln!(f, "+ chain {name}")?,
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
            }
        }
        Ok(())
    }
}

/// What the kernel would hold after a plan built from `want` is applied: `want` itself, as read back.
pub fn as_kernel_state(want: &Ruleset) -> KernelState {
    KernelState {
        table_exists: true,
        shard_tables: shard_tables_of(want),
        chains: want
            .chains
            .iter()
            .map(|(n, c)| (n.clone(), KernelChain { base: c.base, rules: comments(c) }))
            .collect(),
        sets: want
            .sets
            .iter()
            .map(|(n, s)| {
                let is_map = matches!(s.kind, SetKind::Dispatch(_));
                (n.clone(), KernelSet { key_len: s.kind.key_len(), is_map, elements: s.elements.clone() })
            })
            .collect(),
    }
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
        let mut rs = Ruleset { chains: BTreeMap::new(), sets };
        for o in objs {
            crate::compile::merge(&mut rs, o);
        }
        rs
    };
    let have = as_kernel_state(&collect(old));
    let want = collect(new);
    plan(&have, want)
}
