//! `cargo xtask bench <name>`: benchmarks whose results are written into BENCHMARKS.md, each
//! under its own `## <name>` section so reruns replace only their own numbers.
mod agent;
mod child;
mod churn;
mod criterion;
mod daemon;
mod overhead;
mod pprof;
mod python;
mod receiver;
mod report;
mod scale;
mod soak;
mod symbolize;
mod unwind;

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
    /// RSS and CPU of the daemon at 10, 100 and 1000 live processes and at 10, 100 and 500
    /// distinct binaries.
    Scale {
        /// Seconds the daemon runs per case.
        #[arg(long, default_value_t = 45)]
        seconds: u64,
    },
    /// Short-lived processes: `--rate` per second under the daemon: no crash, bounded RSS,
    /// their samples named.
    Churn {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long, default_value_t = 300)]
        rate: u32,
    },
    /// The daemon under steady load for `--minutes`: the RSS slope (goal: under 1 MiB per 10
    /// minutes).
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        #[arg(long, default_value_t = 200)]
        idle: usize,
    },
    /// Right native stacks and what they cost: `profiler-agent record`, `perf record
    /// --call-graph dwarf` + `perf report` and lightswitch (`LIGHTSWITCH_BIN`, skipped when
    /// unset) in turn, each for the same window at 97 Hz over the whole host while Debian's
    /// gzip -9 and python3.11 keep every CPU busy: CPU, peak RSS, and the share of those
    /// programs' samples whose stack reaches `_start`/`__libc_start_main`.
    Unwind {
        /// Seconds each profiler records.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Keep the profiles and logs (their directory is printed) instead of deleting them.
        #[arg(long)]
        keep: bool,
    },
    /// Python processes: `profiler-agent record --pid` against py-spy (one `py-spy record`
    /// per process) on the same two busy CPython 3.11 processes, each for 5 s and then for
    /// the window at 97 Hz: CPU (per second of profiling and whole), peak RSS, samples
    /// (goal: our CPU per second under a quarter of py-spy's).
    Python {
        /// Seconds of the long run of each profiler.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Every benchmark above with its defaults, one after another (about an hour).
    All,
}

pub fn bench(which: Bench) -> Result<()> {
    match which {
        Bench::All => {
            for each in [
                Bench::Agent {
                    seconds: 60,
                    idle: 200,
                },
                Bench::Overhead { seconds: 30 },
                Bench::Unwind {
                    seconds: 20,
                    keep: false,
                },
                Bench::Python { seconds: 30 },
                Bench::Scale { seconds: 45 },
                Bench::Churn {
                    seconds: 60,
                    rate: 300,
                },
                Bench::Pprof,
                Bench::Symbolize,
                Bench::Soak {
                    minutes: 30,
                    idle: 200,
                },
            ] {
                bench(each)?;
            }
            Ok(())
        }
        Bench::Scale { seconds } => scale::scale(seconds),
        Bench::Churn { seconds, rate } => churn::churn(seconds, rate),
        Bench::Soak { minutes, idle } => soak::soak(minutes, idle),
        Bench::Overhead { seconds } => overhead::overhead(seconds),
        Bench::Symbolize => symbolize::symbolize(),
        Bench::Pprof => pprof::pprof(),
        Bench::Agent { seconds, idle } => agent::agent(seconds, idle),
        Bench::Unwind { seconds, keep } => unwind::unwind(seconds, keep),
        Bench::Python { seconds } => python::python(seconds),
    }
}
