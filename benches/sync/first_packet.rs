//! What a new connection pays for our rules (issue 18): connect-to-first-byte latency and CPU
//! time per connection, for the same pod-to-pod connection direct and through a ClusterIP,
//! with each of several rule sets loaded in turn into one namespace cluster:
//!
//! - `bare`: no rules at all (no conntrack either);
//! - `floor`: conntrack and NAT on and a DNAT present, but no rule evaluated: what any NAT-based
//!   Service proxy costs before its first rule; `floors`: the same with K empty base chains;
//! - `reference`: the least a Service proxy can do, one table, one nat base chain, one rule:
//!   `dnat to ip daddr . th dport map @services` with N entries;
//! - `nftproxy, 1 table` and `nftproxy, K tables` (the default shards at N Services), with the
//!   agent's defaults (`--cluster-cidr` set, endpoint counters on, INVALID dropped);
//! - one table with those defaults taken away one at a time (counters, the masquerade check,
//!   the forward hook's INVALID drop): what each costs, and what the layout alone costs.
//!
//! Every round loads every rule set (in rotated order), so the VM's drift falls on all alike;
//! the figures are medians over rounds. CPU time per connection is the client's own time on a CPU
//! (`/proc/thread-self/schedstat`, exact nanoseconds) per connection: the first packet's whole
//! path (client, node's hooks, server's SYN handling) runs in its context as softirq work when
//! IRQ time is not accounted apart, as here; other load on the machine does not count.

use super::*;

/// The CPU every connection's path runs on.
const PINNED_CPU: &str = "1";

/// One namespace cluster (client, web-a) and what it has loaded.
struct Lab {
    name: &'static str,
    cluster: common::Cluster,
    /// Never dropped by us: the cluster takes its namespaces (the node's too) down.
    node: std::mem::ManuallyDrop<Ns>,
}

impl Lab {
    fn new(name: &'static str) -> Lab {
        let pods: Vec<_> = common::demo_pods().iter().filter(|p| ["client", "web-a"].contains(&p.0)).copied().collect();
        let mut cluster = common::Cluster::new(&pods);
        cluster.serve("web-a", "web-a", &[8080], &[]);
        cluster.exec_ok("client", &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
        // The server on the client's CPU (see `round`).
        let pids = Command::new("ip").args(["netns", "pids", &cluster.ns("web-a")]).output().unwrap();
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("taskset").args(["-a", "-cp", PINNED_CPU, pid]).output();
        }
        let node = std::mem::ManuallyDrop::new(Ns(cluster.ns("node")));
        Lab { name, cluster, node }
    }

    /// `count` connections to `addr` from the client: (p50 latency us, CPU us per connection).
    /// Client and server run on one CPU, so the whole path (both ends, the node's hooks in
    /// softirq) does too: no cross-CPU wake-ups, whose cost depends on what the other CPU is
    /// doing, and a build on the other CPU disturbs the figures less.
    fn round(&self, addr: &str, count: usize) -> Option<(f64, f64)> {
        let out = Command::new("taskset")
            .args([
                "-c",
                PINNED_CPU,
                "ip",
                "netns",
                "exec",
                &self.cluster.ns("client"),
                common::TESTPOD,
                "latency",
                addr,
            ])
            .args(["--count", &count.to_string()])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let p50 = text.split_whitespace().find_map(|kv| kv.strip_prefix("p50_us="))?.parse().ok()?;
        let cpu = text.split_whitespace().find_map(|kv| kv.strip_prefix("cpu_us="))?.parse().ok()?;
        let failed: usize = text.split_whitespace().find_map(|kv| kv.strip_prefix("failed="))?.parse().ok()?;
        (failed == 0).then_some((p50, cpu))
    }
}

/// Conntrack and NAT on, a DNAT present but never reached: what running any NAT-based Service
/// proxy costs before its first rule (`k` such tables, one nat base chain each).
fn floor_ruleset(k: usize) -> String {
    let mut s = String::new();
    for i in 0..k {
        writeln!(s, "table inet floor{i} {{\n chain unused {{\n  meta l4proto tcp dnat ip to 10.244.1.2:8080\n }}")
            .unwrap();
        s.push_str(" chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n }\n}\n");
    }
    s
}

