//! End-to-end tests of symbolization through `profiler-agent record --demangle full`, with
//! fixtures compiled here: C at -O2 with inlining (PIE and non-PIE), C++ with namespaces and
//! templates, Rust, Go stripped with `-ldflags='-s -w'`, a library loaded with dlopen after
//! the process was first sampled, a binary deleted after it started, a debug-stripped binary
//! whose debug file is installed by build id, and a binary that only exists inside a Docker
//! container's root.
//!
//! For every distinct sampled address in the fixture's own mapping, the agent's answer (every
//! line of the location, innermost inline level first: function name, file, line) must agree
//! with binutils `addr2line -f -i -C` (or `go tool addr2line` for Go) at the address the
//! agent had to look up: the sampled address for a user leaf, the address minus one for a
//! return address, and for the first user frame under kernel frames (the pc saved at kernel
//! entry) the address minus one after a `syscall` instruction but the address itself after an
//! interrupt or a fault, which stopped the thread at that very instruction (see [`Role`]).
//! 100% agreement is required wherever the reference tool knows the function.
//! Kernel frames of a syscall-heavy workload are checked in record.rs.

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::*;
use profiler_agent::profile::pprof::{Location, Mapping};

/// How long each fixture is recorded.
const RECORD_FOR: &str = "3s";
/// Fixtures run at most this long if a test dies without killing them.
const WORKLOAD_SECONDS: &str = "3600";
/// Fewer distinct checked addresses than this means the check proved little. Fixtures whose
/// hot loop is only a few instructions long use [`MIN_CHECKED_SMALL`].
const MIN_CHECKED: usize = 5;
const MIN_CHECKED_SMALL: usize = 3;

fn record_full(pid: u32, dir: &Path, name: &str) -> Recorded {
    let out = dir.join(format!("{name}.pb.gz"));
    let pid = pid.to_string();
    record(
        &[
            "--pid",
            &pid,
            "--duration",
            RECORD_FOR,
            "--demangle",
            "full",
        ],
        &out,
    )
}

// ---------------------------------------------------------------------------------------------
// Compiling the fixtures.

fn gcc(dir: &Path, out: &str, source: &str, flags: &[&str]) -> PathBuf {
    let path = dir.join(out);
    run_ok(
        Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&path)
            .arg(fixture(source)),
    );
    path
}

fn gxx(dir: &Path, out: &str, source: &str, flags: &[&str]) -> PathBuf {
    let path = dir.join(out);
    run_ok(
        Command::new("g++")
            .args(flags)
            .arg("-o")
            .arg(&path)
            .arg(fixture(source)),
    );
    path
}

/// `inline.c` at -O2 -g with frame pointers; `extra` adds e.g. `-no-pie`.
fn compile_inline(dir: &Path, out: &str, extra: &[&str]) -> PathBuf {
    let mut flags = vec!["-O2", "-g", "-fno-omit-frame-pointer"];
    flags.extend_from_slice(extra);
    gcc(dir, out, "inline.c", &flags)
}

/// Environment for the go tool: everything in `dir`, no network, no toolchain switching.
fn go_command(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GOTOOLCHAIN", "local")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .env(
            "HOME",
            std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        );
    cmd
}

// ---------------------------------------------------------------------------------------------
// Reading the profile.

/// One line of a location as the agent wrote it.
#[derive(Clone, Debug)]
struct OurLine {
    name: String,
    system_name: String,
    file: String,
    line: i64,
}

impl std::fmt::Display for OurLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} [{}] @ {}:{}",
            self.name, self.system_name, self.file, self.line
        )
    }
}

fn our_lines(p: &Profile, loc: &Location) -> Vec<OurLine> {
    let s = |i: i64| p.string_table[i as usize].clone();
    loc.line
        .iter()
        .map(|line| {
            let f = p
                .function
                .iter()
                .find(|f| f.id == line.function_id)
                .expect("function of a line");
            OurLine {
                name: s(f.name),
                system_name: s(f.system_name),
                file: s(f.filename),
                line: line.line,
            }
        })
        .collect()
}

/// What a sampled user address is, which decides the byte the agent must look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The first location of a sample: the pc the timer interrupted in user mode. Looked up
    /// as is.
    Leaf,
    /// The first user frame under kernel frames: the user pc saved at kernel entry. After a
    /// `syscall` instruction it is a return address of sorts (looked up one byte earlier,
    /// inside the `syscall`); after an interrupt or a fault it is the interrupted instruction
    /// itself and is looked up as is, exactly like a leaf.
    KernelEntry { syscall: bool },
    /// Any other user frame: a return address, looked up one byte earlier (in the call).
    Return,
}

