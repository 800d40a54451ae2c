//! One loaded executable or library: its symbol tables (`.symtab`, `.dynsym`, MiniDebugInfo),
//! its Go function table, and its DWARF (from the file itself or a separate debug file), all
//! answering the same question: what is at this virtual address.

use std::{cell::RefCell, collections::HashMap, fs::File, sync::Arc};

use object::{Object as _, ObjectSection as _};

use super::{
    Demangle, Frame, Frames,
    dwarf::{LazyDwarf, Slice},
    elf::{ElfError, SymbolTable},
    gopclntab::Pclntab,
};

/// Resolved addresses remembered per binary before the memory is started afresh.
const RESOLVED_PER_BINARY: usize = 1 << 16;
/// Decompressed debug data larger than this is refused: sizes come from the file itself.
const MAX_DECOMPRESSED: u64 = 512 << 20;

/// File bytes, mapped or (vdso, decompressed MiniDebugInfo) owned.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Box<[u8]>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(b) => b,
        }
    }
}

impl Bytes {
    fn map(file: &File) -> Result<Self, ElfError> {
        // SAFETY: read-only private mapping; files reach here through map_files or a process
        // root, and their bytes are only read through bounds-checked parsers.
        Ok(Bytes::Mapped(unsafe { memmap2::Mmap::map(file)? }))
    }

    /// Drops this mapping's resident pages from the process: the next read faults them back
    /// in from the page cache. Owned bytes stay.
    fn release_resident_pages(&self) {
        if let Bytes::Mapped(map) = self {
            // SAFETY: a private read-only file mapping never written through: after
            // MADV_DONTNEED its pages read back the file's contents, exactly as before.
            if let Err(error) = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) }
            {
                tracing::debug!(%error, "madvise(DONTNEED) refused");
            }
        }
    }

    /// The bytes with a lifetime detached from `self`.
    ///
    /// SAFETY: the caller must keep `self` alive, unmoved in memory it does not own (a mapping
    /// or a boxed slice), for as long as the returned slice is used: `Binary` declares the
    /// borrowers before the owners so they drop first.
    unsafe fn detached(&self) -> &'static [u8] {
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

/// One frame at an address as the binary names it, before demangling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    /// The symbol as the binary names it (mangled for C++ and Rust).
    pub name: String,
    pub file: Option<String>,
    pub line: u32,
}

/// Where a separate debug file may be found, asked only when the binary has no DWARF.
pub trait DebugFileFinder {
    fn find(&mut self, build_id: Option<&[u8]>, debuglink: Option<&str>) -> Option<File>;
}

impl DebugFileFinder for () {
    fn find(&mut self, _: Option<&[u8]>, _: Option<&str>) -> Option<File> {
        None
    }
}

pub struct Binary {
    // Fields drop in order: everything borrowing the byte owners comes first.
    dwarf: Option<LazyDwarf>,
    go: Option<&'static [u8]>,
    symbols: SymbolTable<'static>,
    build_id: Option<Vec<u8>>,
    has_debug_file: bool,
    demangle: Demangle,
    resolved: RefCell<Resolved>,
    _owners: Vec<Bytes>,
}

/// Answers given so far, and the names and files they share: every address of a function
/// holds the same name, demangled once, so a profile builder can tell functions apart by
/// pointer instead of comparing strings.
#[derive(Default)]
struct Resolved {
    frames: HashMap<u64, Frames>,
    /// Symbol as found in the binary -> its demangled name.
    names: HashMap<Arc<str>, Arc<str>>,
    files: std::collections::HashSet<Arc<str>>,
}

impl Resolved {
    fn name(&mut self, symbol: String, demangle: Demangle) -> (Arc<str>, Arc<str>) {
        if let Some((system, name)) = self.names.get_key_value(symbol.as_str()) {
            return (name.clone(), system.clone());
        }
        let name: Arc<str> = demangle.apply(&symbol).into();
        let system: Arc<str> = if *name == *symbol {
            name.clone()
        } else {
            symbol.into()
        };
        self.names.insert(system.clone(), name.clone());
        (name, system)
    }

    fn file(&mut self, file: String) -> Arc<str> {
        if let Some(known) = self.files.get(file.as_str()) {
            return known.clone();
        }
        let file: Arc<str> = file.into();
        self.files.insert(file.clone());
        file
    }
}

impl Binary {
    pub fn load(file: &File, finder: &mut dyn DebugFileFinder) -> Result<Self, ElfError> {
        Self::from_bytes(Bytes::map(file)?, finder)
    }