/// The floor plus one piece of our rules, alone: what a first packet that is not Service traffic
/// pays for it.
fn floor_plus(piece: &str, n: usize) -> String {
    let mut s = floor_ruleset(1);
    s.push_str("table inet piece {\n");
    match piece {
        "gate" => {
            s.push_str(" map addresses-v4 {\n  type ipv4_addr : verdict\n  elements = {\n");
            for i in 0..n {
                writeln!(s, "   {} : goto cluster-ip-v4,", vip(i)).unwrap();
            }
            s.push_str("  }\n }\n chain cluster-ip-v4 {\n  meta l4proto tcp dnat ip to 10.244.1.2:8080\n }\n");
            s.push_str(" chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n");
            s.push_str("  meta nfproto ipv4 ip daddr vmap @addresses-v4\n  meta nfproto ipv6 return\n }\n");
        }
        "postrouting" => {
            s.push_str(" chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n");
            s.push_str("  ct status & dnat == 0 return\n  masquerade\n }\n");
        }
        "forward" => {
            s.push_str(" chain forward {\n  type filter hook forward priority filter; policy accept;\n");
            s.push_str("  ct state invalid counter drop\n }\n");
        }
        other => panic!("no piece {other}"),
    }
    s.push_str("}\n");
    s
}

/// The reference: one table, one base chain, one DNAT through a map of `n` Services, the last
/// of which leads to web-a.
fn reference_ruleset(n: usize) -> String {
    let mut s = String::from(
        "table inet reference {\n map services {\n  type ipv4_addr . inet_service : ipv4_addr . inet_service\n  elements = {\n",
    );
    for i in 0..n {
        let to = if i == n - 1 { "10.244.1.2 . 8080".to_string() } else { format!("{} . 8080", endpoint_ip(i, 0, 5)) };
        writeln!(s, "   {} . 80 : {to},", vip(i)).unwrap();
    }
    s.push_str("  }\n }\n chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n");
    s.push_str("  meta l4proto tcp dnat ip to ip daddr . th dport map @services\n }\n}\n");
    s
}

