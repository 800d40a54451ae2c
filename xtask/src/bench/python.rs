//! `cargo xtask bench python`: what profiling Python processes costs with our agent against
//! py-spy, the Python profiler people already run.
//!
//! The load: two processes of Debian's own `/usr/bin/python3.11`, each running [`SCRIPT`]
//! (written to the run's temporary directory), a pure-Python busy loop three functions deep.
//! Both keep running for the whole benchmark, so both profilers see the same two processes,
//! one profiler after the other, each for the same window at 97 Hz:
//!
//! - ours: `profiler-agent record --pid A --pid B --duration Ns` (release build; `--pid` is
//!   repeatable, so one recorder covers exactly those two processes, nothing else on the
//!   host), writing folded stacks;
//! - py-spy ([`crate::setup::PY_SPY`], installed by `cargo xtask setup`): `py-spy record -r 97
//!   -d N --format raw -o FILE --pid P` once per process, both at the same time, with
//!   py-spy's defaults otherwise (it stops the process for each sample, as users run it).
//!   Their CPU is summed and the larger peak RSS taken.
//!
//! CPU is user+sys seconds and RSS the peak, both from `wait4` (the agent's and each
//! py-spy's own, startup and shutdown included); while the profilers run, xtask sleeps in
//! one `poll` on their pidfds. Also counted from each output: the samples, those whose stack
//! names the script's innermost function [`LEAF`] (both name Python frames), and the CPU the
//! two Python processes got during each window (from /proc, to show what each profiler takes
//! from them), and what the rest of the host used meanwhile (a busy host skews both).
//!
//! Each profiler runs twice: for [`SHORT_S`] seconds, then for the window. The difference
//! is its cost per second of profiling, apart from what it pays once (ours: loading and
//! verifying the BPF programs, reading kernel symbols and the binaries' tables, about 0.15 s;
//! py-spy: almost nothing). The goal, our CPU under a quarter of py-spy's, is judged on that
//! per-second cost, what a continuously running agent pays; the ratio of the whole windows
//! is reported too.
use std::{
    fmt::Write as _,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    child::{self, Child},
    report::{cpu_model, kernel_release, today, write_section},
};
use crate::{
    setup::{PY_SPY, setup},
    util::{agent_binary, build_agent, is_root, workspace_root},
};

const PYTHON: &str = "/usr/bin/python3.11";
/// The innermost function of [`SCRIPT`]: a sample whose stack names it has Python frames.
const LEAF: &str = "bench_leaf";
/// Pure Python, CPU-bound, a call chain three functions deep under the module.
const SCRIPT: &str = "\
def bench_leaf(n):
    s = 0
    for i in range(n):
        s += i * i
    return s


def bench_middle(n):
    return bench_leaf(n) + 1


def bench_outer(n):
    return bench_middle(n) + 1


while True:
    bench_outer(100000)
";
const PROCESSES: usize = 2;
const RATE: &str = "97";
/// The Python processes run this long before the first profiler starts.
const WARMUP: Duration = Duration::from_secs(2);
/// Ours against py-spy: CPU under a quarter.
const CPU_GOAL_RATIO: f64 = 0.25;
/// The short run of each profiler, whose cost is subtracted to give the cost per second.
const SHORT_S: u64 = 5;

/// One profiler's figures over its window.
struct Row {
    name: &'static str,
    /// User+sys seconds, summed over its processes.
    cpu_s: f64,
    /// The longest of its processes' wall times.
    wall_s: f64,
    max_rss_kib: u64,
    samples: u64,
    /// Samples whose stack names [`LEAF`].
    named: u64,
    /// CPU seconds the Python processes got while it ran, summed.
    targets_cpu_s: f64,
    /// CPU seconds the rest of the host used while it ran: neither it nor the Python
    /// processes (xtask's own wake-ups, anything else running), to tell a quiet run.
    others_cpu_s: f64,
}

