//! Whole sections read into the agent's memory, charged to the budget: DWARF sections
//! (zlib or zstd compressed or not) and `.gnu_debugdata`, the xz-compressed ELF image with
//! the symbols a stripped binary dropped. Sizes come from the file itself, so every
//! decompression is capped (the declared size, [`Limits`](super::budget::Limits)) and
//! charged before or while it grows: a decompression bomb ends in a refusal, counted.

use object::{CompressionFormat, ObjectSection as _, ReadRef};

use super::{
    budget::{Charge, Degraded, SymbolBudget},
    filedata::FileData,
};

/// Bytes the agent owns, with their charge on the budget.
pub struct OwnedSection {
    pub bytes: Box<[u8]>,
    pub charge: Charge,
}

/// Why a section is missing: a counted degradation, or an unreadable or corrupt section
/// (not counted: the file is simply not usable there).
#[derive(Debug, PartialEq, Eq)]
pub enum Missing {
    Degraded(Degraded),
    Unreadable,
}

impl From<Degraded> for Missing {
    fn from(reason: Degraded) -> Self {
        Missing::Degraded(reason)
    }
}

/// The bytes of `section` of the file `data`, decompressed when compressed.
pub fn read_section<'data, R: ReadRef<'data>>(
    section: &object::Section<'data, '_, R>,
    data: &FileData,
    budget: &SymbolBudget,
) -> Result<OwnedSection, Missing> {
    let range = section
        .compressed_file_range()
        .map_err(|_| Missing::Unreadable)?;
    if range.format == CompressionFormat::None {
        return read_raw(data, range.offset, range.uncompressed_size, budget);
    }
    let max = budget.limits().max_decompressed;
    let declared = usize::try_from(range.uncompressed_size)
        .ok()
        .filter(|&size| size <= max)
        .ok_or(Degraded::DecompressedTooLarge)?;
    // The compressed bytes are charged too while they are held.
    let compressed = read_raw(data, range.offset, range.compressed_size, budget)?;
    let charge = Charge::of(budget, declared).ok_or(Degraded::Budget)?;
    let bytes = match range.format {
        CompressionFormat::Zlib => inflate(&compressed.bytes, declared)?,
        _ => object::CompressedData {
            format: range.format,
            data: &compressed.bytes[..],
            uncompressed_size: range.uncompressed_size,
        }
        // object allocates the declared size (charged above) and fails past it.
        .decompress()
        .map_err(|_| Missing::Unreadable)?
        .into_owned(),
    };
    Ok(OwnedSection {
        bytes: bytes.into_boxed_slice(),
        charge,
    })
}

fn read_raw(
    data: &FileData,
    offset: u64,
    size: u64,
    budget: &SymbolBudget,
) -> Result<OwnedSection, Missing> {
    if offset
        .checked_add(size)
        .is_none_or(|end| end > data.file_len())
    {
        return Err(Missing::Unreadable);
    }
    let size = usize::try_from(size).map_err(|_| Missing::Unreadable)?;
    let charge = Charge::of(budget, size).ok_or(Degraded::Budget)?;
    let bytes = data.read_owned(offset, size).ok_or(Missing::Unreadable)?;
    Ok(OwnedSection { bytes, charge })
}

/// Inflates a zlib stream that declared `declared` bytes: more is a bomb.
fn inflate(zlib: &[u8], declared: usize) -> Result<Vec<u8>, Missing> {
    let mut out = LimitedWriter {
        inner: Vec::with_capacity(declared),
        written: 0,
        limit: declared,
        charge: None,
        over: false,
        refused: false,
    };
    match std::io::copy(&mut flate2::read::ZlibDecoder::new(zlib), &mut out) {
        Ok(_) => Ok(out.inner),
        Err(_) if out.over => Err(Degraded::DecompressedTooLarge.into()),
        Err(_) => Err(Missing::Unreadable),
    }
}

/// The most memory the xz decoder of `.gnu_debugdata` may use, mostly its LZMA2 dictionary,
/// which a block header declares and the decoder allocates whole. Distributions compress
/// MiniDebugInfo with xz presets up to `-7` (16 MiB dictionary); a larger one is refused.
const XZ_MEMORY_LIMIT_KIB: u32 = 24 * 1024;

