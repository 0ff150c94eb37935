//! What the node does, read from the kernel for operators (issue 14): `nftproxy trace` (where a
//! new connection goes, from the rules the kernel holds), `nftproxy flows` (the conntrack
//! entries behind our Services), the per-endpoint connection counters on `/metrics` and
//! `GET /debug/services` (what the last committed sync programmed).
//!
//! Formatting and parsing are pure and tested without root; the I/O is `nft` and `conntrack`.

pub mod counters;
pub mod flows;
pub mod services;
pub mod trace;

use std::net::{IpAddr, SocketAddr};

use crate::model::{Protocol, ServiceId};

/// Every way an operator command can fail, one variant per step.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{0}")]
    Argument(String),
    #[error(transparent)]
    Nft(#[from] crate::nft::NftError),
    #[error("conntrack: {0} (nftproxy flows needs CAP_NET_ADMIN)")]
    Conntrack(#[source] std::io::Error),
}

/// `nftproxy tables`: our tables in the kernel (`inet nftproxy` and its shards), one per line,
/// from one table dump: unlike `nft list tables`, which reads every rule first (minutes at
/// 10,000 Services), this takes milliseconds at any size.
pub fn tables() -> Result<String, InspectError> {
    let mut tables = crate::nft::Netlink::open()?.our_tables()?;
    tables.sort_by_key(|t| crate::ruleset::shard_of_table(t));
    Ok(tables.iter().map(|t| format!("table inet {t}\n")).collect())
}

/// `tcp`, `UDP`, `Sctp`: a protocol argument, any case.
pub fn parse_protocol(s: &str) -> Result<Protocol, InspectError> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        _ => Err(InspectError::Argument(format!("{s:?}: expected a protocol, tcp, udp or sctp"))),
    }
}

/// `10.96.0.80:80` or `[fd00::80]:80`.
pub fn parse_address(s: &str) -> Result<(IpAddr, u16), InspectError> {
    let a: SocketAddr = s
        .parse()
        .map_err(|_| InspectError::Argument(format!("{s:?}: expected an address and port, IP:PORT or [IPv6]:PORT")))?;
    if a.port() == 0 {
        return Err(InspectError::Argument(format!("{s:?}: port 0 is not a Service port")));
    }
    Ok((a.ip(), a.port()))
}

/// `NAMESPACE/NAME`.
pub fn parse_service(s: &str) -> Result<ServiceId, InspectError> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(ServiceId::new(ns, name)),
        _ => Err(InspectError::Argument(format!("{s:?}: expected a Service as NAMESPACE/NAME"))),
    }
}

/// `IP:PORT`, IPv6 as `[IP]:PORT`.
pub fn address(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// The Service a chain of ours serves, from its name (`svc4/default/web/tcp/80`,
/// `ep6/default/web/tcp/80/fd00-...`, `ext4/...`, possibly qualified by its table).
pub fn service_of_chain(chain: &str) -> Option<ServiceId> {
    let mut parts = crate::ruleset::local_name(chain).split('/');
    let role = parts.next()?;
    if !["svc", "ep", "ext", "fw", "lcl", "cls"]
        .iter()
        .any(|r| role.strip_prefix(r).is_some_and(|f| f == "4" || f == "6"))
    {
        return None;
    }
    Some(ServiceId::new(parts.next()?, parts.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_or_say_what_is_wrong() {
        assert_eq!(parse_protocol("TCP").unwrap(), Protocol::Tcp);
        assert_eq!(parse_protocol("Udp").unwrap(), Protocol::Udp);
        assert!(parse_protocol("icmp").unwrap_err().to_string().contains("tcp, udp or sctp"));
        assert_eq!(parse_address("10.96.0.80:80").unwrap(), ("10.96.0.80".parse().unwrap(), 80));
        assert_eq!(parse_address("[fd00::80]:53").unwrap(), ("fd00::80".parse().unwrap(), 53));
        for bad in ["10.96.0.80", "fd00::80:53", "garbage", "10.96.0.80:0", "10.96.0.80:70000", "", "[fd00::1]"] {
            assert!(parse_address(bad).unwrap_err().to_string().contains("expected") || bad.ends_with(":0"), "{bad}");
        }
        assert_eq!(parse_service("default/web").unwrap(), ServiceId::new("default", "web"));
        for bad in ["web", "/web", "default/", "a/b/c"] {
            assert!(parse_service(bad).is_err(), "{bad}");
        }
        assert_eq!(address("fd00::1".parse().unwrap(), 80), "[fd00::1]:80");
    }

    #[test]
    fn chains_name_their_service() {
        assert_eq!(service_of_chain("svc4/default/web/tcp/80"), Some(ServiceId::new("default", "web")));
        assert_eq!(
            service_of_chain("nftproxy-3@ext6/kube-system/dns/udp/53"),
            Some(ServiceId::new("kube-system", "dns"))
        );
        assert_eq!(service_of_chain("services"), None);
        assert_eq!(service_of_chain("svcx/a/b"), None);
    }
}
