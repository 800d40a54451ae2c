//! The drain loop: every interval it empties a [`StackSource`] (the kernel sampler in
//! production, a double in tests), snapshots each newly seen process so that one which exits
//! before the end still has its mappings, and accumulates the interval's samples.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use profiler_common::Counter;

use crate::process::{ProcessInfo, ProcessSource};

/// One stack as the kernel recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stack {
    /// Instruction pointers, innermost first.
    Frames(Vec<u64>),
    /// This kind of stack was not requested.
    NotCollected,
    /// The kernel could not store the stack; the cause is in the error counters.
    Lost,
}

impl Stack {
    pub fn frames(&self) -> &[u64] {
        match self {
            Stack::Frames(f) => f,
            _ => &[],
        }
    }
}

/// Samples of one (process, thread name, user stack, kernel stack) in one drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSample {
    pub pid: u32,
    pub comm: String,
    pub user: Stack,
    pub kernel: Stack,
    /// Python frames the kernel program recorded beside the user stack, innermost first,
    /// packed as `profiler_common::py_frame` describes; empty for other processes.
    pub python: Vec<u64>,
    pub count: u64,
}

/// Kernel-side counters summed over CPUs, indexed by [`Counter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub values: [u64; Counter::COUNT as usize],
}

impl CounterSnapshot {
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }

    /// Sum of every failure counter.
    pub fn errors(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_error())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Counters accumulated since `earlier`.
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        let mut out = CounterSnapshot::default();
        for (i, v) in out.values.iter_mut().enumerate() {
            *v = self.values[i].saturating_sub(earlier.values[i]);
        }
        out
    }
}

/// What a source's unwind tables hold now and did so far (zero for a source without them);
/// built by `crate::unwind::Loader`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindTableStats {
    /// Tables built and loaded.
    pub tables_loaded: u64,
    /// Tables dropped to make room for others.
    pub tables_evicted: u64,
    /// Files whose table did not fit in the budget: walked with frame pointers.
    pub tables_over_budget: u64,
    /// Files with no usable table (no `.eh_frame`, unreadable, not x86_64, malformed).
    pub tables_unavailable: u64,
    /// Mapping entries the kernel refused (map full): those mappings fall back to frame
    /// pointers.
    pub entries_refused: u64,
    /// Rows in use now, of `rows_capacity`.
    pub rows_used: u64,
    pub rows_capacity: u64,
    /// Processes loaded now.
    pub processes: u64,
}

/// Where samples come from: the seam between the kernel and the pipeline.
pub trait StackSource {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Everything counted since the previous drain, each sample exactly once.
    fn drain(&mut self) -> Result<Vec<RawSample>, Self::Error>;
    /// Cumulative kernel-side counters.
    fn counters(&self) -> Result<CounterSnapshot, Self::Error>;
    /// Stops sampling; what was counted before stays available to [`StackSource::drain`].
    fn stop(&mut self) -> Result<(), Self::Error>;
    /// An interval ended (after its last drain).
    fn next_interval(&mut self) {}
    /// A fresh snapshot of a sampled process: the kernel sampler loads the unwind tables of
    /// its mappings.
    fn observe(&mut self, _info: &ProcessInfo) {}
    /// The unwind tables' statistics.
    fn unwind_tables(&self) -> UnwindTableStats {
        UnwindTableStats::default()
    }
}

/// Snapshots taken early (when the kernel announced a process's first sample) are kept this
/// many drains, as the fallback for a process that has exited by its drain.
const EARLY_SNAPSHOT_DRAINS: u64 = 30;

/// Samples and process snapshots gathered over a time window.
#[derive(Debug, Default)]
pub struct Recording {
    pub samples: Vec<RawSample>,
    pub processes: HashMap<u32, ProcessInfo>,
    pub start: Option<SystemTime>,
    pub duration: Duration,
    pub counters: CounterSnapshot,
    /// The source's unwind tables at the end of the recording.
    pub unwind_tables: UnwindTableStats,
    pub drains: u64,
}

impl Recording {
    pub fn total_samples(&self) -> u64 {
        self.samples.iter().map(|s| s.count).sum()
    }
}

