//! `GET /debug/services` on the metrics address: what the last committed sync programmed, as
//! JSON: every Service with its ports, each port with its ClusterIPs and the endpoints its
//! Service chains pick from (with their weights; drained ones with weight 0; none: `[]`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::Serialize;

use crate::model::{Family, Locality, Service, ServiceId, Snapshot};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<PortView>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PortView {
    pub protocol: String,
    pub port: u16,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EndpointView {
    pub address: String,
    pub weight: u32,
}

/// One Service as programmed on this node (`here`): per port and family, the endpoints new
/// connections through the ClusterIP may go to, and the drained ones (weight 0) that would be
/// picked but for their weight.
pub fn view(svc: &Service, here: &Locality) -> ServiceView {
    let ports = svc
        .ports
        .iter()
        .map(|port| {
            // Drained endpoints are left out of the pick: find them as if they had weight 1.
            let mut undrained = port.clone();
            undrained.endpoints.iter_mut().for_each(|e| e.weight = e.weight.max(1));
            let weight_of = |ip, p| port.endpoints.iter().find(|e| e.ip == ip && e.port == p).map_or(0, |e| e.weight);
            let mut endpoints = Vec::new();
            for family in [Family::V4, Family::V6] {
                if !svc.cluster_ips.iter().any(|ip| Family::of(ip) == family) {
                    continue;
                }
                for e in svc.usable_endpoints(&undrained, family, here) {
                    endpoints
                        .push(EndpointView { address: super::address(e.ip, e.port), weight: weight_of(e.ip, e.port) });
                }
            }
            PortView {
                protocol: port.protocol.to_string(),
                port: port.port,
                cluster_ips: svc.cluster_ips.iter().map(|ip| ip.to_string()).collect(),
                endpoints,
            }
        })
        .collect();
    ServiceView { namespace: svc.id.namespace.clone(), name: svc.id.name.clone(), ports }
}

/// What the last committed sync programmed; updated by the agent after each successful sync.
#[derive(Debug, Default)]
pub struct Programmed {
    state: Mutex<(BTreeMap<ServiceId, Service>, Locality)>,
}

impl Programmed {
    /// After a successful sync of `snapshot`: only the Services in `changed` when the sync was
    /// told which changed, else all of them.
    pub fn update(&self, snapshot: &Snapshot, changed: Option<&BTreeSet<ServiceId>>, here: &Locality) {
        let mut state = crate::lock(&self.state);
        match changed {
            Some(ids) => {
                for id in ids {
                    match snapshot.services.get(id) {
                        Some(svc) => state.0.insert(id.clone(), svc.clone()),
                        None => state.0.remove(id),
                    };
                }
            }
            None => state.0.clone_from(&snapshot.services),
        }
        state.1.clone_from(here);
    }

    /// The JSON body of `/debug/services`.
    pub fn json(&self) -> String {
        let state = crate::lock(&self.state);
        let views: Vec<ServiceView> = state.0.values().map(|s| view(s, &state.1)).collect();
        serde_json::to_string_pretty(&views).unwrap_or_else(|_| "[]".into()) + "\n"
    }
}

/// The `/debug/services` route.
pub fn router(programmed: std::sync::Arc<Programmed>) -> axum::Router {
    let answer = move || {
        let p = programmed.clone();
        async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], p.json()) }
    };
    axum::Router::new().route("/debug/services", axum::routing::get(answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol, ServicePort};

    #[test]
    fn ports_list_their_cluster_ips_and_weighted_endpoints() {
        let ep = |ip: &str, weight| Endpoint { weight, ..Endpoint::ready(ip.parse().unwrap(), 8080) };
        let port = |endpoints| ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            node_port: None,
            endpoints,
        };
        let web = Service::new(
            ServiceId::new("default", "web"),
            vec!["10.96.0.80".parse().unwrap(), "fd00::80".parse().unwrap()],
            vec![port(vec![ep("10.244.1.2", 9), ep("10.244.1.3", 0), ep("fd00::2", 1)])],
        );
        let empty =
            Service::new(ServiceId::new("default", "none"), vec!["10.96.0.99".parse().unwrap()], vec![port(vec![])]);
        let p = Programmed::default();
        let snap = Snapshot { services: [(web.id.clone(), web), (empty.id.clone(), empty)].into() };
        p.update(&snap, None, &Locality::default());
        let json: serde_json::Value = serde_json::from_str(&p.json()).unwrap();
        let want = serde_json::json!([
            {"namespace": "default", "name": "none", "ports": [
                {"protocol": "tcp", "port": 80, "clusterIPs": ["10.96.0.99"], "endpoints": []}]},
            {"namespace": "default", "name": "web", "ports": [
                {"protocol": "tcp", "port": 80, "clusterIPs": ["10.96.0.80", "fd00::80"], "endpoints": [
                    {"address": "10.244.1.2:8080", "weight": 9},
                    {"address": "10.244.1.3:8080", "weight": 0},
                    {"address": "[fd00::2]:8080", "weight": 1}]}]}
        ]);
        assert_eq!(json, want);
        // A partial update touches only the Services it names.
        let gone: BTreeSet<ServiceId> = [ServiceId::new("default", "none")].into();
        p.update(&Snapshot::default(), Some(&gone), &Locality::default());
        let json: serde_json::Value = serde_json::from_str(&p.json()).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 1);
        assert_eq!(json[0]["name"], "web");
    }
}
