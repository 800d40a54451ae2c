//! Property tests: any pprof profile survives encoding (plain and gzipped, as the agent sends
//! it) unchanged, and profiles the builder makes from random samples are well formed.

use std::{
    collections::{HashMap, HashSet},
    io::Read as _,
    time::{Duration, SystemTime},
};

use proptest::{collection::vec, prelude::*};
use prost::Message as _;

use super::{
    pprof::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType},
    *,
};
use crate::{
    frames::{Found, FrameKind, FrameSource, MappingClass, Site},
    process::{Mapping as ProcessMapping, MappingKind, ProcessInfo},
    sampler::{RawSample, Stack},
    symbolize::Frame,
};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        // No regression files in the source tree: a failure prints its minimal case.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A string table: "" first, then distinct strings (any Unicode, empty excluded).
fn string_table() -> impl Strategy<Value = Vec<String>> {
    prop::collection::hash_set("\\PC{1,12}", 0..24).prop_map(|set| {
        let mut table = vec![String::new()];
        table.extend(set);
        table
    })
}

fn label(strings: std::ops::Range<i64>) -> impl Strategy<Value = Label> {
    prop_oneof![
        (strings.clone(), strings.clone()).prop_map(|(key, str)| Label {
            key,
            str,
            ..Label::default()
        }),
        (strings.clone(), any::<i64>(), strings).prop_map(|(key, num, num_unit)| Label {
            key,
            num,
            num_unit,
            ..Label::default()
        }),
    ]
}

/// A random profile whose indices and ids all point inside its own tables, as a real one's do.
fn profile() -> impl Strategy<Value = Profile> {
    (string_table(), 1usize..4, 0usize..6, 1usize..24, 1usize..32).prop_flat_map(
        |(table, types, mappings, functions, locations)| {
            let s = 0..table.len() as i64;
            let value_type =
                (s.clone(), s.clone()).prop_map(|(r#type, unit)| ValueType { r#type, unit });
            let sample = (
                vec(1..=locations as u64, 0..40),
                vec(any::<i64>(), types),
                vec(label(s.clone()), 0..4),
            )
                .prop_map(|(location_id, value, label)| Sample {
                    location_id,
                    value,
                    label,
                });
            let mapping = (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                s.clone(),
                s.clone(),
                any::<[bool; 4]>(),
            )
                .prop_map(|(start, len, offset, filename, build_id, flags)| Mapping {
                    memory_start: start,
                    memory_limit: start.saturating_add(len),
                    file_offset: offset,
                    filename,
                    build_id,
                    has_functions: flags[0],
                    has_filenames: flags[1],
                    has_line_numbers: flags[2],
                    has_inline_frames: flags[3],
                    ..Mapping::default()
                });
            let line = (1..=functions as u64, any::<i64>())
                .prop_map(|(function_id, line)| Line { function_id, line });
            // Several lines: inlined callees first, their caller last.
            let location = (
                0..=mappings as u64,
                any::<u64>(),
                vec(line, 0..5),
                any::<bool>(),
            )
                .prop_map(|(mapping_id, address, line, is_folded)| Location {
                    mapping_id,
                    address,
                    line,
                    is_folded,
                    ..Location::default()
                });
            let function = (s.clone(), s.clone(), s.clone(), any::<i64>()).prop_map(
                |(name, system_name, filename, start_line)| Function {
                    name,
                    system_name,
                    filename,
                    start_line,
                    ..Function::default()
                },
            );
            let tables = (
                vec(value_type.clone(), types),
                vec(sample, 0..48),
                vec(mapping, mappings),
                vec(location, locations),
                vec(function, functions),
            );
            let scalars = (
                (s.clone(), s.clone()),
                (any::<i64>(), 0..i64::MAX),
                prop::option::of(value_type),
                any::<i64>(),
                vec(s, 0..3),
                0..types as i64,
            );
            (Just(table), tables, scalars).prop_map(
                |(
                    string_table,
                    (sample_type, sample, mut mapping, mut location, mut function),
                    (
                        (drop_frames, keep_frames),
                        (time_nanos, duration_nanos),
                        period_type,
                        period,
                        comment,
                        default_sample_type,
                    ),
                )| {
                    // Ids are 1-based positions, as the builder assigns them.
                    for (i, m) in mapping.iter_mut().enumerate() {
                        m.id = i as u64 + 1;
                    }
                    for (i, l) in location.iter_mut().enumerate() {
                        l.id = i as u64 + 1;
                    }
                    for (i, f) in function.iter_mut().enumerate() {
                        f.id = i as u64 + 1;
                    }
                    Profile {
                        sample_type,
                        sample,
                        mapping,
                        location,
                        function,
                        string_table,
                        drop_frames,
                        keep_frames,
                        time_nanos,
                        duration_nanos,
                        period_type,
                        period,
                        comment,
                        default_sample_type,
                    }
                },
            )
        },
    )
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .expect("valid gzip");
    raw
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn encode_decode_round_trip(p in profile()) {
        let bytes = p.encode_to_vec();
        prop_assert_eq!(bytes.len(), p.encoded_len());
        prop_assert_eq!(Profile::decode(&bytes[..]).unwrap(), p);
    }

    #[test]
    fn gzip_round_trip_as_sent(p in profile()) {
        let built = BuiltProfile {
            profile: p,
            top_self: Vec::new(),
            total_samples: 0,
        };
        let gz = built.encode_gzip().unwrap();
        prop_assert_eq!(&gz[..2], &[0x1f, 0x8b][..]);
        prop_assert_eq!(Profile::decode(&gunzip(&gz)[..]).unwrap(), built.profile);
    }
}

/// Names addresses by arithmetic: a few distinct functions shared by many addresses, inline
/// chains of 1-3 frames, files for some and not others, build ids for some mappings.
struct ArithmeticSymbolizer;

impl ArithmeticSymbolizer {
    fn frame(prefix: &str, address: u64, level: u64) -> Frame {
        let mut frame = Frame::named(format!("{prefix}_{}", (address / 16 + level) % 23));
        frame.system_name = format!("_Z{}", frame.name).into();
        if !address.is_multiple_of(5) {
            frame.file = Some(format!("src/{}.c", address % 7).into());
        }
        frame.line = (address % 97) as u32;
        frame
    }
}

impl FrameSource for ArithmeticSymbolizer {
    fn name(&self) -> &'static str {
        "arithmetic"
    }
    fn serves(&self, _: MappingClass) -> bool {
        true
    }
    fn kind(&self) -> FrameKind {
        FrameKind::Native
    }
    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        let address = site.address;
        if site.process.is_none() {
            return Some(Found::Frames(Arc::new([Self::frame("k", address, 0)])));
        }
        Some(Found::Frames(
            (0..address % 3 + 1)
                .map(|level| Self::frame("fn", address, level))
                .collect(),
        ))
    }
    fn read_file(
        &mut self,
        _: &ProcessInfo,
        m: &ProcessMapping,
        offset: u64,
        buf: &mut [u8],
    ) -> bool {
        super::tests::syscall_at(m, offset, buf).is_multiple_of(2)
    }
    fn build_id(&mut self, _: &ProcessInfo, mapping: &ProcessMapping) -> Option<String> {
        (!mapping.path.ends_with("nobuildid")).then(|| format!("{:x}", mapping.start))
    }
}

