//! The node's addresses on which node ports are served (`--nodeport-addresses`), read from the
//! kernel over rtnetlink and followed as addresses and default routes change.
//!
//! kube-proxy's nftables mode: `primary` (the default) serves node ports on the node's primary
//! addresses, a list of CIDRs serves them on every local address inside one of the CIDRs.
//! Loopback and link-local addresses never serve node ports.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteType};
use rtnetlink::{MulticastGroup, RouteMessageBuilder};
use tokio::sync::mpsc;

use crate::model::Family;

/// `--nodeport-addresses`: which of the node's addresses serve node ports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// The global addresses of the interface(s) holding the default route, per family.
    #[default]
    Primary,
    /// Every local address inside one of these CIDRs.
    Cidrs(Vec<ipnet::IpNet>),
}

/// A bad `--nodeport-addresses` value; the text names the bad entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseNodePortAddressesError(String);

impl FromStr for NodePortAddresses {
    type Err = ParseNodePortAddressesError;

    /// `primary`, or `CIDR[,CIDR...]` (host bits are cleared: `192.0.2.1/24` is `192.0.2.0/24`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("primary") {
            return Ok(NodePortAddresses::Primary);
        }
        if s.is_empty() {
            return Err(ParseNodePortAddressesError(
                "empty value: want \"primary\" or a comma-separated list of CIDRs".into(),
            ));
        }
        let mut cidrs = Vec::new();
        for (i, entry) in s.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                return Err(ParseNodePortAddressesError(format!(
                    "entry {} is empty: want a CIDR such as 192.0.2.0/24",
                    i + 1
                )));
            }
            if entry.eq_ignore_ascii_case("primary") {
                return Err(ParseNodePortAddressesError(
                    "entry \"primary\" cannot be combined with CIDRs: give either \"primary\" or CIDRs".into(),
                ));
            }
            let net = ipnet::IpNet::from_str(entry).map_err(|_| {
                let hint = if entry.parse::<IpAddr>().is_ok() { " (an address needs a prefix length)" } else { "" };
                ParseNodePortAddressesError(format!(
                    "entry \"{entry}\" is not a CIDR{hint}: want e.g. 192.0.2.0/24 or 2001:db8::/64"
                ))
            })?;
            cidrs.push(net.trunc());
        }
        cidrs.sort();
        cidrs.dedup();
        Ok(NodePortAddresses::Cidrs(cidrs))
    }
}

impl fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodePortAddresses::Primary => f.write_str("primary"),
            NodePortAddresses::Cidrs(cidrs) => {
                let text: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
                f.write_str(&text.join(","))
            }
        }
    }
}

/// The scope of an address, as the kernel reports it (`ip addr`'s `scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `scope global` (RT_SCOPE_UNIVERSE)
    Global,
    Site,
    Link,
    Host,
    Other(u8),
}

/// One address on an interface, as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAddr {
    pub ip: IpAddr,
    pub ifindex: u32,
    pub scope: Scope,
    /// IPv6 duplicate address detection failed: the address is unusable.
    pub dad_failed: bool,
}

impl LocalAddr {
    /// A usable global-scope address (as the tests and callers mostly need).
    pub fn global(ip: IpAddr, ifindex: u32) -> Self {
        LocalAddr { ip, ifindex, scope: Scope::Global, dad_failed: false }
    }
}

/// Whether `ip` may ever serve node ports: not loopback, link-local, unspecified or multicast.
fn servable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast()),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return servable(&IpAddr::V4(v4));
            }
            !(v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified() || v6.is_multicast())
        }
    }
}

fn in_cidrs(cidrs: &[ipnet::IpNet], ip: &IpAddr) -> bool {
    cidrs.iter().any(|c| c.contains(ip))
}

fn sorted(mut ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ips.sort();
    ips.dedup();
    ips
}

