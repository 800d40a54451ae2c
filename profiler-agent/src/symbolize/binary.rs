//! One loaded executable or library: its symbol tables (`.symtab`, `.dynsym`, MiniDebugInfo),
//! its Go function table, and its DWARF (from the file itself or a separate debug file), all
//! answering the same question: what is at this virtual address.

use std::{cell::RefCell, collections::HashMap, fs::File, sync::Arc};

use object::{Object as _, ObjectSection as _, ReadRef};

use super::{
    Demangle, Frame, Frames,
    budget::{Charge, Degraded, SymbolBudget},
    dwarf::{LazyDwarf, Slice},
    elf::{ElfError, SymbolTable},
    filedata::FileData,
    gopclntab::Pclntab,
    sections::{self, Missing, OwnedSection},
};

/// Resolved addresses remembered per binary before the memory is started afresh.
const RESOLVED_PER_BINARY: usize = 1 << 16;
/// What one remembered answer costs beside its strings (map entry, `Arc` headers).
const RESOLVED_ENTRY_BYTES: usize = 96;

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
    /// What `resolved` holds, estimated.
    resolved_charge: Charge,
    /// The symbol table's entries.
    _symbols_charge: Charge,
    /// The file itself first, then MiniDebugInfo and the debug file: read on demand, kept.
    /// Boxed: borrowers hold their address, which must not move with the vector.
    #[allow(clippy::vec_box, reason = "borrowers hold the FileData's address")]
    files: Vec<Box<FileData>>,
    /// DWARF sections, read whole (and decompressed).
    _sections: Vec<OwnedSection>,
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
    /// Loads `file` with no shared budget (tools and tests); see [`Binary::load_with`].
    pub fn load(file: &File, finder: &mut dyn DebugFileFinder) -> Result<Self, ElfError> {
        Self::load_with(file, finder, &SymbolBudget::unlimited())
    }

    /// Loads `file` (and a debug file from `finder` when it has no DWARF), reading into
    /// memory charged to `budget` only what symbols, lines and the Go table need. What does
    /// not fit is left out, counted: DWARF first, then the symbol table.
    pub fn load_with(
        file: &File,
        finder: &mut dyn DebugFileFinder,
        budget: &SymbolBudget,
    ) -> Result<Self, ElfError> {
        let data = FileData::from_file(file.try_clone()?, budget)?;
        Loader::new(budget).load(data, finder)
    }

    /// For images that exist only in memory (the vdso).
    pub fn from_vec(bytes: Vec<u8>) -> Result<Self, ElfError> {
        Self::from_vec_with(bytes, &SymbolBudget::unlimited())
    }

    pub fn from_vec_with(bytes: Vec<u8>, budget: &SymbolBudget) -> Result<Self, ElfError> {
        let Some(charge) = Charge::of(budget, bytes.len()) else {
            budget.count(Degraded::Budget);
            return Err(ElfError::OverBudget);
        };
        let data = FileData::from_memory(bytes.into_boxed_slice(), charge);
        Loader::new(budget).load(data, &mut ())
    }

    /// How [`Binary::frames`] names functions (default: [`Demangle::default`]).
    pub fn with_demangle(mut self, demangle: Demangle) -> Self {
        self.demangle = demangle;
        self
    }

    /// Lets go of what this round's lookups left behind, keeping their answers: the parsed
    /// DWARF units, which one large unit can make megabytes.
    pub fn release_memory(&self) {
        if let Some(dwarf) = &self.dwarf {
            dwarf.release_parsed_units();
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
        let cost = raw
            .iter()
            .map(|f| {
                RESOLVED_ENTRY_BYTES + 2 * f.name.len() + f.file.as_ref().map_or(0, String::len)
            })
            .sum::<usize>();
        let mut resolved = self.resolved.borrow_mut();
        if resolved.frames.len() >= RESOLVED_PER_BINARY || !self.resolved_charge.try_grow(cost) {
            // Started afresh when full or when the budget has no room; answered uncached
            // when even that does not make room.
            *resolved = Resolved::default();
            self.resolved_charge.shrink(usize::MAX);
            if !self.resolved_charge.try_grow(cost) {
                return self.frames_of(raw, &mut Resolved::default());
            }
        }
        let frames = self.frames_of(raw, &mut resolved);
        resolved.frames.insert(vaddr, frames.clone());
        frames
    }

    fn frames_of(&self, raw: Vec<RawFrame>, resolved: &mut Resolved) -> Frames {
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

    /// `N` bytes at `offset` of the file itself (not a debug file), read now: `None` when
    /// the file is shorter than that (truncated since it was loaded).
    pub fn file_bytes<const N: usize>(&self, offset: u64) -> Option<[u8; N]> {
        let mut buf = [0; N];
        self.read_file_at(offset, &mut buf).then_some(buf)
    }

    /// Fills `buf` from the file at `offset`; false on a short read.
    pub fn read_file_at(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.files
            .first()
            .is_some_and(|f| f.read_exact_at(offset, buf))
    }

    /// Bytes this binary holds charged to its budget.
    pub fn charged_bytes(&self) -> usize {
        self.files.iter().map(|f| f.charged()).sum::<usize>()
            + self
                ._sections
                .iter()
                .map(|s| s.charge.bytes())
                .sum::<usize>()
            + self._symbols_charge.bytes()
            + self.resolved_charge.bytes()
            + self.dwarf.as_ref().map_or(0, LazyDwarf::charged_bytes)
    }
}

type Object = object::File<'static, &'static FileData>;

/// Builds a [`Binary`]: owns what the parsers borrow until the binary does.
struct Loader {
    budget: SymbolBudget,
    #[allow(clippy::vec_box, reason = "borrowers hold the FileData's address")]
    files: Vec<Box<FileData>>,
    sections: Vec<OwnedSection>,
    symbols_charge: Charge,
}

impl Loader {
    fn new(budget: &SymbolBudget) -> Self {
        Self {
            budget: budget.clone(),
            files: Vec::new(),
            sections: Vec::new(),
            symbols_charge: Charge::new(budget),
        }
    }

    /// Keeps `data` and lends it for as long as the binary lives.
    fn keep(&mut self, data: FileData) -> &'static FileData {
        let data = Box::new(data);
        // SAFETY: the box moves into `files`, then into the Binary, which declares every
        // borrower before `files`; its heap location never changes.
        let detached: &'static FileData = unsafe { &*(&*data as *const FileData) };
        self.files.push(data);
        detached
    }

    /// Counts what `result` says was left out; `Unreadable` is not a degradation.
    fn note<T>(&self, result: Result<T, Missing>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(Missing::Degraded(reason)) => {
                self.budget.count(reason);
                None
            }
            Err(Missing::Unreadable) => None,
        }
    }

    /// Keeps `data` and parses it as an object, its string tables read.
    fn parse(&mut self, data: FileData) -> Result<(Object, &'static FileData), ElfError> {
        let data = self.keep(data);
        match object::File::parse(data) {
            Ok(object) => {
                preload_string_tables(&object);
                if data.take_refused() {
                    self.budget.count(Degraded::Budget);
                }
                Ok((object, data))
            }
            Err(_) if data.take_refused() => {
                self.budget.count(Degraded::Budget);
                Err(ElfError::OverBudget)
            }
            Err(error) => Err(error.into()),
        }
    }

    fn merge_symbols(&self, symbols: &mut SymbolTable<'static>, object: &Object) {
        let max = self.budget.limits().max_symbols;
        let merged = symbols.merge(object, max, &self.symbols_charge);
        if self.files.iter().any(|f| f.take_refused()) {
            self.budget.count(Degraded::Budget);
        }
        if let Err(reason) = merged {
            self.budget.count(reason);
        }
    }

    fn load(
        mut self,
        data: FileData,
        finder: &mut dyn DebugFileFinder,
    ) -> Result<Binary, ElfError> {
        let (object, main) = self.parse(data)?;
        let mut symbols = SymbolTable::segments_of(&object);
        self.merge_symbols(&mut symbols, &object);
        let build_id = object.build_id().ok().flatten().map(<[u8]>::to_vec);
        let debuglink = object
            .gnu_debuglink()
            .ok()
            .flatten()
            .and_then(|(name, _crc)| std::str::from_utf8(name).ok().map(str::to_owned));

        if !symbols.has_full_symtab()
            && object.section_by_name(".gnu_debugdata").is_some()
            && let Some(mini) = self.note(sections::mini_debug_info(&object, main, &self.budget))
            && let Ok((mini_object, _)) = self.parse(FileData::from_memory(mini.bytes, mini.charge))
        {
            self.merge_symbols(&mut symbols, &mini_object);
        }
        let go = object
            .section_by_name(".gopclntab")
            .and_then(|s| s.data().ok())
            .filter(|d| Pclntab::parse(d).is_ok());
        if main.take_refused() {
            self.budget.count(Degraded::Budget);
        }

        let mut has_debug_file = false;
        let mut dwarf = if object.section_by_name(".debug_info").is_some() {
            self.dwarf(&object, main)
        } else {
            None
        };
        if dwarf.is_none()
            && go.is_none()
            && let Some(debug_file) = finder.find(build_id.as_deref(), debuglink.as_deref())
            && let Ok(debug_data) = FileData::from_file(debug_file, &self.budget)
            && let Ok((debug_object, debug)) = self.parse(debug_data)
        {
            has_debug_file = true;
            self.merge_symbols(&mut symbols, &debug_object);
            dwarf = self.dwarf(&debug_object, debug);
        }
        Ok(Binary {
            dwarf,
            go,
            symbols,
            build_id,
            has_debug_file,
            demangle: Demangle::default(),
            resolved: RefCell::default(),
            resolved_charge: Charge::new(&self.budget),
            _symbols_charge: self.symbols_charge,
            files: self.files,
            _sections: self.sections,
        })
    }

    /// A lazy DWARF index over the object's sections, read whole into owned memory; all or
    /// nothing: when one section does not fit, those read so far are given back.
    fn dwarf(&mut self, object: &Object, data: &FileData) -> Option<LazyDwarf> {
        let endian = if object.is_little_endian() {
            gimli::RunTimeEndian::Little
        } else {
            gimli::RunTimeEndian::Big
        };
        let mut read = Vec::new();
        let dwarf = gimli::Dwarf::load(|id| -> Result<Slice, Missing> {
            let Some(section) = needed_for_lines(id)
                .then(|| object.section_by_name(id.name()))
                .flatten()
            else {
                return Ok(gimli::EndianSlice::new(&[], endian));
            };
            let bytes = match sections::read_section(&section, data, &self.budget) {
                Ok(owned) => owned,
                Err(Missing::Unreadable) => return Ok(gimli::EndianSlice::new(&[], endian)),
                Err(degraded) => return Err(degraded),
            };
            // SAFETY: the boxed bytes move into `self.sections` (and then the Binary, which
            // drops its borrowers first) or, on failure, are dropped with the Dwarf that
            // borrows them.
            let slice: &'static [u8] =
                unsafe { std::slice::from_raw_parts(bytes.bytes.as_ptr(), bytes.bytes.len()) };
            read.push(bytes);
            Ok(gimli::EndianSlice::new(slice, endian))
        });
        let dwarf = match dwarf {
            Ok(dwarf) => dwarf,
            Err(missing) => {
                self.note::<()>(Err(missing));
                return None;
            }
        };
        let lazy = LazyDwarf::new(dwarf, &self.budget)?;
        self.sections.extend(read);
        Some(lazy)
    }
}

/// Reads every string table whole, once: symbol and section names are then slices of it
/// rather than one small read each.
fn preload_string_tables(object: &Object) {
    fn each<Elf: object::read::elf::FileHeader<Endian = object::Endianness>>(
        file: &object::read::elf::ElfFile<'static, Elf, &'static FileData>,
    ) {
        use object::read::elf::SectionHeader as _;
        let endian = file.endian();
        for header in file.elf_section_table().iter() {
            if header.sh_type(endian) == object::elf::SHT_STRTAB
                && let Some((offset, size)) = header.file_range(endian)
            {
                let _ = file.data().read_bytes_at(offset, size);
            }
        }
    }
    match object {
        object::File::Elf32(file) => each(file),
        object::File::Elf64(file) => each(file),
        _ => {}
    }
}

/// Sections that function names, inline chains and lines come from. Variable locations,
/// macros and type units are never read, and reading them would only cost memory.
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

#[cfg(test)]
mod tests;
