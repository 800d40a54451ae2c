//! `cargo xtask bench scale`: the daemon's RSS and CPU as the host grows: 10, 100 and 1000
//! live processes of one binary, then 10, 100 and 500 distinct binaries (one process each,
//! each linked with its own build id, so each is a symbolizer cache entry of its own). Every
//! process is tests/fixtures/tick.c waking up to burn 2 ms, paced so that all of them
//! together keep about one CPU busy and each is sampled now and then. Memory should follow
//! the cache sizes (`build_id_cache_size` 64, `same_file_cache_size` 8), not the counts.
use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Result, bail};

use super::{
    child::{self, Child},
    daemon::{self, Cost, metric_sum},
    report::{cpu_model, kernel_release, today, write_section},
};
use crate::{
    setup::setup,
    util::{build_agent, check, is_root, workspace_root},
};

const COLLECT_INTERVAL_S: u64 = 15;
const WORK_MS: u64 = 2;

#[derive(Clone, Copy)]
enum Case {
    Processes(usize),
    Binaries(usize),
}

impl Case {
    fn processes(self) -> usize {
        match self {
            Case::Processes(n) | Case::Binaries(n) => n,
        }
    }

    fn binaries(self) -> usize {
        match self {
            Case::Processes(_) => 1,
            Case::Binaries(n) => n,
        }
    }
}

const CASES: [Case; 6] = [
    Case::Processes(10),
    Case::Processes(100),
    Case::Processes(1000),
    Case::Binaries(10),
    Case::Binaries(100),
    Case::Binaries(500),
];

struct Row {
    case: Case,
    cost: Cost,
    targets: f64,
    cached_binaries: f64,
    samples: f64,
}

pub fn scale(seconds: u64) -> Result<()> {
    if !is_root() {
        bail!("the scale benchmark loads BPF programs: run it as root");
    }
    setup()?;
    build_agent()?;
    let tmp = tempfile::Builder::new()
        .prefix("xtask-bench-scale-")
        .tempdir()?;
    let object = tmp.path().join("tick.o");
    check(
        Command::new("gcc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-fno-inline", "-c"])
            .arg(workspace_root().join("tests/fixtures/tick.c"))
            .arg("-o")
            .arg(&object),
    )?;
    child::install_interrupt_handler();
    let mut rows = Vec::new();
    for case in CASES {
        eprintln!(
            "bench: scale, {} processes of {} binaries, {seconds} s",
            case.processes(),
            case.binaries()
        );
        let binaries = link_binaries(&object, case.binaries(), tmp.path())?;
        let period_ms = WORK_MS * case.processes() as u64;
        let mut ticks = Vec::with_capacity(case.processes());
        for i in 0..case.processes() {
            let mut cmd = Command::new(&binaries[i % binaries.len()]);
            cmd.args([
                (seconds + 30).to_string(),
                WORK_MS.to_string(),
                period_ms.to_string(),
            ])
            .stdin(Stdio::null());
            ticks.push(Child::spawn("tick", &mut cmd)?);
        }
        child::sleep(Duration::from_secs(1))?;
        let write = format!(
            "[write]\ndirectory = \"{}\"\n",
            tmp.path().join("profiles").display()
        );
        let config = daemon::config(
            daemon::free_port()?,
            COLLECT_INTERVAL_S,
            daemon::Targets::Only(".*/xtask-bench-scale-.*"),
            &write,
        );
        let run = daemon::run(
            "scale",
            &config,
            seconds,
            Duration::from_secs(5),
            tmp.path(),
        )?;
        drop(ticks);
        let m = &run.metrics;
        let cache = |name: &str| {
            m.lines()
                .filter(|l| l.starts_with("profiler_cache_entries{") && l.contains(name))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>()
        };
        rows.push(Row {
            case,
            targets: metric_sum(m, "pyroscope_ebpf_active_targets"),
            cached_binaries: cache("build_id") + cache("same_file"),
            samples: metric_sum(m, "pyroscope_ebpf_pprof_samples_total"),
            cost: run.cost,
        });
        std::fs::remove_dir_all(tmp.path().join("profiles")).ok();
    }
    let section = section(seconds, &rows)?;
    println!("{section}");
    let path = workspace_root().join("BENCHMARKS.md");
    write_section(&path, &section)?;
    eprintln!("bench: wrote the `## scale` section of {}", path.display());
    Ok(())
}

/// `n` executables from one object, each with its own build id (one gcc link each).
fn link_binaries(object: &Path, n: usize, tmp: &Path) -> Result<Vec<std::path::PathBuf>> {
    let dir = tmp.join(format!("bin-{n}"));
    std::fs::create_dir_all(&dir)?;
    (0..n)
        .map(|i| {
            let out = dir.join(format!("tick-{i:03}"));
            if !out.exists() {
                check(
                    Command::new("gcc")
                        .arg(object)
                        .arg(format!("-Wl,--build-id=0x{:032x}", (n << 16) + i))
                        .arg("-o")
                        .arg(&out),
                )?;
            }
            Ok(out)
        })
        .collect()
}

fn section(seconds: u64, rows: &[Row]) -> Result<String> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut s = String::new();
    writeln!(s, "## scale\n")?;
    writeln!(
        s,
        "`cargo xtask bench scale` ({}, kernel {}, {}): the daemon (release build, 97 Hz, \
         {COLLECT_INTERVAL_S} s interval, process discovery every 5 s, the benchmark's processes \
         the only targets, directory sink) for {seconds} s per case. Each process is tests/fixtures/tick.c \
         burning {WORK_MS} ms per wake-up, paced so all of them together keep about one CPU \
         busy; distinct binaries are the same object linked with distinct build ids. Cached \
         binaries are the symbolizer's build-id and same-file cache entries at the end \
         (defaults 64 and 8).\n",
        today(),
        kernel_release(),
        cpu_model()
    )?;
    writeln!(
        s,
        "| processes | binaries | CPU core-s/s | peak RSS MiB | targets | cached binaries | samples |"
    )?;
    writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in rows {
        writeln!(
            s,
            "| {} | {} | {:.4} | {:.1} | {} | {} | {} |",
            r.case.processes(),
            r.case.binaries(),
            r.cost.cpu_per_s,
            mib(r.cost.max_rss_kib),
            r.targets,
            r.cached_binaries,
            r.samples
        )?;
    }
    let rss = |i: usize| rows.get(i).map_or(0.0, |r| mib(r.cost.max_rss_kib));
    if rows.len() == CASES.len() {
        writeln!(
            s,
            "\nGrowth: {:.1} KiB per process from 10 to 1000 processes; {:.1} KiB per binary \
             from 10 to 100 binaries, {:.1} KiB per binary from 100 to 500 (beyond the cache \
             sizes, where only targets and their profiles still grow).",
            (rss(2) - rss(0)) * 1024.0 / 990.0,
            (rss(4) - rss(3)) * 1024.0 / 90.0,
            (rss(5) - rss(4)) * 1024.0 / 400.0,
        )?;
    }
    Ok(s)
}
