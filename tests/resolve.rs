//! Kubernetes objects -> snapshot, without root: endpoint sources, conditions, ClusterIPs.

use nftproxy::model::{Family, ServiceId, Snapshot};
use nftproxy::source::resolve::{ResolveOptions, resolve};
use nftproxy::source::{InputErrors, Objects, manifest};

fn load(yaml: &str, opts: &ResolveOptions) -> Result<Snapshot, InputErrors> {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    manifest::parse_into("t.yaml", yaml, &mut objects, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    resolve(&objects, opts)
}

fn ok(yaml: &str) -> Snapshot {
    load(yaml, &ResolveOptions::default()).unwrap()
}

/// (ip:port, ready, serving, terminating) of every endpoint of the first port of `name`.
fn eps(s: &Snapshot, name: &str) -> Vec<(String, bool, bool, bool)> {
    s.services[&ServiceId::new("default", name)].ports[0]
        .endpoints
        .iter()
        .map(|e| (format!("{}:{}", e.ip, e.port), e.ready, e.serving, e.terminating))
        .collect()
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.244.0.2, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, labels: {app: web}, deletionTimestamp: "2026-01-01T00:00:00Z"}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other-ns, namespace: other, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.4, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Succeeded, podIP: 10.244.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: no-port, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.0.6, conditions: [{type: Ready, status: "True"}]}
"#;

#[test]
fn pods_become_endpoints_as_the_endpointslice_controller_would() {
    let s = ok(&format!(
        "{PODS}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: http}}]}}\n"
    ));
    assert_eq!(
        eps(&s, "web"),
        [
            ("10.244.0.1:8080".into(), true, true, false),
            // named port resolved per pod
            ("10.244.0.2:9090".into(), false, false, false),
            // terminating: not ready, still serving
            ("10.244.0.3:8080".into(), false, true, true),
        ]
    );
}

#[test]
fn slices_win_over_endpoints_which_win_over_pods() {
    let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{name: h, port: 80, targetPort: 8080}]}\n";
    let legacy = "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets: [{addresses: [{ip: 10.1.0.1}], notReadyAddresses: [{ip: 10.1.0.2}], ports: [{name: h, port: 81}]}]\n";
    let slice = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: h, port: 82}]\nendpoints: [{addresses: [10.2.0.1], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.2.0.2]}]\n";
    let from_pods = ok(&format!("{PODS}{svc}"));
    assert_eq!(eps(&from_pods, "web")[0].0, "10.244.0.1:8080");
    let from_legacy = ok(&format!("{PODS}{svc}{legacy}"));
    assert_eq!(
        eps(&from_legacy, "web"),
        [("10.1.0.1:81".into(), true, true, false), ("10.1.0.2:81".into(), false, false, false)]
    );
    let from_slice = ok(&format!("{PODS}{svc}{legacy}{slice}"));
    assert_eq!(
        eps(&from_slice, "web"),
        [("10.2.0.1:82".into(), false, true, true), ("10.2.0.2:82".into(), true, true, false)]
    );
}

#[test]
fn cluster_ips_are_allocated_stably_and_uniquely() {
    let yaml: String = (0..200)
        .map(|i| {
            format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{ports: [{{port: 80}}]}}\n")
        })
        .collect();
    let a = ok(&yaml);
    let b = ok(&yaml);
    let ips: Vec<_> = a.services.values().map(|s| s.cluster_ips.clone()).collect();
    assert_eq!(ips, b.services.values().map(|s| s.cluster_ips.clone()).collect::<Vec<_>>());
    let cidr: ipnet::IpNet = "10.96.0.0/12".parse().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for ip in ips.iter().flatten() {
        assert!(cidr.contains(ip) && seen.insert(*ip), "{ip}");
    }
    // Adding a Service does not move the others.
    let more = ok(&format!(
        "{yaml}---\napiVersion: v1\nkind: Service\nmetadata: {{name: zzz}}\nspec: {{ports: [{{port: 80}}]}}\n"
    ));
    for (id, svc) in &a.services {
        assert_eq!(more.services[id].cluster_ips, svc.cluster_ips);
    }
}

