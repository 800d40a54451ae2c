//! The one way to open a file that a profiled process controls: its binaries and libraries,
//! debug files found inside its root, its perf map.
//!
//! A [`ProcRoot`] is a handle on a process's root directory (`/proc/PID/root` opened as an
//! `O_PATH | O_DIRECTORY` descriptor, or any directory in tests). [`ProcRoot::open`] resolves a
//! path inside it with `openat2(2)` and `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: symlinks
//! inside the root still work (`.build-id` entries are symlinks) but absolute targets and `..`
//! are resolved against the process's root, never the agent's, and procfs magic links are not
//! followed. The file is first opened `O_PATH` and `fstat`ed, so a FIFO or a device is refused
//! without ever being opened for reading; the regular file is then opened `O_RDONLY |
//! O_NONBLOCK | O_NOCTTY | O_CLOEXEC`, `fstat`ed again (regular, under the caller's size cap)
//! and handed back as an [`OpenedFile`]. [`read_capped`] reads it without ever allocating more
//! than its cap, however large the file claims to be or grows while it is read.
//!
//! Kernels without `openat2` (before 5.6, or a seccomp profile that answers `ENOSYS`/`EPERM`)
//! get [`Resolver::Walk`], detected once per process: the path is walked one component at a
//! time with `openat(O_PATH | O_NOFOLLOW)` from the root descriptor; each symlink is read with
//! `readlinkat` and its target spliced into the remaining path (absolute targets restart from
//! the root, at most 40 links in all as the kernel allows); `..` pops the walker's own stack of
//! directory descriptors and stops at the root, so a directory moved out of the root during the
//! walk cannot lead outside it. The final component is opened relative to its held parent with
//! `O_NOFOLLOW` and checked the same way. Paths deeper than [`walk::MAX_DEPTH`] directories
//! are refused rather than holding that many descriptors.
//!
//! `/proc/PID/map_files/START-END` entries are magic links that must be followed (they reach
//! deleted and replaced files); [`open_magic_link`] opens one with the same flags and checks.
//!
//! Refusals (not a regular file, too large, an escape, a symlink loop or magic link) are
//! counted by reason in process-wide counters, read with [`refusals`] and exported by
//! `crate::metrics` as `profiler_unsafe_files_total{reason}`. A missing file is not a refusal.
//! What remains outside this layer's reach: a FUSE file system mounted inside the process's
//! mount namespace can still make a read of a regular file slow.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

mod sys;
pub mod walk;

#[cfg(test)]
mod tests;

/// Largest binary, library or debug file opened for symbolization.
pub const MAX_OBJECT_FILE_SIZE: u64 = 4 << 30;

/// Flags of every file opened for reading: never blocks on a FIFO, never becomes the
/// controlling terminal, never leaks into a child.
const READ_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// Why a file a process controls was not opened or read.
#[derive(Debug, thiserror::Error)]
pub enum ProcFileError {
    #[error("{path}: not a regular file ({kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: {size} bytes, over the {cap}-byte cap")]
    TooLarge { path: PathBuf, size: u64, cap: u64 },
    #[error("{path}: grew past the {cap}-byte cap while read")]
    Grew { path: PathBuf, cap: u64 },
    #[error("{path}: resolution left the process's root")]
    Escape { path: PathBuf },
    #[error("{path}: too many symbolic links, or a magic link")]
    Loop { path: PathBuf },
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: io::Error },
}

impl ProcFileError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotRegular { .. } => "not_regular",
            Self::TooLarge { .. } | Self::Grew { .. } => "too_large",
            Self::Escape { .. } => "escape",
            Self::Loop { .. } => "loop",
            Self::Open { .. } => "open_failed",
            Self::Read { .. } => "read_failed",
        }
    }

    /// Whether the file was refused as unsafe rather than simply missing or unreadable.
    pub fn is_refusal(&self) -> bool {
        REFUSAL_REASONS.contains(&self.reason())
    }

    /// The path named in the error.
    pub fn path(&self) -> &Path {
        match self {
            Self::NotRegular { path, .. }
            | Self::TooLarge { path, .. }
            | Self::Grew { path, .. }
            | Self::Escape { path }
            | Self::Loop { path }
            | Self::Open { path, .. }
            | Self::Read { path, .. } => path,
        }
    }

    /// An open error, classified by errno.
    fn from_open(path: PathBuf, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ELOOP) => Self::Loop { path },
            // EAGAIN: openat2 could not rule out a `..` race after its retries.
            Some(libc::EXDEV | libc::EAGAIN) => Self::Escape { path },
            _ => Self::Open { path, source },
        }
    }
}

/// The reasons counted by [`refusals`], in that order.
pub const REFUSAL_REASONS: [&str; 4] = ["not_regular", "too_large", "escape", "loop"];

