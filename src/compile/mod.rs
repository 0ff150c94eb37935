//! Desired state -> nftables objects. A pure function: same snapshot and options, same ruleset.
//!
//! Layout (the classic kube-proxy iptables-mode shape; one `inet nftproxy` table, or the
//! Services spread over shard tables `nftproxy-1`.. that each have the same skeleton):
//!
//! ```text
//! nat-prerouting / nat-output (type nat, priority dstnat):
//!            ip daddr vmap @addresses-v4          (and ip6: the gate, see gate.rs)
//! cluster-ip-v4:  (with --cluster-cidr: ip saddr <pod network> ip daddr . meta l4proto . th dport vmap @service-ips-v4,
//!            then the masquerade mark for the rest; with --masquerade-all: the mark for all)
//!            ip daddr . meta l4proto . th dport vmap @service-ips-v4
//!            reject                               (a port the Service does not have)
//! node-ip-v4:     the same dispatch (an external IP may be a node address), then
//!            meta l4proto . th dport vmap @node-ports-v4
//! external-ip-v4: the same dispatch
//! svc4/<ns>/<name>/<proto>/<port>:
//!            numgen random mod n < 1 goto ep4/...; numgen random mod n-1 < 1 goto ...; goto ...
//!            or, with no endpoints: reject
//! ep4/<ns>/<name>/<proto>/<port>/<ip>/<port>:
//!            ip saddr <ip> set the mark bit           (hairpin: the pod reached itself)
//!            dnat
//! nat-postrouting (type nat, priority srcnat, main table only):
//!            not DNATed -> return; mark bit set -> clear it, masquerade fully-random
//! ```
//!
//! Only chains, rules and elements scale with the number of Services; there are a few sets per
//! table. The kernel cost of many sets is what makes kube-proxy's nftables mode slow (see docs/).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{Endpoint, Family, Locality, Service, ServicePort, Snapshot};
use crate::ruleset::*;

mod gate;
mod service;

pub use gate::{Gate, GateDelta, Role, roles as gate_roles};

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Traffic to a ClusterIP from outside these ranges is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs.
    pub masquerade_all: bool,
    /// kube-proxy's `--conntrack-tcp-be-liberal`: when set, packets conntrack marks INVALID
    /// are not dropped on the forward path.
    pub conntrack_tcp_be_liberal: bool,
    /// This node and zone: `internalTrafficPolicy: Local` and topology hints.
    pub locality: Locality,
    /// Spread Services over this many tables (0 and 1: one table). A partial sync then makes
    /// the kernel re-validate one shard instead of every Service (see docs/benchmark.md).
    pub table_shards: u32,
    /// `--own-tables`: our tables carry the kernel's owner + persist flags, so that no other
    /// process can change them while we run, and they stay when we exit.
    pub own_tables: bool,
    /// This node's addresses that serve node ports (`--nodeport-addresses`; followed live).
    pub node_ips: Vec<IpAddr>,
    /// `--endpoint-counters`: a `counter` before each endpoint's DNAT, so the kernel counts the
    /// new connections each endpoint gets (read back for `nftproxy_endpoint_connections_total`).
    pub endpoint_counters: bool,
}

/// Chains per table that `--table-shards auto` aims for (500 Services of 5 endpoints): a partial
/// sync re-validates one table, and reading a table back costs the square of its chains (the
/// kernel restarts its dump walk for every ~32 KiB message), so tables are sized by chains,
/// not Services: 5,000 Services of 50 endpoints are 255,000 chains.
pub const CHAINS_PER_SHARD: usize = 3_000;
/// Most tables `auto` picks. Every table's base chain is on every new connection's path: a
/// first packet that is not Service traffic pays one gate lookup per table (about 0.1 us each
/// on the benchmark VM, docs/benchmark.md "The first packet"), while past a few tables a
/// partial sync gains little: at 10,000 Services x 5 one endpoint change took 38 / 13 / 10 /
/// 9 ms with 1 / 4 / 8 / 20 tables.
pub const MAX_AUTO_SHARDS: u32 = 4;

