//! Conntrack at a million entries (issue 13): a UDP Service of two endpoints with N entries
//! created over ctnetlink, half to each endpoint, then the real engine (`Engine::sync`,
//! `LiveKernel`) adding an endpoint (must not read conntrack) and removing one (must delete
//! exactly its entries); `conntrack -D` deleting the same entries from the same table rebuilt is
//! the anchor. `nf_conntrack_max` is raised in the initial namespace for the run and restored.

use super::*;
use nftproxy::conntrack::wire::{NewEntry, STATUS_SEEN_REPLY};
use nftproxy::conntrack::{Conntrack, Filter};
use nftproxy::model::Family;

const VIP: &str = "10.96.0.53";
const A: &str = "10.244.1.2";
const B: &str = "10.244.1.3";
const C: &str = "10.244.1.4";
const NF_CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The Service `default/dns`, 10.96.0.53:53/UDP -> `endpoints`:5353.
fn dns(endpoints: &[&str]) -> Snapshot {
    let eps = endpoints.iter().map(|e| Endpoint::ready(ip(e), 5353)).collect();
    let port = ServicePort { name: "dns".into(), port: 53, protocol: Protocol::Udp, node_port: None, endpoints: eps };
    let svc = Service::new(ServiceId::new("default", "dns"), vec![ip(VIP)], vec![port]);
    let mut snap = Snapshot::default();
    snap.services.insert(svc.id.clone(), svc);
    snap
}

/// Entry `k` of the table: client 10.1.x.y:port -> VIP:53, DNATed to A (k even) or B (k odd).
fn entry(k: usize) -> NewEntry {
    let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + (k / 50_000) as u32);
    NewEntry {
        protocol: 17,
        client: (IpAddr::V4(client), 10_000 + (k % 50_000) as u16),
        dst: (ip(VIP), 53),
        reply: (ip(if k.is_multiple_of(2) { A } else { B }), 5353),
        status: STATUS_SEEN_REPLY,
        timeout_secs: 3600,
    }
}

/// Entries to the VIP by reply source: (to A, to B, to anything else).
fn count(ct: &mut Conntrack) -> (usize, usize, usize) {
    let (a, b) = (ip(A), ip(B));
    let mut n = (0, 0, 0);
    let filter = Filter { protocol: 17, dst: Some((ip(VIP), 53)) };
    ct.each_flow(Some(Family::V4), filter, |f| match f.key.reply_src {
        r if r == a => n.0 += 1,
        r if r == b => n.1 += 1,
        _ => n.2 += 1,
    })
    .unwrap();
    n
}

/// Runs inside the namespace (`child ct-scale N`); prints `key=value` pairs.
pub(crate) fn conntrack_scale_child(n: usize) -> String {
    let mut out = String::new();
    // Where the kernel keeps a limit per namespace, it cannot exceed the initial one (raised by
    // the harness): ask for as many.
    let _ = std::fs::write(NF_CONNTRACK_MAX, (n + n / 4).to_string());
    let mut engine = Engine::new(LiveKernel::open().unwrap(), options());
    engine.sync(&dns(&[A, B])).unwrap();
    let mut ct = Conntrack::open().unwrap();
    let start = Instant::now();
    let created = ct.create((0..n).map(entry)).unwrap();
    write!(out, "create_ms={:.0} created={} ", ms(start.elapsed()), created.done).unwrap();
    // What reading the table alone costs: a dump of every entry to the VIP, nothing deleted.
    let start = Instant::now();
    let (to_a, to_b, other) = count(&mut ct);
    let dump_ms = ms(start.elapsed());
    assert_eq!((to_a + to_b, other), (n, 0), "the table was not built: {created:?}");
    write!(out, "dump_ms={dump_ms:.0} to_a={to_a} to_b={to_b} ").unwrap();

    // (a) An endpoint added: nothing can be stale, conntrack is not read.
    let add = engine.sync(&dns(&[A, B, C])).unwrap();
    write!(
        out,
        "add_ms={:.2} add_reconciles={} add_deleted={} ",
        ms(add.total),
        add.conntrack.len(),
        add.conntrack_deleted
    )
    .unwrap();
    // (b) B removed: exactly B's entries go.
    let rm = engine.sync(&dns(&[A, C])).unwrap();
    let rss = vm_hwm_kib();
    let (left_a, left_b, _) = count(&mut ct);
    write!(
        out,
        "remove_ms={:.1} remove_conntrack_ms={:.1} remove_deleted={} rss_kib={rss} left_a={left_a} left_b={left_b} ",
        ms(rm.total),
        ms(rm.conntrack_time),
        rm.conntrack_deleted,
    )
    .unwrap();

    // The anchor: B's entries again, deleted by conntrack-tools.
    let rebuilt = ct.create((0..n).map(entry).filter(|e| e.reply.0 == ip(B))).unwrap();
    assert_eq!(rebuilt.done, to_b, "{rebuilt:?}");
    let start = Instant::now();
    let anchor =
        Command::new("conntrack").args(["-D", "-p", "udp", "--orig-dst", VIP, "--reply-src", B]).output().unwrap();
    let anchor_ms = ms(start.elapsed());
    // "conntrack v1.4.7 (conntrack-tools): 500000 flow entries have been deleted."
    let said = String::from_utf8_lossy(&anchor.stderr);
    let anchor_deleted = said
        .split_whitespace()
        .zip(said.split_whitespace().skip(1))
        .find(|(_, next)| *next == "flow")
        .and_then(|(n, _)| n.parse::<usize>().ok())
        .unwrap_or(0);
    let (after_a, after_b, _) = count(&mut ct);
    write!(
        out,
        "anchor_ms={anchor_ms:.0} anchor_deleted={anchor_deleted} anchor_left_a={after_a} anchor_left_b={after_b}"
    )
    .unwrap();
    out
}

