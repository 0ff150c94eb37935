//! What the node does, seen from outside with real packets (issue 14): the per-endpoint
//! connection counters on `/metrics`, `nftproxy trace` against the rules the kernel holds,
//! `nftproxy flows` for a held-open connection, and `GET /debug/services` as the running agent
//! changes what it programs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const A: &str = "10.244.1.2";
const B: &str = "10.244.1.3";
const C: &str = "10.244.1.4";

/// An EndpointSlice of Service `svc` (TCP port 8080 `http`, UDP 5353 `dns`) with a weight.
fn slice(svc: &str, name: &str, weight: Option<u32>, ips: &[&str]) -> String {
    let ann = weight.map(|w| format!(", annotations: {{nftproxy.io/weight: \"{w}\"}}")).unwrap_or_default();
    let eps: String = ips.iter().map(|ip| format!("- {{addresses: [{ip}], conditions: {{ready: true}}}}\n")).collect();
    let eps = if eps.is_empty() { "endpoints: []\n".to_string() } else { format!("endpoints:\n{eps}") };
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {svc}}}{ann}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\n{eps}"
    )
}

/// Service `name` at `vip`: TCP 80 -> http, UDP 53 -> dns.
fn service(name: &str, vip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: {vip}, ports: [{{name: http, protocol: TCP, port: 80, targetPort: http}}, \
         {{name: dns, protocol: UDP, port: 53, targetPort: dns}}]}}\n"
    )
}

fn web(ips: &[&str]) -> String {
    service("web", "10.96.0.80") + &slice("web", "web-1", None, ips)
}

/// A second Service, unrelated to web, whose changes must leave web's counters alone.
fn other(port: u16) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: default}}\n\
         spec: {{clusterIP: 10.96.0.90, ports: [{{name: http, protocol: TCP, port: {port}, targetPort: http}}]}}\n{}",
        slice("other", "other-1", None, &[C])
    )
}

fn pod_of(ip: &str) -> &'static str {
    demo_pods().iter().find(|p| p.1 == ip).map(|p| p.0).unwrap_or_else(|| panic!("no pod at {ip}"))
}

fn ip_of(pod: &str) -> &'static str {
    demo_pods().iter().find(|p| p.0 == pod).map(|p| p.1).unwrap_or_else(|| panic!("no pod {pod}"))
}

/// A metrics address of our own for each agent (tests run in parallel, each in its own netns).
fn agent(c: &Cluster, name: &str, manifests: &Path, metrics: &str) -> Agent {
    c.start_agent(
        name,
        &[
            "--manifests",
            manifests.to_str().unwrap(),
            "--watch",
            "--min-sync-period",
            "100ms",
            "--metrics-bind-address",
            metrics,
            "--healthz-bind-address",
            "127.0.0.1:0",
        ],
    )
}

/// Waits until web's ClusterIP answers (exactly one connection succeeds here).
fn wait_served(c: &Cluster, agent: &Agent) {
    let served = || c.probe("client", "tcp", "10.96.0.80:80", 1).keys().any(|k| k.starts_with("web-"));
    assert!(wait_until(20, served), "{}", agent.log_text());
}

/// `nftproxy_endpoint_connections_total` of Service `svc`: (protocol, endpoint) -> value.
fn counters(c: &Cluster, metrics: &str, svc: &str) -> BTreeMap<(String, String), u64> {
    let (code, body) = c.http_get(metrics, "/metrics").expect("scrape /metrics");
    assert_eq!(code, 200, "{body}");
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("nftproxy_endpoint_connections_total{")) {
        let (labels, value) = line.rsplit_once(' ').unwrap();
        let label = |k: &str| {
            let at = labels.find(&format!("{k}=\"")).unwrap_or_else(|| panic!("no {k} in {line}")) + k.len() + 2;
            labels[at..].split('"').next().unwrap().to_string()
        };
        if label("service") == svc && label("namespace") == "default" {
            out.insert((label("protocol"), label("endpoint")), value.parse().unwrap());
        }
    }
    out
}

/// The counters once the agent's 2 s background read has certainly run after what came before.
fn fresh_counters(c: &Cluster, metrics: &str, svc: &str) -> BTreeMap<(String, String), u64> {
    std::thread::sleep(Duration::from_millis(2600));
    counters(c, metrics, svc)
}

