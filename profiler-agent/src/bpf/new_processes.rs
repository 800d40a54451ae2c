//! The kernel's announcements of processes sampled for the first time (in an interval): a
//! ring buffer of pids, read by the early-snapshot thread ([`crate::process::early`]) that
//! snapshots each process while it still runs.

use std::{os::fd::AsRawFd as _, time::Duration};

use aya::maps::{MapData, RingBuf};

use crate::process::early::Announcements;

/// The `NEW_PROCESSES` ring buffer, taken out of the sampler for its reader thread.
pub struct NewProcesses {
    ring: RingBuf<MapData>,
}

impl NewProcesses {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Pids announced since the last call, waiting up to `timeout` for the first one.
    pub fn wait(&mut self, timeout: Duration) -> Vec<u32> {
        let mut pids = self.take();
        if !pids.is_empty() {
            return pids;
        }
        let mut poll = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call; the fd is the ring's own.
        unsafe { libc::poll(&mut poll, 1, millis) };
        pids.extend(self.take());
        pids
    }

    fn take(&mut self) -> Vec<u32> {
        let mut pids = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(bytes) = item.get(..4) {
                pids.push(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")));
            }
        }
        pids
    }
}

impl Announcements for NewProcesses {
    fn wait(&mut self, timeout: Duration) -> Vec<u32> {
        NewProcesses::wait(self, timeout)
    }
}
