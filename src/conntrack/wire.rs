//! ctnetlink messages as bytes: the few requests nftproxy sends (a filtered dump, deletes by
//! original tuple, entries created for tests and benchmarks) and a reader of dumped entries that
//! allocates nothing, so that a dump of a million entries costs a parse, not a million trees.
//! No I/O here: [`super::Conntrack`] sends and receives.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::stale::FlowKey;

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_EXCL: u16 = 0x200;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_*.
const CT_NEW: u16 = 1 << 8;
const CT_GET: u16 = (1 << 8) | 1;
const CT_DELETE: u16 = (1 << 8) | 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
/// CTA_FILTER_FLAG_CTA_*: which parts of the tuple a filter compares.
const FILTER_IP_DST: u32 = 1 << 1;
const FILTER_PROTO_NUM: u32 = 1 << 3;
const FILTER_PROTO_DST_PORT: u32 = 1 << 5;

/// IPS_SEEN_REPLY | IPS_ASSURED: what a UDP flow that got answers looks like.
pub const STATUS_SEEN_REPLY: u32 = 1 << 1;
pub const STATUS_ASSURED: u32 = 1 << 2;
const STATUS_CONFIRMED: u32 = 1 << 3;

pub fn nfproto(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { libc::AF_INET as u8 } else { libc::AF_INET6 as u8 }
}

/// Appends netlink messages to one buffer (many requests go out in one `sendmsg`).
#[derive(Debug, Default)]
pub struct Batch {
    pub buf: Vec<u8>,
    pub messages: usize,
    /// Offsets of the open message, and of the last one.
    open: Vec<usize>,
    last: usize,
}

impl Batch {
    /// Starts a ctnetlink message (header and nfgenmsg; the length is set by `end`).
    fn begin(&mut self, kind: u16, flags: u16, seq: u32, family: u8) {
        self.open.push(self.buf.len());
        self.last = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, NFNETLINK_V0, res_id 0.
        self.buf.extend_from_slice(&[family, 0, 0, 0]);
    }

