//! Traffic steering with real connections: session affinity, weighted endpoints,
//! internalTrafficPolicy Local, topology hints.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

const VIP: &str = "10.96.0.80:80";

fn cluster() -> Option<Cluster> {
    web_cluster(&[8080], &[])
}

/// Service web (10.96.0.80:80 -> 8080) with `extra_spec` lines, and one EndpointSlice per
/// (name, weight annotation, endpoints "ip node zone-hint").
fn web(extra_spec: &str, slices: &[(&str, Option<u32>, &[&str])]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.80\n  ports: [{{name: http, port: 80}}]\n{extra_spec}"
    );
    for (name, weight, eps) in slices {
        let ann = weight.map(|w| format!(", annotations: {{nftproxy.io/weight: \"{w}\"}}")).unwrap_or_default();
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: web}}{ann}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        ));
        for e in *eps {
            let mut parts = e.split_whitespace();
            let ip = parts.next().unwrap();
            let node = parts.next().unwrap_or("node-1");
            let hints = parts.next().map(|z| format!(", hints: {{forZones: [{{name: {z}}}]}}")).unwrap_or_default();
            y.push_str(&format!("- {{addresses: [{ip}], nodeName: {node}{hints}}}\n"));
        }
    }
    y
}

const ALL: &[&str] = &["10.244.1.2", "10.244.1.3", "10.244.1.4"];

fn pods_seen(c: &Cluster, n: usize) -> BTreeSet<String> {
    c.probe("client", "tcp", VIP, n).into_keys().collect()
}

#[test]
fn session_affinity_sticks_survives_syncs_and_can_be_switched() {
    let Some(c) = cluster() else { return };
    let sticky = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n";
    let m = c.write("web.yaml", &web(sticky, &[("web-1", None, ALL)]));
    c.sync(&m, &[]);
    let first = pods_seen(&c, 20);
    assert_eq!(first.len(), 1, "one client, one endpoint: {first:?}");
    // Syncs of unrelated Services and of the same Service (a new port, same endpoints) keep
    // the affinity state: ten rounds, the client never moves.
    for i in 0..10 {
        let other = format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: other-{i}}}\nspec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80}}]}}\n"
        );
        let mut yaml = web(sticky, &[("web-1", None, ALL)]);
        if i % 2 == 1 {
            // The same Service changes (a second port) while its endpoints do not.
            yaml = yaml.replace(
                "ports: [{name: http, port: 80}]",
                "ports: [{name: http, port: 80}, {name: admin, port: 81, targetPort: 8080}]",
            );
        }
        c.write("web.yaml", &format!("{yaml}{other}"));
        c.sync(&m, &[]);
        assert_eq!(pods_seen(&c, 3), first, "affinity lost after sync {i}");
    }
    // Its endpoint goes away: the client is released to another pod, and sticks there.
    let gone = first.iter().next().unwrap().clone();
    let ip_of = |pod: &str| match pod {
        "web-a" => "10.244.1.2",
        "web-b" => "10.244.1.3",
        _ => "10.244.1.4",
    };
    let rest: Vec<&str> = ALL.iter().copied().filter(|ip| *ip != ip_of(&gone)).collect();
    assert_eq!(rest.len(), 2);
    c.write("web.yaml", &web(sticky, &[("web-1", None, &rest)]));
    c.sync(&m, &[]);
    let second = pods_seen(&c, 20);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);
    // Affinity off: connections spread again; on again: sticky again.
    c.write("web.yaml", &web("", &[("web-1", None, ALL)]));
    c.sync(&m, &[]);
    assert!(pods_seen(&c, 30).len() > 1);
    c.write("web.yaml", &web(sticky, &[("web-1", None, ALL)]));
    c.sync(&m, &[]);
    assert_eq!(pods_seen(&c, 20).len(), 1);
}

#[test]
fn session_affinity_expires_after_its_timeout() {
    let Some(c) = cluster() else { return };
    let m = c.write(
        "web.yaml",
        &web(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
            &[("web-1", None, ALL)],
        ),
    );
    c.sync(&m, &[]);
    // Back-to-back connections stick; connections spaced beyond the timeout are picked afresh.
    assert_eq!(pods_seen(&c, 10).len(), 1);
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1600));
        seen.extend(pods_seen(&c, 1));
    }
    assert!(seen.len() > 1, "after the timeout a new pick must be made: {seen:?}");
}

#[test]
fn weighted_endpoints_split_canary_traffic_and_weight_zero_drains() {
    let Some(c) = cluster() else { return };
    let m = c.write("web.yaml", &web("", &[("stable", Some(90), &ALL[..1]), ("canary", Some(10), &ALL[1..2])]));
    c.sync(&m, &[]);
    let got = c.probe("client", "tcp", VIP, 1000);
    let (a, b) = (got.get("web-a").copied().unwrap_or(0), got.get("web-b").copied().unwrap_or(0));
    assert_eq!(a + b, 1000, "{got:?}");
    let chi2 = (a as f64 - 900.0).powi(2) / 900.0 + (b as f64 - 100.0).powi(2) / 100.0;
    assert!(chi2 < CHI2_CRIT_0001[0], "not a 90/10 split at p=0.001: {got:?}, chi2={chi2:.2}");

    // Weight 0 drains: an established connection to web-b continues, new ones avoid it.
    c.write("web.yaml", &web("", &[("stable", Some(0), &ALL[..1]), ("canary", Some(1), &ALL[1..2])]));
    c.sync(&m, &[]);
    let ns = c.ns("client");
    let hold = std::thread::spawn(move || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns, TESTPOD, "hold", VIP, "--seconds", "4"])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    c.write("web.yaml", &web("", &[("stable", Some(1), &ALL[..1]), ("canary", Some(0), &ALL[1..2])]));
    c.sync(&m, &[]);
    assert_eq!(c.probe("client", "tcp", VIP, 50).get("web-a"), Some(&50));
    let out = hold.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("web-b held"), "{text}");
}

#[test]
fn internal_traffic_policy_local_uses_this_node_or_drops() {
    let Some(c) = cluster() else { return };
    let local = "  internalTrafficPolicy: Local\n";
    let m = c.write("web.yaml", &web(local, &[("web-1", None, &["10.244.1.2 node-1", "10.244.1.3 node-2"])]));
    c.sync(&m, &["--node-name", "node-1"]);
    assert_eq!(c.probe("client", "tcp", VIP, 30).get("web-a"), Some(&30));
    // No endpoint on this node: new connections are dropped (they time out, nothing answers).
    c.sync(&m, &["--node-name", "node-3"]);
    let got = c.probe_ms("client", "tcp", VIP, 2, 1000);
    assert_eq!(got.get("error: timed out"), Some(&2), "{got:?}");
}

#[test]
fn topology_hints_prefer_this_zone() {
    let Some(c) = cluster() else { return };
    let m = c.write(
        "web.yaml",
        &web(
            "",
            &[("web-1", None, &["10.244.1.2 node-1 zone-a", "10.244.1.3 node-2 zone-b", "10.244.1.4 node-3 zone-b"])],
        ),
    );
    c.sync(&m, &["--zone", "zone-a"]);
    assert_eq!(c.probe("client", "tcp", VIP, 30).get("web-a"), Some(&30));
    c.sync(&m, &["--zone", "zone-b"]);
    let got = c.probe("client", "tcp", VIP, 30);
    assert!(!got.contains_key("web-a") && got.len() == 2, "{got:?}");
    // A zone no hint names: all endpoints.
    c.sync(&m, &["--zone", "zone-z"]);
    assert_eq!(pods_seen(&c, 40).len(), 3);
}
