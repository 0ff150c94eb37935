//! The only module with `unsafe`: thin owned wrappers over libnftnl (through the `nftnl` crate's
//! `nftnl_sys`) that write netlink messages into one contiguous buffer and parse the kernel's
//! answers back into plain Rust values. Nothing here decides what to send.

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;

use super::consts::*;

/// Largest single nf_tables message libnftnl may write (64 KiB of attributes plus headers).
const MAX_MSG: usize = 65536 + 4096;

fn cstring(s: &str) -> CString {
    // Names come from our compiler or from the kernel; neither contains NUL. If one did, the
    // kernel would reject the truncated name, which is the error we want.
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// A growing, zero-initialised buffer of netlink messages sent later with one `sendmsg`.
pub struct MsgBuf {
    buf: Vec<u8>,
    used: usize,
    seq: u32,
    /// Where [`MsgBuf::raw`] builds a message before copying it in.
    scratch: Vec<u8>,
}

impl MsgBuf {
    pub fn new(first_seq: u32) -> Self {
        Self::with_capacity(first_seq, 0)
    }

    /// A buffer sized for about `bytes` of messages, so large batches are not copied as they grow.
    pub fn with_capacity(first_seq: u32, bytes: usize) -> Self {
        MsgBuf { buf: vec![0; bytes], used: 0, seq: first_seq, scratch: Vec::new() }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    pub fn into_bytes(mut self) -> Vec<u8> {
        self.buf.truncate(self.used);
        self.buf
    }

    /// Runs `write` on a pointer with room for one whole message, then keeps what it wrote.
    /// Returns the message's sequence number.
    fn put(&mut self, write: impl FnOnce(*mut c_char, u32) -> *mut libc::nlmsghdr) -> u32 {
        self.reserve();
        let seq = self.next_seq();
        // SAFETY: `put` guarantees MAX_MSG initialised bytes from `used`, more than any message
        // libnftnl writes; the header pointer returned points at that same region.
        let len = unsafe {
            let nlh = write(self.buf.as_mut_ptr().add(self.used).cast(), seq);
            (*nlh).nlmsg_len as usize
        };
        assert!(len <= MAX_MSG, "netlink message of {len} bytes overflowed its slot");
        self.used += (len + 3) & !3;
        seq
    }

    /// Room for one more message of any size at `used`.
    fn reserve(&mut self) {
        if self.buf.len() - self.used < MAX_MSG {
            let grow = (self.buf.len() / 2).max(MAX_MSG * 4);
            self.buf.resize(self.buf.len() + grow, 0);
        }
    }

    /// Sequence numbers wrap: a seed near u32::MAX must not overflow.
    fn next_seq(&mut self) -> u32 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        seq
    }

    /// An nf_tables message written in Rust: header, nfgenmsg (inet), and the attributes
    /// `attrs` appends (see `expr::Attrs`). Rules and tables are written this way, so what we
    /// send is exactly what the read-back compares.
    pub fn raw(&mut self, kind: u16, flags: u16, attrs: impl FnOnce(&mut Vec<u8>)) -> u32 {
        let mut msg = std::mem::take(&mut self.scratch);
        msg.clear();
        msg.resize(20, 0);
        attrs(&mut msg);
        let seq = self.next_seq();
        let len = msg.len();
        assert!(len <= MAX_MSG, "netlink message of {len} bytes");
        msg[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        msg[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg[8..12].copy_from_slice(&seq.to_ne_bytes());
        msg[16] = NFPROTO_INET as u8;
        self.reserve();
        self.buf[self.used..self.used + len].copy_from_slice(&msg);
        self.used += len.next_multiple_of(4);
        self.scratch = msg;
        seq
    }

    pub fn batch_begin(&mut self) -> u32 {
        // SAFETY: see `put`; nftnl_batch_begin writes one fixed-size message.
        self.put(|p, seq| unsafe { sys::nftnl_batch_begin(p, seq) })
    }

    pub fn batch_end(&mut self) -> u32 {
        // SAFETY: as batch_begin.
        self.put(|p, seq| unsafe { sys::nftnl_batch_end(p, seq) })
    }

    /// A message with just the nfgenmsg header and the attributes `payload` adds.
    fn put_obj(&mut self, kind: u16, flags: u16, payload: impl FnOnce(*mut libc::nlmsghdr)) -> u32 {
        self.put(|p, seq| {
            // SAFETY: p has room for a whole message (see `put`).
            let nlh = unsafe { sys::nftnl_nlmsg_build_hdr(p, kind, NFPROTO_INET, flags, seq) };
            payload(nlh);
            nlh
        })
    }

    pub fn table(&mut self, kind: u16, flags: u16, name: &str) -> u32 {
        let t = Table::new(name);
        // SAFETY: t is a valid table object; nlh is the header just written.
        self.put_obj(kind, flags, |nlh| unsafe { sys::nftnl_table_nlmsg_build_payload(nlh, t.0.as_ptr()) })
    }

    /// A chain message; `hook` is (hook number, priority, chain type) for base chains, which
    /// are sent with policy accept (so resending one repairs a changed policy).
    pub fn chain(&mut self, kind: u16, flags: u16, table: &str, name: &str, hook: Option<(u32, i32, &str)>) -> u32 {
        let c = Chain::new(table, name, hook);
        // SAFETY: c is a valid chain object; nlh is the header just written.
        self.put_obj(kind, flags, |nlh| unsafe { sys::nftnl_chain_nlmsg_build_payload(nlh, c.0.as_ptr()) })
    }

    /// DELRULE naming only table and chain: deletes every rule of the chain.
    pub fn flush_chain(&mut self, table: &str, chain: &str) -> u32 {
        let r = RuleObj::new(table, chain);
        // SAFETY: r is a valid rule object; nlh is the header just written.
        self.put_obj(NFT_MSG_DELRULE, 0, |nlh| unsafe { sys::nftnl_rule_nlmsg_build_payload(nlh, r.0.as_ptr()) })
    }

    /// GETRULE dump of one table's rules.
    pub fn rules_dump(&mut self, table: &str) -> u32 {
        let table = cstring(table);
        // SAFETY: alloc returns an owned object or NULL (checked), freed after use; setters copy.
        let r = unsafe {
            let r = NonNull::new(sys::nftnl_rule_alloc()).expect("out of memory");
            sys::nftnl_rule_set_u32(r.as_ptr(), sys::NFTNL_RULE_FAMILY as u16, NFPROTO_INET.into());
            sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
            RuleObj(r)
        };
        // SAFETY: r is a valid rule object; nlh is the header just written.
        self.put_obj(NFT_MSG_GETRULE, NLM_F_DUMP, |nlh| unsafe {
            sys::nftnl_rule_nlmsg_build_payload(nlh, r.0.as_ptr())
        })
    }

    /// GETRULE dump of one chain's rules: NFTA_RULE_TABLE and NFTA_RULE_CHAIN. The kernel
    /// looks the chain up by name and walks only its rules, so each answer costs the chain's
    /// size, where a whole table's dump walks every rule before where it stopped for each
    /// ~32 KiB message (a cost growing with the square of the table).
    pub fn rules_dump_chain(&mut self, table: &str, chain: &str) -> u32 {
        self.raw(NFT_MSG_GETRULE, NLM_F_DUMP, |m| {
            let mut a = super::expr::Attrs(m);
            a.str(NFTA_RULE_TABLE, table);
            a.str(NFTA_RULE_CHAIN, chain);
        })
    }

    pub fn set(&mut self, kind: u16, flags: u16, set: &SetObj) -> u32 {
        // SAFETY: set is a valid set object; nlh is the header just written.
        self.put_obj(kind, flags, |nlh| unsafe { sys::nftnl_set_nlmsg_build_payload(nlh, set.0.as_ptr()) })
    }

    /// NEWSETELEM/DELSETELEM (or GETSETELEM) for the elements held by `set`.
    pub fn elements(&mut self, kind: u16, flags: u16, set: &SetObj) -> u32 {
        // SAFETY: set is a valid set object; nlh is the header just written.
        self.put_obj(kind, flags, |nlh| unsafe { sys::nftnl_set_elems_nlmsg_build_payload(nlh, set.0.as_ptr()) })
    }
}

impl MsgBuf {
    /// A GETGEN request (no attributes): the kernel answers with the ruleset generation id.
    pub fn get_gen(&mut self) -> u32 {
        self.put_obj(NFT_MSG_GETGEN, NLM_F_ACK, |_| {})
    }
}

struct Table(NonNull<sys::nftnl_table>);

impl Table {
    fn new(name: &str) -> Self {
        let name = cstring(name);
        // SAFETY: alloc returns an owned object or NULL (checked); set_str copies the string.
        unsafe {
            let t = NonNull::new(sys::nftnl_table_alloc()).expect("out of memory");
            sys::nftnl_table_set_str(t.as_ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            sys::nftnl_table_set_u32(t.as_ptr(), sys::NFTNL_TABLE_FAMILY as u16, NFPROTO_INET.into());
            Table(t)
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: we own the object and free it once.
        unsafe { sys::nftnl_table_free(self.0.as_ptr()) }
    }
}

struct Chain(NonNull<sys::nftnl_chain>);

impl Chain {
    fn new(table: &str, name: &str, hook: Option<(u32, i32, &str)>) -> Self {
        let (table, name) = (cstring(table), cstring(name));
        // SAFETY: alloc returns an owned object or NULL (checked); setters copy their input.
        unsafe {
            let c = NonNull::new(sys::nftnl_chain_alloc()).expect("out of memory");
            let p = c.as_ptr();
            sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
            sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_FAMILY as u16, NFPROTO_INET.into());
            if let Some((hooknum, prio, kind)) = hook {
                let kind = cstring(kind);
                sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_HOOKNUM as u16, hooknum);
                sys::nftnl_chain_set_s32(p, sys::NFTNL_CHAIN_PRIO as u16, prio);
                sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_TYPE as u16, kind.as_ptr());
                sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_POLICY as u16, NF_ACCEPT);
            }
            Chain(c)
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        // SAFETY: we own the object and free it once.
        unsafe { sys::nftnl_chain_free(self.0.as_ptr()) }
    }
}

/// A rule naming a table and chain: a flush (DELRULE) or a dump request.
pub struct RuleObj(NonNull<sys::nftnl_rule>);

// SAFETY: the object is owned exclusively and libnftnl objects have no thread affinity.
unsafe impl Send for RuleObj {}

impl RuleObj {
    pub fn new(table: &str, chain: &str) -> Self {
        let (table, chain) = (cstring(table), cstring(chain));
        // SAFETY: alloc returns an owned object or NULL (checked); setters copy their input.
        unsafe {
            let r = NonNull::new(sys::nftnl_rule_alloc()).expect("out of memory");
            sys::nftnl_rule_set_u32(r.as_ptr(), sys::NFTNL_RULE_FAMILY as u16, NFPROTO_INET.into());
            sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
            sys::nftnl_rule_set_str(r.as_ptr(), sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
            RuleObj(r)
        }
    }
}

impl Drop for RuleObj {
    fn drop(&mut self) {
        // SAFETY: we own the object (and through it its expressions) and free it once.
        unsafe { sys::nftnl_rule_free(self.0.as_ptr()) }
    }
}

/// A set (its definition, or a carrier for element messages).
pub struct SetObj(NonNull<sys::nftnl_set>);

/// The shape of a set we create.
pub struct SetSpec {
    pub shape: crate::ruleset::SetShape,
    pub id: u32,
}

impl SetObj {
    pub fn new(table: &str, name: &str, spec: Option<&SetSpec>) -> Self {
        let (table, name) = (cstring(table), cstring(name));
        // SAFETY: alloc returns an owned object or NULL (checked); setters copy their input.
        unsafe {
            let s = NonNull::new(sys::nftnl_set_alloc()).expect("out of memory");
            let p = s.as_ptr();
            sys::nftnl_set_set_str(p, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(p, sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FAMILY as u16, NFPROTO_INET.into());
            if let Some(spec) = spec {
                let shape = spec.shape;
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_TYPE as u16, shape.key_type);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, shape.key_len);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, spec.id);
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, shape.flags);
                if shape.data_type != 0 {
                    sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DATA_TYPE as u16, shape.data_type);
                }
            }
            SetObj(s)
        }
    }

    /// Adds an element with `key`, and for maps a `goto chain` verdict.
    pub fn add_element(&mut self, key: &[u8], goto: Option<&str>) {
        // SAFETY: elem_alloc returns an owned object or NULL (checked); setters copy their input;
        // nftnl_set_elem_add takes ownership of the element.
        unsafe {
            let e = NonNull::new(sys::nftnl_set_elem_alloc()).expect("out of memory");
            sys::nftnl_set_elem_set(
                e.as_ptr(),
                sys::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast::<c_void>(),
                key.len() as u32,
            );
            if let Some(chain) = goto {
                let chain = cstring(chain);
                sys::nftnl_set_elem_set_u32(e.as_ptr(), sys::NFTNL_SET_ELEM_VERDICT as u16, NFT_GOTO as u32);
                sys::nftnl_set_elem_set_str(e.as_ptr(), sys::NFTNL_SET_ELEM_CHAIN as u16, chain.as_ptr());
            }
            sys::nftnl_set_elem_add(self.0.as_ptr(), e.as_ptr());
        }
    }
}

