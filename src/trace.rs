//! A packet tracer over a compiled [`Ruleset`]: where does a new connection go, and with what
//! probability? It interprets our statements the way the kernel evaluates the expressions they
//! encode, so the compiler can be tested exactly and without root (kube-proxy's tests do the
//! same for its rules).

use std::net::IpAddr;

use crate::compile::{CHAIN_OUTPUT, CHAIN_PREROUTING};
use crate::model::{Family, Protocol};
use crate::ruleset::{Element, MASQ_MARK, Ruleset, SetKind, Stmt, ip_bytes, qualify};

/// The first packet of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
    /// Sent by a process on the node (output hook) rather than forwarded (prerouting).
    pub local: bool,
}

/// What happens to the connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    /// Not ours: continues untouched.
    Untouched,
    Rejected,
    Dropped,
    Dnat {
        addr: IpAddr,
        port: u16,
        masquerade: bool,
    },
}

/// An exact probability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio(pub u128, pub u128);

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Ratio {
    pub const ONE: Ratio = Ratio(1, 1);

    fn reduce(self) -> Ratio {
        let g = gcd(self.0, self.1).max(1);
        Ratio(self.0 / g, self.1 / g)
    }

    fn mul(self, n: u128, d: u128) -> Ratio {
        Ratio(self.0 * n, self.1 * d).reduce()
    }

    fn add(self, o: Ratio) -> Ratio {
        Ratio(self.0 * o.1 + o.0 * self.1, self.1 * o.1).reduce()
    }
}

