//! Hostile files that a profiled process controls, built for tests/tests/hostile.rs from the
//! spin fixture with gcc, objcopy and xz: a FIFO where a debug file should be, a debug link
//! that is an absolute symlink out of a chroot, decompression bombs in `.gnu_debugdata` and
//! in a compressed `.debug_info`, and an ELF with millions of symbols. Every binary is a copy
//! of spin.c under its own name, so each has its own build id and none shares a cache entry.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use super::{run_ok, workspace_root};

/// `tests/fixtures/spin.c` compiled as `dir/name` (`-static` when asked), with DWARF.
pub fn spin_variant(dir: &Path, name: &str, static_link: bool) -> PathBuf {
    let source = dir.join(format!("{name}.c"));
    std::fs::copy(workspace_root().join("tests/fixtures/spin.c"), &source).unwrap();
    let out = dir.join(name);
    let mut gcc = Command::new("gcc");
    gcc.args(["-O1", "-g", "-fno-omit-frame-pointer", "-fno-inline"]);
    if static_link {
        gcc.arg("-static");
    }
    run_ok(gcc.arg("-o").arg(&out).arg(&source));
    out
}

/// Splits `binary`'s DWARF into `debug`, strips the binary of everything (symbols included,
/// so its function names can only come from the debug file) and links it to `debug` by name.
pub fn split_debug(binary: &Path, debug: &Path) {
    run_ok(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(binary)
            .arg(debug),
    );
    run_ok(
        Command::new("objcopy")
            .arg("--strip-all")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(binary),
    );
}

/// A stripped binary whose `.gnu_debuglink` file next to it is a FIFO nobody writes: an
/// `open` of it blocks until a writer comes.
pub fn fifo_debuglink(dir: &Path) -> PathBuf {
    let binary = spin_variant(dir, "fifodbg", false);
    let debug = dir.join("fifodbg.debug");
    split_debug(&binary, &debug);
    std::fs::remove_file(&debug).unwrap();
    run_ok(Command::new("mkfifo").arg(&debug));
    binary
}

/// A static binary in its own root (`dir/jail`, run as `chroot dir/jail /jailed`) whose
/// debug link `/jailed.debug` is an absolute symlink to `host_debug`, a path that exists
/// only outside the jail. Resolved inside the jail, it names nothing; resolved against the
/// agent's root, it reads a host file (here the binary's real debug file, so its function
/// names would show up).
pub fn jailed_with_host_link(dir: &Path) -> (PathBuf, PathBuf) {
    let build = dir.join("jail-build");
    std::fs::create_dir_all(&build).unwrap();
    let binary = spin_variant(&build, "jailed", true);
    let host_dir = dir.join("host-only");
    std::fs::create_dir_all(&host_dir).unwrap();
    let host_debug = host_dir.join("jailed.debug");
    // The link is by name: objcopy wants the file next to it when it computes the CRC.
    let local_debug = build.join("jailed.debug");
    split_debug(&binary, &local_debug);
    std::fs::rename(&local_debug, &host_debug).unwrap();
    let jail = dir.join("jail");
    std::fs::create_dir_all(&jail).unwrap();
    std::fs::copy(&binary, jail.join("jailed")).unwrap();
    std::os::unix::fs::symlink(&host_debug, jail.join("jailed.debug")).unwrap();
    (jail, host_debug)
}

/// A stripped binary whose `.gnu_debugdata` is 1 GiB of zeros compressed by xz to ~150 KiB.
pub fn debugdata_bomb(dir: &Path) -> PathBuf {
    let binary = spin_variant(dir, "xzbomb", false);
    run_ok(Command::new("strip").arg("--strip-all").arg(&binary));
    let bomb = dir.join("bomb.xz");
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "head -c 1G /dev/zero | xz -T1 -1 > '{}'",
        bomb.display()
    )));
    run_ok(
        Command::new("objcopy")
            .arg(format!("--add-section=.gnu_debugdata={}", bomb.display()))
            .arg(&binary),
    );
    binary
}

