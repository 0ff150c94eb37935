//! The Kubernetes objects as nftproxy reads them: only the fields [`super::resolve`] and cluster
//! DNS look at, with k8s-openapi's names and shapes. k8s-openapi's structs hold every field of
//! the API (an empty `Service` is about 840 bytes before any string), which at 44,000 Services
//! was most of the peak memory of a `--sync-once`; these hold a few.
//!
//! Read as k8s-openapi reads them, so that errors name the same field with the same words:
//! unknown fields are skipped, a missing or `null` field is its default (k8s-openapi reads even
//! required fields that way), and a type names itself in errors as k8s-openapi's does. Unlike
//! k8s-openapi, fields nobody reads are not type-checked. The API mode's reflectors keep
//! k8s-openapi's objects (kube-rs needs them); they are converted here (`From`) when read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
pub use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Deserializer};

/// A field k8s-openapi calls required: absent or `null` reads as its default.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// A string map (labels, annotations, a selector) as a sorted list: most objects carry one or
/// two entries, for which a `BTreeMap` allocates a node with room for eleven (about 550 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Map(Vec<(String, String)>);

impl Map {
    pub fn get(&self, key: &str) -> Option<&String> {
        let i = self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok()?;
        Some(&self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for Map {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a BTreeMap: the same errors, and the last of repeated keys wins, as before.
        Ok(Map(BTreeMap::<String, String>::deserialize(d)?.into_iter().collect()))
    }
}

impl From<&BTreeMap<String, String>> for Map {
    fn from(m: &BTreeMap<String, String>) -> Self {
        Map(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

type Labels = Option<Map>;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "ObjectMeta")]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Labels,
    pub annotations: Labels,
    pub deletion_timestamp: Option<Time>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "Service")]
pub struct Service {
    #[serde(deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "ServiceSpec")]
pub struct ServiceSpec {
    pub allocate_load_balancer_node_ports: Option<bool>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    pub external_traffic_policy: Option<String>,
    pub health_check_node_port: Option<i32>,
    pub internal_traffic_policy: Option<String>,
    pub ip_families: Option<Vec<String>>,
    pub ip_family_policy: Option<String>,
    pub load_balancer_source_ranges: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
    pub selector: Labels,
    pub session_affinity: Option<String>,
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "ServicePort")]
pub struct ServicePort {
    pub name: Option<String>,
    pub node_port: Option<i32>,
    #[serde(deserialize_with = "nullable")]
    pub port: i32,
    pub protocol: Option<String>,
    pub target_port: Option<IntOrString>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "SessionAffinityConfig")]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    pub client_ip: Option<ClientIPConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "ClientIPConfig")]
pub struct ClientIPConfig {
    pub timeout_seconds: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "ServiceStatus")]
pub struct ServiceStatus {
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "LoadBalancerStatus")]
pub struct LoadBalancerStatus {
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "LoadBalancerIngress")]
pub struct LoadBalancerIngress {
    pub ip: Option<String>,
    pub ip_mode: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "EndpointSlice")]
pub struct EndpointSlice {
    #[serde(deserialize_with = "nullable")]
    pub address_type: String,
    #[serde(deserialize_with = "nullable")]
    pub endpoints: Vec<Endpoint>,
    #[serde(deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "Endpoint")]
pub struct Endpoint {
    #[serde(deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    pub hints: Option<EndpointHints>,
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "EndpointConditions")]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "EndpointHints")]
pub struct EndpointHints {
    pub for_nodes: Option<Vec<ForNode>>,
    pub for_zones: Option<Vec<ForZone>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "ForNode")]
pub struct ForNode {
    #[serde(deserialize_with = "nullable")]
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "ForZone")]
pub struct ForZone {
    #[serde(deserialize_with = "nullable")]
    pub name: String,
}

/// An EndpointSlice's port (the legacy Endpoints' port has the same fields, `port` required).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "EndpointPort")]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "Endpoints")]
pub struct Endpoints {
    #[serde(deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    pub subsets: Option<Vec<EndpointSubset>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "EndpointSubset")]
pub struct EndpointSubset {
    pub addresses: Option<Vec<EndpointAddress>>,
    pub not_ready_addresses: Option<Vec<EndpointAddress>>,
    pub ports: Option<Vec<CoreEndpointPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "EndpointAddress")]
