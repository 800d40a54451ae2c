//! The Python walker: for a sample of a process user space found CPython in
//! (`PYTHON_PROCESSES`), finds the sampled thread's `PyThreadState` and records its Python
//! frame chain as (code object, instruction index, entry mark), innermost first. It runs as
//! its own program once the native walk has ended, takes the walk from the same per-CPU
//! scratch slot, records up to [`FRAMES_PER_CALL`] frames per run and tail-calls itself until
//! the chain ends. Every Python walk ends in exactly one `Python*` walk counter.
//!
//! The process is not trusted: every read goes through the checked probe-read helper, and a
//! chain that loops or runs past [`MAX_PYTHON_DEPTH`] is cut, not followed.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user, generated::bpf_get_current_task},
    macros::map,
    maps::HashMap,
    programs::PerfEventContext,
};
use profiler_common::{
    Counter, MAX_PYTHON_DEPTH, PY_FRAME_ENTRY, PY_FRAME_INSTRUCTION_UNKNOWN, PY_NO_OFFSET,
    PYTHON_PROGRAM_INDEX, PythonProcess, PythonStack, py_frame,
};

use crate::unwind::{FNV_OFFSET, UNWIND_PROGRAMS, Walk, fnv};

#[map]
pub static PYTHON_PROCESSES: HashMap<u32, PythonProcess> = HashMap::with_max_entries(1, 0);

/// Frames recorded per run of the program: 8 runs reach [`MAX_PYTHON_DEPTH`]. Each run is
/// one more tail call (with the native walk's 8, well under the kernel's 33), and a short
/// loop keeps the verifier's work at load small.
const FRAMES_PER_CALL: usize = 16;
/// Covers every index below [`MAX_PYTHON_DEPTH`] (127).
const INDEX_MASK: usize = 127;
/// Thread states looked at to find the sampled thread's.
const MAX_THREADS: usize = 64;

/// The Python part of a walk in progress.
#[repr(C)]
pub struct PythonWalk {
    pub stack: PythonStack,
    /// The next frame to record; 0 when the chain has ended.
    pub frame: u64,
    /// FNV-1a over the frames recorded so far, without their entry marks (which follow from
    /// the native stack, hashed apart): computed as they are recorded, so the program that
    /// stores the stack needs no loop over it.
    pub hash: u64,
    pub info: PythonProcess,
    /// Set once the walker program found the thread's first frame.
    pub begun: u32,
    pub _pad: u32,
}

/// Whether `walk`'s sample is of a process running CPython: then its Python walk is to
/// begin in the walker program.
pub fn wanted(walk: &mut Walk) -> bool {
    walk.python.stack.len = 0;
    walk.python.begun = 0;
    PYTHON_PROCESSES.get_ptr(&walk.key.pid).is_some()
}

/// Begins the Python walk of `walk`'s sample: finds the thread's first frame.
pub fn begin(walk: &mut Walk, fsbase_offset: u32) -> Result<(), Counter> {
    walk.python.begun = 1;
    let Some(info) = PYTHON_PROCESSES.get_ptr(&walk.key.pid) else {
        // Removed meanwhile (the process exited).
        return Err(Counter::PythonReadError);
    };
    // SAFETY: a map value pointer, valid during this program run.
    let info = unsafe { *info };
    let python = &mut walk.python;
    python.stack.len = 0;
    python.stack.flags = 0;
    python.stack.pid = walk.key.pid;
    python.frame = 0;
    python.hash = FNV_OFFSET;
    python.info = info;
    let thread = find_thread(&info, fsbase_offset)?;
    let mut frame =
        read(thread + info.thread_frame as u64).map_err(|_| Counter::PythonReadError)?;
    if info.cframe_current_frame != PY_NO_OFFSET && frame != 0 {
        frame =
            read(frame + info.cframe_current_frame as u64).map_err(|_| Counter::PythonReadError)?;
    }
    python.frame = frame;
    Ok(())
}

/// The sampled thread's `PyThreadState`: the one of the main interpreter whose `thread_id`
/// (`pthread_self()`) is the task's fs base.
fn find_thread(info: &PythonProcess, fsbase_offset: u32) -> Result<u64, Counter> {
    // SAFETY: the current task, read through the checked probe-read helper at the offset BTF
    // gave for `task_struct.thread.fsbase`.
    let fsbase: u64 = unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.add(fsbase_offset as usize) as *const u64)
    }
    .map_err(|_| Counter::PythonReadError)?;
    if fsbase == 0 {
        return Err(Counter::PythonNoThread);
    }
    let interpreter = read(info.interpreters_head).map_err(|_| Counter::PythonReadError)?;
    if interpreter == 0 {
        return Err(Counter::PythonNoThread);
    }
    let mut thread = read(interpreter + info.interp_threads_head as u64)
        .map_err(|_| Counter::PythonReadError)?;
    for _ in 0..MAX_THREADS {
        if thread == 0 {
            break;
        }
        if read(thread + info.thread_id as u64) == Ok(fsbase) {
            return Ok(thread);
        }
        thread = read(thread + info.thread_next as u64).map_err(|_| Counter::PythonReadError)?;
    }
    Err(Counter::PythonNoThread)
}

