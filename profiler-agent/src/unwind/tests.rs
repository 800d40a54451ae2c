//! Unwind tables of real binaries (a fixture compiled here, /usr/bin/gzip, the libc this test
//! runs with) checked row by row against `readelf --debug-dump=frames-interp`, plus the
//! explicit rows (`_start`, PLT, signal trampoline, gaps) and hostile input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::*;

const FIXTURE_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) int big_frame(int x) {
    volatile char buf[100000];
    memset((char *)buf, x, sizeof buf);
    return buf[x % 1000] + buf[x / 2];
}
__attribute__((noinline)) long recurse(long n, long acc) {
    if (n <= 0) return acc + big_frame((int)acc);
    long r = recurse(n - 1, acc * 3 + n);
    return r ^ (r >> 3);
}
int main(int argc, char **argv) {
    printf("%ld\n", recurse(atoi(argv[argc - 1]), argc));
    puts("done");
    return 0;
}
"#;

/// One FDE as readelf prints it.
struct ReadelfFde {
    section: String,
    start: u64,
    end: u64,
    signal: bool,
    /// (LOC, CFA, ra, rbp if the column is printed)
    rows: Vec<(u64, String, String, Option<String>)>,
}

fn readelf(path: &Path) -> Vec<ReadelfFde> {
    let out = Command::new("readelf")
        .arg("--debug-dump=frames-interp")
        .arg(path)
        .output()
        .expect("readelf");
    // readelf exits 1 on Debian's libc.so.6 without a message; the dump is complete.
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("Contents of the"),
        "readelf {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut fdes = Vec::new();
    let mut section = String::new();
    let mut augmentations = HashMap::new();
    let mut current: Option<ReadelfFde> = None;
    let mut columns: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("Contents of the ") {
            section = name.split(' ').next().unwrap().to_owned();
            continue;
        }
        // A register rule prints as "r9 (r9)": one column, two words.
        let mut tokens: Vec<&str> = Vec::new();
        for word in line.split_whitespace() {
            match tokens.last_mut() {
                Some(last) if word.starts_with('(') => {
                    let at = line.find(*last).unwrap();
                    let end = line[at..].find(word).unwrap() + at + word.len();
                    *last = &line[at..end];
                }
                _ => tokens.push(word),
            }
        }
        if tokens.get(3) == Some(&"CIE") {
            fdes.extend(current.take());
            augmentations.insert(tokens[0].to_owned(), tokens[4].trim_matches('"').to_owned());
        } else if tokens.get(3) == Some(&"FDE") {
            fdes.extend(current.take());
            let cie = tokens[4].strip_prefix("cie=").unwrap();
            let range = tokens[5].strip_prefix("pc=").unwrap();
            let (start, end) = range.split_once("..").unwrap();
            let hex = |s| u64::from_str_radix(s, 16).unwrap();
            current = Some(ReadelfFde {
                section: section.clone(),
                start: hex(start),
                end: hex(end),
                signal: augmentations[cie].contains('S'),
                rows: Vec::new(),
            });
        } else if tokens.first() == Some(&"LOC") {
            columns = tokens.iter().map(|t| t.to_string()).collect();
        } else if let (Some(fde), Some(loc)) = (current.as_mut(), tokens.first())
            && loc.len() == 16
            && let Ok(loc) = u64::from_str_radix(loc, 16)
        {
            let column = |name: &str| {
                let i = columns.iter().position(|c| c == name)?;
                Some(tokens[i].to_owned())
            };
            let (cfa, ra) = (column("CFA").unwrap(), column("ra").unwrap());
            fde.rows.push((loc, cfa, ra, column("rbp")));
        }
    }
    fdes.extend(current);
    fdes
}

