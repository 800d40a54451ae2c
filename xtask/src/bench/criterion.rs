//! Running profiler-agent's criterion benches and reading their output: the compiled bench
//! executable, criterion's median per bench id, and `key=<number>` fields the benches print.
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::util::cargo;

/// The compiled criterion bench `name` of `package`, built (release, cargo's bench
/// profile) with `cargo bench --no-run`.
pub fn bench_executable(package: &str, name: &str) -> Result<PathBuf> {
    let out = cargo()
        .args([
            "bench",
            "-p",
            package,
            "--bench",
            name,
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .context("cargo bench --no-run")?;
    if !out.status.success() {
        bail!(
            "building the benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("no {name} bench executable in cargo's output"))
}

/// `key=<number>` from a line of a bench's output.
pub fn field(text: &str, key: &str) -> Result<u64> {
    raw_field(text, key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key}=<integer> in {text:?}"))
}

/// `key=<number>`, the number possibly fractional.
pub fn float_field(text: &str, key: &str) -> Result<f64> {
    raw_field(text, key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key}=<number> in {text:?}"))
}

fn raw_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
}

/// (bench id without the `group/` prefix, median ms) from criterion's text output.
pub fn criterion_times(output: &str, group: &str) -> Vec<(String, f64)> {
    let prefix = format!("{group}/");
    let mut current = None;
    let mut out = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix(&prefix) {
            current = rest.split_whitespace().next().map(str::to_owned);
        }
        let Some(at) = line.find("time:") else {
            continue;
        };
        let Some(id) = current.take() else { continue };
        // "time:   [1.2 ms 1.3 ms 1.4 ms]": the middle estimate.
        let parts: Vec<&str> = line[at + 5..]
            .trim()
            .trim_start_matches('[')
            .split_whitespace()
            .collect();
        if let (Some(v), Some(unit)) = (parts.get(2), parts.get(3)) {
            let scale = match *unit {
                "s" => 1000.0,
                "ms" => 1.0,
                "µs" | "us" => 0.001,
                "ns" => 0.000_001,
                _ => continue,
            };
            if let Ok(v) = v.parse::<f64>() {
                out.push((id, v * scale));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criterion_medians() {
        let text = "symbolize/ours/cold     time:   [156.37 ms 160.25 ms 163.27 ms]\n\
                    thrpt: ...\n\
                    symbolize/ours/warm\n                        time:   [2.2 ms 2.5 ms 3.0 ms]\n\
                    symbolize/x/y time:   [1.0 µs 2.0 µs 3.0 µs]\n\
                    pprof/build time:   [1.0 ms 2.0 ms 3.0 ms]\n";
        let t = criterion_times(text, "symbolize");
        assert_eq!(t[0], ("ours/cold".to_owned(), 160.25));
        assert_eq!(t[1], ("ours/warm".to_owned(), 2.5));
        assert!((t[2].1 - 0.002).abs() < 1e-9);
        assert_eq!(t.len(), 3);
        assert_eq!(criterion_times(text, "pprof"), [("build".to_owned(), 2.0)]);
    }

    #[test]
    fn fields() {
        assert_eq!(
            field("rss ours peak_kib=85596 x=1", "peak_kib").unwrap(),
            85596
        );
        assert!(field("nothing", "peak_kib").is_err());
        assert_eq!(float_field("gzip1_ms=1.25", "gzip1_ms").unwrap(), 1.25);
    }
}
