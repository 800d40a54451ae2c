//! The sampling thread of the daemon: drains the kernel maps every second, and every
//! `collect_interval` hands the interval to the interval stage ([`crate::interval`]), which
//! resolves each process to its target and builds one pprof per target; the thread gzips
//! them and hands them to the writer. It owns everything that is not `Send` (the frame
//! sources' caches) and never waits on the network: the writer's `submit` only enqueues.
//! Finished on-demand captures are built here too, between drains, so they share the caches.
//! [`Worker`] is generic over where samples and process snapshots come from, so its loop is
//! tested with doubles.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

use crate::{
    bpf::{BpfError, SamplerOptions, Scope, open_sampler},
    capture::SymbolizeJob,
    frames::{Sources, sources},
    interval::{
        self,
        latest::{LatestProfiles, ServiceProfile},
    },
    jvm::PerfMapRefresher,
    metrics::{AgentMetrics, Cumulative, ServiceLabel},
    process::ProcessSource,
    profile::{self, BuildOptions},
    python::Interpreters,
    sampler::{Recording, Sampler, StackSource},
    symbolize::{CacheConfig, Demangle, kallsyms::KernelSymbols},
    targets::TargetSet,
    write::{ProfileSeries, Submit},
};

/// Kernel maps are drained this often (or every interval, if shorter), so they stay small
/// and a short-lived process is snapshotted while it still exists.
pub const DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// What the pipeline needs from the configuration; fixed for the life of the BPF program.
#[derive(Clone, Debug)]
pub struct PipelineSettings {
    pub collect_interval: Duration,
    pub sample_rate: u64,
    pub collect_user: bool,
    pub collect_kernel: bool,
    /// Python frames (`python_enabled`).
    pub python: bool,
    /// Ask a JVM whose compiled code went unnamed for its perf map, at most this often
    /// (`hotspot_enabled`, `hotspot_perf_map_interval`); `None` never.
    pub hotspot: Option<Duration>,
    pub demangle: Demangle,
    pub caches: CacheConfig,
    pub container_id_cache_size: usize,
    pub build: BuildOptions,
    /// Kernel memory for unwind tables (`unwind_table_memory`).
    pub unwind_table_memory: u64,
}

/// Handle on the running pipeline thread. Its heartbeat (unix seconds of the last loop
/// turn) is what /healthz reads.
pub struct Pipeline {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where the worker's results go, and what it reads besides samples.
pub struct Outputs {
    pub targets: watch::Receiver<Arc<TargetSet>>,
    pub submit: Submit,
    pub metrics: Arc<AgentMetrics>,
    pub latest: LatestProfiles,
    /// Finished captures to build with this thread's caches.
    pub captures: mpsc::Receiver<SymbolizeJob>,
}

impl Pipeline {
    /// Loads and attaches the BPF program on a new thread and starts the loop. Returns once
    /// the program is attached, or with the reason it could not be.
    pub fn start(
        settings: PipelineSettings,
        outputs: Outputs,
        heartbeat: Arc<AtomicU64>,
    ) -> Result<Self, BpfError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pipeline".into())
                .spawn(move || {
                    let options = SamplerOptions {
                        sample_rate: settings.sample_rate,
                        collect_interval: settings.collect_interval.min(DRAIN_INTERVAL),
                        collect_user: settings.collect_user,
                        collect_kernel: settings.collect_kernel,
                        pids: None,
                        scope: Scope::EveryCpu,
                        unwind_table_memory: settings.unwind_table_memory,
                        // The running agent is profiled too: its cost is part of the host's.
                        exclude_self: false,
                        python: settings.python,
                    };
                    let interpreters = Interpreters::new();
                    let metrics = outputs.metrics.clone();
                    metrics.profiling_sessions.inc();
                    let opened = match open_sampler(
                        &options,
                        settings.container_id_cache_size,
                        true,
                        |kernel| interpreters.hook(kernel).into_iter().collect(),
                    ) {
                        Ok(opened) => {
                            let _ = started_tx.send(Ok(()));
                            opened
                        }
                        Err(e) => {
                            metrics.profiling_sessions_failing.inc();
                            let _ = started_tx.send(Err(e));
                            return;
                        }
                    };
                    metrics
                        .kernel_map_memory
                        .set(opened.kernel_memory_bytes as i64);
                    let kernel_symbols = if settings.collect_kernel {
                        KernelSymbols::load()
                            .inspect_err(
                                |e| tracing::warn!(error = %e, "kernel frames will be [unknown]"),
                            )
                            .ok()
                    } else {
                        None
                    };
                    let sources = sources::native(
                        settings.demangle,
                        kernel_symbols,
                        settings.caches,
                        settings.python.then_some(interpreters),
                    );
                    let worker = Worker::new(settings, sources, outputs);
                    worker.run(opened.sampler, &stop, &heartbeat);
                    drop(opened.early_snapshots);
                })
                .expect("spawning a thread")
        };
        match started_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread ended without answering: it panicked; let the panic through.
            Err(_) => match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => unreachable!("the pipeline thread answers before it returns"),
            },
        }
    }

    /// Stops sampling, builds and submits the partial interval, and waits for the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The loop of the pipeline thread: drains, intervals, captures.
