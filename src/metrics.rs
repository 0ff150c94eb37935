//! Prometheus metrics with kube-proxy's names, the healthz state, and their HTTP servers.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{Family as ModelFamily, NoLocalEndpoints};
use crate::sync::{Outcome, SyncKind};

pub struct Metrics {
    registry: Registry,
    sync: Histogram,
    sync_full: Histogram,
    sync_partial: Histogram,
    programming: Family<Labels, Histogram, fn() -> Histogram>,
    last_timestamp: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    endpoint_changes_pending: Gauge,
    service_changes_pending: Gauge,
    no_local_endpoints: Family<Labels, Gauge>,
    cleanup_failures: Family<Labels, Counter>,
    reconciler_time: Family<Labels, Histogram, fn() -> Histogram>,
    reconciler_deleted: Family<Labels, Counter>,
    endpoint_changes: Counter,
    service_changes: Counter,
    failures: Counter,
    failures_by_reason: Family<Vec<(String, String)>, Counter>,
    invalid: Family<Vec<(String, String)>, Gauge>,
    healthz: Family<Vec<(String, String)>, Counter>,
    livez: Family<Vec<(String, String)>, Counter>,
    messages: Counter,
    unchanged: Counter,
    services: Gauge,
    conntrack_deleted: Counter,
    conntrack_time: Histogram,
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// kube-proxy's buckets for network programming latency: 0.25 s, 0.5 s, 1-59 s, 60-115 s by 5,
/// 2-5 min by 30 s.
fn programming_buckets() -> Histogram {
    let b = [0.25, 0.5].into_iter();
    let b = b.chain((1..=59).map(f64::from)).chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    Histogram::new(b.chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i))))
}

