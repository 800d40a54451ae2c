//! The kernel side of [`crate::unwind::TableSink`]: the walker's row array (written through a
//! short-lived shared mapping of the array, `BPF_F_MMAPABLE`, so a table of 30 000 rows is one
//! copy rather than 30 000 system calls, and no row stays mapped in the agent) and its
//! (pid, address) trie.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{Arc, Mutex},
};

use aya::maps::{
    Array, IterableMap as _, MapData,
    lpm_trie::{Key, LpmTrie},
};
use profiler_common::{MappingInfo, MappingKey, UnwindRow};

use crate::{
    process::ProcessInfo,
    unwind::{Loader, LoaderStats, TableSink},
};

/// The row array and mapping trie of one loaded sampler.
pub struct KernelTables {
    rows: Array<MapData, UnwindRow>,
    capacity: u32,
    mappings: LpmTrie<MapData, MappingKey, MappingInfo>,
}

impl KernelTables {
    pub fn new(
        rows: Array<MapData, UnwindRow>,
        capacity: u32,
        mappings: LpmTrie<MapData, MappingKey, MappingInfo>,
    ) -> Self {
        Self {
            rows,
            capacity,
            mappings,
        }
    }

    pub fn raw_fds(&self) -> [i32; 2] {
        [
            self.rows.map().fd().as_fd().as_raw_fd(),
            self.mappings.map().fd().as_fd().as_raw_fd(),
        ]
    }

    /// Copies `rows` into the array through shared mappings of the pages they fall in, at
    /// most [`MAPPED_CHUNK`] bytes of them at a time: mapped pages count in the agent's
    /// resident size while they are mapped.
    fn write_mapped(&self, start: u32, rows: &[UnwindRow]) -> io::Result<()> {
        let per_chunk = MAPPED_CHUNK / std::mem::size_of::<UnwindRow>();
        for (i, chunk) in rows.chunks(per_chunk).enumerate() {
            self.write_mapped_chunk(start + (i * per_chunk) as u32, chunk)?;
        }
        Ok(())
    }

    fn write_mapped_chunk(&self, start: u32, rows: &[UnwindRow]) -> io::Result<()> {
        let row = std::mem::size_of::<UnwindRow>();
        let page = crate::process::procfs::page_size() as usize;
        let first = start as usize * row;
        let end = first + std::mem::size_of_val(rows);
        let map_start = first / page * page;
        let map_len = end.div_ceil(page) * page - map_start;
        let fd = self.rows.map().fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the array's pages `map_start..map_start +
        // map_len`, within the array (checked by the caller against `capacity`), unmapped
        // below before returning; nothing else in this process maps it.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                map_start as libc::off_t,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            std::ptr::copy_nonoverlapping(
                rows.as_ptr().cast::<u8>(),
                base.cast::<u8>().add(first - map_start),
                std::mem::size_of_val(rows),
            );
            libc::munmap(base, map_len);
        }
        Ok(())
    }
}

/// Bytes of rows copied through one mapping (64 Ki rows).
const MAPPED_CHUNK: usize = 1 << 20;

impl TableSink for KernelTables {
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> io::Result<()> {
        if u64::from(start) + rows.len() as u64 > u64::from(self.capacity) {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        match self.write_mapped(start, rows) {
            Ok(()) => return Ok(()),
            Err(error) => tracing::debug!(%error, "row array not mappable: one update per row"),
        }
        // Without mmap: one update per row.
        for (i, row) in rows.iter().enumerate() {
            self.rows
                .set(start + i as u32, row, 0)
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    fn insert(&mut self, pid: u32, address: u64, bits: u32, info: MappingInfo) -> io::Result<()> {
        let key = Key::new(MappingKey::PID_BITS + bits, MappingKey::new(pid, address));
        self.mappings
            .insert(&key, info, 0)
            .map_err(io::Error::other)
    }

    fn remove(&mut self, pid: u32, address: u64, bits: u32) {
        let key = Key::new(MappingKey::PID_BITS + bits, MappingKey::new(pid, address));
        let _ = self.mappings.remove(&key);
    }
}

/// The loader of one sampler, shared by the thread that loads processes at their first sample
/// and the drain that refreshes them.
#[derive(Clone)]
pub struct SharedLoader(Arc<Mutex<Loader<KernelTables>>>);

impl SharedLoader {
    pub fn new(loader: Loader<KernelTables>) -> Self {
        Self(Arc::new(Mutex::new(loader)))
    }

    pub fn load(&self, info: &ProcessInfo) {
        if let Ok(mut loader) = self.0.lock() {
            loader.load(info);
        }
    }

    /// Forgets the processes that exited.
    pub fn prune(&self, proc_root: &std::path::Path) {
        if let Ok(mut loader) = self.0.lock() {
            loader.prune(|pid| proc_root.join(pid.to_string()).exists());
        }
    }

    pub fn stats(&self) -> LoaderStats {
        self.0.lock().map(|l| l.stats()).unwrap_or_default()
    }

    pub fn raw_fds(&self) -> Vec<i32> {
        self.0
            .lock()
            .map(|l| l.sink().raw_fds().to_vec())
            .unwrap_or_default()
    }
}
