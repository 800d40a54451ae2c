//! Opening a sampler: the one way `run`, `record` and captures start sampling. Loads and
//! attaches the kernel side, and pairs it with a /proc process source and the early-snapshot
//! thread fed by the kernel's new-process announcements, which loads each process's unwind
//! tables at its first sample (and, when asked, hands its snapshot to the sampler). Later
//! stages that prepare something in the kernel for a process (the Python walk) do it there
//! too, through [`ProcessHook`]s.

use super::{BpfError, KernelSampler, SamplerOptions};
use crate::{
    process::{ProcessInfo, ProcfsProcesses, early::EarlySnapshots},
    sampler::Sampler,
};

/// Run on the early-snapshot thread: with each process the kernel announces, after its
/// unwind tables are loaded, and with `None` at least every 200 ms (for periodic work).
pub type ProcessHook = Box<dyn FnMut(Option<&ProcessInfo>) + Send>;

/// A started sampler, with the thread that snapshots announced processes (stopped on drop).
pub struct OpenSampler {
    pub sampler: Sampler<KernelSampler, ProcfsProcesses>,
    /// Drop it after the sampler's last drain.
    pub early_snapshots: Option<EarlySnapshots>,
    /// Kernel memory taken by the maps, as the kernel reports it.
    pub kernel_memory_bytes: u64,
}

/// Loads the sampler for `options`, starts what serves it, and attaches it last, so the
/// window the sampler measures from its start holds every sample. Every process is
/// snapshotted within milliseconds of its first sample, to load its unwind tables; with
/// `early_snapshots` the sampler keeps those snapshots too, so one that exits before the
/// drain keeps its names. `container_id_cache_size` bounds the container ids remembered.
/// `hooks` makes, from the loaded kernel side, the hooks shown each announced process.
pub fn open_sampler(
    options: &SamplerOptions,
    container_id_cache_size: usize,
    early_snapshots: bool,
    hooks: impl FnOnce(&mut KernelSampler) -> Vec<ProcessHook>,
) -> Result<OpenSampler, BpfError> {
    let mut kernel = KernelSampler::load(options)?;
    let kernel_memory_bytes = kernel.kernel_memory_bytes();
    let mut hooks = hooks(&mut kernel);
    // Processes named up front are shown to the hooks before their first sample, as their
    // unwind tables are loaded before it.
    for info in kernel.take_named_snapshots() {
        for hook in &mut hooks {
            hook(Some(&info));
        }
    }
    let early = start_early_snapshots(&mut kernel, container_id_cache_size, hooks);
    let processes = ProcfsProcesses::with_container_id_cache("/proc", container_id_cache_size);
    // Sampling starts last, so the window (from `Sampler::new`) holds every sample.
    kernel.attach()?;
    let mut sampler = Sampler::new(kernel, processes)?;
    let early_snapshots = early.map(|(thread, snapshots)| {
        if early_snapshots {
            sampler.set_early_snapshots(snapshots);
        }
        thread
    });
    Ok(OpenSampler {
        sampler,
        early_snapshots,
        kernel_memory_bytes,
    })
}

/// Early snapshots of the processes `kernel` announces; none (with a warning) when the
/// thread cannot start or the announcements were taken.
fn start_early_snapshots(
    kernel: &mut KernelSampler,
    container_id_cache_size: usize,
    mut hooks: Vec<ProcessHook>,
) -> Option<(EarlySnapshots, std::sync::mpsc::Receiver<ProcessInfo>)> {
    let announcements = kernel.take_new_processes()?;
    let loader = kernel.loader();
    EarlySnapshots::start(
        announcements,
        "/proc",
        container_id_cache_size,
        move |info: Option<&ProcessInfo>| {
            if let Some(info) = info {
                loader.load(info);
            }
            for hook in &mut hooks {
                hook(info);
            }
        },
    )
    .inspect_err(|e| {
        tracing::warn!(
            error = %e,
            "no early snapshots: short-lived processes may go unnamed"
        )
    })
    .ok()
}
