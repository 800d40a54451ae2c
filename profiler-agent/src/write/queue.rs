//! One bounded queue and one task per sink: the task takes batches oldest first, hands them
//! to its [`ProfileSink`], retries retryable failures with jittered exponential backoff (or
//! after `Retry-After`), counts what was sent and dropped, and logs each cause at most once
//! per interval. Generic over the sink trait, so the tests drive it with doubles.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};

use super::{
    EndpointConfig, ProfileSeries, ProfileSink, SendError,
    metrics::{DropReason, WriteMetrics},
};
use crate::backoff::Backoff;

/// A warning for one cause is repeated at most this often (one collect interval).
const LOG_EVERY: Duration = Duration::from_secs(15);

/// How a sink retries: `min..max` jittered exponential backoff, at most `max_retries`
/// retries after the first attempt (`None`: until it succeeds or the writer stops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub max_retries: Option<u32>,
}

impl RetryPolicy {
    /// An endpoint's policy; `max_backoff_retries = 0` retries forever, as in Alloy's
    /// `pyroscope.write`.
    pub fn from_endpoint(ep: &EndpointConfig) -> Self {
        Self {
            min_backoff: ep.min_backoff_period,
            max_backoff: ep.max_backoff_period,
            max_retries: (ep.max_backoff_retries != 0).then_some(ep.max_backoff_retries),
        }
    }

    pub fn no_retries() -> Self {
        Self {
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_millis(500),
            max_retries: Some(0),
        }
    }
}

/// One submitted batch, shared by every sink's queue.
pub(crate) struct Batch {
    series: Vec<ProfileSeries>,
    submitted: Instant,
    /// Sinks not yet done with it; the last one records the fan-out latency.
    pending: AtomicUsize,
    metrics: Arc<WriteMetrics>,
}

impl Batch {
    pub fn new(series: Vec<ProfileSeries>, sinks: usize, metrics: Arc<WriteMetrics>) -> Self {
        Self {
            series,
            submitted: Instant::now(),
            pending: AtomicUsize::new(sinks),
            metrics,
        }
    }

    fn done(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.metrics
                .observe_fanout(self.submitted.elapsed().as_secs_f64());
        }
    }
}

fn bytes_of(series: &[ProfileSeries]) -> u64 {
    series.iter().map(|s| s.pprof_gzip.len() as u64).sum()
}

struct Shared {
    name: String,
    capacity: usize,
    inner: Mutex<Inner>,
    notify: Notify,
    metrics: Arc<WriteMetrics>,
}

#[derive(Default)]
struct Inner {
    items: VecDeque<Arc<Batch>>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn drop_series(&self, series: &[ProfileSeries], reason: DropReason) {
        if !series.is_empty() {
            self.metrics
                .dropped(&self.name, reason, series.len() as u64, bytes_of(series));
        }
    }
}

/// The writer's handle on one sink's queue and task.
pub(crate) struct SinkQueue {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl SinkQueue {
    pub fn spawn(
        sink: Arc<dyn ProfileSink>,
        policy: RetryPolicy,
        capacity: usize,
        metrics: Arc<WriteMetrics>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let shared = Arc::new(Shared {
            name: sink.name().to_string(),
            capacity,
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            metrics,
        });
        shared.metrics.set_queue_depth(&shared.name, 0);
        let task = tokio::spawn(run(sink, shared.clone(), policy, stop));
        Self { shared, task }
    }

    /// Enqueues without blocking; a full queue drops (and counts) its oldest batch.
    pub fn push(&self, batch: Arc<Batch>) {
        let s = &self.shared;
        let evicted = {
            let mut inner = s.lock();
            if inner.closed {
                drop(inner);
                s.drop_series(&batch.series, DropReason::Shutdown);
                batch.done();
                return;
            }
            let evicted = if inner.items.len() >= s.capacity {
                inner.items.pop_front()
            } else {
                None
            };
            inner.items.push_back(batch);
            s.metrics.set_queue_depth(&s.name, inner.items.len());
            evicted
        };
        if let Some(old) = evicted {
            s.drop_series(&old.series, DropReason::QueueFull);
            old.done();
            tracing::debug!(endpoint = %s.name, "queue full: dropped the oldest batch");
        }
        s.notify.notify_one();
    }

    /// No more batches: the task delivers what is queued, then ends.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.notify.notify_one();
    }

    pub fn into_task(self) -> JoinHandle<()> {
        self.task
    }
}

/// Resolves once `stop` turns true (or the writer is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn run(
    sink: Arc<dyn ProfileSink>,
    shared: Arc<Shared>,
    policy: RetryPolicy,
    mut stop: watch::Receiver<bool>,
) {
    let mut log = LogLimiter::default();
    while let Some(batch) = next(&shared, &mut stop).await {
        let finished = deliver(&*sink, &shared, &policy, &batch, &mut stop, &mut log).await;
        batch.done();
        if !finished {
            break;
        }
    }
    // Stopped, or closed and empty: whatever is left was never delivered.
    let left: Vec<_> = {
        let mut inner = shared.lock();
        inner.closed = true;
        inner.items.drain(..).collect()
    };
    shared.metrics.set_queue_depth(&shared.name, 0);
    for batch in left {
        shared.drop_series(&batch.series, DropReason::Shutdown);
        batch.done();
    }
}