/// Drives a [`StackSource`] and a [`ProcessSource`] into a [`Recording`].
pub struct Sampler<S, P> {
    source: S,
    processes: P,
    recording: Recording,
    started: Instant,
    /// Sampling stopped: the window is over.
    stopped: bool,
    /// Where early snapshots arrive from, if anything takes them.
    early_snapshots: Option<std::sync::mpsc::Receiver<ProcessInfo>>,
    /// pid -> (early snapshot, drain it arrived in).
    early: HashMap<u32, (ProcessInfo, u64)>,
    drains_total: u64,
    /// Processes gone by their drain that an early snapshot still named.
    pub early_snapshots_used: u64,
}

impl<S: StackSource, P: ProcessSource> Sampler<S, P> {
    /// `source` should be fresh: the recording's counters are the source's cumulative ones,
    /// which then describe exactly the samples drained.
    pub fn new(source: S, processes: P) -> Result<Self, S::Error> {
        Ok(Self {
            source,
            processes,
            recording: Recording {
                start: Some(SystemTime::now()),
                ..Recording::default()
            },
            started: Instant::now(),
            stopped: false,
            early_snapshots: None,
            early: HashMap::new(),
            drains_total: 0,
            early_snapshots_used: 0,
        })
    }

    /// Takes snapshots made as soon as a process was first sampled (see
    /// [`crate::process::early`]): a process that exits before its drain keeps its names.
    pub fn set_early_snapshots(&mut self, snapshots: std::sync::mpsc::Receiver<ProcessInfo>) {
        self.early_snapshots = Some(snapshots);
    }

    /// Drains once, snapshotting processes seen for the first time, and again (once per drain)
    /// those with user addresses outside their snapshot: code mapped later, as by dlopen.
    pub fn drain(&mut self) -> Result<usize, S::Error> {
        let samples = self.source.drain()?;
        self.recording.drains += 1;
        self.drains_total += 1;
        if let Some(snapshots) = &self.early_snapshots {
            for info in snapshots.try_iter() {
                self.early.insert(info.pid, (info, self.drains_total));
            }
        }
        let n = samples.len();
        let mut refreshed = std::collections::HashSet::new();
        for sample in &samples {
            let stale = match self.recording.processes.get(&sample.pid) {
                None => true,
                Some(known) => {
                    !known.vanished
                        && !refreshed.contains(&sample.pid)
                        && sample
                            .user
                            .frames()
                            .iter()
                            .any(|&a| known.mapping_for(a).is_none())
                }
            };
            if stale {
                let mut info = self.processes.snapshot(sample.pid, &sample.comm);
                if info.vanished
                    && let Some((early, _)) = self.early.get(&sample.pid)
                {
                    info = ProcessInfo {
                        comm: sample.comm.clone(),
                        ..early.clone()
                    };
                    self.early_snapshots_used += 1;
                }
                if !info.vanished {
                    self.source.observe(&info);
                }
                // A process that exited meanwhile keeps the snapshot it had.
                if !info.vanished || !self.recording.processes.contains_key(&sample.pid) {
                    self.recording.processes.insert(sample.pid, info);
                }
                refreshed.insert(sample.pid);
            }
        }
        self.recording.samples.extend(samples);
        Ok(n)
    }

    /// Drains every `interval` until `deadline` or until `stop` returns true.
    pub fn run_until(
        &mut self,
        interval: Duration,
        deadline: Instant,
        stop: impl FnMut() -> bool,
    ) -> Result<(), S::Error> {
        self.run_until_with(interval, Some(deadline), stop, |_| {})
    }

    /// [`Sampler::run_until`] with no deadline when `None`, calling `drained` with the samples
    /// gathered so far after each drain.
    pub fn run_until_with(
        &mut self,
        interval: Duration,
        deadline: Option<Instant>,
        mut stop: impl FnMut() -> bool,
        mut drained: impl FnMut(u64),
    ) -> Result<(), S::Error> {
        let before = |at: Instant| deadline.is_none_or(|d| at < d);
        let mut next = Instant::now() + interval;
        while before(Instant::now()) && !stop() {
            let wake = deadline.map_or(next, |d| next.min(d));
            while Instant::now() < wake && !stop() {
                std::thread::sleep((wake - Instant::now()).min(Duration::from_millis(50)));
            }
            if Instant::now() >= next {
                self.drain()?;
                next += interval;
                drained(self.recording.total_samples());
            }
        }
        Ok(())
    }

