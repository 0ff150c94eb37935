//! The `nftproxy` binary: parses flags and wires the pieces together.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ipnet::IpNet;
use nftproxy::compile::Options;
use nftproxy::nft::Netlink;
use nftproxy::source::resolve::ResolveOptions;
use nftproxy::sync::{self, Config};
use nftproxy::{plan, report};

/// Kubernetes ClusterIP Services on nftables, programmed over netlink.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Kubernetes YAML manifests (file or directory; repeatable): Services, EndpointSlices,
    /// Endpoints, Pods, Namespaces.
    #[arg(long, value_name = "PATH")]
    manifests: Vec<PathBuf>,
    /// Program the kernel once, print what is served, and exit.
    #[arg(long)]
    sync_once: bool,
    /// With --sync-once: print the planned change and touch nothing.
    #[arg(long, requires = "sync_once")]
    dry_run: bool,
    /// Remove everything nftproxy created (table inet nftproxy) and exit.
    #[arg(long)]
    cleanup: bool,
    /// Pod network range(s); traffic to a ClusterIP from outside them is masqueraded.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    cluster_cidrs: Vec<IpNet>,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long)]
    masquerade_all: bool,
    /// This node's name (endpoint locality); defaults to the hostname.
    #[arg(long)]
    node_name: Option<String>,
    /// Ranges ClusterIPs are allocated from when a Service names none (comma-separated, one per family).
    #[arg(long, value_delimiter = ',', default_value = "10.96.0.0/12")]
    service_cluster_ip_range: Vec<IpNet>,
    /// Seconds between full resyncs when running continuously.
    #[arg(long, default_value_t = 30)]
    sync_period: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nftproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.cleanup {
        let removed = Netlink::open()?.delete_table()?;
        println!(
            "{}",
            if removed {
                "removed table inet nftproxy"
            } else {
                "nothing to remove"
            }
        );
        return Ok(());
    }
    if args.manifests.is_empty() {
        return Err(
            "no --manifests given (reading from the Kubernetes API is not available yet)".into(),
        );
    }
    let _node = args.node_name.clone().or_else(hostname);
    let cfg = Config {
        manifests: args.manifests.clone(),
        resolve: ResolveOptions {
            service_cidrs: args.service_cluster_ip_range.clone(),
        },
        compile: Options {
            cluster_cidrs: args.cluster_cidrs.clone(),
            masquerade_all: args.masquerade_all,
        },
    };
    if args.dry_run {
        let (_, want) = sync::desired(&cfg)?;
        let have = Netlink::open()
            .and_then(|mut nl| nl.read_table())
            .unwrap_or_else(|e| {
                tracing::warn!("cannot read the kernel ({e}); planning against an empty table");
                Default::default()
            });
        print!("{}", plan::plan(&have, &want));
        return Ok(());
    }
    let mut nl = Netlink::open()?;
    loop {
        match sync::desired(&cfg).map(|(snap, want)| (snap, sync::sync(&mut nl, &want))) {
            Ok((snapshot, Ok(outcome))) => {
                tracing::info!(
                    messages = outcome.stats.messages,
                    bytes = outcome.stats.bytes,
                    read_back_ms = outcome.read_back.as_secs_f64() * 1e3,
                    total_ms = outcome.total.as_secs_f64() * 1e3,
                    "synced"
                );
                if args.sync_once {
                    print!("{}", report::served_table(&snapshot));
                    return Ok(());
                }
            }
            Ok((_, Err(e))) | Err(e) if args.sync_once => return Err(e.into()),
            Ok((_, Err(e))) | Err(e) => {
                tracing::error!("sync failed, keeping the rules in place: {e}")
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(args.sync_period));
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}
