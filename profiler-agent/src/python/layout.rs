//! Byte offsets of the CPython structures a stack walk reads, per minor version. Each table
//! names its source. A table is used only for the minor version it was written for.

use profiler_common::{PY_NO_OFFSET, PythonProcess};

/// Offsets into CPython's structures (x86_64), and sizes of the object headers read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: (u8, u8),
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState.next` and `.threads.head`.
    pub interp_next: u64,
    pub interp_threads_head: u64,
    /// `PyThreadState.next`, `.thread_id` (`pthread_self()`), `.native_thread_id`,
    /// `.cframe` (3.13: `.current_frame`).
    pub thread_next: u64,
    pub thread_id: u64,
    pub thread_native_id: u64,
    pub thread_cframe: u64,
    /// `_PyCFrame.current_frame`; none in 3.13, whose thread points at its frame.
    pub cframe_current_frame: Option<u64>,
    /// `_PyInterpreterFrame.f_code` (3.13: `.f_executable`), `.previous`, `.prev_instr`
    /// (3.13: `.instr_ptr`, the instruction running), `.owner` (3.12's
    /// `FRAME_OWNED_BY_CSTACK` marks a shim frame between C and Python, not a Python call).
    pub frame_code: u64,
    pub frame_previous: u64,
    pub frame_prev_instr: u64,
    pub frame_owner: u64,
    /// `_PyInterpreterFrame.is_entry` (3.11); 3.12 marks each run of the interpreter loop
    /// with a C-stack shim frame instead.
    pub frame_is_entry: Option<u64>,
    /// `PyCodeObject.co_filename`, `.co_qualname`, `.co_linetable`, `.co_firstlineno`, and
    /// where its instructions start (`co_code_adaptive`).
    pub code_filename: u64,
    pub code_qualname: u64,
    pub code_linetable: u64,
    pub code_firstlineno: u64,
    pub code_instructions: u64,
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

/// Words of CPython 3.13's `_Py_DebugOffsets`.
pub const DEBUG_OFFSETS_313_WORDS: usize = 73;

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
    thread_native_id: 160,
    thread_cframe: 56,
    cframe_current_frame: Some(8),
    frame_code: 32,
    frame_previous: 48,
    frame_prev_instr: 56,
    frame_owner: 69,
    frame_is_entry: Some(68),
    code_filename: 112,
    code_qualname: 128,
    code_linetable: 136,
    code_firstlineno: 72,
    code_instructions: 184,
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
    thread_native_id: 144,
    thread_cframe: 56,
    cframe_current_frame: Some(0),
    frame_code: 0,
    frame_previous: 8,
    frame_prev_instr: 56,
    frame_owner: 70,
    frame_is_entry: None,
    code_filename: 112,
    code_qualname: 128,
    code_linetable: 136,
    code_firstlineno: 68,
    code_instructions: 192,
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
            thread_frame: offset(self.thread_cframe),
            cframe_current_frame: self.cframe_current_frame.map_or(PY_NO_OFFSET, offset),
            frame_code: offset(self.frame_code),
            frame_previous: offset(self.frame_previous),
            frame_instruction: offset(self.frame_prev_instr),
            frame_owner: offset(self.frame_owner),
            frame_is_entry: self.frame_is_entry.map_or(PY_NO_OFFSET, offset),
            code_instructions: offset(self.code_instructions),
            instruction_kind: PythonProcess::INSTRUCTION_POINTER,
            entry_kind: if self.frame_is_entry.is_some() {
                PythonProcess::ENTRY_FIELD
            } else {
                PythonProcess::ENTRY_CSTACK_SHIM
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
            thread_native_id: w(thread + 6),
            thread_cframe: w(thread + 4),
            cframe_current_frame: None,
            frame_code: w(frame + 2),
            frame_previous: w(frame + 1),
            frame_prev_instr: w(frame + 3),
            frame_owner: w(frame + 5),
            frame_is_entry: None,
            code_filename: w(code + 1),
            code_qualname: w(code + 3),
            code_linetable: w(code + 4),
            code_firstlineno: w(code + 5),
            code_instructions: w(code + 9),
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
            (layout.thread_cframe, w(thread)),
            (layout.frame_code, w(frame)),
            (layout.frame_previous, w(frame)),
            (layout.frame_prev_instr, w(frame)),
            (layout.frame_owner, w(frame)),
            (layout.code_qualname, w(code)),
            (layout.code_instructions, w(code)),
        ];
        inside
            .iter()
            .all(|&(offset, size)| offset < size && offset < u64::from(u16::MAX))
            .then_some(layout)
    }

    /// The layout of CPython `major.minor`, when this agent has one.
    pub fn for_version(major: u8, minor: u8) -> Option<&'static Layout> {
        [&PY311, &PY312]
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
        assert_eq!(layout.frame_is_entry, None);
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
    /// pyenv's 3.12 when present.
    #[test]
    fn layouts_match_the_installed_headers() {
        let mut compared = 0;
        for (layout, include) in [
            (&PY311, "/usr/include/python3.11"),
            (&PY312, "/root/.pyenv/versions/3.12.1/include/python3.12"),
        ] {
            let include = std::path::Path::new(include);
            if !include.join("internal/pycore_frame.h").exists() {
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
        let mut fields = vec![
            (
                "offsetof(_PyRuntimeState, interpreters.head)",
                l.runtime_interpreters_head,
            ),
            ("offsetof(PyInterpreterState, next)", l.interp_next),
            (
                "offsetof(PyInterpreterState, threads.head)",
                l.interp_threads_head,
            ),
            ("offsetof(PyThreadState, next)", l.thread_next),
            ("offsetof(PyThreadState, thread_id)", l.thread_id),
            (
                "offsetof(PyThreadState, native_thread_id)",
                l.thread_native_id,
            ),
            ("offsetof(PyThreadState, cframe)", l.thread_cframe),
            (
                "offsetof(_PyCFrame, current_frame)",
                l.cframe_current_frame.unwrap(),
            ),
            ("offsetof(_PyInterpreterFrame, f_code)", l.frame_code),
            ("offsetof(_PyInterpreterFrame, previous)", l.frame_previous),
            (
                "offsetof(_PyInterpreterFrame, prev_instr)",
                l.frame_prev_instr,
            ),
            ("offsetof(_PyInterpreterFrame, owner)", l.frame_owner),
            ("offsetof(PyCodeObject, co_filename)", l.code_filename),
            ("offsetof(PyCodeObject, co_qualname)", l.code_qualname),
            ("offsetof(PyCodeObject, co_linetable)", l.code_linetable),
            ("offsetof(PyCodeObject, co_firstlineno)", l.code_firstlineno),
            (
                "offsetof(PyCodeObject, co_code_adaptive)",
                l.code_instructions,
            ),
            ("offsetof(PyASCIIObject, length)", l.unicode_length),
            ("offsetof(PyASCIIObject, state)", l.unicode_state),
            ("sizeof(PyASCIIObject)", l.ascii_size),
            ("sizeof(PyCompactUnicodeObject)", l.compact_size),
            ("offsetof(PyVarObject, ob_size)", l.bytes_size),
            ("offsetof(PyBytesObject, ob_sval)", l.bytes_data),
        ];
        if let Some(is_entry) = l.frame_is_entry {
            fields.push(("offsetof(_PyInterpreterFrame, is_entry)", is_entry));
        }
        let prints: String = fields
            .iter()
            .map(|(expr, _)| format!("    printf(\"%zu\\n\", (size_t)({expr}));\n"))
            .collect();
        std::fs::write(
            &source,
            format!(
                "#define Py_BUILD_CORE 1\n#include <Python.h>\n#include <stddef.h>\n\
                 #include \"internal/pycore_runtime.h\"\n#include \"internal/pycore_interp.h\"\n\
                 #include \"internal/pycore_frame.h\"\n#include <stdio.h>\n\
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