static REFUSALS: [AtomicU64; REFUSAL_REASONS.len()] = [const { AtomicU64::new(0) }; 4];

/// Files refused since the agent started, by reason (cumulative).
pub fn refusals() -> [(&'static str, u64); REFUSAL_REASONS.len()] {
    std::array::from_fn(|i| (REFUSAL_REASONS[i], REFUSALS[i].load(Ordering::Relaxed)))
}

/// Counts a refusal and logs it; passes every error through.
fn counted(error: ProcFileError) -> ProcFileError {
    if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == error.reason()) {
        REFUSALS[i].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(path = %error.path().display(), reason = error.reason(), %error, "unsafe file refused");
    }
    error
}

/// How paths are resolved inside a [`ProcRoot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    /// `openat2(2)` with `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS` (Linux 5.6+).
    Openat2,
    /// A component-by-component walk with `openat(O_PATH | O_NOFOLLOW)`, see [`walk`].
    Walk,
}

impl Resolver {
    /// `Openat2` when the kernel has it, probed once per process.
    pub fn detect() -> Self {
        static DETECTED: OnceLock<Resolver> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let root = c"/";
            match sys::openat2(None, root, libc::O_PATH | libc::O_CLOEXEC, 0) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    tracing::info!(error = %e, "openat2 unavailable: resolving process paths by walking them");
                    Resolver::Walk
                }
                _ => Resolver::Openat2,
            }
        })
    }
}

/// A process's root directory, the only base from which its files are opened.
#[derive(Debug)]
pub struct ProcRoot {
    dir: OwnedFd,
    path: PathBuf,
    resolver: Resolver,
}

/// A regular file opened through this layer, with its size at open time.
#[derive(Debug)]
pub struct OpenedFile {
    pub file: File,
    pub size: u64,
    /// For messages: the root's path joined with the path inside it.
    pub path: PathBuf,
}

impl OpenedFile {
    /// The whole file, refused when it is (or grows) over `cap` bytes.
    pub fn read_capped(&self, cap: u64) -> Result<Vec<u8>, ProcFileError> {
        if self.size > cap {
            return Err(counted(ProcFileError::TooLarge {
                path: self.path.clone(),
                size: self.size,
                cap,
            }));
        }
        read_with_hint(&self.file, cap, self.size, &self.path).map_err(counted)
    }
}

impl ProcRoot {
    /// Opens `dir` (following it if it is a link, as `/proc/PID/root` is) as the root.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, ProcFileError> {
        let path = dir.into();
        let c = cstring(&path)?;
        let dir = sys::openat(None, &c, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .map_err(|source| ProcFileError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            dir,
            path,
            resolver: Resolver::detect(),
        })
    }

    /// The root of process `pid` under the procfs mount `proc` (normally `/proc`).
    pub fn of_pid(proc: &Path, pid: u32) -> Result<Self, ProcFileError> {
        Self::new(proc.join(format!("{pid}/root")))
    }

    /// The same root resolved another way (tests use both).
    pub fn with_resolver(mut self, resolver: Resolver) -> Self {
        self.resolver = resolver;
        self
    }

    pub fn resolver(&self) -> Resolver {
        self.resolver
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `path` (absolute or relative, both inside the root) for reading: a regular file
    /// of at most `max_size` bytes, or an error saying why not.
    pub fn open(&self, path: &Path, max_size: u64) -> Result<OpenedFile, ProcFileError> {
        let shown = self.path.join(path.strip_prefix("/").unwrap_or(path));
        self.open_inner(path, &shown, max_size).map_err(counted)
    }

    /// Opens the directory `path` inside the root (`O_PATH`), to find or create entries in
    /// it by name with `*at` calls, which then never leave it.
    pub fn open_dir(&self, path: &Path) -> Result<OwnedFd, ProcFileError> {
        let shown = self.path.join(path.strip_prefix("/").unwrap_or(path));
        self.resolve(
            path,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            &shown,
        )
        .map_err(counted)
    }

    fn open_inner(
        &self,
        path: &Path,
        shown: &Path,
        max_size: u64,
    ) -> Result<OpenedFile, ProcFileError> {
        // Look before opening for reading: a FIFO or a device is refused unopened.
        let probe = self.resolve(path, libc::O_PATH | libc::O_CLOEXEC, shown)?;
        check_regular(&probe, shown, max_size)?;
        drop(probe);
        let fd = self.resolve(path, READ_FLAGS, shown)?;
        let size = check_regular(&fd, shown, max_size)?;
        Ok(OpenedFile {
            file: File::from(fd),
            size,
            path: shown.to_owned(),
        })
    }

    fn resolve(
        &self,
        path: &Path,
        flags: libc::c_int,
        shown: &Path,
    ) -> Result<OwnedFd, ProcFileError> {
        let result = match self.resolver {
            Resolver::Openat2 => {
                let c = cstring(path)?;
                let resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
                sys::openat2(Some(self.dir.as_fd()), &c, flags, resolve)
            }
            Resolver::Walk => walk::open(self.dir.as_fd(), path, flags),
        };
        result.map_err(|e| ProcFileError::from_open(shown.to_owned(), e))
    }
}

