//! `cargo xtask bench churn`: the daemon while processes come and go: `--rate` short-lived
//! processes per second (tests/fixtures/churn.c: each an exec that burns a few milliseconds in
//! `churn_work` and exits) for `--seconds`. Checked: the agent neither crashes nor grows, and
//! the short-lived processes' samples are named. Their profiles go to the directory sink and
//! are read back with `go tool pprof -raw`, an independent reader.
use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    child::{self, Child},
    daemon::{self, metric_sum},
    report::{cpu_model, kernel_release, today, write_section},
};
use crate::{
    setup::setup,
    util::{build_agent, check, is_root, workspace_root},
};

const COLLECT_INTERVAL_S: u64 = 15;
/// CPU each short-lived process burns before it exits.
const WORK_MS: u32 = 3;

/// Samples of the short-lived processes (comm `churn`) in the written profiles.
#[derive(Default, Debug, PartialEq)]
struct Naming {
    samples: u64,
    /// Every frame of the stack has a function name.
    fully_named: u64,
    /// The stack holds the fixture's own `churn_work`.
    in_churn_work: u64,
}

pub fn churn(seconds: u64, rate: u32) -> Result<()> {
    ensure!(
        seconds >= 2 * COLLECT_INTERVAL_S,
        "--seconds must cover two intervals"
    );
    if !is_root() {
        bail!("the churn benchmark loads BPF programs: run it as root");
    }
    setup()?;
    build_agent()?;
    let tmp = tempfile::Builder::new()
        .prefix("xtask-bench-churn-")
        .tempdir()?;
    let churn = compile_fixture("churn", tmp.path())?;
    child::install_interrupt_handler();
    let profiles = tmp.path().join("profiles");
    let write = format!("[write]\ndirectory = \"{}\"\n", profiles.display());
    let config = daemon::config(
        daemon::free_port()?,
        COLLECT_INTERVAL_S,
        daemon::Targets::All,
        &write,
    );

    eprintln!("bench: {rate} short-lived processes per second for {seconds} s under the agent");
    let mut cmd = Command::new(&churn);
    cmd.args([
        rate.to_string(),
        (seconds + 5).to_string(),
        WORK_MS.to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(tmp.path().join("churn.out"))?);
    let mut workload = Child::spawn("churn", &mut cmd)?;
    let run = daemon::run(
        "churn",
        &config,
        seconds,
        Duration::from_secs(5),
        tmp.path(),
    )?;
    let started: u64 = {
        workload.wait(Duration::from_secs(seconds + 60))?;
        std::fs::read_to_string(tmp.path().join("churn.out"))?
            .trim()
            .parse()
            .context("churn's count of started processes")?
    };
    let naming = read_profiles(&profiles)?;
    ensure!(naming.samples > 0, "no sample of the short-lived processes");

    let rss_first = run.rss.first().map_or(0, |r| r.1);
    let rss_last = run.rss.last().map_or(0, |r| r.1);
    let pct = |n: u64| 100.0 * n as f64 / naming.samples as f64;
    let mut s = String::new();
    writeln!(s, "## churn\n")?;
    writeln!(
        s,
        "`cargo xtask bench churn` ({}, kernel {}, {}): the daemon (release build, 97 Hz, \
         {COLLECT_INTERVAL_S} s interval, directory sink) for {seconds} s while \
         tests/fixtures/churn.c starts {rate} processes per second, each an exec that burns \
         {WORK_MS} ms in `churn_work` and exits ({started} started in all). Profiles read back \
         with `go tool pprof -raw`.\n",
        today(),
        kernel_release(),
        cpu_model()
    )?;
    writeln!(s, "| figure | value |\n|---|---:|")?;
    writeln!(s, "| agent exit | clean (SIGTERM, exit 0) |")?;
    writeln!(s, "| agent CPU core-s/s | {:.4} |", run.cost.cpu_per_s)?;
    writeln!(
        s,
        "| peak RSS MiB | {:.1} |",
        run.cost.max_rss_kib as f64 / 1024.0
    )?;
    writeln!(
        s,
        "| RSS at 5 s / at the end, MiB | {:.1} / {:.1} |",
        rss_first as f64 / 1024.0,
        rss_last as f64 / 1024.0
    )?;
    writeln!(
        s,
        "| samples of the short-lived processes | {} |",
        naming.samples
    )?;
    writeln!(
        s,
        "| ... every frame named | {:.1}% |",
        pct(naming.fully_named)
    )?;
    writeln!(
        s,
        "| ... with `churn_work` in the stack | {:.1}% |",
        pct(naming.in_churn_work)
    )?;
    writeln!(
        s,
        "| processes gone before their snapshot (`profiler_processes_unreadable_total`) | {} |\n",
        metric_sum(&run.metrics, "profiler_processes_unreadable_total")
    )?;
    println!("{s}");
    let path = workspace_root().join("BENCHMARKS.md");
    write_section(&path, &s)?;
    eprintln!("bench: wrote the `## churn` section of {}", path.display());
    Ok(())
}

/// Compiles `tests/fixtures/<name>.c` as the e2e tests do: frame pointers, nothing inlined.
pub(super) fn compile_fixture(name: &str, dir: &Path) -> Result<PathBuf> {
    let out = dir.join(name);
    check(
        Command::new("gcc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-fno-inline"])
            .arg(workspace_root().join(format!("tests/fixtures/{name}.c")))
            .arg("-o")
            .arg(&out),
    )?;
    Ok(out)
}

