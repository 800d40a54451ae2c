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
    metrics::{AgentMetrics, Cumulative, ServiceLabel},
    process::ProcessSource,
    profile::{self, BuildOptions},
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
    pub demangle: Demangle,
    pub caches: CacheConfig,
    pub container_id_cache_size: usize,
    pub build: BuildOptions,
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
                    };
                    let metrics = outputs.metrics.clone();
                    metrics.profiling_sessions.inc();
                    let opened =
                        match open_sampler(&options, settings.container_id_cache_size, true) {
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
                    let sources =
                        sources::native(settings.demangle, kernel_symbols, settings.caches);
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
}

impl Worker {
    pub fn new(settings: PipelineSettings, sources: Sources, outputs: Outputs) -> Self {
        Self {
            settings,
            sources,
            out: outputs,
            cumulative: Cumulative::default(),
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
        let built = interval::build_one(
            job.recording,
            &mut self.sources,
            &BuildOptions::record(job.sample_rate),
        );
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
        let targets = self.out.targets.borrow().clone();
        let interval =
            interval::build(recording, &targets, &mut self.sources, &self.settings.build);
        metrics.samples_untargeted.inc_by(interval.untargeted);
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
mod tests {
    use super::*;
    use crate::{
        frames::{Found, FrameKind, FrameSource, MappingClass, Site},
        interval::latest::STALE_INTERVALS,
        process::{Mapping, MappingKind, ProcessInfo},
        sampler::{CounterSnapshot, RawSample, Stack},
        targets::{CONTAINER_ID, PROCESS_PID, SERVICE_NAME, TargetOptions},
    };

    #[test]
    fn ever_new_services_leave_metrics_and_page_bounded() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = AgentMetrics::register(&mut registry);
        let latest = LatestProfiles::default();
        let series = |registry: &prometheus_client::registry::Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            text.lines()
                .filter(|l| l.starts_with("pyroscope_ebpf_pprofs_total{"))
                .count()
        };
        let per_interval = 4;
        let bound = per_interval * STALE_INTERVALS as usize;
        for interval in 0..200 {
            // What collect_recording does for each service with samples.
            let profiles = (0..per_interval)
                .map(|i| {
                    let name = format!("container-{interval}-{i}");
                    let label = ServiceLabel {
                        service_name: name.clone(),
                    };
                    metrics.pprofs.get_or_create(&label).inc();
                    metrics.pprof_bytes.get_or_create(&label).inc_by(10);
                    metrics.pprof_samples.get_or_create(&label).inc_by(1);
                    (name, ServiceProfile::new(0, Vec::new(), 1))
                })
                .collect();
            publish(&latest, &metrics, profiles);
            assert!(latest.len() <= bound && series(&registry) <= bound);
        }
        assert_eq!(latest.len(), bound);
        assert_eq!(series(&registry), bound);
        // The newest services are the ones kept, with their counts.
        let text = {
            let mut t = String::new();
            prometheus_client::encoding::text::encode(&mut t, &registry).unwrap();
            t
        };
        assert!(text.contains("service_name=\"container-199-0\"} 1"));
        assert!(!text.contains("container-0-0"));
        // Intervals with no samples at all empty both.
        for _ in 0..STALE_INTERVALS {
            publish(&latest, &metrics, Vec::new());
        }
        assert_eq!((latest.len(), series(&registry)), (0, 0));
    }

    /// Hands out one prepared drain per call, then nothing; counts what it handed out.
    struct ScriptedSource {
        drains: Vec<Vec<RawSample>>,
        recorded: u64,
        stopped: bool,
    }

    impl StackSource for ScriptedSource {
        type Error = std::io::Error;
        fn drain(&mut self) -> Result<Vec<RawSample>, Self::Error> {
            let next = if self.drains.is_empty() {
                Vec::new()
            } else {
                self.drains.remove(0)
            };
            self.recorded += next.iter().map(|s| s.count).sum::<u64>();
            Ok(next)
        }
        fn counters(&self) -> Result<CounterSnapshot, Self::Error> {
            let mut c = CounterSnapshot::default();
            c.values[profiler_common::Counter::Recorded as usize] = self.recorded;
            Ok(c)
        }
        fn stop(&mut self) -> Result<(), Self::Error> {
            self.stopped = true;
            Ok(())
        }
    }

    /// Every process has one anonymous mapping; pid 3 is in container `c0ffee`.
    struct Processes;

    impl ProcessSource for Processes {
        fn snapshot(&mut self, pid: u32, comm: &str) -> ProcessInfo {
            ProcessInfo {
                container_id: (pid == 3).then(|| "c0ffee".to_owned()),
                mappings: vec![Mapping {
                    start: 0x1000,
                    end: 0x9000,
                    offset: 0,
                    path: "[anon]".into(),
                    kind: MappingKind::Anonymous,
                }],
                ..ProcessInfo::unknown(pid, comm)
            }
        }
    }

    /// Names anonymous code `fn_<address hex>`.
    struct Names;

    impl FrameSource for Names {
        fn name(&self) -> &'static str {
            "names"
        }
        fn serves(&self, class: MappingClass) -> bool {
            class == MappingClass::Anonymous
        }
        fn kind(&self) -> FrameKind {
            FrameKind::Jit
        }
        fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
            Some(Found::Frames(Arc::new([crate::symbolize::Frame::named(
                format!("fn_{:x}", site.address),
            )])))
        }
    }

    fn sample(pid: u32, leaf: u64, count: u64) -> RawSample {
        RawSample {
            pid,
            comm: format!("p{pid}"),
            user: Stack::Frames(vec![leaf]),
            kernel: Stack::NotCollected,
            count,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> crate::targets::Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Runs a worker over scripted drains until `stop_after`, returning what it submitted
    /// and its metrics' text.
    fn run_worker(
        drains: Vec<Vec<RawSample>>,
        collect_interval: Duration,
        stop_after: Duration,
    ) -> (Vec<ProfileSeries>, String) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(AgentMetrics::register(&mut registry));
        let (targets, _) = TargetSet::new(
            &[
                labels(&[(PROCESS_PID, "1"), (SERVICE_NAME, "one")]),
                labels(&[(CONTAINER_ID, "c0ffee"), (SERVICE_NAME, "three")]),
            ],
            &TargetOptions::default(),
        );
        let (_targets_tx, targets_rx) = watch::channel(Arc::new(targets));
        let submitted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let submit: Submit = {
            let submitted = submitted.clone();
            Arc::new(move |batch| submitted.lock().unwrap().extend(batch))
        };
        let (_captures_tx, captures) = mpsc::channel();
        let settings = PipelineSettings {
            collect_interval,
            sample_rate: 97,
            collect_user: true,
            collect_kernel: false,
            demangle: Demangle::None,
            caches: CacheConfig::default(),
            container_id_cache_size: 16,
            build: BuildOptions::record(97),
        };
        let outputs = Outputs {
            targets: targets_rx,
            submit,
            metrics,
            latest: LatestProfiles::default(),
            captures,
        };
        let source = ScriptedSource {
            drains,
            recorded: 0,
            stopped: false,
        };
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // Built on its thread: the frame sources are not Send.
                let worker = Worker::new(settings, Sources::new(vec![Box::new(Names)]), outputs);
                let sampler = Sampler::new(source, Processes).unwrap();
                worker.run(sampler, &stop, &AtomicU64::new(0))
            });
            std::thread::sleep(stop_after);
            stop.store(true, Ordering::SeqCst);
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let batches = std::mem::take(&mut *submitted.lock().unwrap());
        (batches, text)
    }

    fn samples_of(series: &[ProfileSeries], service: &str) -> u64 {
        series
            .iter()
            .filter(|s| s.labels.get(SERVICE_NAME).map(String::as_str) == Some(service))
            .map(|s| s.samples)
            .sum()
    }

    #[test]
    fn intervals_go_to_targets_and_count_the_untargeted() {
        let drains = vec![
            vec![sample(1, 0x1100, 2), sample(2, 0x1200, 5)],
            vec![sample(3, 0x1300, 4), sample(1, 0x1100, 1)],
        ];
        // Intervals of 50 ms (drains as often): both drains land in the first intervals.
        let (series, metrics) = run_worker(
            drains,
            Duration::from_millis(50),
            Duration::from_millis(600),
        );
        assert_eq!(samples_of(&series, "one"), 3);
        assert_eq!(samples_of(&series, "three"), 4);
        assert_eq!(series.iter().map(|s| s.samples).sum::<u64>(), 7);
        assert!(
            series
                .iter()
                .all(|s| s.end >= s.start && !s.pprof_gzip.is_empty()),
            "every series has its window and a body"
        );
        assert!(
            metrics.contains("profiler_samples_untargeted_total 5"),
            "{metrics}"
        );
    }

    #[test]
    fn stopping_submits_the_partial_interval() {
        // An interval far longer than the run: only the stop can submit anything.
        // Nothing is drained before the stop: the final drain takes everything.
        let drains = vec![vec![sample(1, 0x1100, 6), sample(3, 0x1300, 1)]];
        let (series, _) = run_worker(
            drains,
            Duration::from_secs(3600),
            Duration::from_millis(100),
        );
        assert_eq!(samples_of(&series, "one"), 6);
        assert_eq!(samples_of(&series, "three"), 1);
    }
}
