//! Conntrack-aware updates with real packets: UDP clients that keep their socket follow
//! endpoint changes, TCP connections are never broken, INVALID packets are dropped.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::*;
use nftproxy::conntrack::wire::{NewEntry, STATUS_SEEN_REPLY};
use nftproxy::conntrack::{Conntrack, Filter};

const VIP: &str = "10.96.0.53:53";

/// A UDP Service dns (10.96.0.53:53 -> 5353) with an EndpointSlice of (ip, ready, serving, terminating).
fn dns(endpoints: &[(&str, bool, bool, bool)]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(ip, r, s, t)| {
            format!("  - {{addresses: [{ip}], conditions: {{ready: {r}, serving: {s}, terminating: {t}}}}}\n")
        })
        .collect();
    let eps = if eps.is_empty() { "endpoints: []\n".to_string() } else { format!("endpoints:\n{}", eps.concat()) };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns}}\nspec:\n  clusterIP: 10.96.0.53\n  ports:\n  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}\n  - {{name: tcp, protocol: TCP, port: 80, targetPort: 8080}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-1, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\n\
ports: [{{name: dns, port: 5353, protocol: UDP}}, {{name: tcp, port: 8080, protocol: TCP}}]\n{eps}"
    )
}

fn ready(ips: &[&'static str]) -> Vec<(&'static str, bool, bool, bool)> {
    ips.iter().map(|ip| (*ip, true, true, false)).collect()
}

const A: &str = "10.244.1.2";
const B: &str = "10.244.1.3";
const C: &str = "10.244.1.4";

fn cluster() -> Option<Cluster> {
    web_cluster(&[8080], &[5353])
}

/// Starts a UDP client in the client pod that keeps one socket for `count` datagrams.
fn stream(c: &Cluster, count: usize) -> JoinHandle<Vec<String>> {
    let ns = c.ns("client");
    let count = count.to_string();
    thread::spawn(move || {
        let out: Output = Command::new("ip")
            .args(["netns", "exec", &ns, TESTPOD, "stream", VIP, "--count", &count, "--interval-ms", "100"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    })
}

fn watch_agent(c: &Cluster, file: &std::path::Path) -> Agent {
    c.start_agent("agent", &["--manifests", file.to_str().unwrap(), "--watch", "--min-sync-period", "100ms"])
}

/// Answers after the first one that is not `first`.
fn after_first_change<'a>(lines: &'a [String], first: &str) -> &'a [String] {
    let i = lines.iter().position(|l| l != first).unwrap_or(lines.len());
    &lines[i..]
}

#[test]
fn a_udp_client_follows_its_removed_endpoint_within_one_sync() {
    let Some(c) = cluster() else { return };
    let m = c.write("dns.yaml", &dns(&ready(&[A])));
    let agent = watch_agent(&c, &m);
    assert!(wait_until(20, || c.probe("client", "udp", VIP, 1).contains_key("web-a")), "{}", agent.log_text());
    let client = stream(&c, 40);
    thread::sleep(Duration::from_secs(1));
    c.write("dns.yaml", &dns(&ready(&[B])));
    let lines = client.join().unwrap();
    assert_eq!(lines[0], "web-a", "{lines:?}");
    let after = after_first_change(&lines, "web-a");
    assert!(after.iter().all(|l| l == "web-b"), "datagrams after the switch must go to web-b only: {lines:?}");
    assert!(after.len() >= 10, "the client was not moved to web-b in time: {lines:?}\n{}", agent.log_text());
}

#[test]
fn a_waiting_udp_client_is_served_as_soon_as_an_endpoint_appears() {
    let Some(c) = cluster() else { return };
    // The client talks to the VIP before any rule exists for it: conntrack records an un-NATed
    // flow, which would swallow every later datagram if left in place.
    let m = c.write(
        "dns.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: other}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n",
    );
    let agent = watch_agent(&c, &m);
    assert!(wait_until(20, || c.has_table()), "{}", agent.log_text());
    let client = stream(&c, 50);
    thread::sleep(Duration::from_secs(1));
    // Not ready yet: the Service exists with no usable endpoint (rejected).
    c.write("dns.yaml", &dns(&[(A, false, false, false)]));
    thread::sleep(Duration::from_secs(1));
    c.write("dns.yaml", &dns(&ready(&[A])));
    let lines = client.join().unwrap();
    assert!(lines[..5].iter().all(|l| l.starts_with("error")), "{lines:?}");
    let tail = &lines[lines.len() - 10..];
    assert!(tail.iter().all(|l| l == "web-a"), "the waiting client was never served: {lines:?}\n{}", agent.log_text());
}

#[test]
fn scale_to_zero_and_back_with_the_same_socket() {
    let Some(c) = cluster() else { return };
    let m = c.write("dns.yaml", &dns(&ready(&[A])));
    let agent = watch_agent(&c, &m);
    assert!(wait_until(20, || c.probe("client", "udp", VIP, 1).contains_key("web-a")), "{}", agent.log_text());
    let client = stream(&c, 60);
    thread::sleep(Duration::from_millis(1500));
    c.write("dns.yaml", &dns(&[]));
    thread::sleep(Duration::from_secs(2));
    c.write("dns.yaml", &dns(&ready(&[B])));
    let lines = client.join().unwrap();
    let after = after_first_change(&lines, "web-a");
    assert!(
        !after.iter().any(|l| l == "web-a"),
        "traffic kept going to the removed pod (kubernetes#139628): {lines:?}"
    );
    assert!(after.iter().any(|l| l.starts_with("error")), "scaled to zero must refuse: {lines:?}");
    assert!(lines[lines.len() - 5..].iter().all(|l| l == "web-b"), "{lines:?}\n{}", agent.log_text());
}

#[test]
fn established_flows_survive_churn_resyncs_and_restarts() {
    let Some(c) = cluster() else { return };
    let m = c.write("dns.yaml", &dns(&ready(&[A])));
    c.sync(&m, &[]);
    let ns = c.ns("client");
    let hold = thread::spawn(move || {
        Command::new("ip")
            .args(["netns", "exec", &ns, TESTPOD, "hold", "10.96.0.53:80", "--seconds", "8"])
            .output()
            .unwrap()
    });
    let udp = stream(&c, 60);
    thread::sleep(Duration::from_millis(500));
    // 100 syncs, each a fresh process (a restart, a full resync and a conntrack reconcile),
    // with other endpoints coming and going while web-a stays.
    for i in 0..100 {
        let others = if i % 2 == 0 { [A, B] } else { [A, C] };
        c.write("dns.yaml", &dns(&ready(&others)));
        c.sync(&m, &[]);
    }
    let out = hold.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("web-a held "), "the TCP connection broke: {text}");
    let lines = udp.join().unwrap();
    assert!(lines.iter().all(|l| l == "web-a"), "a UDP flow to a live endpoint was disturbed: {lines:?}");
}

