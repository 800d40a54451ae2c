//! Turns overhead measurements into the `## overhead` section of BENCHMARKS.md: a markdown
//! table with ratios to `perf record` (the tool people already run, so the yardstick), the
//! goals with a verdict each, and enough context (date, kernel, CPUs, command) to reproduce.
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};

/// The section heading this benchmark owns in BENCHMARKS.md.
const HEADING: &str = "## overhead";

/// The goal for the BPF program's cost per sample.
const BPF_GOAL_NS: f64 = 2000.0;

/// One profiler's cost over the run.
pub struct Measurement {
    pub name: &'static str,
    /// User+system CPU seconds per wall second (1.0 = one core fully used).
    pub cpu_per_s: f64,
    pub max_rss_kib: u64,
    /// Only for our agent.
    pub bpf: Option<BpfStats>,
}

/// Cumulative BPF run-time statistics of one program (`kernel.bpf_stats_enabled`).
pub struct BpfStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl BpfStats {
    pub fn ns_per_sample(&self) -> f64 {
        self.run_time_ns as f64 / self.run_cnt as f64
    }
}

/// The whole `## overhead` section, heading included. The row named `perf ...` is the
/// baseline for the ratios; the one named `profiler-agent ...` is checked against the goals.
pub fn section(results: &[Measurement], seconds: u64, cpus: usize) -> Result<String> {
    let find = |prefix: &str| results.iter().find(|m| m.name.starts_with(prefix));
    let perf = find("perf").context("no perf measurement")?;
    let ours = find("profiler-agent").context("no measurement of our agent")?;
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "n/a".into()
        }
    };

    let mut s = String::new();
    let command = if seconds == 30 {
        "cargo xtask bench overhead".to_owned()
    } else {
        format!("cargo xtask bench overhead --seconds {seconds}")
    };
    let depth = super::overhead::WORKLOAD_DEPTH;
    writeln!(s, "{HEADING}\n")?;
    writeln!(
        s,
        "Measured {} on Linux {}, {cpus} CPUs ({}). Reproduce as root: `{command}`.\n",
        today(),
        kernel_release(),
        cpu_model()
    )?;
    writeln!(
        s,
        "Each profiler records the whole host for {seconds} s at 97 Hz with user and kernel \
         stacks, in turn, while tests/fixtures/chain.c runs {cpus} threads, each {depth} frames \
         of recursion deep under a 5-deep call chain, so every CPU is busy. CPU is the profiler's own user+sys time per wall second \
         (startup and shutdown included) and RSS its peak, both from `wait4`. BPF ns/sample is \
         `run_time_ns / run_cnt` of our `profile_cpu` program (`kernel.bpf_stats_enabled=1`), \
         read 1 s before the end.\n"
    )?;
    writeln!(
        s,
        "| profiler | CPU core-s/s | peak RSS MiB | ratio CPU to perf | ratio RSS to perf | BPF ns/sample |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|")?;
    for m in results {
        let bpf = m
            .bpf
            .as_ref()
            .map_or("n/a".to_owned(), |b| format!("{:.0}", b.ns_per_sample()));
        writeln!(
            s,
            "| {} | {:.4} | {:.1} | {} | {} | {bpf} |",
            m.name,
            m.cpu_per_s,
            m.max_rss_kib as f64 / 1024.0,
            ratio(m.cpu_per_s, perf.cpu_per_s),
            ratio(m.max_rss_kib as f64, perf.max_rss_kib as f64),
        )?;
    }

    writeln!(
        s,
        "\nGoals: BPF <= 2 us per sample; our CPU and RSS below perf record's.\n"
    )?;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    match &ours.bpf {
        Some(b) => writeln!(
            s,
            "- BPF per sample: {} ({:.0} ns over {} samples)",
            verdict(b.ns_per_sample() <= BPF_GOAL_NS),
            b.ns_per_sample(),
            b.run_cnt
        )?,
        None => writeln!(s, "- BPF per sample: not measured (bpftool found no stats)")?,
    }
    writeln!(
        s,
        "- CPU below perf record: {} ({:.4} vs {:.4} core-s/s)",
        verdict(ours.cpu_per_s < perf.cpu_per_s),
        ours.cpu_per_s,
        perf.cpu_per_s
    )?;
    writeln!(
        s,
        "- RSS below perf record: {} ({:.1} vs {:.1} MiB)",
        verdict(ours.max_rss_kib < perf.max_rss_kib),
        ours.max_rss_kib as f64 / 1024.0,
        perf.max_rss_kib as f64 / 1024.0
    )?;
    Ok(s)
}

/// Replaces the section of `path` headed by `section`'s first line (up to the next `## `
/// heading) with `section`, or appends it; other benchmarks' sections are left alone.
pub fn write_section(path: &Path, section: &str) -> Result<()> {
    let old = match fs::read_to_string(path) {
        Ok(old) => old,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_owned(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    fs::write(path, replace_section(&old, section))
        .with_context(|| format!("writing {}", path.display()))
}

fn replace_section(old: &str, section: &str) -> String {
    let lines: Vec<&str> = old.lines().collect();
    let section = section.trim_end();
    let heading = section.lines().next().unwrap_or_default().trim_end();
    let Some(start) = lines.iter().position(|l| l.trim_end() == heading) else {
        return format!("{}\n\n{section}\n", old.trim_end());
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = lines[..start].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(section);
    out.push('\n');
    if end < lines.len() {
        out.push('\n');
        out.push_str(&lines[end..].join("\n"));
        out.push('\n');
    }
    out
}

/// `uname -r`.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map_or("unknown".into(), |s| s.trim().into())
}

pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Today's UTC date as YYYY-MM-DD, from the civil-from-days algorithm (no date crate needed
/// for one line).
pub fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::replace_section;

    #[test]
    fn appends_when_absent() {
        let out = replace_section("# Benchmarks\n\nintro\n", "## overhead\n\nnew\n");
        assert_eq!(out, "# Benchmarks\n\nintro\n\n## overhead\n\nnew\n");
    }

    #[test]
    fn replaces_only_its_own_section() {
        let old = "# B\n\n## overhead\n\nold\n\n## symbolize\n\nkeep\n";
        let out = replace_section(old, "## overhead\n\nnew\n");
        assert_eq!(out, "# B\n\n## overhead\n\nnew\n\n## symbolize\n\nkeep\n");
    }

    #[test]
    fn replaces_last_section() {
        let out = replace_section("# B\n\n## overhead\n\nold\n", "## overhead\n\nnew");
        assert_eq!(out, "# B\n\n## overhead\n\nnew\n");
    }
}
