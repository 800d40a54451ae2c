//! `record -- COMMAND`: the command is forked and held before its `exec` until the sampler
//! is attached to it, as `perf record` does, so its first instructions are sampled too. Its
//! perf events are inherited by every thread and child it starts; it stays in the agent's
//! process group, so Ctrl-C reaches it as it would without the agent.

use std::{
    ffi::{CString, OsString},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    process::ExitStatus,
};

/// Why the command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("the command has a NUL byte in {argument:?}")]
    Nul { argument: String },
    #[error("cannot start {command:?}: {source}")]
    Start {
        command: String,
        source: std::io::Error,
    },
}

/// A started command, not yet past its `exec` while the gate is held.
#[derive(Debug)]
pub struct Launched {
    pid: libc::pid_t,
    gate: Option<OwnedFd>,
    status: Option<ExitStatus>,
}

impl Launched {
    /// Forks `command` (looked up in `PATH` like a shell does) and holds it before `exec`.
    pub fn start(command: &[OsString]) -> Result<Self, CommandError> {
        let shown = command
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let argv: Vec<CString> = command
            .iter()
            .map(|a| {
                CString::new(a.as_bytes()).map_err(|_| CommandError::Nul {
                    argument: a.to_string_lossy().into_owned(),
                })
            })
            .collect::<Result<_, _>>()?;
        let start_error = |source| CommandError::Start {
            command: shown.clone(),
            source,
        };
        if argv.is_empty() {
            return Err(start_error(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        pointers.push(std::ptr::null());
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(start_error(io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just created and are owned here only.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: between fork and exec the child calls only async-signal-safe functions
        // (close, read, execvp, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(start_error(io::Error::last_os_error())),
            0 => unsafe {
                libc::close(write.as_raw_fd());
                let mut byte = 0u8;
                // Until the agent writes or closes its end (EOF); a signal retries.
                while libc::read(read.as_raw_fd(), (&raw mut byte).cast(), 1) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
                libc::execvp(pointers[0], pointers.as_ptr());
                // As a shell does for a command it cannot run.
                libc::_exit(127)
            },
            pid => {
                drop(read);
                Ok(Self {
                    pid,
                    gate: Some(write),
                    status: None,
                })
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Lets the command `exec` and run.
    pub fn release(&mut self) {
        self.gate = None;
    }

    /// Whether it has exited (reaping it then).
    pub fn exited(&mut self) -> bool {
        self.reap(libc::WNOHANG);
        self.status.is_some()
    }

    /// Waits for it to exit and returns how it did.
    pub fn wait(&mut self) -> ExitStatus {
        while self.status.is_none() {
            self.reap(0);
        }
        self.status.unwrap_or_default()
    }

    fn reap(&mut self, flags: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is valid for writes.
        let ret = unsafe { libc::waitpid(self.pid, &mut status, flags) };
        if ret == self.pid {
            use std::os::unix::process::ExitStatusExt as _;
            self.status = Some(ExitStatus::from_raw(status));
        } else if ret == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            self.status = Some(ExitStatus::default());
        }
    }
}

impl Drop for Launched {
    /// A command never released (the sampler did not start) is killed, not run unprofiled.
    fn drop(&mut self) {
        if self.gate.is_some() {
            // SAFETY: our own child, not yet reaped (it cannot exit before the gate opens).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.gate = None;
            self.wait();
        }
    }
}

/// The exit code a shell would give for `status`: the command's own, or 128 plus the signal
/// that ended it.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        _ => 1,
    }
}
