//! The workers: threads that each drive one batched I/O backend and share the engine.
//!
//! A turn: wait for input or the engine's next timer; receive datagrams and read packets
//! into the worker's own buffers (no lock); then, holding the engine, route, count and
//! check them (`decapsulate_deferred`, `encapsulate_deferred`) and run due timers; release
//! it and seal and open the batch (`CryptoBatch::run`, the costly part, in parallel with the
//! other workers); take the engine again only if opened packets need delivering
//! (`complete`); then write the packets and send the datagrams.
//!
//! Any worker may run the engine's timers: each waits until the engine's next deadline as it
//! read it at the end of its last turn, so the worker whose turn moved a deadline earlier is
//! the one that wakes for it; control-path changes wake them all.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sitelink_frame::{BufPool, Datagram, PacketBuf};
use sitelink_io::PacketIo;
use sitelink_proto::{CryptoBatch, Device};

use crate::{Shared, lock};

/// How often drop counters are written to the debug log when they change.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// After an I/O error, wait this long before trying again, so that a broken descriptor is
/// reported rather than spun on.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The engine's own pool serves handshakes and keepalives and collects the buffers of what it
/// drops; a worker tops it up below the low mark and takes back what lies above the high one
/// (else, under a flood of garbage, workers would allocate while the engine hoards).
const ENGINE_POOL_LOW: usize = 16;
const ENGINE_POOL_HIGH: usize = 128;

/// Vectors are sized for the largest batch a backend moves per call.
const VEC_CAPACITY: usize = 1024;

pub(crate) fn run(shared: Arc<Shared>, index: usize, mut io: Box<dyn PacketIo>, mut pool: BufPool) {
    let slot = &shared.workers[index];
    let mut datagrams: Vec<Datagram> = Vec::with_capacity(VEC_CAPACITY);
    let mut read: Vec<PacketBuf> = Vec::with_capacity(VEC_CAPACITY);
    let mut delivered: Vec<PacketBuf> = Vec::with_capacity(VEC_CAPACITY);
    let mut out: Vec<Datagram> = Vec::with_capacity(VEC_CAPACITY * 2);
    let mut batch = CryptoBatch::with_capacity(VEC_CAPACITY);
    let mut fwmark = shared.fwmark.load(Ordering::Relaxed);
    let mut last_drop_log = Instant::now();
    let mut logged_drops = 0u64;
    let mut errors = ErrorLog::default();

    let mut deadline = lock(&shared.device).next_deadline();
    while !shared.stop.load(Ordering::Relaxed) {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if let Err(e) = io.wait(timeout) {
            errors.report("waiting for I/O", &e);
            std::thread::sleep(ERROR_BACKOFF);
        }
        let now = Instant::now();

        if let Some(socket) = lock(&slot.pending_socket).take() {
            let port = socket.port();
            match io.replace_socket(socket, &mut pool) {
                Ok(()) if index == 0 => tracing::info!(port, "listening on a new UDP port"),
                Ok(()) => {}
                Err(e) => errors.report("switching UDP sockets", &e),
            }
        }
        let mark = shared.fwmark.load(Ordering::Relaxed);
        if mark != fwmark {
            fwmark = mark;
            if let Err(e) = io.set_fwmark(mark) {
                errors.report("setting the fwmark", &e);
            }
        }

        if let Err(e) = io.recv_datagrams(&mut pool, &mut datagrams) {
            errors.report("receiving datagrams", &e);
        }
        let mut failed_read = false;
        if let Err(e) = io.read_packets(&mut pool, &mut read) {
            if sitelink_io::is_device_gone(&e) {
                tracing::info!(error = %e, "the TUN device is gone; stopping");
                shared.stop_all();
            }
            errors.report("reading packets", &e);
            failed_read = true;
        }

        {
            let mut dev = lock(&shared.device);
            if !datagrams.is_empty() {
                dev.decapsulate_deferred(now, &mut datagrams, &mut batch, &mut out);
            }
            if !read.is_empty() {
                dev.encapsulate_deferred(now, &mut read, &mut batch, &mut out);
            }
            if dev.next_deadline().is_some_and(|d| d <= now) {
                dev.on_timers(now, &mut out);
            }
            balance_pools(&mut dev, &mut pool);
            if index == 0 && now.duration_since(last_drop_log) >= DROP_LOG_INTERVAL {
                let drops = &dev.stats().drops;
                if drops.total() != logged_drops {
                    logged_drops = drops.total();
                    tracing::debug!(?drops, "drops by reason");
                }
                last_drop_log = now;
            }
            deadline = dev.next_deadline();
        }

        // The AEAD, without the engine: other workers route and count meanwhile.
        batch.run(&mut out);
        if batch.needs_completion() {
            let mut dev = lock(&shared.device);
            dev.complete(now, &mut batch, &mut delivered, &mut out);
            deadline = dev.next_deadline();
        }

        if !delivered.is_empty()
            && let Err(e) = io.write_packets(&mut delivered, &mut pool)
        {
            errors.report("writing packets", &e);
        }
        if !out.is_empty()
            && let Err(e) = io.send_datagrams(&mut out, &mut pool)
        {
            errors.report("sending datagrams", &e);
        }
        *lock(&slot.io_stats) = io.stats().clone();
        if failed_read {
            std::thread::sleep(ERROR_BACKOFF);
        }
    }
    *lock(&slot.io_stats) = io.stats().clone();
}

/// Evens out the engine's pool and this worker's (moving free buffers, allocating nothing).
fn balance_pools(dev: &mut Device, pool: &mut BufPool) {
    let engine = dev.pool_mut();
    let free = engine.free_len();
    if free > ENGINE_POOL_HIGH {
        engine.give(pool, free - ENGINE_POOL_LOW);
    } else if free < ENGINE_POOL_LOW / 2 {
        pool.give(engine, ENGINE_POOL_LOW - free);
    }
}

/// Logs I/O errors without flooding the log: at most one a second, each with a count of
/// those suppressed since the last.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn report(&mut self, what: &str, e: &io::Error) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(error = %e, suppressed = self.suppressed, "{what} failed");
        self.last = Some(now);
        self.suppressed = 0;
    }
}
