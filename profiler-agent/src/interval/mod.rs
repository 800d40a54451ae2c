//! One interval, the stage `run`, `record` and `capture` share: a [`Recording`] (samples and
//! process snapshots), a target set, the frame sources and the build options in; one built
//! profile per target out, and the samples no target took counted. Equal stacks drained
//! separately are merged first, so a stack costs once per interval whatever the drains.

pub mod latest;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    frames::{self, Sources},
    labels::Labels,
    profile::{self, BuildOptions, BuiltProfile},
    sampler::{RawSample, Recording, Stack},
    targets::{Resolution, Target, TargetOptions, TargetSet},
};

/// One target's profile of the interval.
pub struct TargetProfile {
    pub target: Arc<Target>,
    pub built: BuiltProfile,
}

/// What one interval produced.
pub struct Interval {
    /// One per target with samples, in the order of their labels.
    pub profiles: Vec<TargetProfile>,
    /// Samples of processes no target took.
    pub untargeted: u64,
    /// Samples of processes no scan listed, given their target at the drain.
    pub named_late: u64,
    /// Samples that went to the default target (`ebpf/unspecified` unless configured).
    pub defaulted: u64,
    pub start: SystemTime,
    pub duration: Duration,
}

/// Builds one profile per target of `recording`'s samples, naming frames with `sources`.
pub fn build(
    recording: Recording,
    targets: &TargetSet,
    sources: &mut Sources,
    options: &BuildOptions,
) -> Interval {
    let start = recording.start.unwrap_or_else(SystemTime::now);
    let samples = merge(recording.samples);
    let mut groups: BTreeMap<&Labels, (Arc<Target>, Vec<&RawSample>)> = BTreeMap::new();
    // Once per process: a late target is made by relabeling.
    let mut by_pid: HashMap<u32, (Option<Arc<Target>>, Resolution)> = HashMap::new();
    let resolved: Vec<(Option<Arc<Target>>, Resolution, &RawSample)> = samples
        .iter()
        .map(|s| {
            let (target, how) = by_pid
                .entry(s.pid)
                .or_insert_with(|| targets.resolve_process(s.pid, recording.processes.get(&s.pid)))
                .clone();
            (target, how, s)
        })
        .collect();
    let (mut untargeted, mut named_late, mut defaulted) = (0, 0, 0);
    for (target, how, sample) in &resolved {
        match how {
            Resolution::Untargeted => untargeted += sample.count,
            Resolution::Late => named_late += sample.count,
            Resolution::Default => defaulted += sample.count,
            Resolution::Listed => {}
        }
        if let Some(t) = target {
            groups
                .entry(&t.labels)
                .or_insert_with(|| (t.clone(), Vec::new()))
                .1
                .push(sample);
        }
    }
    // Kernel names for every group in one pass.
    frames::prepare(
        sources,
        groups.values().flat_map(|(_, g)| g.iter().copied()),
    );
    let profiles = groups
        .into_values()
        .map(|(target, group)| {
            let stacks = frames::resolve(sources, &group, &recording.processes);
            let built = profile::build(&stacks, Some(start), recording.duration, options);
            TargetProfile { target, built }
        })
        .collect();
    // Naming frames may have read DWARF sections and symbol tables of megabytes.
    crate::memory::release_free_heap();
    Interval {
        profiles,
        untargeted,
        named_late,
        defaulted,
        start,
        duration: recording.duration,
    }
}

/// One profile of every sample of `recording` (`record` and captures).
pub fn build_one(
    recording: Recording,
    sources: &mut Sources,
    options: &BuildOptions,
) -> BuiltProfile {
    let everything = TargetSet::new(
        &[],
        &TargetOptions {
            targets_only: false,
            default_target: Labels::new(),
        },
    )
    .0;
    let start = recording.start;
    let duration = recording.duration;
    let mut interval = build(recording, &everything, sources, options);
    match interval.profiles.pop() {
        Some(p) => p.built,
        // No samples: an empty profile of the window.
        None => {
            let stacks = frames::Stacks::default();
            profile::build(&stacks, start, duration, options)
        }
    }
}

/// One sample per (pid, comm, stacks) over the interval's drains.
fn merge(samples: Vec<RawSample>) -> Vec<RawSample> {
    let mut counts: HashMap<(u32, String, Stack, Stack, Vec<u64>), u64> = HashMap::new();
    for s in samples {
        *counts
            .entry((s.pid, s.comm, s.user, s.kernel, s.python))
            .or_default() += s.count;
    }
    counts
        .into_iter()
        .map(|((pid, comm, user, kernel, python), count)| RawSample {
            pid,
            comm,
            user,
            kernel,
            python,
            count,
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests;
