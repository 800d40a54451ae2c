//! The seam between the frames stage and what names frames: the [`FrameSource`] trait, and
//! [`Sources`], the ordered set of registered sources the stage asks. A source serves some
//! [`MappingClass`]es; for an address, the sources serving its class are asked in
//! registration order and the first answer wins.

use super::{Frame, FrameKind, Frames, UNKNOWN};
use crate::{
    process::{Mapping, MappingKind, ProcessInfo},
    symbolize::SymbolizeStats,
};

/// What an address is in, which decides the sources asked to name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MappingClass {
    /// A kernel address (no process mapping).
    Kernel,
    /// A mapped file.
    File,
    /// The vdso the kernel maps into every process.
    Vdso,
    /// Anonymous executable memory: JIT-compiled code.
    Anonymous,
}

impl MappingClass {
    pub fn of(mapping: &Mapping) -> Self {
        match mapping.kind {
            MappingKind::File { .. } => Self::File,
            MappingKind::Vdso => Self::Vdso,
            MappingKind::Anonymous => Self::Anonymous,
        }
    }
}

/// An address to name. For user addresses the process and the mapping the address is in;
/// for kernel addresses neither.
#[derive(Clone, Copy, Debug)]
pub struct Site<'a> {
    pub process: Option<&'a ProcessInfo>,
    pub mapping: Option<&'a Mapping>,
    /// The instruction to name (return addresses already adjusted).
    pub address: u64,
}

/// A source's answer.
#[derive(Clone, Debug)]
pub enum Found {
    /// Frames at the address, innermost inline level first; never empty.
    Frames(Frames),
    /// The source knows the region but not the address: show this placeholder (counted as
    /// an unknown frame), as `[jit]` for JIT code missing from its perf map.
    Unnamed(&'static str),
}

/// One way of naming frames (ELF/DWARF/Go symbols, a perf map, the vdso, kallsyms, ...).
pub trait FrameSource {
    /// Short name for logs and tests.
    fn name(&self) -> &'static str;
    /// Whether this source names addresses of this class.
    fn serves(&self, class: MappingClass) -> bool;
    /// The kind of the frames it names.
    fn kind(&self) -> FrameKind;
    /// Frames at `site`, or `None` to let the next source (or the fallback name) answer.
    fn frames(&mut self, site: &Site<'_>) -> Option<Found>;
    /// Called once before a batch of `frames` calls with every address of `class` in it, for
    /// sources that resolve in bulk (kallsyms).
    fn prepare(&mut self, _class: MappingClass, _addresses: &[u64]) {}
    /// The build id of the file behind `mapping`, as lowercase hex.
    fn build_id(&mut self, _process: &ProcessInfo, _mapping: &Mapping) -> Option<String> {
        None
    }
    /// What `mapping` of `process` is shown as, when not its path (JIT code as the runtime's
    /// `[jvm jit]`); asked of the sources serving the mapping's class.
    fn mapping_name(&mut self, _process: &ProcessInfo, _mapping: &Mapping) -> Option<&'static str> {
        None
    }
    /// Fills `buf` from the mapped file at `file_offset` (for instruction checks); false
    /// when this source cannot read it.
    fn read_file(
        &mut self,
        _process: &ProcessInfo,
        _mapping: &Mapping,
        _file_offset: u64,
        _buf: &mut [u8],
    ) -> bool {
        false
    }
    /// Adds this source's cache and memory figures.
    fn add_stats(&self, _stats: &mut SymbolizeStats) {}
    /// Marks the end of a collect interval for the caches' `cache_rounds` rule.
    fn next_round(&mut self) {}
    /// Process `pid` just wrote what this source reads (a JVM asked for its perf map):
    /// forget what is cached for it.
    fn forget(&mut self, _pid: u32) {}
    /// Processes with code in anonymous executable memory this source could not name since
    /// the last call (a JVM with no perf map, or a stale one).
    fn take_unnamed(&mut self) -> Vec<u32> {
        Vec::new()
    }
}

/// Names the frames of an interpreted language that the kernel program recorded beside a
/// native stack (`RawSample::python`), and says which native frames they replace: each run
/// of the interpreter loop is one native frame, and the recorded frames come in runs, each
/// ending (outermost) with an entry frame.
pub trait InterpretedSource {
    /// Short name for logs and tests.
    fn name(&self) -> &'static str;
    /// Whether the native instruction at `address` of `process` is in the interpreter loop.
    fn runs_interpreter(&mut self, process: &ProcessInfo, address: u64) -> bool;
    /// Whether a recorded frame is the outermost of its run.
    fn is_entry(&self, raw: u64) -> bool;
    /// The frame for a recorded value, or `None` when it cannot be named (shown as the
    /// language's unknown frame).
    fn frame(&mut self, process: &ProcessInfo, raw: u64) -> Option<Frame>;
    /// The name shown for a frame that could not be named.
    fn unnamed(&self) -> &'static str;
    /// Marks the end of a collect interval.
    fn next_round(&mut self) {}
    /// Adds this source's figures.
    fn add_stats(&self, _stats: &mut SymbolizeStats) {}
}

/// The instruction that enters the kernel for a system call.
#[cfg(target_arch = "x86_64")]
pub const SYSCALL_INSTRUCTION: [u8; 2] = [0x0f, 0x05];
/// `svc #0`, little endian.
#[cfg(target_arch = "aarch64")]
pub const SYSCALL_INSTRUCTION: [u8; 4] = [0x01, 0x00, 0x00, 0xd4];

/// The registered sources, asked in order, with the counts of named and unnamed frames.
pub struct Sources {
    sources: Vec<Box<dyn FrameSource>>,
    /// Names recorded interpreter frames (one language for now: CPython).
    interpreted: Option<Box<dyn InterpretedSource>>,
    known_frames: u64,
    unknown_frames: u64,
}

impl Sources {
    pub fn new(sources: Vec<Box<dyn FrameSource>>) -> Self {
        Self {
            sources,
            interpreted: None,
            known_frames: 0,
            unknown_frames: 0,
        }
    }

