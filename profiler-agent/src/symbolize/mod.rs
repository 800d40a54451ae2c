//! The symbol readers the frame sources (see [`crate::frames`]) are built on: ELF symbol
//! tables, DWARF with inline frames and Go's pclntab behind [`binary::Binary`], debug files
//! found by build id or debug link, perf JIT maps, kallsyms, demangling, and the symbol
//! memory budget all loaded binaries share. Also the [`Frame`] they produce and the cache
//! sizes they are configured with.

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

use std::sync::Arc;

pub use demangle::Demangle;

use self::budget::BudgetStats;
use crate::cache::CacheStats;

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

/// Counts of what the frame sources could and could not name, and of their caches.
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
    /// Python frames named and not, and the processes whose frames the kernel walks.
    pub python_frames_named: u64,
    pub python_frames_unnamed: u64,
    pub python_processes: u64,
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
