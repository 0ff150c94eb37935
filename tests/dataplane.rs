//! ClusterIP data plane with real packets in throwaway network namespaces.

mod common;

use common::*;

fn demo() -> Option<Cluster> {
    web_cluster(&[8080], &[5353])
}

fn total(m: &std::collections::BTreeMap<String, usize>) -> usize {
    m.values().sum()
}

#[test]
fn tcp_connections_are_balanced_uniformly_over_three_pods() {
    let Some(c) = demo() else { return };
    c.sync(&demo_manifests(), &["--cluster-cidr", "10.244.0.0/16"]);
    let got = c.probe("client", "tcp", "10.96.0.80:80", 600);
    let counts: Vec<usize> = ["web-a", "web-b", "web-c"].iter().map(|p| got.get(*p).copied().unwrap_or(0)).collect();
    assert_eq!(counts.iter().sum::<usize>(), 600, "every connection answered by a web pod: {got:?}");
    let chi2 = chi_square_uniform(&counts);
    assert!(chi2 < CHI2_CRIT_0001[1], "not uniform at p=0.001: {counts:?}, chi2={chi2:.2}");
}

#[test]
fn udp_and_ipv6_and_named_target_ports_reach_every_pod() {
    let Some(c) = demo() else { return };
    c.sync(&demo_manifests(), &[]);
    for (proto, addr) in [("udp", "10.96.0.80:53"), ("tcp", "[fd00:10:96::80]:80"), ("udp", "[fd00:10:96::80]:53")] {
        let got = c.probe("client", proto, addr, 60);
        assert_eq!(total(&got), 60);
        for pod in ["web-a", "web-b", "web-c"] {
            assert!(got.get(pod).copied().unwrap_or(0) > 0, "{proto} {addr}: {pod} never answered: {got:?}");
        }
        assert!(got.keys().all(|k| k.starts_with("web-")), "{proto} {addr}: {got:?}");
    }
}

#[test]
fn no_endpoints_and_unknown_ports_are_refused_at_once() {
    let Some(c) = demo() else { return };
    c.sync(&demo_manifests(), &[]);
    // Service "nothing" selects no pod: TCP is refused (not a timeout).
    let got = c.probe("client", "tcp", "10.96.0.99:80", 3);
    assert_eq!(got.get("error: connection refused"), Some(&3), "{got:?}");
    // A port "web" does not have, TCP and UDP, IPv4 and IPv6.
    for (proto, addr) in [
        ("tcp", "10.96.0.80:81"),
        ("udp", "10.96.0.80:54"),
        ("tcp", "[fd00:10:96::80]:81"),
        ("udp", "[fd00:10:96::80]:54"),
    ] {
        let got = c.probe("client", proto, addr, 2);
        assert_eq!(got.get("error: connection refused"), Some(&2), "{proto} {addr}: {got:?}");
    }
    // From the node itself too.
    let got = c.probe("node", "tcp", "10.96.0.99:80", 1);
    assert_eq!(got.get("error: connection refused"), Some(&1), "{got:?}");
}

#[test]
fn udp_service_without_endpoints_answers_port_unreachable() {
    let Some(c) = demo() else { return };
    let m = c.write(
        "udp.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  clusterIP: 10.96.0.53\n  selector: {app: none}\n  ports: [{protocol: UDP, port: 53}]\n",
    );
    c.sync(&m, &[]);
    let got = c.probe("client", "udp", "10.96.0.53:53", 2);
    assert_eq!(got.get("error: connection refused"), Some(&2), "{got:?}");
}

#[test]
fn host_network_processes_reach_cluster_ips() {
    let Some(c) = demo() else { return };
    c.sync(&demo_manifests(), &["--cluster-cidr", "10.244.0.0/16"]);
    for addr in ["10.96.0.80:80", "[fd00:10:96::80]:80"] {
        let got = c.probe("node", "tcp", addr, 30);
        assert_eq!(total(&got), 30);
        assert!(got.keys().all(|k| k.starts_with("web-")), "{addr}: {got:?}");
    }
    let got = c.probe("node", "udp", "10.96.0.80:53", 10);
    assert!(got.keys().all(|k| k.starts_with("web-")), "{got:?}");
}

/// Which source address the pods saw for connections from `from`.
fn peers(c: &Cluster, from: &str, addr: &str) -> Vec<String> {
    let seen: std::collections::BTreeSet<String> = c
        .probe_full(from, "tcp", addr, 6)
        .keys()
        .map(|k| k.split_whitespace().nth(1).unwrap_or(k).to_string())
        .collect();
    seen.into_iter().collect()
}

#[test]
fn masquerade_outside_cluster_cidr_and_masquerade_all() {
    let Some(c) = demo() else { return };
    // No cluster CIDR: nobody is masqueraded, the pod sees the real client.
    c.sync(&demo_manifests(), &[]);
    assert_eq!(peers(&c, "ext", "10.96.0.80:80"), ["192.0.2.2"]);
    assert_eq!(peers(&c, "client", "10.96.0.80:80"), ["10.244.1.10"]);
    // With a cluster CIDR: outside sources are masqueraded to the node, pods are not.
    c.sync(&demo_manifests(), &["--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/48"]);
    assert_eq!(peers(&c, "ext", "10.96.0.80:80"), ["169.254.1.1"]);
    assert_eq!(peers(&c, "client", "10.96.0.80:80"), ["10.244.1.10"]);
    assert_eq!(peers(&c, "client", "[fd00:10:96::80]:80"), ["fd00:10:244:1::10"]);
    // --masquerade-all: everybody is.
    c.sync(&demo_manifests(), &["--masquerade-all"]);
    assert_eq!(peers(&c, "client", "10.96.0.80:80"), ["169.254.1.1"]);
    // IPv6 source selection prefers the node's global address over the link-local one.
    assert_eq!(peers(&c, "client", "[fd00:10:96::80]:80"), ["2001:db8::1"]);
}

