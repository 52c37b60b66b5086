//! The workers: threads that each drive one batched I/O backend and share the engine.
//!
//! A turn: wait for input or the engine's next timer. Then inbound: receive datagrams into
//! the worker's own buffers (no lock), look them up and check them holding the engine
//! (`decapsulate_deferred`), open them without it (`CryptoBatch::run`, the costly part, in
//! parallel with the other workers), deliver them holding it again (`complete`) and write
//! them to the TUN side. Then outbound: read packets, route them and take counters holding
//! the engine (`encapsulate_deferred`, with due timers and the next deadline), seal them
//! without it, and send everything in one batch.
//!
//! Small packets ([`sitelink_io::SMALL_PACKET`]: a ping, a voice frame) that the backends
//! put ahead of a bulk transfer's take an express pass: when datagrams begin with small ones
//! and go on with bulk, the small ones are opened and written, and what the TUN side then has
//! to send (a ping's reply) is sealed and sent, before the bulk is opened; likewise small
//! packets read ahead of bulk segments are sealed and sent before those are. Only turns that
//! hold both kinds take it, and it keeps every packet's place behind what came before it.
//!
//! A worker that waits for I/O counts as idle; one with a large batch of opens hands half of
//! them to an idle worker ([`crate::open_sharing`]), so that one busy peer, whose datagrams all reach
//! one worker's socket, still has its inbound crypto spread over cores.
//!
//! Any worker may run the engine's timers: each waits until the engine's next deadline as it
//! read it at the end of its last turn, so the worker whose turn moved a deadline earlier is
//! the one that wakes for it; control-path changes wake them all.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32};
use std::sync::{Condvar, Mutex};

use sitelink_frame::{BufPool, Datagram, PacketBuf};
use sitelink_io::{InProcessSide, IoStats, PacketIo, UdpConfig, UdpSocket, Waker};
use sitelink_proto::{CryptoBatch, Device};

use crate::open_sharing::OpenSharing;
use crate::scheduling::WorkerScheduling;
use crate::sync::lock;

/// State shared by the workers and the control side.
pub(crate) struct Shared {
    pub(crate) device: Mutex<Device>,
    /// One slot per worker, in worker order.
    pub(crate) workers: Vec<WorkerSlot>,
    /// Wakes each worker, in worker order.
    pub(crate) wakers: Vec<Waker>,
    /// Where workers share the opening of large batches.
    pub(crate) open_sharing: OpenSharing,
    pub(crate) stop: AtomicBool,
    /// Why the link stopped on its own, if a worker failed (see [`Link::failure`]).
    pub(crate) failure: Mutex<Option<String>>,
    /// Workers that have returned, for [`Link::wait_stopped`] (with its condition variable).
    pub(crate) finished: Mutex<usize>,
    pub(crate) finished_changed: Condvar,
    /// Test hook: the next worker turn panics (see [`Link::inject_worker_panic`]).
    pub(crate) inject_panic: AtomicBool,
    pub(crate) keyed: AtomicBool,
    /// The port the link listens on, and its fwmark: the one place each is kept.
    pub(crate) port: AtomicU16,
    pub(crate) fwmark: AtomicU32,
    /// How the link's sockets are made, but for the port and fwmark above.
    pub(crate) udp: UdpConfig,
    /// The embedded mode's packet side (`None` over a TUN device, which the backends move).
    pub(crate) in_process: Option<InProcessSide>,
    /// The real-time priority workers take while they have time to spare, if any.
    pub(crate) real_time: Option<u8>,
}

impl Shared {
    pub(crate) fn wake_all(&self) {
        self.wakers.iter().for_each(Waker::wake);
    }

    /// Tells every worker to stop (and an embedded application waiting on the link).
    pub(crate) fn stop_all(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake_all();
        if let Some(side) = &self.in_process {
            side.close();
        }
    }
}

/// What the control side hands one worker, and what the worker reports back.
#[derive(Default)]
pub(crate) struct WorkerSlot {
    /// A socket on a new listen port, for the worker to switch to.
    pub(crate) pending_socket: Mutex<Option<UdpSocket>>,
    /// The worker's I/O counters as of its last turn.
    pub(crate) io_stats: Mutex<IoStats>,
    /// Buffers the worker's pool has allocated over its life, as of its last turn.
    pub(crate) buffers_allocated: std::sync::atomic::AtomicU64,
}

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

/// How often a worker tries again to give peers their connected sockets when some are missing
/// (a connect failed, or a socket went stale when its source address left the host).
const PEER_SOCKET_RETRY: Duration = Duration::from_secs(30);

/// Vectors are sized for the largest batch a backend moves per call.
const VEC_CAPACITY: usize = 1024;