/// kube-proxy's `ip_family` label values.
fn ip_family(f: ModelFamily) -> &'static str {
    match f {
        ModelFamily::V4 => "IPv4",
        ModelFamily::V6 => "IPv6",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            sync: seconds(),
            sync_full: seconds(),
            sync_partial: seconds(),
            programming: Family::new_with_constructor(programming_buckets),
            last_timestamp: Gauge::default(),
            last_queued: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes_pending: Gauge::default(),
            no_local_endpoints: Family::default(),
            cleanup_failures: Family::default(),
            reconciler_time: Family::new_with_constructor(seconds),
            reconciler_deleted: Family::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            failures: Counter::default(),
            failures_by_reason: Family::default(),
            invalid: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            messages: Counter::default(),
            unchanged: Counter::default(),
            services: Gauge::default(),
            conntrack_deleted: Counter::default(),
            conntrack_time: seconds(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register("kubeproxy_sync_proxy_rules_duration_seconds", "Sync latency (any sync)", m.sync.clone());
        registry.register("kubeproxy_sync_full_proxy_rules_duration_seconds", "Full sync latency", m.sync_full.clone());
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "Partial sync latency",
            m.sync_partial.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to the commit of the rules that apply it \
             (slice updates that changed endpoints, triggered after the agent started)",
            m.programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "When a sync was last queued by a change (unix seconds)",
            m.last_queued.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "EndpointSlice changes waiting for a sync",
            m.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Service changes waiting for a sync",
            m.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy and no endpoint on this node (their traffic is dropped)",
            m.no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
            "Failed removals of stale objects (always in the sync's own transaction here: a failure counts as a sync failure)",
            m.cleanup_failures.clone(),
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "Time to clear stale UDP conntrack entries after a commit",
            m.reconciler_time.clone(),
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Stale UDP conntrack entries deleted",
            m.reconciler_deleted.clone(),
        );
        for family in [ModelFamily::V4, ModelFamily::V6] {
            let f = ip_family(family);
            m.no_local_endpoints(family, NoLocalEndpoints::default());
            let _ = m.cleanup_failures.get_or_create(&labels(&[("ip_family", f)]));
            let _ = m.reconciler_deleted.get_or_create(&labels(&[("ip_family", f)]));
            let _ = m.reconciler_time.get_or_create(&labels(&[("ip_family", f)]));
        }
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the rules were last synced successfully (unix seconds)",
            m.last_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Endpoint changes applied",
            m.endpoint_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Service changes applied",
            m.service_changes.clone(),
        );
        registry.register("kubeproxy_sync_proxy_rules_nftables_sync_failures", "Failed syncs", m.failures.clone());
        registry.register(
            "nftproxy_sync_failures",
            "Failed syncs by reason (input: bad objects; nftables: the kernel refused or could not be read)",
            m.failures_by_reason.clone(),
        );
        registry.register(
            "nftproxy_invalid_objects",
            "Objects skipped as invalid (API mode), present now, by kind; their Services keep their last good rules",
            m.invalid.clone(),
        );
        m.invalid_objects(&Default::default());
        registry.register("kubeproxy_proxy_healthz", "/healthz answers by HTTP code", m.healthz.clone());
        registry.register("kubeproxy_proxy_livez", "/livez answers by HTTP code", m.livez.clone());
        registry.register(
            "nftproxy_transaction_messages",
            "Netlink messages sent in nf_tables transactions",
            m.messages.clone(),
        );
        registry.register(
            "nftproxy_sync_unchanged",
            "Syncs that found nothing changed (one generation check, nothing read or sent)",
            m.unchanged.clone(),
        );
        registry.register("nftproxy_services", "Services programmed", m.services.clone());
        registry.register(
            "nftproxy_conntrack_entries_deleted",
            "Stale UDP conntrack entries deleted after commits",
            m.conntrack_deleted.clone(),
        );
        registry.register(
            "nftproxy_conntrack_cleanup_duration_seconds",
            "Time to dump conntrack and delete the stale UDP entries after a commit",
            m.conntrack_time.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Records a successful sync.
    pub fn synced(&self, o: &Outcome, services: usize) {
        let secs = o.total.as_secs_f64();
        self.sync.observe(secs);
        match o.kind {
            SyncKind::Full => self.sync_full.observe(secs),
            SyncKind::Partial => self.sync_partial.observe(secs),
            SyncKind::Unchanged => {
                self.unchanged.inc();
            }
        }
        let now = SystemTime::now();
        for c in &o.conntrack {
            let family = labels(&[("ip_family", ip_family(c.family))]);
            self.reconciler_time.get_or_create(&family).observe(c.time.as_secs_f64());
            self.reconciler_deleted.get_or_create(&family).inc_by(c.deleted as u64);
        }
        self.last_timestamp.set(now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64());
        self.endpoint_changes.inc_by(o.endpoints_changed as u64);
        self.service_changes.inc_by(o.services_changed as u64);
        self.messages.inc_by(o.stats.messages as u64);
        self.services.set(services as i64);
        self.conntrack_deleted.inc_by(o.conntrack_deleted as u64);
        if o.conntrack_time > Duration::ZERO {
            self.conntrack_time.observe(o.conntrack_time.as_secs_f64());
        }
    }

    /// Network programming latency: one sample per trigger time, measured to `committed` (the
    /// commit, before conntrack cleanup).
    pub fn programmed(&self, triggers: &[(SystemTime, ModelFamily)], committed: SystemTime) {
        for (at, family) in triggers {
            let latency = committed.duration_since(*at).unwrap_or_default().as_secs_f64();
            self.programming.get_or_create(&labels(&[("ip_family", ip_family(*family))])).observe(latency);
        }
    }

    /// A change arrived: kube-proxy's queued timestamp and pending counts.
    pub fn queued(&self, services_pending: usize, endpoints_pending: usize) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        self.last_queued.set(now);
        self.pending(services_pending, endpoints_pending);
    }

    pub fn pending(&self, services: usize, endpoints: usize) {
        self.service_changes_pending.set(services as i64);
        self.endpoint_changes_pending.set(endpoints as i64);
    }

    pub fn no_local_endpoints(&self, family: ModelFamily, n: NoLocalEndpoints) {
        for (policy, count) in [("internal", n.internal), ("external", n.external)] {
            let l = labels(&[("ip_family", ip_family(family)), ("traffic_policy", policy)]);
            self.no_local_endpoints.get_or_create(&l).set(count as i64);
        }
    }

    /// The invalid objects present now, by kind (Service and EndpointSlice always exported).
    pub fn invalid_objects(&self, by_kind: &std::collections::BTreeMap<String, i64>) {
        for kind in ["Service", "EndpointSlice"].iter().map(|k| k.to_string()).chain(by_kind.keys().cloned()) {
            let n = by_kind.get(&kind).copied().unwrap_or(0);
            self.invalid.get_or_create(&vec![("kind".to_string(), kind)]).set(n);
        }
    }

    /// A failed sync; `reason` is the error's `metric_label`.
    pub fn failed(&self, reason: &'static str) {
        self.failures.inc();
        self.failures_by_reason.get_or_create(&vec![("reason".to_string(), reason.to_string())]).inc();
    }

    /// Adds a collector read at every scrape (the endpoint counters, issue 14).
    pub fn with_collector(mut self, collector: Box<dyn prometheus_client::collector::Collector>) -> Self {
        self.registry.register_collector(collector);
        self
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// kube-proxy's healthz rule: unhealthy when a change has waited more than 2 x sync-period.
pub struct Health {
    sync_period: Duration,
    pending_since: Mutex<Option<Instant>>,
    last_synced: Mutex<Option<SystemTime>>,
    /// False while the Node is being deleted or the cluster autoscaler is removing it (KEP-3836):
    /// `/healthz` then answers 503 so load balancers drain the node; `/livez` ignores it.
    node_eligible: std::sync::atomic::AtomicBool,
}

impl Health {
    pub fn new(sync_period: Duration) -> Self {
        Health {
            sync_period,
            pending_since: Mutex::new(Some(Instant::now())),
            last_synced: Mutex::new(None),
            node_eligible: std::sync::atomic::AtomicBool::new(true),
        }
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, std::sync::atomic::Ordering::Relaxed);
    }

    fn node_eligible(&self) -> bool {
        self.node_eligible.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn queued(&self) {
        self.pending_since.lock().unwrap().get_or_insert_with(Instant::now);
    }

    pub fn synced(&self) {
        *self.pending_since.lock().unwrap() = None;
        *self.last_synced.lock().unwrap() = Some(SystemTime::now());
    }

    pub fn healthy(&self) -> bool {
        self.pending_since.lock().unwrap().is_none_or(|t| t.elapsed() <= 2 * self.sync_period)
    }

    /// kube-proxy's body: `lastUpdated` and `currentTime` as RFC 3339 times; with the node's
    /// eligibility on `/healthz`.
    fn body(&self, with_node: bool) -> String {
        let time = |t: SystemTime| format!("\"{}\"", humantime::format_rfc3339_millis(t));
        let last = self.last_synced.lock().unwrap().map(time).unwrap_or_else(|| "null".into());
        let node = if with_node { format!(", \"nodeEligible\": {}", self.node_eligible()) } else { String::new() };
        format!("{{\"lastUpdated\": {last}, \"currentTime\": {}{node}}}\n", time(SystemTime::now()))
    }

    /// (status, body) of `/healthz` (`node`) or `/livez`.
    pub fn answer(&self, node: bool) -> (StatusCode, String) {
        let ok = self.healthy() && (!node || self.node_eligible());
        (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, self.body(node))
    }
}

/// Serves `/metrics` on `addr`.
pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    serve_metrics_with(addr, metrics, Router::new()).await
}

