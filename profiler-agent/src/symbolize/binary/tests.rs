//! `Binary` against real files: the test executable's own DWARF, C programs compiled here,
//! a library truncated after loading, decompression bombs and symbol floods built with
//! `cc`, `objcopy` and `xz`, and budgets too small for them.

use std::{path::Path, process::Command, rc::Rc};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::*;
use crate::symbolize::budget::Limits;

#[test]
fn own_binary_has_dwarf_lines_for_this_function() {
    let exe = std::env::current_exe().unwrap();
    let binary = Binary::load(&File::open(&exe).unwrap(), &mut ()).unwrap();
    assert!(
        binary.has_dwarf(),
        "test binaries are built with debug info"
    );
    assert!(binary.build_id().is_some());
    let here = own_binary_has_dwarf_lines_for_this_function as *const () as u64;
    // Our own code: runtime address -> file offset -> vaddr through /proc/self/maps.
    let vaddr = binary.vaddr_of_file_offset(file_offset_of(here)).unwrap();
    let frames = binary.frames(vaddr);
    let outer = frames.last().unwrap();
    assert!(
        outer
            .name
            .ends_with("own_binary_has_dwarf_lines_for_this_function"),
        "{frames:?}"
    );
    assert!(outer.file.as_deref().unwrap().ends_with("tests.rs"));
    assert!(outer.line > 0);
    // Every address of a function shares its name.
    let again = binary.frames(vaddr + 1);
    assert!(Arc::ptr_eq(&again.last().unwrap().name, &outer.name));
    // Released units parse again to the same answer.
    let raw = binary.resolve(vaddr);
    binary.release_memory();
    assert_eq!(binary.resolve(vaddr), raw);
    assert_eq!(
        Binary::load(&File::open(&exe).unwrap(), &mut ())
            .unwrap()
            .frames(vaddr),
        frames
    );
}

#[test]
fn units_over_the_per_binary_cap_are_refused_and_symbols_answer() {
    let exe = std::env::current_exe().unwrap();
    let budget = SymbolBudget::unlimited();
    let mut binary = Binary::load_with(&File::open(&exe).unwrap(), &mut (), &budget).unwrap();
    binary.dwarf.as_mut().unwrap().set_unit_budget(1);
    let here = units_over_the_per_binary_cap_are_refused_and_symbols_answer as *const () as u64;
    let vaddr = binary.vaddr_of_file_offset(file_offset_of(here)).unwrap();
    let frames = binary.resolve(vaddr);
    assert_eq!(frames.len(), 1, "the symbol table's name only: {frames:?}");
    assert!(frames[0].file.is_none());
    assert_eq!(binary.dwarf.as_ref().unwrap().parsed_units(), (0, 0));
    assert_eq!(budget.stats().degraded(Degraded::DwarfUnitTooLarge), 1);
    // Refused until the next round, not parsed again for every address.
    binary.resolve(vaddr + 1);
    assert_eq!(budget.stats().degraded(Degraded::DwarfUnitTooLarge), 1);

    binary.dwarf.as_mut().unwrap().set_unit_budget(usize::MAX);
    binary.release_memory();
    assert!(binary.resolve(vaddr)[0].file.is_some());
    let (units, bytes) = binary.dwarf.as_ref().unwrap().parsed_units();
    assert_eq!(units, 1);
    assert!(bytes > 0);
    binary.release_memory();
    assert_eq!(binary.dwarf.as_ref().unwrap().parsed_units(), (0, 0));
}

/// Truncating a file after it was loaded made the next lookup fault (SIGBUS) when it was
/// mapped: the test process would die here.
#[test]
fn a_library_truncated_after_loading_is_looked_up_without_a_fault() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libc-copy.so");
    std::fs::copy(own_libc(), &lib).unwrap();
    let original = std::fs::read(&lib).unwrap();
    let object = object::File::parse(&original[..]).unwrap();
    let malloc = object
        .dynamic_symbols()
        .find(|s| s.name() == Ok("malloc"))
        .unwrap()
        .address();

    let binary = Binary::load(&File::open(&lib).unwrap(), &mut ()).unwrap();
    let syscall_offset = 0x1000;
    assert!(binary.file_bytes::<2>(syscall_offset).is_some());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lib)
        .unwrap()
        .set_len(0)
        .unwrap();
    // The lookups read only what was copied in at load.
    let frames = binary.frames(malloc);
    assert!(
        frames.iter().any(|f| f.name.contains("malloc")),
        "{frames:?}"
    );
    assert!(binary.frames(malloc + 4).len() == frames.len());
    assert_eq!(binary.file_bytes::<2>(syscall_offset), None, "short read");
}

