//! nftproxy against kube-proxy's own paths, side by side in one run, in fresh network
//! namespaces (needs root). Run with `scripts/bench`; it writes docs/benchmark.{md,csv}.
//!
//! For each size N x E it measures, each in a new namespace:
//! - nftproxy: full sync into an empty kernel (and peak RSS), a restart with the rules present
//!   (read back, diff, nothing to send), incremental syncs (one endpoint of one Service changes);
//! - the kernel floor: the same objects as one pre-encoded batch, timing only the commit;
//! - anchors on the same Services: `nft -f` of kube-proxy's nftables-mode rule set, and
//!   `iptables-restore` (legacy and nft backends) of its iptables-mode rule set, full load and
//!   "add one Service".
//!
//! nftproxy's times are measured inside the process around the sync (what the agent spends per
//! sync); the anchors' are the wall time of the `nft`/`iptables-restore` process, which already
//! excludes the time kube-proxy spends generating their input.

#[path = "../../tests/common/mod.rs"]
mod common;

mod anchors;
mod child;
mod conntrack_scale;
mod first_packet;
mod report;
mod scale;
mod shapes;

use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nftproxy::compile::{self, Options};
use nftproxy::kernel::LiveKernel;
use nftproxy::model::{Endpoint, Protocol, Service, ServiceId, ServicePort, Snapshot};
use nftproxy::nft::Netlink;
use nftproxy::plan::{Op, Plan};
use nftproxy::ruleset::{Chain, SetKind};
use nftproxy::source::changes::{self, Changed, Desired, Tracker};
use nftproxy::source::resolve::{ResolveOptions, resolve};
use nftproxy::source::{Objects, Origin};
use nftproxy::sync::Engine;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anchors::*;
use child::*;
use report::*;
use scale::*;
use shapes::*;

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("nftbench-{}-{tag}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name} (the benchmark needs root)");
        Ns(name)
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, prog]);
        c
    }

    fn child(&self, args: &[&str]) -> std::collections::BTreeMap<String, f64> {
        self.child_sharded(args, 1)
    }

    fn child_sharded(&self, args: &[&str], shards: u32) -> std::collections::BTreeMap<String, f64> {
        self.child_env(args, shards, &[])
    }

    fn child_env(&self, args: &[&str], shards: u32, env: &[(&str, &str)]) -> std::collections::BTreeMap<String, f64> {
        let exe = std::env::current_exe().unwrap();
        let out = self
            .cmd(exe.to_str().unwrap())
            .env("NFTPROXY_BENCH_SHARDS", shards.to_string())
            .envs(env.iter().copied())
            .arg("child")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "child {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        key_values(&out.stdout)
    }

    /// Wall time of a command in the namespace, stdin from `input`.
    fn time(&self, prog: &str, args: &[&str], input: &Path) -> Option<f64> {
        let start = Instant::now();
        let out = self.cmd(prog).args(args).stdin(std::fs::File::open(input).unwrap()).output().unwrap();
        let t = ms(start.elapsed());
        if !out.status.success() {
            eprintln!(
                "  {prog} failed: {}",
                String::from_utf8_lossy(&out.stderr).lines().take(3).collect::<Vec<_>>().join(" | ")
            );
            return None;
        }
        Some(t)
    }

    /// Like [`Ns::time`], killed after `limit`: `Err(())` when it was cut.
    fn time_limited(&self, prog: &str, args: &[&str], input: &Path, limit: Duration) -> Result<Option<f64>, ()> {
        let secs = limit.as_secs().to_string();
        let mut all = vec!["-s", "KILL", secs.as_str(), prog];
        all.extend_from_slice(args);
        let start = Instant::now();
        let out = self.cmd("timeout").args(&all).stdin(std::fs::File::open(input).unwrap()).output().unwrap();
        let t = ms(start.elapsed());
        // timeout(1) kills the command's whole process group, itself included: the status is
        // then death by SIGKILL (or 124 / 137 when it survives to report it).
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() == Some(libc::SIGKILL) || matches!(out.status.code(), Some(124 | 137)) {
            return Err(());
        }
        if !out.status.success() {
            eprintln!("  {prog} failed: {}", String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default());
            return Ok(None);
        }
        Ok(Some(t))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn bench_size(r: &mut Report, dir: &Path, n: usize, e: usize, nft_anchor: bool) {
    let (ns_, es) = (n.to_string(), e.to_string());
    eprintln!("== {n} Services x {e} endpoints");
    {
        let ns = Ns::new("nftproxy");
        let full = ns.child(&["full", &ns_, &es]);
        r.add("full sync", n, e, "nftproxy", "ms", full.get("total_ms").copied());
        r.add("full sync", n, e, "nftproxy", "peak RSS MiB", full.get("rss_kib").map(|k| k / 1024.0));
        r.add("full sync", n, e, "nftproxy", "messages", full.get("messages").copied());
        let restart = ns.child(&["restart", &ns_, &es]);
        r.add("restart", n, e, "nftproxy (verify, diff)", "ms", restart.get("total_ms").copied());
        r.add("restart", n, e, "nftproxy", "messages sent", restart.get("messages").copied());
        let foreign = ns.child(&["restart-foreign", &ns_, &es]);
        r.add(
            "restart",
            n,
            e,
            "nftproxy after another commit (read back, diff)",
            "ms",
            foreign.get("total_ms").copied(),
        );
        r.add("restart", n, e, "nftproxy after another commit", "messages sent", foreign.get("messages").copied());
        let reps = if n > 10_000 { "50" } else { "200" };
        let inc = ns.child(&["incremental", &ns_, &es, reps]);
        incremental_rows(r, n, e, "nftproxy", &inc);
    }
    if n >= 10_000 {
        // What `--table-shards auto` (the default) picks: one table per 3,000 chains, at most 4.
        let k = compile::auto_shards(compile::chain_estimate(n, n * e), 0);
        let path = format!("nftproxy, {k} tables");
        let ns = Ns::new("shards");
        let full = ns.child_sharded(&["full", &ns_, &es], k);
        r.add("full sync", n, e, &path, "ms", full.get("total_ms").copied());
        r.add("full sync", n, e, &path, "peak RSS MiB", full.get("rss_kib").map(|k| k / 1024.0));
        let restart = ns.child_sharded(&["restart", &ns_, &es], k);
        r.add("restart", n, e, &path, "ms", restart.get("total_ms").copied());
        let foreign = ns.child_sharded(&["restart-foreign", &ns_, &es], k);
        r.add(
            "restart",
            n,
            e,
            &format!("{path} after another commit (read back, diff)"),
            "ms",
            foreign.get("total_ms").copied(),
        );
        let reps = if n > 10_000 { "50" } else { "200" };
        let inc = ns.child_sharded(&["incremental", &ns_, &es, reps], k);
        incremental_rows(r, n, e, &path, &inc);
    }
    {
        let ns = Ns::new("floor");
        let floor = ns.child(&["floor", &ns_, &es]);
        r.add("full sync", n, e, "kernel floor (pre-encoded batch)", "ms", floor.get("commit_ms").copied());
    }
    if nft_anchor {
        let ns = Ns::new("nft");
        let full = dir.join(format!("kube-proxy-{n}x{e}.nft"));
        std::fs::write(&full, kube_proxy_nft(n, e, 0..n, true)).unwrap();
        r.add("full sync", n, e, "kube-proxy nftables shape: nft -f", "ms", ns.time("nft", &["-f", "-"], &full));
        let adds: Vec<f64> = (0..5)
            .filter_map(|k| {
                let add = dir.join(format!("kube-proxy-add-{k}.nft"));
                std::fs::write(&add, kube_proxy_nft(n, e, n + k..n + k + 1, false)).unwrap();
                ns.time("nft", &["-f", "-"], &add)
            })
            .collect();
        r.add("add one", n, e, "kube-proxy nftables shape: nft -f", "ms", median(adds));
        let _ = std::fs::remove_file(&full);
    }
    for backend in ["iptables-legacy-restore", "iptables-nft-restore"] {
        let ns = Ns::new("ipt");
        let full = dir.join(format!("kube-proxy-{n}x{e}.iptables"));
        std::fs::write(&full, kube_proxy_iptables(n, e, None)).unwrap();
        r.add("full sync", n, e, &format!("kube-proxy iptables shape: {backend}"), "ms", ns.time(backend, &[], &full));
        let adds: Vec<f64> = (0..5)
            .filter_map(|k| {
                let add = dir.join(format!("kube-proxy-add-{k}.iptables"));
                std::fs::write(&add, kube_proxy_iptables(n, e, Some(n + k..n + k + 1))).unwrap();
                ns.time(backend, &["--noflush"], &add)
            })
            .collect();
        r.add("add one", n, e, &format!("kube-proxy iptables shape: {backend}"), "ms", median(adds));
        let _ = std::fs::remove_file(&full);
    }
}

/// New-connection latency from a pod: direct, through nftproxy's ClusterIP with N Services,
/// and through kube-proxy's iptables rules with the Service placed last.
fn bench_dataplane(r: &mut Report, dir: &Path, n: usize) {
    // The tests' namespace harness: the demo's client, web-a and web-b, torn down on drop.
    let testpod = Path::new(common::TESTPOD);
    let pods: Vec<_> =
        common::demo_pods().iter().filter(|p| ["client", "web-a", "web-b"].contains(&p.0)).copied().collect();
    let mut cluster = common::Cluster::new(&pods);
    for pod in ["web-a", "web-b"] {
        cluster.serve(pod, pod, &[8080], &[5353]);
    }
    cluster.exec_ok("client", &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    let ns = |n: &str| cluster.ns(n);
    let measure_once = |addr: &str| -> Option<(f64, f64)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns("client"), testpod.to_str().unwrap(), "latency", addr, "--count", "300"])
            .output()
            .ok()?;
        let kv = key_values(&out.stdout);
        Some((kv.get("p50_us").copied()?, kv.get("p99_us").copied()?))
    };
    // The machine drifts over minutes: measure a path and its direct baseline in alternating
    // rounds and report the median round of each.
    let paired = |addr: &str| -> (Option<P50P99>, Option<P50P99>) {
        let (mut a, mut d) = (Vec::new(), Vec::new());
        for _ in 0..16 {
            a.extend(measure_once(addr));
            d.extend(measure_once("10.244.1.2:8080"));
        }
        let med = |v: &Vec<(f64, f64)>| {
            Some((median(v.iter().map(|x| x.0).collect())?, median(v.iter().map(|x| x.1).collect())?))
        };
        (med(&a), med(&d))
    };
    let node = Ns(ns("node"));
    let vip = format!("{}:80", vip(n - 1));
    let record = |r: &mut Report, path: &str, m: Option<(f64, f64)>| {
        r.add("data plane", n, 5, &format!("{path} p50"), "us", m.map(|x| x.0));
        r.add("data plane", n, 5, &format!("{path} p99"), "us", m.map(|x| x.1));
    };
    node.child(&["dataplane", &n.to_string(), "5"]);
    let (via, direct) = paired(&vip);
    record(r, "nftproxy ClusterIP", via);
    record(r, "direct pod-to-pod (paired with nftproxy)", direct);
    let k = compile::auto_shards(compile::chain_estimate(n, n * 5), 0);
    node.child_sharded(&["dataplane", &n.to_string(), "5"], k);
    let (via, direct) = paired(&vip);
    record(r, &format!("nftproxy ClusterIP, {k} tables"), via);
    record(r, &format!("direct pod-to-pod (paired with {k} tables)"), direct);
    // Every Service a NodePort: the last one's node port on the node's address, from the pod.
    node.child_env(&["dataplane", &n.to_string(), "5"], k, &[("NFTPROXY_BENCH_EXTERNAL", "nodeport")]);
    let (via, direct) = paired(&format!("192.0.2.1:{}", 10_000 + n - 1));
    record(r, &format!("nftproxy node port, {k} tables"), via);
    record(r, "direct pod-to-pod (paired with node port)", direct);
    bench_conntrack(r, dir, &node, &ns("client"), testpod);
    let _ = node.cmd("nft").args(["delete", "table", "inet", "nftproxy"]).status();
    let mut rules = kube_proxy_iptables(n, 5, None);
    for j in 0..5 {
        let ip = endpoint_ip(n - 1, j, 5).to_string();
        rules =
            rules.replace(&format!("-s {ip}/32"), "-s 10.244.1.2/32").replace(&format!("{ip}:8080"), "10.244.1.2:8080");
    }
    let file = dir.join("dataplane.iptables");
    std::fs::write(&file, rules).unwrap();
    node.time("iptables-legacy-restore", &[], &file);
    let (via, direct) = paired(&vip);
    record(r, "kube-proxy iptables, Service last", via);
    record(r, "direct pod-to-pod (paired with iptables)", direct);
    // The cluster takes its namespaces (the node's included) down when it drops.
    std::mem::forget(node);
}

