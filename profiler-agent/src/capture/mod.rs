//! On-demand captures of one process (served as `GET /v1/profile` by [`crate::server`]):
//! picks the process, samples it with perf events of its own at the requested rate for the
//! requested time (a separate BPF instance with its own maps, opened by
//! [`crate::bpf::open_sampler`], so a capture and the continuous profile never share a
//! sample), and has the pipeline thread build the recording ([`crate::interval::build_one`])
//! with the continuous profile's warm frame caches.
//! Owns the `[capture]` configuration, the concurrency limit, the perf-event descriptor
//! budget ([`events`]: a process with more than 1024 threads is sampled per CPU with a pid
//! filter instead of per thread) and the capture metrics; [`trigger`] starts captures on CPU
//! and memory thresholds (kept in a directory through the directory sink,
//! `crate::write::directory`), and [`reload`] applies `[capture]` and `[[trigger]]` on SIGHUP.

pub mod events;
pub mod reload;
pub mod request;
pub mod trigger;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::{
    bpf::{BpfError, OpenSampler, SamplerOptions, Scope, open_sampler},
    jvm,
    metrics::AgentMetrics,
    process::{DEFAULT_CONTAINER_ID_CACHE_SIZE, procfs},
    profile::BuiltProfile,
    python::Interpreters,
    sampler::Recording,
    write::config::{Secret, read_secret},
};
pub use request::{BadRequest, CaptureRequest, Format, Selector};

/// `[capture]`: the on-demand capture API. Off unless enabled.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// Serve `GET /v1/profile` on the server's address. Default false.
    pub enabled: bool,
    /// When set (and not empty), requests must carry `Authorization: Bearer <token>`.
    /// Required when `server.listen_address` is not a loopback address.
    pub bearer_token: Option<Secret>,
    /// The token read from a file (trailing newline dropped); not with `bearer_token`.
    pub bearer_token_file: Option<PathBuf>,
    /// Captures running at once; one more is answered 429. Default 4.
    pub max_concurrent: usize,
    /// How often `[[trigger]]` thresholds are checked. Default 1s.
    #[serde(with = "crate::duration::positive")]
    pub monitor_interval: Duration,
    /// Where triggered captures are kept (`<unix-ms>-<service>-<pid>-<trigger>.pb.gz`);
    /// none by default.
    pub directory: Option<PathBuf>,
    /// How many triggered captures the directory keeps. Default 10.
    pub keep: usize,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bearer_token: None,
            bearer_token_file: None,
            max_concurrent: 4,
            monitor_interval: Duration::from_secs(1),
            directory: None,
            keep: 10,
        }
    }
}

impl CaptureConfig {
    /// Checks the section against the server's address and returns the token to require.
    /// Errors are (field, reason).
    pub fn token(&self, listen: SocketAddr) -> Result<Option<Secret>, (String, String)> {
        let err = |field: &str, reason: String| (format!("capture.{field}"), reason);
        if !(1..=64).contains(&self.max_concurrent) {
            return Err(err("max_concurrent", "must be between 1 and 64".into()));
        }
        if self.keep == 0 {
            return Err(err("keep", "must be at least 1".into()));
        }
        let token = match (&self.bearer_token, &self.bearer_token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "bearer_token_file",
                    "set bearer_token or bearer_token_file, not both".into(),
                ));
            }
            (Some(token), None) => Some(token.clone()),
            (None, Some(path)) => Some(read_secret(path).map_err(|r| err("bearer_token_file", r))?),
            (None, None) => None,
        };
        // An empty token (an unset `${VAR:-}`) is no token.
        let token = token.filter(|t| !t.expose().is_empty());
        if self.enabled && token.is_none() && !listen.ip().is_loopback() {
            return Err(err(
                "bearer_token",
                format!(
                    "required when the capture API is enabled and server.listen_address \
                     ({listen}) is not a loopback address"
                ),
            ));
        }
        Ok(token)
    }
}

/// Why a capture was not answered with a profile; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
    #[error("no process matches")]
    NoProcess,
    #[error("{limit} captures are already running; try again later")]
    Busy { limit: usize },
    #[error("the capture failed: {0}")]
    Bpf(BpfError),
    #[error("the agent is stopping")]
    Stopping,
    #[error(
        "no perf-event descriptors left for process {pid} ({available} free, {needed} needed); \
         try again when other captures end"
    )]
    NoDescriptors {
        pid: u32,
        needed: usize,
        available: usize,
    },
}

