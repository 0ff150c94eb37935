//! The nftables objects nftproxy owns, as plain values: what the compiler produces, what the
//! kernel read-back is compared with, and what the netlink layer encodes.
//!
//! Every rule prints as nft-like text ([`Rule`]'s `Display`). That text is also stored in the
//! kernel as the rule's comment, so `nft list table inet nftproxy` explains itself and the diff
//! can compare a kernel rule with a wanted rule without decoding expressions.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Family, Protocol};

/// The one table we own. `inet` so that one set of hooks serves IPv4 and IPv6, and so that
/// `reject with icmpx` means port-unreachable in both families.
pub const TABLE: &str = "nftproxy";

/// With `--table-shards K > 1`, Services are spread over K tables: `nftproxy` (shard 0, which
/// also holds everything that is not per Service) and `nftproxy-1` .. `nftproxy-(K-1)`. Objects of
/// shard tables are named `nftproxy-3@svc4/...` in our model; unqualified names live in `nftproxy`.
pub const SHARD_SEP: char = '@';

/// (table, name inside the table) of a possibly qualified object name.
pub fn split_name(name: &str) -> (&str, &str) {
    name.split_once(SHARD_SEP).unwrap_or((TABLE, name))
}

/// The name inside its table.
pub fn local_name(name: &str) -> &str {
    split_name(name).1
}

pub fn shard_table(shard: u32) -> String {
    if shard == 0 { TABLE.to_string() } else { format!("{TABLE}-{shard}") }
}

/// `name` as an object of shard `shard`.
pub fn qualify(shard: u32, name: &str) -> String {
    if shard == 0 { name.to_string() } else { format!("{}{SHARD_SEP}{name}", shard_table(shard)) }
}

/// Whether `table` is one of ours (`nftproxy` or `nftproxy-<n>`).
pub fn is_our_table(table: &str) -> bool {
    table == TABLE
        || table
            .strip_prefix(TABLE)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Mark bit asking postrouting to masquerade (kube-proxy's value).
pub const MASQ_MARK: u32 = 0x4000;

/// Longest comment we store; libnftnl and nft cap user comments at 128 bytes with the NUL.
pub const MAX_COMMENT: usize = 127;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Prerouting,
    Output,
    Postrouting,
    /// The only filter hook we use (dropping INVALID packets); all others are `type nat`.
    Forward,
}

impl Hook {
    /// The nft chain type on this hook.
    pub fn chain_type(self) -> &'static str {
        match self {
            Hook::Forward => "filter",
            _ => "nat",
        }
    }
}

/// A chain attached to a netfilter hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    pub hook: Hook,
    pub priority: i32,
}

/// Priorities from nft's names: dstnat = -100, srcnat = 100.
pub const DSTNAT: i32 = -100;
pub const SRCNAT: i32 = 100;
/// nft's `filter` priority.
pub const FILTER: i32 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `meta nfproto ipv4|ipv6`: required before loading addresses in an inet table.
    NfProto(Family),
    /// `meta l4proto tcp|udp|sctp`
    L4Proto(Protocol),
    /// `ip saddr 10.244.0.0/16`
    SaddrIn(IpNet),
    /// `ip daddr @set`
    DaddrInSet {
        family: Family,
        set: String,
    },
    /// `ip saddr . ip daddr . ct original ip daddr @set`: in postrouting, a connection whose
    /// source is the endpoint it was DNATed to (hairpin), keyed with the ClusterIP.
    HairpinInSet {
        family: Family,
        set: String,
    },
    /// `ip saddr @set`: a client with session affinity to this endpoint.
    SaddrInSet {
        family: Family,
        set: String,
    },
    /// `update @set { ip saddr timeout Ns }`: remember (or refresh) the client's affinity.
    UpdateSaddrSet {
        family: Family,
        set: String,
        timeout_seconds: u32,
    },
    /// `ip daddr . meta l4proto . th dport vmap @map`: the Service dispatch.
    DispatchVmap {
        family: Family,
        map: String,
    },
    /// `meta mark & bit == 0`
    MarkBitClear(u32),
    /// `meta mark set meta mark | bit`
    SetMarkBit(u32),
    /// `meta mark set meta mark & ~bit`
    ClearMarkBit(u32),
    /// `numgen random mod modulus < below`: true with probability below/modulus.
    NumgenBelow {
        modulus: u32,
        below: u32,
    },
    Jump(String),
    Goto(String),
    Return,
    /// `dnat ip to addr:port`
    Dnat {
        addr: IpAddr,
        port: u16,
    },
    /// `masquerade fully-random`
    Masquerade,
    /// `reject with tcp reset` (the rule must match TCP first)
    RejectTcpReset,
    /// `reject with icmpx port-unreachable`
    RejectPortUnreachable,
    /// `ct state invalid`
    CtStateInvalid,
    Counter,
    Drop,
}

