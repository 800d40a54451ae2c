//! The interval stage with a test-double frame source: samples go to their targets, the rest
//! are counted, equal stacks of several drains are merged.

use std::collections::HashMap;

use super::*;
use crate::{
    frames::{Found, FrameKind, FrameSource, MappingClass, Site},
    labels::SERVICE_NAME,
    process::{Mapping, MappingKind, ProcessInfo},
    symbolize::Frame,
    targets::{CONTAINER_ID, PROCESS_PID},
};

/// Names every address of anonymous memory `fn_<address hex>`: the frame source double.
pub(crate) struct Names;

impl FrameSource for Names {
    fn name(&self) -> &'static str {
        "names"
    }
    fn serves(&self, class: MappingClass) -> bool {
        class == MappingClass::Anonymous
    }
    fn kind(&self) -> FrameKind {
        FrameKind::Jit
    }
    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        Some(Found::Frames(Arc::new([Frame::named(format!(
            "fn_{:x}",
            site.address
        ))])))
    }
}

fn process(pid: u32, container: Option<&str>) -> ProcessInfo {
    ProcessInfo {
        pid,
        comm: format!("p{pid}"),
        container_id: container.map(str::to_owned),
        mappings: vec![Mapping {
            start: 0x1000,
            end: 0x9000,
            offset: 0,
            path: "[anon]".into(),
            kind: MappingKind::Anonymous,
        }],
        ..ProcessInfo::default()
    }
}

fn sample(pid: u32, leaf: u64, count: u64) -> RawSample {
    RawSample {
        pid,
        comm: format!("p{pid}"),
        user: Stack::Frames(vec![leaf, 0x2000]),
        kernel: Stack::NotCollected,
        python: Vec::new(),
        count,
    }
}

pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn recording(samples: Vec<RawSample>, processes: Vec<ProcessInfo>) -> Recording {
    Recording {
        samples,
        processes: processes
            .into_iter()
            .map(|p| (p.pid, p))
            .collect::<HashMap<_, _>>(),
        start: Some(SystemTime::now()),
        duration: Duration::from_secs(15),
        ..Recording::default()
    }
}

#[test]
fn samples_go_to_their_targets_and_the_rest_are_counted() {
    let (targets, rejected) = TargetSet::new(
        &[
            labels(&[(PROCESS_PID, "1"), (SERVICE_NAME, "by-pid")]),
            labels(&[(CONTAINER_ID, "c0ffee"), (SERVICE_NAME, "by-container")]),
        ],
        &TargetOptions::default(),
    );
    assert!(rejected.is_empty());
    let recording = recording(
        vec![
            sample(1, 0x1100, 2),
            sample(2, 0x1200, 3),
            sample(3, 0x1300, 7),
            // The same stack again from a later drain.
            sample(1, 0x1100, 1),
        ],
        vec![
            process(1, None),
            process(2, Some("c0ffee")),
            process(3, Some("other")),
        ],
    );
    let mut sources = Sources::new(vec![Box::new(Names)]);
    let interval = build(recording, &targets, &mut sources, &BuildOptions::record(97));
    assert_eq!(interval.untargeted, 7);
    assert_eq!(interval.duration, Duration::from_secs(15));
    let got: Vec<(&str, u64, usize)> = interval
        .profiles
        .iter()
        .map(|p| {
            (
                p.target.service_name(),
                p.built.total_samples,
                p.built.profile.sample.len(),
            )
        })
        .collect();
    // Ordered by labels; pid 1's two drains are one sample.
    assert_eq!(got, [("by-container", 3, 1), ("by-pid", 3, 1)]);
    let by_pid = &interval.profiles[1].built;
    assert_eq!(by_pid.top_self, [("fn_1100".to_owned(), 3)]);
    assert_eq!(by_pid.profile.duration_nanos, 15_000_000_000);
    assert_eq!(
        sources.stats().known_frames,
        4,
        "fn_1100, fn_1fff, fn_1200, fn_1fff"
    );
}

#[test]
fn with_no_targets_every_sample_is_untargeted() {
    let recording = recording(vec![sample(1, 0x1100, 4)], vec![process(1, None)]);
    let mut sources = Sources::new(vec![Box::new(Names)]);
    let interval = build(
        recording,
        &TargetSet::default(),
        &mut sources,
        &BuildOptions::record(97),
    );
    assert!(interval.profiles.is_empty());
    assert_eq!(interval.untargeted, 4);
    assert_eq!(
        sources.stats().known_frames,
        0,
        "untargeted stacks are not named"
    );
}

#[test]
fn build_one_takes_every_sample_and_an_empty_recording_gives_an_empty_profile() {
    let mut sources = Sources::new(vec![Box::new(Names)]);
    let recording = recording(
        vec![sample(1, 0x1100, 4), sample(2, 0x1100, 1)],
        vec![process(1, None), process(2, Some("x"))],
    );
    let built = build_one(recording, &mut sources, &BuildOptions::record(499));
    assert_eq!(built.total_samples, 5);
    assert_eq!(built.profile.period, 1_000_000_000 / 499);
    let empty = build_one(
        Recording::default(),
        &mut sources,
        &BuildOptions::record(97),
    );
    assert_eq!(empty.total_samples, 0);
    assert!(empty.profile.sample.is_empty());
}

#[test]
fn merge_sums_equal_stacks_across_drains() {
    let sample = |pid, frames: Vec<u64>, count| RawSample {
        pid,
        comm: "c".into(),
        user: Stack::Frames(frames),
        kernel: Stack::NotCollected,
        python: Vec::new(),
        count,
    };
    let merged = merge(vec![
        sample(1, vec![1, 2], 3),
        sample(2, vec![1, 2], 1),
        sample(1, vec![1, 2], 4),
        sample(1, vec![9], 1),
    ]);
    assert_eq!(merged.len(), 3);
    let pid1_stack12 = merged
        .iter()
        .find(|s| s.pid == 1 && s.user.frames() == [1, 2])
        .expect("merged sample");
    assert_eq!(pid1_stack12.count, 7);
    assert_eq!(merged.iter().map(|s| s.count).sum::<u64>(), 9);
}
