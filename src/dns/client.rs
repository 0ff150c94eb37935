//! A small blocking DNS client (hickory's message types over std sockets): the test pod's
//! `resolve`, the tests and the benchmark ask with it. Not used by the agent.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// One question as wire bytes, with id `id` and recursion desired (as a stub resolver sends it).
pub fn query_bytes(id: u16, name: &str, qtype: RecordType, edns: bool) -> Result<Vec<u8>, String> {
    let name = Name::from_ascii(name).map_err(|e| format!("{name:?}: {e}"))?;
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name, qtype));
    if edns {
        msg.set_edns(Edns::new());
    }
    msg.to_vec().map_err(|e| e.to_string())
}

fn socket_for(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let s = UdpSocket::bind(bind)?;
    s.connect(server)?;
    Ok(s)
}

/// Sends `bytes` over UDP and waits for one datagram back.
pub fn exchange_udp(server: SocketAddr, bytes: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let s = socket_for(server)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(bytes)?;
    let mut buf = vec![0u8; 65535];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Sends `bytes` as one length-prefixed TCP message and reads one back.
pub fn exchange_tcp(server: SocketAddr, bytes: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&server, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Asks `server` for `name`/`qtype` (UDP, or TCP with `tcp`) and parses the response.
pub fn ask(server: SocketAddr, name: &str, qtype: RecordType, tcp: bool, timeout: Duration) -> Result<Message, String> {
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let bytes = query_bytes(id, name, qtype, false)?;
    let raw = if tcp { exchange_tcp(server, &bytes, timeout) } else { exchange_udp(server, &bytes, timeout) };
    let raw = raw.map_err(|e| format!("no answer from {server}: {e}"))?;
    let msg = Message::from_vec(&raw).map_err(|e| format!("unreadable answer from {server}: {e}"))?;
    if msg.id != id {
        return Err(format!("answer from {server} has id {} instead of {id}", msg.id));
    }
    Ok(msg)
}

/// The addresses `name` resolves to at `server`: A records, else AAAA.
pub fn addresses(server: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<IpAddr>, String> {
    for qtype in [RecordType::A, RecordType::AAAA] {
        let msg = ask(server, name, qtype, false, timeout)?;
        let ips: Vec<IpAddr> = msg
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        if !ips.is_empty() {
            return Ok(ips);
        }
        if msg.response_code != ResponseCode::NoError {
            return Err(format!("{name}: {}", msg.response_code));
        }
    }
    Err(format!("{name}: no address"))
}

/// A response as stable text, one line per item:
/// `status NOERROR flags aa`, then `answer|authority|additional NAME TTL TYPE DATA`.
pub fn render(msg: &Message) -> String {
    let mut flags = Vec::new();
    for (on, f) in [(msg.authoritative, "aa"), (msg.truncation, "tc"), (msg.recursion_available, "ra")] {
        if on {
            flags.push(f);
        }
    }
    let mut out = format!("status {} flags {}\n", rcode_name(msg.response_code), flags.join(","));
    let sections = [("answer", &msg.answers), ("authority", &msg.authorities), ("additional", &msg.additionals)];
    for (section, records) in sections {
        for r in records {
            out.push_str(&format!("{section} {} {} {} {}\n", r.name, r.ttl, r.record_type(), r.data));
        }
    }
    out
}

/// The mnemonic dig prints (`NOERROR`, `NXDOMAIN`, ...).
pub fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("{other:?}").to_uppercase(),
    }
}
