//! The bytes of an ELF file as the parsers see them, read into the agent's own memory on
//! demand. Nothing is memory-mapped: a profiled process can truncate its own files, and a
//! mapped page past the new end faults with SIGBUS on the next read. Here a range is read
//! with `pread` when a parser first asks for it, charged to the [`SymbolBudget`], and kept
//! (never moved or freed) for as long as the `FileData` lives, so the slices handed out stay
//! valid; a read past the current end of a truncated file is an error, not a signal.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    fs::File,
    ops::Range,
    os::unix::fs::FileExt as _,
};

use super::budget::{Charge, SymbolBudget};

/// Reads looking for a string's end, when no block holds it yet: short first, since names
/// are short; a string table read whole makes these rare.
const STRING_CHUNKS: [u64; 3] = [256, 4096, 64 << 10];
/// Blocks looked back at for one that covers an offset (blocks may overlap).
const LOOK_BACK: usize = 4;

enum Backing {
    File(File),
    Memory(Box<[u8]>),
}

/// Bytes read so far, by (offset, length).
type Blocks = BTreeMap<(u64, u64), Box<[u8]>>;

/// A file (or an in-memory image) read in blocks, each charged to the budget.
pub struct FileData {
    backing: Backing,
    len: u64,
    /// Blocks by (offset, length). Boxes are only ever inserted: their heap bytes stay put
    /// until `self` drops, which is what lets [`object::ReadRef`] hand out `&'a [u8]`.
    blocks: RefCell<Blocks>,
    charge: Charge,
    /// Set when a read was refused for lack of budget.
    refused: Cell<bool>,
}

impl FileData {
    /// Reads `file` on demand; its length is taken now (a later truncation makes reads fail).
    pub fn from_file(file: File, budget: &SymbolBudget) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self::new(Backing::File(file), len, Charge::new(budget)))
    }

    /// An image that exists only in memory (the vdso, decompressed MiniDebugInfo), charged
    /// by the caller with `charge`.
    pub fn from_memory(bytes: Box<[u8]>, charge: Charge) -> Self {
        let len = bytes.len() as u64;
        Self::new(Backing::Memory(bytes), len, charge)
    }

    fn new(backing: Backing, len: u64, charge: Charge) -> Self {
        Self {
            backing,
            len,
            blocks: RefCell::default(),
            charge,
            refused: Cell::new(false),
        }
    }

    /// Whether a read was refused because the budget had no room since the last call.
    pub fn take_refused(&self) -> bool {
        self.refused.replace(false)
    }

    /// Bytes of this file held in memory (and charged).
    pub fn charged(&self) -> usize {
        self.charge.bytes()
    }

    /// Reads `buf.len()` bytes at `offset` without keeping them; false on a short read
    /// (a file truncated since) or an error.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> bool {
        match &self.backing {
            Backing::File(file) => file.read_exact_at(buf, offset).is_ok(),
            Backing::Memory(bytes) => {
                let Some(src) = usize::try_from(offset)
                    .ok()
                    .and_then(|start| bytes.get(start..start.checked_add(buf.len())?))
                else {
                    return false;
                };
                buf.copy_from_slice(src);
                true
            }
        }
    }

    /// The file's length when it was opened.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Reads `size` bytes at `offset` into a new buffer the caller owns (and has charged),
    /// not kept here: for sections whose memory may be given back.
    pub fn read_owned(&self, offset: u64, size: usize) -> Option<Box<[u8]>> {
        if offset.checked_add(size as u64)? > self.len {
            return None;
        }
        let mut buf = vec![0; size].into_boxed_slice();
        self.read_exact_at(offset, &mut buf).then_some(buf)
    }

    /// A kept block covering `offset..offset + size`, if one was read.
    fn cached(&self, offset: u64, size: u64) -> Option<&[u8]> {
        let blocks = self.blocks.borrow();
        let (&(start, _), block) = blocks
            .range(..=(offset, u64::MAX))
            .rev()
            .take(LOOK_BACK)
            .find(|((start, len), _)| offset - start + size <= *len)?;
        let from = (offset - start) as usize;
        let slice = &block[from..from + size as usize];
        // SAFETY: the block's heap bytes are never freed, moved or written while `self` lives
        // (blocks are only inserted), so the slice may outlive the `RefCell` borrow.
        Some(unsafe { std::slice::from_raw_parts(slice.as_ptr(), slice.len()) })
    }

    fn read_block(&self, offset: u64, size: u64) -> Option<&[u8]> {
        if let Backing::Memory(bytes) = &self.backing {
            let start = usize::try_from(offset).ok()?;
            return bytes.get(start..start.checked_add(usize::try_from(size).ok()?)?);
        }
        if size == 0 {
            return Some(&[]);
        }
        if offset.checked_add(size)? > self.len {
            return None;
        }
        if let Some(hit) = self.cached(offset, size) {
            return Some(hit);
        }
        let len = usize::try_from(size).ok()?;
        if !self.charge.try_grow(len) {
            self.refused.set(true);
            return None;
        }
        let mut block = vec![0; len].into_boxed_slice();
        if !self.read_exact_at(offset, &mut block) {
            self.charge.shrink(len);
            return None;
        }
        let mut blocks = self.blocks.borrow_mut();
        let block = blocks.entry((offset, size)).or_insert(block);
        // SAFETY: as in `cached`: the box is kept, unmoved and unwritten, until `self` drops.
        Some(unsafe { std::slice::from_raw_parts(block.as_ptr(), block.len()) })
    }

    fn read_until(&self, range: Range<u64>, delimiter: u8) -> Option<&[u8]> {
        if range.start >= range.end || range.end > self.len {
            return None;
        }
        let total = range.end - range.start;
        fn up_to(bytes: &[u8], total: u64, delimiter: u8) -> Option<&[u8]> {
            let bytes = &bytes[..bytes.len().min(total as usize)];
            let end = bytes.iter().position(|&b| b == delimiter)?;
            Some(&bytes[..end])
        }
        let up_to_delimiter = |bytes| up_to(bytes, total, delimiter);
        // Usually a string table read whole holds it.
        let kept = self.longest_cached(range.start);
        if let Some(found) = up_to_delimiter(kept) {
            return Some(found);
        }
        for chunk in STRING_CHUNKS.into_iter().chain([total]) {
            let chunk = chunk.min(total);
            if chunk <= kept.len() as u64 {
                continue;
            }
            let bytes = self.read_block(range.start, chunk)?;
            if let Some(found) = up_to_delimiter(bytes) {
                return Some(found);
            }
            if chunk == total {
                break;
            }
        }
        None
    }

    /// The longest kept bytes starting at `offset` (empty when none are).
    fn longest_cached(&self, offset: u64) -> &[u8] {
        let blocks = self.blocks.borrow();
        let best = blocks
            .range(..=(offset, u64::MAX))
            .rev()
            .take(LOOK_BACK)
            .filter(|((start, len), _)| offset - start < *len)
            .map(|((start, _), block)| &block[(offset - start) as usize..])
            .max_by_key(|b| b.len())
            .unwrap_or(&[]);
        // SAFETY: as in `cached`.
        unsafe { std::slice::from_raw_parts(best.as_ptr(), best.len()) }
    }

    #[cfg(test)]
    fn blocks(&self) -> usize {
        self.blocks.borrow().len()
    }
}