/// The chains `services` Services with `endpoints` endpoints in all make (about: one per Service
/// port and one per endpoint), what [`auto_shards`] counts.
pub fn chain_estimate(services: usize, endpoints: usize) -> usize {
    services + endpoints
}

/// `--table-shards auto`: one table per 3,000 chains (see [`chain_estimate`]; 1 to 4 tables),
/// chosen once at start. Tables we already have are kept while their count is within a factor
/// of two of that, so that a restart after the cluster grew or shrank a little does not move
/// every Service to another table.
pub fn auto_shards(chains: usize, existing: usize) -> u32 {
    let want = chains.div_ceil(CHAINS_PER_SHARD).clamp(1, MAX_AUTO_SHARDS as usize);
    let keep = existing >= 1 && existing <= MAX_AUTO_SHARDS as usize && existing * 2 >= want && existing <= want * 2;
    (if keep { existing } else { want }) as u32
}

impl Options {
    pub fn shards(&self) -> u32 {
        self.table_shards.max(1)
    }

    /// The shard a Service lives in: a stable hash of namespace/name.
    pub fn shard_of(&self, id: &crate::model::ServiceId) -> u32 {
        // Of `namespace/name`, as ever (a Service never changes tables), without making the
        // string: a read-back table by table asks this of every Service once per table.
        let h = fnv1a_parts(&[id.namespace.as_bytes(), b"/", id.name.as_bytes()]);
        (h % u64::from(self.shards())) as u32
    }
}

pub const CHAIN_PREROUTING: &str = "nat-prerouting";
pub const CHAIN_OUTPUT: &str = "nat-output";
pub const CHAIN_POSTROUTING: &str = "nat-postrouting";
pub const CHAIN_FORWARD: &str = "filter-forward";
pub const STATE_SET: &str = "state";

const NO_SUCH_PORT: &str = "a Service address on a port it does not serve";

fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

pub fn dispatch_map(family: Family) -> String {
    format!("service-ips-{}", suffix(family))
}

/// The gate: every address a table serves, mapped to the chain of its kind (see gate.rs).
pub fn gate_map(family: Family) -> String {
    format!("addresses-{}", suffix(family))
}

/// `protocol . node port : goto ext4/...`
pub fn node_ports_map(family: Family) -> String {
    format!("node-ports-{}", suffix(family))
}

fn fam_digit(family: Family) -> char {
    match family {
        Family::V4 => '4',
        Family::V6 => '6',
    }
}

/// `svc4/default/web/tcp/80`: names the Service port an operator is looking at.
pub fn service_chain(svc: &Service, port: &ServicePort, family: Family) -> String {
    format!("svc{}/{}/{}/{}", fam_digit(family), svc.id, port.protocol, port.port)
}

/// `ep4/default/web/tcp/80/10.244.0.2/8080`. Names stay plain nft identifiers (letters, digits,
/// `/-_.`) so that an operator can type them: IPv6 colons are written as `-`.
pub fn endpoint_chain(service_chain: &str, ep: &Endpoint) -> String {
    let rest = &service_chain[5..];
    match ep.ip {
        IpAddr::V4(a) => format!("ep4/{rest}/{a}/{}", ep.port),
        IpAddr::V6(a) => format!("ep6/{rest}/{}/{}", a.to_string().replace(':', "-"), ep.port),
    }
}

/// A rule of the fixed skeleton, labelled with what it is for.
fn fixed(label: &str, stmts: Vec<Stmt>) -> Rule {
    Rule::new(&Arc::from(label), stmts)
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

pub fn compile(snapshot: &Snapshot, opts: &Options) -> Ruleset {
    let mut rs = skeleton(opts);
    for svc in snapshot.services.values() {
        merge(&mut rs, compile_service(svc, opts));
    }
    merge_gate(&mut rs, &Gate::of(opts, snapshot.services.values()));
    rs
}

/// Adds the gate's elements to a ruleset that has the skeleton's sets.
pub fn merge_gate(rs: &mut Ruleset, gate: &Gate) {
    for (map, e) in gate.elements() {
        if let Some(s) = rs.sets.get_mut(&map) {
            s.elements.push(e);
        }
    }
}

/// The objects one Service contributes: its chains and its elements in the shared sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceObjects {
    pub chains: BTreeMap<String, Chain>,
    /// Sets of its own (session affinity).
    pub sets: BTreeMap<String, Set>,
    /// (set name, element)
    pub elements: Vec<(String, Element)>,
}

