//! Process discovery, as Alloy's `discovery.process`: every process on the host becomes a
//! target carrying `__process_pid__` (so it matches exactly that process), its container id
//! when it runs in one, and `__meta_process_exe`, `__meta_process_commandline`,
//! `__meta_process_comm` (the kernel's 15-byte task name, which names a process whose
//! executable is a memfd or deleted) and `__meta_process_username` for relabel rules to
//! select or name it. Processes that vanish
//! mid-read are skipped: the next scan is a fresh one. [`ProcessDiscovery`] is the provider:
//! a fresh [`scan`] of /proc every `refresh_interval`, off the async threads.
//!
//! A process that starts and ends between two scans is never listed. [`SnapshotTargets`]
//! gives it, at the drain, the labels a scan would have: read from /proc while it still
//! runs, else from the agent's snapshot of it (executable, comm, container), relabeled by
//! the same rules.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    Provider,
    relabel::{self, RelabelConfig},
};
use crate::{
    labels::Labels,
    process::{ProcessInfo, cgroup, procfs},
    targets::{CONTAINER_ID, LateTargets, PROCESS_PID},
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

    fn lists_every_process(&self) -> bool {
        true
    }
}

/// Labels for processes no scan listed, as [`scan`] would have made them, relabeled.
#[derive(Debug)]
pub struct SnapshotTargets {
    proc_root: PathBuf,
    relabel: Vec<RelabelConfig>,
    users: HashMap<u32, String>,
}

impl SnapshotTargets {
    pub fn new(proc_root: impl Into<PathBuf>, relabel: Vec<RelabelConfig>) -> Self {
        let proc_root = proc_root.into();
        let users = read_users(&proc_root);
        Self {
            proc_root,
            relabel,
            users,
        }
    }

    /// What a scan would list for `process`: /proc's labels while the same executable still
    /// runs under its pid, else those the snapshot holds.
    fn discovered(&self, process: &ProcessInfo) -> Labels {
        if let Some(labels) = process_labels(&self.proc_root, process.pid, &self.users)
            && process
                .exe
                .as_ref()
                .is_none_or(|exe| labels.get(EXE) == Some(&exe.display().to_string()))
        {
            return labels;
        }
        let mut labels = Labels::new();
        labels.insert(PROCESS_PID.into(), process.pid.to_string());
        if let Some(exe) = &process.exe {
            labels.insert(EXE.into(), exe.display().to_string());
        }
        if !process.comm.is_empty() {
            labels.insert(COMM.into(), process.comm.clone());
        }
        if let Some(id) = &process.container_id {
            labels.insert(CONTAINER_ID.into(), id.clone());
        }
        labels
    }
}

impl LateTargets for SnapshotTargets {
    fn labels_of(&self, process: &ProcessInfo) -> Option<Labels> {
        relabel::process(self.discovered(process), &self.relabel)
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
    let users = read_users(proc_root);
    let mut targets: Vec<Labels> = procfs::pids(proc_root)
        .filter_map(|pid| process_labels(proc_root, pid, &users))
        .collect();
    targets.sort_by(|a, b| a.get(PROCESS_PID).cmp(&b.get(PROCESS_PID)));
    targets
}

/// uid -> user name, from the host's passwd file, else the agent's own.
fn read_users(proc_root: &Path) -> HashMap<u32, String> {
    host_passwd(proc_root)
        .or_else(|| std::fs::read_to_string("/etc/passwd").ok())
        .map(|text| users(&text))
        .unwrap_or_default()
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
    labels.insert(PROCESS_PID.into(), pid.to_string());
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
        labels.insert(CONTAINER_ID.into(), id);
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
    fn a_process_no_scan_listed_is_labeled_as_a_scan_would_from_proc_or_its_snapshot() {
        let rules = crate::config::AgentConfig::embedded_default().relabel;
        // Still running: /proc's labels, the same as a scan's, relabeled.
        let live = SnapshotTargets::new("/proc", Vec::new());
        let me = ProcessInfo {
            exe: std::env::current_exe().ok(),
            ..ProcessInfo::unknown(std::process::id(), "whatever")
        };
        let scanned = scan(Path::new("/proc"))
            .into_iter()
            .find(|t| t[PROCESS_PID] == std::process::id().to_string())
            .unwrap();
        let mut got = live.labels_of(&me).unwrap();
        // The comm of a test thread may differ between the two reads.
        got.remove(COMM);
        let mut want = scanned;
        want.remove(COMM);
        assert_eq!(got, want);

        // Gone: from the snapshot, by the embedded default's rules.
        let empty = tempfile::tempdir().unwrap();
        let gone = SnapshotTargets::new(empty.path(), rules);
        let service = |exe: Option<&str>, comm: &str, container: Option<&str>| {
            let process = ProcessInfo {
                exe: exe.map(PathBuf::from),
                container_id: container.map(str::to_owned),
                ..ProcessInfo::unknown(4242, comm)
            };
            gone.labels_of(&process)
                .map(|l| (l[PROCESS_PID].clone(), l.get("service_name").cloned()))
        };
        let named = |s: &str| Some(("4242".to_owned(), Some(s.to_owned())));
        assert_eq!(
            service(
                Some("/usr/libexec/gcc/x86_64-linux-gnu/12/cc1"),
                "cc1",
                None
            ),
            named("cc1")
        );
        assert_eq!(
            service(Some("/usr/bin/x86_64-linux-gnu-as"), "as", None),
            named("x86_64-linux-gnu-as")
        );
        assert_eq!(service(None, "as", None), named("as"));
        assert_eq!(
            service(Some("/memfd:jit (deleted)"), "node", None),
            named("node")
        );
        // In a container: left to the container's target.
        assert_eq!(service(Some("/usr/bin/gzip"), "gzip", Some("abc")), None);
    }

    #[test]
    fn missing_proc_gives_nothing() {
        assert!(scan(Path::new("/nonexistent-proc")).is_empty());
    }
}
