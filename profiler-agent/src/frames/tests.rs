//! The frames stage with test-double sources (return-address adjustment, interning, source
//! order, fallbacks), and the registered native sources on this test process.

use std::{collections::HashMap, sync::Arc};

use super::{sources, *};
use crate::{
    process::{MappingKind, ProcessInfo, ProcessSource as _, ProcfsProcesses},
    sampler::Stack,
    symbolize::{CacheConfig, DEFAULT_SYMBOL_MEMORY_LIMIT, Demangle, budget},
};

/// Names every address of its class `<name>@<address hex>`; counts the calls.
struct Table {
    name: &'static str,
    class: MappingClass,
    kind: FrameKind,
    /// Answers only addresses below this.
    below: u64,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl FrameSource for Table {
    fn name(&self) -> &'static str {
        self.name
    }
    fn serves(&self, class: MappingClass) -> bool {
        class == self.class
    }
    fn kind(&self) -> FrameKind {
        self.kind
    }
    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (site.address < self.below).then(|| {
            Found::Frames(Arc::new([Frame::named(format!(
                "{}@{:x}",
                self.name, site.address
            ))]))
        })
    }
}

fn table(name: &'static str, class: MappingClass, kind: FrameKind, below: u64) -> Box<Table> {
    Box::new(Table {
        name,
        class,
        kind,
        below,
        calls: Arc::default(),
    })
}

fn process(pid: u32) -> ProcessInfo {
    ProcessInfo {
        pid,
        comm: "p".into(),
        mappings: vec![
            Mapping {
                start: 0x1000,
                end: 0x9000,
                offset: 0,
                path: "/bin/p".into(),
                kind: MappingKind::File {
                    id: crate::process::FileId {
                        dev_major: 1,
                        dev_minor: 1,
                        inode: 7,
                    },
                    file: None,
                },
            },
            Mapping {
                start: 0x10000,
                end: 0x20000,
                offset: 0,
                path: "[anon]".into(),
                kind: MappingKind::Anonymous,
            },
        ],
        ..ProcessInfo::default()
    }
}

fn raw(pid: u32, user: Vec<u64>, kernel: Stack) -> RawSample {
    RawSample {
        pid,
        comm: "p".into(),
        user: Stack::Frames(user),
        kernel,
        python: Vec::new(),
        count: 1,
    }
}

fn names(stacks: &Stacks<'_>, sample: usize) -> Vec<String> {
    stacks
        .stack(&stacks.samples[sample])
        .iter()
        .map(|&i| stacks.location(i).frames[0].name.to_string())
        .collect()
}

#[test]
fn callers_name_the_call_and_leaves_the_pc() {
    let mut sources = Sources::new(vec![table(
        "elf",
        MappingClass::File,
        FrameKind::Native,
        u64::MAX,
    )]);
    let samples = [raw(1, vec![0x1100, 0x1200, 0x1300], Stack::NotCollected)];
    let processes = HashMap::from([(1, process(1))]);
    let refs: Vec<&RawSample> = samples.iter().collect();
    let stacks = resolve(&mut sources, &refs, &processes);
    assert_eq!(names(&stacks, 0), ["elf@1100", "elf@11ff", "elf@12ff"]);
    let addresses: Vec<u64> = stacks
        .stack(&stacks.samples[0])
        .iter()
        .map(|&i| stacks.location(i).address)
        .collect();
    assert_eq!(addresses, [0x1100, 0x11ff, 0x12ff]);
    assert!(
        stacks
            .stack(&stacks.samples[0])
            .iter()
            .all(|&i| stacks.location(i).kind == FrameKind::Native)
    );
}

