//! ctnetlink: dump the conntrack table and delete entries, over a plain netlink socket
//! (`netlink-sys`) with the messages of [`wire`]. What to delete is decided in [`stale`]; this
//! module only talks to the kernel.
//!
//! Dumps are streamed: each entry is read in place from the receive buffer as its message
//! arrives, so a table of a million entries never exists as a million-entry copy here. Where
//! ctnetlink can filter in the kernel (CTA_FILTER, Linux 5.8+: protocol, original destination
//! address and port) the dump asks it to; without that support the same filter is applied here.
//! Deletes go out many to one `sendmsg` while the dump goes on, on a second socket.

pub mod stale;
pub mod wire;

use std::io;
use std::net::IpAddr;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use stale::{FlowKey, UdpTargets};
use wire::{Batch, Entry, NLMSG_DONE, NLMSG_ERROR};

/// One conntrack entry: what decides its fate, and its original tuple to delete it by.
#[derive(Debug, Clone)]
pub struct Flow {
    pub key: FlowKey,
    /// The client: the original source address and port.
    pub client: Option<(IpAddr, u16)>,
    /// TCP's state (`ESTABLISHED`, `TIME_WAIT`...), else `ASSURED`, `REPLIED` or `UNREPLIED`.
    pub state: &'static str,
}

impl Flow {
    fn of(e: &Entry<'_>) -> Flow {
        let state = match e.tcp_state {
            Some(s) => TCP_STATES.get(usize::from(s)).copied().unwrap_or("UNKNOWN"),
            None if e.status & wire::STATUS_ASSURED != 0 => "ASSURED",
            None if e.status & wire::STATUS_SEEN_REPLY != 0 => "REPLIED",
            None => "UNREPLIED",
        };
        Flow { key: e.key.clone(), client: Some(e.client), state }
    }
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

/// Bytes read per `recv` (a dump's messages fill up to this).
const RECV_BUFFER: usize = 1 << 16;
/// Requests sent in one `sendmsg` (a delete is about 80 bytes): well under the default socket
/// send buffer.
const BATCH_BYTES: usize = 96 << 10;
/// Up to this many destinations of one family are dumped one by one, each filtered in the
/// kernel; above it one dump of every UDP entry is cheaper (each dump walks the whole table).
const FILTERED_DUMPS_MAX: usize = 16;

/// One netlink socket, its sequence numbers and its receive buffer.
struct Link {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Link {
    fn open() -> io::Result<Link> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Answers that do not repeat the request, and room for a batch's worth of them.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_rx_buf_sz(4usize << 20);
        Ok(Link { sock, seq: 0, buf: vec![0; RECV_BUFFER] })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let n = self.sock.send(bytes, 0)?;
        if n == bytes.len() {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, format!("sent {n} of {} bytes", bytes.len())))
        }
    }

    /// Sends the dump request `req` (sequence `seq`) and hands every entry to `each` as it arrives.
    fn dump(&mut self, req: &Batch, seq: u32, mut each: impl FnMut(Entry<'_>)) -> io::Result<()> {
        self.send(&req.buf)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for (kind, _, s, payload) in wire::messages(&self.buf[..n]) {
                if s != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE | NLMSG_ERROR => {
                        // DONE may carry the dump's error; ERROR always has a code (0: none).
                        let code = payload.get(..4).map_or(0, |_| wire::error_code(payload));
                        return if code < 0 { Err(io::Error::from_raw_os_error(-code)) } else { Ok(()) };
                    }
                    _ => {
                        if let Some(e) = wire::entry(payload) {
                            each(e);
                        }
                    }
                }
            }
        }
    }

    /// Streams one family's entries that `filter` matches to `each`. The kernel filters where it
    /// can (CTA_FILTER); a kernel without it is asked for everything and the filter is applied
    /// here.
    fn each_entry(&mut self, family: u8, filter: Filter, mut each: impl FnMut(Entry<'_>)) -> io::Result<()> {
        let mut handle = |e: Entry<'_>| {
            if filter.matches(&e.key) {
                each(e);
            }
        };
        let mut req = Batch::default();
        let seq = self.next_seq();
        req.dump(seq, family, filter.protocol, filter.dst);
        match self.dump(&req, seq, &mut handle) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                req.clear();
                let seq = self.next_seq();
                req.dump_all(seq, family);
                self.dump(&req, seq, &mut handle)
            }
            other => other,
        }
    }
}

/// How a run of batched requests went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Requests the kernel carried out.
    pub done: usize,
    /// Requests whose entry was not there (a delete: ENOENT) or already was (a create: EEXIST).
    pub moot: usize,
    /// Requests that failed otherwise.
    pub failed: usize,
    /// Some answers were lost (the receive buffer overflowed): `done` may count a few too many.
    pub answers_lost: bool,
}

/// Requests batched many to one `sendmsg`. Only failures are answered, and the last request of
/// each batch asks for an ACK; the kernel handles a batch before `sendmsg` returns, so its
/// answers are all queued by then and are read without waiting.
struct Batched {
    link: Link,
    batch: Batch,
    first: u32,
    /// At most this many requests per batch: their error answers fit the receive buffer.
    max_messages: usize,
    outcome: Outcome,
    error: Option<io::Error>,
}

impl Batched {
    fn open() -> io::Result<Batched> {
        let link = Link::open()?;
        // An error answer costs about 1 KiB of receive buffer (its socket buffer's true size).
        let max_messages = (link.sock.get_rx_buf_sz().unwrap_or(212_992) / 1024).clamp(16, 4096);
        Ok(Batched { link, batch: Batch::default(), first: 0, max_messages, outcome: Outcome::default(), error: None })
    }

