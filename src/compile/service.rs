//! One Service address (one family) -> its chains and elements: the Service chain that picks an
//! endpoint, one chain per endpoint that DNATs, and for traffic from outside the node (node
//! ports, external IPs, load-balancer IPs) the chains kube-proxy's nftables mode has:
//!
//! ```text
//! service-ips-v4:  ClusterIP . tcp . 80     -> goto svc4/ns/name/tcp/80   (internal policy)
//!                  external IP . tcp . 80   -> goto ext4/ns/name/tcp/80
//!                  LB IP . tcp . 80         -> goto fw4/ns/name/tcp/80    (with source ranges)
//! node-ports-v4:   tcp . 30080              -> goto ext4/ns/name/tcp/80   (node addresses only)
//! fw4/...   ip saddr <range> goto ext4/...; drop
//! ext4/...  Cluster: mark for masquerade, goto the cluster-wide pick
//!           Local:   from the pod network or the node itself: the cluster-wide pick (the node
//!                    itself masqueraded); else goto lcl4/... (this node's endpoints, source kept)
//! ```
//! Every pick chain (`svc`, `cls` for the cluster-wide pick when the internal policy is Local,
//! `lcl`) jumps to the same endpoint chains.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{Options, ServiceObjects, dispatch_map, endpoint_chain, node_ports_map, service_chain};
use crate::model::{Endpoint, Family, Locality, Protocol, Service, ServicePort};
use crate::ruleset::*;

/// `aff4/default/web/tcp/80/10.244.0.2/8080`: the clients with affinity to one endpoint.
fn affinity_set(endpoint_chain: &str) -> String {
    format!("aff{}", &endpoint_chain[2..])
}

/// `ext4/...` from `svc4/...`: the same Service port under another role.
fn sibling(service_chain: &str, role: &str) -> String {
    format!("{role}{}", &service_chain[3..])
}

/// The endpoint picks: endpoint i of n, weight w_i, is taken with probability
/// w_i / (w_i + ... + w_n) once the ones before it were not, so each gets exactly its share of
/// the total; integers only.
fn pick_rules(label: &Arc<str>, picks: &[(String, u32)]) -> Vec<Rule> {
    let mut remaining: u32 = picks.iter().map(|(_, w)| w).sum();
    let mut rules = Vec::new();
    for (i, (chain, weight)) in picks.iter().enumerate() {
        if i + 1 == picks.len() {
            rules.push(Rule::new(label, vec![Stmt::Goto(chain.clone())]));
        } else {
            let pick = Stmt::NumgenBelow { modulus: remaining, below: *weight };
            rules.push(Rule::new(label, vec![pick, Stmt::Goto(chain.clone())]));
        }
        remaining -= weight;
    }
    rules
}

/// Builds the chains of one Service port in one family.
struct PortCompiler<'a> {
    objs: &'a mut ServiceObjects,
    svc: &'a Service,
    port: &'a ServicePort,
    family: Family,
    shard: u32,
    label: Arc<str>,
    /// `svc4/ns/name/proto/port`, unqualified.
    local_chain: String,
    /// Count each endpoint's new connections (`Options::endpoint_counters`).
    counters: bool,
}

