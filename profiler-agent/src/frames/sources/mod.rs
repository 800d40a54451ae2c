//! The registered frame sources, one file each, and their registration: [`native`] lists
//! them in the order they are asked for a mapping class. A new source is one file here, its
//! `mod` line and one entry in [`native`].

mod kernel;
mod native;
mod perfmap;
mod python;
mod runtime;
mod vdso;

use self::{
    kernel::KallsymsSource, native::NativeSource, perfmap::PerfMapSource, python::PythonSource,
    vdso::VdsoSource,
};
pub use self::{python::UNNAMED_PYTHON, runtime::JAVA_INTERPRETER};
use super::{FrameSource, Sources};
use crate::python::Interpreters;
use crate::symbolize::{
    CacheConfig, Demangle,
    budget::{Limits, SymbolBudget},
    kallsyms::KernelSymbols,
};

/// The sources the agent names frames with. `kernel` is none when kernel stacks are not
/// collected or kallsyms could not be read (kernel frames are then `[unknown]`).
/// `python` names the Python frames of the sampler's CPython processes, when it walks them.
pub fn native(
    demangle: Demangle,
    kernel: Option<KernelSymbols>,
    caches: CacheConfig,
    python: Option<Interpreters>,
) -> Sources {
    // One budget for every binary any source loads.
    let budget = SymbolBudget::new(caches.symbol_memory_limit, Limits::default());
    let mut sources: Vec<Box<dyn FrameSource>> = vec![
        Box::new(PerfMapSource::new(demangle, &caches)),
        Box::new(VdsoSource::new(demangle, budget.clone())),
        Box::new(NativeSource::new(demangle, &caches, budget)),
    ];
    if let Some(symbols) = kernel {
        sources.push(Box::new(KallsymsSource::new(symbols)));
    }
    let sources = Sources::new(sources);
    match python {
        Some(interpreters) => sources.with_interpreted(Box::new(PythonSource::new(interpreters))),
        None => sources,
    }
}

/// The source of Python frames, for the CPython processes of one sampler.
pub fn python(interpreters: Interpreters) -> Box<dyn super::InterpretedSource> {
    Box::new(PythonSource::new(interpreters))
}

/// [`native`] with the default caches, no kernel symbols and no Python frames.
pub fn user_only(demangle: Demangle) -> Sources {
    native(demangle, None, CacheConfig::default(), None)
}