    fn push(&mut self, add: impl FnOnce(&mut Batch, u32)) -> io::Result<()> {
        let seq = self.link.next_seq();
        if self.batch.messages == 0 {
            self.first = seq;
        }
        add(&mut self.batch, seq);
        if self.batch.buf.len() >= BATCH_BYTES || self.batch.messages >= self.max_messages {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.batch.messages == 0 {
            return Ok(());
        }
        self.batch.ack_last();
        self.link.send(&self.batch.buf)?;
        let (first, last, sent) = (self.first, self.link.seq, self.batch.messages);
        self.batch.clear();
        let (mut moot, mut failed, mut acked) = (0, 0, false);
        while !acked {
            let n = match self.link.sock.recv(&mut &mut self.link.buf[..], libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.outcome.answers_lost = true;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.outcome.answers_lost = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            for (kind, _, seq, payload) in wire::messages(&self.link.buf[..n]) {
                if kind != NLMSG_ERROR || seq.wrapping_sub(first) > last.wrapping_sub(first) {
                    continue;
                }
                acked |= seq == last;
                match -wire::error_code(payload) {
                    0 => {}
                    libc::ENOENT | libc::EEXIST => moot += 1,
                    code => {
                        failed += 1;
                        self.error.get_or_insert_with(|| io::Error::from_raw_os_error(code));
                    }
                }
            }
        }
        self.outcome.done += sent - moot - failed;
        self.outcome.moot += moot;
        self.outcome.failed += failed;
        Ok(())
    }
}

/// What a stale-UDP cleanup did.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Entries the kernel sent (after its filter) and that were examined here.
    pub examined: usize,
    /// Entries deleted.
    pub deleted: usize,
    /// Stale entries that ended on their own before their delete.
    pub gone: usize,
    /// Deletes that failed, and the first failure.
    pub failed: usize,
    pub error: Option<io::Error>,
    pub answers_lost: bool,
}

pub struct Conntrack {
    dumps: Link,
    requests: Option<Batched>,
}

impl Conntrack {
    pub fn open() -> io::Result<Self> {
        Ok(Conntrack { dumps: Link::open()?, requests: None })
    }

    fn requests(&mut self) -> io::Result<&mut Batched> {
        if self.requests.is_none() {
            self.requests = Some(Batched::open()?);
        }
        Ok(self.requests.as_mut().expect("just opened"))
    }

    /// Streams the entries of both families (of `family` only, when given) that `filter`
    /// matches to `each`, as the dump arrives.
    pub fn each_flow(
        &mut self,
        only: Option<crate::model::Family>,
        filter: Filter,
        mut each: impl FnMut(Flow),
    ) -> io::Result<()> {
        for fam in [crate::model::Family::V4, crate::model::Family::V6] {
            if only.is_none_or(|f| f == fam) {
                self.dumps.each_entry(family_number(fam), filter, |e| each(Flow::of(&e)))?;
            }
        }
        Ok(())
    }

    /// Deletes the UDP entries `targets` calls stale, streaming: the kernel sends only the
    /// entries to the targets' addresses (every UDP entry when there are many targets), and the
    /// stale ones are deleted in batches, on a second socket, while the dump goes on. Memory
    /// stays that of one receive buffer and one batch, however big the table.
    pub fn clean_udp(&mut self, targets: &UdpTargets) -> io::Result<Cleanup> {
        let mut examined = 0;
        self.requests()?;
        let Conntrack { dumps, requests } = self;
        let requests = requests.as_mut().expect("opened above");
        for fam in [crate::model::Family::V4, crate::model::Family::V6] {
            let dsts = targets.0.keys().filter(|(ip, _)| crate::model::Family::of(ip) == fam);
            let filters: Vec<Filter> = match dsts.clone().count() {
                0 => continue,
                n if n <= FILTERED_DUMPS_MAX => dsts.map(|dst| Filter { protocol: UDP, dst: Some(*dst) }).collect(),
                _ => vec![Filter { protocol: UDP, dst: None }],
            };
            for filter in filters {
                let mut pushed = Ok(());
                dumps.each_entry(family_number(fam), filter, |e| {
                    examined += 1;
                    if pushed.is_ok() && targets.is_stale(&e.key) {
                        pushed = requests.push(|b, seq| b.delete(seq, e.family, e.orig, e.zone));
                    }
                })?;
                pushed?;
            }
        }
        requests.flush()?;
        let o = std::mem::take(&mut requests.outcome);
        Ok(Cleanup {
            examined,
            deleted: o.done,
            gone: o.moot,
            failed: o.failed,
            error: requests.error.take(),
            answers_lost: o.answers_lost,
        })
    }

    /// Creates entries, many per `sendmsg`: for tests and benchmarks, which need a table of
    /// flows nobody sent. Entries that already exist are left as they are (`moot`).
    pub fn create(&mut self, entries: impl IntoIterator<Item = wire::NewEntry>) -> io::Result<Outcome> {
        let requests = self.requests()?;
        for e in entries {
            requests.push(|b, seq| b.create(seq, &e))?;
        }
        requests.flush()?;
        if let Some(e) = requests.error.take() {
            return Err(e);
        }
        Ok(std::mem::take(&mut requests.outcome))
    }
}

const UDP: u8 = 17;

fn family_number(f: crate::model::Family) -> u8 {
    match f {
        crate::model::Family::V4 => libc::AF_INET as u8,
        crate::model::Family::V6 => libc::AF_INET6 as u8,
    }
}
