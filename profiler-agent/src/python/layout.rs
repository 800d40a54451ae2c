//! Byte offsets of the CPython structures a stack walk reads, per minor version. Each table
//! names its source. A table is used only for the minor version it was written for.

use profiler_common::{PY_NO_OFFSET, PythonProcess};

/// Offsets into CPython's structures (x86_64), and sizes of the object headers read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: (u8, u8),
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState.next` and `.threads.head` (before 3.11: `.tstate_head`).
    pub interp_next: u64,
    pub interp_threads_head: u64,
    /// `PyThreadState.next`, `.thread_id` (`pthread_self()`), `.native_thread_id` (3.11+),
    /// and where the thread's frame is found: `.cframe` (3.11, 3.12), `.current_frame`
    /// (3.13) or `.frame` (before 3.11).
    pub thread_next: u64,
    pub thread_id: u64,
    pub thread_native_id: Option<u64>,
    pub thread_frame: u64,
    /// `_PyCFrame.current_frame`; none in 3.13 and before 3.11, whose thread points at its
    /// frame.
    pub cframe_current_frame: Option<u64>,
    /// The frame's code object, its caller and its instruction: `_PyInterpreterFrame.f_code`
    /// (3.13: `.f_executable`), `.previous`, `.prev_instr` (3.13: `.instr_ptr`, the
    /// instruction running); before 3.11 `PyFrameObject.f_code`, `.f_back`, `.f_lasti`.
    pub frame_code: u64,
    pub frame_previous: u64,
    pub frame_instruction: u64,
    /// What `frame_instruction` holds.
    pub instruction: Instruction,
    /// `_PyInterpreterFrame.owner` (3.12's `FRAME_OWNED_BY_CSTACK` marks a shim frame
    /// between C and Python, not a Python call); none before 3.11.
    pub frame_owner: Option<u64>,
    /// How the frames that begin a run of the interpreter loop are told.
    pub entry: Entry,
    /// `PyCodeObject.co_filename`, `.co_qualname` (before 3.11, `.co_name`: the bare
    /// function name), the line table (`.co_linetable`, before 3.10 `.co_lnotab`) and
    /// `.co_firstlineno`.
    pub code_filename: u64,
    pub code_name: u64,
    pub code_linetable: u64,
    pub code_firstlineno: u64,
    /// The format of the line table.
    pub line_table: LineTable,
    /// `PyASCIIObject`: `length`, `state`, and its size (where a compact ASCII string's
    /// characters start); `PyCompactUnicodeObject`'s size (where other compact strings'
    /// characters start).
    pub unicode_length: u64,
    pub unicode_state: u64,
    pub ascii_size: u64,
    pub compact_size: u64,
    /// `PyVarObject.ob_size` and `PyBytesObject.ob_sval`.
    pub bytes_size: u64,
    pub bytes_data: u64,
}

/// What a frame's instruction field holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    /// A pointer to the instruction inside the code object, whose instructions start at
    /// `code_instructions` (`co_code_adaptive`, 3.11+).
    Pointer { code_instructions: u64 },
    /// `int f_lasti`, the index of the last instruction started in 2-byte code units, -1
    /// before the first (3.10).
    LastiUnits,
    /// `int f_lasti`, the same in bytes (3.8, 3.9).
    LastiBytes,
}

/// How the first frame of each run of the interpreter loop (one native
/// `_PyEval_EvalFrameDefault` frame) is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `_PyInterpreterFrame.is_entry` at this offset (3.11).
    Field(u64),
    /// The frame under a C-stack shim frame (3.12+).
    CStackShim,
    /// Every frame is its own run (before 3.11).
    EveryFrame,
}

/// The format of a code object's line table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTable {
    /// `co_lnotab` (3.8, 3.9): (unsigned byte-offset delta, signed line delta) pairs, each
    /// line delta applying from the offset reached.
    Lnotab,
    /// `co_linetable` of 3.10: (unsigned byte-offset delta, signed line delta) pairs, each
    /// pair one range of bytes; a line delta of -128 means the range has no line.
    Ranges310,
    /// `co_linetable` of 3.11+ (`Objects/locations.md`).
    Locations,
}

/// Words of CPython 3.13's `_Py_DebugOffsets`.
pub const DEBUG_OFFSETS_313_WORDS: usize = 73;

/// The fields before 3.11, whose frames are `PyFrameObject`s and whose code objects have
/// no qualified name.
const BEFORE_311: Layout = Layout {
    version: (3, 0),
    runtime_interpreters_head: 32,
    interp_next: 0,
    interp_threads_head: 8,
    thread_next: 8,
    thread_id: 176,
    thread_native_id: None,
    thread_frame: 24,
    cframe_current_frame: None,
    frame_code: 32,
    frame_previous: 24,
    frame_instruction: 104,
    instruction: Instruction::LastiBytes,
    frame_owner: None,
    entry: Entry::EveryFrame,
    code_filename: 104,
    code_name: 112,
    code_linetable: 120,
    code_firstlineno: 40,
    line_table: LineTable::Lnotab,
    unicode_length: 16,
    unicode_state: 32,
    ascii_size: 48,
    compact_size: 72,
    bytes_size: 16,
    bytes_data: 32,
};

/// CPython 3.8: from its headers `Include/internal/pycore_pystate.h` (`_PyRuntimeState`,
/// `PyInterpreterState.tstate_head`), `Include/cpython/pystate.h` (`PyThreadState.frame`,
/// `.thread_id`), `Include/frameobject.h` (`f_back`, `f_code`, `int f_lasti` in bytes),
/// `Include/code.h` (`co_name`, `co_lnotab`) and `Include/cpython/unicodeobject.h`, checked
/// against pyenv's 3.8 headers when installed.
pub const PY38: Layout = Layout {
    version: (3, 8),
    ..BEFORE_311
};

/// CPython 3.9: the same fields, now in `Include/internal/pycore_runtime.h`,
/// `pycore_interp.h`, `Include/cpython/pystate.h`, `Include/cpython/frameobject.h`,
/// `Include/cpython/code.h` and `Include/cpython/unicodeobject.h`, at the same offsets as
/// 3.8's; checked against pyenv's 3.9 headers when installed.
pub const PY39: Layout = Layout {
    version: (3, 9),
    ..BEFORE_311
};

/// CPython 3.10: the headers of 3.9's list in v3.10. `f_lasti` moved (the frame lost
/// `f_exc_*`) and counts code units; `co_lnotab` became `co_linetable` (byte ranges, see
/// CPython 3.10's `Objects/lnotab_notes.txt`). Checked against pyenv's 3.10 headers when
/// installed.
pub const PY310: Layout = Layout {
    version: (3, 10),
    frame_instruction: 96,
    instruction: Instruction::LastiUnits,
    line_table: LineTable::Ranges310,
    ..BEFORE_311
};

/// CPython 3.11: from its headers `Include/internal/pycore_runtime.h`, `pycore_interp.h`,
/// `pycore_frame.h`, `Include/cpython/pystate.h`, `code.h` and `unicodeobject.h` (v3.11.0
/// to v3.11.x do not change them). A unit test compiles `offsetof` against the machine's
/// python3.11-dev headers, when installed, and compares.
pub const PY311: Layout = Layout {
    version: (3, 11),
    runtime_interpreters_head: 40,
    interp_next: 0,
    interp_threads_head: 16,
    thread_next: 8,
    thread_id: 152,
    thread_native_id: Some(160),
    thread_frame: 56,
    cframe_current_frame: Some(8),
    frame_code: 32,
    frame_previous: 48,
    frame_instruction: 56,
    instruction: Instruction::Pointer {
        code_instructions: 184,
    },
    frame_owner: Some(69),
    entry: Entry::Field(68),
    code_filename: 112,
    code_name: 128,
    code_linetable: 136,
    code_firstlineno: 72,
    line_table: LineTable::Locations,
    unicode_length: 16,
    unicode_state: 32,
    ascii_size: 48,
    compact_size: 72,
    bytes_size: 16,
    bytes_data: 32,
};

/// CPython 3.12: the same headers of v3.12 (the frame starts with `f_code` and `previous`,
/// interpreter states grew, strings lost `wstr`), checked against pyenv's 3.12 headers
/// when installed.
pub const PY312: Layout = Layout {
    version: (3, 12),
    runtime_interpreters_head: 40,
    interp_next: 0,
    interp_threads_head: 72,
    thread_next: 8,
    thread_id: 136,
    thread_native_id: Some(144),
    thread_frame: 56,
    cframe_current_frame: Some(0),
    frame_code: 0,
    frame_previous: 8,
    frame_instruction: 56,
    instruction: Instruction::Pointer {
        code_instructions: 192,
    },
    frame_owner: Some(70),
    entry: Entry::CStackShim,
    code_filename: 112,
    code_name: 128,
    code_linetable: 136,
    code_firstlineno: 68,
    line_table: LineTable::Locations,
    unicode_length: 16,
    unicode_state: 32,
    ascii_size: 40,
    compact_size: 56,
    bytes_size: 16,
    bytes_data: 32,
};

impl Layout {
    /// What the kernel program needs to walk a thread's frames with this layout, for the
    /// interpreter whose `_PyRuntime` is at `runtime`.
    pub fn kernel_walk(&self, runtime: u64) -> PythonProcess {
        let offset = |o: u64| u16::try_from(o).unwrap_or(PY_NO_OFFSET);
        PythonProcess {
            interpreters_head: runtime + self.runtime_interpreters_head,
            interp_threads_head: offset(self.interp_threads_head),
            thread_next: offset(self.thread_next),
            thread_id: offset(self.thread_id),
            thread_frame: offset(self.thread_frame),
            cframe_current_frame: self.cframe_current_frame.map_or(PY_NO_OFFSET, offset),
            frame_code: offset(self.frame_code),
            frame_previous: offset(self.frame_previous),
            frame_instruction: offset(self.frame_instruction),
            frame_owner: self.frame_owner.map_or(PY_NO_OFFSET, offset),
            frame_is_entry: match self.entry {
                Entry::Field(offset_) => offset(offset_),
                Entry::CStackShim | Entry::EveryFrame => PY_NO_OFFSET,
            },
            code_instructions: match self.instruction {
                Instruction::Pointer { code_instructions } => offset(code_instructions),
                Instruction::LastiUnits | Instruction::LastiBytes => PY_NO_OFFSET,
            },
            instruction_kind: match self.instruction {
                Instruction::Pointer { .. } => PythonProcess::INSTRUCTION_POINTER,
                Instruction::LastiUnits => PythonProcess::INSTRUCTION_LASTI_UNITS,
                Instruction::LastiBytes => PythonProcess::INSTRUCTION_LASTI_BYTES,
            },
            entry_kind: match self.entry {
                Entry::Field(_) => PythonProcess::ENTRY_FIELD,
                Entry::CStackShim => PythonProcess::ENTRY_CSTACK_SHIM,
                Entry::EveryFrame => PythonProcess::ENTRY_EVERY_FRAME,
            },
        }
    }

    /// The 3.13 layout from the words of a `_Py_DebugOffsets` (`Include/internal/
    /// pycore_runtime.h` of v3.13: an 8-byte cookie `xdebugpy`, the version, then runs of
    /// offsets, each run led by its structure's size), `None` when it is not one. 3.14
    /// changed the structure: its words are not read with this.
    pub fn from_debug_offsets_313(words: &[u64]) -> Option<Layout> {
        if words.len() < DEBUG_OFFSETS_313_WORDS || words[0].to_le_bytes() != *b"xdebugpy" {
            return None;
        }
        let version = words[1];
        if (version >> 24, (version >> 16) & 0xff) != (3, 13) || words[2] != 0 {
            // Another version, or the free-threaded build (other object headers).
            return None;
        }
        let w = |i: usize| words[i];
        // Runs (index of the size word): runtime 3, interpreter 6, thread 19, frame 28,
        // code 34, object 44, type 46, tuple 50, list 53, dict 56, float 59, long 61,
        // bytes 64, unicode 67.
        let (runtime, interp, thread, frame, code, bytes, unicode) = (3, 6, 19, 28, 34, 64, 67);
        let layout = Layout {
            version: (3, 13),
            runtime_interpreters_head: w(runtime + 2),
            interp_next: w(interp + 2),
            interp_threads_head: w(interp + 3),
            thread_next: w(thread + 2),
            thread_id: w(thread + 5),
            thread_native_id: Some(w(thread + 6)),
            thread_frame: w(thread + 4),
            cframe_current_frame: None,
            frame_code: w(frame + 2),
            frame_previous: w(frame + 1),
            frame_instruction: w(frame + 3),
            instruction: Instruction::Pointer {
                code_instructions: w(code + 9),
            },
            frame_owner: Some(w(frame + 5)),
            entry: Entry::CStackShim,
            code_filename: w(code + 1),
            code_name: w(code + 3),
            code_linetable: w(code + 4),
            code_firstlineno: w(code + 5),
            line_table: LineTable::Locations,
            unicode_length: w(unicode + 2),
            unicode_state: w(unicode + 1),
            ascii_size: w(unicode + 3),
            // PyCompactUnicodeObject adds utf8_length and utf8 to PyASCIIObject.
            compact_size: w(unicode + 3) + 16,
            bytes_size: w(bytes + 1),
            bytes_data: w(bytes + 2),
        };
        // Every offset the walk reads lies inside its structure.
        let inside = [
            (layout.runtime_interpreters_head, w(runtime)),
            (layout.interp_threads_head, w(interp)),
            (layout.thread_next, w(thread)),
            (layout.thread_id, w(thread)),
            (layout.thread_frame, w(thread)),
            (layout.frame_code, w(frame)),
            (layout.frame_previous, w(frame)),
            (layout.frame_instruction, w(frame)),
            (w(frame + 5), w(frame)),
            (layout.code_name, w(code)),
            (w(code + 9), w(code)),
        ];
        inside
            .iter()
            .all(|&(offset, size)| offset < size && offset < u64::from(u16::MAX))
            .then_some(layout)
    }

    /// The layout of CPython `major.minor`, when this agent has one.
    pub fn for_version(major: u8, minor: u8) -> Option<&'static Layout> {
        [&PY38, &PY39, &PY310, &PY311, &PY312]
            .into_iter()
            .find(|l| l.version == (major, minor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a 3.13 `_Py_DebugOffsets` of the default build, with offsets inside their
    /// structures, is read (a live 3.13 is read in `stack/tests.rs`).
    #[test]
    fn debug_offsets_are_checked_before_use() {
        let mut words = vec![0u64; DEBUG_OFFSETS_313_WORDS];
        words[0] = u64::from_le_bytes(*b"xdebugpy");
        words[1] = 0x030d_00f0;
        for size in [3, 6, 19, 28, 34, 44, 46, 50, 53, 56, 59, 61, 64, 67, 71] {
            words[size] = 4096;
        }
        for (i, w) in words.iter_mut().enumerate() {
            if *w == 0 && i > 2 {
                *w = 8 * (i as u64 % 7 + 1);
            }
        }
        let layout = Layout::from_debug_offsets_313(&words).expect("a 3.13 layout");
        assert_eq!(layout.cframe_current_frame, None);
        assert_eq!(layout.entry, Entry::CStackShim);
        let mut other = words.clone();
        other[0] = u64::from_le_bytes(*b"xdebugpz");
        assert!(Layout::from_debug_offsets_313(&other).is_none(), "cookie");
        let mut other = words.clone();
        other[1] = 0x030e_00f0;
        assert!(Layout::from_debug_offsets_313(&other).is_none(), "3.14");
        let mut other = words.clone();
        other[2] = 1;
        assert!(
            Layout::from_debug_offsets_313(&other).is_none(),
            "free-threaded"
        );
        let mut other = words.clone();
        other[28] = 8;
        assert!(
            Layout::from_debug_offsets_313(&other).is_none(),
            "frame too small"
        );
        assert!(
            Layout::from_debug_offsets_313(&words[..10]).is_none(),
            "short"
        );
    }

    /// Each table against `offsetof` on installed headers: Debian's python3.11-dev, and
    /// pyenv's 3.8, 3.9, 3.10 and 3.12 when present.
    #[test]
    fn layouts_match_the_installed_headers() {
        let mut compared = 0;
        for (layout, include) in [
            (&PY38, "/root/.pyenv/versions/3.8.18/include/python3.8"),
            (&PY39, "/root/.pyenv/versions/3.9.18/include/python3.9"),
            (&PY310, "/root/.pyenv/versions/3.10.13/include/python3.10"),
            (&PY311, "/usr/include/python3.11"),
            (&PY312, "/root/.pyenv/versions/3.12.1/include/python3.12"),
        ] {
            let include = std::path::Path::new(include);
            if !include.join("internal/pycore_pystate.h").exists() {
                eprintln!("{}: headers not installed: not compared", include.display());
                continue;
            }
            compare(layout, include);
            compared += 1;
        }
        eprintln!("{compared} layouts compared with their headers");
    }

    fn compare(l: &Layout, include: &std::path::Path) {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("offsets.c");
        let old = l.version < (3, 11);
        // The structures and fields each version names.
        let (frame, threads, thread_frame, name, linetable) = if old {
            let linetable = if l.version < (3, 10) {
                "co_lnotab"
            } else {
                "co_linetable"
            };
            (
                "PyFrameObject",
                "tstate_head",
                "frame",
                "co_name",
                linetable,
            )
        } else {
            (
                "_PyInterpreterFrame",
                "threads.head",
                "cframe",
                "co_qualname",
                "co_linetable",
            )
        };
        let (code, previous, instruction) = if old {
            ("f_code", "f_back", "f_lasti")
        } else {
            ("f_code", "previous", "prev_instr")
        };
        let mut fields: Vec<(String, u64)> = vec![
            (
                "offsetof(_PyRuntimeState, interpreters.head)".into(),
                l.runtime_interpreters_head,
            ),
            ("offsetof(PyInterpreterState, next)".into(), l.interp_next),
            (
                format!("offsetof(PyInterpreterState, {threads})"),
                l.interp_threads_head,
            ),
            ("offsetof(PyThreadState, next)".into(), l.thread_next),
            ("offsetof(PyThreadState, thread_id)".into(), l.thread_id),
            (
                format!("offsetof(PyThreadState, {thread_frame})"),
                l.thread_frame,
            ),
            (format!("offsetof({frame}, {code})"), l.frame_code),
            (format!("offsetof({frame}, {previous})"), l.frame_previous),
            (
                format!("offsetof({frame}, {instruction})"),
                l.frame_instruction,
            ),
            (
                "offsetof(PyCodeObject, co_filename)".into(),
                l.code_filename,
            ),
            (format!("offsetof(PyCodeObject, {name})"), l.code_name),
            (
                format!("offsetof(PyCodeObject, {linetable})"),
                l.code_linetable,
            ),
            (
                "offsetof(PyCodeObject, co_firstlineno)".into(),
                l.code_firstlineno,
            ),
            ("offsetof(PyASCIIObject, length)".into(), l.unicode_length),
            ("offsetof(PyASCIIObject, state)".into(), l.unicode_state),
            ("sizeof(PyASCIIObject)".into(), l.ascii_size),
            ("sizeof(PyCompactUnicodeObject)".into(), l.compact_size),
            ("offsetof(PyVarObject, ob_size)".into(), l.bytes_size),
            ("offsetof(PyBytesObject, ob_sval)".into(), l.bytes_data),
        ];
        if let Some(native) = l.thread_native_id {
            fields.push(("offsetof(PyThreadState, native_thread_id)".into(), native));
        }
        if let Some(current) = l.cframe_current_frame {
            fields.push(("offsetof(_PyCFrame, current_frame)".into(), current));
        }
        if let Some(owner) = l.frame_owner {
            fields.push((format!("offsetof({frame}, owner)"), owner));
        }
        if let Instruction::Pointer { code_instructions } = l.instruction {
            fields.push((
                "offsetof(PyCodeObject, co_code_adaptive)".into(),
                code_instructions,
            ));
        }
        if let Entry::Field(is_entry) = l.entry {
            fields.push((format!("offsetof({frame}, is_entry)"), is_entry));
        }
        // The instruction is an `int` where it is an index.
        if !matches!(l.instruction, Instruction::Pointer { .. }) {
            fields.push((format!("sizeof((({frame} *)0)->{instruction})"), 4));
        }
        let prints: String = fields
            .iter()
            .map(|(expr, _)| format!("    printf(\"%zu\\n\", (size_t)({expr}));\n"))
            .collect();
        // 3.8 declares the runtime and interpreter states in pycore_pystate.h; 3.9 moved
        // them to pycore_runtime.h and pycore_interp.h; 3.11 added pycore_frame.h.
        let headers: &[&str] = match l.version {
            (3, 8) => &["internal/pycore_pystate.h", "frameobject.h"],
            (3, 9) | (3, 10) => &[
                "internal/pycore_runtime.h",
                "internal/pycore_interp.h",
                "frameobject.h",
            ],
            _ => &[
                "internal/pycore_runtime.h",
                "internal/pycore_interp.h",
                "internal/pycore_frame.h",
            ],
        };
        let includes: String = headers
            .iter()
            .map(|h| format!("#include \"{h}\"\n"))
            .collect();
        std::fs::write(
            &source,
            format!(
                "#define Py_BUILD_CORE 1\n#include <Python.h>\n#include <stddef.h>\n\
                 {includes}#include <stdio.h>\n\
                 int main(void) {{\n{prints}    return 0;\n}}\n"
            ),
        )
        .unwrap();
        let binary = dir.path().join("offsets");
        let status = std::process::Command::new("gcc")
            .arg(format!("-I{}", include.display()))
            .arg("-o")
            .arg(&binary)
            .arg(&source)
            .status()
            .expect("run gcc");
        assert!(status.success(), "{}", include.display());
        let out = std::process::Command::new(&binary).output().unwrap();
        let got: Vec<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(got.len(), fields.len());
        for ((expr, want), got) in fields.iter().zip(got) {
            assert_eq!(got, *want, "{:?}: {expr}", l.version);
        }
    }
}