    /// For images that exist only in memory (the vdso).
    pub fn from_vec(bytes: Vec<u8>) -> Result<Self, ElfError> {
        Self::from_bytes(Bytes::Owned(bytes.into_boxed_slice()), &mut ())
    }

    fn from_bytes(bytes: Bytes, finder: &mut dyn DebugFileFinder) -> Result<Self, ElfError> {
        // SAFETY: `bytes` moves into `_owners` below and outlives every borrower (see Bytes).
        let data = unsafe { bytes.detached() };
        let mut owners = vec![bytes];
        let object = object::File::parse(data)?;
        let mut symbols = SymbolTable::from_object(&object);
        let build_id = object.build_id().ok().flatten().map(<[u8]>::to_vec);
        let debuglink = object
            .gnu_debuglink()
            .ok()
            .flatten()
            .and_then(|(name, _crc)| std::str::from_utf8(name).ok().map(str::to_owned));

        if !symbols.has_full_symtab()
            && let Some(mini) = mini_debug_info(&object)
        {
            let mini = Bytes::Owned(mini.into_boxed_slice());
            // SAFETY: as above, `mini` moves into `owners`.
            let mini_data = unsafe { mini.detached() };
            owners.push(mini);
            if let Ok(mini_object) = object::File::parse(mini_data) {
                symbols.merge(&mini_object);
            }
        }
        let go = object
            .section_by_name(".gopclntab")
            .and_then(|s| s.data().ok())
            .filter(|d| Pclntab::parse(d).is_ok());

        let mut has_debug_file = false;
        let mut dwarf = if object.section_by_name(".debug_info").is_some() {
            dwarf_context(&object, &mut owners)
        } else {
            None
        };
        if dwarf.is_none()
            && go.is_none()
            && let Some(debug_file) = finder.find(build_id.as_deref(), debuglink.as_deref())
        {
            let debug_bytes = Bytes::map(&debug_file)?;
            // SAFETY: as above, `debug_bytes` moves into `owners`.
            let debug_data = unsafe { debug_bytes.detached() };
            owners.push(debug_bytes);
            if let Ok(debug_object) = object::File::parse(debug_data) {
                has_debug_file = true;
                symbols.merge(&debug_object);
                dwarf = dwarf_context(&debug_object, &mut owners);
            }
        }
        Ok(Self {
            dwarf,
            go,
            symbols,
            build_id,
            has_debug_file,
            demangle: Demangle::default(),
            resolved: RefCell::default(),
            _owners: owners,
        })
    }

    /// How [`Binary::frames`] names functions (default: [`Demangle::default`]).
    pub fn with_demangle(mut self, demangle: Demangle) -> Self {
        self.demangle = demangle;
        self
    }

    /// Lets go of what this round's lookups left behind, keeping their answers: the parsed
    /// DWARF units, and the file pages they touched. Mapped ELF and DWARF bytes count in the
    /// agent's RSS (and its cgroup's memory) while resident: a large binary's debug info read
    /// once would otherwise stay there as long as the binary is cached.
    pub fn release_memory(&self) {
        if let Some(dwarf) = &self.dwarf {
            dwarf.release_parsed_units();
        }
        for owner in &self._owners {
            owner.release_resident_pages();
        }
    }

    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id
            .as_ref()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn has_dwarf(&self) -> bool {
        self.dwarf.is_some()
    }

    pub fn has_debug_file(&self) -> bool {
        self.has_debug_file
    }

    pub fn is_go(&self) -> bool {
        self.go.is_some()
    }

    pub fn vaddr_of_file_offset(&self, file_offset: u64) -> Option<u64> {
        self.symbols.vaddr_of_file_offset(file_offset)
    }

    /// Frames at `vaddr`, innermost first; empty when nothing names it. Answers are kept
    /// (bounded), so a warm lookup is a reference count: a profiler asks about the same hot
    /// addresses every interval.
    pub fn frames(&self, vaddr: u64) -> Frames {
        if let Some(frames) = self.resolved.borrow().frames.get(&vaddr) {
            return frames.clone();
        }
        let raw = self.resolve(vaddr);
        let mut resolved = self.resolved.borrow_mut();
        if resolved.frames.len() >= RESOLVED_PER_BINARY {
            *resolved = Resolved::default();
        }
        let frames: Frames = raw
            .into_iter()
            .map(|f| {
                let (name, system_name) = resolved.name(f.name, self.demangle);
                Frame {
                    name,
                    system_name,
                    file: f.file.map(|file| resolved.file(file)),
                    line: f.line,
                }
            })
            .collect();
        resolved.frames.insert(vaddr, frames.clone());
        frames
    }

