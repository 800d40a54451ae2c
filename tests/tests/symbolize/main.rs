//! End-to-end tests of symbolization through `profiler-agent record --demangle full`, with
//! fixtures compiled here: C at -O2 with inlining (PIE and non-PIE), C++ with namespaces and
//! templates, Rust, Go stripped with `-ldflags='-s -w'`, a library loaded with dlopen after
//! the process was first sampled, a binary deleted after it started, a debug-stripped binary
//! whose debug file is installed by build id, and a binary that only exists inside a Docker
//! container's root.
//!
//! For every distinct sampled address in the fixture's own mapping, the agent's answer (every
//! line of the location, innermost inline level first: function name, file, line) must agree
//! with binutils `addr2line -f -i -C` (or `go tool addr2line` for Go) at the address the
//! agent had to look up: the sampled address for a user leaf, the address minus one for a
//! return address, and for the first user frame under kernel frames (the pc saved at kernel
//! entry) the address minus one after a `syscall` instruction but the address itself after an
//! interrupt or a fault, which stopped the thread at that very instruction (see
//! [`probes::Role`]). 100% agreement is required wherever the reference tool knows the
//! function. Kernel frames of a syscall-heavy workload are checked in record.rs.
//!
//! Files: `fixtures.rs` builds the fixtures, `reference.rs` wraps the reference tools (and
//! the ELF segments that map file offsets to their addresses), `probes.rs` reads the agent's
//! profile back, `check.rs` compares the two, and this file holds the tests.

mod check;
#[path = "../common/mod.rs"]
mod common;
mod fixtures;
mod probes;
mod reference;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use check::{check_go, check_native};
use common::*;
use fixtures::*;
use probes::{all_names, has_chain, is_path, mapping_names};
use reference::{readelf, readelf_build_id};

/// How long each fixture is recorded.
const RECORD_FOR: &str = "3s";
/// Fixtures run at most this long if a test dies without killing them.
const WORKLOAD_SECONDS: &str = "3600";
/// Fewer distinct checked addresses than this means the check proved little. Fixtures whose
/// hot loop is only a few instructions long use [`MIN_CHECKED_SMALL`].
const MIN_CHECKED: usize = 5;
const MIN_CHECKED_SMALL: usize = 3;

fn record_full(pid: u32, dir: &Path, name: &str) -> Recorded {
    let out = dir.join(format!("{name}.pb.gz"));
    let pid = pid.to_string();
    record(
        &[
            "--pid",
            &pid,
            "--duration",
            RECORD_FOR,
            "--demangle",
            "full",
        ],
        &out,
    )
}

/// The C fixture's call chain, leaf first, with the two inline levels of the hot loop.
const INLINE_CHAIN: [&str; 6] = ["mix", "scramble", "hot_loop", "outer_b", "outer_a", "main"];

/// Records `inline.c` built as `binary` and checks it against addr2line.
fn check_inline_fixture(dir: &Path, name: &str, binary: &Path) {
    let workload = Workload::start(binary, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir, name);
    let p = &rec.profile;
    let check = check_native(p, name, &is_path(binary), binary);
    check.assert_agreement(MIN_CHECKED);
    assert!(
        has_chain(p, &INLINE_CHAIN),
        "{name}: no stack with {INLINE_CHAIN:?}; names: {:?}",
        all_names(p)
    );
    assert!(
        check.max_depth >= 3,
        "{name}: no location with two inline levels (deepest: {})",
        check.max_depth
    );
    assert!(check.with_file_line >= MIN_CHECKED);
    // The independent reader sees the inline levels innermost first.
    let raw = go_pprof_raw(&dir.join(format!("{name}.pb.gz")));
    let hot = ["mix", "scramble", "hot_loop"];
    assert!(
        profiler_tests::go_pprof::locations(&raw)
            .iter()
            .any(|l| l.functions.windows(3).any(|w| w == hot)),
        "{name}: go tool pprof -raw shows no location with {hot:?} in this order:\n{raw}"
    );
}

