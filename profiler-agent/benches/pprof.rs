//! Building and encoding one pprof profile of 10 000 distinct stacks x 30 frames (issue 5).
//!
//! The stacks are user stacks of one process, shaped like a real program's call tree: every
//! stack starts at the same root, stacks share longer prefixes the closer they are, and the
//! last frames are nearly unique. Frames come from 20 000 call sites in 2000 functions (`fn_<n>`
//! with a file and line; every fourth call site has an inlined callee), named by a frame
//! source double that answers from a precomputed table, as the real ones do from their warm
//! caches.
//!
//! Criterion measures `pprof/build` (the frames stage, [`frames::resolve`], then
//! [`profile::build`]), `pprof/encode` (protobuf only),
//! `pprof/encode_gzip` ([`BuiltProfile::encode_gzip`], what the agent sends) and
//! `pprof/total` (build + encode_gzip). Before that, one line `pprof-figures key=value ...` on
//! stderr gives allocations and bytes per profile (a counting global allocator, on only for
//! that pass), the profile's sizes, and the gzip size and time at levels 1, 3 and 6, which
//! `cargo xtask bench pprof` relays into BENCHMARKS.md.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::{HashMap, HashSet},
    hint::black_box,
    io::Write as _,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant, SystemTime},
};

use criterion::{Criterion, Throughput};
use flate2::{Compression, write::GzEncoder};
use profiler_agent::{
    frames::{self, Found, FrameKind, FrameSource, MappingClass, Site, Sources},
    process::{Mapping, MappingKind, ProcessInfo},
    profile::{self, BuildOptions, BuiltProfile, GZIP_LEVEL},
    sampler::{RawSample, Stack},
    symbolize::{Frame, Frames},
};
use prost::Message as _;

const STACKS: usize = 10_000;
const DEPTH: usize = 30;
const CALL_SITES: u64 = 20_000;
const FUNCTIONS: u64 = 2_000;
const BASE: u64 = 0x55_0000_0000;
/// Bytes of code per call site.
const SITE: u64 = 16;
const PID: u32 = 4242;

/// Counts allocations while [`COUNTING`] is on; a plain pass-through otherwise, so that
/// criterion's timings pay one relaxed load per allocation and nothing else.
struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn count(grow: u64, shrink: u64) {
    if COUNTING.load(Relaxed) {
        ALLOCATIONS.fetch_add(1, Relaxed);
        ALLOCATED_BYTES.fetch_add(grow, Relaxed);
        let live = LIVE.fetch_add(grow, Relaxed) + grow;
        PEAK.fetch_max(live, Relaxed);
        LIVE.fetch_sub(shrink, Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as u64, 0);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as u64, 0);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A realloc is one more allocation of the new size, then the old one freed.
        count(new_size as u64, layout.size() as u64);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Relaxed) {
            LIVE.fetch_sub(layout.size() as u64, Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Allocator calls and bytes during `f`, and the peak of bytes live beyond those at the start.
/// Frees of memory allocated before `f` make `LIVE` wrap, so it starts from a high base.
fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64, u64, u64) {
    const BASE_LIVE: u64 = 1 << 62;
    ALLOCATIONS.store(0, Relaxed);
    ALLOCATED_BYTES.store(0, Relaxed);
    LIVE.store(BASE_LIVE, Relaxed);
    PEAK.store(BASE_LIVE, Relaxed);
    COUNTING.store(true, Relaxed);
    let out = f();
    COUNTING.store(false, Relaxed);
    (
        out,
        ALLOCATIONS.load(Relaxed),
        ALLOCATED_BYTES.load(Relaxed),
        PEAK.load(Relaxed) - BASE_LIVE,
    )
}

/// splitmix64: a deterministic hash, so every run builds the same stacks.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Names call sites from a table built once: site `k` is in function `k / 10`; every fourth
/// site has an inlined callee first. Like the real symbolizer's warm caches, it answers with
/// shared frames, and every call site of a function shares the function's strings.
struct TableSymbolizer {
    sites: Vec<Frames>,
}

impl TableSymbolizer {
    fn new() -> Self {
        let functions: Vec<Frame> = (0..FUNCTIONS)
            .map(|n| Frame {
                name: format!("fn_{n}").into(),
                system_name: format!("_ZN5bench4fn_{n}17h{:016x}E", mix(n)).into(),
                file: Some(format!("src/module_{}.rs", n / 20).into()),
                line: 0,
            })
            .collect();
        let function = |n: u64, line: u64| Frame {
            line: line as u32,
            ..functions[n as usize].clone()
        };
        let sites = (0..CALL_SITES)
            .map(|k| {
                let caller = k * FUNCTIONS / CALL_SITES;
                let mut frames = Vec::new();
                if k % 4 == 0 {
                    frames.push(function(mix(k) % FUNCTIONS, 10 + k % 7));
                }
                frames.push(function(caller, 100 + k % 10 * 3));
                frames.into()
            })
            .collect();
        Self { sites }
    }
}

impl FrameSource for TableSymbolizer {
    fn name(&self) -> &'static str {
        "table"
    }
    fn serves(&self, class: MappingClass) -> bool {
        class == MappingClass::Anonymous
    }
    fn kind(&self) -> FrameKind {
        FrameKind::Native
    }
    fn frames(&mut self, at: &Site<'_>) -> Option<Found> {
        let site = (at.address - BASE) / SITE;
        Some(Found::Frames(self.sites[site as usize].clone()))
    }
    fn build_id(&mut self, _: &ProcessInfo, _: &Mapping) -> Option<String> {
        Some("4f2a0c1d9e8b7a6f5e4d3c2b1a09f8e7d6c5b4a3".into())
    }
}

