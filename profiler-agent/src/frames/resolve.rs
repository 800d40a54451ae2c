//! Resolving raw stacks: return-address adjustment, interning of locations and mappings,
//! synthetic frames for lost stacks. Names come from [`Sources`].

use std::collections::HashMap;

// foldhash: about two lookups per frame; seeded per map, so crafted addresses still cannot
// collide on purpose.
use foldhash::HashMap as FastMap;

use super::{
    Frame, FrameKind, LOST_KERNEL_STACK, LOST_USER_STACK, Location, MappingClass, MappingInfo,
    ResolvedSample, Sources, Stacks,
};
use crate::{
    process::{Mapping, ProcessInfo},
    sampler::{RawSample, Stack},
};

/// Stands for an interpreter frame when no interpreted source is registered.
const UNKNOWN_STATIC: &str = super::UNKNOWN;

/// What a stack address is, which decides the instruction it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The sampled pc: the instruction itself.
    Leaf,
    /// A return address: the call is the instruction before it.
    Caller,
    /// The user pc saved on entry to the kernel: after a `syscall` instruction it is a return
    /// address; after an interrupt or fault it is the interrupted instruction itself.
    KernelEntry,
}

/// The address to look up for a frame: a caller's address is a return address, and the call
/// is the instruction before it.
fn lookup_address(address: u64, after_call: bool) -> u64 {
    if after_call {
        address.saturating_sub(1)
    } else {
        address
    }
}

/// Loads, in one batch, whatever the sources need to name the kernel frames of `samples`:
/// call once before resolving any number of groups of them.
pub fn prepare<'a>(sources: &mut Sources, samples: impl IntoIterator<Item = &'a RawSample>) {
    let mut addresses: Vec<u64> = samples
        .into_iter()
        .flat_map(|s| {
            s.kernel
                .frames()
                .iter()
                .enumerate()
                .map(|(depth, &a)| lookup_address(a, depth != 0))
        })
        .collect();
    if addresses.is_empty() {
        return;
    }
    addresses.sort_unstable();
    addresses.dedup();
    sources.prepare(MappingClass::Kernel, &addresses);
}

/// Resolves the stacks of `samples`, naming frames with `sources`; kernel frames are named
/// from what [`prepare`] loaded.
pub fn resolve<'a>(
    sources: &mut Sources,
    samples: &[&'a RawSample],
    processes: &'a HashMap<u32, ProcessInfo>,
) -> Stacks<'a> {
    let mut r = Resolver {
        sources,
        stacks: Stacks {
            samples: Vec::with_capacity(samples.len()),
            frames: Vec::with_capacity(
                samples
                    .iter()
                    .map(|s| {
                        s.user.frames().len().max(1)
                            + s.kernel.frames().len().max(1)
                            + s.python.len()
                    })
                    .sum(),
            ),
            ..Stacks::default()
        },
        by_process: FastMap::default(),
        by_mapping: FastMap::default(),
        mappings: FastMap::default(),
        kernel: FastMap::default(),
        interpreted: FastMap::default(),
        kernel_mapping: None,
        python_mapping: None,
        synthetic: FastMap::default(),
    };
    static UNKNOWN_PROCESS: std::sync::OnceLock<ProcessInfo> = std::sync::OnceLock::new();
    let unknown_process = UNKNOWN_PROCESS.get_or_init(ProcessInfo::default);
    for &sample in samples {
        let process = processes.get(&sample.pid).unwrap_or(unknown_process);
        let start = r.stacks.frames.len() as u32;
        r.stack(sample, process);
        let stack = start..r.stacks.frames.len() as u32;
        r.stacks.samples.push(ResolvedSample {
            sample,
            container_id: process.container_id.as_deref(),
            stack,
        });
    }
    r.stacks
}

struct Resolver<'s, 'a> {
    sources: &'s mut Sources,
    stacks: Stacks<'a>,
    /// By (pid, lookup address): a frame seen before in the same process skips the mapping
    /// search. Processes sharing a mapping still share locations through `by_mapping`.
    by_process: FastMap<(u32, u64), u32>,
    /// By (mapping index or `u32::MAX` for none, lookup address).
    by_mapping: FastMap<(u32, u64), u32>,
    /// By (start, end, offset), then path.
    mappings: FastMap<(u64, u64, u64), Vec<u32>>,
    kernel: FastMap<u64, u32>,
    /// By (pid, recorded interpreter frame).
    interpreted: FastMap<(u32, u64), u32>,
    kernel_mapping: Option<u32>,
    python_mapping: Option<u32>,
    synthetic: FastMap<&'static str, u32>,
}

impl Resolver<'_, '_> {
    /// Appends the sample's stack to the stacks' frames.
    fn stack(&mut self, sample: &RawSample, process: &ProcessInfo) {
        let start = self.stacks.frames.len();
        match &sample.kernel {
            Stack::Frames(frames) => {
                for (depth, &address) in frames.iter().enumerate() {
                    let index = self.kernel_location(lookup_address(address, depth != 0));
                    self.stacks.frames.push(index);
                }
            }
            Stack::Lost => {
                let index = self.synthetic(LOST_KERNEL_STACK);
                self.stacks.frames.push(index);
            }
            Stack::NotCollected => {}
        }
        let first_user = if self.stacks.frames.len() == start {
            Role::Leaf
        } else {
            Role::KernelEntry
        };
        match &sample.user {
            Stack::Frames(frames) => self.user_stack(process, frames, &sample.python, first_user),
            Stack::Lost => {
                let index = self.synthetic(LOST_USER_STACK);
                self.stacks.frames.push(index);
            }
            Stack::NotCollected => {}
        }
    }

