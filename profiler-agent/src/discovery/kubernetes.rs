//! Kubernetes pod discovery (the `kubernetes` [`super::Provider`]): the pods of this node as
//! targets, labelled as Prometheus' `kubernetes_sd_configs` role `pod` labels them.
//!
//! The real `kube` client lists the pods with `fieldSelector=spec.nodeName=<node>`, then
//! watches from the list's resourceVersion (kube's runtime watcher, which relists when the
//! watch answers `410 Gone` in an ERROR event; a `410` answered to the watch request itself
//! restarts the watcher here, so that too ends in a relist). Every change publishes the full
//! current set through a [`tokio::sync::watch`] channel: one label set per container of each
//! pod, init containers included (`__meta_kubernetes_pod_container_init="true"`).
//!
//! Failures (API server down, error statuses, malformed answers) are retried with jittered
//! exponential backoff while the last good set stays published; each one is counted
//! ([`PodDiscovery::errors`]) and each distinct cause is logged once per outage. A `410`
//! is the protocol asking for a relist, not a failure: neither counted nor logged above
//! debug. kube itself logs every failed request (`kube_client` targets, ERROR level): the
//! agent's log filter should quieten those targets.
//!
//! Differences from Prometheus' pod role: one target per container, not per container
//! port, so there are no `__meta_kubernetes_pod_container_port_*` labels and `__address__`
//! is the bare pod IP; labels whose value would be empty are left out (Prometheus treats an
//! empty label as an absent one); the optional node, namespace, deployment and job metadata
//! are not attached.

use crate::backoff::Backoff;
use crate::labels::{Labels, sanitize_label_name};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{StreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The environment variable naming this node when `node_name` is not configured (set it
/// from the downward API: `fieldRef: {fieldPath: spec.nodeName}`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";

const META: &str = "__meta_kubernetes_";

/// `kubernetes` section of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// This node's name; the `NODE_NAME` environment variable when absent.
    pub node_name: Option<String>,
    /// A kubeconfig file; else the in-cluster service account, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
}

/// Why Kubernetes discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "kubernetes discovery needs this node's name: set `node_name` in the kubernetes \
         config or the {NODE_NAME_ENV} environment variable"
    )]
    MissingNodeName,
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no kubernetes client configuration: not in a cluster ({in_cluster}) and no usable \
         default kubeconfig ({kubeconfig})"
    )]
    NoClientConfig {
        in_cluster: kube::config::InClusterError,
        #[source]
        kubeconfig: kube::config::KubeconfigError,
    },
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// The node name from the config, else from the `NODE_NAME` value given; empty means absent.
pub fn resolve_node_name(
    config: &KubernetesConfig,
    env_value: Option<String>,
) -> Result<String, KubernetesError> {
    config
        .node_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| env_value.filter(|n| !n.trim().is_empty()))
        .map(|n| n.trim().to_owned())
        .ok_or(KubernetesError::MissingNodeName)
}

/// A client from `config.kubeconfig` when set, else in-cluster (service account token and
/// `KUBERNETES_SERVICE_HOST`), else the default kubeconfig.
pub async fn client_from_config(config: &KubernetesConfig) -> Result<Client, KubernetesError> {
    let client_config = match &config.kubeconfig {
        Some(path) => {
            let wrap = |source| KubernetesError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(wrap)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(wrap)?
        }
        // As Prometheus and Alloy: in-cluster when no kubeconfig is configured; the
        // default kubeconfig (`$KUBECONFIG`, `~/.kube/config`) helps outside a cluster.
        None => match kube::Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => {
                let options = KubeConfigOptions::default();
                kube::Config::from_kubeconfig(&options)
                    .await
                    .map_err(|kubeconfig| KubernetesError::NoClientConfig {
                        in_cluster,
                        kubeconfig,
                    })?
            }
        },
    };
    Ok(Client::try_from(client_config)?)
}

/// Retry and paging knobs; the defaults suit production, tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOptions {
    /// First retry delay (before jitter).
    pub backoff_min: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// A failure this long after the previous one starts the backoff again from the minimum.
    pub backoff_reset: Duration,
    /// Pods per list page.
    pub page_size: u32,
}

impl Default for RetryOptions {
    fn default() -> Self {
        Self {
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            backoff_reset: Duration::from_secs(120),
            page_size: 500,
        }
    }
}

/// Discovery of the pods of one node.
pub struct PodDiscovery {
    client: Client,
    node_name: String,
    options: RetryOptions,
    errors: Arc<AtomicU64>,
}

impl PodDiscovery {
    /// Resolves the node name (config, else `NODE_NAME`) and builds the client.
    pub async fn from_config(config: &KubernetesConfig) -> Result<Self, KubernetesError> {
        let node_name = resolve_node_name(config, std::env::var(NODE_NAME_ENV).ok())?;
        let client = client_from_config(config).await?;
        Ok(Self::new(client, node_name))
    }

    pub fn new(client: Client, node_name: String) -> Self {
        Self {
            client,
            node_name,
            options: RetryOptions::default(),
            errors: Arc::default(),
        }
    }

