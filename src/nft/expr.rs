//! Our statements as nf_tables rule attributes, written byte for byte in the form the kernel
//! dumps them back (attribute order, the defaults it reports, no NLA_F_NESTED on expression
//! nests). What we send is then exactly what a read-back returns, so the diff compares rules by
//! their real content: [`fingerprint`] of the kernel's bytes against [`fingerprint`] of ours.
//!
//! Pure: no libnftnl, no sockets. The golden vectors in the tests are bytes this kernel (6.18)
//! dumped for rules nftproxy wrote.

use super::consts::*;
use crate::model::Family;
use crate::ruleset::{Fnv, Rule, Stmt, ip_bytes, local_name};

// Attribute numbers from linux/netfilter/nf_tables.h.
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// Appends netlink attributes to a buffer, 4-byte aligned.
pub struct Attrs<'a>(pub &'a mut Vec<u8>);

impl Attrs<'_> {
    pub fn bytes(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
    }

    fn pad(&mut self) {
        let padded = self.0.len().next_multiple_of(4);
        self.0.resize(padded, 0);
    }

    pub fn u32(&mut self, kind: u16, v: u32) {
        self.bytes(kind, &v.to_be_bytes());
    }

    /// A register number, as the kernel dumps it: a 32-bit register that starts a 128-bit one
    /// (NFT_REG32_00, _04, _08, _12) comes back as that 128-bit register (NFT_REG_1 .. _4).
    fn reg(&mut self, kind: u16, r: u32) {
        let r = match r.checked_sub(NFT_REG32_00) {
            Some(n) if n % 4 == 0 => NFT_REG_1 + n / 4,
            _ => r,
        };
        self.u32(kind, r);
    }

    fn u64(&mut self, kind: u16, v: u64) {
        self.bytes(kind, &v.to_be_bytes());
    }

    fn u8(&mut self, kind: u16, v: u8) {
        self.bytes(kind, &[v]);
    }

    /// A NUL-terminated string.
    pub fn str(&mut self, kind: u16, s: &str) {
        let len = 4 + s.len() + 1;
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self.pad();
    }

    /// A nested attribute whose content `inner` writes.
    pub fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&kind.to_ne_bytes());
        inner(&mut Attrs(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// `NFTA_*_DATA { NFTA_DATA_VALUE bytes }`
    fn data(&mut self, kind: u16, value: &[u8]) {
        self.nest(kind, |a| a.bytes(NFTA_DATA_VALUE, value));
    }

    /// One expression: `NFTA_LIST_ELEM { NAME, DATA { attributes } }`.
    fn expr(&mut self, name: &str, attrs: impl FnOnce(&mut Attrs<'_>)) {
        self.nest(NFTA_LIST_ELEM, |e| {
            e.str(NFTA_EXPR_NAME, name);
            e.nest(NFTA_EXPR_DATA, attrs);
        });
    }
}

fn meta_load(a: &mut Attrs<'_>, key: u32, dreg: u32) {
    a.expr("meta", |a| {
        a.u32(2, key); // NFTA_META_KEY
        a.reg(1, dreg); // NFTA_META_DREG
    });
}

fn meta_set(a: &mut Attrs<'_>, key: u32, sreg: u32) {
    a.expr("meta", |a| {
        a.u32(2, key);
        a.u32(3, sreg); // NFTA_META_SREG
    });
}

fn payload(a: &mut Attrs<'_>, base: u32, offset: u32, len: u32, dreg: u32) {
    a.expr("payload", |a| {
        a.reg(1, dreg); // NFTA_PAYLOAD_DREG
        a.u32(2, base);
        a.u32(3, offset);
        a.u32(4, len);
    });
}

fn cmp(a: &mut Attrs<'_>, op: u32, data: &[u8]) {
    a.expr("cmp", |a| {
        a.u32(1, NFT_REG_1); // NFTA_CMP_SREG
        a.u32(2, op);
        a.data(3, data);
    });
}

/// reg1 = (reg1 & mask) ^ xor
fn bitwise(a: &mut Attrs<'_>, mask: &[u8], xor: &[u8]) {
    a.expr("bitwise", |a| {
        a.u32(1, NFT_REG_1); // NFTA_BITWISE_SREG
        a.u32(2, NFT_REG_1); // NFTA_BITWISE_DREG
        a.u32(3, mask.len() as u32); // NFTA_BITWISE_LEN
        a.u32(6, 0); // NFTA_BITWISE_OP: NFT_BITWISE_BOOL (mask and xor)
        a.data(4, mask);
        a.data(5, xor);
    });
}

/// Looks the key in `sreg` up in `set`; with `dreg`, loads the map's data there (a vmap: the
/// verdict register).
fn lookup(a: &mut Attrs<'_>, sreg: u32, set: &str, dreg: Option<u32>) {
    a.expr("lookup", |a| {
        a.str(1, local_name(set)); // NFTA_LOOKUP_SET
        a.reg(2, sreg);
        if let Some(d) = dreg {
            a.u32(3, d);
        }
        a.u32(5, 0); // NFTA_LOOKUP_FLAGS: not inverted
    });
}

fn verdict(a: &mut Attrs<'_>, code: i32, chain: Option<&str>) {
    a.expr("immediate", |a| {
        a.u32(1, NFT_REG_VERDICT); // NFTA_IMMEDIATE_DREG
        a.nest(2, |d| {
            d.nest(NFTA_DATA_VERDICT, |v| {
                v.u32(NFTA_VERDICT_CODE, code as u32);
                if let Some(c) = chain {
                    v.str(NFTA_VERDICT_CHAIN, local_name(c));
                }
            })
        });
    });
}

fn immediate(a: &mut Attrs<'_>, dreg: u32, data: &[u8]) {
    a.expr("immediate", |a| {
        a.u32(1, dreg);
        a.data(2, data);
    });
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

pub fn prefix_mask(len: u8, bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| {
            let bits = (len as usize).saturating_sub(i * 8).min(8);
            if bits == 0 { 0 } else { 0xffu8 << (8 - bits) }
        })
        .collect()
}

/// `ct KEY & bit OP 0`: a test of one bit of a 32-bit conntrack field.
fn ct_bit_test(a: &mut Attrs<'_>, key: u32, bit: u32, op: u32) {
    a.expr("ct", |a| {
        a.u32(1, NFT_REG_1); // NFTA_CT_DREG
        a.u32(2, key); // NFTA_CT_KEY
    });
    bitwise(a, &bit.to_ne_bytes(), &[0; 4]);
    cmp(a, op, &[0; 4]);
}

/// Appends the expressions of one statement.
fn stmt(a: &mut Attrs<'_>, stmt: &Stmt) {
    match stmt {
        Stmt::NfProto(f) => {
            meta_load(a, NFT_META_NFPROTO, NFT_REG_1);
            cmp(a, NFT_CMP_EQ, &[nfproto(*f)]);
        }
        Stmt::L4Proto(p) => {
            meta_load(a, NFT_META_L4PROTO, NFT_REG_1);
            cmp(a, NFT_CMP_EQ, &[p.number()]);
        }
        Stmt::SaddrIn(net) => {
            let (saddr, _, len) = addr_offsets(Family::of(&net.addr()));
            payload(a, NFT_PAYLOAD_NETWORK_HEADER, saddr, len, NFT_REG_1);
            // One address (each endpoint chain's hairpin test): a plain compare, as nft writes it.
            if net.prefix_len() < net.max_prefix_len() {
                bitwise(a, &prefix_mask(net.prefix_len(), len as usize), &vec![0; len as usize]);
            }
            cmp(a, NFT_CMP_EQ, &ip_bytes(&net.network()));
        }
        Stmt::DaddrInSet { family, set } => {
            let (_, daddr, len) = addr_offsets(*family);
            payload(a, NFT_PAYLOAD_NETWORK_HEADER, daddr, len, NFT_REG_1);
            lookup(a, NFT_REG_1, set, None);
        }
        Stmt::HairpinInSet { family, set } => {
            let (saddr, daddr, len) = addr_offsets(*family);
            let regs = len / 4;
            payload(a, NFT_PAYLOAD_NETWORK_HEADER, saddr, len, NFT_REG32_00);
            payload(a, NFT_PAYLOAD_NETWORK_HEADER, daddr, len, NFT_REG32_00 + regs);
            let key = if *family == Family::V4 { NFT_CT_DST_IP } else { NFT_CT_DST_IP6 };
            a.expr("ct", |a| {
                a.reg(1, NFT_REG32_00 + 2 * regs); // NFTA_CT_DREG
                a.u32(2, key); // NFTA_CT_KEY
                a.u8(3, IP_CT_DIR_ORIGINAL as u8); // NFTA_CT_DIRECTION
            });
            lookup(a, NFT_REG32_00, set, None);
        }
        Stmt::SaddrInSet { family, set } => {
            let (saddr, _, len) = addr_offsets(*family);
            payload(a, NFT_PAYLOAD_NETWORK_HEADER, saddr, len, NFT_REG_1);
            lookup(a, NFT_REG_1, set, None);
        }
        Stmt::UpdateSaddrSet { family, set, timeout_seconds } => {
            let (saddr, _, len) = addr_offsets(*family);
            payload(a, NFT_PAYLOAD_NETWORK_HEADER, saddr, len, NFT_REG_1);
            a.expr("dynset", |a| {
                a.u32(4, NFT_REG_1); // NFTA_DYNSET_SREG_KEY
                a.u32(3, NFT_DYNSET_OP_UPDATE); // NFTA_DYNSET_OP
                a.str(1, local_name(set)); // NFTA_DYNSET_SET_NAME
                a.u64(6, u64::from(*timeout_seconds) * 1000); // NFTA_DYNSET_TIMEOUT, ms
                a.u32(9, 0); // NFTA_DYNSET_FLAGS
            });
        }
        Stmt::DaddrVmap { family, map } => {
            let (_, daddr, len) = addr_offsets(*family);
            payload(a, NFT_PAYLOAD_NETWORK_HEADER, daddr, len, NFT_REG_1);
            lookup(a, NFT_REG_1, map, Some(NFT_REG_VERDICT));
        }
        Stmt::DispatchVmap { family, map } => {
            // ip daddr . meta l4proto . th dport, one 32-bit register per 4 bytes of key.
            let (_, daddr, len) = addr_offsets(*family);
            let proto_reg = NFT_REG32_00 + len / 4;
            payload(a, NFT_PAYLOAD_NETWORK_HEADER, daddr, len, NFT_REG32_00);
            meta_load(a, NFT_META_L4PROTO, proto_reg);
            payload(a, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, proto_reg + 1);
            lookup(a, NFT_REG32_00, map, Some(NFT_REG_VERDICT));
        }
        Stmt::NodePortVmap { map } => {
            meta_load(a, NFT_META_L4PROTO, NFT_REG32_00);
            payload(a, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_00 + 1);
            lookup(a, NFT_REG32_00, map, Some(NFT_REG_VERDICT));
        }
        Stmt::FibSaddrLocal => {
            a.expr("fib", |a| {
                a.u32(1, NFT_REG_1); // NFTA_FIB_DREG
                a.u32(2, NFT_FIB_RESULT_ADDRTYPE); // NFTA_FIB_RESULT
                a.u32(3, NFTA_FIB_F_SADDR); // NFTA_FIB_FLAGS
            });
            cmp(a, NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes());
        }
        Stmt::MarkBitClear(bit) => {
            meta_load(a, NFT_META_MARK, NFT_REG_1);
            bitwise(a, &bit.to_ne_bytes(), &[0; 4]);
            cmp(a, NFT_CMP_EQ, &[0; 4]);
        }
        Stmt::SetMarkBit(bit) => {
            meta_load(a, NFT_META_MARK, NFT_REG_1);
            bitwise(a, &(!bit).to_ne_bytes(), &bit.to_ne_bytes());
            meta_set(a, NFT_META_MARK, NFT_REG_1);
        }
        Stmt::ClearMarkBit(bit) => {
            meta_load(a, NFT_META_MARK, NFT_REG_1);
            bitwise(a, &(!bit).to_ne_bytes(), &[0; 4]);
            meta_set(a, NFT_META_MARK, NFT_REG_1);
        }
        Stmt::NumgenBelow { modulus, below } => {
            a.expr("numgen", |a| {
                a.u32(1, NFT_REG_1); // NFTA_NG_DREG
                a.u32(2, *modulus);
                a.u32(3, NFT_NG_RANDOM);
                a.u32(4, 0); // NFTA_NG_OFFSET
            });
            if *below == 1 {
                cmp(a, NFT_CMP_EQ, &[0; 4]);
            } else {
                // cmp orders bytes with memcmp: compare big-endian, as nft does.
                a.expr("byteorder", |a| {
                    a.u32(1, NFT_REG_1);
                    a.u32(2, NFT_REG_1);
                    a.u32(3, NFT_BYTEORDER_HTON);
                    a.u32(4, 4);
                    a.u32(5, 4);
                });
                cmp(a, NFT_CMP_LT, &below.to_be_bytes());
            }
        }
        Stmt::Jump(c) => verdict(a, NFT_JUMP, Some(c)),
        Stmt::Goto(c) => verdict(a, NFT_GOTO, Some(c)),
        Stmt::Return => verdict(a, NFT_RETURN, None),
        Stmt::Drop => verdict(a, NF_DROP, None),
        Stmt::Dnat { addr, port } => {
            immediate(a, NFT_REG_1, &ip_bytes(addr));
            immediate(a, NFT_REG_2, &port.to_be_bytes());
            let family = u32::from(nfproto(Family::of(addr)));
            a.expr("nat", |a| {
                a.u32(1, NFT_NAT_DNAT);
                a.u32(2, family); // NFTA_NAT_FAMILY
                a.u32(3, NFT_REG_1); // NFTA_NAT_REG_ADDR_MIN
                a.u32(4, NFT_REG_1); // .._ADDR_MAX: the kernel fills in min
                a.u32(5, NFT_REG_2); // NFTA_NAT_REG_PROTO_MIN
                a.u32(6, NFT_REG_2);
                a.u32(7, NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED); // what the kernel derives
            });
        }
        Stmt::Masquerade => a.expr("masq", |a| a.u32(1, NF_NAT_RANGE_PROTO_RANDOM_FULLY)),
        Stmt::CtStateInvalid => ct_bit_test(a, NFT_CT_STATE, NF_CT_STATE_INVALID_BIT, NFT_CMP_NEQ),
        Stmt::CtNotDnat => ct_bit_test(a, NFT_CT_STATUS, IPS_DST_NAT, NFT_CMP_EQ),
        Stmt::Counter => a.expr("counter", |a| {
            a.u64(1, 0); // NFTA_COUNTER_BYTES
            a.u64(2, 0); // NFTA_COUNTER_PACKETS
        }),
        Stmt::RejectTcpReset => a.expr("reject", |a| a.u32(1, NFT_REJECT_TCP_RST)),
        Stmt::RejectPortUnreachable => a.expr("reject", |a| {
            a.u32(1, NFT_REJECT_ICMPX_UNREACH);
            a.u8(2, NFT_REJECT_ICMPX_PORT_UNREACH as u8);
        }),
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

/// The content of NFTA_RULE_EXPRESSIONS for `rule`.
pub fn expressions(out: &mut Vec<u8>, rule: &Rule) {
    let mut a = Attrs(out);
    for s in &rule.stmts {
        stmt(&mut a, s);
    }
}

/// The attributes of a NEWRULE message appending `rule` to `chain` of `table`.
pub fn rule_attrs(out: &mut Vec<u8>, table: &str, chain: &str, rule: &Rule) {
    let mut a = Attrs(out);
    a.str(NFTA_RULE_TABLE, table);
    a.str(NFTA_RULE_CHAIN, chain);
    a.nest(NFTA_RULE_EXPRESSIONS, |e| expressions(e.0, rule));
    a.bytes(NFTA_RULE_USERDATA, &comment_udata(rule.comment()));
}

/// The attributes of a netlink attribute stream: (type without flags, payload).
pub fn attributes(mut rest: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, value))
    })
}

