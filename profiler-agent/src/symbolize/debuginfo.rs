//! Separate debug files, looked up inside the process's root the way gdb and perf look them
//! up on the host: by build id under `/usr/lib/debug/.build-id/`, then by `.gnu_debuglink`
//! next to the binary, in its `.debug/` directory and under `/usr/lib/debug/`. Every candidate
//! is opened through [`crate::procfile`] (inside the process's root, regular files only) and
//! its build id is read with [`read_build_id`]: a few bounded reads of headers and notes, no
//! mapping, so a hostile candidate can neither block, escape the root nor fault the agent.

use std::{
    cell::OnceCell,
    fs::File,
    path::{Path, PathBuf},
};

use object::{
    FileKind, ReadRef,
    elf::{ELF_NOTE_GNU, NT_GNU_BUILD_ID, SHT_NOTE},
    read::elf::{FileHeader, SectionHeader as _},
};

use super::{
    binary::DebugFileFinder,
    budget::{Limits, SymbolBudget},
    filedata::FileData,
};
use crate::procfile::{MAX_OBJECT_FILE_SIZE, ProcFileError, ProcRoot, build_id_debug_path};

/// Bytes read from one file to find its build id, headers included.
const BUILD_ID_READ_BUDGET: u64 = 2 << 20;
/// Section header tables larger than this are not read (16 384 ELF64 headers).
const MAX_SECTION_HEADERS: u64 = 1 << 20;
/// Note sections larger than this are skipped: a build id note is a few dozen bytes.
const MAX_NOTE_SECTION: u64 = 64 << 10;

pub struct RootedDebugFinder {
    /// The process's root, e.g. `/proc/PID/root`, opened on first use.
    root_path: PathBuf,
    root: OnceCell<Option<ProcRoot>>,
    /// The binary's path as the process sees it.
    binary: PathBuf,
    /// Where to look by build id, in order, when the process's root is gone (it exited
    /// before its frames were named): the host's root, the agent's own. Only a debug file
    /// carrying the same build id is taken from there.
    fallbacks: Vec<PathBuf>,
}

impl RootedDebugFinder {
    pub fn new(root: impl Into<PathBuf>, binary: impl Into<PathBuf>) -> Self {
        Self {
            root_path: root.into(),
            root: OnceCell::new(),
            binary: binary.into(),
            fallbacks: Vec::new(),
        }
    }

    /// Looks in `root` by build id when the process's own root cannot be opened (after the
    /// roots given before). Without this, a binary first named after its process exited (a
    /// short-lived `gzip` in a loop) would be loaded without its debug file, and stay so in
    /// the cache for every process.
    pub fn with_fallback(mut self, root: impl Into<PathBuf>) -> Self {
        self.fallbacks.push(root.into());
        self
    }

    /// A finder on an already opened root.
    pub fn with_root(root: ProcRoot, binary: impl Into<PathBuf>) -> Self {
        Self {
            root_path: root.path().to_owned(),
            root: OnceCell::from(Some(root)),
            binary: binary.into(),
            fallbacks: Vec::new(),
        }
    }

    fn root(&self) -> Option<&ProcRoot> {
        self.root
            .get_or_init(|| match ProcRoot::new(&self.root_path) {
                Ok(root) => Some(root),
                Err(error) => {
                    tracing::debug!(%error, "process root not openable");
                    None
                }
            })
            .as_ref()
    }

    fn candidates(&self, build_id: Option<&[u8]>, debuglink: Option<&str>) -> Vec<PathBuf> {
        let mut out = Vec::new();
        out.extend(build_id.and_then(build_id_debug_path));
        // A debuglink is a bare file name; anything with a path separator is not trusted.
        if let Some(link) = debuglink.filter(|l| !l.is_empty() && !l.contains('/')) {
            let dir = self.binary.parent().unwrap_or(Path::new("/"));
            out.push(dir.join(link));
            out.push(dir.join(".debug").join(link));
            out.push(
                Path::new("/usr/lib/debug")
                    .join(dir.strip_prefix("/").unwrap_or(dir))
                    .join(link),
            );
        }
        out
    }
}

