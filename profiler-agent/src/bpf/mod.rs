//! The only module that touches aya: loads the embedded eBPF object with maps sized for the
//! configured interval, attaches the sampler to every online CPU (or to every thread of a few
//! processes, see [`Scope`]), and drains one generation of
//! counts and stacks at a time into plain Rust values. Dropping [`KernelSampler`] closes every
//! program, link and map fd, which detaches the sampler from the kernel.

mod attach;
pub mod btf;
mod drain;
mod loader;
mod new_processes;
mod open;
mod python;
pub mod sizing;
mod unwind_maps;

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, MapData, PerCpuArray, PerCpuHashMap, ProgramArray,
        RingBuf, StackTraceMap, lpm_trie::LpmTrie,
    },
    programs::{PerfEvent, RawTracePoint, perf_event::PerfEventLinkId},
};
pub use new_processes::NewProcesses;
pub use open::{OpenSampler, ProcessHook, open_sampler};
use profiler_common::{
    CONFIG_GLOBAL, COUNTERS_MAP, COUNTS_MAPS, Counter, EXEC_PROGRAM_NAME, GENERATION_MAP,
    MAPPINGS_MAP, NEW_PROCESSES_MAP, PID_FILTER_MAP, PROGRAM_NAME, PYTHON_NEW_STACKS_BYTES,
    PYTHON_NEW_STACKS_MAP, PYTHON_PROCESSES_ENTRIES, PYTHON_PROCESSES_MAP, PYTHON_PROGRAM_INDEX,
    PYTHON_PROGRAM_NAME, PYTHON_STACKS_MAPS, PythonStack, SEEN_PROCESSES_MAP, STACK_MAPS,
    SampleKey, SamplerConfig, UNWIND_PROGRAM_INDEX, UNWIND_PROGRAM_NAME, UNWIND_PROGRAMS_MAP,
    UNWIND_ROWS_MAP, USER_STACKS_MAPS, UserStack,
};
pub use python::{PythonProcesses, PythonStackReader};
pub use sizing::MapSizes;
pub use unwind_maps::SharedLoader;

use crate::{
    process::{ProcessInfo, ProcessSource as _, ProcfsProcesses},
    sampler::{CounterSnapshot, RawSample, StackSource},
    unwind::{Loader, LoaderStats},
};
use unwind_maps::KernelTables;

/// The eBPF object built by build.rs, embedded once.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// How long to wait after switching generations before reading the old one: the program reads
/// the generation once at its start and finishes within microseconds, so after this no CPU is
/// still writing to the old maps.
const GENERATION_GRACE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "loading eBPF needs root or the capabilities CAP_BPF and CAP_PERFMON \
         (grant them with `setcap cap_bpf,cap_perfmon+ep` or run as root)"
    )]
    MissingPrivilege,
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("cannot list online CPUs from {what}: {source}")]
    Cpus {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {PROGRAM_NAME}: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error(
        "cannot open a CPU-clock perf event on CPU {cpu}: {source} \
         (does this kernel have CONFIG_PERF_EVENTS?)"
    )]
    PerfEvent {
        cpu: u32,
        source: aya::programs::ProgramError,
    },
    #[error("cannot sample process {pid}: none of its threads accepted a perf event ({source})")]
    ProcessPerfEvent {
        pid: u32,
        source: aya::programs::ProgramError,
    },
    #[error("cannot list the threads of process {pid}: {source}")]
    Threads { pid: u32, source: std::io::Error },
    #[error(
        "process {pid} has more than {limit} threads: one perf event per thread would open \
         too many file descriptors"
    )]
    TooManyThreads { pid: u32, limit: usize },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error(
        "this kernel ({release}) is older than {minimum}, the oldest the sampler needs \
         (BPF ring buffers, bounded loops, LPM tries and tail calls between perf_event programs)"
    )]
    KernelTooOld {
        release: String,
        minimum: &'static str,
    },
}

/// The oldest kernel the sampler loads on: ring buffers (5.8) are its newest need.
pub const MINIMUM_KERNEL: (u32, u32) = (5, 8);

/// What to sample and how often.
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    pub sample_rate: u64,
    pub collect_interval: Duration,
    pub collect_user: bool,
    pub collect_kernel: bool,
    /// When set, only these processes are sampled (filtered in the kernel).
    pub pids: Option<Vec<u32>>,
    pub scope: Scope,
    /// Bytes of kernel memory for unwind tables (`unwind_table_memory`): 16 bytes a row.
    pub unwind_table_memory: u64,
    /// Leaves the agent's own process out (counted as `skipped_filtered`).
    pub exclude_self: bool,
    /// Walks the Python frames of CPython processes (`python_enabled`).
    pub python: bool,
}

