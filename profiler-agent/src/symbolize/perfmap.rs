//! JIT symbol maps in perf's format (`/tmp/perf-PID.map`: `START SIZE name` in hex), written
//! by runtimes such as the JVM with perf-map-agent, V8 `--perf-basic-prof` and .NET. They name
//! anonymous executable memory that no ELF file describes.
//!
//! The file is written by the profiled process, so it is opened inside the process's root
//! through [`crate::procfile`] (a FIFO, a device or a file over [`MAX_PERF_MAP_BYTES`] is
//! refused unread) and named by the pid the process sees: the last `NSpid` of
//! `/proc/PID/status`, which differs from the host pid inside a pid namespace.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::procfile::{ProcFileError, ProcRoot};

/// Entries past this are ignored: the file is written by the profiled process.
const MAX_ENTRIES: usize = 1 << 20;
/// Larger perf maps are refused unread.
pub const MAX_PERF_MAP_BYTES: u64 = 64 << 20;

#[derive(Debug, Default)]
pub struct PerfMap {
    /// Non-overlapping (start, end, index into `names`), sorted by start.
    entries: Vec<(u64, u64, u32)>,
    names: Vec<Box<str>>,
    /// The file's size when it was read: a runtime appends to its map as it compiles.
    pub size: u64,
}

impl PerfMap {
    /// The path of the perf map of a process whose own pid (in its namespace) is `ns_pid`.
    pub fn path_for(ns_pid: u32) -> PathBuf {
        PathBuf::from(format!("/tmp/perf-{ns_pid}.map"))
    }

    /// Reads `/tmp/perf-<ns_pid>.map` inside `root`, at most [`MAX_PERF_MAP_BYTES`].
    pub fn open(root: &ProcRoot, ns_pid: u32) -> Result<Self, ProcFileError> {
        Self::open_unless(root, ns_pid, None).map(|map| map.unwrap_or_default())
    }

    /// Like [`PerfMap::open`], but `None` without reading when the file still has
    /// `known_size` bytes (the map read before is still whole).
    pub fn open_unless(
        root: &ProcRoot,
        ns_pid: u32,
        known_size: Option<u64>,
    ) -> Result<Option<Self>, ProcFileError> {
        let opened = root.open(&Self::path_for(ns_pid), MAX_PERF_MAP_BYTES)?;
        if known_size == Some(opened.size) {
            return Ok(None);
        }
        let bytes = opened.read_capped(MAX_PERF_MAP_BYTES)?;
        let mut map = Self::parse(&String::from_utf8_lossy(&bytes));
        map.size = bytes.len() as u64;
        Ok(Some(map))
    }

    /// Parses a map's lines in order: a line's range replaces whatever earlier lines said of
    /// those addresses (code freed and reused, a method recompiled), so a name is used only
    /// while its code is still there.
    pub fn parse(text: &str) -> Self {
        let mut ranges: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
        let mut names = Vec::new();
        for (start, end, name) in text.lines().take(MAX_ENTRIES).filter_map(parse_line) {
            let index = names.len() as u32;
            names.push(name.into());
            let overlapping: Vec<(u64, (u64, u32))> = ranges
                .range(..end)
                .rev()
                .take_while(|(_, (e, _))| *e > start)
                .map(|(&s, &v)| (s, v))
                .collect();
            for (s, (e, i)) in overlapping {
                ranges.remove(&s);
                if s < start {
                    ranges.insert(s, (start, i));
                }
                if e > end {
                    ranges.insert(end, (e, i));
                }
            }
            ranges.insert(start, (end, index));
        }
        Self {
            entries: ranges.into_iter().map(|(s, (e, i))| (s, e, i)).collect(),
            names,
            size: text.len() as u64,
        }
    }

    pub fn lookup(&self, address: u64) -> Option<&str> {
        let i = self.entries.partition_point(|e| e.0 <= address);
        let &(_, end, name) = self.entries[..i].last()?;
        (address < end).then(|| &*self.names[name as usize])
    }

    /// How many distinct ranges are named.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `START SIZE name`, both numbers in hex with or without `0x`; empty ranges and names are
/// skipped.
fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut parts = line.splitn(3, ' ');
    let start = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
    let size = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
    let name = parts.next()?.trim();
    let end = start.saturating_add(size);
    (!name.is_empty() && end > start).then_some((start, end, name))
}

