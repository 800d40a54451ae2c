//! Finds the CPython interpreter of a process: the executable mapping of `python3.N` or
//! `libpython3.N.so`, the address of `_PyRuntime` from that file's symbol table plus the
//! mapping's load bias, and the version from `Py_Version` (CPython 3.11 and later) in the
//! process's memory, or before 3.11, which has no `Py_Version`, from the file's name (the
//! micro version is then unknown: 0). The file is the one the process snapshot opened through the safe file
//! layer; it is parsed within a [`SymbolBudget`].

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use super::{
    layout::{DEBUG_OFFSETS_313_WORDS, Layout},
    remote::{RemoteError, RemoteMemory},
};
use crate::{
    process::{Mapping, MappingKind, ProcessInfo},
    symbolize::{
        budget::{Limits, SymbolBudget},
        filedata::FileData,
    },
};

/// Bytes of an interpreter's file that detection may read (its symbol tables).
const DETECT_BUDGET: u64 = 64 << 20;

/// A CPython interpreter found in a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interpreter {
    pub pid: u32,
    /// Major, minor, micro.
    pub version: (u8, u8, u8),
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    pub layout: Layout,
    /// Where `_PyEval_EvalFrameDefault` (and its `.cold` part, when the symbol table has it)
    /// is in the process, as (start, end): each of its native frames is one run of the
    /// interpreter loop, which the Python frames of that run replace. (0, 0) when absent.
    pub eval: [(u64, u64); 2],
}

impl Interpreter {
    /// Whether `address` is in the interpreter loop.
    pub fn in_eval(&self, address: u64) -> bool {
        self.eval
            .iter()
            .any(|&(start, end)| (start..end).contains(&address))
    }
}

/// Why a process that maps CPython cannot be read as one.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("{path}: not a readable ELF file: {reason}")]
    Elf { path: String, reason: String },
    #[error("{path}: no _PyRuntime symbol (CPython before 3.7, or stripped)")]
    NoSymbols { path: String },
    #[error("CPython 3.13: _PyRuntime does not start with a readable _Py_DebugOffsets")]
    BadDebugOffsets,
    #[error("CPython {major}.{minor}: no layout for this version")]
    UnknownVersion { major: u8, minor: u8 },
    #[error(transparent)]
    Read(#[from] RemoteError),
}

/// The interpreter of `process`, `None` when it maps no CPython. The runtime is in the
/// executable (Debian's python3.11) or in `libpython3.N.so` (a `--enable-shared` build,
/// whose executable has no symbols): the first CPython mapping with the symbols is used.
pub fn detect(
    process: &ProcessInfo,
    memory: &dyn RemoteMemory,
) -> Result<Option<Interpreter>, DetectError> {
    let mut missing = None;
    for mapping in process.mappings.iter().filter(|m| is_cpython(&m.path)) {
        match from_mapping(process, mapping, memory) {
            Err(error @ DetectError::NoSymbols { .. }) => missing = Some(error),
            other => return other,
        }
    }
    missing.map_or(Ok(None), Err)
}

