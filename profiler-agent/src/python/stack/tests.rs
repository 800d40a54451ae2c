//! The line-table decoders against CPython's own `co_lines()` (`dis.findlinestarts` before
//! 3.10), and a whole read of a live interpreter's stacks (Debian's python3.11, and pyenv's
//! 3.8, 3.9, 3.10, 3.12 and 3.13 when installed).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::*;
use crate::{
    process::{ProcessSource as _, ProcfsProcesses},
    python::{
        detect,
        layout::PY311,
        remote::{FakeMemory, ProcessMemory},
    },
};

/// A compact str object at `at` (ASCII when every character is, else 2 bytes a
/// character), as CPython 3.11 lays it out.
fn put_str(memory: &mut FakeMemory, at: u64, text: &str) {
    let l = &PY311;
    let ascii = text.is_ascii();
    let length = text.chars().count() as u64;
    // state: kind (1 or 2) << 2, compact << 5, ascii << 6, ready << 7.
    let kind: u32 = if ascii { 1 } else { 2 };
    let state = (kind << 2) | (1 << 5) | (u32::from(ascii) << 6) | (1 << 7);
    let header = if ascii { l.ascii_size } else { l.compact_size };
    let mut bytes = vec![0u8; header as usize];
    bytes[l.unicode_length as usize..][..8].copy_from_slice(&length.to_le_bytes());
    bytes[l.unicode_state as usize..][..4].copy_from_slice(&state.to_le_bytes());
    if ascii {
        bytes.extend_from_slice(text.as_bytes());
    } else {
        bytes.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    }
    memory.put(at, &bytes);
}

/// A code object at `at` named `name` in `file`, whose location table puts every
/// instruction on line `first + 1`.
fn put_code(memory: &mut FakeMemory, at: u64, name_at: u64, file_at: u64, first: u32) {
    let l = &PY311;
    let table_at = at + 0x1000;
    let mut code = vec![0u8; 256];
    for (offset, value) in [
        (l.code_name, name_at),
        (l.code_filename, file_at),
        (l.code_linetable, table_at),
    ] {
        code[offset as usize..][..8].copy_from_slice(&value.to_le_bytes());
    }
    code[l.code_firstlineno as usize..][..4].copy_from_slice(&first.to_le_bytes());
    memory.put(at, &code);
    // One entry: one-line form (code 11: line delta 1), 8 code units, then two columns.
    let entry = [0x80 | (11 << 3) | 7, 0, 0];
    let mut table = vec![0u8; l.bytes_data as usize];
    table[l.bytes_size as usize..][..8].copy_from_slice(&(entry.len() as u64).to_le_bytes());
    table.extend_from_slice(&entry);
    memory.put(table_at, &table);
}

/// A code object freed and another allocated at its address is named afresh, never from
/// the cache; strings that are not ASCII are read too.
#[test]
fn a_reused_code_object_is_never_given_its_old_name() {
    let mut memory = FakeMemory::default();
    put_str(&mut memory, 0x10_000, "handler");
    put_str(&mut memory, 0x11_000, "/srv/app.py");
    put_code(&mut memory, 0x20_000, 0x10_000, 0x11_000, 40);
    let frame = RawFrame {
        code: 0x20_000,
        instruction: 3,
    };
    let expected = |name: &str, file: &str, first: u32| PyFrame {
        name: name.into(),
        file: file.into(),
        line: Some(first + 1),
        first_line: first,
    };
    {
        let mut names = CodeNames::new(&memory, PY311);
        assert_eq!(
            names.name(frame).unwrap(),
            expected("handler", "/srv/app.py", 40)
        );
        assert_eq!(
            names.name(frame).unwrap(),
            expected("handler", "/srv/app.py", 40)
        );
    }
    let mut names_before = CodeNames::new(&memory, PY311);
    names_before.name(frame).unwrap();
    let cache = names_before.codes.clone();
    // The object is freed; another is made at the same address with other strings.
    put_str(&mut memory, 0x12_000, "Größe.berechnen");
    put_str(&mut memory, 0x13_000, "/srv/größe.py");
    put_code(&mut memory, 0x20_000, 0x12_000, 0x13_000, 7);
    let mut names = CodeNames::new(&memory, PY311);
    names.codes = cache;
    assert_eq!(
        names.name(frame).unwrap(),
        expected("Größe.berechnen", "/srv/größe.py", 7)
    );
    // Past the table's 8 code units: no line.
    let past = RawFrame {
        code: 0x20_000,
        instruction: 8,
    };
    assert_eq!(names.name(past).unwrap().line, None);
    // A code object in unmapped memory is an error, not a panic.
    assert!(
        names
            .name(RawFrame {
                code: 0x99_000,
                instruction: 0
            })
            .is_err()
    );
    // A bounded cache starts afresh past its bound: two code objects in a cache of one.
    put_code(&mut memory, 0x30_000, 0x10_000, 0x11_000, 50);
    let mut small = CodeNames::with_limits(&memory, PY311, 1, 1 << 20);
    small.name(frame).unwrap();
    let other = RawFrame {
        code: 0x30_000,
        instruction: 0,
    };
    assert_eq!(small.name(other).unwrap().first_line, 50);
    assert_eq!(small.len(), 1);
    assert_eq!(small.name(frame).unwrap().first_line, 7);
    assert_eq!(small.len(), 1);
}

