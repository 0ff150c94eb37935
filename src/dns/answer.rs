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
