//! `--nodeport-addresses` against a real kernel: a fresh network namespace with two veth pairs,
//! read and followed over rtnetlink.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use nftproxy::source::node_addrs::{self, NodePortAddresses};

/// A network namespace with `a0` (192.0.2.1/24, 2001:db8::1/64, both default routes) and `b0`
/// (198.51.100.1/24, 2001:db8:1::1/64), each a veth whose peer is up in the same namespace.
/// Deleted on drop, even when the test panics.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let ns = Netns { name: format!("npaddr{}{tag}", std::process::id()) };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        run(&["ip", "netns", "add", &ns.name]);
        for cmd in [
            "link set lo up",
            "link add a0 type veth peer name a1",
            "link add b0 type veth peer name b1",
            "link set a0 up",
            "link set a1 up",
            "link set b0 up",
            "link set b1 up",
            "addr add 192.0.2.1/24 dev a0",
            "addr add 2001:db8::1/64 dev a0 nodad",
            "addr add 198.51.100.1/24 dev b0",
            "addr add 2001:db8:1::1/64 dev b0 nodad",
            "route add default via 192.0.2.2 dev a0",
            "-6 route add default via 2001:db8::2 dev a0",
        ] {
            ns.ip(cmd);
        }
        ns
    }

    fn ip(&self, args: &str) {
        ip_n(&self.name, args);
    }
}

/// `ip -n NS <args>`, which must succeed.
fn ip_n(ns: &str, args: &str) {
    let mut argv = vec!["ip", "-n", ns];
    argv.extend(args.split_whitespace());
    run(&argv);
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(out.status.success(), "{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn cidrs(text: &str) -> NodePortAddresses {
    text.parse().unwrap()
}

/// The next list `watch` sends, within 5 s.
async fn next(rx: &mut tokio::sync::mpsc::Receiver<Vec<IpAddr>>) -> Vec<IpAddr> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("no update within 5 s").expect("watch ended")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn current_reads_primary_and_cidrs_in_netns() {
    if !common::can_run_netns_tests() {
        return;
    }
    let ns = Netns::new("cur");
    common::in_netns(&ns.name, || {
        runtime().block_on(async {
            let primary = node_addrs::current(&NodePortAddresses::Primary).await.unwrap();
            assert_eq!(primary, ips(&["192.0.2.1", "2001:db8::1"]));
            let other = node_addrs::current(&cidrs("198.51.100.0/24")).await.unwrap();
            assert_eq!(other, ips(&["198.51.100.1"]));
            let all = node_addrs::current(&cidrs("0.0.0.0/0,::/0")).await.unwrap();
            assert_eq!(
                all,
                ips(&["192.0.2.1", "198.51.100.1", "2001:db8::1", "2001:db8:1::1"]),
                "no loopback, no fe80"
            );
            let none = node_addrs::current(&cidrs("203.0.113.0/24")).await.unwrap();
            assert_eq!(none, ips(&[]));
        })
    });
    // No IPv6 default route: Primary picks nothing of that family.
    ns.ip("-6 route del default");
    let primary = common::in_netns(&ns.name, || {
        runtime().block_on(async { node_addrs::current(&NodePortAddresses::Primary).await.unwrap() })
    });
    assert_eq!(primary, ips(&["192.0.2.1"]));
}

#[test]
fn watch_follows_address_and_route_changes_in_netns() {
    if !common::can_run_netns_tests() {
        return;
    }
    let ns = Netns::new("watch");
    let name = ns.name.clone();
    common::in_netns(&ns.name, move || {
        let ip = |args: &str| ip_n(&name, args);
        runtime().block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(8);
            let task = tokio::spawn(node_addrs::watch(NodePortAddresses::Primary, tx));

            assert_eq!(next(&mut rx).await, ips(&["192.0.2.1", "2001:db8::1"]), "initial list");

            // A change on a non-default-route interface sends nothing; the next list sent is
            // the one with the new address on the default-route interface.
            ip("addr add 198.51.100.9/24 dev b0");
            tokio::time::sleep(Duration::from_millis(300)).await;
            ip("addr add 192.0.2.7/24 dev a0");
            assert_eq!(next(&mut rx).await, ips(&["192.0.2.1", "192.0.2.7", "2001:db8::1"]), "after adding 192.0.2.7");

            ip("addr del 192.0.2.7/24 dev a0");
            assert_eq!(next(&mut rx).await, ips(&["192.0.2.1", "2001:db8::1"]), "after deleting 192.0.2.7");

            // The IPv4 default route moves to b0.
            ip("route replace default via 198.51.100.2 dev b0");
            let moved = ips(&["198.51.100.1", "198.51.100.9", "2001:db8::1"]);
            assert_eq!(next(&mut rx).await, moved, "after moving the route");

            // Dropping the receiver ends the watch.
            drop(rx);
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("watch did not end after the receiver was dropped")
                .unwrap();
        })
    });
}
