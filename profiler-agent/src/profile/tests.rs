use std::time::{Duration, SystemTime};

use std::collections::HashMap;

use super::*;
use crate::{
    frames::{Found, FrameKind, FrameSource, MappingClass, SYSCALL_INSTRUCTION, Site, Sources},
    process::{Mapping, MappingKind, ProcessInfo},
    sampler::{RawSample, Recording, Stack},
};

/// The frames stage and the builder over `samples`, with one frame source double.
pub(super) fn build_with(
    source: Box<dyn FrameSource>,
    samples: &[RawSample],
    processes: &HashMap<u32, ProcessInfo>,
    start: Option<SystemTime>,
    duration: Duration,
    options: &BuildOptions,
) -> BuiltProfile {
    let mut sources = Sources::new(vec![source]);
    let refs: Vec<&RawSample> = samples.iter().collect();
    crate::frames::prepare(&mut sources, refs.iter().copied());
    let stacks = crate::frames::resolve(&mut sources, &refs, processes);
    super::build(&stacks, start, duration, options)
}

/// A whole recording through [`build_with`].
fn build<S: FrameSource + Clone + 'static>(
    rec: &Recording,
    source: &mut S,
    options: &BuildOptions,
) -> BuiltProfile {
    build_with(
        Box::new(source.clone()),
        &rec.samples,
        &rec.processes,
        rec.start,
        rec.duration,
        options,
    )
}

/// Whether the file offset before a syscall instruction ending at `address` is read.
pub(super) fn syscall_at(mapping: &Mapping, file_offset: u64, buf: &mut [u8]) -> u64 {
    buf.copy_from_slice(&SYSCALL_INSTRUCTION[..buf.len().min(SYSCALL_INSTRUCTION.len())]);
    file_offset + buf.len() as u64 - mapping.offset + mapping.start
}

/// Names addresses by a fixed table: the frame source double. The second field lists user
/// addresses that follow a syscall instruction.
#[derive(Clone)]
struct TableSymbolizer(HashMap<u64, &'static str>, Vec<u64>);

impl FrameSource for TableSymbolizer {
    fn name(&self) -> &'static str {
        "table"
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
            let name = self.0.get(&address).copied().unwrap_or(UNKNOWN);
            return Some(Found::Frames(Arc::new([Frame::named(name)])));
        }
        let name = self.0.get(&address).copied().unwrap_or(UNKNOWN);
        let mut frame = Frame::named(name);
        frame.file = Some("app.c".into());
        frame.line = address as u32 & 0xff;
        if name == "leaf" {
            // leaf is inlined into `inlined_into` at the same address.
            let mut outer = Frame::named("inlined_into");
            outer.line = 7;
            return Some(Found::Frames(Arc::new([frame, outer])));
        }
        Some(Found::Frames(Arc::new([frame])))
    }
    fn read_file(&mut self, _: &ProcessInfo, m: &Mapping, offset: u64, buf: &mut [u8]) -> bool {
        let address = syscall_at(m, offset, buf);
        self.1.contains(&address)
    }
    fn build_id(&mut self, _: &ProcessInfo, _: &Mapping) -> Option<String> {
        Some("abcd".into())
    }
}

fn recording() -> Recording {
    let process = ProcessInfo {
        pid: 42,
        comm: "app".into(),
        container_id: Some("c0ffee".into()),
        mappings: vec![Mapping {
            start: 0x1000,
            end: 0x9000,
            offset: 0,
            path: "/usr/bin/app".into(),
            kind: MappingKind::Anonymous,
        }],
        ..ProcessInfo::default()
    };
    let mut rec = Recording {
        start: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(100)),
        duration: Duration::from_secs(2),
        ..Recording::default()
    };
    rec.processes.insert(42, process);
    rec.samples = vec![
        RawSample {
            pid: 42,
            comm: "app".into(),
            // leaf first; the caller's return address 0x2001 resolves via 0x2000
            user: Stack::Frames(vec![0x1500, 0x2001]),
            kernel: Stack::NotCollected,
            python: Vec::new(),
            count: 3,
        },
        RawSample {
            pid: 42,
            comm: "worker".into(),
            user: Stack::Frames(vec![0x1500, 0x2001]),
            kernel: Stack::Frames(vec![0xffff_ffff_8100_0000]),
            python: Vec::new(),
            count: 2,
        },
        RawSample {
            pid: 42,
            comm: "app".into(),
            user: Stack::Lost,
            kernel: Stack::NotCollected,
            python: Vec::new(),
            count: 1,
        },
    ];
    rec
}

fn symbolizer() -> TableSymbolizer {
    TableSymbolizer(
        HashMap::from([
            (0x1500, "leaf"),
            (0x14ff, "syscall_wrapper"),
            (0x2000, "caller"),
            (0xffff_ffff_8100_0000, "do_syscall_64"),
        ]),
        Vec::new(),
    )
}

