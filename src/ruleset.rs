//! The nftables objects nftproxy owns, as plain values: what the compiler produces, what the
//! kernel read-back is compared with, and what the netlink layer encodes.
//!
//! Every rule prints as nft-like text ([`Rule`]'s `Display`, for dry runs and golden tests) and
//! carries a label stored in the kernel as its comment: the Service it serves, or what a fixed
//! rule is for, so `nft list table inet nftproxy` says what the rule does not already print.
//! The diff never trusts the comment: it compares each rule's expressions as the kernel holds
//! them (see `nft::expr`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

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
/// Our own names never contain the separator; a name read back from the kernel that does (an
/// object someone else put in our table) is always qualified, so that it is never taken for an
/// object of another table.
pub fn qualify(shard: u32, name: &str) -> String {
    if shard == 0 && !name.contains(SHARD_SEP) {
        name.to_string()
    } else {
        format!("{}{SHARD_SEP}{name}", shard_table(shard))
    }
}

/// Most tables `--table-shards` spreads Services over.
pub const MAX_SHARDS: u32 = 64;

/// The shard a table name stands for, if it is one of ours: exactly the names [`shard_table`]
/// generates (`nftproxy`, `nftproxy-1` .. `nftproxy-63`). Lookalikes another program may have
/// created (`nftproxy-0`, `nftproxy-01`, `nftproxy-64`) are not ours: never read, changed or
/// deleted.
pub fn shard_of_table(table: &str) -> Option<u32> {
    if table == TABLE {
        return Some(0);
    }
    let n: u32 = table.strip_prefix(TABLE)?.strip_prefix('-')?.parse().ok()?;
    (n > 0 && n < MAX_SHARDS && shard_table(n) == table).then_some(n)
}

/// Whether `table` is one of ours (see [`shard_of_table`]).
pub fn is_our_table(table: &str) -> bool {
    shard_of_table(table).is_some()
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
    const NUMBERS: [(Hook, u32); 4] = [
        (Hook::Prerouting, crate::nft::consts::NF_INET_PRE_ROUTING),
        (Hook::Output, crate::nft::consts::NF_INET_LOCAL_OUT),
        (Hook::Postrouting, crate::nft::consts::NF_INET_POST_ROUTING),
        (Hook::Forward, crate::nft::consts::NF_INET_FORWARD),
    ];

    /// The netfilter hook number (NF_INET_*).
    pub fn number(self) -> u32 {
        Self::NUMBERS.iter().find(|(h, _)| *h == self).map_or(0, |(_, n)| *n)
    }

    /// The hook of a netfilter hook number, if it is one we use.
    pub fn from_number(n: u32) -> Option<Hook> {
        Self::NUMBERS.iter().find(|(_, m)| *m == n).map(|(h, _)| *h)
    }

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
    /// source is the endpoint it was DNATed to (hairpin), keyed with the ClusterIP. Written by
    /// agents before RULE_FORMAT 7 (hairpin is now a rule in each endpoint chain); read so that
    /// their rules can be recognised and replaced.
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
    /// `ip daddr vmap @map`: the gate, first in each table's base chains: a Service address
    /// goes to the chain of its kind, any other packet leaves the table after this one lookup.
    DaddrVmap {
        family: Family,
        map: String,
    },
    /// `ip daddr . meta l4proto . th dport vmap @map`: the Service dispatch.
    DispatchVmap {
        family: Family,
        map: String,
    },
    /// `meta l4proto . th dport vmap @map`: the node-port dispatch (after a node-address match).
    NodePortVmap {
        map: String,
    },
    /// `fib saddr type local`: sent by this node itself.
    FibSaddrLocal,
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
    /// `ct status & dnat == 0`: a connection no DNAT rule translated (not Service traffic).
    CtNotDnat,
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
            Stmt::SaddrIn(n) if n.prefix_len() == n.max_prefix_len() => {
                write!(f, "{} saddr {}", ip_kw(Family::of(&n.addr())), n.addr())
            }
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
            Stmt::DaddrVmap { family, map } => write!(f, "{} daddr vmap @{}", ip_kw(*family), local_name(map)),
            Stmt::DispatchVmap { family, map } => {
                write!(f, "{} daddr . meta l4proto . th dport vmap @{}", ip_kw(*family), local_name(map))
            }
            Stmt::NodePortVmap { map } => write!(f, "meta l4proto . th dport vmap @{}", local_name(map)),
            Stmt::FibSaddrLocal => f.write_str("fib saddr type local"),
            Stmt::MarkBitClear(bit) => write!(f, "meta mark & {bit:#x} == 0"),
            Stmt::SetMarkBit(bit) => write!(f, "meta mark set meta mark | {bit:#x}"),
            Stmt::ClearMarkBit(bit) => write!(f, "meta mark set meta mark & ~{bit:#x}"),
            // As the kernel holds it (and nft prints it): one in `modulus` is an equality.
            Stmt::NumgenBelow { modulus, below: 1 } => write!(f, "numgen random mod {modulus} == 0"),
            Stmt::NumgenBelow { modulus, below } => write!(f, "numgen random mod {modulus} < {below}"),
            Stmt::Jump(c) => write!(f, "jump {}", local_name(c)),
            Stmt::Goto(c) => write!(f, "goto {}", local_name(c)),
            Stmt::Return => f.write_str("return"),
            Stmt::Dnat { addr: a @ IpAddr::V4(_), port } => write!(f, "dnat ip to {a}:{port}"),
            Stmt::Dnat { addr, port } => write!(f, "dnat ip6 to [{addr}]:{port}"),
            Stmt::Masquerade => f.write_str("masquerade fully-random"),
            Stmt::RejectTcpReset => f.write_str("reject with tcp reset"),
            Stmt::RejectPortUnreachable => f.write_str("reject with icmpx port-unreachable"),
            Stmt::CtStateInvalid => f.write_str("ct state invalid"),
            Stmt::CtNotDnat => f.write_str("ct status & dnat == 0"),
            Stmt::Counter => f.write_str("counter"),
            Stmt::Drop => f.write_str("drop"),
        }
    }
}