impl Role {
    fn describe(self) -> &'static str {
        match self {
            Role::Leaf => "leaf",
            Role::KernelEntry { syscall: true } => {
                "first user frame under kernel frames, after a syscall instruction"
            }
            Role::KernelEntry { syscall: false } => {
                "first user frame under kernel frames, an interrupted instruction"
            }
            Role::Return => "return address",
        }
    }
}

/// A distinct (location, looked-up address) in one of the fixture's mappings.
struct Probe<'a> {
    location: &'a Location,
    mapping: &'a Mapping,
    role: Role,
    /// For [`Role::KernelEntry`]: the kernel frames above it in one such sample.
    kernel_above: Vec<String>,
}

impl Probe<'_> {
    /// The runtime address the agent must have symbolized. The agent stores exactly that as
    /// the location's address: the pc for a leaf or an interrupted instruction, the byte
    /// before the return address (inside the call or `syscall`) otherwise.
    fn lookup(&self) -> u64 {
        self.location.address
    }

    /// Offset of the looked-up byte in the mapped file.
    fn file_offset(&self) -> u64 {
        self.lookup() - self.mapping.memory_start + self.mapping.file_offset
    }
}

const KERNEL_MAPPING: &str = "[kernel.kallsyms]";

/// Every distinct (location, looked-up address) whose mapping's file name satisfies `ours`.
/// `code` is the content of the mapped file (or of a file with the same code at the same
/// offsets), to tell a syscall return from an interrupted instruction.
fn probes<'a>(p: &'a Profile, ours: &dyn Fn(&str) -> bool, code: &[u8]) -> Vec<Probe<'a>> {
    let locations: HashMap<u64, &Location> = p.location.iter().map(|l| (l.id, l)).collect();
    let mappings: HashMap<u64, &Mapping> = p.mapping.iter().map(|m| (m.id, m)).collect();
    let is_kernel = |id: &u64| {
        mappings
            .get(&locations[id].mapping_id)
            .is_some_and(|m| p.string_table[m.filename as usize] == KERNEL_MAPPING)
    };
    let mut index: HashMap<(u64, u64), usize> = HashMap::new();
    let mut out: Vec<Probe<'a>> = Vec::new();
    for sample in &p.sample {
        let first_user = sample.location_id.iter().position(|id| !is_kernel(id));
        for (depth, id) in sample.location_id.iter().enumerate() {
            let location = locations[id];
            let Some(mapping) = mappings.get(&location.mapping_id) else {
                continue;
            };
            if !ours(&p.string_table[mapping.filename as usize]) {
                continue;
            }
            let role = if depth == 0 {
                Role::Leaf
            } else if Some(depth) == first_user {
                // x86-64 `syscall` is 0f 05; the saved pc is the byte after it, so the
                // location the agent stored is its last byte.
                let offset =
                    (location.address - mapping.memory_start + mapping.file_offset) as usize;
                let syscall =
                    offset >= 1 && code.get(offset - 1..offset + 1) == Some(&[0x0f, 0x05]);
                Role::KernelEntry { syscall }
            } else {
                Role::Return
            };
            let kernel_above = match role {
                Role::KernelEntry { .. } => stack_names(
                    p,
                    &profiler_agent::profile::pprof::Sample {
                        location_id: sample.location_id[..depth].to_vec(),
                        ..Default::default()
                    },
                )
                .into_iter()
                .map(str::to_owned)
                .collect(),
                _ => Vec::new(),
            };
            let probe = Probe {
                location,
                mapping,
                role,
                kernel_above,
            };
            match index.entry((location.id, probe.lookup())) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(out.len());
                    out.push(probe);
                }
                std::collections::hash_map::Entry::Occupied(o) => {
                    // Keep the most telling description of the same lookup.
                    let kept = &mut out[*o.get()];
                    if kept.kernel_above.is_empty() && !probe.kernel_above.is_empty() {
                        *kept = probe;
                    }
                }
            }
        }
    }
    out
}

/// Whether some sample's stack (leaf first, one name per line) contains `chain` in order.
fn has_chain(p: &Profile, chain: &[&str]) -> bool {
    p.sample
        .iter()
        .any(|s| stack_names(p, s).windows(chain.len()).any(|w| w == chain))
}

fn all_names(p: &Profile) -> BTreeSet<String> {
    p.function
        .iter()
        .map(|f| p.string_table[f.name as usize].clone())
        .collect()
}

