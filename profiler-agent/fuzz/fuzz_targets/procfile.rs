//! The file-opening layer (`profiler_agent::procfile`) on a tree the input builds: each run
//! makes a fresh directory holding `root/` (the process's root), a sentinel file beside it and
//! one in `outside/`, fills `root/` with the files, directories, symlinks (fuzz-chosen
//! targets: absolute, relative, `..`-heavy, loops, the sentinels' host paths) and FIFOs the
//! input lists, then opens the paths it names through both resolvers.
//!
//! Checked for every open: no panic or hang (a FIFO must be refused without blocking); a
//! success is a regular file that this run created inside `root/` (its device and inode are
//! among those, `/proc/self/fd/N` names a path under `root/`), never a sentinel, within the
//! size cap, and `read_capped` returns its exact contents or refuses a cap below its size;
//! `Resolver::Openat2` and `Resolver::Walk` agree on success or refusal and open the same
//! file. One divergence is allowed: the walker refuses paths that hold more than
//! `walk::MAX_DEPTH` directories at once (`ENAMETOOLONG`) where openat2 has no such limit.
//! `procfile::read_capped` and `perfmap::namespace_pid` also see the raw input.
//!
//! Input: text, one entry per line, fields separated by one space:
//! - `f PATH CONTENT` a regular file (the rest of the line is its content);
//! - `s PATH SIZE` a sparse regular file of SIZE bytes (at most 1 TiB);
//! - `d PATH` a directory; `p PATH` a FIFO;
//! - `l PATH TARGET` a symlink (TARGET is the rest of the line);
//! - `o PATH MAX_SIZE` open PATH with that size cap; `c CAP` the cap of later reads.
//!
//! PATHs of created entries are taken component by component inside `root/` (`..`, `.` and
//! empty components dropped, missing parents made as directories; an entry under a symlink or
//! a file is skipped). In TARGETs and opened PATHs, `@S` is the host path of the sentinel,
//! `@O` of `outside/`, `@R` of `root/`.
#![no_main]

use std::{
    collections::HashMap,
    ffi::CString,
    fs::{self, File},
    io::Write as _,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _, fs::symlink, io::AsRawFd as _},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use libfuzzer_sys::fuzz_target;
use profiler_agent::{
    procfile::{self, OpenedFile, ProcFileError, ProcRoot, Resolver},
    symbolize::perfmap::namespace_pid,
};

const MAX_ENTRIES: usize = 64;
const MAX_OPENS: usize = 8;

