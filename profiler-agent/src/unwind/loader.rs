//! Keeps the kernel's unwind maps in step with the processes being sampled: for each process
//! snapshot, every executable mapping gets an entry in the (pid, address) trie pointing at its
//! file's rows, built once per file (keyed by build id, else device and inode) and shared by
//! every process mapping it. Rows live in one array of fixed size (the kernel-memory budget);
//! a table no longer used by any process stays loaded until its room is needed, so a program
//! run again and again (a shell loop) is not re-read each time. A file whose table does not
//! fit is walked with frame pointers and counted. The maps are reached through [`TableSink`]
//! (the kernel maps in `crate::bpf`, a double in tests).

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    ops::Range,
    path::{Path, PathBuf},
};

use profiler_common::{MappingInfo, UnwindRow};

use super::{
    UnwindError,
    file::{FileTable, Segment, load_bias},
};
use crate::{
    process::{FileId, MappingKind, ProcessInfo},
    procfile::{MAX_OBJECT_FILE_SIZE, ProcFileError, ProcRoot, build_id_debug_path},
};

/// Where the loader writes: the kernel program's row array and mapping trie.
pub trait TableSink {
    /// Writes `rows` at index `start` of the row array.
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> std::io::Result<()>;
    /// Adds or replaces the trie entry for `pid` and the `bits`-bit prefix of `address`
    /// (0 bits: the whole address space).
    fn insert(
        &mut self,
        pid: u32,
        address: u64,
        bits: u32,
        info: MappingInfo,
    ) -> std::io::Result<()>;
    fn remove(&mut self, pid: u32, address: u64, bits: u32);
}

/// What the loader holds and did.
pub type LoaderStats = crate::sampler::UnwindTableStats;

/// A file's rows in the array.
struct Loaded {
    rows: Range<u32>,
    base: u64,
    segments: Vec<Segment>,
    users: u32,
    /// Load order, for evicting the oldest unused table first.
    loaded_at: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum TableKey {
    BuildId(Vec<u8>),
    Inode(FileId),
}

/// One process as loaded: what its entries were built from, and the entries.
struct LoadedProcess {
    signature: Vec<(u64, u64, u64, Option<FileId>)>,
    entries: Vec<(u64, u32)>,
    tables: Vec<TableKey>,
}

/// The loader; see the module docs.
pub struct Loader<S> {
    sink: S,
    capacity: u32,
    max_rows_per_file: usize,
    /// Free runs of the row array, sorted by start, never adjacent.
    free: Vec<Range<u32>>,
    tables: HashMap<TableKey, Loaded>,
    by_inode: HashMap<FileId, TableKey>,
    /// Files already found to have no table, not read again (bounded: cleared when full).
    unavailable: HashSet<FileId>,
    processes: HashMap<u32, LoadedProcess>,
    stats: LoaderStats,
    clock: u64,
    /// Files read so far, whatever came of them.
    files_read: u64,
    /// The procfs mount processes' roots (and their debug files) are found under.
    proc: PathBuf,
}

/// Bound on [`Loader::unavailable`].
const MAX_UNAVAILABLE: usize = 4096;

impl<S: TableSink> Loader<S> {
    /// A loader for a row array of `capacity` rows.
    pub fn new(sink: S, capacity: u32) -> Self {
        Self {
            sink,
            capacity,
            max_rows_per_file: capacity as usize,
            free: std::iter::once(0..capacity)
                .filter(|r| !r.is_empty())
                .collect(),
            tables: HashMap::new(),
            by_inode: HashMap::new(),
            unavailable: HashSet::new(),
            processes: HashMap::new(),
            stats: LoaderStats::default(),
            clock: 0,
            files_read: 0,
            proc: PathBuf::from("/proc"),
        }
    }

    /// Looks for processes' debug files under another procfs mount than `/proc` (tests).
    pub fn with_proc(mut self, proc: impl Into<PathBuf>) -> Self {
        self.proc = proc.into();
        self
    }