fn delta(
    after: &BTreeMap<(String, String), u64>,
    before: &BTreeMap<(String, String), u64>,
    proto: &str,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|((p, _), _)| p == proto)
        .map(|((_, ep), v)| (ep.clone(), v - before.get(&(proto.to_string(), ep.clone())).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// Probe answers as endpoint `IP:PORT` -> count; panics on any error (every connection must
/// be answered, so the total sent is the total answered).
fn answered(tally: &BTreeMap<String, usize>, port: u16) -> BTreeMap<String, u64> {
    tally
        .iter()
        .map(|(pod, n)| {
            assert!(pod.starts_with("web-"), "a probe failed: {tally:?}");
            (format!("{}:{port}", ip_of(pod)), *n as u64)
        })
        .collect()
}

fn add(a: &mut BTreeMap<String, u64>, b: BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k).or_default() += v;
    }
}

#[test]
fn endpoint_counters_count_each_connection_its_backend_answered() {
    let Some(c) = web_cluster(&[8080], &[5353]) else { return };
    let m = c.write("web.yaml", &web(&[A, B, C]));
    let metrics = "127.0.0.1:19101";
    let agent = agent(&c, "agent", &m, metrics);
    wait_served(&c, &agent);
    let before = fresh_counters(&c, metrics, "web");
    // TCP from a pod and from the node itself (host network, the output hook); UDP datagrams
    // from fresh sockets: each a new connection.
    let mut tcp = answered(&c.probe("client", "tcp", "10.96.0.80:80", 60), 8080);
    add(&mut tcp, answered(&c.probe("node", "tcp", "10.96.0.80:80", 15), 8080));
    // From ports 20000.. (below the ephemeral range): no datagram can meet a live entry.
    let udp = answered(&c.probe_sports("client", "udp", "10.96.0.80:53", 45, 20000), 5353);
    let after = fresh_counters(&c, metrics, "web");
    assert_eq!(delta(&after, &before, "tcp"), tcp, "TCP counters against the answers\n{after:?}");
    assert_eq!(delta(&after, &before, "udp"), udp, "UDP counters against the answers\n{after:?}");
    assert_eq!(delta(&after, &before, "tcp").values().sum::<u64>(), 75);
    assert_eq!(delta(&after, &before, "udp").values().sum::<u64>(), 45);
    assert!(tcp.len() >= 2 && udp.len() >= 2, "spread over the endpoints: {tcp:?} {udp:?}");
    // The labels say which Service port: the Service port number, the endpoint as IP:PORT.
    let (_, body) = c.http_get(metrics, "/metrics").unwrap();
    let want = format!(
        "nftproxy_endpoint_connections_total{{namespace=\"default\",service=\"web\",protocol=\"tcp\",port=\"80\",endpoint=\"{A}:8080\"}}"
    );
    assert!(body.contains(&want), "{body}");
}

#[test]
fn counters_survive_an_unrelated_partial_sync_and_a_restart_and_go_with_their_endpoint() {
    let Some(c) = web_cluster(&[8080], &[5353]) else { return };
    let m = c.write("web.yaml", &(web(&[A, B, C]) + &other(80)));
    let metrics = "127.0.0.1:19102";
    let first = agent(&c, "first", &m, metrics);
    wait_served(&c, &first);
    c.probe("client", "tcp", "10.96.0.80:80", 30);
    let before = fresh_counters(&c, metrics, "web");
    assert_eq!(before.values().sum::<u64>(), 31, "{before:?}");
    // Another Service changes: a partial sync that does not touch web.
    c.write("web.yaml", &(web(&[A, B, C]) + &other(81)));
    assert!(
        wait_until(20, || c.probe("client", "tcp", "10.96.0.90:81", 1).contains_key("web-c")),
        "the change was not applied\n{}",
        first.log_text()
    );
    let (_, body) = c.http_get(metrics, "/metrics").unwrap();
    let partial = metric(&body, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    assert!(partial >= 1.0, "the change was not a partial sync:\n{body}");
    assert_eq!(fresh_counters(&c, metrics, "web"), before, "an unrelated partial sync reset web's counters");
    // A restart: the kernel kept counting, the new agent reads the same values.
    assert!(first.terminate().success());
    c.probe("client", "tcp", "10.96.0.80:80", 5);
    let second = agent(&c, "second", &m, metrics);
    assert!(wait_until(20, || c.http_get(metrics, "/metrics").is_some()), "{}", second.log_text());
    let restarted = fresh_counters(&c, metrics, "web");
    assert_eq!(restarted.values().sum::<u64>(), 36, "{restarted:?}\n{}", second.log_text());
    for (k, v) in &before {
        assert!(restarted[k] >= *v, "{k:?} went back from {v} to {}", restarted[k]);
    }
    // An endpoint that goes takes its series with it.
    c.write("web.yaml", &(web(&[A, B]) + &other(81)));
    let gone = (String::from("tcp"), format!("{C}:8080"));
    assert!(
        wait_until(20, || !fresh_counters(&c, metrics, "web").contains_key(&gone)),
        "web-c's series stayed\n{}",
        second.log_text()
    );
}

#[test]
fn counters_can_be_turned_off() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let m = c.write("web.yaml", &web(&[A]));
    c.sync(&m, &["--endpoint-counters=false"]);
    assert!(!c.nft_list("inet nftproxy").contains("counter packets 0 bytes 0 dnat"), "{}", c.nft_list("inet nftproxy"));
    c.sync(&m, &[]);
    assert!(c.nft_list("inet nftproxy").contains("counter packets 0 bytes 0 dnat"), "{}", c.nft_list("inet nftproxy"));
}

