//! Python frames the kernel program recorded, named from their code objects: the function's
//! qualified name, its `.py` file and the line of the instruction (the `def` line when the
//! instruction is unknown). Each recorded run replaces one native `_PyEval_EvalFrameDefault`
//! frame of the same process.

use std::{path::PathBuf, sync::Arc};

use profiler_common::PY_FRAME_ENTRY;

use crate::{
    frames::{Frame, InterpretedSource},
    process::ProcessInfo,
    python::Interpreters,
    symbolize::SymbolizeStats,
};

/// Shown for a Python frame whose code object could not be read.
pub const UNNAMED_PYTHON: &str = "[python]";

pub struct PythonSource {
    interpreters: Interpreters,
    proc_root: PathBuf,
}

impl PythonSource {
    pub fn new(interpreters: Interpreters) -> Self {
        Self {
            interpreters,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

impl InterpretedSource for PythonSource {
    fn name(&self) -> &'static str {
        "python"
    }

    fn runs_interpreter(&mut self, process: &ProcessInfo, address: u64) -> bool {
        self.interpreters.in_eval(process.pid, address)
    }

    fn is_entry(&self, raw: u64) -> bool {
        raw & PY_FRAME_ENTRY != 0
    }

    fn frame(&mut self, process: &ProcessInfo, raw: u64) -> Option<Frame> {
        let named = self.interpreters.frame(process.pid, raw)?;
        let name: Arc<str> = named.name;
        Some(Frame {
            system_name: name.clone(),
            name,
            file: Some(named.file),
            line: named.line.unwrap_or(named.first_line),
        })
    }

    fn unnamed(&self) -> &'static str {
        UNNAMED_PYTHON
    }

    fn add_stats(&self, stats: &mut SymbolizeStats) {
        let python = self.interpreters.stats();
        stats.python_frames_named += python.frames_named;
        stats.python_frames_unnamed += python.frames_unnamed;
        stats.python_processes += python.processes;
    }

    /// Processes that exited had their last samples named in this interval.
    fn next_round(&mut self) {
        self.interpreters.prune(&self.proc_root);
    }
}
