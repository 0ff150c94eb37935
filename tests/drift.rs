//! Drift repair against a real kernel: an operator changes our table with `nft` (rule content
//! behind an unchanged comment, base chain policy, table flags, map verdicts, a renamed chain)
//! and the next full sync, `--sync-once` or the running agent's periodic check, puts back exactly
//! what a fresh sync leaves, in one transaction; packets reach only the right pods again, and a
//! sync after the repair sends nothing. Tables that merely look like ours are never touched.

mod common;

use std::path::PathBuf;

use common::*;

const WEB_VIP: &str = "10.96.0.80:80";
const API_VIP: &str = "10.96.0.81:80";
const WEB_SVC: &str = "svc4/default/web/tcp/80";
const WEB_A_EP: &str = "ep4/default/web/tcp/80/10.244.1.2/8080";
const WEB_B_EP: &str = "ep4/default/web/tcp/80/10.244.1.3/8080";
const API_EP: &str = "ep4/default/api/tcp/80/10.244.1.4/8080";
const FLAGS: &[&str] = &["--cluster-cidr", "10.244.0.0/16"];

/// Service web (10.96.0.80:80) over web-a and web-b, Service api (10.96.0.81:80) over web-c.
const MANIFESTS: &str = "\
apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.80, ports: [{name: http, port: 80}]}\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n\
addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.2]}, {addresses: [10.244.1.3]}]\n\
---\napiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {clusterIP: 10.96.0.81, ports: [{name: http, port: 80}]}\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: api-1, labels: {kubernetes.io/service-name: api}}\n\
addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.4]}]\n";

/// A cluster with web-a, web-b, web-c serving TCP 8080, synced once from `MANIFESTS`.
struct Drifted {
    c: Cluster,
    /// The manifest directory.
    m: PathBuf,
    /// `comparable` listing right after the first sync.
    reference: String,
}

fn setup() -> Option<Drifted> {
    let c = web_cluster(&[8080], &[])?;
    let m = c.dir.join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("services.yaml"), MANIFESTS).unwrap();
    c.sync(&m, FLAGS);
    let reference = comparable(&listing(&c));
    let d = Drifted { c, m, reference };
    assert_eq!(web_split(&d.c), (true, true, false), "the fresh sync must serve web from web-a and web-b only");
    Some(d)
}

/// `nft list table inet nftproxy`, without handles; empty while the table does not exist.
fn listing(c: &Cluster) -> String {
    let out = c.exec("node", &["nft", "list", "table", "inet", "nftproxy"]);
    if out.status.success() { String::from_utf8(out.stdout).unwrap() } else { String::new() }
}

/// A listing in a form two equivalent tables share: without the `state` set (a
/// generation/digest record that moves with every commit), counters zeroed (packets move them),
/// chains and sets sorted by name and set elements sorted (neither order means anything to a
/// packet, and a chain the repair had to recreate lists last). Table-level lines (`flags ...`)
/// and the order of rules in a chain are kept.
fn comparable(listing: &str) -> String {
    let mut table = Vec::new();
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut block: Option<Vec<String>> = None;
    let mut elements: Option<String> = None;
    for line in listing.lines() {
        let t = line.trim();
        let top = line.starts_with('\t') && !line.starts_with("\t\t");
        if let Some(mut b) = block.take() {
            if let Some(mut e) = elements.take() {
                e.push_str(t);
                if t.ends_with('}') {
                    b.push(sorted_elements(&e));
                } else {
                    elements = Some(e);
                }
                block = Some(b);
            } else if top && t == "}" {
                blocks.push(b);
            } else if t.starts_with("elements = {") && !t.ends_with('}') {
                elements = Some(t.to_string());
                block = Some(b);
            } else if t.starts_with("elements = {") {
                b.push(sorted_elements(t));
                block = Some(b);
            } else {
                b.push(zero_counters(t));
                block = Some(b);
            }
        } else if top && t.ends_with('{') {
            block = Some(vec![t.to_string()]);
        } else {
            table.push(t.to_string());
        }
    }
    assert!(block.is_none() && elements.is_none(), "unexpected listing syntax:\n{listing}");
    blocks.retain(|b| b[0] != "set state {");
    blocks.sort();
    let mut out = table.join("\n");
    for b in blocks {
        out.push_str("\n\n");
        out.push_str(&b.join("\n"));
    }
    out
}

