//! `nftproxy_endpoint_connections_total{namespace, service, protocol, port, endpoint}`: the
//! `counter` in each endpoint chain (`--endpoint-counters`, on by default) counts the packets
//! that reach it, and only a connection's first packet traverses nat chains: one count per new
//! connection, whichever path (ClusterIP, node port, external IP, the node itself) led there.
//!
//! Read from the kernel when `/metrics` is scraped (at most once a second; concurrent scrapes
//! share the read): one streamed rule dump per table of ours, so the values are the kernel's,
//! survive syncs that keep the endpoint and restarts of the agent, and a series goes with its
//! endpoint chain.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use crate::nft::Netlink;

pub const NAME: &str = "nftproxy_endpoint_connections";
const HELP: &str = "New connections sent to each endpoint, counted by the kernel (--endpoint-counters)";
/// Scrapes closer together than this share one read.
const FRESH: Duration = Duration::from_secs(1);

/// One series: its labels and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub value: u64,
}

/// The series of endpoint chain `ep4/<ns>/<name>/<proto>/<port>/<ip>/<port>` (IPv6 addresses
/// written with `-` for `:`), counting `packets`; `None` for any other name.
pub fn series_of(chain: &str, packets: u64) -> Option<Series> {
    let parts: Vec<&str> = chain.split('/').collect();
    let [fam, ns, name, proto, port, ip, ep_port] = parts[..] else { return None };
    let ip: std::net::IpAddr = match fam {
        "ep4" => ip.parse().ok()?,
        "ep6" => ip.replace('-', ":").parse().ok()?,
        _ => return None,
    };
    let (port, ep_port): (u16, u16) = (port.parse().ok()?, ep_port.parse().ok()?);
    let label = |k: &str, v: String| (k.to_string(), v);
    Some(Series {
        labels: vec![
            label("namespace", ns.into()),
            label("service", name.into()),
            label("protocol", proto.into()),
            label("port", port.to_string()),
            label("endpoint", super::address(ip, ep_port)),
        ],
        value: packets,
    })
}

/// The collector registered with the metrics registry.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    last: Mutex<Option<(Instant, Arc<Vec<Series>>)>>,
}

impl EndpointCounters {
    /// The series now (or from a read less than a second old).
    pub fn read(&self) -> Arc<Vec<Series>> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, series)) = last.as_ref()
            && at.elapsed() < FRESH
        {
            return series.clone();
        }
        let read = Netlink::open().and_then(|mut nl| nl.endpoint_counters());
        let series: Vec<Series> = match read {
            Ok(counted) => counted.iter().filter_map(|(_, chain, n)| series_of(chain, *n)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the endpoint counters failed");
                Vec::new()
            }
        };
        let series = Arc::new(series);
        *last = Some((Instant::now(), series.clone()));
        series
    }
}

impl Collector for EndpointCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series = self.read();
        let probe = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(NAME, HELP, None, probe.metric_type())?;
        for s in series.iter() {
            ConstCounter::new(s.value).encode(family.encode_family(&s.labels)?)?;
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
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(labels, ["namespace=default", "service=web", "protocol=tcp", "port=80", "endpoint=10.244.1.2:8080"]);
        assert_eq!(s.value, 7);
        let v6 = series_of("ep6/kube-system/dns/udp/53/fd00-10-244-1--2/5353", 1).unwrap();
        assert_eq!(v6.labels[4].1, "[fd00:10:244:1::2]:5353");
        for other in ["svc4/default/web/tcp/80", "ep4/default/web/tcp/80/x/8080", "ep4/a/b", "ep5/a/b/tcp/1/1.2.3.4/1"]
        {
            assert_eq!(series_of(other, 1), None, "{other}");
        }
    }
}
