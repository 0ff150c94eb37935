//! External traffic with real packets: node ports, external IPs and load-balancer IPs reached
//! from a host outside the cluster (the "ext" namespace, 192.0.2.2 / 2001:db8::2, on the node's
//! uplink ext0 = 192.0.2.1 / 2001:db8::1), from a pod and from the node itself;
//! externalTrafficPolicy Local, source ranges, rejection without endpoints, the UDP conntrack
//! cleanup through a node port, health-check node ports and live node-address changes.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

type Tally = BTreeMap<String, usize>;

/// `--cluster-cidr` for both families, given on every sync.
const CIDRS: [&str; 4] = ["--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/48"];
const NODE: [&str; 2] = ["--node-name", "node-1"];
const WEB: [&str; 3] = ["web-a", "web-b", "web-c"];

/// CIDRS + NODE + `extra`.
fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = CIDRS.iter().chain(NODE.iter()).copied().collect();
    v.extend_from_slice(extra);
    v
}

fn total(t: &Tally) -> usize {
    t.values().sum()
}

/// Every answer came from a web pod (and there was one).
fn only_web(t: &Tally) -> bool {
    !t.is_empty() && t.keys().all(|k| k.starts_with("web-"))
}

/// No web pod answered.
fn no_web(t: &Tally) -> bool {
    !t.keys().any(|k| k.starts_with("web-"))
}

fn all_three(t: &Tally) -> bool {
    only_web(t) && WEB.iter().all(|p| t.get(*p).copied().unwrap_or(0) > 0)
}

/// The pod names and the client addresses they saw, from a `probe_full` tally.
fn split_full(t: &Tally) -> (Tally, Vec<String>) {
    let mut pods = Tally::new();
    let mut peers = Vec::new();
    for (k, n) in t {
        let mut it = k.split_whitespace();
        let pod = it.next().unwrap_or("?").to_string();
        if pod.starts_with("web-") {
            if let Some(peer) = it.next()
                && !peers.iter().any(|p| p == peer)
            {
                peers.push(peer.to_string());
            }
            *pods.entry(pod).or_default() += n;
        } else {
            *pods.entry(k.clone()).or_default() += n;
        }
    }
    (pods, peers)
}

fn ip_of(pod: &str, v6: bool) -> &'static str {
    let p = demo_pods().iter().find(|p| p.0 == pod).unwrap_or_else(|| panic!("no pod {pod}"));
    if v6 { p.2 } else { p.1 }
}

/// EndpointSlices (one per family in `families`) of Service `svc` for one named port, over
/// `eps` = (pod, nodeName).
fn slices(svc: &str, port: &str, proto: &str, target: u16, eps: &[(&str, &str)], families: &[bool]) -> String {
    let mut out = String::new();
    for &v6 in families {
        let (ty, suffix) = if v6 { ("IPv6", "v6") } else { ("IPv4", "v4") };
        let list = if eps.is_empty() {
            "endpoints: []\n".to_string()
        } else {
            let items: Vec<String> = eps
                .iter()
                .map(|(pod, node)| {
                    format!(
                        "- {{addresses: [\"{}\"], nodeName: {node}, conditions: {{ready: true, serving: true, terminating: false}}}}\n",
                        ip_of(pod, v6)
                    )
                })
                .collect();
            format!("endpoints:\n{}", items.concat())
        };
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {svc}-{suffix}, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             addressType: {ty}\nports: [{{name: {port}, port: {target}, protocol: {proto}}}]\n{list}"
        ));
    }
    out
}

/// Service "web": dual-stack NodePort, TCP 80 -> 8080, node port 30080; `spec_extra` are more
/// spec lines (two-space indented, newline-terminated).
fn web(spec_extra: &str, eps: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: NodePort\n  \
         clusterIP: 10.96.0.80\n  clusterIPs: [10.96.0.80, \"fd00:10:96::80\"]\n  ipFamilies: [IPv4, IPv6]\n  \
         ipFamilyPolicy: RequireDualStack\n{spec_extra}  \
         ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}]\n{}",
        slices("web", "http", "TCP", 8080, eps, &[false, true])
    )
}