impl Drop for SetObj {
    fn drop(&mut self) {
        // SAFETY: we own the object (and its elements) and free it once.
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) }
    }
}

/// Copies a received message into 4-byte aligned storage so libnftnl may read it as a header.
fn aligned(msg: &[u8]) -> Vec<u32> {
    let mut v = vec![0u32; msg.len().div_ceil(4)];
    // SAFETY: v has at least msg.len() bytes; the regions do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), v.as_mut_ptr().cast::<u8>(), msg.len()) };
    v
}

/// Reads a NUL-terminated C string owned by a libnftnl object; NULL gives "".
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for the call.
unsafe fn owned_str(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

pub struct ParsedChain {
    pub table: String,
    pub name: String,
    /// (hook number, priority, type) for base chains.
    pub hook: Option<(u32, i32, String)>,
    /// The verdict for packets that reach a base chain's end.
    pub policy: Option<u32>,
    /// NFT_CHAIN_* flags (NFT_CHAIN_BINDING: an anonymous chain bound to the rule that jumps to it).
    pub flags: u32,
}

pub fn parse_chain(msg: &[u8]) -> Option<ParsedChain> {
    let buf = aligned(msg);
    // SAFETY: buf holds one whole netlink message, aligned; the chain object is owned here and
    // freed before return; getters return pointers valid until then, copied by owned_str.
    unsafe {
        let c = NonNull::new(sys::nftnl_chain_alloc())?;
        let p = c.as_ptr();
        let out = if sys::nftnl_chain_nlmsg_parse(buf.as_ptr().cast(), p) < 0 {
            None
        } else {
            let hook = sys::nftnl_chain_is_set(p, sys::NFTNL_CHAIN_HOOKNUM as u16).then(|| {
                (
                    sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_HOOKNUM as u16),
                    sys::nftnl_chain_get_s32(p, sys::NFTNL_CHAIN_PRIO as u16),
                    owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_TYPE as u16)),
                )
            });
            Some(ParsedChain {
                table: owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_TABLE as u16)),
                name: owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_NAME as u16)),
                hook,
                policy: sys::nftnl_chain_is_set(p, sys::NFTNL_CHAIN_POLICY as u16)
                    .then(|| sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_POLICY as u16)),
                flags: sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_FLAGS as u16),
            })
        };
        sys::nftnl_chain_free(p);
        out
    }
}

