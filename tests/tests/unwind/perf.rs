//! Sampling one process with `profiler-agent record --pid` and, in the same window,
//! `perf record --call-graph dwarf` (perf copies 32 KiB of user stack per sample and unwinds
//! it afterwards with the binaries' `.eh_frame`: the reference), and reading perf's stacks
//! back from `perf script`.

use std::{
    io::BufRead as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::{
    common::{Recorded, finish_record, in_ci, record_command, run_ok},
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

/// Samples `pid` for `seconds` with `record --pid` and, from the moment record is attached
/// (its `recording` line), with `perf record --call-graph dwarf` at the same 97 Hz. Our
/// profile goes to `dir/ours.pb.gz`.
pub fn record_beside_perf(dir: &Path, pid: u32, seconds: u32) -> Both {
    let out = dir.join("ours.pb.gz");
    let perf_data = dir.join("perf.data");
    let (pid_arg, duration) = (pid.to_string(), format!("{seconds}s"));
    let mut agent = record_command(&["--pid", &pid_arg, "--duration", &duration], &out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn record");
    let stderr = agent.stderr.take().expect("record's stderr");
    let (attached_tx, attached) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("recording ") {
                let _ = attached_tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let perf = attached
        .recv_timeout(Duration::from_secs(60))
        .is_ok()
        .then(|| {
            run_ok(
                Command::new("perf")
                    .args(["record", "-q", "-e", "cpu-clock", "-F", "97"])
                    // 16 MiB of buffer, 5 s of samples: nothing lost while perf waits for a
                    // CPU on a busy machine.
                    .args(["-m", "16M"])
                    .args(["--call-graph", "dwarf,32768", "-p", &pid_arg, "-o"])
                    .arg(&perf_data)
                    .args(["--", "sleep", &seconds.to_string()]),
            )
        });
    let status = agent.wait().expect("wait for record");
    let text = reader.join().expect("record's stderr reader");
    assert!(perf.is_some(), "record never attached:\n{text}");
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
                    \t           27249 __libc_start_call_main (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\
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