const ALL_ON_NODE_1: &[(&str, &str)] = &[("web-a", "node-1"), ("web-b", "node-1"), ("web-c", "node-1")];
const A_LOCAL: &[(&str, &str)] = &[("web-a", "node-1"), ("web-b", "node-2"), ("web-c", "node-2")];
const NONE_LOCAL: &[(&str, &str)] = &[("web-a", "node-2"), ("web-b", "node-2"), ("web-c", "node-2")];

fn listing(c: &Cluster) -> String {
    if c.has_table() { c.nft_list("inet nftproxy") } else { "(no table inet nftproxy)".into() }
}

/// One TCP connection from namespace `ns` (short name), bound to source address `src`; the
/// first line the server sends (`NAME PEER`), or `error: KIND` as the test pod's probe says it.
fn tcp_from(c: &Cluster, ns: &str, src: &str, addr: &str, timeout_ms: u64) -> String {
    let src: IpAddr = src.parse().unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    in_netns(&c.ns(ns), move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let t = Duration::from_millis(timeout_ms);
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).unwrap();
        s.bind(&SocketAddr::new(src, 0).into()).unwrap();
        if let Err(e) = s.connect_timeout(&addr.into(), t) {
            return format!("error: {}", e.kind());
        }
        let s: std::net::TcpStream = s.into();
        s.set_read_timeout(Some(t)).unwrap();
        let mut line = String::new();
        match BufReader::new(s).read_line(&mut line) {
            Ok(_) => line.trim().to_string(),
            Err(e) => format!("error: {}", e.kind()),
        }
    })
}

/// An HTTP response: status code, header block (lower-cased), body.
#[derive(Debug)]
struct Response {
    code: u16,
    headers: String,
    body: String,
}

impl Response {
    /// The body without any whitespace (kube-proxy's template indents it).
    fn compact(&self) -> String {
        self.body.chars().filter(|c| !c.is_whitespace()).collect()
    }
}

/// HTTP GET from inside namespace `ns` (short name): the response, or `error: KIND`.
fn http_get_from(c: &Cluster, ns: &str, addr: &str, path: &str) -> Result<Response, String> {
    let (addr, path) = (addr.parse::<SocketAddr>().unwrap(), path.to_string());
    in_netns(&c.ns(ns), move || {
        let err = |e: std::io::Error| format!("error: {}", e.kind());
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(err)?;
        s.set_read_timeout(Some(Duration::from_secs(3))).map_err(err)?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(err)?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(err)?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no header end in {text:?}"))?;
        let code =
            head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("bad {head:?}"))?;
        Ok(Response { code, headers: head.to_ascii_lowercase(), body: body.to_string() })
    })
}

// --- 1 + 8: NodePort, ETP Cluster, from outside / a pod / the node, IPv4 and IPv6 -------------