impl PortCompiler<'_> {
    fn q(&self, name: &str) -> String {
        qualify(self.shard, name)
    }

    fn rule(&self, stmts: Vec<Stmt>) -> Rule {
        Rule::new(&self.label, stmts)
    }

    /// The endpoint's chain (made on first use): refresh affinity, DNAT.
    fn endpoint(&mut self, ep: &Endpoint) -> String {
        let local_ep_chain = endpoint_chain(&self.local_chain, ep);
        let ep_chain = self.q(&local_ep_chain);
        if !self.objs.chains.contains_key(&ep_chain) {
            // Hairpin: a pod that reached itself (through a ClusterIP, a node port or an external
            // address) is masqueraded, or its answer would go straight back inside the pod and
            // match no connection. kube-proxy's rule, in the same place: one compare for this
            // chain's connections, where a set of (pod, pod, address) in postrouting cost every
            // Service connection a lookup (0.22 us, docs/benchmark.md "The first packet").
            let hairpin =
                vec![Stmt::NfProto(self.family), Stmt::SaddrIn(IpNet::from(ep.ip)), Stmt::SetMarkBit(MASQ_MARK)];
            let mut ep_rules = vec![self.rule(hairpin)];
            if let Some(affinity) = self.svc.affinity {
                let set = self.q(&affinity_set(&local_ep_chain));
                ep_rules.push(self.rule(vec![Stmt::UpdateSaddrSet {
                    family: self.family,
                    set: set.clone(),
                    timeout_seconds: affinity.timeout_seconds,
                }]));
                self.objs.sets.insert(set, Set { kind: SetKind::Affinity(self.family), elements: vec![] });
            }
            let dnat = Stmt::Dnat { addr: ep.ip, port: ep.port };
            // The counter counts what reaches this chain: new connections only (nat chains see
            // a connection's first packet), from every path (ClusterIP, node port, external IP).
            ep_rules.push(self.rule(if self.counters { vec![Stmt::Counter, dnat] } else { vec![dnat] }));
            self.objs.chains.insert(ep_chain.clone(), Chain { base: None, rules: ep_rules.into() });
        }
        ep_chain
    }

    /// Rules that send a new connection to one of `endpoints`: a client with affinity to one
    /// first, then the weighted picks. `None` when there is none.
    fn picks(&mut self, endpoints: &[&Endpoint]) -> Option<Vec<Rule>> {
        if endpoints.is_empty() {
            return None;
        }
        let mut rules = Vec::new();
        let mut picks = Vec::new();
        for ep in endpoints {
            let ep_chain = self.endpoint(ep);
            if self.svc.affinity.is_some() {
                let set = self.q(&affinity_set(&endpoint_chain(&self.local_chain, ep)));
                rules
                    .push(self.rule(vec![Stmt::SaddrInSet { family: self.family, set }, Stmt::Goto(ep_chain.clone())]));
            }
            picks.push((ep_chain, ep.weight));
        }
        rules.extend(pick_rules(&self.label, &picks));
        Some(rules)
    }

    /// What a Service port with no endpoint to send to does: reject at once (TCP with a reset),
    /// or drop when a Local policy is all that leaves none (kube-proxy: the client's load
    /// balancer or retry finds another node).
    fn none_rules(&self, local_policy_only: bool) -> Vec<Rule> {
        if local_policy_only {
            return vec![self.rule(vec![Stmt::Drop])];
        }
        let mut rules = Vec::new();
        if self.port.protocol == Protocol::Tcp {
            rules.push(self.rule(vec![Stmt::L4Proto(Protocol::Tcp), Stmt::RejectTcpReset]));
        }
        rules.push(self.rule(vec![Stmt::RejectPortUnreachable]));
        rules
    }

    fn chain(&mut self, name: String, rules: Vec<Rule>) {
        self.objs.chains.insert(name, Chain { base: None, rules: rules.into() });
    }
}