#[test]
fn a_small_budget_keeps_symbols_without_dwarf_and_is_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let prog = compile_c(dir.path(), "prog", &["-g", "-O0"], LEAF_C);
    let leaf = symbol_address(&prog, "leaf");

    let roomy = SymbolBudget::unlimited();
    let full = Binary::load_with(&File::open(&prog).unwrap(), &mut (), &roomy).unwrap();
    assert!(full.has_dwarf());
    assert!(full.frames(leaf)[0].line > 0);
    let dwarf_bytes = full
        ._sections
        .iter()
        .map(|s| s.charge.bytes())
        .sum::<usize>()
        + full.dwarf.as_ref().unwrap().charged_bytes();
    let without_dwarf = full.charged_bytes() - full.resolved_charge.bytes() - dwarf_bytes;
    drop(full);
    assert_eq!(roomy.stats().used, 0);

    let tight = SymbolBudget::new(without_dwarf as u64 + 16, Limits::default());
    let degraded = Binary::load_with(&File::open(&prog).unwrap(), &mut (), &tight).unwrap();
    assert!(!degraded.has_dwarf(), "DWARF does not fit");
    let frames = degraded.frames(leaf);
    assert_eq!(&*frames[0].name, "leaf");
    assert_eq!(frames[0].line, 0, "no lines without DWARF");
    assert!(tight.stats().degraded(Degraded::Budget) >= 1);
    assert!(tight.stats().used <= tight.stats().limit);
    // Evicted but still referenced counts; the last reference gives it all back.
    let held = Rc::new(degraded);
    let other = held.clone();
    drop(held);
    assert!(tight.stats().used > 0);
    drop(other);
    assert_eq!(tight.stats().used, 0);

    // Too small even for the headers: no binary, counted, nothing held.
    let tiny = SymbolBudget::new(16, Limits::default());
    assert!(matches!(
        Binary::load_with(&File::open(&prog).unwrap(), &mut (), &tiny),
        Err(ElfError::OverBudget)
    ));
    assert_eq!(tiny.stats().degraded(Degraded::Budget), 1);
    assert_eq!(tiny.stats().used, 0);
}

#[test]
fn a_zlib_dwarf_bomb_is_refused_within_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let prog = compile_c(dir.path(), "prog", &["-g", "-O0"], LEAF_C);
    // 8 MiB of zeros as .debug_info, zlib-compressed to a few KiB.
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 8 << 20]).unwrap();
    let updated = dir.path().join("updated");
    run(Command::new("objcopy")
        .arg(format!("--update-section=.debug_info={}", zeros.display()))
        .arg(&prog)
        .arg(&updated));
    let bomb = dir.path().join("bomb");
    run(Command::new("objcopy")
        .arg("--compress-debug-sections=zlib")
        .arg(&updated)
        .arg(&bomb));
    assert!(std::fs::metadata(&bomb).unwrap().len() < 1 << 20);
    let leaf = symbol_address(&prog, "leaf");
    let limits = Limits {
        max_decompressed: 1 << 20,
        ..Limits::default()
    };

    // Declared honestly: 8 MiB, over the cap, refused before inflating anything.
    let budget = SymbolBudget::new(u64::MAX, limits);
    let binary = Binary::load_with(&File::open(&bomb).unwrap(), &mut (), &budget).unwrap();
    assert!(!binary.has_dwarf());
    assert_eq!(&*binary.frames(leaf)[0].name, "leaf", "symbols stay");
    assert_eq!(budget.stats().degraded(Degraded::DecompressedTooLarge), 1);
    assert!(budget.stats().used < 1 << 20, "{:?}", budget.stats());

    // Declared as 4 KiB, inflating to 8 MiB: stopped at 4 KiB.
    let mut bytes = std::fs::read(&bomb).unwrap();
    let object = object::File::parse(&bytes[..]).unwrap();
    let range = object
        .section_by_name(".debug_info")
        .unwrap()
        .compressed_file_range()
        .unwrap();
    assert_eq!(range.uncompressed_size, 8 << 20);
    // Elf64_Chdr: ch_type, ch_reserved, then ch_size, just before the compressed bytes.
    let ch_size = range.offset as usize - 24 + 8;
    bytes[ch_size..ch_size + 8].copy_from_slice(&4096u64.to_le_bytes());
    let liar = dir.path().join("liar");
    std::fs::write(&liar, &bytes).unwrap();
    let budget = SymbolBudget::new(u64::MAX, limits);
    let binary = Binary::load_with(&File::open(&liar).unwrap(), &mut (), &budget).unwrap();
    assert!(!binary.has_dwarf());
    assert_eq!(budget.stats().degraded(Degraded::DecompressedTooLarge), 1);
    assert!(budget.stats().used < 1 << 20, "{:?}", budget.stats());
}