#[test]
fn node_port_from_outside_a_pod_and_the_node_on_the_node_port_addresses_only() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let m = c.write("web.yaml", &web("", ALL_ON_NODE_1));
    let report = c.sync(&m, &flags(&[]));

    // From outside: all three pods, each seeing a node address (masqueraded), never 192.0.2.2.
    let (pods, peers) = split_full(&c.probe_full("ext", "tcp", "192.0.2.1:30080", 30));
    assert!(
        all_three(&pods) && total(&pods) == 30,
        "ext -> 192.0.2.1:30080: every connection answered, by all three pods: {pods:?}\n{report}\n{}",
        listing(&c)
    );
    assert!(
        !peers.is_empty() && peers.iter().all(|p| p == "169.254.1.1" || p == "192.0.2.1" || p.starts_with("10.244.")),
        "ext -> 192.0.2.1:30080 (externalTrafficPolicy Cluster) must be masqueraded to a node address, pods saw {peers:?}"
    );

    // From a pod and from the node itself.
    for from in ["client", "node"] {
        let got = c.probe(from, "tcp", "192.0.2.1:30080", 30);
        assert!(all_three(&got) && total(&got) == 30, "{from} -> 192.0.2.1:30080: {got:?}");
    }

    // IPv6 from outside: the pods' IPv6 addresses, masqueraded to the node's.
    let (pods, peers) = split_full(&c.probe_full("ext", "tcp", "[2001:db8::1]:30080", 30));
    assert!(all_three(&pods) && total(&pods) == 30, "ext -> [2001:db8::1]:30080: {pods:?}\n{}", listing(&c));
    assert!(
        !peers.is_empty() && peers.iter().all(|p| p.contains(':') && p != "2001:db8::2"),
        "ext -> [2001:db8::1]:30080 must reach the pods over IPv6, masqueraded; pods saw {peers:?}"
    );
    let ct = c.exec_ok("node", &["conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--orig-dst", "2001:db8::1"]);
    for pod in WEB {
        let v6 = ip_of(pod, true);
        assert!(ct.contains(&format!("src={v6} ")), "no conntrack entry via [2001:db8::1]:30080 to {v6}:\n{ct}");
    }
    let got = c.probe("client", "tcp", "[2001:db8::1]:30080", 15);
    assert!(only_web(&got) && total(&got) == 15, "client -> [2001:db8::1]:30080: {got:?}");

    // Localhost never serves node ports (nothing listens there on the node).
    let got = c.probe_ms("node", "tcp", "127.0.0.1:30080", 3, 1000);
    assert!(no_web(&got) && total(&got) == 3, "node -> 127.0.0.1:30080 must not be served: {got:?}");

    // --nodeport-addresses 198.51.100.0/24: that address serves, 192.0.2.1 no longer does.
    c.exec_ok("node", &["ip", "addr", "add", "198.51.100.1/24", "dev", "ext0"]);
    c.exec_ok("ext", &["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);
    let report = c.sync(&m, &flags(&["--nodeport-addresses", "198.51.100.0/24"]));
    let got = c.probe("ext", "tcp", "198.51.100.1:30080", 30);
    assert!(all_three(&got) && total(&got) == 30, "ext -> 198.51.100.1:30080: {got:?}\n{report}\n{}", listing(&c));
    let got = c.probe_ms("ext", "tcp", "192.0.2.1:30080", 3, 1000);
    assert!(
        no_web(&got) && total(&got) == 3,
        "192.0.2.1 is outside --nodeport-addresses 198.51.100.0/24 and must not serve node ports: {got:?}\n{}",
        listing(&c)
    );
    let got = c.probe_ms("ext", "tcp", "[2001:db8::1]:30080", 3, 1000);
    assert!(no_web(&got), "2001:db8::1 is outside --nodeport-addresses 198.51.100.0/24: {got:?}");
}

// --- 2: externalTrafficPolicy Local ----------------------------------------------------------

#[test]
fn external_traffic_policy_local_keeps_the_client_and_uses_local_endpoints_only() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let local = "  externalTrafficPolicy: Local\n";
    let m = c.write("web.yaml", &web(local, A_LOCAL));
    let report = c.sync(&m, &flags(&[]));

    // From outside: only the local web-a, which sees the real client.
    let got = c.probe_full("ext", "tcp", "192.0.2.1:30080", 20);
    assert_eq!(
        got.get("web-a 192.0.2.2"),
        Some(&20),
        "ext -> 192.0.2.1:30080 (Local): only web-a, seeing 192.0.2.2; saw {got:?}\n{report}\n{}",
        listing(&c)
    );
    let got = c.probe_full("ext", "tcp", "[2001:db8::1]:30080", 10);
    assert_eq!(got.get("web-a 2001:db8::2"), Some(&10), "ext -> [2001:db8::1]:30080 (Local): saw {got:?}");

    // From a pod (inside --cluster-cidr) and from the node: not external, every endpoint.
    for from in ["client", "node"] {
        let got = c.probe(from, "tcp", "192.0.2.1:30080", 30);
        assert!(all_three(&got) && total(&got) == 30, "{from} -> 192.0.2.1:30080 (Local, short-circuit): {got:?}");
    }
    let (_, peers) = split_full(&c.probe_full("client", "tcp", "192.0.2.1:30080", 6));
    assert_eq!(peers, ["10.244.1.10"], "a pod's connection through a Local node port keeps its address");

    // No local endpoint: external traffic is dropped (times out), pods still reach all.
    c.write("web.yaml", &web(local, NONE_LOCAL));
    c.sync(&m, &flags(&[]));
    let got = c.probe_ms("ext", "tcp", "192.0.2.1:30080", 3, 1000);
    assert_eq!(
        got.get("error: timed out"),
        Some(&3),
        "ext -> 192.0.2.1:30080 (Local, no local endpoint) must be dropped: {got:?}\n{}",
        listing(&c)
    );
    let got = c.probe("client", "tcp", "192.0.2.1:30080", 30);
    assert!(all_three(&got) && total(&got) == 30, "client -> 192.0.2.1:30080 (Local, none local): {got:?}");
}

