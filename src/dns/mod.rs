//! Cluster DNS in manifest mode (`--cluster-dns`): the agent answers
//! `<svc>.<ns>.svc.<domain>` for the Services it serves, as CoreDNS's kubernetes plugin would.
//!
//! - [`zone`]: the names, built from each served snapshot, and the lookup of a question (pure);
//! - [`answer`]: a query's bytes -> the response's bytes (pure);
//! - [`server`]: UDP and TCP listeners on the node (the only I/O);
//! - this file: the flags, and [`WithClusterDns`], the source wrapper that adds the synthetic
//!   Service `kube-system/cluster-dns` (the `--cluster-dns` addresses, port 53 UDP and TCP, one
//!   endpoint: the node's primary address of that family at [`LISTEN_PORT`]), so that the
//!   addresses are compiled, DNATed, masqueraded and listed like any ClusterIP, and the
//!   allocator never hands them out.
//!
//! Nothing is forwarded: names outside the domain (and reverse names of other addresses) are
//! REFUSED.

pub mod answer;
pub mod client;
pub mod server;
pub mod zone;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::source::k8s::{
    CoreEndpointPort as EndpointPort, EndpointAddress, EndpointSubset, Endpoints, IntOrString, ObjectMeta, Service,
    ServicePort, ServiceSpec,
};
use hickory_proto::rr::Name;
use tokio::sync::{mpsc, watch};

use crate::model::{Family, ServiceId, Snapshot};
use crate::source::node_addrs::{self, NodePortAddresses};
use crate::source::resolve::{self, Headless};
use crate::source::{Change, InputError, InputErrors, Objects, Origin, Source};
use zone::Zone;

/// The port the listener binds on the node; `--cluster-dns IP:53` is DNATed to it.
pub const LISTEN_PORT: u16 = 10053;
/// The synthetic Service that carries the `--cluster-dns` addresses.
pub const SERVICE_NAMESPACE: &str = "kube-system";
pub const SERVICE_NAME: &str = "cluster-dns";
/// Where errors say the synthetic objects come from.
const ORIGIN: &str = "--cluster-dns";

/// `--cluster-dns` and `--cluster-domain`, checked.
#[derive(Debug, Clone)]
pub struct ClusterDns {
    /// At most one per family, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// `cluster.local.`
    pub domain: Name,
}

/// Where the agent's flags stand, for [`ClusterDns::from_flags`].
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub manifests: bool,
    pub sync_once: bool,
}

impl ClusterDns {
    /// The checked flags, `None` without `--cluster-dns`. Errors say which flag and why.
    pub fn from_flags(ips: &[IpAddr], domain: &str, mode: Mode) -> Result<Option<ClusterDns>, String> {
        if ips.is_empty() {
            return Ok(None);
        }
        if !mode.manifests {
            return Err("--cluster-dns is for manifest mode (--manifests): a cluster read from the Kubernetes API \
                        has its own DNS (CoreDNS, Service kube-system/kube-dns)"
                .into());
        }
        if mode.sync_once {
            return Err("--cluster-dns needs a running agent: with --sync-once nothing would stay to answer \
                        (use --watch)"
                .into());
        }
        let mut sorted = ips.to_vec();
        sorted.sort_by_key(Family::of);
        for pair in sorted.windows(2) {
            if Family::of(&pair[0]) == Family::of(&pair[1]) {
                return Err(format!(
                    "--cluster-dns {}: {} and {} are of one family; give at most one IPv4 and one IPv6 address",
                    join(ips),
                    pair[0],
                    pair[1]
                ));
            }
        }
        if let Some(bad) = sorted.iter().find(|ip| ip.is_loopback() || ip.is_unspecified() || ip.is_multicast()) {
            return Err(format!(
                "--cluster-dns {bad}: a loopback, unspecified or multicast address cannot be a Service address"
            ));
        }
        let domain = zone::domain_name(domain).map_err(|e| format!("--cluster-domain {e}"))?;
        Ok(Some(ClusterDns { ips: sorted, domain }))
    }

