//! What the kernel program reads to walk a CPython thread's frame chain, and what it records.
//!
//! - [`PYTHON_PROCESSES_MAP`]: pid -> [`PythonProcess`], written by user space when it finds
//!   an interpreter in a process: where the interpreter list starts and the offsets of the
//!   fields the walk reads, for that process's CPython version.
//! - The walk finds the sampled thread's `PyThreadState` by its `thread_id` (`pthread_self()`,
//!   which on x86_64 is the thread's fs base, read from the task), then follows the frame
//!   chain from it, recording one [`PythonStack`] frame per Python call.
//! - [`PYTHON_STACKS_MAPS`]: the walked Python stacks, under the same hash as the sample's
//!   user stack (which then has [`UserStack::HAS_PYTHON`](crate::UserStack::HAS_PYTHON)).

/// Hash map `u32 (tgid) -> PythonProcess`.
pub const PYTHON_PROCESSES_MAP: &str = "PYTHON_PROCESSES";
/// Hash maps `u64 -> PythonStack`; one per generation, keyed like the user stacks.
pub const PYTHON_STACKS_MAPS: [&str; 2] = ["PYTHON_STACKS_0", "PYTHON_STACKS_1"];
/// Ring buffer of the [`PythonStack`]s stored for the first time in a generation, so user
/// space names their code objects while the process runs without scanning the stack maps.
/// When it is full a stack is not announced; it is still named at the drain if its process
/// lives.
pub const PYTHON_NEW_STACKS_MAP: &str = "PYTHON_NEW_STACKS";
/// Size of [`PYTHON_NEW_STACKS_MAP`] in bytes (a power of two, a multiple of the page size):
/// about 250 stacks between two reads.
pub const PYTHON_NEW_STACKS_BYTES: u32 = 256 * 1024;
/// Index of the Python walker in the program array the user-stack walker tail-calls.
pub const PYTHON_PROGRAM_INDEX: u32 = 1;
/// Name of the Python walker program.
pub const PYTHON_PROGRAM_NAME: &str = "walk_python";
/// Entries of [`PYTHON_PROCESSES_MAP`].
pub const PYTHON_PROCESSES_ENTRIES: u32 = 4096;

/// Python frames recorded per sample; a deeper stack keeps its innermost frames and is marked
/// [`PythonStack::CUT`].
pub const MAX_PYTHON_DEPTH: usize = 127;

/// Bits of a recorded frame: the code object's address in the low 48 bits, the index of the
/// instruction (in 2-byte code units) in the next 15, and [`PY_FRAME_ENTRY`] on top.
pub const PY_FRAME_CODE_MASK: u64 = (1 << 48) - 1;
pub const PY_FRAME_INSTRUCTION_SHIFT: u32 = 48;
/// Instruction index recorded when it was unknown or did not fit 15 bits.
pub const PY_FRAME_INSTRUCTION_UNKNOWN: u64 = 0x7fff;
/// Set on the outermost frame of each run of the interpreter loop (CPython 3.11's
/// `is_entry`, the frame under a 3.12+ C-stack shim, every frame before 3.11): each such run
/// is one native `_PyEval_EvalFrameDefault` frame.
pub const PY_FRAME_ENTRY: u64 = 1 << 63;

/// An offset the version does not have.
pub const PY_NO_OFFSET: u16 = u16::MAX;

/// How a process's CPython is walked: its runtime's address and its version's offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonProcess {
    /// Address of `_PyRuntime.interpreters.head` in the process: the main interpreter.
    pub interpreters_head: u64,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u16,
    /// `PyThreadState.next`, `.thread_id`.
    pub thread_next: u16,
    pub thread_id: u16,
    /// `PyThreadState.cframe` (3.11, 3.12), `.current_frame` (3.13) or `.frame` (before
    /// 3.11).
    pub thread_frame: u16,
    /// `_PyCFrame.current_frame`, or [`PY_NO_OFFSET`] when the thread points at its frame.
    pub cframe_current_frame: u16,
    /// The frame's code object, its caller, and its instruction (see `instruction_kind`).
    pub frame_code: u16,
    pub frame_previous: u16,
    pub frame_instruction: u16,
    /// `_PyInterpreterFrame.owner` (3.12+: a C-stack shim is not a call), or
    /// [`PY_NO_OFFSET`].
    pub frame_owner: u16,
    /// `_PyInterpreterFrame.is_entry` (3.11), or [`PY_NO_OFFSET`].
    pub frame_is_entry: u16,
    /// Where a code object's instructions start (`co_code_adaptive`).
    pub code_instructions: u16,
    /// One of the `INSTRUCTION_*`.
    pub instruction_kind: u8,
    /// One of the `ENTRY_*`.
    pub entry_kind: u8,
}

