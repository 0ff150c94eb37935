//! Issue 13's shapes and cases: the whole `nftproxy --sync-once` process (cold, then again
//! after one EndpointSlice changed) with its peak RSS, beside the kernel's own commit of the same
//! objects and kube-proxy's rules by `iptables-legacy-restore` and by `nft -f` (cut at 300 s);
//! and one endpoint change per second while a neighbour commits to its own table every 200 ms,
//! beside the same on a quiet node.

use super::*;

/// The Services as manifests: `files` files of Services and their EndpointSlices (parsed in
/// parallel); the first endpoint of Service `shift` moved.
pub(crate) fn write_manifests(dir: &Path, n: usize, e: usize, files: usize, shift: Option<usize>) {
    std::fs::create_dir_all(dir).unwrap();
    let per = n.div_ceil(files);
    for f in 0..files {
        let mut y = String::new();
        for i in f * per..((f + 1) * per).min(n) {
            let (ns, nm) = name(i);
            let ip = vip(i);
            let eps: Vec<String> = (0..e)
                .map(|j| {
                    let ip = if shift == Some(i) && j == 0 {
                        "10.200.0.1".to_string()
                    } else {
                        endpoint_ip(i, j, e).to_string()
                    };
                    format!("{{addresses: [{ip}]}}")
                })
                .collect();
            writeln!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {nm}, namespace: {ns}}}\n\
                 spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {nm}-abc, namespace: {ns}, labels: {{kubernetes.io/service-name: {nm}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]",
                eps.join(", ")
            )
            .unwrap();
        }
        std::fs::write(dir.join(format!("part-{f:02}.yaml")), y).unwrap();
    }
}

/// What one `nftproxy --sync-once` run reports.
struct Run {
    wall: f64,
    /// Peak RSS, MiB.
    rss: Option<f64>,
    /// The engine's `total_ms` and `read_back_ms`.
    engine: Option<f64>,
    read_back: Option<f64>,
    /// How many tables the read-back line names.
    tables: usize,
}

/// Runs `nftproxy --sync-once` in the namespace, with `extra` flags and `env`.
fn sync_once(ns: &Ns, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let nftproxy = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/nftproxy");
    let start = Instant::now();
    let out = ns
        .cmd("/usr/bin/time")
        .args(["-f", "maxrss_kib=%M", nftproxy.to_str().unwrap(), "--sync-once", "--manifests", dir.to_str().unwrap()])
        .args(["--cluster-cidr", CLUSTER_CIDR])
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let wall = ms(start.elapsed());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nftproxy --sync-once: {log}");
    let field = |key: &str| -> Option<f64> {
        log.split_whitespace().rev().filter_map(|kv| kv.strip_prefix(key)).find_map(|v| v.parse().ok())
    };
    let tables = log.lines().filter(|l| l.contains("read back")).map(|l| l.matches("\"nftproxy").count()).sum();
    Run {
        wall,
        rss: field("maxrss_kib=").map(|k| k / 1024.0),
        engine: field("total_ms="),
        read_back: field("read_back_ms="),
        tables,
    }
}

/// A cold `--sync-once` into a fresh namespace, a chain added to our main table with `nft` (a
/// foreign commit the state record cannot vouch for), then `--sync-once` again, which reads
/// every table back and removes the chain: that run.
fn read_back_after_foreign_commit(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let ns = Ns::new("read-back");
    sync_once(&ns, dir, extra, env);
    let ok = ns.cmd("nft").args(["add chain inet nftproxy foreign-chain"]).status().unwrap().success();
    assert!(ok, "nft add chain");
    let run = sync_once(&ns, dir, extra, env);
    let gone = !ns.cmd("nft").args(["list chain inet nftproxy foreign-chain"]).output().unwrap().status.success();
    assert!(gone, "the read-back must find and remove the foreign chain");
    run
}