/// Compares every row readelf prints for the FDEs of `section`; returns (FDEs, rows) checked.
fn compare(table: &UnwindTable, fdes: &[ReadelfFde], section: &str) -> (usize, usize) {
    let mut mismatches = Vec::new();
    let (mut checked_fdes, mut checked_rows) = (0, 0);
    for fde in fdes
        .iter()
        .filter(|f| f.section == section && f.end > f.start)
    {
        checked_fdes += 1;
        for (loc, cfa, ra, rbp) in &fde.rows {
            checked_rows += 1;
            let ours = table.row_for(*loc).expect("a row for every FDE address");
            let cfa_ok = match (cfa.as_str(), ours.cfa) {
                ("exp", Cfa::PltStub { .. } | Cfa::Unsupported) => true,
                (cfa, Cfa::Rsp(offset)) => cfa == format!("rsp+{offset}"),
                (cfa, Cfa::Rbp(offset)) => cfa == format!("rbp+{offset}"),
                (cfa, Cfa::Unsupported) => !cfa.starts_with("rsp") && !cfa.starts_with("rbp"),
                _ => false,
            };
            let ra_ok = match (ra.as_str(), ours.ra) {
                ("u", ReturnAddress::Undefined) => true,
                (ra, ReturnAddress::CfaOffset(offset)) => ra == format!("c{offset:+}"),
                (ra, ReturnAddress::Unsupported) => ra != "u" && !ra.starts_with("c"),
                _ => false,
            };
            let rbp_ok = match (rbp.as_deref(), ours.rbp) {
                (None | Some("u" | "s"), Rbp::Unchanged) => true,
                (Some(rbp), Rbp::CfaOffset(offset)) => rbp == format!("c{offset:+}"),
                (Some(rbp), Rbp::Unsupported) => !matches!(rbp, "u" | "s") && !rbp.starts_with("c"),
                _ => false,
            };
            if !(cfa_ok && ra_ok && rbp_ok) || ours.signal_frame != fde.signal {
                mismatches.push(format!(
                    "{loc:#x}: readelf {cfa} {ra} {rbp:?}, ours {ours:?}"
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {checked_rows} rows differ, first: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
    (checked_fdes, checked_rows)
}

fn compile(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let source = dir.join(format!("{name}.c"));
    std::fs::write(&source, FIXTURE_C).unwrap();
    let out = dir.join(name);
    let status = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .expect("gcc");
    assert!(status.success(), "gcc {flags:?}");
    out
}

fn build(path: &Path) -> UnwindTable {
    UnwindTable::from_elf(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn symbol(path: &Path, name: &str) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let file = object::File::parse(&bytes[..]).unwrap();
    let found = file.symbols().find(|s| s.name() == Ok(name));
    found.unwrap_or_else(|| panic!("{name}")).address()
}

/// Sorted, merged, and every range readelf knows nothing about is "no information".
fn assert_well_formed(table: &UnwindTable, fdes: &[ReadelfFde]) {
    for pair in table.decoded().windows(2) {
        assert!(pair[0].pc < pair[1].pc, "{pair:?}");
        assert!(!pair[0].same_rules(&pair[1]), "not merged: {pair:?}");
    }
    let starts: std::collections::HashSet<u64> = fdes.iter().map(|f| f.start).collect();
    for fde in fdes.iter().filter(|f| !starts.contains(&f.end)) {
        assert_eq!(
            table.row_for(fde.end).unwrap().cfa,
            Cfa::NoInfo,
            "{:#x}",
            fde.end
        );
    }
    let base = table.base();
    for (row, compact) in table.decoded().iter().zip(table.rows()) {
        assert_eq!(u64::from(compact.pc) + base, row.pc);
        assert_eq!(row.compact(base), *compact, "{row:?}");
    }
}

#[test]
fn matches_readelf_on_a_fixture_without_frame_pointers() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "nofp", &["-O2", "-fomit-frame-pointer"]);
    let table = build(&binary);
    let fdes = readelf(&binary);
    let (checked, rows) = compare(&table, &fdes, ".eh_frame");
    assert!(checked >= 5 && rows >= 10, "{checked} FDEs, {rows} rows");
    assert_well_formed(&table, &fdes);
    // The 100 000-byte frame is an rsp offset past i16.
    let (big, next) = (symbol(&binary, "big_frame"), symbol(&binary, "recurse"));
    let (lo, hi) = (big.min(next), big.max(next));
    let decoded = table.decoded();
    let rows = decoded.iter().filter(|r| (lo..hi).contains(&r.pc));
    assert!(
        rows.clone()
            .any(|r| matches!(r.cfa, Cfa::Rsp(o) if o > 100_000)),
        "{:?}",
        rows.collect::<Vec<_>>()
    );
    assert_eq!(table.row_for(0), None);
}

/// Code with frame information in `.debug_frame` only (crt files keep their `.eh_frame`).
const DEBUG_FRAME_ONLY: [&str; 4] = [
    "-O2",
    "-g",
    "-fomit-frame-pointer",
    "-fno-asynchronous-unwind-tables",
];

#[test]
fn debug_frame_is_read_when_there_is_no_eh_frame_entry() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "debugframe", &DEBUG_FRAME_ONLY);
    let table = build(&binary);
    let fdes = readelf(&binary);
    let (checked, _) = compare(&table, &fdes, ".debug_frame");
    assert!(checked >= 3, "{checked} .debug_frame FDEs");
    compare(&table, &fdes, ".eh_frame");
    let recurse = symbol(&binary, "recurse");
    assert!(matches!(table.row_for(recurse).unwrap().cfa, Cfa::Rsp(8)));
}

fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let status = Command::new(program).args(args).status().expect(program);
    assert!(status.success(), "{program} {args:?}");
}

/// A binary built without `.eh_frame` entries for its own code, stripped of its debug
/// sections (`.debug_frame` with them) into a separate debug file: the table has rows for
/// its functions only when the debug file is given, and only when its build id matches.
#[test]
fn debug_frame_of_a_separate_debug_file_is_merged() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [&DEBUG_FRAME_ONLY[..], &["-Wl,--build-id"]].concat();
    let binary = compile(dir.path(), "split", &flags);
    let debug = dir.path().join("split.debug");
    run(
        "objcopy",
        &[
            "--only-keep-debug".as_ref(),
            binary.as_os_str(),
            debug.as_os_str(),
        ],
    );
    run("strip", &["--strip-debug".as_ref(), binary.as_os_str()]);
    // Another build of other code: another build id.
    let other = compile(
        dir.path(),
        "other",
        &[&flags[..], &["-DOTHER=1", "-O1"]].concat(),
    );
    let other_debug = dir.path().join("other.debug");
    run(
        "objcopy",
        &[
            "--only-keep-debug".as_ref(),
            other.as_os_str(),
            other_debug.as_os_str(),
        ],
    );

    let recurse = symbol(&binary, "recurse");
    let read = |debug: Option<&Path>| {
        let file = std::fs::File::open(&binary).unwrap();
        FileTable::read(&file, DEFAULT_MAX_ROWS, |_| {
            debug.map(|d| std::fs::File::open(d).unwrap())
        })
        .unwrap()
        .table
    };
    let alone = read(None);
    assert!(
        alone.row_for(recurse).is_none_or(|r| r.cfa == Cfa::NoInfo),
        "{:?}",
        alone.row_for(recurse)
    );
    let merged = read(Some(&debug));
    assert_eq!(merged.row_for(recurse).unwrap().cfa, Cfa::Rsp(8));
    let fdes = readelf(&debug);
    let (checked, _) = compare(&merged, &fdes, ".debug_frame");
    assert!(checked >= 3, "{checked} FDEs of the debug file");
    let mismatched = read(Some(&other_debug));
    assert_eq!(
        mismatched.rows(),
        alone.rows(),
        "a debug file of another build"
    );
}

