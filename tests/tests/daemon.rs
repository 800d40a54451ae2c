//! The daemon end to end: `profiler-agent run` with a config file, real eBPF sampling, real
//! Docker discovery and a real write endpoint (the test's receiver), one process.
//!
//! Checked, in order: `/ready` is 503 until BPF is attached and discovery answered, then 200;
//! `pyroscope_ebpf_active_targets` equals the containers Docker runs; each container's
//! profile is pushed with `service_name=<container name>`, `__name__=process_cpu` and the
//! external labels, and holds the container's functions; the directory sink has the same
//! services; `/metrics` passes `promtool check metrics`; a stopped container leaves the
//! active targets; SIGTERM flushes the partial interval (one more push) and exits 0.
//! With a Docker socket that never answers, `/ready` is 503 until the first discovery round
//! gives up, then 200.
//!
//! Root is needed (BPF, dockerd); under `CI=true` a missing prerequisite fails the test.

mod common;

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use common::{http::*, receiver::*, *};
use prost::Message as _;

const SHOW_UP: Duration = Duration::from_secs(30);

fn running_containers() -> usize {
    docker_ok(&["ps", "-q"]).lines().count()
}

#[test]
fn daemon_profiles_docker_containers_to_push_and_directory_sinks() {
    const TEST: &str = "daemon_profiles_docker_containers_to_push_and_directory_sinks";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(docker) = SpinImage::import(dir.path(), "profiler-daemon-test") else {
        return;
    };
    let image = &docker.image;
    let names = ["a", "b"].map(|n| format!("profiler-daemon-{n}-{}", docker.nonce));
    let _guards: Vec<ContainerGuard> = names
        .iter()
        .map(|n| ContainerGuard {
            container: n.clone(),
            image: image.clone(),
        })
        .collect();
    for name in &names {
        docker_ok(&[
            "run",
            "-d",
            "--network",
            "none",
            "--name",
            name,
            image,
            "/spin",
            "3600",
        ]);
    }

    let receiver = Receiver::start();
    let ingest = Receiver::start();
    let port = free_port();
    let profiles = dir.path().join("profiles");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
collect_interval = "3s"
[discovery.docker]
refresh_interval = "1h"
[write]
directory = "{profiles}"
[write.external_labels]
cluster = "e2e"
[[write.endpoint]]
url = "{url}"
[[write.endpoint]]
url = "{ingest_url}"
protocol = "ingest"
[server]
listen_address = "127.0.0.1:{port}"
"#,
            profiles = profiles.display(),
            url = receiver.url(),
            ingest_url = ingest.url(),
        ),
    )
    .unwrap();
    let check = Command::new(agent())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{:?}", check);

    let log = dir.path().join("agent.log");
    let mut agent = Workload::run_agent(&config, &log);
    // /ready answers 503 first (the server is up before BPF is attached), then 200.
    let first = wait_until(SHOW_UP, "server up", || http_get_text(port, "/ready"));
    eprintln!("first /ready: {first:?}");
    wait_until(SHOW_UP, "/ready 200", || {
        (http_get_text(port, "/ready")?.0 == 200).then_some(())
    });
    assert_eq!(http_get_text(port, "/healthz").map(|r| r.0), Some(200));

    let expected = running_containers();
    wait_until(SHOW_UP, "active targets = running containers", || {
        let (_, body) = http_get_text(port, "/metrics")?;
        (metric(&body, "pyroscope_ebpf_active_targets")? == expected as f64).then_some(())
    });

    // Each container's profile, with its name as service_name and its own functions.
    let services: BTreeSet<String> = names.iter().cloned().collect();
    receiver.wait_for(SHOW_UP, "a push per container", |r| {
        let seen: BTreeSet<String> = pushed_series(r)
            .iter()
            .filter_map(|s| s.labels.get("service_name").cloned())
            .collect();
        services.is_subset(&seen)
    });
    for series in pushed_series(&receiver.requests()) {
        let Some(service) = series.labels.get("service_name") else {
            panic!("series without service_name: {:?}", series.labels);
        };
        if !services.contains(service) {
            continue;
        }
        assert_eq!(series.labels["__name__"], "process_cpu");
        assert_eq!(series.labels["cluster"], "e2e");
        assert!(
            !series
                .labels
                .keys()
                .any(|k| k.starts_with("__") && k != "__name__"),
            "{:?}",
            series.labels
        );
        for p in &series.profiles {
            let names = function_names(p);
            assert!(
                names.contains(&"spin_inner") && names.contains(&"main"),
                "{service}: {names:?}"
            );
            let period = p.period;
            assert_eq!(period, 1_000_000_000 / 97);
        }
    }
    // The sinks are written concurrently: the push can land before the file does.
    for name in &names {
        let dir = profiles.join(name);
        wait_until(
            SHOW_UP,
            &format!("a profile file in {}", dir.display()),
            || (std::fs::read_dir(&dir).ok()?.count() >= 1).then_some(()),
        );
    }

    // Three intervals: each endpoint has one profile per container per interval.
    receiver.wait_for(SHOW_UP, "three intervals pushed per container", |r| {
        let series = pushed_series(r);
        names.iter().all(|n| {
            series
                .iter()
                .filter(|s| s.labels.get("service_name") == Some(n))
                .count()
                >= 3
        })
    });
    ingest.wait_for(SHOW_UP, "three intervals ingested per container", |r| {
        let got = ingested(r);
        names
            .iter()
            .all(|n| got.iter().filter(|i| ingest_service(i) == n).count() >= 3)
    });
    for name in &names {
        let pushed: Vec<i64> = pushed_series(&receiver.requests())
            .into_iter()
            .filter(|s| s.labels.get("service_name") == Some(name))
            .flat_map(|s| s.profiles)
            .map(|p| p.time_nanos)
            .collect();
        assert_distinct(&pushed, &format!("push intervals of {name}"));
        let ingested_from: Vec<String> = ingested(&ingest.requests())
            .into_iter()
            .filter(|i| ingest_service(i) == name)
            .map(|i| {
                assert_eq!(i.query["format"], "pprof");
                assert_eq!(i.query["sampleRate"], "97");
                assert!(i.query["name"].contains("cluster=e2e"), "{:?}", i.query);
                i.query["from"].clone()
            })
            .collect();
        assert_distinct(&ingested_from, &format!("ingest intervals of {name}"));
    }

    // The independent reader agrees: go tool pprof reads every profile, values are
    // count x period, and every location has a mapping.
    let requests = receiver.requests();
    let push_bodies = requests
        .iter()
        .filter(|r| r.path.ends_with("/Push"))
        .flat_map(|r| PushRequest::decode(r.body.as_slice()).unwrap().series)
        .filter(|s| {
            s.labels
                .iter()
                .any(|l| l.name == "service_name" && names.contains(&l.value))
        })
        .flat_map(|s| s.samples)
        .map(|s| s.raw_profile)
        .take(2);
    let ingest_bodies = ingested(&ingest.requests())
        .into_iter()
        .filter(|i| names.contains(&ingest_service(i).to_owned()))
        .map(|i| i.raw_gzip)
        .take(2);
    for (i, gz) in push_bodies.chain(ingest_bodies).enumerate() {
        let path = dir.path().join(format!("check-{i}.pb.gz"));
        std::fs::write(&path, &gz).unwrap();
        check_with_go_pprof(&path, &decode_gzip_pprof(&gz));
    }

    let (_, body) = http_get_text(port, "/metrics").unwrap();
    check_with_promtool(&body);

    // A stopped container leaves the active targets.
    docker_ok(&["stop", "-t", "1", &names[1]]);
    wait_until(
        SHOW_UP,
        "stopped container leaves the active targets",
        || {
            let (_, body) = http_get_text(port, "/metrics")?;
            (metric(&body, "pyroscope_ebpf_active_targets")? == (expected - 1) as f64).then_some(())
        },
    );

    // SIGTERM flushes the partial interval: one more push of the running container.
    let count_a = |r: &[Request]| {
        pushed_series(r)
            .iter()
            .filter(|s| s.labels.get("service_name") == Some(&names[0]))
            .count()
    };
    // Just after an interval's push, so that the next push can only be the flush.
    let before = count_a(&receiver.requests());
    receiver.wait_for(SHOW_UP, "the next interval", |r| count_a(r) > before);
    let before = count_a(&receiver.requests());
    // Halfway into the next interval, which only the flush can then deliver.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let status = wait_until(SHOW_UP, "agent exits after SIGTERM", || {
        agent.0.try_wait().unwrap()
    });
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    let flushed: Vec<i64> = pushed_series(&receiver.requests())
        .into_iter()
        .filter(|s| s.labels.get("service_name") == Some(&names[0]))
        .skip(before)
        .flat_map(|s| s.profiles)
        .map(|p| p.duration_nanos)
        .collect();
    assert!(
        flushed.iter().any(|&d| d > 0 && d < 2_900_000_000),
        "no partial interval flushed on SIGTERM (durations {flushed:?}); stderr:\n{stderr}"
    );
}

