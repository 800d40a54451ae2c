//! Process discovery, as Alloy's `discovery.process`: every process on the host becomes a
//! target carrying `__process_pid__` (so it matches exactly that process), its container id
//! when it runs in one, and `__meta_process_exe`, `__meta_process_commandline`,
//! `__meta_process_comm` (the kernel's 15-byte task name, which names a process whose
//! executable is a memfd or deleted) and `__meta_process_username` for relabel rules to
//! select or name it. Processes that vanish
//! mid-read are skipped: the next scan is a fresh one. [`ProcessDiscovery`] is the provider:
//! a fresh [`scan`] of /proc every `refresh_interval`, off the async threads.

use std::{collections::HashMap, path::Path, time::Duration};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Provider;
use crate::{
    labels::Labels,
    process::{cgroup, procfs},
};

pub const EXE: &str = "__meta_process_exe";
pub const COMMANDLINE: &str = "__meta_process_commandline";
pub const COMM: &str = "__meta_process_comm";
pub const USERNAME: &str = "__meta_process_username";
pub const UID: &str = "__meta_process_uid";

/// `[discovery.process]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessDiscoveryConfig {
    /// How often /proc is scanned (default 60s, as Alloy's discovery.process).
    #[serde(with = "crate::duration::positive")]
    pub refresh_interval: Duration,
}

impl Default for ProcessDiscoveryConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(60),
        }
    }
}

/// `discovery.process`: scans /proc every `period`.
pub struct ProcessDiscovery {
    period: Duration,
}

impl ProcessDiscovery {
    pub fn new(period: Duration) -> Self {
        Self { period }
    }
}

impl Provider for ProcessDiscovery {
    fn name(&self) -> &'static str {
        "process"
    }

    fn run(self: Box<Self>, tx: watch::Sender<Vec<Labels>>) -> BoxFuture<'static, ()> {
        Box::pin(scan_every(self.period, tx))
    }
}

async fn scan_every(period: Duration, tx: watch::Sender<Vec<Labels>>) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = tx.closed() => return,
        }
        let scan = tokio::task::spawn_blocking(|| scan(Path::new("/proc")));
        if let Ok(targets) = scan.await {
            tx.send_if_modified(|current| {
                let changed = *current != targets;
                *current = targets;
                changed
            });
        }
    }
}

/// One scan of `proc_root` (normally /proc). Kernel threads (no executable) are left out.
pub fn scan(proc_root: &Path) -> Vec<Labels> {
    let users = host_passwd(proc_root)
        .or_else(|| std::fs::read_to_string("/etc/passwd").ok())
        .map(|text| users(&text))
        .unwrap_or_default();
    let mut targets: Vec<Labels> = procfs::pids(proc_root)
        .filter_map(|pid| process_labels(proc_root, pid, &users))
        .collect();
    targets.sort_by(|a, b| {
        a.get(crate::targets::PROCESS_PID)
            .cmp(&b.get(crate::targets::PROCESS_PID))
    });
    targets
}

fn process_labels(proc_root: &Path, pid: u32, users: &HashMap<u32, String>) -> Option<Labels> {
    let dir = proc_root.join(pid.to_string());
    // Kernel threads have no executable; nothing of theirs is profiled.
    let exe = std::fs::read_link(dir.join("exe")).ok()?;
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    let commandline = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mut labels = Labels::new();
    labels.insert(crate::targets::PROCESS_PID.into(), pid.to_string());
    labels.insert(EXE.into(), exe.display().to_string());
    labels.insert(COMMANDLINE.into(), commandline);
    if let Ok(comm) = std::fs::read_to_string(dir.join("comm")) {
        labels.insert(COMM.into(), comm.trim_end_matches('\n').to_owned());
    }
    labels.insert(UID.into(), uid.to_string());
    if let Some(name) = users.get(&uid) {
        labels.insert(USERNAME.into(), name.clone());
    }
    if let Some(id) = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|t| cgroup::container_id(&t))
    {
        labels.insert(crate::targets::CONTAINER_ID.into(), id);
    }
    Some(labels)
}

/// Larger passwd files are not read.
const MAX_PASSWD_BYTES: u64 = 4 << 20;

/// The host's passwd file, seen from pid 1's root (the host's, with `hostPID`), opened like
/// every file inside a process's root: through [`crate::procfile`].
fn host_passwd(proc_root: &Path) -> Option<String> {
    let opened = crate::procfile::ProcRoot::of_pid(proc_root, 1)
        .and_then(|root| root.open(Path::new("/etc/passwd"), MAX_PASSWD_BYTES))
        .ok()?;
    let bytes = opened.read_capped(MAX_PASSWD_BYTES).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// uid -> user name from a passwd file's text.
fn users(passwd: &str) -> HashMap<u32, String> {
    passwd
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            Some((uid, name.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::PROCESS_PID;

    #[test]
    fn finds_this_process_with_its_exe_and_user() {
        let targets = scan(Path::new("/proc"));
        let me = std::process::id().to_string();
        let mine = targets
            .iter()
            .find(|t| t.get(PROCESS_PID) == Some(&me))
            .expect("this process is discovered");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(mine[EXE], exe.display().to_string());
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(mine[COMM], comm.trim_end());
        assert!(mine[COMMANDLINE].contains(exe.file_name().unwrap().to_str().unwrap()));
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        assert_eq!(mine[UID], uid.to_string());
        if uid == 0 {
            assert_eq!(mine.get(USERNAME).map(String::as_str), Some("root"));
        }
        // Kernel threads are not targets.
        assert!(targets.iter().all(|t| t[PROCESS_PID] != "2"));
    }

    #[test]
    fn passwd_parsing() {
        let u = users(
            "root:x:0:0:root:/root:/bin/bash\nbad line\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        );
        assert_eq!(u[&0], "root");
        assert_eq!(u[&1000], "alice");
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn host_passwd_is_read_inside_pid_1s_root_and_never_from_a_fifo() {
        let proc = tempfile::tempdir().unwrap();
        let etc = proc.path().join("1/root/etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        assert_eq!(users(&host_passwd(proc.path()).unwrap())[&0], "root");
        std::fs::remove_file(etc.join("passwd")).unwrap();
        let fifo = std::ffi::CString::new(etc.join("passwd").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert_eq!(
            host_passwd(proc.path()),
            None,
            "a FIFO is refused, not waited on"
        );
    }

    #[test]
    fn missing_proc_gives_nothing() {
        assert!(scan(Path::new("/nonexistent-proc")).is_empty());
    }
}