pub fn python(seconds: u64) -> Result<()> {
    ensure!(
        seconds >= 2 * SHORT_S,
        "--seconds must be at least {}",
        2 * SHORT_S
    );
    if !is_root() {
        bail!("the python benchmark loads BPF programs and ptraces processes: run it as root");
    }
    ensure!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: this benchmark profiles Debian's own python3.11"
    );
    setup()?;
    build_agent()?;
    let tmp = tempfile::Builder::new()
        .prefix("xtask-bench-python-")
        .tempdir()?;
    let script = tmp.path().join("busy.py");
    fs::write(&script, SCRIPT)?;
    let load_before = load_average();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    child::install_interrupt_handler();

    let pythons = (0..PROCESSES)
        .map(|i| {
            let mut cmd = Command::new(PYTHON);
            cmd.arg(&script)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Child::spawn(&format!("python3.11 {i}"), &mut cmd)
        })
        .collect::<Result<Vec<_>>>()?;
    let pids: Vec<libc::pid_t> = pythons.iter().map(Child::pid).collect();
    child::sleep(WARMUP)?;
    for &pid in &pids {
        ensure!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "python3.11 (pid {pid}) ended during the warm-up"
        );
    }

    eprintln!("bench: profiler-agent record --pid {pids:?} for {SHORT_S} s, then {seconds} s");
    let ours_short = measure_ours(SHORT_S, &pids, tmp.path())?;
    let ours = measure_ours(seconds, &pids, tmp.path())?;
    eprintln!("bench: py-spy record, one per process, for {SHORT_S} s, then {seconds} s");
    let py_spy_short = measure_py_spy(SHORT_S, &pids, tmp.path())?;
    let py_spy = measure_py_spy(seconds, &pids, tmp.path())?;
    drop(pythons);
    for r in [&ours_short, &ours, &py_spy_short, &py_spy] {
        eprintln!(
            "bench: {}: {:.2} CPU s, peak RSS {} KiB, {} samples, {} naming {LEAF}",
            r.name, r.cpu_s, r.max_rss_kib, r.samples, r.named
        );
    }

    let section = section(
        seconds,
        cpus,
        &load_before,
        [&ours_short, &ours],
        [&py_spy_short, &py_spy],
    )?;
    println!("{section}");
    let path = workspace_root().join("BENCHMARKS.md");
    write_section(&path, &section)?;
    eprintln!("bench: wrote the `## python` section of {}", path.display());
    Ok(())
}

fn measure_ours(seconds: u64, pids: &[libc::pid_t], tmp: &Path) -> Result<Row> {
    let out = tmp.join("agent.folded");
    let mut cmd = Command::new(agent_binary());
    cmd.args(["record", "--sample-rate", RATE, "--duration"])
        .arg(format!("{seconds}s"));
    for pid in pids {
        cmd.arg("--pid").arg(pid.to_string());
    }
    cmd.arg("--output").arg(&out);
    let before = (targets_cpu_s(pids)?, host_busy_s()?);
    let mut runs = start(vec![("profiler-agent record", cmd, tmp.join("agent.log"))])?;
    let exits = finish(&mut runs, seconds)?;
    let after = (targets_cpu_s(pids)?, host_busy_s()?);
    row("profiler-agent record", &exits, &[out], before, after)
}

fn measure_py_spy(seconds: u64, pids: &[libc::pid_t], tmp: &Path) -> Result<Row> {
    let mut cmds = Vec::new();
    let mut outs = Vec::new();
    for (i, pid) in pids.iter().enumerate() {
        let out = tmp.join(format!("py-spy-{i}.txt"));
        let mut cmd = Command::new(PY_SPY);
        cmd.args(["record", "-r", RATE, "-d", &seconds.to_string()])
            .args(["--format", "raw", "-o"])
            .arg(&out)
            .arg("--pid")
            .arg(pid.to_string());
        cmds.push(("py-spy record", cmd, tmp.join(format!("py-spy-{i}.log"))));
        outs.push(out);
    }
    let before = (targets_cpu_s(pids)?, host_busy_s()?);
    let mut runs = start(cmds)?;
    let exits = finish(&mut runs, seconds)?;
    let after = (targets_cpu_s(pids)?, host_busy_s()?);
    row("py-spy record (2 processes)", &exits, &outs, before, after)
}

