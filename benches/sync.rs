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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// `NFTPROXY_BENCH_EXTERNAL`: `nodeport` makes every Service a NodePort (node port 10000 + i);
/// `lb-local` also makes the first 1,000 Local LoadBalancers with an ingress IP and one endpoint
/// on this node. Unset: ClusterIPs only.
fn external_shape() -> String {
    std::env::var("NFTPROXY_BENCH_EXTERNAL").unwrap_or_default()
}

const NODE: &str = "bench-node";

fn lb_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i as u32)
}

fn is_lb_local(i: usize) -> bool {
    external_shape() == "lb-local" && i < 1000
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32)
}

fn endpoint_ip(i: usize, j: usize, e: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * e + j) as u32)
}

fn name(i: usize) -> (String, String) {
    (format!("ns-{}", i % 10), format!("svc-{i}"))
}

/// N Services x E endpoints, TCP 80 -> 8080. `shift` moves one endpoint of Service `shift.0`.
fn snapshot(n: usize, e: usize, shift: Option<(usize, usize)>) -> Snapshot {
    let mut snap = Snapshot::default();
    for i in 0..n {
        let (ns, nm) = name(i);
        let id = ServiceId::new(ns, nm);
        let endpoints = (0..e)
            .map(|j| {
                let mut ip = endpoint_ip(i, j, e);
                if let Some((svc, k)) = shift
                    && svc == i
                    && j == 0
                {
                    ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + k as u32);
                }
                Endpoint::ready(IpAddr::V4(ip), 8080)
            })
            .collect();
        let mut endpoints: Vec<Endpoint> = endpoints;
        if let Some(first) = endpoints.first_mut() {
            first.node_name = Some(NODE.into());
        }
        let node_port = (!external_shape().is_empty()).then_some(10_000 + i as u16);
        let port = ServicePort { name: "http".into(), port: 80, protocol: Protocol::Tcp, node_port, endpoints };
        let mut svc = Service::new(id.clone(), vec![IpAddr::V4(vip(i))], vec![port]);
        if is_lb_local(i) {
            svc.external.load_balancer_ips = vec![IpAddr::V4(lb_ip(i))];
            svc.external.local = true;
        }
        snap.services.insert(id, svc);
    }
    snap
}