/// Reads `record`'s stderr on a thread, telling `started` when the recording has begun.
fn watch_stderr(
    stderr: std::process::ChildStderr,
    started: mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        let mut told = false;
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if !told && line.starts_with("recording ") {
                let _ = started.send(());
                told = true;
            }
            all.extend_from_slice(line.as_bytes());
            line.clear();
        }
        all
    })
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn c_with_inlining_pie_matches_addr2line() {
    if !require_root("c_with_inlining_pie_matches_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_inline(dir.path(), "inline_pie", &["-pie", "-fPIE"]);
    check_inline_fixture(dir.path(), "inline_pie", &binary);
}

#[test]
fn c_with_inlining_non_pie_matches_addr2line() {
    if !require_root("c_with_inlining_non_pie_matches_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_inline(dir.path(), "inline_nopie", &["-no-pie", "-fno-pie"]);
    // The point of this fixture: file offsets differ from virtual addresses.
    assert!(
        readelf("-hW", &binary).contains("EXEC (Executable file)"),
        "-no-pie did not give ET_EXEC"
    );
    check_inline_fixture(dir.path(), "inline_nopie", &binary);
}

#[test]
fn cpp_namespaces_and_templates_match_addr2line() {
    if !require_root("cpp_namespaces_and_templates_match_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = gxx(
        dir.path(),
        "templates",
        "templates.cpp",
        &["-O1", "-g", "-fno-omit-frame-pointer"],
    );
    let workload = Workload::start(&binary, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir.path(), "templates");
    let p = &rec.profile;
    check_native(p, "templates", &is_path(&binary), &binary).assert_agreement(MIN_CHECKED);
    let names = all_names(p);
    for expected in [
        "geo::detail::Accumulator<double>::add(double)",
        "double geo::sum_squares<double, 7>(geo::detail::Accumulator<double>&, unsigned long)",
        "geo::Engine::run(unsigned long) const",
        "(anonymous namespace)::drive(geo::Engine const&)",
    ] {
        assert!(
            names.contains(expected),
            "no function {expected:?} among {names:#?}"
        );
    }
}

#[test]
fn rust_matches_addr2line() {
    if !require_root("rust_matches_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = rustc_burn(dir.path());
    let workload = Workload::start(&binary, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir.path(), "rust");
    let p = &rec.profile;
    check_native(p, "rust", &is_path(&binary), &binary).assert_agreement(MIN_CHECKED);
    let names = all_names(p);
    for expected in ["burn::checksum", "burn::round", "burn::main"] {
        assert!(
            names.contains(expected),
            "no function {expected:?} among {names:#?}"
        );
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("burn::engine::Mixer<") && n.ends_with(">::churn")),
        "no Mixer::churn among {names:#?}"
    );
}

#[test]
fn stripped_go_matches_go_addr2line() {
    if !require_root("stripped_go_matches_go_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = go_burn_stripped(dir.path());
    // Really stripped: names can only come from .gopclntab.
    let sections = readelf("-SW", &binary);
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "go build -ldflags='-s -w' left symbols:\n{sections}"
    );
    let workload = Workload::start(&binary, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir.path(), "go");
    let p = &rec.profile;
    check_go(p, dir.path(), "go", &is_path(&binary), &binary).assert_agreement(MIN_CHECKED);
    // Full names, and the whole chain under the hot loop (mix is inlined into burn).
    let chain = ["main.burn", "main.stage2", "main.stage1", "main.main"];
    let names = all_names(p);
    assert!(
        p.sample.iter().any(|s| {
            let names: Vec<&str> = stack_names(p, s)
                .into_iter()
                .filter(|n| *n != "main.mix")
                .collect();
            names.windows(chain.len()).any(|w| w == chain)
        }),
        "no stack with {chain:?}; names: {names:#?}"
    );
}

#[test]
fn library_loaded_with_dlopen_after_first_sample_matches_addr2line() {
    if !require_root("library_loaded_with_dlopen_after_first_sample_matches_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let main = gcc(
        dir.path(),
        "dlopen_main",
        "dlopen_main.c",
        &["-O2", "-g", "-fno-omit-frame-pointer", "-ldl"],
    );
    let lib = gcc(
        dir.path(),
        "libhot.so",
        "libhot.c",
        &["-O2", "-g", "-fno-omit-frame-pointer", "-fPIC", "-shared"],
    );
    let workload = Workload::start(&main, &[lib.to_str().unwrap(), WORKLOAD_SECONDS]);
    let out = dir.path().join("dlopen.pb.gz");
    let pid = workload.pid().to_string();
    let mut child = record_command(
        &[
            "--pid",
            &pid,
            "--duration",
            RECORD_FOR,
            "--demangle",
            "full",
        ],
        &out,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start record");
    let (tx, rx) = mpsc::channel();
    let stderr = watch_stderr(child.stderr.take().unwrap(), tx);
    // Let the agent sample the process (and snapshot its mappings) before the library
    // exists in it, then load it.
    let started = rx.recv_timeout(Duration::from_secs(60)).is_ok();
    if started {
        std::thread::sleep(Duration::from_millis(800));
    }
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(workload.pid() as i32, libc::SIGUSR1) };
    let output = child.wait_with_output().expect("wait for record");
    let stderr = stderr.join().unwrap();
    assert!(
        started,
        "record never started: {}",
        String::from_utf8_lossy(&stderr)
    );
    assert!(
        !maps_before.contains("libhot.so"),
        "libhot.so was mapped before the signal"
    );
    let rec = finish_record(
        std::process::Output {
            status: output.status,
            stdout: output.stdout,
            stderr,
        },
        &out,
    );
    let p = &rec.profile;
    let before = check_native(p, "dlopen_main", &is_path(&main), &main);
    let after = check_native(p, "libhot.so", &is_path(&lib), &lib);
    assert!(
        has_chain(p, &["before_load", "main"]),
        "no samples before dlopen; names: {:?}",
        all_names(p)
    );
    assert!(
        has_chain(p, &["hot_mix", "hot_inner", "hot_entry", "main"]),
        "no named stack through the dlopened library; names: {:?}; mappings: {:?}",
        all_names(p),
        mapping_names(p)
    );
    before.assert_agreement(MIN_CHECKED_SMALL);
    after.assert_agreement(MIN_CHECKED_SMALL);
    assert!(after.with_file_line >= MIN_CHECKED_SMALL);
}

#[test]
fn deleted_binary_keeps_full_names_and_lines() {
    if !require_root("deleted_binary_keeps_full_names_and_lines") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let original = compile_inline(dir.path(), "inline", &[]);
    let victim = dir.path().join("victim");
    std::fs::copy(&original, &victim).unwrap();
    let workload = Workload::start(&victim, &[WORKLOAD_SECONDS]);
    std::fs::remove_file(&victim).unwrap();
    let rec = record_full(workload.pid(), dir.path(), "deleted");
    let p = &rec.profile;
    let victim_name = victim.to_str().unwrap().to_owned();
    let ours = move |name: &str| {
        name == victim_name || name.strip_suffix(" (deleted)") == Some(victim_name.as_str())
    };
    let check = check_native(p, "deleted", &ours, &original);
    check.assert_agreement(MIN_CHECKED);
    assert!(
        has_chain(p, &INLINE_CHAIN),
        "deleted binary: no stack with {INLINE_CHAIN:?}; names: {:?}; mappings: {:?}",
        all_names(p),
        mapping_names(p)
    );
    assert!(check.with_file_line >= MIN_CHECKED);
}

#[test]
fn debug_file_found_by_build_id_gives_lines() {
    if !require_root("debug_file_found_by_build_id_gives_lines") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let original = compile_inline(dir.path(), "inline", &[]);
    let (stripped, debug) = debug_stripped(dir.path(), &original);
    let sections = readelf("-SW", &stripped);
    assert!(
        !sections.contains(".debug_info")
            && !sections.contains(".symtab")
            && !sections.contains(".gnu_debuglink"),
        "strip left debug data or a debuglink:\n{sections}"
    );
    let build_id = readelf_build_id(&stripped);
    let _installed = InstalledDebugFile::install(&debug, &build_id);

    let workload = Workload::start(&stripped, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir.path(), "stripped");
    let p = &rec.profile;
    // The unstripped original has the same code at the same addresses.
    let check = check_native(p, "debug-stripped", &is_path(&stripped), &original);
    check.assert_agreement(MIN_CHECKED);
    assert!(
        has_chain(p, &INLINE_CHAIN),
        "debug-stripped: no stack with {INLINE_CHAIN:?}; names: {:?}",
        all_names(p)
    );
    assert!(check.with_file_line >= MIN_CHECKED);
    let m = p
        .mapping
        .iter()
        .find(|m| Path::new(&p.string_table[m.filename as usize]) == stripped)
        .expect("mapping of the stripped binary");
    assert_eq!(p.string_table[m.build_id as usize], build_id);
}

// ---------------------------------------------------------------------------------------------
// Docker (helpers in common).

#[test]
fn binary_only_inside_a_container_root_is_named() {
    if !require_root("binary_only_inside_a_container_root_is_named") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spin = static_spin(dir.path());
    let nonce = nonce();
    // A path that exists only in the container's root.
    let inside = format!("/opt/profiler-only-in-container-{nonce}/spin");
    assert!(!Path::new(&inside).exists());
    let tarball = busybox_rootfs_tarball(dir.path(), &spin, &inside);

    let Some(_daemon) = DockerDaemon::get(&dir.path().join("dockerd.log")) else {
        return;
    };
    let guard = ContainerGuard {
        container: format!("profiler-symbolize-{nonce}"),
        image: format!("profiler-symbolize-test:{nonce}"),
    };
    docker_ok(&["import", tarball.to_str().unwrap(), &guard.image]);
    docker_ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &guard.container,
        &guard.image,
        &inside,
        WORKLOAD_SECONDS,
    ]);
    let pid: u32 = docker_ok(&["inspect", "-f", "{{.State.Pid}}", &guard.container])
        .parse()
        .expect("container pid");
    assert!(pid > 0, "container is not running");
    std::thread::sleep(Duration::from_millis(200));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        Path::new(&inside),
        "the container's pid 1 is not the spin binary"
    );

    let rec = record_full(pid, dir.path(), "container");
    let p = &rec.profile;
    let check = check_native(p, "container", &|n| n == inside, &spin);
    assert!(
        has_chain(p, &["spin_inner", "spin_outer", "main"]),
        "container binary: no stack with spin_inner <- spin_outer <- main; names: {:?}; \
         mappings: {:?}",
        all_names(p),
        mapping_names(p)
    );
    check.assert_agreement(MIN_CHECKED_SMALL);
    assert!(check.with_file_line >= MIN_CHECKED_SMALL);

    // The pid maps to the container's id, found from /proc/PID/cgroup.
    let id = docker_ok(&["inspect", "-f", "{{.Id}}", &guard.container]);
    for sample in &p.sample {
        assert_eq!(
            label_str(p, sample, "container_id"),
            Some(id.trim()),
            "samples of the container's pid carry its id"
        );
    }
}
