//! One DNS query in wire form -> the response in wire form (pure, no I/O): the whole of what
//! the server does with a datagram or a TCP message.

use hickory_proto::op::{Edns, Header, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::DNSClass;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::zone::{Lookup, Zone};

/// How the response travels: UDP limits its size (then it is truncated, and the client retries
/// over TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The UDP payload we advertise with EDNS (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;

/// The response to `query`, or `None` when it is not worth one (shorter than a header, or itself
/// a response: answering those could loop two servers). `zone` is `None` until the first sync
/// (SERVFAIL: the names are not known yet).
pub fn respond(zone: Option<&Zone>, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(query)).ok()?;
    if header.message_type != MessageType::Query {
        return None;
    }
    let (response, udp_limit) = match Message::from_vec(query) {
        // What the client says it can take (512 without EDNS), up to what we advertise.
        Ok(request) => (answer(zone, &request), request.max_payload().clamp(512, EDNS_PAYLOAD)),
        // The header was readable: say FORMERR to that id.
        Err(_) => (Message::error_msg(header.id, header.op_code, ResponseCode::FormErr), 512),
    };
    let limit = match transport {
        Transport::Udp => usize::from(udp_limit),
        Transport::Tcp => usize::from(u16::MAX),
    };
    encode(response, limit)
}

/// The response message to a parsed query.
pub fn answer(zone: Option<&Zone>, request: &Message) -> Message {
    let mut response = Message::response(request.id, request.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    let rcode = |mut m: Message, code: ResponseCode| {
        m.metadata.response_code = code;
        m
    };
    if request.op_code != OpCode::Query {
        return rcode(response, ResponseCode::NotImp);
    }
    let [query] = request.queries.as_slice() else {
        return rcode(response, ResponseCode::FormErr);
    };
    let Some(zone) = zone else {
        return rcode(response, ResponseCode::ServFail);
    };
    if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        return rcode(response, ResponseCode::Refused);
    }
    match zone.lookup(query.name(), query.query_type()) {
        Lookup::Records { answers, additionals, authoritative_soa } => {
            response.metadata.authoritative = true;
            response.add_answers(answers);
            response.add_additionals(additionals);
            if authoritative_soa {
                response.add_authority(zone.soa());
            }
            response
        }
        Lookup::NxDomain => {
            response.metadata.authoritative = true;
            response.add_authority(zone.soa());
            rcode(response, ResponseCode::NXDomain)
        }
        Lookup::Refused => rcode(response, ResponseCode::Refused),
    }
}

