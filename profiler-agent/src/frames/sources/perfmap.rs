//! JIT code named from the perf map a runtime writes (`/tmp/perf-<pid>.map`, pid as the
//! process sees it, inside its own root), read through the safe file layer and cached per
//! process. A runtime appends to its map as it compiles: a process whose code a cached map
//! did not name has its map looked at again at the next interval, and read again when it
//! grew. Names are shown per runtime ([`super::runtime`]); JIT code no map names is shown
//! as the runtime's JIT mapping (`[jvm jit]`, or `[jit]` for a runtime not recognised).

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    rc::Rc,
    sync::Arc,
};

use super::runtime::Runtime;
use crate::frames::{Found, FrameKind, FrameSource, MappingClass, Site};
use crate::{
    cache::RoundLru,
    process::{Mapping, ProcessInfo},
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
    /// Processes with anonymous code no map named, since the last `take_unnamed`.
    unnamed: HashSet<u32>,
    /// The same, since the last round: their maps are looked at again.
    stale: HashSet<u32>,
    /// Maps of stale processes, kept to be reused if their file has not grown.
    rechecked: HashMap<u32, Rc<PerfMap>>,
    /// Each process's runtime, worked out once per round.
    runtimes: HashMap<u32, Runtime>,
}

impl PerfMapSource {
    pub fn new(demangle: Demangle, caches: &CacheConfig) -> Self {
        Self {
            demangle,
            proc_root: PathBuf::from("/proc"),
            maps: RoundLru::new(caches.pid_cache_size, caches.cache_rounds),
            unnamed: HashSet::new(),
            stale: HashSet::new(),
            rechecked: HashMap::new(),
            runtimes: HashMap::new(),
        }
    }

    fn map_of(&mut self, pid: u32) -> Option<Rc<PerfMap>> {
        if let Some(cached) = self.maps.get(&pid) {
            return cached;
        }
        let before = self.rechecked.remove(&pid);
        // The runtime names the file by its pid in its own namespace, inside its own root.
        let ns_pid = perfmap::namespace_pid_of(&self.proc_root, pid);
        let map = ProcRoot::of_pid(&self.proc_root, pid)
            .and_then(|root| PerfMap::open_unless(&root, ns_pid, before.as_ref().map(|m| m.size)))
            .inspect_err(|error| {
                if error.is_refusal() {
                    tracing::debug!(pid, %error, reason = error.reason(), "perf map refused");
                }
            })
            .ok()
            .and_then(|read| match read {
                Some(map) => Some(Rc::new(map)),
                None => before,
            });
        self.maps.insert(pid, map.clone());
        map
    }

    fn runtime_of(&mut self, process: &ProcessInfo) -> Runtime {
        *self
            .runtimes
            .entry(process.pid)
            .or_insert_with(|| Runtime::of(process))
    }

    /// What JIT code of a process of `runtime` is shown as when no map names it: the
    /// runtime's JIT mapping, for a runtime we know or a process that writes a map; `None`
    /// (`[anon]`) for anonymous code of any other process.
    fn jit_label(runtime: Runtime, has_map: bool) -> Option<&'static str> {
        (runtime != Runtime::Unknown || has_map).then(|| runtime.jit_mapping())
    }

    fn missed(&mut self, pid: u32) {
        self.unnamed.insert(pid);
        self.stale.insert(pid);
    }
}

impl FrameSource for PerfMapSource {
    fn name(&self) -> &'static str {
        "perf map"
    }

    /// A JVM that was just asked for its perf map has a new one.
    fn forget(&mut self, pid: u32) {
        self.maps.remove(&pid);
        self.rechecked.remove(&pid);
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

    /// The JIT mapping of a recognised runtime, or of a process that writes a perf map.
    fn mapping_name(&mut self, process: &ProcessInfo, _mapping: &Mapping) -> Option<&'static str> {
        let runtime = self.runtime_of(process);
        Self::jit_label(runtime, self.map_of(process.pid).is_some())
    }

    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        let process = site.process?;
        let runtime = self.runtime_of(process);
        let map = self.map_of(process.pid);
        let name = map.as_deref().and_then(|map| map.lookup(site.address));
        let Some(name) = name else {
            self.missed(process.pid);
            return Self::jit_label(runtime, map.is_some()).map(Found::Unnamed);
        };
        Some(Found::Frames(Arc::new(
            [runtime.frame(name, self.demangle)],
        )))
    }

    fn add_stats(&self, stats: &mut SymbolizeStats) {
        stats.pid_cache = self.maps.stats();
    }

    fn next_round(&mut self) {
        self.maps.next_round();
        self.runtimes.clear();
        // A process not looked up again in a whole round (gone, or no longer sampled) is
        // read afresh if it ever is: what is kept for the recheck stays bounded.
        self.rechecked.clear();
        for pid in std::mem::take(&mut self.stale) {
            if let Some(Some(map)) = self.maps.remove(&pid) {
                self.rechecked.insert(pid, map);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{FileId, MappingKind};

    /// Removes the file when the test ends, passed or not.
    struct Remove(String);

    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A Node.js-like process (this test process, so its root and pid are real) whose map
    /// grows: code the cached map misses is named once the next round reads the map again.
    #[test]
    fn a_map_that_grew_is_read_again_in_the_next_round() {
        let pid = std::process::id();
        let path = Remove(format!("/tmp/perf-{pid}.map"));
        std::fs::write(&path.0, "10000 10 JS:*first /srv/a.js:1:1\n").unwrap();
        let process = ProcessInfo {
            pid,
            exe: Some("/usr/bin/node".into()),
            mappings: vec![
                Mapping {
                    start: 0x1000,
                    end: 0x2000,
                    offset: 0,
                    path: "/usr/bin/node".into(),
                    kind: MappingKind::File {
                        id: FileId {
                            dev_major: 0,
                            dev_minor: 0,
                            inode: 1,
                        },
                        file: None,
                    },
                },
                Mapping {
                    start: 0x10000,
                    end: 0x20000,
                    offset: 0,
                    path: "[anon]".into(),
                    kind: MappingKind::Anonymous,
                },
            ],
            ..ProcessInfo::default()
        };
        let mut source = PerfMapSource::new(Demangle::Full, &CacheConfig::default());
        let name_at = |source: &mut PerfMapSource, address: u64| -> String {
            let site = Site {
                process: Some(&process),
                mapping: process.mappings.get(1),
                address,
            };
            match source.frames(&site) {
                Some(Found::Frames(frames)) => frames[0].name.to_string(),
                Some(Found::Unnamed(name)) => name.to_owned(),
                None => "none".to_owned(),
            }
        };
        assert_eq!(name_at(&mut source, 0x10005), "first");
        assert_eq!(name_at(&mut source, 0x11005), "[node jit]");
        assert_eq!(
            source.mapping_name(&process, &process.mappings[1]),
            Some("[node jit]")
        );
        let mut grown = std::fs::read_to_string(&path.0).unwrap();
        grown.push_str("11000 10 JS:*second /srv/a.js:2:1\n");
        std::fs::write(&path.0, grown).unwrap();
        // Within the round the cached map answers.
        assert_eq!(name_at(&mut source, 0x11005), "[node jit]");
        assert_eq!(source.take_unnamed(), [pid]);
        source.next_round();
        assert_eq!(name_at(&mut source, 0x11005), "second");
        assert_eq!(name_at(&mut source, 0x10005), "first");
        assert!(source.take_unnamed().is_empty());
    }
}
