//! Threshold triggers end to end: `profiler-agent run` with `[[trigger]]` tables, real eBPF,
//! C fixtures, and the test's receiver as the push endpoint.
//!
//! Three processes: `spin` (one busy thread), `hog` (200 MiB resident, asleep) and an idle
//! `sleep`. Triggers: CPU above 50% for the spin service, CPU above 50% for the idle one,
//! resident memory above 100 MiB for a command regex matching hog. Checked: the spin and hog
//! captures are pushed with their target labels, the trigger's tags and `trigger="cpu"` /
//! `trigger="memory"`, the spin capture holds spin's functions at the trigger's rate; the
//! idle process is never captured; each trigger fires once within its cooldown, though its
//! process stays above the threshold; the captures directory keeps both;
//! `profiler_triggers_fired_total` and `profiler_captures_total` agree.
//!
//! Root is needed (BPF); under `CI=true` a missing prerequisite fails the test.

mod common;

use std::time::Duration;

use common::{http::*, receiver::*, *};

const SHOW_UP: Duration = Duration::from_secs(40);

/// Captures pushed with a `trigger` label: (labels, profile) per series.
fn triggered(receiver: &Receiver) -> Vec<PushedSeries> {
    pushed_series(&receiver.requests())
        .into_iter()
        .filter(|s| s.labels.contains_key("trigger"))
        .collect()
}

#[test]
fn triggers_capture_busy_and_big_processes_once_per_cooldown() {
    const TEST: &str = "triggers_capture_busy_and_big_processes_once_per_cooldown";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spin = Workload::start(&compile_c("spin", dir.path()), &["3600"]);
    let hog_binary = compile_c("hog", dir.path());
    let hog = Workload::spawn(&hog_binary, &["200", "3600"]);
    let idle = Workload::spawn("sleep", &["3600"]);
    let receiver = Receiver::start();
    let port = free_port();
    let captures = dir.path().join("captures");
    let hog_regex = format!(
        "^{} 200",
        hog_binary.display().to_string().replace('.', "\\.")
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
collect_interval = "2s"
[[targets]]
__process_pid__ = "{spin}"
service_name = "spin"
[[targets]]
__process_pid__ = "{idle}"
service_name = "idle"
[[targets]]
__process_pid__ = "{hog}"
service_name = "hog"
[[write.endpoint]]
url = "{url}"
[server]
listen_address = "127.0.0.1:{port}"
[capture]
monitor_interval = "500ms"
directory = "{captures}"
[[trigger]]
service = "spin"
cpu_usage_percent = 50.0
duration = "2s"
sample_rate = 199
tags = {{ team = "perf" }}
cooldown = "1h"
[[trigger]]
service = "idle"
cpu_usage_percent = 50.0
duration = "1s"
[[trigger]]
command = '{hog_regex}'
mem_usage_mb = 100
duration = "1s"
cooldown = "1h"
"#,
            spin = spin.pid(),
            idle = idle.pid(),
            hog = hog.pid(),
            url = receiver.url(),
            captures = captures.display(),
        ),
    )
    .unwrap();
    let log_path = dir.path().join("agent.log");
    let _agent = Workload::run_agent(&config, &log_path);
    let show_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let found = wait_until(
        SHOW_UP,
        "spin's and hog's triggered captures pushed",
        || {
            let t = triggered(&receiver);
            let has = |service: &str| t.iter().any(|s| s.labels["service_name"] == service);
            (has("spin") && has("hog")).then_some(t)
        },
    );
    // Both stay above their thresholds: give the monitor many more turns to misfire.
    std::thread::sleep(Duration::from_secs(4));
    let all = triggered(&receiver);
    assert!(all.len() >= found.len());
    let log = show_log();
    let of = |service: &str| -> Vec<&PushedSeries> {
        all.iter()
            .filter(|s| s.labels["service_name"] == service)
            .collect()
    };
    let spin_captures = of("spin");
    assert_eq!(
        spin_captures.len(),
        1,
        "one spin capture per cooldown\n{log}"
    );
    let spin_capture = spin_captures[0];
    assert_eq!(spin_capture.labels["trigger"], "cpu");
    assert_eq!(spin_capture.labels["team"], "perf");
    assert_eq!(spin_capture.labels["__name__"], "process_cpu");
    let p = &spin_capture.profiles[0];
    assert_eq!(p.period, 1_000_000_000 / 199);
    let names = function_names(p);
    assert!(names.contains(&"spin_inner"), "{names:?}");
    let samples: i64 = p.sample.iter().map(|s| s.value[0]).sum();
    let per_s = samples as f64 / (p.duration_nanos as f64 / 1e9);
    assert!(
        (0.7 * 199.0..=1.15 * 199.0).contains(&per_s),
        "{per_s:.0} samples/s in the spin capture, expected about 199"
    );

    let hog_captures = of("hog");
    assert_eq!(hog_captures.len(), 1, "one hog capture per cooldown\n{log}");
    assert_eq!(hog_captures[0].labels["trigger"], "memory");
    assert!(!hog_captures[0].labels.contains_key("team"));
    assert!(
        of("idle").is_empty(),
        "the idle process was captured\n{log}"
    );

    let kept: Vec<String> = std::fs::read_dir(&captures)
        .expect("the captures directory")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept.iter()
            .any(|k| k.ends_with(&format!("-spin-{}-cpu.pb.gz", spin.pid())))
    );
    assert!(
        kept.iter()
            .any(|k| k.ends_with(&format!("-hog-{}-memory.pb.gz", hog.pid())))
    );

    let (_, text) = http_get_text(port, "/metrics").expect("/metrics answers");
    assert_eq!(
        metric(&text, "profiler_triggers_fired_total{trigger=\"cpu\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "profiler_triggers_fired_total{trigger=\"memory\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "profiler_captures_total{trigger=\"cpu\",outcome=\"done\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "profiler_captures_total{trigger=\"memory\",outcome=\"done\"}"
        ),
        Some(1.0)
    );
}
