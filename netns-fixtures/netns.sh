#!/usr/bin/env bash
# Throwaway network-namespace "cluster" for the demo and the integration tests.
#
# Topology (routed pods, no bridge): every pod packet crosses the node's netfilter hooks.
#
#   PREFIX-ext  (192.0.2.2, 2001:db8::2)  a host outside the cluster, the node's default route
#        |  veth ext0
#   PREFIX-node (192.0.2.1, 2001:db8::1)  runs nftproxy; forwarding on
#        |  veth per pod; node side holds 169.254.1.1 / fe80::1, a /32 (/128) route per pod
#   PREFIX-NAME (eth0: the pod's /32 and /128, default route via 169.254.1.1 / fe80::1)
#
# Usage:
#   netns.sh node PREFIX                  create PREFIX-node and PREFIX-ext
#   netns.sh pod PREFIX NAME IPV4 [IPV6]  create pod netns PREFIX-NAME wired to the node
#   netns.sh cluster PREFIX FILE          node + every pod listed in FILE ("name ipv4 [ipv6]")
#   netns.sh down PREFIX                  delete every PREFIX-* namespace (idempotent)
set -euo pipefail

cmd=${1:?usage: netns.sh node|pod|cluster|down PREFIX ...}
prefix=${2:?PREFIX required}

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

node() {
  local n="$prefix-node" e="$prefix-ext"
  ip netns add "$n"
  ip netns add "$e"
  nsx "$n" ip link set lo up
  nsx "$e" ip link set lo up
  nsx "$n" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
  ip link add ext0 netns "$n" type veth peer name eth0 netns "$e"
  nsx "$n" ip addr add 192.0.2.1/24 dev ext0
  nsx "$n" ip addr add 2001:db8::1/64 dev ext0 nodad
  nsx "$n" ip link set ext0 up
  nsx "$e" ip addr add 192.0.2.2/24 dev eth0
  nsx "$e" ip addr add 2001:db8::2/64 dev eth0 nodad
  nsx "$e" ip link set eth0 up
  # The node's default route leads outside; ClusterIPs are reached from ext through the node.
  nsx "$n" ip route add default via 192.0.2.2 dev ext0
  nsx "$n" ip -6 route add default via 2001:db8::2 dev ext0
  nsx "$e" ip route add 10.0.0.0/8 via 192.0.2.1 dev eth0
  nsx "$e" ip -6 route add fd00::/8 via 2001:db8::1 dev eth0
}

pod() {
  local name=$1 v4=$2 v6=${3:-}
  local n="$prefix-node" p="$prefix-$name"
  local host="vp$(printf '%s' "$name" | md5sum | cut -c1-10)"
  ip netns add "$p"
  nsx "$p" ip link set lo up
  ip link add "$host" netns "$n" type veth peer name eth0 netns "$p"
  nsx "$n" ip addr add 169.254.1.1/32 dev "$host"
  nsx "$n" ip link set "$host" up
  nsx "$p" ip addr add "$v4/32" dev eth0
  nsx "$p" ip link set eth0 up
  nsx "$p" ip route add 169.254.1.1 dev eth0
  nsx "$p" ip route add default via 169.254.1.1 dev eth0
  nsx "$n" ip route add "$v4/32" dev "$host"
  if [ -n "$v6" ]; then
    nsx "$n" ip addr add fe80::1/64 dev "$host" nodad
    nsx "$p" ip addr add "$v6/128" dev eth0 nodad
    nsx "$p" ip -6 route add default via fe80::1 dev eth0
    nsx "$n" ip -6 route add "$v6/128" dev "$host"
  fi
}

down() {
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^${prefix}-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

case "$cmd" in
  node) node ;;
  pod) shift 2; pod "$@" ;;
  cluster)
    file=${3:?FILE required}
    node
    while read -r name v4 v6; do
      case "$name" in ''|'#'*) continue ;; esac
      pod "$name" "$v4" "${v6:-}"
    done < "$file"
    ;;
  down) down ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
