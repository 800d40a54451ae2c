//! DWARF file, line and inline frames, parsed lazily. addr2line's context builds every
//! compilation unit up front (for libc's debug file, over 20 MiB); here `.debug_aranges` (or,
//! when it is missing, one pass over unit headers) maps an address to its unit, and only the
//! units that sampled addresses fall in are parsed, a few at a time, each into a compact index
//! of its line rows and function/inline ranges. The index and the parsed units are charged to
//! the symbol memory budget; a unit that does not fit is refused (counted) and its addresses
//! keep their symbol-table names.

use std::{cell::RefCell, num::NonZeroUsize, rc::Rc};

use gimli::{AttributeValue, DebugInfoOffset};
use lru::LruCache;

use super::{
    binary::RawFrame,
    budget::{Charge, Degraded, SymbolBudget},
};

pub type Slice = gimli::EndianSlice<'static, gimli::RunTimeEndian>;

/// Parsed units kept per binary; a profile's addresses cluster in few units.
const PARSED_UNITS: usize = 8;
/// Units remembered as refused until the next round, so their addresses are not parsed again.
const REFUSED_UNITS: usize = 1024;
/// Bounds on what hostile DWARF can make us do.
const MAX_INLINE_DEPTH: usize = 64;
const MAX_REFERENCE_HOPS: usize = 8;
/// Cross-unit name references followed per address: each one parses another unit.
const MAX_CROSS_UNIT_LOADS: usize = 8;
/// Real producers declare at most a few dozen attributes per entry; hostile abbreviations with
/// thousands of zero-size attributes make every one-byte entry expensive.
const MAX_ATTRIBUTES_PER_ENTRY: usize = 256;
/// Units whose root is read to learn their ranges when `.debug_aranges` misses them.
const MAX_UNSCANNED_UNITS: usize = 1 << 16;
/// Time that scan may take (real files: milliseconds; rustc output without aranges: well
/// under this).
const UNIT_SCAN_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

pub struct LazyDwarf {
    dwarf: gimli::Dwarf<Slice>,
    /// Start offsets of every unit, sorted: resolves cross-unit references by binary search.
    unit_starts: Vec<DebugInfoOffset>,
    /// (begin, end, unit) sorted by begin.
    unit_ranges: Vec<(u64, u64, DebugInfoOffset)>,
    parsed: RefCell<LruCache<DebugInfoOffset, Rc<ParsedUnit>>>,
    /// Units too large for `unit_budget` or the shared budget, until the next round.
    refused: RefCell<std::collections::HashSet<DebugInfoOffset>>,
    /// The parsed units' [`ParsedUnit::weight`], kept under `unit_budget` (per binary) and
    /// charged to the shared budget.
    parsed_charge: Charge,
    unit_budget: usize,
    /// The unit index (`unit_starts`, `unit_ranges`).
    _index_charge: Charge,
}

struct ParsedUnit {
    unit: gimli::Unit<Slice>,
    /// (address, file index, line, end of sequence) sorted by address.
    rows: Vec<Row>,
    /// Subprograms and inlined subroutines: (begin, end, depth, die), sorted by begin.
    scopes: Vec<Scope>,
}

impl ParsedUnit {
    /// Heap bytes of the index (the unit's abbreviations and header are small beside it).
    fn weight(&self) -> usize {
        self.rows.capacity() * std::mem::size_of::<Row>()
            + self.scopes.capacity() * std::mem::size_of::<Scope>()
    }
}

#[derive(Clone, Copy)]
struct Row {
    address: u64,
    file: u64,
    line: u32,
    end_sequence: bool,
}

#[derive(Clone, Copy)]
struct Scope {
    begin: u64,
    end: u64,
    depth: isize,
    die: gimli::UnitOffset,
}

