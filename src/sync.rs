//! One pass from input to kernel: read manifests, resolve, compile, read the kernel back, plan,
//! apply. The continuous loop (watching, debouncing, metrics) builds on this.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::compile::{self, Options};
use crate::model::Snapshot;
use crate::nft::{ApplyStats, Netlink};
use crate::plan::{self, Plan};
use crate::ruleset::Ruleset;
use crate::source::{manifest, resolve};

#[derive(Debug, Clone, Default)]
pub struct Config {
    pub manifests: Vec<PathBuf>,
    pub resolve: resolve::ResolveOptions,
    pub compile: Options,
}

/// What the node should serve and the objects that do it.
pub fn desired(cfg: &Config) -> crate::Result<(Snapshot, Ruleset)> {
    let objects = manifest::load(&cfg.manifests)?;
    let snapshot = resolve::resolve(&objects, &cfg.resolve)?;
    let rules = compile::compile(&snapshot, &cfg.compile);
    Ok((snapshot, rules))
}

/// The outcome of one sync.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub plan: Plan,
    pub stats: ApplyStats,
    pub read_back: Duration,
    pub total: Duration,
}

/// Brings the kernel to `want` with the smallest transaction (none if nothing differs).
pub fn sync(nl: &mut Netlink, want: &Ruleset) -> crate::Result<Outcome> {
    let start = Instant::now();
    let have = nl.read_table()?;
    let read_back = start.elapsed();
    let plan = plan::plan(&have, want);
    let stats = nl.apply(&plan)?;
    Ok(Outcome {
        plan,
        stats,
        read_back,
        total: start.elapsed(),
    })
}
