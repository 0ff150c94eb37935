//! The node agent against an API-server double, with real packets: it follows the API, keeps
//! serving when the API goes away, repairs a deleted table, restarts without breaking anything.

mod common;

use common::apiserver::{ApiServer, Kind, node, service, slice};
use common::*;

const PORT: u16 = 16443;
const VIP: &str = "10.96.0.80:80";

struct Setup {
    c: Cluster,
    api: ApiServer,
    kubeconfig: String,
}

fn setup() -> Option<Setup> {
    let c = web_cluster(&[8080], &[])?;
    let api = ApiServer::start_in(&c.node(), PORT);
    api.apply(Kind::Node, node("node-1"));
    api.apply(Kind::Service, service("web", "10.96.0.80", 80, 8080));
    api.apply(Kind::EndpointSlice, slice("web", 8080, &["10.244.1.2", "10.244.1.3", "10.244.1.4"]));
    let kubeconfig = api.kubeconfig(&c.dir).to_str().unwrap().to_string();
    Some(Setup { c, api, kubeconfig })
}

fn agent(s: &Setup, name: &str) -> Agent {
    s.c.start_agent(
        name,
        &["--kubeconfig", &s.kubeconfig, "--node-name", "node-1", "--min-sync-period", "100ms", "--sync-period", "2s"],
    )
}

fn only_web(got: &std::collections::BTreeMap<String, usize>) -> bool {
    !got.is_empty() && got.keys().all(|k| k.starts_with("web-"))
}

fn listing(c: &Cluster) -> String {
    if c.has_table() { c.nft_list("inet nftproxy") } else { String::new() }
}

#[test]
fn agent_follows_the_api_and_keeps_serving_through_outages() {
    let Some(mut s) = setup() else { return };
    let a = agent(&s, "agent");
    assert!(wait_until(30, || only_web(&s.c.probe("client", "tcp", VIP, 3))), "never served:\n{}", a.log_text());
    assert!(
        s.api
            .requests()
            .iter()
            .any(|r| r.starts_with("/api/v1/services?") && r.contains("service.kubernetes.io%2Fheadless")),
        "Services must be filtered server-side: {:?}",
        s.api.requests()
    );

    // An endpoint removed stops receiving new connections.
    s.api.apply(Kind::EndpointSlice, slice("web", 8080, &["10.244.1.2", "10.244.1.3"]));
    assert!(wait_until(10, || !listing(&s.c).contains("10.244.1.4")), "{}", a.log_text());
    let got = s.c.probe("client", "tcp", VIP, 60);
    assert!(only_web(&got) && !got.contains_key("web-c"), "{got:?}");

    // A Service created through the API becomes reachable; deleted, it is gone.
    s.api.apply(Kind::Service, service("api2", "10.96.0.81", 80, 8080));
    s.api.apply(Kind::EndpointSlice, slice("api2", 8080, &["10.244.1.4"]));
    assert!(wait_until(10, || s.c.probe("client", "tcp", "10.96.0.81:80", 1).contains_key("web-c")));
    s.api.delete(Kind::Service, "default", "api2");
    assert!(wait_until(10, || !listing(&s.c).contains("10.96.0.81")), "{}", a.log_text());
    assert!(!s.c.probe("client", "tcp", "10.96.0.81:80", 1).contains_key("web-c"));

    // A second EndpointSlice adds to its Service; relabelled to another Service, it moves there
    // (both Services change though the event names only the slice); deleted, it is gone.
    let extra = |owner: &str| {
        let mut v = slice(owner, 8080, &["10.244.1.4"]);
        v["metadata"]["name"] = "extra".into();
        v
    };
    s.api.apply(Kind::Service, service("api3", "10.96.0.82", 80, 8080));
    s.api.apply(Kind::EndpointSlice, extra("web"));
    assert!(wait_until(10, || s.c.probe("client", "tcp", VIP, 30).contains_key("web-c")), "{}", a.log_text());
    s.api.apply(Kind::EndpointSlice, extra("api3"));
    assert!(wait_until(10, || s.c.probe("client", "tcp", "10.96.0.82:80", 1).contains_key("web-c")));
    let got = s.c.probe("client", "tcp", VIP, 60);
    assert!(only_web(&got) && !got.contains_key("web-c"), "{got:?}");
    s.api.delete(Kind::EndpointSlice, "default", "extra");
    let refused = |got: std::collections::BTreeMap<String, usize>| got.contains_key("error: connection refused");
    assert!(wait_until(10, || refused(s.c.probe("client", "tcp", "10.96.0.82:80", 1))), "{}", a.log_text());
    s.api.delete(Kind::Service, "default", "api3");

    // The API goes away: nothing is removed, traffic keeps flowing.
    s.api.stop();
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert!(only_web(&s.c.probe("client", "tcp", VIP, 20)));
    // Changes made meanwhile are applied when it comes back (watch resumes or re-lists).
    s.api.apply(Kind::EndpointSlice, slice("web", 8080, &["10.244.1.2", "10.244.1.3", "10.244.1.4"]));
    s.api.restart();
    assert!(wait_until(30, || listing(&s.c).contains("10.244.1.4")), "{}", a.log_text());

    // 410 Gone on re-watch: the agent re-lists and still converges.
    s.api.stop();
    s.api.gone_next_watches(5);
    s.api.apply(Kind::EndpointSlice, slice("web", 8080, &["10.244.1.2"]));
    s.api.restart();
    assert!(wait_until(30, || !listing(&s.c).contains("10.244.1.3")), "{}", a.log_text());
    assert_eq!(s.c.probe("client", "tcp", VIP, 10).get("web-a"), Some(&10));

    // Someone deletes our table: the next periodic check restores it.
    s.c.nft("delete table inet nftproxy");
    assert!(wait_until(10, || s.c.has_table()), "{}", a.log_text());
    assert_eq!(s.c.probe("client", "tcp", VIP, 10).get("web-a"), Some(&10));

    // Outages were logged once each per watch, not in a loop: at most one line per watch (three)
    // for the connection outage, and one per 410 Gone answer (five).
    let log = a.log_text();
    let failures = log.matches("Kubernetes API watch failed").count();
    assert!((1..=8).contains(&failures), "{failures} failure lines:\n{log}");
}

