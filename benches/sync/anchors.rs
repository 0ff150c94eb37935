//! The anchors: kube-proxy's nftables-mode and iptables-mode rule sets for the same Services.

use super::*;

pub(crate) fn hash(s: &str) -> String {
    format!("{:016X}", nftproxy::ruleset::fnv1a(s.as_bytes()))
}

/// kube-proxy nftables mode's rule set for the same Services (`numgen ... vmap` per Service).
pub(crate) fn kube_proxy_nft(n: usize, e: usize, range: std::ops::Range<usize>, whole: bool) -> String {
    let mut s = String::new();
    if whole {
        s.push_str("table ip kube-proxy {\n  comment \"rules for kube-proxy\"\n");
        s.push_str("  chain mark-for-masquerade { mark set mark or 0x4000; }\n");
        s.push_str("  chain masquerading { type nat hook postrouting priority 100; policy accept;\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n");
        s.push_str("  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n");
        s.push_str("  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n");
        s.push_str(
            "  chain nat-prerouting { type nat hook prerouting priority -100; policy accept; jump services; }\n",
        );
        s.push_str("  chain nat-output { type nat hook output priority -100; policy accept; jump services; }\n}\n");
    }
    let _ = n;
    for i in range {
        let (ns, nm) = name(i);
        let port = format!("{ns}/{nm}/tcp/http");
        let svc = format!("service-{}-{port}", &hash(&port)[..8]);
        let mut vmap = Vec::new();
        let mut eps = String::new();
        for j in 0..e {
            let ip = endpoint_ip(i, j, e);
            let ep = format!("endpoint-{}-{port}__{ip}/8080", &hash(&format!("{port}{ip}"))[..8]);
            writeln!(eps, "add chain ip kube-proxy {ep}").unwrap();
            writeln!(eps, "add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade").unwrap();
            writeln!(eps, "add rule ip kube-proxy {ep} meta l4proto tcp dnat to {ip}:8080").unwrap();
            vmap.push(format!("{j} : goto {ep}"));
        }
        s.push_str(&eps);
        writeln!(s, "add chain ip kube-proxy {svc}").unwrap();
        writeln!(
            s,
            "add rule ip kube-proxy {svc} ip daddr {} tcp dport 80 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            vip(i)
        )
        .unwrap();
        writeln!(s, "add rule ip kube-proxy {svc} numgen random mod {e} vmap {{ {} }}", vmap.join(", ")).unwrap();
        writeln!(s, "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto {svc} }}", vip(i)).unwrap();
    }
    s
}

/// kube-proxy iptables mode's nat table for the same Services (iptables-restore input).
/// `only` limits the Service chains written (a partial restore still rewrites KUBE-SERVICES).
pub(crate) fn kube_proxy_iptables(n: usize, e: usize, only: Option<std::ops::Range<usize>>) -> String {
    let chains = |i: usize| -> (String, Vec<String>) {
        let key = format!("{}/{}:http", name(i).0, name(i).1);
        let svc = format!("KUBE-SVC-{}", &hash(&key)[..16]);
        let seps = (0..e).map(|j| format!("KUBE-SEP-{}", &hash(&format!("{key}{j}"))[..16])).collect();
        (svc, seps)
    };
    let mut s = String::from("*nat\n");
    let writes: Vec<usize> = match &only {
        Some(r) => r.clone().collect(),
        None => (0..n).collect(),
    };
    if only.is_none() {
        s.push_str(":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    }
    s.push_str(":KUBE-SERVICES - [0:0]\n");
    for &i in &writes {
        let (svc, seps) = chains(i);
        writeln!(s, ":{svc} - [0:0]").unwrap();
        for sep in seps {
            writeln!(s, ":{sep} - [0:0]").unwrap();
        }
    }
    if only.is_none() {
        s.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
        s.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    }
    let total = only.as_ref().map_or(n, |r| r.end.max(n));
    for i in 0..total {
        let (svc, _) = chains(i);
        let (ns, nm) = name(i);
        writeln!(s, "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{ns}/{nm}:http cluster IP\" -m tcp --dport 80 -j {svc}", vip(i)).unwrap();
    }
    for &i in &writes {
        let (svc, seps) = chains(i);
        writeln!(s, "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ", vip(i))
            .unwrap();
        for (j, sep) in seps.iter().enumerate() {
            let left = e - j;
            if left > 1 {
                writeln!(s, "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}", 1.0 / left as f64)
                    .unwrap();
            } else {
                writeln!(s, "-A {svc} -j {sep}").unwrap();
            }
        }
        for (j, sep) in seps.iter().enumerate() {
            let ip = endpoint_ip(i, j, e);
            writeln!(
                s,
                "-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ\n-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:8080"
            )
            .unwrap();
        }
    }
    s.push_str("COMMIT\n");
    s
}
