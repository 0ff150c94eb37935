//! Cluster DNS under load (`sudo cargo bench --bench dns`; `scripts/bench` runs it too): queries
//! per second and latency from a pod to `--cluster-dns` with 10,000 Services, beside the same
//! queries answered by a plain UDP echo on the node behind a ClusterIP in the same namespaces:
//! the floor of the path (pod -> DNAT -> a socket on the node -> back), so the difference is
//! what answering costs.
//!
//! One client, one query outstanding at a time (a resolver's pattern), names drawn over all
//! Services; rounds alternate between the two servers. Flags: `--services N` (10000),
//! `--queries N` per round (20000), `--rounds N` (5).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NFTPROXY: &str = env!("CARGO_BIN_EXE_nftproxy");
const TESTPOD: &str = env!("CARGO_BIN_EXE_nftproxy-testpod");
const CLIENT: (&str, &str) = ("client", "10.244.1.10");
const ECHO_VIP: &str = "10.96.0.20";
const ECHO_PORT: u16 = 9053;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fixture(args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("netns-fixtures/netns.sh");
    let ok = Command::new("bash").arg(script).args(args).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "netns.sh {args:?} failed");
}

/// Deletes the namespaces (and everything running in them) when dropped.
struct Namespaces(String);

impl Drop for Namespaces {
    fn drop(&mut self) {
        fixture(&["down", &self.0]);
    }
}

fn exec(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(args).output().expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// N ClusterIP Services (allocated addresses, one named port) and the echo Service whose one
/// endpoint is a UDP echo on the node's address.
fn manifests(services: usize) -> String {
    let mut y = String::with_capacity(services * 160);
    for i in 0..services {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\n\
             spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
        ));
    }
    y.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\n\
         spec: {{clusterIP: {ECHO_VIP}, ports: [{{name: dns, protocol: UDP, port: 53, targetPort: {ECHO_PORT}}}]}}\n\
         ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: echo, namespace: default}}\n\
         subsets: [{{addresses: [{{ip: 192.0.2.1}}], ports: [{{name: dns, protocol: UDP, port: {ECHO_PORT}}}]}}]\n"
    ));
    y
}

#[derive(Debug, Clone, Copy)]
struct Round {
    qps: f64,
    p50: f64,
    p99: f64,
    failed: usize,
}

fn parse(line: &str) -> Option<Round> {
    let field = |k: &str| line.split_whitespace().find_map(|f| f.strip_prefix(k)).and_then(|v| v.parse::<f64>().ok());
    Some(Round {
        qps: field("qps=")?,
        p50: field("p50_us=")?,
        p99: field("p99_us=")?,
        failed: field("failed=")? as usize,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false);
    if !root {
        eprintln!("SKIPPED: the DNS benchmark creates network namespaces and needs root");
        return;
    }
    let (services, queries, rounds) = (arg("--services", 10_000), arg("--queries", 20_000), arg("--rounds", 5));
    let prefix = format!("dnsb{}", std::process::id());
    fixture(&["node", &prefix]);
    let _guard = Namespaces(prefix.clone());
    fixture(&["pod", &prefix, CLIENT.0, CLIENT.1]);
    let node = format!("{prefix}-node");
    let client = format!("{prefix}-{}", CLIENT.0);
    let dir = std::env::temp_dir().join(format!("nftproxy-dns-bench-{prefix}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("services.yaml"), manifests(services)).unwrap();

    let echo_at = format!("192.0.2.1:{ECHO_PORT}");
    let mut echo = Command::new("ip")
        .args(["netns", "exec", &node, TESTPOD, "serve", "--name", "echo", "--udp-echo", &echo_at])
        .stderr(Stdio::null())
        .spawn()
        .expect("echo server");
    let started = Instant::now();
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &node, NFTPROXY, "--watch", "--manifests", dir.to_str().unwrap()])
        .args(["--cluster-cidr", "10.244.0.0/16", "--cluster-dns", "10.96.0.10"])
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .expect("agent");
    let probe = format!("svc-{}.default.svc.cluster.local", services - 1);
    let mut ready = false;
    while started.elapsed() < Duration::from_secs(120) {
        if exec(&client, &[TESTPOD, "resolve", &probe, "--server", "10.96.0.10"]).contains("answer ") {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{services} Services: agent answering after {:.1} s", started.elapsed().as_secs_f64());
    if !ready {
        let _ = agent.kill();
        let _ = echo.kill();
        panic!("cluster DNS never answered: {}", std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default());
    }

    let pattern = "svc-{}.default.svc.cluster.local";
    let range = services.to_string();
    let count = queries.to_string();
    let mut results: Vec<(&str, Vec<Round>)> = vec![("cluster DNS (nftproxy)", vec![]), ("UDP echo (floor)", vec![])];
    for _ in 0..rounds {
        for (i, server) in [("10.96.0.10:53"), &format!("{ECHO_VIP}:53")].into_iter().enumerate() {
            let args = [TESTPOD, "dns-bench", server, "--name-pattern", pattern, "--range", &range, "--count", &count];
            let out = exec(&client, &args);
            match out.lines().find_map(parse) {
                Some(r) => results[i].1.push(r),
                None => eprintln!("no result from {server}: {out}"),
            }
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = echo.kill();
    let _ = echo.wait();
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\n{services} Services, {rounds} alternating rounds of {queries} A queries from a pod, one outstanding:\n"
    );
    println!("| server | qps (median round) | p50 us | p99 us | failed |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, rs) in &results {
        if rs.is_empty() {
            continue;
        }
        println!(
            "| {name} | {:.0} | {:.1} | {:.1} | {} |",
            median(rs.iter().map(|r| r.qps).collect()),
            median(rs.iter().map(|r| r.p50).collect()),
            median(rs.iter().map(|r| r.p99).collect()),
            rs.iter().map(|r| r.failed).sum::<usize>()
        );
    }
    println!("\nevery round: {results:?}");
}