impl LazyDwarf {
    /// The index of `dwarf`'s units, charged to `budget`; `None` when it has no unit with
    /// code or its index does not fit (counted).
    pub fn new(mut dwarf: gimli::Dwarf<Slice>, budget: &SymbolBudget) -> Option<Self> {
        // Tables shared by several units (hostile files make thousands share one) are parsed
        // once; the others lazily, per unit.
        dwarf.populate_abbreviations_cache(gimli::AbbreviationsCacheStrategy::Duplicates);
        let mut unit_starts = Vec::new();
        let mut unit_ranges = Vec::new();
        let mut covered = std::collections::HashSet::new();
        let mut headers = dwarf.debug_aranges.headers();
        while let Ok(Some(header)) = headers.next() {
            let unit = header.debug_info_offset();
            let mut entries = header.entries();
            while let Ok(Some(entry)) = entries.next() {
                let r = entry.range();
                if r.begin < r.end {
                    unit_ranges.push((r.begin, r.end, unit));
                    covered.insert(unit);
                }
            }
        }
        // Units that aranges does not list: read their root DIE's ranges, one at a time.
        let mut units = dwarf.units();
        let mut scanned = 0;
        let scan_started = std::time::Instant::now();
        while let Ok(Some(header)) = units.next() {
            let Some(offset) = header.debug_info_offset() else {
                continue;
            };
            unit_starts.push(offset);
            if covered.contains(&offset) || !matches!(header.type_(), gimli::UnitType::Compilation)
            {
                continue;
            }
            scanned += 1;
            // Hostile tables (each unit's abbreviations overlapping the next) make this scan
            // quadratic: past the budget, remaining units keep symbol-table names only.
            if scanned > MAX_UNSCANNED_UNITS || scan_started.elapsed() > UNIT_SCAN_BUDGET {
                continue;
            }
            let Ok(unit) = dwarf.unit(header) else {
                continue;
            };
            let mut entries = unit.entries();
            if let Ok(Some(root)) = entries.next_dfs()
                && let Ok(mut ranges) = dwarf.die_ranges(&unit, root)
            {
                while let Ok(Some(r)) = ranges.next() {
                    if r.begin < r.end {
                        unit_ranges.push((r.begin, r.end, offset));
                    }
                }
            }
        }
        if unit_ranges.is_empty() {
            return None;
        }
        unit_ranges.sort_unstable_by_key(|r| r.0);
        unit_starts.sort_unstable();
        unit_ranges.shrink_to_fit();
        unit_starts.shrink_to_fit();
        let index_bytes =
            std::mem::size_of_val(&unit_ranges[..]) + std::mem::size_of_val(&unit_starts[..]);
        let Some(index_charge) = Charge::of(budget, index_bytes) else {
            budget.count(Degraded::Budget);
            return None;
        };
        Some(Self {
            dwarf,
            unit_starts,
            unit_ranges,
            parsed: RefCell::new(LruCache::new(
                NonZeroUsize::new(PARSED_UNITS).expect("nonzero"),
            )),
            refused: RefCell::default(),
            parsed_charge: Charge::new(budget),
            unit_budget: budget.limits().max_unit_bytes,
            _index_charge: index_charge,
        })
    }
}

impl LazyDwarf {
    /// Drops the parsed units. One unit of a large Rust or C++ binary parses into megabytes
    /// of rows and scopes; kept across rounds, each cached binary would hold up to
    /// PARSED_UNITS of them long after its addresses were answered.
    /// Refused units are tried again after this.
    pub fn release_parsed_units(&self) {
        self.parsed.borrow_mut().clear();
        self.parsed_charge.shrink(usize::MAX);
        self.refused.borrow_mut().clear();
    }

    /// Bytes charged for the index and the parsed units.
    pub fn charged_bytes(&self) -> usize {
        self.parsed_charge.bytes() + self._index_charge.bytes()
    }

    #[cfg(test)]
    pub fn set_unit_budget(&mut self, bytes: usize) {
        self.unit_budget = bytes;
    }

    #[cfg(test)]
    pub fn parsed_units(&self) -> (usize, usize) {
        (self.parsed.borrow().len(), self.parsed_charge.bytes())
    }
}

