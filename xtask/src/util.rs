//! Small helpers shared by the subcommands: where the workspace is, how to run a child
//! process visibly, and how to carry a child's exit code back out of `main`.
use std::{
    env, fmt,
    os::unix::process::ExitStatusExt as _,
    path::PathBuf,
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, Result, bail};

/// A child's exit code to pass on unchanged: the child already printed its own error, so
/// `main` exits with this code instead of printing another message.
#[derive(Debug)]
pub struct ExitCode(pub i32);

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitCode {}

/// The workspace root, so that commands work from any directory inside it.
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` like cargo itself does.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// The release agent binary built by [`build_agent`].
pub fn agent_binary() -> PathBuf {
    target_dir().join("release").join("profiler-agent")
}

/// A `cargo` command run from the workspace root. Uses `$CARGO` (the cargo that started
/// xtask) so nested builds use the same toolchain as the outer one.
///
/// Without the variables `cargo run` set for xtask itself (`CARGO_PKG_NAME=xtask`, ...):
/// ring's build script tracks some of them, so passing them on would make these builds
/// differ from a plain `cargo build`, and each would rebuild ring and everything above it
/// (the agent included) after the other.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    for (name, _) in env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_MANIFEST_LINKS",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&&*name)
        {
            cmd.env_remove(&*name);
        }
    }
    cmd
}

/// `cargo build --release -p profiler-agent`; its build.rs also builds the eBPF object.
pub fn build_agent() -> Result<()> {
    check(cargo().args(["build", "--release", "-p", "profiler-agent"]))
}

/// Renders a command the way a user would type it, for logs and error messages.
pub fn display(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `cmd` with inherited stdio after echoing it, and returns its status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("$ {}", display(cmd));
    cmd.status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))
}

/// Runs `cmd` like [`status`] and fails unless it succeeded.
pub fn check(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// The shell convention for a child's exit: its code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Whether we run as root (installing packages and loading BPF programs need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` quietly and returns its stdout, or `None` if it cannot start or fails. Used
/// for the "is it already installed?" probes, where failure just means "no".
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
