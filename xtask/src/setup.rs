//! `cargo xtask setup`: installs what building and testing need, and nothing that is already
//! there. Every item is checked first (a cheap query), so on a ready machine setup takes well
//! under a second and `run`/`test`/`bench` can call it unconditionally. One line per item.
use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{cargo, check, is_root, probe};

/// The bpf-linker release that works with this machine's nightly (see DESIGN.md: it links
/// against rustc's own LLVM).
const BPF_LINKER_VERSION: &str = "0.10.0";

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
/// pointers whose stacks tests/tests/unwind.rs compares with perf's).
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