/// Buffers a worker's pool starts with (filled before its thread starts): what a busy turn has in flight (a turn's worth of
/// packets each way, from super-packets and runs, and the sends and writes the kernel still
/// holds), and what the backend keeps lent to its GRO receives, so that the bursts of a link's
/// first busy seconds do not each allocate more.
pub(crate) const WORKER_PREFILL: usize = 256 + sitelink_io::GRO_RECEIVE_BUFFERS;

/// The scheduler slice a worker asks for in the fair class ([`WorkerScheduling`]): a worker woken
/// by a packet then runs before a busy thread's slice ends (on a small machine, the
/// application's own), which is most of a ping's wait through a loaded link.
const WORKER_SLICE: Duration = Duration::from_micros(100);

/// Runs worker `index` until the link stops. If the worker panics, whatever the cause, the
/// panic is logged as an error, kept as the link's failure, and every worker is stopped: the
/// engine the worker held may be half-updated, so no one goes on with it, and a link that
/// runs on with one worker gone would be silently half-dead.
pub(crate) fn run_guarded(shared: Arc<Shared>, index: usize, io: Box<dyn PacketIo>, pool: BufPool) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&shared, index, io, pool)));
    if let Err(payload) = result {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        let failure = format!("worker {index} panicked: {what}");
        tracing::error!(worker = index, panic = %what, "a worker panicked; stopping the link");
        lock(&shared.failure).get_or_insert(failure);
        shared.stop_all();
    }
    *lock(&shared.finished) += 1;
    shared.finished_changed.notify_all();
}

