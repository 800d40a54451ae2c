//! The unwind row the kernel program will read to walk a user stack without frame pointers: one
//! row per address range of a file, built in user space from `.eh_frame` / `.debug_frame`
//! (`profiler_agent::unwind`). Rows of one file are sorted by `pc`; a row applies from its `pc`
//! up to the next row's `pc`. Nothing loads them into a map yet.
//!
//! The layout is x86_64's (CFA from rsp or rbp, return address and rbp saved at CFA + offset).
//! aarch64 would need the same three rules with other registers: CFA from sp (x31) or x29,
//! x29 saved at CFA + offset, and the return address in x30, which in a leaf or a prologue is
//! still in the register rather than saved, so its rule needs a "still in the link register"
//! kind (and pointer-authentication state, `DW_CFA_AARCH64_negate_ra_state`, a flag).

/// One unwind row: 16 bytes, no implicit padding, any bit pattern valid (unknown kinds are
/// treated as unsupported by the reader).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// First address the row applies to, as an offset from the table's base (the lowest file
    /// virtual address of the file's table), so a row stays 16 bytes. A table whose addresses
    /// span more than 4 GiB is refused when it is built.
    pub pc: u32,
    /// Meaning set by `cfa_kind`: the offset added to rsp or rbp, or for
    /// [`UnwindRow::CFA_PLT_STUB`] the threshold of the expression (see there).
    pub cfa_offset: i32,
    /// For [`UnwindRow::RBP_CFA_OFFSET`]: the caller's rbp is saved at CFA + this offset.
    pub rbp_offset: i16,
    /// For [`UnwindRow::RA_CFA_OFFSET`]: the return address is saved at CFA + this offset.
    pub ra_offset: i16,
    /// One of the `CFA_*` kinds.
    pub cfa_kind: u8,
    /// One of the `RBP_*` kinds.
    pub rbp_kind: u8,
    /// One of the `RA_*` kinds.
    pub ra_kind: u8,
    /// Bit set of `FLAG_*`.
    pub flags: u8,
}

impl UnwindRow {
    /// No frame description covers this address (a gap between functions, or past the last
    /// one): the walk falls back to frame pointers. Zero, so a zeroed row means "no
    /// information".
    pub const CFA_NO_INFO: u8 = 0;
    /// CFA = rsp + `cfa_offset`.
    pub const CFA_RSP_OFFSET: u8 = 1;
    /// CFA = rbp + `cfa_offset`.
    pub const CFA_RBP_OFFSET: u8 = 2;
    /// A lazy-binding PLT entry, whose CFA is the expression
    /// `rsp + 8 + ((rip & 15) >= cfa_offset ? 8 : 0)`: 8 more once the entry's `push` ran.
    /// `cfa_offset` is the expression's threshold (11 for classic 16-byte entries).
    pub const CFA_PLT_STUB: u8 = 3;
    /// Any other CFA rule (another register, a DWARF expression): the walk ends here, unless
    /// [`UnwindRow::FLAG_SIGNAL_FRAME`] is set.
    pub const CFA_UNSUPPORTED: u8 = 4;

    /// rbp is the caller's: the callee has not changed it (or has restored it).
    pub const RBP_UNCHANGED: u8 = 0;
    /// The caller's rbp is saved at CFA + `rbp_offset`.
    pub const RBP_CFA_OFFSET: u8 = 1;
    /// Any other rbp rule: the caller's rbp is unknown.
    pub const RBP_UNSUPPORTED: u8 = 2;

    /// Any other return-address rule: the walk ends here.
    pub const RA_UNSUPPORTED: u8 = 0;
    /// The return address is saved at CFA + `ra_offset` (-8 on x86_64).
    pub const RA_CFA_OFFSET: u8 = 1;
    /// The return address is undefined: the outermost frame (`_start`, a thread's entry). The
    /// walk is complete.
    pub const RA_UNDEFINED: u8 = 2;

    /// The function is a signal trampoline (CIE augmentation `S`, e.g. libc's `__restore_rt`).
    /// Its rules are expressions over the `ucontext_t` the kernel pushed: on x86_64 the
    /// interrupted rsp, rip and rbp are at rsp + 160, rsp + 168 and rsp + 120.
    pub const FLAG_SIGNAL_FRAME: u8 = 1;
}

const _: () = assert!(core::mem::size_of::<UnwindRow>() == 16);
const _: () = assert!(core::mem::align_of::<UnwindRow>() == 4);
