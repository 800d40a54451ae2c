//! Reads another process's memory: `process_vm_readv` in production, a map of byte ranges
//! in tests. A read is all or nothing: a short read (an unmapped page) is an error.

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot read {len} bytes at {address:#x} of process {pid}: {source}")]
    Read {
        pid: u32,
        address: u64,
        len: usize,
        source: std::io::Error,
    },
}

/// The memory of one process.
pub trait RemoteMemory {
    /// Fills `buf` from `address`.
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), RemoteError>;

    fn read_u64(&self, address: u64) -> Result<u64, RemoteError> {
        let mut b = [0u8; 8];
        self.read(address, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u32(&self, address: u64) -> Result<u32, RemoteError> {
        let mut b = [0u8; 4];
        self.read(address, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

impl<T: RemoteMemory + ?Sized> RemoteMemory for &T {
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        (**self).read(address, buf)
    }
}

/// A live process, read with `process_vm_readv` (needs ptrace access: root, or the same
/// user without Yama restrictions).
pub struct ProcessMemory {
    pid: u32,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }
}

impl RemoteMemory for ProcessMemory {
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        let len = buf.len();
        let error = |source| RemoteError::Read {
            pid: self.pid,
            address,
            len,
            source,
        };
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: address as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` covers `buf`, which is valid for writes of its length; the remote
        // range is only read by the kernel, which checks it.
        let read = unsafe { libc::process_vm_readv(self.pid as i32, &local, 1, &remote, 1, 0) };
        match usize::try_from(read) {
            Ok(n) if n == len => Ok(()),
            Ok(_) => Err(error(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            ))),
            Err(_) => Err(error(std::io::Error::last_os_error())),
        }
    }
}

/// A test double: byte ranges at addresses; anything else is unmapped.
#[cfg(test)]
#[derive(Default)]
pub struct FakeMemory {
    pub regions: std::collections::BTreeMap<u64, Vec<u8>>,
}

#[cfg(test)]
impl FakeMemory {
    /// Writes `bytes` at `address`, as a region of their own.
    pub fn put(&mut self, address: u64, bytes: &[u8]) {
        self.regions.insert(address, bytes.to_vec());
    }

    pub fn put_u64(&mut self, address: u64, value: u64) {
        self.put(address, &value.to_le_bytes());
    }
}

#[cfg(test)]
impl RemoteMemory for FakeMemory {
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        let found = self
            .regions
            .range(..=address)
            .next_back()
            .and_then(|(start, bytes)| {
                let from = usize::try_from(address - start).ok()?;
                bytes.get(from..from + buf.len())
            });
        match found {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(RemoteError::Read {
                pid: 0,
                address,
                len: buf.len(),
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_refuses_unmapped_memory() {
        let value: u64 = 0x1122_3344_5566_7788;
        let me = ProcessMemory::new(std::process::id());
        assert_eq!(me.read_u64(&value as *const u64 as u64).unwrap(), value);
        assert!(me.read_u64(8).is_err(), "page zero is never mapped");
    }
}
