//! The continuous loop: wait for a change or the periodic resync, debounce, read the source,
//! sync, record metrics and health. A failure keeps the rules in place and retries with a
//! full sync; the same error is logged once, not on every retry.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio::time::sleep_until;

use crate::healthcheck::{self, HealthChecks};
use crate::metrics::{Health, Metrics};
use crate::model::{Family, ServiceId};
use crate::source::changes::{Changed, Desired};
use crate::source::node_addrs::{NodePortAddresses, select_from_list};
use crate::source::resolve::{self, ResolveOptions};
use crate::source::{Change, InputError, InputErrors, Source};
use crate::sync::{Engine, SyncKind};

#[derive(Debug, Clone)]
pub struct Timing {
    /// Minimum time between two syncs (events in between are coalesced).
    pub min_sync_period: Duration,
    /// Time between periodic checks (a generation check; a full resync if anything drifted).
    pub sync_period: Duration,
    /// Time between full read-backs even when the generation says nothing changed: bounds how
    /// long anything the generation check cannot see (a state record forged while the agent
    /// was down, a kernel that lost our objects without a commit) can stay.
    pub verify_period: Duration,
}

/// Everything the loop works with.
pub struct Agent {
    pub engine: Engine,
    /// Follow the source's idea of this node's zone (no `--zone` given).
    pub zone_from_source: bool,
    /// The node's node-port addresses as they change (rtnetlink, or a Node in the manifests).
    pub node_ips: tokio::sync::watch::Receiver<Vec<std::net::IpAddr>>,
    /// Take the node-port addresses from the source's Node on every pass instead (API mode,
    /// `primary`), selected as `--nodeport-addresses` says.
    pub node_ips_from_source: Option<NodePortAddresses>,
    pub source: Arc<dyn Source>,
    pub resolve: ResolveOptions,
    pub changes: mpsc::Receiver<Change>,
    pub timing: Timing,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// What the last committed sync programmed, for `GET /debug/services`.
    pub programmed: Arc<crate::inspect::services::Programmed>,
}

/// Runs until `shutdown` completes; the rules stay in place afterwards.
pub async fn run(agent: Agent, shutdown: impl std::future::Future<Output = ()>) {
    let Agent {
        mut engine,
        zone_from_source,
        mut node_ips,
        node_ips_from_source,
        source,
        resolve: resolve_opts,
        mut changes,
        timing,
        metrics,
        health,
        programmed,
    } = agent;
    let mut health_checks = HealthChecks::new(node_ips.borrow().clone());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_sync: Option<Instant> = None;
    let mut next_check = tokio::time::Instant::now();
    let mut last_error: Option<String> = None;
    let mut desired = Desired::default();
    let mut resolve_all = true;
    let mut verified_at = Instant::now();
    let mut addresses_moved = false;
    let mut unserved = std::collections::HashMap::new();
    let mut invalid = Invalid::default();
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = changes.recv() => {
                health.queued();
                let (services, endpoints) = source.pending_counts();
                metrics.queued(services, endpoints);
            }
            _ = sleep_until(next_check) => {}
            // `changed()` marks the value seen: remember that it moved.
            Ok(()) = node_ips.changed() => addresses_moved = true,
        }
        let watched = std::mem::take(&mut addresses_moved) || node_ips.has_changed().unwrap_or(false);
        let moved = match &node_ips_from_source {
            Some(sel) => Some(select_from_list(sel, &source.node_internal_ips().unwrap_or_default()))
                .filter(|ips| *ips != engine.options().node_ips),
            None => watched.then(|| node_ips.borrow_and_update().clone()),
        };
        if let Some(ips) = moved {
            if ips.is_empty() {
                // No node-port address: no health-check port either (kube-proxy binds none).
                health_checks.update(Default::default());
            }
            health_checks.set_addresses(ips.clone());
            engine.set_node_ips(ips);
        }
        if let Some(last) = last_sync {
            let earliest = tokio::time::Instant::from_std(last + timing.min_sync_period);
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = sleep_until(earliest) => {}
            }
        }
        while changes.try_recv().is_ok() {}
        last_sync = Some(Instant::now());
        health.set_node_eligible(source.node_eligible());
        if zone_from_source {
            // The Node's labels are re-read on every pass: a zone change moves topology-aware
            // traffic without a restart.
            engine.set_zone(source.zone());
        }
        if verified_at.elapsed() >= timing.verify_period {
            engine.distrust();
            verified_at = Instant::now();
        }
        let changed = source.take_changed();
        let pending = source.take_pending();
        let result = refresh(&*source, &resolve_opts, &mut desired, changed, resolve_all, &mut invalid)
            .map_err(crate::Error::from)
            .and_then(|hint| {
                let snapshot = desired.snapshot();
                let n = snapshot.services.len();
                tokio::task::block_in_place(|| engine.sync_changed(snapshot, hint.as_ref())).map(|o| (o, n, hint))
            });
        // After a failure the changes taken are lost: the next sync reads everything.
        resolve_all = result.is_err();
        match result {
            Ok((outcome, services, hint)) => {
                let here = &engine.options().locality;
                programmed.update(desired.snapshot(), hint.as_ref(), here);
                let no_addresses = engine.options().node_ips.is_empty();
                health_checks.update(if no_addresses {
                    Default::default()
                } else {
                    healthcheck::wanted(desired.snapshot(), here)
                });
                report_unserved(desired.snapshot(), &mut unserved);
                source.served(desired.snapshot());
                metrics.invalid_objects(&invalid.by_kind());
                metrics.synced(&outcome, services);
                // Committed before the conntrack cleanup, as kube-proxy measures it.
                let committed = SystemTime::now() - outcome.conntrack_time;
                metrics.programmed(&pending.triggers, committed);
                let (services_pending, endpoints_pending) = source.pending_counts();
                metrics.pending(services_pending, endpoints_pending);
                for family in [Family::V4, Family::V6] {
                    metrics.no_local_endpoints(family, desired.snapshot().no_local_endpoints(family, here));
                }
                health.synced();
                if last_error.take().is_some() {
                    tracing::info!("sync recovered");
                }
                if outcome.kind != SyncKind::Unchanged {
                    tracing::info!(
                        kind = ?outcome.kind,
                        services_changed = outcome.services_changed,
                        endpoints_changed = outcome.endpoints_changed,
                        messages = outcome.stats.messages,
                        ms = outcome.total.as_secs_f64() * 1e3,
                        "synced"
                    );
                }
                next_check = tokio::time::Instant::now() + timing.sync_period;
            }
            Err(e) => {
                metrics.failed(e.metric_label());
                health.queued();
                engine.distrust();
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, "sync failed; the previous rules stay in place, retrying");
                    last_error = Some(text);
                }
                next_check = tokio::time::Instant::now() + timing.min_sync_period.max(Duration::from_secs(1));
            }
        }
    }
    tracing::info!("shutting down; the rules stay in place");
}