// --- 3: external IPs, load-balancer IPs, source ranges, ipMode Proxy --------------------------

fn eip_and_lb(range: &str) -> String {
    let eps = &[("web-a", "node-1"), ("web-b", "node-1"), ("web-c", "node-1")];
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: eip}}\nspec:\n  clusterIP: 10.96.0.81\n  \
         externalIPs: [203.0.113.10]\n  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]\n{}---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: lb}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.82\n  \
         loadBalancerSourceRanges: [{range}]\n  \
         ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}}]\n\
         status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.7}}, {{ip: 198.51.100.8, ipMode: Proxy}}]}}}}\n{}",
        slices("eip", "http", "TCP", 8080, eps, &[false]),
        slices("lb", "http", "TCP", 8080, eps, &[false]),
    )
}

#[test]
fn external_ips_and_load_balancer_ips_with_source_ranges() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    c.exec_ok("ext", &["ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.1"]);
    c.exec_ok("ext", &["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);
    // A second (secondary) address outside: 192.0.2.2 stays the default source.
    c.exec_ok("ext", &["ip", "addr", "add", "192.0.2.3/24", "dev", "eth0"]);
    let m = c.write("svc.yaml", &eip_and_lb("192.0.2.2/32"));
    let report = c.sync(&m, &flags(&[]));

    let got = c.probe("ext", "tcp", "203.0.113.10:80", 30);
    assert!(
        all_three(&got) && total(&got) == 30,
        "ext -> external IP 203.0.113.10:80: {got:?}\n{report}\n{}",
        listing(&c)
    );
    let got = c.probe("ext", "tcp", "198.51.100.7:80", 30);
    assert!(
        all_three(&got) && total(&got) == 30,
        "ext (192.0.2.2, allowed) -> LB IP 198.51.100.7:80: {got:?}\n{}",
        listing(&c)
    );
    // The same host from a source outside the ranges: dropped.
    let seen = tcp_from(&c, "ext", "192.0.2.3", "198.51.100.7:80", 1000);
    assert_eq!(
        seen,
        "error: timed out",
        "192.0.2.3 is outside loadBalancerSourceRanges [192.0.2.2/32]\n{}",
        listing(&c)
    );
    // Source ranges do not limit the external IP.
    let seen = tcp_from(&c, "ext", "192.0.2.3", "203.0.113.10:80", 3000);
    assert!(seen.starts_with("web-"), "external IPs are not limited by source ranges: {seen}");
    // ipMode: Proxy is not served.
    let got = c.probe_ms("ext", "tcp", "198.51.100.8:80", 2, 1000);
    assert!(no_web(&got) && total(&got) == 2, "ingress ipMode Proxy 198.51.100.8 must not be served: {got:?}");

    // Only 192.0.2.3 allowed now: ext's default source 192.0.2.2 is dropped, 192.0.2.3 served.
    c.write("svc.yaml", &eip_and_lb("192.0.2.3/32"));
    c.sync(&m, &flags(&[]));
    let got = c.probe_ms("ext", "tcp", "198.51.100.7:80", 3, 1000);
    assert_eq!(
        got.get("error: timed out"),
        Some(&3),
        "ext (192.0.2.2) outside loadBalancerSourceRanges [192.0.2.3/32] must be dropped: {got:?}\n{}",
        listing(&c)
    );
    let seen = tcp_from(&c, "ext", "192.0.2.3", "198.51.100.7:80", 3000);
    assert!(seen.starts_with("web-"), "192.0.2.3 (allowed) -> 198.51.100.7:80: {seen}\n{}", listing(&c));
    // The LB Service's node port is not limited either.
    let got = c.probe("ext", "tcp", "192.0.2.1:30081", 10);
    assert!(only_web(&got) && total(&got) == 10, "node port of the LB Service from 192.0.2.2: {got:?}");

    // Back to 192.0.2.2/32: served again.
    c.write("svc.yaml", &eip_and_lb("192.0.2.2/32"));
    c.sync(&m, &flags(&[]));
    let got = c.probe("ext", "tcp", "198.51.100.7:80", 10);
    assert!(only_web(&got) && total(&got) == 10, "ext (192.0.2.2, allowed again) -> 198.51.100.7:80: {got:?}");
}

// --- 4: no endpoints --------------------------------------------------------------------------

#[test]
fn node_port_without_endpoints_is_refused_even_with_a_node_listener_on_the_port() {
    let Some(mut c) = web_cluster(&[8080], &[]) else { return };
    c.serve("node", "node-listener", &[30099], &[30099]);
    // Without the rules the node's own process answers: the refusal below is nftproxy's.
    let got = c.probe("ext", "tcp", "192.0.2.1:30099", 1);
    assert_eq!(got.get("node-listener"), Some(&1), "control: {got:?}");
    let m = c.write(
        "empty.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: empty}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.99\n  \
             ports:\n  - {{name: tcp, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30099}}\n  \
             - {{name: udp, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30099}}\n{}",
            slices("empty", "tcp", "TCP", 8080, &[], &[false])
        ),
    );
    let report = c.sync(&m, &flags(&[]));
    let got = c.probe("ext", "tcp", "192.0.2.1:30099", 3);
    assert_eq!(
        got.get("error: connection refused"),
        Some(&3),
        "TCP to a node port without endpoints must be refused at once: {got:?}\n{report}\n{}",
        listing(&c)
    );
    let got = c.probe("ext", "udp", "192.0.2.1:30099", 3);
    assert_eq!(got.get("error: connection refused"), Some(&3), "UDP likewise (port unreachable): {got:?}");
    let got = c.probe("client", "tcp", "192.0.2.1:30099", 2);
    assert_eq!(got.get("error: connection refused"), Some(&2), "from a pod: {got:?}");
}