/// A finished recording for the pipeline thread to build (with its warm frame caches); the
/// profile comes back on `reply`.
pub struct SymbolizeJob {
    pub recording: Recording,
    pub sample_rate: u64,
    /// The CPython processes the capture's own kernel side walked, whose frames name its
    /// Python frames.
    pub python: Option<Interpreters>,
    /// Processes that just wrote a new perf map (a JVM asked for it): the sources forget
    /// what they cached of them.
    pub refreshed: Vec<u32>,
    pub reply: mpsc::SyncSender<BuiltProfile>,
}

/// Drains a capture's maps this often (as `record` does).
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);
/// Kernel memory for one capture's unwind tables: one process's files (python3.11 and its
/// libraries take about 200 000 rows, 3 MiB).
const CAPTURE_UNWIND_TABLE_MEMORY: u64 = 8 << 20;

/// How long symbolization may take once the capture ended.
const SYMBOLIZE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs captures: one per call, at most `limit` at once.
pub struct Capturer {
    limit: AtomicUsize,
    running: AtomicUsize,
    stopping: AtomicBool,
    collect_user: bool,
    collect_kernel: bool,
    /// Python frames in captures (`python_enabled`).
    python: bool,
    /// Ask a captured HotSpot JVM for its perf map (`hotspot_enabled`).
    hotspot: bool,
    jobs: mpsc::Sender<SymbolizeJob>,
    metrics: Arc<AgentMetrics>,
    proc_root: PathBuf,
    events: events::EventBudget,
    /// Thread events one capture may open ([`events::MAX_THREAD_EVENTS_PER_CAPTURE`]).
    max_thread_events: usize,
}

/// A taken capture slot, given back on drop.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Capturer {
    pub fn new(
        limit: usize,
        collect_user: bool,
        collect_kernel: bool,
        jobs: mpsc::Sender<SymbolizeJob>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self {
            limit: AtomicUsize::new(limit),
            running: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            collect_user,
            collect_kernel,
            python: false,
            hotspot: false,
            jobs,
            metrics,
            proc_root: PathBuf::from("/proc"),
            events: events::EventBudget::new(events::MAX_EVENTS_ALL_CAPTURES),
            max_thread_events: events::MAX_THREAD_EVENTS_PER_CAPTURE,
        }
    }

    /// Asks a captured HotSpot JVM, before its capture ends, to write the perf map that
    /// names its JIT-compiled methods (`hotspot_enabled`).
    pub fn with_hotspot(mut self, hotspot: bool) -> Self {
        self.hotspot = hotspot;
        self
    }

    /// Walks the Python frames of captured CPython processes (`python_enabled`).
    pub fn with_python(mut self, python: bool) -> Self {
        self.python = python;
        self
    }

    /// Captures allowed at once from now on (`capture.max_concurrent` after a reload);
    /// running captures are not stopped.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::SeqCst);
    }

    /// Ends running captures early (with what they sampled) and refuses new ones.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn take_slot(&self) -> Result<Slot<'_>, CaptureError> {
        let limit = self.limit.load(Ordering::SeqCst);
        self.running
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| CaptureError::Busy { limit })?;
        Ok(Slot(&self.running))
    }

    /// The process to capture: the pid if it exists, else the busiest process whose command
    /// line matches (the agent itself excluded).
    pub fn find(&self, selector: &Selector) -> Result<u32, CaptureError> {
        match selector {
            Selector::Pid(pid) => self
                .proc_root
                .join(pid.to_string())
                .join("stat")
                .exists()
                .then_some(*pid)
                .ok_or(CaptureError::NoProcess),
            Selector::Command(re) => find_by_command(&self.proc_root, re),
        }
    }

    /// Blocks for the whole capture: meant for a blocking thread. `trigger` labels the
    /// metrics (`manual` for the API).
    pub fn capture(
        &self,
        pid: u32,
        duration: Duration,
        sample_rate: u64,
        trigger: &str,
    ) -> Result<BuiltProfile, CaptureError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(CaptureError::Stopping);
        }
        let slot = self.take_slot()?;
        let result = self.capture_in_slot(pid, duration, sample_rate);
        drop(slot);
        let outcome = if result.is_ok() { "done" } else { "failed" };
        self.metrics.capture(trigger, outcome);
        result
    }

    fn capture_in_slot(
        &self,
        pid: u32,
        duration: Duration,
        sample_rate: u64,
    ) -> Result<BuiltProfile, CaptureError> {
        let interpreters = Interpreters::new();
        let (opened, events) = self.start_sampler(pid, duration, sample_rate, &interpreters)?;
        let mut sampler = opened.sampler;
        let alive = self.proc_root.join(pid.to_string());
        // A process that exits ends its capture early: what was sampled is the answer.
        sampler
            .run_until(DRAIN_INTERVAL, Instant::now() + duration, || {
                self.stopping.load(Ordering::SeqCst) || !alive.exists()
            })
            .map_err(CaptureError::Bpf)?;
        // Before the samples are named: the JIT code they hit is in the JVM's map now.
        let refreshed = self.ask_for_perf_map(pid);
        let recording = sampler.finish().map_err(CaptureError::Bpf)?;
        drop(events);
        tracing::info!(
            pid,
            samples = recording.total_samples(),
            ?duration,
            sample_rate,
            "capture done"
        );
        let (reply, answer) = mpsc::sync_channel(1);
        self.jobs
            .send(SymbolizeJob {
                recording,
                sample_rate,
                python: self.python.then_some(interpreters),
                refreshed,
                reply,
            })
            .map_err(|_| CaptureError::Stopping)?;
        answer
            .recv_timeout(SYMBOLIZE_TIMEOUT)
            .map_err(|_| CaptureError::Stopping)
    }
}

