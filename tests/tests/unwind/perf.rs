//! Sampling one process with `profiler-agent record --pid` and, in the same window,
//! `perf record --call-graph dwarf` (perf copies 32 KiB of user stack per sample and unwinds
//! it afterwards with the binaries' `.eh_frame`: the reference), and reading perf's stacks
//! back from `perf script`.

use std::{
    io::{BufRead as _, Error, Write as _},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{
    common::{Recorded, Workload, finish_record, in_ci, record_command, run_ok},
    stacks::{self, Frame, Stack},
};

/// Whether `program` runs here (`program --version`); under CI=true a missing one fails the
/// test instead of skipping it.
pub fn require_program(test: &str, program: &str) -> bool {
    let runs = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: {program} is missing and CI=true forbids skipping (cargo xtask setup)"
    );
    eprintln!("SKIPPED {test}: {program} is missing (cargo xtask setup installs it)");
    false
}

/// One process sampled by both.
pub struct Both {
    pub rec: Recorded,
    pub ours: Vec<Stack>,
    pub perf: Vec<Stack>,
}

/// What record's stderr says about its sampling window.
enum Window {
    Started,
    Stopped,
}

/// Samples `workload` for `seconds` with `record --pid` and, over the same window, with
/// `perf record --call-graph dwarf` at the same 97 Hz: perf starts first with its events
/// disabled and is enabled when record prints `recording` (attached) and stopped when it
/// prints `sampling stopped` or `seconds` later, through perf's control FIFOs. The workload gets nice -20 once
/// record is attached and is stopped as soon as both are done, before the stacks are read.
/// Our profile goes to `dir/ours.pb.gz`.
pub fn record_beside_perf(dir: &Path, workload: Workload, seconds: u32) -> Both {
    let pid = workload.pid();
    let out = dir.join("ours.pb.gz");
    let perf_data = dir.join("perf.data");
    let mut control = PerfControl::new(dir);
    let pid_arg = pid.to_string();
    let mut perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "97"])
        .args(["--call-graph", "dwarf,32768", "-p", &pid_arg, "-o"])
        .arg(&perf_data)
        // 32 MiB of buffer, 10 s of samples: nothing lost while perf waits for a CPU on a
        // busy machine. No build-id cache in ~/.debug, no BPF events (their collection
        // takes perf a second to start).
        .args(["-m", "32M", "-N", "-B", "--no-bpf-event"])
        .args(["-D", "-1", "--control"])
        .arg(control.fifos())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start perf record");
    control.send(&mut perf, "ping");

    let duration = format!("{seconds}s");
    // Native stacks against native stacks: Python functions would stand in for CPython's
    // interpreter loop, which perf shows.
    let args = ["--pid", &pid_arg, "--duration", &duration, "--no-python"];
    let mut agent = record_command(&args, &out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn record");
    let stderr = agent.stderr.take().expect("record's stderr");
    let (window_tx, window) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("recording ") {
                let _ = window_tx.send(Window::Started);
            } else if line.starts_with("sampling stopped") {
                let _ = window_tx.send(Window::Stopped);
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let started = matches!(
        window.recv_timeout(Duration::from_secs(60)),
        Ok(Window::Started)
    );
    if started {
        // Highest priority only now: a busy loop at -20 on one of two CPUs slows perf's and
        // record's start to seconds on a loaded machine. From here on it keeps its CPU.
        // SAFETY: setpriority on our own child (its main thread, the busy one).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, -20) };
        control.send(&mut perf, "enable");
        // Until record stops sampling, and no longer than its duration: a starved record
        // may print its line late, but its window was that long.
        let _ = window.recv_timeout(Duration::from_secs(u64::from(seconds)));
    }
    control.send(&mut perf, "stop");
    let perf_out = perf.wait_with_output().expect("wait for perf record");
    let status = agent.wait().expect("wait for record");
    // Its CPU is better spent on reading the stacks.
    drop(workload);
    let text = reader.join().expect("record's stderr reader");
    assert!(started, "record never attached:\n{text}");
    assert!(
        perf_out.status.success(),
        "perf record failed ({}): {}",
        perf_out.status,
        String::from_utf8_lossy(&perf_out.stderr)
    );
    let rec = finish_record(
        Output {
            status,
            stdout: Vec::new(),
            stderr: text.into_bytes(),
        },
        &out,
    );
    Both {
        ours: stacks::ours(&rec.profile, pid),
        perf: perf_script(&perf_data),
        rec,
    }
}

/// perf record's `--control fifo:CTL,ACK`: commands go into one FIFO, perf answers `ack`
/// in the other once it has carried them out. Both are opened read-write here, which never
/// blocks, whenever perf opens its ends.
struct PerfControl {
    paths: [std::path::PathBuf; 2],
    ctl: std::fs::File,
    ack: std::fs::File,
}

impl PerfControl {
    fn new(dir: &Path) -> Self {
        let paths = [dir.join("perf-ctl.fifo"), dir.join("perf-ack.fifo")];
        for path in &paths {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: mkfifo with a valid NUL-terminated path.
            let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
            assert_eq!(
                rc,
                0,
                "mkfifo {}: {}",
                path.display(),
                Error::last_os_error()
            );
        }
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        };
        PerfControl {
            ctl: open(&paths[0]),
            ack: open(&paths[1]),
            paths,
        }
    }

    fn fifos(&self) -> String {
        format!(
            "fifo:{},{}",
            self.paths[0].display(),
            self.paths[1].display()
        )
    }

    /// Sends `command` and waits (up to 60 s) for perf's `ack`.
    fn send(&mut self, perf: &mut Child, command: &str) {
        use std::{io::Read as _, os::fd::AsRawFd as _};
        writeln!(self.ctl, "{command}").expect("write to perf's control FIFO");
        let mut pfd = libc::pollfd {
            fd: self.ack.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Also holding the FIFO's write end, this never sees perf go: look every 200 ms.
        let mut waited = 0;
        // SAFETY: poll on one valid descriptor for the duration of the call.
        while unsafe { libc::poll(&mut pfd, 1, 200) } != 1 {
            waited += 200;
            let exited = perf.try_wait().expect("perf's status");
            if exited.is_some() || waited >= 60_000 {
                let _ = perf.kill();
                let mut err = String::new();
                if let Some(mut stderr) = perf.stderr.take() {
                    let _ = stderr.read_to_string(&mut err);
                }
                panic!("perf record did not acknowledge `{command}` ({exited:?}): {err}");
            }
        }
        let mut answer = [0u8; 16];
        let n = self.ack.read(&mut answer).expect("read perf's ack");
        assert!(
            answer[..n].starts_with(b"ack"),
            "perf answered `{command}` with {:?}",
            String::from_utf8_lossy(&answer[..n])
        );
    }
}

/// perf's user stacks from `perf script -F ip,sym,dso --no-inline`: one block per sample,
/// one `IP SYMBOL (DSO)` line per frame, leaf first, IP the offset in the DSO's file (the
/// byte before the return address for callers); kernel frames dropped.
fn perf_script(data: &Path) -> Vec<Stack> {
    let out = run_ok(
        Command::new("perf")
            .args(["script", "--no-inline", "-F", "ip,sym,dso", "-i"])
            .arg(data),
    );
    parse_perf_script(&String::from_utf8_lossy(&out.stdout))
}

fn parse_perf_script(text: &str) -> Vec<Stack> {
    let mut stacks = Vec::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut in_sample = false;
    for line in text.lines().chain([""]) {
        let line = line.trim();
        if line.is_empty() {
            if in_sample {
                stacks.push(Stack {
                    count: 1,
                    frames: std::mem::take(&mut frames),
                });
            }
            in_sample = false;
            continue;
        }
        in_sample = true;
        let Some((ip, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let Ok(offset) = u64::from_str_radix(ip, 16) else {
            continue;
        };
        let (name, dso) = match rest.trim().rsplit_once(" (") {
            Some((name, dso)) => (name.trim(), dso.trim_end_matches(')')),
            None => (rest.trim(), ""),
        };
        if dso.starts_with("[kernel") {
            continue;
        }
        frames.push(Frame {
            name: name.to_owned(),
            file: dso.to_owned(),
            offset,
        });
    }
    stacks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_script() {
        let text = "\n\t            4308 [unknown] (/usr/bin/gzip)\n\
                    \t ffffffff81000001 irq ([kernel.kallsyms])\n\
                    \t 27249 __libc_start_call_main (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\
                    \n\n\t 1287 throwing::cx_e(unsigned long) (/tmp/throw)\n";
        let stacks = parse_perf_script(text);
        assert_eq!(stacks.len(), 2);
        let names: Vec<_> = stacks[0].frames.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["[unknown]", "__libc_start_call_main"]);
        assert_eq!(stacks[0].frames[0].offset, 0x4308);
        assert_eq!(stacks[1].frames[0].file, "/tmp/throw");
        assert_eq!(stacks[1].frames[0].name, "throwing::cx_e(unsigned long)");
    }
}