/// Serves `/metrics` and the routes of `extra` (`/debug/services`) on `addr`. A scrape may read
/// the kernel (the endpoint counters): it runs on a blocking thread, not on the runtime's.
pub async fn serve_metrics_with(addr: SocketAddr, metrics: Arc<Metrics>, extra: Router) -> std::io::Result<()> {
    let scrape = move || {
        let m = metrics.clone();
        async move { tokio::task::spawn_blocking(move || m.encode()).await.unwrap_or_default() }
    };
    let app = Router::new().route("/metrics", get(scrape)).merge(extra);
    serve_bounded(tokio::net::TcpListener::bind(addr).await?, app).await
}

/// Most connections one of our HTTP servers holds at once: far below the descriptor limit (which
/// may be 1024, hard), so that no client can starve the sync path of sockets.
pub const MAX_CONNECTIONS: usize = 128;
/// A request's headers must arrive within this; an idle keep-alive connection is closed then too.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this, busy or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` with a connection cap and timeouts: connections beyond the cap
/// are closed at once, a connection that sends no complete request within `HEADER_TIMEOUT`
/// (idle keep-alive included) is closed, and none lives past `CONNECTION_LIFETIME`.
pub async fn serve_bounded(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Connections belong to this future: when it is dropped (a health-check port removed),
    // they are closed with it.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of descriptors or a reset before accept: wait a little, keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

/// Serves `/healthz` and `/livez` on `addr`, counting answers by code as kube-proxy does.
pub async fn serve_health(addr: SocketAddr, health: Arc<Health>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let handler = move |node: bool| {
        let (health, metrics) = (health.clone(), metrics.clone());
        move || async move {
            let (code, body) = health.answer(node);
            let counter = if node { &metrics.healthz } else { &metrics.livez };
            counter.get_or_create(&vec![("code".to_string(), code.as_u16().to_string())]).inc();
            (code, body)
        }
    };
    let app = Router::new().route("/healthz", get(handler(true))).route("/livez", get(handler(false)));
    serve_bounded(tokio::net::TcpListener::bind(addr).await?, app).await
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn failures_are_counted_in_total_and_by_reason() {
        let m = Metrics::default();
        m.failed(crate::Error::Input(crate::source::InputErrors(vec![])).metric_label());
        m.failed("nftables");
        m.failed("nftables");
        let text = m.encode();
        assert!(text.contains("kubeproxy_sync_proxy_rules_nftables_sync_failures_total 3"), "{text}");
        assert!(text.contains("nftproxy_sync_failures_total{reason=\"input\"} 1"), "{text}");
        assert!(text.contains("nftproxy_sync_failures_total{reason=\"nftables\"} 2"), "{text}");
    }
}

#[cfg(test)]
mod bounded_tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn http_get(addr: SocketAddr) -> Option<String> {
        let mut s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// Idle sockets beyond the cap cannot keep the server (or the process's descriptors) busy:
    /// the idle ones are closed after the header timeout and the server answers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_capped_and_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", get(|| async { "ok" }));
        tokio::spawn(serve_bounded(listener, app));
        let answered = tokio::task::spawn_blocking(move || {
            assert!(http_get(addr).unwrap().ends_with("ok"));
            let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS + 50).map(|_| TcpStream::connect(addr).unwrap()).collect();
            // Within the header timeout (plus slack) the server closes every idle socket...
            for mut s in idle {
                s.set_read_timeout(Some(HEADER_TIMEOUT + Duration::from_secs(20))).unwrap();
                let mut buf = [0u8; 1];
                let read = s.read(&mut buf);
                assert!(
                    matches!(read, Ok(0)) || read.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
                    "an idle connection stayed open: {read:?}"
                );
            }
            // ...and answers again.
            http_get(addr)
        })
        .await
        .unwrap();
        assert!(answered.unwrap().ends_with("ok"));
    }
}
