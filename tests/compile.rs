//! The rule compiler without root: golden listings and a packet tracer over the compiled rules.

use std::net::IpAddr;
use std::path::PathBuf;

use nftproxy::compile::{Options, compile, render};
use nftproxy::model::Protocol;
use nftproxy::ruleset::Ruleset;
use nftproxy::source::{manifest, resolve};
use nftproxy::trace::{Fate, Packet, Ratio, trace};

fn demo(opts: &Options) -> Ruleset {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/cluster");
    let objects = manifest::load(&[dir]).unwrap();
    let snap = resolve::resolve(&objects, &Default::default()).unwrap();
    compile(&snap, opts)
}

fn pkt(src: &str, dst: &str, proto: Protocol, dport: u16) -> Packet {
    Packet { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto, dport, local: false }
}

fn dnat(addr: &str, port: u16, masquerade: bool) -> Fate {
    Fate::Dnat { addr: addr.parse::<IpAddr>().unwrap(), port, masquerade }
}

#[test]
fn golden_listing_of_the_demo_cluster() {
    let opts =
        Options { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], masquerade_all: false, ..Default::default() };
    let got = render(&demo(&opts));
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/demo-cluster.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).expect("golden file (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(got, want, "compiled rules differ from {}", path.display());
}

#[test]
fn each_endpoint_gets_exactly_a_third() {
    let rs = demo(&Options::default());
    for (dst, proto, port, target) in [("10.96.0.80", Protocol::Tcp, 80, 8080), ("10.96.0.80", Protocol::Udp, 53, 5353)]
    {
        let got = trace(&rs, &pkt("10.244.1.10", dst, proto, port));
        let want: Vec<(Fate, Ratio)> =
            ["10.244.1.2", "10.244.1.3", "10.244.1.4"].iter().map(|a| (dnat(a, target, false), Ratio(1, 3))).collect();
        assert_eq!(got, want);
    }
    let got = trace(&rs, &pkt("fd00:10:244:1::10", "fd00:10:96::80", Protocol::Tcp, 80));
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(f, p)| matches!(f, Fate::Dnat { port: 8080, .. }) && *p == Ratio(1, 3)), "{got:?}");
}

#[test]
fn rejections_and_traffic_that_is_not_ours() {
    let rs = demo(&Options::default());
    let one = |p: Packet| trace(&rs, &p);
    // No endpoints, or a port the Service does not have: rejected.
    assert_eq!(one(pkt("10.244.1.10", "10.96.0.99", Protocol::Tcp, 80)), [(Fate::Rejected, Ratio::ONE)]);
    assert_eq!(one(pkt("10.244.1.10", "10.96.0.80", Protocol::Tcp, 81)), [(Fate::Rejected, Ratio::ONE)]);
    assert_eq!(one(pkt("10.244.1.10", "10.96.0.80", Protocol::Sctp, 80)), [(Fate::Rejected, Ratio::ONE)]);
    assert_eq!(one(pkt("fd00::1", "fd00:10:96::80", Protocol::Udp, 54)), [(Fate::Rejected, Ratio::ONE)]);
    // Not a ClusterIP: untouched.
    assert_eq!(one(pkt("10.244.1.10", "10.244.1.2", Protocol::Tcp, 8080)), [(Fate::Untouched, Ratio::ONE)]);
    assert_eq!(one(pkt("10.244.1.10", "10.96.0.81", Protocol::Tcp, 80)), [(Fate::Untouched, Ratio::ONE)]);
}

