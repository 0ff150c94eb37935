//! nf_tables over netlink: apply a [`Plan`] as one transaction, read our table back.
//!
//! Traps handled here (see shared notes): the whole batch goes out in one `sendmsg` with the
//! send buffer grown to fit (a batch split across calls is rejected whole); no per-message ACKs
//! (thousands of them overflow the receive buffer), errors still come back; the kernel processes
//! the batch inside `sendmsg`, so every answer is queued when it returns and is drained without
//! blocking; each error carries the sequence number of the message that caused it, mapped back
//! to the object (and so the Service) it was about.

pub mod consts;
pub mod decode;
pub mod encode;
pub mod expr;
pub mod monitor;
mod sys;

pub use sys::{limit_heap_arenas, release_free_heap};

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use consts::*;

use crate::plan::{KernelChain, KernelSet, KernelState, Plan, SetExtras};
use crate::ruleset::{
    BaseChain, Element, Hook, Rule, Ruleset, SetKind, SetShape, TABLE, qualify, shard_of_table, shard_table, split_name,
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot open a netfilter netlink socket (nftproxy needs CAP_NET_ADMIN): {0}")]
    Open(#[source] io::Error),
    #[error("sending the nftables transaction failed: {0}")]
    Send(#[source] io::Error),
    #[error("reading the kernel's answer failed: {0}")]
    Receive(#[source] io::Error),
    #[error("the kernel rejected the transaction at {what}: {source}{}; nothing was changed", if *.others > 0 { format!(" (and {} more errors)", .others) } else { String::new() })]
    Rejected {
        what: String,
        #[source]
        source: io::Error,
        others: usize,
    },
    #[error("reading table {TABLE} back failed at {what}: {source}")]
    ReadBack {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = NftError> = std::result::Result<T, E>;

/// What [`Netlink::read_ruleset`] found.
#[derive(Debug, Default)]
pub struct ReadRuleset {
    pub ruleset: Ruleset,
    /// What in our tables is not ours, in words.
    pub unknown: Vec<String>,
}

/// One received netlink message.
struct NlMsg<'a> {
    kind: u16,
    seq: u32,
    bytes: &'a [u8],
}

fn messages(mut buf: &[u8]) -> impl Iterator<Item = NlMsg<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if len < 16 || len > buf.len() {
            return None;
        }
        let msg = NlMsg {
            kind: u16::from_ne_bytes(buf[4..6].try_into().unwrap()),
            seq: u32::from_ne_bytes(buf[8..12].try_into().unwrap()),
            bytes: &buf[..len],
        };
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some(msg)
    })
}

/// errno (positive) and the sequence number of the message an NLMSG_ERROR answers.
fn error_of(msg: &NlMsg<'_>) -> Option<(i32, u32)> {
    let b = msg.bytes;
    if b.len() < 20 {
        return None;
    }
    let errno = -i32::from_ne_bytes(b[16..20].try_into().unwrap());
    let seq = if b.len() >= 32 { u32::from_ne_bytes(b[28..32].try_into().unwrap()) } else { msg.seq };
    Some((errno, seq))
}

/// The top-level attributes of an nf_tables message (after nlmsghdr and nfgenmsg).
fn attributes(msg: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    expr::attributes(msg.get(20..).unwrap_or_default())
}

/// The address family in an nf_tables message's nfgenmsg.
fn family_of(msg: &[u8]) -> Option<u16> {
    msg.get(16).map(|f| u16::from(*f))
}

/// A NUL-terminated string attribute, without the NUL.
fn attr_str(v: &[u8]) -> &[u8] {
    v.split(|b| *b == 0).next().unwrap_or_default()
}

struct RuleSummary<'a> {
    table: &'a [u8],
    chain: &'a [u8],
    expressions: &'a [u8],
    userdata: &'a [u8],
}

/// NFTA_RULE_TABLE (1), NFTA_RULE_CHAIN (2), NFTA_RULE_EXPRESSIONS (4) and NFTA_RULE_USERDATA
/// (7) of a NEWRULE message: a plain attribute walk; the expressions are compared as bytes.
fn rule_summary(msg: &[u8]) -> Option<RuleSummary<'_>> {
    let mut r = RuleSummary { table: &[], chain: &[], expressions: &[], userdata: &[] };
    for (kind, value) in attributes(msg) {
        match kind {
            NFTA_RULE_TABLE => r.table = attr_str(value),
            NFTA_RULE_CHAIN => r.chain = attr_str(value),
            expr::NFTA_RULE_EXPRESSIONS => r.expressions = value,
            expr::NFTA_RULE_USERDATA => r.userdata = value,
            _ => {}
        }
    }
    (!r.table.is_empty()).then_some(r)
}