/// `.gnu_debugdata` decompressed, charged as it grows, within
/// [`Limits::max_mini_debug_info`](super::budget::Limits::max_mini_debug_info).
pub fn mini_debug_info<'data, R: ReadRef<'data>>(
    object: &object::File<'data, R>,
    data: &FileData,
    budget: &SymbolBudget,
) -> Result<OwnedSection, Missing> {
    use object::Object as _;
    let section = object
        .section_by_name(".gnu_debugdata")
        .ok_or(Missing::Unreadable)?;
    let (offset, size) = section.file_range().ok_or(Missing::Unreadable)?;
    let compressed = read_raw(data, offset, size, budget)?;
    let charge = Charge::new(budget);
    let mut out = LimitedWriter {
        inner: Vec::new(),
        written: 0,
        limit: budget.limits().max_mini_debug_info,
        charge: Some(&charge),
        over: false,
        refused: false,
    };
    // Streamed: a block is never inflated whole before the writer's limit can stop it (as
    // lzma-rs's xz decoder would), and the dictionary a block header asks for is capped.
    let mut reader =
        lzma_rust2::XzReader::new_mem_limit(&compressed.bytes[..], false, XZ_MEMORY_LIMIT_KIB);
    let result = std::io::copy(&mut reader, &mut out);
    let (over, refused, mut bytes) = (out.over, out.refused, out.inner);
    match result {
        Ok(_) => {
            bytes.shrink_to_fit();
            // The vector's growth was charged by capacity; keep the charge to what is held.
            charge.shrink(charge.bytes().saturating_sub(bytes.capacity()));
            Ok(OwnedSection {
                bytes: bytes.into_boxed_slice(),
                charge,
            })
        }
        Err(_) if refused => Err(Degraded::Budget.into()),
        Err(_) if over => Err(Degraded::DecompressedTooLarge.into()),
        Err(_) => Err(Missing::Unreadable),
    }
}

/// A writer that refuses to write past `limit` bytes, or past what `charge` can grow by, so
/// a decompression bomb ends in an error rather than in memory exhaustion.
pub struct LimitedWriter<'c> {
    pub inner: Vec<u8>,
    pub written: usize,
    pub limit: usize,
    /// Charged with the vector's capacity as it grows, when set.
    pub charge: Option<&'c Charge>,
    /// Set when `limit` stopped a write.
    pub over: bool,
    /// Set when the budget stopped a write.
    pub refused: bool,
}

impl std::io::Write for LimitedWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.written.saturating_add(data.len()) > self.limit {
            self.over = true;
            return Err(std::io::Error::other("decompressed data over the limit"));
        }
        let needed = self.inner.len() + data.len();
        if let Some(charge) = self.charge
            && needed > self.inner.capacity()
        {
            // Charged before the vector grows, by what it grows to.
            let capacity = needed.max(self.inner.capacity() * 2).min(self.limit);
            if !charge.try_grow(capacity.saturating_sub(charge.bytes())) {
                self.refused = true;
                return Err(std::io::Error::other("symbol memory budget exhausted"));
            }
            self.inner.reserve_exact(capacity - self.inner.len());
        }
        self.inner.extend_from_slice(data);
        self.written += data.len();
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::symbolize::budget::Limits;

    #[test]
    fn limited_writer_stops_at_its_limit_and_at_the_budget() {
        let mut w = LimitedWriter {
            inner: Vec::new(),
            written: 0,
            limit: 4,
            charge: None,
            over: false,
            refused: false,
        };
        assert!(w.write_all(b"abcd").is_ok());
        assert!(w.write_all(b"e").is_err());
        assert!(w.over);

        let budget = SymbolBudget::new(100, Limits::default());
        let charge = Charge::new(&budget);
        let mut w = LimitedWriter {
            inner: Vec::new(),
            written: 0,
            limit: 1000,
            charge: Some(&charge),
            over: false,
            refused: false,
        };
        assert!(w.write_all(&[0; 60]).is_ok());
        assert!(w.write_all(&[0; 60]).is_err());
        assert!(w.refused && !w.over);
        assert!(charge.bytes() >= w.inner.capacity() && charge.bytes() <= 100);
    }
}
