//! `cargo xtask bench overhead`: what profiling costs the host, ours against the usual tools.
//!
//! Each profiler in turn records the whole host for the same window while a deep-stack
//! workload (tests/fixtures/chain.c recursing WORKLOAD_DEPTH frames, then chain_a -> ... ->
//! chain_d) keeps every CPU busy,
//! so every sample carries a real user stack to walk. A fresh workload runs for each profiler
//! so they all see the same conditions. For each we record the profiler's own CPU (user+sys
//! core-seconds per wall second, startup and shutdown included) and peak RSS from `wait4`;
//! for ours also the BPF program's own cost per sample from `kernel.bpf_stats_enabled`,
//! which the process CPU cannot show because it is charged to whichever task was sampled.
use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    child::{self, Child},
    report::{self, BpfStats, Measurement},
};
use crate::{
    setup::setup,
    util::{agent_binary, build_agent, check, is_root, workspace_root},
};

/// The profilers under test, in the order they run.
#[derive(Clone, Copy)]
enum Profiler {
    Ours,
    Perf,
    Bpftrace,
}

impl Profiler {
    fn name(self) -> &'static str {
        match self {
            Self::Ours => "profiler-agent record",
            Self::Perf => "perf record -F 97 -a -g",
            Self::Bpftrace => "bpftrace profile:hz:97",
        }
    }

    fn file_stem(self) -> &'static str {
        match self {
            Self::Ours => "ours",
            Self::Perf => "perf",
            Self::Bpftrace => "bpftrace",
        }
    }

    /// The command line. All three sample at 97 Hz on every CPU with user and kernel stacks.
    fn command(self, seconds: u64, tmp: &Path) -> Command {
        match self {
            Self::Ours => {
                let mut cmd = Command::new(agent_binary());
                cmd.args(["record", "--duration", &format!("{seconds}s"), "--output"])
                    .arg(tmp.join("ours.pb.gz"));
                cmd
            }
            Self::Perf => {
                let mut cmd = Command::new("perf");
                cmd.args(["record", "-F", "97", "-a", "-g", "-o"])
                    .arg(tmp.join("perf.data"))
                    .args(["--", "sleep", &seconds.to_string()]);
                cmd
            }
            Self::Bpftrace => {
                let mut cmd = Command::new("bpftrace");
                cmd.args(["-e", "profile:hz:97 { @[ustack, kstack] = count(); }"]);
                cmd
            }
        }
    }
}

pub fn overhead(seconds: u64) -> Result<()> {
    ensure!(seconds >= 2, "--seconds must be at least 2");
    if !is_root() {
        bail!(
            "the overhead benchmark loads BPF programs and runs `perf record -a`: run it as root"
        );
    }
    setup()?;
    build_agent()?;
    let tmp = tempfile::Builder::new().prefix("xtask-bench-").tempdir()?;
    let chain = compile_workload(tmp.path())?;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());

    child::install_interrupt_handler();
    let mut results = Vec::new();
    for profiler in [Profiler::Ours, Profiler::Perf, Profiler::Bpftrace] {
        eprintln!(
            "bench: {} for {seconds} s, {cpus} workload threads keep every CPU busy",
            profiler.name()
        );
        let m = measure(profiler, seconds, cpus, &chain, tmp.path())
            .with_context(|| format!("measuring {}", profiler.name()))?;
        eprintln!(
            "bench: {}: {:.4} core-s/s, peak RSS {} KiB",
            m.name, m.cpu_per_s, m.max_rss_kib
        );
        results.push(m);
    }

    let section = report::section(&results, seconds, cpus)?;
    println!("{section}");
    let path = workspace_root().join("BENCHMARKS.md");
    report::write_section(&path, &section)?;
    eprintln!(
        "bench: wrote the `## overhead` section of {}",
        path.display()
    );
    Ok(())
}

/// Builds the workload the way the e2e tests do: frame pointers kept, nothing inlined.
pub(super) fn compile_workload(tmp: &Path) -> Result<PathBuf> {
    let out = tmp.join("chain");
    check(
        Command::new("gcc")
            .args([
                "-O1",
                "-g",
                "-fno-omit-frame-pointer",
                "-fno-inline",
                "-pthread",
            ])
            .arg(workspace_root().join("tests/fixtures/chain.c"))
            .arg("-o")
            .arg(&out),
    )?;
    Ok(out)
}

