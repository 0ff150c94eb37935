//! The nf_tables event monitor: a NETLINK_NETFILTER socket in the NFNLGRP_NFTABLES group. Every
//! commit by anyone announces each object it changed (each message names its table) and ends
//! with NFT_MSG_NEWGEN, which carries the generation it produced and who committed. The monitor
//! turns that stream into [`Commit`]s (generation, whether it was ours, which of our tables it
//! touched); the engine decides what to read back. A full socket buffer (ENOBUFS) is reported
//! as lost events: the engine then reads everything back.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_NETFILTER;

use super::consts::*;
use super::{attr_str, attributes, family_of, gen_id, messages, sys};
use crate::kernel::{Commit, Commits};
use crate::ruleset::shard_of_table;

/// How long [`Monitor::take`] waits for the end of a commit the generation already shows.
const WAIT_FOR_COMMIT: Duration = Duration::from_millis(50);
/// The receive buffer: room for a burst of other programs' commits between two syncs.
const RECEIVE_BUFFER: usize = 4 << 20;

pub struct Monitor {
    sock: Socket,
    /// The port id of our own nf_tables socket: events it caused are ours.
    ours: u32,
    buf: Vec<u64>,
    /// The tables named by events of the commit in progress (before its NEWGEN).
    pending: BTreeSet<u32>,
    commits: Vec<Commit>,
    lost: bool,
    /// Not in the group right now (during our own commits), or re-joining it failed.
    paused: bool,
}

impl Monitor {
    /// Joins the nf_tables event group; `ours` is the port id of the socket we commit with.
    pub fn open(ours: u32) -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.set_non_blocking(true)?;
        sys::force_buffer(sock.as_raw_fd(), libc::SO_RCVBUFFORCE, RECEIVE_BUFFER)?;
        sock.add_membership(NFNLGRP_NFTABLES)?;
        Ok(Monitor {
            sock,
            ours,
            buf: vec![0u64; 16 * 1024],
            pending: BTreeSet::new(),
            commits: Vec::new(),
            lost: false,
            paused: false,
        })
    }

    /// Leaves the group (around our own commits). Commits by others meanwhile go unseen, which
    /// the engine notices as generations no event accounts for.
    pub fn pause(&mut self) {
        self.drain();
        if self.sock.drop_membership(NFNLGRP_NFTABLES).is_ok() {
            self.paused = true;
        }
    }

    /// Joins the group again; on failure every later answer says events were lost.
    pub fn resume(&mut self) {
        if self.paused && self.sock.add_membership(NFNLGRP_NFTABLES).is_ok() {
            self.paused = false;
        }
    }

    /// The commits seen since the last call (see `Kernel::commits`).
    pub fn take(&mut self, upto: Option<u32>) -> Commits {
        self.resume();
        self.drain();
        if let Some(g) = upto {
            let deadline = Instant::now() + WAIT_FOR_COMMIT;
            let reached = |c: &[Commit]| c.iter().any(|c| c.generation.wrapping_sub(g) as i32 >= 0);
            while !self.lost && !reached(&self.commits) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
                self.drain();
            }
        }
        let lost = std::mem::take(&mut self.lost) || self.paused;
        Commits { lost, commits: std::mem::take(&mut self.commits) }
    }

    /// Reads everything queued, without blocking.
    fn drain(&mut self) {
        loop {
            let fd = self.sock.as_raw_fd();
            match sys::recv_nonblocking(fd, sys::as_bytes_mut(&mut self.buf)) {
                Ok(0) => return,
                Ok(n) => {
                    let bytes = sys::as_bytes_mut(&mut self.buf)[..n].to_vec();
                    self.parse(&bytes);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Some messages were dropped: the commit in progress is incomplete too.
                    self.lost = true;
                    self.pending.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading nf_tables events failed");
                    self.lost = true;
                    return;
                }
            }
        }
    }

    fn parse(&mut self, bytes: &[u8]) {
        for m in messages(bytes) {
            if m.kind >> 8 != NFNL_SUBSYS_NFTABLES {
                continue;
            }
            if m.kind & 0xff == NFT_MSG_NEWGEN {
                let portid = m.bytes.get(12..16).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                let Some(generation) = gen_id(m.bytes) else { continue };
                self.commits.push(Commit {
                    generation,
                    own: portid == self.ours && portid != 0,
                    tables: std::mem::take(&mut self.pending),
                    by: committer(m.bytes),
                });
            } else if let Some(shard) = our_table(m.bytes) {
                self.pending.insert(shard);
            }
        }
    }
}