/// What a set carries beyond its type (NFTA_SET_DESC's size, NFTA_SET_TIMEOUT, NFTA_SET_EXPR and
/// NFTA_SET_EXPRESSIONS): we never set any of it, so any of it is someone else's.
fn set_extras(msg: &[u8]) -> SetExtras {
    let mut x = SetExtras::default();
    for (kind, value) in attributes(msg) {
        match kind {
            NFTA_SET_DESC => {
                let size = expr::attributes(value).find(|(k, v)| *k == NFTA_SET_DESC_SIZE && v.len() == 4);
                x.size = size.map_or(0, |(_, v)| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
            }
            NFTA_SET_TIMEOUT => x.timeout = true,
            NFTA_SET_EXPR | NFTA_SET_EXPRESSIONS => x.expressions = true,
            _ => {}
        }
    }
    x
}

/// (name, type) of a NEWOBJ message of `table` (NFTA_OBJ_TABLE 1, NAME 2, TYPE 3).
fn object_summary(msg: &[u8], table: &str) -> Option<(String, u32)> {
    let (mut t, mut name, mut kind) = (None, None, None);
    for (k, v) in attributes(msg) {
        match k {
            NFTA_OBJ_TABLE => t = Some(attr_str(v)),
            NFTA_OBJ_NAME => name = std::str::from_utf8(attr_str(v)).ok(),
            NFTA_OBJ_TYPE if v.len() == 4 => kind = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
            _ => {}
        }
    }
    (t? == table.as_bytes()).then(|| Some((name?.to_string(), kind?))).flatten()
}

/// NFTA_GEN_ID (attribute 1, big-endian u32) of a NEWGEN message.
fn gen_id(msg: &[u8]) -> Option<u32> {
    attributes(msg)
        .find(|(k, v)| *k == NFTA_GEN_ID && v.len() >= 4)
        .map(|(_, v)| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

/// What a commit cost, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyStats {
    pub messages: usize,
    pub bytes: usize,
    /// From sending the batch to its last ack: the kernel's share of a sync.
    pub kernel: std::time::Duration,
}

/// Plans of more messages than this give the heap's free pages back before they are encoded.
const TRIM_ABOVE_MESSAGES: usize = 10_000;

pub struct Netlink {
    sock: mnl::Socket,
    seq: u32,
    buf: Vec<u64>,
    /// A shard table with more chains than this has its rules read back one chain at a time
    /// (linear) rather than in one dump (quadratic); see [`PER_CHAIN_DUMP_ABOVE`].
    pub per_chain_dump_above: usize,
}

/// One of our tables as the table dump tells it: name, flags, use count.
type TableInfo = (String, u32, u32);

/// Chains are asked for by name (see [`Netlink::read_tables`]) when they are fewer than one
/// in this many of the inet family's: at 44,000 x 1, reading 44,000 of 88,000 chains by name
/// took 260 ms against 215 for the dump; at 5,000 x 50, 64,000 of 255,000 took 250 ms against
/// 3.9 s.
const BY_NAME_BELOW_SHARE: usize = 3;

/// Adds chains as read (anonymous ones left out by the caller) to `state`, without rules.
fn insert_chains(state: &mut KernelState, chains: Vec<(u32, sys::ParsedChain)>) {
    for (shard, c) in chains {
        let base = c.hook.map(|(hooknum, priority, kind)| {
            // A base chain we would never make (other hook or type) compares unequal.
            match Hook::from_number(hooknum) {
                Some(hook) if kind == hook.chain_type() => BaseChain { hook, priority },
                _ => BaseChain { hook: Hook::Prerouting, priority: i32::MIN },
            }
        });
        state.chains.insert(qualify(shard, &c.name), KernelChain { base, policy: c.policy, rules: Vec::new() });
    }
}

/// Where one dump per chain measured cheaper than one dump of the whole table (kernel 6.18, a
/// read-back of 4 tables by hand): at 22,000 chains of about one rule each (44,000 x 1) one
/// dump per table took 0.80 s and one per chain 1.56 s; at 64,000 chains of about two rules
/// (5,000 x 50) one per table 13.5 s and one per chain 7.8 s. The dump's cost grows with the
/// square of the rules, one per chain with the chains (a round trip each, about 18 us).
pub const PER_CHAIN_DUMP_ABOVE: usize = 32_000;

/// Overrides [`PER_CHAIN_DUMP_ABOVE`] (the benchmark compares both ways in one run; the tests
/// force the per-chain read with 0).
pub const PER_CHAIN_DUMP_ENV: &str = "NFTPROXY_PER_CHAIN_DUMP_ABOVE";

impl Netlink {
    pub fn open() -> Result<Self> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter).map_err(NftError::Open)?;
        let fd = sys::socket_fd(&sock);
        // Errors need not echo the whole offending message back.
        sys::set_netlink_opt(fd, NETLINK_CAP_ACK, 1).map_err(NftError::Open)?;
        sys::force_buffer(fd, libc::SO_RCVBUFFORCE, 8 << 20).map_err(NftError::Open)?;
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(1);
        Ok(Netlink {
            sock,
            seq: seed.wrapping_mul(16) | 1,
            buf: vec![0u64; 16 * 1024],
            per_chain_dump_above: std::env::var(PER_CHAIN_DUMP_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(PER_CHAIN_DUMP_ABOVE),
        })
    }

    fn fd(&self) -> i32 {
        sys::socket_fd(&self.sock)
    }

    /// The netlink port id of this socket: the kernel's events name it as the committer.
    pub fn portid(&self) -> u32 {
        self.sock.portid()
    }

    /// Sends a plan as one atomic transaction. On error the kernel has rolled it back entirely.
    pub fn apply(&mut self, plan: &Plan) -> Result<ApplyStats> {
        if plan.is_empty() {
            return Ok(ApplyStats::default());
        }
        // A big batch (a full sync) is allocated just after the compiled objects it replaces
        // were freed: their pages go back first. Not for small ones: malloc_trim walks the
        // whole heap, tens of ms at 44,000 Services, which one endpoint change must not pay.
        if plan.message_count() > TRIM_ABOVE_MESSAGES {
            sys::release_free_heap();
        }
        let enc = encode::encode_plan(plan, self.seq);
        self.apply_encoded(&enc, plan)
    }

    /// [`Netlink::apply`] of a plan encoded beforehand (on another thread, say): its messages
    /// may carry any sequence numbers, the acknowledgements are matched by the batch's own.
    pub fn apply_encoded(&mut self, enc: &encode::Encoded, plan: &Plan) -> Result<ApplyStats> {
        if plan.is_empty() {
            return Ok(ApplyStats::default());
        }
        self.seq = self.seq.wrapping_add(enc.messages as u32 + 2);
        let start = std::time::Instant::now();
        self.send_encoded(enc, plan)?;
        Ok(ApplyStats { messages: enc.messages, bytes: enc.bytes.len(), kernel: start.elapsed() })
    }

    /// Sends an already encoded plan (also the benchmark's kernel-only floor).
    pub fn send_encoded(&mut self, enc: &encode::Encoded, plan: &Plan) -> Result<()> {
        let describe = |seq: u32| {
            let i = enc.owners.binary_search_by_key(&seq, |o| o.seq).ok()?;
            Some(encode::describe(plan, &enc.owners[i]))
        };
        self.send_batch(&enc.bytes, &describe)
    }

    fn send_batch(&mut self, bytes: &[u8], describe: &dyn Fn(u32) -> Option<String>) -> Result<()> {
        sys::force_buffer(self.fd(), libc::SO_SNDBUFFORCE, bytes.len() + 65536).map_err(NftError::Send)?;
        let sent = self.sock.send(bytes).map_err(NftError::Send)?;
        if sent != bytes.len() {
            return Err(NftError::Send(io::Error::other(format!("sent {sent} of {} bytes", bytes.len()))));
        }
        let mut errors: Vec<(i32, u32)> = Vec::new();
        loop {
            let fd = self.fd();
            let n = sys::recv_nonblocking(fd, bytemuck_bytes(&mut self.buf)).map_err(NftError::Receive)?;
            if n == 0 {
                break;
            }
            let data = &bytemuck_bytes(&mut self.buf)[..n];
            for m in messages(data) {
                if m.kind == NLMSG_ERROR
                    && let Some((errno, seq)) = error_of(&m)
                    && errno != 0
                {
                    errors.push((errno, seq));
                }
            }
        }
        let Some(&(errno, seq)) = errors.first() else {
            return Ok(());
        };
        let mut what = describe(seq).unwrap_or_else(|| format!("message {seq}"));
        if errno == libc::EPERM {
            what.push_str(
                " (our tables are owned by another process: `nft list tables` names it after \"# progname\"; \
                 an nftproxy agent running with --own-tables must be stopped first)",
            );
        }
        Err(NftError::Rejected { what, source: io::Error::from_raw_os_error(errno), others: errors.len() - 1 })
    }

    /// Sends one request and collects the answers up to DONE (dumps) or the ACK/error.
    fn request(&mut self, what: &'static str, build: impl FnOnce(&mut sys::MsgBuf) -> u32) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        self.request_each(what, build, |m| out.push(m.to_vec()))?;
        Ok(out)
    }

    /// Sends one request and hands each answer to `each` as it arrives, up to DONE (dumps) or
    /// the ACK/error: a dump of any size needs one receive buffer, not a copy of the dump.
    fn request_each(
        &mut self,
        what: &'static str,
        build: impl FnOnce(&mut sys::MsgBuf) -> u32,
        mut each: impl FnMut(&[u8]),
    ) -> Result<()> {
        let mut buf = sys::MsgBuf::new(self.seq);
        let seq = build(&mut buf);
        self.seq = self.seq.wrapping_add(1);
        self.sock.send(buf.bytes()).map_err(|e| NftError::ReadBack { what, source: e })?;
        loop {
            let n = self
                .sock
                .recv_raw(bytemuck_bytes(&mut self.buf))
                .map_err(|e| NftError::ReadBack { what, source: e })?;
            for m in messages(&bytemuck_bytes(&mut self.buf)[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let (errno, _) = error_of(&m).unwrap_or((libc::EIO, seq));
                        if errno == 0 {
                            return Ok(());
                        }
                        return Err(NftError::ReadBack { what, source: io::Error::from_raw_os_error(errno) });
                    }
                    _ => each(m.bytes),
                }
            }
        }
    }

    /// Our tables that exist, with their flags and use count (the chains, sets, objects and
    /// flowtables in each): `inet nftproxy` and the `inet nftproxy-<n>` shards the shard scheme
    /// names (see `ruleset::shard_of_table`), nothing else.
    /// Also: the use counts of every inet table added up (ours and others'), about how many
    /// chains a chain dump walks.
    fn tables_with_flags(&mut self) -> Result<(Vec<TableInfo>, usize)> {
        let msgs = self.request("tables", |b| b.table(NFT_MSG_GETTABLE, NLM_F_DUMP, ""))?;
        let (mut out, mut family_use) = (Vec::new(), 0);
        for m in msgs.iter().filter(|m| family_of(m) == Some(NFPROTO_INET)) {
            let (mut name, mut flags, mut uses) = (None, 0, 0);
            for (k, v) in attributes(m) {
                let be32 = || v.get(..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                match k {
                    NFTA_TABLE_NAME => name = std::str::from_utf8(attr_str(v)).ok(),
                    NFTA_TABLE_FLAGS => flags = be32(),
                    NFTA_TABLE_USE => uses = be32(),
                    _ => {}
                }
            }
            family_use += uses as usize;
            if let Some(name) = name.filter(|n| shard_of_table(n).is_some()) {
                out.push((name.to_string(), flags, uses));
            }
        }
        Ok((out, family_use))
    }

    /// Our tables that exist (see `tables_with_flags`).
    pub fn our_tables(&mut self) -> Result<Vec<String>> {
        Ok(self.tables_with_flags()?.0.into_iter().map(|(t, _, _)| t).collect())
    }

    /// Our chains in `tables` (anonymous chains bound to a rule left out), with their shard.
    fn our_chains(&mut self, tables: &[String]) -> Result<Vec<(u32, sys::ParsedChain)>> {
        let mut out = Vec::new();
        // The kernel does not narrow a chain dump to the table named (it does for sets, below):
        // this lists every inet chain, and ours are picked by table name.
        for msg in self.request("chains", |b| b.chain(NFT_MSG_GETCHAIN, NLM_F_DUMP, TABLE, "", None))? {
            let Some(c) = sys::parse_chain(&msg) else {
                continue;
            };
            let Some(shard) = shard_of_table(&c.table).filter(|_| tables.contains(&c.table)) else {
                continue;
            };
            // An anonymous chain (`jump { ... }`) lives and dies with the rule that binds it: the
            // rule's fingerprint is what differs, and rewriting that chain removes it.
            if c.flags & NFT_CHAIN_BINDING == 0 {
                out.push((shard, c));
            }
        }
        Ok(out)
    }

    /// Every rule of `tables`, streamed: `each(shard, rule)` as the dump arrives.
    fn each_rule(&mut self, tables: &[String], mut each: impl FnMut(u32, &RuleSummary<'_>)) -> Result<()> {
        for table in tables {
            let shard = shard_of_table(table).unwrap_or(0);
            self.request_each(
                "rules",
                |b| b.rules_dump(table),
                |msg| {
                    if let Some(r) = rule_summary(msg).filter(|r| r.table == table.as_bytes()) {
                        each(shard, &r);
                    }
                },
            )?;
        }
        Ok(())
    }

    /// The sets of `tables` with what they carry beyond their type.
    fn our_sets(&mut self, tables: &[String]) -> Result<Vec<(sys::ParsedSet, SetExtras)>> {
        // A set dump naming a table lists only that table's sets: ask each of ours.
        let mut sets = Vec::new();
        for table in tables {
            let msgs =
                self.request("sets", |b| b.set(NFT_MSG_GETSET, NLM_F_DUMP, &sys::SetObj::new(table, "", None)))?;
            sets.extend(
                msgs.iter()
                    .filter_map(|m| Some((sys::parse_set(m)?, set_extras(m))))
                    .filter(|(s, _)| &s.table == table),
            );
        }
        Ok(sets)
    }

    /// Reads everything in our tables; none gives `KernelState::default()`. Objects of shard
    /// tables come back qualified (`nftproxy-3@svc4/...`), as the compiler names them.
    pub fn read_table(&mut self) -> Result<KernelState> {
        self.read_tables(None, None)
    }

    /// Like [`Netlink::read_table`], for only those of our tables (by shard number) in `shards`.
    ///
    /// With the chains `expected` (qualified names), the chain dump is avoided: it lists every
    /// inet chain of every table, restarting its walk for each message, so it costs the square
    /// of all our chains (3.9 s at 5,000 x 50) however few tables are read. The chains are asked
    /// for by name instead: the expected ones, then any that the rules and verdict maps read
    /// point at or hold rules (a changed Service's old endpoint chains), until none is new. A
    /// table's use count (its chains, sets, objects and flowtables) then tells whether anything
    /// else is there, which only a dump can find: then a chain dump lists that table's chains,
    /// and the rules of those not read yet are read.
    pub fn read_tables(&mut self, shards: Option<&BTreeSet<u32>>, expected: Option<&[&str]>) -> Result<KernelState> {
        let (mut infos, family_use) = self.tables_with_flags()?;
        if let Some(wanted) = shards {
            infos.retain(|(t, _, _)| shard_of_table(t).is_some_and(|k| wanted.contains(&k)));
        }
        let tables: Vec<String> = infos.iter().map(|(t, _, _)| t.clone()).collect();
        let ours = |name: &str| tables.iter().any(|t| t == split_name(name).0);
        // Asking by name costs about as much per chain as a dump of twice as many: worth it
        // only when the tables read hold a small part of the family's chains.
        let expected: Option<Vec<&str>> = expected
            .map(|names| names.iter().copied().filter(|n| ours(n)).collect())
            .filter(|names: &Vec<&str>| names.len() * BY_NAME_BELOW_SHARE < family_use);
        let expected = expected.as_deref();
        let mut state = KernelState {
            table_exists: tables.iter().any(|t| t == TABLE),
            shard_tables: tables.iter().filter(|t| *t != TABLE).cloned().collect(),
            table_flags: infos.iter().filter(|(_, f, _)| *f != 0).map(|(t, f, _)| (t.clone(), *f)).collect(),
            ..Default::default()
        };
        if tables.is_empty() {
            return Ok(state);
        }
        let t0 = std::time::Instant::now();
        let chains = match expected {
            Some(names) => self.chains_by_name(names)?,
            None => self.our_chains(&tables)?,
        };
        insert_chains(&mut state, chains);
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, chains = state.chains.len(), "chains read");
        let t0 = std::time::Instant::now();
        // Chains the rules and maps read point at or hold rules in (only looked for when the
        // chains were asked for by name).
        let mut seen = expected.map(|_| BTreeSet::new());
        let mut chains_per_table: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for name in state.chains.keys() {
            chains_per_table.entry(split_name(name).0.to_string()).or_default().push(name.clone());
        }
        for table in &tables {
            match chains_per_table.remove(table.as_str()) {
                Some(chains) if chains.len() > self.per_chain_dump_above => {
                    self.read_rules_by_chain(table, &chains, &mut state, seen.as_mut())?
                }
                _ => {
                    let chains = &mut state.chains;
                    let mut seen = seen.as_mut();
                    self.each_rule(std::slice::from_ref(table), |shard, r| {
                        let Ok(chain) = std::str::from_utf8(r.chain).map(|c| qualify(shard, c)) else { return };
                        if let Some(seen) = seen.as_deref_mut() {
                            let targets = decode::verdict_chains(r.expressions).map(|c| qualify(shard, c));
                            seen.extend(targets.filter(|c| !chains.contains_key(c)));
                        }
                        if let Some(known) = chains.get_mut(&chain) {
                            known.rules.push(expr::fingerprint(r.expressions, r.userdata));
                        } else if let Some(seen) = seen.as_deref_mut() {
                            seen.insert(chain);
                        }
                    })?
                }
            }
        }
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "rules read");
        let t0 = std::time::Instant::now();
        for (s, extras) in self.our_sets(&tables)? {
            let shard = shard_of_table(&s.table).unwrap_or(0);
            // Dynamic sets (session affinity) are filled by the data path: not ours to read.
            let elements =
                if s.flags & NFT_SET_TIMEOUT != 0 { Vec::new() } else { self.set_elements(&s.table, &s.name)? };
            if let Some(seen) = seen.as_mut() {
                seen.extend(elements.iter().filter_map(|e| e.goto.clone()).filter(|c| !state.chains.contains_key(c)));
            }
            let shape = SetShape { key_type: s.key_type, key_len: s.key_len, flags: s.flags, data_type: s.data_type };
            state.sets.insert(qualify(shard, &s.name), KernelSet { shape, extras, elements });
        }
        for table in &tables {
            let shard = shard_of_table(table).unwrap_or(0);
            let dump = |b: &mut sys::MsgBuf| b.raw(NFT_MSG_GETOBJ, NLM_F_DUMP, |m| expr::Attrs(m).str(1, table));
            for msg in self.request("objects", dump)? {
                if let Some((name, kind)) = object_summary(&msg, table) {
                    state.objects.insert(qualify(shard, &name), kind);
                }
            }
        }
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "sets and objects read");
        let Some(mut seen) = seen else { return Ok(state) };
        // The chains pointed at that were not expected, then the ones their rules point at.
        loop {
            let new: Vec<&str> =
                seen.iter().map(String::as_str).filter(|n| ours(n) && !state.chains.contains_key(*n)).collect();
            if new.is_empty() {
                break;
            }
            let found = self.chains_by_name(&new)?;
            seen.clear();
            if found.is_empty() {
                break;
            }
            self.add_chains_with_rules(&mut state, found, Some(&mut seen))?;
        }
        let held = |t: &str| {
            let in_t = |n: &&String| split_name(n).0 == t;
            state.chains.keys().filter(in_t).count()
                + state.sets.keys().filter(in_t).count()
                + state.objects.keys().filter(in_t).count()
        };
        let short: Vec<(&str, usize, u32)> = infos
            .iter()
            .map(|(t, _, uses)| (t.as_str(), held(t), *uses))
            .filter(|(_, held, uses)| *held != *uses as usize)
            .collect();
        if short.is_empty() {
            return Ok(state);
        }
        // Only chains can be missing (sets and objects were dumped): a chain dump finds them,
        // and only their rules are read.
        tracing::debug!(tables = ?short, "tables (found, use count) hold what no rule or map names: listing their chains");
        let short: Vec<String> = short.into_iter().map(|(t, _, _)| t.to_string()).collect();
        let missing: Vec<_> = self
            .our_chains(&short)?
            .into_iter()
            .filter(|(k, c)| !state.chains.contains_key(&qualify(*k, &c.name)))
            .collect();
        self.add_chains_with_rules(&mut state, missing, None)?;
        Ok(state)
    }

    /// Adds `chains` (as read, without rules) to `state` and reads their rules, one dump per
    /// chain; with `seen`, as [`Netlink::read_rules_by_chain`] does.
    fn add_chains_with_rules(
        &mut self,
        state: &mut KernelState,
        chains: Vec<(u32, sys::ParsedChain)>,
        mut seen: Option<&mut BTreeSet<String>>,
    ) -> Result<()> {
        let mut per_table: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (shard, c) in &chains {
            per_table.entry(c.table.clone()).or_default().push(qualify(*shard, &c.name));
        }
        insert_chains(state, chains);
        for (table, names) in per_table {
            self.read_rules_by_chain(&table, &names, state, seen.as_deref_mut())?;
        }
        Ok(())
    }

    /// The chains `names` (qualified, in our tables) that exist, asked for by name: a thousand
    /// requests per message, each answered by the chain or ENOENT.
    fn chains_by_name(&mut self, names: &[&str]) -> Result<Vec<(u32, sys::ParsedChain)>> {
        let what = "chains";
        let wanted: Vec<(&str, &str)> = names.iter().map(|n| split_name(n)).collect();
        let mut out = Vec::new();
        for batch in wanted.chunks(1024) {
            let first = self.seq;
            let mut buf = sys::MsgBuf::new(first);
            for (table, chain) in batch {
                buf.chain(NFT_MSG_GETCHAIN, 0, table, chain, None);
            }
            self.seq = self.seq.wrapping_add(batch.len() as u32);
            self.sock.send(buf.bytes()).map_err(|e| NftError::ReadBack { what, source: e })?;
            let mut answered = 0;
            while answered < batch.len() {
                let n = self
                    .sock
                    .recv_raw(bytemuck_bytes(&mut self.buf))
                    .map_err(|e| NftError::ReadBack { what, source: e })?;
                for m in messages(&bytemuck_bytes(&mut self.buf)[..n]) {
                    if m.seq.wrapping_sub(first) as usize >= batch.len() {
                        continue;
                    }
                    answered += 1;
                    if m.kind == NLMSG_ERROR {
                        match error_of(&m).map_or(libc::EIO, |(errno, _)| errno) {
                            0 | libc::ENOENT => continue,
                            errno => {
                                return Err(NftError::ReadBack { what, source: io::Error::from_raw_os_error(errno) });
                            }
                        }
                    }
                    let Some(c) = sys::parse_chain(m.bytes) else { continue };
                    if let Some(shard) = shard_of_table(&c.table).filter(|_| c.flags & NFT_CHAIN_BINDING == 0) {
                        out.push((shard, c));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Our tables as a [`Ruleset`] of our own statements, decoded from the kernel's bytes (see
    /// `decode`), with the affinity sets' clients: what `nftproxy trace` walks. What does not
    /// decode (a rule or set someone else wrote) is left out and named in `unknown`.
    /// Without `rules`, only the chains and sets (what `nftproxy flows` needs: one quick dump
    /// per set instead of every rule).
    pub fn read_ruleset(&mut self, rules: bool) -> Result<ReadRuleset> {
        let tables = self.our_tables()?;
        let mut out = ReadRuleset::default();
        let with_rules = rules;
        // Per chain: the rules that decode, and how many rules the chain has in all.
        let mut rules: std::collections::BTreeMap<String, (Vec<Rule>, usize)> = Default::default();
        for (shard, c) in self.our_chains(&tables)? {
            let base = c
                .hook
                .and_then(|(hooknum, priority, _)| Some(BaseChain { hook: Hook::from_number(hooknum)?, priority }));
            let name = qualify(shard, &c.name);
            out.ruleset.chains.insert(name.clone(), crate::ruleset::Chain { base, rules: Vec::new().into() });
            rules.insert(name, (Vec::new(), 0));
        }
        let unknown = &mut out.unknown;
        let read = if with_rules { &tables[..] } else { &[] };
        self.each_rule(read, |shard, r| {
            let chain = String::from_utf8_lossy(r.chain);
            let Some((list, seen)) = rules.get_mut(&qualify(shard, &chain)) else { return };
            *seen += 1;
            let comment = decode::comment(r.userdata).unwrap_or_default();
            match decode::decode_expressions(r.expressions, &|n| qualify(shard, n)) {
                Some(stmts) => list.push(Rule::new(&std::sync::Arc::from(comment), stmts)),
                None => unknown.push(format!(
                    "rule {seen} of chain {chain} in table {} (comment {comment:?}) is not one nftproxy writes; ignored",
                    shard_table(shard)
                )),
            }
        })?;
        for (name, (list, _)) in rules {
            if let Some(c) = out.ruleset.chains.get_mut(&name) {
                c.rules = list.into();
            }
        }
        for (s, _) in self.our_sets(&tables)? {
            let shard = shard_of_table(&s.table).unwrap_or(0);
            let shape = SetShape { key_type: s.key_type, key_len: s.key_len, flags: s.flags, data_type: s.data_type };
            let Some(kind) = SetKind::of_shape(shape) else {
                out.unknown
                    .push(format!("set {} in table {} has a type nftproxy never makes; ignored", s.name, s.table));
                continue;
            };
            let elements = self.set_elements(&s.table, &s.name)?;
            out.ruleset.sets.insert(qualify(shard, &s.name), crate::ruleset::Set { kind, elements });
        }
        Ok(out)
    }

    /// The new connections each endpoint chain (`ep4/...`, `ep6/...`) has counted: (table,
    /// chain, packets), read from one streamed rule dump per table.
    pub fn endpoint_counters(&mut self) -> Result<Vec<(u32, String, u64)>> {
        let tables = self.our_tables()?;
        self.endpoint_counters_in(&tables)
    }

    /// [`Netlink::endpoint_counters`] of some of our tables (a scrape reads halves in parallel).
    pub fn endpoint_counters_in(&mut self, tables: &[String]) -> Result<Vec<(u32, String, u64)>> {
        let mut out = Vec::new();
        self.each_rule(tables, |shard, r| {
            if (r.chain.starts_with(b"ep4/") || r.chain.starts_with(b"ep6/"))
                && let Some(packets) = decode::counter_packets(r.expressions)
            {
                out.push((shard, String::from_utf8_lossy(r.chain).into_owned(), packets));
            }
        })?;
        Ok(out)
    }

    /// Reads the rules of `chains` (qualified) of `table` in `state` with one dump per chain: a
    /// round trip per chain (about 8 us here), but linear in the table's size. A chain that went
    /// away since it was read is left out, as if it had not been seen. With `seen`, the chains
    /// their rules jump or go to that `state` does not hold yet are added there.
    fn read_rules_by_chain(
        &mut self,
        table: &str,
        chains: &[String],
        state: &mut KernelState,
        mut seen: Option<&mut BTreeSet<String>>,
    ) -> Result<()> {
        let shard = shard_of_table(table).unwrap_or(0);
        for name in chains {
            let local = split_name(name).1;
            let msgs = match self.request("rules", |b| b.rules_dump_chain(table, local)) {
                Err(NftError::ReadBack { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                    state.chains.remove(name);
                    continue;
                }
                other => other?,
            };
            let Some(chain) = state.chains.get_mut(name) else { continue };
            let mut targets = Vec::new();
            for msg in msgs {
                let Some(r) = rule_summary(&msg) else { continue };
                if r.table == table.as_bytes() && r.chain == local.as_bytes() {
                    chain.rules.push(expr::fingerprint(r.expressions, r.userdata));
                    if seen.is_some() {
                        targets.extend(decode::verdict_chains(r.expressions).map(|c| qualify(shard, c)));
                    }
                }
            }
            if let Some(seen) = seen.as_deref_mut() {
                seen.extend(targets.into_iter().filter(|c| !state.chains.contains_key(c)));
            }
        }
        Ok(())
    }

    /// The nf_tables ruleset generation: it moves with every commit by anyone, so an unchanged
    /// value means nobody touched nftables since we last looked.
    pub fn generation(&mut self) -> Result<u32> {
        let answers = self.request("generation", |b| b.get_gen())?;
        answers.iter().find_map(|m| gen_id(m)).ok_or_else(|| NftError::ReadBack {
            what: "generation",
            source: io::Error::other("no NFTA_GEN_ID in answer"),
        })
    }

    /// The elements of a set in `table` (goto chains qualified as the compiler names them).
    fn set_elements(&mut self, table: &str, set: &str) -> Result<Vec<Element>> {
        let obj = sys::SetObj::new(table, set, None);
        let msgs = self.request("set elements", |b| b.elements(NFT_MSG_GETSETELEM, NLM_F_DUMP, &obj))?;
        let shard = shard_of_table(table).unwrap_or(0);
        let verdict = |v: sys::ElemVerdict| match v {
            sys::ElemVerdict::Goto(chain) => qualify(shard, &chain),
            sys::ElemVerdict::Other(text) => text,
        };
        Ok(msgs
            .iter()
            .flat_map(|m| sys::parse_elements(m))
            .map(|(key, v)| Element { key, goto: v.map(verdict) })
            .collect())
    }

    /// The elements of one set of our main table; `None` when the table or set does not exist.
    pub fn read_elements(&mut self, set: &str) -> Result<Option<Vec<Element>>> {
        match self.set_elements(TABLE, set) {
            Ok(elements) => Ok(Some(elements)),
            Err(NftError::ReadBack { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes our tables (`nftproxy` and its shards) and everything in them, in one
    /// transaction. Returns how many there were.
    pub fn delete_tables(&mut self) -> Result<usize> {
        let tables = self.our_tables()?;
        if tables.is_empty() {
            return Ok(0);
        }
        let plan = Plan { ops: tables.iter().map(|t| crate::plan::Op::DelTable(t.clone())).collect() };
        self.apply(&plan)?;
        Ok(tables.len())
    }
}

fn bytemuck_bytes(buf: &mut [u64]) -> &mut [u8] {
    sys::as_bytes_mut(buf)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Family, Protocol};
    use crate::ruleset::{Rule, Stmt};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// A NEWRULE message as kernel 6.18 dumped it: nat-postrouting's last rule, written by us.
    const DUMPED_RULE: &str = "a0000000060a020801000000645a0000010000040d0001006e667470726f787900000000140002006e61742d706f7374726f7574696e67000c000300000000000000003c0c000600000000000000003b200004001c000100090001006d617371000000000c000200080001000000001030000700002a6d61737175657261646520776861742074686520736572766963657320636861696e206d61726b656400";

    /// A NEWSETELEM message as the kernel dumped it: service-ips-v4 with one element turned into
    /// `jump` by `nft` and two `goto` elements of ours.
    const DUMPED_ELEMENTS: &str = "0c0100000c0a0200010000007f590000010000040d0001006e667470726f78790000000013000200736572766963652d6970732d76340000d40003004800010014000100100001000a6000630600000000500000300002002c00020008000100fffffffd20000200737663342f64656661756c742f6e6f7468696e672f7463702f3830004400010014000100100001000a60005011000000003500002c0002002800020008000100fffffffc1c000200737663342f64656661756c742f7765622f7564702f3533004400010014000100100001000a60005006000000005000002c0002002800020008000100fffffffc1c000200737663342f64656661756c742f7765622f7463702f383000";

    /// The kernel's NLMSG_ERROR for a GETTABLE of a table that does not exist (seq 77).
    const DUMPED_ERROR: &str = "38000000020000004d0000002d720000feffffff24000000010a05004d0000000000000001000000100001006e6f737563687461626c6500";

    #[test]
    fn a_per_chain_rule_dump_request_names_table_and_chain() {
        let mut b = sys::MsgBuf::new(7);
        let seq = b.rules_dump_chain("nftproxy-3", "ep4/x");
        assert_eq!(seq, 7);
        let mut want = Vec::new();
        want.extend(48u32.to_ne_bytes()); // nlmsg_len: header 16, nfgenmsg 4, attributes 16 + 12
        want.extend(((10u16 << 8) | NFT_MSG_GETRULE).to_ne_bytes()); // NFNL_SUBSYS_NFTABLES
        want.extend((1u16 | 0x300).to_ne_bytes()); // NLM_F_REQUEST | NLM_F_DUMP
        want.extend(7u32.to_ne_bytes());
        want.extend(0u32.to_ne_bytes()); // port id
        want.extend([NFPROTO_INET as u8, 0, 0, 0]); // nfgenmsg: family, version, res_id
        want.extend(15u16.to_ne_bytes());
        want.extend(NFTA_RULE_TABLE.to_ne_bytes());
        want.extend(b"nftproxy-3\0\0");
        want.extend(10u16.to_ne_bytes());
        want.extend(NFTA_RULE_CHAIN.to_ne_bytes());
        want.extend(b"ep4/x\0\0\0");
        assert_eq!(b.bytes(), want.as_slice());
    }

    #[test]
    fn a_kernel_error_names_its_errno_and_the_message_it_answers() {
        let bytes = hex(DUMPED_ERROR);
        let msgs: Vec<NlMsg<'_>> = messages(&bytes).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].kind, NLMSG_ERROR);
        assert_eq!(error_of(&msgs[0]), Some((libc::ENOENT, 77)));
        // A truncated buffer yields nothing rather than garbage.
        assert_eq!(messages(&bytes[..20]).count(), 0);
    }

    #[test]
    fn a_dumped_rule_reads_back_as_the_rule_we_send() {
        let msg = hex(DUMPED_RULE);
        assert_eq!(family_of(&msg), Some(NFPROTO_INET));
        let r = rule_summary(&msg).unwrap();
        assert_eq!((r.table, r.chain), (&b"nftproxy"[..], &b"nat-postrouting"[..]));
        let ours = Rule::new(&Arc::from("masquerade what the services chain marked"), vec![Stmt::Masquerade]);
        assert_eq!(expr::fingerprint(r.expressions, r.userdata), expr::rule_fingerprint(&ours, &mut Vec::new()));
        let other = Rule::new(&Arc::from("masquerade what the services chain marked"), vec![Stmt::Drop]);
        assert_ne!(expr::fingerprint(r.expressions, r.userdata), expr::rule_fingerprint(&other, &mut Vec::new()));
    }

    #[test]
    fn dumped_elements_read_back_with_their_full_verdicts() {
        let got: Vec<(Vec<u8>, String)> = sys::parse_elements(&hex(DUMPED_ELEMENTS))
            .into_iter()
            .map(|(key, v)| match v {
                Some(sys::ElemVerdict::Goto(c)) => (key, format!("goto {c}")),
                Some(sys::ElemVerdict::Other(t)) => (key, t),
                None => (key, String::new()),
            })
            .collect();
        let want = |ip: [u8; 4], proto: u8, port: u16, v: &str| {
            let mut k = ip.to_vec();
            k.extend([proto, 0, 0, 0]);
            k.extend(port.to_be_bytes());
            k.extend([0, 0]);
            (k, v.to_string())
        };
        assert_eq!(
            got,
            [
                want([10, 96, 0, 99], 6, 80, "jump svc4/default/nothing/tcp/80"),
                want([10, 96, 0, 80], 17, 53, "goto svc4/default/web/udp/53"),
                want([10, 96, 0, 80], 6, 80, "goto svc4/default/web/tcp/80"),
            ]
        );
    }

    /// libnftnl's text of the rule we would send for `stmts`.
    fn payload(stmts: Vec<Stmt>) -> Vec<String> {
        let rule = Rule::new(&Arc::from("t"), stmts);
        let mut b = sys::MsgBuf::new(1);
        b.raw(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |m| expr::rule_attrs(m, "nftproxy", "c", &rule));
        sys::rule_payload_text(b.bytes()).expect("libnftnl parses what we send")
    }

    /// Each statement as libnftnl prints the expressions we send, in the form of the nftables
    /// project's `tests/py/*.payload` files.
    #[test]
    fn statements_encode_as_the_expressions_nft_would_emit() {
        let cases: Vec<(Vec<Stmt>, &[&str])> = vec![
            (
                vec![Stmt::NfProto(Family::V4), Stmt::L4Proto(Protocol::Tcp)],
                &[
                    "[ meta load nfproto => reg 1 ]",
                    "[ cmp eq reg 1 0x00000002 ]",
                    "[ meta load l4proto => reg 1 ]",
                    "[ cmp eq reg 1 0x00000006 ]",
                ],
            ),
            (
                vec![Stmt::SaddrIn("10.244.0.0/16".parse().unwrap())],
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x0000ffff ) ^ 0x00000000 ]",
                    "[ cmp eq reg 1 0x0000f40a ]",
                ],
            ),
            (
                vec![Stmt::DaddrInSet { family: Family::V4, set: "cluster-ips-v4".into() }],
                &["[ payload load 4b @ network header + 16 => reg 1 ]", "[ lookup reg 1 set cluster-ips-v4 0x0 ]"],
            ),
            (
                vec![Stmt::HairpinInSet { family: Family::V6, set: "hairpin-v6".into() }],
                &[
                    "[ payload load 16b @ network header + 8 => reg 1 ]",
                    "[ payload load 16b @ network header + 24 => reg 2 ]",
                    "[ ct load dst_ip6 => reg 3 , dir original ]",
                    "[ lookup reg 1 set hairpin-v6 0x0 ]",
                ],
            ),
            (
                vec![Stmt::SaddrInSet { family: Family::V4, set: "aff".into() }, Stmt::Goto("ep".into())],
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ lookup reg 1 set aff 0x0 ]",
                    "[ immediate reg 0 goto -> ep ]",
                ],
            ),
            (
                vec![Stmt::UpdateSaddrSet { family: Family::V4, set: "aff".into(), timeout_seconds: 10800 }],
                &[
                    "[ payload load 4b @ network header + 12 => reg 1 ]",
                    "[ dynset update reg_key 1 set aff timeout 10800000ms ]",
                ],
            ),
            (
                vec![Stmt::DispatchVmap { family: Family::V6, map: "service-ips-v6".into() }],
                &[
                    "[ payload load 16b @ network header + 24 => reg 1 ]",
                    "[ meta load l4proto => reg 2 ]",
                    "[ payload load 2b @ transport header + 2 => reg 13 ]",
                    "[ lookup reg 1 set service-ips-v6 dreg 0 0x0 ]",
                ],
            ),
            (
                vec![Stmt::NodePortVmap { map: "node-ports-v4".into() }],
                &[
                    "[ meta load l4proto => reg 1 ]",
                    "[ payload load 2b @ transport header + 2 => reg 9 ]",
                    "[ lookup reg 1 set node-ports-v4 dreg 0 0x0 ]",
                ],
            ),
            (vec![Stmt::FibSaddrLocal], &["[ fib saddr type => reg 1 ]", "[ cmp eq reg 1 0x00000002 ]"]),
            (
                vec![Stmt::MarkBitClear(0x4000), Stmt::Return],
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000 ]",
                    "[ cmp eq reg 1 0x00000000 ]",
                    "[ immediate reg 0 return ]",
                ],
            ),
            (
                vec![Stmt::SetMarkBit(0x4000)],
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0xffffbfff ) ^ 0x00004000 ]",
                    "[ meta set mark with reg 1 ]",
                ],
            ),
            (
                vec![Stmt::ClearMarkBit(0x4000)],
                &[
                    "[ meta load mark => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0xffffbfff ) ^ 0x00000000 ]",
                    "[ meta set mark with reg 1 ]",
                ],
            ),
            (
                vec![Stmt::NumgenBelow { modulus: 3, below: 1 }, Stmt::Jump("x".into())],
                &["[ numgen reg 1 = random mod 3 ]", "[ cmp eq reg 1 0x00000000 ]", "[ immediate reg 0 jump -> x ]"],
            ),
            (
                vec![Stmt::NumgenBelow { modulus: 7, below: 3 }],
                &[
                    "[ numgen reg 1 = random mod 7 ]",
                    "[ byteorder reg 1 = hton(reg 1, 4, 4) ]",
                    "[ cmp lt reg 1 0x03000000 ]",
                ],
            ),
            (
                vec![Stmt::Dnat { addr: "10.244.1.2".parse().unwrap(), port: 8080 }],
                &[
                    "[ immediate reg 1 0x0201f40a ]",
                    "[ immediate reg 2 0x0000901f ]",
                    "[ nat dnat ip addr_min reg 1 addr_max reg 1 proto_min reg 2 proto_max reg 2 flags 0x3 ]",
                ],
            ),
            (
                vec![Stmt::Dnat { addr: "fd00::2".parse().unwrap(), port: 8080 }],
                &[
                    "[ immediate reg 1 0x000000fd 0x00000000 0x00000000 0x02000000 ]",
                    "[ immediate reg 2 0x0000901f ]",
                    "[ nat dnat ip6 addr_min reg 1 addr_max reg 1 proto_min reg 2 proto_max reg 2 flags 0x3 ]",
                ],
            ),
            (vec![Stmt::Masquerade], &["[ masq flags 0x10 ]"]),
            (vec![Stmt::RejectTcpReset], &["[ reject type 1 code 0 ]"]),
            (vec![Stmt::RejectPortUnreachable], &["[ reject type 2 code 1 ]"]),
            (
                vec![Stmt::CtStateInvalid, Stmt::Counter, Stmt::Drop],
                &[
                    "[ ct load state => reg 1 ]",
                    "[ bitwise reg 1 = ( reg 1 & 0x00000001 ) ^ 0x00000000 ]",
                    "[ cmp neq reg 1 0x00000000 ]",
                    "[ counter pkts 0 bytes 0 ]",
                    "[ immediate reg 0 drop ]",
                ],
            ),
        ];
        for (stmts, want) in cases {
            let text = Rule::new(&Arc::from(""), stmts.clone()).to_string();
            assert_eq!(payload(stmts), want.to_vec(), "{text}");
        }
    }
}