/// Frames found in DWARF for one address.
#[derive(Default)]
pub struct DwarfFrames {
    /// Innermost inline level first.
    pub frames: Vec<RawFrame>,
    /// Where the outermost function starts, when DWARF gave it no linkage name (C++
    /// functions with internal linkage): the symbol table's name at that address is the
    /// qualified one, as binutils' addr2line uses.
    pub unqualified_outer_entry: Option<u64>,
}

impl LazyDwarf {
    /// Frames at `vaddr`; empty when no unit covers it.
    pub fn frames(&self, vaddr: u64) -> DwarfFrames {
        let i = self.unit_ranges.partition_point(|r| r.0 <= vaddr);
        // Ranges may nest or overlap: look back for one that contains the address.
        let Some(&(_, _, offset)) = self.unit_ranges[..i]
            .iter()
            .rev()
            .take(16)
            .find(|r| vaddr < r.1)
        else {
            return DwarfFrames::default();
        };
        let Some(unit) = self.parsed_unit(offset) else {
            return DwarfFrames::default();
        };
        unit.frames(&self.dwarf, &self.unit_starts, vaddr)
    }

    fn parsed_unit(&self, offset: DebugInfoOffset) -> Option<Rc<ParsedUnit>> {
        if let Some(unit) = self.parsed.borrow_mut().get(&offset) {
            return Some(unit.clone());
        }
        if self.refused.borrow().contains(&offset) {
            return None;
        }
        let header = self.dwarf.unit_header(offset).ok()?;
        let unit = self.dwarf.unit(header).ok()?;
        // Our own units can be evicted to make room; past that, the shared budget decides.
        let budget = self.parsed_charge.budget();
        let room = self
            .unit_budget
            .min(self.parsed_charge.bytes() + budget.available());
        let parsed = match ParsedUnit::parse(&self.dwarf, unit, room) {
            Some(parsed) => Rc::new(parsed),
            None => {
                self.refuse(offset, room);
                return None;
            }
        };
        let mut cache = self.parsed.borrow_mut();
        let weight = parsed.weight();
        // Make room by bytes as well as by count.
        while cache.len() >= cache.cap().get()
            || self.parsed_charge.bytes() + weight > self.unit_budget
            || !self.parsed_charge.try_grow(weight)
        {
            match cache.pop_lru() {
                Some((_, evicted)) => self.parsed_charge.shrink(evicted.weight()),
                None => {
                    drop(cache);
                    self.refuse(offset, 0);
                    return None;
                }
            }
        }
        cache.put(offset, parsed.clone());
        Some(parsed)
    }

    /// Remembers a unit that did not fit in `room` bytes, and counts why.
    fn refuse(&self, offset: DebugInfoOffset, room: usize) {
        let budget = self.parsed_charge.budget();
        budget.count(if room >= self.unit_budget {
            Degraded::DwarfUnitTooLarge
        } else {
            Degraded::Budget
        });
        let mut refused = self.refused.borrow_mut();
        if refused.len() < REFUSED_UNITS {
            refused.insert(offset);
        }
    }
}

