//! `cargo xtask <cmd>`: the project's build, test and benchmark entry points.
//!
//! A plain Rust binary instead of shell scripts so that the same commands work on a laptop,
//! in CI and on a brand-new machine, and so that the benchmark can measure child processes
//! precisely (`wait4` rusage) and clean up after itself. One module per subcommand.
mod bench;
mod build_ebpf;
mod run;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Developer tasks for the profiler workspace"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every prerequisite that is missing (nightly rust-src, bpf-linker, Debian
    /// packages). Idempotent and quick when everything is present.
    Setup,
    /// Set up, then build the release agent (whose build.rs builds the eBPF object).
    BuildEbpf,
    /// Set up, build, and start the agent with the embedded default configuration (every
    /// process, ./profiles, http://127.0.0.1:4100/). Arguments after `--` go to
    /// `profiler-agent run`, or name another subcommand (`-- record --pid 1 -o p.pb.gz`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test in the workspace (end-to-end tests need root).
    Test,
    /// Benchmarks whose results go into BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf => build_ebpf::build_ebpf(),
        Cmd::Run { args } => run::run(&args),
        Cmd::Test => test::test(),
        Cmd::Bench { bench } => bench::bench(bench),
    };
    match result {
        Ok(()) => {}
        // A child that failed already printed why; only its exit code is left to pass on.
        Err(err) if err.downcast_ref::<util::ExitCode>().is_some() => {
            let code = err.downcast_ref::<util::ExitCode>().map_or(1, |c| c.0);
            std::process::exit(code);
        }
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            std::process::exit(1);
        }
    }
}
