//! The `## unwind` section of BENCHMARKS.md: the table, what lightswitch's row rests on, and
//! the goals of issue 16 with a verdict each.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use super::{
    DATA_MIB, GZIP, LIGHTSWITCH_BIN, PROGRAMS, PYTHON, RATE, Row, WARMUP,
    stacks::{self, Share},
};
use crate::bench::report::{cpu_model, kernel_release, today};

fn percent(share: Option<Share>) -> String {
    share
        .and_then(Share::percent)
        .map_or("-".into(), |p| format!("{p:.1}%"))
}

pub(super) fn section(
    seconds: u64,
    cpus: usize,
    copies: usize,
    rows: &[Row],
    lightswitch: &Result<(PathBuf, String), String>,
    mounted: &[(&str, &str)],
    load: &str,
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
        "`{LIGHTSWITCH_BIN}=... {command}` as root ({}, kernel {}, {cpus} CPUs, {}). The \
         load: `{GZIP} -9` in a shell loop over {DATA_MIB} MiB of random bytes (a new process \
         every few seconds) and `{PYTHON}` running a pure-Python busy loop, {copies} of each, \
         so every CPU is busy in stock Debian code built without frame pointers. Each \
         profiler in turn, on a fresh load started {} s before it, samples the whole host at \
         {RATE} Hz for {seconds} s: `profiler-agent record --duration {seconds}s` (release \
         build), which leaves itself out; `perf record --call-graph dwarf -F {RATE} -a`, then \
         `perf report --stdio` over its file (perf's symbolized answer: its CPU is spread \
         over the recorded window, its RSS is the larger of the two); lightswitch writing \
         pprof with `--exclude-self`, its on-disk unwind cache empty at the start (ours has \
         none). CPU is user+sys core-seconds per wall second and RSS the peak, both from \
         `wait4`; while a profiler runs the benchmark (a debug build) sleeps in one `poll` \
         on the profiler's pidfd, so that it is not itself among the processes sampled and \
         named. Samples: those of the gzip and \
         python3.11 processes the benchmark started (by pid); complete: the share of them \
         whose stack reaches `_start`, `__libc_start_main` or `__libc_start_call_main` (or a \
         thread's root), read from each one's output (ours and lightswitch's pprof, \
         `perf script` for perf). The host's 1-minute load average just before the run: \
         {load} (the load itself adds about {cpus}).\n",
        today(),
        kernel_release(),
        cpu_model(),
        WARMUP.as_secs(),
    )?;
    if !mounted.is_empty() {
        let list: Vec<String> = mounted
            .iter()
            .map(|(kind, dir)| format!("{kind} on {dir}"))
            .collect();
        writeln!(
            s,
            "The host had no tracefs/debugfs mounted; the benchmark mounted {} for the run \
             (lightswitch does not start without /sys/kernel/debug/tracing).\n",
            list.join(" and ")
        )?;
    }
    match lightswitch {
        Ok((bin, version)) => {
            write!(s, "lightswitch: `{}`, `{version}`.", bin.display())?;
            lightswitch_notes(&mut s, rows)?;
            writeln!(s, "\n")?;
        }
        Err(why) => writeln!(s, "lightswitch: NOT RUN: {why}.\n")?,
    }
    writeln!(
        s,
        "| profiler | CPU core-s/s | peak RSS MiB | samples (of the host's) | complete | gzip complete | python3.11 complete |"
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
            match (r.shares.as_ref(), r.host_samples) {
                (Some(x), Some(all)) => format!("{} ({all})", stacks::total(x).samples),
                (Some(x), None) => stacks::total(x).samples.to_string(),
                (None, _) => "-".into(),
            },
            percent(r.shares.as_ref().map(stacks::total)),
            cell(PROGRAMS[0]),
            cell(PROGRAMS[1]),
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
