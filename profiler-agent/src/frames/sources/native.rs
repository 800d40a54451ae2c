//! Native code in mapped files: ELF symbol tables, DWARF (with inline frames) and Go's
//! pclntab, through [`Binary`]. A file is loaded once per file identity (device and inode,
//! held open since the process's first sample) and shared by build id across containers and
//! paths, within the symbol memory budget.

use std::{fs::File, path::PathBuf, rc::Rc};

use crate::frames::{Found, FrameKind, FrameSource, MappingClass, Site};
use crate::{
    cache::RoundLru,
    process::{FileId, Mapping, MappingKind, ProcessInfo},
    symbolize::{
        CacheConfig, Demangle, SymbolizeStats,
        binary::Binary,
        budget::SymbolBudget,
        debuginfo::{self, RootedDebugFinder},
        elf::ElfError,
    },
};

pub struct NativeSource {
    demangle: Demangle,
    proc_root: PathBuf,
    by_file: RoundLru<FileId, Option<Rc<Binary>>>,
    by_build_id: RoundLru<Vec<u8>, Rc<Binary>>,
    /// Shared by every binary loaded here, cached or still referenced.
    budget: SymbolBudget,
    /// Files that are not readable ELF.
    elf_errors: u64,
}

impl NativeSource {
    pub fn new(demangle: Demangle, caches: &CacheConfig, budget: SymbolBudget) -> Self {
        Self {
            demangle,
            proc_root: PathBuf::from("/proc"),
            by_file: RoundLru::new(caches.same_file_cache_size, caches.cache_rounds),
            by_build_id: RoundLru::new(caches.build_id_cache_size, caches.cache_rounds),
            budget,
            elf_errors: 0,
        }
    }

    fn binary_for(&mut self, process: &ProcessInfo, mapping: &Mapping) -> Option<Rc<Binary>> {
        let MappingKind::File { id, file } = &mapping.kind else {
            return None;
        };
        if let Some(cached) = self.by_file.get(id) {
            return cached;
        }
        let loaded = file.as_deref().and_then(|f| self.load(process, mapping, f));
        self.by_file.insert(*id, loaded.clone());
        loaded
    }

    fn load(
        &mut self,
        process: &ProcessInfo,
        mapping: &Mapping,
        file: &File,
    ) -> Option<Rc<Binary>> {
        // The same build id in another container or path is the same binary: reuse it.
        if let Some(id) = debuginfo::read_build_id(file).found()
            && let Some(binary) = self.by_build_id.get(&id)
        {
            return Some(binary);
        }
        let root = self.proc_root.join(format!("{}/root", process.pid));
        let mut finder = RootedDebugFinder::new(root, &mapping.path)
            .with_fallback(self.proc_root.join("1/root"))
            .with_fallback(self.proc_root.join("self/root"));
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
                self.elf_errors += 1;
                tracing::debug!(path = %mapping.path, %error, "not symbolizable");
                None
            }
        }
    }
}

impl FrameSource for NativeSource {
    fn name(&self) -> &'static str {
        "elf"
    }

    fn serves(&self, class: MappingClass) -> bool {
        class == MappingClass::File
    }

    fn kind(&self) -> FrameKind {
        FrameKind::Native
    }

    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        let (process, mapping) = (site.process?, site.mapping?);
        let binary = self.binary_for(process, mapping)?;
        let frames = binary.frames(binary.vaddr_of_file_offset(mapping.file_offset(site.address))?);
        (!frames.is_empty()).then_some(Found::Frames(frames))
    }

    fn build_id(&mut self, process: &ProcessInfo, mapping: &Mapping) -> Option<String> {
        self.binary_for(process, mapping)?.build_id_hex()
    }

    fn read_file(
        &mut self,
        process: &ProcessInfo,
        mapping: &Mapping,
        file_offset: u64,
        buf: &mut [u8],
    ) -> bool {
        self.binary_for(process, mapping)
            .is_some_and(|b| b.read_file_at(file_offset, buf))
    }

    fn add_stats(&self, stats: &mut SymbolizeStats) {
        stats.elf_errors += self.elf_errors;
        stats.same_file_cache = self.by_file.stats();
        stats.build_id_cache = self.by_build_id.stats();
        stats.symbols = self.budget.stats();
    }

    fn next_round(&mut self) {
        self.by_file.next_round();
        self.by_build_id.next_round();
        // Every cached binary is in by_build_id or by_file (those without a build id).
        let cached = self.by_build_id.values().cloned().map(Some);
        for binary in cached.chain(self.by_file.values().cloned()).flatten() {
            binary.release_memory();
        }
    }
}
