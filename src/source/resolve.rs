//! Kubernetes objects -> [`Snapshot`]: which Services to serve, their ClusterIPs, and the
//! endpoints behind each port (EndpointSlices, else legacy Endpoints, else the Pods the selector
//! picks, as the EndpointSlice controller would). Every problem is reported with its origin,
//! object and field; any problem means no snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{InputError, InputErrors, Objects, Origin};
use crate::model::{Affinity, Endpoint, Family, MAX_WEIGHT, Protocol, Service, ServiceId, ServicePort, Snapshot};
use crate::ruleset::fnv1a;

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// Ranges ClusterIPs are allocated from for Services that do not name one.
    pub service_cidrs: Vec<IpNet>,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions { service_cidrs: vec!["10.96.0.0/12".parse().unwrap()] }
    }
}

struct Errors<'a> {
    origin: &'a Origin,
    object: String,
    list: &'a mut Vec<InputError>,
}

impl Errors<'_> {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(InputError {
            origin: self.origin.to_string(),
            object: self.object.clone(),
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

fn port_u16(value: i32, field: &str, errs: &mut Errors<'_>) -> Option<u16> {
    if (1..=65535).contains(&value) {
        Some(value as u16)
    } else {
        errs.add(field, format!("port {value} is out of range 1-65535"));
        None
    }
}

/// Annotation weighting every endpoint of an EndpointSlice (or, in manifest mode, a Pod).
pub const ANNOTATION_WEIGHT: &str = "nftproxy.io/weight";

