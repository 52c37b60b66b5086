//! In-process packets: the packet side of an embedded link, between the application's threads
//! and the link's workers, with no system call and no copy per packet.
//!
//! ```text
//!  application                                   workers (one queue each)
//!  alloc() -> OutPacket --BufMut--> send_batch --> outbound[flow % n] --> seal in place, send
//!  recv_batch <- InPacket <----------------------- inbound <------------- open in place
//!     drop(InPacket) --> free --> alloc()          free <--> each worker's pool (balanced)
//! ```
//!
//! Every queue is a bounded lock-free [`ArrayQueue`]; buffers circulate between the free
//! queue, the application and the workers' pools, so once warm nothing is allocated. The
//! application is told of inbound packets by an eventfd ([`PacketQueues`] is `AsFd`): readable
//! while packets may wait, signalled at most once per batch and only when the application may
//! be asleep, so an event loop (epoll, mio, tokio's `AsyncFd`) can drive it. A worker asleep
//! in its backend is woken by its waker only when a send finds it asleep.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;
use sitelink_frame::{BufPool, PacketBuf};

use crate::sys;
use crate::waker::Waker;

/// Packets each worker's outbound queue holds.
pub const OUTBOUND_QUEUE: usize = 1024;
/// Packets the inbound queue (all workers to the application) holds; when it is full, what
/// the workers open is dropped and counted ([`InProcessStats::inbound_dropped`]).
pub const INBOUND_QUEUE: usize = 4096;
/// Free buffers kept between the application and the workers.
const FREE_QUEUE: usize = 4096;
/// A worker tops the free queue up to this many buffers from its pool, and takes what the
/// queue holds beyond this back into its pool when the pool is short.
const FREE_LOW: usize = 256;
/// A worker's pool keeps at least this many free buffers for the free queue.
const POOL_LOW: usize = 64;
/// A worker's pool counts as short below this many free buffers: a few turns' worth. (A
/// receiving link's pools drain into the application's inbound queue, and its buffers come
/// back through the free queue: taken back before the pool runs dry, they are not allocated
/// again.)
const POOL_SHORT: usize = 256;

/// Counters of the in-process packet side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InProcessStats {
    /// Packets the application handed to the link.
    pub sent: u64,
    /// Of those, the packets each worker took (in worker order).
    pub taken_per_worker: Vec<u64>,
    /// Packets the link delivered to the application's inbound queue.
    pub delivered: u64,
    /// Packets the link opened but dropped because the inbound queue was full (the
    /// application did not keep up).
    pub inbound_dropped: u64,
    /// Buffers allocated by [`PacketQueues::alloc`] because no free one was waiting.
    pub buffers_allocated: u64,
}

struct Shared {
    outbound: Vec<ArrayQueue<PacketBuf>>,
    inbound: ArrayQueue<PacketBuf>,
    free: ArrayQueue<PacketBuf>,
    /// Readable while inbound packets may wait (see `recv_batch`).
    ready: OwnedFd,
    ready_signalled: AtomicBool,
    /// Signalled when a worker has taken packets and a sender waits for room.
    room: OwnedFd,
    sender_waiting: AtomicBool,
    /// The link has stopped: sends and receives fail rather than wait.
    closed: AtomicBool,
    /// Per worker: asleep in its backend (or about to be), and how to wake it.
    asleep: Vec<AtomicBool>,
    wakers: Vec<OnceLock<Waker>>,
    /// Geometry of new buffers: the workers' (capacity, headroom), and the largest packet.
    capacity: usize,
    headroom: usize,
    mtu: usize,
    sent: AtomicU64,
    taken: Vec<AtomicU64>,
    delivered: AtomicU64,
    inbound_dropped: AtomicU64,
    allocated: AtomicU64,
}