/// A rule set the node can hold: what it is, and how to load it into an empty ruleset.
enum RuleSet {
    Bare,
    Nft(String),
    /// The agent's rules for the benchmark's Services, in this many tables, with these
    /// benchmark-child settings.
    Nftproxy(u32, &'static [(&'static str, &'static str)]),
}

/// As the agent runs by default: endpoint counters on (a `counter` before each DNAT).
const DEFAULTS: &[(&str, &str)] = &[("NFTPROXY_BENCH_COUNTERS", "1")];
const NO_COUNTERS: &[(&str, &str)] = &[];
const NO_MASQ_CHECK: &[(&str, &str)] = &[("NFTPROXY_BENCH_NO_CLUSTER_CIDR", "1")];
const LAYOUT_ONLY: &[(&str, &str)] = &[("NFTPROXY_BENCH_NO_CLUSTER_CIDR", "1"), ("NFTPROXY_BENCH_BE_LIBERAL", "1")];

pub(crate) fn bench_first_packet(r: &mut Report, dir: &Path, n: usize, rounds: usize, per_round: usize) {
    let shards = compile::auto_shards(compile::chain_estimate(n, n * 5), 0);
    eprintln!("== first packet: {n} Services, {rounds} rounds of {per_round} connections per path");
    // One namespace cluster; each round loads every rule set in turn (rotated) into the node's
    // empty ruleset with its conntrack table flushed, and measures its paths. Namespaces of
    // their own per rule set were tried first: two clusters differ by up to 0.5 us per
    // connection for the same rules, as much as the differences measured here.
    let lab = Lab::new("first packet");
    let vip = format!("{}:80", vip(n - 1));
    let direct = "10.244.1.2:8080";
    let sets: Vec<(RuleSet, Vec<(&str, String)>)> = vec![
        (RuleSet::Bare, vec![(direct, "direct, no netfilter rules at all".into())]),
        (RuleSet::Nft(floor_ruleset(1)), vec![(direct, "direct, NAT on, no rule evaluated (floor)".into())]),
        (
            RuleSet::Nft(floor_ruleset(shards as usize)),
            vec![(direct, format!("direct, {shards} empty NAT base chains"))],
        ),
        // Our rules for a first packet that is not Service traffic, one piece at a time.
        (RuleSet::Nft(floor_plus("gate", n)), vec![(direct, "direct, floor + the gate (10,000 addresses)".into())]),
        (
            RuleSet::Nft(floor_plus("postrouting", n)),
            vec![(direct, "direct, floor + postrouting's ct status test".into())],
        ),
        (RuleSet::Nft(floor_plus("forward", n)), vec![(direct, "direct, floor + forward's INVALID drop".into())]),
        (
            RuleSet::Nft(reference_ruleset(n)),
            vec![(&vip, "ClusterIP, reference (map -> dnat)".into()), (direct, "direct, reference loaded".into())],
        ),
        (
            RuleSet::Nftproxy(1, DEFAULTS),
            vec![(&vip, "ClusterIP, nftproxy 1 table".into()), (direct, "direct, nftproxy 1 table loaded".into())],
        ),
        (
            RuleSet::Nftproxy(shards, DEFAULTS),
            vec![
                (&vip, format!("ClusterIP, nftproxy {shards} tables")),
                (direct, format!("direct, nftproxy {shards} tables loaded")),
            ],
        ),
        // One table with the defaults taken away one at a time: what each costs.
        (RuleSet::Nftproxy(1, NO_COUNTERS), vec![(&vip, "ClusterIP, nftproxy 1 table, no endpoint counters".into())]),
        (
            RuleSet::Nftproxy(1, NO_MASQ_CHECK),
            vec![(&vip, "ClusterIP, nftproxy 1 table, no counters, no --cluster-cidr".into())],
        ),
        (
            RuleSet::Nftproxy(1, LAYOUT_ONLY),
            vec![
                (&vip, "ClusterIP, nftproxy 1 table, also no INVALID drop".into()),
                (direct, "direct, nftproxy 1 table loaded, no INVALID drop".into()),
            ],
        ),
    ];
    let load = |set: &RuleSet| {
        lab.cluster.exec_ok("node", &["nft", "flush", "ruleset"]);
        match set {
            RuleSet::Bare => {}
            RuleSet::Nft(script) => {
                let file = dir.join("first-packet.nft");
                std::fs::write(&file, script).unwrap();
                lab.node.time("nft", &["-f", "-"], &file).expect("the rule set loads");
            }
            RuleSet::Nftproxy(k, env) => {
                lab.node.child_env(&["dataplane", &n.to_string(), "5"], *k, env);
            }
        }
        // Each rule set starts from an empty conntrack table (entries in TIME_WAIT would
        // otherwise pile up over the run and lengthen every lookup).
        let _ = lab.cluster.exec("node", &["conntrack", "-F"]);
    };
    let mut results: Vec<Vec<Vec<(f64, f64)>>> = sets.iter().map(|(_, p)| vec![Vec::new(); p.len()]).collect();
    for round in 0..rounds {
        // Rotate the order each round so that no rule set always follows the same one.
        for k in 0..sets.len() {
            let i = (k + round) % sets.len();
            let (set, paths) = &sets[i];
            load(set);
            for (j, (addr, _)) in paths.iter().enumerate() {
                // Warm the path (ARP, caches) before counting.
                lab.round(addr, per_round / 4).unwrap_or_else(|| panic!("{}: {addr} fails", lab.name));
                results[i][j].extend(lab.round(addr, per_round));
            }
        }
    }
    lab.cluster.exec_ok("node", &["nft", "flush", "ruleset"]);
    let total = rounds * per_round;
    for ((_, paths), got) in sets.iter().zip(&results) {
        for ((_, path), got) in paths.iter().zip(got) {
            let p50 = median(got.iter().map(|x| x.0).collect());
            let cpu = median(got.iter().map(|x| x.1).collect());
            r.add("first packet", n, total, &format!("{path}: latency p50"), "us", p50);
            r.add("first packet", n, total, &format!("{path}: CPU per connection"), "us", cpu);
        }
    }
}
