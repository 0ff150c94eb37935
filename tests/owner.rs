//! `--own-tables`: our tables carry the kernel's owner + persist flags. While the agent runs,
//! nobody else can change or delete them (`nft` gets EPERM, `nft flush ruleset` leaves them);
//! when it exits they stay and keep serving; the next run adopts them; switching the option off
//! rebuilds them as plain tables; `--cleanup` removes them once no agent owns them.

mod common;

use common::*;

const VIP: &str = "10.96.0.80:80";

/// `nft ARGS` in the node namespace: whether it succeeded, and what it printed on stderr.
fn nft_try(c: &Cluster, args: &[&str]) -> (bool, String) {
    let mut full = vec!["nft"];
    full.extend_from_slice(args);
    let out = c.exec("node", &full);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The table's header line as nft prints it, e.g. `flags owner` (nft 1.0.6 does not name `persist`).
fn flags_line(c: &Cluster) -> String {
    c.nft_list("inet nftproxy").lines().find(|l| l.trim().starts_with("flags")).unwrap_or("").trim().to_string()
}

fn serves_web(c: &Cluster) -> bool {
    let got = c.probe("client", "tcp", VIP, 10);
    got.keys().all(|k| k.starts_with("web-")) && got.values().sum::<usize>() == 10
}

#[test]
fn owned_tables_refuse_other_writers_survive_exit_and_are_adopted_by_the_next_run() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let m = demo_manifests();
    let dir = m.to_str().unwrap();
    let args = ["--manifests", dir, "--watch", "--own-tables", "--sync-period", "1s", "--min-sync-period", "100ms"];
    let a = c.start_agent("agent-1", &args);
    assert!(wait_until(20, || c.has_table() && flags_line(&c).contains("owner")), "{}", a.log_text());
    assert!(serves_web(&c));

    // Nobody else may change or delete anything of ours.
    let ep = "ep4/default/web/tcp/80/10.244.1.2/8080";
    for attempt in [
        vec!["delete", "table", "inet", "nftproxy"],
        vec!["add", "rule", "inet", "nftproxy", ep, "drop"],
        vec!["flush", "chain", "inet", "nftproxy", ep],
        vec!["chain", "inet", "nftproxy", "filter-forward", "{ policy drop; }"],
        vec!["add", "table", "inet", "nftproxy", "{ flags dormant; }"],
    ] {
        let (ok, err) = nft_try(&c, &attempt);
        assert!(!ok && err.contains("Operation not permitted"), "nft {attempt:?} was allowed: {err}");
    }
    let (ok, _) = nft_try(&c, &["flush", "ruleset"]);
    assert!(ok);
    assert!(c.has_table(), "flush ruleset must leave an owned table");
    assert!(serves_web(&c));
    let cleanup = c.nftproxy(&["--cleanup"]);
    assert!(!cleanup.status.success());
    assert!(String::from_utf8_lossy(&cleanup.stderr).contains("owned by another process"));

    // Other programs' commits cost the owner no read-back: no full sync follows them.
    let fulls = a.log_text().matches("kind=Full").count();
    c.nft("add table inet someone-else");
    c.nft("add chain inet someone-else c");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(a.log_text().matches("kind=Full").count(), fulls, "{}", a.log_text());

    // The agent exits: the table stays, orphaned, and keeps serving; anyone may now remove it,
    // but the next run adopts it first.
    assert!(a.terminate().success());
    assert!(c.has_table());
    assert!(!flags_line(&c).contains("owner"), "orphaned after exit: {}", flags_line(&c));
    assert!(serves_web(&c));
    let b = c.start_agent("agent-2", &args);
    assert!(wait_until(20, || flags_line(&c).contains("owner")), "{}", b.log_text());
    let (ok, _) = nft_try(&c, &["delete", "table", "inet", "nftproxy"]);
    assert!(!ok, "the second run owns the table again");
    assert!(serves_web(&c));
    assert!(b.terminate().success());
    let cleanup = c.nftproxy(&["--cleanup"]);
    assert!(cleanup.status.success(), "{}", String::from_utf8_lossy(&cleanup.stderr));
    assert!(!c.has_table());
    assert!(c.nft_list("inet someone-else").contains("chain c"), "other tables stay");
}

#[test]
fn switching_ownership_on_and_off_rebuilds_the_tables_and_keeps_serving() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let m = demo_manifests();
    c.sync(&m, &[]);
    assert_eq!(flags_line(&c), "");
    // On: a plain table cannot gain `persist` in place; it is rebuilt in one transaction.
    let out = c.nftproxy(&["--sync-once", "--own-tables", "--manifests", m.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !log.contains("WARN"), "{log}");
    assert!(c.has_table() && serves_web(&c));
    let (ok, err) = nft_try(&c, &["delete", "table", "inet", "nftproxy"]);
    assert!(ok, "a --sync-once run's table is orphaned once it exits: {err}");
    c.sync(&m, &["--own-tables"]);
    // A second run with the same option adopts and changes nothing else.
    let out = c.nftproxy(&["--sync-once", "--own-tables", "--manifests", m.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && log.contains("messages=3"), "adopt (table) + state record only: {log}");
    // Off: back to a plain table that anyone may change.
    let out = c.nftproxy(&["--sync-once", "--manifests", m.to_str().unwrap()]);
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("WARN"));
    assert_eq!(flags_line(&c), "");
    assert!(serves_web(&c));
    let dry = c.exec_ok("node", &[NFTPROXY, "--sync-once", "--dry-run", "--manifests", m.to_str().unwrap()]);
    assert_eq!(dry.trim(), "no change");
}
