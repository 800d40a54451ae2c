//! The process registry: what a pid was when it was first sampled. Each snapshot holds the
//! container id (from /proc/PID/cgroup, see [`cgroup`]), the
//! executable mappings from /proc/PID/maps and an open handle to every mapped file (through
//! /proc/PID/map_files, so deleted and replaced binaries still resolve), shared between
//! processes by device and inode. Mapped files are opened through [`crate::procfile`]: a
//! process cannot make the agent open a FIFO, a device or a file outside its root. Processes
//! that exit before their samples are turned into a profile keep their names.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
};

pub mod cgroup;
pub mod early;
pub mod maps;
pub mod procfs;

use std::os::unix::ffi::OsStrExt as _;

use crate::procfile;

/// Identity of a mapped file: the device and inode from /proc/PID/maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
}

/// What a mapping is backed by.
#[derive(Clone, Debug)]
pub enum MappingKind {
    /// A file; `file` is `None` when it could not be opened (counted by the caller).
    File {
        id: FileId,
        file: Option<Arc<File>>,
    },
    Vdso,
    /// Anonymous executable memory: JIT code and the like.
    Anonymous,
}

/// One executable mapping of a process.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// Path as /proc/PID/maps shows it (`[vdso]`, `[anon]` for the others).
    pub path: String,
    pub kind: MappingKind,
}

impl Mapping {
    pub fn contains(&self, address: u64) -> bool {
        (self.start..self.end).contains(&address)
    }

    /// The file name without directories, for `module+0xoffset` names.
    pub fn module_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// The offset of `address` in the mapped file.
    pub fn file_offset(&self, address: u64) -> u64 {
        address - self.start + self.offset
    }
}

/// A process as it was at its first sample.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<PathBuf>,
    /// The container the process runs in; None on the host.
    pub container_id: Option<String>,
    /// Executable mappings sorted by start address.
    pub mappings: Vec<Mapping>,
    /// Set when /proc/PID could not be read (the process had already exited).
    pub vanished: bool,
}

impl ProcessInfo {
    /// A process about which nothing but its pid and comm is known.
    pub fn unknown(pid: u32, comm: &str) -> Self {
        Self {
            pid,
            comm: comm.to_owned(),
            vanished: true,
            ..Self::default()
        }
    }

    pub fn mapping_for(&self, address: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= address);
        self.mappings[..i].last().filter(|m| m.contains(address))
    }
}

/// Produces process snapshots: /proc in production, a double in tests.
pub trait ProcessSource {
    fn snapshot(&mut self, pid: u32, comm: &str) -> ProcessInfo;
    /// Cumulative counts of what could not be read, for metrics.
    fn stats(&self) -> ProcessStats {
        ProcessStats::default()
    }
}

/// What a [`ProcessSource`] could not read, cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Processes whose maps could not be read.
    pub unreadable_processes: u64,
    pub container_ids: crate::cache::CacheStats,
}

/// Reads processes from a procfs mount and opens each mapped file once while snapshots use
/// it: handles are shared by file identity and close when the last snapshot holding them is
/// dropped, so open files stay bounded by the processes being profiled.
pub struct ProcfsProcesses {
    root: PathBuf,
    open_files: HashMap<FileId, Weak<File>>,
    container_ids: cgroup::ContainerIdCache,
    pub unreadable_processes: u64,
    pub unopenable_files: u64,
}

/// pyroscope.ebpf's default `container_id_cache_size`.
pub const DEFAULT_CONTAINER_ID_CACHE_SIZE: usize = 1024;

impl Default for ProcfsProcesses {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcfsProcesses {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_container_id_cache(root, DEFAULT_CONTAINER_ID_CACHE_SIZE)
    }

