//! The kernel's rule expressions back into our statements: the inverse of [`super::expr`].
//!
//! Each statement is recognised from its first expression and the values it carries, then
//! re-encoded with `expr` and compared with the kernel's bytes: a rule decodes only when every
//! byte is exactly what we would have sent for those statements (counter values aside), so a
//! rule someone else wrote or changed never decodes into something it is not. Pure: no sockets.

use std::sync::Arc;

use ipnet::IpNet;

use super::consts::*;
use super::expr::{attributes, expressions};
use crate::model::{Family, Protocol};
use crate::ruleset::{Rule, Stmt, ip_from_bytes};

const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

/// One expression of a rule as the kernel dumps it.
#[derive(Clone, Copy)]
struct Expr<'a> {
    /// The whole NFTA_LIST_ELEM payload (what the comparison uses).
    raw: &'a [u8],
    name: &'a [u8],
    data: &'a [u8],
}

impl<'a> Expr<'a> {
    fn parse(raw: &'a [u8]) -> Expr<'a> {
        let mut e = Expr { raw, name: &[], data: &[] };
        for (k, v) in attributes(raw) {
            match k {
                NFTA_EXPR_NAME => e.name = v.split(|b| *b == 0).next().unwrap_or_default(),
                NFTA_EXPR_DATA => e.data = v,
                _ => {}
            }
        }
        e
    }

    fn attr(&self, kind: u16) -> Option<&'a [u8]> {
        attributes(self.data).find(|(k, _)| *k == kind).map(|(_, v)| v)
    }

    fn u32(&self, kind: u16) -> Option<u32> {
        let v = self.attr(kind)?;
        Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
    }

    fn u64(&self, kind: u16) -> Option<u64> {
        let v = self.attr(kind)?;
        Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
    }

    /// The NFTA_DATA_VALUE inside a data attribute (`cmp` data, `immediate` data, masks).
    fn value(&self, kind: u16) -> Option<&'a [u8]> {
        attributes(self.attr(kind)?).find(|(k, _)| *k == 1).map(|(_, v)| v)
    }

    fn str(&self, kind: u16) -> Option<&'a str> {
        std::str::from_utf8(self.attr(kind)?.split(|b| *b == 0).next()?).ok()
    }

    fn is(&self, name: &str) -> bool {
        self.name == name.as_bytes()
    }

    /// An immediate's verdict: (code, chain).
    fn verdict(&self) -> Option<(i32, Option<&'a str>)> {
        let data = self.attr(2)?;
        let (_, verdict) = attributes(data).find(|(k, _)| *k == 2)?;
        let mut code = None;
        let mut chain = None;
        for (k, v) in attributes(verdict) {
            match k {
                1 => code = Some(i32::from_be_bytes(v.get(..4)?.try_into().ok()?)),
                2 => chain = std::str::from_utf8(v.split(|b| *b == 0).next()?).ok(),
                _ => {}
            }
        }
        Some((code?, chain))
    }
}

fn family_of_len(len: usize) -> Option<Family> {
    match len {
        4 => Some(Family::V4),
        16 => Some(Family::V6),
        _ => None,
    }
}

fn prefix_len(mask: &[u8]) -> u8 {
    mask.iter().map(|b| b.leading_ones()).sum::<u32>().min(128) as u8
}