/// A digest per table, by shard number (0: the main table), in shard order. A Service's objects
/// live in its shard's table.
pub type TableDigests = Vec<(u32, u64)>;

/// The shard number of the table an object name lives in.
fn shard_of_name(name: &str) -> u32 {
    shard_of_table(split_name(name).0).unwrap_or(0)
}

/// The digest of each table's part of these objects.
fn table_digests<'a>(
    chains: &'a BTreeMap<String, Chain>,
    sets: &'a BTreeMap<String, Set>,
    elements: impl Iterator<Item = (&'a String, &'a Element)> + Clone,
) -> TableDigests {
    let mut shards: Vec<u32> =
        chains.keys().chain(sets.keys()).chain(elements.clone().map(|(s, _)| s)).map(|n| shard_of_name(n)).collect();
    shards.sort_unstable();
    shards.dedup();
    shards
        .into_iter()
        .map(|k| {
            let here = |n: &String| shard_of_name(n) == k;
            let d = digest(
                chains.iter().filter(|(n, _)| here(n)),
                sets.iter().filter(|(n, _)| here(n)),
                elements.clone().filter(|(s, _)| here(s)),
            );
            (k, d)
        })
        .collect()
}

impl ServiceObjects {
    /// The digest of its objects in each table they live in.
    pub fn table_digests(&self) -> TableDigests {
        table_digests(&self.chains, &self.sets, self.elements.iter().map(|(s, e)| (s, e)))
    }

    /// The digest of all its objects: the XOR of its tables' digests.
    pub fn digest(&self) -> u64 {
        self.table_digests().iter().fold(0, |acc, (_, d)| acc ^ d)
    }
}

/// The digest of each table of a skeleton: its chains, sets and table flags. (The node-port
/// addresses are the gate's elements, in [`Gate::digests`].)
pub fn skeleton_digests(rs: &Ruleset) -> BTreeMap<u32, u64> {
    let elements = rs.sets.iter().flat_map(|(name, set)| set.elements.iter().map(move |e| (name, e)));
    let flags = u64::from(rs.table_flags).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    table_digests(&rs.chains, &rs.sets, elements).into_iter().map(|(k, d)| (k, d ^ flags)).collect()
}

/// The digest of a whole skeleton (the XOR of its tables').
pub fn skeleton_digest(rs: &Ruleset) -> u64 {
    skeleton_digests(rs).values().fold(0, |acc, d| acc ^ d)
}

/// What the state set records about the commit that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateRecord {
    /// The ruleset generation the commit produced.
    pub generation: u32,
    /// The [`RULE_FORMAT`] of the agent that wrote the rules.
    pub format: u32,
    /// The digest of everything the commit left.
    pub digest: u64,
}

/// The element recording a [`StateRecord`] in the state set (16 bytes, big-endian fields).
pub fn state_element(generation: u32, digest: u64) -> Element {
    state_key(generation, RULE_FORMAT, digest)
}

fn state_key(first: u32, format: u32, digest: u64) -> Element {
    let mut key = first.to_be_bytes().to_vec();
    key.extend(format.to_be_bytes());
    key.extend(digest.to_be_bytes());
    Element { key, goto: None }
}

/// Marks a state element that records one table's digest (in the format field's top bit, so
/// that an agent of format 2 or older, which expects one element, reads the kernel back).
const TABLE_RECORD: u32 = 0x8000_0000;

