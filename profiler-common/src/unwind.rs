//! What the kernel program reads to walk a user stack without frame pointers.
//!
//! - [`UNWIND_ROWS_MAP`]: one array of [`UnwindRow`]s holding every loaded file's table, each
//!   file a contiguous run, built in user space from `.eh_frame` / `.debug_frame`
//!   (`profiler_agent::unwind`). Rows of one file are sorted by `pc`; a row applies from its
//!   `pc` up to the next row's `pc`.
//! - [`MAPPINGS_MAP`]: a longest-prefix-match trie from (pid, address) to the
//!   [`MappingInfo`] of the executable mapping holding that address: where its file's rows are
//!   and how to turn an address into a row `pc`. A mapping's range is stored as the few
//!   aligned power-of-two blocks that cover it, plus one entry per process covering its whole
//!   address space, which says "a process user space has loaded, an address it has not".
//! - The walked stacks go to [`USER_STACKS_MAPS`] as [`UserStack`]s keyed by a hash of their
//!   frames.
//!
//! The layout is x86_64's (CFA from rsp or rbp, return address and rbp saved at CFA + offset).
//! aarch64 would need the same three rules with other registers: CFA from sp (x31) or x29,
//! x29 saved at CFA + offset, and the return address in x30, which in a leaf or a prologue is
//! still in the register rather than saved, so its rule needs a "still in the link register"
//! kind (and pointer-authentication state, `DW_CFA_AARCH64_negate_ra_state`, a flag).

/// Array of [`UnwindRow`]; its size is the configured table budget.
pub const UNWIND_ROWS_MAP: &str = "UNWIND_ROWS";
/// LPM trie `Key<MappingKey> -> MappingInfo`.
pub const MAPPINGS_MAP: &str = "MAPPINGS";
/// Hash maps `u64 -> UserStack` of walked user stacks; one per generation.
pub const USER_STACKS_MAPS: [&str; 2] = ["USER_STACKS_0", "USER_STACKS_1"];
/// Program array holding the walker, which tail-calls itself until the walk ends.
pub const UNWIND_PROGRAMS_MAP: &str = "UNWIND_PROGRAMS";
/// Index of the walker in [`UNWIND_PROGRAMS_MAP`].
pub const UNWIND_PROGRAM_INDEX: u32 = 0;
/// Name of the walker program.
pub const UNWIND_PROGRAM_NAME: &str = "unwind_user";

/// The data of a [`MAPPINGS_MAP`] key: pid and address, both big-endian, so that a prefix of
/// the key's bits is the pid followed by the high bits of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MappingKey {
    pub pid_be: u32,
    pub address_high_be: u32,
    pub address_low_be: u32,
}

impl MappingKey {
    /// Bits of the pid, which every entry matches exactly.
    pub const PID_BITS: u32 = 32;
    /// Bits of the whole key.
    pub const BITS: u32 = 96;

    pub const fn new(pid: u32, address: u64) -> Self {
        Self {
            pid_be: pid.to_be(),
            address_high_be: ((address >> 32) as u32).to_be(),
            address_low_be: (address as u32).to_be(),
        }
    }
}

const _: () = assert!(core::mem::size_of::<MappingKey>() == 12);

/// The value of a [`MAPPINGS_MAP`] entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MappingInfo {
    /// Subtracted from an address of the mapping to give the `pc` of its file's rows.
    pub bias: u64,
    /// Index of the file's first row in [`UNWIND_ROWS_MAP`].
    pub row_start: u32,
    /// Rows of the file.
    pub row_count: u32,
    /// One of the `KIND_*`.
    pub kind: u32,
    pub _pad: u32,
}

impl MappingInfo {
    /// A file with a table at `row_start..row_start + row_count`.
    pub const KIND_TABLE: u32 = 1;
    /// Executable code with no table (anonymous JIT memory, a file without unwind info or over
    /// the budget): walked with frame pointers.
    pub const KIND_NO_TABLE: u32 = 2;
    /// The whole address space of a loaded process: an address that matches only this entry
    /// is in no mapping user space knows of.
    pub const KIND_PROCESS: u32 = 3;
}

const _: () = assert!(core::mem::size_of::<MappingInfo>() == 24);

/// A walked user stack: `len` return addresses, innermost first (the first one is the sampled
/// pc itself). Frames past `len` are garbage.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UserStack {
    pub len: u32,
    /// Bit set of [`UserStack::HAS_PYTHON`].
    pub flags: u32,
    pub frames: [u64; crate::MAX_STACK_DEPTH],
}

impl UserStack {
    /// A Python stack was stored under the same hash in the generation's Python stacks map.
    pub const HAS_PYTHON: u32 = 1;
}

const _: () = assert!(core::mem::size_of::<UserStack>() == 1024);

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
