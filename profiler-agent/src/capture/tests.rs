use std::{fs, net::SocketAddr};

use crate::profile::BuiltProfile;

use prometheus_client::registry::Registry;

use super::*;

fn listen(addr: &str) -> SocketAddr {
    addr.parse().unwrap()
}

#[test]
fn a_public_address_needs_a_token() {
    let enabled = CaptureConfig {
        enabled: true,
        ..CaptureConfig::default()
    };
    assert_eq!(
        enabled.token(listen("127.0.0.1:4100")).unwrap().map(|_| ()),
        None
    );
    assert_eq!(
        enabled.token(listen("[::1]:4100")).unwrap().map(|_| ()),
        None
    );
    let (field, reason) = enabled.token(listen("0.0.0.0:4100")).unwrap_err();
    assert_eq!(field, "capture.bearer_token");
    assert!(reason.contains("0.0.0.0:4100"), "{reason}");
    // Disabled, nothing is served, so nothing is required.
    assert!(
        CaptureConfig::default()
            .token(listen("0.0.0.0:4100"))
            .is_ok()
    );

    let with_token = CaptureConfig {
        bearer_token: Some(Secret::new("t0ken")),
        ..enabled.clone()
    };
    let token = with_token.token(listen("0.0.0.0:4100")).unwrap().unwrap();
    assert_eq!(token.expose(), "t0ken");
}

#[test]
fn token_file_empty_token_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    fs::write(&file, "from-file\n").unwrap();
    let from_file = CaptureConfig {
        enabled: true,
        bearer_token_file: Some(file.clone()),
        ..CaptureConfig::default()
    };
    let token = from_file.token(listen("10.0.0.1:4100")).unwrap().unwrap();
    assert_eq!(token.expose(), "from-file");

    let missing = CaptureConfig {
        bearer_token_file: Some(dir.path().join("absent")),
        ..from_file.clone()
    };
    assert_eq!(
        missing.token(listen("10.0.0.1:4100")).unwrap_err().0,
        "capture.bearer_token_file"
    );
    let both = CaptureConfig {
        bearer_token: Some(Secret::new("x")),
        ..from_file.clone()
    };
    assert_eq!(
        both.token(listen("10.0.0.1:4100")).unwrap_err().0,
        "capture.bearer_token_file"
    );
    let empty = CaptureConfig {
        bearer_token: Some(Secret::new("")),
        enabled: true,
        ..CaptureConfig::default()
    };
    assert_eq!(
        empty.token(listen("10.0.0.1:4100")).unwrap_err().0,
        "capture.bearer_token"
    );
    let zero = CaptureConfig {
        max_concurrent: 0,
        ..CaptureConfig::default()
    };
    assert_eq!(
        zero.token(listen("127.0.0.1:1")).unwrap_err().0,
        "capture.max_concurrent"
    );
}

/// A fake /proc with three processes and a kernel thread.
fn fake_proc() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let add = |pid: u32, cmdline: &[u8], ticks: (u64, u64)| {
        let dir = root.path().join(pid.to_string());
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("cmdline"), cmdline).unwrap();
        // Fields after the `)`: state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime ...
        fs::write(
            dir.join("stat"),
            format!(
                "{pid} (a) b) S 1 1 1 0 -1 0 0 0 0 0 {} {} 0 0 20 0 1 0 100 1000 10",
                ticks.0, ticks.1
            ),
        )
        .unwrap();
    };
    add(10, b"java\0-jar\0app.jar\0", (5, 5));
    add(11, b"java\0-jar\0other.jar\0", (50, 1));
    add(12, b"/usr/bin/python3\0server.py\0", (1, 1));
    add(13, b"", (100, 100));
    fs::create_dir(root.path().join("self")).unwrap();
    root
}

#[test]
fn command_regex_picks_the_busiest_match() {
    let root = fake_proc();
    let re = |s: &str| Regex::new(s).unwrap();
    assert_eq!(find_by_command(root.path(), &re("^java ")).unwrap(), 11);
    assert_eq!(find_by_command(root.path(), &re("app\\.jar$")).unwrap(), 10);
    assert_eq!(
        find_by_command(root.path(), &re("python3 server")).unwrap(),
        12
    );
    assert!(matches!(
        find_by_command(root.path(), &re("^nothing")),
        Err(CaptureError::NoProcess)
    ));
    // The kernel thread's empty command line matches nothing, even an empty regex.
    assert_eq!(find_by_command(root.path(), &re("")).unwrap(), 11);
}

#[test]
fn slots_are_bounded_and_given_back() {
    let mut registry = Registry::default();
    let metrics = Arc::new(AgentMetrics::register(&mut registry));
    let (jobs, _rx) = mpsc::channel();
    let capturer = Capturer::new(2, true, true, jobs, metrics);
    let a = capturer.take_slot().unwrap();
    let _b = capturer.take_slot().unwrap();
    assert!(matches!(
        capturer.take_slot(),
        Err(CaptureError::Busy { limit: 2 })
    ));
    drop(a);
    assert!(capturer.take_slot().is_ok());
}

#[test]
fn a_missing_pid_is_not_found() {
    let mut registry = Registry::default();
    let metrics = Arc::new(AgentMetrics::register(&mut registry));
    let (jobs, _rx) = mpsc::channel();
    let mut capturer = Capturer::new(1, true, true, jobs, metrics);
    let root = fake_proc();
    capturer.proc_root = root.path().to_owned();
    assert_eq!(capturer.find(&Selector::Pid(12)).unwrap(), 12);
    assert!(matches!(
        capturer.find(&Selector::Pid(99)),
        Err(CaptureError::NoProcess)
    ));
}