/// The statements the expressions at the start of `e` could be, most specific first. Each is
/// only a guess until [`decode_expressions`] re-encodes it and compares.
fn candidates(e: &[Expr<'_>], q: &dyn Fn(&str) -> String) -> Vec<Stmt> {
    let mut out = Vec::new();
    let Some(first) = e.first() else { return out };
    let at = |i: usize| e.get(i);
    let lookup_set = |i: usize| at(i).filter(|x| x.is("lookup")).and_then(|x| x.str(1)).map(q);
    if first.is("meta") {
        let key = first.u32(2).unwrap_or(u32::MAX);
        let cmp = at(1).filter(|x| x.is("cmp")).and_then(|x| x.value(3));
        if key == NFT_META_NFPROTO {
            match cmp.and_then(|v| v.first()).map(|b| u32::from(*b)) {
                Some(NFPROTO_IPV4) => out.push(Stmt::NfProto(Family::V4)),
                Some(NFPROTO_IPV6) => out.push(Stmt::NfProto(Family::V6)),
                _ => {}
            }
        }
        if key == NFT_META_L4PROTO {
            if let Some(p) = cmp.and_then(|v| v.first()).and_then(|b| Protocol::from_number(*b)) {
                out.push(Stmt::L4Proto(p));
            }
            if let Some(map) = lookup_set(2) {
                out.push(Stmt::NodePortVmap { map });
            }
        }
        if key == NFT_META_MARK {
            let bitwise = at(1).filter(|x| x.is("bitwise"));
            let word = |kind| {
                let v = bitwise?.value(kind)?;
                Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
            };
            if let (Some(mask), Some(xor)) = (word(4), word(5)) {
                out.push(Stmt::MarkBitClear(mask));
                out.push(Stmt::SetMarkBit(xor));
                out.push(Stmt::ClearMarkBit(!mask));
            }
        }
    }
    if first.is("payload") && first.u32(2) == Some(NFT_PAYLOAD_NETWORK_HEADER) {
        let family = first.u32(4).and_then(|l| family_of_len(l as usize));
        if let Some(family) = family {
            if let (Some(mask), Some(net)) = (
                at(1).filter(|x| x.is("bitwise")).and_then(|x| x.value(4)),
                at(2).filter(|x| x.is("cmp")).and_then(|x| x.value(3)).and_then(ip_from_bytes),
            ) && let Ok(n) = IpNet::new(net, prefix_len(mask))
            {
                out.push(Stmt::SaddrIn(n));
            }
            if let Some(ip) = at(1).filter(|x| x.is("cmp")).and_then(|x| x.value(3)).and_then(ip_from_bytes) {
                out.push(Stmt::SaddrIn(IpNet::from(ip)));
            }
            if let Some(set) = lookup_set(1) {
                out.push(Stmt::DaddrInSet { family, set: set.clone() });
                out.push(Stmt::DaddrVmap { family, map: set.clone() });
                out.push(Stmt::SaddrInSet { family, set });
            }
            if let Some(d) = at(1).filter(|x| x.is("dynset"))
                && let (Some(set), Some(ms)) = (d.str(1), d.u64(6))
            {
                let timeout_seconds = u32::try_from(ms / 1000).unwrap_or(u32::MAX);
                out.push(Stmt::UpdateSaddrSet { family, set: q(set), timeout_seconds });
            }
            if let Some(set) = lookup_set(3) {
                out.push(Stmt::HairpinInSet { family, set: set.clone() });
                out.push(Stmt::DispatchVmap { family, map: set });
            }
        }
    }
    if first.is("fib") {
        out.push(Stmt::FibSaddrLocal);
    }
    if first.is("numgen")
        && let Some(modulus) = first.u32(2)
    {
        out.push(Stmt::NumgenBelow { modulus, below: 1 });
        if let Some(v) = at(2).filter(|x| x.is("cmp")).and_then(|x| x.value(3))
            && let Ok(b) = <[u8; 4]>::try_from(v)
        {
            out.push(Stmt::NumgenBelow { modulus, below: u32::from_be_bytes(b) });
        }
    }
    if first.is("immediate") {
        if let Some((code, chain)) = first.verdict() {
            match (code, chain) {
                (NFT_JUMP, Some(c)) => out.push(Stmt::Jump(q(c))),
                (NFT_GOTO, Some(c)) => out.push(Stmt::Goto(q(c))),
                (NFT_RETURN, None) => out.push(Stmt::Return),
                (NF_DROP, None) => out.push(Stmt::Drop),
                _ => {}
            }
        }
        let port = at(1).filter(|x| x.is("immediate")).and_then(|x| x.value(2));
        if let (Some(addr), Some(port)) =
            (first.value(2).and_then(ip_from_bytes), port.and_then(|p| <[u8; 2]>::try_from(p).ok()))
        {
            out.push(Stmt::Dnat { addr, port: u16::from_be_bytes(port) });
        }
    }
    if first.is("masq") {
        out.push(Stmt::Masquerade);
    }
    if first.is("ct") {
        out.push(Stmt::CtStateInvalid);
        out.push(Stmt::CtNotDnat);
    }
    if first.is("counter") {
        out.push(Stmt::Counter);
    }
    if first.is("reject") {
        out.push(Stmt::RejectTcpReset);
        out.push(Stmt::RejectPortUnreachable);
    }
    out
}

/// Whether two expressions are the same, counter values aside.
fn same(a: &Expr<'_>, b: &Expr<'_>) -> bool {
    a.raw == b.raw || (a.is("counter") && b.is("counter"))
}

/// The statements of a rule's NFTA_RULE_EXPRESSIONS, with set and chain names qualified by `q`
/// (as the compiler names objects of a shard table); `None` when any part of it is not exactly
/// what we encode.
pub fn decode_expressions(bytes: &[u8], q: &dyn Fn(&str) -> String) -> Option<Vec<Stmt>> {
    let raws: Vec<&[u8]> = attributes(bytes).map(|(_, v)| v).collect();
    let exprs: Vec<Expr<'_>> = raws.iter().map(|r| Expr::parse(r)).collect();
    let mut stmts = Vec::new();
    let mut i = 0;
    let mut scratch = Vec::new();
    'next: while i < exprs.len() {
        for cand in candidates(&exprs[i..], q) {
            scratch.clear();
            expressions(&mut scratch, &Rule::new(&Arc::from(""), vec![cand.clone()]));
            let mine: Vec<Expr<'_>> = attributes(&scratch).map(|(_, v)| Expr::parse(v)).collect();
            let end = i + mine.len();
            if end <= exprs.len() && mine.iter().zip(&exprs[i..end]).all(|(a, b)| same(a, b)) {
                stmts.push(cand);
                i = end;
                continue 'next;
            }
        }
        return None;
    }
    Some(stmts)
}

