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
use std::{
    env,
    fmt::Write as _,
    fs::{self, File},
    io::{self, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    child::{self, Child},
    daemon::Cost,
    report::{cpu_model, kernel_release, today, write_section},
    stacks::{self, Share, Shares},
};
use crate::{
    setup::setup,
    util::{agent_binary, build_agent, check, is_root, workspace_root},
};

const GZIP: &str = "/usr/bin/gzip";
const PYTHON: &str = "/usr/bin/python3.11";
/// The programs whose samples are judged, by comm.
const PROGRAMS: &[&str] = &["gzip", "python3.11"];
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
    let section = section(seconds, cpus, copies, &rows, &lightswitch, &mounted)?;
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

/// The file systems the profilers look for tracepoints in: tracefs for ours (aya), and
/// debugfs, under which lightswitch reads `tracing/` (it refuses to start without it).
const MOUNTS: [(&str, &str); 2] = [
    ("tracefs", "/sys/kernel/tracing"),
    ("debugfs", "/sys/kernel/debug"),
];

/// [`MOUNTS`] for the whole run, those the host lacks mounted here and unmounted on drop, so
/// that every profiler sees the same host, one where tracepoints can be attached.
struct Mounts {
    mounted_here: Vec<&'static str>,
}

impl Mounts {
    fn mount() -> Result<Self> {
        let mounts = fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
        let mut guard = Self {
            mounted_here: Vec::new(),
        };
        for (kind, dir) in MOUNTS {
            let present = mounts.lines().any(|l| {
                let mut fields = l.split_whitespace();
                let (_, d, k) = (fields.next(), fields.next(), fields.next());
                d == Some(dir) && k == Some(kind)
            });
            if !present {
                eprintln!("bench: mounting {kind} on {dir} for this run (unmounted at the end)");
                check(Command::new("mount").args(["-t", kind, kind, dir]))?;
                guard.mounted_here.push(dir);
            }
        }
        Ok(guard)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(dir) = self.mounted_here.pop() {
            // Recursive: debugfs's tracing/ is an automount of tracefs below it.
            match Command::new("umount").args(["-R", dir]).status() {
                Ok(s) if s.success() => eprintln!("bench: unmounted {dir}"),
                _ => eprintln!("bench: warning: could not unmount {dir}"),
            }
        }
    }
}

/// The run's directory: deleted at the end unless `--keep`.
struct Scratch {
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    fn new(keep: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("xtask-bench-unwind-")
            .tempdir()?;
        if !keep {
            let path = dir.path().to_owned();
            return Ok(Self {
                _dir: Some(dir),
                path,
            });
        }
        let path = dir.keep();
        eprintln!("bench: profiles and logs are kept in {}", path.display());
        Ok(Self { _dir: None, path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// `DATA_MIB` of random bytes for gzip: incompressible, so gzip -9 works hard throughout.
fn random_file(tmp: &Path) -> Result<PathBuf> {
    let path = tmp.join("random.bin");
    let mut out = File::create(&path)?;
    let mut random = File::open("/dev/urandom")?.take(DATA_MIB << 20);
    io::copy(&mut random, &mut out).context("writing the random file")?;
    Ok(path)
}

/// The two programs, `copies` of each, in their own process groups (killed on drop).
struct Load {
    _children: Vec<Child>,
}

fn start_load(copies: usize, data: &Path) -> Result<Load> {
    let mut children = Vec::new();
    for _ in 0..copies {
        let mut gzip = Command::new("/bin/sh");
        gzip.args([
            "-c",
            &format!("while :; do {GZIP} -9 -c \"$0\" > /dev/null || exit 1; done"),
        ])
        .arg(data)
        .stdin(Stdio::null());
        children.push(Child::spawn("gzip loop", &mut gzip)?);
        let mut python = Command::new(PYTHON);
        python
            .args(["-c", PYTHON_LOOP])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        children.push(Child::spawn("python3.11 loop", &mut python)?);
    }
    child::sleep(WARMUP)?;
    Ok(Load {
        _children: children,
    })
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
    let exit = Child::spawn(name, cmd)?.wait(timeout)?;
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
    let load = start_load(copies, data)?;
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
    drop(load);
    let bytes = fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
    Ok(Row {
        name: name.into(),
        cost,
        shares: Some(stacks::from_pprof(&bytes, "comm", PROGRAMS)?),
    })
}

/// perf record, then perf report (its cost spread over the window), then perf script for
/// the stacks (not counted: only the benchmark needs it).
fn measure_perf(seconds: u64, copies: usize, data: &Path, tmp: &Path) -> Result<Vec<Row>> {
    eprintln!("bench: perf record --call-graph dwarf for {seconds} s");
    let file = tmp.join("perf.data");
    let load = start_load(copies, data)?;
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
    drop(load);

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
    cmd.args([
        "script",
        "-F",
        "comm,pid,ip,sym",
        "--comms",
        &PROGRAMS.join(","),
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
            shares: Some(stacks::from_perf_script(&text, PROGRAMS)),
        },
        Row {
            name: "(of which perf record)".into(),
            cost: over_window(&rec),
            shares: None,
        },
        Row {
            name: "(of which perf report, over the window)".into(),
            cost: over_window(&rep),
            shares: None,
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
    let load = start_load(copies, data)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--cache-dir-base")
        .arg(&cache)
        .args([
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
    drop(load);
    let out = tmp.join("lightswitch.pb");
    let bytes = fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
    Ok(Row {
        name: name.into(),
        cost,
        shares: Some(stacks::from_pprof(&bytes, "process.name", PROGRAMS)?),
    })
}

fn percent(share: Option<Share>) -> String {
    share
        .and_then(Share::percent)
        .map_or("-".into(), |p| format!("{p:.1}%"))
}

fn section(
    seconds: u64,
    cpus: usize,
    copies: usize,
    rows: &[Row],
    lightswitch: &Result<(PathBuf, String), String>,
    mounted: &[&str],
) -> Result<String> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut command = "cargo xtask bench unwind".to_owned();
    if seconds != 20 {
        write!(command, " --seconds {seconds}")?;
    }
    let mut s = String::new();
    writeln!(s, "## unwind\n")?;
    writeln!(
        s,
        "`{LIGHTSWITCH_BIN}=... {command}` as root ({}, kernel {}, {cpus} CPUs, {}). \
         The load: `{GZIP} -9` in a shell loop over {DATA_MIB} MiB of random bytes (a new \
         process every few seconds) and `{PYTHON}` running a pure-Python busy loop, {copies} \
         of each, every CPU busy in stock Debian code built without frame pointers. Each \
         profiler in turn, on a fresh load started {} s before it, samples the whole host at \
         {RATE} Hz for {seconds} s: `profiler-agent record --duration {seconds}s` (release \
         build), `perf record --call-graph dwarf -F {RATE} -a` then `perf report --stdio` over \
         its file (perf's symbolized answer; its CPU is spread over the recorded window, its \
         RSS is the larger of the two), and lightswitch writing pprof (its on-disk unwind cache empty at the start: ours has \
         none). CPU is user+sys \
         core-seconds per wall second and RSS the peak, both from `wait4`. Complete: the \
         share of gzip's and python3.11's samples (by comm) whose stack reaches `_start`, \
         `__libc_start_main` or `__libc_start_call_main` (or a thread's root), read from \
         each one's output (ours and lightswitch's pprof, `perf script` for perf).\n",
        today(),
        kernel_release(),
        cpu_model(),
        WARMUP.as_secs(),
    )?;
    if !mounted.is_empty() {
        writeln!(
            s,
            "This host had nothing mounted on {}; the benchmark mounted tracefs and debugfs \
             there for the run (lightswitch does not start without \
             /sys/kernel/debug/tracing; our exec tracepoint uses tracefs).\n",
            mounted.join(" and ")
        )?;
    }
    match lightswitch {
        Ok((bin, version)) => {
            writeln!(s, "lightswitch: `{}`, `{version}`.", bin.display())?;
            lightswitch_notes(&mut s, rows)?;
            writeln!(s)?;
        }
        Err(why) => writeln!(s, "lightswitch: NOT RUN: {why}.\n")?,
    }
    writeln!(
        s,
        "| profiler | CPU core-s/s | peak RSS MiB | samples | complete | gzip complete | python3.11 complete |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|")?;
    for r in rows {
        let cell = |program: &str| percent(r.shares.as_ref().and_then(|x| x.get(program).copied()));
        writeln!(
            s,
            "| {} | {:.4} | {:.1} | {} | {} | {} | {} |",
            r.name,
            r.cost.cpu_per_s,
            mib(r.cost.max_rss_kib),
            r.shares
                .as_ref()
                .map_or("-".into(), |x| stacks::total(x).samples.to_string()),
            percent(r.shares.as_ref().map(stacks::total)),
            cell("gzip"),
            cell("python3.11"),
        )?;
    }
    if lightswitch.is_err() {
        writeln!(s, "| lightswitch | not run | | | | | |")?;
    }
    writeln!(s)?;
    goals(&mut s, rows)?;
    Ok(s)
}

/// What a reader needs to know to trust (or not) lightswitch's row on this kernel.
fn lightswitch_notes(s: &mut String, rows: &[Row]) -> Result<()> {
    let samples = rows
        .iter()
        .find(|r| r.name == "lightswitch")
        .and_then(|r| r.shares.as_ref())
        .map_or(0, |x| stacks::total(x).samples);
    let modules = Path::new("/proc/modules").exists();
    if samples == 0 {
        write!(
            s,
            " Its profile holds no sample of the two programs, so its completeness is not \
             measured."
        )?;
        if !modules {
            write!(
                s,
                " This kernel has no /proc/modules (built without module support): \
                 lightswitch 0.5.0 then drops every sample (\"kernel process not found\"); \
                 a build that treats the missing file as no modules works."
            )?;
        }
    } else if !modules {
        write!(
            s,
            " This kernel has no /proc/modules (built without module support), on which \
             lightswitch 0.5.0 as released drops every sample (\"kernel process not found\"): \
             the binary measured carries a local change that treats the missing file as no \
             modules, as on a kernel with none loaded; its unwinding is unchanged."
        )?;
    }
    Ok(())
}

fn goals(s: &mut String, rows: &[Row]) -> Result<()> {
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix));
    let ours = find("profiler-agent").context("no row for our agent")?;
    let perf = find("perf record").context("no row for perf")?;
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let complete = |r: &Row| {
        r.shares
            .as_ref()
            .map(stacks::total)
            .and_then(Share::percent)
    };
    writeln!(s, "Goals (issue 16):\n")?;
    match find("lightswitch") {
        Some(ls) => {
            writeln!(
                s,
                "- CPU under half of lightswitch's: {} ({:.4} vs {:.4} core-s/s, ratio {:.2}).",
                verdict(ours.cost.cpu_per_s < ls.cost.cpu_per_s / 2.0),
                ours.cost.cpu_per_s,
                ls.cost.cpu_per_s,
                ours.cost.cpu_per_s / ls.cost.cpu_per_s
            )?;
            writeln!(
                s,
                "- peak RSS under half of lightswitch's: {} ({:.1} vs {:.1} MiB, ratio {:.2}).",
                verdict(ours.cost.max_rss_kib * 2 < ls.cost.max_rss_kib),
                mib(ours.cost.max_rss_kib),
                mib(ls.cost.max_rss_kib),
                ours.cost.max_rss_kib as f64 / ls.cost.max_rss_kib as f64
            )?;
        }
        None => writeln!(
            s,
            "- under half of lightswitch's CPU and RSS: not measured (lightswitch not run)."
        )?,
    }
    writeln!(
        s,
        "- under 1.5% of a core and 48 MiB peak RSS: {} ({:.2}%, {:.1} MiB).",
        verdict(ours.cost.cpu_per_s < 0.015 && mib(ours.cost.max_rss_kib) < 48.0),
        100.0 * ours.cost.cpu_per_s,
        mib(ours.cost.max_rss_kib)
    )?;
    writeln!(
        s,
        "- CPU below perf record --call-graph dwarf + perf report: {} ({:.4} vs {:.4}).",
        verdict(ours.cost.cpu_per_s < perf.cost.cpu_per_s),
        ours.cost.cpu_per_s,
        perf.cost.cpu_per_s
    )?;
    match (complete(ours), complete(perf)) {
        (Some(o), Some(p)) => writeln!(
            s,
            "- complete stacks at least 95% of perf's share: {} ({o:.1}% vs {p:.1}%).",
            verdict(o >= 0.95 * p)
        )?,
        _ => writeln!(
            s,
            "- complete stacks at least 95% of perf's share: not measured (no samples of the \
             two programs in one of the outputs)."
        )?,
    }
    Ok(())
}
