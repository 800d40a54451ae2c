//! `profiler-agent record`: a one-shot capture of some or all processes, or of a command it
//! starts (`record -- ./prog args`), like `perf record`: written as gzipped pprof, a flame
//! graph SVG or folded stacks ([`output`]), with the heaviest functions printed. The command
//! ([`command`]) is profiled with its children until it exits, and its exit code is
//! `record`'s.

mod command;
mod output;

use std::{
    ffi::OsString,
    fs::File,
    io::IsTerminal as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

pub use command::{CommandError, exit_code};
pub use output::OutputFormat;

use crate::{
    bpf::{BpfError, SamplerOptions, Scope, open_sampler},
    frames::sources,
    interval,
    process::DEFAULT_CONTAINER_ID_CACHE_SIZE,
    profile,
    python::Interpreters,
    sampler::CounterSnapshot,
    symbolize::{CacheConfig, Demangle, kallsyms::KernelSymbols},
};
use profiler_common::Counter;

#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// Process to profile (repeatable); every process on the host when absent.
    #[arg(long = "pid", value_name = "PID", conflicts_with = "command")]
    pub pids: Vec<u32>,
    /// How long to record, e.g. `10s`, `500ms`, `2m` [default: 10s; with a command, until it
    /// exits].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
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
    /// Do not put Python functions in the stacks of CPython processes (their interpreter
    /// loop's native frames stay).
    #[arg(long)]
    pub no_python: bool,
    /// How often the kernel maps are drained; short intervals keep maps small and catch
    /// short-lived processes' mappings early.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub drain_interval: Duration,
    /// How many of the heaviest functions to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Where to write the profile; its extension picks the format when --format is not
    /// given: `.svg` a flame graph, `.folded` or `.txt` folded stacks, anything else pprof.
    #[arg(long, short, default_value = "profile.pb.gz")]
    pub output: PathBuf,
    /// What to write, several separated by commas: each goes to --output with its own
    /// extension.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub format: Vec<OutputFormat>,
    /// A command to start and profile with its children until it exits (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// How long `record` samples when neither --duration nor a command says.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

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
    #[error(transparent)]
    Command(#[from] CommandError),
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Records as `args` say; returns the exit status of the command it started, if any.
pub fn run(args: &RecordArgs) -> Result<Option<std::process::ExitStatus>, RecordError> {
    if args.no_user_stacks && args.no_kernel_stacks {
        return Err(RecordError::NothingToRecord);
    }
    for &pid in &args.pids {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(RecordError::NoSuchPid { pid });
        }
    }
    // Fail on an unwritable output before spending the recording time.
    let outputs = output::outputs(&args.output, &args.format);
    let mut files = Vec::new();
    for (format, path) in &outputs {
        let file = File::create(path).map_err(|source| RecordError::Output {
            path: path.clone(),
            source,
        })?;
        files.push((*format, path.clone(), file));
    }
    let remove_outputs = || {
        for (_, path) in &outputs {
            let _ = std::fs::remove_file(path);
        }
    };
    // Started before the sampler, held before its exec until the sampler is attached.
    let mut launched = if args.command.is_empty() {
        None
    } else {
        Some(command::Launched::start(&args.command).inspect_err(|_| remove_outputs())?)
    };
    let targets: Vec<u32> = match &launched {
        Some(launched) => vec![launched.pid()],
        None => args.pids.clone(),
    };
    let options = SamplerOptions {
        sample_rate: args.sample_rate,
        collect_interval: args.drain_interval,
        collect_user: !args.no_user_stacks,
        unwind_table_memory: crate::bpf::DEFAULT_UNWIND_TABLE_MEMORY,
        collect_kernel: !args.no_kernel_stacks,
        // What is recorded is the host or the named processes, not the recorder: its own
        // samples would cost it an unwind table and a symbol table of its own binary.
        exclude_self: true,
        python: !args.no_python,
        // A command's children are not known yet: its inherited events are the filter.
        pids: (launched.is_none() && !args.pids.is_empty()).then(|| args.pids.clone()),
        // Named processes get events of their own, so the rest of the host is never
        // interrupted for them.
        scope: if targets.is_empty() {
            Scope::EveryCpu
        } else {
            // The operator named these processes on the command line: no descriptor limit.
            Scope::Threads {
                pids: targets.clone(),
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
    let interpreters = Interpreters::new();
    let opened = open_sampler(&options, DEFAULT_CONTAINER_ID_CACHE_SIZE, true, |kernel| {
        interpreters.hook(kernel).into_iter().collect()
    })
    .inspect_err(|_| {
        // Leave no empty file behind for a recording that never started (and a held
        // command is killed when `launched` drops).
        remove_outputs();
    })?;
    let kernel_memory = opened.kernel_memory_bytes;
    let mut sampler = opened.sampler;
    let early_snapshots = opened.early_snapshots;
    let duration = match (&launched, args.duration) {
        (_, Some(duration)) => Some(duration),
        (Some(_), None) => None,
        (None, None) => Some(DEFAULT_DURATION),
    };
    eprintln!(
        "recording {} {} at {} Hz on {} CPUs (kernel maps: {} KiB)",
        match &launched {
            Some(launched) => format!(
                "{:?} (pid {}) and its children",
                args.command,
                launched.pid()
            ),
            None if args.pids.is_empty() => "every process".to_owned(),
            None => format!("pids {:?}", args.pids),
        },
        match duration {
            Some(duration) => format!("for {duration:?}"),
            None => "until it exits".to_owned(),
        },
        args.sample_rate,
        sampler.source().cpus(),
        kernel_memory / 1024,
    );
    if let Some(launched) = &mut launched {
        launched.release();
    }
    let deadline = duration.map(|d| Instant::now() + d);
    let progress = std::io::stderr().is_terminal();
    let started = Instant::now();
    sampler.run_until_with(
        args.drain_interval,
        deadline,
        || STOP.load(Ordering::SeqCst) || launched.as_mut().is_some_and(|c| c.exited()),
        |samples| {
            if progress {
                eprint!(
                    "\r{:.1} s, {samples} samples",
                    started.elapsed().as_secs_f64()
                );
            }
        },
    )?;
    let window = sampler.stop()?;
    if progress {
        eprintln!();
    }
    // Marks the end of the sampling window (before the last drain and symbolization), for
    // whoever watches.
    eprintln!("sampling stopped after {:.3}s", window.as_secs_f64());
    let recording = sampler.finish()?;
    // Sampling is over: no more unwind tables to load. Stopping the early-snapshot thread now
    // keeps a table it would build (megabytes for a big binary) from adding to naming's peak.
    drop(early_snapshots);

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
    let mut sources = sources::native(
        args.demangle,
        kernel_symbols,
        CacheConfig::default(),
        options.python.then_some(interpreters),
    );
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
    let title = match args.command.first() {
        Some(program) => program.to_string_lossy().into_owned(),
        None => "profiler-agent record".to_owned(),
    };
    for (format, path, file) in &mut files {
        output::write(*format, file, &built, &title).map_err(|source| RecordError::Output {
            path: path.clone(),
            source,
        })?;
    }
    report(&counters, &summary, &built, sources.stats(), args, &outputs);
    Ok(launched.as_mut().map(command::Launched::wait))
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
    outputs: &[(OutputFormat, PathBuf)],
) {
    let counters: Vec<String> = Counter::ALL
        .iter()
        .map(|c| format!("{}={}", c.name(), counters.get(*c)))
        .collect();
    eprintln!("counters: {}", counters.join(" "));
    eprintln!(
        "wrote {} ({} samples from {} processes in {:.1}s, {} drains; frames named {} unknown {})",
        outputs
            .iter()
            .map(|(_, path)| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
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