/// `elements = { a, b, c }` with the elements sorted.
fn sorted_elements(text: &str) -> String {
    let inner = text.trim().strip_prefix("elements = {").and_then(|e| e.strip_suffix('}')).expect("elements");
    let mut items: Vec<&str> = inner.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    items.sort();
    format!("elements = {{ {} }}", items.join(", "))
}

fn zero_counters(line: &str) -> String {
    let Some(at) = line.find("counter packets ") else { return line.to_string() };
    let rest = &line[at + "counter packets ".len()..];
    let mut words = rest.splitn(4, ' ');
    let (_, bytes, _, tail) = (words.next(), words.next(), words.next(), words.next().unwrap_or(""));
    assert_eq!(bytes, Some("bytes"), "unexpected counter syntax: {line}");
    let sep = if tail.is_empty() { "" } else { " " };
    format!("{}counter packets 0 bytes 0{sep}{tail}", &line[..at])
}

/// The lines only in `a` (`-`) and only in `b` (`+`), for readable failures.
fn line_diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    for l in la.iter().filter(|l| !lb.contains(l)) {
        out.push_str(&format!("- {l}\n"));
    }
    for l in lb.iter().filter(|l| !la.contains(l)) {
        out.push_str(&format!("+ {l}\n"));
    }
    if out.is_empty() {
        out.push_str("(same lines, different order or count)\n");
    }
    out
}

/// One rule of a chain as `nft -a list chain` shows it.
struct ListedRule {
    /// The rule without its comment and handle, e.g. `dnat ip to 10.244.1.2:8080`.
    text: String,
    comment: String,
    handle: u64,
}

fn rules_of(c: &Cluster, chain: &str) -> Vec<ListedRule> {
    let out = c.exec_ok("node", &["nft", "-a", "list", "chain", "inet", "nftproxy", chain]);
    out.lines()
        .filter_map(|l| {
            let (rule, handle) = l.trim().split_once(" # handle ")?;
            if rule.starts_with("chain ") || rule.starts_with("type ") {
                return None;
            }
            let (text, comment) = match rule.split_once(" comment \"") {
                Some((t, c)) => (t.to_string(), c.strip_suffix('"').expect("comment is last").to_string()),
                None => (rule.to_string(), String::new()),
            };
            Some(ListedRule { text, comment, handle: handle.trim().parse().ok()? })
        })
        .collect()
}

impl Drifted {
    fn sync(&self) -> String {
        self.c.sync(&self.m, FLAGS)
    }

    /// Runs `script` with `nft` in the node (it must succeed) and checks that it changed the
    /// listing: otherwise a passing repair would prove nothing.
    fn mutate(&self, script: &str) {
        self.c.nft(script);
        let now = comparable(&listing(&self.c));
        assert_ne!(now, self.reference, "the mutation `{script}` did not show in the listing");
    }

    /// The repairing sync, then: the table lists as a fresh sync left it, a dry run finds
    /// nothing to change, and another sync sends nothing and keeps every handle.
    fn assert_repaired_by_sync(&self) {
        self.sync();
        let after = comparable(&listing(&self.c));
        assert!(
            after == self.reference,
            "listing still differs after the repairing sync:\n{}",
            line_diff(&self.reference, &after)
        );
        self.assert_nothing_left_to_send();
    }

    fn assert_nothing_left_to_send(&self) {
        let m = self.m.to_str().unwrap();
        let mut args = vec!["--sync-once", "--dry-run", "--manifests", m];
        args.extend_from_slice(FLAGS);
        let dry = self.c.exec_ok("node", &[&[NFTPROXY][..], &args].concat());
        assert_eq!(dry.trim(), "no change", "a dry run after the repair still plans changes");
        let handles = self.c.nft_list("inet nftproxy");
        let out = self.c.nftproxy(&[&["--sync-once", "--manifests", m][..], FLAGS].concat());
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(log.contains("messages=0 "), "a sync after the repair sent something:\n{log}");
        assert_eq!(self.c.nft_list("inet nftproxy"), handles, "a sync after the repair touched the kernel");
    }
}

