//! Types, map names and constants shared by the kernel-side sampler (`profiler-ebpf`) and the
//! user-side agent. Every type here crosses the kernel/user boundary byte for byte, so each one
//! is `#[repr(C)]`, has explicit padding and a size assert.
#![no_std]

mod python;
mod unwind;

pub use python::{
    MAX_PYTHON_DEPTH, PY_FRAME_CODE_MASK, PY_FRAME_ENTRY, PY_FRAME_INSTRUCTION_SHIFT,
    PY_FRAME_INSTRUCTION_UNKNOWN, PY_NO_OFFSET, PYTHON_NEW_STACKS_BYTES, PYTHON_NEW_STACKS_MAP,
    PYTHON_PROCESSES_ENTRIES, PYTHON_PROCESSES_MAP, PYTHON_PROGRAM_INDEX, PYTHON_PROGRAM_NAME,
    PYTHON_STACKS_MAPS, PythonProcess, PythonStack, py_frame, py_frame_parts,
};
pub use unwind::{
    MAPPINGS_MAP, MappingInfo, MappingKey, UNWIND_PROGRAM_INDEX, UNWIND_PROGRAM_NAME,
    UNWIND_PROGRAMS_MAP, UNWIND_ROWS_MAP, USER_STACKS_MAPS, UnwindRow, UserStack,
};

/// Hash map `SampleKey -> u64` counting samples; one per generation.
pub const COUNTS_MAPS: [&str; 2] = ["COUNTS_0", "COUNTS_1"];
/// Stack trace maps (`BPF_MAP_TYPE_STACK_TRACE`) of kernel stacks; one per generation. User
/// stacks are walked by the program itself and stored in [`USER_STACKS_MAPS`].
pub const STACK_MAPS: [&str; 2] = ["STACKS_0", "STACKS_1"];
/// One-entry array holding the generation (0 or 1) the kernel side writes to.
pub const GENERATION_MAP: &str = "GENERATION";
/// Per-CPU array of `u64` counters indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Hash map `tgid -> u8`; consulted only when [`SamplerConfig::FILTER_PIDS`] is set.
pub const PID_FILTER_MAP: &str = "PID_FILTER";
/// Ring buffer of `u32` pids: the first sample of each process since user space last cleared
/// [`SEEN_PROCESSES_MAP`], so user space reads its mappings while it still runs.
pub const NEW_PROCESSES_MAP: &str = "NEW_PROCESSES";
/// Size of [`NEW_PROCESSES_MAP`] in bytes (a power of two, a multiple of the page size): room
/// for 4096 announcements (4-byte pid plus the 8-byte record header, rounded to 16).
pub const NEW_PROCESSES_BYTES: u32 = 64 * 1024;
/// LRU hash map `tgid -> u8` of processes already announced in [`NEW_PROCESSES_MAP`].
pub const SEEN_PROCESSES_MAP: &str = "SEEN_PROCESSES";
/// Entries of [`SEEN_PROCESSES_MAP`]; past this many processes per interval the oldest are
/// announced again, which costs a snapshot, not a sample.
pub const SEEN_PROCESSES_ENTRIES: u32 = 16384;
/// Read-only global holding the [`SamplerConfig`] set at load time.
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Name of the `perf_event` program.
pub const PROGRAM_NAME: &str = "profile_cpu";
/// Name of the `sched_process_exec` raw tracepoint program, which has an exec'd process
/// announced again.
pub const EXEC_PROGRAM_NAME: &str = "process_exec";

/// Depth of a stack in a stack trace map (the kernel's `PERF_MAX_STACK_DEPTH`), and of a user
/// stack walked by the program.
pub const MAX_STACK_DEPTH: usize = 127;
/// `PF_KTHREAD` in `task_struct.flags`.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Stack id stored in a [`SampleKey`] when that kind of stack was not requested, or is empty
/// (no kernel stack for a sample taken in user mode).
pub const STACK_NOT_COLLECTED: i32 = -1;
/// Stack id stored when the kernel could not record the stack; the cause is counted in
/// [`Counter`].
pub const STACK_LOST: i32 = -2;
/// User stack id stored when the walked user stack is in the generation's
/// [`USER_STACKS_MAPS`] map under [`SampleKey::user_stack_hash`].
pub const STACK_WALKED: i32 = 0;