    /// Starts answering: follows the node's primary addresses, binds the listeners on them
    /// (an error when the first bind fails, say the port is taken), and wraps `inner` so that
    /// every read adds the synthetic Service and every sync publishes the names. An address
    /// change is sent on `changes`, so that the agent re-reads and moves the DNAT.
    pub async fn start(
        self,
        inner: Arc<dyn Source>,
        changes: mpsc::Sender<Change>,
    ) -> std::io::Result<Arc<dyn Source>> {
        let (addr_tx, addrs) = watch::channel(Vec::new());
        node_addrs::follow(NodePortAddresses::Primary, addr_tx).await;
        let (zone_tx, zones) = watch::channel(None);
        let families: Vec<Family> = self.ips.iter().map(Family::of).collect();
        let mut listeners = Vec::new();
        for ip in listen_addresses(&addrs.borrow(), &families) {
            let addr = SocketAddr::new(ip, LISTEN_PORT);
            let l = server::listen(addr, zones.clone())
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cluster DNS cannot listen on {addr}: {e}")))?;
            listeners.push(l);
        }
        tokio::spawn(follow_addresses(addrs.clone(), families, listeners, zones, changes));
        let served = WithClusterDns {
            inner,
            dns: self,
            addrs,
            headless: Mutex::new(Vec::new()),
            zone: zone_tx,
            logged: Mutex::new(None),
        };
        Ok(Arc::new(served))
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(",")
}

/// Pure: the node address the listener binds (and the DNAT sends to) per family: the first
/// primary address of each family wanted.
pub fn listen_addresses(node_ips: &[IpAddr], families: &[Family]) -> Vec<IpAddr> {
    families.iter().filter_map(|f| node_ips.iter().copied().filter(|ip| Family::of(ip) == *f).min()).collect()
}

/// Rebinds the listeners when the node's addresses move, and tells the agent.
async fn follow_addresses(
    mut addrs: watch::Receiver<Vec<IpAddr>>,
    families: Vec<Family>,
    mut listeners: Vec<server::Listener>,
    zones: server::Zones,
    changes: mpsc::Sender<Change>,
) {
    while addrs.changed().await.is_ok() {
        let want: Vec<IpAddr> = listen_addresses(&addrs.borrow_and_update(), &families);
        listeners.retain(|l| want.contains(&l.addr.ip()));
        for ip in want {
            if listeners.iter().any(|l| l.addr.ip() == ip) {
                continue;
            }
            let addr = SocketAddr::new(ip, LISTEN_PORT);
            match server::listen(addr, zones.clone()).await {
                Ok(l) => listeners.push(l),
                Err(e) => tracing::error!(%addr, error = %e, "cluster DNS cannot listen"),
            }
        }
        let _ = changes.try_send(Change);
    }
}

/// A source with cluster DNS: adds the synthetic Service to every read and answers the names of
/// every snapshot served.
pub struct WithClusterDns {
    inner: Arc<dyn Source>,
    dns: ClusterDns,
    addrs: watch::Receiver<Vec<IpAddr>>,
    /// The headless Services of the last read, named with the next snapshot served.
    headless: Mutex<Vec<Headless>>,
    zone: watch::Sender<Option<Arc<Zone>>>,
    /// The listener addresses last logged.
    logged: Mutex<Option<Vec<IpAddr>>>,
}

impl WithClusterDns {
    fn log_endpoints(&self, endpoints: &[IpAddr]) {
        let mut logged = crate::lock(&self.logged);
        if logged.as_deref() == Some(endpoints) {
            return;
        }
        for ip in &self.dns.ips {
            match endpoints.iter().find(|e| Family::of(e) == Family::of(ip)) {
                Some(at) => {
                    tracing::info!(cluster_dns = %ip, listener = %SocketAddr::new(*at, LISTEN_PORT), "cluster DNS")
                }
                None => {
                    tracing::warn!(cluster_dns = %ip, "cluster DNS: the node has no primary address of this family; queries to it are refused")
                }
            }
        }
        *logged = Some(endpoints.to_vec());
    }
}

impl Source for WithClusterDns {
    fn objects(&self) -> Result<Objects, InputErrors> {
        let mut objects = self.inner.objects()?;
        let mut errors = claims(&objects, &self.dns.ips);
        match resolve::headless(&objects) {
            Ok(h) => *crate::lock(&self.headless) = h,
            Err(InputErrors(e)) => errors.extend(e),
        }
        if !errors.is_empty() {
            return Err(InputErrors(errors));
        }
        let families: Vec<Family> = self.dns.ips.iter().map(Family::of).collect();
        let endpoints = listen_addresses(&self.addrs.borrow(), &families);
        self.log_endpoints(&endpoints);
        let (service, endpoints) = synthetic(&self.dns.ips, &endpoints);
        objects.services.push((Origin(ORIGIN.into()), service.into()));
        objects.endpoints.push((Origin(ORIGIN.into()), endpoints.into()));
        Ok(objects)
    }

    fn served(&self, snapshot: &Snapshot) {
        let headless = crate::lock(&self.headless).clone();
        let serial =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
        let zone = Zone::build(self.dns.domain.clone(), snapshot, &headless, serial);
        self.zone.send_replace(Some(Arc::new(zone)));
        self.inner.served(snapshot);
    }

    fn take_changed(&self) -> crate::source::changes::Changed {
        self.inner.take_changed()
    }