fn mapping_names(p: &Profile) -> Vec<&str> {
    p.mapping
        .iter()
        .map(|m| p.string_table[m.filename as usize].as_str())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// ELF file offsets to the virtual addresses addr2line expects.

/// The PT_LOAD segments of a file: (file offset, file size, virtual address, executable).
struct Segments(Vec<(u64, u64, u64, bool)>);

impl Segments {
    fn read(path: &Path) -> Self {
        use object::{Object as _, ObjectSegment as _};
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let file = object::File::parse(&*data).expect("parse ELF");
        Self(
            file.segments()
                .map(|s| {
                    let (offset, size) = s.file_range();
                    let exec = match s.flags() {
                        object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                        _ => false,
                    };
                    (offset, size, s.address(), exec)
                })
                .collect(),
        )
    }

    /// The virtual address of a file offset, preferring executable segments (PT_LOAD file
    /// ranges may share a page).
    fn vaddr(&self, offset: u64) -> Option<u64> {
        let mut candidates: Vec<_> = self
            .0
            .iter()
            .filter(|(o, size, _, _)| offset >= *o && offset < o + size)
            .collect();
        candidates.sort_by_key(|(_, _, _, exec)| !exec);
        candidates
            .first()
            .map(|(o, _, vaddr, _)| offset - o + vaddr)
    }
}

// ---------------------------------------------------------------------------------------------
// The reference tools.

/// One frame as the reference tool reports it.
#[derive(Clone, Debug)]
struct RefFrame {
    function: String,
    /// None when the tool prints `??`.
    file: Option<String>,
    /// 0 when the tool does not know it.
    line: i64,
}

impl std::fmt::Display for RefFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} @ {}:{}",
            self.function,
            self.file.as_deref().unwrap_or("??"),
            self.line
        )
    }
}

/// Parses `file:line`, `file:line (discriminator N)`, `??:0` and `??:?`.
fn parse_file_line(text: &str) -> (Option<String>, i64) {
    let text = text.split(" (discriminator").next().unwrap_or(text).trim();
    let (file, line) = text.rsplit_once(':').unwrap_or((text, "0"));
    let file = (file != "??" && file != "?" && !file.is_empty()).then(|| file.to_owned());
    (file, line.parse().unwrap_or(0))
}

/// `addr2line -a -f -i -C -e FILE ADDR...`: frames per address, innermost first.
fn addr2line(file: &Path, vaddrs: &[u64]) -> HashMap<u64, Vec<RefFrame>> {
    let mut out = HashMap::new();
    for chunk in vaddrs.chunks(500) {
        let output = run_ok(
            Command::new("addr2line")
                .args(["-a", "-f", "-i", "-C", "-e"])
                .arg(file)
                .args(chunk.iter().map(|a| format!("{a:#x}"))),
        );
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut lines = text.lines().peekable();
        for &addr in chunk {
            let header = lines.next().expect("addr2line address line");
            assert_eq!(
                u64::from_str_radix(header.trim_start_matches("0x"), 16).ok(),
                Some(addr),
                "addr2line output out of step at {header:?}:\n{text}"
            );
            let mut frames = Vec::new();
            while let Some(&function) = lines.peek() {
                if is_addr2line_header(function) {
                    break;
                }
                lines.next();
                let (file, line) = parse_file_line(lines.next().expect("addr2line file:line"));
                frames.push(RefFrame {
                    function: function.to_owned(),
                    file,
                    line,
                });
            }
            out.insert(addr, frames);
        }
    }
    out
}