/// Compares all of a stock binary's FDEs (at least `min_fdes`, or all it has when fewer:
/// Debian's gzip has 127).
fn stock(path: &Path, min_fdes: usize) {
    let bytes = std::fs::read(path).unwrap();
    let started = Instant::now();
    let table = UnwindTable::from_elf(&bytes).unwrap();
    let took = started.elapsed();
    let fdes = readelf(path);
    let (checked, rows) = compare(&table, &fdes, ".eh_frame");
    let all = fdes
        .iter()
        .filter(|f| f.section == ".eh_frame" && f.end > f.start)
        .count();
    assert!(
        checked >= min_fdes.min(all) && all >= 100,
        "{checked} of {all} FDEs compared"
    );
    assert_well_formed(&table, &fdes);
    eprintln!(
        "{}: {} rows ({} KiB compact), {} FDEs ({} skipped, {} overlapping), built in {took:?}; \
         {rows} readelf rows of {checked} FDEs equal",
        path.display(),
        table.rows().len(),
        std::mem::size_of_val(table.rows()) / 1024,
        table.fdes(),
        table.skipped_fdes(),
        table.overlapping_fdes(),
    );
}

#[test]
fn matches_readelf_on_gzip() {
    stock(Path::new("/usr/bin/gzip"), 200);
}

/// The libc this test process runs with, per /proc/self/maps.
fn mapped_libc() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let path = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .expect("libc in /proc/self/maps");
    PathBuf::from(path)
}

