//! Docker container discovery, the label sets of Prometheus' `docker_sd` (as used by Alloy's
//! `discovery.docker`), kept current from the Docker events stream.
//!
//! [`DockerDiscovery::run`] (the `docker` [`Provider`]) lists the running containers, then follows the daemon's events
//! (`start`, `die`, `stop`, `kill`, `destroy`, `rename`, `pause`, `unpause`, `restart`) and
//! lists again after each of them, and every `refresh_interval` as a safety net. The full set
//! of current targets, one label set per container sorted by container id, is published on a
//! [`watch`] channel whenever it changes.
//!
//! Labels of each target:
//! - `__meta_docker_container_id`: the full 64-hex-digit id;
//! - `__meta_docker_container_name`: the container's first name *without* Docker's leading
//!   `/` (Prometheus keeps the slash; the agent strips it so that the name is directly usable
//!   as `service_name`);
//! - `__meta_docker_container_label_<name>`: each container label, its name sanitised as
//!   Prometheus does (every character outside `[a-zA-Z0-9_]` becomes `_`);
//! - `__meta_docker_container_network_mode`: `HostConfig.NetworkMode`.
//!
//! Prometheus makes one target per (network, TCP port) of a container, with
//! `__meta_docker_network_*`, `__meta_docker_port_*` and `__address__` labels, because it
//! scrapes endpoints. A profiler matches processes, not endpoints, so here a container is
//! exactly one target and those per-network and per-port labels are not produced.
//!
//! Failures (socket absent, daemon restarted, malformed answers) never stop the discovery: it
//! reconnects with jittered exponential backoff (500 ms to 30 s by default), keeps the last
//! good set published meanwhile, counts every failure ([`DockerDiscovery::errors`]) and logs a
//! warning once per cause until it recovers.

use super::Provider;
use crate::{
    backoff::Backoff,
    labels::{Labels, sanitize_label_name},
};
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bollard::{
    Docker,
    models::{ContainerSummary, EventMessage},
    query_parameters::{EventsOptions, ListContainersOptions},
};
use futures_util::{StreamExt as _, future::BoxFuture};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub const LABEL_CONTAINER_ID: &str = "__meta_docker_container_id";
pub const LABEL_CONTAINER_NAME: &str = "__meta_docker_container_name";
pub const LABEL_CONTAINER_LABEL_PREFIX: &str = "__meta_docker_container_label_";
pub const LABEL_CONTAINER_NETWORK_MODE: &str = "__meta_docker_container_network_mode";

/// Container event actions after which the container list is read again. Others (`exec_*`,
/// `health_status`, `attach`, `top`, ...) cannot change the set or its labels.
pub const RELEVANT_ACTIONS: [&str; 9] = [
    "start", "restart", "die", "stop", "kill", "destroy", "rename", "pause", "unpause",
];

/// Per-request timeout of the Docker client (not of the events stream, which stays open).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Timeout for the response headers of the events stream (see `DockerDiscovery::session`).
const EVENTS_HEADER_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A session that published a good set and then lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// `discovery.docker`-like configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Daemon address: `unix:///path/to/docker.sock`, or `tcp://host:port` / `http://...`
    /// (plain HTTP; TLS is not supported).
    pub host: String,
    /// How often the container list is read even without events (humantime, e.g. `60s`).
    #[serde(with = "crate::duration::positive")]
    pub refresh_interval: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            host: "unix:///var/run/docker.sock".to_owned(),
            refresh_interval: Duration::from_secs(60),
        }
    }
}

impl DockerConfig {
    /// Rejects a `host` whose scheme the client cannot speak (`unix://`, `tcp://`, `http://`),
    /// which retrying would never fix. A missing socket is not an error here: the daemon may
    /// start later.
    pub fn validate(&self) -> Result<(), DockerDiscoveryError> {
        let ok = ["unix://", "tcp://", "http://"]
            .iter()
            .any(|scheme| self.host.len() > scheme.len() && self.host.starts_with(scheme));
        if ok {
            Ok(())
        } else {
            Err(DockerDiscoveryError::InvalidHost(self.host.clone()))
        }
    }
}

