//! The user-stack walker: follows a sampled thread's user stack with the unwind tables user
//! space loaded (`UNWIND_ROWS`, found through the per-process `MAPPINGS` trie), falling back to
//! frame pointers in code with no table. It runs as its own program, which takes the walk's
//! state from a per-CPU scratch slot, walks up to [`FRAMES_PER_CALL`] frames and tail-calls
//! itself until the walk ends, so the verifier checks a short program once rather than a
//! 127-frame loop. Every walk ends in exactly one `Unwind*` counter.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, pt_regs},
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user, generated::bpf_get_current_task},
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, ProgramArray, lpm_trie::Key},
    programs::PerfEventContext,
};
use profiler_common::{
    Counter, MAX_STACK_DEPTH, MappingInfo, MappingKey, SampleKey, UNWIND_PROGRAM_INDEX, UnwindRow,
    UserStack,
};

/// Mappable, so user space writes a table with one copy.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
pub static MAPPINGS: LpmTrie<MappingKey, MappingInfo> = LpmTrie::with_max_entries(1, 0);
#[map]
pub static UNWIND_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(2, 0);
#[map]
static WALKS: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// Frames walked per run of the program: 8 runs (one call and 7 tail calls, of the 33 the
/// kernel allows) reach [`MAX_STACK_DEPTH`].
const FRAMES_PER_CALL: usize = 16;
/// Steps of the binary search over one file's rows: enough for 2^22 rows.
const SEARCH_STEPS: usize = 22;
/// The kernel's `THREAD_SIZE` on x86_64 (16 KiB; 32 KiB with KASAN).
const THREAD_SIZES: [u64; 2] = [16 * 1024, 32 * 1024];
/// Addresses at or above this are not user space (x86_64, 4- or 5-level paging).
const USER_LIMIT: u64 = 0x00ff_ffff_ffff_ffff;
/// Offsets in the `ucontext_t` a signal trampoline's rsp points at (`uc_mcontext.gregs`).
const UCONTEXT_RBP: u64 = 120;
const UCONTEXT_RSP: u64 = 160;
const UCONTEXT_RIP: u64 = 168;

/// A walk in progress: the per-CPU scratch slot the program and its tail calls share.
#[repr(C)]
pub struct Walk {
    pub stack: UserStack,
    /// The sample's key, completed when the walk ends.
    pub key: SampleKey,
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    /// FNV-1a over the frames so far.
    pub hash: u64,
    /// The generation read when the sample was taken.
    pub generation: u32,
    /// Set when `pc` is exact (the sampled pc, or one a signal frame restored), not a return
    /// address to be looked up at `pc - 1`.
    pub exact: u32,
    /// Set when the walk met an address of a loaded process in no mapping user space knows
    /// (a library it mapped since): the process is announced again so user space reloads it.
    pub reload: u32,
    pub _pad: u32,
    /// The Python walk that follows the native one, for a process running CPython.
    pub python: crate::python::PythonWalk,
}

/// The stack hashes are FNV-1a over 64-bit words.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One FNV-1a step: `hash` with `word` mixed in.
#[inline(always)]
pub fn fnv(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(FNV_PRIME)
}

/// Starts a walk from the sampled thread's user registers; `Err` with the counter if there are
/// none to start from.
pub fn begin(
    ctx: &PerfEventContext,
    key: &SampleKey,
    generation: u32,
    stack_offset: u32,
) -> Result<(), Counter> {
    let walk = WALKS.get_ptr_mut(0).ok_or(Counter::UnwindNoRegisters)?;
    let (pc, sp, bp) = user_registers(ctx, stack_offset)?;
    // SAFETY: a per-CPU slot; perf_event programs do not nest on one CPU.
    let walk = unsafe { &mut *walk };
    walk.key = *key;
    walk.generation = generation;
    walk.stack.len = 0;
    walk.pc = pc;
    walk.sp = sp;
    walk.bp = bp;
    walk.hash = FNV_OFFSET;
    walk.exact = 1;
    walk.reload = 0;
    Ok(())
}