/// `--sync-once` cold into an empty namespace, then again after one EndpointSlice changed.
pub(crate) fn bench_process(r: &mut Report, work: &Path, n: usize, e: usize) {
    eprintln!("== whole process --sync-once: {n} Services x {e} endpoints");
    let tables = compile::auto_shards(compile::chain_estimate(n, n * e), 0);
    let dir = work.join(format!("manifests-{n}x{e}"));
    write_manifests(&dir, n, e, 16, None);
    let ns = Ns::new("process");
    let cold = sync_once(&ns, &dir, &[], &[]);
    r.add("whole process", n, e, "--sync-once cold", "ms", Some(cold.wall));
    r.add("whole process", n, e, "--sync-once cold: the engine's part", "ms", cold.engine);
    r.add("whole process", n, e, "--sync-once cold", "peak RSS MiB", cold.rss);
    write_manifests(&dir, n, e, 16, Some(n / 2));
    let again = sync_once(&ns, &dir, &[], &[]);
    r.add("whole process", n, e, "--sync-once again, one slice changed", "ms", Some(again.wall));
    r.add("whole process", n, e, "--sync-once again: the engine's part", "ms", again.engine);
    r.add("whole process", n, e, "--sync-once again", "peak RSS MiB", again.rss);
    r.add("whole process", n, e, "--sync-once again: tables read back", "tables", Some(again.tables as f64));
    drop(ns);
    // One endpoint change through the agent's path at this shape, beside any commit's price in
    // the same namespace (the target: the change's p99 within twice any commit's).
    let inc = Ns::new("process-change").child_sharded(&["incremental", &n.to_string(), &e.to_string(), "100"], tables);
    incremental_rows(r, n, e, "one endpoint change, agent path:", &inc);
    // Read-back of every table after a foreign commit: tables sized by chains (the default
    // now), and as before issue 13 item 2 in the same run: one table per 500 Services, each
    // table's rules in one dump (quadratic in its size).
    let now = read_back_after_foreign_commit(&dir, &[], &[]);
    let path = format!("read-back after a foreign commit, {tables} tables by chains");
    r.add("whole process", n, e, &path, "ms", now.read_back);
    r.add("whole process", n, e, &format!("{path}: tables read back"), "tables", Some(now.tables as f64));
    let old = n.div_ceil(500).clamp(1, compile::MAX_AUTO_SHARDS as usize).to_string();
    let table_dumps = [(nftproxy::nft::PER_CHAIN_DUMP_ENV, "18446744073709551615")];
    let before = read_back_after_foreign_commit(&dir, &["--table-shards", &old], &table_dumps);
    let path = format!("read-back after a foreign commit, {old} tables by Services, one dump per table (before)");
    r.add("whole process", n, e, &path, "ms", before.read_back);
    let _ = std::fs::remove_dir_all(&dir);
    // The kernel's own commit of the same objects (what `--sync-once` makes: the same tables,
    // endpoint counters on), pre-encoded: the floor under the process's commit.
    let floor = Ns::new("process-floor").child_env(
        &["floor", &n.to_string(), &e.to_string()],
        tables,
        &[("NFTPROXY_BENCH_COUNTERS", "1")],
    );
    r.add("whole process", n, e, "kernel floor (pre-encoded batch)", "ms", floor.get("commit_ms").copied());
    // kube-proxy's iptables path on the same Services, for the ratio.
    let ipt = Ns::new("process-ipt");
    let file = work.join(format!("kube-proxy-{n}x{e}.iptables"));
    std::fs::write(&file, kube_proxy_iptables(n, e, None)).unwrap();
    let t = ipt.time("iptables-legacy-restore", &[], &file);
    r.add("whole process", n, e, "kube-proxy iptables shape: iptables-legacy-restore", "ms", t);
    let _ = std::fs::remove_file(&file);
    drop(ipt);
    // kube-proxy's nftables path, cut at NFT_LIMIT (issue 13 reported more than 5 minutes at
    // 44,000 x 1): a cut run is recorded at the limit, its path saying so.
    let nft = Ns::new("process-nft");
    let file = work.join(format!("kube-proxy-{n}x{e}.nft"));
    std::fs::write(&file, kube_proxy_nft(n, e, 0..n, true)).unwrap();
    match nft.time_limited("nft", &["-f", "-"], &file, NFT_LIMIT) {
        Ok(t) => r.add("whole process", n, e, "kube-proxy nftables shape: nft -f", "ms", t),
        Err(()) => {
            let path = format!("kube-proxy nftables shape: nft -f, cut at {} s", NFT_LIMIT.as_secs());
            r.add("whole process", n, e, &path, "ms", Some(ms(NFT_LIMIT)));
        }
    }
    let _ = std::fs::remove_file(&file);
}