pub struct ParsedSet {
    pub table: String,
    pub name: String,
    pub key_type: u32,
    pub key_len: u32,
    pub flags: u32,
    pub data_type: u32,
}

pub fn parse_set(msg: &[u8]) -> Option<ParsedSet> {
    let buf = aligned(msg);
    // SAFETY: as parse_chain.
    unsafe {
        let s = NonNull::new(sys::nftnl_set_alloc())?;
        let p = s.as_ptr();
        let out = if sys::nftnl_set_nlmsg_parse(buf.as_ptr().cast(), p) < 0 {
            None
        } else {
            Some(ParsedSet {
                table: owned_str(sys::nftnl_set_get_str(p, sys::NFTNL_SET_TABLE as u16)),
                name: owned_str(sys::nftnl_set_get_str(p, sys::NFTNL_SET_NAME as u16)),
                key_type: sys::nftnl_set_get_u32(p, sys::NFTNL_SET_KEY_TYPE as u16),
                key_len: sys::nftnl_set_get_u32(p, sys::NFTNL_SET_KEY_LEN as u16),
                flags: sys::nftnl_set_get_u32(p, sys::NFTNL_SET_FLAGS as u16),
                data_type: sys::nftnl_set_get_u32(p, sys::NFTNL_SET_DATA_TYPE as u16),
            })
        };
        sys::nftnl_set_free(p);
        out
    }
}