/// The application's end of an embedded link's packet side: take a buffer with
/// [`alloc`](Self::alloc), write an IP packet into it, hand a batch to the link with
/// [`send_batch`](Self::send_batch); take what the link opened with
/// [`recv_batch`](Self::recv_batch). Cheap to clone (all clones share the queues), `Send` and
/// `Sync`.
///
/// For an event loop, the descriptor ([`AsFd`]) is readable while packets may wait: on
/// readiness, call `recv_batch` with a zero timeout until it answers `WouldBlock`, which
/// also clears the readiness.
#[derive(Clone)]
pub struct PacketQueues {
    shared: Arc<Shared>,
}

/// The workers' end: each worker takes its outbound queue's packets and delivers what it
/// opened.
#[derive(Clone)]
pub struct InProcessSide {
    shared: Arc<Shared>,
}

/// A packet the application is writing, in a pooled buffer with the room the link needs in
/// front (the transport header) and behind (padding and tag), so the link seals it where it
/// lies. Write through [`bytes::BufMut`] (at most [`PacketQueues::mtu`] bytes) or
/// [`spare_mut`](Self::spare_mut) and [`set_len`](Self::set_len); read back through `Deref`.
pub struct OutPacket {
    pub(crate) buf: PacketBuf,
    pub(crate) mtu: usize,
    /// Where an unsent packet's buffer goes back to when it is dropped.
    home: Arc<Shared>,
}

/// A packet the link opened, in its pooled buffer: `Deref<Target = [u8]>` gives the IP
/// packet; dropping it returns the buffer to the link's free queue.
pub struct InPacket {
    buf: PacketBuf,
    home: Arc<Shared>,
}

/// An in-process packet side for `workers` workers, whose buffers are like those of `pool`
/// (the workers' pools) and carry packets of up to `mtu` bytes.
pub fn in_process(workers: usize, pool: &BufPool, mtu: usize) -> io::Result<(PacketQueues, InProcessSide)> {
    if !(1..=64).contains(&workers) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an in-process packet side has 1 to 64 workers",
        ));
    }
    let shared = Arc::new(Shared {
        outbound: (0..workers).map(|_| ArrayQueue::new(OUTBOUND_QUEUE)).collect(),
        inbound: ArrayQueue::new(INBOUND_QUEUE),
        free: ArrayQueue::new(FREE_QUEUE),
        ready: sys::eventfd()?,
        ready_signalled: AtomicBool::new(false),
        room: sys::eventfd()?,
        sender_waiting: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        asleep: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        wakers: (0..workers).map(|_| OnceLock::new()).collect(),
        capacity: pool.buf_capacity(),
        headroom: pool.buf_headroom(),
        mtu: mtu.min(pool.buf_capacity().saturating_sub(pool.buf_headroom())),
        sent: AtomicU64::new(0),
        taken: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        delivered: AtomicU64::new(0),
        inbound_dropped: AtomicU64::new(0),
        allocated: AtomicU64::new(0),
    });
    Ok((PacketQueues { shared: Arc::clone(&shared) }, InProcessSide { shared }))
}

impl Shared {
    fn check_open(&self) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the link has stopped"));
        }
        Ok(())
    }
}

/// How long is left until `deadline` (`None`: forever); `Err(WouldBlock)` once it has passed.
fn left(deadline: Option<Instant>) -> io::Result<Option<Duration>> {
    match deadline {
        None => Ok(None),
        Some(d) => match d.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(io::ErrorKind::WouldBlock.into()),
        },
    }
}

impl PacketQueues {
    /// The largest packet a buffer takes.
    pub fn mtu(&self) -> usize {
        self.shared.mtu
    }

    /// An empty buffer for one outbound packet: a free one (no allocation once warm).
    pub fn alloc(&self) -> OutPacket {
        let s = &self.shared;
        let buf = match s.free.pop() {
            Some(mut buf) => {
                buf.reset(s.headroom);
                buf
            }
            None => {
                s.allocated.fetch_add(1, Ordering::Relaxed);
                PacketBuf::new(s.capacity, s.headroom)
            }
        };
        OutPacket { buf, mtu: s.mtu, home: Arc::clone(&self.shared) }
    }