#[test]
fn masquerade_decisions() {
    let masq_of = |opts: &Options, src: &str, dst: &str| -> Vec<bool> {
        trace(&demo(opts), &pkt(src, dst, Protocol::Tcp, 80))
            .into_iter()
            .map(|(f, _)| matches!(f, Fate::Dnat { masquerade: true, .. }))
            .collect()
    };
    let none = Options::default();
    let cidr =
        Options { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], masquerade_all: false, ..Default::default() };
    let all = Options { cluster_cidrs: vec![], masquerade_all: true, ..Default::default() };
    assert_eq!(masq_of(&none, "192.0.2.2", "10.96.0.80"), [false; 3]);
    assert_eq!(masq_of(&cidr, "192.0.2.2", "10.96.0.80"), [true; 3]);
    assert_eq!(masq_of(&cidr, "10.244.1.10", "10.96.0.80"), [false; 3]);
    // No IPv6 cluster CIDR given: IPv6 is not masqueraded (as kube-proxy's local detector).
    assert_eq!(masq_of(&cidr, "2001:db8::2", "fd00:10:96::80"), [false; 3]);
    assert_eq!(masq_of(&all, "10.244.1.10", "10.96.0.80"), [true; 3]);
    // Hairpin: web-a reaching its own Service is masqueraded only when it lands on itself.
    assert_eq!(masq_of(&none, "10.244.1.2", "10.96.0.80"), [true, false, false]);
}

#[test]
fn host_processes_use_the_output_hook_the_same_way() {
    let rs = demo(&Options::default());
    let mut p = pkt("192.0.2.1", "10.96.0.80", Protocol::Tcp, 80);
    p.local = true;
    assert_eq!(trace(&rs, &p).len(), 3);
}

/// Service default/`name` at 10.96.0.1:80/tcp over `eps` (10.0.0.1, 10.0.0.2, ... port 80),
/// shaped by `configure`, compiled with `opts`.
fn single(
    name: &str,
    eps: impl IntoIterator<Item = nftproxy::model::Endpoint>,
    configure: impl FnOnce(&mut nftproxy::model::Service),
    opts: &Options,
) -> Ruleset {
    use nftproxy::model::{Service, ServiceId, ServicePort, Snapshot};
    let port = ServicePort {
        name: "".into(),
        port: 80,
        protocol: Protocol::Tcp,
        node_port: None,
        endpoints: eps.into_iter().collect(),
    };
    let id = ServiceId::new("default", name);
    let mut svc = Service::new(id.clone(), vec!["10.96.0.1".parse().unwrap()], vec![port]);
    configure(&mut svc);
    let mut snap = Snapshot::default();
    snap.services.insert(id, svc);
    compile(&snap, opts)
}

/// Endpoint `i` (from 0): 10.0.0.(i+1):80.
fn nth(i: usize) -> nftproxy::model::Endpoint {
    nftproxy::model::Endpoint::ready(format!("10.0.0.{}", i + 1).parse().unwrap(), 80)
}

fn weighted(weights: &[u32]) -> Ruleset {
    let eps = weights.iter().enumerate().map(|(i, w)| nftproxy::model::Endpoint { weight: *w, ..nth(i) });
    single("w", eps, |_| {}, &Options::default())
}