// --- 5: UDP conntrack cleanup through a node port --------------------------------------------

fn dns(eps: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.53\n  \
         ports: [{{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}]\n{}",
        slices("dns", "dns", "UDP", 5353, eps, &[false])
    )
}

#[test]
fn a_udp_client_through_a_node_port_follows_its_removed_endpoint() {
    let Some(c) = web_cluster(&[], &[5353]) else { return };
    let m = c.write("dns.yaml", &dns(&[("web-a", "node-1"), ("web-b", "node-1")]));
    let report = c.sync(&m, &flags(&[]));
    let got = c.probe("ext", "udp", "192.0.2.1:30053", 10);
    assert!(only_web(&got) && total(&got) == 10, "ext -> udp 192.0.2.1:30053: {got:?}\n{report}\n{}", listing(&c));

    // One socket for 60 datagrams, 100 ms apart; lines arrive as they are answered.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &c.ns("ext"), TESTPOD, "stream", "192.0.2.1:30053", "--count", "60"])
        .args(["--interval-ms", "100"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    while lines.len() < 5 {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => lines.push(l),
            Err(e) => panic!("the stream stopped ({e}) after {lines:?}"),
        }
    }
    let stuck = lines[0].clone();
    assert!(lines.iter().all(|l| *l == stuck) && stuck.starts_with("web-"), "one socket, one endpoint: {lines:?}");
    let other = if stuck == "web-a" { "web-b" } else { "web-a" };

    // Remove the endpoint it is stuck to; the pod itself keeps answering, so only the deleted
    // conntrack entry moves the client.
    c.write("dns.yaml", &dns(&[(other, "node-1")]));
    let report = c.sync(&m, &flags(&[]));
    let ct = c.exec_ok(
        "node",
        &["conntrack", "-L", "-p", "udp", "--orig-dst", "192.0.2.1", "--reply-src", ip_of(&stuck, false)],
    );
    lines.extend(rx.try_iter());
    let at_sync = lines.len();
    let _ = child.wait();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let first_change = lines.iter().position(|l| *l != stuck).unwrap_or(lines.len());
    let after = &lines[first_change..];
    assert!(
        after.iter().all(|l| l == other),
        "after the switch every datagram must reach {other}: {lines:?}\nconntrack after the sync:\n{ct}\n{report}"
    );
    assert!(
        first_change <= at_sync + 2 && after.len() >= 10,
        "the client (stuck to {stuck}) was not moved to {other} within one sync (sync returned after \
         {at_sync} answers): {lines:?}\nconntrack entries to {stuck} left after the sync:\n{ct}\n{}",
        listing(&c)
    );
}

// --- 6: health-check node port ---------------------------------------------------------------

fn lb_local(eps: &[(&str, &str)], with_service: bool) -> String {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: LoadBalancer\n  \
               clusterIP: 10.96.0.80\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  \
               ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}]\n";
    let slices = slices("web", "http", "TCP", 8080, eps, &[false]);
    if with_service { format!("{svc}{slices}") } else { slices.trim_start_matches("---\n").to_string() }
}

