//! kube-proxy's configuration file and flags: a kube-proxy DaemonSet's `--config` and args work
//! unchanged, with its precedence; bad values stop the agent with the field named; conntrack
//! sysctls land where kube-proxy puts them.

mod common;

use common::*;

/// kubeadm's KubeProxyConfiguration, as its `kube-proxy` ConfigMap holds it.
const KUBEADM: &str = include_str!("golden/kubeadm-kube-proxy.conf");

fn sysctl(c: &Cluster, ns: Option<&str>, name: &str) -> String {
    let path = format!("/proc/sys/net/netfilter/{name}");
    match ns {
        Some(ns) => c.exec_ok(ns, &["cat", &path]).trim().to_string(),
        None => std::fs::read_to_string(&path).unwrap().trim().to_string(),
    }
}

#[test]
fn kubeadms_config_file_is_applied_and_flags_it_covers_are_ignored_with_a_warning() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let config = c.write("config.conf", KUBEADM);
    let manifests = demo_manifests();
    let out = c.nftproxy(&[
        "--config",
        config.to_str().unwrap(),
        "--hostname-override",
        "node-1",
        "--cluster-cidr",
        "10.0.0.0/8",
        "--proxy-mode=iptables",
        "--v=2",
        "--sync-once",
        "--manifests",
        manifests.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The file's clusterCIDR is in the rules, the flag's is not; both ignored flags are named.
    let table = c.nft_list("inet nftproxy");
    assert!(table.contains("10.244.0.0/16") && !table.contains("10.0.0.0/8"), "{table}");
    assert!(stderr.contains("--cluster-cidr ignored: with --config the file decides it"), "{stderr}");
    assert!(stderr.contains("--proxy-mode=iptables: a kube-proxy flag with no effect"), "{stderr}");
    assert!(!stderr.contains("unknown field"), "kubeadm's file has no unknown field: {stderr}");
    // Traffic from outside the pod range is masqueraded as the file says: the node itself.
    assert_eq!(c.probe("client", "tcp", "10.96.0.80:80", 9).values().sum::<usize>(), 9);
}

#[test]
fn a_bad_value_in_the_config_file_stops_with_the_field_named_and_applies_nothing() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let manifests = demo_manifests();
    for (text, says) in [
        ("clusterCIDR: banana\n", "clusterCIDR: \"banana\" is not a CIDR"),
        ("conntrack:\n  maxPerCore: lots\n", "conntrack.maxPerCore"),
        ("detectLocalMode: BridgeInterface\n", "detectLocalMode"),
        ("nftables: {syncPeriod: soon}\nmode: nftables\n", "nftables.syncPeriod"),
    ] {
        let config = c.write("bad.conf", &format!("kind: KubeProxyConfiguration\n{text}"));
        let out = c.nftproxy(&[
            "--config",
            config.to_str().unwrap(),
            "--sync-once",
            "--manifests",
            manifests.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: {stderr}");
        assert!(stderr.contains(says) && stderr.contains("bad.conf"), "{text}: {stderr}");
        assert!(!c.has_table(), "{text}: nothing applied");
    }
}

#[test]
fn conntrack_settings_land_in_the_nodes_namespace_and_nf_conntrack_max_is_never_lowered() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let outside = sysctl(&c, None, "nf_conntrack_tcp_timeout_close_wait");
    let config = c.write(
        "conntrack.conf",
        "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         conntrack:\n  maxPerCore: 1\n  min: 16\n  tcpEstablishedTimeout: 24h0m0s\n  tcpCloseWaitTimeout: 1h0m0s\n  \
         tcpBeLiberal: true\n  udpTimeout: 45s\n  udpStreamTimeout: 3m0s\n",
    );
    let manifests = demo_manifests();
    let out =
        c.nftproxy(&["--config", config.to_str().unwrap(), "--sync-once", "--manifests", manifests.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ns = Some("node");
    assert_eq!(sysctl(&c, ns, "nf_conntrack_tcp_timeout_established"), "86400");
    assert_eq!(sysctl(&c, ns, "nf_conntrack_tcp_timeout_close_wait"), "3600");
    assert_eq!(sysctl(&c, ns, "nf_conntrack_tcp_be_liberal"), "1");
    assert_eq!(sysctl(&c, ns, "nf_conntrack_udp_timeout"), "45");
    assert_eq!(sysctl(&c, ns, "nf_conntrack_udp_timeout_stream"), "180");
    // Per-namespace sysctls: the initial namespace keeps its own.
    assert_eq!(sysctl(&c, None, "nf_conntrack_tcp_timeout_close_wait"), outside);
    // nf_conntrack_max (16 asked) is never lowered: kept where it is, or not in this namespace.
    let max = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap();
    assert!(max.trim().parse::<u64>().unwrap() > 16, "{max}");
    assert!(stderr.contains("nf_conntrack_max"), "what happened to it is said: {stderr}");

    // The same through kube-proxy's flags (`--flag=value` spellings included).
    let out = c.nftproxy(&[
        "--conntrack-tcp-timeout-close-wait=2h0m0s",
        "--conntrack-tcp-be-liberal=true",
        "--masquerade-all=false",
        "--sync-once",
        "--manifests",
        manifests.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sysctl(&c, ns, "nf_conntrack_tcp_timeout_close_wait"), "7200");
}

/// The container args of a DaemonSet in deploy/ (`- --flag=value` lines under `args:`).
fn deploy_args(file: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(file)).unwrap();
    let args: Vec<String> = text
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- ").filter(|a| a.starts_with("--")).map(str::to_string))
        .collect();
    assert!(!args.is_empty(), "{file} has args");
    args
}

#[test]
fn the_daemonsets_in_deploy_start_with_their_args() {
    let Some(c) = web_cluster(&[8080], &[]) else { return };
    let config = c.write("config.conf", KUBEADM);
    let manifests = demo_manifests();
    for file in ["daemonset.yaml", "kubeadm-daemonset.yaml"] {
        let args: Vec<String> = deploy_args(file)
            .into_iter()
            .map(|a| {
                a.replace("$(NODE_NAME)", "node-1").replace("/var/lib/kube-proxy/config.conf", config.to_str().unwrap())
            })
            .collect();
        let mut full: Vec<&str> = args.iter().map(String::as_str).collect();
        full.extend(["--sync-once", "--manifests", manifests.to_str().unwrap()]);
        let out = c.nftproxy(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: {full:?}: {stderr}");
        assert!(!stderr.contains("WARN"), "{file}: {full:?} gives no warning: {stderr}");
        assert!(c.nft_list("inet nftproxy").contains("10.244.0.0/16"), "{file}: the pod range is applied");
        assert_eq!(c.probe("client", "tcp", "10.96.0.80:80", 3).values().sum::<usize>(), 3, "{file}");
    }
}
