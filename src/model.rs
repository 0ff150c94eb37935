//! What the node should do: Services, their ports and the endpoints behind each port.
//!
//! Pure data, no I/O. Both sources (manifest files, the Kubernetes API) produce a [`Snapshot`];
//! the compiler turns it into nftables objects.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// `namespace/name` of a Service: the key operators know it by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub namespace: String,
    pub name: String,
}

impl ServiceId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IANA protocol number, as `meta l4proto` sees it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol of an IANA protocol number, if it is one Services use.
    pub fn from_number(n: u8) -> Option<Self> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].into_iter().find(|p| p.number() == n)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`); `None` means the API default, TCP.
    pub fn from_k8s(s: Option<&str>) -> Result<Self, String> {
        match s {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// One backend address for one service port, with its EndpointSlice conditions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// EndpointSlice hints: the zones / nodes this endpoint should serve.
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
    /// Relative share of new connections (`nftproxy.io/weight`, default 1); 0 drains.
    pub weight: u32,
}

/// Upper bound of `nftproxy.io/weight`.
pub const MAX_WEIGHT: u32 = 1000;

impl Endpoint {
    /// A ready endpoint of weight 1 with no locality.
    pub fn ready(ip: IpAddr, port: u16) -> Self {
        Endpoint {
            ip,
            port,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
            weight: 1,
        }
    }
}

/// Where this node is, for `internalTrafficPolicy: Local` and topology hints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub node: Option<String>,
    pub zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// `spec.ports[].nodePort` of a NodePort or LoadBalancer Service: served on the node's
    /// addresses (see `External`).
    pub node_port: Option<u16>,
    /// Every known endpoint for this port, whatever its conditions; see [`ServicePort::usable_endpoints`].
    pub endpoints: Vec<Endpoint>,
}

/// Topology hints, as kube-proxy applies them: used only when every candidate carries hints of
/// that kind and at least one names this node (or zone); node hints before zone hints.
fn by_hints<'a>(ready: Vec<&'a Endpoint>, here: &Locality) -> Vec<&'a Endpoint> {
    let pick = |hints: fn(&Endpoint) -> &Vec<String>, mine: &Option<String>| -> Option<Vec<&'a Endpoint>> {
        let mine = mine.as_ref()?;
        if ready.iter().any(|e| hints(e).is_empty()) {
            return None;
        }
        let chosen: Vec<&Endpoint> = ready.iter().copied().filter(|e| hints(e).contains(mine)).collect();
        (!chosen.is_empty()).then_some(chosen)
    };
    pick(|e| &e.node_hints, &here.node).or_else(|| pick(|e| &e.zone_hints, &here.zone)).unwrap_or(ready)
}

impl ServicePort {
    /// The endpoints new connections may go to, as kube-proxy picks them: the ready ones
    /// (narrowed by topology hints), or if none is ready, the ones still serving while
    /// terminating; with `local_only`, the same among this node's endpoints. Weight 0 drains.
    pub fn usable_endpoints(&self, family: Family, local_only: bool, here: &Locality) -> Vec<&Endpoint> {
        let candidates: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| Family::of(&e.ip) == family)
            .filter(|e| !local_only || (e.node_name.is_some() && e.node_name == here.node))
            .collect();
        let ready: Vec<&Endpoint> = candidates.iter().copied().filter(|e| e.ready).collect();
        let mut chosen = if ready.is_empty() {
            candidates.into_iter().filter(|e| e.serving && e.terminating).collect()
        } else if local_only {
            ready
        } else {
            by_hints(ready, here)
        };
        chosen.retain(|e| e.weight > 0);
        chosen.sort();
        chosen.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
        chosen
    }
}

/// `sessionAffinity: ClientIP`: how long a client sticks to its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Affinity {
    pub timeout_seconds: u32,
}

/// How a Service is reached from outside the node: node ports, external IPs, load-balancer IPs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct External {
    /// `spec.externalIPs`: served on the Service ports when traffic arrives at the node.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (not `ipMode: Proxy`).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`: when set, only these sources may use the load-balancer
    /// IPs (node ports and external IPs are not limited, as in kube-proxy).
    pub source_ranges: Vec<ipnet::IpNet>,
    /// `externalTrafficPolicy: Local`: external traffic goes only to this node's endpoints and
    /// keeps its source address; none here means drop.
    pub local: bool,
    /// `spec.healthCheckNodePort` (LoadBalancer + Local): the agent answers HTTP health checks
    /// there with this node's local endpoint count.
    pub health_check_node_port: Option<u16>,
    /// External and load-balancer IPs not served because another Service (or this one's
    /// ClusterIP) already holds the address on a port: why, in words.
    pub shadowed: Vec<String>,
}

