//! On-demand captures end to end: `profiler-agent run` with `[capture]` enabled (and a
//! bearer token), real eBPF, C fixtures as the captured processes.
//!
//! Checked: a capture by pid at 499 Hz holds the fixture's call chain at about 499 samples
//! per CPU-second (against the process's own CPU time), reads with `go tool pprof -raw`, and
//! leaves the continuous profile at its 97 Hz: every continuous profile the directory sink
//! wrote whose window overlaps the capture's holds about 97 samples per second of its own
//! window (a capture sample leaking into it would show as hundreds more), and consecutive
//! continuous windows never overlap. A CPU-bound process at normal priority runs beside the
//! whole test, as a build did on the machine where a rate measured against scraped
//! counters once failed; a capture by command regex finds the other
//! fixture and answers folded stacks; `format=svg` is a flame graph; a second capture while
//! one runs is 429 with `max_concurrent = 1`; 400 for bad parameters (never echoing them),
//! 401 without or with a wrong token, 404 for no such process; `profiler_captures_total`
//! counts them; and the agent refuses to start with the API on a public address without a
//! token (exit 2, field named).
//!
//! Root is needed (BPF); under `CI=true` a missing prerequisite fails the test.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{http::*, *};

const SHOW_UP: Duration = Duration::from_secs(30);
/// The first interval reads kallsyms and the target's ELF files afresh (in a debug build):
/// at the share of a CPU the agent gets beside busy processes, that can take minutes.
const FIRST_INTERVAL: Duration = Duration::from_secs(180);
const TOKEN: &str = "capture-test-token";
const RATE: f64 = 499.0;
/// The continuous profile's rate (the default `sample_rate`).
const CONTINUOUS_RATE: f64 = 97.0;

/// `GET path` with an optional bearer token: (status, body).
fn get(port: u16, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    http_get(port, path, token).expect("the agent answers")
}

fn scraped(port: u16, series: &str) -> f64 {
    let (_, text) = http_get_text(port, "/metrics").expect("/metrics answers");
    metric(&text, series).unwrap_or(0.0)
}