pub struct EndpointAddress {
    #[serde(deserialize_with = "nullable")]
    pub ip: String,
    pub node_name: Option<String>,
}

/// The legacy Endpoints' port.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "EndpointPort")]
pub struct CoreEndpointPort {
    pub name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub port: i32,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "Pod")]
pub struct Pod {
    #[serde(deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "PodSpec")]
pub struct PodSpec {
    #[serde(deserialize_with = "nullable")]
    pub containers: Vec<Container>,
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "Container")]
pub struct Container {
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "ContainerPort")]
pub struct ContainerPort {
    #[serde(deserialize_with = "nullable")]
    pub container_port: i32,
    pub name: Option<String>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "PodStatus")]
pub struct PodStatus {
    pub conditions: Option<Vec<PodCondition>>,
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIP>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "PodCondition")]
pub struct PodCondition {
    #[serde(deserialize_with = "nullable")]
    pub status: String,
    #[serde(rename = "type", deserialize_with = "nullable")]
    pub type_: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "PodIP")]
pub struct PodIP {
    #[serde(deserialize_with = "nullable")]
    pub ip: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "Namespace")]
pub struct Namespace {
    #[serde(deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "Node")]
pub struct Node {
    #[serde(deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    pub status: Option<NodeStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "NodeStatus")]
pub struct NodeStatus {
    pub addresses: Option<Vec<NodeAddress>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, expecting = "NodeAddress")]
pub struct NodeAddress {
    #[serde(deserialize_with = "nullable")]
    pub address: String,
    #[serde(rename = "type", deserialize_with = "nullable")]
    pub type_: String,
}

// From the API's objects (kube-rs reflectors hold k8s-openapi's types).

fn list<A, B: for<'a> From<&'a A>>(v: &Option<Vec<A>>) -> Option<Vec<B>> {
    v.as_ref().map(|v| v.iter().map(B::from).collect())
}

impl From<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> for ObjectMeta {
    fn from(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        ObjectMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            labels: m.labels.as_ref().map(Map::from),
            annotations: m.annotations.as_ref().map(Map::from),
            deletion_timestamp: m.deletion_timestamp.clone(),
        }
    }
}

impl From<&core::Service> for Service {
    fn from(s: &core::Service) -> Self {
        Service {
            metadata: (&s.metadata).into(),
            spec: s.spec.as_ref().map(|s| ServiceSpec {
                allocate_load_balancer_node_ports: s.allocate_load_balancer_node_ports,
                cluster_ip: s.cluster_ip.clone(),
                cluster_ips: s.cluster_ips.clone(),
                external_ips: s.external_ips.clone(),
                external_traffic_policy: s.external_traffic_policy.clone(),
                health_check_node_port: s.health_check_node_port,
                internal_traffic_policy: s.internal_traffic_policy.clone(),
                ip_families: s.ip_families.clone(),
                ip_family_policy: s.ip_family_policy.clone(),
                load_balancer_source_ranges: s.load_balancer_source_ranges.clone(),
                ports: list(&s.ports),
                selector: s.selector.as_ref().map(Map::from),
                session_affinity: s.session_affinity.clone(),
                session_affinity_config: s.session_affinity_config.as_ref().map(|c| SessionAffinityConfig {
                    client_ip: c.client_ip.as_ref().map(|c| ClientIPConfig { timeout_seconds: c.timeout_seconds }),
                }),
                type_: s.type_.clone(),
            }),
            status: s.status.as_ref().map(|s| ServiceStatus {
                load_balancer: s.load_balancer.as_ref().map(|l| LoadBalancerStatus {
                    ingress: l.ingress.as_ref().map(|i| {
                        i.iter().map(|i| LoadBalancerIngress { ip: i.ip.clone(), ip_mode: i.ip_mode.clone() }).collect()
                    }),
                }),
            }),
        }
    }
}

impl From<&core::ServicePort> for ServicePort {
    fn from(p: &core::ServicePort) -> Self {
        ServicePort {
            name: p.name.clone(),
            node_port: p.node_port,
            port: p.port,
            protocol: p.protocol.clone(),
            target_port: p.target_port.clone(),
        }
    }
}

impl From<&discovery::EndpointSlice> for EndpointSlice {
    fn from(s: &discovery::EndpointSlice) -> Self {
        EndpointSlice {
            address_type: s.address_type.clone(),
            endpoints: s.endpoints.iter().map(Endpoint::from).collect(),
            metadata: (&s.metadata).into(),
            ports: list(&s.ports),
        }
    }
}