/// The interpreters the tests run when installed: Debian's 3.11 and pyenv's 3.8, 3.9, 3.10
/// (whose version comes from the file name), 3.12 and 3.13 (whose layout comes from its
/// `_Py_DebugOffsets`).
const PYTHONS: [(&str, (u8, u8)); 6] = [
    ("/usr/bin/python3.11", (3, 11)),
    ("/root/.pyenv/versions/3.8.18/bin/python3.8", (3, 8)),
    ("/root/.pyenv/versions/3.9.18/bin/python3.9", (3, 9)),
    ("/root/.pyenv/versions/3.10.13/bin/python3.10", (3, 10)),
    ("/root/.pyenv/versions/3.12.1/bin/python3.12", (3, 12)),
    ("/root/.pyenv/versions/3.13.0/bin/python3.13", (3, 13)),
];

/// The interpreters of [`PYTHONS`] present here (Debian's 3.11 at least, in CI).
fn installed() -> Vec<(&'static str, (u8, u8))> {
    let present: Vec<_> = PYTHONS
        .into_iter()
        .filter(|(path, _)| std::path::Path::new(path).exists())
        .collect();
    for (path, _) in PYTHONS.iter().filter(|p| !present.contains(p)) {
        eprintln!("{path} missing: not tested");
    }
    present
}

/// Every code unit's line from the decoder of the version's table equals the one
/// `co_lines()` gives (before 3.10, the last start `dis.findlinestarts` gives), for functions
/// with long, short, one-line and no-location entries.
#[test]
fn location_tables_decode_as_cpython_reads_them() {
    for (python, version) in installed() {
        compare_location_tables(python, version);
    }
}

fn compare_location_tables(python: &str, version: (u8, u8)) {
    let script = r#"
import json, dis, json as j
def short(a, b):
    return a + b
def branches(x):
    if x > 10:
        y = [i * i for i in range(x)]
    else:
        y = {
            "k": x,
        }
    try:
        z = 1 / x
    except ZeroDivisionError:
        z = 0
    return y, z
class C:
    def method(self, value,
               other=None):
        while value:
            value -= 1
        return (value,
                other)
def lines(c):
    if hasattr(c, "co_lines"):
        return [[s, e, l] for s, e, l in c.co_lines()]
    # Before 3.10: each start's line holds up to the next start.
    starts = list(dis.findlinestarts(c))
    ends = [s for s, _ in starts[1:]] + [len(c.co_code)]
    return [[s, e, l] for (s, l), e in zip(starts, ends)]
# Line deltas past a signed byte's range, byte deltas past an unsigned one's.
exec("def far(x):\n    y = x\n" + "\n" * 300 + "    y = [" + "x, " * 300 + "]\n"
     + "\n" * 200 + "    return y\n")
out = []
for f in (short, branches, C.method, far, json.dumps, j.JSONEncoder.encode):
    c = f.__code__
    table = c.co_linetable if hasattr(c, "co_linetable") else c.co_lnotab
    out.append({"table": list(table), "first": c.co_firstlineno, "lines": lines(c)})
print(json.dumps(out))
"#;
    let out = Command::new(python).args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let codes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut checked = 0;
    for code in codes.as_array().unwrap() {
        let table: Vec<u8> = serde_json::from_value(code["table"].clone()).unwrap();
        let first = code["first"].as_u64().unwrap() as u32;
        for range in code["lines"].as_array().unwrap() {
            let (start, end) = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
            let want = range[2].as_u64().map(|l| l as u32);
            for unit in start / 2..end / 2 {
                let line = match version {
                    (3, 8) | (3, 9) => line_of_lnotab(&table, first, unit as u32),
                    (3, 10) => line_of_310(&table, first, unit as u32),
                    _ => line_of(&table, first, unit as u32),
                };
                assert_eq!(line, want, "unit {unit} of {code}");
                checked += 1;
            }
        }
    }
    eprintln!("{python}: {checked} code units compared");
    assert!(checked > 100, "only {checked} code units compared");
}

