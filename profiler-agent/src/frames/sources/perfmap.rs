//! JIT code named from the perf map a runtime writes (`/tmp/perf-<pid>.map`, pid as the
//! process sees it, inside its own root), read through the safe file layer and cached per
//! process. An address of anonymous memory the map does not list is `[jit]`.

use std::{collections::HashSet, path::PathBuf, rc::Rc, sync::Arc};

use crate::frames::{Found, Frame, FrameKind, FrameSource, MappingClass, Site};
use crate::{
    cache::RoundLru,
    procfile::ProcRoot,
    symbolize::{
        CacheConfig, Demangle, SymbolizeStats,
        perfmap::{self, PerfMap},
    },
};

/// What a HotSpot perf map entry (`Compiler.perfmap`) is shown as: `long Hot.mix(long)` as
/// `Hot.mix` (the signature stays in the system name), the template interpreter as
/// `[java interpreter]`; `None` for names of other runtimes.
fn java_name(name: &str) -> Option<String> {
    if name == "Interpreter" {
        return Some(JAVA_INTERPRETER.to_owned());
    }
    let (before, _) = name.strip_suffix(')')?.split_once('(')?;
    let (_return_type, method) = before.rsplit_once(' ')?;
    (method.contains('.') && !method.is_empty()).then(|| method.to_owned())
}

/// Frames of HotSpot's template interpreter: one per interpreted activation.
pub const JAVA_INTERPRETER: &str = "[java interpreter]";

pub struct PerfMapSource {
    demangle: Demangle,
    proc_root: PathBuf,
    maps: RoundLru<u32, Option<Rc<PerfMap>>>,
    /// Processes with anonymous code no map named, since the last `take_unnamed`.
    unnamed: HashSet<u32>,
}

impl PerfMapSource {
    pub fn new(demangle: Demangle, caches: &CacheConfig) -> Self {
        Self {
            demangle,
            proc_root: PathBuf::from("/proc"),
            maps: RoundLru::new(caches.pid_cache_size, caches.cache_rounds),
            unnamed: HashSet::new(),
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

    /// A JVM that was just asked for its perf map has a new one.
    fn forget(&mut self, pid: u32) {
        self.maps.remove(&pid);
    }

    fn take_unnamed(&mut self) -> Vec<u32> {
        self.unnamed.drain().collect()
    }

    fn serves(&self, class: MappingClass) -> bool {
        class == MappingClass::Anonymous
    }

    fn kind(&self) -> FrameKind {
        FrameKind::Jit
    }

    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        let pid = site.process?.pid;
        let Some(map) = self.map_of(pid) else {
            self.unnamed.insert(pid);
            return None;
        };
        let found = map.lookup(site.address);
        if found.is_none() {
            self.unnamed.insert(pid);
        }
        Some(match found {
            Some(name) => Found::Frames(Arc::new([Frame {
                name: match java_name(name) {
                    Some(java) => java.into(),
                    None => self.demangle.apply(name).into(),
                },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hotspot_names_lose_their_return_type_and_parameters() {
        assert_eq!(java_name("long Hot.mix(long)").as_deref(), Some("Hot.mix"));
        assert_eq!(
            java_name("java.lang.String com.x.Y$Z.run(int, java.lang.Object[])").as_deref(),
            Some("com.x.Y$Z.run")
        );
        assert_eq!(java_name("Interpreter").as_deref(), Some(JAVA_INTERPRETER));
        // Other runtimes' names are left to the demangler.
        assert_eq!(java_name("LazyCompile:*fib /srv/x.js:1"), None);
        assert_eq!(java_name("_ZN3foo3barEv"), None);
        assert_eq!(java_name("stub (x)"), None);
    }
}