    #[must_use]
    pub fn with_options(mut self, options: RetryOptions) -> Self {
        self.options = options;
        self
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Count of failed API calls and bad answers so far; keeps counting while `run` runs.
    pub fn errors(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.errors)
    }

    /// Lists and watches until every receiver of `tx` is gone, publishing the full target
    /// set whenever it changes. Never fails: errors are retried with backoff.
    pub async fn run(self, tx: watch::Sender<Vec<Labels>>) {
        tokio::select! {
            () = self.watch_loop(&tx) => {}
            () = tx.closed() => {}
        }
    }

    async fn watch_loop(&self, tx: &watch::Sender<Vec<Labels>>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let watch_config = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", self.node_name))
            .page_size(self.options.page_size);
        let mut backoff = Backoff::new(self.options.backoff_min, self.options.backoff_max)
            .with_reset_after(self.options.backoff_reset);
        let mut causes = CauseLog::default();
        let mut state = PodTargets::default();
        loop {
            let mut events = pin!(watcher(api.clone(), watch_config.clone()));
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        causes.success(&self.node_name);
                        if state.apply(event, &self.node_name) {
                            let targets = state.targets();
                            tx.send_if_modified(|current| {
                                let changed = *current != targets;
                                if changed {
                                    *current = targets;
                                }
                                changed
                            });
                        }
                    }
                    Err(err) => {
                        if is_expired(&err) {
                            // Routine: the watch fell behind the server's history.
                            tracing::debug!(node = %self.node_name, error = %ErrorChain(&err),
                                "kubernetes pod watch expired, relisting");
                        } else {
                            self.errors.fetch_add(1, Ordering::Relaxed);
                            causes.failure(&err, &self.node_name);
                        }
                        tokio::time::sleep(backoff.next_delay()).await;
                        if needs_restart(&err) {
                            break;
                        }
                    }
                }
            }
            // Restarting the watcher starts with a fresh list; the targets stay published.
            state.abandon_init();
        }
    }
}

/// `410 Gone`/`Expired`: the resourceVersion is older than the server's history. Part of
/// the protocol (a relist follows), so neither counted as an error nor logged above debug.
fn is_expired(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::WatchError(status) => status.code == 410,
        _ => needs_restart(err),
    }
}

/// kube's watcher relists on a `410` ERROR event but retries a watch request answered
/// with HTTP `410` forever with the same expired resourceVersion: restart it instead.
fn needs_restart(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

impl super::Provider for PodDiscovery {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn errors(&self) -> Arc<AtomicU64> {
        PodDiscovery::errors(self)
    }

    fn run(self: Box<Self>, tx: watch::Sender<Vec<Labels>>) -> BoxFuture<'static, ()> {
        Box::pin(PodDiscovery::run(*self, tx))
    }
}

/// The targets of each pod (by `namespace/name`), plus the pods of a relist in progress.
#[derive(Default)]
struct PodTargets {
    pods: BTreeMap<String, Vec<Labels>>,
    relist: Option<BTreeMap<String, Vec<Labels>>>,
}

impl PodTargets {
    /// Applies one watcher event; true when the published set may have changed.
    fn apply(&mut self, event: watcher::Event<Pod>, node_name: &str) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(pod) => {
                let relist = self.relist.get_or_insert_with(BTreeMap::new);
                if on_node(&pod, node_name) {
                    relist.insert(pod_key(&pod), pod_targets(&pod));
                }
                false
            }
            watcher::Event::InitDone => {
                self.pods = self.relist.take().unwrap_or_default();
                true
            }
            watcher::Event::Apply(pod) => {
                let key = pod_key(&pod);
                if on_node(&pod, node_name) {
                    self.pods.insert(key, pod_targets(&pod));
                } else {
                    self.pods.remove(&key);
                }
                true
            }
            watcher::Event::Delete(pod) => self.pods.remove(&pod_key(&pod)).is_some(),
        }
    }

    fn abandon_init(&mut self) {
        self.relist = None;
    }

    fn targets(&self) -> Vec<Labels> {
        self.pods.values().flatten().cloned().collect()
    }
}

fn pod_key(pod: &Pod) -> String {
    let meta = &pod.metadata;
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The field selector already filters; this guards against a server that ignores it.
fn on_node(pod: &Pod, node_name: &str) -> bool {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name)
}

/// Sets `__meta_kubernetes_<name>` unless the value is empty (Prometheus drops empty labels).
fn put(labels: &mut Labels, name: &str, value: Option<&str>) {
    if let Some(value) = value.filter(|v| !v.is_empty()) {
        labels.insert(format!("{META}{name}"), value.to_owned());
    }
}

