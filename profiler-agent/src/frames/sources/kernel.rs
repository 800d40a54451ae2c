//! Kernel addresses named from /proc/kallsyms: the addresses of a batch are resolved in one
//! pass over the file ([`FrameSource::prepare`]), and names are kept for `cache_rounds`.

use std::sync::Arc;

use crate::frames::{Found, Frame, FrameKind, FrameSource, MappingClass, Site};
use crate::symbolize::kallsyms::{KernelNames, KernelSymbols};

pub struct KallsymsSource {
    symbols: KernelSymbols,
    names: KernelNames,
}

impl KallsymsSource {
    pub fn new(symbols: KernelSymbols) -> Self {
        Self {
            symbols,
            names: KernelNames::default(),
        }
    }
}

impl FrameSource for KallsymsSource {
    fn name(&self) -> &'static str {
        "kallsyms"
    }

    fn serves(&self, class: MappingClass) -> bool {
        class == MappingClass::Kernel
    }

    fn kind(&self) -> FrameKind {
        FrameKind::Kernel
    }

    fn prepare(&mut self, _: MappingClass, addresses: &[u64]) {
        if let Err(error) = self.names.resolve_missing(&self.symbols, addresses) {
            tracing::warn!(%error, "kernel symbols unavailable");
        }
    }

    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        if self.names.get(site.address).is_none() {
            self.prepare(MappingClass::Kernel, &[site.address]);
        }
        let name = self.names.get(site.address).flatten()?;
        Some(Found::Frames(Arc::new([Frame::named(name)])))
    }

    fn next_round(&mut self) {
        self.names.next_round(&self.symbols);
    }
}