/// One entry of the dispatch map: address, protocol, port.
pub type DispatchKey = (IpAddr, Protocol, u16);

impl External {
    pub fn is_empty(&self) -> bool {
        self.external_ips.is_empty() && self.load_balancer_ips.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: ServiceId,
    /// One address per family (dual-stack Services have two).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `internalTrafficPolicy: Local`: only this node's endpoints; none means drop.
    pub internal_local: bool,
    pub affinity: Option<Affinity>,
    pub external: External,
}

impl Service {
    pub fn new(id: ServiceId, cluster_ips: Vec<IpAddr>, ports: Vec<ServicePort>) -> Self {
        Service { id, cluster_ips, ports, internal_local: false, affinity: None, external: External::default() }
    }

    /// What of this Service nftproxy cannot serve, in words (empty when everything is served):
    /// external and load-balancer IPs of a family the Service has no ClusterIP of.
    pub fn unserved(&self) -> Vec<String> {
        let families: Vec<Family> = self.cluster_ips.iter().map(Family::of).collect();
        let ext = &self.external;
        let lost = |what: &str, ips: &[IpAddr]| {
            ips.iter()
                .filter(|ip| !families.contains(&Family::of(ip)))
                .map(|ip| format!("{what} {ip}: the Service has no ClusterIP of its family"))
                .collect::<Vec<_>>()
        };
        let mut out = lost("external IP", &ext.external_ips);
        out.extend(lost("load-balancer IP", &ext.load_balancer_ips));
        out.extend(ext.shadowed.iter().cloned());
        out
    }

    /// The dispatch-map entries its external and load-balancer IPs take.
    pub fn external_keys(&self) -> Vec<DispatchKey> {
        let ext = &self.external;
        let ips = ext.external_ips.iter().chain(&ext.load_balancer_ips);
        ips.flat_map(|ip| self.ports.iter().map(move |p| (*ip, p.protocol, p.port))).collect()
    }

    /// Drops the external and load-balancer IPs one of whose entries `holder` says someone else
    /// holds (a ClusterIP, another Service's external IP), and says so in `shadowed`. kube-proxy
    /// lets one Service win such a clash; one clash must never stop the node's whole sync.
    pub fn drop_taken_external(&mut self, holder: impl Fn(&DispatchKey) -> Option<String>) {
        let mut taken: Vec<(IpAddr, String)> = Vec::new();
        for k in self.external_keys() {
            if let Some(who) = holder(&k).filter(|_| !taken.iter().any(|(ip, _)| *ip == k.0)) {
                let at = std::net::SocketAddr::new(k.0, k.2);
                taken.push((k.0, format!("external address {at}/{} is already {who}", k.1)));
            }
        }
        for (ip, why) in taken {
            self.external.external_ips.retain(|x| *x != ip);
            self.external.load_balancer_ips.retain(|x| *x != ip);
            self.external.shadowed.push(why);
        }
    }

    /// Whether any port has a node port or the Service has external or load-balancer IPs.
    pub fn is_external(&self) -> bool {
        !self.external.is_empty() || self.ports.iter().any(|p| p.node_port.is_some())
    }

    pub fn usable_endpoints<'a>(&self, port: &'a ServicePort, family: Family, here: &Locality) -> Vec<&'a Endpoint> {
        port.usable_endpoints(family, self.internal_local, here)
    }
}

/// Everything the node should serve, keyed by Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceId, Service>,
}