    fn zone(&self) -> Option<String> {
        self.inner.zone()
    }

    fn node_internal_ips(&self) -> Option<Vec<IpAddr>> {
        self.inner.node_internal_ips()
    }

    fn node_eligible(&self) -> bool {
        self.inner.node_eligible()
    }

    fn skips_bad_objects(&self) -> bool {
        self.inner.skips_bad_objects()
    }
}

/// Pure: manifest Services that claim a `--cluster-dns` address or the synthetic Service's name.
pub fn claims(objects: &Objects, dns_ips: &[IpAddr]) -> Vec<InputError> {
    let mut errors = Vec::new();
    for (origin, svc) in &objects.services {
        let meta = &svc.metadata;
        let ns = meta.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default");
        let id = ServiceId::new(ns, meta.name.clone().unwrap_or_default());
        let error = |field: String, message: String| InputError {
            origin: origin.to_string(),
            object: format!("Service {id}"),
            field,
            message,
        };
        if id == ServiceId::new(SERVICE_NAMESPACE, SERVICE_NAME) {
            errors.push(error(
                "metadata.name".into(),
                format!("{id} is the Service nftproxy serves --cluster-dns with; name this one otherwise"),
            ));
        }
        let spec = svc.spec.clone().unwrap_or_default();
        let listed = spec.cluster_ips.iter().flatten().enumerate().map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip));
        let mut seen = BTreeSet::new();
        for (field, text) in spec.cluster_ip.iter().map(|ip| ("spec.clusterIP".to_string(), ip)).chain(listed) {
            if let Ok(ip) = text.parse::<IpAddr>()
                && dns_ips.contains(&ip)
                && seen.insert(ip)
            {
                errors.push(error(
                    field,
                    format!("{ip} is a --cluster-dns address, where nftproxy answers DNS; choose another ClusterIP"),
                ));
            }
        }
    }
    errors
}

