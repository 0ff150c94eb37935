//! The sync against a real kernel: smallest changes, drift repair, atomicity, other tables left
//! alone, bad input rejected before anything is applied.

mod common;

use std::collections::BTreeMap;

use common::*;

/// `n` Services svc-0..svc-(n-1), each with two endpoints from an EndpointSlice; the endpoint
/// list of Service `changed` (if any) is replaced.
fn many_services(n: usize, changed: Option<usize>) -> String {
    let mut y = String::new();
    for i in 0..n {
        let second = if Some(i) == changed { "10.244.1.4" } else { "10.244.1.3" };
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports: [{{name: http, port: 80}}]\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.244.1.2]}}, {{addresses: [{second}]}}]\n",
            10 + i / 250,
            1 + i % 250
        ));
    }
    y
}

/// Chain name -> its block in an `nft -a list` listing (rules with their handles).
fn chain_blocks(listing: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in listing.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("chain ") {
            if let Some((n, b)) = current.take() {
                out.insert(n, b);
            }
            current = Some((rest.split(" {").next().unwrap().trim_matches('"').to_string(), String::new()));
        } else if t == "}" {
            if let Some((n, b)) = current.take() {
                out.insert(n, b);
            }
        } else if let Some((_, b)) = current.as_mut() {
            b.push_str(t);
            b.push('\n');
        }
    }
    if let Some((n, b)) = current {
        out.insert(n, b);
    }
    out
}

fn cluster() -> Option<Cluster> {
    can_run_netns_tests().then(|| Cluster::new(demo_pods()))
}

#[test]
fn an_unchanged_input_changes_nothing_in_the_kernel() {
    let Some(c) = cluster() else { return };
    let m = c.write("m.yaml", &many_services(20, None));
    c.sync(&m, &[]);
    let before = c.nft_list("inet nftproxy");
    c.sync(&m, &[]);
    assert_eq!(c.nft_list("inet nftproxy"), before, "a second sync must not touch the kernel");
    let dry = c.exec_ok("node", &[NFTPROXY, "--sync-once", "--dry-run", "--manifests", m.to_str().unwrap()]);
    assert_eq!(dry.trim(), "no change");
}

#[test]
fn one_changed_endpoint_rewrites_only_that_service() {
    let Some(c) = cluster() else { return };
    let m = c.write("m.yaml", &many_services(50, None));
    c.sync(&m, &[]);
    let before = chain_blocks(&c.nft_list("inet nftproxy"));
    c.write("m.yaml", &many_services(50, Some(17)));
    let dry = c.exec_ok("node", &[NFTPROXY, "--sync-once", "--dry-run", "--manifests", m.to_str().unwrap()]);
    for line in dry.lines() {
        assert!(line.contains("/default/svc-17/"), "change outside svc-17: {line}\n{dry}");
    }
    c.sync(&m, &[]);
    let after = chain_blocks(&c.nft_list("inet nftproxy"));
    let mut touched = Vec::new();
    for (name, block) in &before {
        if after.get(name) != Some(block) {
            touched.push(name.clone());
        }
    }
    touched.extend(after.keys().filter(|n| !before.contains_key(*n)).cloned());
    touched.sort();
    assert_eq!(
        touched,
        [
            "ep4/default/svc-17/tcp/80/10.244.1.3/8080",
            "ep4/default/svc-17/tcp/80/10.244.1.4/8080",
            "svc4/default/svc-17/tcp/80",
        ],
        "only svc-17's chains may change (handles of all others stay)"
    );
}

