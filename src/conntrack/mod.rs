//! ctnetlink: dump the conntrack table and delete entries, through `netlink-packet-netfilter`
//! (pure Rust message types) and `netlink-sys` (the socket). What to delete is decided in
//! [`stale`]; this module only talks to the kernel.
//!
//! Dumps are streamed: each entry is handed to a callback as its message arrives, so a table
//! of a million entries never exists as a million-entry copy here. Where ctnetlink can filter
//! in the kernel (CTA_FILTER, Linux 5.8+: protocol, original destination address and port) the
//! dump asks it to; without that support the same filter is applied here.

pub mod stale;

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol, Status, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use stale::FlowKey;

/// One conntrack entry: what decides its fate, and its original tuple to delete it by.
#[derive(Debug, Clone)]
pub struct Flow {
    pub key: FlowKey,
    /// The client: the original source address and port.
    pub client: Option<(IpAddr, u16)>,
    /// TCP's state (`ESTABLISHED`, `TIME_WAIT`...), else `ASSURED`, `REPLIED` or `UNREPLIED`.
    pub state: &'static str,
    family: NetfilterProtoFamily,
    orig: Vec<Tuple>,
}

/// What a dump asks the kernel for: one protocol, and optionally one original destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub protocol: u8,
    pub dst: Option<(IpAddr, u16)>,
}

impl Filter {
    pub fn matches(&self, k: &FlowKey) -> bool {
        k.protocol == self.protocol && self.dst.is_none_or(|(ip, port)| k.orig_dst == ip && k.orig_dport == port)
    }

    /// The dump request's attributes: CTA_TUPLE_ORIG with the parts to match and CTA_FILTER
    /// naming them (ctnetlink's CTA_FILTER_FLAG_CTA_*).
    fn attributes(&self) -> Vec<ConntrackAttribute> {
        const CTA_FILTER: u16 = 25;
        const NLA_F_NESTED: u16 = 1 << 15;
        const CTA_FILTER_ORIG_FLAGS: u16 = 1;
        const IP_DST: u32 = 1 << 1;
        const PROTO_NUM: u32 = 1 << 3;
        const PROTO_DST_PORT: u32 = 1 << 5;
        let mut flags = PROTO_NUM;
        let mut proto = vec![ProtoTuple::Protocol(protocol_of(self.protocol))];
        let mut tuple = Vec::new();
        if let Some((ip, port)) = self.dst {
            flags |= IP_DST | PROTO_DST_PORT;
            tuple.push(Tuple::Ip(vec![IPTuple::DestinationAddress(ip)]));
            proto.push(ProtoTuple::DestinationPort(port));
        }
        tuple.push(Tuple::Proto(proto));
        let mut nested = Vec::with_capacity(8);
        nested.extend_from_slice(&8u16.to_ne_bytes());
        nested.extend_from_slice(&CTA_FILTER_ORIG_FLAGS.to_ne_bytes());
        nested.extend_from_slice(&flags.to_ne_bytes());
        vec![
            ConntrackAttribute::CtaTupleOrig(tuple),
            ConntrackAttribute::Other(DefaultNla::new(CTA_FILTER | NLA_F_NESTED, nested)),
        ]
    }
}

fn protocol_of(n: u8) -> Protocol {
    match n {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        n => Protocol::Other(n),
    }
}

/// conntrack's TCP state names (nf_conntrack_tcp.h order).
const TCP_STATES: [&str; 10] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
];

fn proto_number(p: &Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
        Protocol::Other(n) => *n,
        _ => 0,
    }
}