/// A started profiler and its log.
struct Run {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// Starts every command at once, stdout and stderr to its log.
fn start(cmds: Vec<(&'static str, Command, PathBuf)>) -> Result<Vec<Run>> {
    cmds.into_iter()
        .map(|(name, mut cmd, log)| {
            let file = File::create(&log)?;
            cmd.stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file);
            Ok(Run {
                name,
                child: Child::spawn(name, &mut cmd)?,
                log,
            })
        })
        .collect()
}

/// Waits (off the CPU) for every run to end by itself; fails with a log's tail.
fn finish(runs: &mut [Run], seconds: u64) -> Result<Vec<child::Exit>> {
    let timeout = Duration::from_secs(4 * seconds + 120);
    let mut exits = Vec::new();
    for run in runs {
        let exit = run.child.wait_quietly(timeout)?;
        if !exit.status.success() {
            let text = fs::read_to_string(&run.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            bail!(
                "{} failed ({}); its output ends:\n{}",
                run.name,
                exit.status,
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
        }
        exits.push(exit);
    }
    Ok(exits)
}

/// The row of a profiler whose runs ended with `exits` and wrote `outs`; `before` and
/// `after` are the Python processes' and the host's CPU seconds around the runs.
fn row(
    name: &'static str,
    exits: &[child::Exit],
    outs: &[PathBuf],
    before: (f64, f64),
    after: (f64, f64),
) -> Result<Row> {
    let mut samples = 0;
    let mut named = 0;
    for out in outs {
        let text = fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
        let (s, n) = count_folded(&text);
        samples += s;
        named += n;
    }
    let cpu_s: f64 = exits.iter().map(|e| e.cpu.as_secs_f64()).sum();
    let targets_cpu_s = after.0 - before.0;
    Ok(Row {
        name,
        cpu_s,
        wall_s: exits
            .iter()
            .map(|e| e.wall.as_secs_f64())
            .fold(0.0, f64::max),
        max_rss_kib: exits.iter().map(|e| e.max_rss_kib).max().unwrap_or(0),
        samples,
        named,
        targets_cpu_s,
        others_cpu_s: (after.1 - before.1 - targets_cpu_s - cpu_s).max(0.0),
    })
}

/// Samples in folded stacks (`frame;frame;... count` per line, ours and py-spy's raw
/// format), and how many of them name [`LEAF`] in some frame. py-spy writes frames as
/// `bench_leaf (busy.py:2)`; any frame with the name as a whole word counts.
fn count_folded(text: &str) -> (u64, u64) {
    let mut samples = 0;
    let mut named = 0;
    for line in text.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        samples += count;
        let names_leaf = stack.split(';').any(|frame| {
            frame
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|word| word == LEAF)
        });
        if names_leaf {
            named += count;
        }
    }
    (samples, named)
}

/// User+sys CPU seconds of `pids` so far, summed (`/proc/PID/stat` fields 14 and 15).
fn targets_cpu_s(pids: &[libc::pid_t]) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    for pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("python3.11 (pid {pid}) is gone"))?;
        // The fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Field 3 (state) is rest's first, so fields 14 and 15 are at 11 and 12.
        let utime: f64 = fields.get(11).context("no utime")?.parse()?;
        let stime: f64 = fields.get(12).context("no stime")?.parse()?;
        total += (utime + stime) / ticks;
    }
    Ok(total)
}

