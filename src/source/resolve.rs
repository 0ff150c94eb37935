//! Kubernetes objects -> [`Snapshot`]: which Services to serve, their ClusterIPs, and the
//! endpoints behind each port (EndpointSlices, else legacy Endpoints, else the Pods the selector
//! picks, as the EndpointSlice controller would). Every problem is reported with its origin,
//! object and field; any problem means no snapshot.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;

use super::k8s::{EndpointSlice, Endpoints, IntOrString, Map, ObjectMeta, Pod, Service as K8sService, ServiceSpec};
use super::{InputError, InputErrors, Objects, Origin};
use crate::model::{
    Affinity, Endpoint, External, Family, MAX_WEIGHT, Protocol, Service, ServiceId, ServicePort, Snapshot,
};
use crate::ruleset::fnv1a;
use ipnet::IpNet;

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// Ranges ClusterIPs are allocated from for Services that do not name one.
    pub service_cidrs: Vec<IpNet>,
    /// Node ports are allocated from here for NodePort and LoadBalancer Services that do not
    /// name one (in practice manifest mode: the API server allocates them otherwise).
    pub node_port_range: RangeInclusive<u16>,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions { service_cidrs: vec!["10.96.0.0/12".parse().unwrap()], node_port_range: 30000..=32767 }
    }
}

struct Errors<'a> {
    origin: &'a Origin,
    object: Named<'a>,
    list: &'a mut Vec<InputError>,
}

/// How errors name an object: spelled out only when there is an error (most objects have none,
/// and formatting 88,000 names that nobody reads took a tenth of resolve).
enum Named<'a> {
    Text(String),
    /// `Pod default/web-a`
    Meta(&'static str, &'a ObjectMeta),
}

impl From<String> for Named<'_> {
    fn from(text: String) -> Self {
        Named::Text(text)
    }
}

impl Errors<'_> {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let object = match &self.object {
            Named::Text(text) => text.clone(),
            Named::Meta(kind, meta) => object_name(kind, meta),
        };
        self.list.push(InputError {
            origin: self.origin.to_string(),
            object,
            field: field.into(),
            message: message.into(),
        });
    }
}

/// An object's namespace; absent (or empty, as `kubectl` treats it) means `default`.
fn ns_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into())
}

/// The `[a-z0-9]([-a-z0-9]*[a-z0-9])?` shape (no length limit), with `first` deciding the first
/// character. Byte-wise: any non-ASCII byte fails the character set.
fn is_label_shaped(s: &str, first: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(&f), Some(&l)) => first(f) && alnum(l) && b.iter().all(|&c| alnum(c) || c == b'-'),
        _ => false,
    }
}

/// RFC 1123 label, as Kubernetes checks namespaces: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63.
fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && is_label_shaped(s, |c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// RFC 1035 label, as Kubernetes checks Service names: `[a-z]([-a-z0-9]*[a-z0-9])?`, at most 63.
fn is_dns1035_label(s: &str) -> bool {
    s.len() <= 63 && is_label_shaped(s, |c| c.is_ascii_lowercase())
}

/// RFC 1123 subdomain, as Kubernetes checks Pod, EndpointSlice and Endpoints names: at most 253
/// characters of dot-separated label-shaped parts (Kubernetes limits only the whole, not each part).
fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|part| is_label_shaped(part, |c| c.is_ascii_lowercase() || c.is_ascii_digit()))
}

/// IANA_SVC_NAME, as Kubernetes checks a named `targetPort` (and container port names): at most
/// 15 of `[a-z0-9-]`, at least one letter, no leading, trailing or doubled '-'.
fn is_port_name(s: &str) -> bool {
    s.len() <= 15
        && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && s.bytes().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// The name rules the API server applies, each with the words an error explains it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameRule {
    Dns1123Label,
    Dns1035Label,
    Dns1123Subdomain,
}

impl NameRule {
    fn accepts(self, s: &str) -> bool {
        match self {
            NameRule::Dns1123Label => is_dns1123_label(s),
            NameRule::Dns1035Label => is_dns1035_label(s),
            NameRule::Dns1123Subdomain => is_dns1123_subdomain(s),
        }
    }

    /// `"b/c" is not a valid DNS-1035 label (...)`
    fn refuse(self, s: &str) -> String {
        let what = match self {
            NameRule::Dns1123Label => {
                "DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit, \
                 at most 63 characters)"
            }
            NameRule::Dns1035Label => {
                "DNS-1035 label (lowercase letters, digits and '-', starting with a letter, ending with a letter \
                 or digit, at most 63 characters)"
            }
            NameRule::Dns1123Subdomain => {
                "DNS-1123 subdomain (lowercase letters, digits, '-' and '.', each '.'-separated part starting and \
                 ending with a letter or digit, at most 253 characters)"
            }
        };
        format!("{s:?} is not a valid {what}")
    }
}

/// `Pod default/web-a`: how errors name a namespaced object.
fn object_name(kind: &str, meta: &ObjectMeta) -> String {
    format!("{kind} {}/{}", ns_of(meta), meta.name.as_deref().unwrap_or_default())
}

/// Checks a namespaced object's namespace and name as the API server would (the name by `rule`).
/// Valid names never contain '/', so `<ns>/<name>` (and the kernel
/// names built from it) cannot be read two ways.
fn check_meta(meta: &ObjectMeta, kind: &str, rule: NameRule, errs: &mut Errors<'_>) {
    if let Some(ns) = meta.namespace.as_deref().filter(|n| !n.is_empty())
        && !is_dns1123_label(ns)
    {
        errs.add("metadata.namespace", NameRule::Dns1123Label.refuse(ns));
    }
    match meta.name.as_deref() {
        None | Some("") => errs.add("metadata.name", format!("a {kind} needs a name")),
        Some(name) if !rule.accepts(name) => errs.add("metadata.name", rule.refuse(name)),
        Some(_) => {}
    }
}

/// `field` names the field only if the port is out of range (spelled out only then).
fn port_u16(value: i32, field: impl FnOnce() -> String, errs: &mut Errors<'_>) -> Option<u16> {
    if (1..=65535).contains(&value) {
        Some(value as u16)
    } else {
        errs.add(field(), format!("port {value} is out of range 1-65535"));
        None
    }
}

/// `nodePort` or `healthCheckNodePort`: 0 is Go's zero value, which the API server reads as
/// "allocate one", so it counts as absent.
fn node_port_of(value: Option<i32>, field: impl FnOnce() -> String, errs: &mut Errors<'_>) -> Option<u16> {
    match value {
        None | Some(0) => None,
        Some(v) => port_u16(v, field, errs),
    }
}

/// `spec.type`, as far as proxying cares (ExternalName Services are not proxied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// Annotation weighting every endpoint of an EndpointSlice (or, in manifest mode, a Pod).
pub const ANNOTATION_WEIGHT: &str = "nftproxy.io/weight";

/// The `nftproxy.io/weight` annotation: 0..=1000, default 1.
fn weight_of(annotations: Option<&Map>, errs: &mut Errors<'_>) -> u32 {
    let Some(text) = annotations.and_then(|a| a.get(ANNOTATION_WEIGHT)) else { return 1 };
    match text.trim().parse::<u32>() {
        Ok(w) if w <= MAX_WEIGHT => w,
        _ => {
            errs.add(
                format!("metadata.annotations[{ANNOTATION_WEIGHT:?}]"),
                format!("{text:?} is not a weight (a whole number from 0 to {MAX_WEIGHT})"),
            );
            1
        }
    }
}