/// The `nftproxy.io/weight` annotation: 0..=1000, default 1.
fn weight_of(annotations: Option<&BTreeMap<String, String>>, errs: &mut Errors<'_>) -> u32 {
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
}

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
    let mut errs = Errors { origin, object: format!("Service {id}"), list: errors };
    let before = errs.list.len();
    check_meta(&svc.metadata, "Service", NameRule::Dns1035Label, &mut errs);
    let spec = svc.spec.clone().unwrap_or_default();

    let mut ips = Vec::new();
    let listed: Vec<(String, String)> = match &spec.cluster_ips {
        Some(list) if !list.is_empty() => {
            list.iter().enumerate().map(|(i, s)| (format!("spec.clusterIPs[{i}]"), s.clone())).collect()
        }
        _ => spec.cluster_ip.iter().filter(|s| !s.is_empty()).map(|s| ("spec.clusterIP".into(), s.clone())).collect(),
    };
    for (field, text) in listed {
        match text.parse::<IpAddr>() {
            Ok(ip) if ips.iter().any(|o: &IpAddr| Family::of(o) == Family::of(&ip)) => {
                errs.add(field, format!("{ip} is a second address of the same family"))
            }
            Ok(ip) => ips.push(ip),
            Err(_) => errs.add(field, format!("{text:?} is not an IP address")),
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

    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let specs = spec.ports.unwrap_or_default();
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
        let port = port_u16(p.port, &field("port"), &mut errs);
        match &p.target_port {
            Some(IntOrString::Int(t)) => {
                port_u16(*t, &field("targetPort"), &mut errs);
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
            let sp = ServicePort { name, port, protocol, node_port: None, endpoints: Vec::new() };
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
            let timeout = spec.session_affinity_config.and_then(|c| c.client_ip).and_then(|c| c.timeout_seconds);
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
    if errs.list.len() > before {
        return None;
    }
    Some(Accepted { origin, svc, id, ips, to_allocate, ports, internal_local, affinity })
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

fn slice_endpoints(
    origin: &Origin,
    slice: &EndpointSlice,
    port: &ServicePort,
    errors: &mut Vec<InputError>,
) -> Vec<Endpoint> {
    let mut errs = Errors { origin, object: object_name("EndpointSlice", &slice.metadata), list: errors };
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        // FQDN slices are not proxied.
        _ => return Vec::new(),
    };
    let matching = slice.ports.iter().flatten().enumerate().find(|(_, p)| {
        p.name.clone().unwrap_or_default() == port.name
            && Protocol::from_k8s(p.protocol.as_deref()).ok() == Some(port.protocol)
    });
    let Some((pi, slice_port)) = matching else {
        return Vec::new();
    };
    let Some(target) = slice_port.port.and_then(|p| port_u16(p, &format!("ports[{pi}].port"), &mut errs)) else {
        return Vec::new();
    };
    let weight = weight_of(slice.metadata.annotations.as_ref(), &mut errs);
    let mut out = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let hints = ep.hints.clone().unwrap_or_default();
        let zone_hints: Vec<String> = hints.for_zones.iter().flatten().map(|z| z.name.clone()).collect();
        let node_hints: Vec<String> = hints.for_nodes.iter().flatten().map(|n| n.name.clone()).collect();
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

fn legacy_endpoints(
    origin: &Origin,
    eps: &Endpoints,
    port: &ServicePort,
    errors: &mut Vec<InputError>,
) -> Vec<Endpoint> {
    let mut errs = Errors { origin, object: object_name("Endpoints", &eps.metadata), list: errors };
    let mut out = Vec::new();
    for (si, subset) in eps.subsets.iter().flatten().enumerate() {
        let Some(p) = subset.ports.iter().flatten().find(|p| {
            p.name.clone().unwrap_or_default() == port.name
                && Protocol::from_k8s(p.protocol.as_deref()).ok() == Some(port.protocol)
        }) else {
            continue;
        };
        let Some(target) = port_u16(p.port, &format!("subsets[{si}].ports"), &mut errs) else {
            continue;
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
    selector: &BTreeMap<String, String>,
    namespace: &str,
    pods: &[(Origin, Pod)],
    port: &ServicePort,
    target: &Option<IntOrString>,
    errors: &mut Vec<InputError>,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (origin, pod) in pods {
        if ns_of(&pod.metadata) != namespace {
            continue;
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
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
        let weight =
            weight_of(pod.metadata.annotations.as_ref(), &mut Errors { origin, object: name.clone(), list: errors });
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
        let mut errs = Errors { origin, object: format!("Namespace {name}"), list: &mut errors };
        if name.is_empty() {
            errs.add("metadata.name", "a Namespace needs a name");
        } else if !is_dns1123_label(name) {
            errs.add("metadata.name", NameRule::Dns1123Label.refuse(name));
        }
    }
    let metas = objects.slices.iter().map(|(o, s)| (o, "EndpointSlice", &s.metadata));
    let metas = metas.chain(objects.endpoints.iter().map(|(o, e)| (o, "Endpoints", &e.metadata)));
    for (origin, kind, meta) in metas.chain(objects.pods.iter().map(|(o, p)| (o, "Pod", &p.metadata))) {
        let mut errs = Errors { origin, object: object_name(kind, meta), list: &mut errors };
        check_meta(meta, kind, NameRule::Dns1123Subdomain, &mut errs);
    }
    let declared: Option<BTreeSet<String>> = (!objects.namespaces.is_empty()).then(|| {
        let mut set: BTreeSet<String> =
            objects.namespaces.iter().filter_map(|(_, n)| n.metadata.name.clone()).collect();
        set.extend(["default".to_string(), "kube-system".to_string()]);
        set
    });

    let mut accepted: Vec<Accepted<'_>> = Vec::new();
    let mut seen = BTreeSet::new();
    for (origin, svc) in &objects.services {
        if !is_proxied(svc) {
            let mut errs = Errors { origin, object: object_name("Service", &svc.metadata), list: &mut errors };
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
        accepted.push(a);
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

    let mut slices_by_service: HashMap<(String, String), Vec<&(Origin, EndpointSlice)>> = HashMap::new();
    for entry in &objects.slices {
        let (origin, slice) = entry;
        let ns = ns_of(&slice.metadata);
        // An invalid namespace was reported above.
        if let Some(declared) = &declared
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
            slices_by_service.entry((ns, svc.clone())).or_default().push(entry);
        }
    }

    let mut snapshot = Snapshot::default();
    for a in accepted {
        let key = (a.id.namespace.clone(), a.id.name.clone());
        let slices = slices_by_service.get(&key);
        let legacy = objects
            .endpoints
            .iter()
            .find(|(_, e)| ns_of(&e.metadata) == a.id.namespace && e.metadata.name.as_deref() == Some(&a.id.name));
        let selector = a.svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
        let mut ports = Vec::new();
        for (mut port, target) in a.ports {
            port.endpoints = if let Some(slices) = slices {
                slices.iter().flat_map(|(o, s)| slice_endpoints(o, s, &port, &mut errors)).collect()
            } else if let Some((o, e)) = legacy {
                legacy_endpoints(o, e, &port, &mut errors)
            } else if !selector.is_empty() {
                pod_endpoints(&selector, &a.id.namespace, &objects.pods, &port, &target, &mut errors)
            } else {
                Vec::new()
            };
            port.endpoints.sort();
            ports.push(port);
        }
        let service = Service {
            internal_local: a.internal_local,
            affinity: a.affinity,
            ..Service::new(a.id.clone(), a.ips, ports)
        };
        snapshot.services.insert(a.id, service);
    }
    if errors.is_empty() { Ok(snapshot) } else { Err(InputErrors(errors)) }
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
}