/// Default of `unwind_table_memory`: 32 MiB, two million rows (libc has about 30 000).
pub const DEFAULT_UNWIND_TABLE_MEMORY: u64 = 32 << 20;
/// Entries of the (pid, address) trie: a mapping takes a handful, a process a few dozen.
const MAPPING_ENTRIES: u32 = 1 << 18;

/// Where the perf events that run the sampler are opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// One event per online CPU, firing whatever runs there: the host-wide profile.
    #[default]
    EveryCpu,
    /// One event per thread of each of these processes, on any CPU, inherited by the
    /// threads (and children) they start: sampling a few processes costs the rest of the
    /// host nothing, and the rate is per thread, as `perf record -p` has it. Children are
    /// still dropped by the kernel-side PID filter when `pids` is set. Each event is a file
    /// descriptor: when the processes have more than `max_events` threads together, nothing
    /// is attached and the start fails with [`BpfError::TooManyThreads`] (the caller may then
    /// sample [`Scope::EveryCpu`] with a `pids` filter, `cpus` descriptors whatever the
    /// thread count).
    Threads { pids: Vec<u32>, max_events: usize },
}

/// The loaded and attached kernel sampler.
pub struct KernelSampler {
    // Owns the program and its links: dropping it detaches everything.
    ebpf: Ebpf,
    links: Vec<PerfEventLinkId>,
    /// Where, and how often, [`KernelSampler::attach`] samples; the online CPUs.
    scope: Scope,
    sample_rate: u64,
    cpu_ids: Vec<u32>,
    counts: [PerCpuHashMap<MapData, SampleKey, u64>; 2],
    stacks: [StackTraceMap<MapData>; 2],
    user_stacks: [HashMap<MapData, u64, UserStack>; 2],
    python_stacks: [HashMap<MapData, u64, PythonStack>; 2],
    python_processes: Option<PythonProcesses>,
    python_new_stacks: Option<PythonStackReader>,
    loader: SharedLoader,
    generation_map: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    memlock_fds: Vec<i32>,
    /// Processes announced this interval; cleared at each interval's end.
    seen_processes: HashMap<MapData, u32, u8>,
    new_processes: Option<NewProcesses>,
    /// Snapshots of the processes named up front, taken at start.
    named: Vec<ProcessInfo>,
    generation: u32,
    sizes: MapSizes,
}