/// A Service accepted for proxying, before endpoints are attached.
struct Accepted<'a> {
    origin: &'a Origin,
    svc: &'a K8sService,
    id: ServiceId,
    ips: Vec<IpAddr>,
    /// Families still needing an allocated address.
    to_allocate: Vec<Family>,
    ports: Vec<(ServicePort, Option<IntOrString>)>,
    internal_local: bool,
    affinity: Option<Affinity>,
    external: External,
    /// Indexes into `ports` of the ports still needing an allocated node port.
    node_ports_to_allocate: Vec<usize>,
    /// LoadBalancer + Local without `spec.healthCheckNodePort`.
    health_check_to_allocate: bool,
}

/// An EndpointSlice as [`Objects`] holds it.
type SliceEntry = (Origin, Arc<EndpointSlice>);

/// Whether kube-proxy would program this Service at all.
fn is_proxied(svc: &K8sService) -> bool {
    let labels = svc.metadata.labels.as_ref();
    let has = |k: &str| labels.is_some_and(|l| l.contains_key(k));
    let spec = svc.spec.as_ref();
    let ty = spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP");
    let none_ip = spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    !(has(LABEL_HEADLESS) || has(LABEL_PROXY_NAME) || ty == "ExternalName" || none_ip)
}

fn accept<'a>(
    origin: &'a Origin,
    svc: &'a K8sService,
    errors: &mut Vec<InputError>,
    opts: &ResolveOptions,
) -> Option<Accepted<'a>> {
    let id = ServiceId::new(ns_of(&svc.metadata), svc.metadata.name.clone().unwrap_or_default());
    let mut errs = Errors { origin, object: Named::Meta("Service", &svc.metadata), list: errors };
    let before = errs.list.len();
    check_meta(&svc.metadata, "Service", NameRule::Dns1035Label, &mut errs);
    let no_spec = ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&no_spec);

    let mut ips = Vec::new();
    // (index in spec.clusterIPs, or None for spec.clusterIP; the address)
    let listed: Vec<(Option<usize>, &str)> = match &spec.cluster_ips {
        Some(list) if !list.is_empty() => list.iter().enumerate().map(|(i, s)| (Some(i), s.as_str())).collect(),
        _ => spec.cluster_ip.iter().filter(|s| !s.is_empty()).map(|s| (None, s.as_str())).collect(),
    };
    for (i, text) in listed {
        let field = || i.map_or_else(|| "spec.clusterIP".to_string(), |i| format!("spec.clusterIPs[{i}]"));
        match text.parse::<IpAddr>() {
            Ok(ip) if ips.iter().any(|o: &IpAddr| Family::of(o) == Family::of(&ip)) => {
                errs.add(field(), format!("{ip} is a second address of the same family"))
            }
            Ok(ip) => ips.push(ip),
            Err(_) => errs.add(field(), format!("{text:?} is not an IP address")),
        }
    }
    let mut families = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        match f.as_str() {
            "IPv4" => families.push(Family::V4),
            "IPv6" => families.push(Family::V6),
            other => errs.add(format!("spec.ipFamilies[{i}]"), format!("unknown IP family {other:?}")),
        }
    }
    if families.is_empty() {
        let dual = matches!(spec.ip_family_policy.as_deref(), Some("PreferDualStack" | "RequireDualStack"));
        let mut cidr_families: Vec<Family> = opts.service_cidrs.iter().map(|c| Family::of(&c.addr())).collect();
        cidr_families.dedup();
        families = if ips.is_empty() {
            if dual { cidr_families } else { cidr_families.into_iter().take(1).collect() }
        } else {
            ips.iter().map(Family::of).collect()
        };
    }
    let to_allocate: Vec<Family> =
        families.iter().copied().filter(|f| !ips.iter().any(|ip| Family::of(ip) == *f)).collect();

    let ty = match spec.type_.as_deref() {
        None | Some("" | "ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some(other) => {
            errs.add("spec.type", format!("{other:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"));
            ServiceType::ClusterIp
        }
    };
    // kube-proxy ignores `nodePort` on other types; a LoadBalancer may opt out of node ports.
    let has_node_ports = ty != ServiceType::ClusterIp;
    let allocates_node_ports = ty == ServiceType::NodePort
        || (ty == ServiceType::LoadBalancer && spec.allocate_load_balancer_node_ports != Some(false));

    let mut ports = Vec::new();
    let mut node_ports_to_allocate = Vec::new();
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let specs = spec.ports.as_deref().unwrap_or_default();
    if specs.is_empty() {
        errs.add("spec.ports", "a Service needs at least one port");
    }
    for (i, p) in specs.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let name = p.name.clone().unwrap_or_default();
        if !name.is_empty() && !is_dns1123_label(&name) {
            errs.add(field("name"), NameRule::Dns1123Label.refuse(&name));
        }
        if !names.insert(name.clone()) {
            errs.add(field("name"), format!("duplicate port name {name:?}"));
        }
        if specs.len() > 1 && name.is_empty() {
            errs.add(field("name"), "ports of a multi-port Service must be named");
        }
        let protocol = match Protocol::from_k8s(p.protocol.as_deref()) {
            Ok(pr) => Some(pr),
            Err(e) => {
                errs.add(field("protocol"), e);
                None
            }
        };
        let port = port_u16(p.port, || field("port"), &mut errs);
        match &p.target_port {
            Some(IntOrString::Int(t)) => {
                port_u16(*t, || field("targetPort"), &mut errs);
            }
            Some(IntOrString::String(t)) if !is_port_name(t) => errs.add(
                field("targetPort"),
                format!(
                    "{t:?} is not a valid port name (at most 15 lowercase letters, digits and '-', with at least \
                     one letter, not starting or ending with '-', no \"--\")"
                ),
            ),
            Some(IntOrString::String(_)) | None => {}
        }
        if let (Some(port), Some(protocol)) = (port, protocol) {
            if !keys.insert((port, protocol)) {
                errs.add(field("port"), format!("duplicate port {port}/{protocol}"));
            }
            let node_port =
                if has_node_ports { node_port_of(p.node_port, || field("nodePort"), &mut errs) } else { None };
            if node_port.is_none() && allocates_node_ports {
                node_ports_to_allocate.push(ports.len());
            }
            let sp = ServicePort { name, port, protocol, node_port, endpoints: Vec::new() };
            ports.push((sp, p.target_port.clone()));
        }
    }
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            errs.add("spec.internalTrafficPolicy", format!("{other:?} is neither Cluster nor Local"));
            false
        }
    };
    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout.unwrap_or(10800) {
                t @ 1..=86400 => Some(Affinity { timeout_seconds: t as u32 }),
                t => {
                    errs.add(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-86400"),
                    );
                    None
                }
            }
        }
        Some(other) => {
            errs.add("spec.sessionAffinity", format!("{other:?} is neither None nor ClientIP"));
            None
        }
    };
    let mut external = External::default();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        match text.parse::<IpAddr>() {
            Ok(ip) if external.external_ips.contains(&ip) => {}
            Ok(ip) if special(&ip).is_some() => {
                errs.add(format!("spec.externalIPs[{i}]"), format!("{ip} {}", special(&ip).unwrap_or_default()))
            }
            Ok(ip) => external.external_ips.push(ip),
            Err(_) => errs.add(format!("spec.externalIPs[{i}]"), format!("{text:?} is not an IP address")),
        }
    }
    if ty == ServiceType::LoadBalancer {
        let status = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
        for (i, ingress) in status.and_then(|s| s.ingress.as_ref()).into_iter().flatten().enumerate() {
            // Hostname-only entries name no address; `ipMode: Proxy` (KEP-1860) means the load
            // balancer proxies, so traffic never arrives addressed to the IP.
            let Some(text) = ingress.ip.as_deref().filter(|t| !t.is_empty()) else { continue };
            if ingress.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
                continue;
            }
            match text.parse::<IpAddr>() {
                Ok(ip) if external.load_balancer_ips.contains(&ip) => {}
                Ok(ip) if special(&ip).is_some() => errs.add(
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{ip} {}", special(&ip).unwrap_or_default()),
                ),
                Ok(ip) => external.load_balancer_ips.push(ip),
                Err(_) => {
                    errs.add(format!("status.loadBalancer.ingress[{i}].ip"), format!("{text:?} is not an IP address"))
                }
            }
        }
        for (i, text) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
            match text.trim().parse::<IpNet>() {
                Ok(net) if external.source_ranges.contains(&net.trunc()) => {}
                Ok(net) => external.source_ranges.push(net.trunc()),
                Err(_) => errs.add(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{text:?} is not a CIDR (such as 203.0.113.0/24 or 2001:db8::/64)"),
                ),
            }
        }
    }
    let local = match spec.external_traffic_policy.as_deref() {
        None | Some("" | "Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            errs.add("spec.externalTrafficPolicy", format!("{other:?} is neither Cluster nor Local"));
            false
        }
    };
    // As kube-proxy: Local matters for node ports and load balancers, and for external IPs.
    external.local = local && (has_node_ports || !external.external_ips.is_empty());
    let mut health_check_to_allocate = false;
    if ty == ServiceType::LoadBalancer && external.local {
        external.health_check_node_port =
            node_port_of(spec.health_check_node_port, || "spec.healthCheckNodePort".into(), &mut errs);
        health_check_to_allocate = external.health_check_node_port.is_none();
    }
    if errs.list.len() > before {
        return None;
    }
    Some(Accepted {
        origin,
        svc,
        id,
        ips,
        to_allocate,
        ports,
        internal_local,
        affinity,
        external,
        node_ports_to_allocate,
        health_check_to_allocate,
    })
}

