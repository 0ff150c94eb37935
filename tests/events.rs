//! nf_tables events against a real kernel: a running agent is not made to read its tables back
//! by other programs committing to their own tables, and still repairs an edit to its own.

mod common;

use common::*;

fn read_backs(log: &str) -> Vec<String> {
    log.lines().filter(|l| l.contains("read back")).map(str::to_string).collect()
}

#[test]
fn a_neighbour_committing_costs_no_read_back_and_an_edit_to_our_table_is_repaired() {
    let Some(c) = can_run_netns_tests().then(|| Cluster::new(demo_pods())) else { return };
    let m = demo_manifests();
    let m = m.to_str().unwrap();
    let a = c.start_agent(
        "agent",
        &["--manifests", m, "--sync-period", "300ms", "--min-sync-period", "0s", "--table-shards", "3"],
    );
    assert!(wait_until(20, || a.log_text().contains("synced")), "{}", a.log_text());
    let first = read_backs(&a.log_text());
    assert_eq!(first.len(), 1, "the first sync reads everything: {first:?}");
    // A neighbour commits to its own table ten times, over many periodic checks.
    c.nft("add table inet neighbour");
    for i in 0..10 {
        c.nft(&format!("add chain inet neighbour c{i}"));
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    c.nft("delete table inet neighbour");
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(read_backs(&a.log_text()), first, "no read-back for others' commits:\n{}", a.log_text());
    // `nft delete rule` in our main table: the agent reads back that table only and puts it back.
    let rules = || c.nft_list("inet nftproxy").lines().filter(|l| l.contains("# handle")).count();
    let before = rules();
    let listing = c.exec_ok("node", &["nft", "-a", "list", "chain", "inet", "nftproxy", "nat-postrouting"]);
    let handle = listing.lines().rev().find_map(|l| l.split("# handle ").nth(1)).unwrap().trim().to_string();
    c.nft(&format!("delete rule inet nftproxy nat-postrouting handle {handle}"));
    assert!(wait_until(10, || read_backs(&a.log_text()).len() == 2), "{}", a.log_text());
    assert!(wait_until(5, || rules() == before), "repaired");
    let log = a.log_text();
    let last = read_backs(&log).pop().unwrap();
    assert!(last.contains(r#"tables=["nftproxy"]"#), "only the touched table: {last}");
    assert!(log.contains("another program changed our tables"), "{log}");
    // Chains nobody wants in a shard table: one with a rule (its name comes with the rules
    // read), one empty and named nowhere (only the table's use count tells it is there). The
    // agent reads back that table only and removes both.
    c.nft("add chain inet nftproxy-2 stray; add rule inet nftproxy-2 stray accept; add chain inet nftproxy-2 orphan");
    assert!(wait_until(10, || read_backs(&a.log_text()).len() == 3), "{}", a.log_text());
    let gone = |chain: &str| !c.exec("node", &["nft", "list", "chain", "inet", "nftproxy-2", chain]).status.success();
    assert!(wait_until(5, || gone("stray") && gone("orphan")), "{}", c.nft_list("inet nftproxy-2"));
    let last = read_backs(&a.log_text()).pop().unwrap();
    assert!(last.contains(r#"tables=["nftproxy-2"]"#), "only the touched table: {last}");
}