#[test]
fn matches_readelf_on_libc_with_its_signal_trampoline() {
    let libc = mapped_libc();
    stock(&libc, 200);
    let table = build(&libc);
    let signal: Vec<_> = readelf(&libc).into_iter().filter(|f| f.signal).collect();
    assert!(!signal.is_empty(), "__restore_rt has an 'S' CIE");
    for fde in signal {
        let row = table.row_for(fde.start).unwrap();
        assert!(row.signal_frame, "{row:?}");
        let compact = row.compact(table.base());
        assert_eq!(compact.flags & UnwindRow::FLAG_SIGNAL_FRAME, 1);
    }
}

#[test]
fn start_is_outermost_and_plt_entries_are_stubs() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "pie", &["-O2", "-fPIE", "-pie", "-Wl,-z,lazy"]);
    let table = build(&binary);
    let start = table.row_for(symbol(&binary, "_start")).unwrap();
    assert_eq!(start.ra, ReturnAddress::Undefined);
    assert_eq!(start.compact(0).ra_kind, UnwindRow::RA_UNDEFINED);

    let bytes = std::fs::read(&binary).unwrap();
    let file = object::File::parse(&bytes[..]).unwrap();
    let plt = file.section_by_name(".plt").expect(".plt").address();
    for entry in [plt + 16, plt + 16 + 11, plt + 32 + 5] {
        let row = table.row_for(entry).unwrap();
        assert_eq!(row.cfa, Cfa::PltStub { threshold: 11 }, "{entry:#x}");
        assert_eq!(row.ra, ReturnAddress::CfaOffset(-8));
        let compact = row.compact(table.base());
        assert_eq!(
            (compact.cfa_kind, compact.cfa_offset),
            (UnwindRow::CFA_PLT_STUB, 11)
        );
    }
    // The first PLT entry's first instructions are plain rsp offsets.
    assert_eq!(table.row_for(plt).unwrap().cfa, Cfa::Rsp(16));
}

#[test]
fn row_bound_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "bound", &["-O2"]);
    let bytes = std::fs::read(&binary).unwrap();
    let err = UnwindTable::from_elf_with(&bytes[..], 3).unwrap_err();
    assert!(
        matches!(err, UnwindError::TooManyRows { limit: 3 }),
        "{err}"
    );
    let rows = UnwindTable::from_elf(&bytes).unwrap().rows().len();
    assert!(UnwindTable::from_elf_with(&bytes[..], rows).is_ok());
}

#[test]
fn hostile_input_is_an_error_not_a_panic() {
    assert!(matches!(
        UnwindTable::from_elf(&[]),
        Err(UnwindError::Elf { .. })
    ));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    let garbage: Vec<u8> = (0..4096).map(|_| random()).collect();
    assert!(UnwindTable::from_elf(&garbage).is_err());

    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "hostile", &["-O2"]);
    let bytes = std::fs::read(&binary).unwrap();
    for len in (0..bytes.len()).step_by(bytes.len() / 97) {
        let result = UnwindTable::from_elf(&bytes[..len]);
        assert!(result.is_err(), "truncated to {len} bytes");
    }

    // A valid ELF whose .eh_frame is garbage.
    let file = object::File::parse(&bytes[..]).unwrap();
    let (offset, size) = file
        .section_by_name(".eh_frame")
        .unwrap()
        .file_range()
        .unwrap();
    let mut corrupt = bytes.clone();
    for byte in &mut corrupt[offset as usize..(offset + size) as usize] {
        *byte = random();
    }
    let err = UnwindTable::from_elf(&corrupt).unwrap_err();
    assert!(
        matches!(
            err,
            UnwindError::Cfi {
                section: ".eh_frame",
                ..
            }
        ),
        "{err}"
    );

    // An object with no frame information at all.
    let asm = dir.path().join("bare.s");
    std::fs::write(&asm, ".text\n.globl f\nf:\nret\n").unwrap();
    let object = dir.path().join("bare.o");
    assert!(
        Command::new("gcc")
            .arg("-c")
            .arg("-o")
            .arg(&object)
            .arg(&asm)
            .status()
            .unwrap()
            .success()
    );
    let err = UnwindTable::from_elf(&std::fs::read(&object).unwrap()).unwrap_err();
    assert!(matches!(err, UnwindError::NoFrameInfo), "{err}");
}