fn process() -> ProcessInfo {
    ProcessInfo {
        pid: PID,
        comm: "bench".into(),
        container_id: Some("3f5a9c".into()),
        mappings: vec![Mapping {
            start: BASE,
            end: BASE + CALL_SITES * SITE,
            offset: 0,
            path: "/usr/bin/bench".into(),
            kind: MappingKind::Anonymous,
        }],
        ..ProcessInfo::default()
    }
}

/// 10 000 distinct stacks, leaf first. Frame `j` from the root depends on the stack index
/// with its low `13 - j / 2` bits dropped: one root, branching the deeper the stack goes.
fn samples() -> Vec<RawSample> {
    let samples: Vec<RawSample> = (0..STACKS as u64)
        .map(|i| {
            let mut frames: Vec<u64> = (0..DEPTH as u64)
                .map(|j| {
                    let shift = 13u64.saturating_sub(j / 2);
                    let site = mix((i >> shift) << 8 | j) % CALL_SITES;
                    // The leaf is the sampled pc; callers are return addresses.
                    BASE + site * SITE + if j + 1 == DEPTH as u64 { 4 } else { 8 }
                })
                .collect();
            frames.reverse();
            RawSample {
                pid: PID,
                comm: format!("worker-{}", i % 8),
                user: Stack::Frames(frames),
                kernel: Stack::NotCollected,
                python: Vec::new(),
                count: 1 + mix(i) % 20,
            }
        })
        .collect();
    let distinct: HashSet<&Stack> = samples.iter().map(|s| &s.user).collect();
    assert_eq!(distinct.len(), STACKS, "stacks must be distinct");
    samples
}

struct Input {
    samples: Vec<RawSample>,
    processes: HashMap<u32, ProcessInfo>,
    sources: Sources,
    options: BuildOptions,
}

impl Input {
    fn build(&mut self) -> BuiltProfile {
        let refs: Vec<&RawSample> = self.samples.iter().collect();
        let stacks = frames::resolve(&mut self.sources, &refs, &self.processes);
        profile::build(
            &stacks,
            Some(SystemTime::now()),
            Duration::from_secs(15),
            &self.options,
        )
    }
}

fn gzip(raw: &[u8], level: u32) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::new(level));
    encoder.write_all(raw).expect("in memory");
    encoder.finish().expect("in memory")
}

/// The fastest of a few runs of `f`, in ms.
fn best_ms(mut f: impl FnMut()) -> f64 {
    (0..7)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

fn figures(input: &mut Input) -> BuiltProfile {
    input.build(); // warm-up: the first pass pays for page faults
    let (built, build_allocs, build_bytes, build_peak) = allocations(|| input.build());
    let (gz, encode_allocs, encode_bytes, encode_peak) =
        allocations(|| built.encode_gzip().expect("in memory"));
    let raw = built.profile.encode_to_vec();
    let p = &built.profile;
    let mut line = format!(
        "pprof-figures samples={} frames={} locations={} functions={} strings={} \
         build_allocations={build_allocs} build_bytes={build_bytes} build_peak_bytes={build_peak} \
         encode_allocations={encode_allocs} encode_bytes={encode_bytes} \
         encode_peak_bytes={encode_peak} raw_bytes={} gzip_level={GZIP_LEVEL} gzip_bytes={}",
        p.sample.len(),
        p.sample.iter().map(|s| s.location_id.len()).sum::<usize>(),
        p.location.len(),
        p.function.len(),
        p.string_table.len(),
        raw.len(),
        gz.len(),
    );
    for level in [1, 3, 6] {
        let size = gzip(&raw, level).len();
        let ms = best_ms(|| {
            black_box(gzip(&raw, level));
        });
        line.push_str(&format!(" gzip{level}_bytes={size} gzip{level}_ms={ms:.3}"));
    }
    eprintln!("{line}");
    built
}

fn main() {
    let mut input = Input {
        samples: samples(),
        processes: HashMap::from([(PID, process())]),
        sources: Sources::new(vec![Box::new(TableSymbolizer::new())]),
        options: BuildOptions::record(97),
    };
    let built = figures(&mut input);

    let mut c = Criterion::default()
        .sample_size(50)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(2))
        .configure_from_args();
    let mut group = c.benchmark_group("pprof");
    group.throughput(Throughput::Elements(STACKS as u64));
    group.bench_function("build", |b| b.iter(|| black_box(input.build())));
    group.bench_function("encode", |b| {
        b.iter(|| black_box(built.profile.encode_to_vec()))
    });
    group.bench_function("encode_gzip", |b| {
        b.iter(|| black_box(built.encode_gzip().expect("in memory")))
    });
    group.bench_function("total", |b| {
        b.iter(|| black_box(input.build().encode_gzip().expect("in memory")))
    });
    group.finish();
    c.final_summary();
}