/// A per-process directory on tmpfs when there is one; each run starts afresh below it.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        sweep(&base, "procfile-fuzz-");
        let dir = base.join(format!("procfile-fuzz-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// Removes the scratch directories of earlier runs of this target whose process is gone
/// (libFuzzer exits without unwinding, so a run cannot remove its own).
fn sweep(base: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// One run's tree and what it holds.
struct Tree {
    root: PathBuf,
    sentinel: PathBuf,
    outside: PathBuf,
    /// (device, inode) of every regular file created inside the root -> its contents (or
    /// its size for sparse files).
    inside: HashMap<(u64, u64), Contents>,
    forbidden: Vec<(u64, u64)>,
}

#[derive(Clone)]
enum Contents {
    Bytes(Vec<u8>),
    Sparse(u64),
}

impl Tree {
    fn new() -> Self {
        let run = scratch().join("run");
        // remove_dir_all does not follow symlinks: it cannot delete outside `run`.
        let _ = fs::remove_dir_all(&run);
        let root = run.join("root");
        let outside = run.join("outside");
        fs::create_dir_all(&root).expect("root");
        fs::create_dir_all(&outside).expect("outside");
        let sentinel = run.join("sentinel");
        let mut forbidden = Vec::new();
        for path in [
            sentinel.clone(),
            outside.join("sentinel"),
            outside.join("0"),
        ] {
            fs::write(&path, b"SENTINEL outside the root").expect("sentinel");
            let meta = fs::metadata(&path).expect("sentinel stat");
            forbidden.push((meta.dev(), meta.ino()));
        }
        Self {
            root,
            sentinel,
            outside,
            inside: HashMap::new(),
            forbidden,
        }
    }

    fn remove(self) {
        if let Some(run) = self.root.parent() {
            let _ = fs::remove_dir_all(run);
        }
    }

    /// `@S`, `@O` and `@R` replaced by host paths.
    fn expand(&self, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let sub = match text.get(i..i + 2) {
                Some(b"@S") => Some(&self.sentinel),
                Some(b"@O") => Some(&self.outside),
                Some(b"@R") => Some(&self.root),
                _ => None,
            };
            if let Some(path) = sub {
                out.extend_from_slice(path.as_os_str().as_bytes());
                i += 2;
            } else {
                out.push(text[i]);
                i += 1;
            }
        }
        out
    }

    /// The host path of an entry to create, its parents made; `None` when a parent is not a
    /// real directory (creating through a symlink could write outside the root).
    fn place(&self, path: &[u8]) -> Option<PathBuf> {
        let parts: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b"." && *c != b"..")
            .collect();
        let (last, parents) = parts.split_last()?;
        let mut at = self.root.clone();
        for part in parents {
            at.push(std::ffi::OsStr::from_bytes(part));
            match fs::symlink_metadata(&at) {
                Ok(meta) if meta.file_type().is_dir() => {}
                Ok(_) => return None,
                Err(_) => fs::create_dir(&at).ok()?,
            }
        }
        at.push(std::ffi::OsStr::from_bytes(last));
        fs::symlink_metadata(&at).is_err().then_some(at)
    }

    fn file(&mut self, path: &[u8], contents: Contents) {
        let Some(at) = self.place(path) else { return };
        let Ok(mut file) = File::create_new(&at) else {
            return;
        };
        let written = match &contents {
            Contents::Bytes(bytes) => file.write_all(bytes),
            Contents::Sparse(size) => file.set_len(*size),
        };
        if written.is_ok()
            && let Ok(meta) = file.metadata()
        {
            self.inside.insert((meta.dev(), meta.ino()), contents);
        }
    }

    fn build(&mut self, line: &[u8]) {
        let (op, rest) = split(line);
        let (path, arg) = split(rest);
        match op {
            b"f" => self.file(path, Contents::Bytes(arg.to_vec())),
            b"s" => {
                let size = number(arg).min(1 << 40);
                self.file(path, Contents::Sparse(size));
            }
            b"d" => {
                if let Some(at) = self.place(path) {
                    let _ = fs::create_dir(at);
                }
            }
            b"p" => {
                if let Some(at) = self.place(path)
                    && let Ok(c) = CString::new(at.as_os_str().as_bytes())
                {
                    // SAFETY: `c` is a valid NUL-terminated path.
                    unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
                }
            }
            b"l" => {
                let target = self.expand(arg);
                if !target.is_empty()
                    && !target.contains(&0)
                    && let Some(at) = self.place(path)
                {
                    let _ = symlink(std::ffi::OsStr::from_bytes(&target), at);
                }
            }
            _ => {}
        }
    }
}

fn split(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

fn number(text: &[u8]) -> u64 {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// What one resolver did with one path.
enum Outcome {
    Opened((u64, u64)),
    Refused(ProcFileError),
}

fn open_and_check(tree: &Tree, resolver: Resolver, path: &Path, max: u64, cap: u64) -> Outcome {
    let root = ProcRoot::new(&tree.root)
        .expect("the root opens")
        .with_resolver(resolver);
    match root.open(path, max) {
        Ok(opened) => Outcome::Opened(check_opened(tree, &opened, path, max, cap, resolver)),
        Err(error) => Outcome::Refused(error),
    }
}

/// The opened file is one this run made inside the root; its reads respect the cap.
fn check_opened(
    tree: &Tree,
    opened: &OpenedFile,
    path: &Path,
    max: u64,
    cap: u64,
    resolver: Resolver,
) -> (u64, u64) {
    let meta = opened.file.metadata().expect("fstat of an opened file");
    let id = (meta.dev(), meta.ino());
    assert!(
        meta.file_type().is_file(),
        "{resolver:?} {path:?}: not regular"
    );
    assert!(
        !tree.forbidden.contains(&id),
        "{resolver:?} {path:?}: opened a sentinel"
    );
    let fd_path = fs::read_link(format!("/proc/self/fd/{}", opened.file.as_raw_fd()))
        .expect("readlink of the fd");
    assert!(
        fd_path.starts_with(&tree.root),
        "{resolver:?} {path:?}: opened {fd_path:?}, outside {:?}",
        tree.root
    );
    let contents = tree
        .inside
        .get(&id)
        .unwrap_or_else(|| panic!("{resolver:?} {path:?}: opened {fd_path:?}, not created"));
    assert!(opened.size <= max, "{resolver:?} {path:?}: over its cap");
    let size = match contents {
        Contents::Bytes(bytes) => bytes.len() as u64,
        Contents::Sparse(size) => *size,
    };
    assert_eq!(opened.size, size, "{resolver:?} {path:?}: wrong size");
    match (opened.read_capped(cap), contents) {
        (Ok(read), Contents::Bytes(bytes)) => assert_eq!(&read, bytes, "{path:?}: contents"),
        (Ok(read), Contents::Sparse(size)) => {
            assert_eq!(read.len() as u64, *size, "{path:?}: sparse length");
            assert!(read.iter().all(|&b| b == 0), "{path:?}: sparse contents");
        }
        (Err(ProcFileError::TooLarge { .. }), _) => assert!(size > cap, "{path:?}: refused"),
        (Err(error), _) => panic!("{path:?}: read failed: {error}"),
    }
    id
}

fn check_namespace_pid(text: &str) {
    let expected = text
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .and_then(|rest| rest.split_whitespace().last())
        .and_then(|last| last.parse::<u32>().ok());
    assert_eq!(namespace_pid(text), expected);
}

fuzz_target!(|data: &[u8]| {
    check_namespace_pid(&String::from_utf8_lossy(data));
    let cap = data.len() as u64 / 2;
    match procfile::read_capped(data, cap, Path::new("input")) {
        Ok(read) => assert_eq!(read, data),
        Err(_) => assert!(data.len() as u64 > cap),
    }

    let mut tree = Tree::new();
    let mut opens = Vec::new();
    let mut cap = 1 << 16;
    for line in data.split(|&b| b == b'\n').take(MAX_ENTRIES) {
        match split(line) {
            (b"o", rest) if opens.len() < MAX_OPENS => {
                let (path, max) = split(rest);
                let max = if max.is_empty() { 1 << 20 } else { number(max) };
                opens.push((tree.expand(path), max, cap));
            }
            (b"c", arg) => cap = number(arg).min(1 << 20),
            _ => tree.build(line),
        }
    }
    for (path, max, cap) in opens {
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(&path));
        let kernel = open_and_check(&tree, Resolver::Openat2, &path, max, cap);
        let walker = open_and_check(&tree, Resolver::Walk, &path, max, cap);
        match (kernel, walker) {
            (Outcome::Opened(a), Outcome::Opened(b)) => {
                assert_eq!(a, b, "{path:?}: the resolvers opened different files")
            }
            (Outcome::Refused(_), Outcome::Refused(_)) => {}
            (Outcome::Opened(_), Outcome::Refused(e))
                if matches!(&e, ProcFileError::Open { source, .. }
                    if source.raw_os_error() == Some(libc::ENAMETOOLONG)) => {}
            (Outcome::Opened(_), Outcome::Refused(e)) => {
                panic!("{path:?}: openat2 opened it, the walker refused: {e}")
            }
            (Outcome::Refused(e), Outcome::Opened(_)) => {
                panic!("{path:?}: the walker opened it, openat2 refused: {e}")
            }
        }
    }
    tree.remove();
});