pub struct Worker {
    settings: PipelineSettings,
    sources: Sources,
    out: Outputs,
    cumulative: Cumulative,
    refresher: Option<PerfMapRefresher>,
}

impl Worker {
    pub fn new(settings: PipelineSettings, sources: Sources, outputs: Outputs) -> Self {
        Self {
            refresher: settings.hotspot.map(PerfMapRefresher::new),
            settings,
            sources,
            out: outputs,
            cumulative: Cumulative::default(),
        }
    }

    /// Before an interval's build: JVMs that wrote a new perf map since the last interval are
    /// read afresh, and their attempts counted. What captures' builds left unnamed is
    /// dropped: a capture asks its own JVM.
    fn take_perf_map_attempts(&mut self) {
        self.sources.take_unnamed_jit();
        let Some(refresher) = &self.refresher else {
            return;
        };
        let done = refresher.take_done();
        for pid in done.written {
            self.sources.forget(pid);
        }
        for outcome in done.outcomes {
            self.out.metrics.jvm_attach(outcome);
        }
    }

    /// After an interval's build: its processes with unnamed JIT code are asked for a perf
    /// map (rate-limited, on threads of their own).
    fn request_perf_maps(&mut self) {
        let unnamed = self.sources.take_unnamed_jit();
        if let Some(refresher) = &mut self.refresher {
            refresher.request(unnamed);
        }
    }

    /// Runs until `stop`, then builds and submits the partial interval.
    pub fn run<S: StackSource, P: ProcessSource>(
        mut self,
        mut sampler: Sampler<S, P>,
        stop: &AtomicBool,
        heartbeat: &AtomicU64,
    ) where
        S::Error: std::fmt::Display,
    {
        let drain_every = self.settings.collect_interval.min(DRAIN_INTERVAL);
        let mut next_drain = Instant::now() + drain_every;
        let mut next_collect = Instant::now() + self.settings.collect_interval;
        while !stop.load(Ordering::SeqCst) {
            heartbeat.store(unix_now(), Ordering::Relaxed);
            while let Ok(job) = self.out.captures.try_recv() {
                self.build_capture(job);
            }
            let now = Instant::now();
            if now < next_drain {
                std::thread::sleep((next_drain - now).min(Duration::from_millis(100)));
                continue;
            }
            next_drain += drain_every;
            if now >= next_collect {
                next_collect += self.settings.collect_interval;
                match sampler.take_interval() {
                    Ok(recording) => self.collect(recording, sampler.processes()),
                    Err(e) => self.drain_failed(&e),
                }
            } else if let Err(e) = sampler.drain() {
                self.drain_failed(&e);
            }
            // A machine that slept (or a very slow interval) must not cause a burst.
            let now = Instant::now();
            if next_drain < now {
                next_drain = now + drain_every;
            }
            if next_collect < now {
                next_collect = now + self.settings.collect_interval;
            }
        }
        // The partial interval: stopping first makes the counters match the samples.
        let processes = sampler.processes().stats();
        match sampler.finish() {
            Ok(recording) => {
                self.collect_recording(recording);
                self.process_metrics(&processes);
            }
            Err(e) => self.drain_failed(&e),
        }
    }