    /// Ends the current interval and starts the next: drains, and returns what the interval
    /// gathered with the source's cumulative counters. Processes are snapshotted afresh in
    /// the next interval, so a reused pid never inherits an old snapshot for long.
    pub fn take_interval(&mut self) -> Result<Recording, S::Error> {
        self.drain()?;
        let now = Instant::now();
        let next = Recording {
            start: Some(SystemTime::now()),
            ..Recording::default()
        };
        let mut done = std::mem::replace(&mut self.recording, next);
        done.duration = now.duration_since(self.started);
        done.counters = self.source.counters()?;
        done.unwind_tables = self.source.unwind_tables();
        self.source.next_interval();
        let oldest = self.drains_total.saturating_sub(EARLY_SNAPSHOT_DRAINS);
        self.early.retain(|_, (_, drain)| *drain >= oldest);
        self.started = now;
        Ok(done)
    }

    /// The process source, for its statistics.
    pub fn processes(&self) -> &P {
        &self.processes
    }

    /// Stops sampling (once): the window ends now, not after the last drain. Returns its
    /// length.
    pub fn stop(&mut self) -> Result<Duration, S::Error> {
        if !self.stopped {
            self.recording.duration = self.started.elapsed();
            self.source.stop()?;
            self.stopped = true;
        }
        Ok(self.recording.duration)
    }

    /// Ends the window: stops the source (unless [`Sampler::stop`] did), drains what is
    /// left, and returns the recording with the source's counters. Stopping first makes the
    /// counters and the drained samples describe exactly the same samples.
    pub fn finish(mut self) -> Result<Recording, S::Error> {
        self.stop()?;
        self.drain()?;
        self.recording.counters = self.source.counters()?;
        self.recording.unwind_tables = self.source.unwind_tables();
        Ok(self.recording)
    }