#[test]
fn sources_are_asked_by_class_in_order_with_fallbacks() {
    let first = table("first", MappingClass::File, FrameKind::Native, 0x1800);
    let calls = first.calls.clone();
    let mut sources = Sources::new(vec![
        first,
        table("second", MappingClass::File, FrameKind::Native, u64::MAX),
        table("jit", MappingClass::Anonymous, FrameKind::Jit, 0x11000),
        table("kernel", MappingClass::Kernel, FrameKind::Kernel, u64::MAX),
    ]);
    assert_eq!(sources.names(), ["first", "second", "jit", "kernel"]);
    let samples = [raw(
        1,
        // leaf in first's range, a caller only second names, JIT named and not, unmapped.
        vec![0x1100, 0x2001, 0x10001, 0x18001, 0x50001],
        Stack::Frames(vec![0xffff_ffff_8100_0000]),
    )];
    let processes = HashMap::from([(1, process(1))]);
    let refs: Vec<&RawSample> = samples.iter().collect();
    let stacks = resolve(&mut sources, &refs, &processes);
    assert_eq!(
        names(&stacks, 0),
        [
            "kernel@ffffffff81000000",
            // The first user frame under a kernel stack is not after a syscall instruction
            // (no source reads the file): the interrupted instruction itself.
            "first@1100",
            "second@2000",
            "jit@10000",
            "[anon]",
            UNKNOWN
        ]
    );
    let kinds: Vec<FrameKind> = stacks
        .stack(&stacks.samples[0])
        .iter()
        .map(|&i| stacks.location(i).kind)
        .collect();
    use FrameKind::*;
    assert_eq!(kinds, [Kernel, Native, Native, Jit, Jit, Native]);
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2);
    let stats = sources.stats();
    assert_eq!((stats.known_frames, stats.unknown_frames), (4, 2));
    // The kernel mapping, the file, the anonymous region; none for the unmapped address.
    let paths: Vec<&str> = stacks.mappings.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(paths, [KERNEL_MAPPING, "/bin/p", "[anon]"]);
    assert_eq!(
        stacks.location(stacks.stack(&stacks.samples[0])[5]).mapping,
        None
    );
}

#[test]
fn equal_locations_are_stored_once_across_samples_and_processes() {
    let elf = table("elf", MappingClass::File, FrameKind::Native, u64::MAX);
    let calls = elf.calls.clone();
    let mut sources = Sources::new(vec![elf]);
    let samples = [
        raw(1, vec![0x1100, 0x1200], Stack::NotCollected),
        raw(1, vec![0x1104, 0x1200], Stack::NotCollected),
        // Another process with the same file at the same address.
        raw(2, vec![0x1100, 0x1200], Stack::Lost),
    ];
    let processes = HashMap::from([(1, process(1)), (2, process(2))]);
    let refs: Vec<&RawSample> = samples.iter().collect();
    let stacks = resolve(&mut sources, &refs, &processes);
    let stack = |i: usize| stacks.stack(&stacks.samples[i]);
    assert_eq!(stack(0), &stack(2)[1..]);
    assert_eq!(
        stacks.stack(&stacks.samples[0])[1],
        stacks.stack(&stacks.samples[1])[1]
    );
    assert_eq!(names(&stacks, 2)[0], LOST_KERNEL_STACK);
    assert_eq!(
        stacks.location(stacks.stack(&stacks.samples[2])[0]).kind,
        FrameKind::Synthetic
    );
    // 0x1100, 0x11ff, 0x1104: three lookups for five frames of process 1 and two of 2.
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(stacks.locations.len(), 4);
    assert_eq!(stacks.mappings.len(), 1);
    assert_eq!(stacks.total_samples(), 3);
}

#[test]
fn a_process_without_a_snapshot_keeps_its_samples() {
    let mut sources = sources::user_only(Demangle::None);
    let samples = [RawSample {
        pid: u32::MAX - 1,
        comm: "gone".into(),
        user: Stack::Lost,
        kernel: Stack::NotCollected,
        python: Vec::new(),
        count: 5,
    }];
    let refs: Vec<&RawSample> = samples.iter().collect();
    let processes = HashMap::new();
    let stacks = resolve(&mut sources, &refs, &processes);
    assert_eq!(names(&stacks, 0), [LOST_USER_STACK]);
    assert_eq!(stacks.total_samples(), 5);
}