/// Who answers 30 connections to web: (web-a answered, web-b answered, anybody else answered).
fn web_split(c: &Cluster) -> (bool, bool, bool) {
    let got = c.probe_ms("client", "tcp", WEB_VIP, 30, 1000);
    let other = got.keys().any(|k| k != "web-a" && k != "web-b");
    (got.contains_key("web-a"), got.contains_key("web-b"), other)
}

/// Only web-a and web-b answer web, both of them; only web-c answers api.
fn assert_served_right(c: &Cluster) {
    let got = c.probe_ms("client", "tcp", WEB_VIP, 30, 1000);
    assert!(
        got.keys().all(|k| k == "web-a" || k == "web-b") && got.len() == 2,
        "web must reach web-a and web-b only: {got:?}"
    );
    let got = c.probe_ms("client", "tcp", API_VIP, 10, 1000);
    assert_eq!(got.get("web-c"), Some(&10), "api must reach web-c only: {got:?}");
}

/// An endpoint chain's DNAT rule: its last, after the hairpin test.
fn dnat_rule(c: &Cluster, chain: &str) -> ListedRule {
    let mut rules = rules_of(c, chain);
    assert_eq!(rules.len(), 2, "{chain} should hold the hairpin test and the DNAT");
    assert!(rules[0].text.contains("ip saddr"), "{}", rules[0].text);
    rules.pop().unwrap()
}

#[test]
fn a_replaced_dnat_rule_is_rewritten_and_traffic_returns_to_its_pod() {
    let Some(d) = setup() else { return };
    let r = dnat_rule(&d.c, WEB_A_EP);
    assert!(r.text.contains("dnat") && r.text.contains("10.244.1.2"), "{}", r.text);
    // Same comment, but web-a's share of web now goes to web-c.
    d.mutate(&format!(
        "replace rule inet nftproxy {WEB_A_EP} handle {} meta l4proto tcp dnat ip to 10.244.1.4:8080 comment \"{}\"",
        r.handle, r.comment
    ));
    assert_eq!(dnat_rule(&d.c, WEB_A_EP).comment, r.comment);
    assert_eq!(web_split(&d.c), (false, true, true), "the hijack must send web traffic to web-c");
    d.assert_repaired_by_sync();
    assert_served_right(&d.c);
}

#[test]
fn a_goto_replaced_by_one_into_another_service_is_rewritten() {
    let Some(d) = setup() else { return };
    let rules = rules_of(&d.c, WEB_SVC);
    let last = rules.iter().find(|r| r.text.contains(WEB_B_EP)).expect("a goto to web-b's chain");
    d.mutate(&format!(
        "replace rule inet nftproxy {WEB_SVC} handle {} goto {API_EP} comment \"{}\"",
        last.handle, last.comment
    ));
    assert_eq!(web_split(&d.c), (true, false, true), "web traffic must leak into api's endpoint");
    d.assert_repaired_by_sync();
    assert_served_right(&d.c);
}

#[test]
fn a_rule_swapped_for_another_with_the_same_comment_is_rewritten() {
    let Some(d) = setup() else { return };
    let rules = rules_of(&d.c, WEB_SVC);
    let last = rules.iter().find(|r| r.text.contains(WEB_B_EP)).expect("a goto to web-b's chain");
    // A new rule right after the original, carrying its comment; then the original goes. Same
    // number of rules, same comments, in the same order.
    d.mutate(&format!(
        "add rule inet nftproxy {WEB_SVC} position {h} meta l4proto tcp dnat ip to 10.244.1.4:8080 comment \"{c}\"; \
         delete rule inet nftproxy {WEB_SVC} handle {h}",
        h = last.handle,
        c = last.comment
    ));
    let now = rules_of(&d.c, WEB_SVC);
    let comments = |rs: &[ListedRule]| rs.iter().map(|r| r.comment.clone()).collect::<Vec<_>>();
    assert_eq!(comments(&now), comments(&rules), "the swap must keep count, comments and order");
    assert_eq!(web_split(&d.c), (true, false, true), "the swapped rule must send web traffic to web-c");
    d.assert_repaired_by_sync();
    assert_served_right(&d.c);
}

/// Pod-to-pod traffic, which crosses the node's forward hook: (answered, of `n`).
fn pod_to_pod(c: &Cluster, n: usize) -> usize {
    c.probe_ms("client", "tcp", "10.244.1.2:8080", n, 500).get("web-a").copied().unwrap_or(0)
}