    /// The user frames, each native run of the interpreter loop replaced by the recorded
    /// interpreter frames of that run (innermost first, as the native frames are). Runs left
    /// over when the native stack ends (its walk stopped early) go on its outer end.
    fn user_stack(&mut self, process: &ProcessInfo, frames: &[u64], python: &[u64], first: Role) {
        let mut runs = python;
        for (depth, &address) in frames.iter().enumerate() {
            let role = if depth == 0 { first } else { Role::Caller };
            if !runs.is_empty() && self.runs_interpreter(process, address, role) {
                let end = self.run_end(runs);
                self.interpreted_frames(process, &runs[..end]);
                runs = &runs[end..];
                continue;
            }
            let index = self.user_location(process, address, role);
            self.stacks.frames.push(index);
        }
        self.interpreted_frames(process, runs);
    }

    fn runs_interpreter(&mut self, process: &ProcessInfo, address: u64, role: Role) -> bool {
        let lookup = lookup_address(address, role == Role::Caller);
        self.sources
            .interpreted()
            .is_some_and(|source| source.runs_interpreter(process, lookup))
    }

    /// How many of `runs`' frames make its first run: up to and including its entry frame.
    fn run_end(&mut self, runs: &[u64]) -> usize {
        let Some(source) = self.sources.interpreted() else {
            return runs.len();
        };
        runs.iter()
            .position(|&raw| source.is_entry(raw))
            .map_or(runs.len(), |i| i + 1)
    }

    fn interpreted_frames(&mut self, process: &ProcessInfo, raws: &[u64]) {
        for &raw in raws {
            let index = self.interpreted_location(process, raw);
            self.stacks.frames.push(index);
        }
    }

    fn interpreted_location(&mut self, process: &ProcessInfo, raw: u64) -> u32 {
        let key = (process.pid, raw);
        if let Some(&index) = self.interpreted.get(&key) {
            return index;
        }
        let Some(source) = self.sources.interpreted() else {
            return self.synthetic(UNKNOWN_STATIC);
        };
        let (frame, known) = match source.frame(process, raw) {
            Some(frame) => (frame, true),
            None => (Frame::named(source.unnamed()), false),
        };
        self.sources.count_frame(known);
        let mapping = *self.python_mapping.get_or_insert_with(|| {
            self.stacks.mappings.push(MappingInfo::python());
            self.stacks.mappings.len() as u32 - 1
        });
        let index = self.push(Location {
            kind: FrameKind::Python,
            address: 0,
            mapping: Some(mapping),
            frames: std::sync::Arc::new([frame]),
        });
        self.interpreted.insert(key, index);
        index
    }

    fn push(&mut self, location: Location) -> u32 {
        let index = self.stacks.locations.len() as u32;
        self.stacks.locations.push(location);
        index
    }

    fn user_location(&mut self, process: &ProcessInfo, address: u64, role: Role) -> u32 {
        let after_call = match role {
            Role::Leaf => false,
            Role::Caller => true,
            Role::KernelEntry => self.sources.follows_syscall(process, address),
        };
        let lookup = lookup_address(address, after_call);
        if let Some(&index) = self.by_process.get(&(process.pid, lookup)) {
            return index;
        }
        let mapping = process.mapping_for(address);
        let mapping_index = mapping.map(|m| self.mapping(process, m));
        let key = (mapping_index.unwrap_or(u32::MAX), lookup);
        let index = match self.by_mapping.get(&key) {
            Some(&index) => index,
            None => {
                let (kind, frames) = self.sources.user_frames(process, mapping, lookup);
                let index = self.push(Location {
                    kind,
                    address: lookup,
                    mapping: mapping_index,
                    frames,
                });
                self.by_mapping.insert(key, index);
                index
            }
        };
        self.by_process.insert((process.pid, lookup), index);
        index
    }

    fn mapping(&mut self, process: &ProcessInfo, m: &Mapping) -> u32 {
        let key = (m.start, m.end, m.offset);
        let path = self.sources.mapping_name(process, m);
        if let Some(&index) = self.mappings.get(&key).and_then(|same| {
            same.iter()
                .find(|&&i| self.stacks.mappings[i as usize].path == path)
        }) {
            return index;
        }
        let index = self.stacks.mappings.len() as u32;
        let info = MappingInfo {
            path: path.to_owned(),
            ..MappingInfo::of(m, self.sources.build_id(process, m))
        };
        self.stacks.mappings.push(info);
        self.mappings.entry(key).or_default().push(index);
        index
    }

    fn kernel_location(&mut self, lookup: u64) -> u32 {
        if let Some(&index) = self.kernel.get(&lookup) {
            return index;
        }
        let mapping = *self.kernel_mapping.get_or_insert_with(|| {
            self.stacks.mappings.push(MappingInfo::kernel());
            self.stacks.mappings.len() as u32 - 1
        });
        let (kind, frames) = self.sources.kernel_frames(lookup);
        let index = self.push(Location {
            kind,
            address: lookup,
            mapping: Some(mapping),
            frames,
        });
        self.kernel.insert(lookup, index);
        index
    }

    fn synthetic(&mut self, name: &'static str) -> u32 {
        if let Some(&index) = self.synthetic.get(name) {
            return index;
        }
        let index = self.push(Location {
            kind: FrameKind::Synthetic,
            address: 0,
            mapping: None,
            frames: std::sync::Arc::new([Frame::named(name)]),
        });
        self.synthetic.insert(name, index);
        index
    }
}