/// This test binary's DWARF (hundreds of MiB unoptimized) does not fit the default
/// budget: its functions keep their symbol names, without lines, within the limit.
#[test]
fn a_binary_over_the_default_budget_keeps_its_names() {
    let me = std::process::id();
    let info = ProcfsProcesses::default().snapshot(me, "test");
    let mut s = sources::user_only(Demangle::Simplified);
    let here = a_binary_over_the_default_budget_keeps_its_names as *const () as u64;
    let (kind, frames) = s.user_frames(&info, info.mapping_for(here), here);
    assert_eq!(kind, FrameKind::Native);
    assert!(
        frames[0]
            .name
            .ends_with("a_binary_over_the_default_budget_keeps_its_names"),
        "{frames:?}"
    );
    assert_eq!(frames[0].line, 0);
    let stats = s.stats();
    assert!(stats.symbols.degraded(budget::Degraded::Budget) >= 1);
    assert!(stats.symbols.used > 0);
    assert!(stats.symbols.used <= DEFAULT_SYMBOL_MEMORY_LIMIT);
}

#[test]
fn names_own_code_and_vdso() {
    let me = std::process::id();
    let info = ProcfsProcesses::default().snapshot(me, "test");
    let caches = CacheConfig {
        symbol_memory_limit: u64::MAX,
        ..CacheConfig::default()
    };
    let mut s = sources::native(Demangle::Simplified, None, caches, None);
    assert_eq!(s.names(), ["perf map", "vdso", "elf"]);
    let here = names_own_code_and_vdso as *const () as u64;
    let (_, frames) = s.user_frames(&info, info.mapping_for(here), here);
    assert!(
        frames
            .last()
            .unwrap()
            .name
            .ends_with("names_own_code_and_vdso"),
        "{frames:?}"
    );
    assert!(frames.last().unwrap().line > 0);
    let vdso = info
        .mappings
        .iter()
        .find(|m| matches!(m.kind, MappingKind::Vdso))
        .unwrap();
    // Any exported vdso function resolves to a real name.
    let some = (vdso.start..vdso.end)
        .step_by(16)
        .map(|a| s.user_frames(&info, Some(vdso), a).1)
        .find(|f| f[0].name.contains("clock_gettime") || f[0].name.contains("gettimeofday"));
    assert!(some.is_some(), "no vdso function named");
    assert!(s.build_id(&info, vdso).is_some_and(|id| !id.is_empty()));
    let stats = s.stats();
    assert!(stats.known_frames > 0);
    assert!(stats.same_file_cache.misses >= 1);
}

#[test]
fn unknown_and_anonymous_addresses_keep_a_name() {
    let info = ProcessInfo {
        pid: u32::MAX - 2,
        mappings: vec![Mapping {
            start: 0x1000,
            end: 0x2000,
            offset: 0,
            path: "[anon]".into(),
            kind: MappingKind::Anonymous,
        }],
        ..ProcessInfo::default()
    };
    let mut s = sources::user_only(Demangle::None);
    assert_eq!(&*s.user_frames(&info, None, 0x10).1[0].name, UNKNOWN);
    let anon = info.mapping_for(0x1010);
    assert_eq!(&*s.user_frames(&info, anon, 0x1010).1[0].name, "[anon]");
    assert_eq!(s.stats().unknown_frames, 2);
}

