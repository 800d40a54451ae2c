//! Building an [`UnwindTable`] from an ELF file's bytes: every FDE of `.eh_frame` and of
//! `.debug_frame` evaluated with gimli, each CFI row reduced to the three rules the stack walk
//! needs, consecutive equal rows merged, FDEs laid end to end by address with a "no
//! information" row in every gap, and a bound on the number of rows.
//!
//! Rows are kept in the kernel program's 16-byte form ([`UnwindRow`]) from the start, relative
//! to the file's lowest executable address: a big binary (300 000 rows) then costs 5 MiB to
//! collect and 5 MiB to lay out, where a wider row would cost several times that at the
//! agent's peak.

use std::borrow::Cow;
use std::ops::Range;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, Register,
    RegisterRule, UnwindContext, UnwindSection, UnwindTableRow,
};
use object::{Object as _, ObjectSection as _};

use super::{Cfa, Rbp, ReturnAddress, Row, UnwindError, UnwindRow};
use object::ObjectSegment as _;

/// Default bound on a table's rows: 16 MiB of [`UnwindRow`]s. libc has about 30 000.
pub const DEFAULT_MAX_ROWS: usize = 1 << 20;

/// Bound on an inflated `.debug_frame`: compressed sections say their size before inflating.
const MAX_SECTION_BYTES: u64 = 256 << 20;

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// The DWARF register numbers the rules are read from. x86_64 only for now; aarch64 would be
/// sp = 31, fp = 29 (x29) and the return address in x30, a register rather than a stack slot
/// in leaves and prologues (see [`UnwindRow`]).
struct Registers {
    sp: Register,
    fp: Register,
    ra: Register,
}

const X86_64: Registers = Registers {
    sp: Register(7),
    fp: Register(6),
    ra: Register(16),
};

/// A binary's unwind rows, sorted by `pc`, each applying up to the next one's `pc`, in the
/// kernel program's form: `pc` relative to [`UnwindTable::base`].
#[derive(Clone, Debug, Default)]
pub struct UnwindTable {
    rows: Vec<UnwindRow>,
    base: u64,
    fdes: usize,
    skipped_fdes: usize,
    overlapping_fdes: usize,
}

/// One FDE's evaluated rows, before the FDEs are laid out by address; addresses relative to
/// the table's base.
struct Fde {
    start: u32,
    end: u32,
    /// 0 for `.eh_frame`, 1 for `.debug_frame`, 2 for a separate debug file's
    /// `.debug_frame`: at equal addresses the lowest wins.
    priority: u8,
    rows: Range<u32>,
}

/// FDEs read so far, their rows in one vector.
struct Collected {
    base: u64,
    fdes: Vec<Fde>,
    rows: Vec<UnwindRow>,
    skipped: usize,
}

impl UnwindTable {
    /// The table of an ELF file, at most [`DEFAULT_MAX_ROWS`] rows.
    pub fn from_elf(bytes: &[u8]) -> Result<UnwindTable, UnwindError> {
        Self::from_elf_with(bytes, DEFAULT_MAX_ROWS)
    }

    /// The table of an ELF file, refused with [`UnwindError::TooManyRows`] past `max_rows`.
    pub fn from_elf_with<'d, R: object::ReadRef<'d>>(
        bytes: R,
        max_rows: usize,
    ) -> Result<UnwindTable, UnwindError> {
        let file = object::File::parse(bytes).map_err(|source| UnwindError::Elf { source })?;
        Self::from_object(&file, max_rows)
    }

    /// The table of a parsed ELF file, refused past `max_rows` rows.
    pub fn from_object<'d, R: object::ReadRef<'d>>(
        file: &object::File<'d, R>,
        max_rows: usize,
    ) -> Result<UnwindTable, UnwindError> {
        Self::from_objects::<R, R>(file, None, max_rows)
    }

