//! The `nftproxy` binary: parses flags and wires the pieces together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use nftproxy::agent::{self, Timing};
use nftproxy::compile::Options;
use nftproxy::dns::{self, ClusterDns};
use nftproxy::kernel::LiveKernel;
use nftproxy::metrics::{self, Health, Metrics};
use nftproxy::model::Locality;
use nftproxy::nft::Netlink;
use nftproxy::oneshot::{self, Shards};
use nftproxy::source::kube::KubeSource;
use nftproxy::source::node_addrs::{self, NodePortAddresses};
use nftproxy::source::resolve::{self, ResolveOptions};
use nftproxy::source::{Manifests, Source, manifest};
use nftproxy::sync::Engine;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Kubernetes ClusterIP Services on nftables, programmed over netlink.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Count each endpoint's new connections in the kernel (`nftproxy_endpoint_connections_total`).
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    endpoint_counters: bool,
    /// Read Kubernetes YAML manifests instead of the API (file or directory; repeatable):
    /// Services, EndpointSlices, Endpoints, Pods, Namespaces.
    #[arg(long, value_name = "PATH")]
    manifests: Vec<PathBuf>,
    /// With --manifests: re-read the files when they change.
    #[arg(long, requires = "manifests")]
    watch: bool,
    /// Kubeconfig for the API (default: in-cluster configuration).
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Program the kernel once, print what is served, and exit.
    #[arg(long)]
    sync_once: bool,
    /// With --sync-once: print the planned change and touch nothing.
    #[arg(long, requires = "sync_once")]
    dry_run: bool,
    /// Remove everything nftproxy created (table inet nftproxy) and exit.
    #[arg(long)]
    cleanup: bool,
    /// kube-proxy's configuration file (a `KubeProxyConfiguration`, as in kubeadm's
    /// `kube-proxy` ConfigMap). As in kube-proxy, flags that the file covers are then ignored
    /// (with a warning), except `--hostname-override` and the logging flags.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Pod network range(s), comma-separated or repeated, one per family; traffic to a
    /// ClusterIP from outside them is masqueraded.
    #[arg(long = "cluster-cidr", value_name = "CIDR", value_delimiter = ',')]
    cluster_cidrs: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    masquerade_all: bool,
    /// kube-proxy's flag: set nf_conntrack_tcp_be_liberal=1 and do not drop packets conntrack
    /// marks INVALID on the forward path.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    conntrack_tcp_be_liberal: bool,
    /// kube-proxy's: raise nf_conntrack_max to this many entries per CPU (or --conntrack-min,
    /// whichever is larger); never lowers it. Initial network namespace only.
    #[arg(long, value_name = "N")]
    conntrack_max_per_core: Option<u32>,
    /// kube-proxy's: the least nf_conntrack_max to raise to (with --conntrack-max-per-core).
    #[arg(long, value_name = "N")]
    conntrack_min: Option<u32>,
    /// kube-proxy's: nf_conntrack_tcp_timeout_established (a Go duration such as 24h0m0s).
    #[arg(long, value_name = "DURATION", value_parser = nftproxy::config::go_duration)]
    conntrack_tcp_timeout_established: Option<Duration>,
    /// kube-proxy's: nf_conntrack_tcp_timeout_close_wait.
    #[arg(long, value_name = "DURATION", value_parser = nftproxy::config::go_duration)]
    conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// kube-proxy's: nf_conntrack_udp_timeout.
    #[arg(long, value_name = "DURATION", value_parser = nftproxy::config::go_duration)]
    conntrack_udp_timeout: Option<Duration>,
    /// kube-proxy's: nf_conntrack_udp_timeout_stream.
    #[arg(long, value_name = "DURATION", value_parser = nftproxy::config::go_duration)]
    conntrack_udp_timeout_stream: Option<Duration>,
    /// Spread Services over this many tables (`nftproxy`, `nftproxy-1`, ...; 1 to 64). A
    /// partial sync then re-validates one table in the kernel instead of all. `auto`: one table
    /// per 3,000 chains at start (1 to 4), keeping the tables there are if close to that.
    #[arg(long, default_value = "auto")]
    table_shards: Shards,
    /// Make our tables the kernel's "owner, persist" tables (Linux 6.9+): while nftproxy runs no
    /// other process can change or delete them, and they stay in place when it exits. Older
    /// kernels: a warning, then drift is repaired by the periodic check as without the flag.
    #[arg(long)]
    own_tables: bool,
    /// This node's zone for topology hints (default: the Node's topology.kubernetes.io/zone
    /// label when reading the API).
    #[arg(long)]
    zone: Option<String>,
    /// This node's name; defaults to the hostname (kube-proxy's `--hostname-override`).
    #[arg(long, visible_alias = "hostname-override")]
    node_name: Option<String>,
    /// Which of the node's addresses serve node ports: `primary` (in API mode the Node's
    /// InternalIPs; in manifest mode a `v1 Node` of this name in the manifests, else the
    /// addresses of the interface holding the default route, per family) or CIDRs (`192.0.2.0/24,2001:db8::/64`: every local address inside them).
    /// Followed live; localhost never serves node ports.
    #[arg(long, default_value = "primary")]
    nodeport_addresses: NodePortAddresses,
    /// Node ports given to NodePort and LoadBalancer Services that name none (manifest mode).
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    service_node_port_range: std::ops::RangeInclusive<u16>,
    /// Ranges ClusterIPs are allocated from when a Service names none (manifest mode;
    /// comma-separated, one per family).
    #[arg(long, value_delimiter = ',', default_value = "10.96.0.0/12")]
    service_cluster_ip_range: Vec<IpNet>,
    /// Periodic check: the kernel is verified (and repaired if anything drifted) this often.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, alias = "iptables-sync-period")]
    sync_period: Duration,
    /// A full read-back of our tables at least this often, even when no commit by anyone else
    /// was seen (the periodic check above is one cheap generation query otherwise).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    verify_period: Duration,
    /// Minimum time between syncs; changes in between are applied together.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, alias = "iptables-min-sync-period")]
    min_sync_period: Duration,
    /// healthz (`/healthz`, `/livez`) address: IP:PORT, IP or :PORT.
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = |s: &str| nftproxy::config::bind_address(s, 10256))]
    healthz_bind_address: SocketAddr,
    /// Prometheus `/metrics` address: IP:PORT, IP or :PORT.
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = |s: &str| nftproxy::config::bind_address(s, 10249))]
    metrics_bind_address: SocketAddr,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log verbosity as kube-proxy's `--v`: 4 and up logs debug, 6 and up trace (RUST_LOG wins).
    #[arg(long = "v", value_name = "N")]
    verbosity: Option<u32>,
    /// The conntrack settings in effect: from the `--conntrack-*` flags, or from the file.
    #[arg(skip)]
    conntrack: nftproxy::config::Conntrack,
    /// Manifest mode: answer cluster DNS (`<svc>.<ns>.svc.<domain>`) on these addresses, port
    /// 53 UDP and TCP, reached like a ClusterIP (comma-separated, one per family).
    #[arg(long, value_delimiter = ',', value_name = "IP[,IP]")]
    cluster_dns: Vec<std::net::IpAddr>,
    /// The cluster's DNS domain, with --cluster-dns.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
}