fn run(shared: &Shared, index: usize, mut io: Box<dyn PacketIo>, mut pool: BufPool) {
    let slot = &shared.workers[index];
    let mut b = Buffers::new();
    let mut fwmark = shared.fwmark.load(Ordering::Relaxed);
    let mut last_drop_log = Instant::now();
    let mut logged_drops = 0u64;
    let mut errors = ErrorLog::default();
    // The peers' endpoints as last given to the backend's connected sockets.
    let mut endpoints: Vec<std::net::SocketAddr> = Vec::with_capacity(sitelink_io::MAX_CONNECTED_PEERS);
    let mut endpoint_generation = None;
    // Changes of peers' active paths, taken from the engine and logged after its lock.
    let mut path_switches: Vec<sitelink_proto::PathSwitch> = Vec::with_capacity(256);
    // How many distinct endpoints want a socket, and when the backend was last asked.
    let mut endpoints_wanted = 0u64;
    let mut last_connect = Instant::now();

    let mut scheduling = WorkerScheduling::start(shared.real_time, WORKER_SLICE, index, Instant::now());
    let mut deadline = lock(&shared.device).next_deadline();
    while !shared.stop.load(Ordering::Relaxed) {
        let mut timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        // An embedded application's packets wake the worker only when it sleeps.
        if let Some(side) = &shared.in_process
            && !side.going_to_sleep(index)
        {
            timeout = Some(Duration::ZERO);
        }
        shared.open_sharing.set_idle(index, true);
        let waited = io.wait(timeout);
        shared.open_sharing.set_idle(index, false);
        if let Some(side) = &shared.in_process {
            side.awake(index);
        }
        if let Err(e) = waited {
            errors.report("waiting for I/O", &e);
            std::thread::sleep(ERROR_BACKOFF);
        }
        shared.open_sharing.help(index);
        // A plain load first: a swap would write the shared line every turn of every worker.
        if shared.inject_panic.load(Ordering::Relaxed) && shared.inject_panic.swap(false, Ordering::Relaxed) {
            panic!("injected by Link::inject_worker_panic");
        }
        let now = Instant::now();
        // What the turns move, for the scheduling's judgement of their weight.
        let moved = io.stats().udp_rx_bytes + io.stats().tun_rx_bytes + b.taken_bytes;
        scheduling.turn(index, now, moved);

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

        let turn = Turn { shared, index, now };
        // Inbound first, written to the TUN side before it is read: a reply the kernel makes
        // at once (a ping's) is then read in this same turn.
        if let Err(e) = io.recv_datagrams(&mut pool, &mut b.datagrams) {
            errors.report("receiving datagrams", &e);
        }
        let mut failed_read = false;
        // Small datagrams (a ping, a voice frame) come first when bulk follows them (the
        // backends put them there): they and what the TUN side answers at once go through a
        // turn of their own, not after the bulk has been opened, written and its answers
        // sealed. Only when both kinds came: pure bulk or pure acknowledgements cost nothing.
        let small = small_prefix(&b.datagrams, |d| d.buf.data().len());
        if small > 0 {
            b.bulk.extend(b.datagrams.drain(small..));
        }
        turn.inbound(io.as_mut(), &mut pool, &mut b, &mut errors);
        if small > 0 {
            failed_read = turn.read_outbound(io.as_mut(), &mut pool, &mut b, &mut errors);
            turn.express(io.as_mut(), &mut pool, &mut b, &mut errors);
            b.datagrams.append(&mut b.bulk);
            turn.inbound(io.as_mut(), &mut pool, &mut b, &mut errors);
        }

        failed_read |= turn.read_outbound(io.as_mut(), &mut pool, &mut b, &mut errors);
        // Likewise small packets read ahead of a bulk transfer's segments (`sparse_first`
        // put them there) are sealed and sent before the segments are.
        let small = small_prefix(&b.read, |p| p.data().len());
        if small > 0 {
            b.bulk_read.extend(b.read.drain(small..));
            turn.express(io.as_mut(), &mut pool, &mut b, &mut errors);
            b.read.append(&mut b.bulk_read);
        }
        let endpoints_moved;
        {
            let mut dev = lock(&shared.device);
            if !b.read.is_empty() {
                dev.encapsulate_deferred(now, &mut b.read, &mut b.batch, &mut b.out);
            }
            if dev.next_deadline().is_some_and(|d| d <= now) {
                dev.on_timers(now, &mut b.out);
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
            dev.take_path_switches(&mut path_switches);
            endpoints_moved = endpoint_generation != Some(dev.endpoint_generation());
            if endpoints_moved {
                // The others follow at once, not at their next turn (a worker asleep would
                // connect mid-stream later, and a flow's datagrams would change sockets).
                if endpoint_generation.is_some() {
                    shared.wakers.iter().enumerate().filter(|(i, _)| *i != index).for_each(|(_, w)| w.wake());
                }
                endpoint_generation = Some(dev.endpoint_generation());
                endpoints.clear();
                // The busiest peers (by traffic, re-ranked each second), not the first configured.
                endpoints.extend(dev.busiest_endpoints().take(sitelink_io::MAX_CONNECTED_PEERS));
                endpoints_wanted =
                    endpoints.iter().enumerate().filter(|(i, a)| !endpoints[..*i].contains(a)).count() as u64;
            }
        }
        for s in path_switches.drain(..) {
            tracing::warn!(
                peer = %s.public_key.to_base64(),
                from = ?s.from,
                to = %s.to,
                reason = ?s.reason,
                "a peer's traffic moved to another path"
            );
        }
        // When the peers' endpoints change (configuration, handshakes, roaming: rarely), the
        // backend's connected sockets follow, before this turn's sends.
        let retry = io.stats().peer_sockets < endpoints_wanted
            && now.duration_since(last_connect) >= PEER_SOCKET_RETRY;
        if endpoints_moved || retry {
            last_connect = now;
            match io.connect_peers(&endpoints) {
                Err(e) if endpoints_moved => errors.report("connecting a peer's socket", &e),
                Err(e) => tracing::debug!(error = %e, "connecting a peer's socket failed again"),
                Ok(()) => {}
            }
        }
        // The seals, without the engine.
        b.batch.run(&mut b.out);
        if !b.out.is_empty()
            && let Err(e) = io.send_datagrams(&mut b.out, &mut pool)
        {
            errors.report("sending datagrams", &e);
        }
        *lock(&slot.io_stats) = io.stats().clone();
        slot.buffers_allocated.store(pool.allocated(), Ordering::Relaxed);
        if failed_read {
            std::thread::sleep(ERROR_BACKOFF);
        }
    }
    *lock(&slot.io_stats) = io.stats().clone();
    slot.buffers_allocated.store(pool.allocated(), Ordering::Relaxed);
}

/// The vectors a worker's turns move packets through, sized once and reused.
struct Buffers {
    datagrams: Vec<Datagram>,
    /// Datagrams received behind small ones, until the small ones' express pass is done.
    bulk: Vec<Datagram>,
    read: Vec<PacketBuf>,
    /// Packets read behind small ones, until the small ones have been sent.
    bulk_read: Vec<PacketBuf>,
    delivered: Vec<PacketBuf>,
    out: Vec<Datagram>,
    batch: CryptoBatch,
    /// Carries half of a large batch's opens to an idle worker and back (see `open_sharing`).
    spare: CryptoBatch,
    /// Bytes taken from the embedding application's queue (what `tun_rx_bytes` counts for a
    /// TUN device).
    taken_bytes: u64,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            datagrams: Vec::with_capacity(VEC_CAPACITY),
            bulk: Vec::with_capacity(VEC_CAPACITY),
            read: Vec::with_capacity(VEC_CAPACITY),
            bulk_read: Vec::with_capacity(VEC_CAPACITY),
            delivered: Vec::with_capacity(VEC_CAPACITY),
            out: Vec::with_capacity(VEC_CAPACITY * 2),
            batch: CryptoBatch::with_capacity(VEC_CAPACITY),
            spare: CryptoBatch::with_capacity(VEC_CAPACITY / 2),
            taken_bytes: 0,
        }
    }
}

