//! The cluster's names, built from what is served (pure, no I/O): each Service's
//! `<svc>.<ns>.svc.<domain>` with its addresses and ports, the reverse names of the ClusterIPs,
//! and the lookup of one question against them, as CoreDNS's kubernetes plugin answers it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::model::{Protocol, Snapshot};
use crate::source::resolve::Headless;

/// Every record's TTL, in seconds (CoreDNS's kubernetes plugin default).
pub const TTL: u32 = 5;

/// What one name of a Service answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Names {
    /// ClusterIPs, or a headless Service's ready endpoint addresses.
    addresses: Vec<IpAddr>,
    /// Named ports: `_<name>._<proto>` SRV records.
    ports: Vec<(String, Protocol, u16)>,
}

/// The answer to one question, before it becomes a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// NOERROR with these records (none: the name exists but has no record of that type; the
    /// zone's SOA goes in the authority section then).
    Records { answers: Vec<Record>, additionals: Vec<Record>, authoritative_soa: bool },
    /// A name under the domain that does not exist.
    NxDomain,
    /// A name that is not ours to answer (nothing is forwarded).
    Refused,
}

/// The names under one cluster domain.
#[derive(Debug, Clone)]
pub struct Zone {
    /// `cluster.local.`, lowercase.
    domain: Name,
    /// (namespace, name) -> what `<name>.<namespace>.svc.<domain>` answers.
    services: HashMap<(String, String), Names>,
    /// Namespaces with at least one Service (`<ns>.svc.<domain>` exists).
    namespaces: HashSet<String>,
    /// ClusterIP -> `<svc>.<ns>.svc.<domain>.`
    reverse: HashMap<IpAddr, Name>,
    serial: u32,
}

/// The lowercase fully qualified form of `domain` (`cluster.local` -> `cluster.local.`).
pub fn domain_name(domain: &str) -> Result<Name, String> {
    let text = domain.trim_end_matches('.');
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if text.is_empty() || text.len() > 200 || !text.split('.').all(ok_label) {
        return Err(format!(
            "{domain:?} is not a domain name (dot-separated labels of letters, digits and '-', such as cluster.local)"
        ));
    }
    Name::from_ascii(format!("{}.", text.to_ascii_lowercase())).map_err(|e| format!("{domain:?}: {e}"))
}

impl Zone {
    /// A zone with no Service yet.
    pub fn empty(domain: Name, serial: u32) -> Zone {
        Zone { domain, services: HashMap::new(), namespaces: HashSet::new(), reverse: HashMap::new(), serial }
    }

    /// The names of every served Service (their ClusterIPs) and headless Service (their ready
    /// endpoint addresses).
    pub fn build(domain: Name, snapshot: &Snapshot, headless: &[Headless], serial: u32) -> Zone {
        let mut zone = Zone::empty(domain, serial);
        let named = |ports: &mut dyn Iterator<Item = (&String, Protocol, u16)>| {
            ports.filter(|(name, _, _)| !name.is_empty()).map(|(n, p, port)| (n.clone(), p, port)).collect()
        };
        for svc in snapshot.services.values() {
            let ports = named(&mut svc.ports.iter().map(|p| (&p.name, p.protocol, p.port)));
            zone.add(&svc.id.namespace, &svc.id.name, Names { addresses: svc.cluster_ips.clone(), ports });
            for ip in &svc.cluster_ips {
                let target = zone.service_name(&svc.id.namespace, &svc.id.name);
                zone.reverse.insert(*ip, target);
            }
        }
        for h in headless {
            let ports = named(&mut h.ports.iter().map(|p| (&p.name, p.protocol, p.port)));
            zone.add(&h.id.namespace, &h.id.name, Names { addresses: h.addresses.clone(), ports });
        }
        zone
    }

    fn add(&mut self, namespace: &str, name: &str, names: Names) {
        self.namespaces.insert(namespace.to_string());
        self.services.insert((namespace.to_string(), name.to_string()), names);
    }