/// The wire form; a response longer than `limit` is sent truncated (TC, question only), so
/// that a UDP client asks again over TCP.
fn encode(response: Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    response.truncate().to_vec().ok()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

    use super::{Transport, respond};
    use crate::dns::client::query_bytes;
    use crate::dns::zone::{Zone, domain_name};
    use crate::model::{Protocol, Service, ServiceId, ServicePort, Snapshot};
    use crate::source::resolve::Headless;

    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        ServicePort { name: name.into(), port, protocol, node_port: None, endpoints: vec![] }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// web (dual-stack, http/tcp 80 and dns/udp 53), v4only (one unnamed port), and the
    /// headless db with two ready addresses.
    fn zone() -> Zone {
        let mut snapshot = Snapshot::default();
        let web = Service::new(
            ServiceId::new("default", "web"),
            ips(&["10.96.0.80", "fd00:10:96::80"]),
            vec![port("http", Protocol::Tcp, 80), port("dns", Protocol::Udp, 53)],
        );
        let v4 = Service::new(ServiceId::new("apps", "v4only"), ips(&["10.96.0.7"]), vec![port("", Protocol::Tcp, 80)]);
        snapshot.services.insert(web.id.clone(), web);
        snapshot.services.insert(v4.id.clone(), v4);
        let db = Headless {
            id: ServiceId::new("default", "db"),
            ports: vec![port("pg", Protocol::Tcp, 5432)],
            addresses: ips(&["10.244.1.5", "10.244.1.6"]),
        };
        Zone::build(domain_name("cluster.local").unwrap(), &snapshot, &[db], 7)
    }

    fn ask_with(zone: Option<&Zone>, name: &str, qtype: RecordType, transport: Transport) -> Message {
        let bytes = query_bytes(0x1234, name, qtype, false).unwrap();
        let response = respond(zone, &bytes, transport).expect("a response");
        let msg = Message::from_vec(&response).unwrap();
        assert_eq!(msg.id, 0x1234);
        msg
    }

    fn ask(name: &str, qtype: RecordType) -> Message {
        ask_with(Some(&zone()), name, qtype, Transport::Udp)
    }

    /// The answer section as `TYPE DATA` lines.
    fn answers(msg: &Message) -> Vec<String> {
        msg.answers.iter().map(|r| format!("{} {}", r.record_type(), r.data)).collect()
    }

    fn has_soa(msg: &Message) -> bool {
        msg.authorities.iter().any(|r| matches!(r.data, RData::SOA(_)) && r.name.to_ascii() == "cluster.local.")
    }

    #[test]
    fn a_and_aaaa_give_the_cluster_ips_of_that_family_with_ttl_5() {
        let msg = ask("web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(msg.response_code, ResponseCode::NoError);
        assert!(msg.authoritative);
        assert_eq!(answers(&msg), ["A 10.96.0.80"]);
        assert!(msg.answers.iter().all(|r| r.ttl == 5));
        let msg = ask("web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(answers(&msg), ["AAAA fd00:10:96::80"]);
    }

    #[test]
    fn names_match_whatever_their_case_and_answers_keep_the_question_spelling() {
        let msg = ask("Web.DEFAULT.svc.Cluster.Local.", RecordType::A);
        assert_eq!(answers(&msg), ["A 10.96.0.80"]);
        assert_eq!(msg.answers[0].name.to_ascii(), "Web.DEFAULT.svc.Cluster.Local.");
    }

    #[test]
    fn a_name_without_records_of_the_type_is_nodata_not_nxdomain() {
        let msg = ask("v4only.apps.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(msg.response_code, ResponseCode::NoError);
        assert!(msg.answers.is_empty());
        assert!(has_soa(&msg));
        // Empty non-terminals exist too.
        for name in
            ["apps.svc.cluster.local.", "svc.cluster.local.", "cluster.local.", "_tcp.web.default.svc.cluster.local."]
        {
            let msg = ask(name, RecordType::A);
            assert_eq!((msg.response_code, msg.answers.len()), (ResponseCode::NoError, 0), "{name}");
        }
    }

    #[test]
    fn unknown_names_under_the_domain_are_nxdomain_with_the_soa() {
        for name in [
            "nope.default.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "other.svc.cluster.local.",
            "web.default.pod.cluster.local.",
            "a.web.default.svc.cluster.local.",
            "_ftp._tcp.web.default.svc.cluster.local.",
            "_http._udp.web.default.svc.cluster.local.",
        ] {
            let msg = ask(name, RecordType::A);
            assert_eq!(msg.response_code, ResponseCode::NXDomain, "{name}");
            assert!(has_soa(&msg), "{name}");
            assert!(msg.authoritative);
        }
    }

    #[test]
    fn names_outside_the_domain_are_refused() {
        for (name, qtype) in [
            ("example.com.", RecordType::A),
            ("cluster.local.example.com.", RecordType::A),
            ("1.1.1.1.in-addr.arpa.", RecordType::PTR),
            ("96.10.in-addr.arpa.", RecordType::PTR),
        ] {
            let msg = ask(name, qtype);
            assert_eq!(msg.response_code, ResponseCode::Refused, "{name}");
            assert!(msg.answers.is_empty() && !msg.authoritative);
        }
    }

    #[test]
    fn srv_for_a_named_port_and_for_the_service_name() {
        let msg = ask("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(answers(&msg), ["SRV 0 100 80 web.default.svc.cluster.local."]);
        let extra: Vec<String> = msg.additionals.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(extra, ["10.96.0.80", "fd00:10:96::80"]);
        let msg = ask("_dns._udp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(answers(&msg), ["SRV 0 100 53 web.default.svc.cluster.local."]);
        // An A question at the SRV name: the name exists, no A record.
        let msg = ask("_dns._udp.web.default.svc.cluster.local.", RecordType::A);
        assert_eq!((msg.response_code, msg.answers.len()), (ResponseCode::NoError, 0));
        let msg = ask("web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(
            answers(&msg),
            ["SRV 0 100 80 web.default.svc.cluster.local.", "SRV 0 100 53 web.default.svc.cluster.local."]
        );
        // Unnamed ports have no SRV record.
        let msg = ask("v4only.apps.svc.cluster.local.", RecordType::SRV);
        assert_eq!((msg.response_code, msg.answers.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn ptr_for_cluster_ips_of_both_families() {
        let msg = ask("80.0.96.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(answers(&msg), ["PTR web.default.svc.cluster.local."]);
        let v6 = Name::from(IpAddr::from("fd00:10:96::80".parse::<std::net::Ipv6Addr>().unwrap()));
        let msg = ask(&v6.to_ascii(), RecordType::PTR);
        assert_eq!(answers(&msg), ["PTR web.default.svc.cluster.local."]);
        let msg = ask("7.0.96.10.in-addr.arpa.", RecordType::A);
        assert_eq!((msg.response_code, msg.answers.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn headless_services_answer_their_ready_endpoint_addresses() {
        let msg = ask("db.default.svc.cluster.local.", RecordType::A);
        assert_eq!(answers(&msg), ["A 10.244.1.5", "A 10.244.1.6"]);
        let msg = ask("_pg._tcp.db.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(answers(&msg), ["SRV 0 100 5432 db.default.svc.cluster.local."]);
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let z = zone();
        // Shorter than a header: nothing to answer to.
        assert_eq!(respond(Some(&z), b"\x12\x34\x01", Transport::Udp), None);
        assert_eq!(respond(Some(&z), b"", Transport::Tcp), None);
        // A header claiming a question that is not there.
        let bad = [0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        let msg = Message::from_vec(&respond(Some(&z), &bad, Transport::Udp).unwrap()).unwrap();
        assert_eq!((msg.id, msg.response_code), (0xabcd, ResponseCode::FormErr));
        // A response is never answered (two servers could loop).
        let mut response = query_bytes(1, "web.default.svc.cluster.local.", RecordType::A, false).unwrap();
        response[2] |= 0x80;
        assert_eq!(respond(Some(&z), &response, Transport::Udp), None);
        // Random bytes after a valid header never panic.
        let mut state = 1u32;
        for len in 12..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (state >> 16) as u8 & 0x7f
                })
                .collect();
            let _ = respond(Some(&z), &junk, Transport::Udp);
        }
    }

    #[test]
    fn other_opcodes_counts_and_classes() {
        let z = zone();
        let mut two = Message::query();
        two.add_query(Query::query(Name::from_ascii("web.default.svc.cluster.local.").unwrap(), RecordType::A));
        two.add_query(Query::query(Name::from_ascii("db.default.svc.cluster.local.").unwrap(), RecordType::A));
        let msg = Message::from_vec(&respond(Some(&z), &two.to_vec().unwrap(), Transport::Udp).unwrap()).unwrap();
        assert_eq!(msg.response_code, ResponseCode::FormErr);
        let mut notify = Message::new(9, hickory_proto::op::MessageType::Query, OpCode::Notify);
        notify.add_query(Query::query(Name::from_ascii("cluster.local.").unwrap(), RecordType::SOA));
        let msg = Message::from_vec(&respond(Some(&z), &notify.to_vec().unwrap(), Transport::Udp).unwrap()).unwrap();
        assert_eq!(msg.response_code, ResponseCode::NotImp);
        let mut chaos = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
        chaos.set_query_class(hickory_proto::rr::DNSClass::CH);
        let mut q = Message::query();
        q.add_query(chaos);
        let msg = Message::from_vec(&respond(Some(&z), &q.to_vec().unwrap(), Transport::Udp).unwrap()).unwrap();
        assert_eq!(msg.response_code, ResponseCode::Refused);
    }

    #[test]
    fn before_the_first_sync_the_answer_is_servfail() {
        let msg = ask_with(None, "web.default.svc.cluster.local.", RecordType::A, Transport::Udp);
        assert_eq!(msg.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn a_large_answer_is_truncated_over_udp_and_whole_over_tcp() {
        let addresses: Vec<IpAddr> =
            (0..200u32).map(|i| IpAddr::from([10, 244, (i / 250) as u8, (i % 250) as u8 + 1])).collect();
        let big = Headless { id: ServiceId::new("default", "big"), ports: vec![], addresses };
        let z = Zone::build(domain_name("cluster.local").unwrap(), &Snapshot::default(), &[big], 1);
        let udp = ask_with(Some(&z), "big.default.svc.cluster.local.", RecordType::A, Transport::Udp);
        assert!(udp.truncation && udp.answers.is_empty());
        let tcp = ask_with(Some(&z), "big.default.svc.cluster.local.", RecordType::A, Transport::Tcp);
        assert!(!tcp.truncation);
        assert_eq!(tcp.answers.len(), 200);
    }

    #[test]
    fn another_domain() {
        let z = Zone::build(domain_name("Corp.Example.").unwrap(), &Snapshot::default(), &[], 1);
        let msg = ask_with(Some(&z), "x.default.svc.cluster.local.", RecordType::A, Transport::Udp);
        assert_eq!(msg.response_code, ResponseCode::Refused);
        let msg = ask_with(Some(&z), "x.default.svc.corp.example.", RecordType::A, Transport::Udp);
        assert_eq!(msg.response_code, ResponseCode::NXDomain);
        assert!(domain_name("bad_domain").is_err());
        assert!(domain_name("").is_err());
    }
}