/// Operator commands: they read the kernel only (no manifests, no API).
#[derive(Debug, Subcommand)]
enum Command {
    /// Where a new connection to VIP:PORT goes, from the rules in the kernel now.
    Trace {
        /// The client's address (default: any client outside the pod network).
        #[arg(long, value_name = "SRC_IP")]
        from: Option<std::net::IpAddr>,
        /// tcp, udp or sctp.
        proto: String,
        /// IP:PORT, IPv6 as [IP]:PORT: a ClusterIP, node address, external or load-balancer IP.
        vip: String,
    },
    /// The conntrack entries to our Service addresses (of one Service: NAMESPACE/NAME).
    Flows { service: Option<String> },
    /// Our tables in the kernel (`nftproxy` and its shards), fast at any size.
    Tables,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    nftproxy::nft::limit_heap_arenas();
    let (argv, foreign_flags) = nftproxy::config::strip_foreign_flags(std::env::args_os().collect());
    let matches = Args::command().get_matches_from(argv);
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let file = match args.config.as_deref().map(nftproxy::config::load).transpose() {
        Ok(file) => file,
        Err(e) => {
            eprintln!("nftproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Logging flags override the file, as in kube-proxy.
    let verbosity = args.verbosity.or(file.as_ref().and_then(|(f, _)| f.verbosity));
    init_logging(args.log_format, verbosity);
    for w in foreign_flags {
        tracing::warn!("{w}");
    }
    args.conntrack = conntrack_flags(&args);
    if let Some((settings, warnings)) = file {
        for note in &settings.notes {
            tracing::info!("{note}");
        }
        for w in warnings.into_iter().chain(apply_config(&mut args, &matches, settings)) {
            tracing::warn!("{w}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let result = runtime.map_err(BoxError::from).and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nftproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    match &args.command {
        Some(Command::Trace { from, proto, vip }) => {
            out(&nftproxy::inspect::trace::command(*from, proto, vip)?);
            return Ok(());
        }
        Some(Command::Flows { service }) => {
            nftproxy::inspect::flows::command(service.as_deref(), &mut std::io::stdout().lock())?;
            return Ok(());
        }
        Some(Command::Tables) => {
            out(&nftproxy::inspect::tables()?);
            return Ok(());
        }
        None => {}
    }
    if args.cleanup {
        out(&format!("{}\n", oneshot::cleanup(&mut Netlink::open()?)?));
        return Ok(());
    }
    let dns_mode = dns::Mode { manifests: !args.manifests.is_empty(), sync_once: args.sync_once };
    let cluster_dns = ClusterDns::from_flags(&args.cluster_dns, &args.cluster_domain, dns_mode)?;
    if !args.dry_run {
        nftproxy::sysctl::apply_conntrack(&args.conntrack);
    }
    let node = args.node_name.clone().or_else(hostname).unwrap_or_default();
    let resolve_opts = ResolveOptions {
        service_cidrs: args.service_cluster_ip_range.clone(),
        node_port_range: args.service_node_port_range.clone(),
    };
    let (tx, rx) = mpsc::channel(1);
    let mut zone = args.zone.clone();
    let (node_ips_tx, node_ips_rx) = tokio::sync::watch::channel(Vec::new());
    let sel = args.nodeport_addresses.clone();
    let mut first_read = None;
    let source: Arc<dyn Source> = if args.manifests.is_empty() {
        let client = nftproxy::source::kube::client(args.kubeconfig.as_deref()).await?;
        let kube = Arc::new(KubeSource::start(client, &node, tx.clone()));
        tracing::info!("waiting for Services and EndpointSlices to be listed");
        kube.wait_ready().await;
        zone = zone.or_else(|| kube.zone());
        if sel == NodePortAddresses::Primary {
            // kube-proxy's `primary`: the Node's InternalIPs; the agent follows them on every
            // pass, as it follows the Node's zone.
            let _ = node_ips_tx.send(node_addrs::select_from_list(&sel, &kube.node_ips()));
        } else {
            node_addrs::follow(sel.clone(), node_ips_tx).await;
        }
        kube
    } else {
        // Read once: the node's addresses, the Service count and a --sync-once all use it.
        let manifests = Manifests::new(args.manifests.clone(), !args.sync_once);
        let objects = manifests.objects();
        let from_node =
            (sel == NodePortAddresses::Primary).then(|| objects.as_ref().ok()?.node_internal_ips(&node)).flatten();
        first_read = Some(objects);
        match from_node {
            Some(ips) => {
                node_addrs::follow_manifest_node(sel.clone(), ips, args.manifests.clone(), node.clone(), node_ips_tx)
            }
            None => node_addrs::follow(sel.clone(), node_ips_tx).await,
        }
        if args.watch {
            tokio::spawn(manifest::watch(args.manifests.clone(), Duration::from_millis(500), tx.clone()));
        }
        let manifests: Arc<dyn Source> = Arc::new(manifests);
        match cluster_dns {
            Some(dns) => dns.start(manifests, tx.clone()).await?,
            None => manifests,
        }
    };
    let locality = Locality { node: Some(node.clone()), zone };
    let opts = Options {
        cluster_cidrs: args.cluster_cidrs.clone(),
        masquerade_all: args.masquerade_all,
        conntrack_tcp_be_liberal: args.conntrack.tcp_be_liberal == Some(true),
        locality: locality.clone(),
        table_shards: args.table_shards.tables(
            first_read
                .as_ref()
                .map_or_else(|| source.chain_estimate(), |o| o.as_ref().map_or(0, |o| o.chain_estimate())),
            existing_tables(),
        ),
        own_tables: args.own_tables,
        node_ips: node_ips_rx.borrow().clone(),
        endpoint_counters: args.endpoint_counters,
    };

    if args.sync_once {
        let objects = match first_read {
            Some(objects) => objects?,
            None => source.objects()?,
        };
        let snapshot = resolve::resolve(&objects, &resolve_opts)?;
        drop(objects);
        // The parsed objects were allocated on the parsing threads' heaps: give those pages back
        // before the sync allocates its own.
        nftproxy::nft::release_free_heap();
        if args.dry_run {
            let mut kernel = LiveKernel::open();
            let text = match kernel.as_mut() {
                Ok(k) => oneshot::dry_run(k, &snapshot, &opts),
                Err(e) => {
                    tracing::warn!("cannot read the kernel ({e}); planning against an empty table");
                    oneshot::dry_run(&mut nftproxy::kernel::fake::FakeKernel::default(), &snapshot, &opts)
                }
            };
            out(&text);
            return Ok(());
        }
        out(&oneshot::sync_once(LiveKernel::open()?, &snapshot, opts, &locality)?);
        // Left to the exit, as the engine is (see `oneshot::sync_once`).
        std::mem::forget(snapshot);
        return Ok(());
    }

    // The agent reads the manifests again through its cache; the first read is done with.
    drop(first_read);
    let metrics = Metrics::default();
    let metrics = Arc::new(if args.endpoint_counters {
        metrics.with_collector(Box::new(nftproxy::inspect::counters::EndpointCounters::default()))
    } else {
        metrics
    });
    let programmed = Arc::new(nftproxy::inspect::services::Programmed::default());
    let debug = nftproxy::inspect::services::router(programmed.clone());
    let health = Arc::new(Health::new(args.sync_period));
    let (maddr, haddr) = (args.metrics_bind_address, args.healthz_bind_address);
    let m = metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = metrics::serve_metrics_with(maddr, m, debug).await {
            tracing::error!(%maddr, error = %e, "metrics server failed");
        }
    });
    let (h, hm) = (health.clone(), metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = metrics::serve_health(haddr, h, hm).await {
            tracing::error!(%haddr, error = %e, "healthz server failed");
        }
    });
    let engine = Engine::new(LiveKernel::open()?, opts);
    let timing = Timing {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        verify_period: args.verify_period,
    };
    let agent = agent::Agent {
        engine,
        zone_from_source: args.zone.is_none() && args.manifests.is_empty(),
        node_ips_from_source: (args.manifests.is_empty() && args.nodeport_addresses == NodePortAddresses::Primary)
            .then(|| args.nodeport_addresses.clone()),
        node_ips: node_ips_rx,
        source,
        resolve: resolve_opts,
        changes: rx,
        timing,
        metrics,
        health,
        programmed,
    };
    agent::run(agent, shutdown_signal()).await;
    Ok(())
}

fn init_logging(format: LogFormat, verbosity: Option<u32>) {
    let level = match verbosity.unwrap_or(0) {
        0..=3 => "info",
        4 | 5 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
}

fn conntrack_flags(args: &Args) -> nftproxy::config::Conntrack {
    nftproxy::config::Conntrack {
        max_per_core: args.conntrack_max_per_core.filter(|n| *n > 0),
        min: args.conntrack_min.filter(|n| *n > 0),
        tcp_established_timeout: args.conntrack_tcp_timeout_established.filter(|d| !d.is_zero()),
        tcp_close_wait_timeout: args.conntrack_tcp_timeout_close_wait.filter(|d| !d.is_zero()),
        tcp_be_liberal: args.conntrack_tcp_be_liberal.then_some(true),
        udp_timeout: args.conntrack_udp_timeout.filter(|d| !d.is_zero()),
        udp_stream_timeout: args.conntrack_udp_timeout_stream.filter(|d| !d.is_zero()),
    }
}

/// The flags a KubeProxyConfiguration covers: under `--config` the file decides them, as in
/// kube-proxy (which ignores such flags silently; we say so).
const FILE_FLAGS: &[(&str, &str)] = &[
    ("cluster_cidrs", "--cluster-cidr"),
    ("masquerade_all", "--masquerade-all"),
    ("conntrack_tcp_be_liberal", "--conntrack-tcp-be-liberal"),
    ("conntrack_max_per_core", "--conntrack-max-per-core"),
    ("conntrack_min", "--conntrack-min"),
    ("conntrack_tcp_timeout_established", "--conntrack-tcp-timeout-established"),
    ("conntrack_tcp_timeout_close_wait", "--conntrack-tcp-timeout-close-wait"),
    ("conntrack_udp_timeout", "--conntrack-udp-timeout"),
    ("conntrack_udp_timeout_stream", "--conntrack-udp-timeout-stream"),
    ("nodeport_addresses", "--nodeport-addresses"),
    ("sync_period", "--sync-period"),
    ("min_sync_period", "--min-sync-period"),
    ("healthz_bind_address", "--healthz-bind-address"),
    ("metrics_bind_address", "--metrics-bind-address"),
    ("kubeconfig", "--kubeconfig"),
];

/// Puts the file's settings in `args` (defaults where the file leaves a field empty); returns
/// a warning for each flag the file overrode.
fn apply_config(args: &mut Args, matches: &ArgMatches, file: nftproxy::config::FileSettings) -> Vec<String> {
    let warnings = FILE_FLAGS
        .iter()
        .filter(|(id, _)| matches.value_source(id) == Some(ValueSource::CommandLine))
        .map(|(_, flag)| {
            format!("{flag} ignored: with --config the file decides it (only --hostname-override and logging flags override the file, as in kube-proxy)")
        })
        .collect();
    let defaults = Args::try_parse_from(["nftproxy"]).expect("the defaults parse");
    args.cluster_cidrs = file.cluster_cidrs.unwrap_or(defaults.cluster_cidrs);
    args.masquerade_all = file.masquerade_all.unwrap_or(defaults.masquerade_all);
    args.conntrack = file.conntrack;
    args.nodeport_addresses = file.nodeport_addresses.unwrap_or(defaults.nodeport_addresses);
    args.sync_period = file.sync_period.unwrap_or(defaults.sync_period);
    args.min_sync_period = file.min_sync_period.unwrap_or(defaults.min_sync_period);
    args.healthz_bind_address = file.healthz_bind_address.unwrap_or(defaults.healthz_bind_address);
    args.metrics_bind_address = file.metrics_bind_address.unwrap_or(defaults.metrics_bind_address);
    if args.manifests.is_empty() {
        args.kubeconfig = file.kubeconfig;
    }
    if args.node_name.is_none() {
        args.node_name = file.hostname_override;
    }
    warnings
}

/// SIGTERM or SIGINT. Exiting never touches the rules: traffic flows while we restart.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Writes to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let bad = || format!("{s:?}: expected a port range like 30000-32767");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

/// Our tables in the kernel now (for `--table-shards auto`).
fn existing_tables() -> usize {
    Netlink::open().and_then(|mut nl| nl.our_tables()).map(|t| t.len()).unwrap_or(0)
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string())
}
