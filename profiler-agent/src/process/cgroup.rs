//! The container a process runs in, from its /proc/PID/cgroup lines, for every runtime and
//! cgroup driver in use: Docker (`/docker/<id>`, `docker-<id>.scope`), containerd under
//! Kubernetes with the cgroupfs driver (`/kubepods/.../pod<uid>/<id>`) and the systemd driver
//! (`cri-containerd-<id>.scope` and `...slice:cri-containerd:<id>`), CRI-O (`crio-<id>`),
//! Podman (`libpod-<id>.scope`, rootless too) and nested runtimes such as kind, where the
//! innermost id is the container's. Runtime helper processes (`*-conmon-<id>`) and user
//! session slices are not containers.
//!
//! Ids are cached per pid; a cached id is trusted only while the process start time matches,
//! so a reused pid cannot inherit another process's container.

use std::num::NonZeroUsize;

use lru::LruCache;

use crate::cache::CacheStats;

/// Container id in a whole /proc/PID/cgroup file: the first line that names one. An id is
/// 64 lowercase hex digits, the form every runtime above writes.
pub fn container_id(cgroup_file: &str) -> Option<String> {
    cgroup_file.lines().find_map(container_id_in_line)
}

/// Container id in one `hierarchy:controllers:path` line (cgroup v1 or v2).
pub fn container_id_in_line(line: &str) -> Option<String> {
    let (_, path) = line.split_once(':')?.1.split_once(':')?;
    path.rsplit('/').find_map(container_id_in_segment)
}

fn container_id_in_segment(segment: &str) -> Option<String> {
    let segment = segment.strip_suffix(".scope").unwrap_or(segment);
    // `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>` (containerd, systemd driver).
    let candidate = segment.rsplit(':').next().unwrap_or(segment);
    if candidate.contains("conmon") {
        return None;
    }
    // `docker-<id>`, `cri-containerd-<id>`, `crio-<id>`, `libpod-<id>`, or a bare `<id>`.
    let id = candidate.rsplit('-').next().unwrap_or(candidate);
    is_container_id(id).then(|| id.to_owned())
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// pid -> container id, validated by process start time.
pub struct ContainerIdCache {
    proc_root: std::path::PathBuf,
    entries: LruCache<u32, (u64, Option<String>)>,
    stats: CacheStats,
}

impl ContainerIdCache {
    pub fn new(proc_root: impl Into<std::path::PathBuf>, capacity: usize) -> Self {
        Self {
            proc_root: proc_root.into(),
            entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("max(1)")),
            stats: CacheStats::default(),
        }
    }

    /// The container of `pid`, or None for host processes and processes that are gone.
    pub fn lookup(&mut self, pid: u32) -> Option<String> {
        let dir = self.proc_root.join(pid.to_string());
        let started = super::procfs::stat(&dir)?.start_time;
        if let Some((cached_start, id)) = self.entries.get(&pid)
            && *cached_start == started
        {
            self.stats.hits += 1;
            return id.clone();
        }
        self.stats.misses += 1;
        let id = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|text| container_id(&text));
        if self
            .entries
            .push(pid, (started, id.clone()))
            .is_some_and(|(k, _)| k != pid)
        {
            self.stats.evictions += 1;
        }
        id
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            len: self.entries.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests;
