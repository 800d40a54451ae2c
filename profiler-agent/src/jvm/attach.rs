//! HotSpot's dynamic attach, spoken from the host as `jcmd` and jattach speak it, so a JVM
//! started with no flag writes its perf map on request (`Compiler.perfmap`):
//!
//! 1. If the JVM has no attach socket yet (`.java_pid<nspid>` in its `/tmp`), create the
//!    trigger file `.attach_pid<nspid>` in its working directory (else its `/tmp`), owned by
//!    the JVM's user, and send it `SIGQUIT`: the JVM then starts its attach listener instead
//!    of printing a thread dump. `<nspid>` is the JVM's pid in its own pid namespace.
//! 2. Wait for the socket, connect as the JVM's user and group (a JVM in its own user
//!    namespace knows no host root), check with `SO_PEERCRED` that the JVM itself answers,
//!    send `1\0jcmd\0<command>\0\0\0`, read the status line and the output.
//!
//! Everything is reached inside the JVM's root (`/proc/PID/root`, through the safe file
//! layer), so a JVM in a container is attached as one on the host is, and a hostile process
//! cannot point the agent at a host file or socket: the trigger file is created with
//! `O_EXCL | O_NOFOLLOW` in a directory opened inside the root, and the peer of the socket
//! must be the JVM's pid. `SIGQUIT` is sent only to a process that maps `libjvm.so` and was
//! not started with `-XX:+DisableAttachMechanism` (its default action would kill any other
//! process). Every step is bounded by a timeout.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{procfile::ProcRoot, symbolize::perfmap::namespace_pid};

/// Largest answer read from a JVM.
const MAX_ANSWER: u64 = 1 << 20;
/// How often the socket is looked for after the signal.
const POLL: Duration = Duration::from_millis(20);

/// Why a JVM could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("process {pid} is gone or unreadable: {reason}")]
    NoProcess { pid: u32, reason: String },
    #[error("process {pid} is not a HotSpot JVM (no libjvm.so mapped)")]
    NotHotSpot { pid: u32 },
    #[error("process {pid} refuses attach (-XX:+DisableAttachMechanism)")]
    Disabled { pid: u32 },
    #[error("process {pid}: cannot trigger its attach listener: {reason}")]
    Trigger { pid: u32, reason: String },
    #[error("process {pid}: no attach socket after {waited:?}")]
    Timeout { pid: u32, waited: Duration },
    #[error("process {pid}: attach socket: {reason}")]
    Socket { pid: u32, reason: String },
    #[error("process {pid}: `{command}` failed with status {status}: {output}")]
    Command {
        pid: u32,
        command: String,
        status: i32,
        output: String,
    },
}

impl AttachError {
    /// The `outcome` label of the attach counter.
    pub fn outcome(&self) -> &'static str {
        match self {
            AttachError::NoProcess { .. } => "gone",
            AttachError::NotHotSpot { .. } => "not_hotspot",
            AttachError::Disabled { .. } => "disabled",
            AttachError::Timeout { .. } => "timeout",
            AttachError::Trigger { .. } | AttachError::Socket { .. } => "error",
            AttachError::Command { .. } => "command_failed",
        }
    }
}

/// What attaching needs to know of the process, from `/proc/PID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub pid: u32,
    /// The pid the JVM has in its own namespace.
    pub ns_pid: u32,
    /// Effective uid and gid: the attach files must be the JVM's own.
    pub uid: u32,
    pub gid: u32,
}

impl Target {
    /// Reads `proc/PID`: refuses a process that is not HotSpot or disabled attach.
    pub fn of(proc: &Path, pid: u32) -> Result<Self, AttachError> {
        let dir = proc.join(pid.to_string());
        let gone = |e: std::io::Error| AttachError::NoProcess {
            pid,
            reason: e.to_string(),
        };
        let status = std::fs::read_to_string(dir.join("status")).map_err(gone)?;
        let maps = std::fs::read_to_string(dir.join("maps")).map_err(gone)?;
        if !maps
            .lines()
            .any(|l| l.ends_with("/libjvm.so") || l.ends_with("/libjvm.so (deleted)"))
        {
            return Err(AttachError::NotHotSpot { pid });
        }
        let cmdline = std::fs::read(dir.join("cmdline")).map_err(gone)?;
        let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
        if disables_attach(&cmdline, &environ) {
            return Err(AttachError::Disabled { pid });
        }
        let ids = |key: &str| -> Option<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let (Some(uid), Some(gid)) = (ids("Uid:"), ids("Gid:")) else {
            return Err(AttachError::NoProcess {
                pid,
                reason: "no Uid/Gid in its status".into(),
            });
        };
        Ok(Self {
            pid,
            ns_pid: namespace_pid(&status).unwrap_or(pid),
            uid,
            gid,
        })
    }
}

