//! Cluster DNS (`--cluster-dns`, manifest mode), asked from a pod over UDP and TCP with real
//! packets through the DNAT: every record kind, NXDOMAIN with the SOA, REFUSED, a manifest
//! change answered within 2 s, garbage followed by a good query, both families, and the
//! command-line errors.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const DNS4: &str = "10.96.0.10";
const DNS6: &str = "fd00:10:96::a";

const HEADLESS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: default, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints:
- addresses: [10.244.1.2]
- addresses: [10.244.1.3]
- addresses: [10.244.1.4]
  conditions: {ready: false}
";

/// The demo's manifests plus a headless Service, in the test's own directory.
fn manifests(c: &Cluster) -> String {
    for file in ["services.yaml", "pods.yaml"] {
        let text = std::fs::read_to_string(demo_manifests().join(file)).unwrap();
        c.write(file, &text);
    }
    c.write("headless.yaml", HEADLESS);
    c.dir.to_str().unwrap().to_string()
}

fn start(c: &Cluster, dir: &str) -> Agent {
    let args =
        ["--manifests", dir, "--watch", "--cluster-cidr", "10.244.0.0/16", "--cluster-dns", "10.96.0.10,fd00:10:96::a"];
    let a = c.start_agent("agent", &args);
    let ready =
        wait_until(30, || dig(c, "client", "web.default.svc.cluster.local", "A", DNS4, false).contains("A 10.96.0.80"));
    assert!(ready, "cluster DNS never answered:\n{}", a.log_text());
    a
}

/// `nftproxy-testpod resolve` in `from`: the response as text (`status ...`, record lines).
fn dig(c: &Cluster, from: &str, name: &str, qtype: &str, server: &str, tcp: bool) -> String {
    let mut args = vec![TESTPOD, "resolve", name, qtype, "--server", server];
    if tcp {
        args.push("--tcp");
    }
    let out = c.exec(from, &args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer lines as `TYPE DATA`.
fn answers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("answer "))
        .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
        .collect()
}

fn status(text: &str) -> &str {
    text.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("none")
}

#[test]
fn every_record_kind_over_udp_and_tcp_from_a_pod_in_both_families() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let dir = manifests(&c);
    let a = start(&c, &dir);
    for server in [DNS4, DNS6] {
        for tcp in [false, true] {
            let ask = |name: &str, qtype: &str| dig(&c, "client", name, qtype, server, tcp);
            let at = format!("server {server} tcp={tcp}");

            let r = ask("web.default.svc.cluster.local", "A");
            assert_eq!((status(&r), answers(&r)), ("NOERROR", vec!["A 10.96.0.80".to_string()]), "{at}\n{r}");
            assert!(r.contains("answer web.default.svc.cluster.local. 5 A"), "TTL 5, {at}\n{r}");
            assert!(r.lines().next().unwrap().contains("aa"), "authoritative, {at}\n{r}");
            let r = ask("web.default.svc.cluster.local", "AAAA");
            assert_eq!(answers(&r), ["AAAA fd00:10:96::80"], "{at}\n{r}");

            // Headless: the ready endpoint addresses.
            let r = ask("db.default.svc.cluster.local", "A");
            assert_eq!(answers(&r), ["A 10.244.1.2", "A 10.244.1.3"], "{at}\n{r}");

            let r = ask("_http._tcp.web.default.svc.cluster.local", "SRV");
            assert_eq!(answers(&r), ["SRV 0 100 80 web.default.svc.cluster.local."], "{at}\n{r}");
            let r = ask("_dns._udp.web.default.svc.cluster.local", "SRV");
            assert_eq!(answers(&r), ["SRV 0 100 53 web.default.svc.cluster.local."], "{at}\n{r}");

            let r = ask("80.0.96.10.in-addr.arpa", "PTR");
            assert_eq!(answers(&r), ["PTR web.default.svc.cluster.local."], "{at}\n{r}");
            let v6 = "0.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.d.f.ip6.arpa";
            let r = ask(v6, "PTR");
            assert_eq!(answers(&r), ["PTR web.default.svc.cluster.local."], "{at}\n{r}");

            // `nothing` is IPv4-only: its name exists, with no AAAA record.
            let r = ask("nothing.default.svc.cluster.local", "AAAA");
            assert_eq!((status(&r), answers(&r).len()), ("NOERROR", 0), "{at}\n{r}");

            let r = ask("nope.default.svc.cluster.local", "A");
            assert_eq!(status(&r), "NXDOMAIN", "{at}\n{r}");
            assert!(
                r.contains("authority cluster.local. 5 SOA ns.dns.cluster.local. hostmaster.cluster.local."),
                "{at}\n{r}"
            );

            let r = ask("example.com", "A");
            assert_eq!((status(&r), answers(&r).len()), ("REFUSED", 0), "{at}\n{r}");
        }
    }
    // The node itself reaches it too (output DNAT), and the DNS Service lists as one.
    let r = dig(&c, "node", "web.default.svc.cluster.local", "A", DNS4, false);
    assert_eq!(answers(&r), ["A 10.96.0.80"], "{r}");
    let r = dig(&c, "node", "web.default.svc.cluster.local", "AAAA", DNS6, true);
    assert_eq!(answers(&r), ["AAAA fd00:10:96::80"], "{r}");
    let listing = c.nft_list("inet nftproxy");
    assert!(listing.contains("svc4/kube-system/cluster-dns/udp/53"), "{listing}");
    assert!(listing.contains("svc6/kube-system/cluster-dns/tcp/53"), "{listing}");

    // A pod connects by name.
    let out = c.exec_ok(
        "client",
        &[TESTPOD, "probe", "tcp", "web.default.svc.cluster.local:80", "--dns", DNS4, "--count", "9"],
    );
    assert!(out.contains("web.default.svc.cluster.local -> 10.96.0.80"), "{out}");
    assert!(!out.contains("error"), "{out}\n{}", a.log_text());
}

