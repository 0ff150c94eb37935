//! Our statements -> nf_tables expressions, and a [`Plan`] -> one batch of netlink messages.
//!
//! Each statement becomes the expression sequence `nft` itself would emit for it, so the
//! kernel listing (`nft list table inet nftproxy`) reads back as the comment says.

use std::net::IpAddr;

use nftnl::nftnl_sys as sys;

use super::consts::*;
use super::sys::{Attr, MsgBuf, RuleObj, SetObj, SetSpec};
use crate::model::Family;
use crate::plan::{Op, Plan};
use crate::ruleset::*;

const U: fn(u32) -> Attr<'static> = Attr::U32;

fn meta_load(r: &mut RuleObj, key: u32, dreg: u32) {
    r.expr(c"meta", &[(sys::NFTNL_EXPR_META_KEY, U(key)), (sys::NFTNL_EXPR_META_DREG, U(dreg))]);
}

fn meta_set(r: &mut RuleObj, key: u32, sreg: u32) {
    r.expr(c"meta", &[(sys::NFTNL_EXPR_META_KEY, U(key)), (sys::NFTNL_EXPR_META_SREG, U(sreg))]);
}

fn payload(r: &mut RuleObj, base: u32, offset: u32, len: u32, dreg: u32) {
    r.expr(
        c"payload",
        &[
            (sys::NFTNL_EXPR_PAYLOAD_BASE, U(base)),
            (sys::NFTNL_EXPR_PAYLOAD_OFFSET, U(offset)),
            (sys::NFTNL_EXPR_PAYLOAD_LEN, U(len)),
            (sys::NFTNL_EXPR_PAYLOAD_DREG, U(dreg)),
        ],
    );
}

fn cmp(r: &mut RuleObj, op: u32, data: &[u8]) {
    r.expr(
        c"cmp",
        &[
            (sys::NFTNL_EXPR_CMP_SREG, U(NFT_REG_1)),
            (sys::NFTNL_EXPR_CMP_OP, U(op)),
            (sys::NFTNL_EXPR_CMP_DATA, Attr::Data(data)),
        ],
    );
}

/// reg1 = (reg1 & mask) ^ xor
fn bitwise(r: &mut RuleObj, mask: &[u8], xor: &[u8]) {
    r.expr(
        c"bitwise",
        &[
            (sys::NFTNL_EXPR_BITWISE_SREG, U(NFT_REG_1)),
            (sys::NFTNL_EXPR_BITWISE_DREG, U(NFT_REG_1)),
            (sys::NFTNL_EXPR_BITWISE_LEN, U(mask.len() as u32)),
            (sys::NFTNL_EXPR_BITWISE_MASK, Attr::Data(mask)),
            (sys::NFTNL_EXPR_BITWISE_XOR, Attr::Data(xor)),
        ],
    );
}

/// Looks the key in `sreg` up in `set`; with `dreg`, loads the map's data there (a vmap: the
/// verdict register).
fn lookup(r: &mut RuleObj, sreg: u32, set: &str, dreg: Option<u32>) {
    let mut attrs =
        vec![(sys::NFTNL_EXPR_LOOKUP_SREG, U(sreg)), (sys::NFTNL_EXPR_LOOKUP_SET, Attr::Str(local_name(set)))];
    if let Some(d) = dreg {
        attrs.push((sys::NFTNL_EXPR_LOOKUP_DREG, U(d)));
    }
    r.expr(c"lookup", &attrs);
}

fn verdict(r: &mut RuleObj, code: i32, chain: Option<&str>) {
    let mut attrs = vec![(sys::NFTNL_EXPR_IMM_DREG, U(NFT_REG_VERDICT)), (sys::NFTNL_EXPR_IMM_VERDICT, U(code as u32))];
    if let Some(c) = chain {
        attrs.push((sys::NFTNL_EXPR_IMM_CHAIN, Attr::Str(local_name(c))));
    }
    r.expr(c"immediate", &attrs);
}

fn immediate(r: &mut RuleObj, dreg: u32, data: &[u8]) {
    r.expr(c"immediate", &[(sys::NFTNL_EXPR_IMM_DREG, U(dreg)), (sys::NFTNL_EXPR_IMM_DATA, Attr::Data(data))]);
}

/// (offset, length) of the source and destination address in the network header.
fn addr_offsets(family: Family) -> (u32, u32, u32) {
    match family {
        Family::V4 => (12, 16, 4),
        Family::V6 => (8, 24, 16),
    }
}

fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => NFPROTO_IPV4 as u8,
        Family::V6 => NFPROTO_IPV6 as u8,
    }
}

fn prefix_mask(len: u8, bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| {
            let bits = (len as usize).saturating_sub(i * 8).min(8);
            if bits == 0 { 0 } else { 0xffu8 << (8 - bits) }
        })
        .collect()
}