/// The agent on node-1 over the manifests in `dir`, quick to follow changes.
fn start_agent(c: &Cluster, dir: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--manifests", dir, "--watch", "--node-name", "node-1", "--cluster-cidr", "10.244.0.0/16"];
    args.extend(["--min-sync-period", "100ms", "--sync-period", "1s"]);
    args.extend_from_slice(extra);
    c.start_agent("agent", &args)
}

#[test]
fn health_check_node_port_follows_local_endpoints_and_the_service() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    c.write("web.yaml", &lb_local(A_LOCAL, true));
    let dir = c.dir.to_str().unwrap().to_string();
    let agent = start_agent(&c, &dir, &[]);
    let get = || http_get_from(&c, "ext", "192.0.2.1:32000", "/");
    let mut last = Err(String::new());
    let ok = wait_until(20, || {
        last = get();
        matches!(&last, Ok(r) if r.code == 200)
    });
    assert!(ok, "health check never answered 200: {last:?}\n{}", agent.log_text());
    let r = std::mem::replace(&mut last, Err(String::new())).unwrap();
    let body = r.compact();
    assert!(body.contains("\"localEndpoints\":1"), "want localEndpoints 1: {r:?}");
    assert!(body.contains("\"service\":{\"namespace\":\"default\",\"name\":\"web\"}"), "{r:?}");
    assert!(body.contains("\"serviceProxyHealthy\":true"), "{r:?}");
    assert!(r.headers.contains("content-type: application/json"), "{r:?}");
    assert!(r.headers.contains("x-content-type-options: nosniff"), "{r:?}");
    // The local endpoint serves external traffic meanwhile.
    let got = c.probe_full("ext", "tcp", "192.0.2.1:30080", 5);
    assert_eq!(got.get("web-a 192.0.2.2"), Some(&5), "{got:?}");

    // No endpoint on this node any more: 503, localEndpoints 0.
    c.write("web.yaml", &lb_local(NONE_LOCAL, true));
    let ok = wait_until(10, || {
        last = get();
        matches!(&last, Ok(r) if r.code == 503)
    });
    assert!(ok, "health check never answered 503 without local endpoints: {last:?}\n{}", agent.log_text());
    let r = std::mem::replace(&mut last, Err(String::new())).unwrap();
    assert!(r.compact().contains("\"localEndpoints\":0"), "want localEndpoints 0: {r:?}");
    assert!(r.headers.contains("content-type: application/json"), "{r:?}");
    assert!(r.headers.contains("x-content-type-options: nosniff"), "{r:?}");

    // The Service is gone: the port refuses connections.
    c.write("web.yaml", &lb_local(NONE_LOCAL, false));
    let ok = wait_until(10, || {
        last = get();
        matches!(&last, Err(e) if e == "error: connection refused")
    });
    assert!(ok, "the health-check port stayed open after the Service went: {last:?}\n{}", agent.log_text());
}

// --- 7: node address changes followed by the agent -------------------------------------------