fn ingest_service(i: &Ingested) -> &str {
    let name = &i.query["name"];
    name.split_once('{')
        .map_or(name.as_str(), |(service, _)| service)
}

fn assert_distinct<T: Ord + std::fmt::Debug>(values: &[T], what: &str) {
    let distinct: BTreeSet<&T> = values.iter().collect();
    assert_eq!(
        distinct.len(),
        values.len(),
        "{what}: duplicates in {values:?}"
    );
}

/// `go tool pprof -raw` reads the profile; sample values and mappings are consistent.
fn check_with_go_pprof(path: &std::path::Path, p: &profiler_agent::profile::pprof::Profile) {
    let raw = go_pprof_raw(path);
    let mut total = 0;
    for v in profiler_tests::go_pprof::sample_values(&raw) {
        if v.len() == 2 {
            assert_eq!(v[1], v[0] * p.period, "value = count x period: {v:?}");
            total += v[0];
        }
    }
    let ours: i64 = p.sample.iter().map(|s| s.value[0]).sum();
    assert_eq!(total, ours, "go tool pprof sample total:\n{raw}");
    let locations = profiler_tests::go_pprof::locations(&raw);
    assert_eq!(
        locations.len(),
        p.location.len(),
        "go tool pprof locations:\n{raw}"
    );
    for location in &locations {
        assert_ne!(
            location.mapping, 0,
            "location without a mapping: {location:?}"
        );
        // The reader's lines are ours, innermost inline level first (the reader's format
        // separates fields by spaces, so a name counts up to its first one).
        let ours = &p.location[location.id as usize - 1];
        let names: Vec<&str> = ours
            .line
            .iter()
            .map(|l| {
                let f = &p.function[l.function_id as usize - 1];
                let name = p.string_table[f.name as usize].as_str();
                name.split_whitespace().next().unwrap_or_default()
            })
            .collect();
        assert_eq!(location.functions, names, "{raw}");
    }
}

