//! Faults an agent on every node meets, end to end with real eBPF sampling.
//!
//! One agent run carries several faults at once, so the two-minute outage costs CI two
//! minutes once: its push endpoint is down for two minutes, its directory sink is on a full
//! tmpfs, one profiled process has its `/proc/PID/maps` unreadable (a write-only sysfs file
//! bind-mounted over it in the agent's mount namespace), and short-lived processes exit
//! between their samples and the drain (yet are named, from snapshots taken at their first
//! sample), while a `cargo build` of the agent runs on the same host (whose rustc and
//! libraries the agent symbolizes too). Checked: the agent stays up and ready, RSS stays
//! bounded whatever runs beside it, drops and unreadable processes are counted, delivery
//! resumes when the endpoint comes back. Then `kill -9` mid-interval leaves no BPF program, map or link behind, and a
//! new agent starts cleanly. Separately: a Docker daemon restart brings the container targets
//! back, and a corrupt config file is an exit 2 with the cause, never a panic.
//!
//! Root is needed (BPF, mounts, dockerd); under `CI=true` a missing prerequisite fails.

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{http::*, receiver::*, *};
use profiler_agent::symbolize::DEFAULT_SYMBOL_MEMORY_LIMIT;

const SHOW_UP: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(120);
/// RSS may grow this much over the outage once the agent has warmed up, besides what the
/// symbol memory budget still had room for: queues are bounded by `queue_size` batches of a
/// few KiB, so anything near this is a leak. The symbol budget (`symbol_memory_limit`, at its
/// default here) fills as the agent meets new binaries, whatever runs on the host: that part
/// of the growth is bounded by the budget, not by this.
const RSS_GROWTH_LIMIT_KIB: u64 = 8 * 1024;