/// Picks a stable address in `cidr` for `id`: a hash of the name, probed past used addresses.
fn allocate(cidr: &IpNet, id: &ServiceId, used: &HashMap<IpAddr, ServiceId>) -> Option<IpAddr> {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len()).min(63);
    let size: u64 = 1 << host_bits;
    if size < 4 {
        return None;
    }
    // Skip the network address and (v4) broadcast; offset 1 is traditionally `kubernetes`.
    let usable = size - 2;
    let start = fnv1a(id.to_string().as_bytes()) % usable;
    let base = match cidr.network() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    for probe in 0..usable.min(1 << 20) {
        let off = 1 + (start + probe) % usable;
        let n = base + u128::from(off);
        let ip = match cidr {
            IpNet::V4(_) => IpAddr::V4((n as u32).into()),
            IpNet::V6(_) => IpAddr::V6(n.into()),
        };
        if !used.contains_key(&ip) {
            return Some(ip);
        }
    }
    None
}

/// Picks a stable node port in `range` for `key`: a hash of it, probed past used numbers.
fn allocate_node_port(range: &RangeInclusive<u16>, key: &str, used: &BTreeSet<u16>) -> Option<u16> {
    let (start, end) = (u64::from(*range.start()), u64::from(*range.end()));
    if start == 0 || start > end {
        return None;
    }
    let size = end - start + 1;
    let first = fnv1a(key.as_bytes()) % size;
    (0..size).map(|probe| (start + (first + probe) % size) as u16).find(|n| !used.contains(n))
}

/// Who holds a node port: the Service, where it was read and the field.
type Holder<'a> = (ServiceId, &'a Origin, String);

/// Claims node port `port`/`protocol` for `a`, or reports who holds it already.
fn claim_node_port<'a>(
    taken: &mut HashMap<(u16, Protocol), Holder<'a>>,
    a: &Accepted<'a>,
    port: u16,
    protocol: Protocol,
    field: String,
    errors: &mut Vec<InputError>,
) {
    match taken.get(&(port, protocol)) {
        Some((other, origin, other_field)) => {
            let what = field.rsplit('.').next().unwrap_or_default();
            let mut errs = Errors { origin: a.origin, object: format!("Service {}", a.id).into(), list: errors };
            errs.add(
                &field,
                format!(
                    "{what} {port}/{protocol} is already used by Service {other} ({other_field}, {origin}); every \
                     node port must be unique"
                ),
            );
        }
        None => {
            taken.insert((port, protocol), (a.id.clone(), a.origin, field));
        }
    }
}

/// Node ports: explicit ones first, each `(port, protocol)` used once (a health-check port is
/// TCP), then stable allocations from `range` that avoid every number in use.
fn assign_node_ports(accepted: &mut [Box<Accepted<'_>>], range: &RangeInclusive<u16>, errors: &mut Vec<InputError>) {
    let mut taken = HashMap::new();
    for a in accepted.iter() {
        for (i, (p, _)) in a.ports.iter().enumerate() {
            if let Some(n) = p.node_port {
                claim_node_port(&mut taken, a, n, p.protocol, format!("spec.ports[{i}].nodePort"), errors);
            }
        }
        if let Some(n) = a.external.health_check_node_port {
            claim_node_port(&mut taken, a, n, Protocol::Tcp, "spec.healthCheckNodePort".into(), errors);
        }
    }
    let mut used: BTreeSet<u16> = taken.keys().map(|(n, _)| *n).collect();
    let (lo, hi) = (range.start(), range.end());
    for a in accepted.iter_mut() {
        let mut wanted: Vec<(Option<usize>, String, String)> = a
            .node_ports_to_allocate
            .iter()
            .map(|&i| {
                let p = &a.ports[i].0;
                (Some(i), format!("{}/{}/{}", a.id, p.name, p.protocol), format!("spec.ports[{i}].nodePort"))
            })
            .collect();
        if a.health_check_to_allocate {
            wanted.push((None, format!("{}/healthCheckNodePort", a.id), "spec.healthCheckNodePort".into()));
        }
        for (index, key, field) in wanted {
            let Some(n) = allocate_node_port(range, &key, &used) else {
                let mut errs = Errors { origin: a.origin, object: format!("Service {}", a.id).into(), list: errors };
                errs.add(field, format!("no free node port in the node port range {lo}-{hi}"));
                continue;
            };
            used.insert(n);
            match index {
                Some(i) => a.ports[i].0.node_port = Some(n),
                None => a.external.health_check_node_port = Some(n),
            }
        }
    }
}

/// The endpoints of a slice for one Service port, or with `port` `None` every address of the
/// slice whatever its ports (target port 0: a headless Service's names need only addresses).
fn slice_endpoints(
    origin: &Origin,
    slice: &EndpointSlice,
    port: Option<&ServicePort>,
    errors: &mut Vec<InputError>,
) -> Vec<Endpoint> {
    let mut errs = Errors { origin, object: Named::Meta("EndpointSlice", &slice.metadata), list: errors };
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        // FQDN slices are not proxied.
        _ => return Vec::new(),
    };
    let target = match port {
        None => 0,
        Some(port) => {
            let matching = slice.ports.iter().flatten().enumerate().find(|(_, p)| {
                p.name.clone().unwrap_or_default() == port.name
                    && Protocol::from_k8s(p.protocol.as_deref()).ok() == Some(port.protocol)
            });
            let Some((pi, slice_port)) = matching else {
                return Vec::new();
            };
            let Some(target) = slice_port.port.and_then(|p| port_u16(p, || format!("ports[{pi}].port"), &mut errs))
            else {
                return Vec::new();
            };
            target
        }
    };
    let weight = weight_of(slice.metadata.annotations.as_ref(), &mut errs);
    let mut out = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let hints = ep.hints.as_ref();
        let zone_hints: Vec<String> =
            hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten().map(|z| z.name.clone()).collect();
        let node_hints: Vec<String> =
            hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten().map(|n| n.name.clone()).collect();
        let c = ep.conditions.clone().unwrap_or_default();
        // Unknown readiness counts as ready (API docs); serving defaults to ready.
        let ready = c.ready.unwrap_or(true);
        let serving = c.serving.unwrap_or(ready);
        let terminating = c.terminating.unwrap_or(false);
        for (j, a) in ep.addresses.iter().enumerate() {
            match a.parse::<IpAddr>() {
                Ok(ip) if Family::of(&ip) == family => out.push(Endpoint {
                    ready,
                    serving,
                    terminating,
                    node_name: ep.node_name.clone(),
                    zone_hints: zone_hints.clone(),
                    node_hints: node_hints.clone(),
                    weight,
                    ..Endpoint::ready(ip, target)
                }),
                Ok(ip) => {
                    errs.add(format!("endpoints[{i}].addresses[{j}]"), format!("{ip} is not of addressType {family:?}"))
                }
                Err(_) => errs.add(format!("endpoints[{i}].addresses[{j}]"), format!("{a:?} is not an IP address")),
            }
        }
    }
    out
}