/// Hands the walk to the Python walker; returns only if the tail call failed.
pub fn start(ctx: &PerfEventContext) {
    // SAFETY: the program array holds only perf_event programs sharing the walk's slot.
    unsafe { UNWIND_PROGRAMS.tail_call(ctx, PYTHON_PROGRAM_INDEX) };
}

/// Records up to [`FRAMES_PER_CALL`] frames; `Some(end)` when the walk is over.
pub fn steps(python: &mut PythonWalk) -> Option<Counter> {
    for _ in 0..FRAMES_PER_CALL {
        if python.frame == 0 {
            return Some(Counter::PythonComplete);
        }
        if let Err(end) = step(python) {
            python.stack.flags |= PythonStack::CUT;
            return Some(end);
        }
    }
    None
}

fn step(python: &mut PythonWalk) -> Result<(), Counter> {
    let info = python.info;
    let frame = python.frame;
    let previous = read(frame + info.frame_previous as u64).map_err(|_| Counter::PythonCut)?;
    if previous == frame {
        return Err(Counter::PythonCut);
    }
    python.frame = previous;
    let owner = if info.frame_owner != PY_NO_OFFSET {
        read_u8(frame + info.frame_owner as u64)?
    } else {
        0
    };
    let len = python.stack.len as usize;
    if info.entry_kind == PythonProcess::ENTRY_CSTACK_SHIM
        && owner == PythonProcess::OWNED_BY_CSTACK
    {
        // The frame under the shim (the previous one recorded) began an interpreter run. The
        // mask keeps the index provably inside the array for the verifier.
        if len > 0 {
            if let Some(frame) = python.stack.frames.get_mut((len - 1) & INDEX_MASK) {
                *frame |= PY_FRAME_ENTRY;
            }
        }
        return Ok(());
    }
    if len >= MAX_PYTHON_DEPTH {
        return Err(Counter::PythonCut);
    }
    let code = read(frame + info.frame_code as u64).map_err(|_| Counter::PythonCut)?;
    let instruction = instruction(&info, frame, code);
    let entry = match info.entry_kind {
        PythonProcess::ENTRY_FIELD => read_u8(frame + info.frame_is_entry as u64)? != 0,
        PythonProcess::ENTRY_EVERY_FRAME => true,
        _ => false,
    };
    let frame = py_frame(code, instruction, entry);
    if let Some(slot) = python.stack.frames.get_mut(len & INDEX_MASK) {
        *slot = frame;
    }
    python.hash = fnv(python.hash, frame & !PY_FRAME_ENTRY);
    python.stack.len = len as u16 + 1;
    Ok(())
}

/// The frame's instruction index in code units, or [`PY_FRAME_INSTRUCTION_UNKNOWN`].
fn instruction(info: &PythonProcess, frame: u64, code: u64) -> u64 {
    let at = frame + info.frame_instruction as u64;
    match info.instruction_kind {
        PythonProcess::INSTRUCTION_POINTER => {
            let start = code + info.code_instructions as u64;
            match read(at) {
                Ok(pointer) if pointer >= start => (pointer - start) / 2,
                // A new frame's `prev_instr` is one unit before its first instruction.
                Ok(pointer) if pointer.wrapping_add(2) == start => 0,
                _ => PY_FRAME_INSTRUCTION_UNKNOWN,
            }
        }
        PythonProcess::INSTRUCTION_LASTI_UNITS | PythonProcess::INSTRUCTION_LASTI_BYTES => {
            // SAFETY: the checked probe-read helper.
            match unsafe { bpf_probe_read_user(at as *const i32) } {
                Ok(lasti) if lasti >= 0 => {
                    if info.instruction_kind == PythonProcess::INSTRUCTION_LASTI_BYTES {
                        lasti as u64 / 2
                    } else {
                        lasti as u64
                    }
                }
                _ => PY_FRAME_INSTRUCTION_UNKNOWN,
            }
        }
        _ => PY_FRAME_INSTRUCTION_UNKNOWN,
    }
}

fn read(address: u64) -> Result<u64, Counter> {
    // SAFETY: the checked probe-read helper; a bad address is an error, not a fault.
    unsafe { bpf_probe_read_user(address as *const u64) }.map_err(|_| Counter::PythonReadError)
}

fn read_u8(address: u64) -> Result<u8, Counter> {
    // SAFETY: as in `read`.
    unsafe { bpf_probe_read_user(address as *const u8) }.map_err(|_| Counter::PythonCut)
}