/// A mount removed on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A small tmpfs at `at`, filled until the next write fails with ENOSPC.
fn full_tmpfs(at: &Path) -> Mounted {
    std::fs::create_dir_all(at).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(at),
    );
    let mounted = Mounted(at.to_owned());
    let filler = vec![0u8; 4096];
    let mut f = std::fs::File::create(at.join("filler")).unwrap();
    loop {
        use std::io::Write as _;
        match f.write_all(&filler).and_then(|_| f.sync_all()) {
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    mounted
}

/// A file even root cannot read (a write-only sysfs attribute), to mount over a /proc entry.
fn unreadable_file() -> PathBuf {
    let candidates = std::fs::read_dir("/sys/bus")
        .into_iter()
        .flatten()
        .flatten()
        .map(|bus| bus.path().join("drivers_probe"))
        .chain([PathBuf::from("/sys/bus/pci/rescan")]);
    for path in candidates {
        if path.exists() && std::fs::read(&path).is_err() {
            return path;
        }
    }
    panic!("no write-only sysfs file found to make a /proc entry unreadable");
}

/// `cargo build` of the agent into a scratch target directory, in its own process group
/// (killed whole when dropped), at a lower priority than the agent.
struct CargoBuild(std::process::Child);

impl CargoBuild {
    fn start(target: &Path) -> Self {
        use std::os::unix::process::CommandExt as _;
        let child = Command::new("nice")
            .args([
                "-n",
                "10",
                env!("CARGO"),
                "build",
                "--offline",
                "-p",
                "profiler-agent",
            ])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(workspace_root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start cargo build");
        Self(child)
    }
}

impl Drop for CargoBuild {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this test created.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Ids of loaded BPF programs, maps and links, from bpftool.
fn bpf_objects(kind: &str) -> BTreeSet<u64> {
    let out = run_ok(Command::new("bpftool").args(["-j", kind, "show"]));
    let listed: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool {kind}: {e}"));
    listed
        .as_array()
        .map(|a| a.iter().filter_map(|o| o["id"].as_u64()).collect())
        .unwrap_or_default()
}

fn ours_left(before: &BTreeSet<u64>, kind: &str) -> BTreeSet<u64> {
    bpf_objects(kind).difference(before).copied().collect()
}

#[test]
fn agent_survives_outage_full_disk_unreadable_proc_exits_and_kill_9() {
    const TEST: &str = "agent_survives_outage_full_disk_unreadable_proc_exits_and_kill_9";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spin = compile_c("spin", dir.path());
    let churn = compile_c("churn", dir.path());
    // The hidden process is a copy of spin under its own name, to tell its samples apart.
    let hidden_bin = dir.path().join("hidden");
    std::fs::copy(&spin, &hidden_bin).unwrap();
    let _named = Workload::spawn(&spin, &["600"]);
    let hidden = Workload::spawn(&hidden_bin, &["600"]);
    // 50 processes a second, each burning 20 ms: most exit before the next drain.
    let _churn = Workload::spawn(&churn, &["50", "600", "20"]);

    let full = dir.path().join("full");
    let _tmpfs = full_tmpfs(&full);
    let unreadable = unreadable_file();

    let endpoint_port = free_port();
    let port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
collect_interval = "3s"
targets_only = false
[discovery.process]
refresh_interval = "2s"
[[relabel]]
source_labels = ["__meta_process_exe"]
regex = ".*/([^/]+)"
target_label = "service_name"
[write]
directory = "{full}"
queue_size = 4
[[write.endpoint]]
url = "http://127.0.0.1:{endpoint_port}"
remote_timeout = "2s"
min_backoff_period = "200ms"
max_backoff_period = "2s"
max_backoff_retries = 3
[server]
listen_address = "127.0.0.1:{port}"
"#,
            full = full.display(),
        ),
    )
    .unwrap();

    let programs_before = bpf_objects("prog");
    let maps_before = bpf_objects("map");
    let links_before = bpf_objects("link");

    // The agent in its own mount namespace, where the hidden process's maps is unreadable.
    let log = dir.path().join("agent.log");
    let script = format!(
        "mount --bind {} /proc/{}/maps && exec \"$0\" run --config \"$1\"",
        unreadable.display(),
        hidden.pid()
    );
    let mut agent = Workload(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .arg(agent())
            .arg(&config)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the agent under unshare"),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(SHOW_UP, "/ready 200", || {
        (http_get_text(port, "/ready")?.0 == 200).then_some(())
    });

    // A large Rust build runs on the host meanwhile (rustc and its big libraries get sampled
    // and symbolized too): the bound must hold whatever else the host runs.
    let build = CargoBuild::start(&dir.path().join("build-target"));

    // The outage: RSS is sampled after a warm-up, and must not grow with the failures.
    let started = Instant::now();
    let mut warm_rss = None;
    let mut peak_rss = 0;
    while started.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_secs(5));
        assert!(
            agent.0.try_wait().unwrap().is_none(),
            "agent died during the outage; log:\n{}",
            log_text()
        );
        let rss = rss_kib(agent.pid()).expect("agent RSS");
        if started.elapsed() >= Duration::from_secs(45) {
            warm_rss.get_or_insert_with(|| {
                let symbols = scrape_metrics(port)
                    .and_then(|t| metric(&t, "profiler_symbol_memory_bytes"))
                    .expect("profiler_symbol_memory_bytes");
                (rss, symbols as u64 / 1024)
            });
            peak_rss = peak_rss.max(rss);
        }
    }
    drop(build);
    let (warm_rss, warm_symbols) = warm_rss.unwrap();
    let budget_room = (DEFAULT_SYMBOL_MEMORY_LIMIT / 1024).saturating_sub(warm_symbols);
    eprintln!(
        "RSS over the outage: {warm_rss} KiB after 45 s ({warm_symbols} KiB of symbol data, \
         {budget_room} KiB of budget left), peak {peak_rss} KiB"
    );
    assert!(
        peak_rss <= warm_rss + RSS_GROWTH_LIMIT_KIB + budget_room,
        "RSS grew from {warm_rss} to {peak_rss} KiB while the endpoint was down, more than \
         {RSS_GROWTH_LIMIT_KIB} KiB plus the {budget_room} KiB the symbol budget had left"
    );

    let text = scrape_metrics(port).expect("/metrics during the outage");
    let endpoint = format!("endpoint=\"127.0.0.1:{endpoint_port}\"");
    let dropped = metric_sum(
        &text,
        "pyroscope_write_dropped_profiles_total",
        &[&endpoint],
    );
    assert!(
        dropped.unwrap_or(0.0) > 0.0,
        "no drops counted for the dead endpoint:\n{text}"
    );
    let full_disk = metric_sum(
        &text,
        "pyroscope_write_dropped_profiles_total",
        &["endpoint=\"directory\"", "reason=\"rejected\""],
    );
    assert!(
        full_disk.unwrap_or(0.0) > 0.0,
        "no drops counted for the full directory:\n{text}"
    );
    let unreadable_count = metric(&text, "profiler_processes_unreadable_total").unwrap_or(0.0);
    assert!(
        unreadable_count > 0.0,
        "unreadable and exited processes not counted:\n{text}"
    );
    assert_eq!(http_get_text(port, "/healthz").map(|r| r.0), Some(200));
    let leftovers: Vec<_> = std::fs::read_dir(&full)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "filler")
        .collect();
    eprintln!("full tmpfs holds, besides the filler: {leftovers:?}");

    // The endpoint comes back: delivery resumes, the named workload among what arrives.
    let receiver = Receiver::start_on(endpoint_port);
    receiver.wait_for(SHOW_UP, "pushes after the outage", |r| {
        pushed_series(r)
            .iter()
            .any(|s| s.labels.get("service_name").map(String::as_str) == Some("spin"))
    });
    let spin_series = pushed_series(&receiver.requests());
    let spin_profile = spin_series
        .iter()
        .filter(|s| s.labels.get("service_name").map(String::as_str) == Some("spin"))
        .flat_map(|s| &s.profiles)
        .next()
        .unwrap();
    assert!(function_names(spin_profile).contains(&"spin_inner"));
    // The hidden process is still profiled (by comm), only its frames go unnamed.
    receiver.wait_for(SHOW_UP, "the hidden process's profile", |r| {
        pushed_series(r)
            .iter()
            .any(|s| s.labels.get("service_name").map(String::as_str) == Some("hidden"))
    });
    // The short-lived processes (20 ms each, gone long before their drain) are named: their
    // mappings were read when the kernel announced their first sample. Only the children run
    // churn_work; their parent only forks.
    receiver.wait_for(SHOW_UP, "a named sample of a short-lived process", |r| {
        pushed_series(r)
            .iter()
            .flat_map(|s| &s.profiles)
            .any(|p| function_names(p).contains(&"churn_work"))
    });
    let log_now = log_text();
    assert!(!log_now.contains("panicked"), "agent log:\n{log_now}");

    // kill -9 mid-interval: a push just landed, so the next interval is under way.
    let pushes = receiver.requests().len();
    receiver.wait_for(SHOW_UP, "the next push", |r| r.len() > pushes);
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    let status = wait_until(SHOW_UP, "agent gone after kill -9", || {
        agent.0.try_wait().unwrap()
    });
    eprintln!("agent after kill -9: {status:?}");
    // The kernel frees programs and maps once the last fd is closed, after an RCU grace
    // period, so give it a moment.
    wait_until(
        Duration::from_secs(10),
        "no BPF program, map or link left by the killed agent",
        || {
            let left = [
                ours_left(&programs_before, "prog"),
                ours_left(&maps_before, "map"),
                ours_left(&links_before, "link"),
            ];
            left.iter().all(BTreeSet::is_empty).then_some(())
        },
    );

    // A new agent starts cleanly and delivers.
    let log2 = dir.path().join("agent2.log");
    let mut second = Workload::run_agent(&config, &log2);
    wait_until(SHOW_UP, "restarted agent ready", || {
        (http_get_text(port, "/ready")?.0 == 200).then_some(())
    });
    let pushes = receiver.requests().len();
    receiver.wait_for(SHOW_UP, "pushes from the restarted agent", |r| {
        r.len() > pushes
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(second.pid() as i32, libc::SIGTERM) };
    let status = wait_until(SHOW_UP, "restarted agent exits on SIGTERM", || {
        second.0.try_wait().unwrap()
    });
    let log2_text = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(status.success(), "exit {status:?}; log:\n{log2_text}");
    assert!(!log2_text.contains("panicked"), "{log2_text}");
    wait_until(
        Duration::from_secs(10),
        "no BPF program left after SIGTERM",
        || ours_left(&programs_before, "prog").is_empty().then_some(()),
    );
}

