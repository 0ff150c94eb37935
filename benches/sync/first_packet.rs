//! What a new connection pays for our rules (issue 18): CPU time and connect-to-first-byte
//! latency per connection, for the same pod-to-pod connection direct and through a ClusterIP,
//! under several rule sets:
//!
//! - `bare`: no rules at all (no conntrack either);
//! - `floor`: conntrack and NAT on and a DNAT present, but no rule evaluated: what any NAT-based
//!   Service proxy costs before its first rule; `floors`: the same with K empty base chains;
//! - `reference`: the least a Service proxy can do, one table, one nat base chain, one rule:
//!   `dnat to ip daddr . th dport map @services` with N entries (and the same with kube-proxy's
//!   INVALID drop in forward, for a like-for-like comparison);
//! - `nftproxy, 1 table` and `nftproxy, K tables` (the default shards at N Services), with the
//!   agent's defaults (`--cluster-cidr` set, endpoint counters on, INVALID dropped), and one
//!   table with those defaults taken away one at a time.
//!
//! Each figure is a difference between two rule sets measured side by side, not two figures
//! from different minutes: two namespace clusters ("labs") hold one rule set each, and one
//! thread alternates connections between them (ABBA order, `nftproxy-testpod paired`), so the
//! VM's drift, which moves a connection's cost by 50 % from one second to the next on these
//! machines, falls on both alike. The per-pair differences' median is the figure. Two labs
//! differ by a little even with the same rules, so each comparison runs in both orientations
//! (X in lab 0 and Y in lab 1, then the other way), which cancels it; the `A/A` row (the same
//! rule set on both sides) shows what is left as noise.
//!
//! CPU time per connection is the client thread's own time on a CPU (`/proc/thread-self/
//! schedstat`, exact nanoseconds) from connect to close: the first packet's path (the node's
//! hooks, the server's SYN handling) runs in its context as softirq work when IRQ time is not
//! accounted apart, as here; other load on the machine does not count.

use super::*;

/// The CPU every connection's path runs on.
const PINNED_CPU: &str = "1";

/// One namespace cluster (client, web-a) and what it has loaded.
struct Lab {
    cluster: common::Cluster,
    /// Never dropped by us: the cluster takes its namespaces (the node's too) down.
    node: std::mem::ManuallyDrop<Ns>,
}

