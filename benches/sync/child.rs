//! What runs inside a namespace (`sync child ...`): one measurement, printed as `key=value`.

use super::*;

pub(crate) fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The price of any commit in this namespace, whatever it changes: one element added to and one
/// removed from our state set (no rule, nothing to validate), 100 times each; sorted, in ms.
pub(crate) fn commit_tax(nl: &mut Netlink) -> Vec<f64> {
    let mut tax = Vec::new();
    for k in 0..100u32 {
        let el = compile::state_element(k, u64::from(k));
        for add in [true, false] {
            let (set, kind, elements) = (compile::STATE_SET.to_string(), SetKind::State, vec![el.clone()]);
            let op =
                if add { Op::AddElements { set, kind, elements } } else { Op::DelElements { set, kind, elements } };
            tax.push(ms(nl.apply(&Plan { ops: vec![op] }).unwrap().kernel));
        }
    }
    tax.sort_by(|a, b| a.partial_cmp(b).unwrap());
    tax
}

/// Runs inside the namespace; prints `key=value` pairs.
pub(crate) fn child(args: &[String]) {
    let cmd = args[0].as_str();
    let n: usize = args[1].parse().unwrap();
    let e: usize = args[2].parse().unwrap();
    let mut out = String::new();
    match cmd {
        "full" | "restart" | "restart-foreign" => {
            let snap = snapshot(n, e, None);
            if cmd == "restart-foreign" {
                // Another program commits (a table of its own): the generation moves, so the
                // restart cannot verify by generation and reads our tables back.
                let foreign = Plan { ops: vec![Op::AddTable { name: "bench-foreign".into(), flags: 0 }] };
                Netlink::open().unwrap().apply(&foreign).unwrap();
            }
            let mut engine = Engine::new(LiveKernel::open().unwrap(), options());
            let o = engine.sync(&snap).unwrap();
            write!(
                out,
                "total_ms={:.1} read_back_ms={:.1} messages={} bytes={} rss_kib={}",
                ms(o.total),
                ms(o.read_back),
                o.stats.messages,
                o.stats.bytes,
                vm_hwm_kib()
            )
            .unwrap();
        }
        "incremental" => {
            // The agent's path from a watch event to the committed transaction: the change
            // tracker names the Service, only its objects are read and resolved, the engine
            // diffs only it. Then the same change with everything re-read and resolved.
            let reps: usize = args[3].parse().unwrap();
            let (services, mut slices) = k8s_objects(n, e);
            let origin = Origin("bench".into());
            let everything = |slices: &HashMap<(String, String), EndpointSlice>| Objects {
                // Converted as the API source converts its reflectors' objects.
                services: services.values().map(|s| (origin.clone(), std::sync::Arc::new(s.into()))).collect(),
                slices: slices.values().map(|s| (origin.clone(), std::sync::Arc::new(s.into()))).collect(),
                ..Default::default()
            };
            let opts = ResolveOptions::default();
            let mut tracker = Tracker::default();
            for (ns, name) in slices.keys() {
                let owner = ServiceId::new(ns.clone(), name.trim_end_matches("-abc"));
                tracker.slice_applied(ns, name, Some(owner));
            }
            tracker.take();
            let mut desired = Desired::default();
            desired.replace_all(resolve(&everything(&slices), &opts).unwrap());
            let mut engine = Engine::new(LiveKernel::open().unwrap(), options());
            engine.sync(desired.snapshot()).unwrap();
            let (mut times, mut kernel, mut messages) = (Vec::new(), Vec::new(), 0);
            for k in 0..reps + 20 {
                let i = (k * 7919) % n;
                let (ns, name) = name(i);
                let key = (ns.clone(), format!("{name}-abc"));
                let moved = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + k as u32);
                slices.get_mut(&key).unwrap().endpoints[0].addresses = vec![moved.to_string()];
                tracker.slice_applied(&key.0, &key.1, Some(ServiceId::new(ns, name)));
                let start = Instant::now();
                let o = if k < reps {
                    let Changed::Services(ids) = tracker.take() else { panic!("one Service changed") };
                    let objects = changes::objects_of(
                        &tracker,
                        &ids,
                        &origin,
                        |id| services.get(id).cloned().map(Into::into),
                        |ns, name| slices.get(&(ns.to_string(), name.to_string())).cloned().map(Into::into),
                    );
                    desired.apply_partial(&ids, resolve(&objects, &opts).unwrap()).unwrap();
                    engine.sync_changed(desired.snapshot(), Some(&ids)).unwrap()
                } else {
                    tracker.take();
                    desired.replace_all(resolve(&everything(&slices), &opts).unwrap());
                    engine.sync(desired.snapshot()).unwrap()
                };
                times.push(ms(start.elapsed()));
                assert_eq!(o.kind, nftproxy::sync::SyncKind::Partial);
                assert_eq!(o.services_changed, 1);
                if k < reps {
                    kernel.push(ms(o.stats.kernel));
                    messages = messages.max(o.stats.messages);
                }
            }
            let tax = commit_tax(&mut Netlink::open().unwrap());
            let mut resolve_all = times.split_off(reps);
            for v in [&mut times, &mut kernel, &mut resolve_all] {
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            }
            write!(
                out,
                "p50_ms={:.2} p99_ms={:.2} kernel_p50_ms={:.2} kernel_p99_ms={:.2} resolve_all_p50_ms={:.1} \
                 any_commit_p50_ms={:.2} any_commit_p99_ms={:.2} max_messages={messages}",
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                percentile(&kernel, 0.5),
                percentile(&kernel, 0.99),
                percentile(&resolve_all, 0.5),
                percentile(&tax, 0.5),
                percentile(&tax, 0.99),
            )
            .unwrap();
        }
        "scrape" => {
            // A /metrics scrape with the endpoint counters (issue 14), against the tables a
            // previous `full` child left, as Prometheus sees it: one collector scraped every
            // second (the counters are read every 2 s meanwhile). The first scrape, which reads
            // at once, is reported apart.
            let reps: usize = args[3].parse().unwrap();
            let mut times = Vec::new();
            let mut series = 0;
            let counters = nftproxy::inspect::counters::EndpointCounters::default();
            let metrics = nftproxy::metrics::Metrics::default().with_collector(Box::new(counters));
            let start = Instant::now();
            metrics.encode();
            write!(out, "first_scrape_ms={:.1} ", ms(start.elapsed())).unwrap();
            for _ in 0..reps {
                std::thread::sleep(Duration::from_secs(1));
                let start = Instant::now();
                let text = metrics.encode();
                times.push(ms(start.elapsed()));
                series = text.lines().filter(|l| l.starts_with("nftproxy_endpoint_connections_total{")).count();
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            // The kernel read alone (one rule dump per table, counters picked out).
            let mut nl = Netlink::open().unwrap();
            let mut dumps: Vec<f64> = (0..reps)
                .map(|_| {
                    let start = Instant::now();
                    nl.endpoint_counters().unwrap();
                    ms(start.elapsed())
                })
                .collect();
            dumps.sort_by(|a, b| a.partial_cmp(b).unwrap());
            write!(out, "dump_p50_ms={:.1} ", percentile(&dumps, 0.5)).unwrap();
            write!(
                out,
                "scrape_p50_ms={:.1} scrape_max_ms={:.1} series={series}",
                percentile(&times, 0.5),
                times[times.len() - 1]
            )
            .unwrap();
        }
        "commit-tax" => {
            // The price of a commit against the number of chains in the namespace: `n` empty
            // chains (no rules, nothing to validate), then the same one-element commits as
            // above. The kernel walks every chain of every table on each commit.
            let mut want = compile::skeleton(&options());
            for i in 0..n {
                let chain = Chain { base: None, rules: Vec::new().into() };
                want.chains.insert(format!("c/{i}"), chain);
            }
            let mut nl = Netlink::open().unwrap();
            nl.apply(&nftproxy::plan::plan(&Default::default(), want)).unwrap();
            let tax = commit_tax(&mut nl);
            write!(
                out,
                "any_commit_p50_ms={:.3} any_commit_p99_ms={:.3}",
                percentile(&tax, 0.5),
                percentile(&tax, 0.99)
            )
            .unwrap();
        }
        "floor" => {
            let want = compile::compile(&snapshot(n, e, None), &options());
            let plan = nftproxy::plan::plan(&Default::default(), want);
            let enc = nftproxy::nft::encode::encode_plan(&plan, 1);
            let mut nl = Netlink::open().unwrap();
            let start = Instant::now();
            nl.send_encoded(&enc, &plan).unwrap();
            write!(out, "commit_ms={:.1} messages={}", ms(start.elapsed()), enc.messages).unwrap();
        }
        "neighbour" => out = neighbour_child(n, e, args[3].parse().unwrap()),
        "ct-scale" => out = conntrack_scale::conntrack_scale_child(n),
        "dataplane" => {
            // The Service placed last (svc-(n-1)) leads to the real pod web-a.
            let mut snap = snapshot(n, e, None);
            let last = snap.services.values_mut().find(|s| s.id.name == format!("svc-{}", n - 1)).unwrap();
            last.ports[0].endpoints = vec![Endpoint::ready("10.244.1.2".parse().unwrap(), 8080)];
            // The first-packet benchmark's variants: each drops one of the agent's defaults.
            let mut opts = options();
            let on = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
            if on("NFTPROXY_BENCH_NO_CLUSTER_CIDR") {
                opts.cluster_cidrs.clear();
            }
            opts.conntrack_tcp_be_liberal = on("NFTPROXY_BENCH_BE_LIBERAL");
            let mut engine = Engine::new(LiveKernel::open().unwrap(), opts);
            let o = engine.sync(&snap).unwrap();
            write!(out, "total_ms={:.1}", ms(o.total)).unwrap();
        }
        other => panic!("unknown child command {other}"),
    }
    println!("{out}");
}