    /// `container_id_cache_size` entries of pid -> container id, checked by start time.
    pub fn with_container_id_cache(root: impl Into<PathBuf>, size: usize) -> Self {
        let root = root.into();
        Self {
            container_ids: cgroup::ContainerIdCache::new(&root, size),
            root,
            open_files: HashMap::new(),
            unreadable_processes: 0,
            unopenable_files: 0,
        }
    }

    /// Hits, misses and evictions of the pid -> container id cache.
    pub fn container_id_stats(&self) -> crate::cache::CacheStats {
        self.container_ids.stats()
    }

    fn open_mapped_file(
        &mut self,
        pid: u32,
        id: FileId,
        start: u64,
        end: u64,
        path: &Path,
    ) -> Option<Arc<File>> {
        if let Some(file) = self.open_files.get(&id).and_then(Weak::upgrade) {
            return Some(file);
        }
        // map_files reaches the exact inode even if the path was deleted or replaced (a magic
        // link, followed on purpose); the fallback resolves the path inside the process's root
        // (containers). Both go through crate::procfile: regular files only, size-capped.
        let via_map_files = self.root.join(format!("{pid}/map_files/{start:x}-{end:x}"));
        let file = procfile::open_magic_link(&via_map_files, procfile::MAX_OBJECT_FILE_SIZE)
            .or_else(|_| {
                procfile::ProcRoot::of_pid(&self.root, pid)?
                    .open(path, procfile::MAX_OBJECT_FILE_SIZE)
            })
            .map(|opened| opened.file)
            .ok()
            .filter(|f| same_inode(f, id))
            .map(Arc::new);
        match &file {
            Some(f) => {
                if self.open_files.len() >= 4096 {
                    self.open_files.retain(|_, w| w.strong_count() > 0);
                }
                self.open_files.insert(id, Arc::downgrade(f));
            }
            None => {
                self.unopenable_files += 1;
                tracing::debug!(pid, path = %path.display(), "mapped file not openable");
            }
        }
        file
    }
}

fn same_inode(file: &File, id: FileId) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    file.metadata()
        .map(|m| m.ino() == id.inode)
        .unwrap_or(false)
}

impl ProcessSource for ProcfsProcesses {
    fn stats(&self) -> ProcessStats {
        ProcessStats {
            unreadable_processes: self.unreadable_processes,
            container_ids: self.container_ids.stats(),
        }
    }