#[test]
fn objects_someone_changed_or_deleted_are_put_back() {
    let Some(mut c) = cluster() else { return };
    for pod in ["web-a", "web-b", "web-c"] {
        c.serve(pod, pod, &[8080], &[5353]);
    }
    let m = demo_manifests();
    c.sync(&m, &[]);
    let pristine = c.nft_list("inet nftproxy").lines().filter(|l| !l.contains("# handle")).count();
    c.nft("delete element inet nftproxy service-ips-v4 { 10.96.0.80 . tcp . 80 }");
    c.nft("flush chain inet nftproxy svc4/default/web/udp/53");
    c.nft("add rule inet nftproxy ep4/default/web/tcp/80/10.244.1.2/8080 drop");
    c.nft("add chain inet nftproxy intruder");
    c.nft("delete element inet nftproxy addresses-v4 { 10.96.0.99 }");
    assert!(c.probe("client", "tcp", "10.96.0.80:80", 3).keys().all(|k| k.starts_with("error")));
    c.sync(&m, &[]);
    let listing = c.nft_list("inet nftproxy");
    let blocks = chain_blocks(&listing);
    assert!(!blocks.contains_key("intruder"), "{listing}");
    assert!(!blocks["ep4/default/web/tcp/80/10.244.1.2/8080"].contains("drop"), "{listing}");
    let dry = c.exec_ok("node", &[NFTPROXY, "--sync-once", "--dry-run", "--manifests", m.to_str().unwrap()]);
    assert_eq!(dry.trim(), "no change");
    assert_eq!(listing.lines().filter(|l| !l.contains("# handle")).count(), pristine);
    let got = c.probe("client", "tcp", "10.96.0.80:80", 30);
    assert!(got.keys().all(|k| k.starts_with("web-")) && got.len() == 3, "{got:?}");
    assert_eq!(c.probe("client", "udp", "10.96.0.80:53", 30).values().sum::<usize>(), 30);
    assert_eq!(c.probe("client", "tcp", "10.96.0.99:80", 1).get("error: connection refused"), Some(&1));
}

#[test]
fn a_rejected_transaction_leaves_the_previous_rules_in_place() {
    use nftproxy::plan::Op;
    use nftproxy::ruleset::{Rule, Stmt};
    let Some(c) = cluster() else { return };
    let m = c.write("m.yaml", &many_services(5, None));
    c.sync(&m, &[]);
    let before = c.nft_list("inet nftproxy");
    // A real change (svc-3 gets a new endpoint) plus one rule the kernel refuses: a jump to a
    // chain that does not exist. The kernel must roll back the whole transaction.
    let m2 = c.write("m2.yaml", &many_services(5, Some(3)));
    let node = c.node();
    let err = in_netns(&node, move || {
        let objects = nftproxy::source::manifest::load(&[m2]).unwrap();
        let snapshot = nftproxy::source::resolve::resolve(&objects, &Default::default()).unwrap();
        let want = nftproxy::compile::compile(&snapshot, &Default::default());
        let mut nl = nftproxy::nft::Netlink::open().unwrap();
        let mut plan = nftproxy::plan::plan(&nl.read_table().unwrap(), want);
        assert!(plan.touched_chains().iter().any(|c| c.contains("svc-3")));
        plan.ops.push(Op::AddRules {
            chain: "svc4/default/svc-3/tcp/80".into(),
            rules: vec![Rule::new(
                &"default/svc-3".into(),
                vec![Stmt::Goto("ep4/default/svc-3/tcp/80/missing".into())],
            )]
            .into(),
        });
        nl.apply(&plan).unwrap_err().to_string()
    });
    assert!(err.contains("svc4/default/svc-3/tcp/80") && err.contains("nothing was changed"), "{err}");
    assert_eq!(c.nft_list("inet nftproxy"), before, "the kernel kept the previous rules");
}

const FOREIGN: &str = r#"
table ip foreign {
    set allowed {
        type ipv4_addr
        elements = { 192.0.2.7 }
    }
    chain input {
        type filter hook input priority 0; policy accept;
        ip saddr @allowed counter accept
        tcp dport 22 accept
    }
    chain nat-prerouting {
        type nat hook prerouting priority -110;
        ip daddr 203.0.113.1 dnat to 192.0.2.2
    }
}
table inet nftproxy-lookalike {
    chain services {
        counter
    }
}
"#;

#[test]
fn other_tables_are_never_touched_and_cleanup_removes_only_ours() {
    let Some(c) = cluster() else { return };
    let f = c.write("foreign.nft", FOREIGN);
    c.exec_ok("node", &["nft", "-f", f.to_str().unwrap()]);
    let foreign = || (c.nft_list("ip foreign"), c.nft_list("inet nftproxy-lookalike"));
    let before = foreign();
    c.sync(&demo_manifests(), &["--cluster-cidr", "10.244.0.0/16"]);
    assert_eq!(foreign(), before);
    c.sync(&c.write("m.yaml", &many_services(3, None)), &[]);
    assert_eq!(foreign(), before);
    let out = c.exec_ok("node", &[NFTPROXY, "--cleanup"]);
    assert!(out.contains("removed table inet nftproxy"), "{out}");
    assert!(!c.has_table());
    assert_eq!(foreign(), before);
    let out = c.exec_ok("node", &[NFTPROXY, "--cleanup"]);
    assert!(out.contains("nothing to remove"), "{out}");
}

const GOOD: &str =
    "apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n";

