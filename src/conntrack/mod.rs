//! ctnetlink: dump the conntrack table and delete entries, through `netlink-packet-netfilter`
//! (pure Rust message types) and `netlink-sys` (the socket). What to delete is decided in
//! [`stale`]; this module only talks to the kernel.

pub mod stale;

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use stale::FlowKey;

/// One conntrack entry: what decides its fate, and its original tuple to delete it by.
#[derive(Debug, Clone)]
pub struct Flow {
    pub key: FlowKey,
    family: NetfilterProtoFamily,
    orig: Vec<Tuple>,
}

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
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t.clone()),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(t.clone()),
            _ => {}
        }
    }
    let (orig, reply) = (orig?, reply?);
    let (_, orig_dst, _, orig_dport, protocol) = tuple_parts(&orig);
    let (reply_src, _, reply_sport, _, _) = tuple_parts(&reply);
    Some(Flow {
        key: FlowKey { protocol, orig_dst: orig_dst?, orig_dport, reply_src: reply_src?, reply_sport },
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

    /// Every UDP entry of both families.
    pub fn udp_flows(&mut self) -> io::Result<Vec<Flow>> {
        let mut flows = Vec::new();
        for family in [NetfilterProtoFamily::IPv4, NetfilterProtoFamily::IPv6] {
            let seq = self.send(family, NLM_F_DUMP, ConntrackMessage::Get(vec![]))?;
            self.receive(seq, |m| {
                if let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = &m.inner
                    && let Some(f) = flow_of(family, attrs)
                    && f.key.protocol == 17
                {
                    flows.push(f);
                }
            })?;
        }
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
