//! kube-proxy's configuration file (`kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration`,
//! what kubeadm keeps in the `kube-proxy` ConfigMap), read into the settings nftproxy has.
//!
//! Pure: text in, [`FileSettings`] and warnings out. kubeadm writes every field, most of them
//! empty (`""`, `0s`, `null`, `0`): an empty value means "the default", as in kube-proxy. Fields
//! of the schema that mean nothing here (ipvs, winkernel, ...) are accepted silently while empty
//! and with a warning when set; fields outside the schema are warned about by name.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::source::node_addrs::NodePortAddresses;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// A bad configuration file: names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    /// `conntrack.maxPerCore`
    pub field: String,
    pub message: String,
}

/// What the file sets; `None` where it leaves the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileSettings {
    pub cluster_cidrs: Option<Vec<IpNet>>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub hostname_override: Option<String>,
    pub nodeport_addresses: Option<NodePortAddresses>,
    pub kubeconfig: Option<std::path::PathBuf>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub masquerade_all: Option<bool>,
    pub conntrack: Conntrack,
    /// `logging.verbosity` (kube-proxy's `--v`).
    pub verbosity: Option<u32>,
    /// Worth saying, not worth a warning (the `mode` the file names).
    pub notes: Vec<String>,
}

/// kube-proxy's conntrack settings; each applied only when set (see [`crate::sysctl`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conntrack {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

