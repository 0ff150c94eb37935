//! What the binary does besides running the agent: `--sync-once` (and its `--dry-run`),
//! `--cleanup`, and the `--table-shards` choice. Here rather than in `main.rs` so that each is
//! tested against the fake kernel.

use std::str::FromStr;

use crate::compile::{self, Options};
use crate::kernel::Kernel;
use crate::model::{Locality, Snapshot};
use crate::nft::{self, Netlink};
use crate::sync::Engine;
use crate::{plan, report};

/// `--table-shards`: `auto` or a number of tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    Auto,
    Fixed(u32),
}

impl FromStr for Shards {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Shards::Auto),
            _ => match s.parse::<u32>() {
                Ok(k @ 1..=crate::ruleset::MAX_SHARDS) => Ok(Shards::Fixed(k)),
                _ => {
                    Err(format!("{s:?}: expected auto or a number of tables from 1 to {}", crate::ruleset::MAX_SHARDS))
                }
            },
        }
    }
}

impl Shards {
    /// The number of tables: given, or for `auto` from the chains the Services there are now
    /// make (see `compile::chain_estimate`) and our tables already in the kernel.
    pub fn tables(self, chains: usize, existing_tables: usize) -> u32 {
        match self {
            Shards::Fixed(k) => k,
            Shards::Auto => {
                let tables = compile::auto_shards(chains, existing_tables);
                if tables > 1 {
                    tracing::info!(chains, existing_tables, tables, "--table-shards auto");
                }
                tables
            }
        }
    }
}

/// `--sync-once --dry-run`: the change a sync would send, as text; nothing is touched. A kernel
/// that cannot be read is planned against as empty (with a warning).
pub fn dry_run(kernel: &mut dyn Kernel, snapshot: &Snapshot, opts: &Options) -> String {
    let have = kernel.read_table().unwrap_or_else(|e| {
        tracing::warn!("cannot read the kernel ({e}); planning against an empty table");
        Default::default()
    });
    plan::plan(&have, compile::compile(snapshot, opts)).to_string()
}

/// `--sync-once`: one sync, logged; returns the table of what is served.
pub fn sync_once(
    kernel: impl Kernel + 'static,
    snapshot: &Snapshot,
    opts: Options,
    here: &Locality,
) -> crate::Result<String> {
    crate::agent::report_unserved(snapshot, &mut Default::default());
    let mut engine = Engine::new(kernel, opts);
    let outcome = engine.sync(snapshot)?;
    tracing::info!(
        kind = ?outcome.kind,
        messages = outcome.stats.messages,
        bytes = outcome.stats.bytes,
        read_back_ms = outcome.read_back.as_secs_f64() * 1e3,
        conntrack_deleted = outcome.conntrack_deleted,
        conntrack_ms = outcome.conntrack_time.as_secs_f64() * 1e3,
        total_ms = outcome.total.as_secs_f64() * 1e3,
        "synced"
    );
    // The process exits next: its memory goes with it. Freeing the engine's cache and the plan
    // (hundreds of thousands of small allocations) one by one took 0.2 s at 44,000 Services.
    std::mem::forget(outcome);
    std::mem::forget(engine);
    Ok(report::served_table(snapshot, here))
}

/// `--cleanup`: deletes our tables; says what it removed.
pub fn cleanup(nl: &mut Netlink) -> nft::Result<String> {
    Ok(match nl.delete_tables()? {
        0 => "nothing to remove".to_string(),
        1 => "removed table inet nftproxy".to_string(),
        n => format!("removed table inet nftproxy and {} shard tables", n - 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fake::FakeKernel;
    use crate::model::{Endpoint, Protocol, Service, ServiceId, ServicePort};

    fn snapshot() -> Snapshot {
        let eps = vec![Endpoint::ready("10.244.1.2".parse().unwrap(), 8080)];
        let port =
            ServicePort { name: "http".into(), port: 80, protocol: Protocol::Tcp, node_port: None, endpoints: eps };
        let id = ServiceId::new("default", "web");
        let mut snap = Snapshot::default();
        snap.services.insert(id.clone(), Service::new(id, vec!["10.96.0.80".parse().unwrap()], vec![port]));
        snap
    }

    #[test]
    fn shards_parse_and_choose() {
        assert_eq!("auto".parse(), Ok(Shards::Auto));
        assert_eq!("64".parse(), Ok(Shards::Fixed(64)));
        for bad in ["0", "65", "x", ""] {
            assert!(bad.parse::<Shards>().unwrap_err().contains("from 1 to 64"), "{bad}");
        }
        assert_eq!(Shards::Fixed(3).tables(60_000, 20), 3);
        assert_eq!(Shards::Auto.tables(60_000, 0), 4);
        assert_eq!(Shards::Auto.tables(60_000, 3), 3, "keeps the tables there are while close enough");
    }

    #[test]
    fn a_dry_run_touches_nothing_and_a_sync_once_then_leaves_nothing_to_do() {
        let mut k = FakeKernel::default();
        let text = dry_run(&mut k, &snapshot(), &Options::default());
        assert!(text.contains("+ table inet nftproxy") && text.contains("dnat ip to 10.244.1.2:8080"), "{text}");
        assert!(k.with(|s| s.committed.is_empty()), "a dry run commits nothing");
        let table = sync_once(k.clone(), &snapshot(), Options::default(), &Locality::default()).unwrap();
        assert!(table.contains("default/web") && table.contains("10.244.1.2:8080"), "{table}");
        assert_eq!(dry_run(&mut k, &snapshot(), &Options::default()).trim(), "no change");
    }
}
