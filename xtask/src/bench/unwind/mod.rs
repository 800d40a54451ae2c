//! `cargo xtask bench unwind`: what right native stacks cost, ours against the profilers that
//! get them too, on stock distribution programs built without frame pointers.
//!
//! The load: Debian's own `gzip -9` in a shell loop over a large random file (a new gzip
//! process every few seconds) and `/usr/bin/python3.11` running a pure-Python busy loop, one
//! of each per two CPUs, so every CPU is busy in code without frame pointers. On a fresh load
//! each, one after another, for the same window at 97 Hz on the whole host:
//! `profiler-agent record`, `perf record --call-graph dwarf` followed by `perf report` over
//! its file (perf's symbolized answer), and lightswitch (`LIGHTSWITCH_BIN`; never built here,
//! its row is skipped and said so when the variable is absent). For each: CPU (user+sys
//! core-seconds per wall second) and peak RSS from `wait4`, and from its output the share
//! of the two programs' samples whose stack reaches the process entry (see
//! [`stacks::is_entry`]).
mod host;
mod report;
mod stacks;

use std::{
    env,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    child::{self, Child},
    daemon::Cost,
    report::write_section,
};
use crate::{
    setup::setup,
    util::{agent_binary, build_agent, is_root, workspace_root},
};
use host::{Mounts, Scratch, random_file, start_load};
use report::section;
use stacks::Shares;

const GZIP: &str = "/usr/bin/gzip";
const PYTHON: &str = "/usr/bin/python3.11";
/// The programs whose samples are judged: the processes the benchmark started, by pid
/// (other copies of them on the host do not count).
const PROGRAMS: [&str; 2] = ["gzip", "python3.11"];
/// Pure Python: the interpreter loop's own native stack is what gets unwound.
const PYTHON_LOOP: &str = "def work(n):\n    s = 0\n    for i in range(n):\n        s += i * i\n    return s\nwhile True:\n    work(100000)\n";
/// About 4 s of `gzip -9` per process on random data (about 35 MB/s).
const DATA_MIB: u64 = 128;
/// The load runs this long before a profiler starts, so both programs are in their loops.
const WARMUP: Duration = Duration::from_secs(2);
const RATE: &str = "97";
/// The environment variable naming the lightswitch binary.
const LIGHTSWITCH_BIN: &str = "LIGHTSWITCH_BIN";

/// One profiler's figures.
struct Row {
    name: String,
    cost: Cost,
    /// `None` for the rows that split perf's cost (no output of their own).
    shares: Option<Shares>,
    /// Every sample it took on the host, the load's and the rest.
    host_samples: Option<u64>,
}

pub fn unwind(seconds: u64, keep: bool) -> Result<()> {
    ensure!(seconds >= 5, "--seconds must be at least 5");
    if !is_root() {
        bail!("the unwind benchmark loads BPF programs and runs `perf record -a`: run it as root");
    }
    for program in [GZIP, PYTHON] {
        ensure!(
            Path::new(program).exists(),
            "{program} is missing: this benchmark profiles Debian's own gzip and python3.11"
        );
    }
    let lightswitch = lightswitch();
    match &lightswitch {
        Ok((bin, version)) => eprintln!("bench: lightswitch: {} ({version})", bin.display()),
        Err(why) => eprintln!("bench: lightswitch: NOT RUN: {why}"),
    }
    setup()?;
    build_agent()?;
    let tmp = Scratch::new(keep)?;
    let data = random_file(tmp.path())?;
    let load_before = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let copies = cpus.div_ceil(2);
    child::install_interrupt_handler();
    let mounts = Mounts::mount()?;

    let mut rows = Vec::new();
    rows.push(measure_ours(seconds, copies, &data, tmp.path())?);
    rows.extend(measure_perf(seconds, copies, &data, tmp.path())?);
    if let Ok((bin, _)) = &lightswitch {
        rows.push(measure_lightswitch(
            bin,
            seconds,
            copies,
            &data,
            tmp.path(),
        )?);
    }
    for r in &rows {
        let share = r.shares.as_ref().map(stacks::total);
        eprintln!(
            "bench: {}: {:.4} core-s/s, peak RSS {} KiB, complete {}",
            r.name,
            r.cost.cpu_per_s,
            r.cost.max_rss_kib,
            share.map_or("-".into(), |s| format!("{}/{}", s.complete, s.samples))
        );
    }

    let mounted = mounts.mounted_here.clone();
    drop(mounts);
    let section = section(
        seconds,
        cpus,
        copies,
        &rows,
        &lightswitch,
        &mounted,
        &load_before,
    )?;
    println!("{section}");
    let path = workspace_root().join("BENCHMARKS.md");
    write_section(&path, &section)?;
    eprintln!("bench: wrote the `## unwind` section of {}", path.display());
    Ok(())
}

