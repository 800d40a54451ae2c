//! Turns sampled addresses into frames. A user address goes through the process snapshot's
//! mapping to the mapped file (held open since the first sample), loaded once per file into a
//! [`binary::Binary`] that answers from Go's pclntab, DWARF (with inline frames) or the symbol
//! tables. The vdso is read from memory; anonymous code is named from a perf JIT map when the
//! runtime writes one. Kernel addresses go through /proc/kallsyms. Whatever cannot be named
//! becomes `module+0xoffset` when the module is known and `[unknown]` otherwise, so no sample
//! is dropped for lack of a name.

pub mod binary;
pub mod budget;
pub mod debuginfo;
pub mod demangle;
pub mod dwarf;
pub mod elf;
pub mod filedata;
pub mod gopclntab;
pub mod kallsyms;
pub mod perfmap;
pub mod sections;

use std::{fs::File, path::PathBuf, rc::Rc, sync::Arc};

pub use demangle::Demangle;

use self::{
    binary::Binary,
    budget::{BudgetStats, Limits, SymbolBudget},
    elf::ElfError,
    perfmap::PerfMap,
};
use crate::{
    cache::{CacheStats, RoundLru},
    process::{FileId, Mapping, MappingKind, ProcessInfo},
};

/// The instruction that enters the kernel for a system call.
#[cfg(target_arch = "x86_64")]
const SYSCALL_INSTRUCTION: [u8; 2] = [0x0f, 0x05];
/// `svc #0`, little endian.
#[cfg(target_arch = "aarch64")]
const SYSCALL_INSTRUCTION: [u8; 4] = [0x01, 0x00, 0x00, 0xd4];

/// The name given to a frame nothing could identify.
pub const UNKNOWN: &str = "[unknown]";

/// One line of a location: a function, possibly inlined into the next frame. The strings
/// are shared: a symbolizer hands out the same name for every address of a function.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Display name after demangling.
    pub name: Arc<str>,
    /// The symbol as found in the binary (mangled).
    pub system_name: Arc<str>,
    pub file: Option<Arc<str>>,
    /// 0 when unknown.
    pub line: u32,
}

/// The frames at one address, innermost inline level first; cheap to clone.
pub type Frames = Arc<[Frame]>;

impl Frame {
    pub fn named(name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        Self {
            system_name: name.clone(),
            name,
            file: None,
            line: 0,
        }
    }
}

/// Counts of what the symbolizer could and could not name, and of its caches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolizeStats {
    pub known_frames: u64,
    pub unknown_frames: u64,
    /// Files that are not readable ELF.
    pub elf_errors: u64,
    pub same_file_cache: CacheStats,
    pub build_id_cache: CacheStats,
    pub pid_cache: CacheStats,
    /// The symbol memory budget: bytes in use, and what was left out for lack of it.
    pub symbols: BudgetStats,
}

/// The seam between the profile builder and symbol sources.
pub trait Symbolizer {
    /// Frames at `address`, innermost inline level first; never empty.
    fn user_frames(&mut self, process: &ProcessInfo, address: u64) -> Frames;
    /// Whether the instruction just before `address` is a system call instruction, so that a
    /// user pc saved on kernel entry is a return address rather than an interrupted one.
    fn follows_syscall(&mut self, _process: &ProcessInfo, _address: u64) -> bool {
        false
    }
    /// Resolves kernel addresses in one batch ahead of [`Symbolizer::kernel_frame`] calls.
    fn prepare_kernel(&mut self, _addresses: &[u64]) {}
    fn kernel_frame(&mut self, address: u64) -> Frame;
    /// The build id of the file behind `mapping`, as lowercase hex.
    fn build_id(&mut self, process: &ProcessInfo, mapping: &Mapping) -> Option<String>;
    fn stats(&self) -> SymbolizeStats;
    /// Marks the end of a collect interval for the caches' `cache_rounds` rule.
    fn next_round(&mut self) {}
}

/// Cache sizes with pyroscope.ebpf's names and defaults.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    pub pid_cache_size: usize,
    pub build_id_cache_size: usize,
    pub same_file_cache_size: usize,
    pub cache_rounds: u64,
    /// Bytes all loaded binaries' symbol data may take together (`symbol_memory_limit`).
    pub symbol_memory_limit: u64,
}

