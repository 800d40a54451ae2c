//! The frames stage: turns the raw stacks of some samples into resolved stacks before any
//! aggregation. Every location of a resolved stack is one instruction with its kind (kernel,
//! native, JIT, interpreted, synthetic), its mapping and its frames (inline levels, innermost
//! first). The stage owns return-address adjustment (a caller's address names the call, the
//! byte before the return address), interns locations and mappings so equal ones are stored
//! once, and puts a synthetic frame where the kernel could not record a stack.
//!
//! Names come from [`FrameSource`]s, chosen by the class of the mapping an address falls in
//! ([`MappingClass`]): see [`sources`] for the registered ones, in the order they are asked.
//! Frames an interpreter ran, which the kernel program recorded beside the native stack
//! (Python), come from an [`InterpretedSource`] and take the place of the native frames of
//! the interpreter loop that ran them.
//! Whatever no source names becomes `module+0xoffset` when the module is known and
//! `[unknown]` otherwise, so no sample is dropped for lack of a name.

mod resolve;
mod source;
pub mod sources;

pub use resolve::{prepare, resolve};
pub use source::{
    Found, FrameSource, InterpretedSource, MappingClass, SYSCALL_INSTRUCTION, Site, Sources,
};

pub use crate::symbolize::{Frame, Frames, UNKNOWN};
use crate::{process::Mapping, sampler::RawSample};

/// Name of the mapping kernel frames belong to, as perf names it.
pub const KERNEL_MAPPING: &str = "[kernel.kallsyms]";
/// Name of the mapping Python frames belong to: they are functions of the interpreter, at
/// no address of their own.
pub const PYTHON_MAPPING: &str = "[python]";
/// Frame standing in for a user stack the kernel could not record.
pub const LOST_USER_STACK: &str = "[lost user stack]";
/// Frame standing in for a kernel stack the kernel could not record.
pub const LOST_KERNEL_STACK: &str = "[lost kernel stack]";

/// What kind of code a location is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// The kernel, named from kallsyms.
    Kernel,
    /// Machine code from a file (ELF, DWARF, Go) or the vdso.
    Native,
    /// Code generated at run time (anonymous executable memory), named from a perf map.
    Jit,
    /// A Python function, named from the interpreter's code object.
    Python,
    /// A frame that stands for no instruction: a lost stack, the thread name.
    Synthetic,
}

/// A mapping as a profile shows it; shared by every location in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingInfo {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub path: String,
    /// Lowercase hex, when the file has one.
    pub build_id: Option<String>,
}

impl MappingInfo {
    fn of(mapping: &Mapping, build_id: Option<String>) -> Self {
        Self {
            start: mapping.start,
            end: mapping.end,
            offset: mapping.offset,
            path: mapping.path.clone(),
            build_id,
        }
    }

    /// The mapping of Python frames.
    pub fn python() -> Self {
        Self {
            start: 0,
            end: 0,
            offset: 0,
            path: PYTHON_MAPPING.to_owned(),
            build_id: None,
        }
    }

    /// The kernel's mapping: every kernel address.
    pub fn kernel() -> Self {
        Self {
            start: 0xffff_8000_0000_0000,
            end: u64::MAX,
            offset: 0,
            path: KERNEL_MAPPING.to_owned(),
            build_id: None,
        }
    }
}

/// One instruction of a resolved stack.
#[derive(Clone, Debug)]
pub struct Location {
    pub kind: FrameKind,
    /// The instruction named: the sampled pc, or the byte before a return address. 0 for
    /// synthetic frames.
    pub address: u64,
    /// Index into [`Stacks::mappings`]; none for an address outside every known mapping and
    /// for synthetic frames.
    pub mapping: Option<u32>,
    /// Innermost inline level first; never empty.
    pub frames: Frames,
}

/// One sample with its resolved stack.
#[derive(Clone, Debug)]
pub struct ResolvedSample<'a> {
    pub sample: &'a RawSample,
    /// The container of the sampled process, from its snapshot.
    pub container_id: Option<&'a str>,
    /// Where its stack is in [`Stacks::frames`] (see [`Stacks::stack`]).
    pub stack: std::ops::Range<u32>,
}

/// The resolved stacks of some samples, with their distinct locations and mappings: a
/// location or mapping seen in several stacks (or processes sharing a mapped file at the
/// same address) is stored once.
///
/// Every location is used by some stack, and locations are numbered in the order stacks
/// first use them (walking samples in order, each stack leaf first).
#[derive(Clone, Debug, Default)]
pub struct Stacks<'a> {
    pub mappings: Vec<MappingInfo>,
    pub locations: Vec<Location>,
    pub samples: Vec<ResolvedSample<'a>>,
    /// Every sample's stack, one after the other: indices into `locations`.
    pub frames: Vec<u32>,
}

impl Stacks<'_> {
    /// A sample's stack: indices into [`Stacks::locations`], leaf first (kernel frames, then
    /// user frames).
    pub fn stack(&self, sample: &ResolvedSample<'_>) -> &[u32] {
        &self.frames[sample.stack.start as usize..sample.stack.end as usize]
    }

    pub fn location(&self, index: u32) -> &Location {
        &self.locations[index as usize]
    }

    pub fn total_samples(&self) -> u64 {
        self.samples.iter().map(|s| s.sample.count).sum()
    }
}

#[cfg(test)]
mod tests;