#[test]
fn a_manifest_change_is_answered_within_2s_and_a_claim_on_the_dns_address_is_refused() {
    let Some(c) = web_cluster(&[], &[]) else { return };
    let dir = manifests(&c);
    let a = start(&c, &dir);
    let name = "late.apps.svc.cluster.local";
    let timed = |want: &dyn Fn(&str) -> bool| {
        let t = Instant::now();
        let ok = wait_until(10, || want(&dig(&c, "client", name, "A", DNS4, false)));
        (ok, t.elapsed())
    };
    let service = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: late, namespace: apps}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
        )
    };

    c.write("late.yaml", &service("10.96.5.5"));
    let (ok, took) = timed(&|r| answers(r) == ["A 10.96.5.5"]);
    assert!(ok && took < Duration::from_secs(2), "created: answered={ok} after {took:?}\n{}", a.log_text());

    c.write("late.yaml", &service("10.96.5.6"));
    let (ok, took) = timed(&|r| answers(r) == ["A 10.96.5.6"]);
    assert!(ok && took < Duration::from_secs(2), "changed: answered={ok} after {took:?}\n{}", a.log_text());

    std::fs::remove_file(Path::new(&dir).join("late.yaml")).unwrap();
    let (ok, took) = timed(&|r| status(r) == "NXDOMAIN");
    assert!(ok && took < Duration::from_secs(2), "deleted: answered={ok} after {took:?}\n{}", a.log_text());

    // A Service that claims the DNS address is an error naming it; nothing else changes.
    c.write("claim.yaml", &service(DNS4));
    let claimed = wait_until(10, || {
        a.log_text().contains("Service apps/late: spec.clusterIP: 10.96.0.10 is a --cluster-dns address")
    });
    assert!(claimed, "{}", a.log_text());
    let r = dig(&c, "client", "web.default.svc.cluster.local", "A", DNS4, false);
    assert_eq!(answers(&r), ["A 10.96.0.80"], "{r}");
}

#[test]
fn garbage_gets_formerr_or_nothing_and_the_server_keeps_answering() {
    let Some(c) = web_cluster(&[], &[]) else { return };
    let dir = manifests(&c);
    let a = start(&c, &dir);
    let formerr = in_netns(&c.ns("client"), || {
        use std::io::{Read, Write};
        let server: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.connect(server).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        // Too short for a header (dropped), random bytes, a header promising a missing question.
        for junk in [&b"\x01"[..], &[0xff; 100][..], &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0][..]] {
            udp.send(junk).unwrap();
        }
        let mut buf = [0u8; 512];
        let mut codes = Vec::new();
        while let Ok(n) = udp.recv(&mut buf) {
            codes.push((u16::from_be_bytes([buf[0], buf[1]]), buf[3] & 0x0f, n));
        }
        // TCP: a length prefix with garbage behind it, then a connection that says nothing.
        let mut tcp = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(2)).unwrap();
        tcp.write_all(&[0, 14, 0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff]).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut answer = [0u8; 16];
        let got = tcp.read(&mut answer).unwrap_or(0);
        let _idle = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(2)).unwrap();
        (codes, got, answer)
    });
    let (codes, got, answer) = formerr;
    // FORMERR (1) to the question-less header; the random bytes are a "response" (QR set): none.
    assert_eq!(codes.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(), [(0x1234, 1)], "{codes:?}");
    assert!(got >= 6 && answer[2..4] == [0xab, 0xcd] && answer[5] & 0x0f == 1, "TCP FORMERR: {:?}", &answer[..got]);
    for tcp in [false, true] {
        let r = dig(&c, "client", "web.default.svc.cluster.local", "A", DNS4, tcp);
        assert_eq!(answers(&r), ["A 10.96.0.80"], "after garbage, tcp={tcp}: {r}\n{}", a.log_text());
    }
    assert!(a.log_text().lines().all(|l| !l.contains("panic")), "{}", a.log_text());
}

fn nftproxy(args: &[&str]) -> (bool, String) {
    let out = Command::new(NFTPROXY).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cluster_dns_is_refused_in_api_mode_and_with_sync_once() {
    let (ok, err) = nftproxy(&["--cluster-dns", DNS4, "--kubeconfig", "/nonexistent"]);
    assert!(!ok && err.contains("CoreDNS") && err.contains("--cluster-dns"), "{err}");
    let demo = demo_manifests();
    let (ok, err) = nftproxy(&["--sync-once", "--manifests", demo.to_str().unwrap(), "--cluster-dns", DNS4]);
    assert!(!ok && err.contains("--sync-once") && err.contains("nothing would stay to answer"), "{err}");
    let (ok, err) =
        nftproxy(&["--watch", "--manifests", demo.to_str().unwrap(), "--cluster-dns", "10.96.0.10,10.96.0.11"]);
    assert!(!ok && err.contains("one family"), "{err}");
}
