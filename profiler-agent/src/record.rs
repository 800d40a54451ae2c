//! `profiler-agent record`: a one-shot capture of some or all processes, like `perf record`,
//! written as gzipped pprof with the heaviest functions printed.

use std::{
    fs::File,
    io::Write as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    bpf::{BpfError, SamplerOptions, Scope, open_sampler},
    frames::sources,
    interval,
    process::DEFAULT_CONTAINER_ID_CACHE_SIZE,
    profile,
    sampler::CounterSnapshot,
    symbolize::{CacheConfig, Demangle, kallsyms::KernelSymbols},
};
use profiler_common::Counter;

#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// Process to profile (repeatable); every process on the host when absent.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// How long to record, e.g. `10s`, `500ms`, `2m`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Samples per second on each CPU; with --pid, per thread of the named processes while
    /// it runs.
    #[arg(long, default_value_t = 97, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub sample_rate: u64,
    /// How C++ and Rust names are shown.
    #[arg(long, value_enum, default_value_t = Demangle::Simplified)]
    pub demangle: Demangle,
    /// Do not record user-space stacks.
    #[arg(long)]
    pub no_user_stacks: bool,
    /// Do not record kernel stacks.
    #[arg(long)]
    pub no_kernel_stacks: bool,
    /// How often the kernel maps are drained; short intervals keep maps small and catch
    /// short-lived processes' mappings early.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub drain_interval: Duration,
    /// How many of the heaviest functions to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Where to write the gzipped pprof profile.
    #[arg(long, short)]
    pub output: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("no process with pid {pid}")]
    NoSuchPid { pid: u32 },
    #[error("cannot write the output file {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--no-user-stacks and --no-kernel-stacks together leave nothing to record")]
    NothingToRecord,
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run(args: &RecordArgs) -> Result<(), RecordError> {
    if args.no_user_stacks && args.no_kernel_stacks {
        return Err(RecordError::NothingToRecord);
    }
    for &pid in &args.pids {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(RecordError::NoSuchPid { pid });
        }
    }
    // Fail on an unwritable output before spending the recording time.
    let output_error = |source| RecordError::Output {
        path: args.output.clone(),
        source,
    };
    let mut output = File::create(&args.output).map_err(output_error)?;

    let options = SamplerOptions {
        sample_rate: args.sample_rate,
        collect_interval: args.drain_interval,
        collect_user: !args.no_user_stacks,
        unwind_table_memory: crate::bpf::DEFAULT_UNWIND_TABLE_MEMORY,
        collect_kernel: !args.no_kernel_stacks,
        pids: (!args.pids.is_empty()).then(|| args.pids.clone()),
        // Named processes get events of their own, so the rest of the host is never
        // interrupted for them.
        scope: if args.pids.is_empty() {
            Scope::EveryCpu
        } else {
            // The operator named these processes on the command line: no descriptor limit.
            Scope::Threads {
                pids: args.pids.clone(),
                max_events: usize::MAX,
            }
        },
    };
    // Before loading anything: a Ctrl-C while the sampler loads ends the recording at once,
    // with what it has, rather than killing the agent.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            request_stop as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            request_stop as *const () as libc::sighandler_t,
        );
    }
    let opened =
        open_sampler(&options, DEFAULT_CONTAINER_ID_CACHE_SIZE, true).inspect_err(|_| {
            // Leave no empty file behind for a recording that never started.
            let _ = std::fs::remove_file(&args.output);
        })?;
    let kernel_memory = opened.kernel_memory_bytes;
    let mut sampler = opened.sampler;
    let _early_snapshots = opened.early_snapshots;
    eprintln!(
        "recording {} for {:?} at {} Hz on {} CPUs (kernel maps: {} KiB)",
        if args.pids.is_empty() {
            "every process".to_owned()
        } else {
            format!("pids {:?}", args.pids)
        },
        args.duration,
        args.sample_rate,
        sampler.source().cpus(),
        kernel_memory / 1024,
    );
    sampler.run_until(args.drain_interval, Instant::now() + args.duration, || {
        STOP.load(Ordering::SeqCst)
    })?;
    let recording = sampler.finish()?;
    // Marks the end of the sampling window (before symbolization), for whoever watches.
    eprintln!(
        "sampling stopped after {:.3}s",
        recording.duration.as_secs_f64()
    );

    let kernel_symbols = if args.no_kernel_stacks {
        None
    } else {
        KernelSymbols::load()
            .inspect_err(|e| tracing::warn!(error = %e, "kernel frames will be [unknown]"))
            .ok()
            // Named once: only the kernel addresses sampled, not a table of every symbol.
            .map(KernelSymbols::one_shot)
    };
    // The whole recording is one interval, named with the default caches.
    let mut sources = sources::native(args.demangle, kernel_symbols, CacheConfig::default());
    let counters = recording.counters;
    let tables = recording.unwind_tables;
    eprintln!(
        "unwind tables: loaded={} over_budget={} unavailable={} rows={} of {} processes={}",
        tables.tables_loaded,
        tables.tables_over_budget,
        tables.tables_unavailable,
        tables.rows_used,
        tables.rows_capacity,
        tables.processes,
    );
    let summary = Summary {
        processes: recording.processes.len(),
        duration: recording.duration,
        drains: recording.drains,
    };
    let built = interval::build_one(
        recording,
        &mut sources,
        &profile::BuildOptions::record(args.sample_rate),
    );
    let bytes = built.encode_gzip().map_err(output_error)?;
    output.write_all(&bytes).map_err(output_error)?;

    report(&counters, &summary, &built, sources.stats(), args);
    Ok(())
}

/// What the report tells of the recording once it has been built.
struct Summary {
    processes: usize,
    duration: Duration,
    drains: u64,
}

fn report(
    counters: &CounterSnapshot,
    summary: &Summary,
    built: &profile::BuiltProfile,
    stats: crate::symbolize::SymbolizeStats,
    args: &RecordArgs,
) {
    let counters: Vec<String> = Counter::ALL
        .iter()
        .map(|c| format!("{}={}", c.name(), counters.get(*c)))
        .collect();
    eprintln!("counters: {}", counters.join(" "));
    eprintln!(
        "wrote {} ({} samples from {} processes in {:.1}s, {} drains; frames named {} unknown {})",
        args.output.display(),
        built.total_samples,
        summary.processes,
        summary.duration.as_secs_f64(),
        summary.drains,
        stats.known_frames,
        stats.unknown_frames,
    );
    eprintln!(
        "symbols: elf_errors={} same_file_cache hits={} misses={} evictions={} \
         build_id_cache hits={} misses={} evictions={}",
        stats.elf_errors,
        stats.same_file_cache.hits,
        stats.same_file_cache.misses,
        stats.same_file_cache.evictions,
        stats.build_id_cache.hits,
        stats.build_id_cache.misses,
        stats.build_id_cache.evictions,
    );
    if built.total_samples == 0 {
        return;
    }
    println!("{:>8} {:>6}  function", "samples", "self%");
    for (name, count) in built.top_self.iter().take(args.top) {
        let share = *count as f64 * 100.0 / built.total_samples as f64;
        println!("{count:>8} {share:>5.1}%  {name}");
    }
}
