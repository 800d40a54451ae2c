//! The write path's Prometheus metrics, under pyroscope.write's names with an `endpoint`
//! label (the directory sink is `endpoint="directory"`), plus the queue depth gauge.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Why profiles were dropped (`reason` label of the dropped counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The sink's queue was full; its oldest batch made room for the new one.
    QueueFull,
    /// The endpoint refused it (4xx other than 408/429) or the file could not be written.
    Rejected,
    /// Still failing after `max_backoff_retries` retries.
    RetriesExhausted,
    /// Still queued or in flight when the shutdown deadline passed.
    Shutdown,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Rejected => "rejected",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    endpoint: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    endpoint: String,
    /// HTTP status code, `ok` for the directory sink, or `error` (no response).
    status: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 5 ms .. ~82 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Counters and histograms of every sink; cheap to share (`Arc`) and to clone.
#[derive(Clone, Debug)]
pub struct WriteMetrics {
    sent_bytes: Family<EndpointLabel, Counter>,
    sent_profiles: Family<EndpointLabel, Counter>,
    dropped_bytes: Family<DropLabels, Counter>,
    dropped_profiles: Family<DropLabels, Counter>,
    retries: Family<EndpointLabel, Counter>,
    latency: HistogramFamily<LatencyLabels>,
    fanout_latency: Histogram,
    queue_depth: Family<EndpointLabel, Gauge>,
}

impl Default for WriteMetrics {
    fn default() -> Self {
        Self {
            sent_bytes: Family::default(),
            sent_profiles: Family::default(),
            dropped_bytes: Family::default(),
            dropped_profiles: Family::default(),
            retries: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            fanout_latency: latency_histogram(),
            queue_depth: Family::default(),
        }
    }
}

impl WriteMetrics {
    /// Creates the metrics and registers them (counters get the `_total` suffix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "pyroscope_write_sent_bytes",
            "Bytes of pprof delivered, per endpoint.",
            m.sent_bytes.clone(),
        );
        registry.register(
            "pyroscope_write_sent_profiles",
            "Profiles delivered, per endpoint.",
            m.sent_profiles.clone(),
        );
        registry.register(
            "pyroscope_write_dropped_bytes",
            "Bytes of pprof dropped, per endpoint and reason.",
            m.dropped_bytes.clone(),
        );
        registry.register(
            "pyroscope_write_dropped_profiles",
            "Profiles dropped, per endpoint and reason.",
            m.dropped_profiles.clone(),
        );
        registry.register(
            "pyroscope_write_retries",
            "Requests retried, per endpoint.",
            m.retries.clone(),
        );
        registry.register(
            "pyroscope_write_latency",
            "Duration of one write attempt in seconds, per endpoint and status.",
            m.latency.clone(),
        );
        registry.register(
            "pyroscope_fanout_latency",
            "Seconds from handing a batch to the writer until every sink is done with it.",
            m.fanout_latency.clone(),
        );
        registry.register(
            "profiler_write_queue_depth",
            "Batches waiting in each sink's queue.",
            m.queue_depth.clone(),
        );
        m
    }

    fn endpoint(endpoint: &str) -> EndpointLabel {
        EndpointLabel {
            endpoint: endpoint.to_string(),
        }
    }

    fn drop_labels(endpoint: &str, reason: DropReason) -> DropLabels {
        DropLabels {
            endpoint: endpoint.to_string(),
            reason: reason.as_str().to_string(),
        }
    }

    pub(crate) fn sent(&self, endpoint: &str, profiles: u64, bytes: u64) {
        let l = Self::endpoint(endpoint);
        self.sent_profiles.get_or_create(&l).inc_by(profiles);
        self.sent_bytes.get_or_create(&l).inc_by(bytes);
    }

    pub(crate) fn dropped(&self, endpoint: &str, reason: DropReason, profiles: u64, bytes: u64) {
        let l = Self::drop_labels(endpoint, reason);
        self.dropped_profiles.get_or_create(&l).inc_by(profiles);
        self.dropped_bytes.get_or_create(&l).inc_by(bytes);
    }

    pub(crate) fn retried(&self, endpoint: &str) {
        self.retries.get_or_create(&Self::endpoint(endpoint)).inc();
    }

    pub(crate) fn observe_latency(&self, endpoint: &str, status: &str, seconds: f64) {
        self.latency
            .get_or_create(&LatencyLabels {
                endpoint: endpoint.to_string(),
                status: status.to_string(),
            })
            .observe(seconds);
    }

    pub(crate) fn observe_fanout(&self, seconds: f64) {
        self.fanout_latency.observe(seconds);
    }

    pub(crate) fn set_queue_depth(&self, endpoint: &str, depth: usize) {
        self.queue_depth
            .get_or_create(&Self::endpoint(endpoint))
            .set(depth as i64);
    }

    /// Profiles delivered to `endpoint` so far.
    pub fn sent_profiles(&self, endpoint: &str) -> u64 {
        self.sent_profiles
            .get_or_create(&Self::endpoint(endpoint))
            .get()
    }

    /// Bytes delivered to `endpoint` so far.
    pub fn sent_bytes(&self, endpoint: &str) -> u64 {
        self.sent_bytes
            .get_or_create(&Self::endpoint(endpoint))
            .get()
    }

    /// Profiles dropped for `endpoint` for `reason` so far.
    pub fn dropped_profiles(&self, endpoint: &str, reason: DropReason) -> u64 {
        self.dropped_profiles
            .get_or_create(&Self::drop_labels(endpoint, reason))
            .get()
    }

    /// Bytes dropped for `endpoint` for `reason` so far.
    pub fn dropped_bytes(&self, endpoint: &str, reason: DropReason) -> u64 {
        self.dropped_bytes
            .get_or_create(&Self::drop_labels(endpoint, reason))
            .get()
    }

    /// Retries of requests to `endpoint` so far.
    pub fn retries(&self, endpoint: &str) -> u64 {
        self.retries.get_or_create(&Self::endpoint(endpoint)).get()
    }

    /// Batches queued for `endpoint` now.
    pub fn queue_depth(&self, endpoint: &str) -> i64 {
        self.queue_depth
            .get_or_create(&Self::endpoint(endpoint))
            .get()
    }
}
