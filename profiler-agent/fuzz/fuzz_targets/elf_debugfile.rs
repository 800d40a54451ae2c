//! `Binary::load_with` of a stripped binary whose finder hands back a separate debug file that
//! the input patched, under a small `SymbolBudget`: the path the agent takes for a distro
//! binary with its `.debug` file found by build id or `.gnu_debuglink`, which a process can
//! replace with anything. The binary is then asked for frames across `.text` (before and after
//! `release_memory`). Checked: no panic, the budget never holds more than its limit, it holds
//! exactly what the binary says it charged, and it is back to 0 once the binary drops.
//!
//! Main files (`bases/debugfile/*.stripped`) are `objcopy --strip-all --add-gnu-debuglink` of
//! the four DWARF bases; the debug file is the matching `--only-keep-debug` file
//! (`bases/debugfile/*.debug`, `.text` is `NOBITS`) or the full base (`bases/*.elf`).
//!
//! Input: byte 0: bits 0-1 pick the base, bit 2 the full base instead of the `.debug` file;
//! byte 1 picks the budget's limit, byte 2 its per-binary caps (symbols, decompressed
//! section, DWARF unit bytes); then 8-byte patch records `[offset u32 LE][op][a][b][c]` on
//! the debug file, as in `elf_dwarf_mutated`.
#![no_main]

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use libfuzzer_sys::fuzz_target;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
use profiler_agent::symbolize::{
    binary::{Binary, DebugFileFinder},
    budget::{Limits, SymbolBudget},
};

const BASES: [(&[u8], &[u8], &[u8]); 4] = [
    (
        include_bytes!("../bases/debugfile/c-dwarf5-O2.stripped"),
        include_bytes!("../bases/debugfile/c-dwarf5-O2.debug"),
        include_bytes!("../bases/c-dwarf5-O2.elf"),
    ),
    (
        include_bytes!("../bases/debugfile/c-dwarf4-Os.stripped"),
        include_bytes!("../bases/debugfile/c-dwarf4-Os.debug"),
        include_bytes!("../bases/c-dwarf4-Os.elf"),
    ),
    (
        include_bytes!("../bases/debugfile/c-dwarf-zlib.stripped"),
        include_bytes!("../bases/debugfile/c-dwarf-zlib.debug"),
        include_bytes!("../bases/c-dwarf-zlib.elf"),
    ),
    (
        include_bytes!("../bases/debugfile/c-dwarf-zstd.stripped"),
        include_bytes!("../bases/debugfile/c-dwarf-zstd.debug"),
        include_bytes!("../bases/c-dwarf-zstd.elf"),
    ),
];

/// Budget limits in bytes: none, a few KiB (the main file alone is 6.4 KiB), roomy.
const LIMITS: [u64; 8] = [
    0,
    4 << 10,
    8 << 10,
    12 << 10,
    16 << 10,
    24 << 10,
    64 << 10,
    16 << 20,
];
const MAX_SYMBOLS: [usize; 4] = [0, 2, 16, 1 << 19];
const MAX_DECOMPRESSED: [usize; 4] = [0, 64, 1024, 256 << 20];
const MAX_UNIT_BYTES: [usize; 4] = [0, 256, 4096, 16 << 20];

const EDGES: [u32; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fff0,
    0xffff_ffff,
    0x00ff_ffff,
];

/// Per base: its function addresses (entry, middle, last byte) and a sweep of .text.
fn addresses() -> &'static Vec<Vec<u64>> {
    static ADDRESSES: OnceLock<Vec<Vec<u64>>> = OnceLock::new();
    ADDRESSES.get_or_init(|| {
        BASES
            .iter()
            .map(|(_, _, full)| {
                let file = object::File::parse(*full).expect("bases are valid ELF");
                let mut out = Vec::new();
                for s in file.symbols() {
                    if s.kind() == SymbolKind::Text && s.address() != 0 {
                        out.extend([
                            s.address(),
                            s.address() + s.size() / 2,
                            s.address() + s.size().saturating_sub(1),
                        ]);
                    }
                }
                if let Some(text) = file.section_by_name(".text") {
                    out.extend((text.address()..text.address() + text.size()).step_by(16));
                }
                out.sort_unstable();
                out.dedup();
                out.truncate(256);
                out
            })
            .collect()
    })
}