impl<'a> object::ReadRef<'a> for &'a FileData {
    fn len(self) -> Result<u64, ()> {
        Ok(self.len)
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        self.read_block(offset, size).ok_or(())
    }

    fn read_bytes_at_until(self, range: Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        self.read_until(range, delimiter).ok_or(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use object::ReadRef as _;

    use super::*;
    use crate::symbolize::budget::Limits;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(bytes).unwrap();
        let file = File::open(tmp.path()).unwrap();
        (tmp, file)
    }

    #[test]
    fn reads_are_kept_charged_and_released() {
        let budget = SymbolBudget::new(1 << 20, Limits::default());
        let (_tmp, file) = file_with(b"hello\0world\0and more");
        let data = FileData::from_file(file, &budget).unwrap();
        let d = &data;
        assert_eq!(d.read_bytes_at(6, 5).unwrap(), b"world");
        assert_eq!(data.charged(), 5);
        // Covered by the kept block: no new read, no new charge.
        assert_eq!(d.read_bytes_at(7, 2).unwrap(), b"or");
        assert_eq!(data.blocks(), 1);
        assert_eq!(d.read_bytes_at_until(0..20, 0).unwrap(), b"hello");
        assert_eq!(d.read_bytes_at_until(6..20, 0).unwrap(), b"world");
        assert!(d.read_bytes_at(15, 10).is_err(), "past the end");
        assert!(budget.stats().used > 0);
        drop(data);
        assert_eq!(budget.stats().used, 0);
    }

    #[test]
    fn a_read_over_budget_is_refused_and_noted() {
        let budget = SymbolBudget::new(8, Limits::default());
        let (_tmp, file) = file_with(&[7; 64]);
        let data = FileData::from_file(file, &budget).unwrap();
        assert!((&data).read_bytes_at(0, 8).is_ok());
        assert!(!data.take_refused());
        assert!((&data).read_bytes_at(8, 1).is_err());
        assert!(data.take_refused());
        assert!(!data.take_refused());
        assert_eq!(budget.stats().used, 8);
    }

    #[test]
    fn a_truncated_file_fails_reads_without_a_signal() {
        let (tmp, file) = file_with(&[1; 8192]);
        let data = FileData::from_file(file, &SymbolBudget::unlimited()).unwrap();
        let kept = (&data).read_bytes_at(0, 16).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .unwrap()
            .set_len(0)
            .unwrap();
        // Kept bytes are ours; new reads come back short.
        assert_eq!(kept, &[1; 16]);
        assert!((&data).read_bytes_at(4096, 16).is_err());
        let mut two = [0; 2];
        assert!(!data.read_exact_at(100, &mut two));
    }

    #[test]
    fn memory_images_are_not_copied() {
        let budget = SymbolBudget::unlimited();
        let data = FileData::from_memory(b"abc\0def".to_vec().into(), Charge::new(&budget));
        assert_eq!((&data).read_bytes_at_until(4..7, 0), Err(()));
        assert_eq!((&data).read_bytes_at_until(0..7, 0).unwrap(), b"abc");
        let mut b = [0; 3];
        assert!(data.read_exact_at(4, &mut b));
        assert_eq!(&b, b"def");
    }
}
