//! `cargo xtask setup`: installs what building and testing need, and nothing that is already
//! there. Every item is checked first (a cheap query), so on a ready machine setup takes well
//! under a second and `run`/`test`/`bench` can call it unconditionally. One line per item.
//!
//! Besides the toolchain and Debian packages, it installs py-spy (the Python sampling
//! profiler that `cargo xtask bench python` compares with, and that tests may run) with pip
//! into a directory of its own, so that its binary is always at [`PY_SPY`]
//! (`/opt/py-spy/bin/py-spy`), whichever Python's pip put it there.
use std::{fs, io, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::util::{cargo, check, is_root, probe};

/// The bpf-linker release that works with this machine's nightly (see DESIGN.md: it links
/// against rustc's own LLVM).
const BPF_LINKER_VERSION: &str = "0.10.0";

/// The py-spy release installed, from PyPI.
const PY_SPY_VERSION: &str = "0.4.3";
/// Where py-spy is installed (`pip install --target`, which puts a wheel's scripts in
/// `bin/` below it under every install scheme, pyenv's and Debian's alike).
const PY_SPY_DIR: &str = "/opt/py-spy";
/// The py-spy binary, for tests and benchmarks: a static executable that needs no Python.
pub const PY_SPY: &str = "/opt/py-spy/bin/py-spy";

/// Debian packages the tests and benchmarks use, and why:
/// docker.io (container discovery tests), busybox-static (tiny static test binaries),
/// golang-go (`go tool pprof` to validate output, Go test workloads), prometheus (promtool to
/// lint /metrics), linux-perf and bpftrace (benchmark baselines), bpftool (checks that no
/// programs are left behind, BPF run-time stats), binutils and gcc (build C fixtures),
/// time (GNU `/usr/bin/time -v`), systemd (`systemd-analyze verify` checks the unit in
/// config/), chromium and chromium-driver (headless Chromium, driven over WebDriver, loads
/// the agent's flame graph page in tests/tests/page.rs), xz-utils (the `.gnu_debugdata`
/// decompression bomb in tests/tests/hostile.rs), libc6-dev (static glibc for the chrooted
/// fixture there), g++ (C++ fixtures), gzip and python3.11 (stock programs without frame
/// pointers whose stacks tests/tests/unwind.rs compares with perf's; python3.11 is also the
/// CPython that `cargo xtask bench python` profiles).
const DEBIAN_PACKAGES: &[&str] = &[
    "docker.io",
    "busybox-static",
    "golang-go",
    "prometheus",
    "linux-perf",
    "bpftrace",
    "bpftool",
    "binutils",
    "gcc",
    "time",
    "systemd",
    "chromium",
    "chromium-driver",
    "xz-utils",
    "libc6-dev",
    "g++",
    "gzip",
    "python3.11",
];

pub fn setup() -> Result<()> {
    nightly()?;
    rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    py_spy()?;
    Ok(())
}

/// The eBPF crate is built with nightly (`-Z build-std=core` for bpfel-unknown-none).
fn nightly() -> Result<()> {
    let installed = probe(Command::new("rustup").args(["toolchain", "list"])).is_some_and(|out| {
        out.lines()
            .any(|l| l == "nightly" || l.starts_with("nightly-") || l.starts_with("nightly "))
    });
    if installed {
        println!("setup: nightly toolchain: present");
        return Ok(());
    }
    println!("setup: nightly toolchain: installing");
    check(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

/// `build-std` needs the standard library's sources for the BPF target.
fn rust_src() -> Result<()> {
    let installed = probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|out| out.lines().any(|l| l.trim().starts_with("rust-src")));
    if installed {
        println!("setup: rust-src (nightly): present");
        return Ok(());
    }
    println!("setup: rust-src (nightly): installing");
    check(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The linker aya-build uses for the eBPF object; a different version is replaced.
fn bpf_linker() -> Result<()> {
    let version = probe(Command::new("bpf-linker").arg("--version"));
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    match version.as_deref().map(str::trim) {
        Some(v) if v == wanted => {
            println!("setup: bpf-linker {BPF_LINKER_VERSION}: present");
            return Ok(());
        }
        Some(other) => {
            println!("setup: bpf-linker: found `{other}`, installing {BPF_LINKER_VERSION}")
        }
        None => {
            println!("setup: bpf-linker {BPF_LINKER_VERSION}: installing (takes a few minutes)")
        }
    }
    check(cargo().args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))
}

/// Checks every package with dpkg-query, then runs one `apt-get update` and one install
/// for all the missing ones.
fn debian_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &pkg in DEBIAN_PACKAGES {
        let status = probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]));
        if status.as_deref() == Some("install ok installed") {
            println!("setup: {pkg}: present");
        } else {
            println!("setup: {pkg}: missing");
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {}; run `cargo xtask setup` as root (or install them \
             with `sudo apt-get install {}`)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    check(Command::new("apt-get").arg("update"))?;
    check(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )
}

/// py-spy [`PY_SPY_VERSION`] at [`PY_SPY`]: `pip install --target` into [`PY_SPY_DIR`] with
/// the first of `python3` (pyenv's, when it is first on PATH) and Debian's `/usr/bin/python3`
/// that has pip. A different version there is replaced (the directory is made anew).
fn py_spy() -> Result<()> {
    let version = probe(Command::new(PY_SPY).arg("--version"));
    let wanted = format!("py-spy {PY_SPY_VERSION}");
    match version.as_deref().map(str::trim) {
        Some(v) if v == wanted => {
            println!("setup: py-spy {PY_SPY_VERSION}: present");
            return Ok(());
        }
        Some(other) => println!("setup: py-spy: found `{other}`, installing {PY_SPY_VERSION}"),
        None => println!("setup: py-spy {PY_SPY_VERSION}: installing into {PY_SPY_DIR}"),
    }
    if !is_root() {
        bail!("py-spy {PY_SPY_VERSION} is not at {PY_SPY}; run `cargo xtask setup` as root");
    }
    let Some(python) = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|python| probe(Command::new(python).args(["-m", "pip", "--version"])).is_some())
    else {
        bail!(
            "no Python with pip to install py-spy with (tried python3 and /usr/bin/python3); \
             install pip (`apt-get install python3-pip`) and run `cargo xtask setup` again"
        );
    };
    // The directory is this tool's alone: a fresh install leaves no other version's files.
    match fs::remove_dir_all(PY_SPY_DIR) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the old {PY_SPY_DIR}"));
        }
        _ => {}
    }
    check(
        Command::new(python)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .args(["-m", "pip", "install", "--no-deps", "--target"])
            .arg(PY_SPY_DIR)
            .arg(format!("py-spy=={PY_SPY_VERSION}")),
    )?;
    let version = probe(Command::new(PY_SPY).arg("--version"));
    if version.as_deref().map(str::trim) != Some(wanted.as_str()) {
        bail!("pip installed py-spy, but `{PY_SPY} --version` says {version:?}, not `{wanted}`");
    }
    Ok(())
}