#[test]
fn corrupt_config_files_exit_2_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 5] = [
        ("binary", &[0xff, 0xfe, 0x00, 0x9c, 0x80, 0x01], "UTF-8"),
        ("truncated", b"collect_interval = \"15", "collect_interval"),
        ("wrong type", b"sample_rate = \"fast\"\n", "sample_rate"),
        (
            "table for a value",
            b"[collect_interval]\nx = 1\n",
            "collect_interval",
        ),
        (
            "duplicate key",
            b"sample_rate = 97\nsample_rate = 99\n",
            "sample_rate",
        ),
    ];
    for (what, bytes, named) in cases {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, bytes).unwrap();
        for command in ["check-config", "run"] {
            let out = Command::new(agent())
                .args([command, "--config"])
                .arg(&path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what} ({command}): {stderr}");
            assert!(
                stderr.contains(named) && !stderr.contains("panicked"),
                "{what} ({command}): the error should name {named:?}:\n{stderr}"
            );
        }
    }
    // A config path that is a directory, and one that does not exist.
    for path in [dir.path().to_owned(), dir.path().join("missing.toml")] {
        let out = Command::new(agent())
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", path.display());
        assert!(
            stderr.contains(&*path.to_string_lossy()) && !stderr.contains("panicked"),
            "{}: {stderr}",
            path.display()
        );
    }
}

