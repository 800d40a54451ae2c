//! The write path: every collect interval the daemon hands one batch (a gzipped pprof per
//! target) to the [`Writer`], which delivers it to every configured sink concurrently: the
//! Pyroscope Connect push API (`push`), Pyroscope's legacy `/ingest` (`ingest`), DataKit's
//! profiling input (`datakit`) and a local directory (`directory`). Each sink has its own
//! bounded queue and task (`queue`), so a slow or dead endpoint never blocks the caller or
//! the other sinks; retries use jittered exponential backoff. Owns the `[write]` config
//! (`config`) and the pyroscope.write metrics (`metrics`).

pub mod config;
pub mod datakit;
pub mod directory;
mod http;
pub mod ingest;
pub mod metrics;
pub mod push;
pub mod queue;

#[cfg(test)]
mod tests;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

pub use config::{
    BasicAuth, EndpointConfig, Protocol, Secret, TlsConfig, WriteConfig, WriteConfigError,
};
pub use metrics::{DropReason, WriteMetrics};
pub use queue::RetryPolicy;

use crate::labels::{Labels, SERVICE_NAME};

/// Where built profiles go: the daemon's current writer (its `submit` only enqueues).
pub type Submit = std::sync::Arc<dyn Fn(Vec<ProfileSeries>) + Send + Sync>;

/// The metric name label every series carries (as pyroscope.ebpf).
pub const PROFILE_NAME: &str = "process_cpu";

/// One target's profile for one interval.
#[derive(Clone, Debug)]
pub struct ProfileSeries {
    /// `service_name` plus the target's labels (no `__` labels). The writer adds
    /// `__name__="process_cpu"` and the external labels that the series does not already
    /// have (as pyroscope.write: external labels never override).
    pub labels: Labels,
    /// The gzipped pprof; cloning shares it.
    pub pprof_gzip: bytes::Bytes,
    pub start: std::time::SystemTime,
    pub end: std::time::SystemTime,
    /// Samples per second the profile was taken at.
    pub sample_rate: u32,
    /// Samples in the profile.
    pub samples: u64,
}

impl ProfileSeries {
    /// `service_name`, or `unspecified`.
    pub fn service_name(&self) -> &str {
        self.labels
            .get(SERVICE_NAME)
            .map_or("unspecified", String::as_str)
    }
}

/// What a sink reports for a delivered batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// The HTTP status, if any.
    pub status: Option<u16>,
}

/// Why a send failed, and whether trying again could help.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Network error, timeout, 5xx, 408 or 429: retried with backoff, or after
    /// `retry_after` when the endpoint said so.
    #[error("{cause}")]
    Retryable {
        status: Option<u16>,
        retry_after: Option<Duration>,
        cause: String,
    },
    /// Refused for good (other 4xx, unwritable file): dropped, never retried.
    #[error("{cause}")]
    Permanent { status: Option<u16>, cause: String },
}

impl SendError {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Retryable { status, .. } | Self::Permanent { status, .. } => *status,
        }
    }
}

/// The future a sink's `send` returns.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Delivered, SendError>> + Send + 'a>>;

/// A destination for profiles. Implementations do one delivery attempt per call; queueing,
/// retries, metrics and log rate limits are the queue's job.
pub trait ProfileSink: Send + Sync + 'static {
    /// The `endpoint` metric label.
    fn name(&self) -> &str;
    /// True for protocols with one request per series: the queue then hands `send` one
    /// series at a time, so that a retry resends only what failed.
    fn per_series(&self) -> bool {
        false
    }
    fn send<'a>(&'a self, batch: &'a [ProfileSeries]) -> SendFuture<'a>;
}

/// Fans batches out to every sink. Dropping it without [`Writer::shutdown`] stops the sink
/// tasks at once.
pub struct Writer {
    sinks: Vec<queue::SinkQueue>,
    external_labels: Labels,
    metrics: Arc<WriteMetrics>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Writer {
    /// Validates `config`, reads secret files, and spawns one task per sink on the current
    /// tokio runtime (multi-thread or current-thread).
    pub fn start(
        config: &WriteConfig,
        metrics: Arc<WriteMetrics>,
    ) -> Result<Self, WriteConfigError> {
        config.validate()?;
        let mut sinks: Vec<(Arc<dyn ProfileSink>, RetryPolicy)> = Vec::new();
        for ((i, ep), name) in config
            .endpoint
            .iter()
            .enumerate()
            .zip(config.endpoint_names())
        {
            let at = format!("write.endpoint[{i}]");
            let sink: Arc<dyn ProfileSink> = match ep.protocol {
                Protocol::Push => Arc::new(push::PushSink::new(ep, &at, name)?),
                Protocol::Ingest => Arc::new(ingest::IngestSink::new(ep, &at, name)?),
                Protocol::Datakit => Arc::new(datakit::DatakitSink::new(ep, &at, name)?),
            };
            sinks.push((sink, RetryPolicy::from_endpoint(ep)));
        }
        if let Some(dir) = &config.directory {
            let sink = Arc::new(directory::DirectorySink::new(dir.clone()));
            sinks.push((sink, RetryPolicy::no_retries()));
        }
        Ok(Self::with_sinks(
            sinks,
            config.queue_size,
            config.external_labels.clone(),
            metrics,
        ))
    }

    /// A writer over the given sinks (for sinks other than the configured ones, and tests).
    pub fn with_sinks(
        sinks: Vec<(Arc<dyn ProfileSink>, RetryPolicy)>,
        queue_size: usize,
        external_labels: Labels,
        metrics: Arc<WriteMetrics>,
    ) -> Self {
        let (stop, _) = tokio::sync::watch::channel(false);
        let sinks = sinks
            .into_iter()
            .map(|(sink, policy)| {
                queue::SinkQueue::spawn(
                    sink,
                    policy,
                    queue_size.max(1),
                    metrics.clone(),
                    stop.subscribe(),
                )
            })
            .collect();
        Self {
            sinks,
            external_labels,
            metrics,
            stop,
        }
    }

    /// Never blocks: enqueues the batch for every sink; a full queue drops its oldest batch
    /// and counts it (`reason="queue_full"`).
    pub fn submit(&self, mut batch: Vec<ProfileSeries>) {
        if batch.is_empty() || self.sinks.is_empty() {
            return;
        }
        for series in &mut batch {
            finish_labels(&mut series.labels, &self.external_labels);
        }
        let batch = Arc::new(queue::Batch::new(
            batch,
            self.sinks.len(),
            self.metrics.clone(),
        ));
        for sink in &self.sinks {
            sink.push(batch.clone());
        }
    }

    /// Delivers what is queued (including retries in flight) until `deadline`, then stops;
    /// what is left is counted as dropped (`reason="shutdown"`).
    pub async fn shutdown(self, deadline: Duration) {
        for sink in &self.sinks {
            sink.close();
        }
        let mut tasks: Vec<_> = self.sinks.into_iter().map(|s| s.into_task()).collect();
        let all = futures_util::future::join_all(tasks.iter_mut());
        if tokio::time::timeout(deadline, all).await.is_err() {
            let _ = self.stop.send(true);
            for task in &mut tasks {
                let _ = task.await;
            }
        }
    }
}

/// Adds `__name__` and the external labels the series lacks; drops other `__` labels.
fn finish_labels(labels: &mut Labels, external: &Labels) {
    labels.retain(|k, _| !k.starts_with("__"));
    labels.insert("__name__".to_string(), PROFILE_NAME.to_string());
    for (k, v) in external {
        labels.entry(k.clone()).or_insert_with(|| v.clone());
    }
}