/// `nftproxy trace ARGS` in the node namespace: (exit success, stdout, stderr).
fn trace(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let mut full = vec!["trace"];
    full.extend_from_slice(args);
    let out = c.nftproxy(&full);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The endpoint lines of a trace: `IP:PORT` -> share.
fn shares(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, share) = (f.next()?, f.next()?);
            share.ends_with('%').then(|| (addr.to_string(), share.to_string()))
        })
        .collect()
}

fn is_line(text: &str, want: &str) -> bool {
    text.lines().any(|l| l.trim() == want)
}

#[test]
fn trace_reads_the_kernel_weighted_empty_unknown_and_without_manifests() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let yaml = web(&[A, B, C])
        + &service("canary", "10.96.0.70")
        + &slice("canary", "canary-stable", Some(9), &[A])
        + &slice("canary", "canary-new", Some(1), &[B])
        + &service("empty", "10.96.0.99")
        + &slice("empty", "empty-1", None, &[]);
    let m = c.write("svc.yaml", &yaml);
    // Four tables: trace must read every shard.
    c.sync(&m, &["--cluster-cidr", "10.244.0.0/16", "--table-shards", "4"]);
    std::fs::remove_file(&m).unwrap();

    let (ok, canary, err) = trace(&c, &["--from", "10.244.1.10", "tcp", "10.96.0.70:80"]);
    assert!(ok, "{err}");
    assert!(canary.starts_with("tcp 10.96.0.70:80 from 10.244.1.10: Service default/canary"), "{canary}");
    let want: BTreeMap<String, String> =
        [(format!("{A}:8080"), "90.0%".to_string()), (format!("{B}:8080"), "10.0%".to_string())].into();
    assert_eq!(shares(&canary), want, "{canary}");
    assert!(canary.contains("no masquerade"), "a pod is not masqueraded: {canary}");
    // The real split agrees (9:1 over 400 connections: web-b between 15 and 80).
    let real = c.probe("client", "tcp", "10.96.0.70:80", 400);
    let b = real.get("web-b").copied().unwrap_or(0);
    assert!(real.get("web-a").copied().unwrap_or(0) + b == 400 && (15..=80).contains(&b), "{real:?}");

    let (ok, web, _) = trace(&c, &["TCP", "10.96.0.80:80"]);
    assert!(ok);
    assert_eq!(shares(&web).values().collect::<Vec<_>>(), ["33.3%", "33.3%", "33.3%"], "{web}");
    assert!(web.contains("  masquerade"), "a client outside the pod network is masqueraded: {web}");

    let (ok, empty, _) = trace(&c, &["tcp", "10.96.0.99:80"]);
    assert!(ok && is_line(&empty, "reject"), "{empty}");
    let (ok, no_port, _) = trace(&c, &["udp", "10.96.0.80:54"]);
    assert!(ok && is_line(&no_port, "reject"), "a Service address on a port it does not have: {no_port}");
    let (ok, unknown, _) = trace(&c, &["tcp", "10.1.2.3:80"]);
    assert!(ok && is_line(&unknown, "no service"), "{unknown}");

    for bad in [&["tcp", "garbage"][..], &["icmp", "10.96.0.80:80"], &["tcp", "10.96.0.80"], &["tcp", "[fd00::1]"]] {
        let (ok, out, err) = trace(&c, bad);
        assert!(!ok && out.is_empty() && err.contains("expected") && !err.contains("panicked"), "{bad:?}: {err}");
    }
}

