//! Real ELF files with DWARF (committed under `fuzz/bases/`), patched by the input and then
//! loaded and queried at every function of the original: this keeps the file parseable far
//! more often than byte-level mutation of a whole file does, so the DWARF (and zlib, zstd and
//! xz MiniDebugInfo) decoders see corrupt contents rather than an ELF header error.
//!
//! Input: byte 0 picks the base; then 8-byte records `[offset u32 LE][op][a][b][c]`, offset
//! taken modulo the current length:
//! - op 0: byte `a`; op 1: u16 `a b`; op 2: u32 from a table of edge values (index `a`);
//! - op 3: u64 all ones or zero (`a` odd / even); op 4: truncate at the offset;
//! - op 5: flip bit `a % 8`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
use profiler_agent::symbolize::binary::Binary;

const BASES: &[&[u8]] = &[
    include_bytes!("../bases/c-dwarf5-O2.elf"),
    include_bytes!("../bases/c-dwarf4-Os.elf"),
    include_bytes!("../bases/c-dwarf-zlib.elf"),
    include_bytes!("../bases/c-dwarf-zstd.elf"),
    include_bytes!("../bases/c-minidebuginfo.elf"),
];

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
            .map(|base| {
                let file = object::File::parse(*base).expect("bases are valid ELF");
                let mut out = Vec::new();
                for s in file.symbols().chain(file.dynamic_symbols()) {
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

fuzz_target!(|data: &[u8]| {
    let Some((&pick, ops)) = data.split_first() else {
        return;
    };
    let which = pick as usize % BASES.len();
    let mut bytes = BASES[which].to_vec();
    let mut extra = Vec::new();
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
    let Ok(binary) = Binary::from_vec(bytes) else {
        return;
    };
    let _ = (binary.build_id_hex(), binary.has_dwarf(), binary.is_go());
    let mut vaddrs = addresses()[which].clone();
    for (offset, raw) in extra {
        vaddrs.push(raw);
        vaddrs.extend(binary.vaddr_of_file_offset(offset));
    }
    for vaddr in vaddrs {
        for frame in binary.frames(vaddr).iter() {
            let _ = (
                frame.name.len(),
                frame.file.as_ref().map(|f| f.len()),
                frame.line,
            );
        }
    }
});
