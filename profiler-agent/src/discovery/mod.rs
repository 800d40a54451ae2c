//! Where the label sets attached to profiles come from and how they are rewritten: each
//! [`Provider`] (`static_targets` from config, `docker`, `kubernetes`, `process` scans)
//! publishes its full current targets on a watch channel, `manager` runs them and combines
//! their sets, and `relabel` applies Prometheus relabel rules before `crate::targets`
//! resolves processes to them. Owns the `[discovery]` table ([`DiscoveryConfig`]).

pub mod docker;
pub mod kubernetes;
pub mod manager;
pub mod process;
pub mod relabel;
pub mod static_targets;

use std::sync::{Arc, atomic::AtomicU64};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::labels::Labels;

/// `[discovery]`: a provider runs when its table is present.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    pub docker: Option<docker::DockerConfig>,
    pub kubernetes: Option<kubernetes::KubernetesConfig>,
    pub process: Option<process::ProcessDiscoveryConfig>,
}

/// A source of targets, run by [`manager::Discovery`] in a task of its own. A new source is
/// one implementation plus its line in [`manager::Discovery::providers`].
pub trait Provider: Send + 'static {
    /// The `provider` label of its failure counter, and its name in logs.
    fn name(&self) -> &'static str;

    /// Its failures so far, counted while [`Provider::run`] runs. The manager exports the
    /// increments and takes a failure for an answer, so a provider that cannot reach its
    /// source does not hold back the first set. Providers that cannot fail keep this default:
    /// a counter that stays at zero.
    fn errors(&self) -> Arc<AtomicU64> {
        Arc::default()
    }

    /// Publishes the provider's full current set on `tx` whenever it changes, until every
    /// receiver of `tx` is dropped. Never gives up on a failure: it counts it in
    /// [`Provider::errors`], keeps its last good set published and retries.
    fn run(self: Box<Self>, tx: watch::Sender<Vec<Labels>>) -> BoxFuture<'static, ()>;

    /// True for a provider that lists every process (process scans): a process that lived
    /// between two of its scans is then given at the drain the target the scan would have
    /// given it (`process::SnapshotTargets`).
    fn lists_every_process(&self) -> bool {
        false
    }
}