#[test]
fn the_agent_serves_node_ports_on_addresses_as_they_come_and_go() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    c.exec_ok("ext", &["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);
    c.write("web.yaml", &web("", ALL_ON_NODE_1));
    let dir = c.dir.to_str().unwrap().to_string();
    let agent = start_agent(&c, &dir, &["--nodeport-addresses", "198.51.100.0/24"]);
    // Running: the ClusterIP is served from outside, the node port on no address yet.
    assert!(
        wait_until(20, || only_web(&c.probe_ms("ext", "tcp", "10.96.0.80:80", 1, 1000))),
        "the agent never served the ClusterIP\n{}",
        agent.log_text()
    );
    let got = c.probe_ms("ext", "tcp", "198.51.100.1:30080", 2, 1000);
    assert!(no_web(&got), "198.51.100.1 is not the node's yet: {got:?}");
    let got = c.probe_ms("ext", "tcp", "192.0.2.1:30080", 2, 1000);
    assert!(no_web(&got), "192.0.2.1 is outside --nodeport-addresses: {got:?}\n{}", listing(&c));

    c.exec_ok("node", &["ip", "addr", "add", "198.51.100.1/24", "dev", "ext0"]);
    let mut last = Tally::new();
    let ok = wait_until(10, || {
        last = c.probe_ms("ext", "tcp", "198.51.100.1:30080", 1, 1000);
        only_web(&last)
    });
    assert!(ok, "a new node address did not serve node ports: {last:?}\n{}\n{}", listing(&c), agent.log_text());
    let got = c.probe("ext", "tcp", "198.51.100.1:30080", 30);
    assert!(all_three(&got) && total(&got) == 30, "{got:?}");

    c.exec_ok("node", &["ip", "addr", "del", "198.51.100.1/24", "dev", "ext0"]);
    let ok = wait_until(10, || {
        last = c.probe_ms("ext", "tcp", "198.51.100.1:30080", 1, 1000);
        no_web(&last)
    });
    assert!(ok, "a removed node address still served: {last:?}\n{}\n{}", listing(&c), agent.log_text());
    let ok = wait_until(10, || !listing(&c).contains("198.51.100.1"));
    assert!(ok, "the removed address is still in the node-port addresses:\n{}", listing(&c));
}

// --- a v1 Node in the manifests ------------------------------------------------------------

#[test]
fn a_node_object_in_the_manifests_names_the_node_port_addresses() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    c.exec_ok("node", &["ip", "addr", "add", "198.51.100.1/24", "dev", "ext0"]);
    c.exec_ok("ext", &["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);
    let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n\
                status: {addresses: [{type: InternalIP, address: 198.51.100.1}, {type: Hostname, address: node-1}]}\n---\n";
    let m = c.write("web.yaml", &format!("{node}{}", web("", ALL_ON_NODE_1)));
    c.sync(&m, &["--node-name", "node-1", "--cluster-cidr", "10.244.0.0/16"]);
    let gate = c.exec_ok("node", &["nft", "list", "map", "inet", "nftproxy", "addresses-v4"]);
    assert!(gate.contains("198.51.100.1 : goto node-ip-v4") && !gate.contains("192.0.2.1"), "{gate}");
    assert!(only_web(&c.probe_ms("ext", "tcp", "198.51.100.1:30080", 3, 1000)));
    assert!(
        !only_web(&c.probe_ms("ext", "tcp", "192.0.2.1:30080", 1, 1000)),
        "the default-route address is not the Node's"
    );
    // Another node's Node object changes nothing: this node falls back to the addresses of its
    // default-route interface (ext0 holds both).
    c.sync(&m, &["--node-name", "node-2", "--cluster-cidr", "10.244.0.0/16"]);
    let gate = c.exec_ok("node", &["nft", "list", "map", "inet", "nftproxy", "addresses-v4"]);
    assert!(gate.contains("192.0.2.1 : goto node-ip-v4") && gate.contains("198.51.100.1 : goto node-ip-v4"), "{gate}");
    assert!(only_web(&c.probe_ms("ext", "tcp", "192.0.2.1:30080", 3, 1000)));
}

// --- clashes and hairpin ----------------------------------------------------------------------

#[test]
fn two_services_on_one_external_address_one_serves_and_the_node_keeps_syncing() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    c.exec_ok("ext", &["ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.1"]);
    let svc = |name: &str, ip: &str, ext: &str, pod: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {ip}, externalIPs: [{ext}], ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n{}",
            slices(name, "http", "TCP", 8080, &[(pod, "node-1")], &[false])
        )
    };
    // e2 asks for e1's external address, e3 for e1's ClusterIP; e4 is unrelated.
    let yaml = [
        svc("e1", "10.96.0.81", "203.0.113.10", "web-a"),
        svc("e2", "10.96.0.82", "203.0.113.10", "web-b"),
        svc("e3", "10.96.0.83", "10.96.0.81", "web-b"),
        svc("e4", "10.96.0.84", "203.0.113.11", "web-c"),
    ]
    .concat();
    let m = c.write("clash.yaml", &yaml);
    let out = c.nftproxy(&["--sync-once", "--manifests", m.to_str().unwrap(), "--cluster-cidr", "10.244.0.0/16"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "one clash must not stop the sync: {log}");
    assert!(
        log.contains("not served: external address 203.0.113.10:80/tcp is already served by Service default/e1"),
        "{log}"
    );
    let from_ext = |addr: &str| c.probe_ms("ext", "tcp", addr, 6, 1000);
    assert_eq!(from_ext("203.0.113.10:80").get("web-a"), Some(&6), "e1 keeps its address");
    assert_eq!(from_ext("203.0.113.11:80").get("web-c"), Some(&6), "others are served");
    assert_eq!(c.probe_ms("client", "tcp", "10.96.0.81:80", 6, 1000).get("web-a"), Some(&6), "e1's ClusterIP is e1's");
}