/// Every possible fate with its probability (probabilities add up to one).
pub fn trace(rs: &Ruleset, pkt: &Packet) -> Vec<(Fate, Ratio)> {
    let start = if pkt.local { CHAIN_OUTPUT } else { CHAIN_PREROUTING };
    let mut out: Vec<(Fate, Ratio)> = Vec::new();
    // Each table's base chain in turn (shards own disjoint ClusterIPs), until one acts.
    let mut branches = Vec::new();
    let mut shard = 0;
    while let Some(chain) = Some(qualify(shard, start)).filter(|c| rs.chains.contains_key(c)) {
        branches.clear();
        run_chain(rs, pkt, &chain, 0, Ratio::ONE, &mut Vec::new(), &mut branches);
        if branches.iter().any(|(f, _)| *f != Fate::Untouched) {
            break;
        }
        shard += 1;
    }
    if branches.is_empty() {
        branches.push((Fate::Untouched, Ratio::ONE));
    }
    for (fate, p) in branches {
        match out.iter_mut().find(|(f, _)| *f == fate) {
            Some((_, q)) => *q = q.add(p),
            None => out.push((fate, p)),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn key_matches(rs: &Ruleset, set: &str, key: &[u8]) -> Option<Element> {
    rs.sets.get(set)?.elements.iter().find(|e| e.key == key).cloned()
}

/// Runs `chain`; on falling off its end, continues with the caller frames in `stack`.
fn run_chain(
    rs: &Ruleset,
    pkt: &Packet,
    chain: &str,
    mark: u32,
    p: Ratio,
    stack: &mut Vec<(String, usize)>,
    out: &mut Vec<(Fate, Ratio)>,
) {
    run_from(rs, pkt, chain, 0, mark, p, stack, out)
}

#[allow(clippy::too_many_arguments)]
fn run_from(
    rs: &Ruleset,
    pkt: &Packet,
    chain: &str,
    first_rule: usize,
    mut mark: u32,
    mut p: Ratio,
    stack: &mut Vec<(String, usize)>,
    out: &mut Vec<(Fate, Ratio)>,
) {
    let family = Family::of(&pkt.dst);
    let rules: &[crate::ruleset::Rule] = rs.chains.get(chain).map(|c| &c.rules[..]).unwrap_or_default();
    'rules: for (ri, rule) in rules.iter().enumerate().skip(first_rule) {
        for stmt in &rule.stmts {
            match stmt {
                Stmt::NfProto(f) if *f != family => continue 'rules,
                Stmt::NfProto(_) => {}
                Stmt::L4Proto(pr) if *pr != pkt.proto => continue 'rules,
                Stmt::L4Proto(_) => {}
                Stmt::SaddrIn(net) if !net.contains(&pkt.src) => continue 'rules,
                Stmt::SaddrIn(_) => {}
                Stmt::DaddrInSet { set, .. } => {
                    if key_matches(rs, set, &ip_bytes(&pkt.dst)).is_none() {
                        continue 'rules;
                    }
                }
                Stmt::DaddrVmap { map, .. } => match key_matches(rs, map, &ip_bytes(&pkt.dst)).and_then(|e| e.goto) {
                    Some(target) => return run_from(rs, pkt, &target, 0, mark, p, stack, out),
                    None => continue 'rules,
                },
                Stmt::DispatchVmap { map, .. } => {
                    let probe = Element::dispatch(pkt.dst, pkt.proto, pkt.dport, String::new());
                    debug_assert!(matches!(rs.sets.get(map).map(|s| s.kind), Some(SetKind::Dispatch(_))));
                    match key_matches(rs, map, &probe.key).and_then(|e| e.goto) {
                        Some(target) => return run_from(rs, pkt, &target, 0, mark, p, stack, out),
                        None => continue 'rules,
                    }
                }
                Stmt::NodePortVmap { map } => {
                    let probe = Element::node_port(pkt.proto, pkt.dport, String::new());
                    match key_matches(rs, map, &probe.key).and_then(|e| e.goto) {
                        Some(target) => return run_from(rs, pkt, &target, 0, mark, p, stack, out),
                        None => continue 'rules,
                    }
                }
                // Only a process on the node sends from a local address (through the output hook).
                Stmt::FibSaddrLocal if !pkt.local => continue 'rules,
                Stmt::FibSaddrLocal => {}
                Stmt::MarkBitClear(bit) if mark & bit != 0 => continue 'rules,
                Stmt::MarkBitClear(_) => {}
                Stmt::SetMarkBit(bit) => mark |= bit,
                Stmt::ClearMarkBit(bit) => mark &= !bit,
                Stmt::NumgenBelow { modulus, below } => {
                    let (m, b) = (u128::from(*modulus), u128::from(*below).min(u128::from(*modulus)));
                    // The branch where the rule does not match continues with the next rule.
                    if b < m {
                        run_from(rs, pkt, chain, ri + 1, mark, p.mul(m - b, m), &mut stack.clone(), out);
                    }
                    if b == 0 {
                        return;
                    }
                    p = p.mul(b, m);
                }
                Stmt::Jump(target) => {
                    stack.push((chain.to_string(), ri + 1));
                    return run_from(rs, pkt, target, 0, mark, p, stack, out);
                }
                Stmt::Goto(target) => return run_from(rs, pkt, target, 0, mark, p, stack, out),
                Stmt::Return => break 'rules,
                Stmt::Dnat { addr, port } => {
                    // Postrouting masquerades what carries the mark (hairpin included: the
                    // endpoint chain marks a pod that reached itself).
                    out.push((Fate::Dnat { addr: *addr, port: *port, masquerade: mark & MASQ_MARK != 0 }, p));
                    return;
                }
                Stmt::Masquerade | Stmt::Counter | Stmt::UpdateSaddrSet { .. } => {}
                // A client in an endpoint's affinity set (the kernel's sets, read back) sticks
                // to it; a compiled rule set's are empty: a new client has no affinity yet.
                Stmt::SaddrInSet { set, .. } => {
                    if key_matches(rs, set, &ip_bytes(&pkt.src)).is_none() {
                        continue 'rules;
                    }
                }
                // Only in rule sets of agents before RULE_FORMAT 7 (hairpin by a postrouting set).
                Stmt::HairpinInSet { .. } => continue 'rules,
                // The first packet of a connection is never INVALID.
                Stmt::CtStateInvalid => continue 'rules,
                // Postrouting's (see Dnat): the walk ends at the DNAT, so nothing it meets is DNATed yet.
                Stmt::CtNotDnat => {}
                Stmt::Drop => {
                    out.push((Fate::Dropped, p));
                    return;
                }
                Stmt::RejectTcpReset | Stmt::RejectPortUnreachable => {
                    out.push((Fate::Rejected, p));
                    return;
                }
            }
        }
    }
    match stack.pop() {
        Some((caller, next)) => run_from(rs, pkt, &caller, next, mark, p, stack, out),
        None => out.push((Fate::Untouched, p)),
    }
}
