//! Kernel side of the profiler: a `perf_event` program run on every CPU at the sampling
//! frequency. It records the sampled thread's kernel stack in the current generation's stack
//! map, hands the user stack to the walker ([`unwind`], a second program it tail-calls), which
//! stores the walked stack under a hash of its frames and counts the sample in that
//! generation's counts map. User space flips the generation before draining, so no sample is
//! lost or counted twice at an interval boundary. Every path ends in one per-CPU counter (see
//! `profiler_common::Counter`), and every walk in one more.
#![no_std]
#![no_main]

mod python;
mod unwind;

use aya_ebpf::{
    bindings::{BPF_F_FAST_STACK_CMP, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::bpf_get_current_task,
    },
    macros::{map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::{PerfEventContext, RawTracePointContext, tracing::StackIdContext as _},
};
use profiler_common::{
    Counter, MAX_STACK_DEPTH, NEW_PROCESSES_BYTES, PF_KTHREAD, PYTHON_NEW_STACKS_BYTES,
    PythonStack, SEEN_PROCESSES_ENTRIES, STACK_LOST, STACK_NOT_COLLECTED, STACK_WALKED, SampleKey,
    SamplerConfig, UserStack,
};

// Sizes below are placeholders: user space sets every size at load time from the sample rate,
// the number of CPUs and the collect interval.
// Per-CPU values: each CPU increments its own slot, so no atomics and no lost updates.
#[map]
static COUNTS_0: PerCpuHashMap<SampleKey, u64> = PerCpuHashMap::with_max_entries(1, 0);
#[map]
static COUNTS_1: PerCpuHashMap<SampleKey, u64> = PerCpuHashMap::with_max_entries(1, 0);
#[map]
static STACKS_0: StackTrace = StackTrace::with_max_entries(1, 0);
#[map]
static STACKS_1: StackTrace = StackTrace::with_max_entries(1, 0);
#[map]
static USER_STACKS_0: HashMap<u64, UserStack> = HashMap::with_max_entries(1, 0);
#[map]
static USER_STACKS_1: HashMap<u64, UserStack> = HashMap::with_max_entries(1, 0);
#[map]
static PYTHON_STACKS_0: HashMap<u64, PythonStack> = HashMap::with_max_entries(1, 0);
#[map]
static PYTHON_STACKS_1: HashMap<u64, PythonStack> = HashMap::with_max_entries(1, 0);
#[map]
static PYTHON_NEW_STACKS: RingBuf = RingBuf::with_byte_size(PYTHON_NEW_STACKS_BYTES, 0);
#[map]
static GENERATION: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(1, 0);
#[map]
static NEW_PROCESSES: RingBuf = RingBuf::with_byte_size(NEW_PROCESSES_BYTES, 0);
#[map]
static SEEN_PROCESSES: LruHashMap<u32, u8> =
    LruHashMap::with_max_entries(SEEN_PROCESSES_ENTRIES, 0);

/// Set by user space at load time (`.rodata`).
#[unsafe(no_mangle)]
static CONFIG: SamplerConfig = SamplerConfig {
    task_flags_offset: 0,
    flags: 0,
    task_stack_offset: 0,
    exclude_tgid: 0,
    task_fsbase_offset: 0,
    _pad: 0,
};

const EEXIST: i32 = 17;
const ENOMEM: i32 = 12;
const EFAULT: i32 = 14;

#[perf_event]
pub fn profile_cpu(ctx: PerfEventContext) -> u32 {
    let outcome = match try_profile_cpu(&ctx) {
        Ok(outcome) => outcome,
        Err(error) => error,
    };
    bump(outcome);
    0
}

fn try_profile_cpu(ctx: &PerfEventContext) -> Result<Counter, Counter> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let pid = (pid_tgid >> 32) as u32;
    if tid == 0 {
        return Ok(Counter::SkippedIdle);
    }
    // SAFETY: CONFIG is a plain global the loader rewrites; volatile keeps the compiler from
    // folding in the placeholder value.
    let config = unsafe { core::ptr::read_volatile(&CONFIG) };
    if is_kernel_thread(config.task_flags_offset)? {
        return Ok(Counter::SkippedKernelThread);
    }
    if config.has(SamplerConfig::FILTER_PIDS) && PID_FILTER.get_ptr(pid).is_none() {
        return Ok(Counter::SkippedFiltered);
    }
    if config.exclude_tgid != 0 && pid == config.exclude_tgid {
        return Ok(Counter::SkippedFiltered);
    }

    announce_new_process(pid);

    let generation = match GENERATION.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let kernel_stack_id = if generation == 0 {
        kernel_stack(ctx, &STACKS_0, config)
    } else {
        kernel_stack(ctx, &STACKS_1, config)
    };
    let mut key = SampleKey {
        pid,
        user_stack_id: STACK_NOT_COLLECTED,
        kernel_stack_id,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        _pad: 0,
        user_stack_hash: 0,
    };
    if config.has(SamplerConfig::COLLECT_USER) {
        key.user_stack_id = STACK_WALKED;
        match unwind::begin(ctx, &key, generation, config.task_stack_offset) {
            Ok(()) => {
                unwind::start(ctx);
                // Only reached when the tail call failed.
                bump(Counter::UnwindTailCallError);
            }
            Err(end) => bump(end),
        }
        key.user_stack_id = STACK_LOST;
    }
    count_in(generation, &key)
}