#[test]
fn a_drop_policy_on_our_forward_chain_is_reset_and_pods_talk_again() {
    let Some(d) = setup() else { return };
    assert_eq!(pod_to_pod(&d.c, 3), 3);
    d.mutate("chain inet nftproxy filter-forward { policy drop; }");
    assert_eq!(pod_to_pod(&d.c, 2), 0, "policy drop on filter-forward must stop pod-to-pod traffic");
    d.assert_repaired_by_sync();
    assert_eq!(pod_to_pod(&d.c, 10), 10, "pod-to-pod traffic must flow after the repair");
    assert_served_right(&d.c);
}

#[test]
fn a_drop_policy_on_our_nat_output_chain_is_reset_and_the_node_connects_again() {
    let Some(d) = setup() else { return };
    // Service traffic ends in a dnat (an accept) before the policy applies; connections from
    // the node to anything else fall through nat-output and meet it.
    let from_node = |n| d.c.probe_ms("node", "tcp", "10.244.1.2:8080", n, 500).get("web-a").copied().unwrap_or(0);
    assert_eq!(from_node(3), 3);
    d.mutate("chain inet nftproxy nat-output { policy drop; }");
    assert_eq!(from_node(2), 0, "policy drop on nat-output must stop the node's new connections");
    d.assert_repaired_by_sync();
    assert_eq!(from_node(10), 10, "the node must connect to pods after the repair");
    let got = d.c.probe_ms("node", "tcp", WEB_VIP, 20, 1000);
    assert!(got.keys().all(|k| k == "web-a" || k == "web-b") && got.len() == 2, "{got:?}");
    assert_served_right(&d.c);
}

#[test]
fn a_dormant_table_is_woken_up() {
    let Some(d) = setup() else { return };
    d.mutate("add table inet nftproxy { flags dormant; }");
    let got = d.c.probe_ms("client", "tcp", WEB_VIP, 2, 500);
    assert!(!got.keys().any(|k| k.starts_with("web-")), "a dormant table must not serve: {got:?}");
    d.assert_repaired_by_sync();
    assert_served_right(&d.c);
}

#[test]
fn a_map_element_turned_from_goto_into_jump_is_put_back() {
    let Some(d) = setup() else { return };
    d.mutate(&format!(
        "delete element inet nftproxy service-ips-v4 {{ 10.96.0.80 . tcp . 80 }}; \
         add element inet nftproxy service-ips-v4 {{ 10.96.0.80 . tcp . 80 : jump {WEB_SVC} }}"
    ));
    assert!(listing(&d.c).contains(&format!("jump {WEB_SVC}")), "{}", listing(&d.c));
    d.assert_repaired_by_sync();
    assert_served_right(&d.c);
}

#[test]
fn a_renamed_endpoint_chain_is_put_back_under_its_name() {
    let Some(d) = setup() else { return };
    d.mutate(&format!("rename chain inet nftproxy {WEB_A_EP} zz"));
    assert!(rules_of(&d.c, WEB_SVC).iter().any(|r| r.text.contains("goto zz")), "{}", listing(&d.c));
    d.assert_repaired_by_sync();
    assert!(!listing(&d.c).contains("zz"));
    assert_served_right(&d.c);
}

#[test]
fn a_deleted_endpoint_chain_and_its_goto_are_restored() {
    let Some(d) = setup() else { return };
    let goto = rules_of(&d.c, WEB_SVC).into_iter().find(|r| r.text.contains(WEB_A_EP)).expect("goto web-a");
    d.mutate(&format!(
        "delete rule inet nftproxy {WEB_SVC} handle {}; delete chain inet nftproxy {WEB_A_EP}",
        goto.handle
    ));
    d.assert_repaired_by_sync();
    assert_served_right(&d.c);
}