fn ip_kw(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

impl fmt::Display for Stmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stmt::NfProto(Family::V4) => f.write_str("meta nfproto ipv4"),
            Stmt::NfProto(Family::V6) => f.write_str("meta nfproto ipv6"),
            Stmt::L4Proto(p) => write!(f, "meta l4proto {p}"),
            Stmt::SaddrIn(n) => write!(f, "{} saddr {n}", ip_kw(Family::of(&n.addr()))),
            Stmt::DaddrInSet { family, set } => write!(f, "{} daddr @{}", ip_kw(*family), local_name(set)),
            Stmt::SaddrInSet { family, set } => write!(f, "{} saddr @{}", ip_kw(*family), local_name(set)),
            Stmt::HairpinInSet { family, set } => {
                let k = ip_kw(*family);
                write!(f, "{k} saddr . {k} daddr . ct original {k} daddr @{set}")
            }
            Stmt::UpdateSaddrSet { family, set, timeout_seconds } => {
                write!(f, "update @{} {{ {} saddr timeout {timeout_seconds}s }}", local_name(set), ip_kw(*family))
            }
            Stmt::DispatchVmap { family, map } => {
                write!(f, "{} daddr . meta l4proto . th dport vmap @{}", ip_kw(*family), local_name(map))
            }
            Stmt::MarkBitClear(bit) => write!(f, "meta mark & {bit:#x} == 0"),
            Stmt::SetMarkBit(bit) => write!(f, "meta mark set meta mark | {bit:#x}"),
            Stmt::ClearMarkBit(bit) => write!(f, "meta mark set meta mark & ~{bit:#x}"),
            Stmt::NumgenBelow { modulus, below } => {
                write!(f, "numgen random mod {modulus} < {below}")
            }
            Stmt::Jump(c) => write!(f, "jump {}", local_name(c)),
            Stmt::Goto(c) => write!(f, "goto {}", local_name(c)),
            Stmt::Return => f.write_str("return"),
            Stmt::Dnat { addr: a @ IpAddr::V4(_), port } => write!(f, "dnat ip to {a}:{port}"),
            Stmt::Dnat { addr, port } => write!(f, "dnat ip6 to [{addr}]:{port}"),
            Stmt::Masquerade => f.write_str("masquerade fully-random"),
            Stmt::RejectTcpReset => f.write_str("reject with tcp reset"),
            Stmt::RejectPortUnreachable => f.write_str("reject with icmpx port-unreachable"),
            Stmt::CtStateInvalid => f.write_str("ct state invalid"),
            Stmt::Counter => f.write_str("counter"),
            Stmt::Drop => f.write_str("drop"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<Stmt>);

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl Rule {
    /// The comment stored with the rule in the kernel: its own text, shortened with a hash of
    /// the full text when it is too long, so that two different rules never share a comment.
    pub fn comment(&self) -> String {
        let text = self.to_string();
        if text.len() <= MAX_COMMENT {
            return text;
        }
        let hash = fnv1a(text.as_bytes());
        let mut cut = MAX_COMMENT - 21;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}... #{hash:016x}", &text[..cut])
    }
}

/// FNV-1a, 64 bit: a stable hash (std's is randomised per process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Streaming FNV-1a over length-delimited fields.
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf29ce484222325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

/// A digest of chains, sets and set elements (in their canonical order).
pub fn digest<'a>(
    chains: impl IntoIterator<Item = (&'a String, &'a Chain)>,
    sets: impl IntoIterator<Item = (&'a String, &'a Set)>,
    elements: impl IntoIterator<Item = (&'a String, &'a Element)>,
) -> u64 {
    let mut h = Fnv::default();
    for (name, chain) in chains {
        h.write(name.as_bytes());
        h.write(format!("{:?}", chain.base).as_bytes());
        for r in chain.rules.iter() {
            h.write(r.comment().as_bytes());
        }
    }
    for (name, set) in sets {
        h.write(name.as_bytes());
        h.write(format!("{:?}", set.kind).as_bytes());
    }
    for (set, e) in elements {
        h.write(set.as_bytes());
        h.write(&e.key);
        h.write(e.goto.as_deref().unwrap_or("").as_bytes());
    }
    h.0
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub base: Option<BaseChain>,
    /// Shared: the cache, the wanted ruleset and the plan all hold the same rules.
    pub rules: std::sync::Arc<[Rule]>,
}

/// What a set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetKind {
    /// `ipv4_addr . inet_proto . inet_service : verdict` (or ipv6_addr)
    Dispatch(Family),
    /// `ipv4_addr` (or ipv6_addr)
    Addresses(Family),
    /// `ipv4_addr` with `flags dynamic,timeout`: clients with affinity to one endpoint. The
    /// kernel adds and expires its elements; we never diff them.
    Affinity(Family),
    /// `ipv4_addr . ipv4_addr . ipv4_addr`: (endpoint, endpoint, ClusterIP) for hairpin SNAT.
    Hairpin(Family),
    /// One element: the generation our last commit produced and a digest of what it left,
    /// so a restart can verify an untouched kernel without reading every rule back.
    State,
}