#[test]
fn dual_stack_allocation_follows_ip_family_policy() {
    let opts =
        ResolveOptions { service_cidrs: vec!["10.96.0.0/16".parse().unwrap(), "fd00:96::/112".parse().unwrap()] };
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: single}\nspec: {ports: [{port: 80}]}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: dual}\nspec: {ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: six}\nspec: {ipFamilies: [IPv6], ports: [{port: 80}]}\n";
    let s = load(yaml, &opts).unwrap();
    let fams =
        |n: &str| s.services[&ServiceId::new("default", n)].cluster_ips.iter().map(Family::of).collect::<Vec<_>>();
    assert_eq!(fams("single"), [Family::V4]);
    assert_eq!(fams("dual"), [Family::V4, Family::V6]);
    assert_eq!(fams("six"), [Family::V6]);
}

#[test]
fn invalid_objects_name_the_field() {
    let cases = [
        ("spec: {ports: [{port: 80, targetPort: 0}]}", "spec.ports[0].targetPort"),
        ("spec: {ports: []}", "spec.ports"),
        ("spec: {ports: [{port: 80}, {port: 81}]}", "spec.ports[0].name"),
        ("spec: {clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}", "spec.clusterIPs[1]"),
        ("spec: {ipFamilies: [IPv5], ports: [{port: 80}]}", "spec.ipFamilies[0]"),
        ("spec: {ports: [{name: a, port: 80}, {name: b, port: 80}]}", "spec.ports[1].port"),
    ];
    for (spec, field) in cases {
        let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\n{spec}\n");
        let err = load(&yaml, &ResolveOptions::default()).unwrap_err().to_string();
        assert!(err.contains(&format!("Service default/bad: {field}")), "{spec}: {err}");
    }
    let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.0.999]}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
    let err = load(slice, &ResolveOptions::default()).unwrap_err().to_string();
    assert!(err.contains("EndpointSlice default/s: endpoints[0].addresses[0]"), "{err}");
}

#[test]
fn steering_fields_are_read_and_checked() {
    let s = ok(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {sessionAffinity: ClientIP, internalTrafficPolicy: Local, ports: [{port: 80}]}\n",
    );
    let svc = &s.services[&ServiceId::new("default", "web")];
    assert_eq!(svc.affinity.map(|a| a.timeout_seconds), Some(10800), "kube's default timeout");
    assert!(svc.internal_local);
    let weighted = ok(&format!(
        "{PODS}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: http}}]}}\n"
    )
    .replace("metadata: {name: a, labels: {app: web}}", "metadata: {name: a, labels: {app: web}, annotations: {nftproxy.io/weight: \"7\"}}"));
    let weights: Vec<u32> =
        weighted.services[&ServiceId::new("default", "web")].ports[0].endpoints.iter().map(|e| e.weight).collect();
    assert_eq!(weights, [7, 1, 1]);
    let cases = [
        (
            "spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ),
        ("spec: {sessionAffinity: Sticky, ports: [{port: 80}]}", "spec.sessionAffinity"),
        ("spec: {internalTrafficPolicy: Nearby, ports: [{port: 80}]}", "spec.internalTrafficPolicy"),
    ];
    for (spec, field) in cases {
        let err = load(
            &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\n{spec}\n"),
            &ResolveOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(&format!("Service default/bad: {field}")), "{err}");
    }
    let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: web}, annotations: {nftproxy.io/weight: \"1001\"}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.0.1]}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
    let err = load(slice, &ResolveOptions::default()).unwrap_err().to_string();
    assert!(
        err.contains("EndpointSlice default/s: metadata.annotations[\"nftproxy.io/weight\"]: \"1001\" is not a weight"),
        "{err}"
    );
}