impl DebugFileFinder for RootedDebugFinder {
    fn find(&mut self, build_id: Option<&[u8]>, debuglink: Option<&str>) -> Option<File> {
        let Some(root) = self.root() else {
            return self.find_in_fallback(build_id?);
        };
        for candidate in self.candidates(build_id, debuglink) {
            if candidate == self.binary {
                continue; // a debuglink naming the binary itself
            }
            let file = match root.open(&candidate, MAX_OBJECT_FILE_SIZE) {
                Ok(opened) => opened.file,
                Err(ProcFileError::Open { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                Err(error) => {
                    tracing::debug!(%error, reason = error.reason(), "debug file not used");
                    continue;
                }
            };
            if matches_build_id(&file, build_id) {
                return Some(file);
            }
            tracing::debug!(path = %candidate.display(), "debug file with another build id");
        }
        None
    }
}

impl RootedDebugFinder {
    /// The build-id candidate in the first fallback root that has it with that very build
    /// id. A root may be refused (`/proc/1/root` in a sandbox whose init is not ours).
    fn find_in_fallback(&self, build_id: &[u8]) -> Option<File> {
        let candidate = self.candidates(Some(build_id), None).into_iter().next()?;
        self.fallbacks.iter().find_map(|path| {
            let root = ProcRoot::new(path)
                .inspect_err(|error| tracing::debug!(%error, "fallback root not openable"))
                .ok()?;
            let file = root.open(&candidate, MAX_OBJECT_FILE_SIZE).ok()?.file;
            (read_build_id(&file) == BuildId::Found(build_id.to_vec())).then_some(file)
        })
    }
}

/// A debug file is used only when its build id equals the binary's (when both have one).
fn matches_build_id(file: &File, expected: Option<&[u8]>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    match read_build_id(file) {
        BuildId::Found(id) => id == expected,
        BuildId::Missing => true,
        BuildId::Unreadable => false,
    }
}

/// What [`read_build_id`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum BuildId {
    Found(Vec<u8>),
    /// An ELF file without a build id note.
    Missing,
    /// Not ELF, malformed, or over the read budget.
    Unreadable,
}

impl BuildId {
    pub fn found(self) -> Option<Vec<u8>> {
        match self {
            Self::Found(id) => Some(id),
            _ => None,
        }
    }
}

/// The GNU build id note of an ELF file, from its section headers and note sections only:
/// positional reads (the file's offset is untouched) of at most 2 MiB in all, nothing
/// mapped, so a file truncated or grown meanwhile yields an error, never a fault.
pub fn read_build_id(file: &File) -> BuildId {
    // The reader the symbol tables are read with, over a budget of its own: every byte read
    // counts, and a read past the budget fails like one past the end of the file.
    let Ok(data) = file.try_clone().and_then(|file| {
        FileData::from_file(
            file,
            &SymbolBudget::new(BUILD_ID_READ_BUDGET, Limits::default()),
        )
    }) else {
        return BuildId::Unreadable;
    };
    let data = &data;
    let found = match FileKind::parse(data) {
        Ok(FileKind::Elf32) => {
            elf_build_id::<object::elf::FileHeader32<object::Endianness>, _>(data)
        }
        Ok(FileKind::Elf64) => {
            elf_build_id::<object::elf::FileHeader64<object::Endianness>, _>(data)
        }
        _ => None,
    };
    match found {
        Some(Some(id)) => BuildId::Found(id),
        Some(None) => BuildId::Missing,
        None => BuildId::Unreadable,
    }
}

/// `None` when unreadable, `Some(None)` when there is no build id.
fn elf_build_id<'d, H, R>(data: R) -> Option<Option<Vec<u8>>>
where
    H: FileHeader<Endian = object::Endianness>,
    R: ReadRef<'d>,
{
    let header = H::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let count = header.shnum(endian, data).ok()? as u64;
    if count.saturating_mul(std::mem::size_of::<H::SectionHeader>() as u64) > MAX_SECTION_HEADERS {
        return None;
    }
    for section in header.section_headers(endian, data).ok()? {
        if section.sh_type(endian) != SHT_NOTE || section.sh_size(endian).into() > MAX_NOTE_SECTION
        {
            continue;
        }
        let Ok(Some(mut notes)) = section.notes(endian, data) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == ELF_NOTE_GNU && note.n_type(endian) == NT_GNU_BUILD_ID {
                return Some(Some(note.desc().to_vec()));
            }
        }
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_paths_follow_gdb() {
        let f = RootedDebugFinder::new("/proc/1/root", "/usr/bin/app");
        let c = f.candidates(Some(&[0xab, 0xcd, 0xef]), Some("app.debug"));
        let c: Vec<_> = c.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            c,
            [
                "/usr/lib/debug/.build-id/ab/cdef.debug",
                "/usr/bin/app.debug",
                "/usr/bin/.debug/app.debug",
                "/usr/lib/debug/usr/bin/app.debug",
            ]
        );
    }

    #[test]
    fn hostile_debuglinks_are_ignored() {
        let f = RootedDebugFinder::new("/proc/1/root", "/usr/bin/app");
        assert!(f.candidates(None, Some("../../etc/shadow")).is_empty());
        assert!(f.candidates(None, Some("")).is_empty());
        assert!(f.candidates(Some(&[1]), None).is_empty());
    }

    use std::{os::unix::fs::symlink, sync::mpsc, time::Duration};

    /// A small ELF with a build id that every test machine has.
    const SAMPLE_ELF: &str = "/usr/bin/true";

