//! Locking that survives a panicked holder.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the data even if a thread panicked while holding it: a worker that panics
/// stops the link (see `Link::failure`), and the control side must still read the counters
/// and shut the rest down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
