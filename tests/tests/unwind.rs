//! End-to-end tests of user stacks without frame pointers (issue 16): real processes sampled
//! by `profiler-agent record --pid`, the pprof read back.
//!
//! Fixtures compiled here (`tests/fixtures/unwind/`), each busy on one CPU in a known chain:
//! C at -O2 -fomit-frame-pointer through a shared library (PIE and non-PIE), C++ throwing
//! exceptions across frames, Rust without frame pointers, a signal handler on a deep chain,
//! recursion 100 deep; at least 95% of each one's samples must show the whole chain from the
//! sampled pc down to `main` and on to `_start` (through glibc's entry frames). The
//! frame-pointer fixture `chain.c` must keep its chain down to `main`. perf samples each
//! fixture in the same window and must see the same (else the fixture, not the agent, is
//! what is wrong).
//!
//! Stock Debian programs without frame pointers (`gzip`, `python3.11`) are sampled by
//! `record` and by `perf record --call-graph dwarf` in the same window: our share of
//! samples reaching the process entry must be at least 95% of perf's, and each of the five
//! functions with the most self samples in perf must appear in the same share of samples
//! (within 10 points). Functions are told apart by their `.eh_frame` FDE, not by name, since
//! these binaries are stripped.

mod common;
#[path = "unwind/perf.rs"]
mod perf;
#[path = "unwind/stacks.rs"]
mod stacks;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use perf::{record_beside_perf, require_program};
use stacks::{Frame, Functions, Stack, base_name};

/// Share of a fixture's samples that must show its whole chain.
const FULL_SHARE: f64 = 0.95;
/// The signal trampoline's place in a chain: `__restore_rt`, or any frame in libc (the name
/// is only in glibc's debug symbols, and a profiler that names the byte before each return
/// address, as perf does, lands just before `__restore_rt`).
const TRAMPOLINE: &str = "<signal trampoline>";

// --- fixtures ----------------------------------------------------------------------------

fn build(compiler: &str, dir: &Path, out: &str, sources: &[&str], flags: &[&str]) -> PathBuf {
    let path = dir.join(out);
    let mut cmd = Command::new(compiler);
    cmd.args(flags).arg("-o").arg(&path);
    for source in sources {
        cmd.arg(fixture(&format!("unwind/{source}")));
    }
    run_ok(&mut cmd);
    path
}

const NO_FP: [&str; 2] = ["-O2", "-fomit-frame-pointer"];

/// `exe_chain.c` linked against `libchain.so` (both without frame pointers), as a PIE or not,
/// with an rpath to the library.
fn c_through_library(dir: &Path, pie: bool) -> PathBuf {
    let lib_flags = [&NO_FP[..], &["-shared", "-fPIC"]].concat();
    build("gcc", dir, "libchain.so", &["libchain.c"], &lib_flags);
    let out = dir.join(if pie { "chain_pie" } else { "chain_nopie" });
    let kind: &[&str] = if pie {
        &["-pie", "-fPIE"]
    } else {
        &["-no-pie"]
    };
    run_ok(
        Command::new("gcc")
            .args(NO_FP)
            .args(kind)
            .arg("-o")
            .arg(&out)
            .arg(fixture("unwind/exe_chain.c"))
            .arg(format!("-L{}", dir.display()))
            .arg("-lchain")
            .arg(format!("-Wl,-rpath,{}", dir.display())),
    );
    out
}

// --- checking a fixture's stacks ---------------------------------------------------------

fn is_frame(frame: &Frame, want: &str) -> bool {
    if want == TRAMPOLINE {
        return base_name(&frame.name) == "__restore_rt" || is_libc(frame);
    }
    base_name(&frame.name) == want
}

fn is_libc(frame: &Frame) -> bool {
    Path::new(&frame.file)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))
}

/// Whether `frames` (user frames, leaf first) follow `chain` from the leaf, starting at
/// whichever position of `chain` the leaf is at (`starts` allowed), down to its last frame,
/// and from there reach the process entry: the outermost `main`, then at most four frames
/// in libc (`__libc_start_call_main`, `__libc_start_main`, their inline levels), then
/// `_start` as the outermost frame.
fn follows_to_entry(frames: &[Frame], chain: &[&str], starts: &[usize]) -> bool {
    let Some(leaf) = frames.first() else {
        return false;
    };
    let Some(&k) = starts.iter().find(|&&k| is_frame(leaf, chain[k])) else {
        return false;
    };
    let chain = &chain[k..];
    if frames.len() < chain.len() || !frames.iter().zip(chain).all(|(f, w)| is_frame(f, w)) {
        return false;
    }
    reaches_entry(&frames[chain.len() - 1..])
}

