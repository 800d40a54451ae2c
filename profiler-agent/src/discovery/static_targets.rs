//! The `[[targets]]` of the configuration as a provider: a set that never changes,
//! published once.

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::Provider;
use crate::labels::Labels;

/// The configured targets.
pub struct StaticTargets {
    targets: Vec<Labels>,
}

impl StaticTargets {
    pub fn new(targets: Vec<Labels>) -> Self {
        Self { targets }
    }
}

impl Provider for StaticTargets {
    fn name(&self) -> &'static str {
        "static"
    }

    fn run(self: Box<Self>, tx: watch::Sender<Vec<Labels>>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            tx.send_replace(self.targets);
            tx.closed().await;
        })
    }
}