/// `-a` prints each address as `0x` and 16 hex digits; no demangled name looks like that.
fn is_addr2line_header(line: &str) -> bool {
    line.len() == 18 && line.starts_with("0x") && line[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// `go tool addr2line FILE`: the outermost function at each address and the innermost
/// file:line (the pclntab's pcfile/pcln tables describe the inlined code itself).
fn go_addr2line(dir: &Path, file: &Path, vaddrs: &[u64]) -> HashMap<u64, RefFrame> {
    let mut child = go_command(dir)
        .args(["tool", "addr2line"])
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run go tool addr2line");
    let input: String = vaddrs.iter().map(|a| format!("{a:#x}\n")).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "go tool addr2line: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), vaddrs.len() * 2, "go tool addr2line:\n{text}");
    vaddrs
        .iter()
        .zip(lines.chunks(2))
        .map(|(&addr, pair)| {
            let (file, line) = parse_file_line(pair[1]);
            (
                addr,
                RefFrame {
                    function: pair[0].to_owned(),
                    file,
                    line,
                },
            )
        })
        .collect()
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

// ---------------------------------------------------------------------------------------------
// Comparing.

/// The outcome of checking one fixture's addresses.
#[derive(Default)]
struct Check {
    fixture: String,
    /// Distinct (address, role) pairs the reference tool could name.
    checked: usize,
    /// Pairs the reference tool could not name (`??`): not compared.
    unknown_to_reference: usize,
    /// Checked pairs where the reference had a file and line (so ours were compared too).
    with_file_line: usize,
    /// Deepest inline chain the agent reported.
    max_depth: usize,
    disagreements: Vec<String>,
}

impl Check {
    /// Every checked address agrees, and at least `min` were checked.
    fn assert_agreement(&self, min: usize) {
        eprintln!(
            "{}: {} addresses checked ({} with file and line, {} unknown to the reference, \
             deepest inline chain {}), {} disagreements",
            self.fixture,
            self.checked,
            self.with_file_line,
            self.unknown_to_reference,
            self.max_depth,
            self.disagreements.len()
        );
        assert!(
            self.disagreements.is_empty(),
            "{}: the agent disagrees with the reference on {} of {} addresses \
             ({} unknown to the reference):\n{}",
            self.fixture,
            self.disagreements.len(),
            self.checked,
            self.unknown_to_reference,
            self.disagreements.join("\n")
        );
        assert!(
            self.checked >= min,
            "{}: only {} addresses could be checked ({} unknown to the reference)",
            self.fixture,
            self.checked,
            self.unknown_to_reference
        );
    }
}

/// Locations the agent had to look up at two different bytes (e.g. the leaf of one sample
/// and a return address in another): pprof holds one answer per location, so one of the two
/// lookups is answered with the other's frames unless both give the same.
fn several_lookups(probes: &[Probe<'_>]) -> BTreeSet<u64> {
    let mut count: HashMap<u64, usize> = HashMap::new();
    for probe in probes {
        *count.entry(probe.location.id).or_default() += 1;
    }
    count
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(id, _)| id)
        .collect()
}

fn describe(probe: &Probe<'_>, vaddr: Option<u64>, several: &BTreeSet<u64>) -> String {
    format!(
        "location {} address {:#x} ({}, looked up at {:#x}, file offset {:#x}, ELF vaddr {}){}{}",
        probe.location.id,
        probe.location.address,
        probe.role.describe(),
        probe.lookup(),
        probe.file_offset(),
        vaddr.map_or("none".to_owned(), |v| format!("{v:#x}")),
        if probe.kernel_above.is_empty() {
            String::new()
        } else {
            format!(" under kernel frames {:?}", probe.kernel_above)
        },
        if several.contains(&probe.location.id) {
            " [the same location is sampled in another role too, needing another lookup]"
        } else {
            ""
        }
    )
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| format!("\n        {i}"))
        .collect::<String>()
}

/// The probes of a profile in the mappings `ours` selects, with the file virtual address of
/// each (None outside every PT_LOAD segment of `reference`) and the distinct ones to look up.
struct Prepared<'a> {
    probes: Vec<Probe<'a>>,
    both: BTreeSet<u64>,
    vaddrs: Vec<Option<u64>>,
    unique: Vec<u64>,
}

fn prepare<'a>(p: &'a Profile, ours: &dyn Fn(&str) -> bool, reference: &Path) -> Prepared<'a> {
    let segments = Segments::read(reference);
    let code = std::fs::read(reference).expect("read the reference file");
    let probes = probes(p, ours, &code);
    let both = several_lookups(&probes);
    let vaddrs: Vec<Option<u64>> = probes
        .iter()
        .map(|probe| segments.vaddr(probe.file_offset()))
        .collect();
    let unique: Vec<u64> = vaddrs
        .iter()
        .flatten()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Prepared {
        probes,
        both,
        vaddrs,
        unique,
    }
}