impl KernelSampler {
    /// Loads the program with maps sized for `options`; nothing is sampled until
    /// [`KernelSampler::attach`].
    pub fn load(options: &SamplerOptions) -> Result<Self, BpfError> {
        if !has_bpf_privilege() {
            return Err(BpfError::MissingPrivilege);
        }
        check_kernel_version()?;
        // One read of the kernel's BTF (several MiB) for both offsets.
        let kernel_btf = btf::read(Path::new(btf::VMLINUX))?;
        let task_flags_offset = btf::member_offset(&kernel_btf, "task_struct", "flags")?;
        let task_stack_offset = btf::member_offset(&kernel_btf, "task_struct", "stack")?;
        let task_fsbase_offset = if options.python && options.collect_user {
            python::fsbase_offset(&kernel_btf)
                .inspect_err(|error| {
                    tracing::warn!(%error, "Python frames off: the thread pointer cannot be read")
                })
                .ok()
        } else {
            None
        };
        drop(kernel_btf);
        let cpus =
            aya::util::online_cpus().map_err(|(what, source)| BpfError::Cpus { what, source })?;
        let sizes = MapSizes::derive(options.sample_rate, cpus.len(), options.collect_interval);
        let pid_filter_len = options.pids.as_ref().map_or(1, |p| p.len().max(1)) as u32;
        let mut flags = 0;
        if options.collect_user {
            flags |= SamplerConfig::COLLECT_USER;
        }
        if options.collect_kernel {
            flags |= SamplerConfig::COLLECT_KERNEL;
        }
        if options.pids.is_some() {
            flags |= SamplerConfig::FILTER_PIDS;
        }
        if task_fsbase_offset.is_some() {
            flags |= SamplerConfig::COLLECT_PYTHON;
        }
        let config = SamplerConfig {
            task_flags_offset,
            flags,
            task_stack_offset,
            exclude_tgid: if options.exclude_self {
                std::process::id()
            } else {
                0
            },
            task_fsbase_offset: task_fsbase_offset.unwrap_or(0),
            _pad: 0,
        };
        let python = task_fsbase_offset.is_some();
        let unwind_rows = unwind_rows(options.unwind_table_memory);

        let mut loader = loader::loader_without_kernel_btf();
        loader.override_global(CONFIG_GLOBAL, &config, true);
        for name in COUNTS_MAPS {
            loader.map_max_entries(name, sizes.counts_entries);
        }
        for name in STACK_MAPS {
            loader.map_max_entries(name, sizes.stack_entries);
        }
        for name in USER_STACKS_MAPS {
            loader.map_max_entries(name, sizes.user_stack_entries);
        }
        for name in PYTHON_STACKS_MAPS {
            loader.map_max_entries(
                name,
                if python {
                    sizes.python_stack_entries
                } else {
                    1
                },
            );
        }
        loader.map_max_entries(
            PYTHON_PROCESSES_MAP,
            if python { PYTHON_PROCESSES_ENTRIES } else { 1 },
        );
        // A ring buffer's size is its page-multiple byte count.
        loader.map_max_entries(
            PYTHON_NEW_STACKS_MAP,
            if python {
                PYTHON_NEW_STACKS_BYTES
            } else {
                4096
            },
        );
        loader.map_max_entries(UNWIND_ROWS_MAP, unwind_rows);
        loader.map_max_entries(MAPPINGS_MAP, MAPPING_ENTRIES);
        loader.map_max_entries(PID_FILTER_MAP, pid_filter_len);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // Load the programs before taking maps out of `ebpf`: the verifier resolves map fds,
        // and a taken map that is dropped (the PID filter) closes its fd.
        // The walker first: the sampler shows in `bpftool prog list` only once the slower
        // of the two verifications is done, and attaching follows it within milliseconds.
        let walkers: &[(&str, u32)] = if python {
            &[
                (UNWIND_PROGRAM_NAME, UNWIND_PROGRAM_INDEX),
                (PYTHON_PROGRAM_NAME, PYTHON_PROGRAM_INDEX),
            ]
        } else {
            &[(UNWIND_PROGRAM_NAME, UNWIND_PROGRAM_INDEX)]
        };
        for (name, _) in walkers {
            load_perf_event(&mut ebpf, name)?;
        }
        load_perf_event(&mut ebpf, PROGRAM_NAME)?;
        {
            let mut programs: ProgramArray<MapData> = typed(&mut ebpf, UNWIND_PROGRAMS_MAP)?;
            for &(name, index) in walkers {
                let walker: &PerfEvent = ebpf
                    .program(name)
                    .ok_or(BpfError::Program(aya::programs::ProgramError::NotLoaded))?
                    .try_into()?;
                let fd = walker
                    .fd()?
                    .try_clone()
                    .map_err(|e| BpfError::Program(aya::programs::ProgramError::IOError(e)))?;
                programs
                    .set(index, &fd, 0)
                    .map_err(|source| BpfError::Map {
                        name: UNWIND_PROGRAMS_MAP,
                        source,
                    })?;
            }
            // The array keeps its entries while a program that uses it is loaded.
            std::mem::forget(programs);
        }

        if let Some(pids) = &options.pids {
            let mut filter: HashMap<MapData, u32, u8> = typed(&mut ebpf, PID_FILTER_MAP)?;
            for pid in pids {
                filter.insert(pid, 1, 0).map_err(|source| BpfError::Map {
                    name: PID_FILTER_MAP,
                    source,
                })?;
            }
        }
        let counts: [PerCpuHashMap<MapData, SampleKey, u64>; 2] = [
            typed(&mut ebpf, COUNTS_MAPS[0])?,
            typed(&mut ebpf, COUNTS_MAPS[1])?,
        ];
        let stacks: [StackTraceMap<MapData>; 2] = [
            typed(&mut ebpf, STACK_MAPS[0])?,
            typed(&mut ebpf, STACK_MAPS[1])?,
        ];
        let user_stacks: [HashMap<MapData, u64, UserStack>; 2] = [
            typed(&mut ebpf, USER_STACKS_MAPS[0])?,
            typed(&mut ebpf, USER_STACKS_MAPS[1])?,
        ];
        let python_stacks: [HashMap<MapData, u64, PythonStack>; 2] = [
            typed(&mut ebpf, PYTHON_STACKS_MAPS[0])?,
            typed(&mut ebpf, PYTHON_STACKS_MAPS[1])?,
        ];
        let python_processes = typed(&mut ebpf, PYTHON_PROCESSES_MAP)?;
        let python_processes = python.then(|| PythonProcesses::new(python_processes));
        let python_new_stacks = Some(PythonStackReader::new(typed::<RingBuf<MapData>>(
            &mut ebpf,
            PYTHON_NEW_STACKS_MAP,
        )?));
        let tables = KernelTables::new(
            typed(&mut ebpf, UNWIND_ROWS_MAP)?,
            unwind_rows,
            typed::<LpmTrie<MapData, _, _>>(&mut ebpf, MAPPINGS_MAP)?,
        );
        let loader = SharedLoader::new(Loader::new(tables, unwind_rows));
        // Processes named up front have their tables before their first sample.
        let mut named = Vec::new();
        if let Some(pids) = &options.pids {
            let mut processes = ProcfsProcesses::new("/proc");
            for &pid in pids {
                let info = processes.snapshot(pid, "");
                loader.load(&info);
                named.push(info);
            }
        }
        let generation_map = typed(&mut ebpf, GENERATION_MAP)?;
        let counters: PerCpuArray<MapData, u64> = typed(&mut ebpf, COUNTERS_MAP)?;
        let seen_processes = typed(&mut ebpf, SEEN_PROCESSES_MAP)?;
        let new_processes =
            NewProcesses::new(typed::<RingBuf<MapData>>(&mut ebpf, NEW_PROCESSES_MAP)?);
        let mut memlock_fds: Vec<i32> = counts
            .iter()
            .map(|m| m.map().fd().as_fd().as_raw_fd())
            .collect();
        memlock_fds.extend(stacks.iter().map(|m| m.map().fd().as_fd().as_raw_fd()));
        memlock_fds.extend(user_stacks.iter().map(|m| m.map().fd().as_fd().as_raw_fd()));
        memlock_fds.extend(
            python_stacks
                .iter()
                .map(|m| m.map().fd().as_fd().as_raw_fd()),
        );
        memlock_fds.extend(loader.raw_fds());

        watch_execs(&mut ebpf);
        tracing::info!(
            cpus = cpus.len(),
            counts_entries = sizes.counts_entries,
            stack_entries = sizes.stack_entries,
            user_stack_entries = sizes.user_stack_entries,
            python,
            unwind_rows,
            "eBPF sampler loaded"
        );
        // The kernel's BTF and the program's object were parsed: several MiB now free.
        crate::memory::release_free_heap();
        Ok(Self {
            ebpf,
            links: Vec::new(),
            scope: options.scope.clone(),
            sample_rate: options.sample_rate,
            cpu_ids: cpus,
            counts,
            stacks,
            user_stacks,
            python_stacks,
            python_processes,
            python_new_stacks,
            loader,
            generation_map,
            counters,
            memlock_fds,
            seen_processes,
            new_processes: Some(new_processes),
            named,
            generation: 0,
            sizes,
        })
    }

