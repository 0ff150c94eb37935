//! Service health-check servers, as kube-proxy runs them (`pkg/proxy/healthcheck/service_health.go`).
//!
//! For each LoadBalancer Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort`,
//! an HTTP server on that port answers any path and method: 200 when this node has ready local
//! endpoints and the proxy is healthy, else 503, with kube-proxy's JSON body. Load balancers use
//! it to send external traffic only to nodes that can serve it locally.

use crate::lock;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::model::{Family, Locality, ServiceId, Snapshot};

/// What one health-check port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHealth {
    pub id: ServiceId,
    pub local_endpoints: usize,
}

/// The health-check listeners of this node, one per wanted port.
pub struct HealthChecks {
    /// Empty: every address (0.0.0.0 and [::]).
    addresses: Vec<IpAddr>,
    proxy_healthy: Arc<AtomicBool>,
    ports: BTreeMap<u16, Port>,
}

/// One wanted port: what it answers and, once bound, its listeners.
struct Port {
    /// Read by the handler on every request.
    health: Arc<Mutex<ServiceHealth>>,
    /// `None`: binding failed; retried on the next update.
    listening: Option<Listening>,
    /// A bind failure was logged and not yet followed by a success.
    warned: bool,
}

/// The listeners of one port (one per address). Dropping it closes the port at once; the
/// aborted serving tasks then drop their listeners and close their connections.
struct Listening {
    /// Duplicates of the listening sockets, shut down on drop so that the port refuses
    /// connections and can be bound again before the serving tasks are gone (aborting is
    /// asynchronous: a task drops its listener the next time the runtime gets to it).
    sockets: Vec<Socket>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        // Abort first, so that a task woken by the shutdown is dropped rather than polled into
        // an accept error.
        for t in &self.tasks {
            t.abort();
        }
        for s in &self.sockets {
            // On Linux this stops a listening socket (SYNs get RSTs) and leaves it bound in the
            // CLOSE state, which SO_REUSEADDR lets a new listener bind over.
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl HealthChecks {
    /// `addresses`: where to listen (the node-port addresses; empty = all addresses, 0.0.0.0 and [::]).
    pub fn new(addresses: Vec<IpAddr>) -> Self {
        HealthChecks { addresses, proxy_healthy: Arc::new(AtomicBool::new(true)), ports: BTreeMap::new() }
    }

    /// Opens listeners for new ports, closes those no longer wanted, and updates what each answers
    /// (an answer follows the next request after this returns). A port that cannot be bound is logged
    /// once (tracing::warn with the Service name and port) and retried on the next update; never panics.
    pub fn update(&mut self, wanted: BTreeMap<u16, ServiceHealth>) {
        self.ports.retain(|port, p| {
            let keep = wanted.contains_key(port);
            if !keep && p.listening.is_some() {
                let id = lock(&p.health).id.clone();
                tracing::debug!(service = %id, port, "closing health check");
            }
            keep
        });
        for (port, health) in wanted {
            match self.ports.get_mut(&port) {
                Some(p) => {
                    let mut current = lock(&p.health);
                    if current.id != health.id {
                        // Another Service took the port: its failures are news again.
                        p.warned = false;
                    }
                    *current = health;
                }
                None => {
                    let p = Port { health: Arc::new(Mutex::new(health)), listening: None, warned: false };
                    self.ports.insert(port, p);
                }
            }
        }
        self.bind_missing();
    }

    /// Changes the addresses listened on (node address change): rebinds every port.
    pub fn set_addresses(&mut self, addresses: Vec<IpAddr>) {
        if addresses == self.addresses {
            return;
        }
        self.addresses = addresses;
        // Close everything first: a new address may overlap an old one (e.g. 0.0.0.0).
        for p in self.ports.values_mut() {
            p.listening = None;
            p.warned = false;
        }
        self.bind_missing();
    }

    pub fn set_proxy_healthy(&self, healthy: bool) {
        self.proxy_healthy.store(healthy, Ordering::Relaxed);
    }

    /// Ports currently listening (for tests and logs).
    pub fn ports(&self) -> Vec<u16> {
        self.ports.iter().filter(|(_, p)| p.listening.is_some()).map(|(port, _)| *port).collect()
    }

    fn bind_missing(&mut self) {
        let addresses = listen_addresses(&self.addresses);
        for (&port, p) in self.ports.iter_mut().filter(|(_, p)| p.listening.is_none()) {
            let id = lock(&p.health).id.clone();
            match open(&addresses, port, &p.health, &self.proxy_healthy) {
                Ok(l) => {
                    if p.warned {
                        tracing::info!(service = %id, port, "health check listening now");
                    } else {
                        tracing::debug!(service = %id, port, "opened health check");
                    }
                    p.listening = Some(l);
                    p.warned = false;
                }
                Err(error) => {
                    if !p.warned {
                        tracing::warn!(service = %id, port, %error, "cannot listen for health checks, will retry");
                        p.warned = true;
                    }
                }
            }
        }
    }
}

/// Pure helper: the wanted map from a snapshot: every Service whose `external.health_check_node_port`
/// is Some and `external.local` is true, with the number of distinct IPs of this node's ready
/// endpoints across its ports (kube-proxy's count: terminating endpoints do not count, so that load
/// balancers drain the node; endpoints drained with weight 0 do not count either).
pub fn wanted(snapshot: &Snapshot, here: &Locality) -> BTreeMap<u16, ServiceHealth> {
    let mut out = BTreeMap::new();
    for svc in snapshot.services.values() {
        let Some(port) = svc.external.health_check_node_port.filter(|_| svc.external.local) else {
            continue;
        };
        let ips: BTreeSet<IpAddr> = svc
            .ports
            .iter()
            .flat_map(|p| [Family::V4, Family::V6].into_iter().flat_map(move |f| p.usable_endpoints(f, true, here)))
            .filter(|e| e.ready)
            .map(|e| e.ip)
            .collect();
        // Ports are unique cluster-wide; should two Services claim one, the first keeps it.
        out.entry(port).or_insert(ServiceHealth { id: svc.id.clone(), local_endpoints: ips.len() });
    }
    out
}

/// Empty means every address; `wildcard` says so.
fn listen_addresses(addresses: &[IpAddr]) -> ListenOn {
    if addresses.is_empty() {
        ListenOn { addresses: vec![Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()], wildcard: true }
    } else {
        let mut a = addresses.to_vec();
        a.sort();
        a.dedup();
        ListenOn { addresses: a, wildcard: false }
    }
}

struct ListenOn {
    addresses: Vec<IpAddr>,
    wildcard: bool,
}

/// Listens on `port` on every address and starts serving; all or nothing.
fn open(
    on: &ListenOn,
    port: u16,
    health: &Arc<Mutex<ServiceHealth>>,
    proxy: &Arc<AtomicBool>,
) -> io::Result<Listening> {
    // Spawning and registering sockets need a runtime: fail (and retry later) rather than panic.
    tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let mut bound = Vec::new();
    for ip in &on.addresses {
        let addr = SocketAddr::new(*ip, port);
        match bind(addr) {
            Ok(b) => bound.push(b),
            // Every address includes [::] only where the node has IPv6.
            Err(e) if on.wildcard && ip.is_ipv6() && no_ipv6(&e) => {
                tracing::debug!(%addr, error = %e, "no IPv6 here, health check on IPv4 only");
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("{addr}: {e}"))),
        }
    }
    let mut l = Listening { sockets: Vec::new(), tasks: Vec::new() };
    for (socket, listener) in bound {
        l.sockets.push(socket);
        let app = router(health.clone(), proxy.clone());
        l.tasks.push(tokio::spawn(async move {
            // The same connection cap and timeouts as /healthz and /metrics: a load balancer's
            // (or anyone's) idle connections cannot use up the agent's descriptors.
            let _ = crate::metrics::serve_bounded(listener, app).await;
        }));
    }
    Ok(l)
}

fn no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL))
}