    fn end(&mut self) {
        let start = self.open.pop().expect("a message was begun");
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.messages += 1;
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        self.buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        inner(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn ip(&mut self, src: Option<IpAddr>, dst: Option<IpAddr>) {
        self.nest(CTA_TUPLE_IP, |b| {
            for (ip, v4, v6) in [(src, CTA_IP_V4_SRC, CTA_IP_V6_SRC), (dst, CTA_IP_V4_DST, CTA_IP_V6_DST)] {
                match ip {
                    Some(IpAddr::V4(a)) => b.attr(v4, &a.octets()),
                    Some(IpAddr::V6(a)) => b.attr(v6, &a.octets()),
                    None => {}
                }
            }
        });
    }

    fn proto(&mut self, protocol: u8, sport: Option<u16>, dport: Option<u16>) {
        self.nest(CTA_TUPLE_PROTO, |b| {
            b.attr(CTA_PROTO_NUM, &[protocol]);
            if let Some(p) = sport {
                b.attr(CTA_PROTO_SRC_PORT, &p.to_be_bytes());
            }
            if let Some(p) = dport {
                b.attr(CTA_PROTO_DST_PORT, &p.to_be_bytes());
            }
        });
    }

    /// A dump of one family's entries of `protocol`, only those to `dst` when given: the kernel
    /// compares what CTA_FILTER names (Linux 5.8+) and sends nothing else.
    pub fn dump(&mut self, seq: u32, family: u8, protocol: u8, dst: Option<(IpAddr, u16)>) {
        self.begin(CT_GET, NLM_F_DUMP, seq, family);
        let mut flags = FILTER_PROTO_NUM;
        self.nest(CTA_TUPLE_ORIG, |b| {
            if let Some((ip, _)) = dst {
                b.ip(None, Some(ip));
            }
            b.proto(protocol, None, dst.map(|(_, port)| port));
        });
        if dst.is_some() {
            flags |= FILTER_IP_DST | FILTER_PROTO_DST_PORT;
        }
        self.nest(CTA_FILTER, |b| b.attr(CTA_FILTER_ORIG_FLAGS, &flags.to_ne_bytes()));
        self.end();
    }

    /// A dump of one family's whole table (kernels without CTA_FILTER).
    pub fn dump_all(&mut self, seq: u32, family: u8) {
        self.begin(CT_GET, NLM_F_DUMP, seq, family);
        self.end();
    }

    /// Deletes the entry of this original tuple (the CTA_TUPLE_ORIG attribute as dumped, and its
    /// CTA_ZONE if it had one). Only a failure is answered (see [`Batch::ack_last`]).
    pub fn delete(&mut self, seq: u32, family: u8, orig: &[u8], zone: Option<&[u8]>) {
        self.begin(CT_DELETE, 0, seq, family);
        self.buf.extend_from_slice(orig);
        self.pad();
        if let Some(z) = zone {
            self.buf.extend_from_slice(z);
            self.pad();
        }
        self.end();
    }

    /// Creates an entry (for tests and benchmarks: a flow nobody sent). `reply` is the reply
    /// tuple's source, which makes it a DNATed flow when it differs from `dst`.
    pub fn create(&mut self, seq: u32, e: &NewEntry) {
        let (client, cport) = e.client;
        let (dst, dport) = e.dst;
        let (reply, rport) = e.reply;
        self.begin(CT_NEW, NLM_F_CREATE | NLM_F_EXCL, seq, nfproto(&dst));
        self.nest(CTA_TUPLE_ORIG, |b| {
            b.ip(Some(client), Some(dst));
            b.proto(e.protocol, Some(cport), Some(dport));
        });
        self.nest(CTA_TUPLE_REPLY, |b| {
            b.ip(Some(reply), Some(client));
            b.proto(e.protocol, Some(rport), Some(cport));
        });
        // The kernel marks a created entry confirmed and refuses a status that says otherwise.
        self.attr(CTA_STATUS, &(e.status | STATUS_CONFIRMED).to_be_bytes());
        self.attr(CTA_TIMEOUT, &e.timeout_secs.to_be_bytes());
        self.end();
    }

    /// Asks for an answer to the last message even when it succeeds.
    pub fn ack_last(&mut self) {
        if self.messages > 0 {
            let flags = &mut self.buf[self.last + 6..self.last + 8];
            let f = u16::from_ne_bytes([flags[0], flags[1]]) | NLM_F_ACK;
            flags.copy_from_slice(&f.to_ne_bytes());
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.messages = 0;
    }
}

/// A conntrack entry to create: `client` -> `dst`, answered by `reply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewEntry {
    pub protocol: u8,
    pub client: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub reply: (IpAddr, u16),
    pub status: u32,
    pub timeout_secs: u32,
}

/// Netlink attributes: (type without flags, payload, the whole attribute).
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let whole = &b[..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, &whole[4..], whole))
    })
}

/// One message of a netlink answer: (type, flags, sequence, payload after the header).
pub fn messages(mut b: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        let payload = &b[NLMSG_HDRLEN..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, flags, seq, payload))
    })
}