impl From<&discovery::Endpoint> for Endpoint {
    fn from(e: &discovery::Endpoint) -> Self {
        Endpoint {
            addresses: e.addresses.clone(),
            conditions: e.conditions.as_ref().map(|c| EndpointConditions {
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
            }),
            hints: e.hints.as_ref().map(|h| EndpointHints {
                for_nodes: h.for_nodes.as_ref().map(|v| v.iter().map(|n| ForNode { name: n.name.clone() }).collect()),
                for_zones: h.for_zones.as_ref().map(|v| v.iter().map(|z| ForZone { name: z.name.clone() }).collect()),
            }),
            node_name: e.node_name.clone(),
        }
    }
}

impl From<&discovery::EndpointPort> for EndpointPort {
    fn from(p: &discovery::EndpointPort) -> Self {
        EndpointPort { name: p.name.clone(), port: p.port, protocol: p.protocol.clone() }
    }
}

impl From<&core::Node> for Node {
    fn from(n: &core::Node) -> Self {
        Node {
            metadata: (&n.metadata).into(),
            status: n.status.as_ref().map(|s| NodeStatus {
                addresses: s.addresses.as_ref().map(|a| {
                    a.iter().map(|a| NodeAddress { address: a.address.clone(), type_: a.type_.clone() }).collect()
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same YAML read by k8s-openapi and here gives the same fields.
    #[test]
    fn api_objects_convert_to_what_the_manifest_reader_reads() {
        let service = r#"{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "apps", "labels": {"a": "b"}, "uid": "x"},
            "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"], "type": "LoadBalancer",
                "externalIPs": ["203.0.113.1"], "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                "internalTrafficPolicy": "Local", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "loadBalancerSourceRanges": ["10.0.0.0/8"], "allocateLoadBalancerNodePorts": false,
                "ports": [{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080, "protocol": "TCP"}],
                "selector": {"app": "web"}, "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1", "ipMode": "VIP"}]}}}"#;
        let api: core::Service = serde_json::from_str(service).unwrap();
        assert_eq!(Service::from(&api), serde_json::from_str::<Service>(service).unwrap());
        let slice = r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "annotations": {"nftproxy.io/weight": "3"}}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.1"], "nodeName": "n1",
                "conditions": {"ready": false, "serving": true, "terminating": true},
                "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "n1"}]}}]}"#;
        let api: discovery::EndpointSlice = serde_json::from_str(slice).unwrap();
        assert_eq!(EndpointSlice::from(&api), serde_json::from_str::<EndpointSlice>(slice).unwrap());
        let node = r#"{"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}"#;
        let api: core::Node = serde_json::from_str(node).unwrap();
        assert_eq!(Node::from(&api), serde_json::from_str::<Node>(node).unwrap());
    }

    /// Required fields read as k8s-openapi reads them: absent or null is the default.
    #[test]
    fn absent_or_null_required_fields_are_their_default() {
        let p: ServicePort = serde_json::from_str(r#"{"port": null}"#).unwrap();
        assert_eq!(p.port, 0);
        let s: EndpointSlice = serde_json::from_str(r#"{"metadata": null, "endpoints": [{}]}"#).unwrap();
        assert_eq!((s.address_type.as_str(), s.endpoints[0].addresses.len()), ("", 0));
        let e = serde_json::from_str::<ServiceSpec>(r#"{"ports": 5}"#).unwrap_err().to_string();
        assert!(e.starts_with("invalid type: integer `5`, expected a sequence"), "{e}");
        let e = serde_json::from_str::<Service>(r#"{"spec": 5}"#).unwrap_err().to_string();
        assert!(e.starts_with("invalid type: integer `5`, expected ServiceSpec"), "{e}");
        let e = serde_json::from_str::<ObjectMeta>(r#"{"labels": {"a": 5}}"#).unwrap_err().to_string();
        assert!(e.starts_with("invalid type: integer `5`, expected a string"), "{e}");
        let m: ObjectMeta = serde_json::from_str(r#"{"labels": {"b": "2", "a": "1", "c": "3"}}"#).unwrap();
        let labels = m.labels.unwrap();
        assert_eq!((labels.get("a"), labels.get("c"), labels.get("d")), (Some(&"1".into()), Some(&"3".into()), None));
    }
}