/// Hands the walk to the walker program; returns only if the tail call failed.
pub fn start(ctx: &PerfEventContext) {
    // SAFETY: the program array holds only the walker, a perf_event program like this one.
    unsafe { UNWIND_PROGRAMS.tail_call(ctx, UNWIND_PROGRAM_INDEX) };
}

/// The walk to continue, for the walker program.
pub fn current() -> Option<&'static mut Walk> {
    // SAFETY: as in `begin`.
    WALKS.get_ptr_mut(0).map(|w| unsafe { &mut *w })
}

/// Walks up to [`FRAMES_PER_CALL`] frames; `Some(end)` when the walk is over.
pub fn steps(walk: &mut Walk) -> Option<Counter> {
    for _ in 0..FRAMES_PER_CALL {
        if let Err(end) = step(walk) {
            return Some(end);
        }
    }
    None
}

/// Records the current pc as a frame and moves to the caller's.
fn step(walk: &mut Walk) -> Result<(), Counter> {
    let len = walk.stack.len as usize;
    if len >= MAX_STACK_DEPTH {
        return Err(Counter::UnwindDepthLimit);
    }
    let pc = walk.pc;
    walk.stack.frames[len] = pc;
    walk.stack.len = len as u32 + 1;
    walk.hash = fnv(walk.hash, pc);

    let lookup_pc = if walk.exact != 0 { pc } else { pc - 1 };
    let key = Key::new(MappingKey::BITS, MappingKey::new(walk.key.pid, lookup_pc));
    let mapping = MAPPINGS.get(&key).copied();
    let (row, end_without) = match mapping {
        Some(m) if m.kind == MappingInfo::KIND_TABLE => {
            (find_row(&m, lookup_pc), Counter::UnwindNoTable)
        }
        Some(m) if m.kind == MappingInfo::KIND_NO_TABLE => (None, Counter::UnwindNoTable),
        Some(_) => {
            walk.reload = 1;
            (None, Counter::UnwindMappingUnknown)
        }
        None => (None, Counter::UnwindMappingUnknown),
    };
    let Some(row) = row else {
        return frame_pointer_step(walk, end_without);
    };
    if row.flags & UnwindRow::FLAG_SIGNAL_FRAME != 0 {
        return signal_frame_step(walk);
    }
    let cfa = match row.cfa_kind {
        UnwindRow::CFA_RSP_OFFSET => walk.sp.wrapping_add(row.cfa_offset as i64 as u64),
        UnwindRow::CFA_RBP_OFFSET => walk.bp.wrapping_add(row.cfa_offset as i64 as u64),
        UnwindRow::CFA_PLT_STUB => {
            let pushed = if (pc & 15) >= row.cfa_offset as u64 {
                8
            } else {
                0
            };
            walk.sp + 8 + pushed
        }
        UnwindRow::CFA_NO_INFO => return frame_pointer_step(walk, Counter::UnwindNoTable),
        _ => return Err(Counter::UnwindUnsupportedRule),
    };
    let ra = match row.ra_kind {
        UnwindRow::RA_CFA_OFFSET => read(cfa.wrapping_add(row.ra_offset as i64 as u64))?,
        UnwindRow::RA_UNDEFINED => return Err(Counter::UnwindComplete),
        _ => return Err(Counter::UnwindUnsupportedRule),
    };
    let bp = match row.rbp_kind {
        UnwindRow::RBP_UNCHANGED => walk.bp,
        UnwindRow::RBP_CFA_OFFSET => read(cfa.wrapping_add(row.rbp_offset as i64 as u64))?,
        _ => 0,
    };
    if cfa <= walk.sp {
        return Err(Counter::UnwindReadError);
    }
    advance(walk, ra, cfa, bp)
}

/// The caller by frame pointers: return address at rbp + 8, caller's rbp at rbp, its rsp at
/// rbp + 16. `end` is the counter if the chain stops here.
fn frame_pointer_step(walk: &mut Walk, end: Counter) -> Result<(), Counter> {
    let bp = walk.bp;
    if bp == 0 || bp < walk.sp || bp >= USER_LIMIT {
        return Err(end);
    }
    let ra = read(bp + 8).map_err(|_| end)?;
    let next_bp = read(bp).map_err(|_| end)?;
    advance(walk, ra, bp + 16, next_bp)
        .map_err(|e| if e == Counter::UnwindComplete { e } else { end })
}