    /// A capture's profile, named with the continuous profile's caches; its files stay
    /// cached for the next interval as if this were part of it.
    fn build_capture(&mut self, job: SymbolizeJob) {
        for &pid in &job.refreshed {
            self.sources.forget(pid);
        }
        // The capture's Python processes name its Python frames, for this build only.
        let daemon_python = job.python.map(|python| {
            self.sources
                .replace_interpreted(Some(sources::python(python)))
        });
        let built = interval::build_one(
            job.recording,
            &mut self.sources,
            &BuildOptions::record(job.sample_rate),
        );
        if let Some(daemon_python) = daemon_python {
            self.sources.replace_interpreted(daemon_python);
        }
        // The requester may have gone (timeout, disconnect): nothing to do then.
        let _ = job.reply.send(built);
    }

    fn drain_failed(&self, error: &dyn std::fmt::Display) {
        self.out.metrics.profiling_sessions_failing.inc();
        tracing::warn!(%error, "draining the kernel maps failed");
    }

    fn collect(&mut self, recording: Recording, processes: &impl ProcessSource) {
        self.collect_recording(recording);
        self.process_metrics(&processes.stats());
    }

    fn process_metrics(&mut self, stats: &crate::process::ProcessStats) {
        let metrics = &self.out.metrics;
        self.cumulative
            .unreadable_processes(metrics, stats.unreadable_processes);
        self.cumulative.container_ids(metrics, &stats.container_ids);
    }

    fn collect_recording(&mut self, recording: Recording) {
        let started = Instant::now();
        let metrics = self.out.metrics.clone();
        self.cumulative.kernel(&metrics, &recording.counters);
        self.cumulative
            .unwind_tables(&metrics, &recording.unwind_tables);
        let targets = self.out.targets.borrow().clone();
        self.take_perf_map_attempts();
        let interval =
            interval::build(recording, &targets, &mut self.sources, &self.settings.build);
        self.request_perf_maps();
        metrics.samples_untargeted.inc_by(interval.untargeted);
        metrics.samples_named_at_drain.inc_by(interval.named_late);
        metrics.samples_default_target.inc_by(interval.defaulted);
        let mut batch = Vec::with_capacity(interval.profiles.len());
        let mut latest = Vec::with_capacity(interval.profiles.len());
        for p in &interval.profiles {
            let service = ServiceLabel {
                service_name: p.target.service_name().to_owned(),
            };
            let bytes = match p.built.encode_gzip() {
                Ok(b) => b,
                Err(error) => {
                    metrics.pprofs_dropped.inc();
                    tracing::warn!(%error, service = %service.service_name, "encoding failed");
                    continue;
                }
            };
            metrics.pprofs.get_or_create(&service).inc();
            metrics
                .pprof_bytes
                .get_or_create(&service)
                .inc_by(bytes.len() as u64);
            metrics
                .pprof_samples
                .get_or_create(&service)
                .inc_by(p.built.total_samples);
            latest.push((
                service.service_name,
                ServiceProfile::new(
                    unix_now(),
                    profile::folded(&p.built.profile),
                    p.built.total_samples,
                ),
            ));
            batch.push(ProfileSeries {
                labels: p.target.labels.clone(),
                pprof_gzip: bytes.into(),
                start: interval.start,
                end: interval.start + interval.duration,
                sample_rate: self.settings.sample_rate as u32,
                samples: p.built.total_samples,
            });
        }
        self.sources.next_round();
        self.cumulative.symbolize(&metrics, &self.sources.stats());
        publish(&self.out.latest, &metrics, latest);
        if !batch.is_empty() {
            metrics
                .interval_build_seconds
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(profiles = batch.len(), "interval built");
            (self.out.submit)(batch);
        }
        return_free_memory();
    }
}

/// Publishes one interval's flame graph stacks; the services pruned from the page (no
/// samples for [`crate::interval::latest::STALE_INTERVALS`] intervals) lose their metric
/// series too.
fn publish(
    latest: &LatestProfiles,
    metrics: &AgentMetrics,
    profiles: Vec<(String, ServiceProfile)>,
) {
    let pruned = latest.publish(profiles);
    for service in &pruned {
        metrics.forget_service(service);
    }
    if !pruned.is_empty() {
        tracing::debug!(pruned = pruned.len(), "services without samples pruned");
    }
}

/// Hands the allocator's free pages back to the kernel, once per interval. glibc keeps freed
/// memory in its arenas: after a round that parsed a large binary's DWARF that was 20 MiB of
/// RSS the agent no longer used (measured: 67 -> 47 MiB RssAnon). A few ms per call.
fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; no live allocation moves.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