    pub fn stats(&self) -> LoaderStats {
        LoaderStats {
            rows_used: u64::from(self.capacity)
                - self
                    .free
                    .iter()
                    .map(|r| u64::from(r.end - r.start))
                    .sum::<u64>(),
            rows_capacity: u64::from(self.capacity),
            processes: self.processes.len() as u64,
            ..self.stats
        }
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Loads (or refreshes) a process from its snapshot; does nothing when its executable
    /// mappings are the ones already loaded.
    pub fn load(&mut self, info: &ProcessInfo) {
        if info.vanished {
            return;
        }
        let signature: Vec<_> = info
            .mappings
            .iter()
            .map(|m| {
                let id = match &m.kind {
                    MappingKind::File { id, .. } => Some(*id),
                    _ => None,
                };
                (m.start, m.end, m.offset, id)
            })
            .collect();
        if self
            .processes
            .get(&info.pid)
            .is_some_and(|p| p.signature == signature)
        {
            return;
        }
        let pid = info.pid;
        let files_read = self.files_read;
        let mut entries = Vec::new();
        let mut tables = Vec::new();
        let mut insert = |sink: &mut S, stats: &mut LoaderStats, address, bits, value| {
            if sink.insert(pid, address, bits, value).is_ok() {
                entries.push((address, bits));
            } else {
                stats.entries_refused += 1;
            }
        };
        // The whole address space first: "loaded, but not this address".
        let process = MappingInfo {
            kind: MappingInfo::KIND_PROCESS,
            ..MappingInfo::default()
        };
        insert(&mut self.sink, &mut self.stats, 0, 0, process);
        for mapping in &info.mappings {
            let value = match &mapping.kind {
                MappingKind::File { id, file } => {
                    self.table_for(pid, *id, file.as_deref()).and_then(|key| {
                        let loaded = self.tables.get_mut(&key)?;
                        let bias = load_bias(&loaded.segments, mapping.start, mapping.offset)?;
                        loaded.users += 1;
                        tables.push(key);
                        Some(MappingInfo {
                            bias: bias.wrapping_add(loaded.base),
                            row_start: loaded.rows.start,
                            row_count: loaded.rows.end - loaded.rows.start,
                            kind: MappingInfo::KIND_TABLE,
                            _pad: 0,
                        })
                    })
                }
                _ => None,
            };
            let value = value.unwrap_or(MappingInfo {
                kind: MappingInfo::KIND_NO_TABLE,
                ..MappingInfo::default()
            });
            for (address, bits) in prefixes(mapping.start, mapping.end) {
                insert(&mut self.sink, &mut self.stats, address, bits, value);
            }
        }
        let new: HashSet<(u64, u32)> = entries.iter().copied().collect();
        if let Some(old) = self.processes.remove(&pid) {
            for (address, bits) in old.entries.into_iter().filter(|e| !new.contains(e)) {
                self.sink.remove(pid, address, bits);
            }
            self.release(old.tables);
        }
        if self.files_read != files_read {
            // A table's collected and laid-out rows were just freed: megabytes for a big
            // binary, which would otherwise stay in this thread's arena.
            crate::memory::release_free_heap();
        }
        tracing::debug!(
            pid,
            entries = entries.len(),
            tables = tables.len(),
            "unwind maps loaded"
        );
        self.processes.insert(
            pid,
            LoadedProcess {
                signature,
                entries,
                tables,
            },
        );
    }

    /// Removes a process's entries (it exited).
    pub fn forget(&mut self, pid: u32) {
        if let Some(old) = self.processes.remove(&pid) {
            for (address, bits) in old.entries {
                self.sink.remove(pid, address, bits);
            }
            self.release(old.tables);
        }
    }

    /// Forgets every loaded process for which `alive` is false.
    pub fn prune(&mut self, mut alive: impl FnMut(u32) -> bool) {
        let dead: Vec<u32> = self
            .processes
            .keys()
            .copied()
            .filter(|&p| !alive(p))
            .collect();
        for pid in dead {
            self.forget(pid);
        }
    }

    fn release(&mut self, keys: Vec<TableKey>) {
        for key in keys {
            if let Some(t) = self.tables.get_mut(&key) {
                t.users = t.users.saturating_sub(1);
            }
        }
    }

    /// The key of `id`'s loaded table, reading and loading it if needed.
    fn table_for(&mut self, pid: u32, id: FileId, file: Option<&File>) -> Option<TableKey> {
        if let Some(key) = self.by_inode.get(&id)
            && self.tables.contains_key(key)
        {
            return Some(key.clone());
        }
        if self.unavailable.contains(&id) {
            return None;
        }
        self.files_read += 1;
        let proc = &self.proc;
        let read = file.map(|f| {
            FileTable::read(f, self.max_rows_per_file, |build_id| {
                debug_file(proc, pid, build_id)
            })
        });
        let table = match read {
            Some(Ok(t)) if !t.table.rows().is_empty() => t,
            other => {
                match other {
                    Some(Err(UnwindError::TooManyRows { .. })) => {
                        self.stats.tables_over_budget += 1
                    }
                    Some(Err(error)) => {
                        tracing::debug!(?id, %error, "no unwind table");
                        self.stats.tables_unavailable += 1;
                    }
                    _ => self.stats.tables_unavailable += 1,
                }
                self.mark_unavailable(id);
                return None;
            }
        };
        let key = match &table.build_id {
            Some(b) if !b.is_empty() => TableKey::BuildId(b.clone()),
            _ => TableKey::Inode(id),
        };
        if self.tables.contains_key(&key) {
            self.by_inode.insert(id, key.clone());
            return Some(key);
        }
        let rows = table.table.rows();
        let Some(range) = self.allocate(rows.len() as u32) else {
            self.stats.tables_over_budget += 1;
            tracing::debug!(?id, rows = rows.len(), "unwind table over budget");
            self.mark_unavailable(id);
            return None;
        };
        if let Err(error) = self.sink.write_rows(range.start, rows) {
            tracing::debug!(?id, %error, "unwind rows not written");
            self.free_range(range);
            self.stats.tables_unavailable += 1;
            return None;
        }
        self.clock += 1;
        self.stats.tables_loaded += 1;
        self.tables.insert(
            key.clone(),
            Loaded {
                rows: range,
                base: table.table.base(),
                segments: table.segments,
                users: 0,
                loaded_at: self.clock,
            },
        );
        self.by_inode.insert(id, key.clone());
        Some(key)
    }

    fn mark_unavailable(&mut self, id: FileId) {
        if self.unavailable.len() >= MAX_UNAVAILABLE {
            self.unavailable.clear();
        }
        self.unavailable.insert(id);
    }

    /// A free run of `n` rows, evicting unused tables (oldest first) until one fits.
    fn allocate(&mut self, n: u32) -> Option<Range<u32>> {
        if n == 0 || n > self.capacity {
            return None;
        }
        loop {
            if let Some(i) = self.free.iter().position(|r| r.end - r.start >= n) {
                let start = self.free[i].start;
                self.free[i].start += n;
                if self.free[i].is_empty() {
                    self.free.remove(i);
                }
                return Some(start..start + n);
            }
            let oldest = self
                .tables
                .iter()
                .filter(|(_, t)| t.users == 0)
                .min_by_key(|(_, t)| t.loaded_at)
                .map(|(k, _)| k.clone())?;
            let evicted = self.tables.remove(&oldest)?;
            self.by_inode.retain(|_, k| *k != oldest);
            self.stats.tables_evicted += 1;
            self.free_range(evicted.rows);
        }
    }

    fn free_range(&mut self, range: Range<u32>) {
        let i = self.free.partition_point(|r| r.start < range.start);
        self.free.insert(i, range);
        // Merge with the neighbours.
        if i + 1 < self.free.len() && self.free[i].end == self.free[i + 1].start {
            self.free[i].end = self.free[i + 1].end;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].end == self.free[i].start {
            self.free[i - 1].end = self.free[i].end;
            self.free.remove(i);
        }
    }
}

/// The separate debug file of `build_id` inside process `pid`'s root, where gdb and perf
/// look first: `/usr/lib/debug/.build-id/ab/cdef….debug`, opened through the safe layer.
fn debug_file(proc: &Path, pid: u32, build_id: &[u8]) -> Option<File> {
    let path = build_id_debug_path(build_id)?;
    let root = ProcRoot::of_pid(proc, pid).ok()?;
    match root.open(&path, MAX_OBJECT_FILE_SIZE) {
        Ok(opened) => Some(opened.file),
        Err(ProcFileError::Open { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(error) => {
            tracing::debug!(%error, reason = error.reason(), "debug file not used for unwinding");
            None
        }
    }
}

/// The aligned power-of-two blocks covering `start..end`, as (address, prefix bits of the
/// address): at most two per bit of the address, a handful for a page-aligned mapping.
pub fn prefixes(start: u64, end: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let mut log = if at == 0 {
            63
        } else {
            at.trailing_zeros().min(63)
        };
        while log > 0 && (end - at) < (1u64 << log) {
            log -= 1;
        }
        out.push((at, 64 - log));
        match at.checked_add(1u64 << log) {
            Some(next) => at = next,
            None => break,
        }
    }
    out
}

#[cfg(test)]
#[path = "loader_tests.rs"]
mod tests;