/// The pid `pid` has in its own pid namespace: the last field of the `NSpid:` line of
/// `/proc/PID/status` (`status` is that file's text).
pub fn namespace_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// [`namespace_pid`] of process `pid` under the procfs mount `proc`, or `pid` itself when
/// the kernel does not say (before 4.1) or the process is gone.
pub fn namespace_pid_of(proc: &Path, pid: u32) -> u32 {
    std::fs::read_to_string(proc.join(format!("{pid}/status")))
        .ok()
        .and_then(|status| namespace_pid(&status))
        .unwrap_or(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_looks_up() {
        let m = PerfMap::parse(
            "7f0000001000 40 LInterpreter;\n7f0000002000 0x10 Lcom/x/Y;.run()V\nbogus line\n",
        );
        assert_eq!(m.lookup(0x7f00_0000_1000), Some("LInterpreter;"));
        assert_eq!(m.lookup(0x7f00_0000_103f), Some("LInterpreter;"));
        assert_eq!(m.lookup(0x7f00_0000_1040), None);
        assert_eq!(m.lookup(0x7f00_0000_2008), Some("Lcom/x/Y;.run()V"));
    }

    /// Code freed and reused: a later line's range wins over what earlier lines said of its
    /// addresses, and what they said of the others still holds.
    #[test]
    fn later_lines_replace_the_ranges_they_cover() {
        let m = PerfMap::parse(
            "1000 100 old_big\n\
             1040 10 new_inside\n\
             2000 10 old_small\n\
             1ff0 100 new_over\n\
             3000 10 same_start\n\
             3000 20 same_start_later\n\
             4000 0 empty\n",
        );
        assert_eq!(m.lookup(0x1000), Some("old_big"));
        assert_eq!(m.lookup(0x1045), Some("new_inside"));
        assert_eq!(m.lookup(0x1050), Some("old_big"));
        assert_eq!(m.lookup(0x10ff), Some("old_big"));
        assert_eq!(m.lookup(0x1ff0), Some("new_over"));
        assert_eq!(m.lookup(0x2005), Some("new_over"));
        assert_eq!(m.lookup(0x3005), Some("same_start_later"));
        assert_eq!(m.lookup(0x3015), Some("same_start_later"));
        assert_eq!(m.lookup(0x4000), None);
        assert_eq!(m.len(), 5);
        // An older line whose range now lies inside a newer one is gone entirely.
        let m = PerfMap::parse("1040 10 old_inside\n1000 100 new_big\n");
        assert_eq!(m.lookup(0x1045), Some("new_big"));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn a_map_of_the_same_size_is_not_read_again() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("tmp")).unwrap();
        let path = tmp.path().join("tmp/perf-5.map");
        std::fs::write(&path, "1000 10 first\n").unwrap();
        let root = ProcRoot::new(tmp.path()).unwrap();
        let map = PerfMap::open(&root, 5).unwrap();
        assert_eq!(map.size, 14);
        assert!(
            PerfMap::open_unless(&root, 5, Some(map.size))
                .unwrap()
                .is_none()
        );
        std::fs::write(&path, "1000 10 first\n2000 10 second\n").unwrap();
        let grown = PerfMap::open_unless(&root, 5, Some(map.size))
            .unwrap()
            .unwrap();
        assert_eq!(grown.lookup(0x2001), Some("second"));
    }

    use std::os::unix::fs::symlink;

    /// /proc/PID/status of a process that is pid 7 in its container, 4242 on the host.
    const STATUS: &str = "Name:\tjava\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        Ngid:\t0\nPid:\t4242\nPPid:\t4200\nTracerPid:\t0\nNStgid:\t4242\t7\n\
        NSpid:\t4242\t7\nNSpgid:\t4242\t7\nNSsid:\t4200\t1\nThreads:\t12\n";

    #[test]
    fn namespace_pid_is_the_last_nspid() {
        assert_eq!(namespace_pid(STATUS), Some(7));
        assert_eq!(namespace_pid("Pid:\t9\nNSpid:\t9\n"), Some(9));
        assert_eq!(namespace_pid("Pid:\t9\n"), None);
        // This process has a status file; a vanished pid falls back to itself.
        let me = std::process::id();
        let proc = Path::new("/proc");
        assert!(namespace_pid_of(proc, me) > 0);
        assert_eq!(namespace_pid_of(proc, u32::MAX - 3), u32::MAX - 3);
    }

    #[test]
    fn reads_the_map_named_by_the_namespace_pid_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("tmp")).unwrap();
        let ns_pid = namespace_pid(STATUS).unwrap();
        std::fs::write(
            tmp.path().join(format!("tmp/perf-{ns_pid}.map")),
            "1000 10 jitted\n",
        )
        .unwrap();
        let root = ProcRoot::new(tmp.path()).unwrap();
        let map = PerfMap::open(&root, ns_pid).unwrap();
        assert_eq!(map.lookup(0x1008), Some("jitted"));
        assert!(
            PerfMap::open(&root, 4242).is_err(),
            "the host pid names no map"
        );
    }

    #[test]
    fn hostile_perf_maps_are_refused_unread() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tmp");
        std::fs::create_dir(&dir).unwrap();
        std::fs::File::create(dir.join("perf-1.map"))
            .unwrap()
            .set_len(64 << 30)
            .unwrap();
        symlink("/dev/zero", dir.join("perf-2.map")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("perf-3.map").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::fs::create_dir_all(tmp.path().join("dev")).unwrap();
        let zero = std::ffi::CString::new(tmp.path().join("dev/zero").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; the test runs as root (mknod needs it).
        let made =
            unsafe { libc::mknod(zero.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 5)) };
        let root = ProcRoot::new(tmp.path()).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(PerfMap::open(&root, 1).unwrap_err().reason(), "too_large");
        let zero = PerfMap::open(&root, 2).unwrap_err().reason();
        // The link resolves to the root's own /dev/zero: a device when mknod worked.
        assert_eq!(
            zero,
            if made == 0 {
                "not_regular"
            } else {
                "open_failed"
            }
        );
        assert_eq!(PerfMap::open(&root, 3).unwrap_err().reason(), "not_regular");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
