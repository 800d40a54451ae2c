//! Unwind tables: a binary's `.eh_frame` (and `.debug_frame` when present) turned into a
//! compact, sorted table of rows, one per address range, saying how to find the caller's frame
//! (CFA, return address, rbp) at any pc of the file, and the [`Loader`] that keeps the kernel
//! program's maps of them in step with the processes sampled. This is the user-space half of
//! unwinding user stacks without frame pointers; the walk itself is in `profiler-ebpf`.
//!
//! Rows use file virtual addresses and are x86_64's (DWARF registers rsp = 7, rbp = 6, return
//! address = 16). [`UnwindTable::rows`] are the 16-byte [`UnwindRow`]s the kernel program
//! reads; [`UnwindTable::row_for`] is the same lookup in user space, decoded into a [`Row`].

mod file;
mod loader;
mod table;

pub use file::{FileTable, Segment};
pub use loader::{Loader, LoaderStats, TableSink, prefixes};
pub use profiler_common::UnwindRow;
pub use table::{DEFAULT_MAX_ROWS, UnwindTable};

/// How to find the canonical frame address (the caller's rsp before its `call`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cfa {
    /// No frame description covers the pc: a gap between functions, or past the last one.
    NoInfo,
    /// rsp + offset.
    Rsp(i32),
    /// rbp + offset.
    Rbp(i32),
    /// A lazy-binding PLT entry: rsp + 8, plus 8 once `(rip & 15) >= threshold`.
    PltStub { threshold: u8 },
    /// Another register or DWARF expression (e.g. stack realignment through r10, or a signal
    /// trampoline's `ucontext_t` expressions).
    Unsupported,
}

/// Where the return address is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnAddress {
    /// Saved at CFA + offset.
    CfaOffset(i16),
    /// Undefined: the outermost frame (`_start`, a thread's entry).
    Undefined,
    /// Any other rule, or none.
    Unsupported,
}

/// Where the caller's rbp is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rbp {
    /// Still in rbp.
    Unchanged,
    /// Saved at CFA + offset.
    CfaOffset(i16),
    /// Any other rule.
    Unsupported,
}

/// The rules from `pc` up to the next row's `pc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    /// First file virtual address the row applies to.
    pub pc: u64,
    pub cfa: Cfa,
    pub ra: ReturnAddress,
    pub rbp: Rbp,
    /// The function is a signal trampoline (CIE augmentation `S`, e.g. `__restore_rt`).
    pub signal_frame: bool,
}

impl Row {
    /// A row saying no frame description covers `pc` and what follows it.
    pub const fn no_info(pc: u64) -> Row {
        Row {
            pc,
            cfa: Cfa::NoInfo,
            ra: ReturnAddress::Unsupported,
            rbp: Rbp::Unchanged,
            signal_frame: false,
        }
    }

    /// Same rules as `other`, whatever the pc.
    pub fn same_rules(&self, other: &Row) -> bool {
        Row { pc: 0, ..*self } == Row { pc: 0, ..*other }
    }

    /// The kernel program's form of this row, `pc` made relative to `base`; the caller
    /// guarantees `pc - base` fits in 32 bits (true for every row of an [`UnwindTable`]
    /// with its [`UnwindTable::base`]). [`Row::from_compact`] is the inverse.
    pub fn compact(&self, base: u64) -> UnwindRow {
        let mut row = UnwindRow {
            pc: (self.pc - base) as u32,
            ..UnwindRow::default()
        };
        (row.cfa_kind, row.cfa_offset) = match self.cfa {
            Cfa::NoInfo => (UnwindRow::CFA_NO_INFO, 0),
            Cfa::Rsp(offset) => (UnwindRow::CFA_RSP_OFFSET, offset),
            Cfa::Rbp(offset) => (UnwindRow::CFA_RBP_OFFSET, offset),
            Cfa::PltStub { threshold } => (UnwindRow::CFA_PLT_STUB, i32::from(threshold)),
            Cfa::Unsupported => (UnwindRow::CFA_UNSUPPORTED, 0),
        };
        (row.ra_kind, row.ra_offset) = match self.ra {
            ReturnAddress::CfaOffset(offset) => (UnwindRow::RA_CFA_OFFSET, offset),
            ReturnAddress::Undefined => (UnwindRow::RA_UNDEFINED, 0),
            ReturnAddress::Unsupported => (UnwindRow::RA_UNSUPPORTED, 0),
        };
        (row.rbp_kind, row.rbp_offset) = match self.rbp {
            Rbp::Unchanged => (UnwindRow::RBP_UNCHANGED, 0),
            Rbp::CfaOffset(offset) => (UnwindRow::RBP_CFA_OFFSET, offset),
            Rbp::Unsupported => (UnwindRow::RBP_UNSUPPORTED, 0),
        };
        if self.signal_frame {
            row.flags |= UnwindRow::FLAG_SIGNAL_FRAME;
        }
        row
    }
}

impl Row {
    /// The row a kernel-form row relative to `base` stands for; kinds it does not know read
    /// as unsupported.
    pub fn from_compact(row: &UnwindRow, base: u64) -> Row {
        let cfa = match row.cfa_kind {
            UnwindRow::CFA_NO_INFO => Cfa::NoInfo,
            UnwindRow::CFA_RSP_OFFSET => Cfa::Rsp(row.cfa_offset),
            UnwindRow::CFA_RBP_OFFSET => Cfa::Rbp(row.cfa_offset),
            UnwindRow::CFA_PLT_STUB => Cfa::PltStub {
                threshold: u8::try_from(row.cfa_offset).unwrap_or(u8::MAX),
            },
            _ => Cfa::Unsupported,
        };
        let ra = match row.ra_kind {
            UnwindRow::RA_CFA_OFFSET => ReturnAddress::CfaOffset(row.ra_offset),
            UnwindRow::RA_UNDEFINED => ReturnAddress::Undefined,
            _ => ReturnAddress::Unsupported,
        };
        let rbp = match row.rbp_kind {
            UnwindRow::RBP_UNCHANGED => Rbp::Unchanged,
            UnwindRow::RBP_CFA_OFFSET => Rbp::CfaOffset(row.rbp_offset),
            _ => Rbp::Unsupported,
        };
        Row {
            pc: base + u64::from(row.pc),
            cfa,
            ra,
            rbp,
            signal_frame: row.flags & UnwindRow::FLAG_SIGNAL_FRAME != 0,
        }
    }
}

/// Why a binary has no unwind table.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("not a readable ELF file: {source}")]
    Elf { source: object::Error },
    #[error("unsupported architecture {architecture:?}: only x86_64 unwind tables are built")]
    Architecture { architecture: object::Architecture },
    #[error("no .eh_frame or .debug_frame section")]
    NoFrameInfo,
    #[error("section {section} unreadable: {source}")]
    Section {
        section: &'static str,
        source: object::Error,
    },
    #[error("section {section} would inflate to {size} bytes, more than the {limit} allowed")]
    SectionTooLarge {
        section: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("section {section}: entry {entry} (counting from 0) is malformed: {source}")]
    Cfi {
        section: &'static str,
        entry: usize,
        source: gimli::Error,
    },
    #[error("more than {limit} unwind rows")]
    TooManyRows { limit: usize },
}

#[cfg(test)]
mod tests;
