use std::collections::HashMap;

use profiler_common::{MappingInfo, UnwindRow};

use super::*;
use crate::process::{ProcessSource as _, ProcfsProcesses};

/// The kernel maps in memory: the row array and the trie, looked up as the kernel does.
#[derive(Default)]
struct Maps {
    rows: Vec<UnwindRow>,
    entries: HashMap<(u32, u64, u32), MappingInfo>,
    writes: usize,
    refuse_inserts: bool,
}

impl Maps {
    fn with_capacity(rows: u32) -> Self {
        Self {
            rows: vec![UnwindRow::default(); rows as usize],
            ..Self::default()
        }
    }

    /// Longest-prefix match of (pid, address), as the kernel's LPM trie does it.
    fn lookup(&self, pid: u32, address: u64) -> Option<MappingInfo> {
        (0..=64u32).rev().find_map(|bits| {
            let masked = if bits == 0 {
                0
            } else {
                address & (u64::MAX << (64 - bits))
            };
            self.entries.get(&(pid, masked, bits)).copied()
        })
    }

    /// The row the kernel's binary search finds for `address`.
    fn row(&self, pid: u32, address: u64) -> Option<UnwindRow> {
        let m = self.lookup(pid, address)?;
        if m.kind != MappingInfo::KIND_TABLE {
            return None;
        }
        let target = u32::try_from(address.wrapping_sub(m.bias)).ok()?;
        let rows = &self.rows[m.row_start as usize..(m.row_start + m.row_count) as usize];
        let i = rows.partition_point(|r| r.pc <= target);
        i.checked_sub(1).map(|i| rows[i])
    }
}

impl TableSink for Maps {
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> std::io::Result<()> {
        self.writes += 1;
        self.rows[start as usize..start as usize + rows.len()].copy_from_slice(rows);
        Ok(())
    }

    fn insert(
        &mut self,
        pid: u32,
        address: u64,
        bits: u32,
        info: MappingInfo,
    ) -> std::io::Result<()> {
        if self.refuse_inserts {
            return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
        }
        self.entries.insert((pid, address, bits), info);
        Ok(())
    }

    fn remove(&mut self, pid: u32, address: u64, bits: u32) {
        self.entries.remove(&(pid, address, bits));
    }
}

fn this_process() -> ProcessInfo {
    ProcfsProcesses::new("/proc").snapshot(std::process::id(), "test")
}

/// An address inside this test binary's code, and the binary's own table.
fn own_function() -> u64 {
    own_function as fn() -> u64 as usize as u64
}

#[test]
fn prefixes_tile_the_range_with_aligned_blocks() {
    for (start, end) in [
        (0x5555_5555_4000u64, 0x5555_5557_9000u64),
        (0x7f00_0000_1000, 0x7f00_0020_0000),
        (0x1000, 0x2000),
        (0, 0x1000),
        (0xffff_ffff_ffff_e000, u64::MAX),
    ] {
        let blocks = prefixes(start, end);
        let mut at = start;
        for &(address, bits) in &blocks {
            assert_eq!(address, at, "{start:#x}..{end:#x}: {blocks:x?}");
            let size = 1u64 << (64 - bits);
            assert_eq!(address % size, 0, "unaligned {address:#x}/{bits}");
            at = address.wrapping_add(size);
        }
        assert!(at == end || (end == u64::MAX && at == 0), "{blocks:x?}");
        assert!(blocks.len() <= 2 * 64);
    }
    // A page-aligned 150 KiB text mapping needs only a few entries.
    assert!(prefixes(0x5555_5555_6000, 0x5555_5557_b000).len() < 12);
}

#[test]
fn rows_found_through_the_trie_are_the_files_rows() {
    let info = this_process();
    let mut loader = Loader::new(Maps::with_capacity(1 << 21), 1 << 21);
    loader.load(&info);
    let stats = loader.stats();
    assert!(stats.tables_loaded >= 2, "{stats:?}"); // this binary and libc at least
    assert_eq!(stats.processes, 1);

    let pc = own_function();
    let mapping = info.mapping_for(pc).expect("own code is mapped");
    let MappingKind::File {
        file: Some(file), ..
    } = &mapping.kind
    else {
        panic!("own code is a file mapping");
    };
    let expected = FileTable::read(file, super::super::DEFAULT_MAX_ROWS, |_| None).unwrap();
    let vaddr = pc - expected.load_bias(mapping.start, mapping.offset).unwrap();
    let want = expected
        .table
        .row_for(vaddr)
        .unwrap()
        .compact(expected.table.base());
    let got = loader.sink().row(info.pid, pc).expect("a row for own code");
    assert_eq!(got.cfa_kind, want.cfa_kind);
    assert_eq!(got.cfa_offset, want.cfa_offset);
    assert_eq!(got.ra_kind, UnwindRow::RA_CFA_OFFSET);
    assert_eq!(got.pc, want.pc);

    // An address in no mapping matches only the process-wide entry.
    let outside = loader.sink().lookup(info.pid, 0x10).unwrap();
    assert_eq!(outside.kind, MappingInfo::KIND_PROCESS);
    // Another pid matches nothing.
    assert!(loader.sink().lookup(info.pid + 1, pc).is_none());
}