/// A listening socket with SO_REUSEADDR (so a port can be bound again right after closing),
/// and a duplicate of it to shut it down with.
fn bind(addr: SocketAddr) -> io::Result<(Socket, TcpListener)> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    let dup = s.try_clone()?;
    let listener = TcpListener::from_std(std::net::TcpListener::from(s))?;
    Ok((dup, listener))
}

fn router(health: Arc<Mutex<ServiceHealth>>, proxy: Arc<AtomicBool>) -> Router {
    Router::new().fallback(move || {
        let (id, count) = {
            let h = lock(&health);
            (h.id.clone(), h.local_endpoints)
        };
        let healthy = proxy.load(Ordering::Relaxed);
        async move {
            let code = if count > 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (code, [(CONTENT_TYPE, "application/json"), (X_CONTENT_TYPE_OPTIONS, "nosniff")], body(&id, count, healthy))
        }
    })
}

/// kube-proxy's body, byte for byte (a dedented, tab-indented Go template).
fn body(id: &ServiceId, local_endpoints: usize, proxy_healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        json_string(&id.namespace),
        json_string(&id.name),
        local_endpoints,
        proxy_healthy
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::model::{Endpoint, External, Protocol, Service, ServicePort};

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// Ports nothing listens on (bound to port 0 together, so distinct, then released).
    fn free_ports<const N: usize>() -> [u16; N] {
        let held: Vec<_> = (0..N).map(|_| std::net::TcpListener::bind((LOCALHOST, 0)).unwrap()).collect();
        std::array::from_fn(|i| held[i].local_addr().unwrap().port())
    }

    fn free_port() -> u16 {
        free_ports::<1>()[0]
    }

    fn health(name: &str, local_endpoints: usize) -> ServiceHealth {
        ServiceHealth { id: ServiceId::new("default", name), local_endpoints }
    }

    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// A plain HTTP/1.1 GET, on a blocking thread so the runtime keeps serving.
    async fn get(port: u16, path: &str) -> io::Result<Response> {
        let path = path.to_string();
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect((LOCALHOST, port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| io::Error::other(raw.clone()))?;
            let mut lines = head.lines();
            let status = lines.next().unwrap_or_default().split(' ').nth(1).unwrap_or_default().parse().unwrap_or(0);
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .collect();
            Ok(Response { status, headers, body: body.to_string() })
        })
        .await
        .unwrap()
    }

    fn refused(port: u16) -> bool {
        matches!(
            std::net::TcpStream::connect((LOCALHOST, port)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn answers_200_with_kube_proxy_body_when_local_endpoints() {
        let port = free_port();
        let mut hc = HealthChecks::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(port, health("web", 2))]));
        assert_eq!(hc.ports(), vec![port]);
        for path in ["/", "/healthz", "/any/thing?x=1"] {
            let r = get(port, path).await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(
                r.body,
                "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
            );
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(
                v,
                serde_json::json!({"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
            );
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn answers_503_without_local_endpoints_and_follows_updates() {
        let port = free_port();
        let mut hc = HealthChecks::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(port, health("web", 0))]));
        let r = get(port, "/").await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["localEndpoints"], 0);

        hc.update(BTreeMap::from([(port, health("web", 3))]));
        let r = get(port, "/").await.unwrap();
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["localEndpoints"], 3);

        hc.update(BTreeMap::from([(port, health("web", 0))]));
        assert_eq!(get(port, "/").await.unwrap().status, 503);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn removed_port_refuses_and_readded_port_listens() {
        let [a, b] = free_ports();
        let mut hc = HealthChecks::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(a, health("a", 1)), (b, health("b", 1))]));
        assert_eq!(hc.ports(), BTreeSet::from([a, b]).into_iter().collect::<Vec<_>>());

        hc.update(BTreeMap::from([(b, health("b", 1))]));
        assert_eq!(hc.ports(), vec![b]);
        assert!(refused(a), "port {a} still accepts connections after removal");
        assert_eq!(get(b, "/").await.unwrap().status, 200);

        // Re-added right away: the old socket is out of the way.
        hc.update(BTreeMap::from([(a, health("a", 1)), (b, health("b", 1))]));
        assert_eq!(hc.ports().len(), 2);
        let r = get(a, "/").await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.contains("\"name\": \"a\""));

        hc.update(BTreeMap::new());
        assert!(hc.ports().is_empty());
        assert!(refused(a) && refused(b));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn removal_closes_open_connections() {
        let port = free_port();
        let mut hc = HealthChecks::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(port, health("web", 1))]));
        // A kept-alive connection that has been answered once, as load balancers keep them.
        let mut s = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect((LOCALHOST, port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&got).ends_with('}') {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "closed before answering");
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"HTTP/1.1 200"));
            s
        })
        .await
        .unwrap();
        hc.update(BTreeMap::new());
        let n = tokio::task::spawn_blocking(move || s.read(&mut [0u8; 16])).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "idle connection still open: {n:?}");
        if let Err(e) = n {
            assert_ne!(e.kind(), io::ErrorKind::WouldBlock, "idle connection still open");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unhealthy_proxy_answers_503_like_kube_proxy() {
        let port = free_port();
        let mut hc = HealthChecks::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(port, health("web", 2))]));
        hc.set_proxy_healthy(false);
        let r = get(port, "/").await.unwrap();
        assert_eq!(r.status, 503);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["serviceProxyHealthy"], false);
        assert_eq!(v["localEndpoints"], 2);
        hc.set_proxy_healthy(true);
        assert_eq!(get(port, "/").await.unwrap().status, 200);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn busy_port_is_retried_on_the_next_update() {
        let squatter = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
        let port = squatter.local_addr().unwrap().port();
        let mut hc = HealthChecks::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(port, health("web", 1))]));
        assert!(hc.ports().is_empty());
        hc.update(BTreeMap::from([(port, health("web", 1))]));
        assert!(hc.ports().is_empty());
        drop(squatter);
        hc.update(BTreeMap::from([(port, health("web", 1))]));
        assert_eq!(hc.ports(), vec![port]);
        assert_eq!(get(port, "/").await.unwrap().status, 200);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn set_addresses_rebinds() {
        let port = free_port();
        let mut hc = HealthChecks::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(port, health("web", 1))]));
        // 127.0.0.2 is loopback too on Linux: the port moves there.
        hc.set_addresses(vec!["127.0.0.2".parse().unwrap()]);
        assert_eq!(hc.ports(), vec![port]);
        assert!(refused(port));
        let s = std::net::TcpStream::connect(("127.0.0.2", port));
        assert!(s.is_ok());
        // Every address, then back: 0.0.0.0 and a specific address overlap.
        hc.set_addresses(vec![]);
        assert_eq!(hc.ports(), vec![port]);
        assert_eq!(get(port, "/").await.unwrap().status, 200);
        hc.set_addresses(vec![LOCALHOST]);
        assert_eq!(hc.ports(), vec![port]);
        assert_eq!(get(port, "/").await.unwrap().status, 200);
    }

    #[test]
    fn update_outside_a_runtime_does_not_panic() {
        let mut hc = HealthChecks::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(free_port(), health("web", 1))]));
        assert!(hc.ports().is_empty());
    }

    #[test]
    fn body_escapes_strings() {
        let b = body(&ServiceId::new("a\"b", "c\\d\n"), 0, false);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["service"]["namespace"], "a\"b");
        assert_eq!(v["service"]["name"], "c\\d\n");
        assert_eq!(v["serviceProxyHealthy"], false);
    }

    fn ep(ip: &str, node: &str, ready: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ready,
            serving: ready || terminating,
            terminating,
            node_name: Some(node.into()),
            ..Endpoint::ready(ip.parse().unwrap(), 8080)
        }
    }

    fn service(name: &str, local: bool, hc_port: Option<u16>, ports: Vec<Vec<Endpoint>>) -> Service {
        let ports = ports
            .into_iter()
            .enumerate()
            .map(|(i, endpoints)| ServicePort {
                name: format!("p{i}"),
                port: 80 + i as u16,
                protocol: Protocol::Tcp,
                node_port: Some(30080 + i as u16),
                endpoints,
            })
            .collect();
        let mut s = Service::new(ServiceId::new("default", name), vec!["10.96.0.1".parse().unwrap()], ports);
        s.external = External {
            load_balancer_ips: vec!["192.0.2.1".parse().unwrap()],
            local,
            health_check_node_port: hc_port,
            ..External::default()
        };
        s
    }

    #[test]
    fn wanted_picks_local_services_with_a_health_check_port_and_counts_local_endpoints() {
        let here = Locality { node: Some("n1".into()), zone: None };
        // (service, expected entry)
        let cases: Vec<(Service, Option<(u16, usize)>)> = vec![
            // two local ready endpoints, one remote
            (
                service(
                    "web",
                    true,
                    Some(32000),
                    vec![vec![
                        ep("10.0.0.1", "n1", true, false),
                        ep("10.0.0.2", "n1", true, false),
                        ep("10.0.0.3", "n2", true, false),
                    ]],
                ),
                Some((32000, 2)),
            ),
            // no local endpoint: reported with 0
            (service("remote", true, Some(32001), vec![vec![ep("10.0.0.3", "n2", true, false)]]), Some((32001, 0))),
            // the same endpoint IP behind two ports counts once; IPv6 counts too
            (
                service(
                    "multi",
                    true,
                    Some(32002),
                    vec![
                        vec![ep("10.0.0.1", "n1", true, false), ep("fd00::1", "n1", true, false)],
                        vec![ep("10.0.0.1", "n1", true, false)],
                    ],
                ),
                Some((32002, 2)),
            ),
            // terminating (serving) local endpoints do not count: the load balancer drains the node
            (service("draining", true, Some(32003), vec![vec![ep("10.0.0.1", "n1", false, true)]]), Some((32003, 0))),
            // not ready and not serving
            (service("notready", true, Some(32004), vec![vec![ep("10.0.0.1", "n1", false, false)]]), Some((32004, 0))),
            // externalTrafficPolicy: Cluster
            (service("cluster", false, Some(32005), vec![vec![ep("10.0.0.1", "n1", true, false)]]), None),
            // no health check port
            (service("nohc", true, None, vec![vec![ep("10.0.0.1", "n1", true, false)]]), None),
        ];
        for (svc, expected) in cases {
            let id = svc.id.clone();
            let snapshot = Snapshot { services: BTreeMap::from([(id.clone(), svc)]) };
            let got = wanted(&snapshot, &here);
            let want: BTreeMap<u16, ServiceHealth> = expected
                .into_iter()
                .map(|(port, n)| (port, ServiceHealth { id: id.clone(), local_endpoints: n }))
                .collect();
            assert_eq!(got, want, "{id}");
        }

        // All together, and a weight-0 (drained) endpoint does not count.
        let mut drained = ep("10.0.0.9", "n1", true, false);
        drained.weight = 0;
        let snapshot = Snapshot {
            services: [
                service("a", true, Some(31000), vec![vec![ep("10.0.0.1", "n1", true, false), drained]]),
                service("b", false, None, vec![vec![ep("10.0.0.2", "n1", true, false)]]),
            ]
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect(),
        };
        assert_eq!(wanted(&snapshot, &here), BTreeMap::from([(31000, health("a", 1))]));
    }
}