/// A signal trampoline (`__restore_rt`): its rsp points at the `ucontext_t` holding the
/// interrupted registers, and the interrupted pc is exact.
fn signal_frame_step(walk: &mut Walk) -> Result<(), Counter> {
    let sp = walk.sp;
    let pc = read(sp + UCONTEXT_RIP)?;
    let next_sp = read(sp + UCONTEXT_RSP)?;
    let bp = read(sp + UCONTEXT_RBP)?;
    if pc == 0 || pc >= USER_LIMIT {
        return Err(Counter::UnwindReadError);
    }
    walk.pc = pc;
    walk.sp = next_sp;
    walk.bp = bp;
    walk.exact = 1;
    Ok(())
}

fn advance(walk: &mut Walk, ra: u64, cfa: u64, bp: u64) -> Result<(), Counter> {
    if ra == 0 {
        return Err(Counter::UnwindComplete);
    }
    if ra >= USER_LIMIT {
        return Err(Counter::UnwindReadError);
    }
    walk.pc = ra;
    walk.sp = cfa;
    walk.bp = bp;
    walk.exact = 0;
    Ok(())
}

fn read(address: u64) -> Result<u64, Counter> {
    // SAFETY: the checked probe-read helper; a bad address is an error, not a fault.
    unsafe { bpf_probe_read_user(address as *const u64) }.map_err(|_| Counter::UnwindReadError)
}

/// The row of the mapping's file that covers `pc`: the last row whose `pc` is at or below it.
fn find_row(mapping: &MappingInfo, pc: u64) -> Option<UnwindRow> {
    let target = pc.wrapping_sub(mapping.bias);
    if target > u32::MAX as u64 || mapping.row_count == 0 {
        return None;
    }
    let target = target as u32;
    // Invariant: rows[lo].pc <= target (checked below), rows[hi].pc > target or hi is the end.
    let mut lo = mapping.row_start;
    let mut hi = mapping.row_start + mapping.row_count;
    let first = UNWIND_ROWS.get(lo)?;
    if first.pc > target {
        return None;
    }
    for _ in 0..SEARCH_STEPS {
        if hi - lo <= 1 {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if UNWIND_ROWS.get(mid)?.pc <= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if hi - lo > 1 {
        return None;
    }
    let row = *UNWIND_ROWS.get(lo)?;
    if row.cfa_kind == UnwindRow::CFA_NO_INFO && row.flags & UnwindRow::FLAG_SIGNAL_FRAME == 0 {
        return None;
    }
    Some(row)
}

/// The user registers at the sample: the interrupted ones when the sample hit user mode,
/// else the ones saved at the top of the task's kernel stack on entry to the kernel.
fn user_registers(ctx: &PerfEventContext, stack_offset: u32) -> Result<(u64, u64, u64), Counter> {
    let regs = ctx.ctx as *const pt_regs;
    // SAFETY: perf_event programs may read their context's registers directly.
    let (cs, ip, sp, bp) = unsafe { ((*regs).cs, (*regs).rip, (*regs).rsp, (*regs).rbp) };
    if cs & 3 == 3 {
        return Ok((ip, sp, bp));
    }
    // SAFETY: the current task, read through the checked probe-read helper at the offset BTF
    // gave for `task_struct.stack`.
    let stack: u64 = unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.add(stack_offset as usize) as *const u64)
    }
    .map_err(|_| Counter::UnwindNoRegisters)?;
    for size in THREAD_SIZES {
        let saved = (stack + size - core::mem::size_of::<pt_regs>() as u64) as *const pt_regs;
        // SAFETY: checked probe reads of the kernel stack's top.
        let Ok(regs) = (unsafe { bpf_probe_read_kernel(saved) }) else {
            continue;
        };
        if regs.cs & 3 == 3 && regs.rsp < USER_LIMIT && regs.rip < USER_LIMIT && regs.rip != 0 {
            return Ok((regs.rip, regs.rsp, regs.rbp));
        }
    }
    Err(Counter::UnwindNoRegisters)
}