/// Busy CPU seconds of the whole host so far: every field of /proc/stat's `cpu` line but
/// idle and iowait (guest time is already in user).
fn host_busy_s() -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy: f64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, v)| v)
        .sum();
    Ok(busy / ticks)
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn section(
    seconds: u64,
    cpus: usize,
    load: &str,
    [ours_short, ours]: [&Row; 2],
    [py_spy_short, py_spy]: [&Row; 2],
) -> Result<String> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let command = if seconds == 30 {
        "cargo xtask bench python".to_owned()
    } else {
        format!("cargo xtask bench python --seconds {seconds}")
    };
    let mut s = String::new();
    writeln!(s, "## python\n")?;
    writeln!(
        s,
        "`{command}` as root ({}, kernel {}, {cpus} CPUs, {}). The load: two processes of \
         Debian's `{PYTHON}` running a pure-Python busy loop three functions deep \
         (`bench_outer` > `bench_middle` > `{LEAF}`), started {} s before the first profiler \
         and profiled by both, one profiler after the other, each for {SHORT_S} s and then \
         for {seconds} s at {RATE} Hz: `profiler-agent record --pid A --pid B --duration {seconds}s` (release \
         build, folded output), then `py-spy record -r {RATE} -d {seconds} --format raw -o \
         FILE --pid P` (py-spy {}, `{PY_SPY}`, installed by `cargo xtask setup`; its defaults \
         otherwise, so it stops the process for each sample) once per process, both at the \
         same time, their CPU summed and the larger peak RSS taken. CPU is user+sys seconds \
         and RSS the peak, both from `wait4`, startup and shutdown included; core-s/s divides \
         the CPU by the {seconds} s window. Samples are counted in each output; \"naming \
         `{LEAF}`\" are those whose stack has the Python function. Python CPU is what the two \
         processes got while the profiler ran, other CPU what the rest of the host used \
         meanwhile (/proc/stat's busy time less the profiler's and the Python processes'; \
         near 0 on a quiet host). The host's 1-minute load average \
         just before the run: {load} (the load itself adds about 2).\n",
        today(),
        kernel_release(),
        cpu_model(),
        WARMUP.as_secs(),
        py_spy_version(),
    )?;
    writeln!(
        s,
        "| profiler | CPU s | CPU core-s/s | peak RSS MiB | wall s | samples | naming `{LEAF}` | Python CPU s | other CPU s |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (r, window) in [
        (ours_short, SHORT_S),
        (ours, seconds),
        (py_spy_short, SHORT_S),
        (py_spy, seconds),
    ] {
        writeln!(
            s,
            "| {} ({window} s) | {:.2} | {:.4} | {:.1} | {:.1} | {} | {} | {:.1} | {:.1} |",
            r.name,
            r.cpu_s,
            r.cpu_s / window as f64,
            mib(r.max_rss_kib),
            r.wall_s,
            r.samples,
            r.named,
            r.targets_cpu_s,
            r.others_cpu_s,
        )?;
    }
    let cpu_ratio = ratio(ours.cpu_s, py_spy.cpu_s);
    let rss_ratio = ratio(ours.max_rss_kib as f64, py_spy.max_rss_kib as f64);
    let extra = (seconds - SHORT_S) as f64;
    let ours_rate = (ours.cpu_s - ours_short.cpu_s) / extra;
    let py_spy_rate = (py_spy.cpu_s - py_spy_short.cpu_s) / extra;
    let ours_once = ours_short.cpu_s - ours_rate * SHORT_S as f64;
    let py_spy_once = py_spy_short.cpu_s - py_spy_rate * SHORT_S as f64;
    let rate_ratio = ratio(ours_rate, py_spy_rate);
    writeln!(
        s,
        "\nPer second of profiling (the {seconds} s run less the {SHORT_S} s run, over the \
         {extra:.0} s between): ours {ours_rate:.4} core-s/s, py-spy {py_spy_rate:.4} \
         core-s/s, ratio {rate_ratio:.3}. Paid once: ours {ours_once:.2} s, py-spy \
         {py_spy_once:.2} s.\n"
    )?;
    writeln!(
        s,
        "Whole {seconds} s windows: CPU ratio {cpu_ratio:.3}; peak RSS ratio {rss_ratio:.2}.\n"
    )?;
    let share = |r: &Row| 100.0 * r.targets_cpu_s / (PROCESSES as f64 * r.wall_s);
    writeln!(
        s,
        "The two Python processes ran {:.0}% of the time on their CPUs while ours recorded \
         them and {:.0}% while py-spy did (compare other CPU: a busy host takes its share).\n",
        share(ours),
        share(py_spy)
    )?;
    writeln!(s, "Goal:\n")?;
    let verdict = |r: f64| if r < CPU_GOAL_RATIO { "met" } else { "NOT met" };
    writeln!(
        s,
        "- CPU per second of profiling under a quarter of py-spy's (ratio below \
         {CPU_GOAL_RATIO}): {} ({ours_rate:.4} vs {py_spy_rate:.4} core-s/s, ratio \
         {rate_ratio:.3}).",
        verdict(rate_ratio),
    )?;
    writeln!(
        s,
        "- The same over the whole {seconds} s windows, the one-time cost included: {} \
         ({:.2} vs {:.2} CPU s, ratio {cpu_ratio:.3}).",
        verdict(cpu_ratio),
        ours.cpu_s,
        py_spy.cpu_s,
    )?;
    Ok(s)
}

/// `py-spy --version` without the name, e.g. `0.4.3`.
fn py_spy_version() -> String {
    Command::new(PY_SPY)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .map_or("unknown".into(), |v| {
            v.trim_start_matches("py-spy ").to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::count_folded;

    #[test]
    fn counts_samples_and_those_naming_the_leaf() {
        let text = "<module> (busy.py:17);bench_outer (busy.py:13);bench_middle (busy.py:9);\
                    bench_leaf (busy.py:4) 30\n\
                    _start;_PyEval_EvalFrameDefault 12\n\
                    main;bench_leafy 5\n\
                    python3.11+0x1a8569;bench_leaf 3\n\
                    garbage\n";
        assert_eq!(count_folded(text), (50, 33));
    }
}