#[test]
fn an_xz_mini_debug_info_bomb_is_refused_within_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let prog = compile_c(dir.path(), "prog", &["-O0"], LEAF_C);
    run(Command::new("strip").arg("--strip-all").arg(&prog));
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 8 << 20]).unwrap();
    run(Command::new("xz").arg("-k").arg(&zeros));
    let bomb = dir.path().join("bomb");
    run(Command::new("objcopy")
        .arg(format!(
            "--add-section=.gnu_debugdata={}",
            dir.path().join("zeros.xz").display()
        ))
        .arg(&prog)
        .arg(&bomb));
    let limits = Limits {
        max_mini_debug_info: 1 << 20,
        ..Limits::default()
    };
    let budget = SymbolBudget::new(u64::MAX, limits);
    let binary = Binary::load_with(&File::open(&bomb).unwrap(), &mut (), &budget).unwrap();
    assert_eq!(budget.stats().degraded(Degraded::DecompressedTooLarge), 1);
    assert!(budget.stats().used < 1 << 20, "{:?}", budget.stats());
    drop(binary);

    // Within the cap but not the budget: refused as it grows, by the budget.
    let budget = SymbolBudget::new(256 << 10, Limits::default());
    Binary::load_with(&File::open(&bomb).unwrap(), &mut (), &budget).unwrap();
    assert_eq!(budget.stats().degraded(Degraded::Budget), 1);
    assert_eq!(budget.stats().used, 0);
}

#[test]
fn too_many_symbols_are_refused_all_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut asm = String::from(".text\n");
    for i in 0..3000 {
        asm.push_str(&format!(
            ".globl f{i}\n.type f{i},@function\nf{i}:\nnop\nret\n.size f{i},2\n"
        ));
    }
    let source = dir.path().join("many.s");
    std::fs::write(&source, asm).unwrap();
    let lib = dir.path().join("libmany.so");
    run(Command::new("cc")
        .args(["-shared", "-nostdlib", "-o"])
        .arg(&lib)
        .arg(&source));
    let f1500 = symbol_address(&lib, "f1500");

    let all = Binary::load(&File::open(&lib).unwrap(), &mut ()).unwrap();
    assert_eq!(&*all.frames(f1500)[0].name, "f1500");

    let budget = SymbolBudget::new(
        u64::MAX,
        Limits {
            max_symbols: 1000,
            ..Limits::default()
        },
    );
    let capped = Binary::load_with(&File::open(&lib).unwrap(), &mut (), &budget).unwrap();
    assert!(
        capped.frames(f1500).is_empty(),
        "module+0x... rather than a wrong name"
    );
    assert!(budget.stats().degraded(Degraded::TooManySymbols) >= 1);
    assert_eq!(capped._symbols_charge.bytes(), 0);
}

const LEAF_C: &str = "int leaf(int x) { return x * 3 + 1; }\n\
                      int main(int argc, char **argv) { (void)argv; return leaf(argc); }\n";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compile_c(dir: &Path, name: &str, flags: &[&str], source: &str) -> std::path::PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).unwrap();
    let out = dir.join(name);
    run(Command::new("cc").args(flags).arg("-o").arg(&out).arg(&c));
    out
}

fn symbol_address(path: &Path, name: &str) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let object = object::File::parse(&bytes[..]).unwrap();
    object
        .symbols()
        .chain(object.dynamic_symbols())
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{name} in {}", path.display()))
        .address()
}

/// The libc this test process runs with, per /proc/self/maps.
fn own_libc() -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .expect("a dynamically linked libc")
        .into()
}

/// The file offset our own code at `address` is mapped from, per /proc/self/maps.
fn file_offset_of(address: u64) -> u64 {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (a, b) = f[0].split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            (a..b)
                .contains(&address)
                .then(|| address - a + u64::from_str_radix(f[2], 16).unwrap())
        })
        .unwrap()
}
