//! The agent against the processes it profiles (issue 14), end to end with real eBPF: one
//! daemon profiles a normal busy process next to hostile ones, each attacking one thing the
//! agent reads or writes:
//! - a FIFO where a stripped binary's `.gnu_debuglink` file should be (an open blocks);
//! - a chrooted process whose debug link is an absolute symlink to a host file;
//! - JIT-style processes whose `/tmp/perf-PID.map` is a symlink to `/dev/zero`, a sparse
//!   64 GiB file, a FIFO, or a real map with Java's `;` in a name;
//! - decompression bombs in `.gnu_debugdata` (xz) and in a compressed `.debug_info` (zlib),
//!   1 GiB each once inflated, and an ELF with two million symbols;
//! - a dlopen'ed `.so` and a debug file truncated to nothing after the agent loaded them;
//! - an executable named `ev"il\x<newline>;FORGED` (its service name and comm);
//! - 200 parallel `/flamegraph` requests, and an on-demand capture of a 5 000-thread process.
//!
//! Checked throughout: `/healthz` answers 200, RSS stays under [`RSS_LIMIT_KIB`], the open
//! fds under [`FD_LIMIT`]. At the end: the normal process was profiled at the expected rate,
//! no host symbols leaked into the jailed process's profile, `promtool check metrics`
//! accepts `/metrics`, the flame graphs hold one frame where a name has `;`, the causes are
//! counted in metrics, and SIGTERM ends the agent with 0 within 15 s.
//!
//! Root is needed (BPF, chroot); under `CI=true` a missing prerequisite fails.

mod common;

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{hostile::*, http::*, receiver::*, *};

const SHOW_UP: Duration = Duration::from_secs(120);
const TOKEN: &str = "hostile-test-token";
/// The agent's peak RSS while all of this goes on: the symbol memory budget (64 MiB by
/// default) plus what a debug build of the agent needs for everything else.
const RSS_LIMIT_KIB: u64 = 192 * 1024;
/// Open fds at any time, a 5 000-thread capture included: a capture holds at most 1024
/// thread events (past that, one event per CPU filtered by pid), plus the agent's own.
const FD_LIMIT: usize = 1536;
/// A name with every character that breaks a format: a quote and a backslash (Prometheus
/// label values), a newline (text formats, folded stacks) and `;` (folded stack frames).
const WEIRD: &str = "ev\"il\\x\n;FORGED";

/// The agent's health, RSS and fds, polled in the background.
#[derive(Default)]
struct Observed {
    polls: u64,
    healthz_failures: Vec<String>,
    peak_rss_kib: u64,
    max_fds: usize,
}

