//! Waking a worker blocked in its backend's wait, from another thread.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::sys;

/// Wakes a worker blocked in [`PacketIo::wait`](crate::PacketIo::wait) from another thread.
#[derive(Debug, Clone)]
pub struct Waker(pub(crate) Arc<OwnedFd>);

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        Ok(Waker(Arc::new(sys::eventfd()?)))
    }

    /// Wakes the worker.
    pub fn wake(&self) {
        sys::eventfd_signal(self.0.as_fd());
    }

    /// Clears the wake-up (the backend does, having woken).
    pub(crate) fn drain(&self) {
        sys::eventfd_drain(self.0.as_fd());
    }
}