fn count_entries(c: &Cluster, reply_src: Option<&str>) -> usize {
    let mut args = vec!["conntrack", "-L", "-p", "udp", "--orig-dst", "10.96.0.53"];
    if let Some(r) = reply_src {
        args.extend(["--reply-src", r]);
    }
    let out = c.exec("node", &args);
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("udp")).count()
}

#[test]
fn thousands_of_flows_only_the_removed_endpoints_entries_go() {
    let Some(c) = cluster() else { return };
    let m = c.write("dns.yaml", &dns(&ready(&[A, B])));
    c.sync(&m, &[]);
    // Each probe uses a fresh socket: one conntrack entry per datagram.
    let got = c.probe("client", "udp", VIP, 3000);
    assert_eq!(got.values().sum::<usize>(), 3000);
    let (to_a, to_b) = (count_entries(&c, Some(A)), count_entries(&c, Some(B)));
    assert!(to_a > 1000 && to_b > 1000, "a={to_a} b={to_b}");
    c.write("dns.yaml", &dns(&ready(&[A])));
    let out = c.nftproxy(&["--sync-once", "--manifests", m.to_str().unwrap()]);
    assert!(out.status.success());
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count_entries(&c, Some(B)), 0, "entries to the removed endpoint remain");
    assert_eq!(count_entries(&c, Some(A)), to_a, "entries to the remaining endpoint were touched");
}

#[test]
fn a_terminating_endpoint_keeps_its_flows_while_new_ones_go_elsewhere() {
    let Some(c) = cluster() else { return };
    let m = c.write("dns.yaml", &dns(&ready(&[A])));
    let agent = watch_agent(&c, &m);
    assert!(wait_until(20, || c.probe("client", "udp", VIP, 1).contains_key("web-a")), "{}", agent.log_text());
    let client = stream(&c, 30);
    thread::sleep(Duration::from_millis(800));
    c.write("dns.yaml", &dns(&[(A, false, true, true), (B, true, true, false)]));
    assert!(wait_until(10, || c.probe("client", "udp", VIP, 5).get("web-b") == Some(&5)), "{}", agent.log_text());
    let lines = client.join().unwrap();
    assert!(lines.iter().all(|l| l == "web-a"), "the terminating endpoint's flow was cut: {lines:?}");
}

/// Entries in the node's table: (original destination, reply source) -> how many.
fn table(c: &Cluster) -> BTreeMap<(String, String), usize> {
    in_netns(&c.node(), || {
        let mut by = BTreeMap::new();
        let mut ct = Conntrack::open().unwrap();
        ct.each_flow(None, Filter { protocol: 17, dst: None }, |f| {
            let k = f.key;
            *by.entry((format!("{}:{}", k.orig_dst, k.orig_dport), k.reply_src.to_string())).or_default() += 1;
        })
        .unwrap();
        by
    })
}