/// Appends the expressions of one statement.
pub fn encode_stmt(r: &mut RuleObj, stmt: &Stmt) {
    match stmt {
        Stmt::NfProto(f) => {
            meta_load(r, NFT_META_NFPROTO, NFT_REG_1);
            cmp(r, NFT_CMP_EQ, &[nfproto(*f)]);
        }
        Stmt::L4Proto(p) => {
            meta_load(r, NFT_META_L4PROTO, NFT_REG_1);
            cmp(r, NFT_CMP_EQ, &[p.number()]);
        }
        Stmt::SaddrIn(net) => {
            let (saddr, _, len) = addr_offsets(Family::of(&net.addr()));
            payload(r, NFT_PAYLOAD_NETWORK_HEADER, saddr, len, NFT_REG_1);
            let mask = prefix_mask(net.prefix_len(), len as usize);
            bitwise(r, &mask, &vec![0; len as usize]);
            cmp(r, NFT_CMP_EQ, &ip_bytes(&net.network()));
        }
        Stmt::DaddrInSet { family, set } => {
            let (_, daddr, len) = addr_offsets(*family);
            payload(r, NFT_PAYLOAD_NETWORK_HEADER, daddr, len, NFT_REG_1);
            lookup(r, NFT_REG_1, set, None);
        }
        Stmt::HairpinInSet { family, set } => {
            let (saddr, daddr, len) = addr_offsets(*family);
            let regs = len / 4;
            payload(r, NFT_PAYLOAD_NETWORK_HEADER, saddr, len, NFT_REG32_00);
            payload(r, NFT_PAYLOAD_NETWORK_HEADER, daddr, len, NFT_REG32_00 + regs);
            let key = if *family == Family::V4 { NFT_CT_DST_IP } else { NFT_CT_DST_IP6 };
            r.expr(
                c"ct",
                &[
                    (sys::NFTNL_EXPR_CT_KEY, U(key)),
                    (sys::NFTNL_EXPR_CT_DIR, U(IP_CT_DIR_ORIGINAL)),
                    (sys::NFTNL_EXPR_CT_DREG, U(NFT_REG32_00 + 2 * regs)),
                ],
            );
            lookup(r, NFT_REG32_00, set, None);
        }
        Stmt::SaddrInSet { family, set } => {
            let (saddr, _, len) = addr_offsets(*family);
            payload(r, NFT_PAYLOAD_NETWORK_HEADER, saddr, len, NFT_REG_1);
            lookup(r, NFT_REG_1, set, None);
        }
        Stmt::UpdateSaddrSet { family, set, timeout_seconds } => {
            let (saddr, _, len) = addr_offsets(*family);
            payload(r, NFT_PAYLOAD_NETWORK_HEADER, saddr, len, NFT_REG_1);
            r.expr(
                c"dynset",
                &[
                    (sys::NFTNL_EXPR_DYNSET_SREG_KEY, U(NFT_REG_1)),
                    (sys::NFTNL_EXPR_DYNSET_OP, U(NFT_DYNSET_OP_UPDATE)),
                    (sys::NFTNL_EXPR_DYNSET_SET_NAME, Attr::Str(local_name(set))),
                    (sys::NFTNL_EXPR_DYNSET_TIMEOUT, Attr::U64(u64::from(*timeout_seconds) * 1000)),
                ],
            );
        }
        Stmt::DispatchVmap { family, map } => {
            // ip daddr . meta l4proto . th dport, one 32-bit register per 4 bytes of key.
            let (_, daddr, len) = addr_offsets(*family);
            let proto_reg = NFT_REG32_00 + len / 4;
            payload(r, NFT_PAYLOAD_NETWORK_HEADER, daddr, len, NFT_REG32_00);
            meta_load(r, NFT_META_L4PROTO, proto_reg);
            payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, proto_reg + 1);
            lookup(r, NFT_REG32_00, map, Some(NFT_REG_VERDICT));
        }
        Stmt::MarkBitClear(bit) => {
            meta_load(r, NFT_META_MARK, NFT_REG_1);
            bitwise(r, &bit.to_ne_bytes(), &[0; 4]);
            cmp(r, NFT_CMP_EQ, &[0; 4]);
        }
        Stmt::SetMarkBit(bit) => {
            meta_load(r, NFT_META_MARK, NFT_REG_1);
            bitwise(r, &(!bit).to_ne_bytes(), &bit.to_ne_bytes());
            meta_set(r, NFT_META_MARK, NFT_REG_1);
        }
        Stmt::ClearMarkBit(bit) => {
            meta_load(r, NFT_META_MARK, NFT_REG_1);
            bitwise(r, &(!bit).to_ne_bytes(), &[0; 4]);
            meta_set(r, NFT_META_MARK, NFT_REG_1);
        }
        Stmt::NumgenBelow { modulus, below } => {
            r.expr(
                c"numgen",
                &[
                    (sys::NFTNL_EXPR_NG_DREG, U(NFT_REG_1)),
                    (sys::NFTNL_EXPR_NG_MODULUS, U(*modulus)),
                    (sys::NFTNL_EXPR_NG_TYPE, U(NFT_NG_RANDOM)),
                ],
            );
            if *below == 1 {
                cmp(r, NFT_CMP_EQ, &[0; 4]);
            } else {
                // cmp orders bytes with memcmp: compare big-endian, as nft does.
                r.expr(
                    c"byteorder",
                    &[
                        (sys::NFTNL_EXPR_BYTEORDER_SREG, U(NFT_REG_1)),
                        (sys::NFTNL_EXPR_BYTEORDER_DREG, U(NFT_REG_1)),
                        (sys::NFTNL_EXPR_BYTEORDER_OP, U(NFT_BYTEORDER_HTON)),
                        (sys::NFTNL_EXPR_BYTEORDER_LEN, U(4)),
                        (sys::NFTNL_EXPR_BYTEORDER_SIZE, U(4)),
                    ],
                );
                cmp(r, NFT_CMP_LT, &below.to_be_bytes());
            }
        }
        Stmt::Jump(c) => verdict(r, NFT_JUMP, Some(c)),
        Stmt::Goto(c) => verdict(r, NFT_GOTO, Some(c)),
        Stmt::Return => verdict(r, NFT_RETURN, None),
        Stmt::Dnat { addr, port } => {
            immediate(r, NFT_REG_1, &ip_bytes(addr));
            immediate(r, NFT_REG_2, &port.to_be_bytes());
            let family = match addr {
                IpAddr::V4(_) => NFPROTO_IPV4,
                IpAddr::V6(_) => NFPROTO_IPV6,
            };
            r.expr(
                c"nat",
                &[
                    (sys::NFTNL_EXPR_NAT_TYPE, U(NFT_NAT_DNAT)),
                    (sys::NFTNL_EXPR_NAT_FAMILY, U(family)),
                    (sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, U(NFT_REG_1)),
                    (sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, U(NFT_REG_2)),
                ],
            );
        }
        Stmt::Masquerade => r.expr(c"masq", &[(sys::NFTNL_EXPR_MASQ_FLAGS, U(NF_NAT_RANGE_PROTO_RANDOM_FULLY))]),
        Stmt::CtStateInvalid => {
            r.expr(c"ct", &[(sys::NFTNL_EXPR_CT_KEY, U(NFT_CT_STATE)), (sys::NFTNL_EXPR_CT_DREG, U(NFT_REG_1))]);
            bitwise(r, &NF_CT_STATE_INVALID_BIT.to_ne_bytes(), &[0; 4]);
            cmp(r, NFT_CMP_NEQ, &[0; 4]);
        }
        Stmt::Counter => r.expr(c"counter", &[]),
        Stmt::Drop => verdict(r, NF_DROP, None),
        Stmt::RejectTcpReset => r.expr(
            c"reject",
            &[(sys::NFTNL_EXPR_REJECT_TYPE, U(NFT_REJECT_TCP_RST)), (sys::NFTNL_EXPR_REJECT_CODE, U(0))],
        ),
        Stmt::RejectPortUnreachable => r.expr(
            c"reject",
            &[
                (sys::NFTNL_EXPR_REJECT_TYPE, U(NFT_REJECT_ICMPX_UNREACH)),
                (sys::NFTNL_EXPR_REJECT_CODE, U(NFT_REJECT_ICMPX_PORT_UNREACH)),
            ],
        ),
    }
}