/// The shard of ours an event names: attribute 1 is the table's name in every nf_tables object
/// message (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE,
/// NFTA_SET_ELEM_LIST_TABLE, NFTA_OBJ_TABLE, NFTA_FLOWTABLE_TABLE); ours are `inet` tables.
fn our_table(msg: &[u8]) -> Option<u32> {
    if family_of(msg) != Some(NFPROTO_INET) {
        return None;
    }
    let (_, name) = attributes(msg).find(|(k, _)| *k == 1)?;
    shard_of_table(std::str::from_utf8(attr_str(name)).ok()?)
}

/// `name[pid]` of a NEWGEN message.
fn committer(msg: &[u8]) -> String {
    let (mut name, mut pid) = (String::new(), 0);
    for (k, v) in attributes(msg) {
        match k {
            NFTA_GEN_PROC_NAME => name = String::from_utf8_lossy(attr_str(v)).into_owned(),
            NFTA_GEN_PROC_PID if v.len() == 4 => pid = u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
            _ => {}
        }
    }
    format!("{name}[{pid}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An nf_tables message as the kernel sends it: header, nfgenmsg, attributes.
    fn msg(kind: u16, family: u8, portid: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = vec![0u8; 20];
        for (k, v) in attrs {
            let len = 4 + v.len();
            m.extend((len as u16).to_ne_bytes());
            m.extend(k.to_ne_bytes());
            m.extend(*v);
            m.resize(m.len().next_multiple_of(4), 0);
        }
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        m[12..16].copy_from_slice(&portid.to_ne_bytes());
        m[16] = family;
        m
    }

    fn monitor() -> Monitor {
        Monitor {
            sock: Socket::new(NETLINK_NETFILTER).unwrap(),
            ours: 77,
            buf: Vec::new(),
            pending: BTreeSet::new(),
            commits: Vec::new(),
            lost: false,
            paused: false,
        }
    }

    #[test]
    fn events_become_commits_naming_our_tables_and_who_committed() {
        let inet = NFPROTO_INET as u8;
        let mut bytes = Vec::new();
        // A neighbour's commit: its own table, an `ip nftproxy` lookalike and a chain of ours.
        bytes.extend(msg(NFT_MSG_NEWTABLE, inet, 5, &[(1, b"neighbour\0")]));
        bytes.extend(msg(NFT_MSG_NEWCHAIN, 2, 5, &[(1, b"nftproxy\0"), (3, b"x\0")]));
        bytes.extend(msg(NFT_MSG_DELRULE, inet, 5, &[(1, b"nftproxy-3\0"), (2, b"svc4/a/b/tcp/80\0")]));
        let be = |g: u32| g.to_be_bytes();
        let (g1, g2, pid) = (be(41), be(42), 1234u32.to_be_bytes());
        bytes.extend(msg(NFT_MSG_NEWGEN, 0, 5, &[(1, &g1), (2, &pid), (3, b"nft\0")]));
        // Our own commit.
        bytes.extend(msg(NFT_MSG_NEWSETELEM, inet, 77, &[(1, b"nftproxy\0")]));
        bytes.extend(msg(NFT_MSG_NEWGEN, 0, 77, &[(1, &g2)]));
        let mut m = monitor();
        m.parse(&bytes);
        let c = m.take(None);
        assert!(!c.lost);
        assert_eq!(
            c.commits,
            [
                Commit { generation: 41, own: false, tables: [3].into(), by: "nft[1234]".into() },
                Commit { generation: 42, own: true, tables: [0].into(), by: "[0]".into() },
            ]
        );
        assert_eq!(m.take(None), Commits::default(), "taken once");
    }
}
