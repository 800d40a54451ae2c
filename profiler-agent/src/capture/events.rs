//! The file-descriptor budget of captures. Every perf event a capture opens is a descriptor
//! of the agent's: one per thread of the captured process, or one per CPU. A process with
//! tens of thousands of threads (or a trigger on it) must not exhaust the agent's
//! descriptors, so each capture reserves its events here first:
//!
//! - at most [`MAX_THREAD_EVENTS_PER_CAPTURE`] (1024) thread events per capture; a process
//!   with more threads is sampled with one event per CPU filtered by its pid in the BPF
//!   program instead (the same samples, `cpus` descriptors whatever the thread count);
//! - at most [`MAX_EVENTS_ALL_CAPTURES`] (4096) events across concurrent captures;
//! - never more than the `RLIMIT_NOFILE` soft limit minus the descriptors open now minus
//!   [`FD_RESERVE`] (256, for sockets, files and BPF maps).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Thread events one capture may open.
pub const MAX_THREAD_EVENTS_PER_CAPTURE: usize = 1024;
/// Events all running captures may hold together.
pub const MAX_EVENTS_ALL_CAPTURES: usize = 4096;
/// Descriptors a capture always leaves free below `RLIMIT_NOFILE`.
pub const FD_RESERVE: usize = 256;

/// Events reserved by running captures, out of a total.
#[derive(Debug)]
pub struct EventBudget {
    in_use: AtomicUsize,
    total: usize,
}

/// Events taken from an [`EventBudget`], given back on drop.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a EventBudget,
    events: usize,
}

impl EventBudget {
    pub fn new(total: usize) -> Self {
        Self {
            in_use: AtomicUsize::new(0),
            total,
        }
    }

    /// Events reserved now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }

    /// Events a reservation could take now.
    pub fn available(&self) -> usize {
        self.total.saturating_sub(self.in_use()).min(fd_headroom())
    }

    /// Takes up to `want` events: fewer when other captures or the descriptor limit leave
    /// less; `None` when nothing is left.
    pub fn reserve(&self, want: usize) -> Option<Reservation<'_>> {
        let headroom = fd_headroom();
        let mut taken = 0;
        self.in_use
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                taken = want.min(self.total.saturating_sub(used)).min(headroom);
                (taken > 0).then_some(used + taken)
            })
            .ok()?;
        Some(Reservation {
            budget: self,
            events: taken,
        })
    }
}

impl Reservation<'_> {
    pub fn events(&self) -> usize {
        self.events
    }

    /// Gives back what is over `events`.
    pub fn shrink(&mut self, events: usize) {
        if events < self.events {
            self.budget
                .in_use
                .fetch_sub(self.events - events, Ordering::SeqCst);
            self.events = events;
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(self.events, Ordering::SeqCst);
    }
}

/// Descriptors this process may still open, less [`FD_RESERVE`].
pub fn fd_headroom() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    let soft = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    soft.saturating_sub(open_fds()).saturating_sub(FD_RESERVE)
}

/// Descriptors open in this process now (`/proc/self/fd`, less the one reading it).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_total_and_give_back() {
        let budget = EventBudget::new(1500);
        let a = budget.reserve(1024).unwrap();
        assert_eq!(a.events(), 1024.min(fd_headroom()));
        if a.events() < 1024 {
            // A low RLIMIT_NOFILE in this environment: the rest below needs 1500.
            return;
        }
        let mut b = budget.reserve(1024).unwrap();
        assert_eq!(b.events(), 476);
        assert!(budget.reserve(1).is_none());
        b.shrink(8);
        assert_eq!(budget.in_use(), 1032);
        b.shrink(100);
        assert_eq!(b.events(), 8);
        drop(a);
        drop(b);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn the_descriptor_limit_bounds_a_reservation() {
        let open = open_fds();
        assert!(open >= 3, "{open}");
        // A child with a soft limit just above what it has open gets nothing.
        let status = std::process::Command::new("sh")
            .args(["-c", "ulimit -Sn 300 && exec \"$0\" --exact --ignored capture::events::tests::headroom_child"])
            .arg(std::env::current_exe().unwrap())
            .env("CAPFIX_HEADROOM_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Run by `the_descriptor_limit_bounds_a_reservation` with RLIMIT_NOFILE at 300.
    #[test]
    #[ignore = "run in a child process with a low descriptor limit"]
    fn headroom_child() {
        if std::env::var_os("CAPFIX_HEADROOM_CHILD").is_none() {
            return;
        }
        let headroom = fd_headroom();
        assert!(headroom <= 300 - FD_RESERVE, "{headroom}");
        let budget = EventBudget::new(MAX_EVENTS_ALL_CAPTURES);
        let r = budget.reserve(MAX_THREAD_EVENTS_PER_CAPTURE).unwrap();
        assert_eq!(r.events(), headroom);
    }
}