/// The errno of an NLMSG_ERROR payload (0: an ACK).
pub fn error_code(payload: &[u8]) -> i32 {
    payload.get(..4).map_or(-libc::EBADMSG, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// One dumped entry, borrowed from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub family: u8,
    pub key: FlowKey,
    pub client: (IpAddr, u16),
    pub status: u32,
    pub tcp_state: Option<u8>,
    /// The CTA_TUPLE_ORIG attribute as the kernel sent it: what a delete names.
    pub orig: &'a [u8],
    pub zone: Option<&'a [u8]>,
}

/// (source, destination, source port, destination port, protocol) of a tuple attribute.
fn tuple(payload: &[u8]) -> Option<(IpAddr, IpAddr, u16, u16, u8)> {
    let (mut src, mut dst, mut sport, mut dport, mut proto) = (None, None, 0, 0, 0);
    for (kind, p, _) in attrs(payload) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, a, _) in attrs(p) {
                    let ip = match (k, a.len()) {
                        (CTA_IP_V4_SRC | CTA_IP_V4_DST, 4) => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
                        (CTA_IP_V6_SRC | CTA_IP_V6_DST, 16) => {
                            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?))
                        }
                        _ => continue,
                    };
                    if matches!(k, CTA_IP_V4_SRC | CTA_IP_V6_SRC) {
                        src = Some(ip);
                    } else {
                        dst = Some(ip);
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, a, _) in attrs(p) {
                    match (k, a) {
                        (CTA_PROTO_NUM, [n, ..]) => proto = *n,
                        (CTA_PROTO_SRC_PORT, [h, l, ..]) => sport = u16::from_be_bytes([*h, *l]),
                        (CTA_PROTO_DST_PORT, [h, l, ..]) => dport = u16::from_be_bytes([*h, *l]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((src?, dst?, sport, dport, proto))
}

/// Reads a ctnetlink entry message's payload (nfgenmsg and attributes); `None` if it lacks a
/// tuple.
pub fn entry(payload: &[u8]) -> Option<Entry<'_>> {
    let family = *payload.first()?;
    let (mut orig, mut reply, mut zone, mut status, mut tcp_state) = (None, None, None, 0, None);
    for (kind, p, whole) in attrs(payload.get(4..)?) {
        match kind {
            CTA_TUPLE_ORIG => orig = Some((p, whole)),
            CTA_TUPLE_REPLY => reply = Some(p),
            CTA_ZONE => zone = Some(whole),
            CTA_STATUS if p.len() >= 4 => status = u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
            CTA_PROTOINFO => {
                let tcp = attrs(p).find(|(k, _, _)| *k == CTA_PROTOINFO_TCP);
                tcp_state = tcp.and_then(|(_, t, _)| {
                    attrs(t).find(|(k, _, _)| *k == CTA_PROTOINFO_TCP_STATE).and_then(|(_, s, _)| s.first().copied())
                });
            }
            _ => {}
        }
    }
    let (orig_payload, orig) = orig?;
    let (client, orig_dst, sport, orig_dport, protocol) = tuple(orig_payload)?;
    let (reply_src, _, reply_sport, _, _) = tuple(reply?)?;
    Some(Entry {
        family,
        key: FlowKey { protocol, orig_dst, orig_dport, reply_src, reply_sport },
        client: (client, sport),
        status,
        tcp_state,
        orig,
        zone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Header words are host-endian; these vectors are for little-endian hosts (x86_64, aarch64).
    #[test]
    #[cfg(target_endian = "little")]
    fn a_filtered_dump_asks_for_protocol_destination_address_and_port() {
        let mut b = Batch::default();
        b.dump(7, 2, 17, Some(("10.96.0.53".parse().unwrap(), 53)));
        let want = concat!(
            "44000000", "0101", "0103", "07000000", "00000000", // nlmsghdr: GET, REQUEST|DUMP
            "02000000", // nfgenmsg: AF_INET
            "24000180", // CTA_TUPLE_ORIG (nested)
            "0c000180", "08000200", "0a600035", // CTA_TUPLE_IP { V4_DST 10.96.0.53 }
            "14000280", "05000100", "11000000", "06000300", "00350000", // PROTO { NUM 17, DST_PORT 53 }
            "0c001980", "08000100", "2a000000", // CTA_FILTER { ORIG_FLAGS IP_DST|PROTO_NUM|DST_PORT }
        );
        assert_eq!(hex(&b.buf), want);
        assert_eq!(b.messages, 1);
        // Every destination: the protocol alone.
        let mut any = Batch::default();
        any.dump(1, 10, 17, None);
        let want = concat!(
            "30000000", "0101", "0103", "01000000", "00000000", "0a000000", "10000180", "0c000280", "05000100",
            "11000000", // ORIG { PROTO { NUM 17 } }
            "0c001980", "08000100", "08000000", // CTA_FILTER { ORIG_FLAGS PROTO_NUM }
        );
        assert_eq!(hex(&any.buf), want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn a_delete_repeats_the_dumped_original_tuple_and_zone() {
        let orig = [8u8, 0, 1, 0x80, 1, 2, 3, 4];
        let zone = [6u8, 0, 18, 0, 0, 5];
        let mut b = Batch::default();
        b.delete(9, 2, &orig, Some(&zone));
        b.delete(10, 10, &orig, None);
        b.ack_last();
        let want = concat!(
            "24000000", "0201", "0100", "09000000", "00000000", "02000000", // DELETE, REQUEST
            "08000180", "01020304", "06001200", "00050000", // the tuple as given, CTA_ZONE padded
            "1c000000", "0201", "0500", "0a000000", "00000000", "0a000000", "08000180",
            "01020304", // the last asks for an ACK
        );
        assert_eq!(hex(&b.buf), want);
        assert_eq!(b.messages, 2);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn a_created_entry_has_both_tuples_status_and_timeout() {
        let mut b = Batch::default();
        b.create(
            3,
            &NewEntry {
                protocol: 17,
                client: ("10.1.0.1".parse().unwrap(), 1024),
                dst: ("10.96.0.53".parse().unwrap(), 53),
                reply: ("10.244.1.2".parse().unwrap(), 5353),
                status: STATUS_SEEN_REPLY,
                timeout_secs: 600,
            },
        );
        let want = concat!(
            "8c000000", "0001", "0106", "03000000", "00000000", "02000000", // NEW, REQUEST|EXCL|CREATE
            "34000180", "14000180", "08000100", "0a010001", "08000200", "0a600035", // ORIG ip
            "1c000280", "05000100", "11000000", "06000200", "04000000", "06000300", "00350000", "34000280", "14000180",
            "08000100", "0af40102", "08000200", "0a010001", // REPLY ip
            "1c000280", "05000100", "11000000", "06000200", "14e90000", "06000300", "04000000", "08000300", "0000000a",
            "08000700", "00000258", // STATUS SEEN_REPLY|CONFIRMED, TIMEOUT
        );
        assert_eq!(hex(&b.buf), want);
    }

    #[test]
    fn a_dumped_entry_is_read_without_copying_its_tuple() {
        // What the kernel sends for a DNATed UDP flow: the created message's attributes are
        // the same shape, so read one back.
        let mut b = Batch::default();
        let e = NewEntry {
            protocol: 17,
            client: ("fd00::1".parse().unwrap(), 40000),
            dst: ("fd00:96::53".parse().unwrap(), 53),
            reply: ("fd00:244::2".parse().unwrap(), 5353),
            status: STATUS_SEEN_REPLY | STATUS_ASSURED,
            timeout_secs: 30,
        };
        b.create(1, &e);
        let (kind, _, seq, payload) = messages(&b.buf).next().unwrap();
        assert_eq!((kind, seq), (CT_NEW, 1));
        let got = entry(payload).unwrap();
        assert_eq!(got.family, libc::AF_INET6 as u8);
        assert_eq!(
            got.key,
            FlowKey { protocol: 17, orig_dst: e.dst.0, orig_dport: 53, reply_src: e.reply.0, reply_sport: 5353 }
        );
        assert_eq!(got.client, e.client);
        assert_eq!(got.status, STATUS_SEEN_REPLY | STATUS_ASSURED | STATUS_CONFIRMED);
        assert_eq!(got.zone, None);
        // The original tuple attribute, as a delete will repeat it.
        assert_eq!(attrs(&payload[4..]).next().unwrap().2, got.orig);
        assert!(entry(&payload[..20]).is_none(), "a truncated message is no entry");
    }
}
