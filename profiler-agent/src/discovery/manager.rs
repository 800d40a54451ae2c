//! Runs the configured providers and turns their label sets into the current [`TargetSet`]:
//! [`Discovery::providers`] lists what the config enables (static targets, Docker,
//! Kubernetes, process scans) as `Box<dyn Provider>`, each runs in its own task and publishes
//! its full set; every change is relabeled and resolved into a new set, published on a watch
//! channel that the pipeline reads once per interval (so processes seen before their target
//! existed are matched as soon as it does). The first set waits until every provider
//! answered or failed once, or for `FIRST_ROUND_TIMEOUT`.
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
    DiscoveryConfig, Provider,
    docker::DockerDiscovery,
    kubernetes::{KubernetesError, PodDiscovery},
    process::{ProcessDiscovery, SnapshotTargets},
    relabel::{self, RelabelConfig},
    static_targets::StaticTargets,
};
use crate::{
    labels::Labels,
    metrics::{AgentMetrics, ProviderLabel},
    targets::{LateTargets, PROCESS_PID, TargetOptions, TargetSet},
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

/// What the combiner keeps of a provider once its task runs.
struct Source {
    name: &'static str,
    errors: Arc<AtomicU64>,
}

impl Discovery {
    /// The providers to run: the configured static `targets`, then Docker, Kubernetes and
    /// process scans when `config` has their tables.
    pub async fn providers(
        config: &DiscoveryConfig,
        targets: Vec<Labels>,
    ) -> Result<Vec<Box<dyn Provider>>, KubernetesError> {
        let mut providers: Vec<Box<dyn Provider>> = vec![Box::new(StaticTargets::new(targets))];
        if let Some(docker) = &config.docker {
            providers.push(Box::new(DockerDiscovery::new(docker.clone())));
        }
        if let Some(kubernetes) = &config.kubernetes {
            providers.push(Box::new(PodDiscovery::from_config(kubernetes).await?));
        }
        if let Some(scan) = &config.process {
            providers.push(Box::new(ProcessDiscovery::new(scan.refresh_interval)));
        }
        Ok(providers)
    }

    /// Runs `providers`, each in its own task, and the combiner that relabels their sets
    /// and publishes the result into `targets`, flipping `ready` to true once the first set
    /// is built. Must run inside a tokio runtime.
    pub fn start(
        providers: Vec<Box<dyn Provider>>,
        relabel: Vec<RelabelConfig>,
        options: TargetOptions,
        targets: TargetsTx,
        ready: Arc<watch::Sender<bool>>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let late = providers.iter().any(|p| p.lists_every_process()).then(|| {
            Arc::new(SnapshotTargets::new("/proc", relabel.clone())) as Arc<dyn LateTargets>
        });
        let (updates_tx, updates_rx) = mpsc::channel::<Update>(16);
        let mut sources = Vec::with_capacity(providers.len());
        let mut tasks = Vec::with_capacity(2 * providers.len() + 1);
        for (index, provider) in providers.into_iter().enumerate() {
            let (tx, rx) = watch::channel(Vec::new());
            sources.push(Source {
                name: provider.name(),
                errors: provider.errors(),
            });
            tasks.push(tokio::spawn(provider.run(tx)));
            tasks.push(tokio::spawn(forward(index, rx, updates_tx.clone())));
        }
        drop(updates_tx);

        let combiner = Combiner {
            current: vec![Vec::new(); sources.len()],
            sources,
            relabel,
            options,
            late,
            metrics,
            errors_seen: Vec::new(),
            logged: HashSet::new(),
        };
        tasks.push(tokio::spawn(combiner.run(updates_rx, targets, ready)));
        Self { tasks }
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

struct Combiner {
    sources: Vec<Source>,
    current: Vec<Vec<Labels>>,
    relabel: Vec<RelabelConfig>,
    options: TargetOptions,
    /// Set when a provider lists every process: names the processes its scans missed.
    late: Option<Arc<dyn LateTargets>>,
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
        self.errors_seen = vec![0; self.sources.len()];
        // The first set waits until every provider answered or failed once.
        let mut answered = vec![false; self.sources.len()];
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
        self.sources
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
        // Processes a scan listed were decided by the rules already: only the others are
        // named late.
        let listed = self
            .current
            .iter()
            .flatten()
            .filter_map(|labels| labels.get(PROCESS_PID)?.parse().ok())
            .collect();
        let set = set.with_late(self.late.clone(), listed);
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
    use crate::config::AgentConfig;
    use futures_util::future::BoxFuture;
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
        let providers = Discovery::providers(&config.discovery, config.targets.clone())
            .await
            .unwrap();
        let _discovery = Discovery::start(
            providers,
            config.relabel.clone(),
            config.target_options(),
            Arc::new(targets_tx),
            Arc::new(ready_tx),
            metrics.clone(),
        );
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

    /// Publishes `targets` once, as a provider whose source never changes.
    struct Fixed(Vec<Labels>);

    impl Provider for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }

        fn run(self: Box<Self>, tx: watch::Sender<Vec<Labels>>) -> BoxFuture<'static, ()> {
            Box::pin(async move {
                tx.send_replace(self.0);
                tx.closed().await;
            })
        }
    }

    /// Cannot reach its source: counts one failure and never publishes.
    #[derive(Default)]
    struct Failing(Arc<AtomicU64>);

    impl Provider for Failing {
        fn name(&self) -> &'static str {
            "failing"
        }

        fn errors(&self) -> Arc<AtomicU64> {
            self.0.clone()
        }

        fn run(self: Box<Self>, tx: watch::Sender<Vec<Labels>>) -> BoxFuture<'static, ()> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::Relaxed);
                tx.closed().await;
            })
        }
    }

    /// Publishes each set the test sends it.
    struct Scripted(mpsc::Receiver<Vec<Labels>>);

    impl Provider for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }

        fn run(mut self: Box<Self>, tx: watch::Sender<Vec<Labels>>) -> BoxFuture<'static, ()> {
            Box::pin(async move {
                while let Some(set) = self.0.recv().await {
                    tx.send_replace(set);
                }
                tx.closed().await;
            })
        }
    }

    fn target(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    struct Running {
        _discovery: Discovery,
        targets: watch::Receiver<Arc<TargetSet>>,
        ready: watch::Receiver<bool>,
        metrics: Arc<AgentMetrics>,
    }

    fn run(providers: Vec<Box<dyn Provider>>) -> Running {
        let metrics = Arc::new(AgentMetrics::register(&mut Registry::default()));
        let (targets_tx, targets) = watch::channel(Arc::new(TargetSet::default()));
        let (ready_tx, ready) = watch::channel(false);
        let discovery = Discovery::start(
            providers,
            Vec::new(),
            TargetOptions::default(),
            Arc::new(targets_tx),
            Arc::new(ready_tx),
            metrics.clone(),
        );
        Running {
            _discovery: discovery,
            targets,
            ready,
            metrics,
        }
    }

    #[tokio::test]
    async fn a_failing_provider_does_not_hold_back_the_others() {
        let failing = Failing::default();
        let errors = failing.errors();
        let mut running = run(vec![
            Box::new(Fixed(vec![target(&[
                ("__process_pid__", "10"),
                ("service_name", "a"),
            ])])),
            Box::new(failing),
            Box::new(Fixed(vec![target(&[
                ("__container_id__", "c1"),
                ("service_name", "b"),
            ])])),
        ]);
        // Well before FIRST_ROUND_TIMEOUT: the failure counts as the provider's answer.
        assert!(FIRST_ROUND_TIMEOUT > Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(5), running.ready.wait_for(|r| *r))
            .await
            .expect("ready although one provider fails")
            .unwrap();
        let set = running.targets.borrow_and_update().clone();
        assert_eq!(set.active(), 2);
        assert_eq!(set.resolve(10, None).unwrap().service_name(), "a");
        assert_eq!(set.resolve(11, Some("c1")).unwrap().service_name(), "b");
        assert_eq!(errors.load(Ordering::Relaxed), 1);
        let exported = |provider: &str| {
            running
                .metrics
                .discovery_errors
                .get_or_create(&ProviderLabel {
                    provider: provider.to_owned(),
                })
                .get()
        };
        assert_eq!(exported("failing"), 1);
        assert_eq!(exported("fixed"), 0);
    }

    #[tokio::test]
    async fn the_first_set_waits_for_every_provider_and_later_sets_replace_earlier_ones() {
        let (script, scripted) = mpsc::channel(4);
        let mut running = run(vec![
            Box::new(Fixed(vec![target(&[("__process_pid__", "1")])])),
            Box::new(Scripted(scripted)),
        ]);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            !*running.ready.borrow(),
            "published before every provider answered"
        );

        script
            .send(vec![target(&[("__process_pid__", "2")])])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), running.ready.wait_for(|r| *r))
            .await
            .expect("ready once every provider answered")
            .unwrap();
        let set = running.targets.borrow_and_update().clone();
        assert_eq!(set.active(), 2);
        assert!(set.resolve(2, None).is_some());

        script
            .send(vec![target(&[("__process_pid__", "3")])])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), running.targets.changed())
            .await
            .expect("a new set")
            .unwrap();
        let set = running.targets.borrow_and_update().clone();
        assert_eq!(set.active(), 2);
        assert!(
            set.resolve(1, None).is_some(),
            "the other provider's target stays"
        );
        assert!(
            set.resolve(2, None).is_none(),
            "replaced by the provider's new set"
        );
        assert!(set.resolve(3, None).is_some());
    }
}