/// The element recording one table's digest, written with the [`StateRecord`] (rule format 3):
/// `shard . (format | TABLE_RECORD) . digest`. A new process compares these with the tables it
/// wants and reads back only those that differ.
pub fn table_state_element(shard: u32, digest: u64) -> Element {
    state_key(shard, RULE_FORMAT | TABLE_RECORD, digest)
}

/// Every element of the state set after a commit producing `generation` that leaves tables
/// with these digests: the record (with the XOR of them all) and one element per table.
pub fn state_elements(generation: u32, tables: &BTreeMap<u32, u64>) -> Vec<Element> {
    let digest = tables.values().fold(0, |acc, d| acc ^ d);
    std::iter::once(state_element(generation, digest))
        .chain(tables.iter().map(|(k, d)| table_state_element(*k, *d)))
        .collect()
}

/// The fields of a 16-byte state element.
fn state_fields(e: &Element) -> Option<(u32, u32, u64)> {
    let k: &[u8; 16] = e.key.as_slice().try_into().ok()?;
    let u32_at = |i: usize| u32::from_be_bytes([k[i], k[i + 1], k[i + 2], k[i + 3]]);
    Some((u32_at(0), u32_at(4), u64::from_be_bytes(k[8..].try_into().ok()?)))
}

/// The record in a state element (format 0: written before formats were recorded).
pub fn parse_state_element(e: &Element) -> Option<StateRecord> {
    let (generation, format, digest) = state_fields(e)?;
    (format & TABLE_RECORD == 0).then_some(StateRecord { generation, format, digest })
}

/// The record and the per-table digests in a state set: exactly one record element, and the
/// table elements of the record's format (none before format 3).
pub fn parse_state(elements: &[Element]) -> Option<(StateRecord, BTreeMap<u32, u64>)> {
    let mut records = elements.iter().filter_map(parse_state_element);
    let (record, None) = (records.next()?, records.next()) else { return None };
    let tables = elements
        .iter()
        .filter_map(state_fields)
        .filter(|(_, format, _)| *format == record.format | TABLE_RECORD)
        .map(|(shard, _, digest)| (shard, digest))
        .collect();
    Some((record, tables))
}

/// Adds one Service's objects to a ruleset that has the skeleton's sets.
pub fn merge(rs: &mut Ruleset, objs: ServiceObjects) {
    rs.chains.extend(objs.chains);
    rs.sets.extend(objs.sets);
    for (set, e) in objs.elements {
        if let Some(s) = rs.sets.get_mut(&set) {
            s.elements.push(e);
        }
    }
}

/// Everything that does not depend on the Services.
pub fn skeleton(opts: &Options) -> Ruleset {
    let mut rs = Ruleset::default();
    if opts.own_tables {
        rs.table_flags = crate::nft::consts::NFT_TABLE_F_OWNER | crate::nft::consts::NFT_TABLE_F_PERSIST;
    }
    add_skeleton(&mut rs, opts);
    rs
}

pub fn compile_service(svc: &Service, opts: &Options) -> ServiceObjects {
    let mut objs = ServiceObjects::default();
    for vip in &svc.cluster_ips {
        service::add_service_ip(&mut objs, svc, *vip, opts);
    }
    objs
}

