//! The sampling thread of the daemon: drains the kernel maps every second, and every
//! `collect_interval` symbolizes the interval's samples, resolves each process to its target
//! and hands one gzipped pprof per target to the writer. It owns everything that is not
//! `Send` (the symbolizer's caches) and never waits on the network: the writer's `submit`
//! only enqueues. Finished on-demand captures are symbolized here too, between drains, so
//! they share the caches.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

use crate::{
    bpf::{BpfError, KernelSampler, SamplerOptions, Scope},
    capture::SymbolizeJob,
    metrics::{AgentMetrics, Cumulative, ServiceLabel},
    process::{ProcfsProcesses, early},
    profile::{self, BuildOptions},
    sampler::{RawSample, Recording, Sampler, Stack},
    symbolize::{
        CacheConfig, Demangle, NativeSymbolizer, Symbolizer as _, kallsyms::KernelSymbols,
    },
    targets::{Labels, Target, TargetSet},
    write::ProfileSeries,
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

/// Where built profiles go: the daemon's current writer.
pub type Submit = Arc<dyn Fn(Vec<ProfileSeries>) + Send + Sync>;

pub use super::latest::{LatestProfiles, ServiceProfile};

/// Handle on the running pipeline thread. Its heartbeat (unix seconds of the last loop
/// turn) is what /healthz reads.
pub struct Pipeline {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pipeline {
    /// Loads and attaches the BPF program on a new thread and starts the loop. Returns once
    /// the program is attached, or with the reason it could not be.
    pub fn start(
        settings: PipelineSettings,
        targets: watch::Receiver<Arc<TargetSet>>,
        submit: Submit,
        metrics: Arc<AgentMetrics>,
        latest: LatestProfiles,
        heartbeat: Arc<AtomicU64>,
        captures: mpsc::Receiver<SymbolizeJob>,
    ) -> Result<Self, BpfError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let heartbeat = heartbeat.clone();
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
                    metrics.profiling_sessions.inc();
                    let sampler = KernelSampler::start(&options).and_then(|mut kernel| {
                        metrics
                            .kernel_map_memory
                            .set(kernel.kernel_memory_bytes() as i64);
                        let processes = ProcfsProcesses::with_container_id_cache(
                            "/proc",
                            settings.container_id_cache_size,
                        );
                        let early =
                            early::for_kernel(&mut kernel, settings.container_id_cache_size);
                        let mut sampler = Sampler::new(kernel, processes)?;
                        let early = early.map(|(thread, snapshots)| {
                            sampler.set_early_snapshots(snapshots);
                            thread
                        });
                        Ok((sampler, early))
                    });
                    let (sampler, _early_snapshots) = match sampler {
                        Ok(s) => {
                            let _ = started_tx.send(Ok(()));
                            s
                        }
                        Err(e) => {
                            metrics.profiling_sessions_failing.inc();
                            let _ = started_tx.send(Err(e));
                            return;
                        }
                    };
                    let kernel_symbols = if settings.collect_kernel {
                        KernelSymbols::load()
                            .inspect_err(
                                |e| tracing::warn!(error = %e, "kernel frames will be [unknown]"),
                            )
                            .ok()
                    } else {
                        None
                    };
                    let worker = Worker {
                        symbolizer: NativeSymbolizer::with_caches(
                            settings.demangle,
                            kernel_symbols,
                            settings.caches,
                        ),
                        settings,
                        targets,
                        submit,
                        metrics,
                        latest,
                        cumulative: Cumulative::default(),
                        captures,
                    };
                    worker.run(sampler, &stop, &heartbeat);
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

struct Worker {
    settings: PipelineSettings,
    symbolizer: NativeSymbolizer,
    targets: watch::Receiver<Arc<TargetSet>>,
    submit: Submit,
    metrics: Arc<AgentMetrics>,
    latest: LatestProfiles,
    cumulative: Cumulative,
    /// Finished captures to symbolize with this thread's caches.
    captures: mpsc::Receiver<SymbolizeJob>,
}

impl Worker {
    fn run(
        mut self,
        mut sampler: Sampler<KernelSampler, ProcfsProcesses>,
        stop: &AtomicBool,
        heartbeat: &AtomicU64,
    ) {
        let drain_every = self.settings.collect_interval.min(DRAIN_INTERVAL);
        let mut next_drain = Instant::now() + drain_every;
        let mut next_collect = Instant::now() + self.settings.collect_interval;
        while !stop.load(Ordering::SeqCst) {
            heartbeat.store(unix_now(), Ordering::Relaxed);
            while let Ok(job) = self.captures.try_recv() {
                self.symbolize_capture(job);
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
        let unreadable = sampler.processes().unreadable_processes;
        let container_ids = sampler.processes().container_id_stats();
        match sampler.finish() {
            Ok(recording) => {
                self.collect_recording(recording);
                self.cumulative
                    .unreadable_processes(&self.metrics, unreadable);
                self.cumulative.container_ids(&self.metrics, &container_ids);
            }
            Err(e) => self.drain_failed(&e),
        }
    }

    /// A capture's profile, named with the continuous profile's caches; its files stay
    /// cached for the next interval as if this were part of it.
    fn symbolize_capture(&mut self, job: SymbolizeJob) {
        let built = profile::build(
            &job.recording,
            &mut self.symbolizer,
            &BuildOptions::record(job.sample_rate),
        );
        // The requester may have gone (timeout, disconnect): nothing to do then.
        let _ = job.reply.send(built);
    }

    fn drain_failed(&self, error: &BpfError) {
        self.metrics.profiling_sessions_failing.inc();
        tracing::warn!(%error, "draining the kernel maps failed");
    }

    fn collect(&mut self, recording: Recording, processes: &ProcfsProcesses) {
        self.collect_recording(recording);
        self.cumulative
            .unreadable_processes(&self.metrics, processes.unreadable_processes);
        self.cumulative
            .container_ids(&self.metrics, &processes.container_id_stats());
    }

    /// Hands the interval's flame graph stacks to the page; services pruned from it lose
    /// their metric series too.
    fn publish(&self, profiles: Vec<(String, ServiceProfile)>) {
        publish(&self.latest, &self.metrics, profiles);
    }

    fn collect_recording(&mut self, recording: Recording) {
        let started = Instant::now();
        self.cumulative.kernel(&self.metrics, &recording.counters);
        let samples = merge(recording.samples);
        let targets = self.targets.borrow().clone();
        let mut groups: BTreeMap<&Labels, (&Arc<Target>, Vec<&RawSample>)> = BTreeMap::new();
        let resolved: Vec<(Option<Arc<Target>>, &RawSample)> = samples
            .iter()
            .map(|s| {
                let container = recording
                    .processes
                    .get(&s.pid)
                    .and_then(|p| p.container_id.as_deref());
                (targets.resolve(s.pid, container), s)
            })
            .collect();
        let mut untargeted = 0;
        for (target, sample) in &resolved {
            match target {
                Some(t) => groups
                    .entry(&t.labels)
                    .or_insert((t, Vec::new()))
                    .1
                    .push(sample),
                None => untargeted += sample.count,
            }
        }
        self.metrics.samples_untargeted.inc_by(untargeted);
        if groups.is_empty() {
            self.publish(Vec::new());
            self.symbolizer.next_round();
            return_free_memory();
            return;
        }
        profile::prepare_kernel(&mut self.symbolizer, &samples);
        let start = recording.start.unwrap_or_else(SystemTime::now);
        let mut batch = Vec::with_capacity(groups.len());
        let mut latest = Vec::with_capacity(groups.len());
        for (labels, (target, group)) in groups {
            let built = profile::build_samples(
                &group,
                &recording.processes,
                Some(start),
                recording.duration,
                &mut self.symbolizer,
                &self.settings.build,
            );
            let service = ServiceLabel {
                service_name: target.service_name().to_owned(),
            };
            let bytes = match built.encode_gzip() {
                Ok(b) => b,
                Err(error) => {
                    self.metrics.pprofs_dropped.inc();
                    tracing::warn!(%error, service = %service.service_name, "encoding failed");
                    continue;
                }
            };
            self.metrics.pprofs.get_or_create(&service).inc();
            self.metrics
                .pprof_bytes
                .get_or_create(&service)
                .inc_by(bytes.len() as u64);
            self.metrics
                .pprof_samples
                .get_or_create(&service)
                .inc_by(built.total_samples);
            latest.push((
                service.service_name,
                ServiceProfile::new(
                    unix_now(),
                    profile::folded(&built.profile),
                    built.total_samples,
                ),
            ));
            batch.push(ProfileSeries {
                labels: labels.clone(),
                pprof_gzip: bytes.into(),
                start,
                end: start + recording.duration,
                sample_rate: self.settings.sample_rate as u32,
                samples: built.total_samples,
            });
        }
        self.symbolizer.next_round();
        self.cumulative
            .symbolize(&self.metrics, &self.symbolizer.stats());
        self.publish(latest);
        self.metrics
            .interval_build_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(profiles = batch.len(), "interval built");
        (self.submit)(batch);
        return_free_memory();
    }
}

/// Publishes one interval's flame graph stacks; the services pruned from the page (no
/// samples for [`super::latest::STALE_INTERVALS`] intervals) lose their metric series too.
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

/// One sample per (pid, comm, stacks) over the interval's drains.
fn merge(samples: Vec<RawSample>) -> Vec<RawSample> {
    let mut counts: HashMap<(u32, String, Stack, Stack), u64> = HashMap::new();
    for s in samples {
        *counts.entry((s.pid, s.comm, s.user, s.kernel)).or_default() += s.count;
    }
    counts
        .into_iter()
        .map(|((pid, comm, user, kernel), count)| RawSample {
            pid,
            comm,
            user,
            kernel,
            count,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::latest::STALE_INTERVALS;

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

    #[test]
    fn merge_sums_equal_stacks_across_drains() {
        let sample = |pid, frames: Vec<u64>, count| RawSample {
            pid,
            comm: "c".into(),
            user: Stack::Frames(frames),
            kernel: Stack::NotCollected,
            count,
        };
        let merged = merge(vec![
            sample(1, vec![1, 2], 3),
            sample(2, vec![1, 2], 1),
            sample(1, vec![1, 2], 4),
            sample(1, vec![9], 1),
        ]);
        assert_eq!(merged.len(), 3);
        let pid1_stack12 = merged
            .iter()
            .find(|s| s.pid == 1 && s.user.frames() == [1, 2])
            .expect("merged sample");
        assert_eq!(pid1_stack12.count, 7);
        assert_eq!(merged.iter().map(|s| s.count).sum::<u64>(), 9);
    }
}
