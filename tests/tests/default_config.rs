//! The embedded default configuration end to end: `profiler-agent run` with
//! `config/default.toml` (only its interval, directory and port changed) while a shell loop
//! starts 100 processes a second, each living 20 ms: far less than the default's 5 s process
//! scan. Their samples must be written under their executable's name, named at the drain from
//! what the agent read of them, and `ebpf/unspecified` must hold under 5% of all samples.
//!
//! Root is needed (BPF); under `CI=true` a missing prerequisite fails the test.

mod common;

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::{http::*, *};

const SHOW_UP: Duration = Duration::from_secs(30);
/// How long the shell loop runs.
const CHURN: Duration = Duration::from_secs(8);

/// Samples per service directory of the directory sink.
fn samples_by_service(profiles: &Path) -> BTreeMap<String, i64> {
    let mut by_service = BTreeMap::new();
    for service in std::fs::read_dir(profiles)
        .expect("profiles directory")
        .flatten()
    {
        let name = service.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(service.path()).unwrap().flatten() {
            let path = file.path();
            if path.to_string_lossy().ends_with(".pb.gz") {
                *by_service.entry(name.clone()).or_default() += total_samples(&read_profile(&path));
            }
        }
    }
    by_service
}

#[test]
fn the_embedded_default_names_processes_that_live_less_than_a_scan() {
    const TEST: &str = "the_embedded_default_names_processes_that_live_less_than_a_scan";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let churn = compile_c("churn", dir.path());
    let profiles = dir.path().join("profiles");
    let port = free_port();
    let default = std::fs::read_to_string(workspace_root().join("config/default.toml")).unwrap();
    let directory = "directory = \"./profiles\"";
    assert!(
        default.contains(directory),
        "config/default.toml changed its directory"
    );
    let config = format!(
        "collect_interval = \"3s\"\n{}\n[server]\nlisten_address = \"127.0.0.1:{port}\"\n",
        default.replace(
            directory,
            &format!("directory = \"{}\"", profiles.display())
        )
    );
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, config).unwrap();
    let agent = Workload::run_agent(&config_path, &dir.path().join("agent.log"));
    eprintln!("agent log: {}", dir.path().join("agent.log").display());
    wait_until(SHOW_UP, "agent ready", || {
        (http_get_text(port, "/ready")?.0 == 200).then_some(())
    });

    // 100 processes a second, each burning 20 ms of CPU and exiting.
    let mut shell = Command::new("/bin/sh")
        .args(["-c", "while :; do \"$0\" child 20 & sleep 0.01; done"])
        .arg(&churn)
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the shell loop");
    std::thread::sleep(CHURN);
    // SAFETY: signals the loop's own process group.
    unsafe { libc::kill(-(shell.id() as i32), libc::SIGKILL) };
    shell.wait().unwrap();
    // The interval the loop ended in is written at the next boundary.
    std::thread::sleep(Duration::from_secs(4));
    let metrics = scrape_metrics(port).expect("metrics");
    drop(agent);

    let by_service = samples_by_service(&profiles);
    eprintln!("samples by service: {by_service:?}");
    let total: i64 = by_service.values().sum();
    let churned = by_service.get("churn").copied().unwrap_or(0);
    let unspecified = by_service.get("ebpf_unspecified").copied().unwrap_or(0);
    let late = metric(&metrics, "profiler_samples_named_at_drain_total").unwrap_or(0.0);
    eprintln!(
        "churn {churned}, ebpf/unspecified {unspecified} of {total}; named at the drain: {late}"
    );
    // 8 s of two CPUs mostly busy with the loop's processes, at 97 Hz: about 1500 samples.
    assert!(churned >= 300, "too few churn samples: {by_service:?}");
    assert!(
        (unspecified as f64) < 0.05 * total as f64,
        "ebpf/unspecified holds {unspecified} of {total} samples: {by_service:?}"
    );
    assert!(
        late > 0.0,
        "the short-lived processes were named at the drain, not by a scan"
    );
}