#[test]
fn weights_give_each_endpoint_exactly_its_share() {
    // (weights, expected probability of each endpoint)
    let cases: Vec<(Vec<u32>, Vec<Ratio>)> = vec![
        (vec![95, 5], vec![Ratio(19, 20), Ratio(1, 20)]),
        (vec![3, 2, 1], vec![Ratio(1, 2), Ratio(1, 3), Ratio(1, 6)]),
        (vec![1, 0, 1], vec![Ratio(1, 2), Ratio(1, 2)]),
        (vec![1000, 1, 999], vec![Ratio(1000, 2000), Ratio(1, 2000), Ratio(999, 2000)]),
    ];
    for (weights, want) in cases {
        let got: Vec<Ratio> = trace(&weighted(&weights), &pkt("10.244.0.9", "10.96.0.1", Protocol::Tcp, 80))
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let want: Vec<Ratio> = want
            .into_iter()
            .map(|Ratio(n, d)| {
                let g = gcd(n, d);
                Ratio(n / g, d / g)
            })
            .collect();
        assert_eq!(got, want, "weights {weights:?}");
    }
    // All weights zero: nothing to send new connections to.
    assert_eq!(
        trace(&weighted(&[0, 0]), &pkt("10.244.0.9", "10.96.0.1", Protocol::Tcp, 80)),
        [(Fate::Rejected, Ratio::ONE)]
    );
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[test]
fn table_shards_change_where_rules_live_not_what_they_do() {
    let one = demo(&Options { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], ..Default::default() });
    let four =
        demo(&Options { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], table_shards: 4, ..Default::default() });
    assert!(four.chains.keys().any(|k| k.starts_with("nftproxy-3@")), "shard tables have their own chains");
    for (src, dst, proto, port) in [
        ("10.244.1.10", "10.96.0.80", Protocol::Tcp, 80),
        ("192.0.2.2", "10.96.0.80", Protocol::Udp, 53),
        ("10.244.1.2", "10.96.0.80", Protocol::Tcp, 80),
        ("fd00:10:244:1::10", "fd00:10:96::80", Protocol::Tcp, 80),
        ("10.244.1.10", "10.96.0.99", Protocol::Tcp, 80),
        ("10.244.1.10", "10.96.0.80", Protocol::Tcp, 81),
        ("10.244.1.10", "10.96.0.81", Protocol::Tcp, 80),
    ] {
        let p = pkt(src, dst, proto, port);
        assert_eq!(trace(&four, &p), trace(&one, &p), "{src} -> {dst}:{port}");
    }
}

#[test]
fn local_policy_drops_only_when_endpoints_exist_on_other_nodes() {
    // (endpoint nodes, fate of a new connection on node "here"), as kube-proxy decides it.
    let cases: Vec<(Vec<&str>, Fate)> = vec![
        (vec![], Fate::Rejected),
        (vec!["elsewhere"], Fate::Dropped),
        (vec!["here", "elsewhere"], dnat("10.0.0.1", 80, false)),
    ];
    for (nodes, want) in cases {
        let eps = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| nftproxy::model::Endpoint { node_name: Some(n.to_string()), ..nth(i) });
        let mut opts = Options::default();
        opts.locality.node = Some("here".into());
        let rs = single("local", eps, |s| s.internal_local = true, &opts);
        let got = trace(&rs, &pkt("10.244.0.9", "10.96.0.1", Protocol::Tcp, 80));
        assert_eq!(got, [(want, Ratio::ONE)], "endpoints on {nodes:?}");
    }
}

/// Service default/ext: ClusterIP 10.96.0.5, port 80/tcp with node port 30080, endpoints
/// 10.244.1.2 (on this node, "here") and 10.244.1.3 (elsewhere).
fn external(configure: impl FnOnce(&mut nftproxy::model::Service)) -> Ruleset {
    use nftproxy::model::{Endpoint, Service, ServiceId, ServicePort, Snapshot};
    let eps = [("10.244.1.2", "here"), ("10.244.1.3", "elsewhere")]
        .map(|(ip, node)| Endpoint { node_name: Some(node.into()), ..Endpoint::ready(ip.parse().unwrap(), 8080) });
    let port = ServicePort {
        name: "http".into(),
        port: 80,
        protocol: Protocol::Tcp,
        node_port: Some(30080),
        endpoints: eps.to_vec(),
    };
    let id = ServiceId::new("default", "ext");
    let mut svc = Service::new(id.clone(), vec!["10.96.0.5".parse().unwrap()], vec![port]);
    configure(&mut svc);
    let mut snap = Snapshot::default();
    snap.services.insert(id, svc);
    let mut opts = Options {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        node_ips: vec!["192.0.2.1".parse().unwrap()],
        ..Default::default()
    };
    opts.locality.node = Some("here".into());
    compile(&snap, &opts)
}

fn dnats(got: &[(Fate, Ratio)]) -> Vec<(String, bool)> {
    got.iter()
        .map(|(f, _)| match f {
            Fate::Dnat { addr, masquerade, .. } => (addr.to_string(), *masquerade),
            other => (format!("{other:?}"), false),
        })
        .collect()
}

