//! The agent's own Prometheus metrics: pyroscope.ebpf's names where it has one, `profiler_`
//! names for what it does not measure (kernel counters, symbolization, caches, discovery),
//! and the process's own CPU and memory (read through `crate::process::procfs`). Write-path
//! metrics live with the writer (`crate::write::WriteMetrics`) and are registered in the
//! same [`Registry`].
//!
//! Kernel counters and cache statistics are cumulative values read from their owners;
//! [`Cumulative`] turns them into counter increments so the exported counters never go
//! backwards, even when an owner is rebuilt.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};

use crate::{
    cache::CacheStats,
    process::procfs,
    sampler::{CounterSnapshot, UnwindTableStats},
    symbolize::{SymbolizeStats, budget::Degraded},
};
use profiler_common::Counter as KernelCounter;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    pub cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabel {
    pub end: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: String,
}

/// A capture's cause (`manual` for the API, `cpu` or `memory` for triggers) and outcome
/// (`done` or `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaptureLabels {
    pub trigger: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    pub trigger: String,
}

/// What a capture did about a process with more threads than its perf-event limit
/// (`per_cpu`: sampled per CPU instead; `refused`: no descriptors left for that either).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every agent metric outside the write path.
pub struct AgentMetrics {
    pub active_targets: Gauge,
    pub profiling_sessions: Counter,
    pub profiling_sessions_failing: Counter,
    pub pprofs: Family<ServiceLabel, Counter>,
    pub pprof_bytes: Family<ServiceLabel, Counter>,
    pub pprof_samples: Family<ServiceLabel, Counter>,
    pub pprofs_dropped: Counter,
    /// Kernel outcomes that are not failures (recorded, skipped idle/kernel thread/...).
    pub bpf_samples: Family<NameLabel, Counter>,
    /// Kernel failure branches (stack map full, collision, counts map full, ...).
    pub bpf_errors: Family<NameLabel, Counter>,
    /// User-stack walks by how they ended (complete, no_table, read_error, ...).
    pub unwind_walks: Family<EndLabel, Counter>,
    /// Python walks by how they ended (complete, cut, no_thread, read_error).
    pub python_walks: Family<EndLabel, Counter>,
    /// Python frames by outcome (named, unnamed).
    pub python_frames: Family<OutcomeLabel, Counter>,
    /// Processes whose Python frames the kernel program walks.
    pub python_processes: Gauge,
    /// Unwind tables by outcome (loaded, evicted, over_budget, unavailable).
    pub unwind_tables: Family<OutcomeLabel, Counter>,
    /// Mapping entries the kernel refused (its trie full).
    pub unwind_entries_refused: Counter,
    /// Bytes of the unwind-table array in use.
    pub unwind_table_memory: Gauge,
    /// Processes whose mappings are loaded for unwinding.
    pub unwind_processes: Gauge,
    /// Samples of processes that matched no target (dropped when `targets_only`).
    pub samples_untargeted: Counter,
    /// Samples of processes no process scan listed, given their target at the drain.
    pub samples_named_at_drain: Counter,
    /// Samples that went to the default target (`ebpf/unspecified` unless configured).
    pub samples_default_target: Counter,
    /// On-demand and triggered captures by cause and outcome.
    pub captures: Family<CaptureLabels, Counter>,
    /// Threshold triggers fired, by cause (`cpu`, `memory`).
    pub triggers_fired: Family<TriggerLabel, Counter>,
    /// Captures of processes over the per-capture thread-event limit, by action.
    pub capture_thread_limit: Family<ActionLabel, Counter>,
    /// HotSpot attaches to ask a JVM for its perf map, by outcome.
    pub jvm_attach: Family<OutcomeLabel, Counter>,
    pub frames_known: Counter,
    pub frames_unknown: Counter,
    pub elf_errors: Counter,
    /// Binaries, tables and DWARF units left out of symbolization, by reason.
    pub symbols_degraded: Family<ReasonLabel, Counter>,
    /// Bytes of symbol data held now (`symbol_memory_limit` bounds it).
    pub symbol_memory: Gauge,
    pub cache_hits: Family<CacheLabel, Counter>,
    pub cache_misses: Family<CacheLabel, Counter>,
    pub cache_evictions: Family<CacheLabel, Counter>,
    pub cache_entries: Family<CacheLabel, Gauge>,
    pub unreadable_processes: Counter,
    pub discovery_errors: Family<ProviderLabel, Counter>,
    pub targets_rejected: Counter,
    pub kernel_map_memory: Gauge,
    pub interval_build_seconds: Histogram,
    pub resident_memory: Gauge,
    pub cpu_seconds: FloatGauge,
}