/// Where gdb and perf look first for the separate debug file of `build_id`, as a path inside a
/// process's root: `/usr/lib/debug/.build-id/ab/cdef….debug`. `None` for an id too short to
/// split.
pub fn build_id_debug_path(build_id: &[u8]) -> Option<PathBuf> {
    if build_id.len() < 2 {
        return None;
    }
    let hex: String = build_id.iter().map(|b| format!("{b:02x}")).collect();
    Some(PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &hex[..2],
        &hex[2..]
    )))
}

/// Opens a procfs magic link that must be followed, such as `/proc/PID/map_files/START-END`:
/// the target must be a regular file of at most `max_size` bytes.
pub fn open_magic_link(path: &Path, max_size: u64) -> Result<OpenedFile, ProcFileError> {
    let inner = || {
        let c = cstring(path)?;
        let open = |flags| {
            sys::openat(None, &c, flags).map_err(|e| ProcFileError::from_open(path.to_owned(), e))
        };
        check_regular(&open(libc::O_PATH | libc::O_CLOEXEC)?, path, max_size)?;
        let fd = open(READ_FLAGS)?;
        let size = check_regular(&fd, path, max_size)?;
        Ok(OpenedFile {
            file: File::from(fd),
            size,
            path: path.to_owned(),
        })
    };
    inner().map_err(counted)
}

/// Reads everything `reader` yields, up to `cap` bytes: never allocates more than `cap`
/// bytes, and fails with [`ProcFileError::Grew`] as soon as there is more.
pub fn read_capped(reader: impl Read, cap: u64, path: &Path) -> Result<Vec<u8>, ProcFileError> {
    read_with_hint(reader, cap, 0, path).map_err(counted)
}

/// [`read_capped`] with a first allocation of `hint` bytes (the size from `fstat`).
fn read_with_hint(
    mut reader: impl Read,
    cap: u64,
    hint: u64,
    path: &Path,
) -> Result<Vec<u8>, ProcFileError> {
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    let read_error = |source| ProcFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut buf = Vec::new();
    buf.try_reserve_exact(usize::try_from(hint).unwrap_or(usize::MAX).min(cap))
        .map_err(|_| read_error(io::ErrorKind::OutOfMemory.into()))?;
    loop {
        let len = buf.len();
        if len < buf.capacity() {
            buf.resize(buf.capacity(), 0);
            let n = read_retrying(&mut reader, &mut buf[len..]).map_err(read_error)?;
            buf.truncate(len + n);
            if n == 0 {
                return Ok(buf);
            }
            continue;
        }
        // Full: probe on the stack, so a file of exactly `hint` bytes costs no reallocation.
        let mut probe = [0u8; 8192];
        let n = read_retrying(&mut reader, &mut probe).map_err(read_error)?;
        if n == 0 {
            return Ok(buf);
        }
        if n > cap - len {
            return Err(ProcFileError::Grew {
                path: path.to_owned(),
                cap: cap as u64,
            });
        }
        let grow = len.max(probe.len()).min(cap - len);
        buf.try_reserve_exact(grow)
            .map_err(|_| read_error(io::ErrorKind::OutOfMemory.into()))?;
        buf.extend_from_slice(&probe[..n]);
    }
}

fn read_retrying(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `fstat`: a regular file of at most `max_size` bytes, whose size is returned.
fn check_regular(fd: &OwnedFd, path: &Path, max_size: u64) -> Result<u64, ProcFileError> {
    let stat = sys::fstat(fd.as_fd()).map_err(|source| ProcFileError::Open {
        path: path.to_owned(),
        source,
    })?;
    let kind = file_kind(stat.st_mode);
    if kind != "regular" {
        return Err(ProcFileError::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    if size > max_size {
        return Err(ProcFileError::TooLarge {
            path: path.to_owned(),
            size,
            cap: max_size,
        });
    }
    Ok(size)
}

fn file_kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular",
        libc::S_IFDIR => "directory",
        libc::S_IFIFO => "fifo",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFSOCK => "socket",
        libc::S_IFLNK => "symlink",
        _ => "unknown",
    }
}

fn cstring(path: &Path) -> Result<CString, ProcFileError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ProcFileError::Open {
        path: path.to_owned(),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

/// A borrowed descriptor's raw value, or `AT_FDCWD`.
fn raw_or_cwd(dir: Option<BorrowedFd<'_>>) -> libc::c_int {
    dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd())
}

/// Takes ownership of a descriptor a system call just returned.
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