/// Checks every sampled address in the mappings `ours` selects against
/// `addr2line -f -i -C -e reference`, where `reference` has the same code as the mapped file
/// (the file itself, or its unstripped original).
fn check_native(
    p: &Profile,
    fixture: &str,
    ours: &dyn Fn(&str) -> bool,
    reference: &Path,
) -> Check {
    let Prepared {
        probes,
        both,
        vaddrs,
        unique,
    } = prepare(p, ours, reference);
    let reference_frames = addr2line(reference, &unique);
    let mut check = Check {
        fixture: fixture.to_owned(),
        ..Check::default()
    };
    for (probe, vaddr) in probes.iter().zip(&vaddrs) {
        let ours = our_lines(p, probe.location);
        check.max_depth = check.max_depth.max(ours.len());
        let Some(vaddr) = vaddr else {
            check.disagreements.push(format!(
                "{fixture}: {}: not inside any PT_LOAD segment of {}; ours:{}",
                describe(probe, None, &both),
                reference.display(),
                list(&ours)
            ));
            continue;
        };
        let theirs = &reference_frames[vaddr];
        if theirs.is_empty() || theirs[0].function == "??" {
            check.unknown_to_reference += 1;
            continue;
        }
        check.checked += 1;
        if theirs.iter().all(|f| f.file.is_some() && f.line > 0) {
            check.with_file_line += 1;
        }
        let mut problems = Vec::new();
        if ours.len() != theirs.len() {
            problems.push(format!(
                "inline depth {} vs addr2line's {}",
                ours.len(),
                theirs.len()
            ));
        }
        for (level, (o, t)) in ours.iter().zip(theirs).enumerate() {
            // Names are compared exactly: both sides demangle fully (cpp_demangle or
            // rustc-demangle against libiberty).
            if o.name != t.function {
                problems.push(format!(
                    "level {level}: name {:?} vs addr2line's {:?}",
                    o.name, t.function
                ));
            }
            if t.line == 0 {
                // No line information for this address: addr2line's file, if any, comes
                // from the symbol table's STT_FILE entries (e.g. `libc-start.o` in a static
                // glibc), which is not debug information; only require that we claim no
                // line either.
                if o.line != 0 {
                    problems.push(format!(
                        "level {level}: line {} where addr2line knows none",
                        o.line
                    ));
                }
                continue;
            }
            // Files are compared by base name: DWARF joins the compilation directory and
            // the file entry in different but equivalent ways (relative vs absolute).
            let file = t.file.as_deref().unwrap_or("??");
            if basename(&o.file) != basename(file) {
                problems.push(format!(
                    "level {level}: file {:?} vs addr2line's {:?}",
                    o.file, file
                ));
            }
            if o.line != t.line {
                problems.push(format!(
                    "level {level}: line {} vs addr2line's {}",
                    o.line, t.line
                ));
            }
        }
        if !problems.is_empty() {
            let other_role: String = probes
                .iter()
                .zip(&vaddrs)
                .filter(|(o, _)| o.location.id == probe.location.id && o.lookup() != probe.lookup())
                .filter_map(|(o, v)| Some((o.role, (*v)?)))
                .map(|(role, v)| {
                    format!(
                        "\n    addr2line at the other lookup {v:#x} ({}):{}",
                        role.describe(),
                        list(&reference_frames[&v])
                    )
                })
                .collect();
            check.disagreements.push(format!(
                "{fixture}: {}: {}\n    ours:{}\n    addr2line:{}{other_role}",
                describe(probe, Some(*vaddr), &both),
                problems.join("; "),
                list(&ours),
                list(theirs)
            ));
        }
    }
    check
}

/// Checks every sampled address in the mappings `ours` selects against `go tool addr2line`:
/// its function is the outermost one at the address (ours: the location's last line), its
/// file:line the innermost position (ours: the first line).
fn check_go(
    p: &Profile,
    dir: &Path,
    fixture: &str,
    ours: &dyn Fn(&str) -> bool,
    reference: &Path,
) -> Check {
    let Prepared {
        probes,
        both,
        vaddrs,
        unique,
    } = prepare(p, ours, reference);
    let reference_frames = go_addr2line(dir, reference, &unique);
    let mut check = Check {
        fixture: fixture.to_owned(),
        ..Check::default()
    };
    for (probe, vaddr) in probes.iter().zip(&vaddrs) {
        let ours = our_lines(p, probe.location);
        check.max_depth = check.max_depth.max(ours.len());
        let Some(vaddr) = vaddr else {
            check.disagreements.push(format!(
                "{fixture}: {}: not inside any PT_LOAD segment; ours:{}",
                describe(probe, None, &both),
                list(&ours)
            ));
            continue;
        };
        let theirs = &reference_frames[vaddr];
        if theirs.function == "?" || theirs.function.is_empty() {
            check.unknown_to_reference += 1;
            continue;
        }
        check.checked += 1;
        if theirs.file.is_some() && theirs.line > 0 {
            check.with_file_line += 1;
        }
        let (inner, outer) = (ours.first().unwrap(), ours.last().unwrap());
        let mut problems = Vec::new();
        if outer.name != theirs.function {
            problems.push(format!(
                "function {:?} vs go tool addr2line's {:?}",
                outer.name, theirs.function
            ));
        }
        if let Some(file) = &theirs.file
            && basename(&inner.file) != basename(file)
        {
            problems.push(format!(
                "file {:?} vs go tool addr2line's {:?}",
                inner.file, file
            ));
        }
        if theirs.line > 0 && inner.line != theirs.line {
            problems.push(format!(
                "line {} vs go tool addr2line's {}",
                inner.line, theirs.line
            ));
        }
        if !problems.is_empty() {
            check.disagreements.push(format!(
                "{fixture}: {}: {}\n    ours:{}\n    go tool addr2line: {theirs}",
                describe(probe, Some(*vaddr), &both),
                problems.join("; "),
                list(&ours),
            ));
        }
    }
    check
}

fn is_path(path: &Path) -> impl Fn(&str) -> bool + '_ {
    move |name: &str| Path::new(name) == path
}

/// The C fixture's call chain, leaf first, with the two inline levels of the hot loop.
const INLINE_CHAIN: [&str; 6] = ["mix", "scramble", "hot_loop", "outer_b", "outer_a", "main"];