/// `frames` starts at the last frame of a chain: somewhere below is `main`, below it only
/// glibc's entry frames, and `_start` last.
fn reaches_entry(frames: &[Frame]) -> bool {
    let Some(main) = frames.iter().rposition(|f| f.name == "main") else {
        return false;
    };
    let [.., last] = frames else {
        return false;
    };
    if main + 1 >= frames.len() || base_name(&last.name) != "_start" {
        return false;
    }
    let between = &frames[main + 1..frames.len() - 1];
    between.len() <= 4 && between.iter().all(is_libc)
}

/// Whether a test needing root and perf may run (see `require_root`).
fn can_run(test: &str) -> bool {
    require_root(test) && require_program(test, "perf")
}

/// Runs `binary` (busy on one CPU), samples it for 4 s with `record --pid` and perf
/// at once, and checks that at least 95% of perf's samples pass `full` (the fixture runs
/// as this test expects) and then that at least 95% of ours do. Returns our stacks.
fn assert_full_chains(
    what: &str,
    binary: &Path,
    args: &[&str],
    full: impl Fn(&[Frame]) -> bool,
) -> Vec<Stack> {
    let workload = Workload::spawn(binary, args);
    let dir = binary.parent().expect("the fixture's directory");
    let both = record_beside_perf(dir, workload, 4);
    let count = |s: &[Stack]| s.iter().map(|s| s.count).sum::<u64>();
    let (n_ours, n_perf) = (count(&both.ours), count(&both.perf));
    let ours = stacks::share(&both.ours, |s| full(&s.frames));
    let perf = stacks::share(&both.perf, |s| full(&s.frames));
    eprintln!(
        "{what}: whole chain in {:.1}% of our {n_ours} samples, {:.1}% of perf's {n_perf}",
        ours * 100.0,
        perf * 100.0
    );
    assert!(
        n_ours >= 100 && n_perf >= 100,
        "{what}: too few samples: ours {n_ours}, perf {n_perf}\n{}",
        both.rec.stderr()
    );
    assert!(
        perf >= FULL_SHARE,
        "{what}: perf sees the whole chain in only {:.1}% of its samples: the fixture does \
         not run as this test expects; perf's most frequent others:\n{}",
        perf * 100.0,
        failing(&both.perf, &full)
    );
    assert!(
        ours >= FULL_SHARE,
        "{what}: only {:.1}% of our {n_ours} samples show the whole chain to main and _start \
         (need {:.0}%; perf: {:.1}%); most frequent others:\n{}\n{}",
        ours * 100.0,
        FULL_SHARE * 100.0,
        perf * 100.0,
        failing(&both.ours, &full),
        both.rec
            .stderr()
            .lines()
            .find(|l| l.starts_with("counters"))
            .unwrap_or("")
    );
    // The independent reader agrees on the sample total.
    let raw = go_pprof_raw(&dir.join("ours.pb.gz"));
    let go_total: i64 = profiler_tests::go_pprof::sample_values(&raw)
        .iter()
        .map(|values| values[0])
        .sum();
    assert_eq!(go_total, total_samples(&both.rec.profile));
    both.ours
}

