//! Child processes for benchmarks: measured precisely and never left behind.
//!
//! Each child runs in its own process group, so it and anything it forks (perf's `sleep`,
//! the workload's threads) can be signalled together. A [`Child`] that is dropped before it
//! was reaped is SIGKILLed with its group and reaped, so every error path (`?`) cleans up.
//! Because the children are not in the terminal's process group, Ctrl-C reaches only xtask:
//! [`install_interrupt_handler`] turns it into a flag that the waiting loops check, so they
//! return an error and the drops kill the children. `PR_SET_PDEATHSIG` covers the last case,
//! xtask itself being killed.
//!
//! Resource usage comes from `wait4`, which reports the child's own user and system time and
//! peak RSS (including its reaped descendants), the same numbers `/usr/bin/time -v` prints.
use std::{
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    process::{Command, ExitStatus},
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::display;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The write end is written by the signal handler, so that a `poll` on the read end wakes.
static INTERRUPT_PIPE: AtomicI32 = AtomicI32::new(-1);
static INTERRUPT_PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let fd = INTERRUPT_PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write is async-signal-safe; the byte is valid for the call.
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
}

/// Makes SIGINT and SIGTERM set a flag (and wake [`Child::wait_quietly`]) instead of killing
/// xtask, so children get cleaned up. The pipe is made once, however many benchmarks call
/// this.
pub fn install_interrupt_handler() {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is valid for two descriptors.
    if INTERRUPT_PIPE.load(Ordering::SeqCst) < 0
        && unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == 0
    {
        INTERRUPT_PIPE.store(fds[0], Ordering::SeqCst);
        INTERRUPT_PIPE_WRITE.store(fds[1], Ordering::SeqCst);
    }
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to atomics and writes one byte to a pipe, both
    // async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in small steps so that Ctrl-C is noticed quickly.
pub fn sleep(duration: Duration) -> Result<()> {
    let end = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// How a reaped child ended and what it cost.
pub struct Exit {
    pub status: ExitStatus,
    /// From just before spawn to reaping.
    pub wall: Duration,
    /// User plus system CPU time.
    pub cpu: Duration,
    /// Peak resident set size in KiB (`ru_maxrss` on Linux).
    pub max_rss_kib: u64,
}

/// A running child that is killed (with its process group) and reaped if dropped early.
pub struct Child {
    pid: libc::pid_t,
    name: String,
    started: Instant,
    reaped: bool,
}

impl Child {
    /// Spawns `cmd` in a new process group that dies with xtask.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        cmd.process_group(0);
        // SAFETY: prctl is a plain system call, async-signal-safe, fine between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", display(cmd)))?;
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // Dropping std's handle neither kills nor reaps; from here on wait4 below owns it.
        drop(child);
        Ok(Self {
            pid,
            name: name.to_owned(),
            started,
            reaped: false,
        })
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Time since spawn.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sends `sig` to the child's whole process group.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        // SAFETY: kill has no memory-safety preconditions; the group is ours and not reaped.
        if !self.reaped && unsafe { libc::kill(-self.pid, sig) } == -1 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("cannot signal {}", self.name));
        }
        Ok(())
    }

    /// Waits for the child to exit, at most `timeout`, and returns its resource usage.
    pub fn wait(&mut self, timeout: Duration) -> Result<Exit> {
        loop {
            let mut status = 0;
            // SAFETY: rusage is plain old data; all-zero is a valid value.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are valid for writes for the duration of the call.
            let ret = unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut usage) };
            if ret == self.pid {
                return Ok(self.reaped(status, &usage));
            }
            if ret == -1 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err).with_context(|| format!("waiting for {}", self.name));
                }
            }
            check_interrupted()?;
            if self.started.elapsed() > timeout {
                bail!("{} still running after {timeout:?}; killed it", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Like [`Child::wait`], but off the CPU while the child runs: xtask sleeps in one
    /// `poll` on the child's pidfd and the interrupt pipe, with the timeout as its own, and
    /// wakes only when the child exits, on Ctrl-C or at the timeout. For benchmarks that
    /// sample the whole host: any wake-up of xtask while a profiler samples can get it
    /// sampled, and xtask is a debug build whose 20 MiB of DWARF a profiler then reads to
    /// name those few samples (a watchdog that woke once a second did, in one run of five).
    pub fn wait_quietly(&mut self, timeout: Duration) -> Result<Exit> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if pidfd < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("pidfd_open for {}", self.name));
        }
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let deadline = self.started + timeout;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: INTERRUPT_PIPE.load(Ordering::SeqCst),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let left = deadline.saturating_duration_since(Instant::now());
            let millis = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: `fds` is valid for the call; a negative fd (no pipe) is ignored by poll.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
            if ret == -1 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err).with_context(|| format!("waiting for {}", self.name));
            }
            if fds[0].revents != 0 {
                return self.wait(timeout);
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}; killed it", self.name);
            }
        }
    }

    /// The child's exit and resource usage, now that it is reaped.
    fn reaped(&mut self, status: libc::c_int, usage: &libc::rusage) -> Exit {
        self.reaped = true;
        let time = |tv: libc::timeval| {
            Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
        };
        Exit {
            status: ExitStatus::from_raw(status),
            wall: self.started.elapsed(),
            cpu: time(usage.ru_utime) + time(usage.ru_stime),
            max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: as in `signal` and `wait`; a blocking wait is fine after SIGKILL.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}