#[test]
fn docker_restart_brings_container_targets_back() {
    const TEST: &str = "docker_restart_brings_container_targets_back";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(mut docker) = SpinImage::import(dir.path(), "profiler-faults-test") else {
        return;
    };
    let name = format!("profiler-faults-{}", docker.nonce);
    let image = docker.image.clone();
    let _guard = ContainerGuard {
        container: name.clone(),
        image: image.clone(),
    };
    docker_ok(&[
        "run",
        "-d",
        "--restart",
        "always",
        "--network",
        "none",
        "--name",
        &name,
        &image,
        "/spin",
        "3600",
    ]);
    let container_pid = || docker_ok(&["inspect", "-f", "{{.State.Pid}}", &name]);
    let pid_before = container_pid();

    let receiver = Receiver::start();
    let port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
collect_interval = "3s"
[discovery.docker]
refresh_interval = "1h"
[[write.endpoint]]
url = "{url}"
[server]
listen_address = "127.0.0.1:{port}"
"#,
            url = receiver.url(),
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let mut agent = Workload::run_agent(&config, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let pushed_with_spin = |r: &[Request]| {
        pushed_series(r).iter().any(|s| {
            s.labels.get("service_name") == Some(&name)
                && s.profiles
                    .iter()
                    .any(|p| function_names(p).contains(&"spin_inner"))
        })
    };
    receiver.wait_for(SHOW_UP, "the container's profile", pushed_with_spin);

    if !docker.daemon.stop() {
        let why = "dockerd runs but was neither started by this test nor by systemd: \
                   cannot restart it";
        assert!(!in_ci(), "{why}");
        eprintln!("SKIPPED {TEST}: {why}");
        return;
    }
    // Down for a few discovery reconnection attempts: the agent stays up.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "agent died with dockerd down; log:\n{}",
        log_text()
    );
    docker.daemon.start();
    wait_until(SHOW_UP, "the restart-always container runs again", || {
        let pid = container_pid();
        (pid != "0" && pid != pid_before).then_some(pid)
    });
    // Profiles of the old process may still be in flight: only a push that starts after the
    // restart counts.
    std::thread::sleep(Duration::from_secs(4));
    let mark = receiver.requests().len();
    receiver.wait_for(SHOW_UP, "the container's profile after the restart", |r| {
        r.len() > mark && pushed_with_spin(&r[mark..])
    });
    wait_until(SHOW_UP, "one active target again", || {
        let text = scrape_metrics(port)?;
        (metric(&text, "pyroscope_ebpf_active_targets")? >= 1.0).then_some(())
    });
    let text = log_text();
    assert!(!text.contains("panicked"), "{text}");
}
