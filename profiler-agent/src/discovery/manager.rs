//! Runs the configured providers and turns their label sets into the current [`TargetSet`]:
//! static targets, Docker, Kubernetes and process scans each publish their full set; every
//! change is relabeled and resolved into a new set, published on a watch channel that the
//! pipeline reads once per interval (so processes seen before their target existed are
//! matched as soon as it does).
//!
//! Providers that fail keep retrying inside their own task and keep their last good targets;
//! their failure counts are exported per provider. Dropping [`Discovery`] stops every
//! provider (their channels close), which is how a reload replaces them.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    docker::DockerDiscovery,
    kubernetes::{KubernetesError, PodDiscovery},
    process,
    relabel::{self, RelabelConfig},
};
use crate::{
    config::AgentConfig,
    labels::Labels,
    metrics::{AgentMetrics, ProviderLabel},
    targets::{TargetOptions, TargetSet},
};

/// Longest wait for every provider's first answer before the first set is built anyway.
const FIRST_ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the current targets are published; shared across reloads.
pub type TargetsTx = Arc<watch::Sender<Arc<TargetSet>>>;

/// The running providers; dropping it stops them.
pub struct Discovery {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A provider's published sets, as forwarded to the combiner.
struct Update {
    provider: usize,
    targets: Vec<Labels>,
}

struct Provider {
    name: &'static str,
    errors: Arc<AtomicU64>,
}

impl Discovery {
    /// Starts the providers of `config` and the combiner publishing into `targets`, which
    /// flips `ready` to true once the first set is built. Must run inside a tokio runtime.
    pub async fn start(
        config: &AgentConfig,
        targets: TargetsTx,
        ready: Arc<watch::Sender<bool>>,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Self, KubernetesError> {
        let (updates_tx, updates_rx) = mpsc::channel::<Update>(16);
        let mut providers = Vec::new();
        let mut tasks = Vec::new();
        let mut initial = vec![config.targets.clone()];
        providers.push(Provider {
            name: "static",
            errors: Arc::default(),
        });

        let mut add =
            |name: &'static str,
             errors: Arc<AtomicU64>,
             spawn: &mut dyn FnMut(watch::Sender<Vec<Labels>>) -> JoinHandle<()>| {
                let (tx, rx) = watch::channel(Vec::new());
                let index = providers.len();
                providers.push(Provider { name, errors });
                initial.push(Vec::new());
                tasks.push(spawn(tx));
                tasks.push(tokio::spawn(forward(index, rx, updates_tx.clone())));
            };

        if let Some(docker) = &config.discovery.docker {
            let provider = DockerDiscovery::new(docker.clone());
            let errors = provider.errors();
            let mut provider = Some(provider);
            add("docker", errors, &mut |tx| {
                let p = provider.take().expect("spawned once");
                tokio::spawn(p.run(tx))
            });
        }
        if let Some(kubernetes) = &config.discovery.kubernetes {
            let provider = PodDiscovery::from_config(kubernetes).await?;
            let errors = provider.errors();
            let mut provider = Some(provider);
            add("kubernetes", errors, &mut |tx| {
                let p = provider.take().expect("spawned once");
                tokio::spawn(p.run(tx))
            });
        }
        if let Some(scan) = &config.discovery.process {
            let period = scan.refresh_interval;
            add("process", Arc::default(), &mut |tx| {
                tokio::spawn(scan_processes(period, tx))
            });
        }
        drop(updates_tx);

        let combiner = Combiner {
            providers,
            current: initial,
            relabel: config.relabel.clone(),
            options: config.target_options(),
            metrics,
            errors_seen: Vec::new(),
            logged: HashSet::new(),
        };
        tasks.push(tokio::spawn(combiner.run(updates_rx, targets, ready)));
        Ok(Self { tasks })
    }
}

async fn forward(provider: usize, mut rx: watch::Receiver<Vec<Labels>>, tx: mpsc::Sender<Update>) {
    while rx.changed().await.is_ok() {
        let targets = rx.borrow_and_update().clone();
        if tx.send(Update { provider, targets }).await.is_err() {
            return;
        }
    }
}

/// `discovery.process`: a fresh scan of /proc every `period`, off the async threads.
async fn scan_processes(period: Duration, tx: watch::Sender<Vec<Labels>>) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = tx.closed() => return,
        }
        let scan = tokio::task::spawn_blocking(|| process::scan(std::path::Path::new("/proc")));
        if let Ok(targets) = scan.await {
            tx.send_if_modified(|current| {
                let changed = *current != targets;
                *current = targets;
                changed
            });
        }
    }
}