/// What a rule is, for the diff: its expressions and its user data (the comment). Counter
/// values are left out (the kernel counts; we always send zero).
pub fn fingerprint(expressions: &[u8], userdata: &[u8]) -> u64 {
    let mut h = Fnv::default();
    for (_, elem) in attributes(expressions) {
        let is_counter = attributes(elem).any(|(k, v)| k == NFTA_EXPR_NAME && v == b"counter\0");
        h.write(if is_counter { b"counter" } else { elem });
    }
    h.write(userdata);
    h.0
}

/// [`fingerprint`] of a rule as we would send it.
pub fn rule_fingerprint(rule: &Rule, scratch: &mut Vec<u8>) -> u64 {
    scratch.clear();
    expressions(scratch, rule);
    fingerprint(scratch, &comment_udata(rule.comment()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Protocol;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn exprs(stmts: Vec<Stmt>) -> Vec<u8> {
        let mut out = Vec::new();
        expressions(&mut out, &Rule::new(&Arc::from(""), stmts));
        out
    }

    /// NFTA_RULE_EXPRESSIONS payloads as kernel 6.18 dumped them for rules nftproxy wrote.
    #[test]
    fn expressions_are_the_bytes_the_kernel_dumps() {
        let cases: Vec<(Vec<Stmt>, &str)> = vec![
            (vec![Stmt::Masquerade], "1c000100090001006d617371000000000c0002000800010000000010"),
            (
                vec![Stmt::CtStateInvalid, Stmt::Counter, Stmt::Drop],
                "20000100070001006374000014000200080001000000000108000200000000004c0001000c00010062697477697365003c00020008000100000000010800020000000001080003000000000408000600000000000c00040008000100010000000c00050008000100000000002c00010008000100636d700020000200080001000000000108000200000000010c00030008000100000000002c0001000c000100636f756e746572001c0002000c00010000000000000000000c0002000000000000000000300001000e000100696d6d6564696174650000001c0002000800010000000000100002000c0002000800010000000000",
            ),
            (
                vec![Stmt::MarkBitClear(0x4000), Stmt::Return],
                "24000100090001006d6574610000000014000200080002000000000308000100000000014c0001000c00010062697477697365003c00020008000100000000010800020000000001080003000000000408000600000000000c00040008000100004000000c00050008000100000000002c00010008000100636d700020000200080001000000000108000200000000000c0003000800010000000000300001000e000100696d6d6564696174650000001c0002000800010000000000100002000c00020008000100fffffffb",
            ),
            (
                vec![Stmt::ClearMarkBit(0x4000)],
                "24000100090001006d6574610000000014000200080002000000000308000100000000014c0001000c00010062697477697365003c00020008000100000000010800020000000001080003000000000408000600000000000c00040008000100ffbfffff0c000500080001000000000024000100090001006d657461000000001400020008000200000000030800030000000001",
            ),
            (
                vec![
                    Stmt::NfProto(Family::V4),
                    Stmt::HairpinInSet { family: Family::V4, set: "hairpin-v4".into() },
                    Stmt::Masquerade,
                ],
                "24000100090001006d6574610000000014000200080002000000000f08000100000000012c00010008000100636d700020000200080001000000000108000200000000000c0003000500010002000000340001000c0001007061796c6f6164002400020008000100000000010800020000000001080003000000000c0800040000000004340001000c0001007061796c6f6164002400020008000100000000090800020000000001080003000000001008000400000000042800010007000100637400001c000200080001000000000a08000200000000140500030000000000340001000b0001006c6f6f6b75700000240002000f0001006861697270696e2d76340000080002000000000108000500000000001c000100090001006d617371000000000c0002000800010000000010",
            ),
        ];
        for (stmts, want) in cases {
            let text = Rule::new(&Arc::from(""), stmts.clone()).to_string();
            assert_eq!(exprs(stmts), hex(want), "{text}");
        }
    }

    /// Single expressions from the same dump.
    #[test]
    fn each_expression_matches_the_kernel_dump() {
        // The content of the `nth` NFTA_LIST_ELEM.
        let one = |stmts: Vec<Stmt>, nth: usize| -> Vec<u8> {
            let b = exprs(stmts);
            attributes(&b).nth(nth).map(|(_, v)| v.to_vec()).unwrap()
        };
        let goto = "ep4/default/aff/tcp/80/10.244.9.1/8080";
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                one(vec![Stmt::Dnat { addr: "10.244.9.1".parse().unwrap(), port: 8080 }], 2),
                "080001006e6174003c0002000800010000000001080002000000000208000300000000010800040000000001080005000000000208000600000000020800070000000003",
            ),
            (
                one(vec![Stmt::Dnat { addr: "10.244.9.1".parse().unwrap(), port: 8080 }], 0),
                "0e000100696d6d6564696174650000001800020008000100000000010c000200080001000af40901",
            ),
            (
                one(vec![Stmt::NumgenBelow { modulus: 7, below: 3 }], 0),
                "0b0001006e756d67656e0000240002000800010000000001080002000000000708000300000000010800040000000000",
            ),
            (
                one(vec![Stmt::NumgenBelow { modulus: 7, below: 3 }], 1),
                "0e000100627974656f726465720000002c00020008000100000000010800020000000001080003000000000108000400000000040800050000000004",
            ),
            (
                one(
                    vec![Stmt::UpdateSaddrSet {
                        family: Family::V4,
                        set: "aff4/default/aff/tcp/80/10.244.9.1/8080".into(),
                        timeout_seconds: 10800,
                    }],
                    1,
                ),
                "0b00010064796e736574000054000200080004000000000108000300000000012c000100616666342f64656661756c742f6166662f7463702f38302f31302e3234342e392e312f38303830000c0006000000000000a4cb800800090000000000",
            ),
            (
                one(
                    vec![Stmt::SaddrInSet {
                        family: Family::V4,
                        set: "aff4/default/aff/tcp/80/10.244.9.1/8080".into(),
                    }],
                    1,
                ),
                "0b0001006c6f6f6b75700000400002002c000100616666342f64656661756c742f6166662f7463702f38302f31302e3234342e392e312f383038300008000200000000010800050000000000",
            ),
            (
                one(vec![Stmt::Goto(goto.into())], 0),
                "0e000100696d6d6564696174650000004800020008000100000000003c0002003800020008000100fffffffc2b0002006570342f64656661756c742f6166662f7463702f38302f31302e3234342e392e312f383038300000",
            ),
            (
                one(vec![Stmt::DispatchVmap { family: Family::V4, map: "service-ips-v4".into() }], 3),
                "0b0001006c6f6f6b757000003000020013000100736572766963652d6970732d76340000080002000000000108000300000000000800050000000000",
            ),
            (one(vec![Stmt::RejectTcpReset], 0), "0b00010072656a65637400000c0002000800010000000001"),
            (
                one(vec![Stmt::FibSaddrLocal], 0),
                "08000100666962001c000200080001000000000108000200000000030800030000000001",
            ),
            (
                one(vec![Stmt::FibSaddrLocal], 1),
                "08000100636d700020000200080001000000000108000200000000000c0003000800010002000000",
            ),
            (
                one(vec![Stmt::RejectPortUnreachable], 0),
                "0b00010072656a65637400001400020008000100000000020500020001000000",
            ),
            (
                one(vec![Stmt::SaddrIn("fd00:10:244::/48".parse().unwrap())], 1),
                "0c00010062697477697365005400020008000100000000010800020000000001080003000000001008000600000000001800040014000100ffffffffffff00000000000000000000180005001400010000000000000000000000000000000000",
            ),
            (
                one(vec![Stmt::SaddrIn("fd00:10:244::/48".parse().unwrap())], 2),
                "08000100636d70002c000200080001000000000108000200000000001800030014000100fd000010024400000000000000000000",
            ),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            assert_eq!(got, hex(want), "case {i}");
        }
    }

    #[test]
    fn fingerprints_see_content_and_label_but_not_counter_values() {
        let label: Arc<str> = "default/web".into();
        let mut scratch = Vec::new();
        let dnat = |a: &str| Rule::new(&label, vec![Stmt::Dnat { addr: a.parse().unwrap(), port: 80 }]);
        let a = rule_fingerprint(&dnat("10.0.0.1"), &mut scratch);
        assert_eq!(a, rule_fingerprint(&dnat("10.0.0.1"), &mut scratch));
        assert_ne!(a, rule_fingerprint(&dnat("10.0.0.2"), &mut scratch), "other address");
        let relabelled = Rule::new(&"default/other".into(), dnat("10.0.0.1").stmts);
        assert_ne!(a, rule_fingerprint(&relabelled, &mut scratch), "other comment");
        assert_ne!(
            rule_fingerprint(&Rule::new(&label, vec![Stmt::Goto("x".into())]), &mut scratch),
            rule_fingerprint(&Rule::new(&label, vec![Stmt::Jump("x".into())]), &mut scratch),
        );
        // A counter that has counted is the same rule.
        let counted = exprs(vec![Stmt::Counter, Stmt::Drop]);
        let mut kernel = counted.clone();
        let at = kernel.windows(8).position(|w| w == [0; 8]).unwrap();
        kernel[at + 7] = 42;
        assert_ne!(kernel, counted);
        assert_eq!(fingerprint(&kernel, b""), fingerprint(&counted, b""));
    }

    #[test]
    fn rule_messages_name_table_and_chain_and_carry_the_label() {
        let mut out = Vec::new();
        let rule = Rule::new(&"default/web".into(), vec![Stmt::L4Proto(Protocol::Tcp), Stmt::RejectTcpReset]);
        rule_attrs(&mut out, "nftproxy", "svc4/default/web/tcp/80", &rule);
        let attrs: Vec<(u16, &[u8])> = attributes(&out).collect();
        assert_eq!(attrs.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![1, 2, 4, 7]);
        assert_eq!(attrs[0].1, b"nftproxy\0");
        assert_eq!(attrs[1].1, b"svc4/default/web/tcp/80\0");
        assert_eq!(attrs[2].1, &exprs(rule.stmts.clone())[..]);
        assert_eq!(attrs[3].1, &comment_udata("default/web")[..]);
        assert_eq!(out.len() % 4, 0);
    }
}