/// Starts the deep-stack workload on `cpus` threads for `seconds`, and waits until its
/// threads reach their loop, before any profiler starts.
pub(super) fn start_workload(chain: &Path, seconds: u64, cpus: usize) -> Result<Child> {
    let mut workload = Command::new(chain);
    workload
        .args([
            seconds.to_string(),
            cpus.to_string(),
            WORKLOAD_DEPTH.to_string(),
        ])
        .stdin(Stdio::null());
    let workload = Child::spawn("workload", &mut workload)?;
    child::sleep(Duration::from_millis(500))?;
    Ok(workload)
}

/// Frames each workload thread recurses before its busy chain: about 32 frames per sample
/// with the chain and libc's thread start, a deep stack for every profiler to walk.
pub const WORKLOAD_DEPTH: u32 = 24;

fn measure(
    profiler: Profiler,
    seconds: u64,
    cpus: usize,
    chain: &Path,
    tmp: &Path,
) -> Result<Measurement> {
    let workload = start_workload(chain, seconds + 5, cpus)?;

    let log_path = tmp.join(format!("{}.log", profiler.file_stem()));
    let log = File::create(&log_path)?;
    let mut cmd = profiler.command(seconds, tmp);
    cmd.stdin(Stdio::null()).stderr(log.try_clone()?);
    match profiler {
        // bpftrace prints its whole map at exit; that work counts, the text does not matter.
        Profiler::Bpftrace => cmd.stdout(Stdio::null()),
        _ => cmd.stdout(log),
    };

    let stats = match profiler {
        Profiler::Ours => Some(BpfStatsSysctl::enable()?),
        _ => None,
    };
    let mut running = Child::spawn(profiler.name(), &mut cmd)?;
    let mut bpf = None;
    let window = Duration::from_secs(seconds);
    match profiler {
        Profiler::Ours => {
            // Read the counters while the program is still attached, near the end of the run.
            child::sleep((window - Duration::from_secs(1)).saturating_sub(running.elapsed()))?;
            bpf = read_bpf_stats(profiler_common::PROGRAM_NAME)
                .map_err(|e| {
                    eprintln!(
                        "bench: warning: no BPF stats for {}: {e:#}",
                        profiler_common::PROGRAM_NAME
                    )
                })
                .ok();
        }
        Profiler::Bpftrace => {
            child::sleep(window.saturating_sub(running.elapsed()))?;
            running.signal(libc::SIGINT)?;
        }
        Profiler::Perf => {}
    }
    let exit = running.wait(window + Duration::from_secs(120))?;
    drop(stats);
    drop(workload);
    if !exit.status.success() {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} failed ({}); its output ends:\n{}",
            profiler.name(),
            exit.status,
            tail.join("\n")
        );
    }
    let wall = exit.wall.as_secs_f64();
    Ok(Measurement {
        name: profiler.name(),
        cpu_per_s: exit.cpu.as_secs_f64() / wall,
        max_rss_kib: exit.max_rss_kib,
        bpf,
    })
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled=1` for as long as this lives; the old value is restored on drop
/// because the stats add a little cost to every BPF program on the host.
pub(super) struct BpfStatsSysctl {
    previous: String,
}

impl BpfStatsSysctl {
    pub(super) fn enable() -> Result<Self> {
        let previous = fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?;
        fs::write(BPF_STATS_SYSCTL, "1").with_context(|| format!("writing {BPF_STATS_SYSCTL}"))?;
        Ok(Self {
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for BpfStatsSysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS_SYSCTL, &self.previous) {
            eprintln!("bench: warning: could not restore {BPF_STATS_SYSCTL}: {e}");
        }
    }
}

/// Sums `run_time_ns` and `run_cnt` over the programs named `name` (one program attached to
/// every CPU, but a sum is also right if the agent ever loads one per CPU).
pub(super) fn read_bpf_stats(name: &str) -> Result<BpfStats> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "name", name, "--json"])
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "`bpftool prog show name {name}` failed ({}; is the program loaded?) {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")?;
    let progs = match json {
        serde_json::Value::Array(progs) => progs,
        other => vec![other],
    };
    let field = |p: &serde_json::Value, f: &str| p.get(f).and_then(serde_json::Value::as_u64);
    let run_time_ns: u64 = progs.iter().filter_map(|p| field(p, "run_time_ns")).sum();
    let run_cnt: u64 = progs.iter().filter_map(|p| field(p, "run_cnt")).sum();
    ensure!(
        run_cnt > 0,
        "program {name} not loaded or never ran ({} found)",
        progs.len()
    );
    Ok(BpfStats {
        run_time_ns,
        run_cnt,
    })
}
