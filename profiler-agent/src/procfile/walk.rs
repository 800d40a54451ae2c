//! Path resolution inside a root for kernels without `openat2`: the same semantics as
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`, by hand.
//!
//! Components are opened one at a time with `openat(O_PATH | O_NOFOLLOW)` relative to the
//! directory reached so far, so the kernel never follows a link on the walker's behalf. A
//! symlink's target (read with `readlinkat`) replaces it at the front of the remaining path;
//! an absolute target restarts from the root. `..` pops the walker's stack of held directory
//! descriptors and stays at the root when the stack is empty, so neither `..` nor a directory
//! renamed out of the root during the walk leads outside it. Every component before the last
//! must be a directory, and a trailing `/` makes the last one a directory too, as for the
//! kernel (`file/../x` and `file/` are `ENOTDIR`). At most [`MAX_LINKS`] symlinks
//! (the kernel's limit) and [`MAX_DEPTH`] held directories; past either, `ELOOP` or
//! `ENAMETOOLONG`. The final component is opened with the caller's flags plus `O_NOFOLLOW`
//! relative to its held parent, so a symlink swapped in after the check fails with `ELOOP`.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use super::sys;

/// Symlinks followed in one resolution, as the kernel's `MAXSYMLINKS`.
pub const MAX_LINKS: usize = 40;
/// Directories held open at once while walking; deeper paths are refused.
pub const MAX_DEPTH: usize = 256;

/// Opens `path` inside the directory `root` with `flags`, resolving as described above.
pub fn open(root: BorrowedFd<'_>, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    // Remaining components, next one last.
    let mut pending: Vec<Vec<u8>> = Vec::new();
    push_components(&mut pending, path.as_os_str().as_bytes());
    // Directories below the root along the resolved path.
    let mut dirs: Vec<OwnedFd> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        match name.as_slice() {
            b"." => continue,
            b".." => {
                dirs.pop();
                continue;
            }
            _ => {}
        }
        let parent = dirs.last().map_or(root, |d| d.as_fd());
        let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let fd = sys::openat(
            Some(parent),
            &name,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )?;
        let mode = sys::fstat(fd.as_fd())?.st_mode & libc::S_IFMT;
        if mode == libc::S_IFLNK {
            links += 1;
            if links > MAX_LINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = sys::readlink_fd(fd.as_fd())?;
            if target.first() == Some(&b'/') {
                dirs.clear();
            }
            push_components(&mut pending, &target);
            continue;
        }
        if pending.is_empty() {
            return sys::openat(Some(parent), &name, flags | libc::O_NOFOLLOW);
        }
        // As the kernel: every component before the last must be a directory, even when a
        // `..` follows it (`file/../x` is ENOTDIR, not `x`).
        if mode != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        if dirs.len() >= MAX_DEPTH {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        dirs.push(fd);
    }
    // The path ended on a directory (`/`, `.`, `..` or a trailing separator).
    let dir = dirs.last().map_or(root, |d| d.as_fd());
    sys::openat(Some(dir), c".", flags)
}

/// Pushes the components of `path` so that the first one is popped first. A trailing `/`
/// becomes a final `.`, so the component before it must be a directory (`file/` is ENOTDIR).
fn push_components(pending: &mut Vec<Vec<u8>>, path: &[u8]) {
    let start = pending.len();
    pending.extend(
        path.split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(<[u8]>::to_vec),
    );
    if path.last() == Some(&b'/') {
        pending.push(b".".to_vec());
    }
    pending[start..].reverse();
}
