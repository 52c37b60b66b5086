//! The worker: one thread driving the engine over a batched I/O backend.
//!
//! Each turn: wait for input or the next timer; then, holding the engine for the length of
//! one batch, receive datagrams and decapsulate them, write the packets out, read packets
//! and encapsulate them, run due timers, and send everything in one batched call.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sitelink_frame::{Datagram, PacketBuf};
use sitelink_io::PacketIo;

use crate::{Shared, lock};

/// How often drop counters are written to the debug log when they change.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// After an I/O error, wait this long before trying again, so that a broken descriptor is
/// reported rather than spun on.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

pub(crate) fn run(shared: Arc<Shared>, mut io: Box<dyn PacketIo>) {
    let mut datagrams: Vec<Datagram> = Vec::with_capacity(1024);
    let mut packets: Vec<PacketBuf> = Vec::with_capacity(1024);
    let mut out: Vec<Datagram> = Vec::with_capacity(1024);
    let mut fwmark = shared.fwmark.load(Ordering::Relaxed);
    let mut last_drop_log = Instant::now();
    let mut logged_drops = 0u64;
    let mut errors = ErrorLog::default();

    // The engine's next timer, read at the end of each turn while the engine is held anyway
    // (a control-path change wakes the worker, and the turn that follows reads it afresh).
    let mut deadline = lock(&shared.device).next_deadline();
    while !shared.stop.load(Ordering::Relaxed) {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if let Err(e) = io.wait(timeout) {
            errors.report("waiting for I/O", &e);
            std::thread::sleep(ERROR_BACKOFF);
        }
        let now = Instant::now();
        let mut dev = lock(&shared.device);

        if let Some(socket) = lock(&shared.pending_socket).take() {
            let port = socket.port();
            match io.replace_socket(socket, dev.pool_mut()) {
                Ok(()) => tracing::info!(port, "listening on a new UDP port"),
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

        if let Err(e) = io.recv_datagrams(dev.pool_mut(), &mut datagrams) {
            errors.report("receiving datagrams", &e);
        }
        if !datagrams.is_empty() {
            dev.decapsulate(now, &mut datagrams, &mut packets, &mut out);
            if let Err(e) = io.write_packets(&mut packets, dev.pool_mut()) {
                errors.report("writing packets", &e);
            }
        }
        let mut failed_read = false;
        if let Err(e) = io.read_packets(dev.pool_mut(), &mut packets) {
            if sitelink_io::is_device_gone(&e) {
                tracing::info!(error = %e, "the TUN device is gone; stopping");
                shared.stop.store(true, Ordering::Relaxed);
            }
            errors.report("reading packets", &e);
            failed_read = true;
        }
        if !packets.is_empty() {
            dev.encapsulate(now, &mut packets, &mut out);
        }
        if dev.next_deadline().is_some_and(|d| d <= now) {
            dev.on_timers(now, &mut out);
        }
        if !out.is_empty()
            && let Err(e) = io.send_datagrams(&mut out, dev.pool_mut())
        {
            errors.report("sending datagrams", &e);
        }

        if now.duration_since(last_drop_log) >= DROP_LOG_INTERVAL {
            let drops = &dev.stats().drops;
            if drops.total() != logged_drops {
                logged_drops = drops.total();
                tracing::debug!(?drops, "drops by reason");
            }
            last_drop_log = now;
        }
        deadline = dev.next_deadline();
        drop(dev);
        *lock(&shared.io_stats) = io.stats().clone();
        if failed_read {
            std::thread::sleep(ERROR_BACKOFF);
        }
    }
    *lock(&shared.io_stats) = io.stats().clone();
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