/// libnftnl's own text of the expressions in one NEWRULE message (the form the nftables project
/// keeps in its `tests/py/*.payload` files: `[ meta load l4proto => reg 1 ]`), one line per
/// expression; `None` when libnftnl cannot parse the message. For wire tests.
#[cfg(test)]
pub fn rule_payload_text(msg: &[u8]) -> Option<Vec<String>> {
    let buf = aligned(msg);
    // SAFETY: as parse_chain; snprintf writes at most `out.len()` bytes, NUL-terminated.
    unsafe {
        let r = NonNull::new(sys::nftnl_rule_alloc())?;
        let p = r.as_ptr();
        let text = if sys::nftnl_rule_nlmsg_parse(buf.as_ptr().cast(), p) < 0 {
            None
        } else {
            let mut out = vec![0u8; 16384];
            let n = sys::nftnl_rule_snprintf(out.as_mut_ptr().cast(), out.len(), p, sys::NFTNL_OUTPUT_DEFAULT, 0);
            out.truncate(n.max(0) as usize);
            Some(String::from_utf8_lossy(&out).into_owned())
        };
        sys::nftnl_rule_free(p);
        text.map(|t| t.lines().map(str::trim).filter(|l| l.starts_with('[')).map(str::to_string).collect())
    }
}