/// How long `nft -f` of kube-proxy's rules may run at the big shapes.
const NFT_LIMIT: Duration = Duration::from_secs(300);

/// One endpoint change per second for `changes` seconds, on a quiet node and while a neighbour
/// commits to its own table every 200 ms; in one namespace, one after the other.
pub(crate) fn bench_neighbour(r: &mut Report, n: usize, e: usize, changes: usize) {
    eprintln!("== one change per second, quiet and with a neighbour committing: {n} x {e}");
    let ns = Ns::new("neighbour");
    let out = ns.child_sharded(
        &["neighbour", &n.to_string(), &e.to_string(), &changes.to_string()],
        compile::auto_shards(compile::chain_estimate(n, n * e), 0),
    );
    for case in ["quiet", "neighbour"] {
        let path = if case == "quiet" { "quiet node" } else { "neighbour commits every 200 ms" };
        r.add("neighbour", n, e, &format!("{path}: change p50"), "ms", out.get(&format!("{case}_p50_ms")).copied());
        r.add("neighbour", n, e, &format!("{path}: change p99"), "ms", out.get(&format!("{case}_p99_ms")).copied());
        r.add(
            "neighbour",
            n,
            e,
            &format!("{path}: syncs that read back"),
            "syncs",
            out.get(&format!("{case}_read_backs")).copied(),
        );
    }
    r.add("neighbour", n, e, "neighbour commits", "commits", out.get("neighbour_commits").copied());
}

/// The child's side of [`bench_neighbour`]: prints `quiet_p50_ms=... neighbour_read_backs=...`.
pub(crate) fn neighbour_child(n: usize, e: usize, changes: usize) -> String {
    let mut engine = Engine::new(LiveKernel::open().unwrap(), options());
    engine.sync(&snapshot(n, e, None)).unwrap();
    let mut out = String::new();
    let mut k = 0;
    for case in ["quiet", "neighbour"] {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let neighbour = (case == "neighbour").then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut nl = Netlink::open().unwrap();
                nl.apply(&Plan { ops: vec![Op::AddTable { name: "neighbour".into(), flags: 0 }] }).unwrap();
                let mut commits = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let chain = format!("neighbour@c{commits}");
                    nl.apply(&Plan { ops: vec![Op::AddChain { name: chain, base: None }] }).unwrap();
                    commits += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                commits
            })
        });
        let (mut times, mut read_backs) = (Vec::new(), 0);
        for _ in 0..changes {
            std::thread::sleep(Duration::from_secs(1));
            k += 1;
            let i = (k * 7919) % n;
            let snap = snapshot(n, e, Some((i, k)));
            let ids = [ServiceId::new(name(i).0, name(i).1)].into();
            let start = Instant::now();
            let o = engine.sync_changed(&snap, Some(&ids)).unwrap();
            times.push(ms(start.elapsed()));
            read_backs += usize::from(!o.tables_read.is_empty());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = neighbour {
            write!(out, "neighbour_commits={} ", t.join().unwrap()).unwrap();
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        write!(
            out,
            "{case}_p50_ms={:.2} {case}_p99_ms={:.2} {case}_read_backs={read_backs} ",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        )
        .unwrap();
    }
    out
}
