//! `cargo xtask bench soak`: the daemon under steady load for `--minutes` (default 30): the
//! agent benchmark's host (every CPU busy with the deep-stack workload, `--idle` idle targets,
//! profiles pushed to a loopback receiver), VmRSS read every 10 s. The slope of a
//! least-squares line through the readings after the first 5 minutes (caches filled,
//! allocator settled) is the leak figure. Goal: under 1 MiB per 10 minutes.
use std::{fmt::Write as _, thread, time::Duration};

use anyhow::{Result, bail, ensure};

use super::{
    child,
    daemon::{self, slope},
    overhead::{compile_workload, start_workload},
    receiver::Receiver,
    report::{cpu_model, kernel_release, today, write_section},
};
use crate::{
    setup::setup,
    util::{build_agent, is_root, workspace_root},
};

const COLLECT_INTERVAL_S: u64 = 15;
const WARM_UP_S: f64 = 300.0;
const GOAL_MIB_PER_10_MIN: f64 = 1.0;

pub fn soak(minutes: u64, idle: usize) -> Result<()> {
    ensure!(minutes >= 10, "--minutes must be at least 10");
    if !is_root() {
        bail!("the soak benchmark loads BPF programs: run it as root");
    }
    setup()?;
    build_agent()?;
    let tmp = tempfile::Builder::new()
        .prefix("xtask-bench-soak-")
        .tempdir()?;
    let chain = compile_workload(tmp.path())?;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    child::install_interrupt_handler();
    let seconds = minutes * 60;
    let sleepers = daemon::spawn_sleepers(idle, seconds + 120)?;
    let receiver = Receiver::start()?;
    // The load is this benchmark's: its workload and sleepers are the targets, and nothing
    // else running on the host is symbolized, so the slope is the agent's alone.
    let config = daemon::config(
        daemon::free_port()?,
        COLLECT_INTERVAL_S,
        daemon::Targets::Only(".*/(xtask-bench-soak-.*|sleep)"),
        &daemon::push_to(&receiver.url()),
    );
    // The workload is a deep chain at the agent benchmark's depth, on every CPU, at normal
    // priority: the agent must keep up while competing for CPU.
    let workload = start_workload(&chain, seconds + 60, cpus)?;
    eprintln!("bench: soak, the daemon for {minutes} min under steady load");
    let run = daemon::run(
        "soak",
        &config,
        seconds,
        Duration::from_secs(10),
        tmp.path(),
    )?;
    drop(workload);
    drop(sleepers);
    let (requests, _) = receiver.counts();
    ensure!(requests > 0, "the receiver got nothing");

    let settled: Vec<(f64, f64)> = run
        .rss
        .iter()
        .filter(|(t, _)| *t >= WARM_UP_S)
        .map(|&(t, kib)| (t, kib as f64 / 1024.0))
        .collect();
    let per_10_min = slope(&settled).map(|s| s * 600.0).unwrap_or(f64::NAN);
    let at = |t: f64| {
        run.rss
            .iter()
            .find(|(s, _)| *s >= t)
            .map_or(f64::NAN, |r| r.1 as f64 / 1024.0)
    };
    let mut s = String::new();
    writeln!(s, "## soak\n")?;
    let mut command = "cargo xtask bench soak".to_owned();
    if minutes != 30 {
        write!(command, " --minutes {minutes}")?;
    }
    writeln!(
        s,
        "`{command}` ({}, kernel {}, {cpus} CPUs, {}): the daemon (release build, 97 Hz, \
         {COLLECT_INTERVAL_S} s interval) for {minutes} min with every CPU busy with the \
         deep-stack workload and {idle} idle `sleep` processes, these the only targets, pushing to a loopback receiver ({requests} \
         requests). VmRSS every 10 s; the slope is a least-squares fit after the first {} \
         minutes.\n",
        today(),
        kernel_release(),
        cpu_model(),
        WARM_UP_S / 60.0
    )?;
    writeln!(s, "| figure | value |\n|---|---:|")?;
    writeln!(s, "| CPU core-s/s | {:.4} |", run.cost.cpu_per_s)?;
    writeln!(
        s,
        "| peak RSS MiB | {:.1} |",
        run.cost.max_rss_kib as f64 / 1024.0
    )?;
    for minute in [1.0, 5.0, 10.0, 20.0, 30.0] {
        if minute * 60.0 < seconds as f64 {
            writeln!(s, "| RSS at {minute} min, MiB | {:.1} |", at(minute * 60.0))?;
        }
    }
    writeln!(
        s,
        "| RSS at the end, MiB | {:.1} |",
        run.rss.last().map_or(f64::NAN, |r| r.1 as f64 / 1024.0)
    )?;
    writeln!(s, "| RSS slope, MiB per 10 min | {per_10_min:.3} |")?;
    // Per window, to tell a leak (every window climbs) from a one-time settling.
    let mut start = WARM_UP_S;
    while start + 300.0 <= seconds as f64 {
        let window: Vec<(f64, f64)> = settled
            .iter()
            .copied()
            .filter(|(t, _)| *t >= start && *t < start + 600.0)
            .collect();
        if let Some(w) = slope(&window) {
            writeln!(
                s,
                "| ... from {:.0} to {:.0} min | {:.3} |",
                start / 60.0,
                (start / 60.0 + 10.0).min(seconds as f64 / 60.0),
                w * 600.0
            )?;
        }
        start += 600.0;
    }
    writeln!(s)?;
    writeln!(
        s,
        "Goal: under {GOAL_MIB_PER_10_MIN} MiB per 10 minutes: {}.",
        if per_10_min.abs() < GOAL_MIB_PER_10_MIN {
            "met"
        } else {
            "NOT met"
        }
    )?;
    println!("{s}");
    let path = workspace_root().join("BENCHMARKS.md");
    write_section(&path, &s)?;
    eprintln!("bench: wrote the `## soak` section of {}", path.display());
    Ok(())
}