    fn snapshot(&mut self, pid: u32, comm: &str) -> ProcessInfo {
        let dir = self.root.join(pid.to_string());
        let Ok(maps) = std::fs::read(dir.join("maps")) else {
            self.unreadable_processes += 1;
            return ProcessInfo::unknown(pid, comm);
        };
        let mut mappings = Vec::new();
        for entry in maps::parse(&maps).filter(|e| e.executable) {
            let (path, kind) = if entry.is_file() {
                let id = FileId {
                    dev_major: entry.dev_major,
                    dev_minor: entry.dev_minor,
                    inode: entry.inode,
                };
                let file_path = Path::new(std::ffi::OsStr::from_bytes(entry.file_path()));
                let file = self.open_mapped_file(pid, id, entry.start, entry.end, file_path);
                let shown = String::from_utf8_lossy(entry.path).into_owned();
                (shown, MappingKind::File { id, file })
            } else if entry.path == b"[vdso]" {
                ("[vdso]".to_owned(), MappingKind::Vdso)
            } else {
                ("[anon]".to_owned(), MappingKind::Anonymous)
            };
            mappings.push(Mapping {
                start: entry.start,
                end: entry.end,
                offset: entry.offset,
                path,
                kind,
            });
        }
        mappings.sort_by_key(|m| m.start);
        ProcessInfo {
            pid,
            comm: comm.to_owned(),
            exe: std::fs::read_link(dir.join("exe")).ok(),
            container_id: self.container_ids.lookup(pid),
            mappings,
            vanished: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_this_process_with_its_own_binary() {
        let mut procs = ProcfsProcesses::default();
        let me = std::process::id();
        let info = procs.snapshot(me, "test");
        assert!(!info.vanished);
        let exe = std::env::current_exe().unwrap();
        let here = snapshots_this_process_with_its_own_binary as *const () as usize as u64;
        let mapping = info.mapping_for(here).expect("mapping for our own code");
        assert_eq!(Path::new(&mapping.path), exe.as_path());
        match &mapping.kind {
            MappingKind::File { file, .. } => assert!(file.is_some()),
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            info.mappings
                .iter()
                .any(|m| matches!(m.kind, MappingKind::Vdso))
        );
    }

    #[test]
    fn vanished_process_is_marked_not_fatal() {
        let mut procs = ProcfsProcesses::default();
        let info = procs.snapshot(u32::MAX - 1, "ghost");
        assert!(info.vanished);
        assert_eq!(procs.unreadable_processes, 1);
    }

    #[test]
    fn mapping_lookup_respects_bounds() {
        let m = |start, end| Mapping {
            start,
            end,
            offset: 0x1000,
            path: "/bin/x".into(),
            kind: MappingKind::Anonymous,
        };
        let info = ProcessInfo {
            mappings: vec![m(0x1000, 0x2000), m(0x3000, 0x4000)],
            ..ProcessInfo::default()
        };
        assert!(info.mapping_for(0xfff).is_none());
        assert_eq!(info.mapping_for(0x1000).unwrap().start, 0x1000);
        assert!(info.mapping_for(0x2500).is_none());
        assert_eq!(info.mapping_for(0x3fff).unwrap().start, 0x3000);
        assert_eq!(
            info.mapping_for(0x3010).unwrap().file_offset(0x3010),
            0x1010
        );
    }

    /// A fake procfs with one process whose maps name `paths`, each with the inode of the
    /// file `inodes_of` the same index; there is no map_files, so the root fallback is used.
    fn fake_proc(proc: &Path, paths: &[&str], inodes_of: &[&Path]) -> ProcfsProcesses {
        use std::os::unix::fs::MetadataExt as _;
        let dir = proc.join("77");
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let maps: String = paths
            .iter()
            .zip(inodes_of)
            .enumerate()
            .map(|(i, (path, file))| {
                let inode = std::fs::metadata(file).map(|m| m.ino()).unwrap_or(1);
                let start = 0x1000 * (i + 1);
                format!(
                    "{start:x}-{:x} r-xp 00000000 08:01 {inode} {path}\n",
                    start + 0x1000
                )
            })
            .collect();
        std::fs::write(dir.join("maps"), maps).unwrap();
        ProcfsProcesses::new(proc)
    }

    #[test]
    fn the_root_fallback_opens_only_regular_files_inside_the_root() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let proc = tmp.path().join("proc");
        let root = proc.join("77/root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        // A host file, and a link to it inside the process's root (the inode even matches).
        let host = tmp.path().join("host.so");
        std::fs::write(&host, "host").unwrap();
        symlink(&host, root.join("usr/lib/escape.so")).unwrap();
        std::fs::write(root.join("usr/lib/good.so"), "good").unwrap();
        let fifo = std::ffi::CString::new(root.join("usr/lib/fifo.so").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let good = root.join("usr/lib/good.so");
        let fifo = root.join("usr/lib/fifo.so");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut procs = fake_proc(
                &proc,
                &["/usr/lib/good.so", "/usr/lib/escape.so", "/usr/lib/fifo.so"],
                &[&good, &host, &fifo],
            );
            let info = procs.snapshot(77, "app");
            let opened: Vec<bool> = info
                .mappings
                .iter()
                .map(|m| matches!(&m.kind, MappingKind::File { file: Some(_), .. }))
                .collect();
            tx.send((opened, procs.unopenable_files)).unwrap();
        });
        let (opened, unopenable) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("snapshot blocked");
        assert_eq!(opened, [true, false, false]);
        assert_eq!(unopenable, 2);
    }
}
