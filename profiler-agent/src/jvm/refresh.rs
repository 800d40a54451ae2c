//! Perf maps for continuously profiled JVMs: when an interval's samples of a process fall
//! in anonymous executable memory no perf map names, and the process is a HotSpot JVM, it
//! is asked for its map ([`super::jcmd`]) on a thread of its own, so the pipeline never
//! waits. The next interval names its compiled code. A map is a snapshot: a warming JVM
//! recompiles its hot methods (tier 1 to tier 4) at new addresses, so the wait before a
//! process is asked again starts at [`FIRST_WAIT`] and doubles up to `every`.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::ask_for_perf_map;
/// The wait before a process is asked a second time.
pub const FIRST_WAIT: Duration = Duration::from_secs(10);
/// Processes remembered (their last attempt); past this the oldest are forgotten.
const MAX_REMEMBERED: usize = 4096;

/// What came of the attempts since the last call to [`PerfMapRefresher::take_done`].
#[derive(Debug, Default)]
pub struct Attempts {
    /// Pids whose JVM wrote a new perf map.
    pub written: Vec<u32>,
    /// The `profiler_jvm_attach_total` outcome of each attempt on a JVM.
    pub outcomes: Vec<&'static str>,
}

/// Asks JVMs for their perf maps, rate-limited per process.
pub struct PerfMapRefresher {
    proc_root: PathBuf,
    every: Duration,
    /// Per process: when it was last asked, and how long to wait before asking again.
    last: HashMap<u32, (Instant, Duration)>,
    attempts: Arc<Mutex<Attempts>>,
}

impl PerfMapRefresher {
    /// Asks each process at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            every,
            last: HashMap::new(),
            attempts: Arc::default(),
        }
    }

    /// Processes whose samples fell in code no perf map named: each one whose wait is over
    /// is asked now, on a thread of its own. Processes that are not HotSpot cost one read of
    /// their maps and are then not looked at again for a while.
    pub fn request(&mut self, pids: impl IntoIterator<Item = u32>) {
        let now = Instant::now();
        for pid in pids {
            let wait = match self.last.get(&pid) {
                Some(&(at, wait)) if now.duration_since(at) < wait => continue,
                Some(&(_, wait)) => (wait * 2).min(self.every),
                None => FIRST_WAIT.min(self.every),
            };
            if self.last.len() >= MAX_REMEMBERED {
                let every = self.every;
                self.last
                    .retain(|_, (at, _)| now.duration_since(*at) < every);
            }
            self.last.insert(pid, (now, wait));
            let proc = self.proc_root.clone();
            let attempts = self.attempts.clone();
            let spawned = std::thread::Builder::new()
                .name("jvm-attach".into())
                .spawn(move || {
                    // A process that exited meanwhile is not counted here.
                    let outcome = ask_for_perf_map(&proc, pid).filter(|&o| o != "gone");
                    if let (Some(outcome), Ok(mut attempts)) = (outcome, attempts.lock()) {
                        if outcome == "done" {
                            attempts.written.push(pid);
                        }
                        attempts.outcomes.push(outcome);
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(pid, %error, "no thread to ask a JVM for its perf map");
            }
        }
    }

    /// What the attempts since the last call came to.
    pub fn take_done(&self) -> Attempts {
        self.attempts
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that is not a JVM is looked at once per period and never counted.
    #[test]
    fn asks_each_process_at_most_once_per_period() {
        let mut refresher = PerfMapRefresher::new(Duration::from_secs(3600));
        let me = std::process::id();
        refresher.request([me, me]);
        refresher.request([me]);
        assert_eq!(refresher.last.len(), 1);
        std::thread::sleep(Duration::from_millis(200));
        let done = refresher.take_done();
        assert!(
            done.written.is_empty() && done.outcomes.is_empty(),
            "{done:?}"
        );
    }
}
