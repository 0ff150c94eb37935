//! `nftproxy flows [NAMESPACE/NAME]`: the conntrack entries whose original destination is one
//! of our Service addresses (as the kernel's dispatch and node-port maps hold them now), one
//! line each, printed as the dump streams in. For one Service the kernel filters by each of its
//! addresses (CTA_FILTER); for all of them, by protocol, and the addresses are matched here.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::IpAddr;

use super::{InspectError, address, service_of_chain};
use crate::compile::Role;
use crate::conntrack::{Conntrack, Filter, Flow};
use crate::model::{Family, Protocol, ServiceId};
use crate::nft::Netlink;
use crate::ruleset::{Ruleset, SetKind, ip_from_bytes};

/// A Service address: (address, protocol, port).
pub type Target = (IpAddr, Protocol, u16);

fn proto_port(key: &[u8]) -> Option<(Protocol, u16)> {
    let proto = Protocol::from_number(*key.first()?)?;
    Some((proto, u16::from_be_bytes([*key.get(4)?, *key.get(5)?])))
}

/// Every address, protocol and port our maps send to a Service, with that Service: ClusterIPs,
/// external and load-balancer IPs (dispatch maps), node ports on the node's addresses.
pub fn targets(rs: &Ruleset) -> Vec<(Target, ServiceId)> {
    let mut out = Vec::new();
    // The node-port addresses: in every table's gate (the same in each).
    let node_ips: BTreeSet<IpAddr> =
        crate::compile::gate_roles(rs).filter_map(|(role, ip)| (role == Role::Node).then_some(ip)).collect();
    for set in rs.sets.values() {
        for e in &set.elements {
            let Some(svc) = e.goto.as_deref().and_then(service_of_chain) else { continue };
            match set.kind {
                SetKind::Dispatch(_) if e.key.len() >= 12 => {
                    let at = e.key.len() - 8;
                    if let (Some(ip), Some((proto, port))) = (ip_from_bytes(&e.key[..at]), proto_port(&e.key[at..])) {
                        out.push(((ip, proto, port), svc));
                    }
                }
                SetKind::NodePorts(f) => {
                    if let Some((proto, port)) = proto_port(&e.key) {
                        for ip in node_ips.iter().filter(|ip| Family::of(ip) == f) {
                            out.push(((*ip, proto, port), svc.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

pub const HEADER: &str = "PROTO  CLIENT  SERVICE-ADDRESS  ENDPOINT  STATE  SERVICE";

/// One flow as a line: protocol, client, Service address, the endpoint that answers (the reply
/// source), the state and the Service.
pub fn line(flow: &Flow, svc: &ServiceId) -> String {
    let k = &flow.key;
    let proto = Protocol::from_number(k.protocol).map_or_else(|| k.protocol.to_string(), |p| p.to_string());
    let client = flow.client.map_or_else(|| "?".into(), |(ip, port)| address(ip, port));
    format!(
        "{proto}  {client}  {}  {}  {}  {svc}",
        address(k.orig_dst, k.orig_dport),
        address(k.reply_src, k.reply_sport),
        flow.state
    )
}

/// `nftproxy flows [NAMESPACE/NAME]`.
pub fn command(service: Option<&str>, out: &mut dyn Write) -> Result<usize, InspectError> {
    let service = service.map(super::parse_service).transpose()?;
    run(&mut Netlink::open()?, service.as_ref(), out)
}

/// Streams the flows of `service` (all our Services when `None`) to `out`; returns how many.
pub fn run(nl: &mut Netlink, service: Option<&ServiceId>, out: &mut dyn Write) -> Result<usize, InspectError> {
    let read = nl.read_ruleset(false)?;
    let all = targets(&read.ruleset);
    let mut ct = Conntrack::open().map_err(InspectError::Conntrack)?;
    let mut n = 0;
    let _ = writeln!(out, "{HEADER}");
    let mut print = |f: &Flow, svc: &ServiceId| {
        n += 1;
        let _ = writeln!(out, "{}", line(f, svc));
    };
    match service {
        Some(id) => {
            for ((ip, proto, port), svc) in all.iter().filter(|(_, s)| s == id) {
                let filter = Filter { protocol: proto.number(), dst: Some((*ip, *port)) };
                ct.each_flow(Some(Family::of(ip)), filter, |f| print(&f, svc)).map_err(InspectError::Conntrack)?;
            }
        }
        None => {
            let by_target: HashMap<(IpAddr, u8, u16), &ServiceId> =
                all.iter().map(|((ip, proto, port), svc)| ((*ip, proto.number(), *port), svc)).collect();
            let protocols: BTreeSet<Protocol> = all.iter().map(|((_, p, _), _)| *p).collect();
            for proto in protocols {
                let filter = Filter { protocol: proto.number(), dst: None };
                ct.each_flow(None, filter, |f| {
                    if let Some(svc) = by_target.get(&(f.key.orig_dst, f.key.protocol, f.key.orig_dport)) {
                        print(&f, svc);
                    }
                })
                .map_err(InspectError::Conntrack)?;
            }
        }
    }
    let _ = out.flush();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Options, compile};
    use crate::model::{Endpoint, Service, ServicePort, Snapshot};

    #[test]
    fn targets_are_cluster_ips_and_node_ports_on_node_addresses() {
        let mut svc = Service::new(
            ServiceId::new("default", "web"),
            vec!["10.96.0.80".parse().unwrap()],
            vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: Some(30080),
                endpoints: vec![Endpoint::ready("10.244.1.2".parse().unwrap(), 8080)],
            }],
        );
        svc.external.external_ips = vec!["203.0.113.7".parse().unwrap()];
        let snap = Snapshot { services: [(svc.id.clone(), svc)].into() };
        let opts = Options { node_ips: vec!["192.0.2.1".parse().unwrap()], table_shards: 3, ..Default::default() };
        let got: Vec<String> = targets(&compile(&snap, &opts))
            .iter()
            .map(|((ip, p, port), s)| format!("{p} {} {s}", address(*ip, *port)))
            .collect();
        assert_eq!(
            got,
            ["tcp 10.96.0.80:80 default/web", "tcp 192.0.2.1:30080 default/web", "tcp 203.0.113.7:80 default/web"]
        );
    }
}