/// Every table's dispatch (base chains with the gate, the chain for each kind of address, the
/// maps), and the main table's postrouting and forward chains and the `state` set.
fn add_skeleton(rs: &mut Ruleset, opts: &Options) {
    for shard in 0..opts.shards() {
        add_dispatch(rs, opts, shard);
    }
    rs.chains.insert(
        CHAIN_POSTROUTING.into(),
        base(
            Hook::Postrouting,
            SRCNAT,
            vec![
                // Everything below is for connections our rules DNATed: any other first packet
                // (pod to pod, node to internet) leaves after this one test.
                fixed("not DNATed: not Service traffic", vec![Stmt::CtNotDnat, Stmt::Return]),
                fixed("not marked for masquerade", vec![Stmt::MarkBitClear(MASQ_MARK), Stmt::Return]),
                fixed("masquerade what the services chain marked", vec![Stmt::ClearMarkBit(MASQ_MARK)]),
                fixed("masquerade what the services chain marked", vec![Stmt::Masquerade]),
            ],
        ),
    );

    if !opts.conntrack_tcp_be_liberal {
        // An out-of-window TCP packet to an endpoint would otherwise reach the pod un-DNATed and
        // be answered with a RST that kills the connection (kubernetes e2e "should drop
        // INVALID conntrack entries").
        rs.chains.insert(
            CHAIN_FORWARD.into(),
            base(
                Hook::Forward,
                FILTER,
                vec![fixed(
                    "INVALID forwarded packets (kube-proxy's default; --conntrack-tcp-be-liberal)",
                    vec![Stmt::CtStateInvalid, Stmt::Counter, Stmt::Drop],
                )],
            ),
        );
    }

    rs.sets.insert(STATE_SET.into(), Set { kind: SetKind::State, elements: vec![] });
}

fn base(hook: Hook, priority: i32, rules: Vec<Rule>) -> Chain {
    Chain { base: Some(BaseChain { hook, priority }), rules: rules.into() }
}

/// One shard's dispatch: its base chains (the gate), the chain for each kind of address (the
/// ClusterIP one sets the masquerade mark) and the maps.
fn add_dispatch(rs: &mut Ruleset, opts: &Options, shard: u32) {
    let q = |name: &str| qualify(shard, name);
    // A first packet that is not Service traffic (pod to pod, node to internet) makes one set
    // lookup per table: the gate. The rest runs only for the addresses it names.
    let gate = || {
        let by_family = |family| {
            let stmts = vec![Stmt::NfProto(family), Stmt::DaddrVmap { family, map: q(&gate_map(family)) }];
            fixed("Service addresses, to the chain of their kind", stmts)
        };
        FAMILIES.map(by_family).to_vec()
    };
    rs.chains.insert(q(CHAIN_PREROUTING), base(Hook::Prerouting, DSTNAT, gate()));
    rs.chains.insert(q(CHAIN_OUTPUT), base(Hook::Output, DSTNAT, gate()));
    for family in FAMILIES {
        let chain = |role: Role, rules: Vec<Rule>| (q(&role.chain(family)), Chain { base: None, rules: rules.into() });
        // The gate checked the family already; the `meta nfproto` that nft writes before any
        // `ip daddr` in an inet table stays, or `nft list` shows raw payload offsets.
        let dispatch = |what: &str| {
            fixed(what, vec![Stmt::NfProto(family), Stmt::DispatchVmap { family, map: q(&dispatch_map(family)) }])
        };
        let mut cluster_ip = cluster_ip_dispatch(family, opts, &q(&dispatch_map(family)));
        cluster_ip.push(fixed(NO_SUCH_PORT, vec![Stmt::L4Proto(crate::model::Protocol::Tcp), Stmt::RejectTcpReset]));
        cluster_ip.push(fixed(NO_SUCH_PORT, vec![Stmt::RejectPortUnreachable]));
        let node_ip = vec![
            dispatch("an external IP that is this node's address"),
            fixed("node ports, on this node's addresses", vec![Stmt::NodePortVmap { map: q(&node_ports_map(family)) }]),
        ];
        let external_ip = vec![dispatch("external and load-balancer IPs, by address, protocol and port")];
        rs.chains.extend([
            chain(Role::Cluster, cluster_ip),
            chain(Role::Node, node_ip),
            chain(Role::External, external_ip),
        ]);
        rs.sets.insert(q(&dispatch_map(family)), Set { kind: SetKind::Dispatch(family), elements: vec![] });
        rs.sets.insert(q(&gate_map(family)), Set { kind: SetKind::Gate(family), elements: vec![] });
        rs.sets.insert(q(&node_ports_map(family)), Set { kind: SetKind::NodePorts(family), elements: vec![] });
    }
}