#[test]
fn trace_follows_a_rule_deleted_with_nft_and_says_what_it_does_not_know() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let m = c.write("web.yaml", &web(&[A, B, C]));
    c.sync(&m, &[]);
    let chain = "svc4/default/web/tcp/80";
    // The first pick (web-a) goes: the kernel now splits between web-b and web-c.
    let listing = c.exec_ok("node", &["nft", "-a", "list", "chain", "inet", "nftproxy", chain]);
    let first = listing.lines().find(|l| l.contains("numgen")).expect(&listing);
    let handle = first.rsplit("handle ").next().unwrap().trim();
    c.exec_ok("node", &["nft", "delete", "rule", "inet", "nftproxy", chain, "handle", handle]);
    let (ok, out, err) = trace(&c, &["tcp", "10.96.0.80:80"]);
    assert!(ok, "{err}");
    let want: BTreeMap<String, String> =
        [(format!("{B}:8080"), "50.0%".to_string()), (format!("{C}:8080"), "50.0%".to_string())].into();
    assert_eq!(shares(&out), want, "{out}");
    let real = c.probe("client", "tcp", "10.96.0.80:80", 30);
    assert!(!real.contains_key(pod_of(A)) && real.values().sum::<usize>() == 30, "{real:?}");
    // A rule nftproxy never writes: no crash, a note, and the rest still traced.
    c.exec_ok("node", &["nft", "insert", "rule", "inet", "nftproxy", chain, "ip", "saddr", "192.0.2.77", "log"]);
    let (ok, out, err) = trace(&c, &["tcp", "10.96.0.80:80"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("note: rule 1 of chain svc4/default/web/tcp/80") && out.contains("not one nftproxy writes"),
        "{out}"
    );
    assert_eq!(shares(&out).len(), 2, "{out}");
}

#[test]
fn trace_covers_node_ports_ipv6_and_affinity() {
    let Some(c) = web_cluster(&[8080], &[5353]) else { return };
    c.sync(&demo_manifests(), &["--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/48"]);
    let (ok, np, _) = trace(&c, &["tcp", "192.0.2.1:30080"]);
    assert!(ok && np.contains("Service default/web") && shares(&np).len() == 3, "{np}");
    assert!(shares(&np).values().all(|s| s == "33.3%"), "{np}");
    let (ok, v6, _) = trace(&c, &["--from", "fd00:10:244:1::10", "tcp", "[fd00:10:96::80]:80"]);
    assert!(ok && shares(&v6).contains_key("[fd00:10:244:1::3]:8080"), "{v6}");
    // ClientIP affinity: after one connection the client is pinned to the endpoint it got.
    let sticky = "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: default}\n\
                  spec: {clusterIP: 10.96.0.77, sessionAffinity: ClientIP, ports: [{name: http, port: 80, targetPort: http}]}\n"
        .to_string()
        + &slice("sticky", "sticky-1", None, &[A, B, C]);
    let m = c.write("sticky.yaml", &sticky);
    c.sync(&m, &[]);
    let (_, before, _) = trace(&c, &["--from", "10.244.1.10", "tcp", "10.96.0.77:80"]);
    assert!(before.contains("session affinity: ClientIP, 10800s; 10.244.1.10 has no endpoint yet"), "{before}");
    assert_eq!(shares(&before).len(), 3, "{before}");
    let got = c.probe("client", "tcp", "10.96.0.77:80", 1);
    let pod = got.keys().next().expect("answered").clone();
    let (_, after, _) = trace(&c, &["--from", "10.244.1.10", "tcp", "10.96.0.77:80"]);
    let want: BTreeMap<String, String> = [(format!("{}:8080", ip_of(&pod)), "100.0%".to_string())].into();
    assert_eq!(shares(&after), want, "{after}");
    assert!(after.contains("10.244.1.10 is pinned"), "{after}");
}