/// kube-proxy's `kubeproxy_sync_proxy_rules_no_local_endpoints_total` for one family: Service
/// ports whose Local traffic policy finds no endpoint on this node, whose traffic is dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    /// `internalTrafficPolicy: Local`.
    pub internal: usize,
    /// `externalTrafficPolicy: Local` on a Service reachable from outside.
    pub external: usize,
}

impl Snapshot {
    /// Counted per Service port and family, as kube-proxy's per-family proxiers count them.
    pub fn no_local_endpoints(&self, family: Family, here: &Locality) -> NoLocalEndpoints {
        let mut out = NoLocalEndpoints::default();
        for svc in self.services.values().filter(|s| s.cluster_ips.iter().any(|ip| Family::of(ip) == family)) {
            let external = !svc.external.is_empty();
            for port in &svc.ports {
                let none_here = || port.usable_endpoints(family, true, here).is_empty();
                if svc.internal_local && none_here() {
                    out.internal += 1;
                }
                if svc.external.local && (external || port.node_port.is_some()) && none_here() {
                    out.external += 1;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_local_endpoints_counts_local_policies_left_without_a_local_endpoint() {
        let here = Locality { node: Some("n1".into()), zone: None };
        let on = |ip: &str, node: &str| Endpoint {
            node_name: Some(node.into()),
            ..Endpoint::ready(ip.parse().unwrap(), 80)
        };
        let svc = |name: &str, endpoints: Vec<Endpoint>, internal_local: bool, external_local: bool| {
            let port = ServicePort {
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: Some(30080),
                endpoints,
            };
            let mut s = Service::new(ServiceId::new("ns", name), vec!["10.96.0.1".parse().unwrap()], vec![port]);
            s.internal_local = internal_local;
            s.external.local = external_local;
            (s.id.clone(), s)
        };
        let snapshot = Snapshot {
            services: [
                svc("remote-only", vec![on("10.0.0.2", "n2")], true, true),
                svc("local", vec![on("10.0.0.1", "n1")], true, true),
                svc("cluster-policy", vec![on("10.0.0.2", "n2")], false, false),
                svc("internal-only", vec![], true, false),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(snapshot.no_local_endpoints(Family::V4, &here), NoLocalEndpoints { internal: 2, external: 1 });
        assert_eq!(snapshot.no_local_endpoints(Family::V6, &here), NoLocalEndpoints::default(), "no IPv6 ClusterIP");
    }

    fn ep(ip: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint { ready, serving, terminating, ..Endpoint::ready(ip.parse().unwrap(), 80) }
    }

    fn port(endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort { name: "http".into(), port: 80, protocol: Protocol::Tcp, node_port: None, endpoints }
    }

    #[test]
    fn external_addresses_of_a_family_without_cluster_ip_are_reported_unserved() {
        let mut svc = Service::new(ServiceId::new("default", "web"), vec!["10.96.0.1".parse().unwrap()], vec![]);
        svc.external.external_ips = vec!["203.0.113.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        svc.external.load_balancer_ips = vec!["2001:db8::7".parse().unwrap()];
        assert_eq!(
            svc.unserved(),
            [
                "external IP 2001:db8::1: the Service has no ClusterIP of its family",
                "load-balancer IP 2001:db8::7: the Service has no ClusterIP of its family"
            ]
        );
        svc.cluster_ips.push("fd00::1".parse().unwrap());
        assert!(svc.unserved().is_empty());
    }

    #[test]
    fn usable_endpoints_follow_kube_proxy_rules() {
        // (endpoints, expected usable IPs)
        let cases: Vec<(Vec<Endpoint>, Vec<&str>)> = vec![
            (vec![ep("10.0.0.1", true, true, false), ep("10.0.0.2", false, false, false)], vec!["10.0.0.1"]),
            // no ready endpoint: fall back to serving+terminating
            (vec![ep("10.0.0.1", false, true, true), ep("10.0.0.2", false, false, true)], vec!["10.0.0.1"]),
            // a ready one exists: terminating ones get no new connections
            (vec![ep("10.0.0.1", false, true, true), ep("10.0.0.2", true, true, false)], vec!["10.0.0.2"]),
            (vec![ep("10.0.0.1", false, false, false)], vec![]),
            // other family is ignored, duplicates collapse
            (
                vec![
                    ep("fd00::1", true, true, false),
                    ep("10.0.0.3", true, true, false),
                    ep("10.0.0.3", true, true, false),
                ],
                vec!["10.0.0.3"],
            ),
        ];
        for (endpoints, want) in cases {
            let p = port(endpoints.clone());
            let got: Vec<String> =
                p.usable_endpoints(Family::V4, false, &Locality::default()).iter().map(|e| e.ip.to_string()).collect();
            assert_eq!(got, want, "endpoints {endpoints:?}");
        }
    }

    /// An endpoint on `node` with zone and node hints and a weight.
    fn at(ip: &str, ready: bool, node: &str, zones: &[&str], nodes: &[&str], weight: u32) -> Endpoint {
        Endpoint {
            ready,
            serving: ready,
            node_name: Some(node.into()),
            zone_hints: zones.iter().map(|z| z.to_string()).collect(),
            node_hints: nodes.iter().map(|n| n.to_string()).collect(),
            weight,
            ..Endpoint::ready(ip.parse().unwrap(), 80)
        }
    }

    #[test]
    fn locality_policy_hints_and_weights() {
        let here = Locality { node: Some("n1".into()), zone: Some("z1".into()) };
        // (endpoints, local_only, expected)
        let cases: Vec<(Vec<Endpoint>, bool, Vec<&str>)> = vec![
            // Local policy: only this node's endpoints
            (
                vec![at("10.0.0.1", true, "n1", &[], &[], 1), at("10.0.0.2", true, "n2", &[], &[], 1)],
                true,
                vec!["10.0.0.1"],
            ),
            // Local policy, none here: nothing (the compiler drops)
            (vec![at("10.0.0.2", true, "n2", &[], &[], 1)], true, vec![]),
            // Local policy, only a terminating serving one here: fall back to it
            (
                vec![
                    Endpoint {
                        terminating: true,
                        ready: false,
                        serving: true,
                        ..at("10.0.0.1", false, "n1", &[], &[], 1)
                    },
                    at("10.0.0.2", true, "n2", &[], &[], 1),
                ],
                true,
                vec!["10.0.0.1"],
            ),
            // zone hints, all hinted, some match: those
            (
                vec![at("10.0.0.1", true, "n2", &["z1"], &[], 1), at("10.0.0.2", true, "n3", &["z2"], &[], 1)],
                false,
                vec!["10.0.0.1"],
            ),
            // one endpoint without hints: hints ignored
            (
                vec![at("10.0.0.1", true, "n2", &["z1"], &[], 1), at("10.0.0.2", true, "n3", &[], &[], 1)],
                false,
                vec!["10.0.0.1", "10.0.0.2"],
            ),
            // hints name no zone of ours: all
            (
                vec![at("10.0.0.1", true, "n2", &["z3"], &[], 1), at("10.0.0.2", true, "n3", &["z2"], &[], 1)],
                false,
                vec!["10.0.0.1", "10.0.0.2"],
            ),
            // node hints win over zone hints
            (
                vec![at("10.0.0.1", true, "n1", &["z2"], &["n1"], 1), at("10.0.0.2", true, "n3", &["z1"], &["n3"], 1)],
                false,
                vec!["10.0.0.1"],
            ),
            // weight 0 drains
            (
                vec![at("10.0.0.1", true, "n1", &[], &[], 0), at("10.0.0.2", true, "n2", &[], &[], 5)],
                false,
                vec!["10.0.0.2"],
            ),
        ];
        for (endpoints, local, want) in cases {
            let p = port(endpoints.clone());
            let got: Vec<String> =
                p.usable_endpoints(Family::V4, local, &here).iter().map(|e| e.ip.to_string()).collect();
            assert_eq!(got, want, "local={local} {endpoints:?}");
        }
    }

    #[test]
    fn protocol_parsing_names_the_bad_value() {
        assert_eq!(Protocol::from_k8s(None).unwrap(), Protocol::Tcp);
        assert_eq!(Protocol::from_k8s(Some("SCTP")).unwrap(), Protocol::Sctp);
        let err = Protocol::from_k8s(Some("tcp")).unwrap_err();
        assert!(err.contains("\"tcp\""), "{err}");
    }
}