/// Rule user data holding the comment, in libnftnl's TLV layout (type, length, NUL-terminated).
pub fn comment_udata(comment: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(comment.len() + 3);
    v.push(UDATA_RULE_COMMENT);
    v.push((comment.len() + 1) as u8);
    v.extend_from_slice(comment.as_bytes());
    v.push(0);
    v
}

/// The comment in rule user data, or "" when there is none.
pub fn udata_comment(mut data: &[u8]) -> String {
    while data.len() >= 2 {
        let (kind, len) = (data[0], data[1] as usize);
        let Some(value) = data.get(2..2 + len) else {
            break;
        };
        if kind == UDATA_RULE_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return String::from_utf8_lossy(text).into_owned();
        }
        data = &data[2 + len..];
    }
    String::new()
}

pub fn rule_obj(chain: &str, rule: &Rule) -> RuleObj {
    let (table, local) = split_name(chain);
    let mut r = RuleObj::new(table, local);
    for s in &rule.0 {
        encode_stmt(&mut r, s);
    }
    r.set_userdata(&comment_udata(&rule.comment()));
    r
}

fn set_spec(kind: SetKind, id: u32) -> SetSpec {
    let (addr_type, key_len) = match kind.family() {
        Family::V4 => (TYPE_IPADDR, kind.key_len()),
        Family::V6 => (TYPE_IP6ADDR, kind.key_len()),
    };
    let key_type = match kind {
        SetKind::Dispatch(_) => (addr_type << (2 * TYPE_BITS)) | (TYPE_INET_PROTOCOL << TYPE_BITS) | TYPE_INET_SERVICE,
        SetKind::Addresses(_) | SetKind::Affinity(_) => addr_type,
        SetKind::Hairpin(_) => (addr_type << (2 * TYPE_BITS)) | (addr_type << TYPE_BITS) | addr_type,
        SetKind::State => TYPE_INTEGER,
    };
    let (is_map, dynamic) = (matches!(kind, SetKind::Dispatch(_)), matches!(kind, SetKind::Affinity(_)));
    SetSpec { key_type, key_len, is_map, dynamic, id }
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
            obj.add_element(&e.key, e.goto.as_deref().map(local_name));
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
        Some(Op::DelTable(t) | Op::AddTable(t)) => format!("table {t}"),
        Some(Op::AddSet { name, .. } | Op::DelSet(name)) => format!("set {name}"),
        Some(Op::AddChain { name, .. } | Op::DelChain(name)) => format!("chain {name}"),
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

/// Encodes a plan as BEGIN, its messages, END.
pub fn encode_plan(plan: &Plan, first_seq: u32) -> Encoded {
    // Rough size: most messages are rules of a few expressions naming one or two chains.
    let estimate: usize = plan
        .ops
        .iter()
        .map(|op| match op {
            Op::AddRules { chain, rules } => rules.iter().map(|r| 96 + 2 * chain.len() + 72 * r.0.len()).sum(),
            Op::AddElements { elements, .. } | Op::DelElements { elements, .. } => {
                elements.iter().map(|e| 40 + e.key.len() + e.goto.as_ref().map_or(0, |g| g.len())).sum()
            }
            _ => 256,
        })
        .sum();
    let mut buf = MsgBuf::with_capacity(first_seq, estimate + 4096);
    let mut owners = Vec::with_capacity(plan.message_count());
    buf.batch_begin();
    let mut set_id = 1;
    for (op_index, op) in plan.ops.iter().enumerate() {
        let mut tag = |seq: u32, item: usize, count: usize| {
            owners.push(Owner { seq, op: op_index as u32, item: item as u32, count: count as u32 })
        };
        match op {
            Op::DelTable(t) => tag(buf.table(NFT_MSG_DELTABLE, 0, t), 0, 1),
            Op::AddTable(t) => tag(buf.table(NFT_MSG_NEWTABLE, NLM_F_CREATE, t), 0, 1),
            Op::AddSet { name, kind } => {
                let (table, local) = split_name(name);
                let obj = SetObj::new(table, local, Some(&set_spec(*kind, set_id)));
                set_id += 1;
                tag(buf.set(NFT_MSG_NEWSET, NLM_F_CREATE, &obj), 0, 1);
            }
            Op::AddChain { name, base } => {
                let hook = base.map(|b| {
                    let hooknum = match b.hook {
                        Hook::Prerouting => NF_INET_PRE_ROUTING,
                        Hook::Output => NF_INET_LOCAL_OUT,
                        Hook::Postrouting => NF_INET_POST_ROUTING,
                        Hook::Forward => NF_INET_FORWARD,
                    };
                    (hooknum, b.priority, b.hook.chain_type())
                });
                let (table, local) = split_name(name);
                tag(buf.chain(NFT_MSG_NEWCHAIN, NLM_F_CREATE, table, local, hook), 0, 1);
            }
            Op::FlushChain(name) => {
                let (table, local) = split_name(name);
                tag(buf.flush_chain(table, local), 0, 1)
            }
            Op::AddRules { chain, rules } => {
                for (i, rule) in rules.iter().enumerate() {
                    tag(buf.rule(&rule_obj(chain, rule)), i, 1);
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
    fn comment_round_trips_through_udata() {
        let c = "numgen random mod 3 < 1 goto ep4/default/web/tcp/80/10.244.0.2:8080";
        assert_eq!(udata_comment(&comment_udata(c)), c);
        assert_eq!(udata_comment(&[]), "");
        assert_eq!(udata_comment(&[0, 200, 1]), "", "truncated TLV is ignored");
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(16, 4), vec![255, 255, 0, 0]);
        assert_eq!(prefix_mask(12, 4), vec![255, 240, 0, 0]);
        assert_eq!(prefix_mask(0, 4), vec![0, 0, 0, 0]);
        assert_eq!(prefix_mask(64, 16)[7..9], [255, 0]);
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