/// The walker: continues the walk [`profile_cpu`] began, tail-calling itself until it ends,
/// then hands a CPython process's sample to [`walk_python`], or stores the stack and counts
/// the sample.
#[perf_event]
pub fn unwind_user(ctx: PerfEventContext) -> u32 {
    let Some(walk) = unwind::current() else {
        return 0;
    };
    let end = match unwind::steps(walk) {
        Some(end) => end,
        None => {
            unwind::start(&ctx);
            // The kernel's tail-call limit, reached only if a walk outgrew its frame budget.
            Counter::UnwindDepthLimit
        }
    };
    bump(end);
    // SAFETY: as in `try_profile_cpu`.
    let config = unsafe { core::ptr::read_volatile(&CONFIG) };
    if config.has(SamplerConfig::COLLECT_PYTHON) && python::wanted(walk) {
        python::start(&ctx);
        // Only reached when the tail call failed: the sample keeps its native stack.
        bump(Counter::PythonCut);
    }
    end_walk(walk);
    0
}

/// The Python walker: continues the Python walk [`unwind_user`] began, tail-calling itself
/// until the chain ends, then stores both stacks and counts the sample.
#[perf_event]
pub fn walk_python(ctx: PerfEventContext) -> u32 {
    let Some(walk) = unwind::current() else {
        return 0;
    };
    if walk.python.begun == 0 {
        // SAFETY: as in `try_profile_cpu`.
        let config = unsafe { core::ptr::read_volatile(&CONFIG) };
        if let Err(end) = python::begin(walk, config.task_fsbase_offset) {
            bump(end);
            walk.python.stack.len = 0;
            end_walk(walk);
            return 0;
        }
    }
    match python::steps(&mut walk.python) {
        Some(end) => bump(end),
        None => {
            python::start(&ctx);
            // The tail-call limit: keep the frames recorded so far.
            walk.python.stack.flags |= PythonStack::CUT;
            bump(Counter::PythonCut);
        }
    }
    end_walk(walk);
    0
}

fn end_walk(walk: &mut unwind::Walk) {
    let outcome = match finish_walk(walk) {
        Ok(outcome) => outcome,
        Err(error) => error,
    };
    bump(outcome);
}

fn finish_walk(walk: &mut unwind::Walk) -> Result<Counter, Counter> {
    let mut key = walk.key;
    if walk.reload != 0 {
        // The next sample announces the process again.
        let _ = SEEN_PROCESSES.remove(&key.pid);
    }
    let (stacks, python_stacks) = if walk.generation == 0 {
        (&USER_STACKS_0, &PYTHON_STACKS_0)
    } else {
        (&USER_STACKS_1, &PYTHON_STACKS_1)
    };
    walk.hash = unwind::fnv(walk.hash, walk.stack.len as u64);
    walk.stack.flags = 0;
    let python_len = walk.python.stack.len as usize;
    if python_len > 0 {
        walk.hash = unwind::fnv(walk.hash, walk.python.hash);
        walk.hash = unwind::fnv(walk.hash, python_len as u64 | 1 << 32);
        let stored = python_stacks.get_ptr(&walk.hash).is_some()
            || match python_stacks.insert(&walk.hash, &walk.python.stack, BPF_NOEXIST as u64) {
                Ok(()) => {
                    // New in this generation: announced, so its code objects are named
                    // while the process runs. A full ring drops the announcement only.
                    let _ = PYTHON_NEW_STACKS.output::<PythonStack>(&walk.python.stack, 0);
                    true
                }
                Err(errno) => -errno == EEXIST as _,
            };
        if stored {
            walk.stack.flags = UserStack::HAS_PYTHON;
        } else {
            bump(Counter::PythonStackMapFullError);
        }
    }
    match store_user_stack(stacks, walk.hash, &walk.stack) {
        Ok(()) => {
            key.user_stack_id = STACK_WALKED;
            key.user_stack_hash = walk.hash;
        }
        Err(error) => {
            bump(error);
            key.user_stack_id = STACK_LOST;
        }
    }
    count_in(walk.generation, &key)
}