/// Load-time configuration of the kernel side, written into the read-only global
/// [`CONFIG_GLOBAL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamplerConfig {
    /// Byte offset of `flags` in the running kernel's `struct task_struct` (read from BTF).
    pub task_flags_offset: u32,
    /// Bit set of `COLLECT_USER`, `COLLECT_KERNEL`, `FILTER_PIDS`.
    pub flags: u32,
    /// Byte offset of `stack` (the kernel stack's base) in `struct task_struct`, from BTF:
    /// the user registers of a thread sampled in kernel mode sit at the top of that stack.
    pub task_stack_offset: u32,
    /// A process never sampled (the profiler itself, in `record`); 0 for none.
    pub exclude_tgid: u32,
    /// Byte offset of `thread.fsbase` in `struct task_struct` (BTF): the thread pointer
    /// CPython keeps as a thread state's `thread_id`.
    pub task_fsbase_offset: u32,
    pub _pad: u32,
}

impl SamplerConfig {
    pub const COLLECT_USER: u32 = 1;
    pub const COLLECT_KERNEL: u32 = 1 << 1;
    pub const FILTER_PIDS: u32 = 1 << 2;
    /// Walk the Python frames of processes in the Python processes map.
    pub const COLLECT_PYTHON: u32 = 1 << 3;

    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

const _: () = assert!(core::mem::size_of::<SamplerConfig>() == 24);

/// Key of the counts maps: one entry per distinct (process, thread name, user stack, kernel
/// stack) seen in a generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// Thread group id: the process id user space sees.
    pub pid: u32,
    /// [`STACK_WALKED`], [`STACK_NOT_COLLECTED`] or [`STACK_LOST`].
    pub user_stack_id: i32,
    /// Id in the generation's stack map, or [`STACK_NOT_COLLECTED`] / [`STACK_LOST`].
    pub kernel_stack_id: i32,
    /// `comm` of the sampled thread, NUL padded.
    pub comm: [u8; 16],
    pub _pad: u32,
    /// With [`STACK_WALKED`]: the key of the user stack in the generation's
    /// [`USER_STACKS_MAPS`] map (a hash of its frames); zero otherwise.
    pub user_stack_hash: u64,
}

const _: () = assert!(core::mem::size_of::<SampleKey>() == 40);
const _: () = assert!(core::mem::align_of::<SampleKey>() == 8);

/// Indices into the per-CPU [`COUNTERS_MAP`]. Everything the program does ends in exactly one
/// of `Recorded` or a `Skipped*` counter; the `*Error` counters explain lost stacks or samples.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Samples added to a counts map.
    Recorded = 0,
    /// Samples of the idle task (pid 0).
    SkippedIdle = 1,
    /// Samples of kernel threads.
    SkippedKernelThread = 2,
    /// Samples of processes outside the PID filter.
    SkippedFiltered = 3,
    /// `bpf_get_stackid` found another stack in the user stack's bucket.
    UserStackCollisionError = 4,
    /// The stack map had no free bucket for a user stack.
    UserStackMapFullError = 5,
    /// The user stack could not be read (`EFAULT` or another errno).
    UserStackReadError = 6,
    /// Same as the user stack errors, for kernel stacks.
    KernelStackCollisionError = 7,
    KernelStackMapFullError = 8,
    KernelStackReadError = 9,
    /// The counts map was full: the sample itself was lost.
    CountsMapFullError = 10,
    /// `task_struct.flags` could not be read.
    TaskReadError = 11,
    /// The new-process ring buffer was full: that process is snapshotted at the next drain
    /// instead, and its samples go unnamed if it has exited by then.
    NewProcessLostError = 12,
    /// Two different walked user stacks had the same 64-bit hash in one generation: the
    /// second one's sample has its user stack lost.
    UserStackHashCollisionError = 13,
    /// The tail call into the user-stack walker failed (its program was not installed): the
    /// sample has its user stack lost.
    UnwindTailCallError = 14,
    /// Walks ended at the outermost frame (`_start`, a thread's entry: the return address is
    /// undefined there, or zero).
    UnwindComplete = 15,
    /// Walks ended in code with no unwind table (JIT, a file without `.eh_frame`, a file over
    /// the table budget) where frame pointers gave out.
    UnwindNoTable = 16,
    /// Walks ended at an address user space had loaded no mapping for (a process not loaded
    /// yet, or a library it just mapped), where frame pointers gave out.
    UnwindMappingUnknown = 17,
    /// Walks ended because a saved register could not be read from the stack, or read as an
    /// impossible value (a frame below the one before it).
    UnwindReadError = 18,
    /// Walks cut at the depth limit ([`MAX_STACK_DEPTH`] frames).
    UnwindDepthLimit = 19,
    /// Walks ended at a rule the program does not follow (a CFA from another register or a
    /// DWARF expression, a return address not saved at CFA + offset).
    UnwindUnsupportedRule = 20,
    /// Walks not started: the user registers of a thread sampled in the kernel were not where
    /// the task's kernel stack says.
    UnwindNoRegisters = 21,
    /// Python walks that read the thread's whole Python stack (possibly empty).
    PythonComplete = 22,
    /// Python walks cut short: past the depth limit, or a read failed midway. The innermost
    /// frames are kept.
    PythonCut = 23,
    /// Python walks that found no thread state for the sampled thread (a thread CPython does
    /// not know, or one past the walk's thread limit).
    PythonNoThread = 24,
    /// Python walks that could not read the interpreter's thread list.
    PythonReadError = 25,
    /// The Python stack map was full: the sample keeps its native stack only.
    PythonStackMapFullError = 26,
}

