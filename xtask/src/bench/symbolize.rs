//! `cargo xtask bench symbolize`: our symbolizer against blazesym on the same address sets
//! (peer-bench/benches/symbolize.rs): addresses per second cold and warm from criterion,
//! peak RSS of one cold pass each in a fresh process, and how often the two name an address
//! the same. Written to the `## symbolize` section of BENCHMARKS.md.
use std::{fmt::Write as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use super::{
    criterion::{bench_executable, criterion_times, field},
    report,
};
use crate::util::{cargo, check, target_dir, workspace_root};

pub fn symbolize() -> Result<()> {
    // The large binary with DWARF: the agent's own debug build.
    check(cargo().args(["build", "-p", "profiler-agent"]))?;
    let tmp = tempfile::Builder::new()
        .prefix("xtask-symbolize-")
        .tempdir()?;
    let fixture = tmp.path().join("chain_o2");
    check(
        Command::new("gcc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
            .arg(&fixture)
            .arg(workspace_root().join("tests/fixtures/chain.c")),
    )?;
    let mut binaries = vec![target_dir().join("debug/profiler-agent"), fixture];
    binaries.extend(own_libc());
    let binaries = binaries
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");

    let bench = bench_executable("profiler-peer-bench", "symbolize")?;
    let run = |rss: Option<&str>, args: &[&str]| -> Result<String> {
        let mut cmd = Command::new(&bench);
        cmd.args(args).env("SYMBOLIZE_BENCH_BINARIES", &binaries);
        if let Some(side) = rss {
            cmd.env("SYMBOLIZE_BENCH_RSS", side);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", bench.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                bench.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let rss_ours = field(&run(Some("ours"), &[])?, "peak_kib")?;
    let rss_blazesym = field(&run(Some("blazesym"), &[])?, "peak_kib")?;
    eprintln!("bench: criterion run, about a minute");
    let output = run(None, &["--bench"])?;
    let agreement = output
        .lines()
        .find(|l| l.starts_with("agreement"))
        .context("no agreement line")?;
    let addresses = field(agreement, "addresses")?;
    let same = field(agreement, "same_name")?;
    let both = field(agreement, "both_named")?;
    let times = criterion_times(&output, "symbolize");
    let time = |id: &str| -> Result<f64> {
        times
            .iter()
            .find(|(name, _)| name == id)
            .map(|(_, ms)| *ms)
            .with_context(|| format!("no criterion time for {id}"))
    };
    let rate = |ms: f64| addresses as f64 / (ms / 1000.0);

    let mut s = String::new();
    writeln!(s, "## symbolize\n")?;
    writeln!(
        s,
        "Measured {} on Linux {} ({}). Reproduce: `cargo xtask bench symbolize`.\n",
        report::today(),
        report::kernel_release(),
        report::cpu_model()
    )?;
    writeln!(
        s,
        "{addresses} addresses: up to 2000 function midpoints from each of the agent's own debug \
         build (large Rust DWARF), tests/fixtures/chain.c at -O2 -g, and libc with its debug \
         file when installed. Cold: a new symbolizer per pass (files opened and parsed); warm: \
         one reused. blazesym 0.2.7 with inlined functions and code info enabled. Time is \
         criterion's median estimate; RSS the peak of one cold pass in a fresh process.\n"
    )?;
    writeln!(s, "| | ours | blazesym | ours / blazesym |")?;
    writeln!(s, "|---|---:|---:|---:|")?;
    for mode in ["cold", "warm"] {
        let (a, b) = (
            time(&format!("ours/{mode}"))?,
            time(&format!("blazesym/{mode}"))?,
        );
        writeln!(
            s,
            "| {mode} addresses/s | {:.0} | {:.0} | {:.2}x |",
            rate(a),
            rate(b),
            b / a
        )?;
    }
    writeln!(
        s,
        "| peak RSS MiB | {:.1} | {:.1} | {:.2} |",
        rss_ours as f64 / 1024.0,
        rss_blazesym as f64 / 1024.0,
        rss_ours as f64 / rss_blazesym as f64
    )?;
    writeln!(
        s,
        "\nName agreement: the same name for {same} of the {both} addresses both name ({:.1}%). \
         Differences seen are \
         aliases at one address (e.g. libc's `__kill` vs `__GI_kill`).\n",
        same as f64 * 100.0 / both.max(1) as f64
    )?;
    writeln!(
        s,
        "Goal: at least as fast as blazesym cold and warm, with less memory."
    )?;
    println!("{s}");
    report::write_section(&workspace_root().join("BENCHMARKS.md"), &s)?;
    Ok(())
}

/// The libc this machine's programs use, found through our own mappings.
fn own_libc() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so"))
        .map(PathBuf::from)
}
