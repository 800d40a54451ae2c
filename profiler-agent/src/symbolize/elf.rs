//! Function symbols of one ELF file: `.symtab` and `.dynsym` merged, with the PT_LOAD segments
//! that map a file offset (what a process mapping gives) to the virtual address symbols use.
//! That translation is what makes PIE, non-PIE and shared libraries all resolve the same way.

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, ReadRef, SymbolKind};

use super::budget::{Charge, Degraded};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read the file: {0}")]
    Read(#[from] std::io::Error),
    #[error("not a readable ELF file: {0}")]
    Parse(#[from] object::Error),
    #[error("no room in the symbol memory budget for its headers and tables")]
    OverBudget,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    file_offset: u64,
    file_size: u64,
    vaddr: u64,
}

/// Names borrow the file's string table (read once, charged to the budget) rather than each
/// being copied.
#[derive(Debug)]
struct Symbol<'data> {
    address: u64,
    size: u64,
    name: &'data str,
}

/// The function symbols of one ELF file, sorted by address, borrowing the file's bytes.
#[derive(Debug)]
pub struct SymbolTable<'data> {
    segments: Vec<Segment>,
    symbols: Vec<Symbol<'data>>,
    full_symtab: bool,
}

impl<'data> SymbolTable<'data> {
    /// Every function symbol of an in-memory image, uncapped (tools, fuzzing and tests).
    pub fn parse(data: &'data [u8]) -> Result<Self, ElfError> {
        let object = object::File::parse(data)?;
        let mut table = Self::segments_of(&object);
        let budget = super::budget::SymbolBudget::unlimited();
        table
            .merge(&object, usize::MAX, &Charge::new(&budget))
            .map_err(|_| ElfError::OverBudget)?;
        Ok(table)
    }

