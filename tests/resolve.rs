//! Kubernetes objects -> snapshot, without root: endpoint sources, conditions, ClusterIPs.

use nftproxy::model::{External, Family, ServiceId, Snapshot};
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
    let opts = ResolveOptions {
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap(), "fd00:96::/112".parse().unwrap()],
        ..ResolveOptions::default()
    };
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

/// A Service `name` in `namespace` with a ClusterIP and an EndpointSlice endpoint.
fn service_with_endpoint(namespace: &str, name: &str, ip: &str, endpoint: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name:?}, namespace: {namespace:?}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, namespace: {namespace:?}, labels: {{kubernetes.io/service-name: {name:?}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{endpoint}]}}]\n"
    )
}

/// Issue 11: Service `b/c` in `a` and Service `c` in `a/b` were both chain `svc4/a/b/c/tcp/80`.
#[test]
fn names_that_would_collide_in_kernel_names_are_refused() {
    let yaml = format!(
        "{}{}",
        service_with_endpoint("a", "b/c", "10.96.0.1", "10.244.0.1"),
        service_with_endpoint("a/b", "c", "10.96.0.2", "10.244.0.2")
    );
    let err = load(&yaml, &ResolveOptions::default()).unwrap_err();
    let lines: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
    let has = |needle: &str| assert!(lines.iter().any(|l| l.contains(needle)), "{needle}\n{}", lines.join("\n"));
    has(
        "t.yaml (document 1): Service a/b/c: metadata.name: \"b/c\" is not a valid DNS-1035 label (lowercase letters, digits and '-', starting with a letter, ending with a letter or digit, at most 63 characters)",
    );
    has("t.yaml (document 3): Service a/b/c: metadata.namespace: \"a/b\" is not a valid DNS-1123 label (");
    has("t.yaml (document 4): EndpointSlice a/b/s: metadata.namespace: \"a/b\" is not a valid DNS-1123 label (");
    // Every problem at once: the valid-looking halves are not reported, the bad parts all are.
    assert_eq!(err.0.len(), 3, "{}", lines.join("\n"));

    // Names differing only in where the dash is stay two Services with two ClusterIPs.
    let yaml = format!(
        "{}{}",
        service_with_endpoint("a-b", "c", "10.96.0.1", "10.244.0.1"),
        service_with_endpoint("a", "b-c", "10.96.0.2", "10.244.0.2")
    );
    let s = ok(&yaml);
    assert_eq!(s.services.len(), 2);
    let one = &s.services[&ServiceId::new("a-b", "c")];
    let two = &s.services[&ServiceId::new("a", "b-c")];
    assert_eq!(one.cluster_ips, ["10.96.0.1".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(two.cluster_ips, ["10.96.0.2".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(one.ports[0].endpoints.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>(), ["10.244.0.1"]);
    assert_eq!(two.ports[0].endpoints.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>(), ["10.244.0.2"]);
}

#[test]
fn names_are_checked_as_the_api_server_checks_them() {
    let long = "a".repeat(64);
    let cases = [
        // (namespace, name, the field refused, its rule)
        ("default", "Web", "metadata.name", "DNS-1035 label"),
        ("default", &long, "metadata.name", "DNS-1035 label"),
        ("team.a", "web", "metadata.namespace", "DNS-1123 label"),
        // A valid DNS-1123 label, but Service names are DNS-1035: no leading digit.
        ("default", "1web", "metadata.name", "DNS-1035 label"),
    ];
    for (namespace, name, field, rule) in cases {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name:?}, namespace: {namespace:?}}}\nspec: {{ports: [{{port: 80}}]}}\n"
        );
        let err = load(&yaml, &ResolveOptions::default()).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        let e = &err.0[0];
        assert_eq!(e.object, format!("Service {namespace}/{name}"), "{err}");
        assert_eq!(e.field, field, "{err}");
        let value = if field == "metadata.name" { name } else { namespace };
        assert!(e.message.starts_with(&format!("{value:?} is not a valid {rule} (")), "{err}");
    }
    // 63 characters is fine, and so is a Service name that is also a valid namespace.
    let max = "a".repeat(63);
    ok(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {max}, namespace: {max}}}\nspec: {{ports: [{{port: 80}}]}}\n"
    ));
}

