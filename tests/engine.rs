//! The sync engine's decisions without root: the engine runs against an in-memory nf_tables
//! (`kernel::fake::FakeKernel`) exactly as the agent drives it, and after every step a table of
//! flows (source, destination, port -> where the connection goes) is checked with the packet
//! tracer against what the fake kernel holds, in the style of kube-proxy's packet-flow tests.

use std::collections::BTreeSet;
use std::net::IpAddr;

use nftproxy::compile::Options;
use nftproxy::conntrack::stale::FlowKey;
use nftproxy::kernel::fake::FakeKernel;
use nftproxy::model::{Endpoint, Protocol, Service, ServiceId, ServicePort, Snapshot};
use nftproxy::plan::Op;
use nftproxy::ruleset::{Rule, Stmt};
use nftproxy::sync::{Engine, SyncKind};
use nftproxy::trace::{Fate, Packet, trace};

fn service(name: &str, vip: &str, protocol: Protocol, port: u16, target: u16, eps: &[&str]) -> Service {
    let endpoints = eps.iter().map(|ip| Endpoint::ready(ip.parse().unwrap(), target)).collect();
    let p = ServicePort { name: "p".into(), port, protocol, node_port: None, endpoints };
    Service::new(ServiceId::new("default", name), vec![vip.parse().unwrap()], vec![p])
}

/// web (TCP, 10.96.0.80:80 -> web_eps:8080), db (TCP, 10.96.0.81:5432 -> 10.244.2.1) and dns
/// (UDP, 10.96.0.53:53 -> dns_eps:5353).
fn cluster(web_eps: &[&str], dns_eps: &[&str]) -> Snapshot {
    let mut snap = Snapshot::default();
    for s in [
        service("web", "10.96.0.80", Protocol::Tcp, 80, 8080, web_eps),
        service("db", "10.96.0.81", Protocol::Tcp, 5432, 5432, &["10.244.2.1"]),
        service("dns", "10.96.0.53", Protocol::Udp, 53, 5353, dns_eps),
    ] {
        snap.services.insert(s.id.clone(), s);
    }
    snap
}

fn opts(shards: u32) -> Options {
    Options { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], table_shards: shards, ..Default::default() }
}

/// Where a new connection from a pod goes, as the fake kernel's rules decide: the endpoint
/// addresses reached, or the fate.
fn flow(k: &FakeKernel, dst: &str, proto: Protocol, dport: u16) -> BTreeSet<String> {
    flow_from(k, "10.244.9.9", dst, proto, dport)
}