    /// The kernel's announcements of newly sampled processes, for a reader thread (once).
    pub fn take_new_processes(&mut self) -> Option<NewProcesses> {
        self.new_processes.take()
    }

    /// The snapshots of the processes named up front (`SamplerOptions::pids`), taken at start
    /// (once).
    pub fn take_named_snapshots(&mut self) -> Vec<ProcessInfo> {
        std::mem::take(&mut self.named)
    }

    /// The unwind-table loader, for the thread that loads processes at their first sample.
    pub fn loader(&self) -> SharedLoader {
        self.loader.clone()
    }

    /// The CPython processes the program walks, when Python frames are on.
    pub fn python_processes(&self) -> Option<PythonProcesses> {
        self.python_processes.clone()
    }

    /// The announcements of newly stored Python stacks, for the thread that names them
    /// while their processes run (once).
    pub fn take_python_stacks(&mut self) -> Option<PythonStackReader> {
        self.python_processes.as_ref()?;
        self.python_new_stacks.take()
    }

    pub fn unwind_stats(&self) -> LoaderStats {
        self.loader.stats()
    }

    pub fn sizes(&self) -> MapSizes {
        self.sizes
    }

    pub fn cpus(&self) -> usize {
        self.cpu_ids.len()
    }

    /// Kernel memory pinned by the counts and stack maps, as the kernel reports it
    /// (`memlock` in the maps' fdinfo).
    pub fn kernel_memory_bytes(&self) -> u64 {
        self.memlock_fds
            .iter()
            .filter_map(|fd| std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok())
            .filter_map(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum()
    }

    fn drain_generation(&mut self, old: usize) -> Vec<RawSample> {
        drain::drain(drain::Generation {
            counts: &mut self.counts[old],
            stacks: &mut self.stacks[old],
            user_stacks: &mut self.user_stacks[old],
            python_stacks: &mut self.python_stacks[old],
        })
    }
}

impl StackSource for KernelSampler {
    type Error = BpfError;

