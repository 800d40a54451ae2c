//! The reference readers the agent's answers are compared with: the PT_LOAD segments of an
//! ELF file (to turn a mapped file offset into the virtual address the tools expect, with the
//! `object` crate), binutils `addr2line -a -f -i -C`, `go tool addr2line`, and `readelf` (the
//! file type, the sections, the build id).

use std::{
    collections::HashMap,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use super::fixtures::go_command;
use crate::common::run_ok;

/// The PT_LOAD segments of a file: (file offset, file size, virtual address, executable).
pub struct Segments(Vec<(u64, u64, u64, bool)>);

impl Segments {
    pub fn read(path: &Path) -> Self {
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
    pub fn vaddr(&self, offset: u64) -> Option<u64> {
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

/// One frame as the reference tool reports it.
#[derive(Clone, Debug)]
pub struct RefFrame {
    pub function: String,
    /// None when the tool prints `??`.
    pub file: Option<String>,
    /// 0 when the tool does not know it.
    pub line: i64,
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
pub fn addr2line(file: &Path, vaddrs: &[u64]) -> HashMap<u64, Vec<RefFrame>> {
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
pub fn go_addr2line(dir: &Path, file: &Path, vaddrs: &[u64]) -> HashMap<u64, RefFrame> {
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

pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `readelf <flags> <file>`'s output.
pub fn readelf(flags: &str, file: &Path) -> String {
    let out = run_ok(Command::new("readelf").arg(flags).arg(file));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The GNU build id `readelf -n` prints for `file`, in hex.
pub fn readelf_build_id(file: &Path) -> String {
    let notes = readelf("-n", file);
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in:\n{notes}"))
        .trim()
        .to_owned()
}