/// (source, destination, source port, destination port, protocol) of a tuple.
fn tuple_parts(t: &[Tuple]) -> (Option<IpAddr>, Option<IpAddr>, u16, u16, u8) {
    let (mut src, mut dst, mut sport, mut dport, mut proto) = (None, None, 0, 0, 0);
    for part in t {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(pr) => proto = proto_number(pr),
                        ProtoTuple::SourcePort(n) => sport = *n,
                        ProtoTuple::DestinationPort(n) => dport = *n,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (src, dst, sport, dport, proto)
}

fn flow_of(family: NetfilterProtoFamily, attrs: &[ConntrackAttribute]) -> Option<Flow> {
    let mut orig = None;
    let mut reply = None;
    let mut tcp_state = None;
    let mut status = Status::empty();
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t.clone()),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(t.clone()),
            ConntrackAttribute::CtaStatus(s) => status = *s,
            ConntrackAttribute::CtaProtoInfo(info) => {
                for i in info {
                    if let ProtoInfo::TCP(tcp) = i {
                        tcp_state = tcp.iter().find_map(|t| match t {
                            ProtoInfoTCP::State(s) => Some(*s),
                            _ => None,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    let (orig, reply) = (orig?, reply?);
    let (orig_src, orig_dst, orig_sport, orig_dport, protocol) = tuple_parts(&orig);
    let (reply_src, _, reply_sport, _, _) = tuple_parts(&reply);
    let state = match tcp_state {
        Some(s) => TCP_STATES.get(usize::from(s)).copied().unwrap_or("UNKNOWN"),
        None if status.contains(Status::Assured) => "ASSURED",
        None if status.contains(Status::SeenReply) => "REPLIED",
        None => "UNREPLIED",
    };
    Some(Flow {
        key: FlowKey { protocol, orig_dst: orig_dst?, orig_dport, reply_src: reply_src?, reply_sport },
        client: orig_src.map(|ip| (ip, orig_sport)),
        state,
        family,
        orig,
    })
}

pub struct Conntrack {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Dumps of large tables arrive in many messages; do not drop any.
        let _ = sock.set_rx_buf_sz(8 << 20);
        Ok(Conntrack { sock, seq: 1, buf: vec![0; 1 << 16] })
    }

    fn send(&mut self, family: NetfilterProtoFamily, flags: u16, msg: ConntrackMessage) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), msg)),
        );
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.sock.send(&out, 0)?;
        Ok(self.seq)
    }

    /// Reads answers to `seq` until DONE or an ACK/error; calls `each` on every data message.
    fn receive(&mut self, seq: u32, mut each: impl FnMut(NetfilterMessage)) -> io::Result<()> {
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buf[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
            }
        }
    }

    /// Streams the entries of both families (of `family` only, when given) that `filter`
    /// matches to `each`, as the dump arrives. The kernel filters where it can (CTA_FILTER); a
    /// kernel without it is asked for everything and the filter is applied here.
    pub fn each_flow(
        &mut self,
        only: Option<crate::model::Family>,
        filter: Filter,
        mut each: impl FnMut(Flow),
    ) -> io::Result<()> {
        for (family, fam) in [
            (NetfilterProtoFamily::IPv4, crate::model::Family::V4),
            (NetfilterProtoFamily::IPv6, crate::model::Family::V6),
        ] {
            if only.is_some_and(|f| f != fam) {
                continue;
            }
            let mut handle = |m: NetfilterMessage| {
                if let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = &m.inner
                    && let Some(f) = flow_of(family, attrs)
                    && filter.matches(&f.key)
                {
                    each(f);
                }
            };
            let seq = self.send(family, NLM_F_DUMP, ConntrackMessage::Get(filter.attributes()))?;
            match self.receive(seq, &mut handle) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    let seq = self.send(family, NLM_F_DUMP, ConntrackMessage::Get(vec![]))?;
                    self.receive(seq, &mut handle)?;
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// The UDP entries `keep` selects, streamed from the dump (only those are kept).
    pub fn udp_flows_where(&mut self, mut keep: impl FnMut(&FlowKey) -> bool) -> io::Result<Vec<Flow>> {
        let mut flows = Vec::new();
        let udp = Filter { protocol: 17, dst: None };
        self.each_flow(None, udp, |f| {
            if keep(&f.key) {
                flows.push(f);
            }
        })?;
        Ok(flows)
    }

    /// Deletes one entry by its original tuple; `Ok(false)` if it had already gone.
    pub fn delete(&mut self, flow: &Flow) -> io::Result<bool> {
        let msg = ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(flow.orig.clone())]);
        let seq = self.send(flow.family, NLM_F_ACK, msg)?;
        match self.receive(seq, |_| {}) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