impl Lab {
    fn new() -> Lab {
        let pods: Vec<_> = common::demo_pods().iter().filter(|p| ["client", "web-a"].contains(&p.0)).copied().collect();
        let mut cluster = common::Cluster::new(&pods);
        cluster.serve("web-a", "web-a", &[8080], &[]);
        cluster.exec_ok("client", &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
        // The server on the client's CPU (see `paired`).
        let pids = Command::new("ip").args(["netns", "pids", &cluster.ns("web-a")]).output().unwrap();
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("taskset").args(["-a", "-cp", PINNED_CPU, pid]).output();
        }
        let node = std::mem::ManuallyDrop::new(Ns(cluster.ns("node")));
        Lab { cluster, node }
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

/// The reference with kube-proxy's INVALID drop in forward (its default, as ours).
fn reference_with_invalid_drop(n: usize) -> String {
    let mut s = reference_ruleset(n);
    s.truncate(s.trim_end().len() - 1);
    s.push_str(" chain forward {\n  type filter hook forward priority filter; policy accept;\n");
    s.push_str("  ct state invalid counter drop\n }\n}\n");
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
const NO_CLUSTER_CIDR: &[(&str, &str)] = &[("NFTPROXY_BENCH_NO_CLUSTER_CIDR", "1")];
const LAYOUT_ONLY: &[(&str, &str)] = &[("NFTPROXY_BENCH_NO_CLUSTER_CIDR", "1"), ("NFTPROXY_BENCH_BE_LIBERAL", "1")];

/// One side of a comparison: a rule set and the address a connection goes to under it.
type Side<'a> = (&'a RuleSet, &'a str);

pub(crate) fn bench_first_packet(r: &mut Report, dir: &Path, n: usize, rounds: usize, per_round: usize) {
    let shards = compile::auto_shards(compile::chain_estimate(n, n * 5), 0);
    eprintln!("== first packet: {n} Services, {rounds} rounds of {per_round} connection pairs per comparison");
    let labs = [Lab::new(), Lab::new()];
    let vip = format!("{}:80", vip(n - 1));
    let direct = "10.244.1.2:8080";
    let bare = RuleSet::Bare;
    let floor = RuleSet::Nft(floor_ruleset(1));
    let floors = RuleSet::Nft(floor_ruleset(shards as usize));
    let gate = RuleSet::Nft(floor_plus("gate", n));
    let postrouting = RuleSet::Nft(floor_plus("postrouting", n));
    let forward = RuleSet::Nft(floor_plus("forward", n));
    let reference = RuleSet::Nft(reference_ruleset(n));
    let reference_invalid = RuleSet::Nft(reference_with_invalid_drop(n));
    let ours = RuleSet::Nftproxy(1, DEFAULTS);
    let ours_k = RuleSet::Nftproxy(shards, DEFAULTS);
    let ours_16 = RuleSet::Nftproxy(16, DEFAULTS);
    let no_counters = RuleSet::Nftproxy(1, NO_COUNTERS);
    let no_cluster_cidr = RuleSet::Nftproxy(1, NO_CLUSTER_CIDR);
    let layout_only = RuleSet::Nftproxy(1, LAYOUT_ONLY);
    // Rule sets written by hand to try a change before building it: every `*.nft` file in
    // NFTPROXY_FP_VARIANTS against `base.nft` there (say, `nft list ruleset` of the agent's rules
    // at this size), through the ClusterIP and direct. Nothing else runs then.
    let variants_dir = std::env::var_os("NFTPROXY_FP_VARIANTS");
    let variants: Vec<(String, RuleSet)> = match &variants_dir {
        Some(dir) => {
            let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
            files.sort();
            files
                .into_iter()
                .filter(|p| p.extension().is_some_and(|x| x == "nft"))
                .map(|p| {
                    (
                        p.file_stem().unwrap().to_string_lossy().into_owned(),
                        RuleSet::Nft(std::fs::read_to_string(&p).unwrap()),
                    )
                })
                .collect()
        }
        None => Vec::new(),
    };
    let base = variants.iter().find(|v| v.0 == "base").map(|v| &v.1);
    let tried: Vec<(String, Side, Side)> = variants
        .iter()
        .filter(|v| v.0 != "base")
        .flat_map(|(name, set)| {
            let base = base.expect("NFTPROXY_FP_VARIANTS has a base.nft");
            [
                (format!("variant {name} - base: ClusterIP"), (base, vip.as_str()), (set, vip.as_str())),
                (format!("variant {name} - base: direct"), (base, direct), (set, direct)),
            ]
        })
        .collect();
    assert!(variants_dir.is_none() || !tried.is_empty(), "NFTPROXY_FP_VARIANTS holds no variant besides base.nft");
    // (what, X, Y): the figure is Y's cost minus X's.
    let comparisons: Vec<(String, Side, Side)> = if variants_dir.is_some() {
        tried
    } else {
        vec![
            ("A/A: direct, floor on both sides (noise)".into(), (&floor, direct), (&floor, direct)),
            ("A/A: ClusterIP, nftproxy 1 table on both sides (noise)".into(), (&ours, &vip), (&ours, &vip)),
            ("direct: conntrack and NAT (floor - bare)".into(), (&bare, direct), (&floor, direct)),
            (format!("direct: {shards} empty NAT base chains - floor"), (&floor, direct), (&floors, direct)),
            ("direct: the gate (10,000 addresses) - floor".into(), (&floor, direct), (&gate, direct)),
            ("direct: postrouting's ct status test - floor".into(), (&floor, direct), (&postrouting, direct)),
            ("direct: forward's INVALID drop - floor".into(), (&floor, direct), (&forward, direct)),
            ("direct: reference loaded - floor".into(), (&floor, direct), (&reference, direct)),
            ("direct: nftproxy 1 table loaded - floor".into(), (&floor, direct), (&ours, direct)),
            (format!("direct: nftproxy {shards} tables loaded - floor"), (&floor, direct), (&ours_k, direct)),
            // What issue 13's one-endpoint-change target would take (about 16 tables at its
            // shapes): each table is one more gate lookup for every new connection.
            ("direct: nftproxy 16 tables loaded - floor".into(), (&floor, direct), (&ours_16, direct)),
            (
                "direct: nftproxy 1 table, no INVALID drop, loaded - floor".into(),
                (&floor, direct),
                (&layout_only, direct),
            ),
            ("ClusterIP: reference - direct, floor".into(), (&floor, direct), (&reference, &vip)),
            ("ClusterIP: nftproxy 1 table - reference".into(), (&reference, &vip), (&ours, &vip)),
            (format!("ClusterIP: nftproxy {shards} tables - reference"), (&reference, &vip), (&ours_k, &vip)),
            (
                "ClusterIP: nftproxy 1 table - reference with INVALID drop".into(),
                (&reference_invalid, &vip),
                (&ours, &vip),
            ),
            (
                "ClusterIP: nftproxy 1 table, no endpoint counters - defaults".into(),
                (&ours, &vip),
                (&no_counters, &vip),
            ),
            (
                "ClusterIP: nftproxy 1 table, no counters, no --cluster-cidr - defaults".into(),
                (&ours, &vip),
                (&no_cluster_cidr, &vip),
            ),
            (
                "ClusterIP: nftproxy 1 table, no counters, no --cluster-cidr, no INVALID drop - reference".into(),
                (&reference, &vip),
                (&layout_only, &vip),
            ),
        ]
    };
    let load = |lab: &Lab, set: &RuleSet| {
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
    for (what, x, y) in &comparisons {
        let (mut cpu, mut lat, mut base_cpu, mut base_lat) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            // Even rounds: X in lab 0; odd rounds: X in lab 1. And every other pair of rounds
            // loads Y first: the rule set loaded last came out a little cheaper (-0.13 us in an
            // A/A comparison when X always went first).
            let (lx, ly) = if round % 2 == 0 { (&labs[0], &labs[1]) } else { (&labs[1], &labs[0]) };
            if round / 2 % 2 == 0 {
                load(lx, x.0);
                load(ly, y.0);
            } else {
                load(ly, y.0);
                load(lx, x.0);
            }
            let a = format!("{}={}", lx.cluster.ns("client"), x.1);
            let b = format!("{}={}", ly.cluster.ns("client"), y.1);
            // Warm both paths (ARP, caches) before counting.
            paired(&a, &b, per_round / 4).unwrap_or_else(|| panic!("{what}: {a} / {b} fail"));
            // A round that fails is run again: dropping it would unbalance the crossover.
            let got = paired(&a, &b, per_round)
                .or_else(|| paired(&a, &b, per_round))
                .unwrap_or_else(|| panic!("{what}: round {round} failed twice"));
            eprintln!("    {what}: round {round}: {:+.3} us", got["diff_cpu_us"]);
            cpu.push(got["diff_cpu_us"]);
            lat.push(got["diff_p50_us"]);
            base_cpu.push(got["a_cpu_us"]);
            base_lat.push(got["a_p50_us"]);
        }
        let total = rounds * per_round;
        let (cpu, lat) = (median(cpu), median(lat));
        let (base_cpu, base_lat) = (median(base_cpu), median(base_lat));
        r.add("first packet", n, total, &format!("{what}: CPU per connection"), "us", cpu);
        r.add(
            "first packet",
            n,
            total,
            &format!("{what}: CPU per connection"),
            "%",
            cpu.zip(base_cpu).map(|(d, b)| 100.0 * d / b),
        );
        r.add("first packet", n, total, &format!("{what}: latency p50"), "us", lat);
        r.add(
            "first packet",
            n,
            total,
            &format!("{what}: latency p50"),
            "%",
            lat.zip(base_lat).map(|(d, b)| 100.0 * d / b),
        );
        r.add("first packet", n, total, &format!("{what}: baseline CPU per connection"), "us", base_cpu);
    }
    for lab in &labs {
        lab.cluster.exec_ok("node", &["nft", "flush", "ruleset"]);
    }
}

/// `count` connection pairs between two sides (`NETNS=IP:PORT`), alternating, on the pinned
/// CPU (the servers are pinned there too: the whole path runs on one CPU, no cross-CPU wake-up
/// is counted): `nftproxy-testpod paired`'s figures, if no connection failed.
fn paired(a: &str, b: &str, count: usize) -> Option<std::collections::BTreeMap<String, f64>> {
    let out = Command::new("taskset")
        .args(["-c", PINNED_CPU, common::TESTPOD, "paired", a, b, "--count", &count.to_string()])
        .output()
        .ok()?;
    let got = key_values(&out.stdout);
    (got.get("failed") == Some(&0.0) && got.contains_key("diff_cpu_us")).then_some(got)
}