/// A read-back element's verdict.
pub enum ElemVerdict {
    Goto(String),
    /// Any other verdict, as nft prints it (`jump svc4/...`, `accept`): never one we want.
    Other(String),
}

/// The elements in one GETSETELEM answer: (key bytes, verdict if any).
pub fn parse_elements(msg: &[u8]) -> Vec<(Vec<u8>, Option<ElemVerdict>)> {
    let buf = aligned(msg);
    let mut out = Vec::new();
    // SAFETY: as parse_chain; the iterator borrows the set and is destroyed before the set is
    // freed; element getters return pointers valid while the set lives, copied at once.
    unsafe {
        let Some(s) = NonNull::new(sys::nftnl_set_alloc()) else {
            return out;
        };
        let p = s.as_ptr();
        if sys::nftnl_set_elems_nlmsg_parse(buf.as_ptr().cast(), p) >= 0 {
            let it = sys::nftnl_set_elems_iter_create(p);
            if !it.is_null() {
                let mut e = sys::nftnl_set_elems_iter_next(it);
                while !e.is_null() {
                    let mut len = 0u32;
                    let key = sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_KEY as u16, &mut len);
                    let key = if key.is_null() {
                        Vec::new()
                    } else {
                        std::slice::from_raw_parts(key.cast::<u8>(), len as usize).to_vec()
                    };
                    let chain = sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_CHAIN as u16)
                        .then(|| owned_str(sys::nftnl_set_elem_get_str(e, sys::NFTNL_SET_ELEM_CHAIN as u16)));
                    let code = sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_VERDICT as u16)
                        .then(|| sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_VERDICT as u16) as i32);
                    out.push((key, verdict_text(code, chain)));
                    e = sys::nftnl_set_elems_iter_next(it);
                }
                sys::nftnl_set_elems_iter_destroy(it);
            }
        }
        sys::nftnl_set_free(p);
    }
    out
}

/// A read-back element verdict (see `parse_elements`).
fn verdict_text(code: Option<i32>, chain: Option<String>) -> Option<ElemVerdict> {
    let name = match code? {
        NFT_GOTO => return Some(ElemVerdict::Goto(chain.unwrap_or_default())),
        NFT_JUMP => "jump",
        NF_DROP => "drop",
        NFT_RETURN => "return",
        c if c == NF_ACCEPT as i32 => "accept",
        c => return Some(ElemVerdict::Other(format!("verdict {c}"))),
    };
    Some(ElemVerdict::Other(chain.map_or_else(|| name.to_string(), |c| format!("{name} {c}"))))
}

/// Grows a socket buffer past the `rmem_max`/`wmem_max` limits (needs CAP_NET_ADMIN).
pub fn force_buffer(fd: i32, option: i32, bytes: usize) -> std::io::Result<()> {
    let v: libc::c_int = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads sizeof(int) bytes from a valid int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Sets an integer netlink socket option.
pub fn set_netlink_opt(fd: i32, option: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt reads sizeof(int) bytes from a valid int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_NETLINK,
            option,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Receives without blocking; `Ok(0)` when nothing is queued.
pub fn recv_nonblocking(fd: i32, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into a valid, exclusively borrowed buffer.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::WouldBlock { Ok(0) } else { Err(err) }
}

/// The raw fd behind an mnl socket.
pub fn socket_fd(sock: &mnl::Socket) -> i32 {
    // SAFETY: the socket pointer is valid for as long as `sock` lives.
    unsafe { mnl::mnl_sys::mnl_socket_get_fd(sock.as_raw_socket()) }
}

/// Views a u64 buffer (aligned for netlink headers) as bytes.
pub fn as_bytes_mut(buf: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(buf);
    // SAFETY: u8 has no alignment or validity requirements; the view covers exactly the same
    // memory and borrows it exclusively for as long as `buf` is borrowed.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), len) }
}

/// Caps glibc's heaps ("arenas") at two, unless `MALLOC_ARENA_MAX` says otherwise. glibc gives
/// threads heaps of their own (up to 8 per core); the manifest parsers' threads each filled one
/// that the sync's allocations, made on another thread afterwards, could not reuse: 100 MiB more
/// peak RSS at 44,000 Services for a few percent of parse time.
pub fn limit_heap_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a glibc tunable; it takes no pointers from us.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Gives the heap's free pages back to the kernel. A full sync frees tens of MiB of compiled
/// objects just before it allocates the batch buffer; without this the freed pages stay
/// resident (glibc keeps them) and count twice in the peak.
pub fn release_free_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