/// Stores `stack` under `hash` unless it is there already; a different stack under the same
/// hash is a collision (checked on its length and outermost and innermost frames).
fn store_user_stack(
    stacks: &HashMap<u64, UserStack>,
    hash: u64,
    stack: &UserStack,
) -> Result<(), Counter> {
    if let Some(stored) = stacks.get_ptr(&hash) {
        // SAFETY: a map value pointer, valid during this program run.
        let stored = unsafe { &*stored };
        let len = stack.len as usize;
        let same = stored.len == stack.len
            && (len == 0
                || (len <= MAX_STACK_DEPTH
                    && stored.frames[0] == stack.frames[0]
                    && stored.frames[len - 1] == stack.frames[len - 1]));
        return if same {
            Ok(())
        } else {
            Err(Counter::UserStackHashCollisionError)
        };
    }
    match stacks.insert(&hash, stack, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        // Another CPU stored the same stack meanwhile.
        Err(errno) if -errno == EEXIST as _ => Ok(()),
        Err(_) => Err(Counter::UserStackMapFullError),
    }
}

fn count_in(generation: u32, key: &SampleKey) -> Result<Counter, Counter> {
    if generation == 0 {
        count(&COUNTS_0, key)
    } else {
        count(&COUNTS_1, key)
    }
}

/// A process replaced its program (raw tracepoint `sched_process_exec`, which needs no
/// tracefs): it is announced again at its next sample, so user space loads the new program's
/// mappings for the walker.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(_ctx: RawTracePointContext) -> i32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = SEEN_PROCESSES.remove(&pid);
    0
}

/// The first sample of a process (since user space last cleared SEEN_PROCESSES) announces its
/// pid, so user space reads its mappings within milliseconds, while it still runs, rather than
/// at the next drain, after a short-lived process has exited.
fn announce_new_process(pid: u32) {
    if SEEN_PROCESSES.get_ptr(pid).is_some() {
        return;
    }
    // Two CPUs may both miss and both announce: user space takes the second as a refresh.
    if SEEN_PROCESSES.insert(pid, 0, 0).is_err() {
        return;
    }
    if NEW_PROCESSES.output::<u32>(pid, 0).is_err() {
        bump(Counter::NewProcessLostError);
    }
}

fn is_kernel_thread(task_flags_offset: u32) -> Result<bool, Counter> {
    // SAFETY: the helper returns the current task; the read goes through the checked
    // probe-read helper at the offset BTF gave for `task_struct.flags`.
    let flags = unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.add(task_flags_offset as usize) as *const u32)
    }
    .map_err(|_| Counter::TaskReadError)?;
    Ok(flags & PF_KTHREAD != 0)
}

// BPF_F_FAST_STACK_CMP: a stack whose hash matches a stored one is taken to be it, skipping a
// compare of up to 1 KiB per sample; a true 32-bit hash collision between two live stacks is
// far rarer than the bucket collisions already counted.
fn kernel_stack(ctx: &PerfEventContext, stacks: &StackTrace, config: SamplerConfig) -> i32 {
    if !config.has(SamplerConfig::COLLECT_KERNEL) {
        return STACK_NOT_COLLECTED;
    }
    stack_id(
        ctx,
        stacks,
        BPF_F_FAST_STACK_CMP as u64,
        [
            Counter::KernelStackCollisionError,
            Counter::KernelStackMapFullError,
            Counter::KernelStackReadError,
        ],
    )
}

/// `errors` is [collision, map full, anything else].
fn stack_id(ctx: &PerfEventContext, stacks: &StackTrace, flags: u64, errors: [Counter; 3]) -> i32 {
    match ctx.get_stackid(stacks, flags) {
        Ok(id) => id as i32,
        // A sample taken in user mode has no kernel stack: empty, not lost.
        Err(errno) if -errno == EFAULT => STACK_NOT_COLLECTED,
        Err(errno) => {
            bump(match -errno {
                EEXIST => errors[0],
                ENOMEM => errors[1],
                _ => errors[2],
            });
            STACK_LOST
        }
    }
}

fn count(counts: &PerCpuHashMap<SampleKey, u64>, key: &SampleKey) -> Result<Counter, Counter> {
    if let Some(value) = counts.get_ptr_mut(key) {
        increment(value);
        return Ok(Counter::Recorded);
    }
    match counts.insert(key, &1, BPF_NOEXIST as u64) {
        Ok(()) => Ok(Counter::Recorded),
        // Another CPU inserted the same key between our lookup and insert; the new entry's
        // slot for this CPU starts at zero.
        Err(errno) if -errno == EEXIST as _ => match counts.get_ptr_mut(key) {
            Some(value) => {
                increment(value);
                Ok(Counter::Recorded)
            }
            None => Err(Counter::CountsMapFullError),
        },
        Err(_) => Err(Counter::CountsMapFullError),
    }
}

fn increment(value: *mut u64) {
    // SAFETY: `value` is this CPU's slot of a per-CPU map value; perf_event programs do not
    // nest on one CPU, so nothing else writes it meanwhile.
    unsafe { *value += 1 };
}

fn bump(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
