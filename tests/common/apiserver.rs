//! A Kubernetes API-server double speaking the real HTTP protocol: LIST answers with a
//! resourceVersion, `watch=true` streams ADDED/MODIFIED/DELETED/BOOKMARK lines, and on demand
//! it answers 410 Gone (as an ERROR event) or goes away entirely, dropping every connection.
//! It listens on 127.0.0.1 inside a network namespace, so the agent there can reach it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Kind::Node => ("v1", "NodeList"),
        }
    }
}

#[derive(Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    kind_name: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: Vec<Event>,
    gone_next_watches: usize,
    requests: Vec<String>,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Event>,
    stopped: watch::Receiver<bool>,
}

pub struct ApiServer {
    shared: Shared,
    stop: watch::Sender<bool>,
    rt: tokio::runtime::Runtime,
    pub port: u16,
    netns: String,
    server: Option<tokio::task::JoinHandle<()>>,
}

fn key_of(kind: Kind, obj: &Value) -> (Kind, String, String) {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    (kind, ns, name)
}

/// `!key`, `key=value` and `key` terms, comma-separated (what kube-proxy uses).
fn labels_match(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k).and_then(|x| x.as_str()) == Some(v.trim_start_matches('='))
        } else {
            labels.get(term).is_some()
        }
    })
}

fn fields_match(selector: &str, obj: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| match term.split_once('=') {
        Some(("metadata.name", v)) => obj["metadata"]["name"].as_str() == Some(v),
        Some(("metadata.namespace", v)) => obj["metadata"]["namespace"].as_str() == Some(v),
        _ => true,
    })
}

fn query(req: &Request) -> BTreeMap<String, String> {
    let q = req.uri().query().unwrap_or("");
    url_decode_pairs(q)
}

fn url_decode_pairs(q: &str) -> BTreeMap<String, String> {
    q.split('&').filter_map(|p| p.split_once('=')).map(|(k, v)| (k.to_string(), percent_decode(v))).collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(State(shared): State<Shared>, req: Request) -> Response {
    let Some(kind) = Kind::from_path(req.uri().path()) else {
        return Response::builder().status(StatusCode::NOT_FOUND).body(Body::from("{}")).unwrap();
    };
    let q = query(&req);
    shared.store.lock().unwrap().requests.push(req.uri().to_string());
    let labels = q.get("labelSelector").cloned().unwrap_or_default();
    let fields = q.get("fieldSelector").cloned().unwrap_or_default();
    let matches = move |o: &Value| labels_match(&labels, o) && fields_match(&fields, o);
    if q.get("watch").map(String::as_str) != Some("true") {
        let store = shared.store.lock().unwrap();
        let items: Vec<Value> =
            store.objects.iter().filter(|((k, _, _), o)| *k == kind && matches(o)).map(|(_, o)| o.clone()).collect();
        let (api, list) = kind.list_kind();
        let body = json!({"apiVersion": api, "kind": list, "metadata": {"resourceVersion": store.rv.to_string()}, "items": items});
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
    }
    let since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let (backlog, gone, current_rv) = {
        let mut store = shared.store.lock().unwrap();
        let gone = store.gone_next_watches > 0;
        if gone {
            store.gone_next_watches -= 1;
        }
        let backlog: Vec<Event> = store.log.iter().filter(|e| e.kind == kind && e.rv > since).cloned().collect();
        (backlog, gone, store.rv)
    };
    if gone {
        let status = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(format!("{status}\n")))
            .unwrap();
    }
    let mut live = shared.events.subscribe();
    let mut stopped = shared.stopped.clone();
    let (api, list) = kind.list_kind();
    let item_kind = list.trim_end_matches("List").to_string();
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<String>| async move {
        let line = |t: &str, o: &Value| format!("{}\n", json!({"type": t, "object": o}));
        for e in backlog {
            if tx.send(line(e.kind_name, &e.object)).await.is_err() {
                return;
            }
        }
        let bookmark = |rv: u64| {
            line(
                "BOOKMARK",
                &json!({"apiVersion": api, "kind": item_kind, "metadata": {"resourceVersion": rv.to_string()}}),
            )
        };
        let _ = tx.send(bookmark(current_rv)).await;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tick.tick() => {}
                e = live.recv() => match e {
                    Ok(e) if e.kind == kind && e.rv > since => {
                        if tx.send(line(e.kind_name, &e.object)).await.is_err() { return; }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            if *stopped.borrow() {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream.map(Ok::<_, std::io::Error>)))
        .unwrap()
}

/// A stream fed by a task writing into a channel.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = String>
where
    F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

impl ApiServer {
    /// Starts the double on 127.0.0.1:`port` inside network namespace `netns`.
    pub fn start_in(netns: &str, port: u16) -> ApiServer {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (events, _) = broadcast::channel(1024);
        let (stop, stopped) = watch::channel(false);
        let shared = Shared { store: Arc::new(Mutex::new(Store::default())), events, stopped };
        let mut s = ApiServer { shared, stop, rt, port, netns: netns.to_string(), server: None };
        s.listen();
        s
    }

    fn listen(&mut self) {
        let port = self.port;
        let std_listener = super::in_netns(&self.netns, move || {
            let l = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind API double");
            l.set_nonblocking(true).unwrap();
            l
        });
        let _ = self.stop.send(false);
        let shared = Shared { stopped: self.stop.subscribe(), ..self.shared.clone() };
        let mut stopped = self.stop.subscribe();
        let app = axum::Router::new().fallback(handle).with_state(shared);
        let _guard = self.rt.enter();
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        self.server = Some(self.rt.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        }));
    }

    /// The API goes away: the listener closes and every open watch is cut.
    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.server.take() {
            let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), h).await });
        }
    }

    /// The API comes back on the same port.
    pub fn restart(&mut self) {
        self.listen();
    }

    /// The next `n` watch requests are answered with 410 Gone (the client must re-list).
    pub fn gone_next_watches(&self, n: usize) {
        self.shared.store.lock().unwrap().gone_next_watches = n;
    }

    /// Creates or replaces an object (ADDED or MODIFIED).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        let mut store = self.shared.store.lock().unwrap();
        store.rv += 1;
        let rv = store.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(kind, &obj);
        let kind_name = if store.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        store.objects.insert(key, obj.clone());
        let e = Event { rv, kind, kind_name, object: obj };
        store.log.push(e.clone());
        let _ = self.shared.events.send(e);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut store = self.shared.store.lock().unwrap();
        let Some(mut obj) = store.objects.remove(&(kind, namespace.to_string(), name.to_string())) else {
            return;
        };
        store.rv += 1;
        let rv = store.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let e = Event { rv, kind, kind_name: "DELETED", object: obj };
        store.log.push(e.clone());
        let _ = self.shared.events.send(e);
    }

    /// Every request URI seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().requests.clone()
    }

    /// A kubeconfig file pointing at this double.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let p = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\n\
users:\n- name: double\n  user: {{}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: double}}\ncurrent-context: double\n",
            self.port
        );
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

pub fn service(name: &str, ip: &str, port: u16, target: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]}})
}

pub fn slice(service: &str, port: u16, ready: &[&str]) -> Value {
    let endpoints: Vec<Value> =
        ready.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node-1"})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abc"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints})
}

pub fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
}