/// The five most frequent stacks (as printed) failing `full`, one per line.
fn failing(stacks: &[Stack], full: impl Fn(&[Frame]) -> bool) -> String {
    let mut bad: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for s in stacks.iter().filter(|s| !full(&s.frames)) {
        *bad.entry(stacks::describe(&s.frames)).or_default() += s.count;
    }
    let mut bad: Vec<_> = bad.into_iter().collect();
    bad.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    bad.iter()
        .take(5)
        .map(|(stack, n)| format!("  {n:4} × {stack}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// --- fixture tests -----------------------------------------------------------------------

const LIBRARY_CHAIN: [&str; 6] = ["uw_e", "uw_d", "uw_c", "uw_b", "uw_a", "main"];

/// The C chain through libchain.so, built as a PIE or not.
fn c_chain_through_a_shared_library(test: &str, pie: bool) {
    if !can_run(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = c_through_library(dir.path(), pie);
    let what = if pie { "C PIE" } else { "C non-PIE" };
    assert_full_chains(&format!("{what} through libchain.so"), &binary, &[], |f| {
        follows_to_entry(f, &LIBRARY_CHAIN, &[0])
    });
}

#[test]
fn c_chain_through_a_shared_library_pie() {
    c_chain_through_a_shared_library("c_chain_through_a_shared_library_pie", true);
}

#[test]
fn c_chain_through_a_shared_library_non_pie() {
    c_chain_through_a_shared_library("c_chain_through_a_shared_library_non_pie", false);
}

#[test]
fn cpp_exceptions_thrown_across_frames() {
    if !can_run("cpp_exceptions_thrown_across_frames") {
        return;
    }
    const CHAIN: [&str; 7] = [
        "throwing::cx_e",
        "throwing::cx_d",
        "throwing::cx_c",
        "throwing::cx_b",
        "throwing::cx_a",
        "throwing::run",
        "main",
    ];
    let dir = tempfile::tempdir().unwrap();
    let binary = build("g++", dir.path(), "throw", &["throw.cpp"], &NO_FP);
    let exe = binary.to_string_lossy().into_owned();
    // Frames of the C++ runtime (throwing, unwinding, catching) may sit above the chain; the
    // first frame in the executable is then cx_e (throwing) or run (catching).
    let runtime = |f: &Frame| f.file.starts_with('/') && f.file != exe;
    let full = |frames: &[Frame]| {
        let first = frames
            .iter()
            .position(|f| !runtime(f))
            .unwrap_or(frames.len());
        let starts: &[usize] = if first == 0 { &[0] } else { &[0, 5] };
        follows_to_entry(&frames[first..], &CHAIN, starts)
    };
    let stacks = assert_full_chains("C++ with exceptions", &binary, &[], full);
    // The exception path was exercised: samples in the runtime, under __cxa_throw.
    let throwing = stacks::share(&stacks, |s| s.frames.first().is_some_and(runtime));
    assert!(
        throwing >= 0.10,
        "only {:.1}% of samples in the C++ runtime: the fixture does not throw enough",
        throwing * 100.0
    );
}

#[test]
fn rust_without_frame_pointers() {
    if !can_run("rust_without_frame_pointers") {
        return;
    }
    const CHAIN: [&str; 6] = [
        "chain::r_e",
        "chain::r_d",
        "chain::r_c",
        "chain::r_b",
        "chain::r_a",
        "chain::main",
    ];
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("chain");
    run_ok(
        Command::new("rustc")
            .args(["-C", "opt-level=2", "-C", "force-frame-pointers=no", "-o"])
            .arg(&binary)
            .arg(fixture("unwind/chain.rs")),
    );
    // Below chain::main: std's lang_start frames, then C `main` and glibc's entry.
    assert_full_chains("Rust", &binary, &[], |f| follows_to_entry(f, &CHAIN, &[0]));
}

#[test]
fn signal_handler_on_a_deep_chain() {
    if !can_run("signal_handler_on_a_deep_chain") {
        return;
    }
    const CHAIN: [&str; 8] = ["h2", "h1", "handler", TRAMPOLINE, "m3", "m2", "m1", "main"];
    let dir = tempfile::tempdir().unwrap();
    let binary = build("gcc", dir.path(), "signal", &["signal.c"], &NO_FP);
    // From wherever the pc is: in the handler's chain, in the trampoline or in m3.
    let stacks = assert_full_chains("signal handler", &binary, &[], |f| {
        follows_to_entry(f, &CHAIN, &[0, 1, 2, 3, 4])
    });
    let in_handler = stacks::share(&stacks, |s| {
        s.frames.first().is_some_and(|f| is_frame(f, "h2"))
    });
    assert!(
        (0.1..=0.9).contains(&in_handler),
        "{:.1}% of samples in h2: the fixture should split its time between the handler \
         and m3",
        in_handler * 100.0
    );
}

#[test]
fn recursion_100_deep() {
    if !can_run("recursion_100_deep") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = build("gcc", dir.path(), "recurse", &["recurse.c"], &NO_FP);
    let mut chain = vec!["bottom"];
    chain.extend(std::iter::repeat_n("recurse", 100));
    chain.push("main");
    assert_full_chains("recursion 100 deep", &binary, &[], |f| {
        follows_to_entry(f, &chain, &[0])
    });
}

#[test]
fn frame_pointer_chain_is_unchanged() {
    if !can_run("frame_pointer_chain_is_unchanged") {
        return;
    }
    const CHAIN: [&str; 5] = ["chain_d", "chain_c", "chain_b", "chain_a", "main"];
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_c("chain", dir.path());
    // As before: the chain from the leaf down to main (glibc's entry frames have no frame
    // pointers, so a frame-pointer walk need not get further).
    let full =
        |f: &[Frame]| f.len() >= CHAIN.len() && f.iter().zip(CHAIN).all(|(f, w)| is_frame(f, w));
    let stacks = assert_full_chains("frame pointers", &binary, &["3600"], full);
    let to_entry = stacks::share(&stacks, |s| follows_to_entry(&s.frames, &CHAIN, &[0]));
    eprintln!("frame pointers: {:.1}% also reach _start", to_entry * 100.0);
}

// --- stock programs against perf ---------------------------------------------------------

/// Compares our stacks of the busy `workload` with perf's (see the module doc).
fn compare_with_perf(what: &str, dir: &Path, workload: Workload) {
    let exe =
        std::fs::read_link(format!("/proc/{}/exe", workload.pid())).expect("the workload's exe");
    // 20 s, about 1940 samples each: a function with 45% of the samples then differs between
    // two fair samplers by 1.6 points (one standard deviation), so 10 points is a real
    // difference. With 5 s and then 10 s, CI runs saw 10.5 and 10.1 points on gzip (whose
    // input then repeated: see gzip_stacks_match_perf).
    let both = record_beside_perf(dir, workload, 20);
    let (ours, perf) = (both.ours, both.perf);
    let count = |s: &[Stack]| s.iter().map(|s| s.count).sum::<u64>();
    let (n_ours, n_perf) = (count(&ours), count(&perf));
    assert!(
        n_ours >= 200 && n_perf >= 200,
        "{what}: too few samples to compare: ours {n_ours}, perf {n_perf}"
    );
    let mut functions = Functions::default();
    let entry = functions.entry_of(&exe);
    let ours_complete = stacks::complete_share(&ours, &mut functions, &entry);
    let perf_complete = stacks::complete_share(&perf, &mut functions, &entry);
    let mut report = format!(
        "{what}: complete stacks: ours {:.1}% of {n_ours}, perf {:.1}% of {n_perf}\n",
        ours_complete * 100.0,
        perf_complete * 100.0
    );
    let mut wrong = Vec::new();
    for (key, name) in stacks::hottest(&perf, &mut functions, 5) {
        let o = stacks::appears_share(&ours, &mut functions, &key);
        let p = stacks::appears_share(&perf, &mut functions, &key);
        report.push_str(&format!(
            "  {name}: in {:.1}% of ours, {:.1}% of perf's\n",
            o * 100.0,
            p * 100.0
        ));
        if (o - p).abs() > 0.10 {
            wrong.push(name);
        }
    }
    eprint!("{report}");
    let incomplete: Vec<Stack> = ours
        .iter()
        .filter(|s| !stacks::is_complete(s, &mut functions, &entry))
        .cloned()
        .collect();
    let examples = failing(&incomplete, |_| false);
    // perf itself must do well, or the comparison says nothing.
    assert!(
        perf_complete >= 0.80,
        "{what}: perf's own stacks are complete in only {:.1}%: is perf's DWARF unwinding \
         working here?\n{report}",
        perf_complete * 100.0
    );
    assert!(
        ours_complete >= 0.95 * perf_complete,
        "{what}: our stacks reach the process entry in {:.1}% of samples, perf's in {:.1}% \
         (need 95% of perf's)\n{report}most frequent incomplete stacks of ours:\n{examples}",
        ours_complete * 100.0,
        perf_complete * 100.0
    );
    assert!(
        wrong.is_empty(),
        "{what}: {wrong:?} appear in a share of our samples more than 10 points from perf's\n\
         {report}"
    );
}

#[test]
fn gzip_stacks_match_perf() {
    if !can_run("gzip_stacks_match_perf") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `gzip -9` reading text from a pipe, for as long as the test keeps writing.
    let mut child = Command::new("/bin/gzip")
        .args(["-9", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start /bin/gzip (Debian's gzip)");
    let mut stdin = child.stdin.take().unwrap();
    let workload = Workload(child);
    // Never the same text twice in a row: slices at pseudo-random offsets of 16 MiB. Both
    // samplers fire every 10.3 ms of gzip's own CPU time (per-thread cpu-clock events); a
    // 1 MiB text written over and over made gzip's work periodic in that time, and each
    // sampler's fixed phase then over- or under-counted a function (10 points apart, in
    // either direction, in two CI runs of about ten).
    let text = words(16 << 20);
    const CHUNK: usize = 64 << 10;
    // Ends when gzip is killed (the write fails: SIGPIPE is ignored in Rust programs).
    std::thread::spawn(move || {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        loop {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % (text.len() - CHUNK) as u64) as usize;
            if stdin.write_all(&text[at..at + CHUNK]).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    compare_with_perf("gzip -9", dir.path(), workload);
}

/// About `len` bytes of text from a fixed vocabulary in a pseudo-random order: matches for
/// deflate to find, but not too easily.
fn words(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let vocabulary: Vec<String> = (0..2000)
        .map(|_| {
            let n = 2 + next() % 9;
            (0..n)
                .map(|_| (b'a' + (next() % 26) as u8) as char)
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(vocabulary[next() % vocabulary.len()].as_bytes());
        out.push(if next() % 12 == 0 { b'\n' } else { b' ' });
    }
    out
}

#[test]
fn python_stacks_match_perf() {
    const PYTHON: &str = "/usr/bin/python3.11";
    if !can_run("python_stacks_match_perf") || !require_program("python_stacks_match_perf", PYTHON)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let workload = Workload::spawn(PYTHON, &[fixture("unwind/busy.py").to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(1));
    compare_with_perf("python3.11", dir.path(), workload);
}