/// Pure: the addresses that serve node ports. `Primary`: the global-scope addresses of the
/// interface(s) holding the default route, per family (an IPv4 default route picks that
/// interface's IPv4 addresses, an IPv6 one its IPv6 addresses); `Cidrs`: every local address
/// inside one of the CIDRs. Never loopback or link-local. Sorted, deduplicated.
pub fn select(sel: &NodePortAddresses, addrs: &[LocalAddr], default_route_ifindexes: &[(Family, u32)]) -> Vec<IpAddr> {
    let ips = addrs
        .iter()
        .filter(|a| !a.dad_failed && servable(&a.ip))
        .filter(|a| match sel {
            NodePortAddresses::Primary => {
                a.scope == Scope::Global && default_route_ifindexes.contains(&(Family::of(&a.ip), a.ifindex))
            }
            NodePortAddresses::Cidrs(cidrs) => in_cidrs(cidrs, &a.ip),
        })
        .map(|a| a.ip)
        .collect();
    sorted(ips)
}

/// Pure: filters a given list of the node's addresses (e.g. the Node object's InternalIPs):
/// `Primary` keeps them all, `Cidrs` those inside one of the CIDRs; never loopback or
/// link-local. Sorted, deduplicated.
pub fn select_from_list(sel: &NodePortAddresses, ips: &[IpAddr]) -> Vec<IpAddr> {
    let ips = ips
        .iter()
        .filter(|ip| servable(ip))
        .filter(|ip| match sel {
            NodePortAddresses::Primary => true,
            NodePortAddresses::Cidrs(cidrs) => in_cidrs(cidrs, ip),
        })
        .copied()
        .collect();
    sorted(ips)
}

/// Aborts a spawned netlink connection task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn nl_err(what: &str, e: rtnetlink::Error) -> io::Error {
    io::Error::other(format!("rtnetlink: {what}: {e}"))
}

/// A request connection to the kernel in the calling thread's network namespace.
fn connect() -> io::Result<(rtnetlink::Handle, AbortOnDrop)> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    Ok((handle, AbortOnDrop(tokio::spawn(conn))))
}

fn local_addr(msg: &AddressMessage) -> Option<LocalAddr> {
    // IFA_LOCAL is the local address where it differs from IFA_ADDRESS (point-to-point peers).
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    let ip = local.or(address)?;
    let dad_failed = match msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Flags(f) => Some(*f),
        _ => None,
    }) {
        Some(flags) => flags.contains(AddressFlags::Dadfailed),
        None => msg.header.flags.contains(AddressHeaderFlags::Dadfailed),
    };
    let scope = match msg.header.scope {
        AddressScope::Universe => Scope::Global,
        AddressScope::Site => Scope::Site,
        AddressScope::Link => Scope::Link,
        AddressScope::Host => Scope::Host,
        other => Scope::Other(other.into()),
    };
    Some(LocalAddr { ip, ifindex: msg.header.index, scope, dad_failed })
}

/// The interfaces of the default routes in `msg` (none when it is not a unicast default route of
/// the main table).
fn default_route_ifindexes(msg: &RouteMessage) -> Vec<(Family, u32)> {
    let family = match msg.header.address_family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return Vec::new(),
    };
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table));
    if msg.header.destination_prefix_length != 0
        || msg.header.kind != RouteType::Unicast
        || table != u32::from(RouteHeader::RT_TABLE_MAIN)
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    for a in &msg.attributes {
        match a {
            RouteAttribute::Oif(i) => out.push((family, *i)),
            RouteAttribute::MultiPath(hops) => out.extend(hops.iter().map(|h| (family, h.interface_index))),
            _ => {}
        }
    }
    out
}

/// Every address on every interface, read over rtnetlink.
pub async fn local_addrs() -> io::Result<Vec<LocalAddr>> {
    let (handle, _conn) = connect()?;
    let msgs: Vec<AddressMessage> =
        handle.address().get().execute().try_collect().await.map_err(|e| nl_err("dumping addresses", e))?;
    Ok(msgs.iter().filter_map(local_addr).collect())
}

