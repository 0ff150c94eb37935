//! The short table `--sync-once` prints: what is served, from where to where.
//!
//! One row per ClusterIP and port (`10.96.0.10:80/tcp`), then the Service's external frontends:
//! node ports (`node :30080/tcp`, `node :30080/tcp (IPv6)` on dual-stack Services), external IPs
//! (`ext 203.0.113.10:80/tcp`) and load-balancer IPs (`lb 198.51.100.7:80/tcp`, with
//! ` from <ranges>` when `loadBalancerSourceRanges` limits them). External frontends of an
//! `externalTrafficPolicy: Local` Service list only this node's endpoints.

use std::fmt::Write;
use std::net::IpAddr;

use crate::model::{Endpoint, Family, Locality, Service, ServicePort, Snapshot};

/// `10.0.0.1:80`, `[fd00::1]:80`
fn addr(ip: &IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(*ip, port).to_string()
}

fn backends(eps: &[&Endpoint], local: bool) -> String {
    if eps.is_empty() && local {
        "no local endpoints: dropping".to_string()
    } else if eps.is_empty() {
        "no endpoints: rejecting".to_string()
    } else {
        eps.iter()
            .map(|e| {
                let s = addr(&e.ip, e.port);
                if e.weight == 1 { s } else { format!("{s} (weight {})", e.weight) }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The endpoints external traffic of `family` to `port` goes to.
fn external_backends(svc: &Service, port: &ServicePort, family: Family, here: &Locality) -> String {
    backends(&port.usable_endpoints(family, svc.external.local, here), svc.external.local)
}

/// Rows for the node ports, external IPs and load-balancer IPs of `svc`.
fn external_rows(svc: &Service, here: &Locality, rows: &mut Vec<[String; 3]>) {
    let mut families: Vec<Family> = svc.cluster_ips.iter().map(Family::of).collect();
    families.dedup();
    for port in &svc.ports {
        let Some(node_port) = port.node_port else { continue };
        for &family in &families {
            let mut frontend = format!("node :{node_port}/{}", port.protocol);
            if families.len() > 1 {
                frontend.push_str(if family == Family::V4 { " (IPv4)" } else { " (IPv6)" });
            }
            rows.push([svc.id.to_string(), frontend, external_backends(svc, port, family, here)]);
        }
    }
    // Only what is programmed: addresses of a family the Service has a ClusterIP of (the rest is
    // logged as not served), and for each the source ranges of its family.
    let served = |ip: &&std::net::IpAddr| families.contains(&Family::of(ip));
    let ranges = |family: Family| {
        let of_family = svc.external.source_ranges.iter().filter(|r| Family::of(&r.addr()) == family);
        of_family.map(|r| r.to_string()).collect::<Vec<_>>().join(",")
    };
    let lb = &svc.external.load_balancer_ips;
    for port in &svc.ports {
        for ip in svc.external.external_ips.iter().filter(served).filter(|ip| !lb.contains(ip)) {
            let frontend = format!("ext {}/{}", addr(ip, port.port), port.protocol);
            rows.push([svc.id.to_string(), frontend, external_backends(svc, port, Family::of(ip), here)]);
        }
        for ip in lb.iter().filter(served) {
            let mut frontend = format!("lb {}/{}", addr(ip, port.port), port.protocol);
            let ranges = ranges(Family::of(ip));
            if !ranges.is_empty() {
                let _ = write!(frontend, " from {ranges}");
            }
            rows.push([svc.id.to_string(), frontend, external_backends(svc, port, Family::of(ip), here)]);
        }
    }
}

pub fn served_table(snapshot: &Snapshot, here: &Locality) -> String {
    let mut rows: Vec<[String; 3]> = Vec::new();
    let mut external = false;
    for svc in snapshot.services.values() {
        for vip in &svc.cluster_ips {
            let family = Family::of(vip);
            for port in &svc.ports {
                let frontend = format!("{}/{}", addr(vip, port.port), port.protocol);
                let eps = svc.usable_endpoints(port, family, here);
                rows.push([svc.id.to_string(), frontend, backends(&eps, svc.internal_local)]);
            }
        }
        let before = rows.len();
        external_rows(svc, here, &mut rows);
        external |= rows.len() > before;
    }
    // Only ClusterIPs: the header they always had.
    let column = if external { "FRONTEND" } else { "CLUSTER-IP" };
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max("SERVICE".len());
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0).max(column.len());
    let mut out = String::new();
    let _ = writeln!(out, "{:w0$}  {:w1$}  ENDPOINTS", "SERVICE", column);
    for r in rows {
        let _ = writeln!(out, "{:w0$}  {:w1$}  -> {}", r[0], r[1], r[2]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceId};

    fn ep(ip: &str, node: &str) -> Endpoint {
        Endpoint { node_name: Some(node.into()), ..Endpoint::ready(ip.parse().unwrap(), 8080) }
    }

    fn service(name: &str, ips: &[&str], node_port: Option<u16>, endpoints: Vec<Endpoint>) -> Service {
        let port = ServicePort { name: "http".into(), port: 80, protocol: Protocol::Tcp, node_port, endpoints };
        Service::new(ServiceId::new("default", name), ips.iter().map(|i| i.parse().unwrap()).collect(), vec![port])
    }

    fn table(services: Vec<Service>) -> String {
        let mut snapshot = Snapshot::default();
        for s in services {
            snapshot.services.insert(s.id.clone(), s);
        }
        served_table(&snapshot, &Locality { node: Some("n1".into()), zone: None })
    }

    #[test]
    fn cluster_ips_only_keep_their_table() {
        let mut weighted = ep("10.244.0.2", "n2");
        weighted.weight = 3;
        let got = table(vec![
            service("web", &["10.96.0.10"], None, vec![ep("10.244.0.1", "n1"), weighted]),
            service("empty", &["fd00::10"], None, vec![]),
        ]);
        assert_eq!(
            got,
            "SERVICE        CLUSTER-IP         ENDPOINTS\n\
             default/empty  [fd00::10]:80/tcp  -> no endpoints: rejecting\n\
             default/web    10.96.0.10:80/tcp  -> 10.244.0.1:8080, 10.244.0.2:8080 (weight 3)\n"
        );
    }

    #[test]
    fn external_frontends_follow_the_external_policy() {
        let eps = || vec![ep("10.244.0.1", "n1"), ep("10.244.0.2", "n2"), ep("fd00:244::2", "n2")];
        let mut np = service("np", &["10.96.0.10", "fd00::10"], Some(30080), eps());
        np.internal_local = true;
        let mut lb = service("lb", &["10.96.0.11"], Some(30081), eps());
        lb.external.local = true;
        lb.external.external_ips = vec!["203.0.113.10".parse().unwrap()];
        lb.external.load_balancer_ips = vec!["198.51.100.7".parse().unwrap(), "2001:db8::7".parse().unwrap()];
        lb.external.source_ranges = vec!["10.0.0.0/8".parse().unwrap(), "192.168.0.0/16".parse().unwrap()];
        let got = table(vec![np, lb]);
        // The IPv6 load-balancer IP of an IPv4-only Service is not served (logged), so not listed.
        let want = "\
SERVICE     FRONTEND                                               ENDPOINTS
default/lb  10.96.0.11:80/tcp                                      -> 10.244.0.1:8080, 10.244.0.2:8080
default/lb  node :30081/tcp                                        -> 10.244.0.1:8080
default/lb  ext 203.0.113.10:80/tcp                                -> 10.244.0.1:8080
default/lb  lb 198.51.100.7:80/tcp from 10.0.0.0/8,192.168.0.0/16  -> 10.244.0.1:8080
default/np  10.96.0.10:80/tcp                                      -> 10.244.0.1:8080
default/np  [fd00::10]:80/tcp                                      -> no local endpoints: dropping
default/np  node :30080/tcp (IPv4)                                 -> 10.244.0.1:8080, 10.244.0.2:8080
default/np  node :30080/tcp (IPv6)                                 -> [fd00:244::2]:8080
";
        assert_eq!(got, want, "\n{got}");
    }
}
