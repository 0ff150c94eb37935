//! The results: rows, the markdown table, the CSV and the machine line.

use super::*;

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<(String, usize, usize, String, String, f64)>,
}

impl Report {
    pub(crate) fn add(&mut self, case: &str, n: usize, e: usize, path: &str, metric: &str, v: Option<f64>) {
        let Some(v) = v else { return };
        eprintln!("  {case:12} {n:>6}x{e:<4} {path:40} {metric:14} {v:>12.2}");
        self.rows.push((case.into(), n, e, path.into(), metric.into(), v));
    }
}

/// The `key=value` pairs with a number for a value in a command's output.
pub(crate) fn key_values(text: &[u8]) -> std::collections::BTreeMap<String, f64> {
    String::from_utf8_lossy(text)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

/// One endpoint of one Service changes: the agent's path (p50/p99), the kernel's share, any
/// commit's price in that namespace, and the same change resolving everything.
pub(crate) fn incremental_rows(
    r: &mut Report,
    n: usize,
    e: usize,
    path: &str,
    inc: &std::collections::BTreeMap<String, f64>,
) {
    for (key, what) in [
        ("p50_ms", "p50"),
        ("p99_ms", "p99"),
        ("kernel_p50_ms", "kernel p50"),
        ("kernel_p99_ms", "kernel p99"),
        ("any_commit_p50_ms", "any commit p50"),
        ("any_commit_p99_ms", "any commit p99"),
        ("resolve_all_p50_ms", "resolving everything p50"),
    ] {
        r.add("incremental", n, e, &format!("{path} {what}"), "ms", inc.get(key).copied());
    }
}

/// (p50, p99) in microseconds.
pub(crate) type P50P99 = (f64, f64);

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024)
        })
        .unwrap_or(0);
    let run = |c: &str, a: &[&str]| {
        Command::new(c)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    format!(
        "{cpu}, {cores} cores, {mem} GiB; kernel {}; {}; {}",
        run("uname", &["-r"]),
        run("nft", &["--version"]),
        run("iptables-legacy", &["--version"])
    )
}

pub(crate) fn write_outputs(r: &Report, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut csv = String::from("case,services,endpoints,path,metric,value\n");
    for (case, n, e, path, metric, v) in &r.rows {
        writeln!(csv, "{case},{n},{e},\"{path}\",{metric},{v:.3}").unwrap();
    }
    std::fs::write(dir.join("benchmark.csv"), &csv).unwrap();
    let mut md = format!("# Benchmark results\n\nMachine: {}\n\n", machine());
    md.push_str("| case | Services x endpoints | path | metric | value |\n| --- | --- | --- | --- | ---: |\n");
    for (case, n, e, path, metric, v) in &r.rows {
        let v = if *v < 10.0 { format!("{v:.2}") } else { format!("{v:.1}") };
        writeln!(md, "| {case} | {n} x {e} | {path} | {metric} | {v} |").unwrap();
    }
    let mut f = std::fs::File::create(dir.join("benchmark-results.md")).unwrap();
    f.write_all(md.as_bytes()).unwrap();
    eprintln!("wrote {}/benchmark.csv and {}/benchmark-results.md", dir.display(), dir.display());
}