/// The schema. Fields named `_...` are known and mean nothing here: read only so that they are
/// not reported as unknown.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    bind_address: Option<String>,
    bind_address_hard_fail: Option<bool>,
    client_connection: RawClientConnection,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    config_sync_period: Option<String>,
    conntrack: RawConntrack,
    #[serde(rename = "detectLocal")]
    _detect_local: Option<IgnoredAny>,
    detect_local_mode: Option<String>,
    enable_profiling: Option<bool>,
    #[serde(rename = "featureGates")]
    _feature_gates: Option<IgnoredAny>,
    healthz_bind_address: Option<String>,
    hostname_override: Option<String>,
    iptables: RawSection,
    #[serde(rename = "ipvs")]
    _ipvs: Option<IgnoredAny>,
    logging: RawLogging,
    metrics_bind_address: Option<String>,
    mode: Option<String>,
    nftables: RawSection,
    node_port_addresses: Option<Vec<String>>,
    oom_score_adj: Option<i64>,
    port_range: Option<String>,
    #[serde(rename = "showHiddenMetricsForVersion")]
    _show_hidden_metrics_for_version: Option<IgnoredAny>,
    #[serde(rename = "winkernel")]
    _winkernel: Option<IgnoredAny>,
    #[serde(rename = "windowsRunAsService")]
    _windows_run_as_service: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawClientConnection {
    kubeconfig: Option<String>,
    accept_content_types: Option<String>,
    content_type: Option<String>,
    qps: Option<f64>,
    burst: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawConntrack {
    max_per_core: Option<i64>,
    min: Option<i64>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawSection {
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    masquerade_all: Option<bool>,
    masquerade_bit: Option<i64>,
    localhost_node_ports: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawLogging {
    verbosity: Option<i64>,
    format: Option<String>,
    #[serde(rename = "flushFrequency")]
    _flush_frequency: Option<IgnoredAny>,
    #[serde(rename = "options")]
    _options: Option<IgnoredAny>,
    #[serde(rename = "vmodule")]
    _vmodule: Option<IgnoredAny>,
}

/// nftproxy's packet mark bit for masquerading (0x4000), kube-proxy's default `masqueradeBit`.
const MASQUERADE_BIT: i64 = 14;

/// Reads a KubeProxyConfiguration. `file` names it in errors and warnings.
pub fn parse(file: &str, text: &str) -> Result<(FileSettings, Vec<String>), ConfigError> {
    let err = |field: &str, message: String| ConfigError { file: file.to_string(), field: field.to_string(), message };
    let mut warnings = Vec::new();
    let mut unknown = Vec::new();
    let value = crate::source::manifest::yaml_value(text)
        .map_err(|e| err("(file)", format!("malformed YAML: {}", e.to_string().lines().next().unwrap_or_default())))?
        .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    let mut track = serde_path_to_error::Track::new();
    let raw: RawConfig =
        serde_ignored::deserialize(serde_path_to_error::Deserializer::new(&value, &mut track), |path| {
            unknown.push(path.to_string())
        })
        .map_err(|e| err(&track.path().to_string(), e.to_string()))?;
    // `?` paths are inside sections read as "anything" on purpose (ipvs, winkernel, ...).
    for path in unknown.into_iter().filter(|p| !p.ends_with('?')) {
        warnings.push(format!("{file}: {path}: unknown field, ignored"));
    }
    if raw.api_version.as_deref().is_some_and(|v| v != API_VERSION) {
        return Err(err("apiVersion", format!("{:?}: expected {API_VERSION}", raw.api_version.unwrap_or_default())));
    }
    if raw.kind.as_deref().is_some_and(|k| k != KIND) {
        return Err(err("kind", format!("{:?}: expected {KIND}", raw.kind.unwrap_or_default())));
    }
    let mut s = FileSettings::default();

    if let Some(text) = set(&raw.cluster_cidr) {
        let cidrs = text
            .split(',')
            .map(|c| c.trim().parse::<IpNet>().map_err(|_| err("clusterCIDR", format!("{c:?} is not a CIDR"))))
            .collect::<Result<Vec<_>, _>>()?;
        s.cluster_cidrs = Some(cidrs);
    }
    match set(&raw.detect_local_mode) {
        None | Some("ClusterCIDR") => {}
        Some(other) => {
            return Err(err(
                "detectLocalMode",
                format!(
                    "{other:?}: nftproxy tells pod traffic by clusterCIDR only (use \"ClusterCIDR\" or leave it empty)"
                ),
            ));
        }
    }
    s.healthz_bind_address = set(&raw.healthz_bind_address)
        .map(|a| bind_address(a, 10256))
        .transpose()
        .map_err(|m| err("healthzBindAddress", m))?;
    s.metrics_bind_address = set(&raw.metrics_bind_address)
        .map(|a| bind_address(a, 10249))
        .transpose()
        .map_err(|m| err("metricsBindAddress", m))?;
    s.hostname_override = set(&raw.hostname_override).map(str::to_string);
    if let Some(list) = raw.node_port_addresses.as_ref().filter(|l| !l.is_empty()) {
        let joined = list.join(",");
        s.nodeport_addresses =
            Some(joined.parse().map_err(|e: crate::source::node_addrs::ParseNodePortAddressesError| {
                err("nodePortAddresses", e.to_string())
            })?);
    }
    s.kubeconfig = set(&raw.client_connection.kubeconfig).map(Into::into);

    // The proxier's own section: nftables for `mode: nftables`, iptables for anything else
    // (kube-proxy's default mode on Linux); ipvs's periods are ipvs's and not read.
    let mode = set(&raw.mode).unwrap_or("");
    let (section, name) = if mode == "nftables" { (&raw.nftables, "nftables") } else { (&raw.iptables, "iptables") };
    if !matches!(mode, "" | "iptables" | "ipvs" | "nftables") {
        return Err(err("mode", format!("{mode:?}: not a kube-proxy mode on Linux (iptables, ipvs, nftables)")));
    }
    if !mode.is_empty() {
        s.notes.push(format!("{file}: mode: {mode:?} accepted; nftproxy is the proxier (nftables over netlink)"));
    }
    s.sync_period = duration(&section.sync_period).map_err(|m| err(&format!("{name}.syncPeriod"), m))?;
    s.min_sync_period = duration(&section.min_sync_period).map_err(|m| err(&format!("{name}.minSyncPeriod"), m))?;
    s.masquerade_all = section.masquerade_all.filter(|m| *m);
    if let Some(bit) = section.masquerade_bit {
        if !(0..=31).contains(&bit) {
            return Err(err(&format!("{name}.masqueradeBit"), format!("{bit}: must be 0 to 31")));
        }
        if bit != MASQUERADE_BIT {
            warnings.push(format!(
                "{file}: {name}.masqueradeBit: {bit} ignored; nftproxy marks with bit {MASQUERADE_BIT} (0x4000) in its own table"
            ));
        }
    }

    let c = &raw.conntrack;
    let count = |v: Option<i64>, field: &str| -> Result<Option<u32>, ConfigError> {
        match v {
            None | Some(0) => Ok(None),
            Some(n) if n > 0 && n <= i64::from(i32::MAX) => Ok(Some(n as u32)),
            Some(n) => Err(err(field, format!("{n}: must be a positive number"))),
        }
    };
    s.conntrack = Conntrack {
        max_per_core: count(c.max_per_core, "conntrack.maxPerCore")?,
        min: count(c.min, "conntrack.min")?,
        tcp_established_timeout: duration(&c.tcp_established_timeout)
            .map_err(|m| err("conntrack.tcpEstablishedTimeout", m))?,
        tcp_close_wait_timeout: duration(&c.tcp_close_wait_timeout)
            .map_err(|m| err("conntrack.tcpCloseWaitTimeout", m))?,
        tcp_be_liberal: c.tcp_be_liberal.filter(|b| *b),
        udp_timeout: duration(&c.udp_timeout).map_err(|m| err("conntrack.udpTimeout", m))?,
        udp_stream_timeout: duration(&c.udp_stream_timeout).map_err(|m| err("conntrack.udpStreamTimeout", m))?,
    };
    s.verbosity = match raw.logging.verbosity {
        None | Some(0) => None,
        Some(v) if (0..=10).contains(&v) => Some(v as u32),
        Some(v) => return Err(err("logging.verbosity", format!("{v}: must be 0 to 10"))),
    };

    // Fields of the schema that mean nothing here: fine while empty, a warning when set.
    let mut no_effect = |field: &str, is_set: bool| {
        if is_set {
            warnings.push(format!("{file}: {field}: has no effect in nftproxy, ignored"));
        }
    };
    no_effect("bindAddress", set(&raw.bind_address).is_some_and(|a| a != "0.0.0.0" && a != "::"));
    no_effect("bindAddressHardFail", raw.bind_address_hard_fail == Some(true));
    no_effect("configSyncPeriod", duration(&raw.config_sync_period).ok().flatten().is_some());
    no_effect("enableProfiling", raw.enable_profiling == Some(true));
    no_effect("oomScoreAdj", raw.oom_score_adj.is_some());
    no_effect("portRange", set(&raw.port_range).is_some());
    no_effect("clientConnection.qps", raw.client_connection.qps.is_some_and(|q| q != 0.0));
    no_effect("clientConnection.burst", raw.client_connection.burst.is_some_and(|b| b != 0));
    no_effect("clientConnection.contentType", set(&raw.client_connection.content_type).is_some());
    no_effect("clientConnection.acceptContentTypes", set(&raw.client_connection.accept_content_types).is_some());
    no_effect(&format!("{name}.localhostNodePorts"), section.localhost_node_ports == Some(true));
    no_effect("logging.format", set(&raw.logging.format).is_some_and(|f| f != "text"));
    Ok((s, warnings))
}

/// kube-proxy flags that mean nothing here, taking a value (`--proxy-mode=nftables`).
const FOREIGN_WITH_VALUE: &[&str] = &[
    "bind-address",
    "config-sync-period",
    "detect-local-mode",
    "feature-gates",
    "healthz-port",
    "metrics-port",
    "iptables-masquerade-bit",
    "iptables-localhost-nodeports",
    "ipvs-exclude-cidrs",
    "ipvs-min-sync-period",
    "ipvs-scheduler",
    "ipvs-sync-period",
    "ipvs-tcp-timeout",
    "ipvs-tcpfin-timeout",
    "ipvs-udp-timeout",
    "kube-api-burst",
    "kube-api-content-type",
    "kube-api-qps",
    "master",
    "oom-score-adj",
    "pod-bridge-interface",
    "pod-interface-name-prefix",
    "proxy-mode",
    "proxy-port-range",
    "show-hidden-metrics-for-version",
    "write-config-to",
    "logging-format",
    "log-flush-frequency",
    "vmodule",
    "log-dir",
    "log-file",
    "log-file-max-size",
    "log-backtrace-at",
    "stderrthreshold",
    "log-text-info-buffer-size",
    "log-json-info-buffer-size",
    "log-json-split-stream",
    "log-text-split-stream",
];

/// kube-proxy's boolean flags that mean nothing here (`--profiling`, `--profiling=false`).
const FOREIGN_BOOL: &[&str] = &[
    "bind-address-hard-fail",
    "ipvs-strict-arp",
    "profiling",
    "init-only",
    "alsologtostderr",
    "logtostderr",
    "add-dir-header",
    "skip-headers",
    "skip-log-headers",
    "one-output",
    "masquerade-all-ipvs",
];

/// Takes kube-proxy's flags that mean nothing to nftproxy out of `argv` (each named in a
/// warning) and spells `-v N` as `--v=N`, so a kube-proxy DaemonSet's args work unchanged.
pub fn strip_foreign_flags(argv: Vec<std::ffi::OsString>) -> (Vec<std::ffi::OsString>, Vec<String>) {
    let mut out = Vec::with_capacity(argv.len());
    let mut warnings = Vec::new();
    let mut it = argv.into_iter();
    out.extend(it.next());
    while let Some(arg) = it.next() {
        let Some(text) = arg.to_str().map(str::to_string) else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            out.push(arg);
            out.extend(it.by_ref());
            break;
        }
        if text == "-v" {
            out.push("--v".into());
            continue;
        }
        if let Some(v) = text.strip_prefix("-v=") {
            out.push(format!("--v={v}").into());
            continue;
        }
        let Some(flag) = text.strip_prefix("--") else {
            out.push(arg);
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag, None),
        };
        if FOREIGN_WITH_VALUE.contains(&name) {
            let value = match inline {
                Some(v) => v.to_string(),
                None => it.next().and_then(|v| v.into_string().ok()).unwrap_or_default(),
            };
            warnings.push(format!("--{name}={value}: a kube-proxy flag with no effect in nftproxy, ignored"));
        } else if FOREIGN_BOOL.contains(&name) {
            warnings.push(format!("--{flag}: a kube-proxy flag with no effect in nftproxy, ignored"));
        } else {
            out.push(arg);
        }
    }
    (out, warnings)
}

/// Reads and parses a configuration file.
pub fn load(path: &std::path::Path) -> Result<(FileSettings, Vec<String>), ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        field: "(file)".into(),
        message: e.to_string(),
    })?;
    parse(&file, &text)
}