/// Like [`slice_endpoints`], from a legacy Endpoints object.
fn legacy_endpoints(
    origin: &Origin,
    eps: &Endpoints,
    port: Option<&ServicePort>,
    errors: &mut Vec<InputError>,
) -> Vec<Endpoint> {
    let mut errs = Errors { origin, object: Named::Meta("Endpoints", &eps.metadata), list: errors };
    let mut out = Vec::new();
    for (si, subset) in eps.subsets.iter().flatten().enumerate() {
        let target = match port {
            None => 0,
            Some(port) => {
                let Some(p) = subset.ports.iter().flatten().find(|p| {
                    p.name.clone().unwrap_or_default() == port.name
                        && Protocol::from_k8s(p.protocol.as_deref()).ok() == Some(port.protocol)
                }) else {
                    continue;
                };
                let Some(target) = port_u16(p.port, || format!("subsets[{si}].ports"), &mut errs) else {
                    continue;
                };
                target
            }
        };
        let lists = [(true, "addresses", &subset.addresses), (false, "notReadyAddresses", &subset.not_ready_addresses)];
        for (ready, field, list) in lists {
            for (i, a) in list.iter().flatten().enumerate() {
                match a.ip.parse::<IpAddr>() {
                    Ok(ip) => out.push(Endpoint {
                        ready,
                        serving: ready,
                        node_name: a.node_name.clone(),
                        ..Endpoint::ready(ip, target)
                    }),
                    Err(_) => {
                        errs.add(format!("subsets[{si}].{field}[{i}].ip"), format!("{:?} is not an IP address", a.ip))
                    }
                }
            }
        }
    }
    out
}

/// Endpoints the EndpointSlice controller would derive from Pods for one service port.
fn pod_endpoints(
    selector: &Map,
    namespace: &str,
    pods: &[(Origin, Arc<Pod>)],
    port: &ServicePort,
    target: &Option<IntOrString>,
    errors: &mut Vec<InputError>,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (origin, pod) in pods {
        if ns_of(&pod.metadata) != namespace {
            continue;
        }
        let labels = pod.metadata.labels.as_ref();
        if !selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)) {
            continue;
        }
        let status = pod.status.clone().unwrap_or_default();
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let number = match target {
            None => Some(port.port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(name)) => pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && Protocol::from_k8s(cp.protocol.as_deref()).ok() == Some(port.protocol)
                })
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        };
        // A pod without the named port is not an endpoint of this port (as in Kubernetes).
        let Some(number) = number else { continue };
        let pod_ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let mut addrs: Vec<String> = status.pod_ips.iter().flatten().map(|p| p.ip.clone()).collect();
        if addrs.is_empty() {
            addrs.extend(status.pod_ip.clone());
        }
        let name = format!("Pod {namespace}/{}", pod.metadata.name.clone().unwrap_or_default());
        let weight = weight_of(
            pod.metadata.annotations.as_ref(),
            &mut Errors { origin, object: name.clone().into(), list: errors },
        );
        for (i, a) in addrs.iter().enumerate() {
            match a.parse::<IpAddr>() {
                Ok(ip) => out.push(Endpoint {
                    ready: pod_ready && !terminating,
                    serving: pod_ready,
                    terminating,
                    node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                    weight,
                    ..Endpoint::ready(ip, number)
                }),
                Err(_) => errors.push(InputError {
                    origin: origin.to_string(),
                    object: name.clone(),
                    field: format!("status.podIPs[{i}]"),
                    message: format!("{a:?} is not an IP address"),
                }),
            }
        }
    }
    out
}