/// A child process (this test binary again) with `threads` threads: one spinning, the rest
/// parked. It prints `ready` once they all exist and exits when its stdin closes.
struct ThreadedChild(std::process::Child);

impl ThreadedChild {
    fn start(threads: usize) -> Self {
        use std::io::BufRead as _;
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "capture::tests::threaded_child", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env("CAPFIX_THREADS", threads.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        // Killed and waited for on drop, also when it never gets ready.
        let mut this = Self(command.spawn().unwrap());
        let out = std::io::BufReader::new(this.0.stdout.take().unwrap());
        for line in out.lines() {
            // The harness prints `test ... ` on the same line first.
            if line.unwrap().ends_with("ready") {
                return this;
            }
        }
        panic!("the threaded child never got ready");
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ThreadedChild {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of [`ThreadedChild`]; does nothing when run on its own.
#[test]
#[ignore = "run by ThreadedChild in a child process"]
fn threaded_child() {
    let Some(threads) = std::env::var("CAPFIX_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
    else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let spin = stop.clone();
    let spawn = || std::thread::Builder::new().stack_size(64 << 10);
    let mut handles = vec![
        spawn()
            .spawn(move || {
                let mut x = 0u64;
                while !spin.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
            .unwrap(),
    ];
    for _ in 1..threads {
        let parked = stop.clone();
        handles.push(
            spawn()
                .spawn(move || {
                    while !parked.load(Ordering::Relaxed) {
                        std::thread::park();
                    }
                })
                .unwrap(),
        );
    }
    println!("ready");
    let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.thread().unpark();
        h.join().unwrap();
    }
}

/// Captures `child` for a second; returns the samples and the most descriptors this process
/// had open during the capture above what it had before.
fn capture_counting_fds(capturer: &Capturer, child: &ThreadedChild) -> Option<(u64, usize)> {
    let before = events::open_fds();
    let done = AtomicBool::new(false);
    let mut peak = before;
    let result = std::thread::scope(|s| {
        let capture = s.spawn(|| {
            let r = capturer.capture(child.pid(), Duration::from_millis(1500), 99, "manual");
            done.store(true, Ordering::SeqCst);
            r
        });
        while !done.load(Ordering::SeqCst) {
            peak = peak.max(events::open_fds());
            std::thread::sleep(Duration::from_millis(5));
        }
        capture.join().unwrap()
    });
    match result {
        Ok(built) => Some((built.total_samples, peak.saturating_sub(before))),
        Err(CaptureError::Bpf(BpfError::MissingPrivilege)) => None,
        Err(e) => panic!("capture failed: {e}"),
    }
}

fn thread_limit_count(metrics: &AgentMetrics, action: &str) -> u64 {
    metrics
        .capture_thread_limit
        .get_or_create(&crate::metrics::ActionLabel {
            action: action.into(),
        })
        .get()
}

/// A capturer whose recordings come back as profiles holding only the sample count.
fn counting_capturer() -> (Capturer, Arc<AgentMetrics>) {
    let mut registry = Registry::default();
    let metrics = Arc::new(AgentMetrics::register(&mut registry));
    let (jobs, rx) = mpsc::channel::<SymbolizeJob>();
    std::thread::spawn(move || {
        for job in rx {
            let _ = job.reply.send(BuiltProfile {
                profile: Default::default(),
                top_self: Vec::new(),
                total_samples: job.recording.total_samples(),
            });
        }
    });
    (
        Capturer::new(2, true, false, jobs, metrics.clone()),
        metrics,
    )
}

#[test]
fn a_process_with_thousands_of_threads_stays_under_the_descriptor_cap() {
    let (capturer, metrics) = counting_capturer();
    let cpus = aya::util::online_cpus().unwrap().len();

    // Below the limit: one event per thread, so the descriptors follow the thread count.
    let small = ThreadedChild::start(200);
    let Some((samples, extra)) = capture_counting_fds(&capturer, &small) else {
        eprintln!("skipped: loading eBPF needs root");
        return;
    };
    drop(small);
    eprintln!("200 threads: {samples} samples, {extra} more descriptors at the peak");
    assert!(samples > 0);
    assert!(extra >= 200, "{extra}");
    assert_eq!(thread_limit_count(&metrics, "per_cpu"), 0);

    // 3000 threads: over the per-capture limit, sampled per CPU with the pid filter.
    let big = ThreadedChild::start(3000);
    let (samples, extra) = capture_counting_fds(&capturer, &big).unwrap();
    eprintln!(
        "3000 threads: {samples} samples, {extra} more descriptors at the peak ({cpus} CPUs)"
    );
    assert!(samples > 0, "the spinning thread was sampled");
    assert!(extra < events::MAX_THREAD_EVENTS_PER_CAPTURE, "{extra}");
    // The CPU events and the BPF maps, with room for other tests' files.
    assert!(extra <= cpus + 100, "{extra}");
    assert_eq!(thread_limit_count(&metrics, "per_cpu"), 1);
    assert_eq!(
        capturer.events.in_use(),
        0,
        "the reservation was given back"
    );
}

#[test]
fn no_descriptors_left_is_a_clear_error() {
    let (mut capturer, metrics) = counting_capturer();
    capturer.events = events::EventBudget::new(0);
    let Err(err) = capturer.capture(std::process::id(), Duration::from_millis(200), 99, "manual")
    else {
        panic!("a capture without descriptors ran");
    };
    assert!(matches!(err, CaptureError::NoDescriptors { .. }), "{err}");
    assert!(err.to_string().contains("descriptors"), "{err}");
    assert_eq!(thread_limit_count(&metrics, "refused"), 0);
}
