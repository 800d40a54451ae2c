//! Comparing the agent's answer for every sampled address with the reference tool's:
//! [`check_native`] against `addr2line -f -i -C` (every inline level: name exactly, file by
//! base name, line), [`check_go`] against `go tool addr2line` (outermost function, innermost
//! file:line). A [`Check`] counts what was compared and lists every disagreement with enough
//! context (role, file offset, ELF address, the other lookup of the same location) to debug it.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use super::{
    probes::{Probe, our_lines, probes},
    reference::{Segments, addr2line, basename, go_addr2line},
};
use crate::common::Profile;

/// The outcome of checking one fixture's addresses.
#[derive(Default)]
pub struct Check {
    pub fixture: String,
    /// Distinct (address, role) pairs the reference tool could name.
    pub checked: usize,
    /// Pairs the reference tool could not name (`??`): not compared.
    pub unknown_to_reference: usize,
    /// Checked pairs where the reference had a file and line (so ours were compared too).
    pub with_file_line: usize,
    /// Deepest inline chain the agent reported.
    pub max_depth: usize,
    pub disagreements: Vec<String>,
}

impl Check {
    /// Every checked address agrees, and at least `min` were checked.
    pub fn assert_agreement(&self, min: usize) {
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
pub fn check_native(
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
pub fn check_go(
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