/// Sets a sysctl for the run and puts the old value back when dropped.
struct Raised {
    path: &'static str,
    old: String,
}

impl Raised {
    fn at_least(path: &'static str, want: usize) -> Option<Raised> {
        let old = std::fs::read_to_string(path).ok()?.trim().to_string();
        if old.parse::<usize>().is_ok_and(|v| v >= want) {
            return None;
        }
        std::fs::write(path, want.to_string()).unwrap_or_else(|e| panic!("raising {path}: {e}"));
        Some(Raised { path, old })
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.path, &self.old) {
            eprintln!("  could not restore {} to {}: {e}", self.path, self.old);
        }
    }
}

pub(crate) fn bench_conntrack_scale(r: &mut Report, n: usize) {
    eprintln!("== conntrack: {n} UDP entries to a Service of 2 endpoints");
    let _max = Raised::at_least(NF_CONNTRACK_MAX, n + n / 4);
    let buckets = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_buckets").unwrap_or_default();
    eprintln!("  nf_conntrack_buckets {}", buckets.trim());
    let ns = Ns::new("ct");
    let kv = ns.child(&["ct-scale", &n.to_string(), "2"]);
    let get = |k: &str| kv.get(k).copied();
    let case = "conntrack at scale";
    r.add(case, n, 2, "create the entries over ctnetlink (setup)", "ms", get("create_ms"));
    r.add(case, n, 2, "a dump of every entry to the VIP (reference)", "ms", get("dump_ms"));
    r.add(case, n, 2, "nftproxy: sync adding an endpoint", "ms", get("add_ms"));
    r.add(case, n, 2, "nftproxy: sync adding an endpoint, conntrack reads", "count", get("add_reconciles"));
    r.add(case, n, 2, "nftproxy: sync removing an endpoint", "ms", get("remove_ms"));
    r.add(case, n, 2, "nftproxy: of which the conntrack cleanup", "ms", get("remove_conntrack_ms"));
    r.add(case, n, 2, "nftproxy: entries deleted", "entries", get("remove_deleted"));
    r.add(case, n, 2, "entries of the removed endpoint", "entries", get("to_b"));
    r.add(case, n, 2, "nftproxy: entries left to the removed endpoint", "entries", get("left_b"));
    r.add(case, n, 2, "nftproxy: entries left to the remaining endpoint", "entries", get("left_a"));
    r.add(case, n, 2, "nftproxy: peak RSS of the process", "MiB", get("rss_kib").map(|k| k / 1024.0));
    r.add(case, n, 2, "conntrack -D --orig-dst --reply-src (same entries)", "ms", get("anchor_ms"));
    r.add(case, n, 2, "conntrack -D: entries deleted", "entries", get("anchor_deleted"));
}