/// The same from any source.
fn flow_from(k: &FakeKernel, src: &str, dst: &str, proto: Protocol, dport: u16) -> BTreeSet<String> {
    let pkt = Packet { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto, dport, local: false };
    trace(&k.ruleset(), &pkt)
        .into_iter()
        .map(|(fate, _)| match fate {
            Fate::Dnat { addr, .. } => addr.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The flow table every step is checked against.
fn assert_flows(k: &FakeKernel, web: &[&str], dns: &[&str]) {
    assert_eq!(flow(k, "10.96.0.80", Protocol::Tcp, 80), set(web), "web");
    assert_eq!(flow(k, "10.96.0.81", Protocol::Tcp, 5432), set(&["10.244.2.1"]), "db");
    assert_eq!(flow(k, "10.96.0.53", Protocol::Udp, 53), set(dns), "dns");
    assert_eq!(flow(k, "10.96.0.80", Protocol::Tcp, 81), set(&["Rejected"]), "a port web does not have");
    assert_eq!(flow(k, "10.244.1.2", Protocol::Tcp, 8080), set(&["Untouched"]), "pod to pod");
}

fn commits(k: &FakeKernel) -> usize {
    k.with(|s| s.committed.len())
}

const WEB: &[&str] = &["10.244.1.2", "10.244.1.3"];
const DNS: &[&str] = &["10.244.3.1", "10.244.3.2"];

#[test]
fn first_sync_then_a_changed_slice_is_partial_and_touches_only_that_service() {
    let k = FakeKernel::default();
    let mut e = Engine::new(k.clone(), opts(1));
    let o = e.sync(&cluster(WEB, DNS)).unwrap();
    assert_eq!(o.kind, SyncKind::Full);
    assert_flows(&k, WEB, DNS);
    // Nothing changed: one generation query, no commit.
    let before = commits(&k);
    assert_eq!(e.sync(&cluster(WEB, DNS)).unwrap().kind, SyncKind::Unchanged);
    assert_eq!(commits(&k), before);
    // web's slice changes: only web's chains are in the plan.
    let changed: BTreeSet<ServiceId> = [ServiceId::new("default", "web")].into();
    let o = e.sync_changed(&cluster(&["10.244.1.2", "10.244.1.4"], DNS), Some(&changed)).unwrap();
    assert_eq!(o.kind, SyncKind::Partial);
    assert!(o.plan.touched_chains().iter().all(|c| c.contains("/default/web/")), "{}", o.plan);
    assert_flows(&k, &["10.244.1.2", "10.244.1.4"], DNS);
}

#[test]
fn a_foreign_commit_means_a_full_sync_that_repairs_only_what_drifted() {
    let k = FakeKernel::default();
    let mut e = Engine::new(k.clone(), opts(1));
    e.sync(&cluster(WEB, DNS)).unwrap();
    // Someone points web's first endpoint chain at db's pod, keeping everything else.
    let ep = "ep4/default/web/tcp/80/10.244.1.2/8080";
    k.foreign(|s| {
        let chain = s.ruleset.chains.get_mut(ep).unwrap();
        let label = chain.rules[0].label.clone();
        let addr: IpAddr = "10.244.2.1".parse().unwrap();
        chain.rules = vec![Rule::new(&label, vec![Stmt::Dnat { addr, port: 8080 }])].into();
    });
    assert_eq!(flow(&k, "10.96.0.80", Protocol::Tcp, 80), set(&["10.244.1.3", "10.244.2.1"]));
    let o = e.sync(&cluster(WEB, DNS)).unwrap();
    assert_eq!(o.kind, SyncKind::Full);
    assert_eq!(o.plan.touched_chains().into_iter().collect::<Vec<_>>(), [ep], "{}", o.plan);
    assert_flows(&k, WEB, DNS);
    // A policy drop set by someone else is reset in place.
    k.foreign(|s| {
        s.policies.insert("filter-forward".into(), 0);
    });
    let o = e.sync(&cluster(WEB, DNS)).unwrap();
    assert!(o.plan.ops.iter().any(|op| matches!(op, Op::UpdateChain { name, .. } if name == "filter-forward")));
    assert!(k.with(|s| s.policies.is_empty()));
}

#[test]
fn a_rejected_transaction_keeps_the_old_rules_and_the_next_sync_is_full() {
    let k = FakeKernel::default();
    let mut e = Engine::new(k.clone(), opts(1));
    e.sync(&cluster(WEB, DNS)).unwrap();
    let held = k.ruleset();
    k.with(|s| s.reject_next = Some(libc::EINVAL));
    let changed: BTreeSet<ServiceId> = [ServiceId::new("default", "web")].into();
    let err = e.sync_changed(&cluster(&["10.244.1.9"], DNS), Some(&changed)).unwrap_err();
    assert!(err.to_string().contains("rejected"), "{err}");
    assert_eq!(k.ruleset(), held, "nothing of it was committed");
    assert_flows(&k, WEB, DNS);
    // The caller's hint is no longer trusted: a full sync brings the kernel to the snapshot.
    let o = e.sync_changed(&cluster(&["10.244.1.9"], DNS), Some(&BTreeSet::new())).unwrap();
    assert_eq!(o.kind, SyncKind::Full);
    assert_flows(&k, &["10.244.1.9"], DNS);
}

#[test]
fn a_restart_over_rules_it_left_sends_nothing_and_one_after_a_foreign_commit_sends_the_difference() {
    let k = FakeKernel::default();
    Engine::new(k.clone(), opts(1)).sync(&cluster(WEB, DNS)).unwrap();
    let before = commits(&k);
    let o = Engine::new(k.clone(), opts(1)).sync(&cluster(WEB, DNS)).unwrap();
    assert_eq!((o.kind, o.plan.is_empty(), commits(&k)), (SyncKind::Full, true, before), "verified, nothing sent");
    // Another program commits (its own table) while we are away: read back, send only the record.
    k.foreign(|_| {});
    let o = Engine::new(k.clone(), opts(1)).sync(&cluster(WEB, DNS)).unwrap();
    assert!(o.plan.touched_chains().is_empty(), "{}", o.plan);
    assert_flows(&k, WEB, DNS);
}

#[test]
fn shards_appear_and_disappear_and_serve_the_same() {
    let k = FakeKernel::default();
    Engine::new(k.clone(), opts(1)).sync(&cluster(WEB, DNS)).unwrap();
    Engine::new(k.clone(), opts(3)).sync(&cluster(WEB, DNS)).unwrap();
    let tables = k.with(|s| s.tables.keys().cloned().collect::<Vec<_>>());
    assert_eq!(tables, ["nftproxy", "nftproxy-1", "nftproxy-2"]);
    assert_flows(&k, WEB, DNS);
    Engine::new(k.clone(), opts(1)).sync(&cluster(WEB, DNS)).unwrap();
    assert_eq!(k.with(|s| s.tables.keys().cloned().collect::<Vec<_>>()), ["nftproxy"]);
    assert_flows(&k, WEB, DNS);
}

#[test]
fn a_lost_answer_or_a_failed_generation_read_after_a_commit_loses_only_the_shortcut() {
    let k = FakeKernel::default();
    let mut e = Engine::new(k.clone(), opts(1));
    e.sync(&cluster(WEB, DNS)).unwrap();
    // The commit's answer is lost: reported as a failure, but the kernel has the new rules; the
    // next sync reads back and finds nothing to change but the record.
    k.with(|s| s.lose_next_ack = true);
    assert!(e.sync(&cluster(&["10.244.1.7"], DNS)).is_err());
    assert_flows(&k, &["10.244.1.7"], DNS);
    let o = e.sync(&cluster(&["10.244.1.7"], DNS)).unwrap();
    assert_eq!(o.kind, SyncKind::Full);
    assert!(o.plan.touched_chains().is_empty(), "{}", o.plan);
    // The generation query after a commit fails: the sync still counts as committed (its
    // conntrack cleanup runs), and the next one is full.
    k.with(|s| {
        s.fail_generation_after_commit = true;
        s.flows = vec![udp_flow("10.244.3.1"), udp_flow("10.244.3.2")];
    });
    let o = e.sync(&cluster(&["10.244.1.7"], &["10.244.3.2"])).unwrap();
    assert_eq!(o.conntrack_deleted, 1, "the removed endpoint's flow went");
    assert_eq!(k.with(|s| s.flows.clone()), [udp_flow("10.244.3.2")]);
    assert_eq!(e.sync(&cluster(&["10.244.1.7"], &["10.244.3.2"])).unwrap().kind, SyncKind::Full);
    assert_flows(&k, &["10.244.1.7"], &["10.244.3.2"]);
}

fn udp_flow(endpoint: &str) -> FlowKey {
    FlowKey {
        protocol: Protocol::Udp.number(),
        orig_dst: "10.96.0.53".parse().unwrap(),
        orig_dport: 53,
        reply_src: endpoint.parse().unwrap(),
        reply_sport: 5353,
    }
}

fn tables_read(k: &FakeKernel) -> Vec<usize> {
    k.with(|s| s.tables_read.clone())
}

/// The table web lives in with `shards` tables.
fn web_table(shards: u32) -> String {
    nftproxy::ruleset::shard_table(opts(shards).shard_of(&ServiceId::new("default", "web")))
}

#[test]
fn commits_by_others_to_their_own_tables_cost_no_read_back() {
    let k = FakeKernel::with_monitor();
    let mut e = Engine::new(k.clone(), opts(3));
    e.sync(&cluster(WEB, DNS)).unwrap();
    let reads = tables_read(&k);
    // A neighbour commits to its table, three times; then web's slice changes.
    for _ in 0..3 {
        k.foreign(|_| {});
    }
    assert_eq!(e.sync(&cluster(WEB, DNS)).unwrap().kind, SyncKind::Unchanged);
    k.foreign(|_| {});
    let changed: BTreeSet<ServiceId> = [ServiceId::new("default", "web")].into();
    let o = e.sync_changed(&cluster(&["10.244.1.2", "10.244.1.4"], DNS), Some(&changed)).unwrap();
    assert_eq!((o.kind, o.tables_read.len()), (SyncKind::Partial, 0));
    assert_eq!(tables_read(&k), reads, "nothing was read back");
    assert_flows(&k, &["10.244.1.2", "10.244.1.4"], DNS);
}

#[test]
fn a_commit_by_another_program_to_one_of_our_tables_reads_back_that_table_only() {
    let k = FakeKernel::with_monitor();
    let mut e = Engine::new(k.clone(), opts(3));
    e.sync(&cluster(WEB, DNS)).unwrap();
    // `nft delete rule`: web's first endpoint chain loses its dnat.
    let table = web_table(3);
    let ep = nftproxy::ruleset::qualify(
        opts(3).shard_of(&ServiceId::new("default", "web")),
        "ep4/default/web/tcp/80/10.244.1.2/8080",
    );
    k.foreign(|s| s.ruleset.chains.get_mut(&ep).unwrap().rules = Vec::new().into());
    // A neighbour's commit and a change to dns come along in the same sync.
    k.foreign(|_| {});
    let changed: BTreeSet<ServiceId> = [ServiceId::new("default", "dns")].into();
    let o = e.sync_changed(&cluster(WEB, &["10.244.3.1"]), Some(&changed)).unwrap();
    assert_eq!(o.kind, SyncKind::Full);
    assert_eq!(o.tables_read, [table], "{}", o.plan);
    assert_eq!(tables_read(&k).last(), Some(&1));
    assert!(o.plan.touched_chains().contains(ep.as_str()), "{}", o.plan);
    assert_flows(&k, WEB, &["10.244.3.1"]);
    // Trusted again afterwards.
    assert_eq!(e.sync(&cluster(WEB, &["10.244.3.1"])).unwrap().kind, SyncKind::Unchanged);
}

#[test]
fn lost_events_or_no_monitor_mean_a_read_back_of_every_table() {
    for monitor in [true, false] {
        let k = FakeKernel::default();
        k.with(|s| s.monitor = monitor);
        let mut e = Engine::new(k.clone(), opts(3));
        e.sync(&cluster(WEB, DNS)).unwrap();
        k.foreign(|s| s.events_lost = true);
        let o = e.sync(&cluster(WEB, DNS)).unwrap();
        assert_eq!((o.kind, o.tables_read.len()), (SyncKind::Full, 3), "monitor {monitor}");
        assert!(o.plan.touched_chains().is_empty(), "{}", o.plan);
    }
}

#[test]
fn a_restart_after_one_service_changed_reads_back_only_the_tables_it_changes() {
    let k = FakeKernel::with_monitor();
    Engine::new(k.clone(), opts(3)).sync(&cluster(WEB, DNS)).unwrap();
    // A new process (the next --sync-once) with web's endpoints changed: web's table differs
    // from the record; the other two are verified.
    let moved = cluster(&["10.244.1.2", "10.244.1.4"], DNS);
    let o = Engine::new(k.clone(), opts(3)).sync(&moved).unwrap();
    let want: BTreeSet<String> = [web_table(3)].into();
    assert_eq!(o.tables_read.iter().cloned().collect::<BTreeSet<_>>(), want, "{}", o.plan);
    assert!(o.plan.touched_chains().iter().all(|c| c.contains("/default/web/")), "{}", o.plan);
    assert_flows(&k, &["10.244.1.2", "10.244.1.4"], DNS);
    // The record now matches: the next process reads nothing.
    let o = Engine::new(k.clone(), opts(3)).sync(&moved).unwrap();
    assert!(o.tables_read.is_empty() && o.plan.is_empty(), "{}", o.plan);
    // Someone edits our table between two runs: the generation moved, everything is read back.
    k.foreign(|s| s.policies.insert("filter-forward".into(), 0).map(|_| ()).unwrap_or(()));
    let o = Engine::new(k.clone(), opts(3)).sync(&moved).unwrap();
    assert_eq!(o.tables_read.len(), 3);
    assert!(k.with(|s| s.policies.is_empty()), "repaired");
}

#[test]
fn a_restart_reading_back_one_table_keeps_the_services_of_the_others() {
    // Four tables: web in the third, db and dns in two tables that are not read back.
    let o = opts(4);
    let shard = |name: &str| o.shard_of(&ServiceId::new("default", name));
    assert_eq!([shard("web"), shard("db"), shard("dns")], [3, 1, 2]);
    let k = FakeKernel::with_monitor();
    Engine::new(k.clone(), o.clone()).sync(&cluster(WEB, DNS)).unwrap();
    let moved = cluster(&["10.244.1.2", "10.244.1.4"], DNS);
    let out = Engine::new(k.clone(), o.clone()).sync(&moved).unwrap();
    let want: BTreeSet<String> = [web_table(4)].into();
    assert_eq!(out.tables_read.iter().cloned().collect::<BTreeSet<_>>(), want, "{}", out.plan);
    // Exactly what a fresh compile makes: db's and dns's objects (tables not read) stay.
    assert_eq!(comparable(k.ruleset()), comparable(nftproxy::compile::compile(&moved, &o)), "{}", out.plan);
}

#[test]
fn a_read_back_of_everything_goes_table_by_table_repairs_each_and_drops_the_unused() {
    let k = FakeKernel::default();
    Engine::new(k.clone(), opts(4)).sync(&cluster(WEB, DNS)).unwrap();
    // Between two runs: web's first endpoint chain is emptied (its table, nftproxy-3) and so is
    // the main table's postrouting chain (read last).
    let ep = nftproxy::ruleset::qualify(3, "ep4/default/web/tcp/80/10.244.1.2/8080");
    k.foreign(|s| s.ruleset.chains.get_mut(&ep).unwrap().rules = Vec::new().into());
    k.foreign(|s| s.ruleset.chains.get_mut("nat-postrouting").unwrap().rules = Vec::new().into());
    let reads = tables_read(&k).len();
    let o = Engine::new(k.clone(), opts(4)).sync(&cluster(WEB, DNS)).unwrap();
    assert_eq!(o.tables_read, ["nftproxy", "nftproxy-1", "nftproxy-2", "nftproxy-3"], "{}", o.plan);
    assert_eq!(tables_read(&k)[reads..], [1, 1, 1, 1], "one table per read");
    assert_eq!(comparable(k.ruleset()), comparable(nftproxy::compile::compile(&cluster(WEB, DNS), &opts(4))));
    // Three tables from now on: the fourth goes whole, and the Services move.
    k.foreign(|_| {});
    let o = Engine::new(k.clone(), opts(3)).sync(&cluster(WEB, DNS)).unwrap();
    assert!(o.plan.ops.contains(&Op::DelTable("nftproxy-3".into())), "{}", o.plan);
    assert_eq!(comparable(k.ruleset()), comparable(nftproxy::compile::compile(&cluster(WEB, DNS), &opts(3))));
    assert_flows(&k, WEB, DNS);
}

#[test]
fn conntrack_is_read_only_when_a_change_can_strand_a_udp_flow() {
    let k = FakeKernel::default();
    let mut e = Engine::new(k.clone(), opts(1));
    let reads = || k.with(|s| s.conntrack_reads);
    // The first sync of a process cannot know what went away while no agent ran: it reads.
    e.sync(&cluster(WEB, &["10.244.3.1"])).unwrap();
    let first = reads();
    assert!(first >= 1);
    // A UDP endpoint added, TCP endpoints changed, a drift repair: nothing can be stale.
    e.sync(&cluster(WEB, DNS)).unwrap();
    e.sync(&cluster(&["10.244.1.7"], DNS)).unwrap();
    k.foreign(|s| s.ruleset.chains.clear());
    assert_eq!(e.sync(&cluster(&["10.244.1.7"], DNS)).unwrap().kind, SyncKind::Full);
    assert_eq!(reads(), first, "no conntrack read without a UDP endpoint gone");
    assert_flows(&k, &["10.244.1.7"], DNS);
    // A UDP endpoint goes: one read, its flow deleted.
    k.with(|s| s.flows = vec![udp_flow("10.244.3.1"), udp_flow("10.244.3.2")]);
    let o = e.sync(&cluster(&["10.244.1.7"], &["10.244.3.2"])).unwrap();
    assert_eq!(reads(), first + 1);
    assert_eq!(o.conntrack_deleted, 1);
    assert_eq!(k.with(|s| s.flows.clone()), [udp_flow("10.244.3.2")]);
}

/// web and db share the load-balancer IP 203.0.113.7 (web on 80, db on 5432), which is also
/// one of this node's addresses in `node_shared`; 192.0.2.1 is the node's.
fn sharing(with_web: bool, with_db: bool) -> Snapshot {
    let mut snap = cluster(WEB, DNS);
    for (name, keep) in [("web", with_web), ("db", with_db)] {
        let id = ServiceId::new("default", name);
        if keep {
            let svc = snap.services.get_mut(&id).unwrap();
            svc.external.load_balancer_ips = vec!["203.0.113.7".parse().unwrap()];
            svc.ports[0].node_port = Some(if name == "web" { 30080 } else { 30432 });
        } else {
            snap.services.remove(&id);
        }
    }
    snap
}

/// A ruleset without the state record, elements in order: what two ways of building it share.
fn comparable(mut rs: nftproxy::ruleset::Ruleset) -> nftproxy::ruleset::Ruleset {
    rs.sets.remove("state");
    rs.sets.values_mut().for_each(|s| s.elements.sort());
    rs
}

/// Where a connection from outside the cluster goes.
fn outside(k: &FakeKernel, dst: &str, dport: u16) -> BTreeSet<String> {
    flow_from(k, "198.51.100.9", dst, Protocol::Tcp, dport)
}

#[test]
fn an_address_two_services_share_stays_in_the_gate_until_the_last_one_goes() {
    for (shards, node_ips) in [(1, vec!["192.0.2.1"]), (3, vec!["192.0.2.1"]), (1, vec!["192.0.2.1", "203.0.113.7"])] {
        let k = FakeKernel::default();
        let o = Options { node_ips: node_ips.iter().map(|ip| ip.parse().unwrap()).collect(), ..opts(shards) };
        let mut e = Engine::new(k.clone(), o.clone());
        let both = sharing(true, true);
        e.sync(&both).unwrap();
        let ctx = format!("{shards} tables, node addresses {node_ips:?}");
        assert_eq!(outside(&k, "203.0.113.7", 80), set(WEB), "{ctx}");
        assert_eq!(outside(&k, "203.0.113.7", 5432), set(&["10.244.2.1"]), "{ctx}");
        assert_eq!(outside(&k, "192.0.2.1", 30432), set(&["10.244.2.1"]), "{ctx}");
        // web goes, by a partial sync: db keeps the address.
        let web: BTreeSet<ServiceId> = [ServiceId::new("default", "web")].into();
        let o1 = e.sync_changed(&sharing(false, true), Some(&web)).unwrap();
        assert_eq!(o1.kind, SyncKind::Partial, "{ctx}");
        assert_eq!(outside(&k, "203.0.113.7", 5432), set(&["10.244.2.1"]), "{ctx}: db lost the shared address");
        assert_eq!(outside(&k, "203.0.113.7", 80), set(&["Untouched"]), "{ctx}");
        let compiled = nftproxy::compile::compile(&sharing(false, true), e.options());
        assert_eq!(comparable(k.ruleset()), comparable(compiled), "{ctx}");
        // db goes too: the address leaves the gate, unless it is the node's own.
        let db: BTreeSet<ServiceId> = [ServiceId::new("default", "db")].into();
        e.sync_changed(&sharing(false, false), Some(&db)).unwrap();
        assert_eq!(outside(&k, "203.0.113.7", 5432), set(&["Untouched"]), "{ctx}");
        let gate = k.with(|s| format!("{:?}", s.ruleset.sets["addresses-v4"].elements));
        assert_eq!(gate.contains("[203, 0, 113, 7]"), node_ips.contains(&"203.0.113.7"), "{ctx}: {gate}");
        let compiled = nftproxy::compile::compile(&sharing(false, false), e.options());
        assert_eq!(comparable(k.ruleset()), comparable(compiled), "{ctx}");
        // A restart over these rules verifies them: the gate's digests match.
        let o2 = Engine::new(k.clone(), o).sync(&sharing(false, false)).unwrap();
        assert!(o2.plan.is_empty(), "{ctx}: {}", o2.plan);
    }
}

/// Every flow of `cluster` as a pod sees it.
fn no_flow_reaches_our_rules(k: &FakeKernel) {
    for (dst, proto, port) in
        [("10.96.0.80", Protocol::Tcp, 80), ("10.96.0.81", Protocol::Tcp, 5432), ("10.96.0.53", Protocol::Udp, 53)]
    {
        assert_eq!(flow(k, dst, proto, port), set(&["Untouched"]), "{dst}");
    }
}

#[test]
fn a_big_first_sync_goes_in_stages_that_no_packet_reaches_until_the_last() {
    let snap = cluster(WEB, DNS);
    for shards in [1, 3] {
        // The same rules in one transaction, for comparison.
        let one = FakeKernel::default();
        Engine::new(one.clone(), opts(shards)).sync(&snap).unwrap();
        assert_eq!(commits(&one), 1);

        // Staged: one Service's objects per transaction.
        let k = FakeKernel::default();
        let mut e = Engine::new(k.clone(), opts(shards));
        e.set_staging(0, 1);
        let o = e.sync(&snap).unwrap();
        let stages = commits(&k);
        let expected = 1 + 1 + snap.services.len() + 1;
        assert_eq!(stages, expected, "skeleton, the gate's elements, each Service, the hooks: {}", o.plan);
        assert_eq!(comparable(k.ruleset()), comparable(one.ruleset()), "{shards} tables");
        assert_flows(&k, WEB, DNS);
        // Only the last transaction touches a base chain.
        k.with(|s| {
            for (i, plan) in s.committed.iter().enumerate() {
                let hooks = plan.ops.iter().any(|op| matches!(op, Op::AddChain { base: Some(_), .. }));
                assert_eq!(hooks, i + 1 == stages, "transaction {i}: {plan}");
            }
        });
        // The state record counts every stage: a restart verifies and sends nothing; the engine
        // trusts its generation (the next change is partial).
        Engine::new(k.clone(), opts(shards)).sync(&snap).unwrap();
        assert_eq!(commits(&k), stages, "a restart over a staged first sync sends nothing");
        let o = e.sync(&cluster(&WEB[..1], DNS)).unwrap();
        assert_eq!(o.kind, SyncKind::Partial);
        assert_flows(&k, &WEB[..1], DNS);

        // Any stage rejected: what the ones before it committed reaches nothing, and the next
        // sync (a read-back) completes it.
        for failing in 0..stages {
            let k = FakeKernel::default();
            k.with(|s| s.reject_later = Some((failing, libc::EINVAL)));
            let mut e = Engine::new(k.clone(), opts(shards));
            e.set_staging(0, 1);
            assert!(e.sync(&snap).is_err(), "stage {failing} rejected");
            assert_eq!(commits(&k), failing);
            no_flow_reaches_our_rules(&k);
            e.sync(&snap).unwrap();
            assert_eq!(comparable(k.ruleset()), comparable(one.ruleset()), "after stage {failing} failed");
            assert_flows(&k, WEB, DNS);
        }
    }
}