#[test]
fn an_older_agents_hairpin_set_and_its_postrouting_rule_are_removed() {
    // Agents before RULE_FORMAT 7 masqueraded a pod reaching itself by a set lookup in
    // postrouting; this one marks it in the endpoint chain. What an older agent left goes with
    // the next sync, rule and set in one transaction (dataplane.rs checks the hairpin itself).
    let Some(d) = setup() else { return };
    d.mutate(
        "add set inet nftproxy hairpin-v4 { type ipv4_addr . ipv4_addr . ipv4_addr; }; \
         add element inet nftproxy hairpin-v4 { 10.244.1.2 . 10.244.1.2 . 10.96.0.80 }; \
         insert rule inet nftproxy nat-postrouting ip saddr . ip daddr . ct original ip daddr @hairpin-v4 masquerade",
    );
    assert!(rules_of(&d.c, "nat-postrouting").iter().any(|r| r.text.contains("@hairpin-v4")), "{}", listing(&d.c));
    d.assert_repaired_by_sync();
    assert!(!listing(&d.c).contains("hairpin-v4"), "{}", listing(&d.c));
    assert_served_right(&d.c);
}

/// Tables that look like ours but are not: shard-like names that are no shard (`-0`, leading
/// zeros) and our name in another family.
const LOOKALIKES: &[&str] = &["inet nftproxy-0", "inet nftproxy-01", "inet nftproxy-007", "ip nftproxy"];

#[test]
fn lookalike_tables_survive_syncs_and_cleanup_untouched() {
    let Some(d) = setup() else { return };
    for t in LOOKALIKES {
        d.c.nft(&format!(
            "add table {t}; add chain {t} keep; add rule {t} keep ip daddr 192.0.2.9 tcp dport 9 counter accept"
        ));
    }
    let lookalikes = || LOOKALIKES.iter().map(|t| d.c.nft_list(t)).collect::<Vec<_>>();
    let before = lookalikes();
    for l in &before {
        assert!(l.contains("chain keep") && l.contains("tcp dport 9"), "{l}");
    }
    d.sync();
    assert_eq!(lookalikes(), before, "a sync touched a table that is not ours");
    assert_eq!(comparable(&listing(&d.c)), d.reference);
    // With real shards (nftproxy-1) next to the lookalikes.
    d.c.sync(&d.m, &[FLAGS, &["--table-shards", "2"]].concat());
    assert_eq!(lookalikes(), before, "a sharded sync touched a table that is not ours");
    let tables = d.c.exec_ok("node", &["nft", "list", "tables"]);
    assert!(tables.lines().any(|l| l.trim() == "table inet nftproxy-1"), "{tables}");
    assert_served_right(&d.c);
    let out = d.c.exec_ok("node", &[NFTPROXY, "--cleanup"]);
    assert!(out.contains("removed table inet nftproxy and 1 shard tables"), "{out}");
    let tables = d.c.exec_ok("node", &["nft", "list", "tables"]);
    let left: Vec<&str> = tables.lines().map(str::trim).collect();
    assert_eq!(
        left,
        ["table inet nftproxy-0", "table inet nftproxy-01", "table inet nftproxy-007", "table ip nftproxy"],
        "cleanup must remove our tables and only ours"
    );
    assert_eq!(lookalikes(), before, "cleanup touched a table that is not ours");
}