/// A binary (symbols kept, DWARF removed) with a `.debug_info` that is an ELF-compressed
/// (`SHF_COMPRESSED`, zlib) section of 1 GiB of zeros, about 1 MiB in the file.
pub fn compressed_dwarf_bomb(dir: &Path) -> PathBuf {
    const SIZE: u64 = 1 << 30;
    let binary = spin_variant(dir, "zbomb", false);
    run_ok(Command::new("strip").arg("--strip-debug").arg(&binary));
    // Elf64_Chdr: ch_type (ELFCOMPRESS_ZLIB), ch_reserved, ch_size, ch_addralign.
    let mut section = Vec::new();
    section.extend_from_slice(&1u32.to_le_bytes());
    section.extend_from_slice(&0u32.to_le_bytes());
    section.extend_from_slice(&SIZE.to_le_bytes());
    section.extend_from_slice(&1u64.to_le_bytes());
    let mut z = flate2::write::ZlibEncoder::new(section, flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(SIZE >> 20) {
        z.write_all(&zeros).unwrap();
    }
    let section = z.finish().unwrap();
    let bomb = dir.join("debug_info.bomb");
    std::fs::write(&bomb, section).unwrap();
    run_ok(
        Command::new("objcopy")
            .arg(format!("--add-section=.debug_info={}", bomb.display()))
            .arg(&binary),
    );
    set_section_flag(&binary, ".debug_info", 0x800 /* SHF_COMPRESSED */);
    binary
}

/// ORs `flag` into the `sh_flags` of section `name` of a little-endian ELF64 file.
fn set_section_flag(path: &Path, name: &str, flag: u64) {
    let mut elf = std::fs::read(path).unwrap();
    let u16_at = |e: &[u8], at: usize| u16::from_le_bytes(e[at..at + 2].try_into().unwrap());
    let u32_at = |e: &[u8], at: usize| u32::from_le_bytes(e[at..at + 4].try_into().unwrap());
    let u64_at = |e: &[u8], at: usize| u64::from_le_bytes(e[at..at + 8].try_into().unwrap());
    let shoff = u64_at(&elf, 0x28) as usize;
    let shentsize = u16_at(&elf, 0x3a) as usize;
    let shnum = u16_at(&elf, 0x3c) as usize;
    let shstrndx = u16_at(&elf, 0x3e) as usize;
    let names = u64_at(&elf, shoff + shstrndx * shentsize + 0x18) as usize;
    let header = (0..shnum)
        .map(|i| shoff + i * shentsize)
        .find(|&h| {
            let start = names + u32_at(&elf, h) as usize;
            elf[start..].starts_with(name.as_bytes()) && elf[start + name.len()] == 0
        })
        .unwrap_or_else(|| panic!("no section {name} in {}", path.display()));
    let flags = u64_at(&elf, header + 8) | flag;
    elf[header + 8..header + 16].copy_from_slice(&flags.to_le_bytes());
    std::fs::write(path, elf).unwrap();
}

/// spin linked with an object of `count` global function symbols (an ~80 MiB binary for two
/// million): a symbol table no profiler should hold whole.
pub fn many_symbols(dir: &Path, count: usize) -> PathBuf {
    let asm = dir.join("many.s");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&asm).unwrap());
    writeln!(out, ".text").unwrap();
    for i in 0..count {
        writeln!(
            out,
            ".globl many_{i}\n.type many_{i},@function\nmany_{i}:\n nop\n.size many_{i},1"
        )
        .unwrap();
    }
    writeln!(out, ".section .note.GNU-stack,\"\",@progbits").unwrap();
    drop(out);
    let object = dir.join("many.o");
    run_ok(Command::new("as").arg("-o").arg(&object).arg(&asm));
    std::fs::remove_file(&asm).unwrap();
    let source = dir.join("manysyms.c");
    std::fs::copy(workspace_root().join("tests/fixtures/spin.c"), &source).unwrap();
    let binary = dir.join("manysyms");
    run_ok(
        Command::new("gcc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&binary)
            .arg(&source)
            .arg(&object),
    );
    binary
}

/// `libhot.so` and `dlopen_main` from the fixtures, built into `dir`.
pub fn dlopen_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let fixtures = workspace_root().join("tests/fixtures");
    let library = dir.join("libhot.so");
    run_ok(
        Command::new("gcc")
            .args([
                "-O2",
                "-g",
                "-fPIC",
                "-shared",
                "-fno-omit-frame-pointer",
                "-o",
            ])
            .arg(&library)
            .arg(fixtures.join("libhot.c")),
    );
    let main = dir.join("dlopen_main");
    run_ok(
        Command::new("gcc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&main)
            .arg(fixtures.join("dlopen_main.c"))
            .arg("-ldl"),
    );
    (main, library)
}

/// A C fixture compiled without frame-pointer or optimisation flags beyond `-O1 -g`.
pub fn plain_fixture(name: &str, dir: &Path) -> PathBuf {
    let out = dir.join(name);
    run_ok(
        Command::new("gcc")
            .args(["-O1", "-g", "-pthread", "-o"])
            .arg(&out)
            .arg(workspace_root().join(format!("tests/fixtures/{name}.c"))),
    );
    out
}
