//! `nftproxy trace [--from SRC] PROTO VIP:PORT`: where a new connection goes, from the rules
//! the kernel holds now (every table of ours), decoded back into our statements and walked by
//! the exact tracer ([`crate::trace`]).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{InspectError, address, service_of_chain};
use crate::compile::Role;
use crate::model::{Protocol, ServiceId};
use crate::nft::Netlink;
use crate::ruleset::{Element, Ruleset, SetKind, Stmt, ip_bytes};
use crate::trace::{Fate, Packet, Ratio, trace};

/// What to trace.
#[derive(Debug, Clone, Copy)]
pub struct Query {
    pub proto: Protocol,
    pub dst: IpAddr,
    pub dport: u16,
    /// The client; none: any client outside the pod network (the unspecified address).
    pub src: Option<IpAddr>,
}

impl Query {
    fn src(&self) -> IpAddr {
        self.src.unwrap_or(match self.dst {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        })
    }
}

/// A probability as a percentage with one decimal, rounded half up: 2/3 is `66.7%`.
pub fn share(r: Ratio) -> String {
    let Ratio(n, d) = r;
    if d == 0 {
        return "0.0%".into();
    }
    let tenths = (n * 2000 + d) / (2 * d);
    format!("{}.{}%", tenths / 10, tenths % 10)
}

fn contains(rs: &Ruleset, set: &str, key: &[u8]) -> bool {
    rs.sets.get(set).is_some_and(|s| s.elements.iter().any(|e| e.key == key))
}

/// The chain a packet to `q` enters by the dispatch map or the node-port map, if any.
fn entry_chain(rs: &Ruleset, q: &Query) -> Option<String> {
    let dispatch = Element::dispatch(q.dst, q.proto, q.dport, String::new()).key;
    let node_port = Element::node_port(q.proto, q.dport, String::new()).key;
    let find = |kind: fn(SetKind) -> bool, key: &[u8]| {
        rs.sets
            .iter()
            .filter(|(_, s)| kind(s.kind))
            .find_map(|(_, s)| s.elements.iter().find(|e| e.key == key).and_then(|e| e.goto.clone()))
    };
    find(|k| matches!(k, SetKind::Dispatch(_)), &dispatch).or_else(|| {
        let on_node = crate::compile::gate_roles(rs).any(|(role, ip)| role == Role::Node && ip == q.dst);
        on_node.then(|| find(|k| matches!(k, SetKind::NodePorts(_)), &node_port)).flatten()
    })
}

/// Whether `dst` is one of our ClusterIPs (on any port).
fn is_cluster_ip(rs: &Ruleset, dst: IpAddr) -> bool {
    crate::compile::gate_roles(rs).any(|(role, ip)| role == Role::Cluster && ip == dst)
}

/// Session affinity of `svc` as the kernel holds it: the timeout its endpoint chains refresh,
/// and whether `src` is in one of its affinity sets now.
fn affinity(rs: &Ruleset, svc: &ServiceId, src: IpAddr) -> Option<(u32, bool)> {
    let mut timeout = None;
    let mut pinned = false;
    for (name, chain) in &rs.chains {
        if service_of_chain(name).as_ref() != Some(svc) {
            continue;
        }
        for stmt in chain.rules.iter().flat_map(|r| &r.stmts) {
            if let Stmt::UpdateSaddrSet { set, timeout_seconds, .. } = stmt {
                timeout = Some(*timeout_seconds);
                pinned |= contains(rs, set, &ip_bytes(&src));
            }
        }
    }
    timeout.map(|t| (t, pinned))
}

/// The trace as text: a header naming the Service, one line per possible endpoint with its
/// share and whether the client is masqueraded (or `reject`, `drop`, `no service`), then
/// session affinity and whatever in our tables did not decode.
pub fn render(rs: &Ruleset, unknown: &[String], q: &Query) -> String {
    let src = q.src();
    let mut out = String::new();
    let entry = entry_chain(rs, q);
    let svc = entry.as_deref().and_then(service_of_chain);
    let what = match (&svc, is_cluster_ip(rs, q.dst)) {
        (Some(id), _) => format!("Service {id}"),
        (None, true) => "a Service address, on a port no Service has".to_string(),
        (None, false) => "no Service of ours".to_string(),
    };
    let _ = writeln!(out, "{} {} from {src}: {what}", q.proto, address(q.dst, q.dport));
    let pkt = Packet { src, dst: q.dst, proto: q.proto, dport: q.dport, local: false };
    let fates = trace(rs, &pkt);
    let whole = |p: &Ratio| p.0 == p.1;
    for (fate, p) in &fates {
        let line = match fate {
            Fate::Dnat { addr, port, masquerade } => {
                let masq = if *masquerade { "masquerade" } else { "no masquerade" };
                format!("{}  {}  {masq}", address(*addr, *port), share(*p))
            }
            Fate::Rejected if whole(p) => "reject".into(),
            Fate::Rejected => format!("reject  {}", share(*p)),
            Fate::Dropped if whole(p) => "drop".into(),
            Fate::Dropped => format!("drop  {}", share(*p)),
            Fate::Untouched if whole(p) => "no service".into(),
            Fate::Untouched => format!("no service  {}", share(*p)),
        };
        let _ = writeln!(out, "  {line}");
    }
    if let Some(id) = &svc {
        let line = match affinity(rs, id, src) {
            None => "session affinity: none".to_string(),
            Some((t, true)) => format!("session affinity: ClientIP, {t}s; {src} is pinned to its endpoint"),
            Some((t, false)) => format!("session affinity: ClientIP, {t}s; {src} has no endpoint yet"),
        };
        let _ = writeln!(out, "  {line}");
    }
    for u in unknown {
        let _ = writeln!(out, "note: {u}");
    }
    out
}