fn from_mapping(
    process: &ProcessInfo,
    mapping: &Mapping,
    memory: &dyn RemoteMemory,
) -> Result<Option<Interpreter>, DetectError> {
    let MappingKind::File {
        file: Some(file), ..
    } = &mapping.kind
    else {
        return Ok(None);
    };
    let elf = |reason: String| DetectError::Elf {
        path: mapping.path.clone(),
        reason,
    };
    let budget = SymbolBudget::new(DETECT_BUDGET, Limits::default());
    let data = FileData::from_file(file.try_clone().map_err(|e| elf(e.to_string()))?, &budget)
        .map_err(|e| elf(e.to_string()))?;
    let object = object::File::parse(&data).map_err(|e| elf(e.to_string()))?;
    let symbol = |name: &str| {
        object
            .dynamic_symbols()
            .chain(object.symbols())
            .find(|s| s.name() == Ok(name))
            .map(|s| (s.address(), s.size()))
    };
    let no_symbols = || DetectError::NoSymbols {
        path: mapping.path.clone(),
    };
    let Some((runtime, _)) = symbol("_PyRuntime") else {
        return Err(no_symbols());
    };
    let bias = load_bias(&object, mapping).ok_or_else(|| elf("no segment maps it".into()))?;
    let (major, minor, micro) = match symbol("Py_Version") {
        Some((version, _)) => {
            let hex = memory.read_u32(version.wrapping_add(bias))?;
            ((hex >> 24) as u8, (hex >> 16) as u8, (hex >> 8) as u8)
        }
        // Before 3.11 (3.7 brought `_PyRuntime`): the file's name says.
        None => {
            let (major, minor) = version_from_name(&mapping.path).ok_or_else(no_symbols)?;
            (major, minor, 0)
        }
    };
    let runtime = runtime.wrapping_add(bias);
    let layout = match Layout::for_version(major, minor) {
        Some(layout) => *layout,
        // 3.13 describes itself: `_PyRuntime` starts with its `_Py_DebugOffsets`.
        None if (major, minor) == (3, 13) => read_debug_offsets(memory, runtime)?,
        None => return Err(DetectError::UnknownVersion { major, minor }),
    };
    let range = |name: &str| {
        symbol(name).map_or((0, 0), |(address, size)| {
            let start = address.wrapping_add(bias);
            (start, start.wrapping_add(size))
        })
    };
    Ok(Some(Interpreter {
        pid: process.pid,
        version: (major, minor, micro),
        runtime,
        layout,
        eval: [
            range("_PyEval_EvalFrameDefault"),
            range("_PyEval_EvalFrameDefault.cold"),
        ],
    }))
}

/// The layout a CPython 3.13 process gives in the `_Py_DebugOffsets` at the start of its
/// `_PyRuntime`.
fn read_debug_offsets(memory: &dyn RemoteMemory, runtime: u64) -> Result<Layout, DetectError> {
    let mut bytes = vec![0u8; DEBUG_OFFSETS_313_WORDS * 8];
    memory.read(runtime, &mut bytes)?;
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    Layout::from_debug_offsets_313(&words).ok_or(DetectError::BadDebugOffsets)
}

/// `python3.N`, `python3.N[d|m]` or `libpython3.N[d|m].so[.1.0]`, by file name.
pub(crate) fn is_cpython(path: &str) -> bool {
    version_from_name(path).is_some()
}

/// The (major, minor) version a CPython file name (see [`is_cpython`]) says.
fn version_from_name(path: &str) -> Option<(u8, u8)> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let rest = name
        .strip_prefix("libpython3.")
        .or_else(|| name.strip_prefix("python3."))?;
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    let (minor, tail) = rest.split_at(digits);
    let minor: u8 = minor.parse().ok()?;
    (tail.is_empty() || tail == "d" || tail == "m" || tail.contains(".so")).then_some((3, minor))
}

/// Address in the process minus address in the file, from the segment that maps
/// `mapping`'s file offset.
fn load_bias<'d, R: object::ReadRef<'d>>(
    object: &object::File<'d, R>,
    mapping: &Mapping,
) -> Option<u64> {
    object.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        (offset..offset + size).contains(&mapping.offset).then(|| {
            let vaddr = segment.address() + (mapping.offset - offset);
            mapping.start.wrapping_sub(vaddr)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpython_file_names() {
        for yes in [
            "/usr/bin/python3.11",
            "/usr/local/bin/python3.12d",
            "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
            "/root/.pyenv/versions/3.13.0/lib/libpython3.13.so",
        ] {
            assert!(is_cpython(yes), "{yes}");
        }
        for no in [
            "/usr/bin/python3",
            "/usr/bin/python3.11-config",
            "/usr/lib/libpython3.so",
            "/usr/bin/gzip",
            "/usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
        ] {
            assert!(!is_cpython(no), "{no}");
        }
        for (path, version) in [
            (
                "/root/.pyenv/versions/3.10.13/lib/libpython3.10.so.1.0",
                (3, 10),
            ),
            ("/usr/lib/x86_64-linux-gnu/libpython3.8d.so.1.0", (3, 8)),
            ("/usr/bin/python3.9", (3, 9)),
            ("/usr/bin/python3.7m", (3, 7)),
        ] {
            assert_eq!(version_from_name(path), Some(version), "{path}");
        }
        assert_eq!(version_from_name("/usr/bin/python3.999"), None);
    }
}