/// Records `inline.c` built as `binary` and checks it against addr2line.
fn check_inline_fixture(dir: &Path, name: &str, binary: &Path) {
    let workload = Workload::start(binary, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir, name);
    let p = &rec.profile;
    let check = check_native(p, name, &is_path(binary), binary);
    check.assert_agreement(MIN_CHECKED);
    assert!(
        has_chain(p, &INLINE_CHAIN),
        "{name}: no stack with {INLINE_CHAIN:?}; names: {:?}",
        all_names(p)
    );
    assert!(
        check.max_depth >= 3,
        "{name}: no location with two inline levels (deepest: {})",
        check.max_depth
    );
    assert!(check.with_file_line >= MIN_CHECKED);
    // The independent reader sees the inline levels innermost first.
    let raw = go_pprof_raw(&dir.join(format!("{name}.pb.gz")));
    let hot = ["mix", "scramble", "hot_loop"];
    assert!(
        profiler_tests::go_pprof::locations(&raw)
            .iter()
            .any(|l| l.functions.windows(3).any(|w| w == hot)),
        "{name}: go tool pprof -raw shows no location with {hot:?} in this order:\n{raw}"
    );
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn c_with_inlining_pie_matches_addr2line() {
    if !require_root("c_with_inlining_pie_matches_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_inline(dir.path(), "inline_pie", &["-pie", "-fPIE"]);
    check_inline_fixture(dir.path(), "inline_pie", &binary);
}

#[test]
fn c_with_inlining_non_pie_matches_addr2line() {
    if !require_root("c_with_inlining_non_pie_matches_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_inline(dir.path(), "inline_nopie", &["-no-pie", "-fno-pie"]);
    // The point of this fixture: file offsets differ from virtual addresses.
    let header = run_ok(Command::new("readelf").arg("-hW").arg(&binary));
    assert!(
        String::from_utf8_lossy(&header.stdout).contains("EXEC (Executable file)"),
        "-no-pie did not give ET_EXEC"
    );
    check_inline_fixture(dir.path(), "inline_nopie", &binary);
}

#[test]
fn cpp_namespaces_and_templates_match_addr2line() {
    if !require_root("cpp_namespaces_and_templates_match_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = gxx(
        dir.path(),
        "templates",
        "templates.cpp",
        &["-O1", "-g", "-fno-omit-frame-pointer"],
    );
    let workload = Workload::start(&binary, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir.path(), "templates");
    let p = &rec.profile;
    check_native(p, "templates", &is_path(&binary), &binary).assert_agreement(MIN_CHECKED);
    let names = all_names(p);
    for expected in [
        "geo::detail::Accumulator<double>::add(double)",
        "double geo::sum_squares<double, 7>(geo::detail::Accumulator<double>&, unsigned long)",
        "geo::Engine::run(unsigned long) const",
        "(anonymous namespace)::drive(geo::Engine const&)",
    ] {
        assert!(
            names.contains(expected),
            "no function {expected:?} among {names:#?}"
        );
    }
}

#[test]
fn rust_matches_addr2line() {
    if !require_root("rust_matches_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("burn");
    run_ok(
        Command::new("rustc")
            .args(["-C", "force-frame-pointers=yes", "-g", "-O", "-o"])
            .arg(&binary)
            .arg(fixture("burn.rs")),
    );
    let workload = Workload::start(&binary, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir.path(), "rust");
    let p = &rec.profile;
    check_native(p, "rust", &is_path(&binary), &binary).assert_agreement(MIN_CHECKED);
    let names = all_names(p);
    for expected in ["burn::checksum", "burn::round", "burn::main"] {
        assert!(
            names.contains(expected),
            "no function {expected:?} among {names:#?}"
        );
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("burn::engine::Mixer<") && n.ends_with(">::churn")),
        "no Mixer::churn among {names:#?}"
    );
}

#[test]
fn stripped_go_matches_go_addr2line() {
    if !require_root("stripped_go_matches_go_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("burn");
    run_ok(
        go_command(dir.path())
            .args(["build", "-ldflags=-s -w", "-o"])
            .arg(&binary)
            .arg(fixture("burn.go")),
    );
    // Really stripped: names can only come from .gopclntab.
    let sections = run_ok(Command::new("readelf").arg("-SW").arg(&binary));
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "go build -ldflags='-s -w' left symbols:\n{sections}"
    );
    let workload = Workload::start(&binary, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir.path(), "go");
    let p = &rec.profile;
    check_go(p, dir.path(), "go", &is_path(&binary), &binary).assert_agreement(MIN_CHECKED);
    // Full names, and the whole chain under the hot loop (mix is inlined into burn).
    let chain = ["main.burn", "main.stage2", "main.stage1", "main.main"];
    let names = all_names(p);
    assert!(
        p.sample.iter().any(|s| {
            let names: Vec<&str> = stack_names(p, s)
                .into_iter()
                .filter(|n| *n != "main.mix")
                .collect();
            names.windows(chain.len()).any(|w| w == chain)
        }),
        "no stack with {chain:?}; names: {names:#?}"
    );
}

/// Reads `record`'s stderr on a thread, telling `started` when the recording has begun.
fn watch_stderr(
    stderr: std::process::ChildStderr,
    started: mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        let mut told = false;
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if !told && line.starts_with("recording ") {
                let _ = started.send(());
                told = true;
            }
            all.extend_from_slice(line.as_bytes());
            line.clear();
        }
        all
    })
}