/// `nftproxy trace [--from SRC] PROTO VIP:PORT`.
pub fn command(from: Option<IpAddr>, proto: &str, vip: &str) -> Result<String, InspectError> {
    let proto = super::parse_protocol(proto)?;
    let (dst, dport) = super::parse_address(vip)?;
    if let Some(src) = from.filter(|s| s.is_ipv4() != dst.is_ipv4()) {
        return Err(InspectError::Argument(format!("--from {src} and {vip} are of different address families")));
    }
    run(&mut Netlink::open()?, &Query { proto, dst, dport, src: from })
}

/// Reads our tables and traces `q`.
pub fn run(nl: &mut Netlink, q: &Query) -> Result<String, InspectError> {
    let read = nl.read_ruleset(true)?;
    Ok(render(&read.ruleset, &read.unknown, q))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Options, compile};
    use crate::model::{Affinity, Endpoint, Service, ServicePort, Snapshot};

    fn svc(name: &str, vip: &str, weights: &[(&str, u32)]) -> Service {
        let endpoints =
            weights.iter().map(|(ip, w)| Endpoint { weight: *w, ..Endpoint::ready(ip.parse().unwrap(), 8080) });
        Service::new(
            ServiceId::new("default", name),
            vec![vip.parse().unwrap()],
            vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: None,
                endpoints: endpoints.collect(),
            }],
        )
    }

    fn rules(services: Vec<Service>) -> Ruleset {
        let snap = Snapshot { services: services.into_iter().map(|s| (s.id.clone(), s)).collect() };
        let opts =
            Options { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], table_shards: 2, ..Default::default() };
        compile(&snap, &opts)
    }

    fn q(dst: &str, port: u16, src: Option<&str>) -> Query {
        Query { proto: Protocol::Tcp, dst: dst.parse().unwrap(), dport: port, src: src.map(|s| s.parse().unwrap()) }
    }

    #[test]
    fn traces_say_where_connections_go() {
        let mut sticky = svc("sticky", "10.96.0.7", &[("10.244.1.5", 1), ("10.244.1.6", 1)]);
        sticky.affinity = Some(Affinity { timeout_seconds: 600 });
        let mut rs = rules(vec![
            svc("web", "10.96.0.80", &[("10.244.1.2", 9), ("10.244.1.3", 1), ("10.244.1.4", 0)]),
            svc("empty", "10.96.0.99", &[]),
            sticky,
        ]);
        let web = render(&rs, &[], &q("10.96.0.80", 80, Some("10.244.1.10")));
        assert_eq!(
            web,
            "tcp 10.96.0.80:80 from 10.244.1.10: Service default/web\n  \
             10.244.1.2:8080  90.0%  no masquerade\n  10.244.1.3:8080  10.0%  no masquerade\n  \
             session affinity: none\n"
        );
        let outside = render(&rs, &[], &q("10.96.0.80", 80, None));
        assert!(outside.contains("from 0.0.0.0") && outside.contains("90.0%  masquerade"), "{outside}");
        let empty = render(&rs, &[], &q("10.96.0.99", 80, None));
        assert!(empty.lines().any(|l| l.trim() == "reject"), "{empty}");
        let no_port = render(&rs, &[], &q("10.96.0.80", 81, None));
        assert!(
            no_port.contains("on a port no Service has") && no_port.lines().any(|l| l.trim() == "reject"),
            "{no_port}"
        );
        let nothing = render(&rs, &["rule 1 of chain x is odd".into()], &q("10.1.2.3", 80, None));
        assert!(nothing.lines().any(|l| l.trim() == "no service"), "{nothing}");
        assert!(nothing.contains("note: rule 1 of chain x is odd"), "{nothing}");
        // Affinity: a client in an endpoint's set (as the kernel's sets hold it) is pinned.
        let before = render(&rs, &[], &q("10.96.0.7", 80, Some("10.244.1.10")));
        assert!(
            before.contains("50.0%") && before.contains("ClientIP, 600s; 10.244.1.10 has no endpoint yet"),
            "{before}"
        );
        let set = rs.sets.keys().find(|k| k.contains("aff4/default/sticky/tcp/80/10.244.1.6/")).unwrap().clone();
        rs.sets.get_mut(&set).unwrap().elements.push(Element::address("10.244.1.10".parse().unwrap()));
        let pinned = render(&rs, &[], &q("10.96.0.7", 80, Some("10.244.1.10")));
        assert!(pinned.contains("10.244.1.6:8080  100.0%") && pinned.contains("is pinned"), "{pinned}");
        assert!(!pinned.contains("10.244.1.5:8080"), "{pinned}");
    }

    #[test]
    fn shares_have_one_decimal_rounded_half_up() {
        for (n, d, want) in [
            (1, 3, "33.3%"),
            (2, 3, "66.7%"),
            (1, 1, "100.0%"),
            (0, 1, "0.0%"),
            (9, 10, "90.0%"),
            (1, 10, "10.0%"),
            (1, 8, "12.5%"),
            (1, 16, "6.3%"),
            (1, 2000, "0.1%"),
            (1, 2001, "0.0%"),
            (1, 7, "14.3%"),
        ] {
            assert_eq!(share(Ratio(n, d)), want, "{n}/{d}");
        }
    }
}