    /// The load segments of `object` and no symbols yet.
    pub fn segments_of<R: ReadRef<'data>>(object: &object::File<'data, R>) -> Self {
        let segments = object
            .segments()
            .map(|s| {
                let (file_offset, file_size) = s.file_range();
                Segment {
                    file_offset,
                    file_size,
                    vaddr: s.address(),
                }
            })
            .collect();
        Self {
            segments,
            symbols: Vec::new(),
            full_symtab: false,
        }
    }

    /// Adds the function symbols of `object` (the binary itself, its MiniDebugInfo or its
    /// separate debug file, which share its addresses), charging their entries to `charge`.
    /// Nothing is added when the table would pass `max_symbols` or the budget.
    pub fn merge<R: ReadRef<'data>>(
        &mut self,
        object: &object::File<'data, R>,
        max_symbols: usize,
        charge: &Charge,
    ) -> Result<(), Degraded> {
        let functions = || {
            object
                .symbols()
                .chain(object.dynamic_symbols())
                .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0 && !s.is_undefined())
        };
        // Counted before anything is allocated: a hostile table may claim millions.
        let added = functions().count();
        if added > max_symbols.saturating_sub(self.symbols.len()) {
            return Err(Degraded::TooManySymbols);
        }
        let entry = std::mem::size_of::<Symbol>();
        let charged_before = self.symbols.capacity() * entry;
        let wanted = (self.symbols.len() + added) * entry;
        if !charge.try_grow(wanted.saturating_sub(charged_before)) {
            return Err(Degraded::Budget);
        }
        self.symbols.reserve_exact(added);
        self.symbols.extend(functions().filter_map(|s| {
            Some(Symbol {
                address: s.address(),
                size: s.size(),
                name: s.name().ok().filter(|n| !n.is_empty())?,
            })
        }));
        self.full_symtab |= object.symbols().next().is_some();
        // Prefer the sized symbol at an address (.dynsym often repeats .symtab).
        self.symbols
            .sort_by(|a, b| a.address.cmp(&b.address).then(b.size.cmp(&a.size)));
        self.symbols.dedup_by_key(|s| s.address);
        self.symbols.shrink_to_fit();
        charge.shrink(wanted.saturating_sub(self.symbols.capacity() * entry));
        Ok(())
    }

    /// Bytes the symbol entries take (their names are in the file's kept blocks).
    pub fn entry_bytes(&self) -> usize {
        self.symbols.capacity() * std::mem::size_of::<Symbol>()
    }

    /// Whether a `.symtab` (not just `.dynsym`) contributed symbols.
    pub fn has_full_symtab(&self) -> bool {
        self.full_symtab
    }

    /// The virtual address that `file_offset` is loaded at, per the PT_LOAD segments.
    pub fn vaddr_of_file_offset(&self, file_offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| {
                // Segment bounds come from the file: compare without computing the end, which
                // can overflow.
                file_offset
                    .checked_sub(s.file_offset)
                    .is_some_and(|within| within < s.file_size)
            })
            .and_then(|s| (file_offset - s.file_offset).checked_add(s.vaddr))
    }

    pub fn lookup_vaddr(&self, vaddr: u64) -> Option<&str> {
        self.lookup_symbol(vaddr).map(|(_, name)| name)
    }

    /// The symbol containing `vaddr`, with its start address.
    pub fn lookup_symbol(&self, vaddr: u64) -> Option<(u64, &str)> {
        let i = self.symbols.partition_point(|s| s.address <= vaddr);
        let symbol = self.symbols[..i].last()?;
        let within = if symbol.size > 0 {
            // `vaddr >= symbol.address` here; the sum could overflow with a hostile size.
            vaddr - symbol.address < symbol.size
        } else {
            // Unsized symbols (hand-written assembly) extend to the next symbol.
            self.symbols.get(i).is_none_or(|next| vaddr < next.address)
        };
        within.then_some((symbol.address, symbol.name))
    }

    pub fn lookup_file_offset(&self, file_offset: u64) -> Option<&str> {
        self.lookup_vaddr(self.vaddr_of_file_offset(file_offset)?)
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_own_function_through_file_offset() {
        let exe = std::env::current_exe().unwrap();
        let bytes = std::fs::read(&exe).unwrap();
        let table = SymbolTable::parse(&bytes).unwrap();
        assert!(!table.is_empty());
        // Find our own mapping of this function to get its file offset.
        let here = resolves_own_function_through_file_offset as *const () as usize as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| {
                let range = l.split_whitespace().next().unwrap();
                let (a, b) = range.split_once('-').unwrap();
                let (a, b) = (
                    u64::from_str_radix(a, 16).unwrap(),
                    u64::from_str_radix(b, 16).unwrap(),
                );
                (a..b).contains(&here)
            })
            .unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        let start = u64::from_str_radix(fields[0].split('-').next().unwrap(), 16).unwrap();
        let offset = u64::from_str_radix(fields[2], 16).unwrap();
        let name = table.lookup_file_offset(here - start + offset).unwrap();
        assert!(
            name.contains("resolves_own_function_through_file_offset"),
            "{name}"
        );
    }

    /// Found by the `elf` fuzz target: segment and symbol bounds near `u64::MAX` overflowed
    /// (a panic in debug builds, a wrong answer in release).
    #[test]
    fn bounds_near_u64_max_do_not_overflow() {
        let table = SymbolTable {
            segments: vec![
                Segment {
                    file_offset: u64::MAX - 0x10,
                    file_size: 0x100,
                    vaddr: 0x1000,
                },
                Segment {
                    file_offset: 0,
                    file_size: 0x100,
                    vaddr: u64::MAX - 0x10,
                },
            ],
            symbols: vec![Symbol {
                address: u64::MAX - 0x10,
                size: 0x100,
                name: "near_the_top",
            }],
            full_symtab: true,
        };
        assert_eq!(table.vaddr_of_file_offset(u64::MAX - 0x10), Some(0x1000));
        assert_eq!(table.vaddr_of_file_offset(u64::MAX), Some(0x1010));
        assert_eq!(table.vaddr_of_file_offset(0x8), Some(u64::MAX - 0x8));
        assert_eq!(table.vaddr_of_file_offset(0x20), None, "past u64::MAX");
        assert_eq!(table.lookup_vaddr(u64::MAX), Some("near_the_top"));
        assert_eq!(table.lookup_vaddr(u64::MAX - 0x11), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(SymbolTable::parse(b"\x7fELF garbage").is_err());
        assert!(SymbolTable::parse(&[]).is_err());
    }
}