    /// The table of a parsed ELF file and the `.debug_frame` of its separate debug file
    /// (same addresses; where both describe an address, the file's own sections win).
    pub fn from_objects<'d, R: object::ReadRef<'d>, D: object::ReadRef<'d>>(
        file: &object::File<'d, R>,
        debug: Option<&object::File<'d, D>>,
        max_rows: usize,
    ) -> Result<UnwindTable, UnwindError> {
        if file.architecture() != object::Architecture::X86_64 {
            return Err(UnwindError::Architecture {
                architecture: file.architecture(),
            });
        }
        let eh_frame = file.section_by_name(".eh_frame");
        let debug_frame = file.section_by_name(".debug_frame");
        let separate_debug_frame = debug.and_then(|d| d.section_by_name(".debug_frame"));
        if eh_frame.is_none() && debug_frame.is_none() && separate_debug_frame.is_none() {
            return Err(UnwindError::NoFrameInfo);
        }
        let mut collected = Collected {
            base: text_base(file),
            fdes: Vec::new(),
            rows: Vec::new(),
            skipped: 0,
        };
        if let Some(section) = eh_frame {
            let data = section_data(&section, ".eh_frame")?;
            let address = |name| file.section_by_name(name).map_or(0, |s| s.address());
            let bases = BaseAddresses::default()
                .set_eh_frame(section.address())
                .set_text(address(".text"))
                .set_got(address(".got"));
            let mut eh_frame = EhFrame::new(&data, LittleEndian);
            eh_frame.set_address_size(8);
            collect(&eh_frame, &bases, ".eh_frame", 0, max_rows, &mut collected)?;
        }
        if let Some(section) = debug_frame {
            let data = section_data(&section, ".debug_frame")?;
            collect_debug_frame(&data, 1, max_rows, &mut collected)?;
        }
        if let Some(section) = separate_debug_frame {
            let data = section_data(&section, ".debug_frame")?;
            collect_debug_frame(&data, 2, max_rows, &mut collected)?;
        }
        let table = lay_out(collected, max_rows)?;
        tracing::debug!(
            rows = table.rows.len(),
            fdes = table.fdes,
            skipped_fdes = table.skipped_fdes,
            overlapping_fdes = table.overlapping_fdes,
            "unwind table built"
        );
        Ok(table)
    }

    /// All rows as the kernel program reads them, sorted by `pc`, relative to
    /// [`UnwindTable::base`].
    pub fn rows(&self) -> &[UnwindRow] {
        &self.rows
    }

    /// All rows with their rules spelled out and file virtual addresses.
    pub fn decoded(&self) -> Vec<Row> {
        self.rows
            .iter()
            .map(|row| Row::from_compact(row, self.base))
            .collect()
    }

    /// The row whose range holds `pc`: [`Cfa::NoInfo`] between and after functions, `None`
    /// below the first function.
    pub fn row_for(&self, pc: u64) -> Option<Row> {
        let relative = pc.checked_sub(self.base)?;
        let after = self
            .rows
            .partition_point(|row| u64::from(row.pc) <= relative);
        let row = self.rows.get(after.checked_sub(1)?)?;
        Some(Row::from_compact(row, self.base))
    }

    /// The address the rows' `pc` is relative to: the file's lowest executable address (0
    /// when it has no segments).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// FDEs the rows come from.
    pub fn fdes(&self) -> usize {
        self.fdes
    }

    /// FDEs left out because their CIE or instructions could not be evaluated: their range
    /// has no information.
    pub fn skipped_fdes(&self) -> usize {
        self.skipped_fdes
    }

    /// FDEs left out because they start inside an earlier one (`.debug_frame` repeating
    /// `.eh_frame`, or overlapping descriptions).
    pub fn overlapping_fdes(&self) -> usize {
        self.overlapping_fdes
    }
}

fn section_data<'a, R: object::ReadRef<'a>>(
    section: &object::Section<'a, '_, R>,
    name: &'static str,
) -> Result<Cow<'a, [u8]>, UnwindError> {
    let unreadable = |source| UnwindError::Section {
        section: name,
        source,
    };
    let compressed = section.compressed_data().map_err(unreadable)?;
    if compressed.uncompressed_size > MAX_SECTION_BYTES {
        return Err(UnwindError::SectionTooLarge {
            section: name,
            size: compressed.uncompressed_size,
            limit: MAX_SECTION_BYTES,
        });
    }
    compressed.decompress().map_err(unreadable)
}

/// Evaluates every FDE of a `.debug_frame` section into `out`.
fn collect_debug_frame(
    data: &[u8],
    priority: u8,
    max_rows: usize,
    out: &mut Collected,
) -> Result<(), UnwindError> {
    let mut debug_frame = DebugFrame::new(data, LittleEndian);
    debug_frame.set_address_size(8);
    let bases = BaseAddresses::default();
    collect(
        &debug_frame,
        &bases,
        ".debug_frame",
        priority,
        max_rows,
        out,
    )
}