#[test]
fn bad_manifests_are_reported_and_nothing_is_applied() {
    let Some(c) = cluster() else { return };
    let good = c.write("good.yaml", GOOD);
    c.sync(&good, &[]);
    let before = c.nft_list("inet nftproxy");
    let svc = |spec: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {spec}\n");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (svc("{clusterIP: 10.96.0.300, ports: [{port: 80}]}"), vec!["Service default/bad", "spec.clusterIP", "not an IP address"]),
        (svc("{ports: [{port: 0}]}"), vec!["Service default/bad", "spec.ports[0].port", "port 0 is out of range"]),
        (svc("{ports: [{port: 70000}]}"), vec!["spec.ports[0].port", "70000"]),
        (svc("{ports: [{port: 80, protocol: ICMP}]}"), vec!["spec.ports[0].protocol", "ICMP"]),
        (svc("{ports: [{name: a, port: 80}, {name: a, port: 81}]}"), vec!["spec.ports[1].name", "duplicate port name"]),
        (svc("{ports: [{port: eighty}]}"), vec!["Service default/bad", "spec.ports[0].port"]),
        (svc("{clusterIP: 10.96.0.5, ports: [{port: 80}]}"), vec!["10.96.0.5", "default/good", "unique"]),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: ghost}\nspec: {selector: {app: x}, ports: [{port: 80}]}\n".into(),
            vec!["Service ghost/bad", "metadata.namespace", "ghost"],
        ),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: [bad\n".into(), vec!["malformed YAML"]),
    ];
    for (yaml, expect) in cases {
        let bad = c.write("bad.yaml", &yaml);
        let out =
            c.nftproxy(&["--sync-once", "--manifests", good.to_str().unwrap(), "--manifests", bad.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{yaml}");
        assert!(stderr.contains("bad.yaml (document"), "no file named: {stderr}");
        for e in expect {
            assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}\nfor:\n{yaml}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(c.nft_list("inet nftproxy"), before, "nothing may be applied from invalid input:\n{yaml}");
    }
    // An unknown kind is skipped with a warning, the rest is applied.
    let other = c.write("other.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
    let out =
        c.nftproxy(&["--sync-once", "--manifests", good.to_str().unwrap(), "--manifests", other.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipping object of a kind"));
}

fn tables(c: &Cluster) -> Vec<String> {
    let out = c.exec_ok("node", &["nft", "list", "tables"]);
    out.lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .filter(|t| t.starts_with("nftproxy"))
        .map(str::to_string)
        .collect()
}

#[test]
fn table_shards_serve_the_same_and_a_change_touches_one_table() {
    let Some(mut c) = cluster() else { return };
    for pod in ["web-a", "web-b", "web-c"] {
        c.serve(pod, pod, &[8080], &[]);
    }
    let m = c.write("m.yaml", &many_services(12, None));
    c.sync(&m, &["--table-shards", "4"]);
    assert_eq!(tables(&c), ["nftproxy", "nftproxy-1", "nftproxy-2", "nftproxy-3"]);
    // Every Service answers, whichever table holds it; an unknown port is refused.
    for i in 0..12 {
        let vip = format!("10.96.10.{}:80", 1 + i);
        let got = c.probe("client", "tcp", &vip, 4);
        assert!(got.keys().all(|k| k == "web-a" || k == "web-b"), "{vip}: {got:?}");
        assert_eq!(
            c.probe("client", "tcp", &format!("10.96.10.{}:81", 1 + i), 1).get("error: connection refused"),
            Some(&1)
        );
    }
    let listings =
        |c: &Cluster| -> Vec<String> { tables(c).iter().map(|t| c.nft_list(&format!("inet {t}"))).collect() };
    let before = listings(&c);
    c.sync(&m, &["--table-shards", "4"]);
    assert_eq!(listings(&c), before, "an unchanged input must not touch any table");
    // Someone else commits (the generation moves): the sync reads every shard back, finds
    // nothing to change and sends only its state record (one element out, one in).
    c.nft("add table ip someone-else");
    let out = c.nftproxy(&["--sync-once", "--manifests", m.to_str().unwrap(), "--table-shards", "4"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && log.contains("kind=Full") && log.contains("messages=2 "), "{log}");
    assert!(listings(&c)[1..] == before[1..], "a read-back resync must not touch any shard table");
    // One Service changes: exactly one shard table changes (the Service's), plus the state
    // element in the main table.
    c.write("m.yaml", &many_services(12, Some(5)));
    c.sync(&m, &["--table-shards", "4"]);
    let after = listings(&c);
    let changed: Vec<usize> = (1..4).filter(|i| after[*i] != before[*i]).collect();
    assert_eq!(changed.len(), 1, "one shard table changed, not {changed:?}");
    assert!(after[changed[0]].contains("svc4/default/svc-5/tcp/80"));
    assert!(c.probe("client", "tcp", "10.96.10.6:80", 10).keys().all(|k| k == "web-a" || k == "web-c"));
    // Fewer shards: the extra tables go, everything still answers.
    c.sync(&m, &["--table-shards", "2"]);
    assert_eq!(tables(&c), ["nftproxy", "nftproxy-1"]);
    for i in 0..12 {
        assert!(c.probe("client", "tcp", &format!("10.96.10.{}:80", 1 + i), 2).keys().all(|k| k.starts_with("web-")));
    }
    let out = c.exec_ok("node", &[NFTPROXY, "--cleanup"]);
    assert!(out.contains("and 1 shard tables"), "{out}");
    assert!(tables(&c).is_empty());
}

/// Services svc-0..svc-(n-1) built directly as models; `moved` gives Service i a new endpoint.
fn models(n: usize, moved: Option<usize>) -> nftproxy::model::Snapshot {
    use nftproxy::model::{Endpoint, Protocol, Service, ServiceId, ServicePort};
    let mut snap = nftproxy::model::Snapshot::default();
    for i in 0..n {
        let second = if Some(i) == moved { "10.244.1.4" } else { "10.244.1.3" };
        let endpoints = ["10.244.1.2", second].iter().map(|ip| Endpoint::ready(ip.parse().unwrap(), 8080)).collect();
        let port = ServicePort { name: "http".into(), port: 80, protocol: Protocol::Tcp, node_port: None, endpoints };
        let id = ServiceId::new("default", format!("svc-{i}"));
        let vip = format!("10.96.10.{}", i + 1).parse().unwrap();
        snap.services.insert(id.clone(), Service::new(id, vec![vip], vec![port]));
    }
    snap
}

#[test]
fn a_sync_told_which_services_changed_applies_them_and_stops_trusting_that_after_a_failure() {
    use nftproxy::model::{Service, ServiceId};
    use nftproxy::sync::{Engine, SyncKind};
    let Some(c) = cluster() else { return };
    let node = c.node();
    let svc = |i: usize| ServiceId::new("default", format!("svc-{i}"));
    let (kinds, err) = in_netns(&node, move || {
        let mut engine = Engine::new(nftproxy::kernel::LiveKernel::open().unwrap(), Default::default());
        engine.sync(&models(5, None)).unwrap();
        // Told that svc-3 changed: only it is compared, compiled and sent.
        let told = engine.sync_changed(&models(5, Some(3)), Some(&[svc(3)].into())).unwrap();
        // A Service whose chain name the kernel refuses (longer than 255 bytes): rolled back.
        let mut bad = models(5, Some(3));
        let long = ServiceId::new("default", "x".repeat(300));
        bad.services.insert(long.clone(), Service { id: long.clone(), ..bad.services[&svc(0)].clone() });
        bad.services.get_mut(&long).unwrap().cluster_ips = vec!["10.96.10.99".parse().unwrap()];
        let err = engine.sync_changed(&bad, Some(&[long].into())).unwrap_err().to_string();
        // After the failure the engine no longer trusts what it is told: svc-1 changed though
        // the caller names nothing, and the change is applied.
        let mut next = models(5, Some(3));
        next.services.get_mut(&svc(1)).unwrap().ports[0].endpoints[1].ip = "10.244.1.4".parse().unwrap();
        let after = engine.sync_changed(&next, Some(&Default::default())).unwrap();
        ((told.kind, told.services_changed, after.kind, after.services_changed), err)
    });
    assert_eq!(kinds, (SyncKind::Partial, 1, SyncKind::Full, 1), "{err}");
    assert!(err.contains("xxxx"), "the error names the chain: {err}");
    let listing = c.nft_list("inet nftproxy");
    let blocks = chain_blocks(&listing);
    for i in [1, 3] {
        let chain = format!("svc4/default/svc-{i}/tcp/80");
        assert!(blocks[&chain].contains("10.244.1.4"), "{chain}:\n{listing}");
    }
    assert!(!blocks["svc4/default/svc-2/tcp/80"].contains("10.244.1.4"), "{listing}");
    assert!(!listing.contains("xxxx"), "{listing}");
}

#[test]
fn auto_shards_pick_a_table_per_3000_chains_and_keep_them_across_a_restart() {
    let Some(c) = cluster() else { return };
    // 3,000 Services of two endpoints: 9,000 chains.
    let big = c.write("big.yaml", &many_services(3000, None));
    c.sync(&big, &[]);
    assert_eq!(tables(&c), ["nftproxy", "nftproxy-1", "nftproxy-2"]);
    // Run again (a restart) with a few Services more: same tables, nothing moved.
    let before = c.nft_list("inet nftproxy-1");
    let bigger = c.write("bigger.yaml", &many_services(3010, None));
    c.sync(&bigger, &[]);
    assert_eq!(tables(&c), ["nftproxy", "nftproxy-1", "nftproxy-2"]);
    let after = c.nft_list("inet nftproxy-1");
    let (before, after) = (chain_blocks(&before), chain_blocks(&after));
    let moved: Vec<&String> = before.iter().filter(|(n, b)| after.get(*n) != Some(b)).map(|(n, _)| n).collect();
    assert!(moved.is_empty() && before.len() > 1000, "every chain of nftproxy-1 kept with its handles: {moved:?}");
    // Far fewer Services: back to one table, and they still answer.
    let small = c.write("small.yaml", &many_services(3, None));
    c.sync(&small, &[]);
    assert_eq!(tables(&c), ["nftproxy"]);
    let got = c.probe("client", "tcp", "10.96.10.1:80", 10);
    assert_eq!(got.values().sum::<usize>(), 10, "{got:?}");
}

#[test]
fn rules_left_in_another_rule_format_are_rewritten_once_and_the_log_says_so() {
    use nftproxy::compile::{STATE_SET, parse_state_element, state_element};
    use nftproxy::nft::Netlink;
    use nftproxy::plan::{Op, Plan};
    use nftproxy::ruleset::{Rule, SetKind, Stmt};

    let Some(c) = cluster() else { return };
    let m = demo_manifests();
    c.sync(&m, &[]);
    let chain = "ep4/default/web/tcp/80/10.244.1.2/8080";
    // What an older release would leave: the same rule under its old comment (the rule's text),
    // and a state record that would verify (the generation this commit produces, the digest
    // we want) except that it names rule format 0.
    in_netns(&c.node(), move || {
        let mut nl = Netlink::open().unwrap();
        let generation = nl.generation().unwrap();
        let state = nl.read_elements(STATE_SET).unwrap().unwrap();
        let record = state.iter().find_map(parse_state_element).unwrap();
        let mut forged = state_element(generation.wrapping_add(1), record.digest);
        forged.key[4..8].copy_from_slice(&0u32.to_be_bytes());
        let old = Rule::new(
            &"dnat ip to 10.244.1.2:8080".into(),
            vec![Stmt::Dnat { addr: "10.244.1.2".parse().unwrap(), port: 8080 }],
        );
        let (set, kind) = (STATE_SET.to_string(), SetKind::State);
        let ops = vec![
            Op::FlushChain(chain.into()),
            Op::AddRules { chain: chain.into(), rules: vec![old].into() },
            Op::DelElements { set: set.clone(), kind, elements: state },
            Op::AddElements { set, kind, elements: vec![forged] },
        ];
        nl.apply(&Plan { ops }).unwrap();
        assert_eq!(nl.generation().unwrap(), generation.wrapping_add(1), "nobody else committed");
    });
    assert!(c.nft_list("inet nftproxy").contains("comment \"dnat ip to 10.244.1.2:8080\""));
    let out = c.nftproxy(&["--sync-once", "--manifests", m.to_str().unwrap()]);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("another rule format"), "{log}");
    let listing = c.nft_list("inet nftproxy");
    assert!(chain_blocks(&listing)[chain].contains("comment \"default/web\""), "{listing}");
    let dry = c.exec_ok("node", &[NFTPROXY, "--sync-once", "--dry-run", "--manifests", m.to_str().unwrap()]);
    assert_eq!(dry.trim(), "no change");
}

#[test]
fn a_second_sync_once_after_one_slice_changed_reads_back_only_its_tables_and_foreign_edits_are_still_repaired() {
    let Some(c) = cluster() else { return };
    let m = c.write("m.yaml", &many_services(60, None));
    let shards = ["--table-shards", "4"];
    c.sync(&m, &shards);
    let svc17 = nftproxy::model::ServiceId::new("default", "svc-17");
    let opts = nftproxy::compile::Options { table_shards: 4, ..Default::default() };
    let own = nftproxy::ruleset::shard_table(opts.shard_of(&svc17));
    let listings =
        || tables(&c).into_iter().map(|t| (t.clone(), c.nft_list(&format!("inet {t}")))).collect::<BTreeMap<_, _>>();
    let before = listings();
    assert_eq!(before.len(), 4);
    // svc-17's slice changes: a new process reads back svc-17's table alone, sends only
    // svc-17's change, and leaves the other tables as they were.
    c.write("m.yaml", &many_services(60, Some(17)));
    let out = c.nftproxy(&["--sync-once", "--manifests", m.to_str().unwrap(), "--table-shards", "4"]);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    let read: Vec<&str> = log.lines().filter(|l| l.contains("read back")).collect();
    let main = format!("\"{}\"", nftproxy::ruleset::TABLE);
    assert!(read.len() == 1 && read[0].contains(&format!("\"{own}\"")), "{log}");
    assert!(own == nftproxy::ruleset::TABLE || !read[0].contains(&main), "only svc-17's table is read: {log}");
    let after = listings();
    for (t, listing) in &before {
        if *t != own && t != nftproxy::ruleset::TABLE {
            assert_eq!(&after[t], listing, "table {t} must not change");
        }
    }
    let changed: Vec<String> = chain_blocks(&after[&own])
        .into_iter()
        .filter(|(n, b)| chain_blocks(&before[&own]).get(n) != Some(b))
        .map(|(n, _)| n)
        .collect();
    assert!(!changed.is_empty() && changed.iter().all(|n| n.contains("/default/svc-17/")), "{changed:?}");
    // Someone flushes another Service's chain between two runs: the generation moved, so the
    // next run reads every table back and repairs it.
    let victim = nftproxy::model::ServiceId::new("default", "svc-3");
    let vt = nftproxy::ruleset::shard_table(opts.shard_of(&victim));
    c.nft(&format!("flush chain inet {vt} svc4/default/svc-3/tcp/80"));
    let out = c.nftproxy(&["--sync-once", "--manifests", m.to_str().unwrap(), "--table-shards", "4"]);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(log.lines().any(|l| l.contains("read back") && l.matches("\"nftproxy").count() == 4), "{log}");
    let repaired = chain_blocks(&c.nft_list(&format!("inet {vt}")));
    assert!(repaired["svc4/default/svc-3/tcp/80"].contains("goto"), "{repaired:?}");
}

#[test]
fn a_first_sync_in_stages_serves_every_service_and_holds_exactly_the_wanted_rules() {
    let Some(mut c) = cluster() else { return };
    for pod in ["web-a", "web-b"] {
        c.serve(pod, pod, &[8080], &[]);
    }
    let m = c.write("m.yaml", &many_services(12, None));
    let sync_once = |c: &Cluster, env: &[&str]| {
        let mut args = vec!["env"];
        args.extend_from_slice(env);
        args.extend([NFTPROXY, "--sync-once", "--manifests", m.to_str().unwrap(), "--table-shards", "4"]);
        let out = c.exec("node", &args);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{log}");
        log
    };
    // Every stage one Service (the defaults stage only first syncs of 100,000 chains or more).
    let log = sync_once(&c, &["NFTPROXY_STAGE_ABOVE_CHAINS=0", "NFTPROXY_STAGE_MESSAGES=1"]);
    assert!(log.contains("first sync staged transactions=14 "), "the skeleton, the gate, then each Service: {log}");
    assert_eq!(tables(&c), ["nftproxy", "nftproxy-1", "nftproxy-2", "nftproxy-3"]);
    for i in 0..12 {
        let got = c.probe("client", "tcp", &format!("10.96.10.{}:80", 1 + i), 4);
        assert!(got.keys().all(|k| k == "web-a" || k == "web-b"), "svc-{i}: {got:?}");
        let refused = c.probe("client", "tcp", &format!("10.96.10.{}:81", 1 + i), 1);
        assert_eq!(refused.get("error: connection refused"), Some(&1), "svc-{i}");
    }
    // The state record counted every stage: a restart verifies without sending anything.
    let log = sync_once(&c, &[]);
    assert!(log.contains("messages=0 "), "{log}");
    // What the kernel holds is exactly what one transaction would have written: after someone
    // else's commit, a read-back of every table finds nothing to change but the state record.
    c.nft("add table ip someone-else");
    let log = sync_once(&c, &[]);
    assert!(log.contains("kind=Full") && log.contains("messages=2 "), "{log}");
}
