//! Which UDP conntrack entries are stale: pure, tested without root.
//!
//! An entry is stale when its original destination is a Service VIP:port we serve over UDP and
//! its reply source is not an endpoint that may still carry traffic (ready or serving). That one
//! rule covers an endpoint going away (the client would keep talking to a dead pod), a Service
//! going from zero endpoints to some (the un-NATed entry would blackhole the client), and a
//! Service scaled to zero or deleted (kubernetes#139628). Entries to valid endpoints are never
//! touched, so a restart deletes nothing that still works (kubernetes#122740). TCP and SCTP are
//! never touched at all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Family, Protocol, Service};

/// The parts of a conntrack entry that decide whether it is stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowKey {
    pub protocol: u8,
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

/// UDP address:port a Service is reached at (ClusterIP, external and load-balancer IPs on the
/// Service port, node addresses on the node port) -> the endpoints entries may still lead to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpTargets(pub BTreeMap<(IpAddr, u16), BTreeSet<(IpAddr, u16)>>);

impl UdpTargets {
    /// Adds a Service's UDP ports with their valid endpoints (none if `gone`: deleted Service).
    /// `node_ips`: the addresses its node ports are served on.
    pub fn add(&mut self, svc: &Service, gone: bool, node_ips: &[IpAddr]) {
        let ext = &svc.external;
        let addresses = svc.cluster_ips.iter().chain(&ext.external_ips).chain(&ext.load_balancer_ips);
        for port in svc.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
            let by_port = addresses.clone().map(|ip| (*ip, port.port));
            let by_node_port = port.node_port.into_iter().flat_map(|np| node_ips.iter().map(move |ip| (*ip, np)));
            for (ip, dport) in by_port.chain(by_node_port) {
                let family = Family::of(&ip);
                let valid = self.0.entry((ip, dport)).or_default();
                if gone {
                    continue;
                }
                // Every endpoint that may carry traffic, new (ready) or existing (serving), even
                // when it gets no new connections here (other node, weight 0, other zone).
                let live = port.endpoints.iter().filter(|e| Family::of(&e.ip) == family && (e.ready || e.serving));
                valid.extend(live.map(|e| (e.ip, e.port)));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The addresses of one IP family.
    pub fn of_family(&self, family: Family) -> UdpTargets {
        UdpTargets(
            self.0.iter().filter(|((ip, _), _)| Family::of(ip) == family).map(|(k, v)| (*k, v.clone())).collect(),
        )
    }

    pub fn is_stale(&self, f: &FlowKey) -> bool {
        f.protocol == Protocol::Udp.number()
            && self
                .0
                .get(&(f.orig_dst, f.orig_dport))
                .is_some_and(|valid| !valid.contains(&(f.reply_src, f.reply_sport)))
    }
}

/// Whether a change from `old` to `new` (either absent: created or deleted) can leave stale UDP
/// entries, so that conntrack must be read at all: a UDP endpoint that may carry traffic went
/// away, a UDP Service port went from no such endpoint to some, or a UDP Service went. Any other
/// change (an endpoint added to a port that had some, a TCP change) leaves every entry valid.
pub fn may_leave_stale(old: Option<&Service>, new: Option<&Service>) -> bool {
    // (port, family) -> the endpoints that may carry traffic.
    let live = |svc: Option<&Service>| -> BTreeMap<(u16, Family), BTreeSet<(IpAddr, u16)>> {
        let mut out: BTreeMap<(u16, Family), BTreeSet<(IpAddr, u16)>> = BTreeMap::new();
        let ports = svc.into_iter().flat_map(|s| s.ports.iter()).filter(|p| p.protocol == Protocol::Udp);
        for p in ports {
            for family in [Family::V4, Family::V6] {
                let eps = p.endpoints.iter().filter(|e| Family::of(&e.ip) == family && (e.ready || e.serving));
                out.entry((p.port, family)).or_default().extend(eps.map(|e| (e.ip, e.port)));
            }
        }
        out
    };
    let (before, after) = (live(old), live(new));
    if new.is_none() {
        return !before.is_empty();
    }
    let empty = BTreeSet::new();
    let went = before.iter().any(|(k, eps)| !eps.is_subset(after.get(k).unwrap_or(&empty)));
    let came = after.iter().any(|(k, eps)| !eps.is_empty() && before.get(k).is_none_or(BTreeSet::is_empty));
    went || came
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServiceId, ServicePort};

    #[test]
    fn only_changes_that_can_strand_a_udp_flow_need_conntrack() {
        let a = Endpoint::ready("10.244.1.2".parse().unwrap(), 5353);
        let b = Endpoint::ready("10.244.1.3".parse().unwrap(), 5353);
        let two = svc(vec![a.clone(), b.clone()]);
        let one = svc(vec![a.clone()]);
        let none = svc(vec![]);
        assert!(!may_leave_stale(Some(&one), Some(&two)), "an endpoint added to a port that had one");
        assert!(!may_leave_stale(Some(&two), Some(&two)), "nothing changed");
        assert!(may_leave_stale(Some(&two), Some(&one)), "an endpoint went away");
        assert!(may_leave_stale(Some(&none), Some(&one)), "0 -> 1: un-NATed entries may exist");
        assert!(may_leave_stale(None, Some(&one)), "a new Service with endpoints");
        assert!(!may_leave_stale(None, Some(&none)), "a new Service without endpoints");
        assert!(may_leave_stale(Some(&one), None), "deleted");
        let terminating = Endpoint { ready: false, serving: true, terminating: true, ..b.clone() };
        assert!(!may_leave_stale(Some(&two), Some(&svc(vec![a.clone(), terminating]))), "still serving");
        let mut tcp = two.clone();
        tcp.ports[0].protocol = Protocol::Tcp;
        assert!(!may_leave_stale(Some(&tcp), None), "TCP is never touched");
    }

    fn svc(endpoints: Vec<Endpoint>) -> Service {
        Service::new(
            ServiceId::new("default", "dns"),
            vec!["10.96.0.10".parse().unwrap()],
            vec![
                ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                    node_port: None,
                    endpoints: endpoints.clone(),
                },
                ServicePort { name: "tcp".into(), port: 53, protocol: Protocol::Tcp, node_port: None, endpoints },
            ],
        )
    }