fn read_profiles(dir: &Path) -> Result<Naming> {
    let mut naming = Naming::default();
    for service in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        for file in std::fs::read_dir(service?.path())? {
            let path = file?.path();
            let out = Command::new("go")
                .args(["tool", "pprof", "-raw"])
                .arg(&path)
                .output()
                .context("running go tool pprof")?;
            ensure!(
                out.status.success(),
                "go tool pprof -raw {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let n = count_naming(&String::from_utf8_lossy(&out.stdout), "churn");
            naming.samples += n.samples;
            naming.fully_named += n.fully_named;
            naming.in_churn_work += n.in_churn_work;
        }
    }
    Ok(naming)
}

/// Counts, in `go tool pprof -raw` output, the samples labelled `comm:[<comm>]`.
fn count_naming(raw: &str, comm: &str) -> Naming {
    let (samples, rest) = raw.split_once("\nLocations").unwrap_or((raw, ""));
    let mut names: HashMap<u64, Vec<&str>> = HashMap::new();
    let mut current = None;
    for line in rest.lines().take_while(|l| !l.starts_with("Mappings")) {
        let trimmed = line.trim_start();
        let (id, rest) = match trimmed.split_once(": 0x") {
            Some((id, rest)) if id.chars().all(|c| c.is_ascii_digit()) => {
                let id: u64 = id.parse().unwrap_or(0);
                current = Some(id);
                // `<addr> M=<n> <function> <file>:<line> ...`
                (id, rest.split_whitespace().nth(2))
            }
            _ => match current {
                // An inlined frame of the same location: `<function> <file>:<line> ...`.
                Some(id) => (id, trimmed.split_whitespace().next()),
                None => continue,
            },
        };
        names
            .entry(id)
            .or_default()
            .push(rest.unwrap_or("[unknown]"));
    }
    let label = format!("comm:[{comm}]");
    let mut naming = Naming::default();
    let mut lines = samples.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((counts, ids)) = line.split_once(':') else {
            continue;
        };
        let Some(count) = counts
            .split_whitespace()
            .next()
            .and_then(|c| c.parse::<u64>().ok())
        else {
            continue;
        };
        let ours = lines.peek().is_some_and(|l| l.trim() == label);
        if !ours {
            continue;
        }
        let frames: Vec<&str> = ids
            .split_whitespace()
            .filter_map(|id| id.parse::<u64>().ok())
            .flat_map(|id| names.get(&id).cloned().unwrap_or_else(|| vec!["[unknown]"]))
            .collect();
        naming.samples += count;
        if frames
            .iter()
            .all(|f| *f != "[unknown]" && !f.contains("+0x"))
        {
            naming.fully_named += count;
        }
        if frames.contains(&"churn_work") {
            naming.in_churn_work += count;
        }
    }
    naming
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_named_samples_of_one_comm() {
        let raw = "Samples:\nsamples/count[dflt] cpu/nanoseconds\n          2   20: 1 2 \n                comm:[churn]\n          3   30: 3 \n                comm:[churn]\n          5   50: 1 \n                comm:[other]\nLocations\n     1: 0x1139 M=1 churn_work /x/churn.c:30 s=0\n     2: 0x1200 M=1 main /x/churn.c:50 s=0\n             churn_child /x/churn.c:40 s=0\n     3: 0x7f00 M=2 churn+0x1234 :0 s=0\nMappings\n";
        assert_eq!(
            count_naming(raw, "churn"),
            Naming {
                samples: 5,
                fully_named: 2,
                in_churn_work: 2
            }
        );
    }
}
