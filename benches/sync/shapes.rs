//! The Services under test: N Services x E endpoints as a model snapshot and as Kubernetes
//! objects, optionally NodePorts and Local LoadBalancers (`NFTPROXY_BENCH_EXTERNAL`).

use super::*;

pub(crate) const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// `NFTPROXY_BENCH_EXTERNAL`: `nodeport` makes every Service a NodePort (node port 10000 + i);
/// `lb-local` also makes the first 1,000 Local LoadBalancers with an ingress IP and one endpoint
/// on this node. Unset: ClusterIPs only.
pub(crate) fn external_shape() -> String {
    std::env::var("NFTPROXY_BENCH_EXTERNAL").unwrap_or_default()
}

pub(crate) const NODE: &str = "bench-node";

pub(crate) fn lb_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i as u32)
}

pub(crate) fn is_lb_local(i: usize) -> bool {
    external_shape() == "lb-local" && i < 1000
}

pub(crate) fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32)
}

pub(crate) fn endpoint_ip(i: usize, j: usize, e: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * e + j) as u32)
}

pub(crate) fn name(i: usize) -> (String, String) {
    (format!("ns-{}", i % 10), format!("svc-{i}"))
}

/// N Services x E endpoints, TCP 80 -> 8080. `shift` moves one endpoint of Service `shift.0`.
pub(crate) fn snapshot(n: usize, e: usize, shift: Option<(usize, usize)>) -> Snapshot {
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

/// The child's options; `NFTPROXY_BENCH_SHARDS` sets `--table-shards`, `NFTPROXY_BENCH_COUNTERS=1`
/// `--endpoint-counters` (off elsewhere, so the other rows stay comparable with earlier runs).
pub(crate) fn options() -> Options {
    let table_shards = std::env::var("NFTPROXY_BENCH_SHARDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let endpoint_counters = std::env::var("NFTPROXY_BENCH_COUNTERS").is_ok_and(|v| v == "1");
    let mut opts = Options {
        cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
        table_shards,
        endpoint_counters,
        ..Default::default()
    };
    if !external_shape().is_empty() {
        opts.node_ips = vec!["192.0.2.1".parse().unwrap()];
        opts.locality.node = Some(NODE.into());
    }
    opts
}

/// The same Services as Kubernetes objects: one Service and one EndpointSlice each, keyed like
/// the agent's stores.
pub(crate) fn k8s_objects(
    n: usize,
    e: usize,
) -> (HashMap<ServiceId, K8sService>, HashMap<(String, String), EndpointSlice>) {
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