struct Combiner {
    providers: Vec<Provider>,
    current: Vec<Vec<Labels>>,
    relabel: Vec<RelabelConfig>,
    options: TargetOptions,
    metrics: Arc<AgentMetrics>,
    errors_seen: Vec<u64>,
    /// Rejections already logged, so a bad target warns once, not once per rebuild.
    logged: HashSet<String>,
}

impl Combiner {
    async fn run(
        mut self,
        mut updates: mpsc::Receiver<Update>,
        targets: TargetsTx,
        ready: Arc<watch::Sender<bool>>,
    ) {
        self.errors_seen = vec![0; self.providers.len()];
        // The first set waits until every provider answered or failed once.
        let mut answered: Vec<bool> = (0..self.providers.len()).map(|i| i == 0).collect();
        let first_deadline = tokio::time::Instant::now() + FIRST_ROUND_TIMEOUT;
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        let mut published = false;
        loop {
            let mut changed = false;
            tokio::select! {
                update = updates.recv() => match update {
                    Some(Update { provider, targets }) => {
                        answered[provider] = true;
                        self.current[provider] = targets;
                        changed = true;
                    }
                    None => {
                        if published {
                            // Every provider stopped: nothing more will change.
                            std::future::pending::<()>().await;
                        }
                    }
                },
                _ = poll.tick() => {}
            }
            for (i, failed) in self.count_errors().into_iter().enumerate() {
                answered[i] |= failed;
            }
            let first_round_done =
                answered.iter().all(|a| *a) || tokio::time::Instant::now() >= first_deadline;
            if (changed && published) || (!published && first_round_done) {
                let set = self.build();
                self.metrics.active_targets.set(set.active() as i64);
                targets.send_replace(Arc::new(set));
                if !published {
                    published = true;
                    ready.send_replace(true);
                }
            }
        }
    }

    /// Exports provider failures; returns which providers failed since the last call.
    fn count_errors(&mut self) -> Vec<bool> {
        self.providers
            .iter()
            .zip(self.errors_seen.iter_mut())
            .map(|(p, seen)| {
                let now = p.errors.load(Ordering::Relaxed);
                let new = now.saturating_sub(*seen);
                if new > 0 {
                    self.metrics
                        .discovery_errors
                        .get_or_create(&ProviderLabel {
                            provider: p.name.to_owned(),
                        })
                        .inc_by(new);
                }
                *seen = now;
                new > 0
            })
            .collect()
    }

    fn build(&mut self) -> TargetSet {
        let relabeled: Vec<Labels> = self
            .current
            .iter()
            .flatten()
            .filter_map(|labels| relabel::process(labels.clone(), &self.relabel))
            .collect();
        let (set, rejected) = TargetSet::new(&relabeled, &self.options);
        self.metrics.targets_rejected.inc_by(rejected.len() as u64);
        for error in rejected {
            let message = error.to_string();
            if self.logged.insert(message.clone()) {
                tracing::warn!(error = %message, "target refused");
            }
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[tokio::test]
    async fn static_targets_are_relabeled_published_and_counted() {
        let config = AgentConfig::parse(
            r#"
            [[targets]]
            __process_pid__ = "4242"
            app = "db"
            [[targets]]
            __container_id__ = "abc"
            service_name = "web"
            [[targets]]
            __process_pid__ = "7"
            env = "drop-me"
            [[relabel]]
            source_labels = ["app"]
            regex = "(.+)"
            target_label = "service_name"
            replacement = "svc-$1"
            [[relabel]]
            source_labels = ["env"]
            regex = "drop-me"
            action = "drop"
            "#,
            "test",
            &|_| None,
        )
        .unwrap();
        let mut registry = Registry::default();
        let metrics = Arc::new(AgentMetrics::register(&mut registry));
        let (targets_tx, mut targets_rx) = watch::channel(Arc::new(TargetSet::default()));
        let (ready_tx, mut ready_rx) = watch::channel(false);
        let _discovery = Discovery::start(
            &config,
            Arc::new(targets_tx),
            Arc::new(ready_tx),
            metrics.clone(),
        )
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), ready_rx.wait_for(|r| *r))
            .await
            .expect("ready with only static targets")
            .unwrap();
        let set = targets_rx.borrow_and_update().clone();
        assert_eq!(set.active(), 2, "the dropped target is not active");
        assert_eq!(metrics.active_targets.get(), 2);
        assert_eq!(set.resolve(4242, None).unwrap().service_name(), "svc-db");
        assert_eq!(set.resolve(1, Some("abc")).unwrap().service_name(), "web");
        assert!(set.resolve(7, None).is_none());
    }
}