/// Conntrack cost: 3,000 UDP flows to a Service of two endpoints, one endpoint removed; the
/// sync deletes that endpoint's entries (and only those).
fn bench_conntrack(r: &mut Report, dir: &Path, node: &Ns, client_ns: &str, testpod: &Path) {
    let nftproxy = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/nftproxy");
    let manifest = |eps: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns}}\nspec: {{clusterIP: 10.96.0.53, ports: [{{protocol: UDP, port: 53, targetPort: 5353}}]}}\n---\n\
apiVersion: v1\nkind: Endpoints\nmetadata: {{name: dns}}\nsubsets: [{{addresses: [{eps}], ports: [{{port: 5353, protocol: UDP}}]}}]\n"
        )
    };
    let file = dir.join("dns.yaml");
    let sync = |eps: &str| -> std::collections::BTreeMap<String, f64> {
        std::fs::write(&file, manifest(eps)).unwrap();
        let out = node
            .cmd(nftproxy.to_str().unwrap())
            .args(["--sync-once", "--manifests", file.to_str().unwrap()])
            .output()
            .unwrap();
        key_values(&out.stderr)
    };
    sync("{ip: 10.244.1.2}, {ip: 10.244.1.3}");
    let flows = 3000;
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            client_ns,
            testpod.to_str().unwrap(),
            "probe",
            "udp",
            "10.96.0.53:53",
            "--count",
            &flows.to_string(),
        ])
        .output();
    let after = sync("{ip: 10.244.1.2}");
    r.add(
        "conntrack",
        flows,
        2,
        "UDP entries deleted (one endpoint removed)",
        "entries",
        after.get("conntrack_deleted").copied(),
    );
    r.add("conntrack", flows, 2, "conntrack dump + deletes in that sync", "ms", after.get("conntrack_ms").copied());
    r.add("conntrack", flows, 2, "whole sync", "ms", after.get("total_ms").copied());
}