#[test]
fn library_loaded_with_dlopen_after_first_sample_matches_addr2line() {
    if !require_root("library_loaded_with_dlopen_after_first_sample_matches_addr2line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let main = gcc(
        dir.path(),
        "dlopen_main",
        "dlopen_main.c",
        &["-O2", "-g", "-fno-omit-frame-pointer", "-ldl"],
    );
    let lib = gcc(
        dir.path(),
        "libhot.so",
        "libhot.c",
        &["-O2", "-g", "-fno-omit-frame-pointer", "-fPIC", "-shared"],
    );
    let workload = Workload::start(&main, &[lib.to_str().unwrap(), WORKLOAD_SECONDS]);
    let out = dir.path().join("dlopen.pb.gz");
    let pid = workload.pid().to_string();
    let mut child = record_command(
        &[
            "--pid",
            &pid,
            "--duration",
            RECORD_FOR,
            "--demangle",
            "full",
        ],
        &out,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start record");
    let (tx, rx) = mpsc::channel();
    let stderr = watch_stderr(child.stderr.take().unwrap(), tx);
    // Let the agent sample the process (and snapshot its mappings) before the library
    // exists in it, then load it.
    let started = rx.recv_timeout(Duration::from_secs(60)).is_ok();
    if started {
        std::thread::sleep(Duration::from_millis(800));
    }
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(workload.pid() as i32, libc::SIGUSR1) };
    let output = child.wait_with_output().expect("wait for record");
    let stderr = stderr.join().unwrap();
    assert!(
        started,
        "record never started: {}",
        String::from_utf8_lossy(&stderr)
    );
    assert!(
        !maps_before.contains("libhot.so"),
        "libhot.so was mapped before the signal"
    );
    let rec = finish_record(
        std::process::Output {
            status: output.status,
            stdout: output.stdout,
            stderr,
        },
        &out,
    );
    let p = &rec.profile;
    let before = check_native(p, "dlopen_main", &is_path(&main), &main);
    let after = check_native(p, "libhot.so", &is_path(&lib), &lib);
    assert!(
        has_chain(p, &["before_load", "main"]),
        "no samples before dlopen; names: {:?}",
        all_names(p)
    );
    assert!(
        has_chain(p, &["hot_mix", "hot_inner", "hot_entry", "main"]),
        "no named stack through the dlopened library; names: {:?}; mappings: {:?}",
        all_names(p),
        mapping_names(p)
    );
    before.assert_agreement(MIN_CHECKED_SMALL);
    after.assert_agreement(MIN_CHECKED_SMALL);
    assert!(after.with_file_line >= MIN_CHECKED_SMALL);
}

#[test]
fn deleted_binary_keeps_full_names_and_lines() {
    if !require_root("deleted_binary_keeps_full_names_and_lines") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let original = compile_inline(dir.path(), "inline", &[]);
    let victim = dir.path().join("victim");
    std::fs::copy(&original, &victim).unwrap();
    let workload = Workload::start(&victim, &[WORKLOAD_SECONDS]);
    std::fs::remove_file(&victim).unwrap();
    let rec = record_full(workload.pid(), dir.path(), "deleted");
    let p = &rec.profile;
    let victim_name = victim.to_str().unwrap().to_owned();
    let ours = move |name: &str| {
        name == victim_name || name.strip_suffix(" (deleted)") == Some(victim_name.as_str())
    };
    let check = check_native(p, "deleted", &ours, &original);
    check.assert_agreement(MIN_CHECKED);
    assert!(
        has_chain(p, &INLINE_CHAIN),
        "deleted binary: no stack with {INLINE_CHAIN:?}; names: {:?}; mappings: {:?}",
        all_names(p),
        mapping_names(p)
    );
    assert!(check.with_file_line >= MIN_CHECKED);
}

/// A debug file installed under /usr/lib/debug/.build-id, removed (with the directories
/// created for it) when dropped.
struct InstalledDebugFile {
    path: PathBuf,
    created: Vec<PathBuf>,
}