const USER_BASE: u64 = 0x40_0000;
const KERNEL_BASE: u64 = 0xffff_ffff_8100_0000;

/// pids 1-3 are known, with two mappings (one without a build id) covering part of the user
/// address range; 1 runs in a container; pid 4 is unknown.
fn processes() -> HashMap<u32, ProcessInfo> {
    (1..=3)
        .map(|pid| {
            let mapping = |start: u64, path: &str| ProcessMapping {
                start,
                end: start + 0x800,
                offset: 0x1000 * u64::from(pid),
                path: path.into(),
                kind: MappingKind::Anonymous,
            };
            let info = ProcessInfo {
                pid,
                comm: format!("proc{pid}"),
                container_id: (pid == 1).then(|| "c0ffee".to_owned()),
                mappings: vec![
                    mapping(USER_BASE, "/usr/bin/app"),
                    mapping(USER_BASE + 0x1000, "/usr/lib/libnobuildid"),
                ],
                ..ProcessInfo::default()
            };
            (pid, info)
        })
        .collect()
}

fn stack(base: u64, max_depth: usize) -> impl Strategy<Value = Stack> {
    prop_oneof![
        8 => vec(base..base + 0x2000, 1..max_depth).prop_map(Stack::Frames),
        1 => Just(Stack::Lost),
        1 => Just(Stack::NotCollected),
    ]
}

fn raw_sample() -> impl Strategy<Value = RawSample> {
    (
        1u32..=4,
        prop::sample::select(vec!["app", "worker", "gc thread", ""]),
        stack(USER_BASE, 12),
        stack(KERNEL_BASE, 6),
        1u64..10_000,
    )
        .prop_map(|(pid, comm, user, kernel, count)| RawSample {
            pid,
            comm: comm.into(),
            user,
            kernel,
            python: Vec::new(),
            count,
        })
}