#[test]
fn node_ports_serve_the_node_addresses_only_and_masquerade_external_clients() {
    let rs = external(|_| {});
    let world = pkt("192.0.2.2", "192.0.2.1", Protocol::Tcp, 30080);
    assert_eq!(dnats(&trace(&rs, &world)), [("10.244.1.2".into(), true), ("10.244.1.3".into(), true)]);
    assert_eq!(trace(&rs, &world)[0].1, Ratio(1, 2));
    // Another port of the node, another address, the node port on the ClusterIP: not ours.
    for p in [
        pkt("192.0.2.2", "192.0.2.1", Protocol::Tcp, 30081),
        pkt("192.0.2.2", "192.0.2.9", Protocol::Tcp, 30080),
        pkt("192.0.2.2", "192.0.2.1", Protocol::Udp, 30080),
        pkt("192.0.2.2", "127.0.0.1", Protocol::Tcp, 30080),
    ] {
        assert_eq!(trace(&rs, &p), [(Fate::Untouched, Ratio::ONE)], "{p:?}");
    }
    // From the node itself (output hook) as well.
    let mut host = pkt("192.0.2.1", "192.0.2.1", Protocol::Tcp, 30080);
    host.local = true;
    assert_eq!(dnats(&trace(&rs, &host)).len(), 2);
}

#[test]
fn local_external_policy_keeps_the_client_address_and_short_circuits_pods_and_the_node() {
    let rs = external(|s| s.external.local = true);
    let world = pkt("192.0.2.2", "192.0.2.1", Protocol::Tcp, 30080);
    assert_eq!(trace(&rs, &world), [(dnat("10.244.1.2", 8080, false), Ratio::ONE)], "only the local endpoint");
    let pod = pkt("10.244.1.10", "192.0.2.1", Protocol::Tcp, 30080);
    assert_eq!(dnats(&trace(&rs, &pod)), [("10.244.1.2".into(), false), ("10.244.1.3".into(), false)]);
    let mut host = pkt("192.0.2.1", "192.0.2.1", Protocol::Tcp, 30080);
    host.local = true;
    assert_eq!(dnats(&trace(&rs, &host)), [("10.244.1.2".into(), true), ("10.244.1.3".into(), true)]);
    // No endpoint on this node: external clients are dropped, pods still served.
    let elsewhere = external(|s| {
        s.external.local = true;
        s.ports[0].endpoints.retain(|e| e.node_name.as_deref() == Some("elsewhere"));
    });
    assert_eq!(trace(&elsewhere, &world), [(Fate::Dropped, Ratio::ONE)]);
    assert_eq!(dnats(&trace(&elsewhere, &pod)), [("10.244.1.3".into(), false)]);
}

#[test]
fn external_and_load_balancer_ips_with_source_ranges() {
    let rs = external(|s| {
        s.external.external_ips = vec!["203.0.113.10".parse().unwrap()];
        s.external.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
        s.external.source_ranges = vec!["192.0.2.0/28".parse().unwrap()];
    });
    let to = |src: &str, dst: &str, port: u16| trace(&rs, &pkt(src, dst, Protocol::Tcp, port));
    assert_eq!(dnats(&to("192.0.2.2", "203.0.113.10", 80)).len(), 2, "external IP, any source");
    assert_eq!(dnats(&to("192.0.2.200", "203.0.113.10", 80)).len(), 2);
    assert_eq!(dnats(&to("192.0.2.2", "198.51.100.7", 80)).len(), 2, "LB IP, allowed source");
    assert_eq!(to("192.0.2.200", "198.51.100.7", 80), [(Fate::Dropped, Ratio::ONE)], "LB IP, other source");
    assert_eq!(dnats(&to("192.0.2.200", "192.0.2.1", 30080)).len(), 2, "node ports are not limited");
    assert_eq!(to("192.0.2.2", "198.51.100.7", 81), [(Fate::Untouched, Ratio::ONE)], "other port of that IP");
}