/// Evaluates every FDE of one section into `out`. A malformed entry list is an error (the
/// entries after it cannot be found); an FDE that cannot be evaluated is skipped and counted.
fn collect<'a, S: UnwindSection<Reader<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    name: &'static str,
    priority: u8,
    max_rows: usize,
    out: &mut Collected,
) -> Result<(), UnwindError> {
    let mut context = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    let mut index = 0;
    loop {
        let entry = entries.next().map_err(|source| UnwindError::Cfi {
            section: name,
            entry: index,
            source,
        })?;
        let Some(entry) = entry else { break };
        index += 1;
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = match partial.parse(S::cie_from_offset) {
            Ok(fde) => fde,
            Err(error) => {
                tracing::debug!(section = name, entry = index - 1, %error, "FDE skipped");
                out.skipped += 1;
                continue;
            }
        };
        if fde.end_address() <= fde.initial_address() {
            continue;
        }
        // Rows hold 32-bit offsets from the base: an FDE outside that span (not in the
        // file's code) is left out.
        let relative = |address: u64| {
            address
                .checked_sub(out.base)
                .and_then(|a| u32::try_from(a).ok())
        };
        let (Some(start), Some(end)) =
            (relative(fde.initial_address()), relative(fde.end_address()))
        else {
            tracing::debug!(
                section = name,
                start = fde.initial_address(),
                "FDE outside the code"
            );
            out.skipped += 1;
            continue;
        };
        let signal_frame = fde.is_signal_trampoline();
        let first = out.rows.len();
        let base = out.base;
        let evaluated = (|| -> gimli::Result<bool> {
            let mut rows = fde.rows(section, bases, &mut context)?;
            while let Some(cfi) = rows.next_row()? {
                if cfi.start_address() >= cfi.end_address() {
                    continue;
                }
                let row = reduce(cfi, section, signal_frame)?.compact(base);
                if out.rows[first..]
                    .last()
                    .is_some_and(|last| same_rules(last, &row))
                {
                    continue;
                }
                if out.rows.len() >= max_rows {
                    return Ok(false);
                }
                out.rows.push(row);
            }
            Ok(true)
        })();
        match evaluated {
            Ok(true) => out.fdes.push(Fde {
                start,
                end,
                priority,
                rows: first as u32..out.rows.len() as u32,
            }),
            Ok(false) => return Err(UnwindError::TooManyRows { limit: max_rows }),
            Err(error) => {
                tracing::debug!(section = name, start, %error, "FDE skipped");
                out.rows.truncate(first);
                out.skipped += 1;
            }
        }
    }
    Ok(())
}

/// One CFI row reduced to the CFA, return-address and rbp rules.
fn reduce<'a, S: UnwindSection<Reader<'a>>>(
    cfi: &UnwindTableRow<usize>,
    section: &S,
    signal_frame: bool,
) -> gimli::Result<Row> {
    let regs = &X86_64;
    let cfa = match cfi.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => match i32::try_from(*offset) {
            Ok(offset) if *register == regs.sp => Cfa::Rsp(offset),
            Ok(offset) if *register == regs.fp => Cfa::Rbp(offset),
            _ => Cfa::Unsupported,
        },
        CfaRule::Expression(expression) => {
            match plt_threshold(expression.get(section)?.0.slice()) {
                Some(threshold) => Cfa::PltStub { threshold },
                None => Cfa::Unsupported,
            }
        }
    };
    let ra = match cfi.register(regs.ra) {
        Some(RegisterRule::Offset(offset)) => {
            i16::try_from(offset).map_or(ReturnAddress::Unsupported, ReturnAddress::CfaOffset)
        }
        Some(RegisterRule::Undefined) => ReturnAddress::Undefined,
        _ => ReturnAddress::Unsupported,
    };
    let rbp = match cfi.register(regs.fp) {
        None | Some(RegisterRule::SameValue) => Rbp::Unchanged,
        Some(RegisterRule::Offset(offset)) => {
            i16::try_from(offset).map_or(Rbp::Unsupported, Rbp::CfaOffset)
        }
        Some(_) => Rbp::Unsupported,
    };
    Ok(Row {
        pc: cfi.start_address(),
        cfa,
        ra,
        rbp,
        signal_frame,
    })
}