fn harness(args: &[String]) {
    let get = |flag: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let sizes: Vec<usize> = get("--sizes", "1000,10000,30000").split(',').map(|s| s.parse().unwrap()).collect();
    let e: usize = get("--endpoints", "5").parse().unwrap();
    let nft_max: usize = get("--nft-anchor-max", "10000").parse().unwrap();
    let out_dir = PathBuf::from(get("--out", "docs"));
    let work = std::env::temp_dir().join(format!("nftproxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let mut r = Report::default();
    let first_packet = |r: &mut Report| {
        let n = get("--dataplane-services", "10000").parse().unwrap();
        let rounds = get("--first-packet-rounds", "12").parse().unwrap();
        first_packet::bench_first_packet(
            r,
            &work,
            n,
            rounds,
            get("--first-packet-connections", "2000").parse().unwrap(),
        );
    };
    // Conntrack at a million entries (issue 13; about a minute): in the default run unless
    // --no-conntrack-scale; --only-conntrack-scale runs nothing else.
    let conntrack_scale = |r: &mut Report| {
        conntrack_scale::bench_conntrack_scale(r, get("--conntrack-entries", "1000000").parse().unwrap());
    };
    if args.iter().any(|a| a == "--only-conntrack-scale") {
        conntrack_scale(&mut r);
        let _ = std::fs::remove_dir_all(&work);
        write_outputs(&r, &out_dir);
        return;
    }
    if args.iter().any(|a| a == "--only-counters") {
        bench_counters(&mut r, get("--counters-services", "10000").parse().unwrap(), e);
        write_outputs(&r, &out_dir);
        return;
    }
    if args.iter().any(|a| a == "--only-first-packet") {
        first_packet(&mut r);
        let _ = std::fs::remove_dir_all(&work);
        write_outputs(&r, &out_dir);
        return;
    }
    // Issue 13's shapes (44,000 x 1 and 5,000 x 50, several minutes): with --scale or
    // NFTPROXY_BENCH_SCALE=1; --only-scale runs nothing else.
    let only_scale = args.iter().any(|a| a == "--only-scale");
    if only_scale
        || args.iter().any(|a| a == "--scale")
        || std::env::var("NFTPROXY_BENCH_SCALE").is_ok_and(|v| v == "1")
    {
        bench_neighbour(&mut r, 10_000, 5, get("--neighbour-changes", "20").parse().unwrap());
        for (n, e) in [(44_000, 1), (5_000, 50)].into_iter().filter(|_| !args.iter().any(|a| a == "--no-process")) {
            bench_process(&mut r, &work, n, e);
        }
    }
    if only_scale {
        let _ = std::fs::remove_dir_all(&work);
        write_outputs(&r, &out_dir);
        return;
    }
    for &n in &sizes {
        bench_size(&mut r, &work, n, e, n <= nft_max);
    }
    if !args.iter().any(|a| a == "--no-big") {
        bench_size(&mut r, &work, 10, 1000, true);
    }
    if !args.iter().any(|a| a == "--no-tax") {
        bench_commit_tax(&mut r);
    }
    if !args.iter().any(|a| a == "--no-dataplane") {
        bench_dataplane(&mut r, &work, get("--dataplane-services", "10000").parse().unwrap());
        first_packet(&mut r);
    }
    if !args.iter().any(|a| a == "--no-conntrack-scale") {
        conntrack_scale(&mut r);
    }
    if !args.iter().any(|a| a == "--no-counters") {
        bench_counters(&mut r, get("--counters-services", "10000").parse().unwrap(), e);
    }
    if !args.iter().any(|a| a == "--no-external") {
        bench_external(&mut r, get("--external-services", "10000").parse().unwrap(), e);
    }
    let _ = std::fs::remove_dir_all(&work);
    write_outputs(&r, &out_dir);
}

/// The same Services as ClusterIPs only, as NodePorts, and with 1,000 Local LoadBalancers: full
/// sync, restart and one endpoint change (default table shards), side by side in one run.
fn bench_external(r: &mut Report, n: usize, e: usize) {
    eprintln!("== external traffic: {n} Services x {e} endpoints");
    let (ns_, es) = (n.to_string(), e.to_string());
    let shards = compile::auto_shards(compile::chain_estimate(n, n * e), 0);
    for shape in ["", "nodeport", "lb-local"] {
        let path = match shape {
            "" => "ClusterIP only",
            "nodeport" => "every Service a NodePort",
            _ => "NodePorts + 1,000 Local LoadBalancers",
        };
        let ns = Ns::new("ext");
        let run = |args: &[&str]| ns.child_env(args, shards, &[("NFTPROXY_BENCH_EXTERNAL", shape)]);
        let full = run(&["full", &ns_, &es]);
        r.add("external", n, e, &format!("{path}: full sync"), "ms", full.get("total_ms").copied());
        let restart = run(&["restart", &ns_, &es]);
        r.add("external", n, e, &format!("{path}: restart"), "ms", restart.get("total_ms").copied());
        let inc = run(&["incremental", &ns_, &es, "200"]);
        r.add("external", n, e, &format!("{path}: one endpoint change p50"), "ms", inc.get("p50_ms").copied());
        r.add("external", n, e, &format!("{path}: one endpoint change p99"), "ms", inc.get("p99_ms").copied());
    }
}

/// The endpoint counters (issue 14): full sync and one endpoint change without and with a
/// `counter` in every endpoint chain (default table shards), and a /metrics scrape that reads
/// them all, side by side in one run.
fn bench_counters(r: &mut Report, n: usize, e: usize) {
    eprintln!("== endpoint counters: {n} Services x {e} endpoints");
    let (ns_, es) = (n.to_string(), e.to_string());
    let shards = compile::auto_shards(n, 0);
    for (on, path) in [("0", "without counters"), ("1", "with endpoint counters")] {
        let ns = Ns::new("counters");
        let run = |args: &[&str]| ns.child_env(args, shards, &[("NFTPROXY_BENCH_COUNTERS", on)]);
        let full = run(&["full", &ns_, &es]);
        r.add("counters", n, e, &format!("{path}: full sync"), "ms", full.get("total_ms").copied());
        if on == "1" {
            let scrape = run(&["scrape", &ns_, &es, "10"]);
            let p50 = scrape.get("scrape_p50_ms").copied();
            r.add("counters", n, e, "/metrics scrape every 1 s, p50", "ms", p50);
            r.add("counters", n, e, "/metrics scrape every 1 s, max", "ms", scrape.get("scrape_max_ms").copied());
            r.add("counters", n, e, "first scrape (reads at once)", "ms", scrape.get("first_scrape_ms").copied());
            r.add(
                "counters",
                n,
                e,
                "the kernel read (every 2 s while scraped), p50",
                "ms",
                scrape.get("dump_p50_ms").copied(),
            );
            r.add("counters", n, e, "/metrics scrape, series", "count", scrape.get("series").copied());
        }
        let inc = run(&["incremental", &ns_, &es, "200"]);
        r.add("counters", n, e, &format!("{path}: one endpoint change p50"), "ms", inc.get("p50_ms").copied());
        r.add("counters", n, e, &format!("{path}: one endpoint change p99"), "ms", inc.get("p99_ms").copied());
    }
}

/// Any commit's price against the number of chains in the namespace (empty chains, nothing to
/// validate): the floor under every partial sync, whoever sends it.
fn bench_commit_tax(r: &mut Report) {
    eprintln!("== commit price against chains in the namespace");
    for chains in [6_000, 12_000, 24_000, 36_000, 48_000, 60_000, 120_000, 180_000] {
        let ns = Ns::new("tax");
        let tax = ns.child(&["commit-tax", &chains.to_string(), "0"]);
        r.add(
            "commit tax",
            chains,
            0,
            "any commit, N empty chains present, p50",
            "ms",
            tax.get("any_commit_p50_ms").copied(),
        );
        r.add(
            "commit tax",
            chains,
            0,
            "any commit, N empty chains present, p99",
            "ms",
            tax.get("any_commit_p99_ms").copied(),
        );
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<String> = raw.iter().filter(|a| *a != "--bench").cloned().collect();
    if args.first().map(String::as_str) == Some("child") {
        child(&args[1..]);
        return;
    }
    if !raw.iter().any(|a| a == "--bench") {
        // Built by `cargo test`: the benchmark only runs through `cargo bench` / scripts/bench.
        println!("benchmark not run (use scripts/bench)");
        return;
    }
    let _ = Stdio::null();
    harness(&args);
}