/// A rule: its statements, and a label for operators (stored as the rule's comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub stmts: Vec<Stmt>,
    /// Shared by every rule of a Service, so 60,000 rules do not hold 60,000 copies.
    pub label: Arc<str>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.stmts.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl Rule {
    pub fn new(label: &Arc<str>, stmts: Vec<Stmt>) -> Self {
        Rule { stmts, label: label.clone() }
    }

    /// The comment stored with the rule in the kernel: its label, cut to what nft accepts.
    pub fn comment(&self) -> &str {
        let mut cut = self.label.len().min(MAX_COMMENT);
        while !self.label.is_char_boundary(cut) {
            cut -= 1;
        }
        &self.label[..cut]
    }

    /// Feeds a stable encoding of the rule (statements and label) to `h`: the digests that
    /// restarts compare must not change between builds, so no `Debug` text and no std hasher.
    pub fn hash_into(&self, h: &mut Fnv) {
        h.write(self.label.as_bytes());
        for s in &self.stmts {
            s.hash_into(h);
        }
    }
}

impl Stmt {
    fn hash_into(&self, h: &mut Fnv) {
        let fam = |f: &Family| [*f as u8];
        match self {
            Stmt::NfProto(f) => h.write_tagged(1, &fam(f)),
            Stmt::L4Proto(p) => h.write_tagged(2, &[p.number()]),
            Stmt::SaddrIn(n) => {
                let mut b = ip_bytes(&n.addr());
                b.push(n.prefix_len());
                h.write_tagged(3, &b)
            }
            Stmt::DaddrInSet { family, set } => h.write_tagged2(4, &fam(family), set.as_bytes()),
            Stmt::HairpinInSet { family, set } => h.write_tagged2(5, &fam(family), set.as_bytes()),
            Stmt::SaddrInSet { family, set } => h.write_tagged2(6, &fam(family), set.as_bytes()),
            Stmt::UpdateSaddrSet { family, set, timeout_seconds } => {
                h.write_tagged2(7, &fam(family), set.as_bytes());
                h.write(&timeout_seconds.to_be_bytes());
            }
            Stmt::DispatchVmap { family, map } => h.write_tagged2(8, &fam(family), map.as_bytes()),
            Stmt::MarkBitClear(b) => h.write_tagged(9, &b.to_be_bytes()),
            Stmt::SetMarkBit(b) => h.write_tagged(10, &b.to_be_bytes()),
            Stmt::ClearMarkBit(b) => h.write_tagged(11, &b.to_be_bytes()),
            Stmt::NumgenBelow { modulus, below } => h.write_tagged2(12, &modulus.to_be_bytes(), &below.to_be_bytes()),
            Stmt::Jump(c) => h.write_tagged(13, c.as_bytes()),
            Stmt::Goto(c) => h.write_tagged(14, c.as_bytes()),
            Stmt::Return => h.write_tagged(15, &[]),
            Stmt::Dnat { addr, port } => h.write_tagged2(16, &ip_bytes(addr), &port.to_be_bytes()),
            Stmt::Masquerade => h.write_tagged(17, &[]),
            Stmt::RejectTcpReset => h.write_tagged(18, &[]),
            Stmt::RejectPortUnreachable => h.write_tagged(19, &[]),
            Stmt::CtStateInvalid => h.write_tagged(20, &[]),
            Stmt::Counter => h.write_tagged(21, &[]),
            Stmt::Drop => h.write_tagged(22, &[]),
            Stmt::NodePortVmap { map } => h.write_tagged(23, map.as_bytes()),
            Stmt::FibSaddrLocal => h.write_tagged(24, &[]),
            Stmt::DaddrVmap { family, map } => h.write_tagged2(25, &fam(family), map.as_bytes()),
            Stmt::CtNotDnat => h.write_tagged(26, &[]),
        }
    }
}

