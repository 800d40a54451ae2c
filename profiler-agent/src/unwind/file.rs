//! One mapped file's unwind information as the loader needs it: its table, its build id (the
//! key under which processes share the table) and its loadable segments (to turn a mapping's
//! addresses into the file's virtual addresses). The file is read lazily through
//! `object::ReadCache`: only the headers and the frame sections are read, never the whole
//! binary.

use std::fs::File;

use object::{Object as _, ObjectSegment as _};

use super::{UnwindError, UnwindTable};

/// A loadable segment: `size` bytes at file `offset`, loaded at virtual address `vaddr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub offset: u64,
    pub size: u64,
}

/// What [`FileTable::read`] found in one file.
#[derive(Debug)]
pub struct FileTable {
    pub table: UnwindTable,
    pub build_id: Option<Vec<u8>>,
    pub segments: Vec<Segment>,
}

impl FileTable {
    /// Reads `file`'s table, refused past `max_rows` rows.
    pub fn read(file: &File, max_rows: usize) -> Result<FileTable, UnwindError> {
        let cache = object::ReadCache::new(file);
        let object = object::File::parse(&cache).map_err(|source| UnwindError::Elf { source })?;
        let segments = object
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                Segment {
                    vaddr: s.address(),
                    offset,
                    size,
                }
            })
            .collect();
        let build_id = object.build_id().ok().flatten().map(<[u8]>::to_vec);
        let table = UnwindTable::from_object(&object, max_rows)?;
        Ok(FileTable {
            table,
            build_id,
            segments,
        })
    }

    /// What to subtract from an address of a mapping of this file (starting at `start`, at
    /// file offset `offset`) to get the file virtual address it holds; `None` when no
    /// segment holds that offset.
    pub fn load_bias(&self, start: u64, offset: u64) -> Option<u64> {
        load_bias(&self.segments, start, offset)
    }
}

pub fn load_bias(segments: &[Segment], start: u64, offset: u64) -> Option<u64> {
    let segment = segments.iter().find(|s| {
        offset
            .checked_sub(s.offset)
            .is_some_and(|within| within < s.size)
    })?;
    Some(
        start
            .wrapping_sub(offset)
            .wrapping_add(segment.offset)
            .wrapping_sub(segment.vaddr),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_of_a_pie_text_mapping() {
        // gzip-like: text at file offset 0x2000 loaded at vaddr 0x2000.
        let segments = [
            Segment {
                vaddr: 0,
                offset: 0,
                size: 0x1000,
            },
            Segment {
                vaddr: 0x2000,
                offset: 0x2000,
                size: 0x9000,
            },
        ];
        let bias = load_bias(&segments, 0x5555_5555_6000, 0x2000).unwrap();
        assert_eq!(bias, 0x5555_5555_4000);
        assert_eq!(0x5555_5555_6010 - bias, 0x2010);
        assert_eq!(load_bias(&segments, 0x1000, 0x20_0000), None);
    }

    #[test]
    fn reads_this_test_binary_lazily() {
        let exe = File::open(std::env::current_exe().unwrap()).unwrap();
        let table = FileTable::read(&exe, super::super::DEFAULT_MAX_ROWS).unwrap();
        assert!(table.table.rows().len() > 1000);
        assert!(!table.segments.is_empty());
    }
}