#[test]
fn metrics_and_healthz_move_with_syncs() {
    let Some(s) = setup() else { return };
    let a = agent(&s, "agent");
    assert!(wait_until(30, || only_web(&s.c.probe("client", "tcp", VIP, 1))), "{}", a.log_text());
    let get = || s.c.http_get("127.0.0.1:10249", "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(wait_until(10, || metric(&get(), "kubeproxy_sync_proxy_rules_last_timestamp_seconds").is_some()));
    let first = get();
    let ts1 = metric(&first, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap();
    assert!(metric(&first, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= Some(1.0), "{first}");
    assert!(metric(&first, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= Some(3.0), "{first}");
    assert_eq!(metric(&first, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"), Some(0.0));
    // kube-proxy's names are exported with a value from the start.
    for series in [
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"external\"}",
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv4\"}",
        "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv6\"}",
        "kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"}",
    ] {
        assert_eq!(labelled(&first, series), Some(0.0), "{series}\n{first}");
    }
    assert_eq!(metric(&first, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"), Some(0.0), "{first}");
    assert_eq!(metric(&first, "kubeproxy_sync_proxy_rules_service_changes_pending"), Some(0.0), "{first}");
    // The conntrack cleanup's metrics are exported (no UDP flow here: nothing deleted yet).
    assert_eq!(metric(&first, "nftproxy_conntrack_entries_deleted_total"), Some(0.0), "{first}");
    assert!(first.contains("nftproxy_conntrack_cleanup_duration_seconds_bucket"), "{first}");
    // A change: a partial sync, the timestamp and the counters move.
    s.api.apply(Kind::EndpointSlice, slice("web", 8080, &["10.244.1.2"]));
    assert!(wait_until(10, || metric(&get(), "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") >= Some(1.0)));
    let second = get();
    assert!(metric(&second, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap() > ts1);
    assert!(metric(&second, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > Some(ts1 - 60.0), "{second}");
    assert!(metric(&second, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= Some(5.0), "{second}");
    assert!(metric(&second, "nftproxy_transaction_messages_total") > Some(0.0));
    // Periodic checks of an untouched kernel read and send nothing.
    assert!(wait_until(10, || metric(&get(), "nftproxy_sync_unchanged_total") >= Some(1.0)));
    let (code, body) = s.c.http_get("127.0.0.1:10256", "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, _) = s.c.http_get("127.0.0.1:10256", "/livez").unwrap();
    assert_eq!(code, 200);
    // Metrics listen on loopback only by default.
    assert!(s.c.http_get("192.0.2.1:10249", "/metrics").is_none());
}

#[test]
fn a_restart_breaks_no_connection_and_sends_no_change() {
    let Some(s) = setup() else { return };
    let a = agent(&s, "agent-1");
    assert!(wait_until(30, || only_web(&s.c.probe("client", "tcp", VIP, 1))), "{}", a.log_text());
    let ns = s.c.ns("client");
    let hold =
        std::process::Command::new("ip").args(["netns", "exec", &ns, TESTPOD, "hold", VIP, "--seconds", "6"]).output();
    let holder = std::thread::spawn(move || hold.unwrap());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = s.c.nft_list("inet nftproxy");
    assert!(a.terminate().success());
    assert_eq!(s.c.nft_list("inet nftproxy"), before, "exiting must not touch the rules");
    let b = agent(&s, "agent-2");
    let get = || s.c.http_get("127.0.0.1:10249", "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(
        wait_until(30, || metric(&get(), "kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= Some(1.0)),
        "{}",
        b.log_text()
    );
    assert_eq!(
        metric(&get(), "nftproxy_transaction_messages_total"),
        Some(0.0),
        "restart with unchanged state sent changes"
    );
    assert_eq!(s.c.nft_list("inet nftproxy"), before, "handles changed across the restart");
    let out = holder.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(" held "), "the long-lived connection broke: {text}");
}

#[test]
fn manifest_watch_applies_file_changes() {
    if !can_run_netns_tests() {
        return;
    }
    let mut c = Cluster::new(demo_pods());
    for pod in ["web-a", "web-b"] {
        c.serve(pod, pod, &[8080], &[]);
    }
    let yaml = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.80, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
apiVersion: v1\nkind: Endpoints\nmetadata: {{name: web}}\nsubsets: [{{addresses: [{{ip: {ip}}}], ports: [{{port: 8080}}]}}]\n"
        )
    };
    let m = c.write("web.yaml", &yaml("10.244.1.2"));
    let dir = m.parent().unwrap().to_str().unwrap().to_string();
    let a = c.start_agent("agent", &["--manifests", &dir, "--watch", "--min-sync-period", "100ms"]);
    assert!(wait_until(20, || c.probe("client", "tcp", VIP, 1).contains_key("web-a")), "{}", a.log_text());
    c.write("web.yaml", &yaml("10.244.1.3"));
    assert!(wait_until(20, || c.probe("client", "tcp", VIP, 1).contains_key("web-b")), "{}", a.log_text());
    assert_eq!(c.probe("client", "tcp", VIP, 10).get("web-b"), Some(&10));
}

#[test]
fn api_mode_serves_node_ports_on_the_nodes_internal_ips_and_follows_them() {
    let Some(s) = setup() else { return };
    // The Node says its InternalIP is the uplink address; web becomes a NodePort.
    let with_ip = |ip: &str| {
        let mut n = node("node-1");
        n["status"] = serde_json::json!({"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": "node-1"}]});
        n
    };
    s.api.apply(Kind::Node, with_ip("192.0.2.1"));
    let mut web = service("web", "10.96.0.80", 80, 8080);
    web["spec"]["type"] = "NodePort".into();
    web["spec"]["ports"][0]["nodePort"] = 30080.into();
    s.api.apply(Kind::Service, web);
    let a = agent(&s, "agent-np");
    let from_outside = |addr: &str| s.c.probe_ms("ext", "tcp", addr, 3, 1000);
    assert!(wait_until(20, || only_web(&from_outside("192.0.2.1:30080"))), "{}\n{}", a.log_text(), listing(&s.c));
    // The Node's address moves to one the node also holds: node ports follow, the old one stops.
    s.c.exec_ok("node", &["ip", "addr", "add", "192.0.2.9/24", "dev", "ext0"]);
    s.api.apply(Kind::Node, with_ip("192.0.2.9"));
    assert!(wait_until(20, || only_web(&from_outside("192.0.2.9:30080"))), "{}", a.log_text());
    assert!(wait_until(10, || !only_web(&from_outside("192.0.2.1:30080"))), "{}", a.log_text());
}

/// `metric{label="value"} N` from a /metrics text.
fn labelled(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn one_bad_object_is_skipped_on_its_own_and_its_service_keeps_its_last_good_rules() {
    let Some(s) = setup() else { return };
    let heavy = |mut v: serde_json::Value| {
        v["metadata"]["annotations"] = serde_json::json!({"nftproxy.io/weight": "heavy"});
        v
    };
    // db's slice is invalid from the start: the agent starts, serves web, and counts the slice.
    s.api.apply(Kind::Service, service("db", "10.96.0.81", 80, 8080));
    s.api.apply(Kind::EndpointSlice, heavy(slice("db", 8080, &["10.244.1.4"])));
    let a = agent(&s, "agent-bad");
    let metrics = || s.c.http_get("127.0.0.1:10249", "/metrics").map(|(_, b)| b).unwrap_or_default();
    let invalid_slices = || labelled(&metrics(), "nftproxy_invalid_objects{kind=\"EndpointSlice\"}");
    assert!(wait_until(30, || only_web(&s.c.probe("client", "tcp", VIP, 3))), "{}", a.log_text());
    assert!(wait_until(10, || invalid_slices() == Some(1.0)), "{}", metrics());
    assert!(a.log_text().contains("nftproxy.io/weight"), "the warning names the field:\n{}", a.log_text());
    assert!(!s.c.probe("client", "tcp", "10.96.0.81:80", 2).contains_key("web-c"), "db never had good rules");
    // Fixed: db is served, the gauge returns to 0.
    s.api.apply(Kind::EndpointSlice, slice("db", 8080, &["10.244.1.4"]));
    assert!(
        wait_until(10, || s.c.probe("client", "tcp", "10.96.0.81:80", 3).get("web-c") == Some(&3)),
        "{}",
        a.log_text()
    );
    assert!(wait_until(10, || invalid_slices() == Some(0.0)), "{}", metrics());
    // web's slice goes bad while moving to web-c: web keeps its last good rules (web-a..c as
    // before, not only web-c), and other Services still sync (db moves to web-a).
    s.api.apply(Kind::EndpointSlice, heavy(slice("web", 8080, &["10.244.1.4"])));
    s.api.apply(Kind::EndpointSlice, slice("db", 8080, &["10.244.1.2"]));
    assert!(
        wait_until(10, || s.c.probe("client", "tcp", "10.96.0.81:80", 3).get("web-a") == Some(&3)),
        "{}",
        a.log_text()
    );
    assert!(wait_until(10, || invalid_slices() == Some(1.0)), "{}", metrics());
    let web = s.c.probe("client", "tcp", VIP, 30);
    assert!(web.len() == 3 && only_web(&web), "web keeps its three endpoints: {web:?}");
    let (code, _) = s.c.http_get("127.0.0.1:10256", "/healthz").unwrap();
    assert_eq!(code, 200, "a bad object is not an unhealthy proxy");
}

#[test]
fn a_zone_label_change_on_the_node_moves_topology_aware_traffic_without_a_restart() {
    let Some(s) = setup() else { return };
    // web's endpoints carry zone hints: web-a for zone-a, web-b for zone-b.
    let mut hinted = slice("web", 8080, &["10.244.1.2", "10.244.1.3"]);
    for (i, zone) in ["zone-a", "zone-b"].iter().enumerate() {
        hinted["endpoints"][i]["hints"] = serde_json::json!({"forZones": [{"name": zone}]});
    }
    s.api.apply(Kind::EndpointSlice, hinted);
    let a = agent(&s, "agent-zone");
    let only = |pod: &str| {
        let got = s.c.probe("client", "tcp", VIP, 10);
        got.get(pod) == Some(&10)
    };
    assert!(wait_until(30, || only("web-a")), "the Node is in zone-a:\n{}", a.log_text());
    let mut n = node("node-1");
    n["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-b".into();
    s.api.apply(Kind::Node, n);
    assert!(wait_until(20, || only("web-b")), "the Node moved to zone-b:\n{}", a.log_text());
}

#[test]
fn healthz_drains_a_node_the_autoscaler_removes_while_livez_stays_up() {
    let Some(s) = setup() else { return };
    let a = agent(&s, "agent-drain");
    assert!(wait_until(30, || only_web(&s.c.probe("client", "tcp", VIP, 3))), "{}", a.log_text());
    let healthz = || s.c.http_get("127.0.0.1:10256", "/healthz").unwrap_or_default();
    let (code, body) = healthz();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"nodeEligible\": true") && body.contains("\"lastUpdated\": \"20"), "{body}");
    let mut n = node("node-1");
    n["spec"] = serde_json::json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}]});
    s.api.apply(Kind::Node, n);
    assert!(wait_until(10, || healthz().0 == 503), "{}", a.log_text());
    assert!(healthz().1.contains("\"nodeEligible\": false"));
    let (code, body) = s.c.http_get("127.0.0.1:10256", "/livez").unwrap();
    assert_eq!(code, 200, "livez ignores the node: {body}");
    assert!(!body.contains("nodeEligible"), "{body}");
    assert!(only_web(&s.c.probe("client", "tcp", VIP, 3)), "the node still proxies while draining");
    let metrics = s.c.http_get("127.0.0.1:10249", "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(labelled(&metrics, "kubeproxy_proxy_healthz_total{code=\"503\"}") >= Some(1.0), "{metrics}");
    assert!(labelled(&metrics, "kubeproxy_proxy_livez_total{code=\"200\"}") >= Some(1.0), "{metrics}");
    s.api.apply(Kind::Node, node("node-1"));
    assert!(wait_until(10, || healthz().0 == 200), "{}", a.log_text());
}

/// `slice` with an `endpoints.kubernetes.io/last-change-trigger-time` annotation.
fn triggered(mut slice: serde_json::Value, at: &str) -> serde_json::Value {
    slice["metadata"]["annotations"] = serde_json::json!({"endpoints.kubernetes.io/last-change-trigger-time": at});
    slice
}

#[test]
fn network_programming_latency_has_kube_proxys_semantics() {
    let Some(s) = setup() else { return };
    let a = agent(&s, "agent-npl");
    assert!(wait_until(30, || only_web(&s.c.probe("client", "tcp", VIP, 1))), "{}", a.log_text());
    let get = || s.c.http_get("127.0.0.1:10249", "/metrics").map(|(_, b)| b).unwrap_or_default();
    let count = || labelled(&get(), "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}");
    let synced = || metric(&get(), "kubeproxy_sync_partial_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    // Applies `obj` and waits for the partial sync it causes.
    let apply_and_sync = |obj: serde_json::Value| {
        let before = synced();
        s.api.apply(Kind::EndpointSlice, obj);
        assert!(wait_until(10, || synced() > before), "{}", a.log_text());
    };
    assert_eq!(count(), None, "no slice had a trigger time after the start: no sample\n{}", get());

    // An endpoint change triggered now: one sample, from the trigger time to the commit.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    apply_and_sync(triggered(slice("web", 8080, &["10.244.1.2", "10.244.1.3"]), &now));
    assert_eq!(count(), Some(1.0), "{}", get());
    let sum = labelled(&get(), "kubeproxy_network_programming_duration_seconds_sum{ip_family=\"IPv4\"}").unwrap();
    assert!((0.0..10.0).contains(&sum), "from {now} to the commit: {sum} s");
    assert!(
        get().contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\",ip_family=\"IPv4\"}")
            || get().contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.25\"}"),
        "kube-proxy's first bucket\n{}",
        get()
    );

    // A change triggered before the agent started: no sample.
    apply_and_sync(triggered(slice("web", 8080, &["10.244.1.2"]), "2020-01-01T00:00:00Z"));
    // The same endpoints with a new trigger time: not an endpoint change, no sample.
    let later = k8s_openapi::jiff::Timestamp::now().to_string();
    s.api.apply(Kind::EndpointSlice, triggered(slice("web", 8080, &["10.244.1.2"]), &later));
    // A deletion, however old the slice: no sample.
    let before = synced();
    s.api.delete(Kind::EndpointSlice, "default", "web-abc");
    assert!(wait_until(10, || synced() > before), "{}", a.log_text());
    assert_eq!(count(), Some(1.0), "only the first change is a sample\n{}", get());
}

#[test]
fn api_mode_from_a_kube_proxy_config_file() {
    let Some(s) = setup() else { return };
    // kubeadm's layout: the API access, bind addresses and periods in the file, the node name
    // from `--hostname-override`, as kube-proxy's DaemonSet passes them.
    let config = s.c.write(
        "kube-proxy.conf",
        &format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
             clientConnection:\n  kubeconfig: {}\nclusterCIDR: 10.244.0.0/16\nmetricsBindAddress: 127.0.0.1:10259\n\
             healthzBindAddress: 0.0.0.0:10266\nnftables:\n  minSyncPeriod: 100ms\n  syncPeriod: 2s\n",
            s.kubeconfig
        ),
    );
    let a = s.c.start_agent("agent-config", &["--config", config.to_str().unwrap(), "--hostname-override=node-1"]);
    assert!(wait_until(30, || only_web(&s.c.probe("client", "tcp", VIP, 3))), "{}", a.log_text());
    let metrics = s.c.http_get("127.0.0.1:10259", "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(metric(&metrics, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= Some(1.0), "{metrics}");
    assert_eq!(s.c.http_get("127.0.0.1:10266", "/livez").map(|(c, _)| c), Some(200));
    // A change goes through at the file's pace.
    s.api.apply(Kind::EndpointSlice, slice("web", 8080, &["10.244.1.4"]));
    assert!(wait_until(10, || s.c.probe("client", "tcp", VIP, 3).get("web-c") == Some(&3)), "{}", a.log_text());
    assert!(!a.log_text().contains("WARN"), "{}", a.log_text());
}