/// The comment in a rule's user data (libnftnl's TLV layout), if any.
pub fn comment(userdata: &[u8]) -> Option<&str> {
    let mut rest = userdata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if kind == UDATA_RULE_COMMENT {
            return std::str::from_utf8(value.split(|b| *b == 0).next()?).ok();
        }
        rest = &rest[2 + len..];
    }
    None
}

/// The chains (local names) a rule's expressions jump or go to.
pub fn verdict_chains(bytes: &[u8]) -> impl Iterator<Item = &str> {
    attributes(bytes).map(|(_, v)| Expr::parse(v)).filter(|e| e.is("immediate")).filter_map(|e| e.verdict()?.1)
}

/// A counter's packet count in a rule's expressions (the first `counter` expression).
pub fn counter_packets(bytes: &[u8]) -> Option<u64> {
    attributes(bytes).map(|(_, v)| Expr::parse(v)).find(|e| e.is("counter")).and_then(|e| e.u64(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::qualify;

    fn every_kind() -> Vec<Vec<Stmt>> {
        let v4 = Family::V4;
        let v6 = Family::V6;
        vec![
            vec![Stmt::NfProto(v4), Stmt::L4Proto(Protocol::Tcp), Stmt::RejectTcpReset],
            vec![Stmt::NfProto(v6), Stmt::L4Proto(Protocol::Sctp), Stmt::RejectPortUnreachable],
            vec![Stmt::NfProto(v4), Stmt::SaddrIn("10.244.0.0/16".parse().unwrap()), Stmt::Return],
            vec![Stmt::SaddrIn("fd00:10:244::/48".parse().unwrap()), Stmt::Goto("ext6/a/b/tcp/80".into())],
            // Each endpoint chain's hairpin test: one address, no mask.
            vec![Stmt::NfProto(v4), Stmt::SaddrIn("10.244.1.2/32".parse().unwrap()), Stmt::SetMarkBit(0x4000)],
            vec![Stmt::NfProto(v6), Stmt::SaddrIn("fd00:10:244:1::2/128".parse().unwrap()), Stmt::SetMarkBit(0x4000)],
            vec![
                Stmt::NfProto(v4),
                Stmt::DaddrInSet { family: v4, set: "cluster-ips-v4".into() },
                Stmt::Jump("x".into()),
            ],
            vec![Stmt::NfProto(v6), Stmt::HairpinInSet { family: v6, set: "hairpin-v6".into() }, Stmt::Masquerade],
            vec![Stmt::HairpinInSet { family: v4, set: "hairpin-v4".into() }, Stmt::Masquerade],
            vec![Stmt::SaddrInSet { family: v4, set: "aff4/a/b/tcp/80/10.0.0.1/80".into() }, Stmt::Goto("ep".into())],
            vec![Stmt::SaddrInSet { family: v6, set: "aff6/x".into() }, Stmt::Goto("ep".into())],
            vec![Stmt::UpdateSaddrSet { family: v4, set: "aff4/x".into(), timeout_seconds: 10800 }],
            vec![Stmt::UpdateSaddrSet { family: v6, set: "aff6/x".into(), timeout_seconds: 7 }],
            vec![Stmt::NfProto(v4), Stmt::DispatchVmap { family: v4, map: "service-ips-v4".into() }],
            vec![Stmt::NfProto(v6), Stmt::DispatchVmap { family: v6, map: "service-ips-v6".into() }],
            vec![
                Stmt::NfProto(v4),
                Stmt::DaddrInSet { family: v4, set: "node-ips-v4".into() },
                Stmt::NodePortVmap { map: "node-ports-v4".into() },
            ],
            vec![Stmt::FibSaddrLocal, Stmt::SetMarkBit(0x4000), Stmt::Goto("svc4/a/b/tcp/80".into())],
            vec![Stmt::MarkBitClear(0x4000), Stmt::Return],
            vec![Stmt::ClearMarkBit(0x4000)],
            vec![Stmt::NumgenBelow { modulus: 3, below: 1 }, Stmt::Goto("ep4/a".into())],
            vec![Stmt::NumgenBelow { modulus: 1000, below: 999 }, Stmt::Goto("ep4/b".into())],
            vec![Stmt::Counter, Stmt::Dnat { addr: "10.244.1.2".parse().unwrap(), port: 8080 }],
            vec![Stmt::Dnat { addr: "fd00::2".parse().unwrap(), port: 53 }],
            vec![Stmt::CtStateInvalid, Stmt::Counter, Stmt::Drop],
            vec![Stmt::Masquerade],
            vec![Stmt::Drop],
            vec![],
        ]
    }

    fn encode(stmts: &[Stmt]) -> Vec<u8> {
        let mut out = Vec::new();
        expressions(&mut out, &Rule::new(&Arc::from("x"), stmts.to_vec()));
        out
    }

    #[test]
    fn every_statement_decodes_to_what_was_encoded() {
        let main = |n: &str| n.to_string();
        let mut kinds = std::collections::HashSet::new();
        for stmts in every_kind() {
            assert_eq!(decode_expressions(&encode(&stmts), &main).as_ref(), Some(&stmts), "{stmts:?}");
            for s in &stmts {
                kinds.insert(std::mem::discriminant(s));
            }
        }
        // Every Stmt kind is covered (a new kind must be added above).
        assert_eq!(kinds.len(), 24, "a Stmt kind is missing from the round trip");
    }

    #[test]
    fn names_in_shard_tables_come_back_qualified() {
        let q = |n: &str| qualify(3, n);
        let stmts =
            vec![Stmt::NumgenBelow { modulus: 2, below: 1 }, Stmt::Goto(qualify(3, "ep4/a/b/tcp/80/10.0.0.1/80"))];
        assert_eq!(decode_expressions(&encode(&stmts), &q), Some(stmts));
    }

    #[test]
    fn counted_rules_decode_whatever_the_counter_says() {
        let stmts = vec![Stmt::Counter, Stmt::Dnat { addr: "10.0.0.1".parse().unwrap(), port: 80 }];
        let mut bytes = encode(&stmts);
        let at = bytes.windows(8).position(|w| w == [0; 8]).unwrap();
        bytes[at + 7] = 42; // bytes
        assert_eq!(decode_expressions(&bytes, &|n| n.to_string()), Some(stmts));
        let mut counted = encode(&[Stmt::Counter, Stmt::Drop]);
        // NFTA_COUNTER_PACKETS: a 12-byte attribute of type 2 holding a big-endian u64.
        let packets = counted.windows(12).position(|w| w[..4] == [12, 0, 2, 0] && w[4..] == [0; 8]).unwrap() + 4;
        counted[packets + 6] = 1;
        counted[packets + 7] = 2;
        assert_eq!(counter_packets(&counted), Some(258));
    }

    #[test]
    fn anything_else_does_not_decode() {
        let main = |n: &str| n.to_string();
        // A rule cut short, a changed byte, a foreign expression.
        let full = encode(&[Stmt::NumgenBelow { modulus: 3, below: 1 }, Stmt::Goto("ep".into())]);
        let first_two: Vec<u8> = {
            let mut v = Vec::new();
            let mut a = super::super::expr::Attrs(&mut v);
            for (_, e) in attributes(&full).take(1) {
                a.bytes(1, e);
            }
            v
        };
        assert_eq!(decode_expressions(&first_two, &main), None, "numgen without its cmp");
        let mut changed = encode(&[Stmt::Masquerade]);
        let last = changed.len() - 1;
        changed[last] ^= 0x01;
        assert_eq!(decode_expressions(&changed, &main), None);
        let mut foreign = Vec::new();
        super::super::expr::Attrs(&mut foreign).nest(1, |e| {
            e.str(1, "log");
            e.nest(2, |_| {});
        });
        assert_eq!(decode_expressions(&foreign, &main), None);
        assert_eq!(decode_expressions(&[1, 2, 3], &main), Some(vec![]), "no whole attribute: nothing");
    }

    #[test]
    fn comments_read_back() {
        let ud = super::super::expr::comment_udata("default/web");
        assert_eq!(comment(&ud), Some("default/web"));
        assert_eq!(comment(&[]), None);
        assert_eq!(comment(&[0, 200]), None);
    }
}