#[test]
fn user_pc_under_kernel_frames_is_a_return_address_only_after_a_syscall() {
    // Interrupted: the saved pc is the instruction itself.
    let built = build(&recording(), &mut symbolizer(), &BuildOptions::record(100));
    let p = &built.profile;
    let second: Vec<&str> = p.sample[1]
        .location_id
        .iter()
        .flat_map(|&l| names_of(p, l))
        .collect();
    assert_eq!(second[1], "leaf");
    // After a syscall: the instruction before it.
    let mut s = symbolizer();
    s.1.push(0x1500);
    let built = build(&recording(), &mut s, &BuildOptions::record(100));
    let p = &built.profile;
    let second: Vec<&str> = p.sample[1]
        .location_id
        .iter()
        .flat_map(|&l| names_of(p, l))
        .collect();
    assert_eq!(second[1], "syscall_wrapper");
    // And the sample that sampled 0x1500 itself still names it `leaf`: two locations.
    let first = names_of(p, p.sample[0].location_id[0]);
    assert_eq!(first[0], "leaf");
    let addresses: Vec<u64> = p.location.iter().map(|l| l.address).collect();
    assert!(addresses.contains(&0x1500) && addresses.contains(&0x14ff));
    // Callers are stored as the call instruction: 0x2001 - 1.
    assert!(addresses.contains(&0x2000) && !addresses.contains(&0x2001));
}

fn names_of(p: &pprof::Profile, location_id: u64) -> Vec<&str> {
    let loc = &p.location[location_id as usize - 1];
    loc.line
        .iter()
        .map(|l| &*p.string_table[p.function[l.function_id as usize - 1].name as usize])
        .collect()
}

#[test]
fn values_periods_and_types() {
    let built = build(&recording(), &mut symbolizer(), &BuildOptions::record(100));
    let p = &built.profile;
    assert_eq!(p.period, 10_000_000);
    let st: Vec<(&str, &str)> = p
        .sample_type
        .iter()
        .map(|t| {
            (
                &*p.string_table[t.r#type as usize],
                &*p.string_table[t.unit as usize],
            )
        })
        .collect();
    assert_eq!(st, [("samples", "count"), ("cpu", "nanoseconds")]);
    assert_eq!(p.sample[0].value, vec![3, 30_000_000]);
    assert_eq!(p.time_nanos, 100_000_000_000);
    assert_eq!(p.duration_nanos, 2_000_000_000);
    assert_eq!(built.total_samples, 6);
    assert_eq!(p.string_table[0], "");
}

#[test]
fn stacks_are_leaf_first_kernel_before_user() {
    let built = build(&recording(), &mut symbolizer(), &BuildOptions::record(100));
    let p = &built.profile;
    let names = |i: usize| -> Vec<&str> {
        p.sample[i]
            .location_id
            .iter()
            .flat_map(|&l| names_of(p, l))
            .collect()
    };
    assert_eq!(names(0), ["leaf", "inlined_into", "caller"]);
    assert_eq!(
        names(1),
        ["do_syscall_64", "leaf", "inlined_into", "caller"]
    );
    assert_eq!(names(2), [LOST_USER_STACK]);
}

#[test]
fn one_location_per_address_and_real_mappings() {
    let built = build(&recording(), &mut symbolizer(), &BuildOptions::record(100));
    let p = &built.profile;
    // 0x1500, 0x2001, the kernel address, the lost-stack marker.
    assert_eq!(p.location.len(), 4);
    let user_mapping = &p.mapping[0];
    assert_eq!(
        p.string_table[user_mapping.filename as usize],
        "/usr/bin/app"
    );
    assert_eq!(
        (user_mapping.memory_start, user_mapping.memory_limit),
        (0x1000, 0x9000)
    );
    let kernel = p
        .mapping
        .iter()
        .find(|m| p.string_table[m.filename as usize] == KERNEL_MAPPING);
    assert!(kernel.is_some());
    for loc in &p.location[..3] {
        assert_ne!(loc.mapping_id, 0);
    }
}

#[test]
fn labels_and_top() {
    let built = build(&recording(), &mut symbolizer(), &BuildOptions::record(100));
    let p = &built.profile;
    let label = |s: &pprof::Sample, key: &str| {
        s.label
            .iter()
            .find(|l| p.string_table[l.key as usize] == key)
            .copied()
            .unwrap()
    };
    assert_eq!(label(&p.sample[0], "pid").num, 42);
    assert_eq!(
        p.string_table[label(&p.sample[0], "container_id").str as usize],
        "c0ffee"
    );
    assert_eq!(
        p.string_table[label(&p.sample[1], "comm").str as usize],
        "worker"
    );
    assert_eq!(built.top_self[0], ("leaf".to_owned(), 3));
    assert!(built.top_self.contains(&("do_syscall_64".to_owned(), 2)));
}

#[test]
fn gzip_round_trip() {
    use std::io::Read as _;
    let built = build(&recording(), &mut symbolizer(), &BuildOptions::record(97));
    let gz = built.encode_gzip().unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    let decoded = pprof::Profile::decode(&raw[..]).unwrap();
    assert_eq!(decoded, built.profile);
}

#[test]
fn every_location_has_a_mapping_and_comm_can_be_the_root_frame() {
    let mut rec = recording();
    // An address outside every mapping of the process.
    rec.samples[0].user = Stack::Frames(vec![0x9999_0000, 0x2001]);
    let options = BuildOptions {
        comm: CommMode::Both,
        pid_label: false,
        ..BuildOptions::record(100)
    };
    let built = build(&rec, &mut symbolizer(), &options);
    let p = &built.profile;
    let mapping_ids: Vec<u64> = p.mapping.iter().map(|m| m.id).collect();
    for location in &p.location {
        assert!(
            mapping_ids.contains(&location.mapping_id),
            "location {} has mapping {}",
            location.id,
            location.mapping_id
        );
    }
    for sample in &p.sample {
        let root = *sample.location_id.last().unwrap();
        let comm = p.sample[0]
            .label
            .iter()
            .find(|l| p.string_table[l.key as usize] == "comm");
        assert!(comm.is_some(), "comm label kept with `both`");
        assert!(
            ["app", "worker"].contains(&names_of(p, root)[0]),
            "root frame is the comm"
        );
        assert!(
            !sample
                .label
                .iter()
                .any(|l| p.string_table[l.key as usize] == "pid"),
            "no pid label unless asked"
        );
    }
}

/// Answers `shared` for every address below 0x3000 (one function's strings, as the real
/// symbolizer hands them out) and a fresh copy of the same text above it.
#[derive(Clone)]
struct SharingSymbolizer {
    shared: Frame,
}

impl FrameSource for SharingSymbolizer {
    fn name(&self) -> &'static str {
        "sharing"
    }
    fn serves(&self, class: MappingClass) -> bool {
        class != MappingClass::Kernel
    }
    fn kind(&self) -> FrameKind {
        FrameKind::Native
    }
    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        let address = site.address;
        let mut frame = if address < 0x3000 {
            self.shared.clone()
        } else {
            Frame {
                name: (*self.shared.name).into(),
                system_name: (*self.shared.system_name).into(),
                file: self.shared.file.as_deref().map(Into::into),
                line: 0,
            }
        };
        frame.line = address as u32;
        Some(Found::Frames(Arc::new([frame])))
    }
}