/// The interfaces holding a default route of the main table, per family, read over rtnetlink.
pub async fn default_routes() -> io::Result<Vec<(Family, u32)>> {
    let (handle, _conn) = connect()?;
    let mut out = Vec::new();
    for query in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
        let msgs: Vec<RouteMessage> =
            handle.route().get(query).execute().try_collect().await.map_err(|e| nl_err("dumping routes", e))?;
        out.extend(msgs.iter().flat_map(default_route_ifindexes));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Reads addresses and default routes over rtnetlink (in the calling thread's network
/// namespace) and applies [`select`].
pub async fn current(sel: &NodePortAddresses) -> io::Result<Vec<IpAddr>> {
    let addrs = local_addrs().await?;
    let routes = match sel {
        NodePortAddresses::Primary => default_routes().await?,
        NodePortAddresses::Cidrs(_) => Vec::new(),
    };
    Ok(select(sel, &addrs, &routes))
}

/// The rtnetlink multicast groups whose events can change the selection.
const GROUPS: [MulticastGroup; 4] =
    [MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr, MulticastGroup::Ipv4Route, MulticastGroup::Ipv6Route];

/// Events closer together than this are one burst.
const QUIET: Duration = Duration::from_millis(100);
/// A burst never delays the recomputation longer than this.
const MAX_BURST: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Follows address and route changes: after each burst of events, recomputes [`current`] and
/// sends the new list when it differs from the last one sent. Sends the initial list first.
/// Runs until the receiver is dropped. Errors are logged and retried with backoff.
pub async fn watch(sel: NodePortAddresses, tx: mpsc::Sender<Vec<IpAddr>>) {
    let mut last: Option<Vec<IpAddr>> = None;
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    loop {
        let result = tokio::select! {
            r = watch_once(&sel, &tx, &mut last, &mut backoff, &mut failing) => r,
            _ = tx.closed() => return,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                failing = true;
                tracing::warn!(error = %e, retry_in = ?backoff, "watching node addresses failed; keeping the last list, retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = tx.closed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One subscription: Ok when the receiver is gone, Err when netlink failed.
async fn watch_once(
    sel: &NodePortAddresses,
    tx: &mpsc::Sender<Vec<IpAddr>>,
    last: &mut Option<Vec<IpAddr>>,
    backoff: &mut Duration,
    failing: &mut bool,
) -> io::Result<()> {
    // Subscribe before the first read, so that no change between the two is missed.
    let (conn, _handle, mut events) = rtnetlink::new_multicast_connection(&GROUPS)?;
    let _conn = AbortOnDrop(tokio::spawn(conn));
    let ended = || io::Error::other("rtnetlink event stream ended");
    loop {
        let list = current(sel).await?;
        if std::mem::take(failing) {
            tracing::info!("watching node addresses recovered");
        }
        *backoff = MIN_BACKOFF;
        if last.as_ref() != Some(&list) {
            tracing::debug!(addresses = ?list, "node port addresses");
            if tx.send(list.clone()).await.is_err() {
                return Ok(());
            }
            *last = Some(list);
        }
        // Wait for an event, then for the burst to settle. Any event (an overrun too) means
        // "read again": the read is cheap and the recomputation idempotent.
        events.next().await.ok_or_else(ended)?;
        let deadline = tokio::time::Instant::now() + MAX_BURST;
        loop {
            let until = (tokio::time::Instant::now() + QUIET).min(deadline);
            match tokio::time::timeout_at(until, events.next()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return Err(ended()),
                Err(_) => break,
            }
        }
    }
}

/// A `v1 Node` for this node in the manifests gives the `primary` node-port addresses (its
/// InternalIPs, as in API mode), re-read when the files change.
pub fn follow_manifest_node(
    sel: NodePortAddresses,
    ips: Vec<IpAddr>,
    paths: Vec<std::path::PathBuf>,
    node: String,
    tx: tokio::sync::watch::Sender<Vec<IpAddr>>,
) {
    let _ = tx.send(select_from_list(&sel, &ips));
    tokio::spawn(async move {
        let mut last = crate::source::manifest::fingerprint(&paths);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = crate::source::manifest::fingerprint(&paths);
            if now == last {
                continue;
            }
            last = now;
            if let Some(ips) = crate::source::manifest::load(&paths).ok().and_then(|o| o.node_internal_ips(&node)) {
                publish(&tx, select_from_list(&sel, &ips));
            }
        }
    });
}

/// Reads this node's node-port addresses over rtnetlink now, and follows them from then on.
pub async fn follow(sel: NodePortAddresses, tx: tokio::sync::watch::Sender<Vec<IpAddr>>) {
    match current(&sel).await {
        Ok(ips) => {
            let _ = tx.send(ips);
        }
        Err(e) => tracing::warn!(error = %e, "reading the node's addresses failed; no node ports until they are known"),
    }
    let (atx, mut arx) = mpsc::channel(4);
    tokio::spawn(watch(sel, atx));
    tokio::spawn(async move {
        while let Some(ips) = arx.recv().await {
            publish(&tx, ips);
        }
    });
}

/// Hands `ips` to the receivers only when they differ from what they hold.
fn publish(tx: &tokio::sync::watch::Sender<Vec<IpAddr>>, ips: Vec<IpAddr>) {
    tx.send_if_modified(|have| (*have != ips).then(|| *have = ips).is_some());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| ip(s)).collect()
    }

    fn cidrs(list: &[&str]) -> NodePortAddresses {
        NodePortAddresses::Cidrs(list.iter().map(|s| s.parse().unwrap()).collect())
    }

    /// A node: eth0 (2) holds both default routes, eth1 (3) does not, lo (1).
    fn node() -> Vec<LocalAddr> {
        let g = |s: &str, i| LocalAddr::global(ip(s), i);
        let with = |s: &str, i, scope| LocalAddr { scope, ..g(s, i) };
        vec![
            with("127.0.0.1", 1, Scope::Host),
            with("::1", 1, Scope::Host),
            g("192.0.2.1", 2),
            g("192.0.2.9", 2),
            with("169.254.3.4", 2, Scope::Link),
            g("2001:db8::1", 2),
            with("fe80::1", 2, Scope::Link),
            g("198.51.100.1", 3),
            g("2001:db8:1::1", 3),
            with("fe80::2", 3, Scope::Link),
            // Global scope but link-local by address: never.
            g("169.254.9.9", 3),
            LocalAddr { dad_failed: true, ..g("2001:db8::dead", 2) },
            // A duplicate report of the same address.
            g("192.0.2.1", 2),
        ]
    }

    #[test]
    fn select_table() {
        use Family::{V4, V6};
        let both = [(V4, 2), (V6, 2)];
        /// (name, selection, default-route interfaces, want)
        type Case<'a> = (&'a str, NodePortAddresses, &'a [(Family, u32)], &'a [&'a str]);
        let addrs = node();
        let cases: &[Case] = &[
            (
                "primary: default-route interface, both families",
                NodePortAddresses::Primary,
                &both,
                &["192.0.2.1", "192.0.2.9", "2001:db8::1"],
            ),
            ("primary: IPv4 default route only", NodePortAddresses::Primary, &[(V4, 2)], &["192.0.2.1", "192.0.2.9"]),
            ("primary: IPv6 default route only", NodePortAddresses::Primary, &[(V6, 2)], &["2001:db8::1"]),
            (
                "primary: families independently",
                NodePortAddresses::Primary,
                &[(V4, 3), (V6, 2)],
                &["198.51.100.1", "2001:db8::1"],
            ),
            (
                "primary: two default-route interfaces",
                NodePortAddresses::Primary,
                &[(V4, 2), (V4, 3)],
                &["192.0.2.1", "192.0.2.9", "198.51.100.1"],
            ),
            ("primary: no default route", NodePortAddresses::Primary, &[], &[]),
            ("primary: default route on lo", NodePortAddresses::Primary, &[(V4, 1), (V6, 1)], &[]),
            ("primary: default route on an interface without addresses", NodePortAddresses::Primary, &[(V4, 9)], &[]),
            (
                "cidrs: across interfaces",
                cidrs(&["192.0.2.0/24", "198.51.100.0/24"]),
                &[],
                &["192.0.2.1", "192.0.2.9", "198.51.100.1"],
            ),
            ("cidrs: one /32", cidrs(&["192.0.2.9/32"]), &both, &["192.0.2.9"]),
            ("cidrs: IPv6 only", cidrs(&["2001:db8::/32"]), &[], &["2001:db8::1", "2001:db8:1::1"]),
            (
                "cidrs: everything, but never loopback or link-local",
                cidrs(&["0.0.0.0/0", "::/0"]),
                &[],
                &["192.0.2.1", "192.0.2.9", "198.51.100.1", "2001:db8::1", "2001:db8:1::1"],
            ),
            (
                "cidrs: loopback and link-local CIDRs match nothing",
                cidrs(&["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10"]),
                &both,
                &[],
            ),
            ("cidrs: no match", cidrs(&["203.0.113.0/24"]), &both, &[]),
        ];
        for (name, sel, routes, want) in cases {
            assert_eq!(select(sel, &addrs, routes), ips(want), "{name}");
        }
        assert_eq!(select(&NodePortAddresses::Primary, &[], &both), ips(&[]), "no addresses");
    }

    #[test]
    fn select_from_list_table() {
        let list = ips(&["10.0.0.2", "127.0.0.1", "fe80::1", "169.254.1.1", "fd00::2", "10.0.0.2", "::1"]);
        let cases: &[(NodePortAddresses, &[&str])] = &[
            (NodePortAddresses::Primary, &["10.0.0.2", "fd00::2"]),
            (cidrs(&["10.0.0.0/8"]), &["10.0.0.2"]),
            (cidrs(&["fd00::/8", "127.0.0.0/8"]), &["fd00::2"]),
            (cidrs(&["192.0.2.0/24"]), &[]),
        ];
        for (sel, want) in cases {
            assert_eq!(select_from_list(sel, &list), ips(want), "{sel}");
        }
    }

    #[test]
    fn parse_good() {
        let cases: &[(&str, NodePortAddresses)] = &[
            ("primary", NodePortAddresses::Primary),
            (" Primary ", NodePortAddresses::Primary),
            ("192.0.2.0/24", cidrs(&["192.0.2.0/24"])),
            ("192.0.2.1/24", cidrs(&["192.0.2.0/24"])),
            ("192.0.2.0/24, 2001:db8::/64", cidrs(&["192.0.2.0/24", "2001:db8::/64"])),
            ("2001:db8::/64,192.0.2.0/24,192.0.2.0/24", cidrs(&["192.0.2.0/24", "2001:db8::/64"])),
            ("0.0.0.0/0,::/0", cidrs(&["0.0.0.0/0", "::/0"])),
        ];
        for (text, want) in cases {
            assert_eq!(&text.parse::<NodePortAddresses>().unwrap(), want, "{text:?}");
        }
        assert_eq!(NodePortAddresses::default(), NodePortAddresses::Primary);
        let round = "192.0.2.0/24,2001:db8::/64";
        assert_eq!(round.parse::<NodePortAddresses>().unwrap().to_string(), round);
        assert_eq!(NodePortAddresses::Primary.to_string(), "primary");
    }

    #[test]
    fn parse_bad() {
        let cases: &[(&str, &str)] = &[
            ("", "empty value"),
            ("  ", "empty value"),
            ("all", "entry \"all\" is not a CIDR"),
            ("192.0.2.1", "entry \"192.0.2.1\" is not a CIDR (an address needs a prefix length)"),
            ("192.0.2.0/24,192.0.2.0/33", "entry \"192.0.2.0/33\" is not a CIDR"),
            ("192.0.2.0/24,,10.0.0.0/8", "entry 2 is empty"),
            ("192.0.2.0/24,", "entry 2 is empty"),
            ("10.0.0.0/8,nonsense", "entry \"nonsense\" is not a CIDR"),
            ("primary,10.0.0.0/8", "entry \"primary\" cannot be combined with CIDRs"),
            ("2001:db8::/129", "entry \"2001:db8::/129\" is not a CIDR"),
        ];
        for (text, want) in cases {
            let err = text.parse::<NodePortAddresses>().unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want it to contain {want:?}");
        }
    }

    #[test]
    fn default_route_parsing() {
        use netlink_packet_route::route::RouteNextHop;
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new().output_interface(4).build();
        assert_eq!(default_route_ifindexes(&msg), vec![(Family::V4, 4)]);
        msg.header.destination_prefix_length = 24;
        assert_eq!(default_route_ifindexes(&msg), vec![]);
        msg.header.destination_prefix_length = 0;
        msg.header.kind = RouteType::Unreachable;
        assert_eq!(default_route_ifindexes(&msg), vec![]);
        msg.header.kind = RouteType::Unicast;
        msg.attributes.push(RouteAttribute::Table(100));
        assert_eq!(default_route_ifindexes(&msg), vec![]);
        let hop = |i| {
            let mut h = RouteNextHop::default();
            h.interface_index = i;
            h
        };
        let msg = RouteMessageBuilder::<Ipv6Addr>::new().multipath(vec![hop(5), hop(6)]).build();
        assert_eq!(default_route_ifindexes(&msg), vec![(Family::V6, 5), (Family::V6, 6)]);
    }
}