/// FNV-1a, 64 bit: a stable hash (std's is randomised per process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_parts(&[bytes])
}

/// [`fnv1a`] of the parts one after the other, without joining them.
pub fn fnv1a_parts(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in parts.iter().flat_map(|p| p.iter()) {
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

    fn write_tagged(&mut self, tag: u8, bytes: &[u8]) {
        self.write(&[tag]);
        self.write(bytes);
    }

    fn write_tagged2(&mut self, tag: u8, a: &[u8], b: &[u8]) {
        self.write_tagged(tag, a);
        self.write(b);
    }
}

/// How our rules are encoded for the kernel. Bump it whenever `nft::expr` or the labels change
/// what a rule looks like in the kernel, or the state record's layout: it is part of every digest
/// and of the state record, so an agent of a new release rewrites the rules an older one left,
/// once, and says so. 3: the state set also records a digest per table. 4: endpoint chains may
/// count (`counter` before the DNAT, issue 14). 5: ClusterIP work in `cluster-ip-v4/6` chains
/// (issue 18). 6: one gate lookup per table and family (`ip daddr vmap @addresses-v4`) instead
/// of the `services` chain's three (issue 18). 7: hairpin marked in each endpoint chain
/// (`ip saddr <endpoint>`) instead of a postrouting set lookup, and ClusterIP traffic from the
/// pod network dispatched without the `masq-check` chain (issue 18).
pub const RULE_FORMAT: u32 = 7;

/// A digest of chains, sets and set elements (in their canonical order).
pub fn digest<'a>(
    chains: impl IntoIterator<Item = (&'a String, &'a Chain)>,
    sets: impl IntoIterator<Item = (&'a String, &'a Set)>,
    elements: impl IntoIterator<Item = (&'a String, &'a Element)>,
) -> u64 {
    let mut h = Fnv::default();
    h.write(&RULE_FORMAT.to_be_bytes());
    for (name, chain) in chains {
        h.write(name.as_bytes());
        match chain.base {
            Some(b) => h.write_tagged2(1, &[b.hook as u8], &b.priority.to_be_bytes()),
            None => h.write_tagged(0, &[]),
        }
        for r in chain.rules.iter() {
            r.hash_into(&mut h);
        }
    }
    for (name, set) in sets {
        h.write(name.as_bytes());
        let shape = set.kind.shape();
        h.write_tagged2(2, &shape.key_type.to_be_bytes(), &shape.flags.to_be_bytes());
        h.write(&shape.key_len.to_be_bytes());
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
    /// `ipv4_addr : verdict` (or ipv6_addr): the gate, every address a table serves mapped to
    /// the chain for its kind (ClusterIP, node address, external address).
    Gate(Family),
    /// `inet_proto . inet_service : verdict`: node ports (per family: they goto family chains).
    NodePorts(Family),
    /// `ipv4_addr` with `flags dynamic,timeout`: clients with affinity to one endpoint. The
    /// kernel adds and expires its elements; we never diff them.
    Affinity(Family),
    /// `ipv4_addr . ipv4_addr . ipv4_addr`: (endpoint, endpoint, ClusterIP) for hairpin SNAT,
    /// left by agents before RULE_FORMAT 7 (see `Stmt::HairpinInSet`).
    Hairpin(Family),
    /// One element: the generation our last commit produced and a digest of what it left,
    /// so a restart can verify an untouched kernel without reading every rule back.
    State,
}

impl SetKind {
    pub fn family(self) -> Family {
        match self {
            SetKind::Dispatch(f)
            | SetKind::Addresses(f)
            | SetKind::Gate(f)
            | SetKind::NodePorts(f)
            | SetKind::Affinity(f)
            | SetKind::Hairpin(f) => f,
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
            SetKind::NodePorts(_) => 4 + 4,
            SetKind::Addresses(_) | SetKind::Gate(_) | SetKind::Affinity(_) => addr,
            SetKind::Hairpin(_) => 3 * addr,
            SetKind::State => 16,
        }
    }
}

/// A set's type as the kernel holds it: what the diff compares and what `nft` encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetShape {
    /// nft's data type ids, concatenations packed `TYPE_BITS` apart.
    pub key_type: u32,
    pub key_len: u32,
    /// NFT_SET_* flags.
    pub flags: u32,
    /// For maps: NFT_DATA_VERDICT; 0 otherwise.
    pub data_type: u32,
}

