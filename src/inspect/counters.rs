//! `nftproxy_endpoint_connections_total{namespace, service, protocol, port, endpoint}`: the
//! `counter` in each endpoint chain (`--endpoint-counters`, on by default) counts the packets
//! that reach it, and only a connection's first packet traverses nat chains: one count per new
//! connection, whichever path (ClusterIP, node port, external IP, the node itself) led there.
//!
//! Read from the kernel every 2 s while `/metrics` is being scraped (a scrape then encodes the
//! last read and waits for none; the first scrape after two idle minutes reads at once): one
//! streamed rule dump per table of ours, so the values are the kernel's, survive syncs that
//! keep the endpoint and restarts of the agent, and a series goes with its endpoint chain.

use crate::lock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use crate::nft::Netlink;

pub const NAME: &str = "nftproxy_endpoint_connections";
const HELP: &str = "New connections sent to each endpoint, counted by the kernel (--endpoint-counters)";
/// How often the counters are read while scrapes keep coming; a value lags by at most this
/// (plus one read).
const REFRESH: Duration = Duration::from_secs(2);
/// Reads stop when nobody scraped for this long (no kernel work for an unwatched agent).
const IDLE: Duration = Duration::from_secs(120);

/// One series, borrowing from the endpoint chain's name: no allocation but the endpoint's text
/// (50,000 series are encoded in a few milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub protocol: &'a str,
    pub port: &'a str,
    /// `IP:PORT`, IPv6 as `[IP]:PORT`.
    pub endpoint: String,
    pub value: u64,
}

impl Series<'_> {
    pub fn labels(&self) -> [(&str, &str); 5] {
        [
            ("namespace", self.namespace),
            ("service", self.service),
            ("protocol", self.protocol),
            ("port", self.port),
            ("endpoint", &self.endpoint),
        ]
    }
}

/// The series of endpoint chain `ep4/<ns>/<name>/<proto>/<port>/<ip>/<port>` (IPv6 addresses
/// written with `-` for `:`), counting `packets`; `None` for any other name.
pub fn series_of(chain: &str, packets: u64) -> Option<Series<'_>> {
    let mut parts = chain.split('/');
    let (fam, namespace, service, protocol, port, ip, ep_port) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || port.parse::<u16>().is_err() {
        return None;
    }
    let ep_port: u16 = ep_port.parse().ok()?;
    let endpoint = match fam {
        "ep4" => format!("{}:{ep_port}", ip.parse::<std::net::Ipv4Addr>().ok()?),
        "ep6" => format!("[{}]:{ep_port}", ip.replace('-', ":").parse::<std::net::Ipv6Addr>().ok()?),
        _ => return None,
    };
    Some(Series { namespace, service, protocol, port, endpoint, value: packets })
}

/// Each endpoint chain with its count.
pub type Counted = Arc<Vec<(String, u64)>>;

/// The collector registered with the metrics registry.
#[derive(Debug)]
pub struct EndpointCounters {
    shared: Arc<Shared>,
    refresher: std::sync::Once,
}

impl Default for EndpointCounters {
    fn default() -> Self {
        EndpointCounters { shared: Arc::default(), refresher: std::sync::Once::new() }
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// The last read, and when it was made.
    last: Mutex<Option<(Instant, Counted)>>,
    /// When a scrape last asked.
    asked: Mutex<Option<Instant>>,
}

impl Shared {
    fn refresh(&self) -> Counted {
        let counted = Arc::new(read_parallel().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the endpoint counters failed");
            Vec::new()
        }));
        *lock(&self.last) = Some((Instant::now(), counted.clone()));
        counted
    }
}

impl EndpointCounters {
    /// Each endpoint chain with its count: the background read's (at most `REFRESH` old), or
    /// read now when there is none that recent (the first scrape, or after an idle spell).
    pub fn read(&self) -> Counted {
        *lock(&self.shared.asked) = Some(Instant::now());
        let shared = self.shared.clone();
        self.refresher.call_once(move || {
            let spawned = std::thread::Builder::new().name("endpoint-counters".into()).spawn(move || {
                loop {
                    std::thread::sleep(REFRESH);
                    if lock(&shared.asked).is_some_and(|t| t.elapsed() < IDLE) {
                        shared.refresh();
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no background reader for the endpoint counters; reading at each scrape");
            }
        });
        let recent = lock(&self.shared.last).as_ref().filter(|(at, _)| at.elapsed() < REFRESH * 3 / 2).cloned();
        match recent {
            Some((_, counted)) => counted,
            None => self.shared.refresh(),
        }
    }
}

/// Every endpoint chain's count: the kernel's rule dumps are most of a scrape's time, so the
/// tables are read in two halves on two sockets at once.
fn read_parallel() -> crate::nft::Result<Vec<(String, u64)>> {
    let tables = Netlink::open()?.our_tables()?;
    let (first, second) = tables.split_at(tables.len() / 2);
    let (a, b) = std::thread::scope(|s| {
        let other = s.spawn(|| Netlink::open()?.endpoint_counters_in(second));
        let mine = Netlink::open().and_then(|mut nl| nl.endpoint_counters_in(first));
        (mine, other.join().unwrap_or_else(|_| Ok(Vec::new())))
    });
    Ok(a?.into_iter().chain(b?).map(|(_, chain, n)| (chain, n)).collect())
}

impl Collector for EndpointCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counted = self.read();
        let probe = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(NAME, HELP, None, probe.metric_type())?;
        for s in counted.iter().filter_map(|(chain, n)| series_of(chain, *n)) {
            ConstCounter::new(s.value).encode(family.encode_family(&s.labels())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_chains_name_their_series() {
        let s = series_of("ep4/default/web/tcp/80/10.244.1.2/8080", 7).unwrap();
        let labels: Vec<String> = s.labels().iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(labels, ["namespace=default", "service=web", "protocol=tcp", "port=80", "endpoint=10.244.1.2:8080"]);
        assert_eq!(s.value, 7);
        let v6 = series_of("ep6/kube-system/dns/udp/53/fd00-10-244-1--2/5353", 1).unwrap();
        assert_eq!(v6.endpoint, "[fd00:10:244:1::2]:5353");
        for other in ["svc4/default/web/tcp/80", "ep4/default/web/tcp/80/x/8080", "ep4/a/b", "ep5/a/b/tcp/1/1.2.3.4/1"]
        {
            assert_eq!(series_of(other, 1), None, "{other}");
        }
    }
}