    fn resolve(&self, vaddr: u64) -> Vec<RawFrame> {
        if let Some(go) = self.go.and_then(|d| Pclntab::parse(d).ok())
            && let Some(f) = go.lookup(vaddr)
        {
            return vec![RawFrame {
                name: f.function.to_owned(),
                file: f.file.map(str::to_owned),
                line: f.line.unwrap_or(0),
            }];
        }
        let symbol = self.symbols.lookup_symbol(vaddr);
        let found = self
            .dwarf
            .as_ref()
            .map(|d| d.frames(vaddr))
            .unwrap_or_default();
        let mut frames = found.frames;
        if let Some(outer) = frames.last_mut() {
            match symbol {
                Some((_, name)) if outer.name.is_empty() => outer.name = name.to_owned(),
                // Only a mangled C++ name adds anything (the qualified name); for C the symbol
                // may be one of several aliases at that address, and DWARF's name is the one.
                Some((start, name))
                    if found.unqualified_outer_entry == Some(start) && name.starts_with("_Z") =>
                {
                    outer.name = name.to_owned()
                }
                _ => {}
            }
        }
        let symbol = symbol.map(|(_, name)| name);
        frames.retain(|f| !f.name.is_empty());
        if frames.is_empty()
            && let Some(name) = symbol
        {
            frames.push(RawFrame {
                name: name.to_owned(),
                file: None,
                line: 0,
            });
        }
        frames
    }

    /// `len` bytes at `offset` of the file itself (not a debug file).
    pub fn file_bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self._owners.first()?.get(start..start.checked_add(len)?)
    }
}

/// A lazy DWARF index over the object's sections; decompressed sections are kept in `owners`.
fn dwarf_context(object: &object::File<'static>, owners: &mut Vec<Bytes>) -> Option<LazyDwarf> {
    let endian = if object.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    };
    let dwarf = gimli::Dwarf::load(|id| -> Result<Slice, gimli::Error> {
        let data = needed_for_lines(id)
            .then(|| object.section_by_name(id.name()))
            .flatten()
            .and_then(|s| section_bytes(&s, owners))
            .unwrap_or(&[]);
        Ok(gimli::EndianSlice::new(data, endian))
    })
    .ok()?;
    LazyDwarf::new(dwarf)
}

/// Sections that function names, inline chains and lines come from. Variable locations,
/// macros and type units are never read, and decompressing them would only cost memory.
fn needed_for_lines(id: gimli::SectionId) -> bool {
    use gimli::SectionId::*;
    matches!(
        id,
        DebugAbbrev
            | DebugAddr
            | DebugAranges
            | DebugInfo
            | DebugLine
            | DebugLineStr
            | DebugRanges
            | DebugRngLists
            | DebugStr
            | DebugStrOffsets
    )
}

/// A section's bytes, decompressed into `owners` when compressed (within the size limit).
fn section_bytes(
    section: &object::Section<'static, '_>,
    owners: &mut Vec<Bytes>,
) -> Option<&'static [u8]> {
    let compressed = section.compressed_data().ok()?;
    if compressed.format == object::CompressionFormat::None {
        return Some(compressed.data);
    }
    if compressed.uncompressed_size > MAX_DECOMPRESSED {
        return None;
    }
    let owned = match compressed.format {
        object::CompressionFormat::Zlib => inflate_to_mapped_file(compressed.data)?,
        _ => Bytes::Owned(
            compressed
                .decompress()
                .ok()?
                .into_owned()
                .into_boxed_slice(),
        ),
    };
    // SAFETY: `owned` moves into `owners`, which the Binary keeps beyond its borrowers.
    let data = unsafe { owned.detached() };
    owners.push(owned);
    Some(data)
}

/// Inflates a zlib stream into an unlinked temporary file and maps it. Debug sections inflate
/// to tens of MiB of which a profile reads a few units: mapped, only the pages read count
/// against the agent's memory, and the rest stays reclaimable page cache.
fn inflate_to_mapped_file(zlib: &[u8]) -> Option<Bytes> {
    let mut file = tempfile::tempfile().ok()?;
    let mut limited = LimitedWriter {
        inner: &mut file,
        written: 0,
        limit: MAX_DECOMPRESSED as usize,
    };
    std::io::copy(&mut flate2::read::ZlibDecoder::new(zlib), &mut limited).ok()?;
    if limited.written == 0 {
        return Some(Bytes::Owned(Box::default()));
    }
    Bytes::map(&file).ok()
}