impl SetKind {
    /// The kind of a set with this shape, if it is one we make.
    pub fn of_shape(shape: SetShape) -> Option<SetKind> {
        let mut kinds = vec![SetKind::State];
        for f in [Family::V4, Family::V6] {
            kinds.extend([
                SetKind::Dispatch(f),
                SetKind::Addresses(f),
                SetKind::Gate(f),
                SetKind::NodePorts(f),
                SetKind::Affinity(f),
                SetKind::Hairpin(f),
            ]);
        }
        kinds.into_iter().find(|k| k.shape() == shape)
    }

    pub fn shape(self) -> SetShape {
        use crate::nft::consts::*;
        let addr_type = match self.family() {
            Family::V4 => TYPE_IPADDR,
            Family::V6 => TYPE_IP6ADDR,
        };
        let key_type = match self {
            SetKind::Dispatch(_) => {
                (addr_type << (2 * TYPE_BITS)) | (TYPE_INET_PROTOCOL << TYPE_BITS) | TYPE_INET_SERVICE
            }
            SetKind::NodePorts(_) => (TYPE_INET_PROTOCOL << TYPE_BITS) | TYPE_INET_SERVICE,
            SetKind::Addresses(_) | SetKind::Gate(_) | SetKind::Affinity(_) => addr_type,
            SetKind::Hairpin(_) => (addr_type << (2 * TYPE_BITS)) | (addr_type << TYPE_BITS) | addr_type,
            SetKind::State => TYPE_INTEGER,
        };
        let (flags, data_type) = match self {
            SetKind::Dispatch(_) | SetKind::NodePorts(_) | SetKind::Gate(_) => (NFT_SET_MAP, NFT_DATA_VERDICT),
            SetKind::Affinity(_) => (NFT_SET_TIMEOUT | NFT_SET_EVAL, 0),
            _ => (0, 0),
        };
        SetShape { key_type, key_len: self.key_len(), flags, data_type }
    }
}

/// A set element: its key bytes as the kernel stores them, and for maps the chain it jumps to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub key: Vec<u8>,
    /// Our maps only ever `goto` a chain. Read back, any other verdict is written as nft
    /// would print it (`jump svc4/...`, `accept`), so it differs from every element we want.
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

    /// `tcp . 30080 : goto chain`
    pub fn node_port(proto: Protocol, port: u16, chain: String) -> Self {
        let mut key = vec![proto.number(), 0, 0, 0];
        key.extend_from_slice(&port.to_be_bytes());
        key.extend_from_slice(&[0, 0]);
        Element { key, goto: Some(chain) }
    }

    pub fn address(ip: IpAddr) -> Self {
        Element { key: ip_bytes(&ip), goto: None }
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
        let to = || match self.goto.as_deref() {
            Some(chain) if !is_verdict_text(chain) => format!("goto {chain}"),
            Some(verdict) => verdict.to_string(),
            None => "?".to_string(),
        };
        let proto_port = |at: usize| {
            let proto = Protocol::from_number(self.key[at]).map_or_else(|| self.key[at].to_string(), |p| p.to_string());
            let port = u16::from_be_bytes([self.key[at + 4], self.key[at + 5]]);
            format!("{proto} . {port} : {}", to())
        };
        match kind {
            SetKind::Dispatch(_) if self.key.len() >= 12 => {
                format!("{} . {}", addr(&self.key[..alen]), proto_port(alen))
            }
            SetKind::NodePorts(_) if self.key.len() == 8 => proto_port(0),
            SetKind::Gate(_) => format!("{} : {}", addr(&self.key), to()),
            SetKind::Hairpin(_) => {
                let n = self.key.len() / 3;
                format!("{} . {} . {}", addr(&self.key[..n]), addr(&self.key[n..2 * n]), addr(&self.key[2 * n..]))
            }
            _ => addr(&self.key),
        }
    }
}

