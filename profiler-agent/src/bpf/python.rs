//! The kernel side's list of CPython processes: user space writes a [`PythonProcess`] for
//! each process it finds an interpreter in, and the kernel program walks the Python frames of
//! those processes' samples. Shared by the thread that inspects processes at their first
//! sample and the drain that forgets processes that exited.

use std::{
    collections::HashSet,
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, IterableMap as _, MapData};
use profiler_common::{PythonProcess, PythonStack};

use super::btf;

/// The `PYTHON_PROCESSES` map; cloning shares it.
#[derive(Clone)]
pub struct PythonProcesses(Arc<Mutex<HashMap<MapData, u32, PythonProcess>>>);

impl PythonProcesses {
    pub(super) fn new(map: HashMap<MapData, u32, PythonProcess>) -> Self {
        Self(Arc::new(Mutex::new(map)))
    }

    /// Has the kernel walk `pid`'s Python frames with `info`. False when the map is full.
    pub fn set(&self, pid: u32, info: &PythonProcess) -> bool {
        self.0
            .lock()
            .is_ok_and(|mut map| map.insert(pid, info, 0).is_ok())
    }

    pub fn remove(&self, pid: u32) {
        if let Ok(mut map) = self.0.lock() {
            let _ = map.remove(&pid);
        }
    }

    /// Pids in the map.
    pub fn pids(&self) -> Vec<u32> {
        self.0
            .lock()
            .map(|map| map.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// Forgets the processes that exited.
    pub fn prune(&self, proc_root: &Path) {
        for pid in self.pids() {
            if !proc_root.join(pid.to_string()).exists() {
                self.remove(pid);
            }
        }
    }
}

/// Byte offset of `thread.fsbase` in `struct task_struct`, from the kernel's BTF: where the
/// program finds the sampled thread's thread pointer (x86_64).
pub(super) fn fsbase_offset(kernel_btf: &[u8]) -> Result<u32, btf::BtfError> {
    let thread = btf::member_offset(kernel_btf, "task_struct", "thread")?;
    let fsbase = btf::member_offset(kernel_btf, "thread_struct", "fsbase")?;
    Ok(thread + fsbase)
}

/// Reads the Python stacks the kernel stored since the last read, from both generations,
/// while the drain still owns the maps (its own descriptors of them).
pub struct PythonStackReader {
    maps: [HashMap<MapData, u64, PythonStack>; 2],
    seen: [HashSet<u64>; 2],
}

impl PythonStackReader {
    pub(super) fn new(maps: [HashMap<MapData, u64, PythonStack>; 2]) -> Self {
        Self {
            maps,
            seen: Default::default(),
        }
    }

    /// (pid, frames) of each stack stored since the last call.
    pub fn new_stacks(&mut self) -> Vec<(u32, Vec<u64>)> {
        let mut out = Vec::new();
        for (map, seen) in self.maps.iter().zip(&mut self.seen) {
            let keys: HashSet<u64> = map.keys().filter_map(Result::ok).collect();
            for key in keys.difference(seen) {
                if let Ok(stack) = map.get(key, 0) {
                    let len = usize::from(stack.len).min(stack.frames.len());
                    out.push((stack.pid, stack.frames[..len].to_vec()));
                }
            }
            // The drain empties a generation: its keys are forgotten with it.
            *seen = keys;
        }
        out
    }
}

/// A second handle on a map, for another thread.
pub(super) fn duplicate<V: aya::Pod>(
    map: &HashMap<MapData, u64, V>,
) -> Option<HashMap<MapData, u64, V>> {
    let fd = map.map().fd().as_fd().try_clone_to_owned().ok()?;
    let data = MapData::from_fd(fd).ok()?;
    HashMap::try_from(aya::maps::Map::HashMap(data)).ok()
}
