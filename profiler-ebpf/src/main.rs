//! Kernel side of the profiler: a `perf_event` program run on every CPU at the sampling
//! frequency. It records the sampled thread's user and kernel stacks in the current
//! generation's stack map and counts the sample in that generation's counts map. User space
//! flips the generation before draining, so no sample is lost or counted twice at an interval
//! boundary. Every path ends in one per-CPU counter (see `profiler_common::Counter`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_FAST_STACK_CMP, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::bpf_get_current_task,
    },
    macros::{map, perf_event},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::{PerfEventContext, tracing::StackIdContext as _},
};
use profiler_common::{
    Counter, NEW_PROCESSES_BYTES, PF_KTHREAD, SEEN_PROCESSES_ENTRIES, STACK_LOST,
    STACK_NOT_COLLECTED, SampleKey, SamplerConfig,
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

    announce_new_process(pid);

    let generation = match GENERATION.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let (user_stack_id, kernel_stack_id) = if generation == 0 {
        stack_ids(ctx, &STACKS_0, config)
    } else {
        stack_ids(ctx, &STACKS_1, config)
    };
    let key = SampleKey {
        pid,
        user_stack_id,
        kernel_stack_id,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if generation == 0 {
        count(&COUNTS_0, &key)
    } else {
        count(&COUNTS_1, &key)
    }
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
fn stack_ids(ctx: &PerfEventContext, stacks: &StackTrace, config: SamplerConfig) -> (i32, i32) {
    let user = if config.has(SamplerConfig::COLLECT_USER) {
        stack_id(
            ctx,
            stacks,
            (BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP) as u64,
            [
                Counter::UserStackCollisionError,
                Counter::UserStackMapFullError,
                Counter::UserStackReadError,
            ],
        )
    } else {
        STACK_NOT_COLLECTED
    };
    let kernel = if config.has(SamplerConfig::COLLECT_KERNEL) {
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
    } else {
        STACK_NOT_COLLECTED
    };
    (user, kernel)
}

/// `errors` is [collision, map full, anything else].
fn stack_id(ctx: &PerfEventContext, stacks: &StackTrace, flags: u64, errors: [Counter; 3]) -> i32 {
    match ctx.get_stackid(stacks, flags) {
        Ok(id) => id as i32,
        // A sample taken in user mode has no kernel stack: empty, not lost.
        Err(errno) if -errno == EFAULT && flags & BPF_F_USER_STACK as u64 == 0 => {
            STACK_NOT_COLLECTED
        }
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
