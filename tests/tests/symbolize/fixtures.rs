//! Building the symbolize fixtures from `tests/fixtures`: C with gcc, C++ with g++, Rust with
//! rustc, Go with `go build -ldflags='-s -w'` (in a private GOCACHE, offline), a copy split
//! into a debug-stripped binary and its debug file, and that debug file installed under
//! `/usr/lib/debug/.build-id` for as long as the guard lives.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::common::{fixture, run_ok};

/// `tests/fixtures/<source>` compiled with gcc and `flags` as `dir/out`.
pub fn gcc(dir: &Path, out: &str, source: &str, flags: &[&str]) -> PathBuf {
    let path = dir.join(out);
    run_ok(
        Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&path)
            .arg(fixture(source)),
    );
    path
}

/// `tests/fixtures/<source>` compiled with g++ and `flags` as `dir/out`.
pub fn gxx(dir: &Path, out: &str, source: &str, flags: &[&str]) -> PathBuf {
    let path = dir.join(out);
    run_ok(
        Command::new("g++")
            .args(flags)
            .arg("-o")
            .arg(&path)
            .arg(fixture(source)),
    );
    path
}

/// `inline.c` at -O2 -g with frame pointers; `extra` adds e.g. `-no-pie`.
pub fn compile_inline(dir: &Path, out: &str, extra: &[&str]) -> PathBuf {
    let mut flags = vec!["-O2", "-g", "-fno-omit-frame-pointer"];
    flags.extend_from_slice(extra);
    gcc(dir, out, "inline.c", &flags)
}

/// `burn.rs` compiled with rustc -O -g and frame pointers as `dir/burn`.
pub fn rustc_burn(dir: &Path) -> PathBuf {
    let binary = dir.join("burn");
    run_ok(
        Command::new("rustc")
            .args(["-C", "force-frame-pointers=yes", "-g", "-O", "-o"])
            .arg(&binary)
            .arg(fixture("burn.rs")),
    );
    binary
}

/// `burn.go` built stripped (`-ldflags=-s -w`) as `dir/burn`.
pub fn go_burn_stripped(dir: &Path) -> PathBuf {
    let binary = dir.join("burn");
    run_ok(
        go_command(dir)
            .args(["build", "-ldflags=-s -w", "-o"])
            .arg(&binary)
            .arg(fixture("burn.go")),
    );
    binary
}

/// Environment for the go tool: everything in `dir`, no network, no toolchain switching.
pub fn go_command(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GOTOOLCHAIN", "local")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .env(
            "HOME",
            std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        );
    cmd
}

/// A copy of `original` as `dir/stripped`, without debug information or symbols, and its
/// debug information as `dir/stripped.debug` (`objcopy --only-keep-debug`, then `strip`).
/// Returns (stripped, debug).
pub fn debug_stripped(dir: &Path, original: &Path) -> (PathBuf, PathBuf) {
    let stripped = dir.join("stripped");
    let debug = dir.join("stripped.debug");
    std::fs::copy(original, &stripped).unwrap();
    run_ok(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&stripped)
            .arg(&debug),
    );
    run_ok(
        Command::new("strip")
            .args(["--strip-debug", "--strip-unneeded"])
            .arg(&stripped),
    );
    (stripped, debug)
}

/// A debug file installed under /usr/lib/debug/.build-id, removed (with the directories
/// created for it) when dropped.
pub struct InstalledDebugFile {
    path: PathBuf,
    created: Vec<PathBuf>,
}

impl InstalledDebugFile {
    pub fn install(debug: &Path, build_id: &str) -> Self {
        let dir = PathBuf::from("/usr/lib/debug/.build-id").join(&build_id[..2]);
        let path = dir.join(format!("{}.debug", &build_id[2..]));
        assert!(!path.exists(), "{} already exists", path.display());
        let mut created = Vec::new();
        let mut missing = Vec::new();
        let mut d = dir.as_path();
        while !d.exists() {
            missing.push(d.to_path_buf());
            d = d.parent().unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        created.extend(missing); // deepest first
        let guard = Self { path, created };
        std::fs::copy(debug, &guard.path).unwrap();
        guard
    }
}

impl Drop for InstalledDebugFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        for d in &self.created {
            let _ = std::fs::remove_dir(d);
        }
    }
}