    /// Registers the source of recorded interpreter frames.
    pub fn with_interpreted(mut self, source: Box<dyn InterpretedSource>) -> Self {
        self.interpreted = Some(source);
        self
    }

    /// Puts `source` in place of the registered source of recorded interpreter frames, and
    /// gives that one back.
    pub fn replace_interpreted(
        &mut self,
        source: Option<Box<dyn InterpretedSource>>,
    ) -> Option<Box<dyn InterpretedSource>> {
        std::mem::replace(&mut self.interpreted, source)
    }

    /// The source of recorded interpreter frames, when one is registered.
    pub fn interpreted(&mut self) -> Option<&mut (dyn InterpretedSource + 'static)> {
        self.interpreted.as_deref_mut()
    }

    /// Counts an interpreter frame named (or not) outside [`Sources::user_frames`].
    pub fn count_frame(&mut self, known: bool) {
        if known {
            self.known_frames += 1;
        } else {
            self.unknown_frames += 1;
        }
    }

    /// Names of the registered sources, in the order they are asked, then the interpreted
    /// one.
    pub fn names(&self) -> Vec<&'static str> {
        self.sources
            .iter()
            .map(|s| s.name())
            .chain(self.interpreted.as_ref().map(|s| s.name()))
            .collect()
    }

    pub fn prepare(&mut self, class: MappingClass, addresses: &[u64]) {
        for source in self.sources.iter_mut().filter(|s| s.serves(class)) {
            source.prepare(class, addresses);
        }
    }

    /// Frames at a kernel address; `[unknown]` when no source names it.
    pub fn kernel_frames(&mut self, address: u64) -> (FrameKind, Frames) {
        let site = Site {
            process: None,
            mapping: None,
            address,
        };
        self.ask(MappingClass::Kernel, &site)
            .unwrap_or_else(|| (FrameKind::Kernel, self.unknown(UNKNOWN)))
    }

