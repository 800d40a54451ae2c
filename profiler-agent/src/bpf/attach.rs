//! Attaching the sampler: one CPU-clock perf event per online CPU, or one inherited event per
//! thread of a few processes (see [`super::Scope`]); and detaching it.

use aya::programs::{
    PerfEvent,
    perf_event::{PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent},
};

use super::{BpfError, KernelSampler, PROGRAM_NAME, Scope, perf_event};

impl KernelSampler {
    /// Starts sampling: opens the perf events (one per online CPU, or per thread of the
    /// processes of [`Scope::Threads`]) and attaches the program to them.
    pub fn attach(&mut self) -> Result<(), BpfError> {
        let program = perf_event(&mut self.ebpf, PROGRAM_NAME)?;
        self.links = match &self.scope {
            Scope::EveryCpu => attach_every_cpu(program, &self.cpu_ids, self.sample_rate)?,
            Scope::Threads { pids, max_events } => {
                let tids = list_threads(pids, *max_events)?;
                attach_threads(program, &tids, self.sample_rate)?
            }
        };
        tracing::info!(
            events = self.links.len(),
            sample_rate = self.sample_rate,
            "eBPF sampler attached"
        );
        Ok(())
    }

    /// Stops sampling: detaches the program from every perf event.
    pub(super) fn detach(&mut self) -> Result<(), BpfError> {
        let program = perf_event(&mut self.ebpf, PROGRAM_NAME)?;
        for link in self.links.drain(..) {
            program.detach(link)?;
        }
        Ok(())
    }
}

fn attach_every_cpu(
    program: &mut PerfEvent,
    cpus: &[u32],
    sample_rate: u64,
) -> Result<Vec<PerfEventLinkId>, BpfError> {
    cpus.iter()
        .map(|&cpu| {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(sample_rate),
                    false,
                )
                .map_err(|source| BpfError::PerfEvent { cpu, source })
        })
        .collect()
}

/// The threads of each process (`/proc/PID/task`), at most `max_events` in all: listing
/// stops at the first thread over the limit, so a process with 100 000 threads costs one
/// directory read of `max_events + 1` entries, not 100 000 descriptors.
fn list_threads(pids: &[u32], max_events: usize) -> Result<Vec<(u32, Vec<u32>)>, BpfError> {
    let mut total = 0usize;
    let mut all = Vec::with_capacity(pids.len());
    for &pid in pids {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map_err(|source| BpfError::Threads { pid, source })?;
        let mut tids = Vec::new();
        for tid in tasks
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse().ok())
        {
            if total == max_events {
                return Err(BpfError::TooManyThreads {
                    pid,
                    limit: max_events,
                });
            }
            total += 1;
            tids.push(tid);
        }
        all.push((pid, tids));
    }
    Ok(all)
}

/// One inherited event per listed thread (threads started later inherit it in the kernel,
/// without a descriptor of their own). A thread that exits between the listing and its
/// attach is skipped; a process none of whose threads could be attached is an error (it has
/// exited, or the events are refused).
fn attach_threads(
    program: &mut PerfEvent,
    threads: &[(u32, Vec<u32>)],
    sample_rate: u64,
) -> Result<Vec<PerfEventLinkId>, BpfError> {
    let mut links = Vec::new();
    for (pid, tids) in threads {
        let pid = *pid;
        let mut last_error = None;
        let before = links.len();
        for &tid in tids {
            match program.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::OneProcess {
                    pid: tid,
                    cpu: None,
                },
                SamplePolicy::Frequency(sample_rate),
                true,
            ) {
                Ok(link) => links.push(link),
                Err(error) => {
                    tracing::debug!(pid, tid, %error, "thread not attached");
                    last_error = Some(error);
                }
            }
        }
        if links.len() == before {
            return Err(match last_error {
                Some(source) => BpfError::ProcessPerfEvent { pid, source },
                None => BpfError::Threads {
                    pid,
                    source: std::io::Error::from_raw_os_error(libc::ESRCH),
                },
            });
        }
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_listing_stops_at_the_limit() {
        let stop = std::sync::Arc::new(std::sync::Barrier::new(9));
        let parked: Vec<_> = (0..8)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    stop.wait();
                })
            })
            .collect();
        let me = std::process::id();
        // The test harness runs other tests on threads of its own: count what is there now.
        let now = std::fs::read_dir(format!("/proc/{me}/task"))
            .unwrap()
            .count();
        assert!(now >= 9, "{now}");
        let listed = list_threads(&[me], 100_000).unwrap();
        assert_eq!(listed[0].0, me);
        assert!(listed[0].1.contains(&me));
        assert!(matches!(
            list_threads(&[me], 5),
            Err(BpfError::TooManyThreads { pid, limit: 5 }) if pid == me
        ));
        assert!(matches!(
            list_threads(&[u32::MAX], 5),
            Err(BpfError::Threads { .. })
        ));
        stop.wait();
        for t in parked {
            t.join().unwrap();
        }
    }
}