impl Capturer {
    /// Has a HotSpot JVM write its perf map (`Compiler.perfmap`, through its attach socket);
    /// the pids whose map was written. Other processes are not touched; failures are
    /// counted and logged, and the capture goes on with what it has.
    fn ask_for_perf_map(&self, pid: u32) -> Vec<u32> {
        if !self.hotspot {
            return Vec::new();
        }
        let Some(outcome) = jvm::ask_for_perf_map(&self.proc_root, pid) else {
            return Vec::new();
        };
        self.metrics.jvm_attach(outcome);
        if outcome == "done" {
            vec![pid]
        } else {
            Vec::new()
        }
    }

    /// Starts the kernel side within the descriptor budget: one event per thread when the
    /// process has at most `max_thread_events` threads (and the budget allows), else one
    /// event per CPU with the process in the BPF program's pid filter.
    fn start_sampler(
        &self,
        pid: u32,
        duration: Duration,
        sample_rate: u64,
        interpreters: &Interpreters,
    ) -> Result<(OpenSampler, events::Reservation<'_>), CaptureError> {
        let no_descriptors = |needed| CaptureError::NoDescriptors {
            pid,
            needed,
            available: self.events.available(),
        };
        let mut reservation = self
            .events
            .reserve(self.max_thread_events)
            .ok_or_else(|| no_descriptors(1))?;
        let options = |scope| SamplerOptions {
            sample_rate,
            collect_interval: DRAIN_INTERVAL.min(duration),
            collect_user: self.collect_user,
            collect_kernel: self.collect_kernel,
            pids: Some(vec![pid]),
            scope,
            unwind_table_memory: CAPTURE_UNWIND_TABLE_MEMORY,
            exclude_self: false,
            python: self.python,
        };
        let per_thread = Scope::Threads {
            pids: vec![pid],
            max_events: reservation.events(),
        };
        // The captured process is alive and named now: no early snapshots needed.
        let open = |scope| {
            open_sampler(
                &options(scope),
                DEFAULT_CONTAINER_ID_CACHE_SIZE,
                false,
                |kernel| interpreters.hook(kernel).into_iter().collect(),
            )
        };
        let started = match open(per_thread) {
            Err(BpfError::TooManyThreads { limit, .. }) => {
                let cpus = aya::util::online_cpus().map_or(0, |c| c.len());
                if cpus == 0 || cpus > reservation.events() {
                    self.thread_limit("refused");
                    return Err(no_descriptors(cpus.max(1)));
                }
                self.thread_limit("per_cpu");
                tracing::info!(
                    pid,
                    limit,
                    cpus,
                    "more threads than thread events allowed: sampling every CPU for this pid"
                );
                reservation.shrink(cpus);
                open(Scope::EveryCpu)
            }
            other => other,
        };
        // The reservation is held as long as the events are open.
        let kernel = started.map_err(|e| match e {
            // Gone between the lookup and the attach.
            BpfError::Threads { .. } => CaptureError::NoProcess,
            e => CaptureError::Bpf(e),
        })?;
        Ok((kernel, reservation))
    }

    fn thread_limit(&self, action: &str) {
        self.metrics
            .capture_thread_limit
            .get_or_create(&crate::metrics::ActionLabel {
                action: action.to_owned(),
            })
            .inc();
    }
}

/// The pid of the matching process with the most CPU time so far.
fn find_by_command(proc_root: &Path, re: &Regex) -> Result<u32, CaptureError> {
    let me = std::process::id();
    procfs::pids(proc_root)
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let dir = proc_root.join(pid.to_string());
            let command = procfs::command_line(&dir)?;
            re.is_match(&command)
                .then(|| (procfs::stat(&dir).map_or(0, |s| s.cpu_ticks), pid))
        })
        .max()
        .map(|(_, pid)| pid)
        .ok_or(CaptureError::NoProcess)
}

#[cfg(test)]
mod tests;