/// Turns objects into a snapshot, or every problem found.
pub fn resolve(objects: &Objects, opts: &ResolveOptions) -> Result<Snapshot, InputErrors> {
    let mut errors = Vec::new();
    // Names as the API server checks them (Services: in `accept`, or below when not proxied).
    for (origin, ns) in &objects.namespaces {
        let name = ns.metadata.name.as_deref().unwrap_or_default();
        let mut errs = Errors { origin, object: format!("Namespace {name}").into(), list: &mut errors };
        if name.is_empty() {
            errs.add("metadata.name", "a Namespace needs a name");
        } else if !is_dns1123_label(name) {
            errs.add("metadata.name", NameRule::Dns1123Label.refuse(name));
        }
    }
    let metas = objects.slices.iter().map(|(o, s)| (o, "EndpointSlice", &s.metadata));
    let metas = metas.chain(objects.endpoints.iter().map(|(o, e)| (o, "Endpoints", &e.metadata)));
    for (origin, kind, meta) in metas.chain(objects.pods.iter().map(|(o, p)| (o, "Pod", &p.metadata))) {
        let mut errs = Errors { origin, object: Named::Meta(kind, meta), list: &mut errors };
        check_meta(meta, kind, NameRule::Dns1123Subdomain, &mut errs);
    }
    let declared: Option<BTreeSet<String>> = (!objects.namespaces.is_empty()).then(|| {
        let mut set: BTreeSet<String> =
            objects.namespaces.iter().filter_map(|(_, n)| n.metadata.name.clone()).collect();
        set.extend(["default".to_string(), "kube-system".to_string()]);
        set
    });

    // Boxed: sorting moves pointers rather than the (large) records.
    let mut accepted: Vec<Box<Accepted<'_>>> = Vec::with_capacity(objects.services.len());
    let mut seen = BTreeSet::new();
    for (origin, svc) in &objects.services {
        if !is_proxied(svc) {
            let mut errs = Errors { origin, object: Named::Meta("Service", &svc.metadata), list: &mut errors };
            check_meta(&svc.metadata, "Service", NameRule::Dns1035Label, &mut errs);
            continue;
        }
        let Some(a) = accept(origin, svc, &mut errors, opts) else {
            continue;
        };
        if let Some(declared) = &declared
            && !declared.contains(&a.id.namespace)
        {
            errors.push(InputError {
                origin: origin.to_string(),
                object: format!("Service {}", a.id),
                field: "metadata.namespace".into(),
                message: format!("namespace {:?} is not declared by any Namespace object", a.id.namespace),
            });
            continue;
        }
        if !seen.insert(a.id.clone()) {
            errors.push(InputError {
                origin: origin.to_string(),
                object: format!("Service {}", a.id),
                field: "metadata.name".into(),
                message: "defined twice".into(),
            });
            continue;
        }
        accepted.push(Box::new(a));
    }
    accepted.sort_by(|a, b| a.id.cmp(&b.id));

    // ClusterIPs: explicit ones first (each must be unique), then stable allocations.
    let mut used: HashMap<IpAddr, ServiceId> = HashMap::new();
    let mut first_origin: HashMap<IpAddr, &Origin> = HashMap::new();
    for a in &accepted {
        for ip in &a.ips {
            if let Some(other) = used.get(ip) {
                errors.push(InputError {
                    origin: a.origin.to_string(),
                    object: format!("Service {}", a.id),
                    field: "spec.clusterIP".into(),
                    message: format!(
                        "ClusterIP {ip} is already used by Service {other} ({}); every ClusterIP must be unique",
                        first_origin[ip]
                    ),
                });
            } else {
                used.insert(*ip, a.id.clone());
                first_origin.insert(*ip, a.origin);
            }
        }
    }
    for a in &mut accepted {
        for family in a.to_allocate.clone() {
            let cidr = opts.service_cidrs.iter().find(|c| Family::of(&c.addr()) == family);
            match cidr.and_then(|c| allocate(c, &a.id, &used)) {
                Some(ip) => {
                    used.insert(ip, a.id.clone());
                    a.ips.push(ip);
                }
                None => errors.push(InputError {
                    origin: a.origin.to_string(),
                    object: format!("Service {}", a.id),
                    field: "spec.clusterIP".into(),
                    message: format!("no free {family:?} address in --service-cluster-ip-range"),
                }),
            }
        }
        a.ips.sort_by_key(Family::of);
    }
    assign_node_ports(&mut accepted, &opts.node_port_range, &mut errors);

    // Keyed by borrowed names: at 44,000 Services, owned keys cost 5 MiB at resolve's peak.
    let mut slices_by_service: HashMap<(&str, &str), Vec<&SliceEntry>> = HashMap::new();
    for entry in &objects.slices {
        let (origin, slice) = entry;
        // An invalid namespace was reported above.
        if let Some(declared) = &declared
            && let ns = ns_of(&slice.metadata)
            && is_dns1123_label(&ns)
            && !declared.contains(&ns)
        {
            errors.push(InputError {
                origin: origin.to_string(),
                object: object_name("EndpointSlice", &slice.metadata),
                field: "metadata.namespace".into(),
                message: format!("namespace {ns:?} is not declared by any Namespace object"),
            });
        }
        if let Some(svc) = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) {
            let ns = slice.metadata.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default");
            slices_by_service.entry((ns, svc.as_str())).or_default().push(entry);
        }
    }

    let mut services = Vec::with_capacity(accepted.len());
    for a in accepted {
        let mut a = *a;
        // Pushed one by one: room for four addresses where there are one or two.
        a.ips.shrink_to_fit();
        let slices = slices_by_service.get(&(a.id.namespace.as_str(), a.id.name.as_str())).map(Vec::as_slice);
        let selector = a.svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
        let mut ports = Vec::with_capacity(a.ports.len());
        for (mut port, target) in a.ports {
            port.endpoints = endpoints_of(objects, &a.id, slices, &selector, Some((&port, &target)), &mut errors);
            port.endpoints.sort();
            // Collected without a size hint: without this, a Service of one endpoint keeps room
            // for four (14 MiB at 44,000 Services).
            port.endpoints.shrink_to_fit();
            ports.push(port);
        }
        let service = Service {
            internal_local: a.internal_local,
            affinity: a.affinity,
            external: a.external,
            ..Service::new(a.id.clone(), a.ips, ports)
        };
        services.push((a.id, service));
    }
    // Built from the sorted list at once, the map's nodes are full; inserted one by one (in
    // order), each node kept room for five more: 10 MiB at 44,000 Services, alive all sync long.
    let mut snapshot = Snapshot { services: services.into_iter().collect() };
    claim_external_addresses(&mut snapshot);
    if errors.is_empty() { Ok(snapshot) } else { Err(InputErrors(errors)) }
}

/// The endpoints of Service `id`, from its EndpointSlices, else its legacy Endpoints, else the
/// Pods its selector picks: for one port (with its target port), or with `port` `None` every
/// address whatever the port (a headless Service's names).
fn endpoints_of(
    objects: &Objects,
    id: &ServiceId,
    slices: Option<&[&SliceEntry]>,
    selector: &Map,
    port: Option<(&ServicePort, &Option<IntOrString>)>,
    errors: &mut Vec<InputError>,
) -> Vec<Endpoint> {
    let legacy = || {
        objects
            .endpoints
            .iter()
            .find(|(_, e)| ns_of(&e.metadata) == id.namespace && e.metadata.name.as_deref() == Some(&id.name))
    };
    let any_port =
        ServicePort { name: String::new(), port: 0, protocol: Protocol::Tcp, node_port: None, endpoints: vec![] };
    if let Some(slices) = slices {
        slices.iter().flat_map(|(o, s)| slice_endpoints(o, s, port.map(|p| p.0), errors)).collect()
    } else if let Some((o, e)) = legacy() {
        legacy_endpoints(o, e, port.map(|p| p.0), errors)
    } else if !selector.is_empty() {
        let (port, target) = port.unwrap_or((&any_port, &None));
        pod_endpoints(selector, &id.namespace, &objects.pods, port, target, errors)
    } else {
        Vec::new()
    }
}

/// A headless Service (`clusterIP: None`): what its DNS names answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headless {
    pub id: ServiceId,
    /// Its ports (no endpoints attached): SRV records.
    pub ports: Vec<ServicePort>,
    /// The ready endpoint addresses, sorted, each once.
    pub addresses: Vec<IpAddr>,
}

/// The headless Services (`clusterIP: None`, not ExternalName) of `objects` with their ready
/// endpoint addresses, for cluster DNS; errors in them (or their endpoints) name object and field.
/// Services with invalid names are left to [`resolve`], which reports them.
pub fn headless(objects: &Objects) -> Result<Vec<Headless>, InputErrors> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (origin, svc) in &objects.services {
        let no_spec = ServiceSpec::default();
        let spec = svc.spec.as_ref().unwrap_or(&no_spec);
        let name = svc.metadata.name.clone().unwrap_or_default();
        if spec.cluster_ip.as_deref() != Some("None")
            || spec.type_.as_deref() == Some("ExternalName")
            || !is_dns1035_label(&name)
            || !is_dns1123_label(&ns_of(&svc.metadata))
        {
            continue;
        }
        let id = ServiceId::new(ns_of(&svc.metadata), name);
        let mut errs = Errors { origin, object: format!("Service {id}").into(), list: &mut errors };
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let protocol =
                Protocol::from_k8s(p.protocol.as_deref()).map_err(|e| errs.add(format!("spec.ports[{i}].protocol"), e));
            let number = port_u16(p.port, || format!("spec.ports[{i}].port"), &mut errs);
            if let (Ok(protocol), Some(port)) = (protocol, number) {
                let name = p.name.clone().unwrap_or_default();
                ports.push(ServicePort { name, port, protocol, node_port: None, endpoints: Vec::new() });
            }
        }
        let slices: Vec<&SliceEntry> = objects
            .slices
            .iter()
            .filter(|(_, s)| {
                ns_of(&s.metadata) == id.namespace
                    && s.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) == Some(&id.name)
            })
            .collect();
        let selector = spec.selector.clone().unwrap_or_default();
        let slices = (!slices.is_empty()).then_some(slices.as_slice());
        let endpoints = endpoints_of(objects, &id, slices, &selector, None, &mut errors);
        let mut addresses: Vec<IpAddr> = endpoints.iter().filter(|e| e.ready).map(|e| e.ip).collect();
        addresses.sort();
        addresses.dedup();
        out.push(Headless { id, ports, addresses });
    }
    if errors.is_empty() { Ok(out) } else { Err(InputErrors(errors)) }
}

