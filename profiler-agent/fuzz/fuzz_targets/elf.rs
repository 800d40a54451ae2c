//! Arbitrary bytes as an ELF image: `Binary::from_vec` (symbol tables, MiniDebugInfo,
//! .gopclntab, DWARF) must return an error or a Binary, and every lookup on that Binary must
//! return, for any address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler_agent::symbolize::binary::Binary;

fuzz_target!(|data: &[u8]| {
    let Ok(binary) = Binary::from_vec(data.to_vec()) else {
        return;
    };
    let _ = (binary.build_id_hex(), binary.has_dwarf(), binary.is_go());
    // File offsets spread over the input, mapped to addresses the way a sample is.
    let len = data.len() as u64;
    let step = (len / 16).max(1);
    let mut vaddrs: Vec<u64> = (0..len)
        .step_by(step as usize)
        .filter_map(|off| binary.vaddr_of_file_offset(off))
        .collect();
    // Plus raw addresses read from the input itself and the edges.
    vaddrs.extend(
        data.chunks_exact(8)
            .rev()
            .take(4)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap())),
    );
    vaddrs.extend([0, 1, u64::MAX, u64::MAX - 1]);
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
