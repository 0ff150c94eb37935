//! A [`Plan`] -> one batch of netlink messages. Rules are written by `expr` (the expression
//! sequence `nft` itself would emit for each statement, in the kernel's own dump form);
//! tables, chains, sets and elements through libnftnl.

use super::consts::*;
use super::expr::{self, Attrs};
use super::sys::{MsgBuf, SetObj, SetSpec};
use crate::plan::{Op, Plan};
use crate::ruleset::*;

fn set_spec(kind: SetKind, id: u32) -> SetSpec {
    SetSpec { shape: kind.shape(), id }
}

/// Element messages stay well under the 64 KiB netlink attribute limit.
const ELEMENT_BYTES_PER_MSG: usize = 32 * 1024;

/// Writes element messages for `elements`, split to stay under the attribute size limit;
/// `tag(seq, first, count)` records which elements each message carries.
fn element_messages(
    buf: &mut MsgBuf,
    kind: u16,
    flags: u16,
    set: &str,
    elements: &[Element],
    tag: &mut dyn FnMut(u32, usize, usize),
) {
    let mut i = 0;
    while i < elements.len() {
        let (table, local) = split_name(set);
        let mut obj = SetObj::new(table, local, None);
        let mut bytes = 0;
        let first = i;
        while i < elements.len() && bytes < ELEMENT_BYTES_PER_MSG {
            let e = &elements[i];
            // A deletion names the key only: whatever verdict the kernel holds goes with it.
            let goto = if kind == NFT_MSG_DELSETELEM { None } else { e.goto.as_deref().map(local_name) };
            obj.add_element(&e.key, goto);
            bytes += e.key.len() + e.goto.as_ref().map_or(0, |c| c.len()) + 48;
            i += 1;
        }
        tag(buf.elements(kind, flags, &obj), first, i - first);
    }
}

/// Which part of a plan one message carries: op `op`, items `item..item + count`.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub seq: u32,
    /// Index of the op in the plan, and of the first rule or element of it in the message.
    /// (u32: at 160,000 messages every byte of this record counts in the peak RSS.)
    pub op: u32,
    pub item: u32,
    pub count: u32,
}

/// An encoded plan: the batch bytes and, per message, what it was about (descriptions are made
/// only when the kernel rejects one, see [`describe`]).
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub owners: Vec<Owner>,
    pub messages: usize,
}

/// A message's subject, naming chains (and so Services) for error messages.
pub fn describe(plan: &Plan, o: &Owner) -> String {
    match plan.ops.get(o.op as usize) {
        Some(Op::DelTable(t) | Op::AddTable { name: t, .. } | Op::UpdateTable { name: t, .. }) => format!("table {t}"),
        Some(Op::AddSet { name, .. } | Op::DelSet(name)) => format!("set {name}"),
        Some(Op::DelObject { name, .. }) => format!("object {name}"),
        Some(Op::AddChain { name, .. } | Op::UpdateChain { name, .. } | Op::DelChain(name)) => format!("chain {name}"),
        Some(Op::FlushChain(name)) => format!("flush of chain {name}"),
        Some(Op::AddRules { chain, rules }) => {
            format!(
                "rule \"{}\" in chain {chain}",
                rules.get(o.item as usize).map(|r| r.to_string()).unwrap_or_default()
            )
        }
        Some(Op::AddElements { set, elements, kind } | Op::DelElements { set, elements, kind }) => {
            let shown: Vec<String> = elements
                .iter()
                .skip(o.item as usize)
                .take(o.count.min(3) as usize)
                .map(|e| e.describe(*kind))
                .collect();
            format!("{} element(s) of set {set}: {}", o.count, shown.join(", "))
        }
        None => format!("message {}", o.seq),
    }
}

/// NFTA_TABLE_NAME and NFTA_TABLE_FLAGS.
fn table_attrs(m: &mut Vec<u8>, name: &str, flags: u32) {
    let mut a = Attrs(m);
    a.str(NFTA_TABLE_NAME, name);
    a.u32(NFTA_TABLE_FLAGS, flags);
}