/// `promtool check metrics` on an exposition; under CI promtool must exist.
fn check_with_promtool(body: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(!in_ci(), "promtool not installed");
        eprintln!("SKIPPED promtool check: promtool not installed");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sample counts of the service's pushed profiles, with each profile's start and duration.
fn pushed_intervals(r: &[Request], service: &str) -> Vec<(i64, i64, i64)> {
    pushed_series(r)
        .into_iter()
        .filter(|s| s.labels.get("service_name").map(String::as_str) == Some(service))
        .flat_map(|s| s.profiles)
        .map(|p| {
            let samples = p.sample.iter().map(|s| s.value[0]).sum();
            (p.time_nanos, p.duration_nanos, samples)
        })
        .collect()
}

/// A hanging endpoint and a refusing one do not disturb sampling or the healthy endpoint;
/// SIGHUP moves delivery to a new endpoint without losing an interval.
#[test]
fn dead_endpoints_do_not_disturb_sampling_and_sighup_switches_endpoints() {
    const TEST: &str = "dead_endpoints_do_not_disturb_sampling_and_sighup_switches_endpoints";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spin = compile_c("spin", dir.path());
    let workload = Workload::start(&spin, &["3600"]);
    let healthy = Receiver::start();
    let replacement = Receiver::start();
    let hanging = Receiver::start_hanging();
    let refused = free_port();
    let port = free_port();
    let config = dir.path().join("agent.toml");
    let write_config = |endpoint: &str| {
        std::fs::write(
            &config,
            format!(
                r#"
collect_interval = "3s"
[[targets]]
__process_pid__ = "{pid}"
service_name = "spin"
[[write.endpoint]]
url = "{endpoint}"
[[write.endpoint]]
name = "hanging"
url = "{hanging}"
remote_timeout = "1s"
min_backoff_period = "100ms"
max_backoff_period = "500ms"
max_backoff_retries = 2
[[write.endpoint]]
name = "refused"
url = "http://127.0.0.1:{refused}"
min_backoff_period = "100ms"
max_backoff_period = "500ms"
max_backoff_retries = 2
[server]
listen_address = "127.0.0.1:{port}"
"#,
                pid = workload.pid(),
                hanging = hanging.url(),
            ),
        )
        .unwrap();
    };
    write_config(&healthy.url());
    let log = dir.path().join("agent.log");
    let mut agent = Workload::run_agent(&config, &log);
    eprintln!("agent log: {}", log.display());
    healthy.wait_for(SHOW_UP, "four intervals despite dead endpoints", |r| {
        pushed_intervals(r, "spin").len() >= 4
    });
    // The busy loop keeps one CPU: about 97 samples per second of each interval, whatever
    // the other endpoints do. The first interval starts before the target is known.
    for (start, duration, samples) in pushed_intervals(&healthy.requests(), "spin")
        .into_iter()
        .skip(1)
    {
        let expected = 97.0 * duration as f64 / 1e9;
        assert!(
            (samples as f64 - expected).abs() <= expected * 0.15,
            "interval at {start}: {samples} samples, expected about {expected:.0}"
        );
    }
    let (_, metrics) = http_get_text(port, "/metrics").unwrap();
    let dropped = |endpoint: &str| {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("pyroscope_write_dropped_profiles_total")
                    && l.contains(&format!("endpoint=\"{endpoint}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(
        dropped("hanging") > 0.0,
        "hanging endpoint drops counted:\n{metrics}"
    );
    assert!(
        dropped("refused") > 0.0,
        "refused endpoint drops counted:\n{metrics}"
    );

    // SIGHUP: the healthy endpoint is replaced; no interval is lost in between.
    write_config(&replacement.url());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    replacement.wait_for(SHOW_UP, "two intervals at the new endpoint", |r| {
        pushed_intervals(r, "spin").len() >= 2
    });
    let old = pushed_intervals(&healthy.requests(), "spin");
    let new = pushed_intervals(&replacement.requests(), "spin");
    let mut all: Vec<(i64, i64, i64)> = old.iter().chain(&new).copied().collect();
    all.sort();
    all.dedup_by_key(|i| i.0);
    assert_eq!(
        all.len(),
        old.len() + new.len(),
        "an interval went to both endpoints"
    );
    for pair in all.windows(2) {
        let ((start, duration, _), (next, _, _)) = (pair[0], pair[1]);
        assert!(
            (next - (start + duration)).abs() < 100_000_000,
            "gap between intervals: {start}+{duration} then {next}\nold {old:?}\nnew {new:?}"
        );
    }
    // SAFETY: as above.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let status = wait_until(SHOW_UP, "agent exits", || agent.0.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
}

/// `/ready` is 503, saying what it waits for, until BPF is attached and the first discovery
/// round answered, then 200. Docker's socket here accepts connections and never answers, so
/// the first round can only end at its time limit: the 503 is certain to be seen, not a race
/// against a fast start.
#[test]
fn ready_waits_for_bpf_and_the_first_discovery_round() {
    const TEST: &str = "ready_waits_for_bpf_and_the_first_discovery_round";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent-docker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for connection in listener.incoming() {
            held.push(connection);
        }
    });
    let agent = Agent::start(
        dir.path(),
        &format!(
            r#"
collect_interval = "3s"
[discovery.docker]
host = "unix://{socket}"
[write]
directory = "{profiles}"
"#,
            socket = socket.display(),
            profiles = dir.path().join("profiles").display(),
        ),
    );
    let port = agent.port;
    let first = wait_until(SHOW_UP, "server up", || http_get_text(port, "/ready"));
    eprintln!("first /ready: {first:?}");
    assert_eq!(first.0, 503, "{first:?}");
    assert!(first.1.starts_with("not ready: "), "{first:?}");
    // BPF attaches within a second; discovery is what is still missing then.
    let waiting = wait_until(SHOW_UP, "/ready waiting for discovery", || {
        let answer = http_get_text(port, "/ready")?;
        answer.1.contains("first discovery round").then_some(answer)
    });
    assert_eq!(waiting.0, 503, "{waiting:?}");
    wait_until(
        SHOW_UP,
        "/ready 200 once the first round's time is up",
        || (http_get_text(port, "/ready")?.0 == 200).then_some(()),
    );
    assert_eq!(http_get_text(port, "/healthz").map(|r| r.0), Some(200));
}