    /// Hands the packets of `batch` to the link, in order, each to the worker its flow
    /// belongs to ([`sitelink_frame::ip::flow_hash`]), so that every flow stays in order.
    /// Waits while a worker's queue is full, up to `timeout` (`None`: as long as it takes;
    /// zero: not at all); if the time runs out, answers `WouldBlock` with the packets not yet
    /// taken left in `batch`, in order. What is not an IP packet the link drops and counts,
    /// as it would from a TUN device.
    pub fn send_batch(&self, batch: &mut Vec<OutPacket>, timeout: Option<Duration>) -> io::Result<()> {
        let s = &*self.shared;
        s.check_open()?;
        let n = s.outbound.len();
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut touched = 0u64;
        let mut taken = 0;
        let mut result = Ok(());
        'packets: for pkt in batch.iter_mut() {
            let q = if n == 1 { 0 } else { sitelink_frame::ip::flow_hash(pkt.buf.data()) as usize % n };
            let mut buf = std::mem::replace(&mut pkt.buf, PacketBuf::new(0, 0));
            loop {
                match s.outbound[q].push(buf) {
                    Ok(()) => break,
                    Err(back) => buf = back,
                }
                // Full: wake what was queued so far, then wait for the worker to take some.
                self.wake(touched | 1 << q);
                touched = 0;
                s.sender_waiting.store(true, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::SeqCst);
                if !s.outbound[q].is_full() {
                    continue;
                }
                match left(deadline).and_then(|wait| s.check_open().map(|()| wait)) {
                    Ok(wait) => {
                        sys::poll(&[s.room.as_fd()], &mut [false], wait)?;
                        sys::eventfd_drain(s.room.as_fd());
                    }
                    Err(e) => {
                        pkt.buf = buf;
                        result = Err(e);
                        break 'packets;
                    }
                }
            }
            touched |= 1 << q;
            taken += 1;
        }
        self.wake(touched);
        s.sent.fetch_add(taken as u64, Ordering::Relaxed);
        batch.drain(..taken);
        result
    }

    /// Wakes each worker in `mask` that is asleep (a worker awake sees its queue at its next
    /// turn without a system call).
    fn wake(&self, mask: u64) {
        if mask == 0 {
            return;
        }
        // Pairs with the worker's fence between marking itself asleep and looking at its
        // queue: either it sees the packets, or this sees it asleep.
        std::sync::atomic::fence(Ordering::SeqCst);
        let s = &*self.shared;
        for (i, asleep) in s.asleep.iter().enumerate() {
            if mask & (1 << i) != 0
                && asleep.load(Ordering::Relaxed)
                && let Some(w) = s.wakers[i].get()
            {
                w.wake();
            }
        }
    }

    /// Moves up to `max` opened packets to `out`, waiting up to `timeout` for the first
    /// (`None`: as long as it takes; zero: not at all). Returns how many; when none came in
    /// time, `WouldBlock` (which also clears the descriptor's readiness).
    pub fn recv_batch(
        &self,
        out: &mut Vec<InPacket>,
        max: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let s = &*self.shared;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let n = self.take(out, max);
            if n > 0 || max == 0 {
                return Ok(n);
            }
            // Empty: clear the readiness, then look once more (a packet delivered meanwhile
            // either is seen here or signals again).
            s.ready_signalled.store(false, Ordering::SeqCst);
            sys::eventfd_drain(s.ready.as_fd());
            std::sync::atomic::fence(Ordering::SeqCst);
            let n = self.take(out, max);
            if n > 0 {
                return Ok(n);
            }
            s.check_open()?;
            let wait = left(deadline)?;
            sys::poll(&[s.ready.as_fd()], &mut [false], wait)?;
        }
    }

    fn take(&self, out: &mut Vec<InPacket>, max: usize) -> usize {
        let s = &self.shared;
        let mut n = 0;
        while n < max {
            let Some(buf) = s.inbound.pop() else { break };
            out.push(InPacket { buf, home: Arc::clone(&self.shared) });
            n += 1;
        }
        n
    }

    /// The counters.
    pub fn stats(&self) -> InProcessStats {
        self.shared.stats()
    }
}