impl Counter {
    pub const COUNT: u32 = 27;

    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Recorded,
        Counter::SkippedIdle,
        Counter::SkippedKernelThread,
        Counter::SkippedFiltered,
        Counter::UserStackCollisionError,
        Counter::UserStackMapFullError,
        Counter::UserStackReadError,
        Counter::KernelStackCollisionError,
        Counter::KernelStackMapFullError,
        Counter::KernelStackReadError,
        Counter::CountsMapFullError,
        Counter::TaskReadError,
        Counter::NewProcessLostError,
        Counter::UserStackHashCollisionError,
        Counter::UnwindTailCallError,
        Counter::UnwindComplete,
        Counter::UnwindNoTable,
        Counter::UnwindMappingUnknown,
        Counter::UnwindReadError,
        Counter::UnwindDepthLimit,
        Counter::UnwindUnsupportedRule,
        Counter::UnwindNoRegisters,
        Counter::PythonComplete,
        Counter::PythonCut,
        Counter::PythonNoThread,
        Counter::PythonReadError,
        Counter::PythonStackMapFullError,
    ];

    /// The snake_case name used in logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Recorded => "recorded",
            Counter::SkippedIdle => "skipped_idle",
            Counter::SkippedKernelThread => "skipped_kernel_thread",
            Counter::SkippedFiltered => "skipped_filtered",
            Counter::UserStackCollisionError => "user_stack_collision",
            Counter::UserStackMapFullError => "user_stack_map_full",
            Counter::UserStackReadError => "user_stack_read",
            Counter::KernelStackCollisionError => "kernel_stack_collision",
            Counter::KernelStackMapFullError => "kernel_stack_map_full",
            Counter::KernelStackReadError => "kernel_stack_read",
            Counter::CountsMapFullError => "counts_map_full",
            Counter::TaskReadError => "task_read",
            Counter::NewProcessLostError => "new_process_lost",
            Counter::UserStackHashCollisionError => "user_stack_hash_collision",
            Counter::UnwindTailCallError => "unwind_tail_call",
            Counter::UnwindComplete => "complete",
            Counter::UnwindNoTable => "no_table",
            Counter::UnwindMappingUnknown => "mapping_unknown",
            Counter::UnwindReadError => "read_error",
            Counter::UnwindDepthLimit => "depth_limit",
            Counter::UnwindUnsupportedRule => "unsupported_rule",
            Counter::UnwindNoRegisters => "no_registers",
            Counter::PythonComplete => "python_complete",
            Counter::PythonCut => "python_cut",
            Counter::PythonNoThread => "python_no_thread",
            Counter::PythonReadError => "python_read_error",
            Counter::PythonStackMapFullError => "python_stack_map_full",
        }
    }

    /// Whether this counter records a failure (as opposed to a sample or a deliberate skip).
    pub const fn is_error(self) -> bool {
        let i = self as u32;
        (i >= Counter::UserStackCollisionError as u32 && i <= Counter::UnwindTailCallError as u32)
            || i == Counter::PythonStackMapFullError as u32
    }

    /// Whether this counter is one of the ways a user-stack walk ends (exported apart from the
    /// sample outcomes and the errors: every walk ends in exactly one of them).
    pub const fn is_walk_end(self) -> bool {
        let i = self as u32;
        i >= Counter::UnwindComplete as u32 && i <= Counter::UnwindNoRegisters as u32
    }

    /// Whether this counter is one of the ways a Python walk ends (every walk of a Python
    /// process's sample ends in exactly one of them).
    pub const fn is_python_walk_end(self) -> bool {
        let i = self as u32;
        i >= Counter::PythonComplete as u32 && i <= Counter::PythonReadError as u32
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: these types are repr(C), Copy, with no padding and no pointers; any bit pattern
    // is a valid value.
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::SamplerConfig {}
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::MappingKey {}
    unsafe impl aya::Pod for super::MappingInfo {}
    unsafe impl aya::Pod for super::UserStack {}
    unsafe impl aya::Pod for super::PythonProcess {}
    unsafe impl aya::Pod for super::PythonStack {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_table_matches_indices() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} out of place", c.name());
        }
        assert_eq!(Counter::ALL.len(), Counter::COUNT as usize);
    }

    #[test]
    fn error_counters_are_exactly_the_failures() {
        let errors = Counter::ALL.iter().filter(|c| c.is_error()).count();
        assert_eq!(errors, 12);
        let ends = Counter::ALL.iter().filter(|c| c.is_walk_end()).count();
        assert_eq!(ends, 7);
        let python = Counter::ALL
            .iter()
            .filter(|c| c.is_python_walk_end())
            .count();
        assert_eq!(python, 4);
        assert!(!Counter::UnwindComplete.is_error());
        assert!(!Counter::NewProcessLostError.is_walk_end());
        assert!(!Counter::SkippedFiltered.is_error());
        assert!(Counter::UserStackCollisionError.is_error());
    }

    #[test]
    fn sample_key_field_offsets_match_the_kernel_layout() {
        let key = SampleKey {
            pid: 0,
            user_stack_id: 0,
            kernel_stack_id: 0,
            comm: [0; 16],
            _pad: 0,
            user_stack_hash: 0,
        };
        let base = &key as *const _ as usize;
        assert_eq!(&key.user_stack_id as *const _ as usize - base, 4);
        assert_eq!(&key.kernel_stack_id as *const _ as usize - base, 8);
        assert_eq!(&key.comm as *const _ as usize - base, 12);
        assert_eq!(&key.user_stack_hash as *const _ as usize - base, 32);
    }

    #[test]
    fn unwind_row_field_offsets_have_no_padding() {
        let row = UnwindRow::default();
        let base = &row as *const _ as usize;
        assert_eq!(&row.cfa_offset as *const _ as usize - base, 4);
        assert_eq!(&row.rbp_offset as *const _ as usize - base, 8);
        assert_eq!(&row.ra_offset as *const _ as usize - base, 10);
        assert_eq!(&row.cfa_kind as *const _ as usize - base, 12);
        assert_eq!(&row.flags as *const _ as usize - base, 15);
        assert_eq!(row.cfa_kind, UnwindRow::CFA_NO_INFO);
    }

    #[test]
    fn config_flags() {
        let c = SamplerConfig {
            flags: SamplerConfig::COLLECT_USER | SamplerConfig::FILTER_PIDS,
            ..SamplerConfig::default()
        };
        assert!(c.has(SamplerConfig::COLLECT_USER));
        assert!(!c.has(SamplerConfig::COLLECT_KERNEL));
        assert!(c.has(SamplerConfig::FILTER_PIDS));
    }
}
