//! Early snapshots: a thread that snapshots each process the kernel announces at its first
//! sample, within milliseconds, so that a process living a few milliseconds (a shell
//! script's commands, a cron job) still has its mappings when the drain, up to a second
//! later, finds it gone. The drain prefers its own fresh snapshot and falls back to these.
//! The announcements come through [`Announcements`] (the kernel's ring buffer implements it
//! in [`crate::bpf`]).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use super::{ProcessInfo, ProcessSource, ProcfsProcesses};

/// How long the thread waits for an announcement before checking whether to stop.
const POLL: Duration = Duration::from_millis(200);

/// Where announced pids come from: the kernel's ring buffer, or a test double.
pub trait Announcements: Send + 'static {
    fn wait(&mut self, timeout: Duration) -> Vec<u32>;
}

/// The snapshotting thread; stops when dropped.
pub struct EarlySnapshots {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EarlySnapshots {
    /// Starts the thread; snapshots of live processes arrive on the returned receiver, each
    /// first shown to `on_snapshot` (which loads its unwind tables) on the thread, which
    /// also calls it with `None` after each wait for announcements (at least every
    /// 200 ms).
    pub fn start(
        mut announcements: impl Announcements,
        proc_root: impl Into<PathBuf>,
        container_id_cache_size: usize,
        mut on_snapshot: impl FnMut(Option<&ProcessInfo>) + Send + 'static,
    ) -> std::io::Result<(Self, mpsc::Receiver<ProcessInfo>)> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut processes =
            ProcfsProcesses::with_container_id_cache(proc_root, container_id_cache_size);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("early-snapshots".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for pid in announcements.wait(POLL) {
                            let info = processes.snapshot(pid, "");
                            if info.vanished {
                                continue;
                            }
                            on_snapshot(Some(&info));
                            // The receiver may be gone (nobody takes the snapshots): the
                            // thread still serves `on_snapshot`.
                            let _ = tx.send(info);
                        }
                        on_snapshot(None);
                    }
                })?
        };
        Ok((
            Self {
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }
}

impl Drop for EarlySnapshots {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scripted(Vec<Vec<u32>>);

    impl Announcements for Scripted {
        fn wait(&mut self, timeout: Duration) -> Vec<u32> {
            if self.0.is_empty() {
                std::thread::sleep(timeout.min(Duration::from_millis(10)));
                return Vec::new();
            }
            self.0.remove(0)
        }
    }

    #[test]
    fn snapshots_live_announced_processes_and_skips_gone_ones() {
        let me = std::process::id();
        let gone = u32::MAX - 1;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let shown = seen.clone();
        let (snapshots, rx) = EarlySnapshots::start(
            Scripted(vec![vec![gone, me]]),
            "/proc",
            16,
            move |info: Option<&ProcessInfo>| {
                if let Some(info) = info {
                    shown.lock().unwrap().push(info.pid);
                }
            },
        )
        .unwrap();
        let info = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(info.pid, me);
        assert_eq!(*seen.lock().unwrap(), [me]);
        assert!(!info.mappings.is_empty());
        drop(snapshots);
        assert!(rx.try_recv().is_err(), "nothing for the gone pid");
    }
}