fn options() -> impl Strategy<Value = BuildOptions> {
    (
        1u64..100_000,
        prop::sample::select(vec![
            CommMode::None,
            CommMode::Label,
            CommMode::Stackframe,
            CommMode::Both,
        ]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(sample_rate, comm, pid_label, container_label)| BuildOptions {
                sample_rate,
                comm,
                pid_label,
                container_label,
            },
        )
}

/// Locations a sample's stacks become: one per frame, one per lost stack, plus the comm frame.
fn expected_depth(sample: &RawSample, options: &BuildOptions) -> usize {
    let stack = |s: &Stack| match s {
        Stack::Frames(f) => f.len(),
        Stack::Lost => 1,
        Stack::NotCollected => 0,
    };
    stack(&sample.kernel)
        + stack(&sample.user)
        + usize::from(matches!(
            options.comm,
            CommMode::Stackframe | CommMode::Both
        ))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn built_profiles_are_well_formed(
        samples in vec(raw_sample(), 0..64),
        options in options(),
    ) {
        let processes = processes();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let built = super::tests::build_with(
            Box::new(ArithmeticSymbolizer),
            &samples,
            &processes,
            Some(start),
            Duration::from_secs(15),
            &options,
        );
        let p = &built.profile;
        let strings = p.string_table.len() as i64;
        let in_table = |i: i64| (0..strings).contains(&i);

        // The string table: "" first, no duplicates.
        prop_assert_eq!(p.string_table.first().map(String::as_str), Some(""));
        let distinct: HashSet<&String> = p.string_table.iter().collect();
        prop_assert_eq!(distinct.len(), p.string_table.len());

        // Types, period and values.
        prop_assert_eq!(p.period, 1_000_000_000 / options.sample_rate as i64);
        prop_assert_eq!(p.sample_type.len(), 2);
        for t in p.sample_type.iter().chain(&p.period_type) {
            prop_assert!(in_table(t.r#type) && in_table(t.unit));
        }
        prop_assert_eq!(p.time_nanos, 1_700_000_000_000_000_000);
        prop_assert_eq!(p.duration_nanos, 15_000_000_000);
        prop_assert_eq!(p.sample.len(), samples.len());
        prop_assert_eq!(built.total_samples, samples.iter().map(|s| s.count).sum::<u64>());

        // Ids unique; every reference resolves.
        let function_ids: HashSet<u64> = p.function.iter().map(|f| f.id).collect();
        prop_assert_eq!(function_ids.len(), p.function.len());
        let mapping_ids: HashSet<u64> = p.mapping.iter().map(|m| m.id).collect();
        prop_assert_eq!(mapping_ids.len(), p.mapping.len());
        let location_ids: HashSet<u64> = p.location.iter().map(|l| l.id).collect();
        prop_assert_eq!(location_ids.len(), p.location.len());
        prop_assert!(!function_ids.contains(&0) && !mapping_ids.contains(&0));
        prop_assert!(!location_ids.contains(&0));

        for (raw, s) in samples.iter().zip(&p.sample) {
            prop_assert_eq!(s.value.len(), 2);
            prop_assert_eq!(s.value[0], raw.count as i64);
            prop_assert_eq!(s.value[1], s.value[0] * p.period);
            prop_assert_eq!(s.location_id.len(), expected_depth(raw, &options));
            for id in &s.location_id {
                prop_assert!(location_ids.contains(id), "sample names missing location {}", id);
            }
            for l in &s.label {
                prop_assert!(in_table(l.key) && in_table(l.str) && in_table(l.num_unit));
            }
        }
        for l in &p.location {
            prop_assert!(l.mapping_id == 0 || mapping_ids.contains(&l.mapping_id));
            prop_assert!(!l.line.is_empty());
            for line in &l.line {
                prop_assert!(function_ids.contains(&line.function_id));
            }
        }
        for f in &p.function {
            prop_assert!(in_table(f.name) && in_table(f.system_name) && in_table(f.filename));
        }
        for m in &p.mapping {
            prop_assert!(in_table(m.filename) && in_table(m.build_id));
        }
        prop_assert!(in_table(p.drop_frames) && in_table(p.keep_frames));
        for &c in &p.comment {
            prop_assert!(in_table(c));
        }

        // And it survives the trip to the server.
        let decoded = Profile::decode(&gunzip(&built.encode_gzip().unwrap())[..]).unwrap();
        prop_assert_eq!(&decoded, p);
    }
}