/// Whether the JVM's command line or its `JAVA_TOOL_OPTIONS` / `JDK_JAVA_OPTIONS` turn
/// attach off (the last occurrence wins, as for any `-XX` flag).
fn disables_attach(cmdline: &[u8], environ: &[u8]) -> bool {
    let mut disabled = false;
    let mut look = |text: &str| {
        for word in text.split_whitespace() {
            match word {
                "-XX:+DisableAttachMechanism" => disabled = true,
                "-XX:-DisableAttachMechanism" => disabled = false,
                _ => {}
            }
        }
    };
    for var in environ.split(|&b| b == 0) {
        let var = String::from_utf8_lossy(var);
        if let Some(value) = var
            .strip_prefix("JAVA_TOOL_OPTIONS=")
            .or_else(|| var.strip_prefix("JDK_JAVA_OPTIONS="))
        {
            look(value);
        }
    }
    for arg in cmdline.split(|&b| b == 0) {
        look(&String::from_utf8_lossy(arg));
    }
    disabled
}

/// Runs `jcmd <command>` in the JVM `pid` (its output), waiting at most `timeout` in all.
pub fn jcmd(
    proc: &Path,
    pid: u32,
    command: &str,
    timeout: Duration,
) -> Result<String, AttachError> {
    let deadline = Instant::now() + timeout;
    let target = Target::of(proc, pid)?;
    let root = ProcRoot::of_pid(proc, pid).map_err(|e| AttachError::NoProcess {
        pid,
        reason: e.to_string(),
    })?;
    let tmp = root
        .open_dir(Path::new("/tmp"))
        .map_err(|e| AttachError::Trigger {
            pid,
            reason: format!("its /tmp: {e}"),
        })?;
    let socket_name = format!(".java_pid{}", target.ns_pid);
    if !is_socket(&tmp, &socket_name) {
        let trigger = start_listener(proc, &target, &tmp)?;
        let found = wait_for_socket(&tmp, &socket_name, deadline);
        drop(trigger);
        if !found {
            return Err(AttachError::Timeout {
                pid,
                waited: timeout,
            });
        }
    }
    let socket = |reason: String| AttachError::Socket { pid, reason };
    // Connected through the directory opened inside the root, never a host path.
    let path = PathBuf::from(format!("/proc/self/fd/{}", tmp.as_raw_fd())).join(&socket_name);
    let mut stream =
        connect_as(&path, target.uid, target.gid).map_err(|e| socket(e.to_string()))?;
    let peer = peer_pid(&stream).map_err(|e| socket(e.to_string()))?;
    if peer != pid {
        return Err(socket(format!("answered by process {peer}, not the JVM")));
    }
    let left = deadline.saturating_duration_since(Instant::now()).max(POLL);
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .map_err(|e| socket(e.to_string()))?;
    let mut request = Vec::from(&b"1\0jcmd\0"[..]);
    request.extend_from_slice(command.as_bytes());
    request.extend_from_slice(b"\0\0\0");
    stream
        .write_all(&request)
        .map_err(|e| socket(format!("sending the request: {e}")))?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(|e| socket(format!("reading the answer: {e}")))?;
    parse_answer(&answer, pid, command)
}

