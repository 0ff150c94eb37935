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
}

impl Endpoint {
    pub fn ready(ip: IpAddr, port: u16) -> Self {
        Endpoint { ip, port, ready: true, serving: true, terminating: false, node_name: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Every known endpoint for this port, whatever its conditions; see [`ServicePort::usable_endpoints`].
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// The endpoints new connections may go to, as kube-proxy picks them: the ready ones, or if
    /// none is ready, the ones still serving while terminating.
    pub fn usable_endpoints(&self, family: Family) -> Vec<&Endpoint> {
        let of_family = || self.endpoints.iter().filter(move |e| Family::of(&e.ip) == family);
        let ready: Vec<&Endpoint> = of_family().filter(|e| e.ready).collect();
        let mut chosen =
            if ready.is_empty() { of_family().filter(|e| e.serving && e.terminating).collect() } else { ready };
        chosen.sort();
        chosen.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
        chosen
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: ServiceId,
    /// One address per family (dual-stack Services have two).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// Everything the node should serve, keyed by Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceId, Service>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint { ip: ip.parse().unwrap(), port: 80, ready, serving, terminating, node_name: None }
    }

    fn port(endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort { name: "http".into(), port: 80, protocol: Protocol::Tcp, endpoints }
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
            let got: Vec<String> = p.usable_endpoints(Family::V4).iter().map(|e| e.ip.to_string()).collect();
            assert_eq!(got, want, "endpoints {endpoints:?}");
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