    fn flow(proto: Protocol, reply: &str) -> FlowKey {
        FlowKey {
            protocol: proto.number(),
            orig_dst: "10.96.0.10".parse().unwrap(),
            orig_dport: 53,
            reply_src: reply.parse().unwrap(),
            reply_sport: if reply == "10.96.0.10" { 53 } else { 5353 },
        }
    }

    #[test]
    fn stale_entries_as_a_table() {
        let ep = |ip: &str, ready, serving, terminating| Endpoint {
            ready,
            serving,
            terminating,
            ..Endpoint::ready(ip.parse().unwrap(), 5353)
        };
        // (endpoints, gone, flow, stale?)
        let cases = vec![
            (vec![ep("10.244.0.1", true, true, false)], false, flow(Protocol::Udp, "10.244.0.1"), false),
            (vec![ep("10.244.0.1", true, true, false)], false, flow(Protocol::Udp, "10.244.0.2"), true),
            // zero -> some: the un-NATed entry (reply from the VIP itself) goes
            (vec![ep("10.244.0.1", true, true, false)], false, flow(Protocol::Udp, "10.96.0.10"), true),
            // scaled to zero: everything to the VIP goes
            (vec![], false, flow(Protocol::Udp, "10.244.0.1"), true),
            // a terminating endpoint still serving keeps its flows
            (
                vec![ep("10.244.0.1", false, true, true), ep("10.244.0.2", true, true, false)],
                false,
                flow(Protocol::Udp, "10.244.0.1"),
                false,
            ),
            // not serving any more: stale
            (
                vec![ep("10.244.0.1", false, false, true), ep("10.244.0.2", true, true, false)],
                false,
                flow(Protocol::Udp, "10.244.0.1"),
                true,
            ),
            // deleted Service: stale
            (vec![ep("10.244.0.1", true, true, false)], true, flow(Protocol::Udp, "10.244.0.1"), true),
            // TCP is never touched
            (vec![], false, flow(Protocol::Tcp, "10.244.0.9"), false),
        ];
        for (endpoints, gone, f, want) in cases {
            let mut t = UdpTargets::default();
            t.add(&svc(endpoints.clone()), gone, &[]);
            assert_eq!(t.is_stale(&f), want, "{endpoints:?} gone={gone} {f:?}");
        }
        // Another VIP is none of our business.
        let mut t = UdpTargets::default();
        t.add(&svc(vec![]), false, &[]);
        let mut other = flow(Protocol::Udp, "10.244.0.1");
        other.orig_dst = "10.96.0.11".parse().unwrap();
        assert!(!t.is_stale(&other));
    }

    #[test]
    fn node_ports_and_external_addresses_are_reconciled_like_the_cluster_ip() {
        let mut s = svc(vec![Endpoint::ready("10.244.0.2".parse().unwrap(), 80)]);
        s.ports[0].node_port = Some(30053);
        s.external.external_ips = vec!["203.0.113.9".parse().unwrap()];
        let node: IpAddr = "192.0.2.1".parse().unwrap();
        let mut t = UdpTargets::default();
        t.add(&s, false, &[node]);
        let to = |dst: &str, dport: u16, reply: &str| FlowKey {
            protocol: Protocol::Udp.number(),
            orig_dst: dst.parse().unwrap(),
            orig_dport: dport,
            reply_src: reply.parse().unwrap(),
            reply_sport: 80,
        };
        // (flow, stale): an entry through a node port or external IP to a removed endpoint goes.
        for (f, stale) in [
            (to("192.0.2.1", 30053, "10.244.0.1"), true),
            (to("192.0.2.1", 30053, "10.244.0.2"), false),
            (to("203.0.113.9", 53, "10.244.0.1"), true),
            (to("203.0.113.9", 53, "10.244.0.2"), false),
            (to("192.0.2.1", 53, "10.244.0.1"), false),
        ] {
            assert_eq!(t.is_stale(&f), stale, "{f:?}");
        }
    }
}
