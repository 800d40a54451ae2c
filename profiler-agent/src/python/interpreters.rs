//! The CPython processes of one sampler, shared by the three places that meet them:
//!
//! - the early-snapshot thread shows each announced process to [`Interpreters::hook`], which
//!   finds its interpreter ([`super::detect`]) and has the kernel program walk its Python
//!   frames ([`crate::bpf::PythonProcesses`]);
//! - the same thread, every [`NAME_EVERY`], names the code objects of the Python stacks the
//!   kernel stored for the first time since ([`crate::bpf::PythonStackReader`], a ring
//!   buffer), while their processes still run: a short-lived `python3 -c` has exited by the
//!   drain;
//! - the frames stage names each recorded frame ([`Interpreters::frame`]), from the live
//!   process or, once it exited, from what was read while it ran.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use profiler_common::py_frame_parts;

use super::{
    detect::{Interpreter, detect, is_cpython},
    remote::ProcessMemory,
    stack::{CodeNames, PyFrame, RawFrame},
};
use crate::{
    bpf::{KernelSampler, ProcessHook, PythonProcesses, PythonStackReader},
    process::ProcessInfo,
};

/// How often the stacks the kernel stored are named while their processes run.
pub const NAME_EVERY: Duration = Duration::from_millis(200);

/// What Python frames cost and found, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonStats {
    /// Processes whose interpreter the kernel program walks now.
    pub processes: u64,
    /// Frames named, and frames whose code object could not be read, so far.
    pub frames_named: u64,
    pub frames_unnamed: u64,
}

/// One process seen by the hook.
enum Known {
    /// Runs an interpreter, found in the CPython mapping at `key`.
    Python(Box<Live>),
    /// Maps CPython at `key` but could not be read as one: not tried again.
    Unsupported { key: (u64, String) },
}

/// A process whose interpreter the kernel walks.
struct Live {
    key: (u64, String),
    interpreter: Interpreter,
    names: CodeNames<ProcessMemory>,
}

#[derive(Default)]
struct State {
    processes: HashMap<u32, Known>,
    stats: PythonStats,
}

/// The CPython processes of one sampler; cloning shares them.
#[derive(Clone, Default)]
pub struct Interpreters(Arc<Mutex<State>>);

impl Interpreters {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The hook the sampler shows announced processes to, when its kernel side walks Python
    /// frames (`python_enabled` and a kernel that gives the thread pointer).
    pub fn hook(&self, kernel: &mut KernelSampler) -> Option<ProcessHook> {
        let processes = kernel.python_processes()?;
        let mut stacks = kernel.take_python_stacks();
        let this = self.clone();
        let mut last = Instant::now();
        Some(Box::new(move |event: Option<&ProcessInfo>| {
            if let Some(info) = event {
                this.observe(info, &processes);
            }
            if last.elapsed() >= NAME_EVERY {
                last = Instant::now();
                if let Some(stacks) = stacks.as_mut() {
                    this.name_new_stacks(stacks);
                }
            }
        }))
    }

    /// Finds `info`'s interpreter unless it was looked at before in the same mapping.
    fn observe(&self, info: &ProcessInfo, kernel: &PythonProcesses) {
        let pid = info.pid;
        let key = info
            .mappings
            .iter()
            .find(|m| is_cpython(&m.path))
            .map(|m| (m.start, m.path.clone()));
        let Some(key) = key else {
            // An exec'd process that no longer runs Python.
            if self.state().processes.remove(&pid).is_some() {
                kernel.remove(pid);
            }
            return;
        };
        let seen = match self.state().processes.get(&pid) {
            Some(Known::Python(live)) => live.key == key,
            Some(Known::Unsupported { key: k }) => *k == key,
            None => false,
        };
        if seen {
            return;
        }
        let memory = ProcessMemory::new(pid);
        let known = match detect(info, &memory) {
            Ok(Some(interpreter)) => {
                if !kernel.set(pid, &interpreter.layout.kernel_walk(interpreter.runtime)) {
                    tracing::debug!(pid, "Python processes map full");
                }
                tracing::debug!(pid, version = ?interpreter.version, "CPython found");
                Known::Python(Box::new(Live {
                    key,
                    names: CodeNames::new(memory, interpreter.layout),
                    interpreter,
                }))
            }
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(pid, %error, "CPython mapped but not readable");
                kernel.remove(pid);
                Known::Unsupported { key }
            }
        };
        self.state().processes.insert(pid, known);
    }

    /// Names the code objects of the stacks stored since the last call.
    fn name_new_stacks(&self, stacks: &mut PythonStackReader) {
        for (pid, frames) in stacks.new_stacks() {
            let mut state = self.state();
            if let Some(Known::Python(live)) = state.processes.get_mut(&pid) {
                for raw in frames {
                    let _ = live.names.name(raw_frame(raw));
                }
            }
        }
    }

    /// Whether `address` of `pid` is in its interpreter loop (`_PyEval_EvalFrameDefault`).
    pub fn in_eval(&self, pid: u32, address: u64) -> bool {
        match self.state().processes.get(&pid) {
            Some(Known::Python(live)) => live.interpreter.in_eval(address),
            _ => false,
        }
    }

    /// Names a frame the kernel recorded for `pid`; `None` when its code object cannot be
    /// read now and was not read while the process ran.
    pub fn frame(&self, pid: u32, raw: u64) -> Option<PyFrame> {
        let mut state = self.state();
        let named = match state.processes.get_mut(&pid) {
            Some(Known::Python(live)) => live.names.name_or_last(raw_frame(raw)),
            _ => None,
        };
        if named.is_some() {
            state.stats.frames_named += 1;
        } else {
            state.stats.frames_unnamed += 1;
        }
        named
    }

    /// Forgets processes that exited (call after their last samples were named).
    pub fn prune(&self, proc_root: &Path) {
        self.state()
            .processes
            .retain(|pid, _| proc_root.join(pid.to_string()).exists());
    }

    pub fn stats(&self) -> PythonStats {
        let state = self.state();
        PythonStats {
            processes: state
                .processes
                .values()
                .filter(|k| matches!(k, Known::Python(_)))
                .count() as u64,
            ..state.stats
        }
    }
}

/// A recorded frame as the code names take it (an unknown instruction has no line).
fn raw_frame(raw: u64) -> RawFrame {
    let (code, instruction, _) = py_frame_parts(raw);
    RawFrame {
        code,
        instruction: instruction.unwrap_or(u32::MAX),
    }
}