#[test]
fn twenty_thousand_entries_exactly_the_stale_ones_go_and_adding_an_endpoint_reads_nothing() {
    if !can_run_netns_tests() {
        return;
    }
    let c = Cluster::new(&[]);
    let m = c.write("dns.yaml", &dns(&ready(&[A, B])));
    let agent = watch_agent(&c, &m);
    let metrics = || c.http_get("127.0.0.1:10249", "/metrics").map(|(_, b)| b).unwrap_or_default();
    let v4 = |name: &str| metric(&metrics(), &format!("{name}{{ip_family=\"IPv4\"}}"));
    let reads = || v4("kubeproxy_conntrack_reconciler_sync_duration_seconds_count");
    // The first sync of a process reads conntrack once (it cannot know what went meanwhile).
    assert!(wait_until(20, || reads() == Some(1.0)), "{}\n{}", metrics(), agent.log_text());
    // 20,000 flows nobody sent, as DNAT leaves them: 9,000 answered by A, 9,000 by B, and B's
    // through an address and a port that are not this Service's (1,000 each).
    let entry = |k: usize, dst: &str, dport: u16, reply: &str| NewEntry {
        protocol: 17,
        client: (format!("10.1.{}.{}", k / 250, k % 250 + 1).parse().unwrap(), 20_000 + (k % 7) as u16),
        dst: (dst.parse().unwrap(), dport),
        reply: (reply.parse().unwrap(), 5353),
        status: STATUS_SEEN_REPLY,
        timeout_secs: 600,
    };
    let entries: Vec<NewEntry> = (0..20_000)
        .map(|k| match k {
            0..18_000 => entry(k, "10.96.0.53", 53, if k % 2 == 0 { A } else { B }),
            18_000..19_000 => entry(k, "10.96.0.99", 53, B),
            _ => entry(k, "10.96.0.53", 54, B),
        })
        .collect();
    let created = in_netns(&c.node(), move || Conntrack::open().unwrap().create(entries).unwrap());
    assert_eq!(created.done, 20_000, "{created:?}");
    let key = |dst: &str, reply: &str| (dst.to_string(), reply.to_string());
    let want: BTreeMap<_, _> = [
        (key("10.96.0.53:53", A), 9_000),
        (key("10.96.0.53:53", B), 9_000),
        (key("10.96.0.99:53", B), 1_000),
        (key("10.96.0.53:54", B), 1_000),
    ]
    .into();
    assert_eq!(table(&c), want);

    // An endpoint added: nothing can be stale, conntrack is not even read.
    let synced = || metric(&metrics(), "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let before = synced();
    c.write("dns.yaml", &dns(&ready(&[A, B, C])));
    assert!(wait_until(20, || synced() != before), "{}", agent.log_text());
    assert!(c.nft_list("inet nftproxy").contains(C), "the sync did not add the endpoint");
    assert_eq!(reads(), Some(1.0), "adding an endpoint read conntrack\n{}", agent.log_text());
    assert_eq!(table(&c), want, "adding an endpoint deleted entries");

    // B removed: exactly its 9,000 entries through this Service go.
    c.write("dns.yaml", &dns(&ready(&[A, C])));
    assert!(wait_until(20, || reads() == Some(2.0)), "{}", agent.log_text());
    let mut left = want.clone();
    left.remove(&key("10.96.0.53:53", B));
    assert_eq!(table(&c), left, "{}", agent.log_text());
    assert_eq!(v4("kubeproxy_conntrack_reconciler_deleted_entries_total"), Some(9_000.0));
}

fn out_rsts(c: &Cluster, pod: &str) -> u64 {
    let snmp = c.exec_ok(pod, &["cat", "/proc/net/snmp"]);
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let names: Vec<&str> = tcp[0].split_whitespace().collect();
    let values: Vec<&str> = tcp[1].split_whitespace().collect();
    let i = names.iter().position(|n| *n == "OutRsts").unwrap();
    values[i].parse().unwrap()
}

#[test]
fn invalid_packets_are_dropped_unless_tcp_be_liberal() {
    let Some(c) = cluster() else { return };
    c.exec_ok("node", &["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"]);
    let m = c.write("dns.yaml", &dns(&ready(&[A])));
    c.sync(&m, &[]);
    let send = || c.exec_ok("client", &[TESTPOD, "stray-ack", "10.244.1.10", "10.244.1.2:8080"]);
    let before = out_rsts(&c, "web-a");
    send();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(out_rsts(&c, "web-a"), before, "the INVALID packet reached the pod and was answered with a RST");
    let listing = c.nft_list("inet nftproxy");
    assert!(listing.contains("ct state invalid counter packets 1"), "{listing}");
    // With --conntrack-tcp-be-liberal the packet passes and the pod resets it.
    c.sync(&m, &["--conntrack-tcp-be-liberal"]);
    send();
    assert!(wait_until(3, || out_rsts(&c, "web-a") > before), "with --conntrack-tcp-be-liberal the packet should pass");
}