#[test]
fn flows_show_the_backend_a_held_connection_really_reached() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let m = c.write("web.yaml", &(web(&[A, B, C]) + &other(80)));
    c.sync(&m, &[]);
    let hold = Command::new("ip")
        .args(["netns", "exec", &c.ns("client"), TESTPOD, "hold", "10.96.0.80:80", "--seconds", "4"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let established = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("tcp  10.244.1.10:") && l.contains("ESTABLISHED"))
            .map(String::from)
            .collect()
    };
    let mut seen = Vec::new();
    assert!(
        wait_until(3, || {
            let out = c.nftproxy(&["flows", "default/web"]);
            seen = established(&String::from_utf8_lossy(&out.stdout));
            out.status.success() && !seen.is_empty()
        }),
        "no flow: {seen:?}"
    );
    let all = String::from_utf8_lossy(&c.nftproxy(&["flows"]).stdout).into_owned();
    let other = String::from_utf8_lossy(&c.nftproxy(&["flows", "default/other"]).stdout).into_owned();
    let held = hold.wait_with_output().unwrap();
    let held = String::from_utf8_lossy(&held.stdout).into_owned();
    let pod = held.split_whitespace().next().unwrap();
    assert!(held.contains("held"), "{held}");
    assert_eq!(seen.len(), 1, "{seen:?}");
    let f: Vec<&str> = seen[0].split_whitespace().collect();
    assert_eq!(&f[2..], ["10.96.0.80:80", &format!("{}:8080", ip_of(pod)), "ESTABLISHED", "default/web"], "{seen:?}");
    assert_eq!(established(&all), seen, "{all}");
    assert!(established(&other).is_empty(), "another Service's flows: {other}");
    let (ok, err) = {
        let out = c.nftproxy(&["flows", "nonsense"]);
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert!(!ok && err.contains("NAMESPACE/NAME"), "{err}");
}

fn debug_services(c: &Cluster, addr: &str) -> Option<serde_json::Value> {
    let (code, body) = c.http_get(addr, "/debug/services")?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

fn endpoints_of(v: &serde_json::Value, name: &str, proto: &str) -> Option<Vec<(String, u64)>> {
    let svc = v.as_array()?.iter().find(|s| s["name"] == name && s["namespace"] == "default")?;
    let port = svc["ports"].as_array()?.iter().find(|p| p["protocol"] == proto)?;
    port["endpoints"]
        .as_array()?
        .iter()
        .map(|e| Some((e["address"].as_str()?.to_string(), e["weight"].as_u64()?)))
        .collect()
}

#[test]
fn debug_services_follows_what_the_running_agent_programs() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let yaml = |web_eps: &str| {
        service("web", "10.96.0.80") + web_eps + &service("empty", "10.96.0.99") + &slice("empty", "empty-1", None, &[])
    };
    let m = c.write("svc.yaml", &yaml(&slice("web", "web-1", None, &[A, B, C])));
    let addr = "127.0.0.1:19103";
    let agent = agent(&c, "agent", &m, addr);
    let mut v = None;
    assert!(
        wait_until(20, || {
            v = debug_services(&c, addr);
            v.as_ref().and_then(|v| v.as_array()).is_some_and(|a| a.len() == 2)
        }),
        "{v:?}\n{}",
        agent.log_text()
    );
    let v = v.unwrap();
    let three: Vec<(String, u64)> = [A, B, C].iter().map(|ip| (format!("{ip}:8080"), 1)).collect();
    assert_eq!(endpoints_of(&v, "web", "tcp"), Some(three), "{v:#}");
    assert_eq!(endpoints_of(&v, "empty", "tcp"), Some(vec![]), "{v:#}");
    let web = v.as_array().unwrap().iter().find(|s| s["name"] == "web").unwrap();
    assert_eq!(web["ports"][0]["clusterIPs"], serde_json::json!(["10.96.0.80"]), "{v:#}");
    assert_eq!(web["ports"][0]["port"], 80, "{v:#}");
    // The agent applies a change: web-c goes, web-b is drained (weight 0).
    c.write("svc.yaml", &yaml(&(slice("web", "web-1", None, &[A]) + &slice("web", "web-2", Some(0), &[B]))));
    let want = vec![(format!("{A}:8080"), 1), (format!("{B}:8080"), 0)];
    let mut now = None;
    assert!(
        wait_until(20, || {
            now = debug_services(&c, addr).and_then(|v| endpoints_of(&v, "web", "tcp"));
            now.as_ref() == Some(&want)
        }),
        "{now:?}\n{}",
        agent.log_text()
    );
    // And the kernel agrees: nothing reaches the drained or removed pods.
    let real = c.probe("client", "tcp", "10.96.0.80:80", 20);
    assert_eq!(real.get("web-a"), Some(&20), "{real:?}");
}