/// Whether an element's `goto` holds another verdict as read back (`jump x`, `drop`, `accept`).
pub fn is_verdict_text(goto: &str) -> bool {
    goto.contains(' ') || matches!(goto, "drop" | "accept" | "return" | "continue") || goto.starts_with("verdict")
}

/// The address `ip_bytes` wrote: 4 or 16 bytes.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
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
    /// The flags every one of our tables carries: 0, or owner + persist (`--own-tables`).
    pub table_flags: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_labels_cut_to_what_nft_accepts() {
        let label: Arc<str> = format!("{}é", "x".repeat(126)).into();
        let r = Rule::new(&label, vec![Stmt::Drop]);
        assert_eq!(r.comment(), "x".repeat(126), "cut at a character boundary");
        let short = Rule::new(&"default/web".into(), vec![Stmt::L4Proto(Protocol::Tcp), Stmt::RejectTcpReset]);
        assert_eq!(short.comment(), "default/web");
        assert_eq!(short.to_string(), "meta l4proto tcp reject with tcp reset");
    }

    #[test]
    fn only_generated_shard_names_are_our_tables() {
        for ours in ["nftproxy", "nftproxy-1", "nftproxy-9", "nftproxy-10", "nftproxy-63"] {
            assert!(is_our_table(ours), "{ours}");
        }
        for theirs in
            ["nftproxy-0", "nftproxy-01", "nftproxy-007", "nftproxy-64", "nftproxy-", "nftproxy-+1", "nftproxyx", "nft"]
        {
            assert!(!is_our_table(theirs), "{theirs}");
        }
        for k in 0..MAX_SHARDS {
            assert_eq!(shard_of_table(&shard_table(k)), Some(k));
        }
    }

    #[test]
    fn hook_numbers_round_trip() {
        for hook in [Hook::Prerouting, Hook::Output, Hook::Postrouting, Hook::Forward] {
            assert_eq!(Hook::from_number(hook.number()), Some(hook));
        }
        assert_eq!(Hook::from_number(1), None, "input: a hook we never use");
    }

    #[test]
    fn the_pick_of_one_in_n_prints_as_the_kernel_holds_it() {
        assert_eq!(Stmt::NumgenBelow { modulus: 3, below: 1 }.to_string(), "numgen random mod 3 == 0");
        assert_eq!(Stmt::NumgenBelow { modulus: 7, below: 3 }.to_string(), "numgen random mod 7 < 3");
    }

    #[test]
    fn digests_are_stable_values_not_debug_text() {
        // A fixed rule set has a fixed digest: a change here means every node rewrites its
        // rules after the upgrade, so it must come with a RULE_FORMAT bump.
        let label: Arc<str> = "default/web".into();
        let chain = Chain {
            base: Some(BaseChain { hook: Hook::Prerouting, priority: DSTNAT }),
            rules: vec![Rule::new(&label, vec![Stmt::Jump("services".into())])].into(),
        };
        let name = "nat-prerouting".to_string();
        let d = digest([(&name, &chain)], std::iter::empty(), std::iter::empty());
        assert_eq!(d, digest([(&name, &chain.clone())], std::iter::empty(), std::iter::empty()));
        let mut other = chain.clone();
        other.base = Some(BaseChain { hook: Hook::Output, priority: DSTNAT });
        assert_ne!(d, digest([(&name, &other)], std::iter::empty(), std::iter::empty()));
        assert_eq!(d, 0x7238_675f_036f_ad3c, "digest of a fixed chain changed: bump RULE_FORMAT");
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