/// A value that is there and not kubeadm's empty string.
fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// `IP:PORT`, `[IPv6]:PORT`, a bare IP (the default port) or `:PORT` (every address).
pub fn bind_address(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = text.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    if let Some(port) = text.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()) {
        return Ok(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port));
    }
    Err(format!("{text:?}: expected IP:PORT, IP or :PORT"))
}

/// A Go duration (`30s`, `1m0s`, `1h30m`, `500ms`, `1.5h`); `0s` and `""` mean unset.
fn duration(v: &Option<String>) -> Result<Option<Duration>, String> {
    let Some(text) = set(v) else { return Ok(None) };
    let d = go_duration(text)?;
    Ok((!d.is_zero()).then_some(d))
}

pub fn go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?}: not a duration (for example 30s, 1m0s, 24h0m0s)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[u..];
        total += value * unit;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kubeadm's KubeProxyConfiguration, as its `kube-proxy` ConfigMap holds it.
    const KUBEADM: &str = include_str!("../tests/golden/kubeadm-kube-proxy.conf");

    #[test]
    fn kubeadm_defaults_mean_defaults() {
        let (s, warnings) = parse("config.conf", KUBEADM).unwrap();
        assert_eq!(s.cluster_cidrs, Some(vec!["10.244.0.0/16".parse().unwrap()]));
        assert_eq!(s.kubeconfig.as_deref(), Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf")));
        let rest = FileSettings { cluster_cidrs: None, kubeconfig: None, ..s };
        assert_eq!(rest, FileSettings::default(), "every other field is kubeadm's empty default");
        assert_eq!(warnings, Vec::<String>::new());
    }

    #[test]
    fn fields_are_read_from_the_modes_section() {
        let text = r#"
kind: KubeProxyConfiguration
apiVersion: kubeproxy.config.k8s.io/v1alpha1
mode: nftables
clusterCIDR: "10.244.0.0/16,fd00:10:244::/56"
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1
hostnameOverride: node-a
nodePortAddresses: ["192.0.2.0/24"]
iptables: {syncPeriod: 5s}
nftables: {syncPeriod: 1m0s, minSyncPeriod: 500ms, masqueradeAll: true, masqueradeBit: 14}
conntrack: {maxPerCore: 65536, min: 262144, tcpEstablishedTimeout: 24h0m0s, tcpCloseWaitTimeout: 1h0m0s,
            tcpBeLiberal: true, udpTimeout: 30s, udpStreamTimeout: 2m0s}
logging: {verbosity: 4}
"#;
        let (s, warnings) = parse("f", text).unwrap();
        assert_eq!(s.cluster_cidrs.unwrap().len(), 2);
        assert_eq!(s.healthz_bind_address, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(s.metrics_bind_address, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(s.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(s.nodeport_addresses.unwrap().to_string(), "192.0.2.0/24");
        assert_eq!(s.sync_period, Some(Duration::from_secs(60)), "nftables section, not iptables");
        assert_eq!(s.min_sync_period, Some(Duration::from_millis(500)));
        assert_eq!(s.masquerade_all, Some(true));
        assert_eq!(
            s.conntrack,
            Conntrack {
                max_per_core: Some(65536),
                min: Some(262144),
                tcp_established_timeout: Some(Duration::from_secs(86400)),
                tcp_close_wait_timeout: Some(Duration::from_secs(3600)),
                tcp_be_liberal: Some(true),
                udp_timeout: Some(Duration::from_secs(30)),
                udp_stream_timeout: Some(Duration::from_secs(120)),
            }
        );
        assert_eq!(s.verbosity, Some(4));
        assert_eq!(warnings, Vec::<String>::new());
        assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        assert!(s.notes[0].contains("mode: \"nftables\" accepted"), "{:?}", s.notes);
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("clusterCIDR: banana", "clusterCIDR", "banana"),
            ("conntrack: {maxPerCore: -3}", "conntrack.maxPerCore", "-3"),
            ("conntrack: {maxPerCore: lots}", "conntrack.maxPerCore", "invalid type"),
            ("iptables: {syncPeriod: soon}", "iptables.syncPeriod", "soon"),
            ("detectLocalMode: NodeCIDR", "detectLocalMode", "NodeCIDR"),
            ("healthzBindAddress: here", "healthzBindAddress", "here"),
            ("nodePortAddresses: [nope]", "nodePortAddresses", "nope"),
            ("kind: Pod", "kind", "Pod"),
            ("mode: userspace", "mode", "userspace"),
            ("nftables: {masqueradeBit: 40}", "nftables.masqueradeBit", "40"),
        ];
        for (text, field, says) in cases {
            let mode = if field.starts_with("nftables") { "mode: nftables\n" } else { "" };
            let e = parse("f.yaml", &format!("{mode}{text}")).unwrap_err();
            assert_eq!(e.field, field, "{text}: {e}");
            assert!(e.to_string().contains(says), "{text}: {e}");
            assert!(e.to_string().starts_with("f.yaml: "), "{e}");
        }
    }

    #[test]
    fn unknown_and_unused_fields_are_warned_by_name() {
        let text = "clusterCIDRs: 10.0.0.0/8\nconntrack: {maxPercore: 5}\nipvs: {scheduler: rr}\noomScoreAdj: -999\n";
        let (_, warnings) = parse("f", text).unwrap();
        assert!(warnings.iter().any(|w| w == "f: clusterCIDRs: unknown field, ignored"), "{warnings:?}");
        assert!(warnings.iter().any(|w| w == "f: conntrack.maxPercore: unknown field, ignored"), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("oomScoreAdj: has no effect")), "{warnings:?}");
    }

    #[test]
    fn kube_proxy_flags_are_kept_or_taken_out_by_name() {
        let argv = [
            "nftproxy",
            "--proxy-mode",
            "nftables",
            "--profiling",
            "--v=2",
            "-v",
            "4",
            "--cluster-cidr=10.0.0.0/8",
            "--kube-api-qps=50",
            "--ipvs-strict-arp=true",
            "--hostname-override",
            "n1",
        ];
        let (kept, warnings) = strip_foreign_flags(argv.iter().map(Into::into).collect());
        let kept: Vec<String> = kept.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(kept, ["nftproxy", "--v=2", "--v", "4", "--cluster-cidr=10.0.0.0/8", "--hostname-override", "n1"]);
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert!(warnings[0].starts_with("--proxy-mode=nftables: a kube-proxy flag"), "{warnings:?}");
        assert!(warnings[3].starts_with("--ipvs-strict-arp=true"), "{warnings:?}");
    }

    #[test]
    fn go_durations() {
        for (text, secs) in [("30s", 30.0), ("1m0s", 60.0), ("24h0m0s", 86400.0), ("1h30m", 5400.0), ("500ms", 0.5)] {
            assert_eq!(go_duration(text).unwrap(), Duration::from_secs_f64(secs), "{text}");
        }
        for bad in ["", "5", "s", "1x", "1.2.3s"] {
            assert!(go_duration(bad).is_err(), "{bad}");
        }
    }
}