/// The lightswitch binary and its `--version`, or why it is not run.
fn lightswitch() -> Result<(PathBuf, String), String> {
    let bin = env::var_os(LIGHTSWITCH_BIN)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            format!(
                "{LIGHTSWITCH_BIN} is not set (this benchmark never builds lightswitch: build \
                 github.com/javierhonduco/lightswitch outside the repository with `cargo build \
                 --release` and point {LIGHTSWITCH_BIN} at target/release/lightswitch)"
            )
        })?;
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{LIGHTSWITCH_BIN}={} cannot run: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} --version` failed ({})",
            bin.display(),
            out.status
        ));
    }
    Ok((bin, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// Runs `cmd` to its end with its stderr in `log`, and its stdout there too unless `stdout`
/// names a file of its own; fails with the log's tail.
fn run_to_end(
    name: &str,
    cmd: &mut Command,
    log: &Path,
    stdout: Option<&Path>,
    timeout: Duration,
) -> Result<Cost> {
    let file = File::create(log)?;
    let out = match stdout {
        Some(path) => File::create(path)?,
        None => file.try_clone()?,
    };
    cmd.stdin(Stdio::null()).stdout(out).stderr(file);
    // Blocked in wait4 while the profiler samples the host, so that xtask is not one of the
    // processes sampled.
    let exit = Child::spawn(name, cmd)?.wait_quietly(timeout)?;
    if !exit.status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        bail!(
            "{name} failed ({}); its output ends:\n{}",
            exit.status,
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    Ok(Cost::of(&exit))
}

fn timeout(seconds: u64) -> Duration {
    Duration::from_secs(4 * seconds + 300)
}

fn measure_ours(seconds: u64, copies: usize, data: &Path, tmp: &Path) -> Result<Row> {
    let name = "profiler-agent record";
    eprintln!("bench: {name} for {seconds} s");
    let out = tmp.join("ours.pb.gz");
    let load = start_load(copies, data, tmp)?;
    let mut cmd = Command::new(agent_binary());
    cmd.args(["record", "--duration", &format!("{seconds}s"), "--output"])
        .arg(&out);
    let cost = run_to_end(
        name,
        &mut cmd,
        &tmp.join("ours.log"),
        None,
        timeout(seconds),
    )?;
    let pids = load.pids()?;
    drop(load);
    let bytes = fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
    let (shares, host_samples) = stacks::from_pprof(&bytes, &pids)?;
    Ok(Row {
        name: name.into(),
        cost,
        shares: Some(shares),
        host_samples: Some(host_samples),
    })
}

/// perf record, then perf report (its cost spread over the window), then perf script for
/// the stacks (not counted: only the benchmark needs it).
fn measure_perf(seconds: u64, copies: usize, data: &Path, tmp: &Path) -> Result<Vec<Row>> {
    eprintln!("bench: perf record --call-graph dwarf for {seconds} s");
    let file = tmp.join("perf.data");
    let load = start_load(copies, data, tmp)?;
    let mut record = Command::new("perf");
    record
        .args(["record", "--call-graph", "dwarf", "-F", RATE, "-a", "-o"])
        .arg(&file)
        .args(["--", "sleep", &seconds.to_string()]);
    let rec = run_to_end(
        "perf record",
        &mut record,
        &tmp.join("perf-record.log"),
        None,
        timeout(seconds),
    )?;
    let pids = load.pids()?;
    drop(load);
    let record_log = fs::read_to_string(tmp.join("perf-record.log"))?;

    eprintln!("bench: perf report over the recorded window");
    let mut report = Command::new("perf");
    report
        .args(["report", "--stdio", "--no-children", "-i"])
        .arg(&file);
    let rep = run_to_end(
        "perf report",
        &mut report,
        &tmp.join("perf-report.log"),
        Some(&tmp.join("perf-report.txt")),
        timeout(seconds),
    )?;

    eprintln!("bench: perf script for the stacks (not counted)");
    let script = tmp.join("perf-script.txt");
    let mut cmd = Command::new("perf");
    let pid_list: Vec<String> = pids.keys().map(u32::to_string).collect();
    cmd.args([
        "script",
        "-F",
        "comm,pid,ip,sym",
        "--pid",
        &pid_list.join(","),
        "-i",
    ])
    .arg(&file);
    run_to_end(
        "perf script",
        &mut cmd,
        &tmp.join("perf-script.log"),
        Some(&script),
        timeout(seconds),
    )?;
    let text = fs::read_to_string(&script)?;

    let cpu_s = |c: &Cost| c.cpu_per_s * c.wall_s;
    let over_window = |c: &Cost| Cost {
        cpu_per_s: cpu_s(c) / rec.wall_s,
        max_rss_kib: c.max_rss_kib,
        wall_s: rec.wall_s,
    };
    let both = Cost {
        cpu_per_s: (cpu_s(&rec) + cpu_s(&rep)) / rec.wall_s,
        max_rss_kib: rec.max_rss_kib.max(rep.max_rss_kib),
        wall_s: rec.wall_s,
    };
    Ok(vec![
        Row {
            name: "perf record --call-graph dwarf + perf report".into(),
            cost: both,
            shares: Some(stacks::from_perf_script(&text, &pids)),
            host_samples: stacks::perf_record_samples(&record_log),
        },
        Row {
            name: "(of which perf record)".into(),
            cost: over_window(&rec),
            shares: None,
            host_samples: None,
        },
        Row {
            name: "(of which perf report, over the window)".into(),
            cost: over_window(&rep),
            shares: None,
            host_samples: None,
        },
    ])
}

fn measure_lightswitch(
    bin: &Path,
    seconds: u64,
    copies: usize,
    data: &Path,
    tmp: &Path,
) -> Result<Row> {
    let name = "lightswitch";
    eprintln!("bench: {name} for {seconds} s");
    // Its on-disk unwind-information cache (default /tmp/lightswitch) starts empty, as ours
    // has none: both build every table within the window.
    let cache = tmp.join("lightswitch-cache");
    fs::create_dir(&cache)?;
    let load = start_load(copies, data, tmp)?;
    let mut cmd = Command::new(bin);
    // It leaves itself out, as our record does.
    cmd.arg("--cache-dir-base")
        .arg(&cache)
        .args([
            "--exclude-self",
            "--duration",
            &seconds.to_string(),
            "--sample-freq",
            RATE,
            "--profile-format",
            "pprof",
            "--profile-name",
            "lightswitch.pb",
            "--profile-path",
        ])
        .arg(tmp);
    let cost = run_to_end(
        name,
        &mut cmd,
        &tmp.join("lightswitch.log"),
        None,
        timeout(seconds),
    )?;
    let pids = load.pids()?;
    drop(load);
    let out = tmp.join("lightswitch.pb");
    let bytes = fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
    let (shares, host_samples) = stacks::from_pprof(&bytes, &pids)?;
    Ok(Row {
        name: name.into(),
        cost,
        shares: Some(shares),
        host_samples: Some(host_samples),
    })
}
