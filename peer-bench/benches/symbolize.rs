//! Symbolization speed and memory, ours against blazesym, on the same address sets.
//!
//! Address sets: for each binary in `SYMBOLIZE_BENCH_BINARIES` (colon-separated; `cargo xtask
//! bench symbolize` passes the agent's own debug build, a C fixture built with -O2 -g and
//! libc with its debug file), up to `SYMBOLIZE_BENCH_ADDRESSES` (default 2000) function
//! addresses spread evenly over its text symbols, each at the middle of its function.
//!
//! `cold`: a new symbolizer per pass (files opened and parsed); `warm`: one symbolizer reused.
//! With `SYMBOLIZE_BENCH_RSS=ours|blazesym` the binary instead runs one cold pass and prints
//! its peak RSS, so each side's memory is measured in a fresh process.

use std::{fs::File, hint::black_box, path::PathBuf, time::Duration};

use blazesym::symbolize::{Input, Symbolized, Symbolizer, source::Elf, source::Source};
use criterion::{Criterion, Throughput};
use object::{Object as _, ObjectSymbol as _, SymbolKind};
use profiler_agent::symbolize::{Demangle, binary::Binary, debuginfo::RootedDebugFinder};

struct AddressSet {
    path: PathBuf,
    vaddrs: Vec<u64>,
}

fn address_sets() -> Vec<AddressSet> {
    let per_binary: usize = std::env::var("SYMBOLIZE_BENCH_ADDRESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let binaries = std::env::var("SYMBOLIZE_BENCH_BINARIES")
        .expect("SYMBOLIZE_BENCH_BINARIES: colon-separated ELF paths (see cargo xtask bench)");
    binaries
        .split(':')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let path = PathBuf::from(p);
            let file = File::open(&path).unwrap_or_else(|e| panic!("{p}: {e}"));
            // Mapped, not read: only the symbol table's pages count toward the baseline RSS.
            // SAFETY: read-only mapping of a file nobody writes during the benchmark.
            let data = unsafe { memmap2::Mmap::map(&file) }.expect("map");
            let object = object::File::parse(&*data).expect("ELF");
            let mut functions: Vec<(u64, u64)> = object
                .symbols()
                .chain(object.dynamic_symbols())
                .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0 && s.size() > 1)
                .map(|s| (s.address(), s.size()))
                .collect();
            functions.sort_unstable();
            functions.dedup_by_key(|f| f.0);
            let step = (functions.len() / per_binary).max(1);
            let vaddrs = functions
                .iter()
                .step_by(step)
                .take(per_binary)
                .map(|(a, s)| a + s / 2)
                .collect();
            AddressSet { path, vaddrs }
        })
        .collect()
}

/// Outermost function name at each address, or None.
fn ours(sets: &[AddressSet], binaries: &mut Vec<Option<Binary>>) -> Vec<Option<String>> {
    if binaries.is_empty() {
        for set in sets {
            let file = File::open(&set.path).expect("open");
            let mut finder = RootedDebugFinder::new("/", &set.path);
            binaries.push(Binary::load(&file, &mut finder).ok());
        }
    }
    let mut names = Vec::new();
    for (set, binary) in sets.iter().zip(binaries.iter()) {
        for &vaddr in &set.vaddrs {
            let frames = binary.as_ref().map(|b| b.frames(vaddr));
            let outer = frames.as_ref().and_then(|f| f.last());
            names.push(outer.map(|f| Demangle::Full.apply(&f.system_name)));
        }
    }
    names
}

fn blazesym_names(sets: &[AddressSet], symbolizer: &Symbolizer) -> Vec<Option<String>> {
    let mut names = Vec::new();
    for set in sets {
        let source = Source::Elf(Elf::new(&set.path));
        let symbolized = symbolizer
            .symbolize(&source, Input::VirtOffset(&set.vaddrs))
            .expect("blazesym");
        names.extend(symbolized.into_iter().map(|s| match s {
            Symbolized::Sym(sym) => Some(sym.name.into_owned()),
            _ => None,
        }));
    }
    names
}

fn new_blazesym() -> Symbolizer {
    Symbolizer::builder()
        .enable_inlined_fns(true)
        .enable_code_info(true)
        .build()
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let sets = address_sets();
    let total: usize = sets.iter().map(|s| s.vaddrs.len()).sum();

    if let Ok(side) = std::env::var("SYMBOLIZE_BENCH_RSS") {
        let before = peak_rss_kib();
        let named = match side.as_str() {
            "ours" => ours(&sets, &mut Vec::new()),
            "blazesym" => blazesym_names(&sets, &new_blazesym()),
            other => panic!("SYMBOLIZE_BENCH_RSS={other}: ours or blazesym"),
        };
        let known = named.iter().filter(|n| n.is_some()).count();
        println!(
            "rss {side} peak_kib={} baseline_kib={before} addresses={total} named={known}",
            peak_rss_kib()
        );
        return;
    }

    // Name agreement, on the same addresses.
    let a = ours(&sets, &mut Vec::new());
    let b = blazesym_names(&sets, &new_blazesym());
    let both = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.is_some() && y.is_some())
        .count();
    let same = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.is_some() && x == y)
        .count();
    println!(
        "agreement addresses={total} ours_named={} blazesym_named={} both_named={both} same_name={same}",
        a.iter().filter(|n| n.is_some()).count(),
        b.iter().filter(|n| n.is_some()).count(),
    );
    for (i, (x, y)) in a
        .iter()
        .zip(&b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .take(5)
    {
        println!("differs #{i}: ours={x:?} blazesym={y:?}");
    }

    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let mut group = c.benchmark_group("symbolize");
    group.throughput(Throughput::Elements(total as u64));
    group.bench_function("ours/cold", |bench| {
        bench.iter(|| black_box(ours(&sets, &mut Vec::new())))
    });
    group.bench_function("blazesym/cold", |bench| {
        bench.iter(|| black_box(blazesym_names(&sets, &new_blazesym())))
    });
    let mut warm = Vec::new();
    ours(&sets, &mut warm);
    group.bench_function("ours/warm", |bench| {
        bench.iter(|| black_box(ours(&sets, &mut warm)))
    });
    let warm_blazesym = new_blazesym();
    blazesym_names(&sets, &warm_blazesym);
    group.bench_function("blazesym/warm", |bench| {
        bench.iter(|| black_box(blazesym_names(&sets, &warm_blazesym)))
    });
    group.finish();
    c.final_summary();
}