impl InstalledDebugFile {
    fn install(debug: &Path, build_id: &str) -> Self {
        let dir = PathBuf::from("/usr/lib/debug/.build-id").join(&build_id[..2]);
        let path = dir.join(format!("{}.debug", &build_id[2..]));
        assert!(!path.exists(), "{} already exists", path.display());
        let mut created = Vec::new();
        let mut missing = Vec::new();
        let mut d = dir.as_path();
        while !d.exists() {
            missing.push(d.to_path_buf());
            d = d.parent().unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        created.extend(missing); // deepest first
        let guard = Self { path, created };
        std::fs::copy(debug, &guard.path).unwrap();
        guard
    }
}

impl Drop for InstalledDebugFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        for d in &self.created {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[test]
fn debug_file_found_by_build_id_gives_lines() {
    if !require_root("debug_file_found_by_build_id_gives_lines") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let original = compile_inline(dir.path(), "inline", &[]);
    let stripped = dir.path().join("stripped");
    let debug = dir.path().join("stripped.debug");
    std::fs::copy(&original, &stripped).unwrap();
    run_ok(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&stripped)
            .arg(&debug),
    );
    run_ok(
        Command::new("strip")
            .args(["--strip-debug", "--strip-unneeded"])
            .arg(&stripped),
    );
    let sections = run_ok(Command::new("readelf").arg("-SW").arg(&stripped));
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        !sections.contains(".debug_info")
            && !sections.contains(".symtab")
            && !sections.contains(".gnu_debuglink"),
        "strip left debug data or a debuglink:\n{sections}"
    );
    let notes = run_ok(Command::new("readelf").arg("-n").arg(&stripped));
    let notes = String::from_utf8_lossy(&notes.stdout);
    let build_id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in:\n{notes}"))
        .trim()
        .to_owned();
    let _installed = InstalledDebugFile::install(&debug, &build_id);

    let workload = Workload::start(&stripped, &[WORKLOAD_SECONDS]);
    let rec = record_full(workload.pid(), dir.path(), "stripped");
    let p = &rec.profile;
    // The unstripped original has the same code at the same addresses.
    let check = check_native(p, "debug-stripped", &is_path(&stripped), &original);
    check.assert_agreement(MIN_CHECKED);
    assert!(
        has_chain(p, &INLINE_CHAIN),
        "debug-stripped: no stack with {INLINE_CHAIN:?}; names: {:?}",
        all_names(p)
    );
    assert!(check.with_file_line >= MIN_CHECKED);
    let m = p
        .mapping
        .iter()
        .find(|m| Path::new(&p.string_table[m.filename as usize]) == stripped)
        .expect("mapping of the stripped binary");
    assert_eq!(p.string_table[m.build_id as usize], build_id);
}

// ---------------------------------------------------------------------------------------------
// Docker (helpers in common).

#[test]
fn binary_only_inside_a_container_root_is_named() {
    if !require_root("binary_only_inside_a_container_root_is_named") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spin = static_spin(dir.path());
    let nonce = nonce();
    // A path that exists only in the container's root.
    let inside = format!("/opt/profiler-only-in-container-{nonce}/spin");
    assert!(!Path::new(&inside).exists());
    let tarball = busybox_rootfs_tarball(dir.path(), &spin, &inside);

    let Some(_daemon) = DockerDaemon::get(&dir.path().join("dockerd.log")) else {
        return;
    };
    let guard = ContainerGuard {
        container: format!("profiler-symbolize-{nonce}"),
        image: format!("profiler-symbolize-test:{nonce}"),
    };
    docker_ok(&["import", tarball.to_str().unwrap(), &guard.image]);
    docker_ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &guard.container,
        &guard.image,
        &inside,
        WORKLOAD_SECONDS,
    ]);
    let pid: u32 = docker_ok(&["inspect", "-f", "{{.State.Pid}}", &guard.container])
        .parse()
        .expect("container pid");
    assert!(pid > 0, "container is not running");
    std::thread::sleep(Duration::from_millis(200));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        Path::new(&inside),
        "the container's pid 1 is not the spin binary"
    );

    let rec = record_full(pid, dir.path(), "container");
    let p = &rec.profile;
    let check = check_native(p, "container", &|n| n == inside, &spin);
    assert!(
        has_chain(p, &["spin_inner", "spin_outer", "main"]),
        "container binary: no stack with spin_inner <- spin_outer <- main; names: {:?}; \
         mappings: {:?}",
        all_names(p),
        mapping_names(p)
    );
    check.assert_agreement(MIN_CHECKED_SMALL);
    assert!(check.with_file_line >= MIN_CHECKED_SMALL);

    // The pid maps to the container's id, found from /proc/PID/cgroup.
    let id = docker_ok(&["inspect", "-f", "{{.Id}}", &guard.container]);
    for sample in &p.sample {
        assert_eq!(
            label_str(p, sample, "container_id"),
            Some(id.trim()),
            "samples of the container's pid carry its id"
        );
    }
}