/// The default `symbol_memory_limit`: 64 MiB.
pub const DEFAULT_SYMBOL_MEMORY_LIMIT: u64 = 64 << 20;

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            pid_cache_size: 32,
            build_id_cache_size: 64,
            same_file_cache_size: 8,
            cache_rounds: 3,
            symbol_memory_limit: DEFAULT_SYMBOL_MEMORY_LIMIT,
        }
    }
}

/// Symbolizes native code of any process on the host, including inside containers.
pub struct NativeSymbolizer {
    demangle: Demangle,
    proc_root: PathBuf,
    by_file: RoundLru<FileId, Option<Rc<Binary>>>,
    by_build_id: RoundLru<Vec<u8>, Rc<Binary>>,
    perf_maps: RoundLru<u32, Option<Rc<PerfMap>>>,
    vdso: Option<Option<Rc<Binary>>>,
    kernel: Option<kallsyms::KernelSymbols>,
    kernel_names: kallsyms::KernelNames,
    /// Shared by every binary loaded here, cached or still referenced.
    budget: SymbolBudget,
    stats: SymbolizeStats,
}

impl NativeSymbolizer {
    pub fn new(demangle: Demangle, kernel: Option<kallsyms::KernelSymbols>) -> Self {
        Self::with_caches(demangle, kernel, CacheConfig::default())
    }

    pub fn with_caches(
        demangle: Demangle,
        kernel: Option<kallsyms::KernelSymbols>,
        caches: CacheConfig,
    ) -> Self {
        Self {
            demangle,
            proc_root: PathBuf::from("/proc"),
            by_file: RoundLru::new(caches.same_file_cache_size, caches.cache_rounds),
            by_build_id: RoundLru::new(caches.build_id_cache_size, caches.cache_rounds),
            perf_maps: RoundLru::new(caches.pid_cache_size, caches.cache_rounds),
            vdso: None,
            kernel,
            kernel_names: Default::default(),
            budget: SymbolBudget::new(caches.symbol_memory_limit, Limits::default()),
            stats: SymbolizeStats::default(),
        }
    }

    fn binary_for(&mut self, process: &ProcessInfo, mapping: &Mapping) -> Option<Rc<Binary>> {
        match &mapping.kind {
            MappingKind::File { id, file } => {
                if let Some(cached) = self.by_file.get(id) {
                    return cached;
                }
                let loaded = file.as_deref().and_then(|f| self.load(process, mapping, f));
                self.by_file.insert(*id, loaded.clone());
                loaded
            }
            MappingKind::Vdso => self.vdso(),
            MappingKind::Anonymous => None,
        }
    }

    fn load(
        &mut self,
        process: &ProcessInfo,
        mapping: &Mapping,
        file: &File,
    ) -> Option<Rc<Binary>> {
        // The same build id in another container or path is the same binary: reuse it.
        if let Some(id) = quick_build_id(file)
            && let Some(binary) = self.by_build_id.get(&id)
        {
            return Some(binary);
        }
        let root = self.proc_root.join(format!("{}/root", process.pid));
        let mut finder = debuginfo::RootedDebugFinder::new(root, &mapping.path);
        match Binary::load_with(file, &mut finder, &self.budget) {
            Ok(binary) => {
                let binary = Rc::new(binary.with_demangle(self.demangle));
                if let Some(id) = binary.build_id() {
                    self.by_build_id.insert(id.to_vec(), binary.clone());
                }
                Some(binary)
            }
            // Counted by the budget with its reason.
            Err(ElfError::OverBudget) => None,
            Err(error) => {
                self.stats.elf_errors += 1;
                tracing::debug!(path = %mapping.path, %error, "not symbolizable");
                None
            }
        }
    }

    fn vdso(&mut self) -> Option<Rc<Binary>> {
        self.vdso
            .get_or_insert_with(|| {
                read_own_vdso()
                    .and_then(|bytes| Binary::from_vec_with(bytes, &self.budget).ok())
                    .map(|b| Rc::new(b.with_demangle(self.demangle)))
            })
            .clone()
    }