/// The oldest queued batch, or None once closed and empty or stopped.
async fn next(shared: &Shared, stop: &mut watch::Receiver<bool>) -> Option<Arc<Batch>> {
    loop {
        {
            let mut inner = shared.lock();
            if let Some(batch) = inner.items.pop_front() {
                shared
                    .metrics
                    .set_queue_depth(&shared.name, inner.items.len());
                return Some(batch);
            }
            if inner.closed {
                return None;
            }
        }
        tokio::select! {
            _ = shared.notify.notified() => {}
            _ = stopped(stop) => return None,
        }
    }
}

enum Outcome {
    Sent,
    Dropped(DropReason),
    Stopped,
}

/// Sends one batch (or its series one by one); false when stopped midway.
async fn deliver(
    sink: &dyn ProfileSink,
    shared: &Shared,
    policy: &RetryPolicy,
    batch: &Batch,
    stop: &mut watch::Receiver<bool>,
    log: &mut LogLimiter,
) -> bool {
    let units: Vec<&[ProfileSeries]> = if sink.per_series() {
        batch.series.iter().map(std::slice::from_ref).collect()
    } else {
        vec![&batch.series[..]]
    };
    for (i, unit) in units.iter().enumerate() {
        match send_with_retries(sink, shared, policy, unit, stop, log).await {
            Outcome::Sent => {
                shared
                    .metrics
                    .sent(&shared.name, unit.len() as u64, bytes_of(unit));
            }
            Outcome::Dropped(DropReason::RetriesExhausted) => {
                // The endpoint is down: the rest of this batch would fail the same way.
                for rest in &units[i..] {
                    shared.drop_series(rest, DropReason::RetriesExhausted);
                }
                return true;
            }
            Outcome::Dropped(reason) => shared.drop_series(unit, reason),
            Outcome::Stopped => {
                for rest in &units[i..] {
                    shared.drop_series(rest, DropReason::Shutdown);
                }
                return false;
            }
        }
    }
    true
}

async fn send_with_retries(
    sink: &dyn ProfileSink,
    shared: &Shared,
    policy: &RetryPolicy,
    unit: &[ProfileSeries],
    stop: &mut watch::Receiver<bool>,
    log: &mut LogLimiter,
) -> Outcome {
    let name = &shared.name;
    let mut backoff = Backoff::new(policy.min_backoff, policy.max_backoff);
    let mut retries = 0;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = sink.send(unit) => r,
            _ = stopped(stop) => return Outcome::Stopped,
        };
        let seconds = started.elapsed().as_secs_f64();
        let status = match &result {
            Ok(d) => d.status,
            Err(e) => e.status(),
        };
        let status = status.map_or_else(
            || {
                if result.is_ok() {
                    "ok".into()
                } else {
                    "error".into()
                }
            },
            |s| s.to_string(),
        );
        shared.metrics.observe_latency(name, &status, seconds);
        match result {
            Ok(_) => return Outcome::Sent,
            Err(SendError::Permanent { status, cause }) => {
                if log.should_log(&format!("permanent {status:?}")) {
                    tracing::warn!(endpoint = %name, ?status, %cause, profiles = unit.len(),
                        "write rejected, dropping (not retried)");
                }
                return Outcome::Dropped(DropReason::Rejected);
            }
            Err(SendError::Retryable {
                status,
                retry_after,
                cause,
            }) => {
                if policy.max_retries.is_some_and(|max| retries >= max) {
                    if log.should_log(&format!("exhausted {}", cause_key(status, &cause))) {
                        tracing::warn!(endpoint = %name, ?status, %cause, retries,
                            profiles = unit.len(), "write failed after retries, dropping");
                    }
                    return Outcome::Dropped(DropReason::RetriesExhausted);
                }
                retries += 1;
                shared.metrics.retried(name);
                let delay = match retry_after {
                    Some(d) => d.min(policy.max_backoff),
                    None => backoff.next_delay(),
                };
                tracing::debug!(endpoint = %name, ?status, %cause, retry = retries, ?delay,
                    "write failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(stop) => return Outcome::Stopped,
                }
            }
        }
    }
}

/// The part of a cause that identifies it (status, or the error kind before the details).
fn cause_key(status: Option<u16>, cause: &str) -> String {
    match status {
        Some(s) => s.to_string(),
        None => cause.split(':').next().unwrap_or(cause).to_string(),
    }
}

/// Remembers when each cause was last logged.
#[derive(Default)]
struct LogLimiter {
    last: HashMap<String, Instant>,
}

impl LogLimiter {
    fn should_log(&mut self, key: &str) -> bool {
        let now = Instant::now();
        match self.last.get(key) {
            Some(t) if now.duration_since(*t) < LOG_EVERY => false,
            _ => {
                if self.last.len() > 64 {
                    self.last.retain(|_, t| now.duration_since(*t) < LOG_EVERY);
                }
                self.last.insert(key.to_string(), now);
                true
            }
        }
    }
}
