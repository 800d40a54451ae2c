//! `cargo xtask bench pprof`: building and gzip-encoding one profile of 10 000 distinct
//! stacks x 30 frames (profiler-agent/benches/pprof.rs): criterion's median time per
//! profile for build, encode and both, the allocations the bench counts itself, and the
//! compressed bytes per sample. Written to the `## pprof build and encode` section of
//! BENCHMARKS.md.
use std::{fmt::Write as _, process::Command};

use anyhow::{Context as _, Result, bail};

use super::{
    criterion::{bench_executable, criterion_times, field, float_field},
    report,
};
use crate::util::workspace_root;

/// The goal: one such profile built and encoded in under this many ms on one core.
const GOAL_MS: f64 = 5.0;

pub fn pprof() -> Result<()> {
    let bench = bench_executable("profiler-agent", "pprof")?;
    eprintln!("bench: criterion run, about a minute");
    let out = Command::new(&bench)
        .arg("--bench")
        .output()
        .with_context(|| format!("running {}", bench.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{} failed: {stderr}", bench.display());
    }
    let figures = stderr
        .lines()
        .find(|l| l.starts_with("pprof-figures"))
        .context("no pprof-figures line on the bench's stderr")?;
    let s = section(&stdout, figures)?;
    println!("{s}");
    report::write_section(&workspace_root().join("BENCHMARKS.md"), &s)?;
    Ok(())
}

fn section(criterion_output: &str, figures: &str) -> Result<String> {
    let times = criterion_times(criterion_output, "pprof");
    let time = |id: &str| -> Result<f64> {
        times
            .iter()
            .find(|(name, _)| name == id)
            .map(|(_, ms)| *ms)
            .with_context(|| format!("no criterion time for pprof/{id}"))
    };
    let f = |key: &str| field(figures, key);
    let samples = f("samples")?;
    let per_sample = |bytes: u64| bytes as f64 / samples.max(1) as f64;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let (build, encode, encode_gzip, total) = (
        time("build")?,
        time("encode")?,
        time("encode_gzip")?,
        time("total")?,
    );

    let mut s = String::new();
    writeln!(s, "## pprof build and encode\n")?;
    writeln!(
        s,
        "Measured {} on Linux {}, {} CPUs ({}), one thread. Reproduce: `cargo xtask bench \
         pprof`.\n",
        report::today(),
        report::kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        report::cpu_model()
    )?;
    writeln!(
        s,
        "One profile of {samples} distinct user stacks x 30 frames ({} frames) of one process, \
         shaped as a call tree (one root, branching with depth), from 20 000 call sites in \
         2000 functions with file and line, every fourth with an inlined callee: {} locations, \
         {} functions, {} strings. Built by the frames stage (`frames::resolve`) and \
         `profile::build` (pid, comm and container labels) with a frame source double \
         answering from a table (shared frames whose functions share their strings, as from \
         the real ones' warm caches), then \
         `BuiltProfile::encode_gzip` (gzip level {}, the agent's, with flate2's miniz_oxide). \
         Times are criterion's median estimates per profile; allocations are allocator calls \
         (alloc and realloc) per profile, counted by a global allocator in the bench; peak is \
         the most memory live at once above what was live before.\n",
        f("frames")?,
        f("locations")?,
        f("functions")?,
        f("strings")?,
        f("gzip_level")?,
    )?;
    writeln!(
        s,
        "| step | median ms | allocations | MiB allocated | peak MiB |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|")?;
    writeln!(
        s,
        "| build | {build:.2} | {} | {:.1} | {:.1} |",
        f("build_allocations")?,
        mib(f("build_bytes")?),
        mib(f("build_peak_bytes")?)
    )?;
    writeln!(s, "| encode (protobuf only) | {encode:.2} | | | |")?;
    writeln!(
        s,
        "| encode + gzip | {encode_gzip:.2} | {} | {:.1} | {:.1} |",
        f("encode_allocations")?,
        mib(f("encode_bytes")?),
        mib(f("encode_peak_bytes")?)
    )?;
    writeln!(
        s,
        "| build + encode + gzip | {total:.2} | {} | {:.1} | |",
        f("build_allocations")? + f("encode_allocations")?,
        mib(f("build_bytes")? + f("encode_bytes")?)
    )?;
    let raw = f("raw_bytes")?;
    writeln!(
        s,
        "\nSize: {raw} bytes of protobuf ({:.1} per sample); gzipped by the agent {} bytes \
         (**{:.1} bytes per sample**). Gzip alone at each level, on the same protobuf:\n",
        per_sample(raw),
        f("gzip_bytes")?,
        per_sample(f("gzip_bytes")?)
    )?;
    writeln!(s, "| gzip level | bytes | bytes/sample | ms (best of 7) |")?;
    writeln!(s, "|---:|---:|---:|---:|")?;
    for level in [1, 3, 6] {
        let bytes = f(&format!("gzip{level}_bytes"))?;
        writeln!(
            s,
            "| {level} | {bytes} | {:.1} | {:.2} |",
            per_sample(bytes),
            float_field(figures, &format!("gzip{level}_ms"))?
        )?;
    }
    writeln!(
        s,
        "\nGoal: build and encode such a profile in under {GOAL_MS} ms on one core."
    )?;
    if total < GOAL_MS {
        writeln!(s, "\n- Met: {total:.2} ms per profile.")?;
    } else {
        writeln!(
            s,
            "\n- NOT met: {total:.2} ms per profile. Measured apart, build takes {build:.2} ms \
             ({:.0}% of build plus encode), encode + gzip {encode_gzip:.2} ms, of which \
             protobuf encoding {encode:.2} ms and gzip the rest.",
            build * 100.0 / (build + encode_gzip)
        )?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_from_bench_output() {
        let criterion = "pprof/build time:   [1.0 ms 2.0 ms 3.0 ms]\n\
                         pprof/encode time:   [1.0 ms 0.5 ms 3.0 ms]\n\
                         pprof/encode_gzip time:   [1.0 ms 1.5 ms 3.0 ms]\n\
                         pprof/total time:   [1.0 ms 3.5 ms 3.0 ms]\n";
        let figures = "pprof-figures samples=10 frames=300 locations=5 functions=4 strings=9 \
                       build_allocations=100 build_bytes=2048 build_peak_bytes=1024 \
                       encode_allocations=7 encode_bytes=4096 encode_peak_bytes=4096 \
                       raw_bytes=1000 gzip_level=1 gzip_bytes=200 gzip1_bytes=250 gzip1_ms=0.1 \
                       gzip3_bytes=220 gzip3_ms=0.2 gzip6_bytes=200 gzip6_ms=0.3";
        let s = section(criterion, figures).unwrap();
        assert!(s.starts_with("## pprof build and encode\n"));
        assert!(s.contains("| build | 2.00 | 100 |"));
        assert!(s.contains("(**20.0 bytes per sample**)"));
        assert!(s.contains("| 1 | 250 | 25.0 | 0.10 |"));
        assert!(s.contains("- Met: 3.50 ms"));
        let slow = criterion.replace("3.5 ms", "7.0 ms");
        assert!(
            section(&slow, figures)
                .unwrap()
                .contains("- NOT met: 7.00 ms")
        );
    }
}
