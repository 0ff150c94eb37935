//! Namespace test harness: a throwaway "cluster" built by `netns-fixtures/netns.sh` (the same
//! fixture the demo uses), torn down on drop even when the test panics.
#![allow(dead_code)]

pub mod apiserver;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub const NFTPROXY: &str = env!("CARGO_BIN_EXE_nftproxy");
pub const TESTPOD: &str = env!("CARGO_BIN_EXE_nftproxy-testpod");

/// True when namespace tests can run. Under CI they must: a missing privilege fails the test.
pub fn can_run_netns_tests() -> bool {
    // SAFETY-free check of the effective uid through /proc.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false);
    if root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("network-namespace tests need root, and CI=true forbids skipping them");
    }
    eprintln!("SKIPPED: network-namespace tests need root (run scripts/test as root)");
    false
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    pub prefix: String,
    children: Vec<Child>,
    pub dir: PathBuf,
}

/// A pod of the fixture: name, IPv4, IPv6.
pub type PodSpec<'a> = (&'a str, &'a str, &'a str);

/// The demo cluster's pods, read from `netns-fixtures/demo-pods.txt` (the demo's own list).
pub fn demo_pods() -> &'static [PodSpec<'static>] {
    static PODS: std::sync::OnceLock<Vec<PodSpec<'static>>> = std::sync::OnceLock::new();
    PODS.get_or_init(|| {
        let text = std::fs::read_to_string(repo().join("netns-fixtures/demo-pods.txt")).expect("demo-pods.txt");
        let text: &'static str = Box::leak(text.into_boxed_str());
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let f: Vec<&'static str> = l.split_whitespace().collect();
                (f[0], f[1], f.get(2).copied().unwrap_or(""))
            })
            .collect()
    })
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Cluster {
    pub fn new(pods: &[PodSpec<'_>]) -> Cluster {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("np{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("nftproxy-test-{prefix}"));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Cluster { prefix, children: Vec::new(), dir };
        c.fixture(&["node"]);
        for (name, v4, v6) in pods {
            c.fixture(&["pod", name, v4, v6]);
        }
        c
    }

    fn fixture(&self, args: &[&str]) {
        let script = repo().join("netns-fixtures/netns.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(script).arg(args[0]).arg(&self.prefix).args(&args[1..]);
        check(cmd.output().unwrap(), &format!("netns.sh {args:?}"));
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn node(&self) -> String {
        self.ns("node")
    }

    /// Runs a command inside namespace `ns` (a pod name, "node" or "ext").
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.ns(ns)]).args(cmd).output().unwrap()
    }

    pub fn exec_ok(&self, ns: &str, cmd: &[&str]) -> String {
        String::from_utf8(check(self.exec(ns, cmd), &format!("{cmd:?} in {ns}")).stdout).unwrap()
    }

    /// Starts the test pod server in `pod`: answers `NAME PEER` on these ports.
    pub fn serve(&mut self, pod: &str, name: &str, tcp: &[u16], udp: &[u16]) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(pod), TESTPOD, "serve", "--name", name]);
        for p in tcp {
            cmd.args(["--tcp", &p.to_string()]);
        }
        for p in udp {
            cmd.args(["--udp", &p.to_string()]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        self.children.push(child);
        // Wait until every port answers locally.
        for p in tcp {
            self.wait_for(pod, "tcp", &format!("127.0.0.1:{p}"));
        }
        for p in udp {
            self.wait_for(pod, "udp", &format!("127.0.0.1:{p}"));
        }
    }

    fn wait_for(&self, pod: &str, proto: &str, addr: &str) {
        for _ in 0..100 {
            if self.probe(pod, proto, addr, 1).keys().all(|k| !k.starts_with("error")) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("server in {pod} never answered on {proto} {addr}");
    }

    /// Runs `nftproxy-testpod probe` in `from`: answer (pod name, or "error: ...") -> count.
    pub fn probe(&self, from: &str, proto: &str, addr: &str, count: usize) -> BTreeMap<String, usize> {
        self.probe_with(from, proto, addr, count, &[])
    }

    /// Like `probe`, tallying whole answers `NAME PEER-IP`.
    /// Like `probe`, datagram i from source port `base + i`: each a new conntrack entry.
    pub fn probe_sports(
        &self,
        from: &str,
        proto: &str,
        addr: &str,
        count: usize,
        base: u16,
    ) -> BTreeMap<String, usize> {
        self.probe_with(from, proto, addr, count, &["--sport-base", &base.to_string()])
    }

    pub fn probe_full(&self, from: &str, proto: &str, addr: &str, count: usize) -> BTreeMap<String, usize> {
        self.probe_with(from, proto, addr, count, &["--full"])
    }

    /// Like `probe`, giving up on each connection after `timeout_ms`.
    pub fn probe_ms(
        &self,
        from: &str,
        proto: &str,
        addr: &str,
        count: usize,
        timeout_ms: u64,
    ) -> BTreeMap<String, usize> {
        let t = timeout_ms.to_string();
        self.probe_with(from, proto, addr, count, &["--timeout-ms", &t])
    }

    fn probe_with(&self, from: &str, proto: &str, addr: &str, count: usize, extra: &[&str]) -> BTreeMap<String, usize> {
        let count = count.to_string();
        let timeout = if extra.contains(&"--timeout-ms") { vec![] } else { vec!["--timeout-ms", "3000"] };
        let mut args = vec![TESTPOD, "probe", proto, addr, "--count", &count];
        args.extend(timeout);
        args.extend_from_slice(extra);
        let out = self.exec_ok(from, &args);
        out.lines()
            .filter_map(|l| {
                let l = l.trim_start();
                let (n, k) = l.split_once("  ")?;
                Some((k.trim().to_string(), n.trim().parse().ok()?))
            })
            .collect()
    }

    /// Writes manifests into this test's directory; returns the path.
    pub fn write(&self, file: &str, yaml: &str) -> PathBuf {
        let p = self.dir.join(file);
        std::fs::write(&p, yaml).unwrap();
        p
    }

    /// Runs `nftproxy ARGS` in the node namespace.
    pub fn nftproxy(&self, args: &[&str]) -> Output {
        let mut full = vec![NFTPROXY];
        full.extend_from_slice(args);
        self.exec("node", &full)
    }

    /// `nftproxy --sync-once --manifests PATH EXTRA...`, which must succeed; returns stdout.
    pub fn sync(&self, manifests: &Path, extra: &[&str]) -> String {
        let m = manifests.to_str().unwrap();
        let mut args = vec!["--sync-once", "--manifests", m];
        args.extend_from_slice(extra);
        String::from_utf8(check(self.nftproxy(&args), "nftproxy --sync-once").stdout).unwrap()
    }

    /// The kernel's listing of a table, with handles (`nft -a list table ...`).
    pub fn nft_list(&self, table: &str) -> String {
        let mut args = vec!["nft", "-a", "list", "table"];
        args.extend(table.split_whitespace());
        self.exec_ok("node", &args)
    }

    pub fn nft(&self, script: &str) {
        self.exec_ok("node", &["nft", script]);
    }

    pub fn has_table(&self) -> bool {
        self.exec_ok("node", &["nft", "list", "tables"]).lines().any(|l| l.trim() == "table inet nftproxy")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("bash").arg(repo().join("netns-fixtures/netns.sh")).args(["down", &self.prefix]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The demo cluster with web-a, web-b and web-c each serving `NAME PEER` on these ports, or
/// `None` where namespace tests cannot run.
pub fn web_cluster(tcp: &[u16], udp: &[u16]) -> Option<Cluster> {
    if !can_run_netns_tests() {
        return None;
    }
    let mut c = Cluster::new(demo_pods());
    for pod in ["web-a", "web-b", "web-c"] {
        c.serve(pod, pod, tcp, udp);
    }
    Some(c)
}

/// Pearson's chi-square statistic of observed counts against a uniform expectation.
pub fn chi_square_uniform(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    counts.iter().map(|&o| (o as f64 - expected).powi(2) / expected).sum()
}

/// Chi-square critical values at significance 0.001 by degrees of freedom (1..=5).
pub const CHI2_CRIT_0001: [f64; 5] = [10.828, 13.816, 16.266, 18.467, 20.515];

/// The demo's Service "web" (dual-stack, TCP 80 -> named port http, UDP 53 -> 5353) and pods.
pub fn demo_manifests() -> PathBuf {
    repo().join("examples/cluster")
}

/// Runs `f` on a thread that has entered network namespace `ns` (a full netns name).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on a valid namespace fd affects only this thread, which ends after `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A running `nftproxy` agent in the node namespace; killed on drop.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    /// Starts `nftproxy ARGS` (a long-running agent) in the node namespace.
    pub fn start_agent(&self, name: &str, args: &[&str]) -> Agent {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node(), NFTPROXY])
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Agent { child, log }
    }

    /// HTTP GET from inside the node namespace: (status code, body).
    pub fn http_get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        let (addr, path) = (addr.to_string(), path.to_string());
        in_netns(&self.node(), move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&addr).ok()?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(3))).ok()?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let code = text.split_whitespace().nth(1)?.parse().ok()?;
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
            Some((code, body))
        })
    }
}

/// Polls `f` every 100 ms until it is true or `secs` pass.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// The value of a metric line `name value` (first sample without labels).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}