    fn sample_build_id() -> Vec<u8> {
        use object::Object as _;
        let bytes = std::fs::read(SAMPLE_ELF).unwrap();
        let object = object::File::parse(&*bytes).unwrap();
        object.build_id().unwrap().expect("a build id").to_vec()
    }

    fn build_id_path(id: &[u8]) -> PathBuf {
        let f = RootedDebugFinder::new("/", "/x");
        f.candidates(Some(id), None).remove(0)
    }

    #[test]
    fn reads_the_same_build_id_as_object_without_mapping() {
        let file = File::open(SAMPLE_ELF).unwrap();
        assert_eq!(read_build_id(&file), BuildId::Found(sample_build_id()));
        let text = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(text.path(), "not an ELF file").unwrap();
        assert_eq!(read_build_id(text.as_file()), BuildId::Unreadable);
    }

    #[test]
    fn a_huge_section_header_table_is_not_read() {
        // Our sample's ELF header, claiming 65 535 sections right after it (4 MiB of headers).
        let mut bytes = std::fs::read(SAMPLE_ELF).unwrap()[..64].to_vec();
        assert_eq!(bytes[4], 2, "ELF64 sample");
        bytes[0x28..0x30].copy_from_slice(&64u64.to_le_bytes()); // e_shoff
        bytes[0x3c..0x3e].copy_from_slice(&u16::MAX.to_le_bytes()); // e_shnum
        bytes[0x3e..0x40].copy_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        file.as_file().set_len(8 << 20).unwrap();
        assert_eq!(read_build_id(file.as_file()), BuildId::Unreadable);
        // Within the limits, the same layout reads as an ELF file without a build id.
        bytes[0x3c..0x3e].copy_from_slice(&16u16.to_le_bytes());
        std::fs::write(file.path(), &bytes).unwrap();
        file.as_file().set_len(8 << 20).unwrap();
        assert_eq!(read_build_id(file.as_file()), BuildId::Missing);
    }

    #[test]
    fn a_fifo_at_the_debuglink_path_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("tmp")).unwrap();
        let fifo =
            std::ffi::CString::new(tmp.path().join("tmp/app.debug").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let root = tmp.path().to_owned();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut f = RootedDebugFinder::new(root, "/tmp/app");
            tx.send(f.find(None, Some("app.debug")).is_some())
        });
        let found = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("find blocked");
        assert!(!found);
    }

    #[test]
    fn a_build_id_link_to_a_host_file_does_not_reach_it() {
        let id = sample_build_id();
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp
            .path()
            .join(build_id_path(&id).strip_prefix("/").unwrap());
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        // The attack: an absolute link naming a host file with the wanted build id.
        symlink(SAMPLE_ELF, &link).unwrap();
        let mut f = RootedDebugFinder::new(tmp.path(), "/usr/bin/app");
        assert!(f.find(Some(&id), None).is_none(), "host file reached");
        // The same file inside the root is found through the same absolute link.
        let inside = tmp.path().join(SAMPLE_ELF.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::copy(SAMPLE_ELF, &inside).unwrap();
        let found = f.find(Some(&id), None).expect("found inside the root");
        let found = found.metadata().unwrap();
        let inside = std::fs::metadata(&inside).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!((found.dev(), found.ino()), (inside.dev(), inside.ino()));
        // Another build id is not accepted.
        assert!(f.find(Some(&[0xab; 20]), Some("true")).is_none());
    }

    #[test]
    fn a_process_gone_is_looked_up_by_build_id_in_the_fallback_root() {
        let id = sample_build_id();
        let host = tempfile::tempdir().unwrap();
        let path = host
            .path()
            .join(build_id_path(&id).strip_prefix("/").unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(SAMPLE_ELF, &path).unwrap();
        let gone = host.path().join("no-such-process/root");
        let mut f = RootedDebugFinder::new(&gone, "/usr/bin/app");
        assert!(f.find(Some(&id), None).is_none(), "no fallback, nothing");
        // A fallback that cannot be opened (a refused `/proc/1/root`) passes to the next.
        let mut f = RootedDebugFinder::new(&gone, "/usr/bin/app")
            .with_fallback(host.path().join("refused"))
            .with_fallback(host.path());
        assert!(
            f.find(Some(&id), None).is_some(),
            "found by build id in the second fallback"
        );
        // Only with that very build id: the file at another id's path is not taken.
        let mut other = id.clone();
        other[0] ^= 0xff;
        let other_path = host
            .path()
            .join(build_id_path(&other).strip_prefix("/").unwrap());
        std::fs::create_dir_all(other_path.parent().unwrap()).unwrap();
        std::fs::copy(SAMPLE_ELF, &other_path).unwrap();
        assert!(f.find(Some(&other), None).is_none());
        // And never by debuglink, which names a path, not a build.
        assert!(f.find(None, Some("true")).is_none());
    }
}