#[test]
fn a_pod_reaches_itself_through_a_local_node_port() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let m = c.write("web.yaml", &web("  externalTrafficPolicy: Local\n", A_LOCAL));
    c.sync(&m, &["--node-name", "node-1", "--cluster-cidr", "10.244.0.0/16"]);
    // From web-a (a pod, so short-circuited to every endpoint, itself included): every
    // connection is answered, the ones that land on web-a itself too (hairpin masquerade).
    let got = c.probe_ms("web-a", "tcp", "192.0.2.1:30080", 30, 2000);
    assert!(only_web(&got) && total(&got) == 30 && got.contains_key("web-a"), "{got:?}");
}

#[test]
fn an_external_address_two_services_share_is_served_until_the_last_one_goes() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    c.exec_ok("ext", &["ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.1"]);
    // s1 and s2 share 203.0.113.20 (ports 80 and 81), the agent keeps running while they go.
    let svc = |name: &str, ip: &str, port: u16, pod: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {ip}, externalIPs: [203.0.113.20], ports: [{{name: http, port: {port}, targetPort: 8080}}]}}\n{}",
            slices(name, "http", "TCP", 8080, &[(pod, "node-1")], &[false])
        )
    };
    let (s1, s2) = (svc("s1", "10.96.0.91", 80, "web-a"), svc("s2", "10.96.0.92", 81, "web-b"));
    c.write("shared.yaml", &format!("{s1}{s2}"));
    let dir = c.dir.to_str().unwrap().to_string();
    let agent = start_agent(&c, &dir, &["--table-shards", "4"]);
    let from_ext = |addr: &str| c.probe_ms("ext", "tcp", addr, 4, 1000);
    let ok = wait_until(20, || from_ext("203.0.113.20:81").get("web-b") == Some(&4));
    assert!(ok, "s2 never served on the shared address\n{}\n{}", listing(&c), agent.log_text());
    assert_eq!(from_ext("203.0.113.20:80").get("web-a"), Some(&4), "s1 on the shared address");

    // s1 goes: s2 keeps the address.
    c.write("shared.yaml", &s2);
    let ok = wait_until(10, || no_web(&from_ext("203.0.113.20:80")));
    assert!(ok, "s1 is still served after it went\n{}", listing(&c));
    assert_eq!(from_ext("203.0.113.20:81").get("web-b"), Some(&4), "s2 lost the shared address\n{}", listing(&c));

    // s2 goes too: the address leaves every table.
    c.write("shared.yaml", "# no Services\n");
    let ruleset = || c.exec_ok("node", &["nft", "list", "ruleset"]);
    let ok = wait_until(10, || !ruleset().contains("203.0.113.20"));
    assert!(ok, "the address stayed after its last Service went\n{}", ruleset());
    assert!(no_web(&from_ext("203.0.113.20:81")));
}