impl SetKind {
    pub fn family(self) -> Family {
        match self {
            SetKind::Dispatch(f) | SetKind::Addresses(f) | SetKind::Affinity(f) | SetKind::Hairpin(f) => f,
            SetKind::State => Family::V4,
        }
    }

    /// Whether the set's elements are ours to diff (not for sets the data path fills).
    pub fn managed_elements(self) -> bool {
        !matches!(self, SetKind::Affinity(_) | SetKind::State)
    }

    /// Key length in bytes as the kernel stores it (concatenations pad each part to 4 bytes).
    pub fn key_len(self) -> u32 {
        let addr = match self.family() {
            Family::V4 => 4,
            Family::V6 => 16,
        };
        match self {
            SetKind::Dispatch(_) => addr + 4 + 4,
            SetKind::Addresses(_) | SetKind::Affinity(_) => addr,
            SetKind::Hairpin(_) => 3 * addr,
            SetKind::State => 16,
        }
    }
}

/// A set element: its key bytes as the kernel stores them, and for maps the chain it jumps to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub key: Vec<u8>,
    pub goto: Option<String>,
}

impl Element {
    pub fn dispatch(vip: IpAddr, proto: Protocol, port: u16, chain: String) -> Self {
        let mut key = ip_bytes(&vip);
        key.extend_from_slice(&[proto.number(), 0, 0, 0]);
        key.extend_from_slice(&port.to_be_bytes());
        key.extend_from_slice(&[0, 0]);
        Element { key, goto: Some(chain) }
    }

    pub fn address(ip: IpAddr) -> Self {
        Element { key: ip_bytes(&ip), goto: None }
    }

    /// (endpoint, endpoint, ClusterIP): one per Service address and endpoint, so each Service
    /// owns its elements even when two Services share a pod.
    pub fn hairpin(endpoint: IpAddr, vip: IpAddr) -> Self {
        let mut key = ip_bytes(&endpoint);
        key.extend(ip_bytes(&endpoint));
        key.extend(ip_bytes(&vip));
        Element { key, goto: None }
    }

    /// nft-like text of the element, for dry runs and error messages.
    pub fn describe(&self, kind: SetKind) -> String {
        let addr = |b: &[u8]| -> String {
            match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(b).unwrap()).to_string(),
                16 => IpAddr::from(<[u8; 16]>::try_from(b).unwrap()).to_string(),
                _ => format!("{b:02x?}"),
            }
        };
        let alen = self.key.len().saturating_sub(8);
        match kind {
            SetKind::Dispatch(_) if self.key.len() >= 12 => {
                let proto = match self.key[alen] {
                    6 => "tcp".to_string(),
                    17 => "udp".to_string(),
                    132 => "sctp".to_string(),
                    n => n.to_string(),
                };
                let port = u16::from_be_bytes([self.key[alen + 4], self.key[alen + 5]]);
                let to = self.goto.as_deref().unwrap_or("?");
                format!("{} . {proto} . {port} : goto {to}", addr(&self.key[..alen]))
            }
            SetKind::Hairpin(_) => {
                let n = self.key.len() / 3;
                format!("{} . {} . {}", addr(&self.key[..n]), addr(&self.key[n..2 * n]), addr(&self.key[2 * n..]))
            }
            _ => addr(&self.key),
        }
    }
}

pub fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    pub elements: Vec<Element>,
}

/// All our objects. Chains and sets are keyed by name; `BTreeMap` keeps every output ordered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Chain>,
    pub sets: BTreeMap<String, Set>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_comments_are_cut_with_a_distinguishing_hash() {
        let long = |tail: &str| Rule(vec![Stmt::Goto(format!("{}{tail}", "x".repeat(200)))]);
        let (a, b) = (long("a").comment(), long("b").comment());
        assert!(a.len() <= MAX_COMMENT && b.len() <= MAX_COMMENT);
        assert_ne!(a, b);
        let short = Rule(vec![Stmt::L4Proto(Protocol::Tcp), Stmt::RejectTcpReset]);
        assert_eq!(short.comment(), "meta l4proto tcp reject with tcp reset");
    }

    #[test]
    fn dispatch_keys_are_padded_like_concatenated_registers() {
        let e = Element::dispatch("10.96.0.10".parse().unwrap(), Protocol::Udp, 53, "svc".into());
        assert_eq!(e.key, vec![10, 96, 0, 10, 17, 0, 0, 0, 0, 53, 0, 0]);
        assert_eq!(e.key.len() as u32, SetKind::Dispatch(Family::V4).key_len());
        assert_eq!(e.describe(SetKind::Dispatch(Family::V4)), "10.96.0.10 . udp . 53 : goto svc");
        let e6 = Element::dispatch("fd00::a".parse().unwrap(), Protocol::Tcp, 443, "s".into());
        assert_eq!(e6.key.len() as u32, SetKind::Dispatch(Family::V6).key_len());
        assert_eq!(e6.describe(SetKind::Dispatch(Family::V6)), "fd00::a . tcp . 443 : goto s");
    }
}
