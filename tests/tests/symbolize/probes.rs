//! What the agent wrote, read back from its pprof: the lines of a location (innermost inline
//! level first), and every distinct sampled address in the fixture's mappings with its
//! [`Role`], which decides the byte the agent had to look up; plus the stack and name queries
//! the tests assert on.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use profiler_agent::profile::pprof::{Location, Mapping};

use crate::common::{Profile, receiver::function_names, stack_names};

/// One line of a location as the agent wrote it.
#[derive(Clone, Debug)]
pub struct OurLine {
    pub name: String,
    pub system_name: String,
    pub file: String,
    pub line: i64,
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

pub fn our_lines(p: &Profile, loc: &Location) -> Vec<OurLine> {
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
pub enum Role {
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
    pub fn describe(self) -> &'static str {
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
pub struct Probe<'a> {
    pub location: &'a Location,
    pub mapping: &'a Mapping,
    pub role: Role,
    /// For [`Role::KernelEntry`]: the kernel frames above it in one such sample.
    pub kernel_above: Vec<String>,
}

impl Probe<'_> {
    /// The runtime address the agent must have symbolized. The agent stores exactly that as
    /// the location's address: the pc for a leaf or an interrupted instruction, the byte
    /// before the return address (inside the call or `syscall`) otherwise.
    pub fn lookup(&self) -> u64 {
        self.location.address
    }

    /// Offset of the looked-up byte in the mapped file.
    pub fn file_offset(&self) -> u64 {
        self.lookup() - self.mapping.memory_start + self.mapping.file_offset
    }
}

const KERNEL_MAPPING: &str = "[kernel.kallsyms]";

/// Every distinct (location, looked-up address) whose mapping's file name satisfies `ours`.
/// `code` is the content of the mapped file (or of a file with the same code at the same
/// offsets), to tell a syscall return from an interrupted instruction.
pub fn probes<'a>(p: &'a Profile, ours: &dyn Fn(&str) -> bool, code: &[u8]) -> Vec<Probe<'a>> {
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
pub fn has_chain(p: &Profile, chain: &[&str]) -> bool {
    p.sample
        .iter()
        .any(|s| stack_names(p, s).windows(chain.len()).any(|w| w == chain))
}

/// Every function name of the profile, sorted and once each.
pub fn all_names(p: &Profile) -> BTreeSet<&str> {
    function_names(p).into_iter().collect()
}

/// Every mapping's file name, in the profile's order.
pub fn mapping_names(p: &Profile) -> Vec<&str> {
    p.mapping
        .iter()
        .map(|m| p.string_table[m.filename as usize].as_str())
        .collect()
}

/// Selects the mapping whose file name is exactly `path`.
pub fn is_path(path: &Path) -> impl Fn(&str) -> bool + '_ {
    move |name: &str| Path::new(name) == path
}