/// Why one connection to the daemon failed; the discovery retries after each.
#[derive(Debug, thiserror::Error)]
pub enum DockerDiscoveryError {
    #[error("Docker host {0:?} is not unix://PATH, tcp://HOST:PORT or http://HOST:PORT")]
    InvalidHost(String),
    #[error("cannot connect to Docker at {host}: {source}")]
    Connect {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("listing Docker containers: {0}")]
    List(#[source] bollard::errors::Error),
    #[error("Docker events stream: {0}")]
    Events(#[source] bollard::errors::Error),
    #[error("Docker events stream ended (daemon stopped or restarted?)")]
    EventsEnded,
    #[error("malformed container in Docker's list: {0}")]
    Malformed(String),
}

impl DockerDiscoveryError {
    /// A short key naming the cause, without the varying details: warnings are logged once
    /// per cause.
    pub fn cause(&self) -> String {
        fn kind(e: &bollard::errors::Error) -> String {
            let debug = format!("{e:?}");
            debug
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default()
                .to_owned()
        }
        match self {
            Self::InvalidHost(_) => "invalid_host".to_owned(),
            Self::Connect { source, .. } => format!("connect/{}", kind(source)),
            Self::List(e) => format!("list/{}", kind(e)),
            Self::Events(e) => format!("events/{}", kind(e)),
            Self::EventsEnded => "events/ended".to_owned(),
            Self::Malformed(_) => "malformed".to_owned(),
        }
    }
}

/// The label set of one listed container; `None` when Docker gave no id or no name
/// (Prometheus skips containers without names too).
pub fn container_labels(c: &ContainerSummary) -> Option<Labels> {
    let id = c.id.as_deref().filter(|id| !id.is_empty())?;
    let name = c.names.as_ref()?.first()?;
    let mut labels = Labels::new();
    labels.insert(LABEL_CONTAINER_ID.to_owned(), id.to_owned());
    labels.insert(
        LABEL_CONTAINER_NAME.to_owned(),
        name.strip_prefix('/').unwrap_or(name).to_owned(),
    );
    labels.insert(
        LABEL_CONTAINER_NETWORK_MODE.to_owned(),
        c.host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone())
            .unwrap_or_default(),
    );
    for (k, v) in c.labels.iter().flatten() {
        labels.insert(
            format!("{LABEL_CONTAINER_LABEL_PREFIX}{}", sanitize_label_name(k)),
            v.clone(),
        );
    }
    Some(labels)
}

/// Targets of a container list, sorted by container id, plus how many entries were
/// malformed (no id or no name) and skipped.
pub fn targets(containers: &[ContainerSummary]) -> (Vec<Labels>, usize) {
    let mut out: Vec<Labels> = containers.iter().filter_map(container_labels).collect();
    out.sort_by(|a, b| a.get(LABEL_CONTAINER_ID).cmp(&b.get(LABEL_CONTAINER_ID)));
    let skipped = containers.len() - out.len();
    (out, skipped)
}

/// True when an event should make the discovery read the container list again.
pub fn is_relevant(event: &EventMessage) -> bool {
    let Some(action) = event.action.as_deref() else {
        return false;
    };
    // Some actions carry details after a colon ("exec_start: sh", "health_status: healthy").
    let action = action.split(':').next().unwrap_or_default().trim();
    RELEVANT_ACTIONS.contains(&action)
}

/// The Docker discovery provider. See the module documentation.
pub struct DockerDiscovery {
    config: DockerConfig,
    backoff_min: Duration,
    backoff_max: Duration,
    errors: Arc<AtomicU64>,
}

impl DockerDiscovery {
    pub fn new(config: DockerConfig) -> Self {
        Self {
            config,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            errors: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Overrides the reconnection backoff bounds (500 ms .. 30 s by default).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// The error counter: every failed connection, list or events stream, and every malformed
    /// container skipped. Shared: it keeps counting while [`Self::run`] runs.
    pub fn errors(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.errors)
    }

    /// Runs until every receiver of `tx` is dropped, publishing the current targets.
    pub async fn run(self, tx: watch::Sender<Vec<Labels>>) {
        let mut backoff = Backoff::new(self.backoff_min, self.backoff_max);
        let mut log = FailureLog::default();
        loop {
            let mut healthy_since = None;
            let result = self.session(&tx, &mut healthy_since, &mut log).await;
            let err = match result {
                Ok(()) => return, // nobody listens any more
                Err(e) => e,
            };
            self.errors.fetch_add(1, Ordering::Relaxed);
            if healthy_since.is_some_and(|t: Instant| t.elapsed() >= HEALTHY_AFTER) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            log.failed(&err, delay);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tx.closed() => return,
            }
        }
    }

