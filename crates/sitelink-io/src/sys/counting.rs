//! A global allocator that counts allocations while switched on, for tests that prove a path
//! allocates nothing, and keeps the bytes allocated and not yet freed, for tests that measure
//! what a structure costs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// The system allocator, counting allocations and reallocations while [`start`] is in effect.
/// Install it in a test binary with `#[global_allocator]`.
///
/// [`start`]: CountingAllocator::start
#[derive(Debug)]
pub struct CountingAllocator {
    on: AtomicBool,
    count: AtomicU64,
    live: AtomicI64,
    /// Capture where the first counted allocation came from ([`first_allocation`]).
    ///
    /// [`first_allocation`]: CountingAllocator::first_allocation
    trace_first: AtomicBool,
}

std::thread_local! {
    /// Set while this thread captures a backtrace (whose own allocations are not counted).
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The backtrace of the first allocation counted since [`CountingAllocator::start`], if
/// tracing was asked for.
static FIRST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

impl CountingAllocator {
    /// A counter, switched off.
    pub const fn new() -> Self {
        CountingAllocator {
            on: AtomicBool::new(false),
            count: AtomicU64::new(0),
            live: AtomicI64::new(0),
            trace_first: AtomicBool::new(false),
        }
    }

    /// Starts counting (from zero).
    pub fn start(&self) {
        *FIRST.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.count.store(0, Ordering::SeqCst);
        self.on.store(true, Ordering::SeqCst);
    }

    /// Makes the next [`start`](Self::start) capture where the first counted allocation came
    /// from, for a failing test to show ([`first_allocation`](Self::first_allocation)).
    pub fn trace_first_allocation(&self) {
        self.trace_first.store(true, Ordering::SeqCst);
    }

    /// The backtrace of the first allocation counted, if it was traced.
    pub fn first_allocation(&self) -> Option<String> {
        FIRST.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Stops counting and returns the allocations counted.
    pub fn stop(&self) -> u64 {
        self.on.store(false, Ordering::SeqCst);
        self.count.load(Ordering::SeqCst)
    }

    /// The bytes allocated through this allocator and not yet freed (always kept, whether
    /// counting is on or not; the allocator's own overhead per block is not included).
    pub fn live_bytes(&self) -> i64 {
        self.live.load(Ordering::SeqCst)
    }

    fn grow(&self, by: i64) {
        self.live.fetch_add(by, Ordering::Relaxed);
    }

    fn note(&self) {
        if !self.on.load(Ordering::Relaxed) || CAPTURING.with(std::cell::Cell::get) {
            return;
        }
        let first = self.count.fetch_add(1, Ordering::Relaxed) == 0;
        if first && self.trace_first.load(Ordering::Relaxed) {
            CAPTURING.with(|c| c.set(true));
            let trace = format!(
                "thread {:?}:\n{}",
                std::thread::current().name(),
                std::backtrace::Backtrace::force_capture()
            );
            *FIRST.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(trace);
            CAPTURING.with(|c| c.set(false));
        }
    }
}

impl Default for CountingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
// atomics and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: the caller upholds GlobalAlloc::alloc's contract, which is System's.
        let block = unsafe { System.alloc(layout) };
        if !block.is_null() {
            self.grow(layout.size() as i64);
        }
        block
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.grow(-(layout.size() as i64));
        // SAFETY: the caller upholds GlobalAlloc::dealloc's contract, which is System's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note();
        // SAFETY: the caller upholds GlobalAlloc::realloc's contract, which is System's.
        let block = unsafe { System.realloc(ptr, layout, new_size) };
        if !block.is_null() {
            self.grow(new_size as i64 - layout.size() as i64);
        }
        block
    }
}
