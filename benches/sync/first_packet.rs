//! What a new connection pays for our rules (issue 18): connect-to-first-byte latency and CPU
//! time per connection, for the same pod-to-pod connection direct and through a ClusterIP,
//! with several rule sets loaded side by side, each in its own namespace cluster so that no
//! reload happens between rounds:
//!
//! - `bare`: no rules at all (the floor);
//! - `reference`: the least a Service proxy can do, one table, one nat base chain, one rule:
//!   `dnat to ip daddr . th dport map @services` with N entries;
//! - `nftproxy, 1 table` and `nftproxy, K tables` (the default shards at N Services).
//!
//! Rounds alternate over every (cluster, path) pair, so the VM's drift falls on all alike; the
//! figures are medians over rounds. CPU time per connection is the machine's non-idle time
//! (`/proc/stat`, every CPU) over a round divided by its connections: it counts the client, the
//! server and the kernel between them, so it needs an otherwise idle machine.

use super::*;

/// Busy jiffies of all CPUs (everything but idle and iowait) from `/proc/stat`.
fn busy_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<u64> =
        stat.lines().next().unwrap().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    cpu.iter().sum::<u64>() - cpu[3] - cpu[4]
}

fn jiffy_us() -> f64 {
    // SAFETY: sysconf has no preconditions.
    1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

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
        let node = std::mem::ManuallyDrop::new(Ns(cluster.ns("node")));
        Lab { name, cluster, node }
    }

    /// `count` connections to `addr` from the client: (p50 latency us, CPU us per connection).
    fn round(&self, addr: &str, count: usize) -> Option<(f64, f64)> {
        let before = busy_jiffies();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.cluster.ns("client"), common::TESTPOD, "latency", addr])
            .args(["--count", &count.to_string()])
            .output()
            .ok()?;
        let cpu = (busy_jiffies() - before) as f64 * jiffy_us() / count as f64;
        let text = String::from_utf8_lossy(&out.stdout);
        let p50 = text.split_whitespace().find_map(|kv| kv.strip_prefix("p50_us="))?.parse().ok()?;
        let failed: usize = text.split_whitespace().find_map(|kv| kv.strip_prefix("failed="))?.parse().ok()?;
        (failed == 0).then_some((p50, cpu))
    }
}

/// The reference: one table, one base chain, one DNAT through a map of `n` Services, the last
/// of which leads to web-a.
fn reference_ruleset(n: usize) -> String {
    let mut s = String::from(
        "table ip reference {\n map services {\n  type ipv4_addr . inet_service : ipv4_addr . inet_service\n  elements = {\n",
    );
    for i in 0..n {
        let to = if i == n - 1 { "10.244.1.2 . 8080".to_string() } else { format!("{} . 8080", endpoint_ip(i, 0, 5)) };
        writeln!(s, "   {} . 80 : {to},", vip(i)).unwrap();
    }
    s.push_str("  }\n }\n chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n");
    s.push_str("  meta l4proto tcp dnat ip to ip daddr . th dport map @services\n }\n}\n");
    s
}

pub(crate) fn bench_first_packet(r: &mut Report, dir: &Path, n: usize, rounds: usize, per_round: usize) {
    let shards = compile::auto_shards(compile::chain_estimate(n, n * 5), 0);
    eprintln!("== first packet: {n} Services, {rounds} rounds of {per_round} connections per path");
    let bare = Lab::new("bare");
    let reference = Lab::new("reference");
    let file = dir.join("reference.nft");
    std::fs::write(&file, reference_ruleset(n)).unwrap();
    reference.node.time("nft", &["-f", "-"], &file).expect("the reference loads");
    let one = Lab::new("nftproxy, 1 table");
    one.node.child(&["dataplane", &n.to_string(), "5"]);
    let sharded = Lab::new("nftproxy, default tables");
    sharded.node.child_sharded(&["dataplane", &n.to_string(), "5"], shards);

    let vip = format!("{}:80", vip(n - 1));
    let direct = "10.244.1.2:8080";
    let paths: Vec<(&Lab, &str, String)> = vec![
        (&bare, direct, "direct, no rules".into()),
        (&reference, vip.as_str(), "ClusterIP, reference (map -> dnat)".into()),
        (&one, vip.as_str(), "ClusterIP, nftproxy 1 table".into()),
        (&sharded, vip.as_str(), format!("ClusterIP, nftproxy {shards} tables")),
        (&reference, direct, "direct, reference loaded".into()),
        (&one, direct, "direct, nftproxy 1 table loaded".into()),
        (&sharded, direct, format!("direct, nftproxy {shards} tables loaded")),
    ];
    // Warm every path (ARP, conntrack tables, caches) before counting.
    for (lab, addr, _) in &paths {
        lab.round(addr, per_round / 4).unwrap_or_else(|| panic!("{} {addr} fails", lab.name));
    }
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); paths.len()];
    for round in 0..rounds {
        // Rotate the order each round so that no path always follows the same one.
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let (lab, addr, _) = &paths[i];
            results[i].extend(lab.round(addr, per_round));
        }
    }
    let total = rounds * per_round;
    for ((_, _, path), got) in paths.iter().zip(&results) {
        let p50 = median(got.iter().map(|x| x.0).collect());
        let cpu = median(got.iter().map(|x| x.1).collect());
        r.add("first packet", n, total, &format!("{path}: latency p50"), "us", p50);
        r.add("first packet", n, total, &format!("{path}: CPU per connection"), "us", cpu);
    }
}
