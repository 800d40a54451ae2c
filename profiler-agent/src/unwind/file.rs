//! One mapped file's unwind information as the loader needs it: its table, its build id (the
//! key under which processes share the table) and its loadable segments (to turn a mapping's
//! addresses into the file's virtual addresses). The file is read lazily through
//! `object::ReadCache`: only the headers and the frame sections are read, never the whole
//! binary. A separate debug file with the same build id adds its `.debug_frame` (code built
//! with `-fno-asynchronous-unwind-tables` has frame information only there once stripped).

use std::fs::File;

use object::{Object as _, ObjectSegment as _};

use super::{UnwindError, UnwindTable};

/// An executable loadable segment: `size` bytes at file `offset`, loaded at virtual address
/// `vaddr`.
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
    /// Reads `file`'s table, refused past `max_rows` rows. `debug_file` is asked for the
    /// separate debug file of the file's build id; its `.debug_frame` is merged in when its
    /// own build id is the same.
    pub fn read(
        file: &File,
        max_rows: usize,
        debug_file: impl FnOnce(&[u8]) -> Option<File>,
    ) -> Result<FileTable, UnwindError> {
        let cache = object::ReadCache::new(file);
        let object = object::File::parse(&cache).map_err(|source| UnwindError::Elf { source })?;
        // Only executable segments: the mapping of a code segment starts at the page holding
        // its first byte, which the read-only segment before it often shares (lld lays them
        // out so), and the two do not have the same vaddr - offset.
        let segments = super::table::executable_segments(&object)
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
        let debug = build_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .and_then(|id| Some((id, debug_file(id)?)));
        let debug_cache = debug.as_ref().map(|(_, f)| object::ReadCache::new(f));
        let debug_object = debug_cache
            .as_ref()
            .and_then(|cache| object::File::parse(cache).ok())
            .filter(|d| d.build_id().ok().flatten() == debug.as_ref().map(|(id, _)| *id));
        let table = UnwindTable::from_objects(&object, debug_object.as_ref(), max_rows)?;
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

/// A mapping starts at a page boundary, so its offset may be up to a page below its
/// segment's first byte.
const PAGE: u64 = 4096;

pub fn load_bias(segments: &[Segment], start: u64, offset: u64) -> Option<u64> {
    let segment = segments.iter().find(|s| {
        offset
            .checked_sub(s.offset & !(PAGE - 1))
            .is_some_and(|within| within < s.size + (s.offset & (PAGE - 1)))
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
    fn bias_of_a_code_segment_sharing_its_first_page_with_the_one_before() {
        // lld (rustc): R at offset 0 vaddr 0, R E at offset 0x14910 vaddr 0x15910; the code
        // mapping starts at file offset 0x14000. Only executable segments are kept.
        let segments = [Segment {
            vaddr: 0x15910,
            offset: 0x14910,
            size: 0x3fa50,
        }];
        let bias = load_bias(&segments, 0x55f1_06b4_c000, 0x14000).unwrap();
        // r_e at vaddr 0x16a60 is file offset 0x15a60, 0x1a60 into the mapping.
        assert_eq!(0x55f1_06b4_da60 - bias, 0x16a60);
        assert_eq!(load_bias(&segments, 0x1000, 0x13000), None);
    }

    #[test]
    fn reads_this_test_binary_lazily() {
        let exe = File::open(std::env::current_exe().unwrap()).unwrap();
        let table = FileTable::read(&exe, super::super::DEFAULT_MAX_ROWS, |_| None).unwrap();
        assert!(table.table.rows().len() > 1000);
        assert!(!table.segments.is_empty());
    }
}
