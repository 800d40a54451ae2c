//! `cargo xtask test`: every test in the workspace, as CI runs it.
//!
//! Four phases, each timed and summed up at the end: setup; build, where the agent binary
//! the end-to-end tests run (`cargo build -p profiler-agent --bin profiler-agent`, the dev
//! profile, as `common::agent()` would build it) and every test binary (`cargo test
//! --no-run`) are built before any test starts, so that no test compiles beside a running
//! workload; the unit tests; and the end-to-end tests, told the agent's path through
//! `PROFILER_AGENT_BIN`.
//!
//! Two test invocations: the end-to-end crate (`profiler-tests`) runs single-threaded
//! because its tests load BPF programs, count samples on a busy 2-CPU machine and check that
//! nothing is left attached, so concurrent tests would disturb each other. Everything else
//! runs in parallel. The second run happens even when the first fails, so one report shows
//! every failure. The environment is passed through unchanged: with `CI=true` the e2e tests
//! fail instead of skipping when root or a tool is missing.
//!
//! Still built inside the tests, because each takes seconds or less (or is the point of
//! the test): the C, C++ and Rust fixtures (gcc, g++, rustc), the Go fixture (`go build` in
//! a private GOCACHE, so stripped-Go symbolization is checked on a fresh build), and the
//! `cargo build` that faults.rs runs as background load.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup::setup,
    util::{cargo, check, display, status},
};

/// The package selections of the two test runs. They are built with the same selections
/// they run with: cargo unifies features over the selected packages, so a build of another
/// selection could leave the run something to rebuild.
const UNIT: &[&str] = &[
    "--workspace",
    "--exclude",
    "profiler-tests",
    // Only builds for bpfel-unknown-none (no_std, no_main); the agent's build.rs builds it,
    // so the agent's tests cover that it compiles.
    "--exclude",
    "profiler-ebpf",
];
const E2E: &[&str] = &["-p", "profiler-tests"];

pub fn test() -> Result<()> {
    let mut phases = Phases::default();
    phases.time("setup", setup)?;
    let agent = phases.time("build", build)?;
    eprintln!(
        "xtask: built the agent and every test binary in {}",
        secs(phases.last())
    );
    let unit = phases.time("unit tests", || {
        status(cargo().arg("test").args(UNIT).arg("--no-fail-fast"))
    })?;
    let e2e = phases.time("e2e tests", || {
        status(
            cargo()
                .arg("test")
                .args(E2E)
                .args(["--no-fail-fast", "--", "--test-threads=1"])
                .env("PROFILER_AGENT_BIN", &agent),
        )
    })?;
    phases.print();
    match (unit.success(), e2e.success()) {
        (true, true) => Ok(()),
        (false, true) => bail!("unit and integration tests failed ({unit})"),
        (true, false) => bail!("end-to-end tests (profiler-tests) failed ({e2e})"),
        (false, false) => bail!("unit tests ({unit}) and end-to-end tests ({e2e}) failed"),
    }
}

/// Builds the agent the end-to-end tests run and every test binary; returns the agent's path.
fn build() -> Result<PathBuf> {
    let agent = build_agent_bin()?;
    check(cargo().arg("test").args(UNIT).arg("--no-run"))?;
    check(cargo().arg("test").args(E2E).arg("--no-run"))?;
    Ok(agent)
}

/// `cargo build -p profiler-agent --bin profiler-agent` (dev profile), and the executable's
/// path as cargo reports it (`compiler-artifact` message), whatever the target directory.
fn build_agent_bin() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "-p",
        "profiler-agent",
        "--bin",
        "profiler-agent",
        "--message-format=json-render-diagnostics",
    ])
    .stdout(Stdio::piped());
    eprintln!("$ {}", display(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read cargo's messages")?;
        if let Some(path) = agent_executable(&line) {
            executable = Some(path);
        }
    }
    let status = child.wait().context("wait for cargo build")?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(&cmd));
    }
    executable.context("cargo build reported no profiler-agent executable")
}

/// The `executable` of a `compiler-artifact` message for the `profiler-agent` binary target.
fn agent_executable(message: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(message).ok()?;
    let target = &message["target"];
    let is_agent_bin = message["reason"] == "compiler-artifact"
        && target["name"] == "profiler-agent"
        && target["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"));
    is_agent_bin
        .then(|| message["executable"].as_str().map(PathBuf::from))
        .flatten()
}

/// Wall time of each phase that ran, in order.
#[derive(Default)]
struct Phases(Vec<(&'static str, Duration)>);

impl Phases {
    fn time<T>(&mut self, name: &'static str, phase: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let result = phase();
        self.0.push((name, start.elapsed()));
        if result.is_err() {
            self.print();
        }
        result
    }

    /// How long the latest phase took.
    fn last(&self) -> Duration {
        self.0.last().map_or(Duration::ZERO, |(_, d)| *d)
    }

    fn print(&self) {
        let total: Duration = self.0.iter().map(|(_, d)| *d).sum();
        let phases: Vec<String> = self
            .0
            .iter()
            .map(|(name, d)| format!("{name} {}", secs(*d)))
            .collect();
        eprintln!("xtask test: {} (total {})", phases.join(", "), secs(total));
    }
}

fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_agent_executable_among_cargo_messages() {
        let agent = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"profiler-agent"},"executable":"/t/debug/profiler-agent"}"#;
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"profiler-agent"},"executable":null}"#;
        let other = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"xtask"},"executable":"/t/debug/xtask"}"#;
        assert_eq!(
            agent_executable(agent),
            Some(PathBuf::from("/t/debug/profiler-agent"))
        );
        assert_eq!(agent_executable(lib), None);
        assert_eq!(agent_executable(other), None);
        assert_eq!(agent_executable(r#"{"reason":"build-finished"}"#), None);
        assert_eq!(agent_executable("not json"), None);
    }
}