impl AgentMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            active_targets: Gauge::default(),
            profiling_sessions: Counter::default(),
            profiling_sessions_failing: Counter::default(),
            pprofs: Family::default(),
            pprof_bytes: Family::default(),
            pprof_samples: Family::default(),
            pprofs_dropped: Counter::default(),
            bpf_samples: Family::default(),
            bpf_errors: Family::default(),
            unwind_walks: Family::default(),
            python_walks: Family::default(),
            python_frames: Family::default(),
            python_processes: Gauge::default(),
            unwind_tables: Family::default(),
            unwind_entries_refused: Counter::default(),
            unwind_table_memory: Gauge::default(),
            unwind_processes: Gauge::default(),
            samples_untargeted: Counter::default(),
            samples_named_at_drain: Counter::default(),
            samples_default_target: Counter::default(),
            captures: Family::default(),
            triggers_fired: Family::default(),
            capture_thread_limit: Family::default(),
            jvm_attach: Family::default(),
            frames_known: Counter::default(),
            frames_unknown: Counter::default(),
            elf_errors: Counter::default(),
            symbols_degraded: Family::default(),
            symbol_memory: Gauge::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            cache_evictions: Family::default(),
            cache_entries: Family::default(),
            unreadable_processes: Counter::default(),
            discovery_errors: Family::default(),
            targets_rejected: Counter::default(),
            kernel_map_memory: Gauge::default(),
            interval_build_seconds: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            resident_memory: Gauge::default(),
            cpu_seconds: FloatGauge::default(),
        };
        let r = registry;
        r.register(
            "pyroscope_ebpf_active_targets",
            "Targets that can match a process",
            m.active_targets.clone(),
        );
        r.register(
            "pyroscope_ebpf_profiling_sessions",
            "Kernel sampling sessions started",
            m.profiling_sessions.clone(),
        );
        r.register(
            "pyroscope_ebpf_profiling_sessions_failing",
            "Kernel sampling sessions that failed to start or to drain",
            m.profiling_sessions_failing.clone(),
        );
        r.register(
            "pyroscope_ebpf_pprofs",
            "pprof profiles built",
            m.pprofs.clone(),
        );
        r.register(
            "pyroscope_ebpf_pprof_bytes",
            "Gzipped bytes of the pprof profiles built",
            m.pprof_bytes.clone(),
        );
        r.register(
            "pyroscope_ebpf_pprof_samples",
            "Samples in the pprof profiles built",
            m.pprof_samples.clone(),
        );
        r.register(
            "pyroscope_ebpf_pprofs_dropped",
            "Profiles built but not handed to the writer (encoding failed)",
            m.pprofs_dropped.clone(),
        );
        r.register(
            "profiler_bpf_samples",
            "Kernel sampling outcomes by name",
            m.bpf_samples.clone(),
        );
        r.register(
            "profiler_bpf_errors",
            "Kernel failure branches by name; each lost or degraded sample counts once",
            m.bpf_errors.clone(),
        );
        r.register(
            "profiler_unwind_walks",
            "User-stack walks by how they ended: complete (reached the process or thread \
             entry), no_table, mapping_unknown, read_error, depth_limit, unsupported_rule, \
             no_registers",
            m.unwind_walks.clone(),
        );
        r.register(
            "profiler_python_walks",
            "Python frame-chain walks of CPython processes' samples by how they ended: \
             complete, cut (depth limit or a read failed midway), no_thread (the sampled \
             thread has no Python thread state), read_error",
            m.python_walks.clone(),
        );
        r.register(
            "profiler_python_frames",
            "Python frames the frames stage named from their code objects, by outcome: \
             named, unnamed (the code object could not be read)",
            m.python_frames.clone(),
        );
        r.register(
            "profiler_python_processes",
            "CPython processes whose Python frames the kernel program walks",
            m.python_processes.clone(),
        );
        r.register(
            "profiler_unwind_tables",
            "Unwind tables by outcome: loaded, evicted (to make room), over_budget (walked \
             with frame pointers), unavailable (no usable .eh_frame)",
            m.unwind_tables.clone(),
        );
        r.register(
            "profiler_unwind_entries_refused",
            "Mapping entries the kernel's trie refused; those mappings are walked with frame \
             pointers",
            m.unwind_entries_refused.clone(),
        );
        r.register_with_unit(
            "profiler_unwind_table_memory",
            "Kernel memory of unwind tables in use, of unwind_table_memory",
            Unit::Bytes,
            m.unwind_table_memory.clone(),
        );
        r.register(
            "profiler_unwind_processes",
            "Processes whose mappings are loaded for the kernel's stack walker",
            m.unwind_processes.clone(),
        );
        r.register(
            "profiler_samples_untargeted",
            "Samples of processes that matched no target",
            m.samples_untargeted.clone(),
        );
        r.register(
            "profiler_samples_named_at_drain",
            "Samples of processes no process scan listed, given their target at the drain",
            m.samples_named_at_drain.clone(),
        );
        r.register(
            "profiler_samples_default_target",
            "Samples that went to the default target (ebpf/unspecified unless configured)",
            m.samples_default_target.clone(),
        );
        r.register(
            "profiler_symbolize_frames_known",
            "Frames named",
            m.frames_known.clone(),
        );
        r.register(
            "profiler_symbolize_frames_unknown",
            "Frames left unnamed",
            m.frames_unknown.clone(),
        );
        r.register(
            "profiler_symbolize_elf_errors",
            "Mapped files that could not be read as ELF",
            m.elf_errors.clone(),
        );
        r.register(
            "profiler_symbols_degraded",
            "Symbol data left out (DWARF, symbol table or whole binary) by reason",
            m.symbols_degraded.clone(),
        );
        r.register_with_unit(
            "profiler_symbol_memory",
            "Symbol data held by loaded binaries, bounded by symbol_memory_limit",
            Unit::Bytes,
            m.symbol_memory.clone(),
        );
        r.register("profiler_cache_hits", "Cache hits", m.cache_hits.clone());
        r.register(
            "profiler_cache_misses",
            "Cache misses",
            m.cache_misses.clone(),
        );
        r.register(
            "profiler_cache_evictions",
            "Cache evictions",
            m.cache_evictions.clone(),
        );
        r.register(
            "profiler_cache_entries",
            "Entries in each cache",
            m.cache_entries.clone(),
        );
        r.register(
            "profiler_processes_unreadable",
            "Sampled processes whose /proc entry could not be read (already exited)",
            m.unreadable_processes.clone(),
        );
        r.register(
            "profiler_discovery_errors",
            "Failed discovery attempts by provider",
            m.discovery_errors.clone(),
        );
        r.register(
            "profiler_targets_rejected",
            "Discovered label sets refused (invalid label name or value, bad pid)",
            m.targets_rejected.clone(),
        );
        r.register(
            "profiler_captures",
            "Captures of one process by trigger (manual, cpu, memory) and outcome (done, failed)",
            m.captures.clone(),
        );
        r.register(
            "profiler_triggers_fired",
            "Threshold triggers fired, by cause (cpu, memory)",
            m.triggers_fired.clone(),
        );
        r.register(
            "profiler_jvm_attach",
            "HotSpot dynamic attaches asking a JVM to write its perf map (Compiler.perfmap), by \
             outcome: done, disabled (-XX:+DisableAttachMechanism: left alone), timeout (no \
             attach socket in time), command_failed (the JVM refused the command, before JDK \
             17), error, gone",
            m.jvm_attach.clone(),
        );
        r.register(
            "profiler_capture_thread_limit",
            "Captures of a process with more threads than the per-capture perf-event limit, \
             by action (per_cpu: sampled per CPU instead, refused: no descriptors left)",
            m.capture_thread_limit.clone(),
        );
        r.register_with_unit(
            "profiler_kernel_map_memory",
            "Kernel memory pinned by the BPF maps",
            Unit::Bytes,
            m.kernel_map_memory.clone(),
        );
        r.register_with_unit(
            "profiler_interval_build",
            "Time to symbolize and encode one interval's profiles",
            Unit::Seconds,
            m.interval_build_seconds.clone(),
        );
        r.register_collector(Box::new(UnsafeFiles));
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory of the agent",
            Unit::Bytes,
            m.resident_memory.clone(),
        );
        r.register_with_unit(
            "process_cpu",
            "CPU time of the agent (user + system), cumulative",
            Unit::Seconds,
            m.cpu_seconds.clone(),
        );
        m
    }

    pub fn capture(&self, trigger: &str, outcome: &str) {
        self.captures
            .get_or_create(&CaptureLabels {
                trigger: trigger.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// One attach asking a JVM for its perf map ended with `outcome`.
    pub fn jvm_attach(&self, outcome: &str) {
        self.jvm_attach
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn trigger_fired(&self, trigger: &str) {
        self.triggers_fired
            .get_or_create(&TriggerLabel {
                trigger: trigger.to_owned(),
            })
            .inc();
    }

    /// Removes a service's series (the pipeline prunes services without samples for a few
    /// intervals); they start again from zero if it comes back.
    pub fn forget_service(&self, service_name: &str) {
        let label = ServiceLabel {
            service_name: service_name.to_owned(),
        };
        self.pprofs.remove(&label);
        self.pprof_bytes.remove(&label);
        self.pprof_samples.remove(&label);
    }

    /// Reads the agent's own CPU time and RSS from /proc/self (on scrape).
    pub fn update_process(&self) {
        if let Some((cpu, rss)) = own_usage() {
            self.cpu_seconds.set(cpu);
            self.resident_memory.set(rss as i64);
        }
    }
}

/// `profiler_unsafe_files_total{reason}`: files of profiled processes refused by
/// `crate::procfile`, read from its process-wide counters on each scrape.
#[derive(Debug)]
struct UnsafeFiles;

impl Collector for UnsafeFiles {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "profiler_unsafe_files",
            "Files of profiled processes refused by reason (not_regular, too_large, escape, loop)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, count) in crate::procfile::refusals() {
            let label = ReasonLabel {
                reason: reason.to_owned(),
            };
            ConstCounter::new(count).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// Turns cumulative readings into counter increments.
#[derive(Default)]
pub struct Cumulative {
    kernel: CounterSnapshot,
    unwind_tables: UnwindTableStats,
    symbolize: SymbolizeStats,
    container_ids: CacheStats,
    unreadable: u64,
}

impl Cumulative {
    pub fn kernel(&mut self, m: &AgentMetrics, now: &CounterSnapshot) {
        let delta = now.since(&self.kernel);
        for counter in KernelCounter::ALL {
            if counter.is_python_walk_end() {
                let name = counter.name();
                m.python_walks
                    .get_or_create(&EndLabel {
                        end: name.strip_prefix("python_").unwrap_or(name).to_owned(),
                    })
                    .inc_by(delta.get(counter));
                continue;
            }
            if counter.is_walk_end() {
                m.unwind_walks
                    .get_or_create(&EndLabel {
                        end: counter.name().to_owned(),
                    })
                    .inc_by(delta.get(counter));
                continue;
            }
            let family = if counter.is_error() {
                &m.bpf_errors
            } else {
                &m.bpf_samples
            };
            family
                .get_or_create(&NameLabel {
                    name: counter.name().to_owned(),
                })
                .inc_by(delta.get(counter));
        }
        self.kernel = *now;
    }

    pub fn unwind_tables(&mut self, m: &AgentMetrics, now: &UnwindTableStats) {
        let was = &self.unwind_tables;
        for (outcome, now, was) in [
            ("loaded", now.tables_loaded, was.tables_loaded),
            ("evicted", now.tables_evicted, was.tables_evicted),
            (
                "over_budget",
                now.tables_over_budget,
                was.tables_over_budget,
            ),
            (
                "unavailable",
                now.tables_unavailable,
                was.tables_unavailable,
            ),
        ] {
            m.unwind_tables
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.to_owned(),
                })
                .inc_by(now.saturating_sub(was));
        }
        m.unwind_entries_refused
            .inc_by(now.entries_refused.saturating_sub(was.entries_refused));
        let row = std::mem::size_of::<profiler_common::UnwindRow>() as u64;
        m.unwind_table_memory.set((now.rows_used * row) as i64);
        m.unwind_processes.set(now.processes as i64);
        self.unwind_tables = *now;
    }

    pub fn symbolize(&mut self, m: &AgentMetrics, now: &SymbolizeStats) {
        let was = &self.symbolize;
        m.frames_known
            .inc_by(now.known_frames.saturating_sub(was.known_frames));
        m.frames_unknown
            .inc_by(now.unknown_frames.saturating_sub(was.unknown_frames));
        m.elf_errors
            .inc_by(now.elf_errors.saturating_sub(was.elf_errors));
        for (outcome, now, was) in [
            ("named", now.python_frames_named, was.python_frames_named),
            (
                "unnamed",
                now.python_frames_unnamed,
                was.python_frames_unnamed,
            ),
        ] {
            m.python_frames
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.to_owned(),
                })
                .inc_by(now.saturating_sub(was));
        }
        m.python_processes.set(now.python_processes as i64);
        cache(m, "same_file", &was.same_file_cache, &now.same_file_cache);
        cache(m, "build_id", &was.build_id_cache, &now.build_id_cache);
        cache(m, "pid", &was.pid_cache, &now.pid_cache);
        for reason in Degraded::ALL {
            m.symbols_degraded
                .get_or_create(&ReasonLabel {
                    reason: reason.reason().to_owned(),
                })
                .inc_by(
                    now.symbols
                        .degraded(reason)
                        .saturating_sub(was.symbols.degraded(reason)),
                );
        }
        m.symbol_memory.set(now.symbols.used as i64);
        self.symbolize = *now;
    }

    pub fn container_ids(&mut self, m: &AgentMetrics, now: &CacheStats) {
        cache(m, "container_id", &self.container_ids, now);
        self.container_ids = *now;
    }

    pub fn unreadable_processes(&mut self, m: &AgentMetrics, now: u64) {
        m.unreadable_processes
            .inc_by(now.saturating_sub(self.unreadable));
        self.unreadable = now;
    }
}

