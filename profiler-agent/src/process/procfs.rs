//! The one /proc reader for what several stages share: which pids exist, a process's CPU
//! time, start time and resident pages from /proc/PID/stat (the agent's own, for its
//! metrics, and every other process's, for the registry and the trigger monitor), its
//! command line, and the units those counts are in ([`clock_ticks`], [`page_size`], read
//! once). Each reading returns `None` (or skips the pid) when the process is gone or the
//! file is unreadable.

use std::{path::Path, sync::LazyLock};

/// The pids under `proc_root`; empty if it cannot be read.
pub fn pids(proc_root: &Path) -> impl Iterator<Item = u32> + use<> {
    std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// What the monitor and the process registry read from /proc/PID/stat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// utime + stime, in clock ticks (fields 14 and 15).
    pub cpu_ticks: u64,
    /// Clock ticks after boot (field 22): with the pid, identifies a process.
    pub start_time: u64,
    /// Resident pages (field 24).
    pub rss_pages: u64,
}

/// /proc/PID/stat of the process directory `proc_pid` (`/proc/self` for the agent).
pub fn stat(proc_pid: &Path) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(proc_pid.join("stat")).ok()?)
}

/// The fields of [`Stat`] from the text of a /proc/PID/stat file.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    // comm (field 2) may contain spaces and parentheses: fields resume after the last ')',
    // at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        start_time: field(22)?,
        rss_pages: field(24)?,
    })
}

/// Clock ticks per second, the unit of [`Stat::cpu_ticks`] and [`Stat::start_time`]
/// (`sysconf(_SC_CLK_TCK)`, 100 if it fails).
pub fn clock_ticks() -> u64 {
    static TICKS: LazyLock<u64> = LazyLock::new(|| sysconf_or(libc::_SC_CLK_TCK, 100));
    *TICKS
}

/// Bytes per page, the unit of [`Stat::rss_pages`] (`sysconf(_SC_PAGESIZE)`, 4096 if it
/// fails).
pub fn page_size() -> u64 {
    static SIZE: LazyLock<u64> = LazyLock::new(|| sysconf_or(libc::_SC_PAGESIZE, 4096));
    *SIZE
}

fn sysconf_or(name: libc::c_int, fallback: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value)
        .ok()
        .filter(|v| *v > 0)
        .unwrap_or(fallback)
}

/// The command line, arguments joined by spaces; `None` for kernel threads (which have
/// none) and vanished processes.
pub fn command_line(proc_pid: &Path) -> Option<String> {
    let raw = std::fs::read(proc_pid.join("cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&raw)
            .trim_end_matches('\0')
            .replace('\0', " "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_comm() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("stat"),
            "7 (a b) c) R 1 1 1 0 -1 0 0 0 0 0 30 12 0 0 20 0 1 0 555 1000 77 rest",
        )
        .unwrap();
        let s = stat(dir.path()).unwrap();
        assert_eq!((s.cpu_ticks, s.start_time, s.rss_pages), (42, 555, 77));
        std::fs::write(dir.path().join("stat"), "7 (short) R 1").unwrap();
        assert_eq!(stat(dir.path()), None);
        assert_eq!(parse_stat("7 no-parenthesis R 1 1 1"), None);
        assert_eq!(stat(&dir.path().join("absent")), None);
    }

    #[test]
    fn this_process_and_its_units() {
        let me = stat(Path::new("/proc/self")).expect("/proc/self/stat");
        assert!(me.start_time > 0);
        assert!(me.rss_pages * page_size() > 1 << 20, "{me:?}");
        // Linux reports stat times in USER_HZ, 100 on every architecture it supports.
        assert_eq!(clock_ticks(), 100);
        assert!(page_size().is_power_of_two() && page_size() >= 4096);
    }

    #[test]
    fn command_lines_and_pids() {
        let root = tempfile::tempdir().unwrap();
        for (pid, cmdline) in [("12", &b"java\0-jar\0a.jar\0"[..]), ("13", b"")] {
            std::fs::create_dir(root.path().join(pid)).unwrap();
            std::fs::write(root.path().join(pid).join("cmdline"), cmdline).unwrap();
        }
        std::fs::create_dir(root.path().join("self")).unwrap();
        let mut found: Vec<u32> = pids(root.path()).collect();
        found.sort();
        assert_eq!(found, [12, 13]);
        assert_eq!(
            command_line(&root.path().join("12")).as_deref(),
            Some("java -jar a.jar")
        );
        assert_eq!(command_line(&root.path().join("13")), None);
        assert_eq!(command_line(&root.path().join("14")), None);
        assert_eq!(pids(&root.path().join("absent")).count(), 0);
    }
}