/// How many of `items`, from the first, are small ([`sitelink_io::SMALL_PACKET`] bytes or
/// less) with a larger one behind them; 0 when none is, or when all are.
fn small_prefix<T>(items: &[T], len: impl Fn(&T) -> usize) -> usize {
    let n = items.iter().take_while(|i| len(i) <= sitelink_io::SMALL_PACKET).count();
    if n == items.len() { 0 } else { n }
}

/// One turn of one worker: whose it is and the time it started.
struct Turn<'a> {
    shared: &'a Shared,
    index: usize,
    now: Instant,
}

impl Turn<'_> {
    /// Opens `b.datagrams` (checked and delivered holding the engine, the AEAD without it)
    /// and writes what they carry to the TUN side, or hands it to the embedding application.
    fn inbound(&self, io: &mut dyn PacketIo, pool: &mut BufPool, b: &mut Buffers, errors: &mut ErrorLog) {
        if b.datagrams.is_empty() {
            return;
        }
        let shared = self.shared;
        lock(&shared.device).decapsulate_deferred(self.now, &mut b.datagrams, &mut b.batch, &mut b.out);
        // An idle worker may take half of a large batch's opens.
        shared.open_sharing.run(
            self.index,
            |i| shared.wakers[i].wake(),
            &mut b.batch,
            &mut b.spare,
            &mut b.out,
        );
        if b.batch.needs_completion() {
            lock(&shared.device).complete(self.now, &mut b.batch, &mut b.delivered, &mut b.out);
        }
        if let Some(side) = &shared.in_process {
            side.deliver(&mut b.delivered, pool);
        } else if !b.delivered.is_empty()
            && let Err(e) = io.write_packets(&mut b.delivered, pool)
        {
            errors.report("writing packets", &e);
        }
    }

    /// Reads into `b.read` what the TUN side (or the embedding application) has to send.
    /// True when the read failed (the turn then backs off).
    fn read_outbound(
        &self,
        io: &mut dyn PacketIo,
        pool: &mut BufPool,
        b: &mut Buffers,
        errors: &mut ErrorLog,
    ) -> bool {
        if let Some(side) = &self.shared.in_process {
            let before = b.read.len();
            side.take_outbound(self.index, &mut b.read, VEC_CAPACITY / 4);
            b.taken_bytes += b.read[before..].iter().map(|p| p.len() as u64).sum::<u64>();
            side.balance(pool);
            return false;
        }
        match io.read_packets(pool, &mut b.read) {
            Ok(()) => false,
            Err(e) => {
                if sitelink_io::is_device_gone(&e) {
                    tracing::info!(error = %e, "the TUN device is gone; stopping");
                    self.shared.stop_all();
                }
                errors.report("reading packets", &e);
                true
            }
        }
    }

    /// Seals `b.read` and sends it, with whatever else waits in `b.out`, now: the express
    /// pass of small packets, ahead of the rest of the turn.
    fn express(&self, io: &mut dyn PacketIo, pool: &mut BufPool, b: &mut Buffers, errors: &mut ErrorLog) {
        if !b.read.is_empty() {
            lock(&self.shared.device).encapsulate_deferred(self.now, &mut b.read, &mut b.batch, &mut b.out);
        }
        b.batch.run(&mut b.out);
        if b.out.is_empty() {
            return;
        }
        if let Err(e) = io.send_datagrams(&mut b.out, pool) {
            errors.report("sending datagrams", &e);
        }
        if let Err(e) = io.flush() {
            errors.report("sending datagrams", &e);
        }
    }
}

// The engine ranks at least as many busy peers as a backend can connect.
const _: () = assert!(sitelink_proto::BUSIEST_PEERS >= sitelink_io::MAX_CONNECTED_PEERS);

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

#[cfg(test)]
mod tests {
    use super::small_prefix;

    #[test]
    fn only_small_packets_ahead_of_larger_ones_take_the_express_pass() {
        let len = |n: &usize| *n;
        assert_eq!(small_prefix(&[100, 60, 1400, 90], len), 2);
        assert_eq!(small_prefix(&[256, 257], len), 1);
        // All small, all large, or nothing: no express pass.
        assert_eq!(small_prefix(&[100, 60], len), 0);
        assert_eq!(small_prefix(&[1400, 60], len), 0);
        assert_eq!(small_prefix::<usize>(&[], len), 0);
    }
}