/// `.gnu_debugdata`: an xz-compressed ELF with the symbols a stripped binary dropped.
fn mini_debug_info(object: &object::File<'_>) -> Option<Vec<u8>> {
    let section = object.section_by_name(".gnu_debugdata")?;
    let compressed = section.data().ok()?;
    let mut out = LimitedWriter {
        inner: Vec::new(),
        written: 0,
        limit: MAX_DECOMPRESSED as usize,
    };
    lzma_rs::xz_decompress(&mut std::io::Cursor::new(compressed), &mut out).ok()?;
    Some(out.inner)
}

/// A writer that refuses to write past `limit` bytes, so a decompression bomb ends in an
/// error rather than in memory or disk exhaustion.
struct LimitedWriter<W> {
    inner: W,
    written: usize,
    limit: usize,
}

impl<W: std::io::Write> std::io::Write for LimitedWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.written + data.len() > self.limit {
            return Err(std::io::Error::other("decompressed data over the limit"));
        }
        let n = self.inner.write(data)?;
        self.written += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn own_binary_has_dwarf_lines_for_this_function() {
        let exe = std::env::current_exe().unwrap();
        let binary = Binary::load(&File::open(&exe).unwrap(), &mut ()).unwrap();
        assert!(
            binary.has_dwarf(),
            "test binaries are built with debug info"
        );
        assert!(binary.build_id().is_some());
        let here = own_binary_has_dwarf_lines_for_this_function as *const () as u64;
        // Our own code: runtime address -> file offset -> vaddr through /proc/self/maps.
        let vaddr = binary.vaddr_of_file_offset(file_offset_of(here)).unwrap();
        let frames = binary.frames(vaddr);
        let outer = frames.last().unwrap();
        assert!(
            outer
                .name
                .ends_with("own_binary_has_dwarf_lines_for_this_function"),
            "{frames:?}"
        );
        assert!(outer.file.as_deref().unwrap().ends_with("binary.rs"));
        assert!(outer.line > 0);
        // Every address of a function shares its name.
        let again = binary.frames(vaddr + 1);
        assert!(Arc::ptr_eq(&again.last().unwrap().name, &outer.name));
        // Released pages read back the same bytes.
        let raw = binary.resolve(vaddr);
        binary.release_memory();
        assert_eq!(binary.resolve(vaddr), raw);
        assert_eq!(
            Binary::load(&File::open(&exe).unwrap(), &mut ())
                .unwrap()
                .frames(vaddr),
            frames
        );
    }

    #[test]
    fn parsed_dwarf_stays_within_its_byte_budget_and_is_released() {
        let exe = std::env::current_exe().unwrap();
        let mut binary = Binary::load(&File::open(&exe).unwrap(), &mut ()).unwrap();
        binary.dwarf.as_mut().unwrap().set_budget(1);
        // Two functions from different compilation units: this crate's and std's.
        let here = parsed_dwarf_stays_within_its_byte_budget_and_is_released as *const () as u64;
        let there = std::process::id as *const () as u64;
        for address in [here, there] {
            let vaddr = binary
                .vaddr_of_file_offset(file_offset_of(address))
                .unwrap();
            assert!(!binary.resolve(vaddr).is_empty());
            let (units, _) = binary.dwarf.as_ref().unwrap().parsed_units();
            assert_eq!(units, 1, "over budget: only the unit just parsed is kept");
        }
        binary.release_memory();
        assert_eq!(binary.dwarf.as_ref().unwrap().parsed_units(), (0, 0));
    }

    /// The file offset our own code at `address` is mapped from, per /proc/self/maps.
    fn file_offset_of(address: u64) -> u64 {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (a, b) = f[0].split_once('-')?;
                let (a, b) = (
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                );
                (a..b)
                    .contains(&address)
                    .then(|| address - a + u64::from_str_radix(f[2], 16).unwrap())
            })
            .unwrap()
    }

    #[test]
    fn limited_writer_stops_bombs() {
        let mut w = LimitedWriter {
            inner: Vec::new(),
            written: 0,
            limit: 4,
        };
        assert!(w.write_all(b"abcd").is_ok());
        assert!(w.write_all(b"e").is_err());
    }
}