#[test]
fn other_objects_and_ports_are_named_as_the_api_server_requires() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n";
    // Pods, EndpointSlices and Endpoints: DNS-1123 subdomains, so dots are fine.
    ok(&format!(
        "{svc}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web.a-1, labels: {{app: web}}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web.x, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: []\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: team-a}}\n"
    ));
    let cases = [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: Web_A}\n",
            "Pod default/Web_A: metadata.name: \"Web_A\" is not a valid DNS-1123 subdomain",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: Prod}\n",
            "Pod Prod/p: metadata.namespace: \"Prod\" is not a valid DNS-1123 label",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {labels: {app: web}}\n",
            "Pod default/: metadata.name: a Pod needs a name",
        ),
        (
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web/x}\n",
            "Endpoints default/web/x: metadata.name: \"web/x\" is not a valid DNS-1123 subdomain",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s., labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []\n",
            "EndpointSlice default/s.: metadata.name: \"s.\" is not a valid DNS-1123 subdomain",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: team.a}\n",
            "Namespace team.a: metadata.name: \"team.a\" is not a valid DNS-1123 label",
        ),
        // Not proxied, but still a name the API server would refuse.
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: Ext}\nspec: {type: ExternalName, externalName: example.com}\n",
            "Service default/Ext: metadata.name: \"Ext\" is not a valid DNS-1035 label",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: two}\nspec: {ports: [{name: HTTP, port: 80}]}\n",
            "Service default/two: spec.ports[0].name: \"HTTP\" is not a valid DNS-1123 label",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: two}\nspec: {ports: [{port: 80, targetPort: my--port}]}\n",
            "Service default/two: spec.ports[0].targetPort: \"my--port\" is not a valid port name",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: two}\nspec: {ports: [{port: 80, targetPort: a-very-long-port-name}]}\n",
            "Service default/two: spec.ports[0].targetPort: \"a-very-long-port-name\" is not a valid port name",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: two}\nspec: {ports: [{name: a, port: 80}, {name: a, port: 81}]}\n",
            "Service default/two: spec.ports[1].name: duplicate port name \"a\"",
        ),
    ];
    for (object, expected) in cases {
        let err = load(&format!("{svc}---\n{object}"), &ResolveOptions::default()).unwrap_err().to_string();
        assert!(err.contains(&format!("t.yaml (document 2): {expected}")), "{expected}\n{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn node_ports_external_and_load_balancer_ips_are_resolved() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: [203.0.113.0/24, "2001:db8:1::/48"]
  ports:
  - {port: 443, nodePort: 30443}
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.7}
    - {ip: 198.51.100.8, ipMode: Proxy}
    - {hostname: lb.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  externalIPs: [203.0.113.10]
  externalTrafficPolicy: Local
  ports:
  - {port: 80}
"#;
    let opts = ResolveOptions { node_port_range: 31000..=31999, ..ResolveOptions::default() };
    let s = load(yaml, &opts).unwrap();
    let svc = |n: &str| &s.services[&ServiceId::new("default", n)];
    let ip = |t: &str| t.parse::<std::net::IpAddr>().unwrap();

    let np = svc("np");
    assert_eq!(np.ports[0].node_port, Some(30080));
    let dns = np.ports[1].node_port.expect("allocated");
    assert!((31000..=31999).contains(&dns), "{dns}");
    assert_eq!(np.external, External::default());
    assert!(np.is_external());

    let lb = svc("lb");
    assert_eq!(lb.ports[0].node_port, Some(30443));
    assert_eq!(lb.external.load_balancer_ips, [ip("198.51.100.7")]);
    let ranges: Vec<String> = lb.external.source_ranges.iter().map(|r| r.to_string()).collect();
    assert_eq!(ranges, ["203.0.113.0/24", "2001:db8:1::/48"]);
    assert!(lb.external.local);
    let hc = lb.external.health_check_node_port.expect("allocated for LoadBalancer + Local");
    assert!((31000..=31999).contains(&hc) && hc != dns, "{hc}");
    assert!(lb.external.external_ips.is_empty());

    let ext = svc("ext");
    assert_eq!(ext.ports[0].node_port, None);
    assert_eq!(ext.external, External { external_ips: vec![ip("203.0.113.10")], local: true, ..External::default() });
    // The same objects, the same ports.
    assert_eq!(load(yaml, &opts).unwrap(), s);
}

#[test]
fn an_external_address_held_elsewhere_is_not_served_and_stops_nothing_else() {
    let svc = |name: &str, ip: &str, ext: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{clusterIP: {ip}, externalIPs: [{ext}], ports: [{{port: 80}}]}}\n"
        )
    };
    let yaml = [
        svc("e1", "10.96.0.1", "203.0.113.10"),
        svc("e2", "10.96.0.2", "203.0.113.10"), // the same external address as e1
        svc("e3", "10.96.0.3", "10.96.0.1"),    // e1's ClusterIP
        svc("e4", "10.96.0.4", "10.96.0.4"),    // its own ClusterIP
        svc("e5", "10.96.0.5", "203.0.113.11"), // nobody else's
    ]
    .concat();
    let s = ok(&yaml);
    let get = |n: &str| &s.services[&ServiceId::new("default", n)];
    assert_eq!(get("e1").external.external_ips, ["203.0.113.10".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(get("e5").external.external_ips, ["203.0.113.11".parse::<std::net::IpAddr>().unwrap()]);
    for (name, why) in [
        ("e2", "external address 203.0.113.10:80/tcp is already served by Service default/e1"),
        ("e3", "external address 10.96.0.1:80/tcp is already the ClusterIP of Service default/e1"),
        ("e4", "external address 10.96.0.4:80/tcp is already this Service's ClusterIP"),
    ] {
        assert!(get(name).external.external_ips.is_empty(), "{name}");
        assert_eq!(get(name).unserved(), [why], "{name}");
    }
}

#[test]
fn special_external_addresses_are_refused_as_the_api_server_refuses_them() {
    for (ip, why) in [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
    ] {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: x}}\nspec: {{clusterIP: 10.96.0.1, externalIPs: [\"{ip}\"], ports: [{{port: 22}}]}}\n"
        );
        let err = load(&yaml, &ResolveOptions::default()).unwrap_err().to_string();
        assert!(err.contains("spec.externalIPs[0]") && err.contains(why), "{ip}: {err}");
    }
}

#[test]
fn resolving_while_skipping_leaves_out_only_the_services_of_bad_objects() {
    let yaml = "\
apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {name: bad-1, labels: {kubernetes.io/service-name: bad}, annotations: {nftproxy.io/weight: heavy}}\n\
addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.244.0.9]}]\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: worse}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 0}]}\n";
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    manifest::parse_into("t.yaml", yaml, &mut objects, &mut errors);
    assert!(errors.is_empty());
    assert!(resolve(&objects, &ResolveOptions::default()).is_err(), "all or nothing without skipping");
    let (snap, errors, skipped) = nftproxy::source::resolve::resolve_skipping(&objects, &ResolveOptions::default());
    assert_eq!(snap.services.keys().map(|id| id.name.as_str()).collect::<Vec<_>>(), ["good"]);
    assert_eq!(skipped, [ServiceId::new("default", "bad"), ServiceId::new("default", "worse")].into());
    let text: Vec<String> = errors.iter().map(|(_, e)| e.to_string()).collect();
    assert!(
        text.iter().any(|e| e.contains("EndpointSlice default/bad-1") && e.contains("nftproxy.io/weight")),
        "{text:?}"
    );
    assert!(text.iter().any(|e| e.contains("Service default/worse") && e.contains("spec.ports[0].port")), "{text:?}");
}