#[test]
fn processes_mapping_the_same_file_share_its_table() {
    let info = this_process();
    let mut loader = Loader::new(Maps::with_capacity(1 << 21), 1 << 21);
    loader.load(&info);
    let after_one = loader.stats();
    let writes = loader.sink().writes;
    let other = ProcessInfo {
        pid: info.pid + 100_000,
        ..info.clone()
    };
    loader.load(&other);
    assert_eq!(loader.stats().tables_loaded, after_one.tables_loaded);
    assert_eq!(loader.stats().rows_used, after_one.rows_used);
    assert_eq!(loader.sink().writes, writes);
    // Loading the same snapshot again changes nothing.
    let entries = loader.sink().entries.len();
    loader.load(&info);
    assert_eq!(loader.sink().entries.len(), entries);

    loader.forget(other.pid);
    assert!(loader.sink().lookup(other.pid, own_function()).is_none());
    assert!(loader.sink().lookup(info.pid, own_function()).is_some());
    loader.prune(|_| false);
    assert!(loader.sink().entries.is_empty());
    assert_eq!(loader.stats().processes, 0);
}

#[test]
fn a_table_over_the_budget_falls_back_to_frame_pointers_and_is_counted() {
    let info = this_process();
    let mut loader = Loader::new(Maps::with_capacity(64), 64);
    loader.load(&info);
    let stats = loader.stats();
    assert!(stats.tables_over_budget >= 1, "{stats:?}");
    let m = loader.sink().lookup(info.pid, own_function()).unwrap();
    assert_eq!(m.kind, MappingInfo::KIND_NO_TABLE);
}

#[test]
fn unused_tables_are_evicted_oldest_first_when_room_is_needed() {
    let info = this_process();
    let mut big = Loader::new(Maps::with_capacity(1 << 21), 1 << 21);
    big.load(&info);
    let needed = big.stats().rows_used as u32;
    // Room for this process's tables, not twice over.
    let mut loader = Loader::new(Maps::with_capacity(needed + 16), needed + 16);
    loader.load(&info);
    assert_eq!(loader.stats().tables_over_budget, 0);
    loader.forget(info.pid);
    // Still loaded while nothing needs the room: loading again reads nothing.
    let writes = loader.sink().writes;
    loader.load(&info);
    assert_eq!(loader.sink().writes, writes);
    assert_eq!(loader.stats().tables_evicted, 0);

    // Allocation past the free room evicts unused tables only.
    loader.forget(info.pid);
    let all = loader.allocate(needed).expect("room after evicting");
    assert!(loader.stats().tables_evicted >= 2);
    loader.free_range(all);
    assert_eq!(loader.stats().rows_used, 0);
}

#[test]
fn refused_entries_are_counted() {
    let info = this_process();
    let mut maps = Maps::with_capacity(1 << 21);
    maps.refuse_inserts = true;
    let mut loader = Loader::new(maps, 1 << 21);
    loader.load(&info);
    assert!(loader.stats().entries_refused > info.mappings.len() as u64);
}

#[test]
fn debug_files_are_found_by_build_id_inside_the_process_root() {
    let proc = tempfile::tempdir().unwrap();
    let dir = proc.path().join("42/root/usr/lib/debug/.build-id/ab");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cdef.debug"), b"debug file").unwrap();
    let found = super::debug_file(proc.path(), 42, &[0xab, 0xcd, 0xef]);
    assert!(found.is_some());
    assert!(super::debug_file(proc.path(), 42, &[0xab, 0xcd, 0x00]).is_none());
    assert!(super::debug_file(proc.path(), 43, &[0xab, 0xcd, 0xef]).is_none());
    assert!(super::debug_file(proc.path(), 42, &[0xab]).is_none());
    // A FIFO where the debug file would be is refused, not opened (which would block).
    let fifo = dir.join("0000.debug");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    assert!(super::debug_file(proc.path(), 42, &[0xab, 0x00, 0x00]).is_none());
}
