//! Building an [`UnwindTable`] from an ELF file's bytes: every FDE of `.eh_frame` and of
//! `.debug_frame` evaluated with gimli, each CFI row reduced to the three rules the stack walk
//! needs, consecutive equal rows merged, FDEs laid end to end by address with a "no
//! information" row in every gap, and a bound on the number of rows.

use std::borrow::Cow;
use std::ops::Range;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, Register,
    RegisterRule, UnwindContext, UnwindSection, UnwindTableRow,
};
use object::{Object as _, ObjectSection as _};

use super::{Cfa, Rbp, ReturnAddress, Row, UnwindError, UnwindRow};

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

/// A binary's unwind rows, sorted by `pc`, each applying up to the next one's `pc`.
#[derive(Clone, Debug, Default)]
pub struct UnwindTable {
    rows: Vec<Row>,
    fdes: usize,
    skipped_fdes: usize,
    overlapping_fdes: usize,
}

/// One FDE's evaluated rows, before the FDEs are laid out by address.
struct Fde {
    start: u64,
    end: u64,
    /// 0 for `.eh_frame`, 1 for `.debug_frame`: at equal addresses `.eh_frame` wins.
    priority: u8,
    rows: Range<usize>,
}

/// FDEs read so far, their rows in one vector.
#[derive(Default)]
struct Collected {
    fdes: Vec<Fde>,
    rows: Vec<Row>,
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
        if file.architecture() != object::Architecture::X86_64 {
            return Err(UnwindError::Architecture {
                architecture: file.architecture(),
            });
        }
        let eh_frame = file.section_by_name(".eh_frame");
        let debug_frame = file.section_by_name(".debug_frame");
        if eh_frame.is_none() && debug_frame.is_none() {
            return Err(UnwindError::NoFrameInfo);
        }
        let mut collected = Collected::default();
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
            let mut debug_frame = DebugFrame::new(&data, LittleEndian);
            debug_frame.set_address_size(8);
            let bases = BaseAddresses::default();
            collect(
                &debug_frame,
                &bases,
                ".debug_frame",
                1,
                max_rows,
                &mut collected,
            )?;
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

    /// All rows, sorted by `pc`.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The row whose range holds `pc`: [`Cfa::NoInfo`] between and after functions, `None`
    /// below the first function.
    pub fn row_for(&self, pc: u64) -> Option<&Row> {
        let after = self.rows.partition_point(|row| row.pc <= pc);
        after.checked_sub(1).map(|i| &self.rows[i])
    }

    /// The address the compact rows' `pc` is relative to: the first row's.
    pub fn base(&self) -> u64 {
        self.rows.first().map_or(0, |row| row.pc)
    }

    /// The rows as the kernel program will read them, relative to [`UnwindTable::base`].
    pub fn compact(&self) -> Vec<UnwindRow> {
        let base = self.base();
        self.rows.iter().map(|row| row.compact(base)).collect()
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
        let (start, end) = (fde.initial_address(), fde.end_address());
        if end <= start {
            continue;
        }
        let signal_frame = fde.is_signal_trampoline();
        let first = out.rows.len();
        let evaluated = (|| -> gimli::Result<bool> {
            let mut rows = fde.rows(section, bases, &mut context)?;
            while let Some(cfi) = rows.next_row()? {
                if cfi.start_address() >= cfi.end_address() {
                    continue;
                }
                let row = reduce(cfi, section, signal_frame)?;
                if out.rows[first..]
                    .last()
                    .is_some_and(|last| last.same_rules(&row))
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
                rows: first..out.rows.len(),
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
/// equal neighbours merged, FDEs starting inside an earlier one left out.
fn lay_out(collected: Collected, max_rows: usize) -> Result<UnwindTable, UnwindError> {
    let Collected {
        mut fdes,
        rows,
        skipped,
    } = collected;
    fdes.sort_unstable_by_key(|fde| (fde.start, fde.priority));
    let mut table = UnwindTable {
        rows: Vec::with_capacity(rows.len() + 1),
        fdes: 0,
        skipped_fdes: skipped,
        overlapping_fdes: 0,
    };
    let mut covered_to: Option<u64> = None;
    for fde in &fdes {
        match covered_to {
            Some(end) if fde.start < end => {
                table.overlapping_fdes += 1;
                continue;
            }
            Some(end) if fde.start > end => push_merged(&mut table.rows, Row::no_info(end)),
            _ => {}
        }
        for row in &rows[fde.rows.clone()] {
            push_merged(&mut table.rows, *row);
        }
        table.fdes += 1;
        covered_to = Some(fde.end);
        if table.rows.len() > max_rows {
            return Err(UnwindError::TooManyRows { limit: max_rows });
        }
    }
    if let Some(end) = covered_to {
        push_merged(&mut table.rows, Row::no_info(end));
    }
    if table.rows.len() > max_rows {
        return Err(UnwindError::TooManyRows { limit: max_rows });
    }
    if let (Some(first), Some(last)) = (table.rows.first(), table.rows.last())
        && last.pc - first.pc > u64::from(u32::MAX)
    {
        return Err(UnwindError::SpanTooLarge {
            first: first.pc,
            last: last.pc,
        });
    }
    Ok(table)
}

fn push_merged(rows: &mut Vec<Row>, row: Row) {
    if !rows.last().is_some_and(|last| last.same_rules(&row)) {
        rows.push(row);
    }
}