pub(super) fn add_service_ip(objs: &mut ServiceObjects, svc: &Service, vip: IpAddr, opts: &Options) {
    let family = Family::of(&vip);
    let shard = opts.shard_of(&svc.id);
    let here = &opts.locality;
    let of_family = |ips: &[IpAddr]| ips.iter().copied().filter(|ip| Family::of(ip) == family).collect::<Vec<_>>();
    // An address that is both an external IP and a load-balancer IP is treated as the latter
    // (its source ranges apply), as kube-proxy's separate firewall lookup does.
    let lb_ips = of_family(&svc.external.load_balancer_ips);
    let external_ips: Vec<IpAddr> =
        of_family(&svc.external.external_ips).into_iter().filter(|ip| !lb_ips.contains(ip)).collect();
    for port in &svc.ports {
        let mut pc = PortCompiler {
            objs: &mut *objs,
            svc,
            port,
            family,
            shard,
            // Every rule of a Service says which Service it serves (the chain names say the rest).
            label: svc.id.to_string().into(),
            local_chain: service_chain(svc, port, family),
            counters: opts.endpoint_counters,
        };
        let chain = pc.q(&pc.local_chain);
        let all = port.usable_endpoints(family, false, &Locality::default());
        let internal = svc.usable_endpoints(port, family, here);
        let rules = match pc.picks(&internal) {
            Some(rules) => rules,
            None => pc.none_rules(svc.internal_local && !all.is_empty()),
        };
        pc.chain(chain.clone(), rules);
        pc.objs.elements.push((
            qualify(shard, &dispatch_map(family)),
            Element::dispatch(vip, port.protocol, port.port, chain.clone()),
        ));
        if port.node_port.is_none() && external_ips.is_empty() && lb_ips.is_empty() {
            continue;
        }
        // The cluster-wide pick external traffic uses: the Service chain, unless the internal
        // policy narrows that one to this node.
        let cluster = if svc.internal_local && !all.is_empty() {
            let cls = pc.q(&sibling(&pc.local_chain, "cls"));
            let rules = pc.picks(&all).unwrap_or_default();
            pc.chain(cls.clone(), rules);
            cls
        } else {
            chain.clone()
        };
        let ext = pc.q(&sibling(&pc.local_chain, "ext"));
        let mut ext_rules = Vec::new();
        if all.is_empty() {
            // No endpoint anywhere: the Service chain rejects.
            ext_rules.push(pc.rule(vec![Stmt::Goto(chain.clone())]));
        } else if !svc.external.local {
            ext_rules.push(pc.rule(vec![Stmt::SetMarkBit(MASQ_MARK), Stmt::Goto(cluster.clone())]));
        } else {
            // externalTrafficPolicy Local: pods and the node itself are not "external" (kube-proxy's
            // short-circuit); everyone else reaches this node's endpoints with its address kept.
            for cidr in opts.cluster_cidrs.iter().filter(|c| Family::of(&c.addr()) == family) {
                ext_rules.push(pc.rule(vec![Stmt::SaddrIn(*cidr), Stmt::Goto(cluster.clone())]));
            }
            ext_rules.push(pc.rule(vec![
                Stmt::FibSaddrLocal,
                Stmt::SetMarkBit(MASQ_MARK),
                Stmt::Goto(cluster.clone()),
            ]));
            let local = port.usable_endpoints(family, true, here);
            let lcl = pc.q(&sibling(&pc.local_chain, "lcl"));
            let rules = pc.picks(&local).unwrap_or_else(|| pc.none_rules(true));
            pc.chain(lcl.clone(), rules);
            ext_rules.push(pc.rule(vec![Stmt::Goto(lcl)]));
        }
        pc.chain(ext.clone(), ext_rules);
        if let Some(node_port) = port.node_port {
            let e = Element::node_port(port.protocol, node_port, ext.clone());
            pc.objs.elements.push((qualify(shard, &node_ports_map(family)), e));
        }
        let ranges: Vec<_> =
            svc.external.source_ranges.iter().filter(|r| Family::of(&r.addr()) == family).copied().collect();
        // Source ranges of the other family leave this one open (kube-proxy filters by family).
        let lb_target = if lb_ips.is_empty() || ranges.is_empty() {
            ext.clone()
        } else {
            // loadBalancerSourceRanges: others are dropped (node ports are not limited).
            let fw = pc.q(&sibling(&pc.local_chain, "fw"));
            let mut rules: Vec<Rule> =
                ranges.iter().map(|r| pc.rule(vec![Stmt::SaddrIn(*r), Stmt::Goto(ext.clone())])).collect();
            rules.push(pc.rule(vec![Stmt::Drop]));
            pc.chain(fw.clone(), rules);
            fw
        };
        let targets =
            external_ips.iter().map(|ip| (*ip, ext.clone())).chain(lb_ips.iter().map(|ip| (*ip, lb_target.clone())));
        for (ip, target) in targets {
            pc.objs
                .elements
                .push((qualify(shard, &dispatch_map(family)), Element::dispatch(ip, port.protocol, port.port, target)));
        }
    }
}