fn cache(m: &AgentMetrics, name: &str, was: &CacheStats, now: &CacheStats) {
    let label = CacheLabel {
        cache: name.to_owned(),
    };
    m.cache_hits
        .get_or_create(&label)
        .inc_by(now.hits.saturating_sub(was.hits));
    m.cache_misses
        .get_or_create(&label)
        .inc_by(now.misses.saturating_sub(was.misses));
    m.cache_evictions
        .get_or_create(&label)
        .inc_by(now.evictions.saturating_sub(was.evictions));
    m.cache_entries.get_or_create(&label).set(now.len as i64);
}

/// (CPU seconds, resident bytes) of this process.
fn own_usage() -> Option<(f64, u64)> {
    let stat = procfs::stat(std::path::Path::new("/proc/self"))?;
    Some((
        stat.cpu_ticks as f64 / procfs::clock_ticks() as f64,
        stat.rss_pages * procfs::page_size(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_reads_this_process() {
        let (cpu, rss) = own_usage().expect("/proc/self/stat");
        assert!(cpu >= 0.0);
        assert!(rss > 1 << 20, "{rss} bytes resident");
    }

    #[test]
    fn cumulative_readings_become_increments() {
        let mut registry = Registry::default();
        let m = AgentMetrics::register(&mut registry);
        let mut c = Cumulative::default();
        let mut snap = CounterSnapshot::default();
        snap.values[KernelCounter::Recorded as usize] = 5;
        c.kernel(&m, &snap);
        snap.values[KernelCounter::Recorded as usize] = 8;
        c.kernel(&m, &snap);
        let recorded = m
            .bpf_samples
            .get_or_create(&NameLabel {
                name: KernelCounter::Recorded.name().to_owned(),
            })
            .get();
        assert_eq!(recorded, 8);
    }

    #[test]
    fn unsafe_file_refusals_are_exported_by_reason() {
        let mut registry = Registry::default();
        AgentMetrics::register(&mut registry);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::File::create(tmp.path().join("big"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let root = crate::procfile::ProcRoot::new(tmp.path()).unwrap();
        assert!(root.open(std::path::Path::new("big"), 1).is_err());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("profiler_unsafe_files_total{reason=\"too_large\"}"))
            .unwrap_or_else(|| panic!("{text}"));
        let count: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1, "{line}");
        assert!(text.contains("# TYPE profiler_unsafe_files counter"));
    }

    #[test]
    fn degraded_symbols_and_budget_use_reach_the_metrics() {
        let mut registry = Registry::default();
        let m = AgentMetrics::register(&mut registry);
        let mut c = Cumulative::default();
        let mut now = SymbolizeStats::default();
        now.symbols.degraded[Degraded::TooManySymbols as usize] = 2;
        now.symbols.used = 4096;
        c.symbolize(&m, &now);
        now.symbols.degraded[Degraded::TooManySymbols as usize] = 3;
        c.symbolize(&m, &now);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("profiler_symbols_degraded_total{reason=\"too_many_symbols\"} 3"),
            "{text}"
        );
        assert!(text.contains("profiler_symbols_degraded_total{reason=\"budget\"} 0"));
        assert!(text.contains("profiler_symbol_memory_bytes 4096"), "{text}");
    }
}