impl ParsedUnit {
    /// The unit's index, or `None` when its rows and scopes pass `max_bytes`.
    fn parse(
        dwarf: &gimli::Dwarf<Slice>,
        unit: gimli::Unit<Slice>,
        max_bytes: usize,
    ) -> Option<Self> {
        let max_rows = max_bytes / std::mem::size_of::<Row>();
        let mut rows = Vec::new();
        if let Some(program) = unit.line_program.clone() {
            let mut program_rows = program.rows();
            while let Ok(Some((_, row))) = program_rows.next_row() {
                if rows.len() >= max_rows {
                    return None;
                }
                rows.push(Row {
                    address: row.address(),
                    file: row.file_index(),
                    line: row
                        .line()
                        .map_or(0, |l| l.get().min(u32::MAX as u64) as u32),
                    end_sequence: row.end_sequence(),
                });
            }
        }
        // Stable: an end_sequence row sorts before a new sequence starting at the same address.
        rows.sort_by_key(|r| (r.address, !r.end_sequence));
        rows.shrink_to_fit();
        let max_scopes =
            (max_bytes - std::mem::size_of_val(&rows[..])) / std::mem::size_of::<Scope>();

        let mut scopes = Vec::new();
        let mut entries = unit.entries();
        let mut next = entries.next_dfs();
        while let Ok(Some(entry)) = next {
            if entry.attrs().len() > MAX_ATTRIBUTES_PER_ENTRY {
                // Not something a compiler writes: stop rather than walk it.
                scopes.clear();
                break;
            }
            let mut has_ranges = false;
            if matches!(
                entry.tag(),
                gimli::DW_TAG_subprogram | gimli::DW_TAG_inlined_subroutine
            ) && let Ok(mut ranges) = dwarf.die_ranges(&unit, entry)
            {
                while let Ok(Some(r)) = ranges.next() {
                    if r.begin < r.end {
                        if scopes.len() >= max_scopes {
                            return None;
                        }
                        has_ranges = true;
                        scopes.push(Scope {
                            begin: r.begin,
                            end: r.end,
                            depth: entry.depth(),
                            die: entry.offset(),
                        });
                    }
                }
            }
            // Code ranges live under units, namespaces and functions with code. Types, and
            // declarations or abstract instances (no ranges), cannot contain any: skip their
            // subtrees (cheap where the producer wrote DW_AT_sibling).
            let descend = entry.has_children()
                && match entry.tag() {
                    gimli::DW_TAG_subprogram | gimli::DW_TAG_inlined_subroutine => has_ranges,
                    gimli::DW_TAG_compile_unit
                    | gimli::DW_TAG_partial_unit
                    | gimli::DW_TAG_namespace
                    | gimli::DW_TAG_module
                    | gimli::DW_TAG_lexical_block => true,
                    _ => false,
                };
            next = if descend {
                entries.next_dfs()
            } else {
                match entries.next_sibling() {
                    Ok(Some(_)) => Ok(entries.current()),
                    // No sibling: continue the depth-first walk upwards.
                    Ok(None) => entries.next_dfs(),
                    Err(e) => Err(e),
                }
            };
        }
        scopes.sort_unstable_by_key(|s| (s.begin, s.depth));
        scopes.shrink_to_fit();
        Some(Self { unit, rows, scopes })
    }

    fn frames(
        &self,
        dwarf: &gimli::Dwarf<Slice>,
        unit_starts: &[DebugInfoOffset],
        vaddr: u64,
    ) -> DwarfFrames {
        let mut cross_unit_budget = MAX_CROSS_UNIT_LOADS;
        // Every scope containing the address, outermost (smallest depth) first.
        let upto = self.scopes.partition_point(|s| s.begin <= vaddr);
        let mut chain: Vec<Scope> = self.scopes[..upto]
            .iter()
            .filter(|s| vaddr < s.end)
            .copied()
            .collect();
        chain.sort_by_key(|s| s.depth);
        chain.dedup_by_key(|s| s.depth);
        chain.truncate(MAX_INLINE_DEPTH);

        let (mut file, mut line) = self.line_at(dwarf, vaddr);
        let mut frames = Vec::with_capacity(chain.len().max(1));
        let mut unqualified_outer_entry = None;
        // Innermost first: its location is the line table's; each outer frame's location is
        // where the inner one was inlined (DW_AT_call_file/line of the inner DIE).
        for scope in chain.iter().rev() {
            let Ok(die) = self.unit.entry(scope.die) else {
                break;
            };
            let (name, linkage) =
                function_name(dwarf, unit_starts, &mut cross_unit_budget, &self.unit, &die)
                    .unwrap_or_default();
            unqualified_outer_entry = (!linkage).then_some(scope.begin);
            frames.push(RawFrame {
                name,
                file: file.take(),
                line,
            });
            if die.tag() == gimli::DW_TAG_inlined_subroutine {
                file = die
                    .attr_value(gimli::DW_AT_call_file)
                    .and_then(|v| match v {
                        AttributeValue::FileIndex(i) => Some(i),
                        AttributeValue::Udata(i) => Some(i),
                        _ => None,
                    })
                    .and_then(|i| self.file_name(dwarf, i));
                line = match die.attr_value(gimli::DW_AT_call_line) {
                    Some(AttributeValue::Udata(l)) => l.min(u32::MAX as u64) as u32,
                    Some(v) => v.udata_value().unwrap_or(0).min(u32::MAX as u64) as u32,
                    None => 0,
                };
            }
        }
        if frames.is_empty() && (file.is_some() || line > 0) {
            // Lines without a function DIE (assembly): the symbol table names it.
            frames.push(RawFrame {
                name: String::new(),
                file,
                line,
            });
        }
        DwarfFrames {
            frames,
            unqualified_outer_entry,
        }
    }

