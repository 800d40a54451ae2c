//! Thin, `EINTR`-retrying wrappers of the system calls the layer uses: `openat`, `openat2`
//! (through `syscall(2)`, as libc has no wrapper), `fstat` and `readlinkat`.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
};

use super::{owned, raw_or_cwd};

/// Times `openat2` is retried on `EAGAIN` (a concurrent rename while resolving `..`).
const OPENAT2_RETRIES: usize = 8;

fn retrying<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `openat(dir, path, flags)`; `None` is the current directory.
pub fn openat(dir: Option<BorrowedFd<'_>>, path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    retrying(|| {
        // SAFETY: `path` is NUL-terminated and outlives the call; no mode is read without
        // O_CREAT.
        let fd = unsafe { libc::openat(raw_or_cwd(dir), path.as_ptr(), flags) };
        owned(fd.into())
    })
}

/// `openat2(dir, path, {flags, resolve})`; `None` is the current directory.
pub fn openat2(
    dir: Option<BorrowedFd<'_>>,
    path: &CStr,
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    let mut attempts = 0;
    retrying(|| {
        // SAFETY: the pointers are valid for the call and `size` is the struct's size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                raw_or_cwd(dir),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        match owned(fd) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && attempts < OPENAT2_RETRIES => {
                attempts += 1;
                Err(io::ErrorKind::Interrupted.into())
            }
            other => other,
        }
    })
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the kernel on success.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    retrying(|| {
        // SAFETY: `stat` is a valid out pointer for the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    })?;
    Ok(stat)
}

/// The target of the symlink `fd` (opened `O_PATH | O_NOFOLLOW`); at most `PATH_MAX` bytes.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    let n = retrying(|| {
        // SAFETY: the empty path reads the link `fd` itself; `buf` is valid for its length.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    })?;
    if n >= buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf.truncate(n);
    Ok(buf)
}