    fn perf_map(&mut self, pid: u32) -> Option<Rc<PerfMap>> {
        if let Some(cached) = self.perf_maps.get(&pid) {
            return cached;
        }
        // The runtime names the file by its pid in its own namespace, inside its own root.
        let ns_pid = perfmap::namespace_pid_of(&self.proc_root, pid);
        let map = crate::procfile::ProcRoot::of_pid(&self.proc_root, pid)
            .and_then(|root| PerfMap::open(&root, ns_pid))
            .inspect_err(|error| {
                if error.is_refusal() {
                    tracing::debug!(pid, %error, reason = error.reason(), "perf map refused");
                }
            })
            .ok()
            .map(Rc::new);
        self.perf_maps.insert(pid, map.clone());
        map
    }

    fn unknown(&mut self, name: String) -> Frames {
        self.stats.unknown_frames += 1;
        Arc::new([Frame::named(name)])
    }
}

impl Symbolizer for NativeSymbolizer {
    fn user_frames(&mut self, process: &ProcessInfo, address: u64) -> Frames {
        let Some(mapping) = process.mapping_for(address) else {
            return self.unknown(UNKNOWN.to_owned());
        };
        let file_offset = mapping.file_offset(address);
        if let MappingKind::Anonymous = mapping.kind {
            return match self.perf_map(process.pid) {
                Some(map) => match map.lookup(address) {
                    Some(name) => {
                        self.stats.known_frames += 1;
                        let frame = Frame {
                            name: self.demangle.apply(name).into(),
                            system_name: name.into(),
                            file: None,
                            line: 0,
                        };
                        Arc::new([frame])
                    }
                    None => self.unknown("[jit]".to_owned()),
                },
                None => self.unknown("[anon]".to_owned()),
            };
        }
        let frames = self
            .binary_for(process, mapping)
            .and_then(|b| Some(b.frames(b.vaddr_of_file_offset(file_offset)?)))
            .filter(|frames| !frames.is_empty());
        match frames {
            Some(frames) => {
                self.stats.known_frames += 1;
                frames
            }
            None => self.unknown(format!("{}+0x{file_offset:x}", mapping.module_name())),
        }
    }

    fn follows_syscall(&mut self, process: &ProcessInfo, address: u64) -> bool {
        let Some(mapping) = process.mapping_for(address) else {
            return false;
        };
        let Some(offset) = mapping
            .file_offset(address)
            .checked_sub(SYSCALL_INSTRUCTION.len() as u64)
        else {
            return false;
        };
        self.binary_for(process, mapping)
            .and_then(|b| b.file_bytes(offset))
            .is_some_and(|bytes| bytes == SYSCALL_INSTRUCTION)
    }

    fn prepare_kernel(&mut self, addresses: &[u64]) {
        let Some(kernel) = &self.kernel else { return };
        if let Err(error) = self.kernel_names.resolve_missing(kernel, addresses) {
            tracing::warn!(%error, "kernel symbols unavailable");
        }
    }

    fn kernel_frame(&mut self, address: u64) -> Frame {
        if self.kernel_names.get(address).is_none() {
            self.prepare_kernel(&[address]);
        }
        match self.kernel_names.get(address).flatten() {
            Some(name) => {
                self.stats.known_frames += 1;
                Frame::named(name)
            }
            None => {
                self.stats.unknown_frames += 1;
                Frame::named(UNKNOWN)
            }
        }
    }

    fn build_id(&mut self, process: &ProcessInfo, mapping: &Mapping) -> Option<String> {
        self.binary_for(process, mapping)?.build_id_hex()
    }

    fn stats(&self) -> SymbolizeStats {
        SymbolizeStats {
            same_file_cache: self.by_file.stats(),
            build_id_cache: self.by_build_id.stats(),
            pid_cache: self.perf_maps.stats(),
            symbols: self.budget.stats(),
            ..self.stats
        }
    }