impl PythonProcess {
    /// The frame holds a pointer to an instruction inside its code object (3.11+:
    /// `prev_instr`, `instr_ptr`): the index is the pointer's distance from
    /// `code + code_instructions`, in 2-byte units.
    pub const INSTRUCTION_POINTER: u8 = 1;
    /// The frame holds `f_lasti`, an `int` index in code units (3.10).
    pub const INSTRUCTION_LASTI_UNITS: u8 = 2;
    /// The frame holds `f_lasti`, an `int` offset in bytes (before 3.10).
    pub const INSTRUCTION_LASTI_BYTES: u8 = 3;

    /// `frame_is_entry` marks the outermost frame of each interpreter run (3.11).
    pub const ENTRY_FIELD: u8 = 1;
    /// A frame owned by the C stack (owner [`PythonProcess::OWNED_BY_CSTACK`]) sits under
    /// each interpreter run (3.12+).
    pub const ENTRY_CSTACK_SHIM: u8 = 2;
    /// Each frame is its own interpreter run (before 3.11).
    pub const ENTRY_EVERY_FRAME: u8 = 3;

    /// `FRAME_OWNED_BY_CSTACK`.
    pub const OWNED_BY_CSTACK: u8 = 3;
}

const _: () = assert!(core::mem::size_of::<PythonProcess>() == 32);

/// A walked Python stack: `len` frames, innermost first, encoded as described at
/// [`PY_FRAME_CODE_MASK`]. Frames past `len` are garbage.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PythonStack {
    pub len: u16,
    /// Bit set of [`PythonStack::CUT`].
    pub flags: u16,
    /// The process (tgid) whose code objects the frames point at.
    pub pid: u32,
    pub frames: [u64; MAX_PYTHON_DEPTH],
}

impl PythonStack {
    /// The chain went on past [`MAX_PYTHON_DEPTH`] frames, or a read failed midway: the
    /// outermost frames are missing.
    pub const CUT: u16 = 1;
}

const _: () = assert!(core::mem::size_of::<PythonStack>() == 1024);

/// Packs one recorded frame.
pub const fn py_frame(code: u64, instruction: u64, entry: bool) -> u64 {
    let instruction = if instruction > PY_FRAME_INSTRUCTION_UNKNOWN {
        PY_FRAME_INSTRUCTION_UNKNOWN
    } else {
        instruction
    };
    (code & PY_FRAME_CODE_MASK)
        | (instruction << PY_FRAME_INSTRUCTION_SHIFT)
        | if entry { PY_FRAME_ENTRY } else { 0 }
}

/// The code object address, instruction index (`None` when unknown) and entry mark of a
/// recorded frame.
pub const fn py_frame_parts(frame: u64) -> (u64, Option<u32>, bool) {
    let instruction = (frame >> PY_FRAME_INSTRUCTION_SHIFT) & PY_FRAME_INSTRUCTION_UNKNOWN;
    (
        frame & PY_FRAME_CODE_MASK,
        if instruction == PY_FRAME_INSTRUCTION_UNKNOWN {
            None
        } else {
            Some(instruction as u32)
        },
        frame & PY_FRAME_ENTRY != 0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_pack_and_unpack() {
        let f = py_frame(0x7f12_3456_7890, 42, true);
        assert_eq!(py_frame_parts(f), (0x7f12_3456_7890, Some(42), true));
        let f = py_frame(0x5555_0000_1000, 1 << 20, false);
        assert_eq!(py_frame_parts(f), (0x5555_0000_1000, None, false));
    }
}