    fn line_at(&self, dwarf: &gimli::Dwarf<Slice>, vaddr: u64) -> (Option<String>, u32) {
        let i = self.rows.partition_point(|r| r.address <= vaddr);
        match i.checked_sub(1).map(|j| self.rows[j]) {
            Some(row) if !row.end_sequence => (self.file_name(dwarf, row.file), row.line),
            _ => (None, 0),
        }
    }

    fn file_name(&self, dwarf: &gimli::Dwarf<Slice>, index: u64) -> Option<String> {
        let program = self.unit.line_program.as_ref()?;
        let header = program.header();
        let file = header.file(index)?;
        let name = attr_str(dwarf, &self.unit, file.path_name())?;
        if name.starts_with('/') {
            return Some(name);
        }
        let mut dir = file
            .directory(header)
            .and_then(|d| attr_str(dwarf, &self.unit, d))
            .unwrap_or_default();
        if !dir.starts_with('/')
            && let Some(comp_dir) = self.unit.comp_dir.as_ref()
        {
            let comp_dir = comp_dir.to_string_lossy();
            dir = if dir.is_empty() {
                comp_dir.into_owned()
            } else {
                format!("{comp_dir}/{dir}")
            };
        }
        Some(if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        })
    }
}

fn attr_str(
    dwarf: &gimli::Dwarf<Slice>,
    unit: &gimli::Unit<Slice>,
    value: AttributeValue<Slice>,
) -> Option<String> {
    let s = dwarf.attr_string(unit, value).ok()?;
    Some(s.to_string_lossy().into_owned())
}

/// The linkage name, else the name, following abstract origins and specifications, within the
/// unit or across units; true when it is a linkage name.
fn function_name(
    dwarf: &gimli::Dwarf<Slice>,
    unit_starts: &[DebugInfoOffset],
    cross_unit_budget: &mut usize,
    unit: &gimli::Unit<Slice>,
    die: &gimli::DebuggingInformationEntry<Slice>,
) -> Option<(String, bool)> {
    let mut current_unit: Option<gimli::Unit<Slice>> = None;
    let mut die = die.clone();
    for _ in 0..MAX_REFERENCE_HOPS {
        let u = current_unit.as_ref().unwrap_or(unit);
        for attr in [
            gimli::DW_AT_linkage_name,
            gimli::DW_AT_MIPS_linkage_name,
            gimli::DW_AT_name,
        ] {
            if let Some(value) = die.attr_value(attr) {
                return Some((attr_str(dwarf, u, value)?, attr != gimli::DW_AT_name));
            }
        }
        let reference = die
            .attr_value(gimli::DW_AT_abstract_origin)
            .or_else(|| die.attr_value(gimli::DW_AT_specification))?;
        match reference {
            AttributeValue::UnitRef(offset) => {
                die = u.entry(offset).ok()?;
            }
            AttributeValue::DebugInfoRef(offset) => {
                *cross_unit_budget = cross_unit_budget.checked_sub(1)?;
                let i = unit_starts.partition_point(|s| s.0 <= offset.0);
                let header = dwarf
                    .unit_header(*unit_starts.get(i.checked_sub(1)?)?)
                    .ok()?;
                let other = dwarf.unit(header).ok()?;
                let local = offset.to_unit_offset(&other.header)?;
                die = other.entry(local).ok()?;
                current_unit = Some(other);
            }
            _ => return None,
        }
    }
    None
}