#[test]
fn captures_by_pid_and_command_and_answers_errors() {
    const TEST: &str = "captures_by_pid_and_command_and_answers_errors";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Load beside the whole test, at normal priority like the agent: a busy shell loop.
    let _busy = Workload::spawn("sh", &["-c", "while :; do :; done"]);
    let spin = Workload::start(&compile_c("spin", dir.path()), &["3600"]);
    let chain_binary = compile_c("chain", dir.path());
    // Normal priority: two busy processes at nice -20 on two CPUs would starve the agent.
    let chain = Workload::spawn(&chain_binary, &["3600", "1"]);
    let agent = Agent::start_ready(
        dir.path(),
        &format!(
            r#"
collect_interval = "2s"
[[targets]]
__process_pid__ = "{spin}"
service_name = "spin"
[write]
directory = "{profiles}"
[capture]
enabled = true
bearer_token = "{TOKEN}"
max_concurrent = 1
"#,
            spin = spin.pid(),
            profiles = dir.path().join("profiles").display(),
        ),
    );
    let port = agent.port;
    let continuous_series = "pyroscope_ebpf_pprof_samples_total{service_name=\"spin\"}";
    // Let the first (slowest) interval pass, so the capture overlaps steady intervals.
    let ready_at = Instant::now();
    wait_until(FIRST_INTERVAL, "spin's first interval", || {
        (scraped(port, continuous_series) > 0.0).then_some(())
    });
    eprintln!(
        "first interval built {:.1?} after ready",
        ready_at.elapsed()
    );

    // By pid at 499 Hz for 3 s, in a thread: meanwhile a second capture is refused.
    let cpu_before = cpu_ns(spin.pid());
    let window_start = Instant::now();
    let spin_pid = spin.pid();
    let by_pid = std::thread::spawn(move || {
        get(
            port,
            &format!("/v1/profile?pid={spin_pid}&duration=3s&sample_rate=499"),
            Some(TOKEN),
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    let (status, body) = get(
        port,
        &format!("/v1/profile?pid={}&duration=1s", chain.pid()),
        Some(TOKEN),
    );
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    let (status, pprof) = by_pid.join().unwrap();
    let cpu_s = (cpu_ns(spin.pid()) - cpu_before) as f64 / 1e9;
    eprintln!(
        "capture by pid answered after {:.1?}",
        window_start.elapsed()
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&pprof));
    let path = dir.path().join("by-pid.pb.gz");
    std::fs::write(&path, &pprof).unwrap();
    let raw = go_pprof_raw(&path);
    assert!(raw.contains("spin_inner"), "go tool pprof -raw: {raw}");
    let p = read_profile(&path);
    assert_eq!(p.period, (1e9 / RATE) as i64);
    let samples = total_samples(&p) as f64;
    let with_chain = p
        .sample
        .iter()
        .filter(|s| {
            let names = stack_names(&p, s);
            names.contains(&"spin_inner") && names.contains(&"spin_outer")
        })
        .map(|s| s.value[0])
        .sum::<i64>() as f64;
    eprintln!("capture by pid: {samples} samples over {cpu_s:.2} CPU-s");
    // The sampled window is the profile's duration; spin (nice -20, one thread) is on a CPU
    // all of it, which its CPU time around the request (attach and answer included) shows.
    let window_s = p.duration_nanos as f64 / 1e9;
    assert!(
        (2.9..=3.5).contains(&window_s) && cpu_s >= 0.8 * window_s,
        "window {window_s:.2} s, spin used {cpu_s:.2} CPU-s"
    );
    let per_cpu_s = samples / window_s;
    assert!(
        (0.7 * RATE..=1.15 * RATE).contains(&per_cpu_s),
        "{per_cpu_s:.0} samples per CPU-second, expected about {RATE}"
    );
    assert!(
        with_chain >= 0.9 * samples,
        "{with_chain} of {samples} under spin_outer -> spin_inner"
    );

    // The continuous profile kept its own rate through the capture, measured in the
    // profiles the directory sink wrote, each against its own window: spin (one thread,
    // nice -20) is on a CPU nearly all of it.
    let capture = (p.time_nanos, p.time_nanos + p.duration_nanos);
    let spin_profiles = dir.path().join("profiles/spin");
    let continuous = wait_until(SHOW_UP, "continuous profiles past the capture", || {
        let profiles = written_profiles(&spin_profiles);
        profiles
            .iter()
            .any(|c| c.time_nanos + c.duration_nanos >= capture.1)
            .then_some(profiles)
    });
    for pair in continuous.windows(2) {
        let (end, next) = (
            pair[0].time_nanos + pair[0].duration_nanos,
            pair[1].time_nanos,
        );
        // Starts are wall-clock and durations monotonic, so a boundary may wobble by
        // microseconds; a shared sample (one per 10 ms of CPU) needs far more.
        assert!(
            end <= next + 1_000_000,
            "continuous windows overlap: one ends at {end}, the next starts at {next}"
        );
    }
    let overlap_s = |c: &Profile| {
        (capture.1.min(c.time_nanos + c.duration_nanos) - capture.0.max(c.time_nanos)) as f64 / 1e9
    };
    let overlapping: Vec<&Profile> = continuous.iter().filter(|c| overlap_s(c) > 0.0).collect();
    // The continuous profile ran through the whole capture.
    let covered_s: f64 = overlapping.iter().map(|c| overlap_s(c)).sum();
    let capture_s = p.duration_nanos as f64 / 1e9;
    assert!(
        covered_s >= 0.98 * capture_s,
        "continuous profiles cover {covered_s:.2} s of the {capture_s:.2} s capture"
    );
    for c in overlapping {
        let window_s = c.duration_nanos as f64 / 1e9;
        let samples = total_samples(c) as f64;
        let rate = samples / window_s;
        let overlap_s = overlap_s(c);
        eprintln!(
            "continuous: {samples} samples in {window_s:.2} s ({rate:.1}/s), \
             {overlap_s:.2} s of it during the capture"
        );
        assert!(
            (0.4 * CONTINUOUS_RATE..=1.3 * CONTINUOUS_RATE).contains(&rate),
            "continuous profile at {rate:.0} samples/s during a 499 Hz capture \
             ({overlap_s:.2} s of its {window_s:.2} s window), expected about {CONTINUOUS_RATE}"
        );
    }

    // By command regex: the chain fixture's path is unique to this test's directory.
    let regex = format!(
        "^{} 3600",
        chain_binary.display().to_string().replace('.', "\\.")
    );
    let (status, folded) = get(
        port,
        &format!(
            "/v1/profile?command={}&duration=1s&format=folded",
            percent_encode(&regex)
        ),
        Some(TOKEN),
    );
    let folded = String::from_utf8(folded).unwrap();
    assert_eq!(status, 200, "{folded}");
    assert!(
        folded.lines().any(|l| l.contains("chain_c;chain_d ")),
        "folded stacks of chain: {folded}"
    );
    assert!(
        !folded.contains("spin_inner"),
        "only the chain process: {folded}"
    );

    // A CPython process: its capture names its Python functions (python_enabled's default).
    let python = Workload::spawn(
        "/usr/bin/python3.11",
        &[workspace_root()
            .join("tests/fixtures/python/chain.py")
            .to_str()
            .unwrap()],
    );
    std::thread::sleep(Duration::from_millis(500));
    let (status, folded) = get(
        port,
        &format!("/v1/profile?pid={}&duration=2s&format=folded", python.pid()),
        Some(TOKEN),
    );
    let folded = String::from_utf8(folded).unwrap();
    assert_eq!(status, 200, "{folded}");
    assert!(
        folded
            .lines()
            .any(|l| l.contains(";main;handle_request;parse;tokenize")),
        "folded stacks of chain.py: {folded}"
    );
    drop(python);

    let (status, svg) = get(
        port,
        &format!("/v1/profile?pid={}&duration=1s&format=svg", spin.pid()),
        Some(TOKEN),
    );
    let svg = String::from_utf8(svg).unwrap();
    assert_eq!(status, 200, "{svg}");
    assert!(svg.contains("<svg") && svg.contains("spin_inner"), "svg");

    // Errors, before any sampling.
    for bad in [
        "/v1/profile",
        "/v1/profile?pid=1&duration=10m",
        "/v1/profile?pid=1&sample_rate=5000",
        "/v1/profile?pid=1&format=html",
        "/v1/profile?command=(",
        "/v1/profile?pid=%3Cscript%3Ealert(1)%3C/script%3E",
    ] {
        let (status, body) = get(port, bad, Some(TOKEN));
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("parameter"), "{bad}: {body}");
        assert!(!body.contains("<script"), "{bad} echoed: {body}");
    }
    let (status, _) = get(port, "/v1/profile?pid=4194305&duration=1s", Some(TOKEN));
    assert_eq!(status, 404);
    let (status, _) = get(
        port,
        &format!(
            "/v1/profile?command={}",
            percent_encode("^no such process [0-9]{9}$")
        ),
        Some(TOKEN),
    );
    assert_eq!(status, 404);
    let path = format!("/v1/profile?pid={}&duration=1s", spin.pid());
    assert_eq!(get(port, &path, None).0, 401);
    assert_eq!(get(port, &path, Some("capture-test-tokeN")).0, 401);

    let done = "profiler_captures_total{trigger=\"manual\",outcome=\"done\"}";
    assert_eq!(scraped(port, done), 4.0, "captures done");
}

#[test]
fn refuses_a_public_capture_api_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[server]\nlisten_address = \"0.0.0.0:0\"\n[capture]\nenabled = true\n",
    )
    .unwrap();
    for command in ["run", "check-config"] {
        let out = Command::new(agent())
            .args([command, "--config"])
            .arg(&config)
            .output()
            .expect("run the agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("capture.bearer_token"),
            "{command}: {stderr}"
        );
    }
}
