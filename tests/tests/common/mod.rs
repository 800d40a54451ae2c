//! Shared pieces of the end-to-end tests: root checks that fail in CI instead of skipping,
//! building the agent and the C fixtures, running `record`, and reading its pprof output.
#![allow(dead_code)]

pub mod docker;
pub mod hostile;
pub mod http;
pub mod receiver;
pub mod webdriver;

// Not every test binary uses Docker (as with `dead_code` above).
#[allow(unused_imports)]
pub use docker::*;

use std::{
    collections::HashMap,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub use profiler_agent::profile::pprof::Profile;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// True when the test may run; false (with a note) when it must be skipped on a developer
/// machine. Under `CI=true` a missing prerequisite is a failure, never a skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: eBPF tests need root and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root");
    false
}

/// The agent binary: `PROFILER_AGENT_BIN` when set (`cargo xtask test` builds the agent
/// before any test starts and sets it), never building then; otherwise built here once per
/// test binary, on first use (a bare `cargo test`).
pub fn agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        if let Some(path) = std::env::var_os("PROFILER_AGENT_BIN") {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "PROFILER_AGENT_BIN={} is not a file",
                path.display()
            );
            return path;
        }
        let mut cargo = Command::new(env!("CARGO"));
        // cargo sets these for the test (this package's name, directory, ...). ring tracks
        // some of them, so passing them on would rebuild ring and everything above it (the
        // agent included) here, and again on the next `cargo test`: a minute each time.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&&*name)
            {
                cargo.env_remove(&*name);
            }
        }
        let status = cargo
            .args([
                "build",
                "--quiet",
                "-p",
                "profiler-agent",
                "--bin",
                "profiler-agent",
            ])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building profiler-agent failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        target.join("debug/profiler-agent")
    })
}

/// Compiles `tests/fixtures/<name>.c` with frame pointers into `dir`.
pub fn compile_c(name: &str, dir: &Path) -> PathBuf {
    let source = workspace_root().join(format!("tests/fixtures/{name}.c"));
    let out = dir.join(name);
    let status = Command::new("gcc")
        .args([
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-inline",
            "-pthread",
            "-o",
        ])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc {name}.c failed");
    out
}

/// A child process killed when dropped.
pub struct Workload(pub Child);

impl Workload {
    pub fn start(binary: &Path, args: &[&str]) -> Self {
        let child = Command::new(binary)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start workload");
        // Highest priority, so the workload keeps its CPU and the sampling-rate checks see a
        // steady workload even if something else runs on the machine.
        // SAFETY: setpriority on our own child; failure (not root) only loses the boost.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, child.id(), -20) };
        // Let it reach its steady loop before sampling starts.
        std::thread::sleep(std::time::Duration::from_millis(200));
        Workload(child)
    }

    /// At normal priority and without waiting: a process that only has to exist, or that
    /// must not starve the agent (two nice -20 busy loops on two CPUs would).
    pub fn spawn(binary: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Self {
        let binary = binary.as_ref();
        Workload(
            Command::new(binary)
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.to_string_lossy())),
        )
    }

    /// `profiler-agent run --config <config>` at info level, its stderr into `log`.
    pub fn run_agent(config: &Path, log: &Path) -> Self {
        Workload(
            Command::new(agent())
                .args(["run", "--config"])
                .arg(config)
                .env("RUST_LOG", "info")
                .stderr(std::fs::File::create(log).expect("create the agent log"))
                .spawn()
                .expect("start the agent"),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Result of one `profiler-agent record` run.
pub struct Recorded {
    pub output: Output,
    pub profile: Profile,
    pub counters: HashMap<String, u64>,
}

impl Recorded {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn errors(&self) -> u64 {
        const ERRORS: [&str; 8] = [
            "user_stack_collision",
            "user_stack_map_full",
            "user_stack_read",
            "kernel_stack_collision",
            "kernel_stack_map_full",
            "kernel_stack_read",
            "counts_map_full",
            "task_read",
        ];
        ERRORS.iter().map(|e| self.counters[*e]).sum()
    }
}

pub fn record_command(args: &[&str], output: &Path) -> Command {
    let mut cmd = Command::new(agent());
    cmd.arg("record").args(args).arg("--output").arg(output);
    cmd
}

/// Runs `record` to completion and reads back its profile and counters.
pub fn record(args: &[&str], output: &Path) -> Recorded {
    let out = record_command(args, output).output().expect("run record");
    finish_record(out, output)
}

/// Nanoseconds all threads of `pid` have spent on a CPU (/proc/PID/task/*/schedstat).
pub fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// A record run together with how long `workload` was on a CPU during its sampling window:
/// from record's `recording` line (printed once attached) to its `sampling stopped` line.
/// Samples are expected at 97 Hz of CPU time, whatever else loads the machine.
pub fn record_with_cpu(args: &[&str], output: &Path, workload: u32) -> (Recorded, f64) {
    spawn_record_with_cpu(args, output, workload).finish()
}

pub struct RunningRecord {
    child: Child,
    reader: std::thread::JoinHandle<(String, Option<u64>, Option<u64>)>,
    output: PathBuf,
}

pub fn spawn_record_with_cpu(args: &[&str], output: &Path, workload: u32) -> RunningRecord {
    use std::io::BufRead as _;
    let mut child = record_command(args, output)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn record");
    let stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let (mut text, mut start, mut end) = (String::new(), None, None);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("recording ") {
                start = Some(cpu_ns(workload));
            } else if line.starts_with("sampling stopped") {
                end = Some(cpu_ns(workload));
            }
            text.push_str(&line);
            text.push('\n');
        }
        (text, start, end)
    });
    RunningRecord {
        child,
        reader,
        output: output.to_owned(),
    }
}