    pub fn source(&self) -> &S {
        &self.source
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::process::ProcessInfo;

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    pub(crate) struct Never;

    /// Hands out prepared drains in order (one per call, then nothing), counting each sample
    /// as recorded: the stack source double.
    pub(crate) struct ScriptedSource {
        pub(crate) drains: Vec<Vec<RawSample>>,
        pub(crate) recorded: u64,
    }

    impl StackSource for ScriptedSource {
        type Error = Never;
        fn drain(&mut self) -> Result<Vec<RawSample>, Never> {
            let next = if self.drains.is_empty() {
                Vec::new()
            } else {
                self.drains.remove(0)
            };
            self.recorded += next.iter().map(|s| s.count).sum::<u64>();
            Ok(next)
        }
        fn counters(&self) -> Result<CounterSnapshot, Never> {
            let mut c = CounterSnapshot::default();
            c.values[Counter::Recorded as usize] = self.recorded;
            Ok(c)
        }
        fn stop(&mut self) -> Result<(), Never> {
            Ok(())
        }
    }

    struct CountingProcesses(Vec<u32>);

    impl ProcessSource for CountingProcesses {
        fn snapshot(&mut self, pid: u32, comm: &str) -> ProcessInfo {
            self.0.push(pid);
            ProcessInfo::unknown(pid, comm)
        }
    }

    fn sample(pid: u32, count: u64) -> RawSample {
        RawSample {
            pid,
            comm: format!("p{pid}"),
            user: Stack::Frames(vec![0x1000, 0x2000]),
            kernel: Stack::NotCollected,
            python: Vec::new(),
            count,
        }
    }

    #[test]
    fn snapshots_each_process_once_and_keeps_every_sample() {
        let source = ScriptedSource {
            drains: vec![vec![sample(1, 3), sample(2, 1)], vec![sample(1, 2)]],
            recorded: 0,
        };
        let mut sampler = Sampler::new(source, CountingProcesses(Vec::new())).unwrap();
        sampler.drain().unwrap();
        sampler.drain().unwrap();
        assert_eq!(sampler.processes.0, vec![1, 2]);
        let recording = sampler.finish().unwrap();
        assert_eq!(recording.total_samples(), 6);
        assert_eq!(recording.counters.get(Counter::Recorded), 6);
        assert_eq!(recording.drains, 3, "two explicit drains and the final one");
    }

    #[test]
    fn an_early_snapshot_names_a_process_gone_by_its_drain() {
        let source = ScriptedSource {
            drains: vec![vec![sample(1, 3), sample(2, 1)]],
            recorded: 0,
        };
        // CountingProcesses finds every process gone, as for one that lived a few ms.
        let mut sampler = Sampler::new(source, CountingProcesses(Vec::new())).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        sampler.set_early_snapshots(rx);
        tx.send(ProcessInfo {
            pid: 1,
            exe: Some("/bin/short".into()),
            mappings: vec![crate::process::Mapping {
                start: 0x1000,
                end: 0x3000,
                offset: 0,
                path: "/bin/short".into(),
                kind: crate::process::MappingKind::Anonymous,
            }],
            ..ProcessInfo::default()
        })
        .unwrap();
        sampler.drain().unwrap();
        let recording = sampler.finish().unwrap();
        let one = &recording.processes[&1];
        assert!(!one.vanished && one.mapping_for(0x2000).is_some());
        assert_eq!(one.comm, "p1", "the comm is the sample's");
        assert!(recording.processes[&2].vanished, "no early snapshot for 2");
    }

    #[test]
    fn finish_drains_a_last_time_after_stop() {
        let source = ScriptedSource {
            drains: vec![vec![sample(7, 1)]],
            recorded: 0,
        };
        let mut sampler = Sampler::new(source, CountingProcesses(Vec::new())).unwrap();
        sampler
            .run_until(Duration::from_secs(60), Instant::now(), || true)
            .unwrap();
        assert_eq!(sampler.finish().unwrap().total_samples(), 1);
    }

    /// Snapshots with one mapping that grows on the second call, like a process after dlopen.
    struct GrowingProcesses(u32);

    impl ProcessSource for GrowingProcesses {
        fn snapshot(&mut self, pid: u32, comm: &str) -> ProcessInfo {
            self.0 += 1;
            let mapping = |start| crate::process::Mapping {
                start,
                end: start + 0x1000,
                offset: 0,
                path: "/lib".into(),
                kind: crate::process::MappingKind::Anonymous,
            };
            let mut info = ProcessInfo::unknown(pid, comm);
            info.vanished = false;
            info.mappings.push(mapping(0x1000));
            if self.0 > 1 {
                info.mappings.push(mapping(0x2000));
            }
            info
        }
    }

    #[test]
    fn addresses_outside_the_snapshot_refresh_it_once_per_drain() {
        let in_first = sample(1, 1); // frames 0x1000, 0x2000: 0x2000 unmapped at first
        let source = ScriptedSource {
            drains: vec![
                vec![in_first.clone(), in_first.clone()],
                vec![in_first.clone(), in_first.clone()],
                vec![in_first],
            ],
            recorded: 0,
        };
        let mut sampler = Sampler::new(source, GrowingProcesses(0)).unwrap();
        sampler.drain().unwrap();
        assert_eq!(
            sampler.processes.0, 1,
            "first sight: one snapshot per drain"
        );
        sampler.drain().unwrap();
        assert_eq!(sampler.processes.0, 2, "0x2000 unmapped: refreshed once");
        sampler.drain().unwrap();
        assert_eq!(sampler.processes.0, 2, "now mapped: no more refreshes");
        let recording = sampler.finish().unwrap();
        assert!(recording.processes[&1].mapping_for(0x2000).is_some());
    }

    #[test]
    fn counter_deltas() {
        let mut a = CounterSnapshot::default();
        let mut b = CounterSnapshot::default();
        a.values[Counter::CountsMapFullError as usize] = 2;
        b.values[Counter::CountsMapFullError as usize] = 5;
        b.values[Counter::Recorded as usize] = 9;
        let d = b.since(&a);
        assert_eq!(d.errors(), 3);
        assert_eq!(d.get(Counter::Recorded), 9);
    }
}
