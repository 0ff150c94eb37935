//! kube-proxy's conntrack sysctls (`--conntrack-*`, the config file's `conntrack:` section),
//! applied at start as kube-proxy applies them: each only when set; `nf_conntrack_max` (and the
//! hash size with it) only ever raised, to max(maxPerCore x cores, min); timeouts and
//! `tcp_be_liberal` written when they differ. `nf_conntrack_max` and the hash size exist only
//! in the initial network namespace: elsewhere a warning says so and the rest still applies.

use std::path::{Path, PathBuf};

use crate::config::Conntrack;

/// One sysctl to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Relative to `/proc/sys` (or `/sys` for the hash size).
    pub path: &'static str,
    pub value: u64,
    /// Only raise it: skipped when the node already has at least `value`.
    pub raise_only: bool,
}

pub const MAX: &str = "net/netfilter/nf_conntrack_max";
pub const HASHSIZE: &str = "module/nf_conntrack/parameters/hashsize";

/// What `c` asks for on a node with `cores` CPUs, in the order kube-proxy writes them.
pub fn plan(c: &Conntrack, cores: u32) -> Vec<Write> {
    let mut out = Vec::new();
    let per_core = u64::from(c.max_per_core.unwrap_or(0)) * u64::from(cores);
    let max = per_core.max(u64::from(c.min.unwrap_or(0)));
    if c.max_per_core.is_some() && max > 0 {
        out.push(Write { path: MAX, value: max, raise_only: true });
        out.push(Write { path: HASHSIZE, value: max / 4, raise_only: true });
    }
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs()).filter(|s| *s > 0);
    let timeouts = [
        ("net/netfilter/nf_conntrack_tcp_timeout_established", secs(c.tcp_established_timeout)),
        ("net/netfilter/nf_conntrack_tcp_timeout_close_wait", secs(c.tcp_close_wait_timeout)),
        ("net/netfilter/nf_conntrack_udp_timeout", secs(c.udp_timeout)),
        ("net/netfilter/nf_conntrack_udp_timeout_stream", secs(c.udp_stream_timeout)),
    ];
    out.extend(timeouts.into_iter().filter_map(|(path, v)| Some(Write { path, value: v?, raise_only: false })));
    if c.tcp_be_liberal == Some(true) {
        out.push(Write { path: "net/netfilter/nf_conntrack_tcp_be_liberal", value: 1, raise_only: false });
    }
    out
}

/// Where the sysctls live: `/proc/sys` and `/sys` on a node, a directory in tests.
#[derive(Debug, Clone)]
pub struct Roots {
    pub proc_sys: PathBuf,
    pub sys: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots { proc_sys: "/proc/sys".into(), sys: "/sys".into() }
    }
}

impl Roots {
    fn file(&self, w: &Write) -> PathBuf {
        if w.path == HASHSIZE { self.sys.join(w.path) } else { self.proc_sys.join(w.path) }
    }
}

/// What happened to one sysctl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Set { path: &'static str, from: u64, to: u64 },
    Kept { path: &'static str, value: u64 },
    Failed { path: &'static str, error: String },
}

/// Writes `writes`; a failure is reported and the others still go.
pub fn apply(writes: &[Write], roots: &Roots) -> Vec<Applied> {
    writes
        .iter()
        .map(|w| {
            let file = roots.file(w);
            let result = read(&file).and_then(|now| {
                let keep = if w.raise_only { now >= w.value } else { now == w.value };
                if keep {
                    return Ok(Applied::Kept { path: w.path, value: now });
                }
                std::fs::write(&file, w.value.to_string())?;
                Ok(Applied::Set { path: w.path, from: now, to: w.value })
            });
            result.unwrap_or_else(|e| Applied::Failed { path: w.path, error: explain(w, &e) })
        })
        .collect()
}

fn read(file: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(file)?;
    text.trim().parse().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{text:?}")))
}

fn explain(w: &Write, e: &std::io::Error) -> String {
    let global = w.path == MAX || w.path == HASHSIZE;
    match e.kind() {
        std::io::ErrorKind::NotFound if global => {
            "not in this network namespace (only the initial one has it)".to_string()
        }
        std::io::ErrorKind::NotFound => "missing (is nf_conntrack loaded?)".to_string(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem if global => {
            format!("{e} (writable only from the initial network namespace, with /proc/sys and /sys read-write)")
        }
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            format!("{e} (a container needs /proc/sys mounted read-write to set it; or set it on the node)")
        }
        _ => e.to_string(),
    }
}

/// Applies `c` on this node and logs each change; returns what happened.
pub fn apply_conntrack(c: &Conntrack) -> Vec<Applied> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let done = apply(&plan(c, cores), &Roots::default());
    for a in &done {
        match a {
            Applied::Set { path, from, to } => tracing::info!(sysctl = path, from, to, "conntrack setting applied"),
            Applied::Kept { path, value } => tracing::info!(
                sysctl = path,
                value,
                "conntrack setting kept: the node has it (or more, for the table size)"
            ),
            Applied::Failed { path, error } => tracing::warn!(sysctl = path, %error, "conntrack setting not applied"),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn plan_follows_kube_proxy() {
        let c = Conntrack {
            max_per_core: Some(32768),
            min: Some(131072),
            tcp_established_timeout: Some(Duration::from_secs(86400)),
            tcp_be_liberal: Some(true),
            ..Default::default()
        };
        let p = plan(&c, 2);
        assert_eq!(p[0], Write { path: MAX, value: 131072, raise_only: true }, "min wins over 2 x 32768");
        assert_eq!(p[1], Write { path: HASHSIZE, value: 32768, raise_only: true });
        assert_eq!(plan(&c, 8)[0].value, 262144, "8 x 32768 wins over min");
        assert!(p.iter().any(|w| w.path.ends_with("tcp_timeout_established") && w.value == 86400));
        assert!(p.iter().any(|w| w.path.ends_with("tcp_be_liberal") && w.value == 1));
        assert!(plan(&Conntrack::default(), 2).is_empty(), "nothing set: nothing written");
    }

    #[test]
    fn apply_raises_max_only_and_reports_failures() {
        let dir = std::env::temp_dir().join(format!("nftproxy-sysctl-{}", std::process::id()));
        let proc_sys = dir.join("proc");
        std::fs::create_dir_all(proc_sys.join("net/netfilter")).unwrap();
        std::fs::write(proc_sys.join(MAX), "524288\n").unwrap();
        std::fs::write(proc_sys.join("net/netfilter/nf_conntrack_tcp_timeout_established"), "432000\n").unwrap();
        let roots = Roots { proc_sys: proc_sys.clone(), sys: dir.join("sys") };
        let c = Conntrack {
            max_per_core: Some(32768),
            min: Some(131072),
            tcp_established_timeout: Some(Duration::from_secs(86400)),
            ..Default::default()
        };
        let done = apply(&plan(&c, 2), &roots);
        assert_eq!(done[0], Applied::Kept { path: MAX, value: 524288 }, "never lowered");
        assert!(matches!(&done[1], Applied::Failed { path: HASHSIZE, error } if error.contains("initial")));
        assert_eq!(
            done[2],
            Applied::Set { path: "net/netfilter/nf_conntrack_tcp_timeout_established", from: 432000, to: 86400 }
        );
        let now = std::fs::read_to_string(proc_sys.join("net/netfilter/nf_conntrack_tcp_timeout_established")).unwrap();
        assert_eq!(now, "86400");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