impl RunningRecord {
    pub fn finish(mut self) -> (Recorded, f64) {
        let mut stdout = Vec::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_end(&mut stdout).expect("read stdout");
        }
        let status = self.child.wait().expect("wait for record");
        let (text, start, end) = self.reader.join().expect("stderr reader");
        let recorded = finish_record(
            Output {
                status,
                stdout,
                stderr: text.clone().into_bytes(),
            },
            &self.output,
        );
        let (Some(start), Some(end)) = (start, end) else {
            panic!("record printed no recording/sampling stopped lines:\n{text}");
        };
        (recorded, end.saturating_sub(start) as f64 / 1e9)
    }
}

pub fn finish_record(out: Output, output: &Path) -> Recorded {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "record failed: {stderr}");
    let counters = stderr
        .lines()
        .find_map(|l| l.strip_prefix("counters: "))
        .unwrap_or_else(|| panic!("no counters line in: {stderr}"))
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_owned(), v.parse().expect("number"))
        })
        .collect();
    Recorded {
        output: out,
        profile: read_profile(output),
        counters,
    }
}

/// The profiles the directory sink wrote into `dir`, oldest window first (none if `dir` does
/// not exist yet).
pub fn written_profiles(dir: &Path) -> Vec<Profile> {
    let mut profiles: Vec<Profile> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| e.expect("read the profiles directory").path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".pb.gz") && !n.starts_with('.'))
        })
        .map(|path| read_profile(&path))
        .collect();
    profiles.sort_by_key(|p| p.time_nanos);
    profiles
}

pub fn read_profile(path: &Path) -> Profile {
    let gz = std::fs::read(path).expect("read profile");
    profiler_tests::decode::gzip_pprof(&gz).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Function names of a sample's stack, leaf first (one per location line).
pub fn stack_names<'a>(
    p: &'a Profile,
    sample: &profiler_agent::profile::pprof::Sample,
) -> Vec<&'a str> {
    sample
        .location_id
        .iter()
        .flat_map(|&id| {
            let loc = p.location.iter().find(|l| l.id == id).expect("location");
            loc.line.iter().map(|line| {
                let f = p
                    .function
                    .iter()
                    .find(|f| f.id == line.function_id)
                    .expect("function");
                p.string_table[f.name as usize].as_str()
            })
        })
        .collect()
}

pub fn mapping_name(p: &Profile, location_id: u64) -> Option<&str> {
    let loc = p.location.iter().find(|l| l.id == location_id)?;
    let m = p.mapping.iter().find(|m| m.id == loc.mapping_id)?;
    Some(p.string_table[m.filename as usize].as_str())
}

pub fn total_samples(p: &Profile) -> i64 {
    p.sample.iter().map(|s| s.value[0]).sum()
}

pub fn label_num(
    p: &Profile,
    s: &profiler_agent::profile::pprof::Sample,
    key: &str,
) -> Option<i64> {
    s.label
        .iter()
        .find(|l| p.string_table[l.key as usize] == key)
        .map(|l| l.num)
}

pub fn label_str<'a>(
    p: &'a Profile,
    s: &profiler_agent::profile::pprof::Sample,
    key: &str,
) -> Option<&'a str> {
    s.label
        .iter()
        .find(|l| p.string_table[l.key as usize] == key)
        .map(|l| p.string_table[l.str as usize].as_str())
}

/// `go tool pprof -raw` on the file: the independent reader. Returns its output.
pub fn go_pprof_raw(path: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(path)
        .env(
            "HOME",
            std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        )
        .output()
        .expect("run go tool pprof (install golang-go: cargo xtask setup)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof -raw rejected {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Polls `probe` every 200 ms until it gives a value; fails the test after `within`.
pub fn wait_until<T>(within: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True under `CI=true`, where a missing prerequisite fails a test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Absolute path of `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(name)
}

/// Runs `cmd` to completion and returns its output; panics with its stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A process's resident set size in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Prints the agent's log when the test fails, before its directory goes.
pub struct ShowLogOnPanic(pub PathBuf);

impl Drop for ShowLogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("--- agent log ---\n{log}");
        }
    }
}

/// `profiler-agent run` with a config of the test's, its server on a free port of
/// 127.0.0.1: killed when dropped, its log shown if the test fails.
pub struct Agent {
    _show_log: ShowLogOnPanic,
    pub process: Workload,
    pub port: u16,
    pub log: PathBuf,
}

impl Agent {
    /// Writes `dir/agent.toml`, `config` followed by a `[server]` table with the port, and
    /// starts the agent with its log in `dir/agent.log`; does not wait.
    pub fn start(dir: &Path, config: &str) -> Self {
        let port = free_port();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            format!("{config}\n[server]\nlisten_address = \"127.0.0.1:{port}\"\n"),
        )
        .unwrap();
        let log = dir.join("agent.log");
        Self {
            process: Workload::run_agent(&path, &log),
            _show_log: ShowLogOnPanic(log.clone()),
            port,
            log,
        }
    }

    /// [`Agent::start`], then waits until `/ready` answers 200.
    pub fn start_ready(dir: &Path, config: &str) -> Self {
        let agent = Self::start(dir, config);
        wait_until(Duration::from_secs(30), "agent ready", || {
            (http::http_get(agent.port, "/ready", None)?.0 == 200).then_some(())
        });
        agent
    }
}