/// The child's options; `NFTPROXY_BENCH_SHARDS` sets `--table-shards`.
fn options() -> Options {
    let table_shards = std::env::var("NFTPROXY_BENCH_SHARDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut opts = Options { cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()], table_shards, ..Default::default() };
    if !external_shape().is_empty() {
        opts.node_ips = vec!["192.0.2.1".parse().unwrap()];
        opts.locality.node = Some(NODE.into());
    }
    opts
}

/// The same Services as Kubernetes objects: one Service and one EndpointSlice each, keyed like
/// the agent's stores.
fn k8s_objects(n: usize, e: usize) -> (HashMap<ServiceId, K8sService>, HashMap<(String, String), EndpointSlice>) {
    let (mut services, mut slices) = (HashMap::new(), HashMap::new());
    for i in 0..n {
        let (ns, nm) = name(i);
        let ip = vip(i).to_string();
        let mut svc = serde_json::json!({
            "metadata": {"name": nm, "namespace": ns},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}});
        if !external_shape().is_empty() {
            svc["spec"]["type"] = "NodePort".into();
            svc["spec"]["ports"][0]["nodePort"] = (10_000 + i).into();
        }
        if is_lb_local(i) {
            svc["spec"]["type"] = "LoadBalancer".into();
            svc["spec"]["externalTrafficPolicy"] = "Local".into();
            svc["spec"]["healthCheckNodePort"] = (30_000 + i).into();
            svc["status"] = serde_json::json!({"loadBalancer": {"ingress": [{"ip": lb_ip(i).to_string()}]}});
        }
        let endpoints: Vec<_> = (0..e)
            .map(|j| {
                let node = if j == 0 { NODE } else { "elsewhere" };
                serde_json::json!({"addresses": [endpoint_ip(i, j, e).to_string()], "nodeName": node,
                "conditions": {"ready": true, "serving": true, "terminating": false}})
            })
            .collect();
        let slice = serde_json::json!({
            "metadata": {"name": format!("{nm}-abc"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": nm}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints});
        services.insert(ServiceId::new(ns.clone(), nm.clone()), serde_json::from_value(svc).unwrap());
        slices.insert((ns, format!("{nm}-abc")), serde_json::from_value(slice).unwrap());
    }
    (services, slices)
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The price of any commit in this namespace, whatever it changes: one element added to and one
/// removed from our state set (no rule, nothing to validate), 100 times each; sorted, in ms.
fn commit_tax(nl: &mut Netlink) -> Vec<f64> {
    let mut tax = Vec::new();
    for k in 0..100u32 {
        let el = compile::state_element(k, u64::from(k));
        for add in [true, false] {
            let (set, kind, elements) = (compile::STATE_SET.to_string(), SetKind::State, vec![el.clone()]);
            let op =
                if add { Op::AddElements { set, kind, elements } } else { Op::DelElements { set, kind, elements } };
            tax.push(ms(nl.apply(&Plan { ops: vec![op] }).unwrap().kernel));
        }
    }
    tax.sort_by(|a, b| a.partial_cmp(b).unwrap());
    tax
}

/// Runs inside the namespace; prints `key=value` pairs.
fn child(args: &[String]) {
    let cmd = args[0].as_str();
    let n: usize = args[1].parse().unwrap();
    let e: usize = args[2].parse().unwrap();
    let mut out = String::new();
    match cmd {
        "full" | "restart" | "restart-foreign" => {
            let snap = snapshot(n, e, None);
            if cmd == "restart-foreign" {
                // Another program commits (a table of its own): the generation moves, so the
                // restart cannot verify by generation and reads our tables back.
                let foreign = Plan { ops: vec![Op::AddTable { name: "bench-foreign".into(), flags: 0 }] };
                Netlink::open().unwrap().apply(&foreign).unwrap();
            }
            let mut engine = Engine::new(LiveKernel::open().unwrap(), options());
            let o = engine.sync(&snap).unwrap();
            write!(
                out,
                "total_ms={:.1} read_back_ms={:.1} messages={} bytes={} rss_kib={}",
                ms(o.total),
                ms(o.read_back),
                o.stats.messages,
                o.stats.bytes,
                vm_hwm_kib()
            )
            .unwrap();
        }
        "incremental" => {
            // The agent's path from a watch event to the committed transaction: the change
            // tracker names the Service, only its objects are read and resolved, the engine
            // diffs only it. Then the same change with everything re-read and resolved.
            let reps: usize = args[3].parse().unwrap();
            let (services, mut slices) = k8s_objects(n, e);
            let origin = Origin("bench".into());
            let everything = |slices: &HashMap<(String, String), EndpointSlice>| Objects {
                services: services.values().map(|s| (origin.clone(), s.clone())).collect(),
                slices: slices.values().map(|s| (origin.clone(), s.clone())).collect(),
                ..Default::default()
            };
            let opts = ResolveOptions::default();
            let mut tracker = Tracker::default();
            for (ns, name) in slices.keys() {
                let owner = ServiceId::new(ns.clone(), name.trim_end_matches("-abc"));
                tracker.slice_applied(ns, name, Some(owner));
            }
            tracker.take();
            let mut desired = Desired::default();
            desired.replace_all(resolve(&everything(&slices), &opts).unwrap());
            let mut engine = Engine::new(LiveKernel::open().unwrap(), options());
            engine.sync(desired.snapshot()).unwrap();
            let (mut times, mut kernel, mut messages) = (Vec::new(), Vec::new(), 0);
            for k in 0..reps + 20 {
                let i = (k * 7919) % n;
                let (ns, name) = name(i);
                let key = (ns.clone(), format!("{name}-abc"));
                let moved = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + k as u32);
                slices.get_mut(&key).unwrap().endpoints[0].addresses = vec![moved.to_string()];
                tracker.slice_applied(&key.0, &key.1, Some(ServiceId::new(ns, name)));
                let start = Instant::now();
                let o = if k < reps {
                    let Changed::Services(ids) = tracker.take() else { panic!("one Service changed") };
                    let objects = changes::objects_of(
                        &tracker,
                        &ids,
                        &origin,
                        |id| services.get(id).cloned(),
                        |ns, name| slices.get(&(ns.to_string(), name.to_string())).cloned(),
                    );
                    desired.apply_partial(&ids, resolve(&objects, &opts).unwrap()).unwrap();
                    engine.sync_changed(desired.snapshot(), Some(&ids)).unwrap()
                } else {
                    tracker.take();
                    desired.replace_all(resolve(&everything(&slices), &opts).unwrap());
                    engine.sync(desired.snapshot()).unwrap()
                };
                times.push(ms(start.elapsed()));
                assert_eq!(o.kind, nftproxy::sync::SyncKind::Partial);
                assert_eq!(o.services_changed, 1);
                if k < reps {
                    kernel.push(ms(o.stats.kernel));
                    messages = messages.max(o.stats.messages);
                }
            }
            let tax = commit_tax(&mut Netlink::open().unwrap());
            let mut resolve_all = times.split_off(reps);
            for v in [&mut times, &mut kernel, &mut resolve_all] {
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            }
            write!(
                out,
                "p50_ms={:.2} p99_ms={:.2} kernel_p50_ms={:.2} kernel_p99_ms={:.2} resolve_all_p50_ms={:.1} \
                 any_commit_p50_ms={:.2} any_commit_p99_ms={:.2} max_messages={messages}",
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                percentile(&kernel, 0.5),
                percentile(&kernel, 0.99),
                percentile(&resolve_all, 0.5),
                percentile(&tax, 0.5),
                percentile(&tax, 0.99),
            )
            .unwrap();
        }
        "commit-tax" => {
            // The price of a commit against the number of chains in the namespace: `n` empty
            // chains (no rules, nothing to validate), then the same one-element commits as
            // above. The kernel walks every chain of every table on each commit.
            let mut want = compile::skeleton(&options());
            for i in 0..n {
                let chain = Chain { base: None, rules: Vec::new().into() };
                want.chains.insert(format!("c/{i}"), chain);
            }
            let mut nl = Netlink::open().unwrap();
            nl.apply(&nftproxy::plan::plan(&Default::default(), want)).unwrap();
            let tax = commit_tax(&mut nl);
            write!(
                out,
                "any_commit_p50_ms={:.3} any_commit_p99_ms={:.3}",
                percentile(&tax, 0.5),
                percentile(&tax, 0.99)
            )
            .unwrap();
        }
        "floor" => {
            let want = compile::compile(&snapshot(n, e, None), &options());
            let plan = nftproxy::plan::plan(&Default::default(), want);
            let enc = nftproxy::nft::encode::encode_plan(&plan, 1);
            let mut nl = Netlink::open().unwrap();
            let start = Instant::now();
            nl.send_encoded(&enc, &plan).unwrap();
            write!(out, "commit_ms={:.1} messages={}", ms(start.elapsed()), enc.messages).unwrap();
        }
        "dataplane" => {
            // The Service placed last (svc-(n-1)) leads to the real pod web-a.
            let mut snap = snapshot(n, e, None);
            let last = snap.services.values_mut().find(|s| s.id.name == format!("svc-{}", n - 1)).unwrap();
            last.ports[0].endpoints = vec![Endpoint::ready("10.244.1.2".parse().unwrap(), 8080)];
            let mut engine = Engine::new(LiveKernel::open().unwrap(), options());
            let o = engine.sync(&snap).unwrap();
            write!(out, "total_ms={:.1}", ms(o.total)).unwrap();
        }
        other => panic!("unknown child command {other}"),
    }
    println!("{out}");
}

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
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
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
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn hash(s: &str) -> String {
    format!("{:016X}", nftproxy::ruleset::fnv1a(s.as_bytes()))
}

/// kube-proxy nftables mode's rule set for the same Services (`numgen ... vmap` per Service).
fn kube_proxy_nft(n: usize, e: usize, range: std::ops::Range<usize>, whole: bool) -> String {
    let mut s = String::new();
    if whole {
        s.push_str("table ip kube-proxy {\n  comment \"rules for kube-proxy\"\n");
        s.push_str("  chain mark-for-masquerade { mark set mark or 0x4000; }\n");
        s.push_str("  chain masquerading { type nat hook postrouting priority 100; policy accept;\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n");
        s.push_str("  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n");
        s.push_str("  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n");
        s.push_str(
            "  chain nat-prerouting { type nat hook prerouting priority -100; policy accept; jump services; }\n",
        );
        s.push_str("  chain nat-output { type nat hook output priority -100; policy accept; jump services; }\n}\n");
    }
    let _ = n;
    for i in range {
        let (ns, nm) = name(i);
        let port = format!("{ns}/{nm}/tcp/http");
        let svc = format!("service-{}-{port}", &hash(&port)[..8]);
        let mut vmap = Vec::new();
        let mut eps = String::new();
        for j in 0..e {
            let ip = endpoint_ip(i, j, e);
            let ep = format!("endpoint-{}-{port}__{ip}/8080", &hash(&format!("{port}{ip}"))[..8]);
            writeln!(eps, "add chain ip kube-proxy {ep}").unwrap();
            writeln!(eps, "add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade").unwrap();
            writeln!(eps, "add rule ip kube-proxy {ep} meta l4proto tcp dnat to {ip}:8080").unwrap();
            vmap.push(format!("{j} : goto {ep}"));
        }
        s.push_str(&eps);
        writeln!(s, "add chain ip kube-proxy {svc}").unwrap();
        writeln!(
            s,
            "add rule ip kube-proxy {svc} ip daddr {} tcp dport 80 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            vip(i)
        )
        .unwrap();
        writeln!(s, "add rule ip kube-proxy {svc} numgen random mod {e} vmap {{ {} }}", vmap.join(", ")).unwrap();
        writeln!(s, "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto {svc} }}", vip(i)).unwrap();
    }
    s
}

/// kube-proxy iptables mode's nat table for the same Services (iptables-restore input).
/// `only` limits the Service chains written (a partial restore still rewrites KUBE-SERVICES).
fn kube_proxy_iptables(n: usize, e: usize, only: Option<std::ops::Range<usize>>) -> String {
    let chains = |i: usize| -> (String, Vec<String>) {
        let key = format!("{}/{}:http", name(i).0, name(i).1);
        let svc = format!("KUBE-SVC-{}", &hash(&key)[..16]);
        let seps = (0..e).map(|j| format!("KUBE-SEP-{}", &hash(&format!("{key}{j}"))[..16])).collect();
        (svc, seps)
    };
    let mut s = String::from("*nat\n");
    let writes: Vec<usize> = match &only {
        Some(r) => r.clone().collect(),
        None => (0..n).collect(),
    };
    if only.is_none() {
        s.push_str(":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    }
    s.push_str(":KUBE-SERVICES - [0:0]\n");
    for &i in &writes {
        let (svc, seps) = chains(i);
        writeln!(s, ":{svc} - [0:0]").unwrap();
        for sep in seps {
            writeln!(s, ":{sep} - [0:0]").unwrap();
        }
    }
    if only.is_none() {
        s.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
        s.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    }
    let total = only.as_ref().map_or(n, |r| r.end.max(n));
    for i in 0..total {
        let (svc, _) = chains(i);
        let (ns, nm) = name(i);
        writeln!(s, "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{ns}/{nm}:http cluster IP\" -m tcp --dport 80 -j {svc}", vip(i)).unwrap();
    }
    for &i in &writes {
        let (svc, seps) = chains(i);
        writeln!(s, "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ", vip(i))
            .unwrap();
        for (j, sep) in seps.iter().enumerate() {
            let left = e - j;
            if left > 1 {
                writeln!(s, "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}", 1.0 / left as f64)
                    .unwrap();
            } else {
                writeln!(s, "-A {svc} -j {sep}").unwrap();
            }
        }
        for (j, sep) in seps.iter().enumerate() {
            let ip = endpoint_ip(i, j, e);
            writeln!(
                s,
                "-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ\n-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:8080"
            )
            .unwrap();
        }
    }
    s.push_str("COMMIT\n");
    s
}

#[derive(Default)]
struct Report {
    rows: Vec<(String, usize, usize, String, String, f64)>,
}

impl Report {
    fn add(&mut self, case: &str, n: usize, e: usize, path: &str, metric: &str, v: Option<f64>) {
        let Some(v) = v else { return };
        eprintln!("  {case:12} {n:>6}x{e:<4} {path:40} {metric:14} {v:>12.2}");
        self.rows.push((case.into(), n, e, path.into(), metric.into(), v));
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

/// One endpoint of one Service changes: the agent's path (p50/p99), the kernel's share, any
/// commit's price in that namespace, and the same change resolving everything.
fn incremental_rows(r: &mut Report, n: usize, e: usize, path: &str, inc: &std::collections::BTreeMap<String, f64>) {
    for (key, what) in [
        ("p50_ms", "p50"),
        ("p99_ms", "p99"),
        ("kernel_p50_ms", "kernel p50"),
        ("kernel_p99_ms", "kernel p99"),
        ("any_commit_p50_ms", "any commit p50"),
        ("any_commit_p99_ms", "any commit p99"),
        ("resolve_all_p50_ms", "resolving everything p50"),
    ] {
        r.add("incremental", n, e, &format!("{path} {what}"), "ms", inc.get(key).copied());
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
        // What `--table-shards auto` (the default) picks: one table per 500 Services, at most 32.
        let k = compile::auto_shards(n, 0);
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

/// (p50, p99) in microseconds.
type P50P99 = (f64, f64);

/// New-connection latency from a pod: direct, through nftproxy's ClusterIP with N Services,
/// and through kube-proxy's iptables rules with the Service placed last.
fn bench_dataplane(r: &mut Report, dir: &Path, n: usize) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture = repo.join("netns-fixtures/netns.sh");
    let testpod = repo.join("target/release/nftproxy-testpod");
    let prefix = format!("nbdp{}", std::process::id());
    let sh = |args: &[&str]| {
        let ok = Command::new("bash").arg(&fixture).args(args).status().unwrap().success();
        assert!(ok, "netns.sh {args:?}");
    };
    sh(&["node", &prefix]);
    sh(&["pod", &prefix, "client", "10.244.1.10"]);
    sh(&["pod", &prefix, "web-a", "10.244.1.2"]);
    sh(&["pod", &prefix, "web-b", "10.244.1.3"]);
    let _ = Command::new("ip")
        .args(["netns", "exec", &format!("{prefix}-client"), "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        .status();
    let ns = |n: &str| format!("{prefix}-{n}");
    let mut servers: Vec<_> = ["web-a", "web-b"]
        .iter()
        .map(|pod| {
            Command::new("ip")
                .args(["netns", "exec", &ns(pod), testpod.to_str().unwrap(), "serve", "--name", pod])
                .args(["--tcp", "8080", "--udp", "5353"])
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let measure_once = |addr: &str| -> Option<(f64, f64)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns("client"), testpod.to_str().unwrap(), "latency", addr, "--count", "300"])
            .output()
            .ok()?;
        let kv: std::collections::BTreeMap<String, f64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect();
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
    let k = compile::auto_shards(n, 0);
    node.child_sharded(&["dataplane", &n.to_string(), "5"], k);
    let (via, direct) = paired(&vip);
    record(r, &format!("nftproxy ClusterIP, {k} tables"), via);
    record(r, &format!("direct pod-to-pod (paired with {k} tables)"), direct);
    // Every Service a NodePort: the last one's node port on the node's address, from the pod.
    node.child_env(&["dataplane", &n.to_string(), "5"], k, &[("NFTPROXY_BENCH_EXTERNAL", "nodeport")]);
    let (via, direct) = paired(&format!("192.0.2.1:{}", 10_000 + n - 1));
    record(r, &format!("nftproxy node port, {k} tables"), via);
    record(r, "direct pod-to-pod (paired with node port)", direct);
    bench_conntrack(r, dir, &node, &ns("client"), &testpod);
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
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    std::mem::forget(node);
    sh(&["down", &prefix]);
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
        String::from_utf8_lossy(&out.stderr)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
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

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024)
        })
        .unwrap_or(0);
    let run = |c: &str, a: &[&str]| {
        Command::new(c)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    format!(
        "{cpu}, {cores} cores, {mem} GiB; kernel {}; {}; {}",
        run("uname", &["-r"]),
        run("nft", &["--version"]),
        run("iptables-legacy", &["--version"])
    )
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
    let shards = (n.div_ceil(compile::SERVICES_PER_SHARD).clamp(1, compile::MAX_AUTO_SHARDS as usize)) as u32;
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

fn write_outputs(r: &Report, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut csv = String::from("case,services,endpoints,path,metric,value\n");
    for (case, n, e, path, metric, v) in &r.rows {
        writeln!(csv, "{case},{n},{e},\"{path}\",{metric},{v:.3}").unwrap();
    }
    std::fs::write(dir.join("benchmark.csv"), &csv).unwrap();
    let mut md = format!("# Benchmark results\n\nMachine: {}\n\n", machine());
    md.push_str("| case | Services x endpoints | path | metric | value |\n| --- | --- | --- | --- | ---: |\n");
    for (case, n, e, path, metric, v) in &r.rows {
        let v = if *v < 10.0 { format!("{v:.2}") } else { format!("{v:.1}") };
        writeln!(md, "| {case} | {n} x {e} | {path} | {metric} | {v} |").unwrap();
    }
    let mut f = std::fs::File::create(dir.join("benchmark-results.md")).unwrap();
    f.write_all(md.as_bytes()).unwrap();
    eprintln!("wrote {}/benchmark.csv and {}/benchmark-results.md", dir.display(), dir.display());
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