/// The threshold of the CFA expression GNU ld writes for lazy-binding PLT entries,
/// `rsp + 8 + ((rip & 15) >= N) << 3`, or `None` for any other expression.
fn plt_threshold(expression: &[u8]) -> Option<u8> {
    const BREG7: u8 = 0x77; // DW_OP_breg7 (rsp)
    const BREG16: u8 = 0x80; // DW_OP_breg16 (rip)
    const LIT0: u8 = 0x30;
    const AND: u8 = 0x1a;
    const GE: u8 = 0x2a;
    const SHL: u8 = 0x24;
    const PLUS: u8 = 0x22;
    const LIT3: u8 = 0x33;
    const LIT15: u8 = 0x3f;
    match *expression {
        [BREG7, 8, BREG16, 0, LIT15, AND, lit, GE, LIT3, SHL, PLUS]
            if (LIT0..LIT0 + 32).contains(&lit) =>
        {
            Some(lit - LIT0)
        }
        _ => None,
    }
}

/// Lays the FDEs out by address: a "no information" row in each gap and after the last FDE,
/// equal neighbours merged, FDEs starting inside an earlier one left out. Counts the rows
/// first, so the table is allocated once at its size while the collected rows still exist.
fn lay_out(collected: Collected, max_rows: usize) -> Result<UnwindTable, UnwindError> {
    let Collected {
        base,
        mut fdes,
        mut rows,
        skipped,
    } = collected;
    // Up to half of the vector's room is unused after its last doubling: give it back
    // before the laid-out copy is allocated beside it.
    rows.shrink_to_fit();
    fdes.sort_unstable_by_key(|fde| (fde.start, fde.priority));
    let mut count = 0;
    let (laid_fdes, overlapping) = visit(&fdes, &rows, |_| count += 1);
    if count > max_rows {
        return Err(UnwindError::TooManyRows { limit: max_rows });
    }
    let mut laid = Vec::with_capacity(count);
    visit(&fdes, &rows, |row| laid.push(row));
    debug_assert_eq!(laid.len(), count);
    Ok(UnwindTable {
        rows: laid,
        base,
        fdes: laid_fdes,
        skipped_fdes: skipped,
        overlapping_fdes: overlapping,
    })
}

/// Walks the sorted FDEs, handing `emit` each one's rows and the "no information" rows
/// between them, a row equal in rules to the one before left out; returns (FDEs laid out,
/// FDEs left out as overlapping).
fn visit(fdes: &[Fde], rows: &[UnwindRow], mut emit: impl FnMut(UnwindRow)) -> (usize, usize) {
    let (mut laid, mut overlapping) = (0, 0);
    let mut covered_to: Option<u32> = None;
    let mut last: Option<UnwindRow> = None;
    let mut push = |row: UnwindRow| {
        if !last.is_some_and(|last| same_rules(&last, &row)) {
            emit(row);
            last = Some(row);
        }
    };
    for fde in fdes {
        match covered_to {
            Some(end) if fde.start < end => {
                overlapping += 1;
                continue;
            }
            Some(end) if fde.start > end => push(no_info(end)),
            _ => {}
        }
        for row in &rows[fde.rows.start as usize..fde.rows.end as usize] {
            push(*row);
        }
        laid += 1;
        covered_to = Some(fde.end);
    }
    if let Some(end) = covered_to {
        push(no_info(end));
    }
    (laid, overlapping)
}

/// The "no information" row from `pc` (relative) on.
fn no_info(pc: u32) -> UnwindRow {
    UnwindRow {
        pc,
        ..Row::no_info(0).compact(0)
    }
}

/// Same rules, whatever the pc.
fn same_rules(a: &UnwindRow, b: &UnwindRow) -> bool {
    UnwindRow { pc: 0, ..*a } == UnwindRow { pc: 0, ..*b }
}

/// The file's executable loadable segments.
pub(super) fn executable_segments<'d, 'f, R: object::ReadRef<'d>>(
    file: &'f object::File<'d, R>,
) -> impl Iterator<Item = object::Segment<'d, 'f, R>> {
    file.segments().filter(|s| {
        matches!(s.flags(), object::SegmentFlags::Elf { p_flags }
            if p_flags & object::elf::PF_X != 0)
    })
}

/// The lowest address of the file's executable segments: rows are relative to it. 0 for a
/// file without segments (a relocatable object), whose code starts at 0.
fn text_base<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>) -> u64 {
    executable_segments(file)
        .map(|s| s.address())
        .min()
        .unwrap_or(0)
}