/// The targets of one pod, labelled as Prometheus' pod role does: one per container (the
/// regular ones first, then the init containers); none while the pod has no IP.
pub fn pod_targets(pod: &Pod) -> Vec<Labels> {
    let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else {
        return Vec::new();
    };
    let Some(pod_ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) else {
        return Vec::new();
    };
    let meta = &pod.metadata;
    let mut common = Labels::from([("__address__".to_owned(), pod_ip.to_owned())]);
    put(&mut common, "namespace", meta.namespace.as_deref());
    put(&mut common, "pod_name", meta.name.as_deref());
    put(&mut common, "pod_uid", meta.uid.as_deref());
    put(&mut common, "pod_ip", Some(pod_ip));
    put(&mut common, "pod_host_ip", status.host_ip.as_deref());
    put(&mut common, "pod_node_name", spec.node_name.as_deref());
    put(&mut common, "pod_phase", status.phase.as_deref());
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready");
    let ready = ready.map_or_else(|| "unknown".to_owned(), |c| c.status.to_lowercase());
    put(&mut common, "pod_ready", Some(&ready));
    let mut owners = meta.owner_references.iter().flatten();
    if let Some(owner) = owners.find(|r| r.controller == Some(true)) {
        put(&mut common, "pod_controller_kind", Some(&owner.kind));
        put(&mut common, "pod_controller_name", Some(&owner.name));
    }
    for (kind, map) in [("label", &meta.labels), ("annotation", &meta.annotations)] {
        for (name, value) in map.iter().flatten() {
            let name = sanitize_label_name(name);
            put(&mut common, &format!("pod_{kind}_{name}"), Some(value));
            put(
                &mut common,
                &format!("pod_{kind}present_{name}"),
                Some("true"),
            );
        }
    }

    let regular = spec.containers.iter().map(|c| (c, false));
    let init = spec.init_containers.iter().flatten().map(|c| (c, true));
    regular
        .chain(init)
        .map(|(container, is_init)| {
            let statuses = if is_init {
                &status.init_container_statuses
            } else {
                &status.container_statuses
            };
            let mut labels = common.clone();
            put(&mut labels, "pod_container_name", Some(&container.name));
            let id = container_id(statuses.as_deref(), &container.name);
            put(&mut labels, "pod_container_id", id);
            put(
                &mut labels,
                "pod_container_image",
                container.image.as_deref(),
            );
            put(
                &mut labels,
                "pod_container_init",
                Some(&is_init.to_string()),
            );
            labels
        })
        .collect()
}

/// The container id as the API reports it (`containerd://<id>`); none until it runs.
fn container_id<'a>(statuses: Option<&'a [ContainerStatus]>, name: &str) -> Option<&'a str> {
    let status = statuses
        .unwrap_or_default()
        .iter()
        .find(|s| s.name == name)?;
    status.container_id.as_deref()
}

/// Logs each distinct failure cause once until discovery recovers.
#[derive(Default)]
struct CauseLog {
    seen: HashSet<String>,
}

impl CauseLog {
    /// Logs the failure unless its cause was logged since the last recovery; true if logged.
    fn failure(&mut self, err: &watcher::Error, node_name: &str) -> bool {
        let new = self.seen.insert(cause_of(err));
        if new {
            tracing::warn!(
                node = node_name,
                error = %ErrorChain(err),
                "kubernetes pod discovery failed, retrying with backoff (keeping the last targets)"
            );
        }
        new
    }

    /// Logs the recovery after failures; true if logged.
    fn success(&mut self, node_name: &str) -> bool {
        let recovered = !self.seen.is_empty();
        if recovered {
            self.seen.clear();
            tracing::info!(node = node_name, "kubernetes pod discovery recovered");
        }
        recovered
    }
}

/// A stable key for "the same failure": the stage plus the status code, the I/O error kind
/// or the kind of client error, without resource versions or addresses.
fn cause_of(err: &watcher::Error) -> String {
    let (stage, client_err) = match err {
        watcher::Error::InitialListFailed(e) => ("list", e),
        watcher::Error::WatchStartFailed(e) => ("watch", e),
        watcher::Error::WatchFailed(e) => ("watch stream", e),
        watcher::Error::WatchError(status) => {
            return format!("watch event: status {} {}", status.code, status.reason);
        }
        watcher::Error::NoResourceVersion => return "no resourceVersion".to_owned(),
    };
    let kind = match client_err {
        kube::Error::Api(status) => format!("status {} {}", status.code, status.reason),
        kube::Error::SerdeError(_) => "malformed answer".to_owned(),
        other => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(other);
            let mut io_kind = None;
            while let Some(e) = source {
                if let Some(io) = e.downcast_ref::<std::io::Error>() {
                    io_kind = Some(io.kind());
                }
                source = e.source();
            }
            match io_kind {
                Some(kind) => format!("i/o {kind:?}"),
                None => other
                    .to_string()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            }
        }
    };
    format!("{stage}: {kind}")
}

/// Displays an error with its sources, `a: b: c`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kube's errors often repeat their source's text: print each text once.
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(e) = source {
            let more = e.to_string();
            if !text.contains(&more) {
                text.push_str(": ");
                text.push_str(&more);
            }
            source = e.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod fake_apiserver;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod watch_tests;