#[test]
fn no_endpoints_reject_on_every_external_path() {
    let rs = external(|s| {
        s.ports[0].endpoints.clear();
        s.external.external_ips = vec!["203.0.113.10".parse().unwrap()];
        s.external.local = true;
    });
    for p in [pkt("192.0.2.2", "192.0.2.1", Protocol::Tcp, 30080), pkt("192.0.2.2", "203.0.113.10", Protocol::Tcp, 80)]
    {
        assert_eq!(trace(&rs, &p), [(Fate::Rejected, Ratio::ONE)], "{p:?}");
    }
}

#[test]
fn source_ranges_follow_the_family_and_apply_to_an_address_that_is_also_an_external_ip() {
    // The LB address is also listed as an external IP: its source ranges still apply.
    let both = external(|s| {
        s.external.external_ips = vec!["198.51.100.7".parse().unwrap()];
        s.external.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
        s.external.source_ranges = vec!["192.0.2.0/28".parse().unwrap()];
    });
    let to = |rs: &Ruleset, src: &str| trace(rs, &pkt(src, "198.51.100.7", Protocol::Tcp, 80));
    assert_eq!(to(&both, "192.0.2.200"), [(Fate::Dropped, Ratio::ONE)]);
    assert_eq!(dnats(&to(&both, "192.0.2.2")).len(), 2);
    // Ranges of the other family only: this family is not limited (kube-proxy filters by family).
    let v6_only = external(|s| {
        s.external.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
        s.external.source_ranges = vec!["2001:db8::/64".parse().unwrap()];
    });
    assert_eq!(dnats(&to(&v6_only, "192.0.2.200")).len(), 2);
}

/// The engine reads back and compiles one table at a time, taking only the Services of that
/// table: every object of a Service (chains, affinity sets, map elements, on every path) must
/// live in its own shard's table, none in the main one's shared sets.
#[test]
fn every_object_of_a_service_lives_in_its_own_table() {
    use nftproxy::compile::compile_service;
    use nftproxy::model::{Affinity, Endpoint, Service, ServiceId, ServicePort};
    let mut opts = Options {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        node_ips: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        table_shards: 4,
        ..Default::default()
    };
    opts.locality.node = Some("here".into());
    let mut shards_seen = std::collections::BTreeSet::new();
    for (i, local) in [false, true, false, true, false, true, false, true].into_iter().enumerate() {
        let eps = [("10.244.1.2", "here"), ("10.244.1.3", "elsewhere"), ("fd00:10:244:1::2", "here")]
            .map(|(ip, node)| Endpoint { node_name: Some(node.into()), ..Endpoint::ready(ip.parse().unwrap(), 8080) });
        let port = ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            node_port: Some(30080),
            endpoints: eps.to_vec(),
        };
        let id = ServiceId::new("default", format!("svc-{i}"));
        let vips = vec!["10.96.0.5".parse().unwrap(), "fd00:10:96::5".parse().unwrap()];
        let mut svc = Service::new(id.clone(), vips, vec![port]);
        svc.affinity = Some(Affinity { timeout_seconds: 60 });
        svc.internal_local = local;
        svc.external.local = local;
        svc.external.external_ips = vec!["203.0.113.10".parse().unwrap()];
        svc.external.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
        svc.external.source_ranges = vec!["192.0.2.0/28".parse().unwrap()];
        let objs = compile_service(&svc, &opts);
        let tables: Vec<u32> = objs.table_digests().into_iter().map(|(k, _)| k).collect();
        assert_eq!(tables, [opts.shard_of(&id)], "{id}: {objs:?}");
        shards_seen.insert(opts.shard_of(&id));
    }
    assert!(shards_seen.len() > 1 && shards_seen.contains(&0), "the Services spread over tables: {shards_seen:?}");
}