impl Shared {
    fn stats(&self) -> InProcessStats {
        let s = self;
        InProcessStats {
            sent: s.sent.load(Ordering::Relaxed),
            taken_per_worker: s.taken.iter().map(|t| t.load(Ordering::Relaxed)).collect(),
            delivered: s.delivered.load(Ordering::Relaxed),
            inbound_dropped: s.inbound_dropped.load(Ordering::Relaxed),
            buffers_allocated: s.allocated.load(Ordering::Relaxed),
        }
    }
}

impl AsFd for PacketQueues {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.ready.as_fd()
    }
}

impl AsRawFd for PacketQueues {
    fn as_raw_fd(&self) -> RawFd {
        self.shared.ready.as_raw_fd()
    }
}

impl std::fmt::Debug for PacketQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketQueues")
            .field("workers", &self.shared.outbound.len())
            .field("inbound", &self.shared.inbound.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl InProcessSide {
    /// Tells worker `index`'s waker (once, at start).
    pub fn set_waker(&self, index: usize, waker: Waker) {
        let _ = self.shared.wakers[index].set(waker);
    }

    /// Worker `index` is about to sleep in its backend: returns `false` (and stays awake) if
    /// its queue already holds packets. A send that comes later wakes it.
    pub fn going_to_sleep(&self, index: usize) -> bool {
        let s = &self.shared;
        s.asleep[index].store(true, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
        if s.outbound[index].is_empty() {
            return true;
        }
        s.asleep[index].store(false, Ordering::Relaxed);
        false
    }

    /// Worker `index` woke.
    pub fn awake(&self, index: usize) {
        self.shared.asleep[index].store(false, Ordering::Relaxed);
    }

    /// Moves up to `max` packets from worker `index`'s queue to `out`, and tells a sender
    /// waiting for room.
    pub fn take_outbound(&self, index: usize, out: &mut Vec<PacketBuf>, max: usize) {
        let s = &self.shared;
        let mut n = 0;
        while n < max {
            let Some(buf) = s.outbound[index].pop() else { break };
            out.push(buf);
            n += 1;
        }
        if n == 0 {
            return;
        }
        s.taken[index].fetch_add(n as u64, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
        if s.sender_waiting.load(Ordering::SeqCst) {
            s.sender_waiting.store(false, Ordering::SeqCst);
            sys::eventfd_signal(s.room.as_fd());
        }
    }

    /// Hands `packets` to the application (draining the vector); what does not fit is
    /// counted and its buffers go back to `pool`. Signals the descriptor if the application
    /// may be waiting.
    pub fn deliver(&self, packets: &mut Vec<PacketBuf>, pool: &mut BufPool) {
        if packets.is_empty() {
            return;
        }
        let s = &self.shared;
        let (mut delivered, mut dropped) = (0u64, 0u64);
        for buf in packets.drain(..) {
            match s.inbound.push(buf) {
                Ok(()) => delivered += 1,
                Err(buf) => {
                    dropped += 1;
                    pool.put(buf);
                }
            }
        }
        s.delivered.fetch_add(delivered, Ordering::Relaxed);
        if dropped > 0 {
            s.inbound_dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if delivered > 0 && !s.ready_signalled.swap(true, Ordering::SeqCst) {
            sys::eventfd_signal(s.ready.as_fd());
        }
    }

    /// Evens out the free queue and a worker's pool, so that buffers follow the traffic:
    /// packets the application sends end in the workers' pools, packets it receives come back
    /// through the free queue.
    pub fn balance(&self, pool: &mut BufPool) {
        let free = &self.shared.free;
        let queued = free.len();
        if queued < FREE_LOW && pool.free_len() > POOL_LOW {
            for _ in 0..(FREE_LOW - queued).min(pool.free_len() - POOL_LOW) {
                if let Err(buf) = free.push(pool.get()) {
                    pool.put(buf);
                    break;
                }
            }
        } else if pool.free_len() < POOL_SHORT && queued > FREE_LOW {
            for _ in 0..(POOL_SHORT - pool.free_len()).min(queued - FREE_LOW) {
                match free.pop() {
                    Some(buf) => pool.put(buf),
                    None => break,
                }
            }
        }
    }

    /// The link has stopped: wakes the application, whose waiting sends and receives then
    /// fail with `BrokenPipe` (packets already delivered can still be taken).
    pub fn close(&self) {
        let s = &self.shared;
        s.closed.store(true, Ordering::SeqCst);
        sys::eventfd_signal(s.room.as_fd());
        sys::eventfd_signal(s.ready.as_fd());
    }

    /// The counters.
    pub fn stats(&self) -> InProcessStats {
        self.shared.stats()
    }
}

impl std::fmt::Debug for InProcessSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessSide").field("workers", &self.shared.outbound.len()).finish_non_exhaustive()
    }
}

impl OutPacket {
    /// The room left for the packet (up to the MTU).
    pub fn room(&self) -> usize {
        self.mtu.saturating_sub(self.buf.len())
    }

    /// The whole packet's room, from its first byte up to the MTU: write a packet here (a
    /// read from elsewhere, say), then [`set_len`](Self::set_len).
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let mtu = self.mtu;
        &mut self.buf.spare_mut()[..mtu]
    }

    /// The room after what is written so far (what `BufMut` appends into).
    pub(crate) fn unwritten_mut(&mut self) -> &mut [u8] {
        let room = self.room();
        &mut self.buf.after_data_mut()[..room]
    }

    /// Sets the packet's length, counted from its first byte. Fails past the MTU.
    pub fn set_len(&mut self, len: usize) -> io::Result<()> {
        if len > self.mtu {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "packet longer than the MTU"));
        }
        self.buf.set_len(len).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    /// Empties the packet, to write another.
    pub fn clear(&mut self) {
        self.buf.truncate(0);
    }
}