/// A per-process scratch directory for the files handed to the agent.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        sweep(&base, "elf_debugfile-");
        let dir = base.join(format!("elf_debugfile-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// Removes the scratch directories of earlier runs of this target whose process is gone
/// (libFuzzer exits without unwinding, so a run cannot remove its own).
fn sweep(base: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A fresh file holding `bytes`, opened for reading (its name is gone once opened).
fn file_of(name: &str, bytes: &[u8]) -> File {
    let path = scratch().join(name);
    let _ = fs::remove_file(&path);
    let mut out = File::create_new(&path).expect("scratch file");
    out.write_all(bytes).expect("scratch write");
    let file = File::open(&path).expect("scratch reopen");
    fs::remove_file(&path).expect("scratch unlink");
    file
}

/// Hands back the patched debug file once, as a finder inside the process's root would.
struct Finder {
    debug: Option<Vec<u8>>,
    expected_build_id: Option<Vec<u8>>,
    asked: bool,
}

impl DebugFileFinder for Finder {
    fn find(&mut self, build_id: Option<&[u8]>, debuglink: Option<&str>) -> Option<File> {
        assert!(!self.asked, "the finder is asked once per load");
        self.asked = true;
        assert_eq!(build_id, self.expected_build_id.as_deref());
        assert!(
            debuglink.is_some_and(|l| l.ends_with(".debug")),
            "{debuglink:?}"
        );
        Some(file_of("debug", &self.debug.take()?))
    }
}

fn patch(bytes: &mut Vec<u8>, ops: &[u8], extra: &mut Vec<(u64, u64)>) {
    for op in ops.chunks_exact(8) {
        if bytes.is_empty() {
            break;
        }
        let raw = u32::from_le_bytes(op[..4].try_into().unwrap());
        let at = raw as usize % bytes.len();
        let (kind, a, b) = (op[4], op[5], op[6]);
        let mut put = |v: &[u8]| {
            let end = (at + v.len()).min(bytes.len());
            bytes[at..end].copy_from_slice(&v[..end - at]);
        };
        match kind % 6 {
            0 => put(&[a]),
            1 => put(&[a, b]),
            2 => put(&EDGES[a as usize % EDGES.len()].to_le_bytes()),
            3 => put(&if a & 1 == 1 { u64::MAX } else { 0 }.to_le_bytes()),
            4 => bytes.truncate(at),
            _ => bytes[at] ^= 1 << (a % 8),
        }
        extra.push((at as u64, raw as u64));
    }
}

/// The budget holds no more than its limit, and exactly what the binary charged.
fn check_accounting(budget: &SymbolBudget, binary: &Binary, when: &str) {
    let stats = budget.stats();
    assert!(stats.used <= stats.limit, "{when}: {stats:?}");
    assert_eq!(
        binary.charged_bytes() as u64,
        stats.used,
        "{when}: the binary's charges and the budget disagree"
    );
}

fuzz_target!(|data: &[u8]| {
    let [pick, limit, caps, ops @ ..] = data else {
        return;
    };
    let which = (pick & 3) as usize;
    let (stripped, keep_debug, full) = BASES[which];
    let mut debug = if pick & 4 == 0 { keep_debug } else { full }.to_vec();
    let mut extra = Vec::new();
    patch(&mut debug, ops, &mut extra);

    let budget = SymbolBudget::new(
        LIMITS[(limit & 7) as usize],
        Limits {
            max_symbols: MAX_SYMBOLS[(caps & 3) as usize],
            max_decompressed: MAX_DECOMPRESSED[(caps >> 2 & 3) as usize],
            max_mini_debug_info: 16 << 20,
            max_unit_bytes: MAX_UNIT_BYTES[(caps >> 4 & 3) as usize],
        },
    );
    let expected_build_id = object::File::parse(stripped)
        .ok()
        .and_then(|f| f.build_id().ok().flatten().map(<[u8]>::to_vec));
    let mut finder = Finder {
        debug: Some(debug),
        expected_build_id,
        asked: false,
    };
    let main = file_of("main", stripped);
    let loaded = Binary::load_with(&main, &mut finder, &budget);
    drop(main);
    let Ok(binary) = loaded else {
        assert_eq!(budget.stats().used, 0, "a failed load keeps nothing");
        return;
    };
    check_accounting(&budget, &binary, "after load");
    let _ = (
        binary.build_id_hex(),
        binary.has_dwarf(),
        binary.has_debug_file(),
    );

    let mut vaddrs = addresses()[which].clone();
    for (offset, raw) in extra {
        vaddrs.push(raw);
        vaddrs.extend(binary.vaddr_of_file_offset(offset));
    }
    for round in 0..2 {
        for &vaddr in &vaddrs {
            for frame in binary.frames(vaddr).iter() {
                let _ = (
                    frame.name.len(),
                    frame.file.as_ref().map(|f| f.len()),
                    frame.line,
                );
            }
        }
        check_accounting(
            &budget,
            &binary,
            if round == 0 { "after lookups" } else { "again" },
        );
        binary.release_memory();
        check_accounting(&budget, &binary, "after release_memory");
    }
    drop(binary);
    assert_eq!(budget.stats().used, 0, "charges outlive the binary");
});