    fn next_round(&mut self) {
        self.by_file.next_round();
        self.by_build_id.next_round();
        self.perf_maps.next_round();
        // Every cached binary is in by_build_id or by_file (those without a build id).
        let cached = self.by_build_id.values().cloned().map(Some);
        for binary in cached.chain(self.by_file.values().cloned()).flatten() {
            binary.release_memory();
        }
        if let Some(kernel) = &self.kernel {
            self.kernel_names.next_round(kernel);
        }
    }
}

/// The build id note, read without loading symbol tables or mapping the file.
fn quick_build_id(file: &File) -> Option<Vec<u8>> {
    debuginfo::read_build_id(file).found()
}

/// The vdso image of this process: every process on the host maps the same one.
fn read_own_vdso() -> Option<Vec<u8>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[vdso]"))?;
    let (start, end) = line.split_whitespace().next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let len = usize::try_from(end.checked_sub(start)?).ok()?;
    if len > 1 << 20 {
        return None;
    }
    let mut mem = File::open("/proc/self/mem").ok()?;
    mem.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = vec![0; len];
    mem.read_exact(&mut buf).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{ProcessSource as _, ProcfsProcesses};

    /// This test binary's DWARF (hundreds of MiB unoptimized) does not fit the default
    /// budget: its functions keep their symbol names, without lines, within the limit.
    #[test]
    fn a_binary_over_the_default_budget_keeps_its_names() {
        let me = std::process::id();
        let info = ProcfsProcesses::default().snapshot(me, "test");
        let mut s = NativeSymbolizer::new(Demangle::Simplified, None);
        let here = a_binary_over_the_default_budget_keeps_its_names as *const () as u64;
        let frames = s.user_frames(&info, here);
        assert!(
            frames[0]
                .name
                .ends_with("a_binary_over_the_default_budget_keeps_its_names"),
            "{frames:?}"
        );
        assert_eq!(frames[0].line, 0);
        let stats = s.stats();
        assert!(stats.symbols.degraded(budget::Degraded::Budget) >= 1);
        assert!(stats.symbols.used > 0);
        assert!(stats.symbols.used <= DEFAULT_SYMBOL_MEMORY_LIMIT);
        drop(s);
    }

    #[test]
    fn names_own_code_and_vdso() {
        let me = std::process::id();
        let info = ProcfsProcesses::default().snapshot(me, "test");
        let caches = CacheConfig {
            symbol_memory_limit: u64::MAX,
            ..CacheConfig::default()
        };
        let mut s = NativeSymbolizer::with_caches(Demangle::Simplified, None, caches);
        let here = names_own_code_and_vdso as *const () as u64;
        let frames = s.user_frames(&info, here);
        assert!(
            frames
                .last()
                .unwrap()
                .name
                .ends_with("names_own_code_and_vdso"),
            "{frames:?}"
        );
        assert!(frames.last().unwrap().line > 0);
        let vdso = info
            .mappings
            .iter()
            .find(|m| matches!(m.kind, MappingKind::Vdso))
            .unwrap();
        let vdso_binary = s.vdso().expect("vdso image");
        // Any exported vdso function resolves to a real name.
        let some = (vdso.start..vdso.end)
            .step_by(16)
            .map(|a| s.user_frames(&info, a))
            .find(|f| f[0].name.contains("clock_gettime") || f[0].name.contains("gettimeofday"));
        assert!(some.is_some(), "no vdso function named");
        assert!(!vdso_binary.has_dwarf() || vdso_binary.has_dwarf());
        let stats = s.stats();
        assert!(stats.known_frames > 0);
        assert!(stats.same_file_cache.misses >= 1);
    }

    #[test]
    fn unknown_and_anonymous_addresses_keep_a_name() {
        let info = ProcessInfo {
            pid: u32::MAX - 2,
            mappings: vec![Mapping {
                start: 0x1000,
                end: 0x2000,
                offset: 0,
                path: "[anon]".into(),
                kind: MappingKind::Anonymous,
            }],
            ..ProcessInfo::default()
        };
        let mut s = NativeSymbolizer::new(Demangle::None, None);
        assert_eq!(&*s.user_frames(&info, 0x10)[0].name, UNKNOWN);
        assert_eq!(&*s.user_frames(&info, 0x1010)[0].name, "[anon]");
        assert_eq!(s.stats().unknown_frames, 2);
    }
}
