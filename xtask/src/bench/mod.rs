//! `cargo xtask bench <name>`: benchmarks whose results are written into BENCHMARKS.md, each
//! under its own `## <name>` section so reruns replace only their own numbers.
mod agent;
mod child;
mod criterion;
mod overhead;
mod pprof;
mod receiver;
mod report;
mod symbolize;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// Profiler overhead: our agent vs `perf record` vs bpftrace on the same busy machine:
    /// each profiler's CPU (core-seconds per second), peak RSS, and our BPF ns per sample.
    Overhead {
        /// Seconds each profiler records (the workload runs 5 s longer).
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Symbolization: ours vs blazesym on the same address sets: addresses per second cold
    /// and warm, peak RSS, name agreement.
    Symbolize,
    /// pprof: build and gzip-encode one profile of 10 000 distinct stacks x 30 frames:
    /// time per profile, allocations, compressed bytes per sample (goal: under 5 ms).
    Pprof,
    /// The daemon on a busy host: `profiler-agent run` for a minute at 97 Hz with every CPU
    /// busy and many idle processes, pushing to a local receiver, against `perf record`:
    /// CPU, peak RSS, kernel map memory (goals: under 1% of a core, under 64 MiB).
    Agent {
        /// Seconds the agent (and then perf) runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Idle processes on the host, each a discovered target.
        #[arg(long, default_value_t = 200)]
        idle: usize,
    },
}

pub fn bench(bench: Bench) -> Result<()> {
    match bench {
        Bench::Overhead { seconds } => overhead::overhead(seconds),
        Bench::Symbolize => symbolize::symbolize(),
        Bench::Pprof => pprof::pprof(),
        Bench::Agent { seconds, idle } => agent::agent(seconds, idle),
    }
}