impl std::ops::Deref for OutPacket {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.data()
    }
}

impl Drop for OutPacket {
    fn drop(&mut self) {
        // A packet handed to the link left an empty buffer behind; one never sent goes back.
        if self.buf.capacity() > 0 {
            let buf = std::mem::replace(&mut self.buf, PacketBuf::new(0, 0));
            let _ = self.home.free.push(buf);
        }
    }
}

impl std::fmt::Debug for OutPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutPacket").field("len", &self.buf.len()).finish_non_exhaustive()
    }
}

impl std::ops::Deref for InPacket {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.data()
    }
}

impl std::ops::DerefMut for InPacket {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.data_mut()
    }
}

impl Drop for InPacket {
    fn drop(&mut self) {
        let buf = std::mem::replace(&mut self.buf, PacketBuf::new(0, 0));
        // A full free queue means buffers enough are free: this one is released.
        let _ = self.home.free.push(buf);
    }
}

impl std::fmt::Debug for InPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPacket").field("len", &self.buf.len()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn side(workers: usize) -> (PacketQueues, InProcessSide, BufPool) {
        let pool = BufPool::for_mtu(1420, 4096);
        let (app, side) = in_process(workers, &pool, 1420).unwrap();
        (app, side, pool)
    }

    fn readable(app: &PacketQueues) -> bool {
        let mut r = [false];
        sys::poll(&[app.as_fd()], &mut r, Some(Duration::ZERO)).unwrap();
        r[0]
    }

    fn udp4(src_port: u16, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p
    }

    #[test]
    fn packets_go_out_and_come_back_in_the_same_buffers() {
        let (app, side, mut pool) = side(1);
        let mut out = app.alloc();
        out.put_slice(&udp4(1, 100));
        let written_at = out.as_ptr();
        app.send_batch(&mut vec![out], None).unwrap();
        let mut taken = Vec::new();
        side.take_outbound(0, &mut taken, 64);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].data().as_ptr(), written_at, "the worker got the application's buffer");
        assert!(taken[0].headroom() >= 16 && taken[0].tailroom() >= 16, "room to seal in place");

        side.deliver(&mut taken, &mut pool);
        assert!(readable(&app));
        let mut got = Vec::new();
        assert_eq!(app.recv_batch(&mut got, 8, Some(Duration::ZERO)).unwrap(), 1);
        assert_eq!(got[0].as_ptr(), written_at, "delivered without a copy");
        assert_eq!(&got[0][..], &udp4(1, 100)[..]);
        drop(got);
        let again = app.alloc();
        assert_eq!(again.as_ptr(), written_at, "a dropped packet's buffer is reused");
        assert!(again.is_empty());
        assert_eq!(app.stats().buffers_allocated, 1);
    }

    #[test]
    fn readiness_follows_the_inbound_queue() {
        let (app, side, mut pool) = side(2);
        assert!(!readable(&app));
        let mut got = Vec::new();
        let e = app.recv_batch(&mut got, 8, Some(Duration::ZERO)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        side.deliver(&mut vec![pool.get(), pool.get(), pool.get()], &mut pool);
        assert!(readable(&app));
        assert_eq!(app.recv_batch(&mut got, 2, Some(Duration::ZERO)).unwrap(), 2);
        assert!(readable(&app), "one still waits");
        assert_eq!(app.recv_batch(&mut got, 2, Some(Duration::ZERO)).unwrap(), 1);
        assert_eq!(
            app.recv_batch(&mut got, 2, Some(Duration::ZERO)).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(!readable(&app), "WouldBlock clears the readiness");
        side.deliver(&mut vec![pool.get()], &mut pool);
        assert!(readable(&app), "and the next delivery sets it again");
    }

    #[test]
    fn a_blocked_receive_wakes_for_a_delivery() {
        let (app, side, mut pool) = side(1);
        let waiter = std::thread::spawn(move || {
            let mut got = Vec::new();
            app.recv_batch(&mut got, 8, Some(Duration::from_secs(10))).map(|n| (n, got.len()))
        });
        std::thread::sleep(Duration::from_millis(50));
        side.deliver(&mut vec![pool.get()], &mut pool);
        assert_eq!(waiter.join().unwrap().unwrap(), (1, 1));
    }

    #[test]
    fn a_full_queue_pushes_back_in_order_and_a_blocked_send_goes_on_when_room_comes() {
        let (app, side, _pool) = side(1);
        let mut batch: Vec<OutPacket> = (0..OUTBOUND_QUEUE + 10)
            .map(|i| {
                let mut p = app.alloc();
                p.put_slice(&udp4(i as u16, 40));
                p
            })
            .collect();
        let e = app.send_batch(&mut batch, Some(Duration::ZERO)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(batch.len(), 10, "what did not fit stays, in order");
        assert_eq!(u16::from_be_bytes([batch[0][20], batch[0][21]]), OUTBOUND_QUEUE as u16);

        let sender = std::thread::spawn(move || {
            app.send_batch(&mut batch, Some(Duration::from_secs(10))).map(|()| batch.len())
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut taken = Vec::new();
        side.take_outbound(0, &mut taken, 100);
        assert_eq!(sender.join().unwrap().unwrap(), 0, "the blocked send finished once room came");
        assert_eq!(side.stats().sent, OUTBOUND_QUEUE as u64 + 10);
    }

    #[test]
    fn flows_keep_to_one_worker() {
        let (app, side, _pool) = side(4);
        let mut batch = Vec::new();
        for i in 0..400u16 {
            let mut p = app.alloc();
            p.put_slice(&udp4(i % 8, 60));
            batch.push(p);
        }
        app.send_batch(&mut batch, None).unwrap();
        let mut worker_of = std::collections::HashMap::new();
        for w in 0..4 {
            let mut taken = Vec::new();
            side.take_outbound(w, &mut taken, 1000);
            for p in &taken {
                let flow = u16::from_be_bytes([p.data()[20], p.data()[21]]);
                assert_eq!(*worker_of.entry(flow).or_insert(w), w, "flow {flow} on two workers");
            }
        }
        assert_eq!(worker_of.len(), 8);
    }

    #[test]
    fn a_full_inbound_queue_drops_and_counts() {
        let (app, side, mut pool) = side(1);
        let mut bufs: Vec<PacketBuf> = (0..INBOUND_QUEUE + 5).map(|_| pool.get()).collect();
        side.deliver(&mut bufs, &mut pool);
        let stats = app.stats();
        assert_eq!((stats.delivered, stats.inbound_dropped), (INBOUND_QUEUE as u64, 5));
    }

    #[test]
    fn a_closed_link_fails_waiting_calls() {
        let (app, side, _pool) = side(1);
        let waiter = {
            let app = app.clone();
            std::thread::spawn(move || app.recv_batch(&mut Vec::new(), 8, None))
        };
        std::thread::sleep(Duration::from_millis(20));
        side.close();
        assert_eq!(waiter.join().unwrap().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(
            app.send_batch(&mut vec![app.alloc()], None).unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[test]
    fn writes_append_and_spare_mut_writes_from_the_start() {
        let (app, _side, _pool) = side(1);
        let mut p = app.alloc();
        p.put_slice(&[1, 2, 3]);
        p.put_u16(0x0405);
        p.put_slice(&[6]);
        assert_eq!(&p[..], &[1, 2, 3, 4, 5, 6]);
        p.spare_mut()[..2].copy_from_slice(&[9, 9]);
        p.set_len(2).unwrap();
        assert_eq!(&p[..], &[9, 9]);
        p.clear();
        assert!(p.is_empty());
    }

    #[test]
    fn a_packet_holds_at_most_the_mtu() {
        let (app, _side, _pool) = side(1);
        let mut p = app.alloc();
        assert_eq!(p.remaining_mut(), 1420);
        p.put_bytes(7, 1420);
        assert_eq!((p.len(), p.remaining_mut()), (1420, 0));
        assert!(p.set_len(1421).is_err());
        let overflow = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.put_u8(1)));
        assert!(overflow.is_err(), "writing past the MTU panics, as BufMut says");
    }

    #[test]
    fn buffers_follow_the_traffic_between_pools_and_the_free_queue() {
        let (app, side, mut pool) = side(1);
        pool.prefill(1000);
        side.balance(&mut pool);
        assert_eq!(side.shared.free.len(), FREE_LOW, "topped up from a full pool");
        let before = app.stats().buffers_allocated;
        let held: Vec<OutPacket> = (0..FREE_LOW).map(|_| app.alloc()).collect();
        assert_eq!(app.stats().buffers_allocated, before, "served from the free queue");
        drop(held);
        assert_eq!(side.shared.free.len(), FREE_LOW, "unsent packets' buffers come back");
        // A receiving link's pool drains into the application; what comes back beyond the
        // free queue's share refills it.
        let mut drained = pool.clone_empty();
        for _ in 0..300 {
            side.shared.free.push(PacketBuf::new(pool.buf_capacity(), 0)).expect("room");
        }
        side.balance(&mut drained);
        assert_eq!((drained.free_len(), side.shared.free.len()), (256, 300));
        side.balance(&mut drained);
        assert_eq!((drained.free_len(), side.shared.free.len()), (256, 300), "and no further");
    }
}