#[test]
fn hairpin_a_pod_reaching_itself_through_its_service() {
    let Some(mut c) = (if can_run_netns_tests() { Some(Cluster::new(demo_pods())) } else { None }) else {
        return;
    };
    c.serve("web-a", "web-a", &[8080], &[]);
    let m = c.write(
        "solo.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: solo}\nspec:\n  clusterIP: 10.96.0.7\n  ports: [{port: 80, targetPort: 8080}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: solo-1, labels: {kubernetes.io/service-name: solo}}\naddressType: IPv4\n\
         ports: [{port: 8080}]\nendpoints: [{addresses: [10.244.1.2]}]\n",
    );
    c.sync(&m, &["--cluster-cidr", "10.244.0.0/16"]);
    // Without SNAT the reply would go straight back inside the pod and never match the connection.
    let got = c.probe_full("web-a", "tcp", "10.96.0.7:80", 5);
    assert_eq!(got.get("web-a 169.254.1.1"), Some(&5), "{got:?}");
}

#[test]
fn same_port_two_protocols_and_sctp() {
    if !can_run_netns_tests() {
        return;
    }
    let mut c = Cluster::new(demo_pods());
    c.serve("web-a", "dns-over-tcp", &[5300], &[]);
    c.serve("web-a", "dns-over-udp", &[], &[5301]);
    let m = c.write(
        "dns.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: tcp, protocol: TCP, port: 53, targetPort: 5300}
  - {name: udp, protocol: UDP, port: 53, targetPort: 5301}
  - {name: sctp, protocol: SCTP, port: 53, targetPort: 5302}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: tcp, port: 5300, protocol: TCP}, {name: udp, port: 5301, protocol: UDP}, {name: sctp, port: 5302, protocol: SCTP}]
endpoints: [{addresses: [10.244.1.2], conditions: {ready: true}}]
"#,
    );
    c.sync(&m, &[]);
    assert_eq!(c.probe("client", "tcp", "10.96.0.10:53", 5).get("dns-over-tcp"), Some(&5));
    assert_eq!(c.probe("client", "udp", "10.96.0.10:53", 5).get("dns-over-udp"), Some(&5));
    // This kernel has no SCTP sockets: check what the kernel was given instead.
    let listing = c.nft_list("inet nftproxy");
    assert!(listing.contains("10.96.0.10 . sctp . 53 : goto svc4/default/dns/sctp/53"), "{listing}");
    assert!(listing.contains("dnat ip to 10.244.1.2:5302"), "{listing}");
}

#[test]
fn endpoint_conditions_decide_who_gets_new_connections() {
    let Some(c) = demo() else { return };
    let slice = |ready_a: bool, ready_b: bool, term_b: bool| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.80\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\n\
             ports: [{{port: 8080}}]\nendpoints:\n\
             - {{addresses: [10.244.1.2], conditions: {{ready: {ready_a}, serving: {ready_a}, terminating: false}}}}\n\
             - {{addresses: [10.244.1.3], conditions: {{ready: {ready_b}, serving: true, terminating: {term_b}}}}}\n\
             - {{addresses: [10.244.1.4], conditions: {{ready: false, serving: false, terminating: false}}}}\n"
        )
    };
    // web-a ready, web-b terminating (still serving): only web-a gets new connections.
    c.sync(&c.write("s.yaml", &slice(true, false, true)), &[]);
    let got = c.probe("client", "tcp", "10.96.0.80:80", 20);
    assert_eq!(got.get("web-a"), Some(&20), "{got:?}");
    // Nothing ready: fall back to the serving, terminating web-b; never the unready web-c.
    c.sync(&c.write("s.yaml", &slice(false, false, true)), &[]);
    let got = c.probe("client", "tcp", "10.96.0.80:80", 20);
    assert_eq!(got.get("web-b"), Some(&20), "{got:?}");
}

#[test]
fn services_kube_proxy_skips_are_not_programmed() {
    let Some(c) = demo() else { return };
    let m = c.write(
        "skip.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: headless, labels: {service.kubernetes.io/headless: ''}}\nspec: {clusterIP: 10.96.1.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: none}\nspec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: example.org, ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: other-proxy, labels: {service.kubernetes.io/service-proxy-name: foo}}\nspec: {clusterIP: 10.96.1.4, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: kept}\nspec: {clusterIP: 10.96.1.5, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n",
    );
    let m2 = c.dir.join("pods.yaml");
    std::fs::copy(demo_manifests().join("pods.yaml"), &m2).unwrap();
    c.sync(&c.dir, &[]);
    let listing = c.nft_list("inet nftproxy");
    assert!(listing.contains("svc4/default/kept/tcp/80"), "{listing}");
    for skipped in ["headless", "/none/", "default/ext/", "other-proxy", "10.96.1.1 ", "10.96.1.4"] {
        assert!(!listing.contains(skipped), "{skipped} should not be programmed:\n{listing}");
    }
    assert!(c.probe("client", "tcp", "10.96.1.5:80", 5).keys().all(|k| k.starts_with("web-")));
    let _ = m;
}