/// The start of `cluster-ip-*`: the dispatch, with the masquerade mark set first for traffic
/// that needs SNAT. Traffic from the pod network (the common case) is dispatched by the rule that
/// recognises it, with no jump and no second rule: a jump to a check chain and back cost a
/// ClusterIP connection 0.16 us of CPU, 0.5 % (docs/benchmark.md, "The first packet"). A packet
/// whose dispatch misses there falls through, is marked, misses again and is rejected below.
fn cluster_ip_dispatch(family: Family, opts: &Options, map: &str) -> Vec<Rule> {
    let dispatch = |what: &str, mut stmts: Vec<Stmt>| {
        stmts.push(Stmt::DispatchVmap { family, map: map.to_string() });
        fixed(what, stmts)
    };
    let mark = fixed("mark for masquerade: not from the pod network", vec![Stmt::SetMarkBit(MASQ_MARK)]);
    let all = dispatch("dispatch by address, protocol and port", vec![Stmt::NfProto(family)]);
    if opts.masquerade_all {
        return vec![mark, all];
    }
    let cidrs: Vec<&IpNet> = opts.cluster_cidrs.iter().filter(|c| Family::of(&c.addr()) == family).collect();
    if cidrs.is_empty() {
        return vec![all];
    }
    let from_pods = cidrs.into_iter().map(|c| {
        dispatch(
            "from the pod network: dispatch by address, protocol and port",
            vec![Stmt::NfProto(family), Stmt::SaddrIn(*c)],
        )
    });
    from_pods.chain([mark, all]).collect()
}

/// Renders a whole ruleset as nft-like text: the golden form used by tests and `--dry-run`.
pub fn render(rs: &Ruleset) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    for (name, set) in &rs.sets {
        out.push_str(&format!("  set {name} {{ # {:?}\n", set.kind));
        for e in &set.elements {
            out.push_str(&format!("    {}\n", e.describe(set.kind)));
        }
        out.push_str("  }\n");
    }
    for (name, chain) in &rs.chains {
        out.push_str(&format!("  chain {name} {{\n"));
        if let Some(b) = chain.base {
            out.push_str(
                &format!("    type {} hook {:?} priority {}\n", b.hook.chain_type(), b.hook, b.priority).to_lowercase(),
            );
        }
        for r in chain.rules.iter() {
            out.push_str(&format!("    {r} comment \"{}\"\n", r.comment()));
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_shards_follow_the_chain_count_and_keep_what_is_close_enough() {
        let chains = |services, endpoints_each| chain_estimate(services, services * endpoints_each);
        assert_eq!(auto_shards(0, 0), 1);
        assert_eq!(auto_shards(chains(400, 5), 0), 1);
        assert_eq!(auto_shards(chains(1_000, 5), 0), 2);
        assert_eq!(auto_shards(chains(1_500, 5), 0), 3);
        // Larger clusters: at most 4 tables (each one is on every new connection's path).
        assert_eq!(auto_shards(chains(10_000, 5), 0), MAX_AUTO_SHARDS);
        assert_eq!(auto_shards(chains(44_000, 1), 0), MAX_AUTO_SHARDS);
        // The same Services with ten times the endpoints: more, smaller tables.
        assert_eq!(auto_shards(chains(200, 5), 0), 1);
        assert_eq!(auto_shards(chains(200, 50), 0), 4);
        // A restart keeps the tables there are while within a factor of two...
        assert_eq!(auto_shards(chains(10_000, 5), 3), 3);
        assert_eq!(auto_shards(chains(1_000, 5), 3), 3);
        assert_eq!(auto_shards(chains(400, 5), 2), 2);
        // ...and reshards beyond it, or above the most `auto` makes (an older agent's 20).
        assert_eq!(auto_shards(chains(10_000, 5), 1), MAX_AUTO_SHARDS);
        assert_eq!(auto_shards(chains(1_000, 5), 20), 2);
        assert_eq!(auto_shards(chains(10_000, 5), 20), MAX_AUTO_SHARDS);
    }
}