/// The Service an input error is about: the Service itself, or the one an EndpointSlice or
/// Endpoints object belongs to.
fn owner_of(e: &InputError, objects: &Objects) -> Option<ServiceId> {
    let (kind, name) = e.object.split_once(' ')?;
    let (ns, name) = name.split_once('/')?;
    match kind {
        "Service" | "Endpoints" => Some(ServiceId::new(ns, name)),
        "EndpointSlice" => {
            let slice = objects
                .slices
                .iter()
                .map(|(_, s)| s)
                .find(|s| s.metadata.name.as_deref() == Some(name) && ns_of(&s.metadata) == ns)?;
            let owner = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
            Some(ServiceId::new(ns, owner.clone()))
        }
        _ => None,
    }
}

/// What [`resolve_skipping`] gives: the good Services' snapshot, each error with the Service it is
/// about (if any), and the Services left out.
pub type Skipping = (Snapshot, Vec<(Option<ServiceId>, InputError)>, BTreeSet<ServiceId>);

/// [`resolve`] that skips what is bad instead of failing: every Service an error is about is left
/// out (with its slices), and the rest resolved. Returns the snapshot of the good Services, the
/// errors, and the Services left out. Errors about no Service in particular leave the snapshot
/// empty and are returned with everything skipped.
pub fn resolve_skipping(objects: &Objects, opts: &ResolveOptions) -> Skipping {
    let mut objects = objects.clone();
    let (mut errors, mut skipped) = (Vec::new(), BTreeSet::new());
    // Each round removes at least one Service; a handful of rounds covers errors that only show
    // once others are gone (a ClusterIP clash, say).
    for _ in 0..8 {
        match resolve(&objects, opts) {
            Ok(snapshot) => return (snapshot, errors, skipped),
            Err(InputErrors(errs)) => {
                let owned: Vec<(Option<ServiceId>, InputError)> =
                    errs.into_iter().map(|e| (owner_of(&e, &objects), e)).collect();
                let bad: BTreeSet<ServiceId> = owned.iter().filter_map(|(o, _)| o.clone()).collect();
                let stuck = bad.is_empty() || bad.is_subset(&skipped);
                errors.extend(owned);
                if stuck {
                    break;
                }
                let keep = |meta: &ObjectMeta, owner: Option<&String>| {
                    let id = ServiceId::new(ns_of(meta), owner.cloned().unwrap_or_default());
                    !bad.contains(&id)
                };
                objects.services.retain(|(_, s)| keep(&s.metadata, s.metadata.name.as_ref()));
                objects.endpoints.retain(|(_, s)| keep(&s.metadata, s.metadata.name.as_ref()));
                objects.slices.retain(|(_, s)| {
                    keep(&s.metadata, s.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)))
                });
                skipped.extend(bad);
            }
        }
    }
    let all: BTreeSet<ServiceId> = objects
        .services
        .iter()
        .map(|(_, s)| ServiceId::new(ns_of(&s.metadata), s.metadata.name.clone().unwrap_or_default()))
        .collect();
    skipped.extend(all);
    (Snapshot::default(), errors, skipped)
}

/// Why an address may not be an external or load-balancer IP, as the API server refuses them
/// (validateNonSpecialIP): it would capture the node's own or link traffic.
fn special(ip: &IpAddr) -> Option<&'static str> {
    let link_local = match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    };
    if ip.is_unspecified() {
        Some("may not be unspecified")
    } else if ip.is_loopback() {
        Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
    } else if link_local {
        Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
    } else if ip.is_multicast() {
        Some("may not be a multicast address")
    } else {
        None
    }
}

/// Every dispatch-map entry is held by one Service: a ClusterIP first, then external and
/// load-balancer IPs in Service order. A Service whose external address is taken keeps the rest
/// and reports it as not served (`Service::unserved`), as kube-proxy lets one Service win.
fn claim_external_addresses(snapshot: &mut Snapshot) {
    // Only external and load-balancer addresses can be taken; most clusters have few or none.
    if snapshot.services.values().all(|s| s.external.external_ips.is_empty() && s.external.load_balancer_ips.is_empty())
    {
        return;
    }
    let cluster: HashMap<IpAddr, ServiceId> =
        snapshot.services.values().flat_map(|s| s.cluster_ips.iter().map(|ip| (*ip, s.id.clone()))).collect();
    let mut claimed: HashMap<crate::model::DispatchKey, ServiceId> = HashMap::new();
    for svc in snapshot.services.values_mut() {
        let id = svc.id.clone();
        svc.drop_taken_external(|k| holder_of(&id, cluster.get(&k.0), claimed.get(k)));
        for k in svc.external_keys() {
            claimed.insert(k, id.clone());
        }
    }
}