struct Monitor {
    stop: Arc<AtomicBool>,
    observed: Arc<Mutex<Observed>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(pid: u32, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let observed = Arc::new(Mutex::new(Observed::default()));
        let thread = {
            let (stop, observed) = (stop.clone(), observed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let health = http_get_within(port, "/healthz", None, Duration::from_secs(10));
                    let rss = rss_kib(pid).unwrap_or(0);
                    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                        .map(|d| d.count())
                        .unwrap_or(0);
                    let mut o = observed.lock().unwrap();
                    o.polls += 1;
                    match health {
                        Some((200, _)) => {}
                        other => o
                            .healthz_failures
                            .push(format!("{:?}", other.map(|(status, _)| status))),
                    }
                    o.peak_rss_kib = o.peak_rss_kib.max(rss);
                    o.max_fds = o.max_fds.max(fds);
                    drop(o);
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        Self {
            stop,
            observed,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Observed {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.observed.lock().unwrap())
    }
}

/// A hostile process at the lowest priority, so a dozen of them leave the agent and the
/// normal workload their CPU.
fn nice(program: &Path, args: &[&str]) -> Workload {
    let mut all = vec!["-n", "19", program.to_str().unwrap()];
    all.extend_from_slice(args);
    Workload(
        Command::new("nice")
            .args(&all)
            .stdout(Stdio::null())
            .spawn()
            .expect("start a hostile process"),
    )
}

/// The function names of every pushed profile of `service`, and their sample count.
fn pushed(receiver: &Receiver, service: &str) -> (Vec<String>, i64) {
    let series = pushed_series(&receiver.requests());
    let profiles: Vec<_> = series
        .iter()
        .filter(|s| s.labels.get("service_name").map(String::as_str) == Some(service))
        .flat_map(|s| &s.profiles)
        .collect();
    let names = profiles
        .iter()
        .flat_map(|p| function_names(p).into_iter().map(str::to_owned))
        .collect();
    (names, profiles.iter().map(|p| total_samples(p)).sum())
}

fn scrape(port: u16) -> String {
    scrape_metrics(port).expect("/metrics answers 200")
}

fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (install prometheus: cargo xtask setup)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // promtool exits 3 for lint warnings (naming advice), 1 for a scrape it cannot parse.
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.code() != Some(1) && !said.contains("error while linting"),
        "promtool rejects /metrics ({:?}): {said}",
        out.status
    );
}

/// The `<title>` texts of an inferno SVG: one per frame box.
fn svg_titles(svg: &str) -> Vec<&str> {
    svg.split("<title>")
        .skip(1)
        .filter_map(|t| t.split_once("</title>").map(|(t, _)| t))
        .collect()
}

#[test]
fn hostile_processes_neither_hang_crash_bloat_nor_mislead_the_agent() {
    const TEST: &str = "hostile_processes_neither_hang_crash_bloat_nor_mislead_the_agent";
    if !require_root(TEST) {
        return;
    }
    // Built first: a build beside a dozen busy processes takes many minutes.
    agent();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let started = Instant::now();

    // The hostile files.
    let fifodbg = fifo_debuglink(d);
    let (jail, host_debug) = jailed_with_host_link(d);
    let xzbomb = debugdata_bomb(d);
    let zbomb = compressed_dwarf_bomb(d);
    let manysyms = many_symbols(d, 2_000_000);
    let dbgtrunc = spin_variant(d, "dbgtrunc", false);
    let dbgtrunc_debug = d.join("dbgtrunc.debug");
    split_debug(&dbgtrunc, &dbgtrunc_debug);
    let (dlopen_main, libhot) = dlopen_pair(d);
    let weird = d.join(WEIRD);
    std::fs::copy(spin_variant(d, "weird", false), &weird).unwrap();
    let anonjit = plain_fixture("anonjit", d);
    let threads = plain_fixture("threads", d);
    let jits: Vec<_> = ["zero", "sparse", "fifo", "names"]
        .iter()
        .map(|mode| {
            let path = d.join(format!("jit-{mode}"));
            std::fs::copy(&anonjit, &path).unwrap();
            (*mode, path)
        })
        .collect();

    eprintln!("hostile files built in {:.1?}", started.elapsed());

    // The processes: the normal one at high priority, the hostile ones at the lowest.
    let spin = Workload::start(&compile_c("spin", d), &["3600"]);
    let mut hostile = vec![
        nice(&fifodbg, &["3600"]),
        nice(&xzbomb, &["3600"]),
        nice(&zbomb, &["3600"]),
        nice(&manysyms, &["3600"]),
        nice(&dbgtrunc, &["3600"]),
        nice(&weird, &["3600"]),
    ];
    hostile.push(Workload(
        Command::new("nice")
            .args(["-n", "19", "chroot"])
            .arg(&jail)
            .args(["/jailed", "3600"])
            .spawn()
            .expect("chroot"),
    ));
    let mut perf_maps = PerfMaps(Vec::new());
    for (mode, path) in &jits {
        let jit = nice(path, &[mode, "3600"]);
        perf_maps.0.push(jit.pid());
        hostile.push(jit);
    }
    let dlopen = nice(&dlopen_main, &[libhot.to_str().unwrap(), "3600"]);
    // At a middle priority: its main thread must run while it is captured.
    let many_threads = Workload(
        Command::new("nice")
            .args(["-n", "10"])
            .arg(&threads)
            .args(["5000", "3600"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the threads fixture"),
    );
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child (through nice, which exec'd it).
    unsafe { libc::kill(dlopen.pid() as i32, libc::SIGUSR1) };

    let receiver = Receiver::start();
    let port = free_port();
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
collect_interval = "3s"
targets_only = false
comm = "both"
[discovery.process]
refresh_interval = "2s"
[[relabel]]
source_labels = ["__meta_process_exe"]
regex = "(?s).*/([^/]+)"
target_label = "service_name"
[[write.endpoint]]
url = "{url}"
[server]
listen_address = "127.0.0.1:{port}"
[capture]
enabled = true
bearer_token = "{TOKEN}"
"#,
            url = receiver.url(),
        ),
    )
    .unwrap();
    let log = d.join("agent.log");
    let mut agent = Workload::run_agent(&config, &log);
    let _show_log = ShowLogOnPanic(log.clone());
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(SHOW_UP, "/ready 200", || {
        (http_get_text(port, "/ready")?.0 == 200).then_some(())
    });
    let monitor = Monitor::start(agent.pid(), port);

    // The library and the debug file are loaded (their functions named), then truncated.
    let named =
        |service: &str, function: &str| pushed(&receiver, service).0.iter().any(|n| n == function);
    let waited = Instant::now();
    while !(named("dlopen_main", "hot_inner") && named("dbgtrunc", "spin_inner")) {
        if waited.elapsed() > SHOW_UP {
            let services: std::collections::BTreeMap<String, Vec<String>> =
                pushed_series(&receiver.requests())
                    .iter()
                    .filter_map(|s| {
                        let service = s.labels.get("service_name")?.clone();
                        let mut names: Vec<String> = s
                            .profiles
                            .iter()
                            .flat_map(|p| function_names(p).into_iter().map(str::to_owned))
                            .collect();
                        names.sort();
                        names.dedup();
                        Some((service, names))
                    })
                    .collect();
            panic!(
                "hot_inner (dlopen_main) and spin_inner (dbgtrunc) not named within {SHOW_UP:?}; pushed: {services:#?}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for truncated in [&libhot, &dbgtrunc_debug] {
        std::fs::File::options()
            .write(true)
            .open(truncated)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    eprintln!("truncated libhot.so and dbgtrunc.debug");
    // A service that goes quiet is pruned from /metrics after 5 intervals without samples
    // (ever-new names must not grow the agent's state without end).
    let quiet = hostile.remove(0);
    assert!(
        scrape(port).contains("service_name=\"fifodbg\""),
        "fifodbg is not in /metrics"
    );
    drop(quiet);
    let quiet_since = Instant::now();

    let spin_series = "pyroscope_ebpf_pprof_samples_total{service_name=\"spin\"}";
    let samples_before = metric(&scrape(port), spin_series).unwrap_or(0.0);
    let cpu_before = cpu_ns(spin.pid());

    // 200 parallel flame graph requests: answered or refused, never stalling /healthz (the
    // monitor keeps asking meanwhile).
    wait_until(SHOW_UP, "spin's flame graph", || {
        (http_get_within(
            port,
            "/flamegraph?service=spin",
            None,
            Duration::from_secs(30),
        )?
        .0 == 200)
            .then_some(())
    });
    let requests: Vec<_> = (0..200)
        .map(|_| {
            std::thread::spawn(move || {
                http_get_within(
                    port,
                    "/flamegraph?service=spin",
                    None,
                    Duration::from_secs(60),
                )
                .map(|(status, _)| status)
            })
        })
        .collect();
    let statuses: Vec<_> = requests.into_iter().map(|t| t.join().unwrap()).collect();
    let served = statuses.iter().filter(|s| **s == Some(200)).count();
    eprintln!(
        "200 parallel /flamegraph: {served} served, the rest {:?}",
        {
            let mut other: Vec<_> = statuses.iter().filter(|s| **s != Some(200)).collect();
            other.dedup();
            other
        }
    );
    assert!(
        served > 0,
        "no /flamegraph request was served: {statuses:?}"
    );

    // An on-demand capture of the 5 000-thread process: the monitor watches the fds.
    let threads_cpu_before = cpu_ns(many_threads.pid());
    let (status, body) = http_get_within(
        port,
        &format!("/v1/profile?pid={}&duration=3s", many_threads.pid()),
        Some(TOKEN),
        Duration::from_secs(60),
    )
    .expect("the capture answers");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let capture = d.join("threads.pb.gz");
    std::fs::write(&capture, &body).unwrap();
    let captured = total_samples(&read_profile(&capture)) as f64;
    let threads_cpu_s = (cpu_ns(many_threads.pid()) - threads_cpu_before) as f64 / 1e9;
    eprintln!(
        "capture of the 5 000-thread process: {captured} samples over {threads_cpu_s:.2} CPU-s"
    );
    assert!(
        captured >= 0.5 * 97.0 * threads_cpu_s - 2.0,
        "the 5 000-thread process was captured with {captured} samples over {threads_cpu_s:.2} \
         CPU-s (a capture sampling every CPU for its pid)"
    );

    // A few more intervals for everything to be drained, symbolized and pushed.
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "agent died; log:\n{}",
        log_text()
    );
    let text = wait_until(SHOW_UP, "fifodbg pruned from /metrics", || {
        let text = scrape(port);
        (!text.contains("service_name=\"fifodbg\"")).then_some(text)
    });
    eprintln!(
        "fifodbg pruned {:.1?} after it exited",
        quiet_since.elapsed()
    );
    let samples = metric(&text, spin_series).unwrap_or(0.0) - samples_before;
    let cpu_s = (cpu_ns(spin.pid()) - cpu_before) as f64 / 1e9;
    let rate = samples / cpu_s;
    eprintln!("spin: {samples} samples over {cpu_s:.1} CPU-s: {rate:.0} per CPU-second");
    assert!(
        (0.7 * 97.0..=1.3 * 97.0).contains(&rate),
        "the normal process was profiled at {rate:.0} samples per CPU-second, expected 97"
    );

    // Names: escaped in /metrics, one frame in the flame graphs, no host symbols.
    promtool_accepts(&text);
    let escaped = "service_name=\"ev\\\"il\\\\x\\n;FORGED\"";
    assert!(
        text.contains(escaped),
        "the weird service is not in /metrics as {escaped}"
    );
    let (status, svg) = http_get_within(
        port,
        &format!("/flamegraph?service={}", percent_encode(WEIRD)),
        None,
        Duration::from_secs(30),
    )
    .expect("the weird service's flame graph");
    let svg = String::from_utf8_lossy(&svg).into_owned();
    assert_eq!(status, 200, "{svg}");
    let titles = svg_titles(&svg);
    assert!(
        titles.iter().any(|t| t.contains("spin_inner")),
        "{titles:?}"
    );
    assert!(
        !titles.iter().any(|t| t.starts_with("FORGED")),
        "a name with ';' forged a frame: {titles:?}"
    );
    let (status, svg) = http_get_within(port, "/flamegraph?service=jit-names", None, SHOW_UP)
        .expect("jit-names' flame graph");
    let svg = String::from_utf8_lossy(&svg).into_owned();
    assert_eq!(status, 200, "{svg}");
    let titles = svg_titles(&svg);
    assert!(titles.iter().any(|t| t.contains("Forged")), "{titles:?}");
    assert!(
        !titles
            .iter()
            .any(|t| t.starts_with("il/Forged") || t.starts_with(".run()V")),
        "a perf map name with ';' forged a frame: {titles:?}"
    );
    let (jailed_names, jailed_samples) = pushed(&receiver, "jailed");
    assert!(jailed_samples > 0, "the jailed process was not profiled");
    assert!(
        !jailed_names.iter().any(|n| n.starts_with("spin_")),
        "names read from the host file {} leaked into the jailed process: {jailed_names:?}",
        host_debug.display()
    );
    for service in [
        "fifodbg",
        "jit-zero",
        "jit-sparse",
        "jit-fifo",
        "xzbomb",
        "zbomb",
        "manysyms",
    ] {
        let (_, samples) = pushed(&receiver, service);
        assert!(samples > 0, "{service} was not profiled");
    }

    // The causes are counted.
    let counted = |name: &str, label: &str| metric_sum(&text, name, &[label]).unwrap_or(0.0);
    for reason in ["not_regular", "too_large"] {
        assert!(
            counted(
                "profiler_unsafe_files_total",
                &format!("reason=\"{reason}\"")
            ) > 0.0,
            "no refused file counted with reason {reason}:\n{text}"
        );
    }
    assert!(
        counted("profiler_capture_thread_limit_total", "action=\"per_cpu\"") > 0.0,
        "the 5 000-thread capture was not counted as over the thread-event limit:\n{text}"
    );
    for reason in ["decompressed_too_large", "too_many_symbols"] {
        assert!(
            counted(
                "profiler_symbols_degraded_total",
                &format!("reason=\"{reason}\"")
            ) > 0.0,
            "no binary counted as degraded for {reason}:\n{text}"
        );
    }

    // SIGTERM: exit 0 within 15 s.
    let observed = monitor.finish();
    let stopping = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    let status = wait_until(Duration::from_secs(15), "agent exits on SIGTERM", || {
        agent.0.try_wait().unwrap()
    });
    eprintln!(
        "agent exited {status:?} {:.1?} after SIGTERM; {} polls, peak RSS {} KiB, max fds {}",
        stopping.elapsed(),
        observed.polls,
        observed.peak_rss_kib,
        observed.max_fds
    );
    let log_now = log_text();
    assert!(status.success(), "exit {status:?}; log:\n{log_now}");
    assert!(!log_now.contains("panicked"), "agent log:\n{log_now}");
    assert!(
        observed.healthz_failures.is_empty(),
        "/healthz failed {} of {} times: {:?}",
        observed.healthz_failures.len(),
        observed.polls,
        observed.healthz_failures
    );
    assert!(
        observed.peak_rss_kib <= RSS_LIMIT_KIB,
        "peak RSS {} KiB over the bound {RSS_LIMIT_KIB} KiB",
        observed.peak_rss_kib
    );
    assert!(
        observed.max_fds <= FD_LIMIT,
        "{} fds open at once, over {FD_LIMIT}",
        observed.max_fds
    );
    drop((hostile, dlopen, many_threads, perf_maps));
}

/// Removes the JIT fixtures' perf maps, which SIGKILL leaves behind, when dropped.
struct PerfMaps(Vec<u32>);

impl Drop for PerfMaps {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
        }
    }
}