/// The JVM's answer: a status line (`0` for success), then the command's output.
fn parse_answer(answer: &[u8], pid: u32, command: &str) -> Result<String, AttachError> {
    let text = String::from_utf8_lossy(answer);
    let (status, output) = text.split_once('\n').unwrap_or((&text, ""));
    let status: i32 = status.trim().parse().map_err(|_| AttachError::Socket {
        pid,
        reason: format!(
            "not an attach answer: {:?}",
            text.chars().take(80).collect::<String>()
        ),
    })?;
    // jcmd's own errors come back with status 0 and the message as output.
    if status != 0 || output.contains("Exception") {
        return Err(AttachError::Command {
            pid,
            command: command.to_owned(),
            status,
            output: output.chars().take(500).collect(),
        });
    }
    Ok(output.to_owned())
}

/// The trigger file, removed when dropped if this call created it.
struct Trigger {
    dir: OwnedFd,
    name: CString,
}

impl Drop for Trigger {
    fn drop(&mut self) {
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
    }
}

/// Creates `.attach_pid<nspid>` (in the JVM's working directory, else its `/tmp`) as the
/// JVM's user and sends `SIGQUIT`.
fn start_listener(
    proc: &Path,
    target: &Target,
    tmp: &OwnedFd,
) -> Result<Option<Trigger>, AttachError> {
    let pid = target.pid;
    let name = CString::new(format!(".attach_pid{}", target.ns_pid)).expect("no NUL");
    let cwd = open_dir_fd(&proc.join(format!("{pid}/cwd")));
    let mut created = None;
    for dir in cwd.into_iter().chain(tmp.try_clone().ok()) {
        match create_owned(&dir, &name, target.uid, target.gid) {
            Ok(true) => {
                created = Some(Trigger {
                    dir,
                    name: name.clone(),
                });
                break;
            }
            // There already: the JVM will see it all the same.
            Ok(false) => break,
            Err(error) => tracing::debug!(pid, %error, "attach trigger file not created"),
        }
    }
    // SAFETY: kill has no memory preconditions; the target was checked to be HotSpot.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGQUIT) } != 0 {
        return Err(AttachError::Trigger {
            pid,
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(created)
}

/// Creates `name` in `dir` without following links; `Ok(false)` when it exists already.
fn create_owned(dir: &OwnedFd, name: &CString, uid: u32, gid: u32) -> std::io::Result<bool> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o660) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::EEXIST) => Ok(false),
            _ => Err(error),
        };
    }
    // SAFETY: `fd` was just opened and is owned here.
    let file = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: a valid descriptor.
    if unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

fn open_dir_fd(path: &Path) -> Option<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    // SAFETY: `fd` was just opened and is owned here.
    (fd >= 0).then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Whether `name` in `dir` is a socket (not a link to one).
fn is_socket(dir: &OwnedFd, name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: zeroed stat is a valid out-buffer; dir and name are valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let ok = unsafe {
        libc::fstatat(
            dir.as_fd().as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } == 0;
    ok && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

fn wait_for_socket(dir: &OwnedFd, name: &str, deadline: Instant) -> bool {
    loop {
        if is_socket(dir, name) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Connects to the attach socket as the JVM's own user and group, as jcmd run by that user
/// would. HotSpot (JDK 9 and later) accepts root too, but in a JVM's own user namespace the
/// host's root is no one. The credentials are changed with raw syscalls on a thread of its
/// own, which then ends: glibc's `setresuid` would change every thread of the agent. The
/// connection keeps the credentials it was made with (what `SO_PEERCRED` tells the JVM).
fn connect_as(path: &Path, uid: u32, gid: u32) -> std::io::Result<UnixStream> {
    // SAFETY: geteuid and getegid have no preconditions.
    if unsafe { (libc::geteuid(), libc::getegid()) } == (uid, gid) {
        return UnixStream::connect(path);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let keep = libc::uid_t::MAX as libc::c_long;
                // SAFETY: raw setresgid/setresuid change only this thread's credentials, and
                // the thread ends right after the connect.
                let changed = unsafe {
                    libc::syscall(libc::SYS_setresgid, keep, gid as libc::c_long, keep) == 0
                        && libc::syscall(libc::SYS_setresuid, keep, uid as libc::c_long, keep) == 0
                };
                if !changed {
                    return Err(std::io::Error::last_os_error());
                }
                UnixStream::connect(path)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the connecting thread panicked")))
    })
}

/// The pid (in this agent's namespace) of the process at the other end.
fn peer_pid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

#[cfg(test)]
#[path = "attach_tests.rs"]
mod tests;