/// Who holds a dispatch-map entry Service `id` wants, in words ("the ClusterIP of Service
/// a/b"), given the Service whose ClusterIP the entry's address is and the Service already
/// serving the entry, if any.
pub fn holder_of(id: &ServiceId, cluster: Option<&ServiceId>, claimed: Option<&ServiceId>) -> Option<String> {
    match (cluster, claimed) {
        (Some(owner), _) if owner == id => Some("this Service's ClusterIP".into()),
        (Some(owner), _) => Some(format!("the ClusterIP of Service {owner}")),
        (None, Some(owner)) if owner != id => Some(format!("served by Service {owner}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (input, DNS-1123 label, DNS-1035 label, DNS-1123 subdomain, IANA port name)
    const NAMES: &[(&str, bool, bool, bool, bool)] = &[
        ("", false, false, false, false),
        ("a", true, true, true, true),
        ("0", true, false, true, false),
        ("web", true, true, true, true),
        ("web-1", true, true, true, true),
        ("a-b-c", true, true, true, true),
        ("a--b", true, true, true, false),
        ("1abc", true, false, true, true),
        ("123", true, false, true, false),
        ("-a", false, false, false, false),
        ("a-", false, false, false, false),
        ("-", false, false, false, false),
        ("Web", false, false, false, false),
        ("WEB", false, false, false, false),
        ("b/c", false, false, false, false),
        ("a/b", false, false, false, false),
        ("a.b", false, false, true, false),
        ("web.example.com", false, false, true, false),
        (".a", false, false, false, false),
        ("a.", false, false, false, false),
        ("a..b", false, false, false, false),
        ("a.-b", false, false, false, false),
        ("a_b", false, false, false, false),
        ("a b", false, false, false, false),
        (" a", false, false, false, false),
        ("a\n", false, false, false, false),
        ("é", false, false, false, false),
        ("café", false, false, false, false),
        ("ａ", false, false, false, false),
        ("http", true, true, true, true),
        ("abcdefghijklmno", true, true, true, true),
        ("abcdefghijklmnop", true, true, true, false),
    ];

    #[test]
    fn name_rules_match_the_api_server() {
        for &(s, label, l1035, subdomain, port) in NAMES {
            assert_eq!(is_dns1123_label(s), label, "DNS-1123 label {s:?}");
            assert_eq!(is_dns1035_label(s), l1035, "DNS-1035 label {s:?}");
            assert_eq!(is_dns1123_subdomain(s), subdomain, "DNS-1123 subdomain {s:?}");
            assert_eq!(is_port_name(s), port, "port name {s:?}");
        }
    }

    #[test]
    fn name_lengths() {
        let a = |n: usize| "a".repeat(n);
        // Labels: 63 characters, not 64.
        assert!(is_dns1123_label(&a(63)) && is_dns1035_label(&a(63)));
        assert!(!is_dns1123_label(&a(64)) && !is_dns1035_label(&a(64)));
        // Subdomains: 253 in all; Kubernetes does not limit each part to 63.
        assert!(is_dns1123_subdomain(&a(64)));
        assert!(is_dns1123_subdomain(&a(253)));
        assert!(!is_dns1123_subdomain(&a(254)));
        let dotted = format!("{}.{}", a(126), a(126));
        assert_eq!(dotted.len(), 253);
        assert!(is_dns1123_subdomain(&dotted));
        assert!(!is_dns1123_subdomain(&format!("{dotted}a")));
        // Port names: 15.
        assert!(is_port_name(&a(15)) && !is_port_name(&a(16)));
        // Length counts bytes; multi-byte characters fail the character set anyway.
        assert!(!is_dns1123_label(&"é".repeat(10)));
    }

    #[test]
    fn refusals_name_the_rule() {
        assert_eq!(
            NameRule::Dns1035Label.refuse("b/c"),
            "\"b/c\" is not a valid DNS-1035 label (lowercase letters, digits and '-', starting with a letter, \
             ending with a letter or digit, at most 63 characters)"
        );
        assert!(NameRule::Dns1123Label.refuse("A").starts_with("\"A\" is not a valid DNS-1123 label ("));
        assert!(NameRule::Dns1123Subdomain.refuse("a_b").starts_with("\"a_b\" is not a valid DNS-1123 subdomain ("));
    }

    /// Services (or other objects) from YAML, resolved.
    fn resolve_yaml(yaml: &str, opts: &ResolveOptions) -> Result<Snapshot, InputErrors> {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        crate::source::manifest::parse_into("t.yaml", yaml, &mut objects, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        resolve(&objects, opts)
    }

    /// A Service `name` with `body` (its `spec:` and maybe `status:` lines).
    fn service(name: &str, body: &str) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n{body}\n")
    }

    /// The external side of a resolved Service, compactly.
    fn summary(svc: &Service) -> String {
        let ports: Vec<String> = svc.ports.iter().map(|p| p.node_port.map_or("-".into(), |n| n.to_string())).collect();
        let e = &svc.external;
        let list = |v: Vec<String>| v.join(",");
        format!(
            "np={} ext={} lb={} from={} local={} hc={}",
            ports.join(","),
            list(e.external_ips.iter().map(|i| i.to_string()).collect()),
            list(e.load_balancer_ips.iter().map(|i| i.to_string()).collect()),
            list(e.source_ranges.iter().map(|i| i.to_string()).collect()),
            e.local,
            e.health_check_node_port.map_or("-".into(), |n| n.to_string())
        )
    }

    fn one(body: &str) -> Service {
        let s = resolve_yaml(&service("web", body), &ResolveOptions::default()).unwrap();
        s.services[&ServiceId::new("default", "web")].clone()
    }

    #[test]
    fn external_fields_are_read_as_kube_proxy_reads_them() {
        // (Service body, summary)
        let cases = [
            ("spec: {ports: [{port: 80}]}", "np=- ext= lb= from= local=false hc=-"),
            // ClusterIP: nodePort, source ranges, status and Local (without external IPs) ignored
            (
                "spec: {externalTrafficPolicy: Local, loadBalancerSourceRanges: [nonsense], ports: [{port: 80, nodePort: 30080}]}\n\
                 status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}",
                "np=- ext= lb= from= local=false hc=-",
            ),
            // External IPs on any type, Local applies to them; duplicates collapse
            (
                "spec: {externalIPs: [203.0.113.10, \"2001:db8::10\", 203.0.113.10], externalTrafficPolicy: Local, ports: [{port: 80}]}",
                "np=- ext=203.0.113.10,2001:db8::10 lb= from= local=true hc=-",
            ),
            (
                "spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}",
                "np=30080 ext= lb= from= local=false hc=-",
            ),
            // NodePort + Local: no health-check port (LoadBalancer only), no load-balancer IPs
            (
                "spec: {type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 31000, ports: [{port: 80, nodePort: 30080}]}\n\
                 status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}",
                "np=30080 ext= lb= from= local=true hc=-",
            ),
            (
                "spec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 31000, \
                 loadBalancerSourceRanges: [10.1.2.3/8, \" 192.168.0.0/16 \", 10.0.0.0/8], ports: [{port: 80, nodePort: 30080}]}\n\
                 status: {loadBalancer: {ingress: [{ip: 198.51.100.7}, {ip: 198.51.100.8, ipMode: Proxy}, \
                 {hostname: lb.example.com}, {ip: \"2001:db8::7\", ipMode: VIP}, {ip: 198.51.100.7}]}}",
                "np=30080 ext= lb=198.51.100.7,2001:db8::7 from=10.0.0.0/8,192.168.0.0/16 local=true hc=31000",
            ),
            // LoadBalancer + Cluster: no health-check port even when named
            (
                "spec: {type: LoadBalancer, healthCheckNodePort: 31000, ports: [{port: 80, nodePort: 30080}]}",
                "np=30080 ext= lb= from= local=false hc=-",
            ),
            // allocateLoadBalancerNodePorts false: a port without nodePort has none
            (
                "spec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false, ports: [{name: a, port: 80}, {name: b, port: 81, nodePort: 30081}]}",
                "np=-,30081 ext= lb= from= local=false hc=-",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(summary(&one(body)), want, "{body}");
        }
    }

    #[test]
    fn external_fields_name_the_bad_field_all_at_once() {
        // (Service body, the fields refused)
        let cases: &[(&str, &[&str])] = &[
            ("spec: {type: Balanced, ports: [{port: 80}]}", &["spec.type"]),
            ("spec: {type: NodePort, ports: [{port: 80, nodePort: 70000}]}", &["spec.ports[0].nodePort"]),
            ("spec: {type: LoadBalancer, ports: [{port: 80, nodePort: -1}]}", &["spec.ports[0].nodePort"]),
            ("spec: {externalIPs: [203.0.113.1, example.com], ports: [{port: 80}]}", &["spec.externalIPs[1]"]),
            (
                "spec: {type: LoadBalancer, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 1.2.3}]}}",
                &["status.loadBalancer.ingress[0].ip"],
            ),
            (
                "spec: {type: LoadBalancer, loadBalancerSourceRanges: [10.0.0.0/8, 10.0.0.1, 10.0.0.0/33], ports: [{port: 80}]}",
                &["spec.loadBalancerSourceRanges[1]", "spec.loadBalancerSourceRanges[2]"],
            ),
            ("spec: {externalTrafficPolicy: Nearby, ports: [{port: 80}]}", &["spec.externalTrafficPolicy"]),
            (
                "spec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 65536, ports: [{port: 80}]}",
                &["spec.healthCheckNodePort"],
            ),
            (
                "spec: {type: NodePort, externalIPs: [x], externalTrafficPolicy: Nearby, ports: [{name: a, port: 80, nodePort: 0}, {name: b, port: 81, nodePort: 99999}]}",
                &["spec.ports[1].nodePort", "spec.externalIPs[0]", "spec.externalTrafficPolicy"],
            ),
        ];
        for (body, fields) in cases {
            let err = resolve_yaml(&service("bad", body), &ResolveOptions::default()).unwrap_err();
            let got: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
            assert_eq!(&got, fields, "{body}\n{err}");
            assert!(err.0.iter().all(|e| e.object == "Service default/bad"), "{err}");
        }
        // A bad address on a proxied (ipMode: Proxy) entry is not used, so not checked.
        one(
            "spec: {type: LoadBalancer, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: x, ipMode: Proxy}]}}",
        );
    }

    #[test]
    fn node_port_allocation_probes_past_used_ports_and_wraps() {
        let range = 30000..=30009;
        let key = "default/web/http/tcp";
        let first = allocate_node_port(&range, key, &BTreeSet::new()).unwrap();
        assert!(range.contains(&first));
        assert_eq!(allocate_node_port(&range, key, &BTreeSet::new()), Some(first), "stable");
        let next = |n: u16| if n == 30009 { 30000 } else { n + 1 };
        // (used, expected)
        let cases = [
            (vec![], Some(first)),
            (vec![first], Some(next(first))),
            (vec![first, next(first)], Some(next(next(first)))),
            (vec![next(first)], Some(first)),
            ((30000..=30009).collect(), None),
        ];
        for (used, want) in cases {
            assert_eq!(allocate_node_port(&range, key, &used.iter().copied().collect()), want, "{used:?}");
        }
        // Degenerate ranges allocate nothing.
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 30010..=30000;
        assert_eq!(allocate_node_port(&empty, key, &BTreeSet::new()), None);
        assert_eq!(allocate_node_port(&(0..=0), key, &BTreeSet::new()), None);
        assert_eq!(allocate_node_port(&(30000..=30000), key, &BTreeSet::new()), Some(30000));
    }

    fn narrow() -> ResolveOptions {
        ResolveOptions { node_port_range: 30000..=30099, ..ResolveOptions::default() }
    }

    #[test]
    fn node_ports_are_allocated_stably_uniquely_within_the_range() {
        let yaml: String = (0..40)
            .map(|i| {
                service(
                    &format!("s{i}"),
                    "spec: {type: NodePort, ports: [{name: a, port: 80}, {name: b, port: 80, protocol: UDP}]}",
                )
            })
            .collect();
        let a = resolve_yaml(&yaml, &narrow()).unwrap();
        let b = resolve_yaml(&yaml, &narrow()).unwrap();
        assert_eq!(a, b);
        let ports: Vec<u16> = a.services.values().flat_map(|s| &s.ports).map(|p| p.node_port.unwrap()).collect();
        assert_eq!(ports.len(), 80);
        assert!(ports.iter().all(|n| narrow().node_port_range.contains(n)), "{ports:?}");
        assert_eq!(ports.iter().collect::<BTreeSet<_>>().len(), 80, "allocations never share a number");
        // Adding a Service (sorted last) moves none of the others.
        let more = resolve_yaml(
            &format!("{yaml}{}", service("zzz", "spec: {type: NodePort, ports: [{port: 80}]}")),
            &narrow(),
        )
        .unwrap();
        for (id, svc) in &a.services {
            assert_eq!(more.services[id], *svc);
        }
    }

    #[test]
    fn explicit_node_ports_win_over_allocations() {
        // Where "a" would land alone; "b" (sorted after it) asks for that port explicitly.
        let alone = resolve_yaml(&service("a", "spec: {type: NodePort, ports: [{port: 80}]}"), &narrow()).unwrap();
        let hashed = alone.services[&ServiceId::new("default", "a")].ports[0].node_port.unwrap();
        let yaml = format!(
            "{}{}",
            service("a", "spec: {type: NodePort, ports: [{port: 80}]}"),
            service("b", &format!("spec: {{type: NodePort, ports: [{{port: 80, nodePort: {hashed}}}]}}"))
        );
        let s = resolve_yaml(&yaml, &narrow()).unwrap();
        let np = |n: &str| s.services[&ServiceId::new("default", n)].ports[0].node_port.unwrap();
        assert_eq!(np("b"), hashed);
        assert_ne!(np("a"), hashed);
        assert!(narrow().node_port_range.contains(&np("a")));
        // An explicit port outside the range is the user's (or the API server's) business.
        assert_eq!(
            summary(&one("spec: {type: NodePort, ports: [{port: 80, nodePort: 8080}]}")),
            "np=8080 ext= lb= from= local=false hc=-"
        );
    }

    #[test]
    fn health_check_node_ports_are_allocated_only_for_load_balancer_local() {
        // (Service body, gets a health-check port)
        let cases = [
            ("spec: {type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]}", true),
            (
                "spec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 0, ports: [{port: 80}]}",
                true,
            ),
            ("spec: {type: LoadBalancer, ports: [{port: 80}]}", false),
            ("spec: {type: NodePort, externalTrafficPolicy: Local, ports: [{port: 80}]}", false),
            ("spec: {externalIPs: [203.0.113.1], externalTrafficPolicy: Local, ports: [{port: 80}]}", false),
        ];
        for (body, wanted) in cases {
            let s = resolve_yaml(&service("web", body), &narrow()).unwrap();
            let svc = &s.services[&ServiceId::new("default", "web")];
            let hc = svc.external.health_check_node_port;
            assert_eq!(hc.is_some(), wanted, "{body}");
            if let Some(hc) = hc {
                assert!(narrow().node_port_range.contains(&hc), "{body}: {hc}");
                assert_ne!(Some(hc), svc.ports[0].node_port, "{body}");
            }
        }
    }

    #[test]
    fn node_ports_used_twice_name_both_services() {
        let np = |name: &str, ports: &str| service(name, &format!("spec: {{type: NodePort, ports: [{ports}]}}"));
        let lb_local = |name: &str, hc: u16| {
            service(
                name,
                &format!(
                    "spec: {{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: {hc}, ports: [{{port: 80, nodePort: 30500}}]}}"
                ),
            )
        };
        // (objects, the errors)
        let cases: Vec<(String, Vec<&str>)> = vec![
            (
                format!("{}{}", np("b", "{port: 80, nodePort: 30080}"), np("a", "{port: 81, nodePort: 30080}")),
                vec![
                    "t.yaml (document 1): Service default/b: spec.ports[0].nodePort: nodePort 30080/tcp is already used \
                     by Service default/a (spec.ports[0].nodePort, t.yaml (document 2)); every node port must be unique",
                ],
            ),
            // Same number, other protocol: fine.
            (
                format!(
                    "{}{}",
                    np("a", "{port: 80, nodePort: 30080}"),
                    np("b", "{port: 80, nodePort: 30080, protocol: UDP}")
                ),
                vec![],
            ),
            (
                np("a", "{name: x, port: 80, nodePort: 30080}, {name: y, port: 81, nodePort: 30080}"),
                vec![
                    "t.yaml (document 1): Service default/a: spec.ports[1].nodePort: nodePort 30080/tcp is already used \
                     by Service default/a (spec.ports[0].nodePort, t.yaml (document 1)); every node port must be unique",
                ],
            ),
            // A health-check port is TCP: it collides with a TCP node port, not a UDP one.
            (
                format!("{}{}", np("a", "{port: 80, nodePort: 31000}"), lb_local("b", 31000)),
                vec![
                    "t.yaml (document 2): Service default/b: spec.healthCheckNodePort: healthCheckNodePort 31000/tcp is \
                     already used by Service default/a (spec.ports[0].nodePort, t.yaml (document 1)); every node port \
                     must be unique",
                ],
            ),
            (format!("{}{}", np("a", "{port: 80, nodePort: 31000, protocol: UDP}"), lb_local("b", 31000)), vec![]),
            (
                format!("{}{}", lb_local("a", 30500), ""),
                vec![
                    "t.yaml (document 1): Service default/a: spec.healthCheckNodePort: healthCheckNodePort 30500/tcp is \
                     already used by Service default/a (spec.ports[0].nodePort, t.yaml (document 1)); every node port \
                     must be unique",
                ],
            ),
            // Nothing left to allocate: every problem at once.
            (
                format!("{}{}", np("a", "{port: 80}"), np("b", "{name: x, port: 80}, {name: y, port: 81}")),
                vec![
                    "t.yaml (document 2): Service default/b: spec.ports[0].nodePort: no free node port in the node port \
                     range 30000-30000",
                    "t.yaml (document 2): Service default/b: spec.ports[1].nodePort: no free node port in the node port \
                     range 30000-30000",
                ],
            ),
        ];
        let opts = ResolveOptions { node_port_range: 30000..=30000, ..ResolveOptions::default() };
        for (yaml, want) in cases {
            let got = match resolve_yaml(&yaml, &opts) {
                Ok(_) => Vec::new(),
                Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
            };
            assert_eq!(got, want, "{yaml}");
        }
    }
}