/// Logs, once per Service and change, what of it cannot be served (never silently dropped).
pub fn report_unserved(
    snapshot: &crate::model::Snapshot,
    logged: &mut std::collections::HashMap<ServiceId, Vec<String>>,
) {
    logged.retain(|id, _| snapshot.services.contains_key(id));
    for svc in snapshot.services.values() {
        let now = svc.unserved();
        if logged.get(&svc.id).map(Vec::as_slice).unwrap_or_default() != now.as_slice() {
            for what in &now {
                tracing::warn!(service = %svc.id, "not served: {what}");
            }
            logged.insert(svc.id.clone(), now);
        }
    }
}

/// The input errors of objects skipped in API mode, by the Service they concern, so that each is
/// logged once and counted while present.
#[derive(Debug, Default)]
pub struct Invalid {
    by_service: BTreeMap<Option<ServiceId>, Vec<InputError>>,
}

impl Invalid {
    /// Replaces what is known about `ids` (all Services when `None`) with `errors`; logs the
    /// errors not seen before.
    fn update(&mut self, ids: Option<&BTreeSet<ServiceId>>, errors: Vec<(Option<ServiceId>, InputError)>) {
        let before: HashSet<String> = self.by_service.values().flatten().map(|e| e.to_string()).collect();
        match ids {
            Some(ids) => self.by_service.retain(|id, _| !id.as_ref().is_some_and(|id| ids.contains(id))),
            None => self.by_service.clear(),
        }
        for (owner, e) in errors {
            if !before.contains(&e.to_string()) {
                tracing::warn!(error = %e, "skipping an invalid object; its Service keeps its last good rules");
            }
            self.by_service.entry(owner).or_default().push(e);
        }
    }

    /// How many invalid objects of each kind are present now.
    pub fn by_kind(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for e in self.by_service.values().flatten() {
            let kind = e.object.split(' ').next().unwrap_or_default().to_string();
            *out.entry(kind).or_insert(0) += 1;
        }
        out
    }
}

/// The Service an error from `Desired::apply_partial` names (`Service ns/name`).
fn service_named(e: &InputError) -> Option<ServiceId> {
    let (ns, name) = e.object.strip_prefix("Service ")?.split_once('/')?;
    Some(ServiceId::new(ns, name))
}

/// Brings `desired` up to date: only the changed Services when the source can tell which and
/// read just those, everything otherwise (or when `everything`). Returns the Services that may
/// have changed, `None` for any.
fn refresh(
    source: &dyn Source,
    opts: &ResolveOptions,
    desired: &mut Desired,
    changed: Changed,
    everything: bool,
    invalid: &mut Invalid,
) -> Result<Option<BTreeSet<ServiceId>>, InputErrors> {
    let lenient = source.skips_bad_objects();
    if let (false, Changed::Services(ids)) = (everything, changed)
        && let Some(objects) = source.objects_of(&ids)
    {
        if !lenient {
            desired.apply_partial(&ids, resolve::resolve(&objects, opts)?)?;
            return Ok(Some(ids));
        }
        // A bad Service (or slice) is left out: it keeps what `desired` holds for it.
        let (mut partial, mut errors, skipped) = resolve::resolve_skipping(&objects, opts);
        let mut good: BTreeSet<ServiceId> = ids.difference(&skipped).cloned().collect();
        for _ in 0..4 {
            match desired.apply_partial(&good, partial.clone()) {
                Ok(()) => break,
                Err(InputErrors(clashes)) => {
                    for e in clashes {
                        let owner = service_named(&e);
                        if let Some(id) = &owner {
                            good.remove(id);
                            partial.services.remove(id);
                        }
                        errors.push((owner, e));
                    }
                }
            }
        }
        invalid.update(Some(&ids), errors);
        return Ok(Some(good));
    }
    if !lenient {
        desired.replace_all(resolve::resolve(&source.objects()?, opts)?);
        return Ok(None);
    }
    let (mut snapshot, errors, skipped) = resolve::resolve_skipping(&source.objects()?, opts);
    for id in &skipped {
        if let Some(last_good) = desired.snapshot().services.get(id) {
            snapshot.services.insert(id.clone(), last_good.clone());
        }
    }
    desired.replace_all(snapshot);
    invalid.update(None, errors);
    Ok(None)
}