/// Pure: Service `kube-system/cluster-dns` (the `--cluster-dns` addresses, `dns` 53/UDP and
/// `dns-tcp` 53/TCP, as kube-dns names them) and its Endpoints: the listener addresses.
pub fn synthetic(dns_ips: &[IpAddr], listeners: &[IpAddr]) -> (Service, Endpoints) {
    let meta =
        ObjectMeta { name: Some(SERVICE_NAME.into()), namespace: Some(SERVICE_NAMESPACE.into()), ..Default::default() };
    let ips: Vec<String> = dns_ips.iter().map(IpAddr::to_string).collect();
    let families = dns_ips.iter().map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" }.to_string()).collect();
    let ports = [("dns", "UDP"), ("dns-tcp", "TCP")];
    let service = Service {
        metadata: meta.clone(),
        spec: Some(ServiceSpec {
            cluster_ip: ips.first().cloned(),
            cluster_ips: Some(ips),
            ip_families: Some(families),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, protocol)| ServicePort {
                        name: Some((*name).into()),
                        protocol: Some((*protocol).into()),
                        port: 53,
                        target_port: Some(IntOrString::Int(i32::from(LISTEN_PORT))),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let subset = EndpointSubset {
        addresses: Some(
            listeners.iter().map(|ip| EndpointAddress { ip: ip.to_string(), ..Default::default() }).collect(),
        ),
        ports: Some(
            ports
                .iter()
                .map(|(name, protocol)| EndpointPort {
                    name: Some((*name).into()),
                    protocol: Some((*protocol).into()),
                    port: i32::from(LISTEN_PORT),
                })
                .collect(),
        ),
        ..Default::default()
    };
    (service, Endpoints { metadata: meta, subsets: Some(vec![subset]) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest::parse_into;
    use crate::source::resolve::{ResolveOptions, resolve};

    fn mode() -> Mode {
        Mode { manifests: true, sync_once: false }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn flags_are_checked_with_errors_that_say_why() {
        let dns = ClusterDns::from_flags(&ips(&["fd00::a", "10.96.0.10"]), "cluster.local", mode()).unwrap().unwrap();
        assert_eq!(dns.ips, ips(&["10.96.0.10", "fd00::a"]));
        assert_eq!(dns.domain.to_ascii(), "cluster.local.");
        assert!(ClusterDns::from_flags(&[], "cluster.local", mode()).unwrap().is_none());
        let err =
            |list: &[&str], domain: &str, mode: Mode| ClusterDns::from_flags(&ips(list), domain, mode).unwrap_err();
        let api = err(&["10.96.0.10"], "cluster.local", Mode { manifests: false, sync_once: false });
        assert!(api.contains("CoreDNS"), "{api}");
        let once = err(&["10.96.0.10"], "cluster.local", Mode { manifests: true, sync_once: true });
        assert!(once.contains("--sync-once"), "{once}");
        let two = err(&["10.96.0.10", "10.96.0.11"], "cluster.local", mode());
        assert!(two.contains("one family"), "{two}");
        assert!(err(&["127.0.0.1"], "cluster.local", mode()).contains("loopback"));
        assert!(err(&["10.96.0.10"], "a..b", mode()).contains("--cluster-domain"));
    }

    fn objects(yaml: &str) -> Objects {
        let (mut objects, mut errors) = (Objects::default(), Vec::new());
        parse_into("svc.yaml", yaml, &mut objects, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        objects
    }

    #[test]
    fn a_manifest_service_claiming_the_dns_address_or_name_is_an_error_naming_it() {
        let o = objects(
            "apiVersion: v1\nkind: Service\nmetadata: {name: mine, namespace: apps}\n\
             spec: {clusterIP: 10.96.0.10, ports: [{port: 53}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: cluster-dns, namespace: kube-system}\n\
             spec: {ports: [{port: 53}]}\n",
        );
        let errors: Vec<String> = claims(&o, &ips(&["10.96.0.10"])).iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "svc.yaml (document 1): Service apps/mine: spec.clusterIP: 10.96.0.10 is a --cluster-dns address"
            ),
            "{}",
            errors[0]
        );
        assert!(errors[1].contains("Service kube-system/cluster-dns: metadata.name"), "{}", errors[1]);
    }

    #[test]
    fn the_allocator_never_hands_out_a_dns_address() {
        // A /30 has two usable addresses; the DNS address takes one, so every Service that asks
        // for one gets the other or an error, never the DNS address.
        let mut o = objects("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n");
        let (service, endpoints) = synthetic(&ips(&["10.96.0.1"]), &ips(&["192.0.2.1"]));
        o.services.push((Origin(ORIGIN.into()), service.into()));
        o.endpoints.push((Origin(ORIGIN.into()), endpoints.into()));
        let opts = ResolveOptions { service_cidrs: vec!["10.96.0.0/30".parse().unwrap()], ..Default::default() };
        let snapshot = resolve(&o, &opts).unwrap();
        let a = &snapshot.services[&ServiceId::new("default", "a")];
        assert_eq!(a.cluster_ips, ips(&["10.96.0.2"]));
        let dns = &snapshot.services[&ServiceId::new(SERVICE_NAMESPACE, SERVICE_NAME)];
        assert_eq!(dns.cluster_ips, ips(&["10.96.0.1"]));
        let ep: Vec<String> =
            dns.ports.iter().flat_map(|p| &p.endpoints).map(|e| format!("{}:{}", e.ip, e.port)).collect();
        assert_eq!(ep, ["192.0.2.1:10053", "192.0.2.1:10053"]);
    }

    #[test]
    fn the_listener_is_the_first_node_address_of_each_family_asked_for() {
        let node = ips(&["192.0.2.9", "192.0.2.1", "2001:db8::1"]);
        assert_eq!(listen_addresses(&node, &[Family::V4]), ips(&["192.0.2.1"]));
        assert_eq!(listen_addresses(&node, &[Family::V4, Family::V6]), ips(&["192.0.2.1", "2001:db8::1"]));
        assert_eq!(listen_addresses(&ips(&["2001:db8::1"]), &[Family::V4]), Vec::<IpAddr>::new());
    }

    #[test]
    fn headless_services_resolve_to_ready_addresses_from_slices_or_pods() {
        let o = objects(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, selector: {app: db}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: db-0, labels: {app: db}}\n\
             status: {podIPs: [{ip: 10.244.1.5}], conditions: [{type: Ready, status: 'True'}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: db-1, labels: {app: db}}\n\
             status: {podIPs: [{ip: 10.244.1.6}], conditions: [{type: Ready, status: 'False'}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: cache}\nspec: {clusterIP: None, ports: [{name: redis, port: 6379}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: cache-1, labels: {kubernetes.io/service-name: cache}}\n\
             addressType: IPv6\nports: [{name: redis, port: 6379}]\n\
             endpoints: [{addresses: ['fd00::7']}, {addresses: ['fd00::8'], conditions: {ready: false}}]\n",
        );
        let h = resolve::headless(&o).unwrap();
        let got: Vec<(String, Vec<IpAddr>)> = h.iter().map(|h| (h.id.to_string(), h.addresses.clone())).collect();
        assert_eq!(
            got,
            [("default/db".to_string(), ips(&["10.244.1.5"])), ("default/cache".to_string(), ips(&["fd00::7"]))]
        );
        assert_eq!(h[1].ports[0].name, "redis");
    }
}