    /// How many Services have names.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub fn domain(&self) -> &Name {
        &self.domain
    }

    /// `<name>.<namespace>.svc.<domain>.` (names were checked as DNS labels when read).
    fn service_name(&self, namespace: &str, name: &str) -> Name {
        let relative = Name::from_labels([name.as_bytes(), namespace.as_bytes(), b"svc"]);
        relative.and_then(|r| r.append_domain(&self.domain)).unwrap_or_else(|_| self.domain.clone())
    }

    /// The zone's SOA record (in the authority section of negative answers).
    pub fn soa(&self) -> Record {
        let at = |label: &str| Name::from_labels([label.as_bytes()]).and_then(|n| n.append_domain(&self.domain));
        let mname = Name::from_labels([b"ns".as_slice(), b"dns"]).and_then(|n| n.append_domain(&self.domain));
        let (mname, rname) = (mname.unwrap_or_else(|_| self.domain.clone()), at("hostmaster").unwrap_or_default());
        // Refresh, retry and expire as CoreDNS's kubernetes plugin; the minimum is the TTL.
        let soa = SOA::new(mname, rname, self.serial, 7200, 1800, 86400, TTL);
        Record::from_rdata(self.domain.clone(), TTL, RData::SOA(soa))
    }

    /// Answers one question. `qname` is as the client sent it (answers carry its spelling).
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Lookup {
        let lower = qname.to_lowercase();
        if !self.domain.zone_of(&lower) {
            return self.lookup_reverse(qname, &lower, qtype);
        }
        let depth = usize::from(lower.num_labels() - self.domain.num_labels());
        let labels: Vec<String> = lower.iter().take(depth).map(|l| String::from_utf8_lossy(l).into_owned()).collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let nodata = || Lookup::Records { answers: vec![], additionals: vec![], authoritative_soa: true };
        match labels.as_slice() {
            [] if matches!(qtype, RecordType::SOA | RecordType::ANY) => {
                Lookup::Records { answers: vec![self.soa()], additionals: vec![], authoritative_soa: false }
            }
            [] | ["svc"] => nodata(),
            [ns, "svc"] if self.namespaces.contains(*ns) => nodata(),
            [name, ns, "svc"] => match self.services.get(&(ns.to_string(), name.to_string())) {
                Some(names) => self.service_records(qname, names, qtype, SrvAt::Service),
                None => Lookup::NxDomain,
            },
            [proto, name, ns, "svc"] => match self.services.get(&(ns.to_string(), name.to_string())) {
                Some(names) if names.ports.iter().any(|(_, p, _)| is_label_of(proto, *p)) => nodata(),
                _ => Lookup::NxDomain,
            },
            [port, proto, name, ns, "svc"] => {
                let names = self.services.get(&(ns.to_string(), name.to_string()));
                let numbers: Vec<u16> = names
                    .iter()
                    .flat_map(|n| &n.ports)
                    .filter(|(n, p, _)| port.strip_prefix('_') == Some(n.as_str()) && is_label_of(proto, *p))
                    .map(|(_, _, number)| *number)
                    .collect();
                match names {
                    Some(names) if !numbers.is_empty() => {
                        let srv = SrvAt::Port { target: self.service_name(ns, name), numbers };
                        self.service_records(qname, names, qtype, srv)
                    }
                    _ => Lookup::NxDomain,
                }
            }
            _ => Lookup::NxDomain,
        }
    }

    /// The records of a Service name: A/AAAA at the Service's own name, SRV where `srv` says.
    fn service_records(&self, qname: &Name, names: &Names, qtype: RecordType, srv: SrvAt) -> Lookup {
        let any = qtype == RecordType::ANY;
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let address_records = |owner: &Name, out: &mut Vec<Record>, want_a: bool, want_aaaa: bool| {
            for ip in &names.addresses {
                match ip {
                    IpAddr::V4(a) if want_a => out.push(Record::from_rdata(owner.clone(), TTL, RData::A(A(*a)))),
                    IpAddr::V6(a) if want_aaaa => {
                        out.push(Record::from_rdata(owner.clone(), TTL, RData::AAAA(AAAA(*a))))
                    }
                    _ => {}
                }
            }
        };
        let (target, numbers) = match srv {
            SrvAt::Service => {
                address_records(qname, &mut answers, any || qtype == RecordType::A, any || qtype == RecordType::AAAA);
                (qname.to_lowercase(), names.ports.iter().map(|(_, _, n)| *n).collect())
            }
            SrvAt::Port { target, numbers } => (target, numbers),
        };
        if (any || qtype == RecordType::SRV) && !numbers.is_empty() {
            for number in numbers {
                let srv = SRV::new(0, 100, number, target.clone());
                answers.push(Record::from_rdata(qname.clone(), TTL, RData::SRV(srv)));
            }
            // The target's addresses, so that the client needs no second question.
            address_records(&target, &mut additionals, true, true);
        }
        let authoritative_soa = answers.is_empty();
        Lookup::Records { answers, additionals, authoritative_soa }
    }

    /// PTR for a ClusterIP; any other name outside the domain is refused.
    fn lookup_reverse(&self, qname: &Name, lower: &Name, qtype: RecordType) -> Lookup {
        let ip = lower.parse_arpa_name().ok().filter(|net| net.prefix_len() == net.max_prefix_len()).map(|n| n.addr());
        let Some(target) = ip.and_then(|ip| self.reverse.get(&ip)) else {
            return Lookup::Refused;
        };
        let answers = if matches!(qtype, RecordType::PTR | RecordType::ANY) {
            vec![Record::from_rdata(qname.clone(), TTL, RData::PTR(PTR(target.clone())))]
        } else {
            vec![]
        };
        Lookup::Records { answers, additionals: vec![], authoritative_soa: false }
    }
}

/// Where SRV records are asked for.
enum SrvAt {
    /// At the Service's own name: one per named port.
    Service,
    /// At `_<port>._<proto>.<svc>...`: the numbers of the ports so named.
    Port { target: Name, numbers: Vec<u16> },
}

/// Whether an SRV name's protocol label (`_tcp`) names `protocol`.
fn is_label_of(label: &str, protocol: Protocol) -> bool {
    label.strip_prefix('_') == Some(protocol.as_str())
}