/// JIT code is shown in a mapping named after its runtime, and so is JIT code no perf map
/// names; the same anonymous range in a process of no known runtime stays `[anon]`.
#[test]
fn jit_code_is_in_a_mapping_named_after_its_runtime() {
    let mut jvm = process(u32::MAX - 5);
    jvm.mappings.insert(
        1,
        Mapping {
            start: 0x9000,
            end: 0xa000,
            offset: 0,
            path: "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so".into(),
            kind: MappingKind::File {
                id: crate::process::FileId {
                    dev_major: 1,
                    dev_minor: 1,
                    inode: 8,
                },
                file: None,
            },
        },
    );
    let other = process(u32::MAX - 6);
    let processes = HashMap::from([(jvm.pid, jvm), (other.pid, other)]);
    let samples = [
        raw(u32::MAX - 5, vec![0x10010], Stack::NotCollected),
        raw(u32::MAX - 6, vec![0x10010], Stack::NotCollected),
        raw(u32::MAX - 5, vec![0x10020], Stack::NotCollected),
    ];
    let refs: Vec<&RawSample> = samples.iter().collect();
    let mut s = sources::user_only(Demangle::None);
    let stacks = resolve(&mut s, &refs, &processes);
    assert_eq!(names(&stacks, 0), ["[jvm jit]"]);
    assert_eq!(names(&stacks, 1), ["[anon]"]);
    let mapping_of = |sample: usize| {
        let location = stacks.location(stacks.stack(&stacks.samples[sample])[0]);
        assert_eq!(location.kind, FrameKind::Jit);
        stacks.mappings[location.mapping.unwrap() as usize]
            .path
            .as_str()
    };
    assert_eq!(
        [mapping_of(0), mapping_of(1), mapping_of(2)],
        ["[jvm jit]", "[anon]", "[jvm jit]"]
    );
    // One mapping per name, however many of its addresses are sampled.
    assert_eq!(stacks.mappings.len(), 2);
}

/// Interpreter frames recorded as `code | entry bit`: names them `py<code hex>`, except code
/// 0xdead (unreadable); the interpreter loop is at 0x2000..0x3000.
struct Interpreter;

impl InterpretedSource for Interpreter {
    fn name(&self) -> &'static str {
        "interpreter"
    }
    fn runs_interpreter(&mut self, _: &ProcessInfo, address: u64) -> bool {
        (0x2000..0x3000).contains(&address)
    }
    fn is_entry(&self, raw: u64) -> bool {
        raw & (1 << 63) != 0
    }
    fn frame(&mut self, _: &ProcessInfo, raw: u64) -> Option<Frame> {
        let code = raw & !(1 << 63);
        (code != 0xdead).then(|| Frame {
            file: Some("x.py".into()),
            line: 7,
            ..Frame::named(format!("py{code:x}"))
        })
    }
    fn unnamed(&self) -> &'static str {
        "[py?]"
    }
}

#[test]
fn interpreter_runs_replace_their_loop_frames_in_order() {
    let entry = 1u64 << 63;
    let mut sources = Sources::new(vec![table(
        "elf",
        MappingClass::File,
        FrameKind::Native,
        u64::MAX,
    )])
    .with_interpreted(Box::new(Interpreter));
    let processes = HashMap::from([(1, process(1))]);
    // C leaf, loop (run of 2), C extension, loop (run of 1), main. Return addresses are
    // looked up one byte back: 0x2001 names 0x2000, inside the loop.
    let mut sample = raw(
        1,
        vec![0x1100, 0x2100, 0x1500, 0x2001, 0x1800],
        Stack::NotCollected,
    );
    sample.python = vec![0xa1, 0xa2 | entry, 0xb1 | entry];
    // No loop frame left for the third run: it goes on the outer end; unreadable code is
    // named by the source's placeholder.
    let mut short = raw(1, vec![0x1100, 0x2100], Stack::NotCollected);
    short.python = vec![0xa1 | entry, 0xdead | entry];
    let samples = [sample, short];
    let refs: Vec<&RawSample> = samples.iter().collect();
    let stacks = resolve(&mut sources, &refs, &processes);
    assert_eq!(
        names(&stacks, 0),
        ["elf@1100", "pya1", "pya2", "elf@14ff", "pyb1", "elf@17ff"]
    );
    assert_eq!(names(&stacks, 1), ["elf@1100", "pya1", "[py?]"]);
    let python = stacks.location(stacks.stack(&stacks.samples[0])[1]);
    assert_eq!(python.kind, FrameKind::Python);
    assert_eq!(python.frames[0].file.as_deref(), Some("x.py"));
    assert_eq!(python.frames[0].line, 7);
    let mapping = &stacks.mappings[python.mapping.unwrap() as usize];
    assert_eq!(mapping.path, PYTHON_MAPPING);
}