#[test]
fn the_agent_repairs_drift_within_two_sync_periods() {
    let Some(d) = setup() else { return };
    let m = d.m.to_str().unwrap();
    let a = d.c.start_agent(
        "agent",
        &[&["--manifests", m, "--watch", "--sync-period", "1s", "--min-sync-period", "0s"][..], FLAGS].concat(),
    );
    // The agent starts on the table the first sync left and keeps it as it is.
    let settled = || comparable(&listing(&d.c)) == d.reference;
    let get = || d.c.http_get("127.0.0.1:10249", "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(
        wait_until(20, || metric(&get(), "kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= Some(1.0)),
        "the agent never synced:\n{}",
        a.log_text()
    );
    assert!(settled(), "the agent changed a freshly synced table:\n{}", a.log_text());

    // The dnat hijack.
    let r = dnat_rule(&d.c, WEB_A_EP);
    d.c.nft(&format!(
        "replace rule inet nftproxy {WEB_A_EP} handle {} meta l4proto tcp dnat ip to 10.244.1.4:8080 comment \"{}\"",
        r.handle, r.comment
    ));
    assert!(wait_until(10, settled), "the hijacked dnat rule was not repaired:\n{}", a.log_text());
    assert_served_right(&d.c);

    // policy drop on filter-forward.
    d.c.nft("chain inet nftproxy filter-forward { policy drop; }");
    assert!(wait_until(10, settled), "policy drop on filter-forward was not repaired:\n{}", a.log_text());
    assert_eq!(pod_to_pod(&d.c, 10), 10, "pod-to-pod traffic must flow after the repair");

    // A dormant table.
    d.c.nft("add table inet nftproxy { flags dormant; }");
    assert!(wait_until(10, settled), "the dormant table was not woken up:\n{}", a.log_text());
    assert_served_right(&d.c);
    d.assert_nothing_left_to_send();
}

impl Drifted {
    /// Writes `script` to `file` in the test's directory and runs `nft ARGS -f FILE` in the
    /// node (it must succeed); returns what nft printed.
    fn nft_file(&self, file: &str, args: &[&str], script: &str) -> String {
        let path = self.c.write(file, script);
        let path = path.to_str().unwrap();
        self.c.exec_ok("node", &[&["nft"][..], args, &["-f", path]].concat())
    }
}

/// No connection to web reaches any pod.
fn assert_web_blackholed(c: &Cluster, what: &str) {
    let got = c.probe_ms("client", "tcp", WEB_VIP, 2, 500);
    assert!(!got.keys().any(|k| k.starts_with("web-")), "{what} must stop web's traffic: {got:?}");
}

#[test]
fn a_dispatch_map_recreated_with_a_quota_is_rebuilt_and_web_is_served_again() {
    let Some(d) = setup() else { return };
    // Same name, type and (after a sync re-adds them) elements: only the set-level quota, which
    // every element inherits, differs. One byte later no element matches any more.
    d.mutate(
        "flush chain inet nftproxy cluster-ip-v4; flush chain inet nftproxy node-ip-v4; \
         flush chain inet nftproxy external-ip-v4; delete map inet nftproxy service-ips-v4; \
         add map inet nftproxy service-ips-v4 { type ipv4_addr . inet_proto . inet_service : verdict; quota 1 bytes; }",
    );
    assert!(listing(&d.c).contains("quota 1 bytes"), "{}", listing(&d.c));
    assert_web_blackholed(&d.c, "the emptied dispatch chains and map");
    d.assert_repaired_by_sync();
    assert!(!listing(&d.c).contains("quota"), "{}", listing(&d.c));
    assert_served_right(&d.c);
}

/// `MANIFESTS` plus Service db (10.96.0.82:80) over web-c.
const MANIFESTS_WITH_DB: &str = "\
---\napiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: 10.96.0.82, ports: [{name: http, port: 80}]}\n\
---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-1, labels: {kubernetes.io/service-name: db}}\n\
addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.4]}]\n";

#[test]
fn the_gate_map_recreated_with_a_size_limit_is_rebuilt_and_takes_a_third_service() {
    let Some(d) = setup() else { return };
    // Full at two elements: a third ClusterIP could never be added to it.
    d.mutate(
        "flush chain inet nftproxy nat-prerouting; flush chain inet nftproxy nat-output; \
         delete map inet nftproxy addresses-v4; add map inet nftproxy addresses-v4 { type ipv4_addr : verdict; size 2; \
         elements = { 10.96.0.80 : goto cluster-ip-v4, 10.96.0.81 : goto cluster-ip-v4 } }",
    );
    assert!(listing(&d.c).contains("size 2"), "{}", listing(&d.c));
    d.assert_repaired_by_sync();
    assert!(!listing(&d.c).contains("size"), "{}", listing(&d.c));
    assert_served_right(&d.c);

    std::fs::write(d.m.join("services.yaml"), format!("{MANIFESTS}{MANIFESTS_WITH_DB}")).unwrap();
    d.sync();
    assert!(listing(&d.c).contains("10.96.0.82"), "{}", listing(&d.c));
    let got = d.c.probe_ms("client", "tcp", "10.96.0.82:80", 10, 1000);
    assert_eq!(got.get("web-c"), Some(&10), "db must reach web-c: {got:?}");
    assert_served_right(&d.c);
    d.assert_nothing_left_to_send();
}

#[test]
fn names_with_an_at_sign_in_our_table_are_removed_there_and_never_read_as_another_tables() {
    let Some(d) = setup() else { return };
    d.c.nft(
        "add table inet victim; add chain inet victim c { type filter hook input priority 0; policy accept; }; \
         add rule inet victim c tcp dport 22 accept; add set inet victim s { type ipv4_addr; elements = { 9.9.9.9 } }",
    );
    let victim = || d.c.nft_list("inet victim");
    let before = victim();
    assert!(before.contains("tcp dport 22 accept") && before.contains("9.9.9.9"), "{before}");
    // Our own shard objects are named `nftproxy-K@name` internally: a chain and a set named
    // `victim@c` and `victim@s` in our table must not be taken for victim's `c` and `s`.
    d.nft_file(
        "victim.json",
        &["-j"],
        r#"{"nftables":[{"add":{"chain":{"family":"inet","table":"nftproxy","name":"victim@c"}}},{"add":{"rule":{"family":"inet","table":"nftproxy","chain":"victim@c","expr":[{"counter":null}]}}},{"add":{"set":{"family":"inet","table":"nftproxy","name":"victim@s","type":"ipv4_addr"}}}]}"#,
    );
    let now = listing(&d.c);
    assert!(now.contains("chain victim@c {") && now.contains("set victim@s {"), "{now}");
    d.assert_repaired_by_sync();
    assert!(!listing(&d.c).contains("victim@"), "{}", listing(&d.c));
    assert_eq!(victim(), before, "the repair touched table inet victim");
    // A commit by someone else makes the next sync read everything back again.
    d.c.nft("add table ip bump");
    d.c.nft("delete table ip bump");
    d.sync();
    assert_eq!(comparable(&listing(&d.c)), d.reference);
    assert_eq!(victim(), before, "a later sync touched table inet victim");
    d.assert_nothing_left_to_send();
    assert_served_right(&d.c);
}

#[test]
fn an_anonymous_chain_bound_to_an_inserted_rule_goes_with_its_rule() {
    let Some(d) = setup() else { return };
    d.mutate("insert rule inet nftproxy cluster-ip-v4 ip daddr 10.96.0.80 jump { drop; }");
    assert_web_blackholed(&d.c, "the inserted `jump { drop; }`");
    d.assert_repaired_by_sync();
    assert_served_right(&d.c);
}

#[test]
fn a_foreign_verdict_map_and_the_foreign_chain_it_jumps_to_are_removed() {
    let Some(d) = setup() else { return };
    // The map refers to the chain: the chain can only go once the map is gone.
    d.mutate(
        "add chain inet nftproxy evil; add rule inet nftproxy evil drop; \
         add map inet nftproxy evilmap { type ipv4_addr : verdict; elements = { 1.2.3.4 : jump evil } }",
    );
    assert!(listing(&d.c).contains("1.2.3.4 : jump evil"), "{}", listing(&d.c));
    d.assert_repaired_by_sync();
    assert!(!listing(&d.c).contains("evil"), "{}", listing(&d.c));
    assert_served_right(&d.c);
}

#[test]
fn named_counters_quotas_and_limits_are_removed() {
    let Some(d) = setup() else { return };
    d.mutate(
        "add counter inet nftproxy c1; add quota inet nftproxy q1 { 1 bytes }; \
         add limit inet nftproxy l1 { rate 1/second }",
    );
    let now = listing(&d.c);
    assert!(now.contains("counter c1 {") && now.contains("quota q1 {") && now.contains("limit l1 {"), "{now}");
    d.assert_repaired_by_sync();
    assert_served_right(&d.c);
}

/// The record element of our `state` set: generation (top 32 bits), rule format, digest. (The
/// set's other elements record each table's digest, marked by the format's top bit.)
fn state_record(c: &Cluster) -> u128 {
    let out = c.exec_ok("node", &["nft", "-j", "list", "set", "inet", "nftproxy", "state"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let set = json["nftables"].as_array().unwrap().iter().find_map(|o| o.get("set")).expect("set state");
    let elem = set["elem"].as_array().expect("state elements");
    let records: Vec<u128> = elem
        .iter()
        .map(|e| match e {
            serde_json::Value::String(s) => u128::from_str_radix(s.strip_prefix("0x").expect("hex"), 16).unwrap(),
            v => v.as_u64().expect("an integer") as u128,
        })
        .filter(|v| (v >> 64) & 0x8000_0000 == 0)
        .collect();
    assert_eq!(records.len(), 1, "{out}");
    records[0]
}

#[test]
fn the_agent_repairs_drift_behind_a_forged_state_record() {
    let Some(d) = setup() else { return };
    let m = d.m.to_str().unwrap();
    // No full read-back on a timer during the test: the repair must come from the agent
    // noticing that someone else committed.
    let a = d.c.start_agent(
        "agent",
        &[
            &["--manifests", m, "--watch", "--sync-period", "1s", "--min-sync-period", "100ms"][..],
            &["--verify-period", "1h"],
            FLAGS,
        ]
        .concat(),
    );
    let settled = || comparable(&listing(&d.c)) == d.reference;
    let get = || d.c.http_get("127.0.0.1:10249", "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(
        wait_until(20, || metric(&get(), "kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= Some(1.0)),
        "the agent never synced:\n{}",
        a.log_text()
    );
    assert!(settled(), "the agent changed a freshly synced table:\n{}", a.log_text());

    // Nobody has committed since our last commit (the agent found the record current and sent
    // nothing), so the record's generation is the kernel's. The forged record names the
    // generation this very transaction produces, with our format and digest: exactly what our
    // own commit would have left.
    let real = state_record(&d.c);
    let forged = real + (1u128 << 96);
    let echo = d.nft_file(
        "forge.nft",
        &["-e"],
        &format!(
            "delete element inet nftproxy service-ips-v4 {{ 10.96.0.80 . tcp . 80 }}\n\
             add element inet nftproxy service-ips-v4 {{ 10.96.0.80 . tcp . 80 : drop }}\n\
             delete element inet nftproxy state {{ {real:#x} }}\n\
             add element inet nftproxy state {{ {forged:#x} }}\n"
        ),
    );
    // The agent may repair within a second, so the drop is checked in what nft committed.
    assert!(echo.contains("{ 10.96.0.80 . tcp . 80 : drop }"), "{echo}");
    assert!(echo.contains(&format!("state {{ {forged} }}")), "{echo}");

    assert!(wait_until(10, settled), "the drop behind a forged state record was not repaired:\n{}", a.log_text());
    assert_served_right(&d.c);
    // The repair was the one commit after the forged one: the agent recorded the generation
    // after it (forged + 1) and the same format and digest. So when the agent looked, the forged
    // record equalled exactly what it wanted (generation current, digest and format its own):
    // an agent that took the record as proof of a clean table would have sent nothing, the
    // drop would have stayed, and `settled` above would have timed out.
    let now = state_record(&d.c);
    assert_eq!(now >> 96, (forged >> 96) + 1, "state {now:#x}, forged {forged:#x}");
    assert_eq!(now & ((1u128 << 96) - 1), forged & ((1u128 << 96) - 1), "format or digest moved");
    d.assert_nothing_left_to_send();
}

/// Reading a table's rules back one chain at a time (what a table of more than
/// `nft::PER_CHAIN_DUMP_ABOVE` chains gets, forced here for every table) sees exactly what one
/// dump of the table sees, and the repair it drives puts back a deleted rule.
#[test]
fn a_read_back_by_chain_equals_one_by_table_and_repairs_a_deleted_rule() {
    use nftproxy::nft::{Netlink, PER_CHAIN_DUMP_ENV};
    let Some(d) = setup() else { return };
    let (by_table, by_chain) = in_netns(&d.c.node(), || {
        let mut nl = Netlink::open().unwrap();
        nl.per_chain_dump_above = usize::MAX;
        let by_table = nl.read_table().unwrap();
        nl.per_chain_dump_above = 0;
        (by_table, nl.read_table().unwrap())
    });
    assert_eq!(by_chain, by_table);
    assert_eq!(by_chain.chains[WEB_A_EP].rules.len(), 2, "{by_chain:?}");
    let r = dnat_rule(&d.c, WEB_A_EP);
    d.mutate(&format!("delete rule inet nftproxy {WEB_A_EP} handle {}", r.handle));
    let m = d.m.to_str().unwrap();
    let env = format!("{PER_CHAIN_DUMP_ENV}=0");
    let out = d.c.exec("node", &[&["env", &env, NFTPROXY, "--sync-once", "--manifests", m][..], FLAGS].concat());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let after = comparable(&listing(&d.c));
    assert!(after == d.reference, "the deleted rule was not put back:\n{}", line_diff(&d.reference, &after));
    assert_eq!(dnat_rule(&d.c, WEB_A_EP).comment, r.comment);
    d.assert_nothing_left_to_send();
    assert_served_right(&d.c);
}