    /// Frames at a user address of `process` in `mapping` (none when outside every known
    /// mapping): the first registered source that names it, else `module+0xoffset`.
    pub fn user_frames(
        &mut self,
        process: &ProcessInfo,
        mapping: Option<&Mapping>,
        address: u64,
    ) -> (FrameKind, Frames) {
        let Some(mapping) = mapping else {
            return (FrameKind::Native, self.unknown(UNKNOWN));
        };
        let class = MappingClass::of(mapping);
        let site = Site {
            process: Some(process),
            mapping: Some(mapping),
            address,
        };
        if let Some(found) = self.ask(class, &site) {
            return found;
        }
        match class {
            MappingClass::Anonymous => (FrameKind::Jit, self.unknown("[anon]")),
            _ => {
                let name = format!(
                    "{}+0x{:x}",
                    mapping.module_name(),
                    mapping.file_offset(address)
                );
                (FrameKind::Native, self.unknown(name))
            }
        }
    }

    /// The name `mapping` is shown under: the first source's that gives one, else its path.
    pub fn mapping_name<'m>(&mut self, process: &ProcessInfo, mapping: &'m Mapping) -> &'m str {
        let class = MappingClass::of(mapping);
        self.sources
            .iter_mut()
            .filter(|s| s.serves(class))
            .find_map(|s| s.mapping_name(process, mapping))
            .unwrap_or(&mapping.path)
    }

    fn ask(&mut self, class: MappingClass, site: &Site<'_>) -> Option<(FrameKind, Frames)> {
        let (kind, found) = self
            .sources
            .iter_mut()
            .filter(|s| s.serves(class))
            .find_map(|s| Some((s.kind(), s.frames(site)?)))?;
        Some(match found {
            Found::Frames(frames) => {
                self.known_frames += 1;
                (kind, frames)
            }
            Found::Unnamed(name) => (kind, self.unknown(name)),
        })
    }

    fn unknown(&mut self, name: impl Into<std::sync::Arc<str>>) -> Frames {
        self.unknown_frames += 1;
        std::sync::Arc::new([Frame::named(name)])
    }

    /// The build id of the file behind `mapping`, from the first source that has one.
    pub fn build_id(&mut self, process: &ProcessInfo, mapping: &Mapping) -> Option<String> {
        let class = MappingClass::of(mapping);
        self.sources
            .iter_mut()
            .filter(|s| s.serves(class))
            .find_map(|s| s.build_id(process, mapping))
    }

    /// Whether the instruction just before `address` is a system call instruction, so that a
    /// user pc saved on kernel entry is a return address rather than an interrupted one.
    pub fn follows_syscall(&mut self, process: &ProcessInfo, address: u64) -> bool {
        let Some(mapping) = process.mapping_for(address) else {
            return false;
        };
        let Some(offset) = mapping
            .file_offset(address)
            .checked_sub(SYSCALL_INSTRUCTION.len() as u64)
        else {
            return false;
        };
        let class = MappingClass::of(mapping);
        let mut bytes = [0; SYSCALL_INSTRUCTION.len()];
        self.sources
            .iter_mut()
            .filter(|s| s.serves(class))
            .any(|s| s.read_file(process, mapping, offset, &mut bytes))
            && bytes == SYSCALL_INSTRUCTION
    }

    pub fn stats(&self) -> SymbolizeStats {
        let mut stats = SymbolizeStats {
            known_frames: self.known_frames,
            unknown_frames: self.unknown_frames,
            ..SymbolizeStats::default()
        };
        for source in &self.sources {
            source.add_stats(&mut stats);
        }
        if let Some(source) = &self.interpreted {
            source.add_stats(&mut stats);
        }
        stats
    }

    /// Processes with JIT code no source could name since the last call.
    pub fn take_unnamed_jit(&mut self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .sources
            .iter_mut()
            .flat_map(|s| s.take_unnamed())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Process `pid` just wrote what a source reads: every source forgets it.
    pub fn forget(&mut self, pid: u32) {
        for source in &mut self.sources {
            source.forget(pid);
        }
    }

    /// Marks the end of a collect interval for every source's caches.
    pub fn next_round(&mut self) {
        for source in &mut self.sources {
            source.next_round();
        }
        if let Some(source) = &mut self.interpreted {
            source.next_round();
        }
    }
}
