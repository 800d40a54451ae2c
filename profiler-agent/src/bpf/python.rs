//! The kernel side's list of CPython processes: user space writes a [`PythonProcess`] for
//! each process it finds an interpreter in, and the kernel program walks the Python frames of
//! those processes' samples. Shared by the thread that inspects processes at their first
//! sample and the drain that forgets processes that exited.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, MapData, RingBuf};
use profiler_common::{MAX_PYTHON_DEPTH, PythonProcess, PythonStack};

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

/// The Python stacks the kernel stored for the first time in a generation, announced in the
/// `PYTHON_NEW_STACKS` ring buffer: read from its shared pages, with no system call per
/// stack.
pub struct PythonStackReader {
    ring: RingBuf<MapData>,
}

impl PythonStackReader {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// (pid, frames) of each stack announced since the last call.
    pub fn new_stacks(&mut self) -> Vec<(u32, Vec<u64>)> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(stack) = parse_stack(&item) {
                out.push(stack);
            }
        }
        out
    }
}

/// A [`PythonStack`] from the ring's bytes: `len: u16`, `flags: u16`, `pid: u32`, frames.
fn parse_stack(bytes: &[u8]) -> Option<(u32, Vec<u64>)> {
    if bytes.len() < std::mem::size_of::<PythonStack>() {
        return None;
    }
    let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]])).min(MAX_PYTHON_DEPTH);
    let pid = u32::from_ne_bytes(bytes[4..8].try_into().ok()?);
    let frames = bytes[8..8 + len * 8]
        .chunks_exact(8)
        .map(|f| u64::from_ne_bytes(f.try_into().expect("8 bytes")))
        .collect();
    Some((pid, frames))
}
