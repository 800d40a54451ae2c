//! JIT code named from the perf map a runtime writes (`/tmp/perf-<pid>.map`, pid as the
//! process sees it, inside its own root), read through the safe file layer and cached per
//! process. An address of anonymous memory the map does not list is `[jit]`.

use std::{path::PathBuf, rc::Rc, sync::Arc};

use crate::frames::{Found, Frame, FrameKind, FrameSource, MappingClass, Site};
use crate::{
    cache::RoundLru,
    procfile::ProcRoot,
    symbolize::{
        CacheConfig, Demangle, SymbolizeStats,
        perfmap::{self, PerfMap},
    },
};

pub struct PerfMapSource {
    demangle: Demangle,
    proc_root: PathBuf,
    maps: RoundLru<u32, Option<Rc<PerfMap>>>,
}

impl PerfMapSource {
    pub fn new(demangle: Demangle, caches: &CacheConfig) -> Self {
        Self {
            demangle,
            proc_root: PathBuf::from("/proc"),
            maps: RoundLru::new(caches.pid_cache_size, caches.cache_rounds),
        }
    }

    fn map_of(&mut self, pid: u32) -> Option<Rc<PerfMap>> {
        if let Some(cached) = self.maps.get(&pid) {
            return cached;
        }
        // The runtime names the file by its pid in its own namespace, inside its own root.
        let ns_pid = perfmap::namespace_pid_of(&self.proc_root, pid);
        let map = ProcRoot::of_pid(&self.proc_root, pid)
            .and_then(|root| PerfMap::open(&root, ns_pid))
            .inspect_err(|error| {
                if error.is_refusal() {
                    tracing::debug!(pid, %error, reason = error.reason(), "perf map refused");
                }
            })
            .ok()
            .map(Rc::new);
        self.maps.insert(pid, map.clone());
        map
    }
}

impl FrameSource for PerfMapSource {
    fn name(&self) -> &'static str {
        "perf map"
    }

    fn serves(&self, class: MappingClass) -> bool {
        class == MappingClass::Anonymous
    }

    fn kind(&self) -> FrameKind {
        FrameKind::Jit
    }

    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        let map = self.map_of(site.process?.pid)?;
        Some(match map.lookup(site.address) {
            Some(name) => Found::Frames(Arc::new([Frame {
                name: self.demangle.apply(name).into(),
                system_name: name.into(),
                file: None,
                line: 0,
            }])),
            None => Found::Unnamed("[jit]"),
        })
    }

    fn add_stats(&self, stats: &mut SymbolizeStats) {
        stats.pid_cache = self.maps.stats();
    }

    fn next_round(&mut self) {
        self.maps.next_round();
    }
}