    /// Switches the kernel to the other generation, waits out programs still running against
    /// the old one, then reads and empties it. Deleting key by key (not clearing) means a
    /// straggler's write is kept for the next drain of that generation rather than lost.
    fn drain(&mut self) -> Result<Vec<RawSample>, BpfError> {
        let old = self.generation as usize;
        let new = 1 - self.generation;
        self.generation_map
            .set(0, new, 0)
            .map_err(|source| BpfError::Map {
                name: GENERATION_MAP,
                source,
            })?;
        self.generation = new;
        std::thread::sleep(GENERATION_GRACE);
        Ok(self.drain_generation(old))
    }

    /// Loads (or refreshes) the process's unwind tables.
    fn observe(&mut self, info: &ProcessInfo) {
        self.loader.load(info);
    }

    fn unwind_tables(&self) -> LoaderStats {
        self.loader.stats()
    }

    /// Forgets which processes were announced, so that each process sampled in the next
    /// interval is announced (and snapshotted) afresh, as the drain snapshots them afresh;
    /// drops the unwind entries of processes that exited.
    fn next_interval(&mut self) {
        self.loader.prune(Path::new("/proc"));
        if let Some(python) = &self.python_processes {
            python.prune(Path::new("/proc"));
        }
        let pids: Vec<u32> = self.seen_processes.keys().filter_map(Result::ok).collect();
        for pid in pids {
            let _ = self.seen_processes.remove(&pid);
        }
    }

    fn counters(&self) -> Result<CounterSnapshot, BpfError> {
        let mut snapshot = CounterSnapshot::default();
        for counter in Counter::ALL {
            let values =
                self.counters
                    .get(&(counter as u32), 0)
                    .map_err(|source| BpfError::Map {
                        name: COUNTERS_MAP,
                        source,
                    })?;
            snapshot.values[counter as usize] = values.iter().sum();
        }
        Ok(snapshot)
    }

    fn stop(&mut self) -> Result<(), BpfError> {
        self.detach()
    }
}

fn load_perf_event(ebpf: &mut Ebpf, name: &str) -> Result<(), BpfError> {
    perf_event(ebpf, name)?.load()?;
    Ok(())
}

/// The perf-event program `name` of `ebpf`.
fn perf_event<'e>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut PerfEvent, BpfError> {
    Ok(ebpf
        .program_mut(name)
        .ok_or(BpfError::Program(aya::programs::ProgramError::NotLoaded))?
        .try_into()?)
}

fn typed<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, BpfError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap { name })?;
    M::try_from(map).map_err(|source| BpfError::Map { name, source })
}

/// Attaches the exec tracepoint; without it (no tracefs, say) an exec'd process keeps its old
/// program's unwind entries until the next interval reloads it.
fn watch_execs(ebpf: &mut Ebpf) {
    let attached = (|| -> Result<(), aya::programs::ProgramError> {
        let Some(program) = ebpf.program_mut(EXEC_PROGRAM_NAME) else {
            return Err(aya::programs::ProgramError::NotLoaded);
        };
        let program: &mut RawTracePoint = program.try_into()?;
        program.load()?;
        program.attach("sched_process_exec")?;
        Ok(())
    })();
    if let Err(error) = attached {
        tracing::warn!(%error, "exec tracepoint not attached: exec'd processes are reloaded at the next interval");
    }
}

/// Rows of the unwind table array for `memory` bytes (at least one page's worth).
fn unwind_rows(memory: u64) -> u32 {
    let row = std::mem::size_of::<profiler_common::UnwindRow>() as u64;
    (memory / row).clamp(256, u64::from(u32::MAX / 2)) as u32
}

/// Refuses kernels older than [`MINIMUM_KERNEL`] with a message naming what they lack,
/// rather than a verifier log.
fn check_kernel_version() -> Result<(), BpfError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next(), parts.next());
    if let (Some(major), Some(minor)) = version
        && (major, minor) < MINIMUM_KERNEL
    {
        return Err(BpfError::KernelTooOld {
            release: release.to_owned(),
            minimum: "5.8",
        });
    }
    Ok(())
}

/// Whether this process may load tracing programs: CAP_SYS_ADMIN, or CAP_BPF with
/// CAP_PERFMON (from `CapEff` in /proc/self/status).
fn has_bpf_privilege() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let Some(caps) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return false;
    };
    let has = |cap: u32| caps & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}