    /// One connection: list, then follow events until something fails. `Ok(())` only when
    /// every receiver is gone.
    async fn session(
        &self,
        tx: &watch::Sender<Vec<Labels>>,
        healthy_since: &mut Option<Instant>,
        log: &mut FailureLog,
    ) -> Result<(), DockerDiscoveryError> {
        let docker = connect(&self.config.host).await?;
        // Events from a second before the first list on: an event racing with the list is
        // replayed (one extra list) rather than lost.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(1))
            .unwrap_or_default();
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            (
                "event".to_owned(),
                RELEVANT_ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
            ),
        ]);
        // The client's timeout covers waiting for response headers, which Docker sends at
        // once for `/events`; a quiet daemon or a proxy that holds them back until the first
        // event must not turn into a reconnection every REQUEST_TIMEOUT.
        let events_client = docker.clone().with_timeout(EVENTS_HEADER_TIMEOUT);
        let mut events = events_client.events(Some(EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        }));
        let period = self.config.refresh_interval;
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stale = true;
        loop {
            if stale {
                stale = false;
                let list = docker.list_containers(Some(ListContainersOptions::default()));
                tokio::pin!(list);
                // Poll the events stream while listing, so that its request is under way.
                let containers = loop {
                    tokio::select! {
                        r = &mut list => break r.map_err(DockerDiscoveryError::List)?,
                        ev = events.next() => stale |= event_needs_list(ev)?,
                        _ = tx.closed() => return Ok(()),
                    }
                };
                let (set, skipped) = targets(&containers);
                if skipped > 0 {
                    self.errors.fetch_add(skipped as u64, Ordering::Relaxed);
                    log.malformed(skipped);
                }
                tx.send_if_modified(|current| {
                    if *current == set {
                        return false;
                    }
                    *current = set;
                    true
                });
                healthy_since.get_or_insert_with(Instant::now);
                log.recovered();
                refresh.reset();
                continue;
            }
            tokio::select! {
                ev = events.next() => stale = event_needs_list(ev)?,
                _ = refresh.tick() => stale = true,
                _ = tx.closed() => return Ok(()),
            }
        }
    }
}

async fn connect(host: &str) -> Result<Docker, DockerDiscoveryError> {
    let err = |source| DockerDiscoveryError::Connect {
        host: host.to_owned(),
        source,
    };
    let docker = Docker::connect_with_host(host)
        .map_err(err)?
        .with_timeout(REQUEST_TIMEOUT);
    // bollard speaks a newer API version than most daemons accept; agree on one.
    docker.negotiate_version().await.map_err(err)
}

fn event_needs_list(
    ev: Option<Result<EventMessage, bollard::errors::Error>>,
) -> Result<bool, DockerDiscoveryError> {
    match ev {
        None => Err(DockerDiscoveryError::EventsEnded),
        Some(Err(e)) => Err(DockerDiscoveryError::Events(e)),
        Some(Ok(m)) => Ok(is_relevant(&m)),
    }
}

impl Provider for DockerDiscovery {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn errors(&self) -> Arc<AtomicU64> {
        DockerDiscovery::errors(self)
    }

    fn run(self: Box<Self>, tx: watch::Sender<Vec<Labels>>) -> BoxFuture<'static, ()> {
        Box::pin(DockerDiscovery::run(*self, tx))
    }
}

/// Logs a warning once per cause while failing, and one line on recovery.
#[derive(Default)]
struct FailureLog {
    last_cause: Option<String>,
    failures: u64,
    malformed_logged: bool,
}

impl FailureLog {
    fn failed(&mut self, err: &DockerDiscoveryError, retry_in: Duration) {
        self.failures += 1;
        let cause = err.cause();
        if self.last_cause.as_deref() != Some(&cause) {
            tracing::warn!(
                error = %err,
                "Docker discovery failed; keeping the last targets, retrying in {retry_in:?} \
                 (further failures of this kind are not logged until it recovers)"
            );
            self.last_cause = Some(cause);
        } else {
            tracing::debug!(error = %err, "Docker discovery failed again; retry in {retry_in:?}");
        }
    }

    fn malformed(&mut self, skipped: usize) {
        if !self.malformed_logged {
            tracing::warn!("Docker listed {skipped} container(s) without an id or a name; skipped");
            self.malformed_logged = true;
        }
    }

    fn recovered(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "Docker discovery recovered");
        }
        self.failures = 0;
        self.last_cause = None;
    }
}

#[cfg(test)]
#[path = "docker_tests.rs"]
mod tests;