/// SIGSTOPs a process until dropped, once it shows as stopped.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        // SAFETY: kill(2) on the test's own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let stat = format!("/proc/{pid}/stat");
        while !std::fs::read_to_string(&stat)
            .unwrap()
            .rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('T'))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

const CHAIN: &str = r#"
import json

def tokenize(text):
    n = 0
    for ch in text:
        n += ord(ch)
    return n

def parse(text):
    return tokenize(text)

def handle_request(i):
    json.dumps({"i": i})
    return parse("request %d " % i * 400)

def main():
    i = 0
    while True:
        handle_request(i)
        i += 1

main()
"#;

/// A live python running a known chain: its main thread's Python stack, read from its
/// memory, is `tokenize` (or `json.dumps`'s encoder) under `parse`/`handle_request` under
/// `main` under `<module>`, with the script's file and lines inside each function.
#[test]
fn reads_and_names_live_python_stacks() {
    for (python, version) in installed() {
        read_live_stack(python, version);
    }
}

fn read_live_stack(python: &str, version: (u8, u8)) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("chain.py");
    std::fs::write(&script, CHAIN).unwrap();
    /// Killed and reaped when dropped, whatever the test's outcome.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(
        Command::new(python)
            .arg(&script)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    // Past its start-up and into the script's loop: half a second of its own CPU time
    // (beside other busy tests, wall time says little).
    let started = Instant::now();
    let cpu_ticks = || {
        crate::process::procfs::stat(std::path::Path::new(&format!("/proc/{pid}")))
            .map_or(0, |s| s.cpu_ticks)
    };
    while cpu_ticks() < 50 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }

    let process = ProcfsProcesses::new("/proc").snapshot(pid, "python3");
    let memory = ProcessMemory::new(pid);
    let interpreter = detect(&process, &memory)
        .unwrap()
        .unwrap_or_else(|| panic!("{python} is detected"));
    assert_eq!(
        (interpreter.version.0, interpreter.version.1),
        version,
        "{interpreter:?}"
    );
    let file = script.display().to_string();
    // Function -> its lines in CHAIN (1-based, the script starts with a newline).
    let lines = |name: &str| -> std::ops::RangeInclusive<u32> {
        let start = CHAIN
            .lines()
            .position(|l| l.starts_with(&format!("def {name}(")))
            .unwrap() as u32
            + 1;
        let len = CHAIN
            .lines()
            .skip(start as usize)
            .take_while(|l| l.starts_with(' '))
            .count();
        start..=start + len as u32
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut complete, mut whole, mut reads) = (0, 0, 0);
    while complete < 50 && Instant::now() < deadline {
        reads += 1;
        // Spread over its run rather than 50 stops in a row.
        std::thread::sleep(Duration::from_millis(5));
        // Stopped while it is read, as the kernel program will find a sampled thread: a
        // running interpreter reuses a returned frame's memory for the next call, so a read
        // could pair one call's code object with another's instruction.
        let stopped = Stopped::new(pid);
        let stacks = read_stacks(&memory, &interpreter).expect("a stopped process reads");
        assert_eq!(stacks.len(), 1, "one thread: {stacks:?}");
        let mut names = CodeNames::new(&memory, interpreter.layout);
        let frames = stacks[0]
            .frames
            .iter()
            .map(|f| names.name(*f))
            .collect::<Result<Vec<_>, _>>()
            .expect("a stopped process's frames are named");
        drop(stopped);
        let ours: Vec<&PyFrame> = frames.iter().filter(|f| *f.file == *file).collect();
        let chain: Vec<&str> = ours.iter().map(|f| &*f.name).collect();
        // Where the thread stopped: anywhere in the chain, innermost first.
        let full = ["tokenize", "parse", "handle_request", "main", "<module>"];
        assert!(chain.len() >= 2 && full.ends_with(&chain), "{frames:?}");
        for f in &ours {
            if &*f.name != "<module>" {
                let within = lines(&f.name);
                assert!(
                    f.line.is_some_and(|l| within.contains(&l)),
                    "{f:?} outside {within:?}"
                );
                assert_eq!(f.first_line, *within.start(), "{f:?}");
            }
        }
        if complete == 0 {
            eprintln!("a stack read from {python}'s memory: {frames:?}");
        }
        whole += usize::from(chain.len() == full.len());
        complete += 1;
    }
    eprintln!("{python}: {whole} of {complete} stacks were the whole chain ({reads} reads)");
    assert_eq!(complete, 50, "{complete} stacks in {reads} reads");
    // tokenize's loop is where the script spends most of its time (45-50 of 50 here).
    assert!(whole >= 20, "the whole chain in only {whole} of 50 stacks");
}
