//! The short table `--sync-once` prints: what is served, from where to where.

use std::fmt::Write;

use crate::model::{Family, Locality, Snapshot};

pub fn served_table(snapshot: &Snapshot, here: &Locality) -> String {
    let mut rows: Vec<[String; 3]> = Vec::new();
    for svc in snapshot.services.values() {
        for vip in &svc.cluster_ips {
            let family = Family::of(vip);
            for port in &svc.ports {
                let frontend = match vip {
                    std::net::IpAddr::V4(a) => format!("{a}:{}/{}", port.port, port.protocol),
                    std::net::IpAddr::V6(a) => format!("[{a}]:{}/{}", port.port, port.protocol),
                };
                let eps = svc.usable_endpoints(port, family, here);
                let backends = if eps.is_empty() && svc.internal_local {
                    "no local endpoints: dropping".to_string()
                } else if eps.is_empty() {
                    "no endpoints: rejecting".to_string()
                } else {
                    eps.iter()
                        .map(|e| match e.ip {
                            std::net::IpAddr::V4(a) => format!("{a}:{}", e.port),
                            std::net::IpAddr::V6(a) => format!("[{a}]:{}", e.port),
                        })
                        .zip(eps.iter())
                        .map(|(s, e)| if e.weight == 1 { s } else { format!("{s} (weight {})", e.weight) })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                rows.push([svc.id.to_string(), frontend, backends]);
            }
        }
    }
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max("SERVICE".len());
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0).max("CLUSTER-IP".len());
    let mut out = String::new();
    let _ = writeln!(out, "{:w0$}  {:w1$}  ENDPOINTS", "SERVICE", "CLUSTER-IP");
    for r in rows {
        let _ = writeln!(out, "{:w0$}  {:w1$}  -> {}", r[0], r[1], r[2]);
    }
    out
}