/// Encodes a plan as BEGIN, its messages, END.
pub fn encode_plan(plan: &Plan, first_seq: u32) -> Encoded {
    // Rough size: most messages are rules of a few expressions naming one or two chains.
    let estimate: usize = plan
        .ops
        .iter()
        .map(|op| match op {
            Op::AddRules { chain, rules } => rules.iter().map(|r| 96 + 2 * chain.len() + 72 * r.stmts.len()).sum(),
            Op::AddElements { elements, .. } | Op::DelElements { elements, .. } => {
                elements.iter().map(|e| 40 + e.key.len() + e.goto.as_ref().map_or(0, |g| g.len())).sum()
            }
            _ => 256,
        })
        .sum();
    let mut buf = MsgBuf::with_capacity(first_seq, estimate + 4096);
    // One record per message: element lists are cut into ~32 KiB messages, which
    // `message_count` counts as one (growing this by doubling cost 12 MiB at 5,000 x 50).
    let split_messages: usize = plan
        .ops
        .iter()
        .map(|op| match op {
            Op::AddElements { elements, .. } | Op::DelElements { elements, .. } => {
                let bytes: usize =
                    elements.iter().map(|e| e.key.len() + e.goto.as_ref().map_or(0, |c| c.len()) + 48).sum();
                bytes / ELEMENT_BYTES_PER_MSG + 1
            }
            _ => 0,
        })
        .sum();
    let mut owners = Vec::with_capacity(plan.message_count() + split_messages);
    buf.batch_begin();
    let mut set_id = 1;
    for (op_index, op) in plan.ops.iter().enumerate() {
        let mut tag = |seq: u32, item: usize, count: usize| {
            owners.push(Owner { seq, op: op_index as u32, item: item as u32, count: count as u32 })
        };
        match op {
            Op::DelTable(t) => tag(buf.table(NFT_MSG_DELTABLE, 0, t), 0, 1),
            // Flags always sent: an existing table made dormant by someone else wakes up, an
            // orphaned owned table is adopted.
            Op::AddTable { name, flags } | Op::UpdateTable { name, flags } => {
                tag(buf.raw(NFT_MSG_NEWTABLE, NLM_F_CREATE, |m| table_attrs(m, name, *flags)), 0, 1)
            }
            Op::AddSet { name, kind } => {
                let (table, local) = split_name(name);
                let obj = SetObj::new(table, local, Some(&set_spec(*kind, set_id)));
                set_id += 1;
                tag(buf.set(NFT_MSG_NEWSET, NLM_F_CREATE, &obj), 0, 1);
            }
            Op::AddChain { name, base } | Op::UpdateChain { name, base: base @ Some(_) } => {
                let hook = base.map(|b| (b.hook.number(), b.priority, b.hook.chain_type()));
                let (table, local) = split_name(name);
                tag(buf.chain(NFT_MSG_NEWCHAIN, NLM_F_CREATE, table, local, hook), 0, 1);
            }
            Op::FlushChain(name) => {
                let (table, local) = split_name(name);
                tag(buf.flush_chain(table, local), 0, 1)
            }
            Op::UpdateChain { base: None, .. } => {}
            Op::AddRules { chain, rules } => {
                let (table, local) = split_name(chain);
                for (i, rule) in rules.iter().enumerate() {
                    let seq = buf
                        .raw(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |m| expr::rule_attrs(m, table, local, rule));
                    tag(seq, i, 1);
                }
            }
            Op::DelElements { set, elements, .. } => {
                element_messages(&mut buf, NFT_MSG_DELSETELEM, 0, set, elements, &mut tag)
            }
            Op::AddElements { set, elements, .. } => {
                element_messages(&mut buf, NFT_MSG_NEWSETELEM, NLM_F_CREATE, set, elements, &mut tag)
            }
            Op::DelChain(name) => {
                let (table, local) = split_name(name);
                tag(buf.chain(NFT_MSG_DELCHAIN, 0, table, local, None), 0, 1)
            }
            Op::DelSet(name) => {
                let (table, local) = split_name(name);
                let obj = SetObj::new(table, local, None);
                tag(buf.set(NFT_MSG_DELSET, 0, &obj), 0, 1);
            }
            Op::DelObject { name, kind } => {
                let (table, local) = split_name(name);
                let seq = buf.raw(NFT_MSG_DELOBJ, 0, |m| {
                    let mut a = Attrs(m);
                    a.str(NFTA_OBJ_TABLE, table);
                    a.str(NFTA_OBJ_NAME, local);
                    a.u32(NFTA_OBJ_TYPE, *kind);
                });
                tag(seq, 0, 1);
            }
        }
    }
    buf.batch_end();
    let messages = owners.len();
    Encoded { bytes: buf.into_bytes(), owners, messages }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_wrap() {
        let snap = crate::model::Snapshot::default();
        let plan = crate::plan::plan(&Default::default(), crate::compile::compile(&snap, &Default::default()));
        let enc = encode_plan(&plan, u32::MAX - 2);
        assert_eq!(enc.owners.first().map(|o| o.seq), Some(u32::MAX - 1));
        assert!(enc.owners.iter().any(|o| o.seq == 0), "wrapped past u32::MAX");
    }

    #[test]
    fn plan_encodes_as_one_batch_with_begin_and_end() {
        let snap = crate::model::Snapshot::default();
        let want = crate::compile::compile(&snap, &Default::default());
        let plan = crate::plan::plan(&Default::default(), want);
        let enc = encode_plan(&plan, 100);
        // Every message is a well-formed netlink header, seqs are consecutive, the last is END.
        let mut off = 0;
        let mut seqs = Vec::new();
        let mut types = Vec::new();
        while off < enc.bytes.len() {
            let len = u32::from_ne_bytes(enc.bytes[off..off + 4].try_into().unwrap()) as usize;
            types.push(u16::from_ne_bytes(enc.bytes[off + 4..off + 6].try_into().unwrap()));
            seqs.push(u32::from_ne_bytes(enc.bytes[off + 8..off + 12].try_into().unwrap()));
            off += (len + 3) & !3;
        }
        assert_eq!(off, enc.bytes.len());
        assert_eq!(types.first(), Some(&0x10), "NFNL_MSG_BATCH_BEGIN");
        assert_eq!(types.last(), Some(&0x11), "NFNL_MSG_BATCH_END");
        assert_eq!(seqs, (100..100 + seqs.len() as u32).collect::<Vec<_>>());
        assert_eq!(enc.messages, plan.message_count());
    }
}