#[test]
fn one_function_per_text_whether_or_not_the_symbolizer_shares_strings() {
    let mut rec = recording();
    rec.samples = [0x1500u64, 0x2500, 0x4500, 0x5500]
        .iter()
        .map(|&leaf| RawSample {
            pid: 42,
            comm: "app".into(),
            user: Stack::Frames(vec![leaf]),
            kernel: Stack::NotCollected,
            python: Vec::new(),
            count: 1,
        })
        .collect();
    let mut symbolizer = SharingSymbolizer {
        shared: Frame {
            name: "work".into(),
            system_name: "_Z4workv".into(),
            file: Some("work.c".into()),
            line: 0,
        },
    };
    let p = build(&rec, &mut symbolizer, &BuildOptions::record(100)).profile;
    assert_eq!(p.location.len(), 4);
    assert_eq!(p.function.len(), 1, "{:?}", p.function);
    let lines: Vec<i64> = p.location.iter().map(|l| l.line[0].line).collect();
    assert_eq!(lines, [0x1500, 0x2500, 0x4500, 0x5500]);
}

#[test]
fn hostile_names_stay_one_frame_in_folded_stacks() {
    let mut rec = recording();
    rec.samples.truncate(1);
    rec.samples[0].comm = "a;b\nc".into();
    let mut s = symbolizer();
    // The leaf's caller: a `;`, a newline and a count-like tail in one name.
    s.0.insert(0x2000, "x;y\nz 100");
    let options = BuildOptions {
        comm: CommMode::Stackframe,
        ..BuildOptions::record(100)
    };
    let built = build(&rec, &mut s, &options);
    let folded = folded(&built.profile);
    assert_eq!(folded.len(), 1, "{folded:?}");
    let (stack, count) = &folded[0];
    assert_eq!(*count, 3);
    assert!(!stack.contains('\n') && !stack.contains(' '), "{stack}");
    let frames: Vec<&str> = stack.split(';').collect();
    // comm (root), caller, then the inlined caller before its callee.
    assert_eq!(
        frames,
        ["a\\x3bb\\nc", "x\\x3by\\nz\\x20100", "inlined_into", "leaf"],
        "{stack}"
    );
}

#[test]
fn folded_frame_escapes_only_what_changes_the_line() {
    for plain in [
        "main",
        "std::vector<int, std::allocator<int> >::push_back",
        "λ",
        "",
    ] {
        assert!(
            matches!(folded_frame(plain), std::borrow::Cow::Borrowed(_)),
            "{plain}"
        );
    }
    assert_eq!(folded_frame("a;b\nc"), "a\\x3bb\\nc");
    assert_eq!(
        folded_frame("tab\there\r\u{7f}\u{85}"),
        "tab\\there\\r\\u{7f}\\u{85}"
    );
    assert_eq!(folded_frame("f 12.5"), "f\\x2012.5");
    assert_eq!(folded_frame("f "), "f\\x20");
    assert_eq!(folded_frame("f 1 x"), "f 1 x");
    assert_eq!(folded_frame("\u{fffe}"), "\\u{fffe}");
}
