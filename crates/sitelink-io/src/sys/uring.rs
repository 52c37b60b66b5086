//! The io_uring backend.
//!
//! * UDP: one multishot `recvmsg` over a provided buffer ring. The ring's buffers are pooled
//!   [`PacketBuf`]s, offered so that the kernel's `io_uring_recvmsg_out` header and the source
//!   address land in the headroom and the datagram at the buffer's normal data offset: the
//!   engine gets the very memory the kernel wrote, with no copy.
//! * TUN: one multishot read over a second buffer ring of pooled buffers (offered at their
//!   data offset, their tailroom kept free for padding and tag): the kernel reads each packet
//!   as it arrives, with no poll-then-read round trip; writes queued as SQEs.
//! * Sends: one `sendmsg` SQE per group of datagrams, with `UDP_SEGMENT` (GSO) for runs of
//!   equal datagrams to one address, the iovecs pointing at the sealed buffers.
//! * Everything queued during a turn goes to the kernel with the next [`wait`]: one
//!   `io_uring_enter` per turn submits the writes, the sends and the re-armed reads, and waits.
//! * Readiness mode: once the link has been quiet for a while ([`UringIo::set_idle_after`]),
//!   the multishot requests are cancelled and the worker sleeps in `epoll_wait`, reading and
//!   sending with plain `read`/`write` and `recvmmsg`/`sendmmsg` (the `mmsg` backend's
//!   calls). A packet now and then, after the caches went cold, gets through those faster
//!   than through the ring: idle ping RTT measured 20-35 µs lower (benches/RESULTS.md). A
//!   full batch, or input wake after wake, brings the ring back.
//!
//! Ownership: every buffer the kernel may touch is held in a slot table indexed by the SQE's
//! `user_data` (or, for the buffer ring, by buffer id) until its completion arrives; the kernel
//! structures (`msghdr`, iovecs, addresses, control messages) live in boxed slots that do not
//! move. Dropping the backend cancels every request and waits (up to a second) for their
//! completions before the ring closes and the buffers are freed; if that fails, the memory the
//! kernel may still use is leaked, never freed under it (see `Drop`).
//!
//! [`wait`]: crate::PacketIo::wait

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use sitelink_frame::{BufPool, DEFAULT_HEADROOM, DEFAULT_TAILROOM, Datagram, PacketBuf};

use super::{GSO_CMSG_SPACE, RawAddr, SendGroup, set_gso_segment};
use crate::calls::{MmsgCalls, POLL_OWN, Readiness, group_for_gso, read_packet_batch, write_packet_batch};
use crate::peers::{MAX_CONNECTED_PEERS, PeerSocket, PeerSockets};
use crate::{BackendKind, IoStats, PacketFd, PacketIo, UdpSocket, Waker};

const KIND_SHIFT: u64 = 56;
const TUN_READ: u64 = 1;
const TUN_WRITE: u64 = 2;
const UDP_RECV: u64 = 3;
const UDP_SEND: u64 = 4;
const WAKE: u64 = 5;
const CANCEL: u64 = 6;

/// How long the link must have been quiet before the backend sleeps in readiness mode.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_millis(1);

/// Readiness mode's wakes with input, each within the quiet time of the one before, after
/// which the ring takes over again. (A request and its answer are two such wakes; a sustained
/// flow makes many.)
const BUSY_WAKES: u32 = 8;

/// Bits of [`UringIo::idle_ready`]: the shared socket, the packet side, then peer socket `i`
/// at `PEER_BIT0 + i`.
const READY_UDP: u64 = 1;
const READY_TUN: u64 = 2;
const PEER_BIT0: usize = 2;
const _: () = assert!(PEER_BIT0 + MAX_CONNECTED_PEERS <= 64, "readiness bits fit a u64");

/// Registered file slots.
const FILE_TUN: u32 = 0;
const FILE_UDP: u32 = 1;

/// Provided-buffer group ids of the UDP and TUN buffer rings.
const BGID_UDP: u16 = 7;
const BGID_TUN: u16 = 8;

/// Bytes the kernel puts before a multishot `recvmsg` payload: the 16-byte
/// `io_uring_recvmsg_out` header and the address (we ask for a `sockaddr_in6`).
const RECV_PREFIX: usize = 16 + size_of::<libc::sockaddr_in6>();

/// The user data of a request: its kind in the top byte, its slot (or peer socket id) below.
fn user_data(kind: u64, slot: usize) -> u64 {
    (kind << KIND_SHIFT) | slot as u64
}

/// Checks whether this kernel and process may use io_uring with what this backend needs.
pub(crate) fn probe() -> io::Result<()> {
    let ring: IoUring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (op, name) in [
        (opcode::RecvMsgMulti::CODE, "multishot recvmsg"),
        (opcode::ReadMulti::CODE, "multishot read"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::Read::CODE, "read"),
        (opcode::Write::CODE, "write"),
    ] {
        if !probe.is_supported(op) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring lacks {name}"),
            ));
        }
    }
    Ok(())
}

/// The provided buffer ring's entries, page-aligned as the kernel requires.
struct BufRing {
    base: *mut BufRingEntry,
    entries: u16,
    layout: Layout,
    tail: u16,
    /// Set when the memory must outlive us (the kernel may still read it): never freed.
    leaked: bool,
}

/// The page size, which the buffer ring must be aligned to.
fn page_size() -> usize {
    // SAFETY: sysconf has no memory preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

impl BufRing {
    fn new(entries: u16) -> io::Result<BufRing> {
        // The kernel masks ring indices with `entries - 1`, and so does `push`.
        if !entries.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer ring entries must be a power of two",
            ));
        }
        let layout = Layout::from_size_align(entries as usize * size_of::<BufRingEntry>(), page_size())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size (entries > 0).
        let base = unsafe { alloc_zeroed(layout) }.cast::<BufRingEntry>();
        if base.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(BufRing { base, entries, layout, tail: 0, leaked: false })
    }

    /// Writes an entry at the tail (not yet visible to the kernel: see [`publish`]). The
    /// caller lends at most `entries` buffers at once ([`Provided`] has `entries` ids and
    /// pushes only an id it holds), so fewer than `entries` entries are in the kernel's window
    /// whenever one is pushed.
    fn push(&mut self, addr: *mut u8, len: usize, bid: u16) {
        let index = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: `index < entries`, so the entry lies inside the allocation. The kernel only
        // reads entries between its head and the published tail; that window holds the ids
        // lent and not yet consumed, and `bid` is not among them (Provided pushes only ids it
        // got back), so it holds fewer than `entries` entries and the one at the tail is
        // outside it.
        let entry = unsafe { &mut *self.base.add(index) };
        entry.set_addr(addr as u64);
        entry.set_len(len.min(u32::MAX as usize) as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries pushed so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: `base` is the ring's first entry, page-aligned and initialised; the tail field
        // it points at is a u16 the kernel reads atomically, so an atomic release store is the
        // documented way to publish.
        unsafe {
            let tail = BufRingEntry::tail(self.base).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        // SAFETY: allocated in `new` with this layout; the ring (the only other user) is gone
        // and drained (else `leaked` is set).
        unsafe { dealloc(self.base.cast(), self.layout) }
    }
}

/// Pooled buffers lent to the kernel through a buffer ring, by buffer id.
struct Provided {
    ring: BufRing,
    bgid: u16,
    /// Each buffer is offered this many bytes before its usual data offset (room for what the
    /// kernel writes ahead of the payload).
    prefix: usize,
    /// Bytes at the end of each buffer not offered (tailroom kept for padding and tag).
    keep_tail: usize,
    bufs: Vec<Option<PacketBuf>>,
    to_provide: Vec<u16>,
}

impl Provided {
    fn new(entries: u16, bgid: u16, prefix: usize, keep_tail: usize) -> io::Result<Provided> {
        Ok(Provided {
            ring: BufRing::new(entries)?,
            bgid,
            prefix,
            keep_tail,
            bufs: (0..entries).map(|_| None).collect(),
            to_provide: (0..entries).collect(),
        })
    }

    /// Lends a fresh pool buffer for every consumed id.
    fn refill(&mut self, pool: &mut BufPool) -> io::Result<()> {
        let mut pushed = false;
        while let Some(bid) = self.to_provide.pop() {
            let mut buf = pool.get();
            if buf.headroom() < self.prefix {
                pool.put(buf);
                self.to_provide.push(bid);
                return Err(io::Error::other("pool buffers lack headroom for io_uring receives"));
            }
            buf.reset(buf.headroom() - self.prefix);
            let spare = buf.spare_mut();
            let len = spare.len().saturating_sub(self.keep_tail);
            self.ring.push(spare.as_mut_ptr(), len, bid);
            self.bufs[bid as usize] = Some(buf);
            pushed = true;
        }
        if pushed {
            self.ring.publish();
        }
        Ok(())
    }

    /// Gives up the ring and every buffer lent, never to be freed: the kernel may still write
    /// into them (see `UringIo`'s `Drop`).
    fn leak(&mut self) {
        self.ring.leaked = true;
        std::mem::forget(std::mem::take(&mut self.bufs));
    }

    /// Takes back the buffer the kernel filled; its id is queued for a fresh one.
    fn take(&mut self, bid: u16) -> Option<PacketBuf> {
        let buf = self.bufs.get_mut(bid as usize)?.take()?;
        self.to_provide.push(bid);
        Some(buf)
    }
}

/// The kernel structures of one in-flight `sendmsg`, boxed so they do not move.
struct SendSlot {
    hdr: libc::msghdr,
    iovs: Vec<libc::iovec>,
    addr: RawAddr,
    cmsg: [u64; GSO_CMSG_SPACE / 8],
    bufs: Vec<PacketBuf>,
    datagrams: usize,
    /// The peer socket it went out on (its id), or 0 for the shared socket.
    peer_id: u32,
}

/// io_uring batched I/O. See the module documentation.
pub struct UringIo {
    // Field order matters for drop: the ring goes first, so that no request is in flight when
    // the buffers and kernel structures below are freed.
    ring: IoUring,
    /// Kept open for the backend's life (the ring's registered file table refers to it).
    packets: PacketFd,
    udp: UdpSocket,
    batch: usize,
    /// Datagrams land in these (behind the recvmsg header and address).
    udp_bufs: Provided,
    /// TUN packets land in these.
    tun_bufs: Provided,
    recv_msghdr: Box<libc::msghdr>,
    recv_armed: bool,
    tun_read_armed: bool,
    tun_writes: Vec<Option<PacketBuf>>,
    tun_writes_free: Vec<usize>,
    /// Boxed so that a slot the kernel points into never moves, whatever the vector does.
    #[allow(clippy::vec_box)]
    sends: Vec<Box<SendSlot>>,
    sends_free: Vec<usize>,
    groups: Vec<SendGroup>,
    ready_packets: Vec<PacketBuf>,
    ready_datagrams: Vec<Datagram>,
    /// Buffers the kernel is done with, to go back to the pool at the next call that has it.
    done: Vec<PacketBuf>,
    wake_armed: bool,
    waker: Waker,
    gso: bool,
    enabled: bool,
    tun_read_error: Option<io::Error>,
    stats: IoStats,
    /// The peers' connected sockets, each received with user data `user_data(UDP_RECV, id)`;
    /// the shared socket is id 0.
    peers: PeerSockets,
    /// Sockets no longer wanted whose receive is being cancelled: each is closed when its
    /// last completion is reaped, so that no request in flight meets a reused descriptor.
    closing: Vec<PeerSocket>,
    /// Peer sockets let go before the ring was enabled: queued sends may name their
    /// descriptors, so they close only after the first submission has taken those in.
    close_after_first_submit: Vec<PeerSocket>,
    /// Peer sockets (ids) whose sends failed because the socket went stale.
    stale: Vec<u32>,
    /// The waker fired since the last `wait` returned.
    woken: bool,
    /// Queued sends, whose completions are posted as they are submitted: the wait that
    /// submits them asks for that many completions more, so that their bookkeeping does not
    /// end it.
    queued_inline: usize,
    /// Entries pushed to the submission queue since the last submission.
    queued: bool,
    /// Readiness mode: the multishot reads are cancelled and `wait` sleeps in `epoll_wait`; input
    /// is read with plain system calls. See [`UringIo::set_idle_after`].
    idle: bool,
    idle_after: Duration,
    /// In readiness mode, what `epoll_wait` found readable and has not been read yet (bits
    /// `READY_*`).
    idle_ready: u64,
    /// When input last arrived (in readiness mode: when the last wake with input came).
    last_input: Instant,
    /// A completion since the last `wait` brought input (for `last_input`).
    input_seen: bool,
    /// Readiness mode's wakes with input in a row that came within `idle_after` of the one
    /// before.
    close_wakes: u32,
    /// Readiness mode's `recvmmsg` and `sendmmsg` state, and its epoll set.
    calls: MmsgCalls,
    readiness: Readiness,
}

// SAFETY: the raw pointers inside (buffer ring, msghdrs, iovecs) point into memory this value
// owns; nothing is shared with another thread, and the ring is used from one thread at a time.
unsafe impl Send for UringIo {}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("port", &self.udp.port())
            .field("gso", &self.gso)
            .finish_non_exhaustive()
    }
}

impl UringIo {
    /// A backend over `packets` and `udp` moving up to `batch` items per turn.
    pub fn new(packets: PacketFd, udp: UdpSocket, batch: usize) -> io::Result<UringIo> {
        // Non-blocking: the ring reads it with a multishot read, which the kernel then serves
        // as packets arrive (on a blocking descriptor each read would park a kernel worker
        // thread, and every packet would cost a wake-up of one of them before ours); readiness
        // mode reads it with plain calls after epoll says it is readable.
        super::set_nonblocking(packets.as_fd(), true)?;
        let entries = (batch * 4).next_power_of_two().clamp(64, 4096) as u32;
        // The ring is built disabled and enabled by the first `wait`, on the worker thread
        // that drives it from then on: that lets it be single-issuer with deferred task
        // running (the kernel finishes a read whose data arrived, such as a multishot
        // receive's next datagram, only when this thread enters with GETEVENTS, which every
        // enter here does: see `submit`; nothing interrupts the worker for it). Kernels
        // before 6.1 get cooperative task running, older ones a plain ring.
        let ring: IoUring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_r_disabled()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(entries)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(entries * 4)
                    .setup_r_disabled()
                    .setup_single_issuer()
                    .setup_coop_taskrun()
                    .build(entries)
            })
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 4).setup_r_disabled().build(entries))?;
        ring.submitter().register_files(&[packets.as_fd().as_raw_fd(), udp.as_fd().as_raw_fd()])?;
        let ring_entries = (batch * 4).next_power_of_two().clamp(64, 4096) as u16;
        let udp_bufs = Provided::new(ring_entries, BGID_UDP, RECV_PREFIX, 0)?;
        let tun_bufs = Provided::new(ring_entries, BGID_TUN, 0, DEFAULT_TAILROOM)?;
        for p in [&udp_bufs, &tun_bufs] {
            // SAFETY: the entries stay allocated (owned by `p`, a field of the backend) for the
            // backend's life, and past it if the kernel may still use them: `Drop` drains
            // every request before the ring closes (first, by field order), or leaks them.
            unsafe {
                ring.submitter().register_buf_ring_with_flags(p.ring.base as u64, ring_entries, p.bgid, 0)?
            };
        }
        // SAFETY: msghdr is plain old data; zeros are valid.
        let mut recv_msghdr: Box<libc::msghdr> = Box::new(unsafe { zeroed() });
        recv_msghdr.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let gso = udp.supports_gso();
        let mut io = UringIo {
            ring,
            packets,
            udp,
            batch,
            udp_bufs,
            tun_bufs,
            recv_msghdr,
            recv_armed: false,
            tun_read_armed: false,
            tun_writes: (0..batch * 2).map(|_| None).collect(),
            tun_writes_free: (0..batch * 2).collect(),
            sends: Vec::new(),
            sends_free: Vec::new(),
            groups: Vec::with_capacity(batch),
            ready_packets: Vec::with_capacity(batch),
            ready_datagrams: Vec::with_capacity(ring_entries as usize),
            done: Vec::with_capacity(batch * 2),
            wake_armed: false,
            waker: Waker::new()?,
            gso,
            enabled: false,
            tun_read_error: None,
            stats: IoStats::default(),
            peers: PeerSockets::new(),
            closing: Vec::new(),
            close_after_first_submit: Vec::new(),
            stale: Vec::with_capacity(crate::MAX_CONNECTED_PEERS),
            woken: false,
            queued_inline: 0,
            queued: false,
            idle: false,
            idle_after: DEFAULT_IDLE_AFTER,
            idle_ready: 0,
            last_input: Instant::now(),
            input_seen: false,
            close_wakes: 0,
            calls: MmsgCalls::new(batch),
            readiness: Readiness::new(),
        };
        for i in 0..batch {
            let mut slot = SendSlot {
                // SAFETY: msghdr is plain old data; zeros are valid.
                hdr: unsafe { zeroed() },
                iovs: Vec::with_capacity(crate::calls::GSO_MAX_SEGMENTS),
                addr: RawAddr::new(SocketAddr::from(([0, 0, 0, 0], 0)), false),
                cmsg: [0; GSO_CMSG_SPACE / 8],
                bufs: Vec::with_capacity(crate::calls::GSO_MAX_SEGMENTS),
                datagrams: 0,
                peer_id: 0,
            };
            slot.iovs.clear();
            io.sends.push(Box::new(slot));
            io.sends_free.push(i);
        }
        Ok(io)
    }

    /// Sets how long the link must be quiet (no datagram received, no packet read) before the
    /// backend changes to readiness mode ([`DEFAULT_IDLE_AFTER`] unless set): the multishot
    /// requests are cancelled, the worker sleeps in `epoll_wait` and moves packets with
    /// `read`/`write` and `recvmmsg`/`sendmmsg`, which wake and run faster than the ring for a
    /// packet now and then. A full batch at once, or eight wakes with input in a row each
    /// within this time of the last, brings the ring back. `Duration::MAX`: never.
    pub fn set_idle_after(&mut self, quiet: Duration) {
        self.idle_after = quiet;
    }

    /// Pushes an SQE, flushing the queue to the kernel first if it is full.
    ///
    /// # Safety
    /// Every buffer and structure `entry` points at must stay valid and unmoved until its
    /// completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.queued = true;
                return Ok(());
            }
            self.submit(0)?;
        }
    }

    /// Submits the queued requests, runs the completion work the kernel has deferred to this
    /// thread (a ring with `DEFER_TASKRUN` runs it only when asked: this is what posts
    /// the completions of reads whose data has arrived), and waits for `want` completions.
    fn submit(&mut self, want: usize) -> io::Result<usize> {
        let queued = self.ring.submission().len();
        self.queued_inline = 0;
        self.queued = false;
        // SAFETY: no argument is passed; every queued entry's memory is held by `self` as the
        // contract of `push` requires.
        unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                queued as u32,
                want as u32,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        }
    }

    /// Lends fresh buffers for every consumed id, and re-arms the multishot receive, the
    /// multishot TUN read and the waker where they ended; closes stale peer sockets.
    fn refill(&mut self, pool: &mut BufPool) -> io::Result<()> {
        if self.idle {
            // Readiness mode: nothing but the waker is armed, nothing consumes the buffer
            // rings; what is left to do waits for the ring's return (and the turn touches no
            // more memory than it needs: it runs after a sleep, with cold caches).
            return self.arm_waker();
        }
        while let Some(id) = self.stale.pop() {
            if let Some(i) = self.peers.list.iter().position(|p| p.id == id) {
                let p = self.peers.list.swap_remove(i);
                self.closing.push(p);
                self.close_from(self.closing.len() - 1)?;
                self.stats.peer_sockets_stale += 1;
            }
        }
        self.udp_bufs.refill(pool)?;
        self.tun_bufs.refill(pool)?;
        if !self.recv_armed {
            let entry = opcode::RecvMsgMulti::new(Fixed(FILE_UDP), &*self.recv_msghdr, BGID_UDP)
                .build()
                .user_data(user_data(UDP_RECV, 0));
            // SAFETY: the msghdr is boxed in `self` and outlives the ring; the buffers come from
            // the buffer ring, whose memory `self.udp_bufs` owns.
            unsafe { self.push(&entry)? };
            self.recv_armed = true;
        }
        for i in 0..self.peers.list.len() {
            if self.peers.list[i].recv_armed {
                continue;
            }
            let p = &self.peers.list[i];
            let entry = opcode::RecvMsgMulti::new(
                io_uring::types::Fd(p.sock.as_fd().as_raw_fd()),
                &*self.recv_msghdr,
                BGID_UDP,
            )
            .build()
            .user_data(user_data(UDP_RECV, p.id as usize));
            // SAFETY: as for the shared socket's receive above; the socket stays open until
            // this request's last completion (see `closing`).
            unsafe { self.push(&entry)? };
            self.peers.list[i].recv_armed = true;
        }
        if !self.tun_read_armed && self.tun_read_error.is_none() {
            let entry = opcode::ReadMulti::new(Fixed(FILE_TUN), 0, BGID_TUN)
                .build()
                .user_data(user_data(TUN_READ, 0));
            // SAFETY: the buffers come from the TUN buffer ring, whose memory `self.tun_bufs`
            // owns until the ring is gone.
            unsafe { self.push(&entry)? };
            self.tun_read_armed = true;
        }
        self.arm_waker()
    }

    /// Arms the multishot poll of the waker's eventfd if it is not.
    fn arm_waker(&mut self) -> io::Result<()> {
        if !self.wake_armed {
            let entry =
                opcode::PollAdd::new(io_uring::types::Fd(self.waker.0.as_raw_fd()), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(user_data(WAKE, 0));
            // SAFETY: a poll request carries no buffers; the eventfd lives as long as `self`.
            unsafe { self.push(&entry)? };
            self.wake_armed = true;
        }
        Ok(())
    }

    /// Reaps every completion, moving finished reads to the ready lists.
    fn reap(&mut self) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let (kind, slot) = (cqe.user_data() >> KIND_SHIFT, (cqe.user_data() & 0xffff_ffff) as usize);
            let result = cqe.result();
            match kind {
                TUN_READ => {
                    if !cqueue::more(cqe.flags()) {
                        self.tun_read_armed = false;
                    }
                    let buf = cqueue::buffer_select(cqe.flags()).and_then(|bid| self.tun_bufs.take(bid));
                    match (buf, result) {
                        (Some(mut buf), n) if n > 0 => {
                            buf.set_len(n as usize).expect("the kernel read within the room given");
                            self.stats.tun_rx += 1;
                            self.input_seen = true;
                            self.ready_packets.push(buf);
                        }
                        (buf, n) => {
                            self.done.extend(buf);
                            if n < 0 && ![libc::ECANCELED, libc::EAGAIN, libc::ENOBUFS].contains(&-n) {
                                self.stats.tun_read_errors += 1;
                                self.tun_read_error = Some(io::Error::from_raw_os_error(-n));
                            }
                        }
                    }
                }
                TUN_WRITE => {
                    if let Some(buf) = self.tun_writes[slot].take() {
                        self.tun_writes_free.push(slot);
                        self.done.push(buf);
                    }
                    if result < 0 {
                        self.stats.tun_write_errors += 1;
                    } else {
                        self.stats.tun_tx += 1;
                    }
                }
                UDP_RECV => {
                    if !cqueue::more(cqe.flags()) {
                        if slot == 0 {
                            self.recv_armed = false;
                        } else if let Some(p) = self.peers.list.iter_mut().find(|p| p.id as usize == slot) {
                            p.recv_armed = false;
                        } else {
                            // A closed peer's receive has ended: its socket may go now.
                            self.closing.retain(|p| p.id as usize != slot);
                        }
                    }
                    let Some(bid) = cqueue::buffer_select(cqe.flags()) else {
                        if result < 0 && result != -libc::ENOBUFS && result != -libc::ECANCELED {
                            self.stats.udp_recv_errors += 1;
                        }
                        continue;
                    };
                    let Some(mut buf) = self.udp_bufs.take(bid) else { continue };
                    if result < 0 {
                        self.done.push(buf);
                        continue;
                    }
                    let n = (result as usize).min(buf.spare_mut().len());
                    let parsed = {
                        let bytes = &buf.spare_mut()[..n];
                        RecvMsgOut::parse(bytes, &self.recv_msghdr).ok().map(|out| {
                            let mut raw = RawAddr::empty();
                            let name = out.name_data();
                            // SAFETY: `raw.storage` is a sockaddr_in6 and `name` is at most its
                            // size (we asked for exactly that much name room).
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    name.as_ptr(),
                                    (&mut raw.storage as *mut libc::sockaddr_in6).cast::<u8>(),
                                    name.len().min(size_of::<libc::sockaddr_in6>()),
                                );
                            }
                            (raw.socket_addr(), out.payload_data().len(), out.is_payload_truncated())
                        })
                    };
                    match parsed {
                        Some((Some(addr), len, false)) => {
                            buf.set_len(RECV_PREFIX + len).expect("within the buffer");
                            buf.advance(RECV_PREFIX).expect("prefix is inside the data");
                            self.stats.udp_rx += 1;
                            self.input_seen = true;
                            self.ready_datagrams.push(Datagram { addr, buf });
                        }
                        _ => {
                            self.stats.udp_truncated += 1;
                            self.done.push(buf);
                        }
                    }
                }
                UDP_SEND => {
                    let s = &mut self.sends[slot];
                    if result < 0 {
                        if result == -libc::EIO && self.gso {
                            tracing::warn!(
                                "UDP GSO refused by the kernel (EIO); sending datagrams one by one"
                            );
                            self.gso = false;
                        }
                        self.stats.udp_send_errors += s.datagrams as u64;
                        if s.peer_id != 0
                            && crate::peers::is_stale(-result)
                            && !self.stale.contains(&s.peer_id)
                        {
                            // Closed at the next refill; the shared socket serves the peer.
                            self.stale.push(s.peer_id);
                        }
                    } else {
                        self.stats.udp_tx += s.datagrams as u64;
                    }
                    self.done.append(&mut s.bufs);
                    self.sends_free.push(slot);
                }
                WAKE => {
                    if !cqueue::more(cqe.flags()) {
                        self.wake_armed = false;
                    }
                    self.waker.drain();
                    self.woken = true;
                }
                _ => {}
            }
        }
    }

    fn recycle_done(&mut self, pool: &mut BufPool) {
        for buf in self.done.drain(..) {
            pool.put(buf);
        }
    }

    /// Waits for send slots to come back when all are in flight.
    fn wait_for_send_slot(&mut self) -> io::Result<()> {
        while self.sends_free.is_empty() {
            self.submit(1)?;
            self.reap();
        }
        Ok(())
    }
}

impl PacketIo for UringIo {
    fn kind(&self) -> BackendKind {
        BackendKind::Uring
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
            if !self.close_after_first_submit.is_empty() {
                self.submit(0)?;
                self.close_after_first_submit.clear();
            }
        }
        if self.idle {
            return self.wait_idle(timeout);
        }
        // Until the receive, the reads and the waker are armed (the first turn, or after the
        // buffer ring ran dry), nothing may complete: go round once to arm them.
        if self.unarmed() || !self.ready_packets.is_empty() || !self.ready_datagrams.is_empty() {
            self.submit(0)?;
            self.reap();
            return Ok(());
        }
        let now = Instant::now();
        if std::mem::take(&mut self.input_seen) {
            self.last_input = now;
        }
        let deadline = timeout.map(|d| now + d);
        // Sleep no longer than until the link has been quiet for `idle_after`: from then on,
        // readiness mode.
        let (until, then_idle) = match (deadline, self.last_input.checked_add(self.idle_after)) {
            (Some(at), Some(quiet)) if at <= quiet => (at, false),
            (_, Some(quiet)) => (quiet, true),
            (Some(at), None) => (at, false),
            // No deadline, never idle: wake now and then for nothing, harmlessly.
            (None, None) => (now + Duration::from_secs(3600), false),
        };
        loop {
            // One completion beyond those of the sends this call submits (each posted as it is
            // submitted, unless the socket's send buffer is full; then the wait also lasts
            // until that send goes, which the buffer draining bounds): sleep until something
            // arrives, in this one call, instead of returning for the sends' bookkeeping and
            // entering again.
            let want = 1 + std::mem::take(&mut self.queued_inline);
            let ts = Timespec::from(until.saturating_duration_since(Instant::now()));
            let args = SubmitArgs::new().timespec(&ts);
            let result = self.ring.submitter().submit_with_args(want, &args);
            self.queued = false;
            let timed_out = match result {
                Ok(_) => false,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => true,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {
                    self.reap();
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            self.reap();
            // Completions of our own sends and writes (the sends submitted by this very call
            // complete at once) are bookkeeping, not work: sleep on rather than hand the
            // worker an empty turn.
            if self.has_work() {
                return Ok(());
            }
            if timed_out || Instant::now() >= until {
                if !then_idle {
                    return Ok(());
                }
                self.enter_idle()?;
                if self.has_work() {
                    return Ok(());
                }
                return self.wait_idle(deadline.map(|at| at.saturating_duration_since(Instant::now())));
            }
        }
    }

    fn recv_datagrams(&mut self, pool: &mut BufPool, out: &mut Vec<Datagram>) -> io::Result<()> {
        self.recycle_done(pool);
        // Everything received goes out now: the buffer ring bounds how much that can be.
        // (Handing out only part of it while refilling the ring every turn let the backlog,
        // and the buffers it holds, grow without bound under a sustained flood.)
        out.append(&mut self.ready_datagrams);
        let mut result = Ok(());
        if self.idle_ready & READY_UDP != 0 {
            self.idle_ready &= !READY_UDP;
            result = self.idle_recv(None, pool, out);
        }
        for i in 0..self.peers.list.len() {
            let bit = 1 << (PEER_BIT0 + i);
            if self.idle_ready & bit != 0 {
                self.idle_ready &= !bit;
                let r = self.idle_recv(Some(i), pool, out);
                if result.is_ok() {
                    result = r;
                }
            }
        }
        self.refill(pool)?;
        result
    }

    fn read_packets(&mut self, pool: &mut BufPool, out: &mut Vec<PacketBuf>) -> io::Result<()> {
        self.recycle_done(pool);
        out.append(&mut self.ready_packets);
        if let Some(e) = self.tun_read_error.take() {
            // Re-armed at the next turn, not now: a broken descriptor would fail again at once.
            return Err(e);
        }
        if self.idle_ready & READY_TUN != 0 {
            self.idle_ready &= !READY_TUN;
            // A full batch: more is waiting, the traffic is no longer sparse; the ring takes
            // over (the multishot read, armed below, reads the rest).
            if read_packet_batch(&self.packets, self.batch, pool, out, &mut self.stats)? {
                self.idle = false;
            }
        }
        self.refill(pool)
    }

    fn send_datagrams(&mut self, dgrams: &mut Vec<Datagram>, pool: &mut BufPool) -> io::Result<()> {
        self.recycle_done(pool);
        if self.idle {
            // A few datagrams now and then: a direct `sendmmsg` wakes the kernel's cold paths
            // faster than a submission does.
            let peers = self.peers.list.len();
            self.calls.send(&self.udp, &mut self.peers, &mut self.gso, &mut self.stats, dgrams, pool);
            if self.peers.list.len() != peers {
                // A stale peer socket was dropped (none is armed in this mode): the indices of
                // readiness found changed.
                self.idle_ready &= READY_UDP | READY_TUN;
                self.stats.peer_sockets = self.peers.list.len() as u64;
            }
            return Ok(());
        }
        while !dgrams.is_empty() {
            let take = dgrams.len().min(self.batch);
            group_for_gso(&dgrams[..take], self.gso, &mut self.groups);
            // Groups are taken from the front; drain the batch's datagrams into slots.
            let mut drained = dgrams.drain(..take);
            for gi in 0..self.groups.len() {
                let g = self.groups[gi];
                self.wait_for_send_slot()?;
                let slot = self.sends_free.pop().expect("a free slot after waiting");
                let ipv6 = self.udp.is_ipv6();
                let s = &mut *self.sends[slot];
                s.iovs.clear();
                s.bufs.clear();
                let mut to = None;
                for _ in g.start..g.end {
                    let d = drained.next().expect("groups cover the batch");
                    if s.bufs.is_empty() {
                        to = Some(d.addr);
                    }
                    s.bufs.push(d.buf);
                }
                // A peer with a connected socket gets its datagrams through it, unaddressed.
                let peer = to.and_then(|a| self.peers.find(&a));
                let peer_fd = peer.map(|i| self.peers.list[i].sock.as_fd().as_raw_fd());
                s.peer_id = peer.map_or(0, |i| self.peers.list[i].id);
                if let (None, Some(a)) = (peer, to) {
                    s.addr = RawAddr::new(a, ipv6);
                }
                for b in &s.bufs {
                    let data = b.data();
                    s.iovs.push(libc::iovec {
                        iov_base: data.as_ptr() as *mut libc::c_void,
                        iov_len: data.len(),
                    });
                }
                s.datagrams = g.end - g.start;
                if peer_fd.is_some() {
                    s.hdr.msg_name = std::ptr::null_mut();
                    s.hdr.msg_namelen = 0;
                } else {
                    s.hdr.msg_name = (&mut s.addr.storage as *mut libc::sockaddr_in6).cast();
                    s.hdr.msg_namelen = s.addr.len;
                }
                s.hdr.msg_iov = s.iovs.as_mut_ptr();
                s.hdr.msg_iovlen = s.iovs.len();
                s.hdr.msg_flags = 0;
                set_gso_segment(&mut s.hdr, &mut s.cmsg, g.segment);
                let entry = match peer_fd {
                    Some(fd) => opcode::SendMsg::new(io_uring::types::Fd(fd), &s.hdr).build(),
                    None => opcode::SendMsg::new(Fixed(FILE_UDP), &s.hdr).build(),
                }
                .user_data(user_data(UDP_SEND, slot));
                self.stats.send_calls += 1;
                // SAFETY: the slot is boxed and owns the msghdr, iovecs, address, control space
                // and the buffers the iovecs point at until the completion returns it.
                unsafe { self.push(&entry)? };
                // (Counted after the push: a push that flushes a full queue submits, and
                // forgets, what was counted before.)
                self.queued_inline += 1;
            }
        }
        Ok(())
    }

    fn write_packets(&mut self, packets: &mut Vec<PacketBuf>, pool: &mut BufPool) -> io::Result<()> {
        self.recycle_done(pool);
        if self.idle {
            // As the ring does (below): what the kernel answers at once is read this turn.
            if !packets.is_empty() {
                self.idle_ready |= READY_TUN;
            }
            write_packet_batch(&self.packets, packets, pool, &mut self.stats);
            return Ok(());
        }
        for buf in packets.drain(..) {
            while self.tun_writes_free.is_empty() {
                self.submit(1)?;
                self.reap();
                self.recycle_done(pool);
            }
            let slot = self.tun_writes_free.pop().expect("a free slot after waiting");
            let data = buf.data();
            let entry = opcode::Write::new(Fixed(FILE_TUN), data.as_ptr(), data.len() as u32)
                .build()
                .user_data(user_data(TUN_WRITE, slot));
            self.tun_writes[slot] = Some(buf);
            // SAFETY: the buffer is held in `tun_writes[slot]` until the write completes.
            unsafe { self.push(&entry)? };
        }
        if !self.ring.submission().is_empty() {
            // The packets go to the TUN side now, not at the end of the turn: whoever waits
            // for them (a ping) gets them a turn's work sooner, and what the kernel answers at
            // once (the ping's reply, on the far side) has been read by the time this returns
            // (the enter runs the multishot read's deferred work), so the same turn sends it.
            self.submit(0)?;
            self.reap();
        }
        Ok(())
    }

    fn replace_socket(&mut self, udp: UdpSocket, _pool: &mut BufPool) -> io::Result<()> {
        // The peers' sockets move to the new port too.
        let (addrs, n) = self.peers.addrs();
        self.connect_peers(&[])?;
        while !self.closing.is_empty() {
            self.submit(1)?;
            self.reap();
        }
        if self.recv_armed {
            self.cancel(user_data(UDP_RECV, 0))?;
            // Wait for the multishot receive to end before its socket goes.
            while self.recv_armed {
                self.submit(1)?;
                self.reap();
            }
        }
        self.ring.submitter().register_files_update(FILE_UDP, &[udp.as_fd().as_raw_fd()])?;
        self.idle_ready &= !READY_UDP;
        self.readiness.reset();
        self.gso = udp.supports_gso();
        self.udp = udp;
        self.connect_peers(&addrs[..n])
    }

    fn connect_peers(&mut self, peers: &[SocketAddr]) -> io::Result<()> {
        // The list's indices change: readiness found for peer sockets is looked for again.
        self.idle_ready &= READY_UDP | READY_TUN;
        let start = self.closing.len();
        let result = self.peers.update(&self.udp, peers.iter().copied(), |p| self.closing.push(p));
        self.close_from(start)?;
        result
    }

    fn port(&self) -> u16 {
        self.udp.port()
    }

    fn set_fwmark(&mut self, mark: u32) -> io::Result<()> {
        self.udp.set_fwmark(mark)?;
        self.peers.list.iter_mut().try_for_each(|p| p.sock.set_fwmark(mark))
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }
}

impl UringIo {
    /// Whether the worker has something to do: input ready, a wake-up, an error to report, or
    /// a request to re-arm or a socket to retire (both done in its turn).
    fn has_work(&mut self) -> bool {
        !self.ready_packets.is_empty()
            || !self.ready_datagrams.is_empty()
            || self.idle_ready != 0
            || std::mem::take(&mut self.woken)
            || self.tun_read_error.is_some()
            || !self.stale.is_empty()
            || self.unarmed()
    }

    /// Whether a request that should be in flight is not (and the next turn arms it).
    fn unarmed(&self) -> bool {
        !self.wake_armed
            || (!self.idle
                && (!self.recv_armed
                    || !self.tun_read_armed
                    || self.peers.list.iter().any(|p| !p.recv_armed)))
    }

    /// Readiness mode from now on: cancels the multishot receives and the multishot read and
    /// waits for their last completions (what they read before that is kept for the worker).
    fn enter_idle(&mut self) -> io::Result<()> {
        self.idle = true;
        self.stats.idle_entries += 1;
        if self.tun_read_armed {
            self.cancel(user_data(TUN_READ, 0))?;
        }
        if self.recv_armed {
            self.cancel(user_data(UDP_RECV, 0))?;
        }
        for i in 0..self.peers.list.len() {
            if self.peers.list[i].recv_armed {
                self.cancel(user_data(UDP_RECV, self.peers.list[i].id as usize))?;
            }
        }
        while self.tun_read_armed || self.recv_armed || self.peers.list.iter().any(|p| p.recv_armed) {
            self.submit(1)?;
            self.reap();
        }
        Ok(())
    }

    /// Readiness mode's wait: submits what the turn queued, then sleeps in `epoll_wait` on the
    /// descriptors until one is readable, the waker fires or `timeout` passes. Wakes with
    /// input coming one after another (each within `idle_after` of the last, `BUSY_WAKES` in a
    /// row) bring the ring back.
    fn wait_idle(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // Only a request left over from the ring (a send that found its socket's buffer full,
        // a socket being closed) may have completions to run and reap; otherwise the ring's
        // memory is not touched. (The waker's multishot poll stays armed; its completions run
        // when the ring is back; the epoll set watches the eventfd itself.)
        let leftover = self.queued
            || self.sends_free.len() != self.sends.len()
            || self.tun_writes_free.len() != self.tun_writes.len()
            || !self.closing.is_empty();
        if leftover {
            self.submit(0)?;
            self.reap();
        }
        self.queued_inline = 0;
        if self.has_work() {
            return Ok(());
        }
        let ready = self.readiness.wait(&self.udp, &self.packets, &self.waker, &self.peers, timeout)?;
        let n = POLL_OWN + self.peers.list.len();
        if ready[2] {
            self.waker.drain();
            self.woken = true;
        }
        let mut bits = 0;
        if ready[0] {
            bits |= READY_UDP;
        }
        if ready[1] {
            bits |= READY_TUN;
        }
        for (i, r) in ready[POLL_OWN..n].iter().enumerate() {
            bits |= u64::from(*r) << (PEER_BIT0 + i);
        }
        if bits != 0 {
            let now = Instant::now();
            if now.saturating_duration_since(self.last_input) < self.idle_after {
                self.close_wakes += 1;
            } else {
                self.close_wakes = 0;
            }
            if self.close_wakes >= BUSY_WAKES {
                // Input wake after wake: the link is busy, the ring takes over. (What `epoll_wait`
                // found is still read the plain way first, in this turn.)
                self.idle = false;
                self.close_wakes = 0;
            }
            self.last_input = now;
        }
        self.idle_ready |= bits;
        Ok(())
    }

    /// Readiness mode's receive on the shared socket (`None`) or peer socket `i`. A full batch
    /// means more is waiting: the ring takes over.
    fn idle_recv(
        &mut self,
        peer: Option<usize>,
        pool: &mut BufPool,
        out: &mut Vec<Datagram>,
    ) -> io::Result<()> {
        let sock = match peer {
            None => self.udp.as_fd(),
            Some(i) => self.peers.list[i].sock.as_fd(),
        };
        let (more, result) = self.calls.recv(sock, pool, out, &mut self.stats);
        if more && result.is_ok() {
            self.idle = false;
        }
        result
    }

    /// Closes the peer sockets `closing[start..]`, just taken off the list. One whose receive
    /// is armed stays there until that receive, cancelled here, has ended; the others close
    /// now, once the requests already queued (sends may name them) have gone in.
    fn close_from(&mut self, start: usize) -> io::Result<()> {
        if self.enabled && self.closing[start..].iter().any(|p| !p.recv_armed) {
            self.submit(0)?;
        }
        let mut i = start;
        while i < self.closing.len() {
            if self.closing[i].recv_armed {
                self.cancel(user_data(UDP_RECV, self.closing[i].id as usize))?;
                i += 1;
            } else if !self.enabled {
                // Nothing queued has gone in yet: keep the descriptor until it has, so that
                // no queued send meets a closed or reused descriptor number.
                let socket = self.closing.swap_remove(i);
                self.close_after_first_submit.push(socket);
            } else {
                drop(self.closing.swap_remove(i));
            }
        }
        self.stats.peer_sockets = self.peers.list.len() as u64;
        Ok(())
    }

    /// Queues the cancellation of the request with user data `target`: the multishot read, or
    /// the multishot receive of peer socket `id` (`user_data(UDP_RECV, id)`, 0: the shared socket).
    fn cancel(&mut self, target: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target).build().user_data(user_data(CANCEL, 0));
        // SAFETY: a cancel request carries no buffers.
        unsafe { self.push(&entry) }
    }

    /// Requests still in flight.
    fn outstanding(&self) -> usize {
        self.tun_writes.iter().filter(|b| b.is_some()).count()
            + (self.sends.len() - self.sends_free.len())
            + usize::from(self.recv_armed)
            + self.peers.list.iter().filter(|p| p.recv_armed).count()
            + self.closing.len()
            + usize::from(self.wake_armed)
            + usize::from(self.tun_read_armed)
    }
}

/// Backends dropped with requests still in flight, whose memory was leaked (see `Drop`).
pub(crate) static DROPS_LEAKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Drop for UringIo {
    /// Cancels every request in flight and waits (up to a second) for their completions, then
    /// releases the registered files: when this returns, the kernel holds no buffer of ours
    /// and no reference to the TUN device, so a restarted daemon can attach to it at once.
    ///
    /// If draining does not finish (the cancel cannot be queued, `enter` fails, as it does
    /// with EEXIST on a thread other than the one that enabled a single-issuer ring, or the
    /// second runs out), the kernel may still write into our buffers and read our message
    /// headers after the ring closes: then they are leaked, never freed, and the leak is
    /// logged and counted.
    fn drop(&mut self) {
        let cancel = opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::any())
            .build()
            .user_data(user_data(CANCEL, 0));
        // A ring never enabled never took a request in: nothing is in flight.
        let mut drained = !self.enabled;
        // SAFETY: a cancel request carries no buffers.
        if self.enabled && unsafe { self.push(&cancel) }.is_ok() {
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while self.outstanding() > 0 && std::time::Instant::now() < deadline {
                let ts = Timespec::from(Duration::from_millis(50));
                let args = SubmitArgs::new().timespec(&ts);
                if let Err(e) = self.ring.submitter().submit_with_args(1, &args)
                    && !matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY))
                {
                    break;
                }
                self.reap();
            }
            drained = self.outstanding() == 0;
        }
        if !drained {
            tracing::error!(
                in_flight = self.outstanding(),
                "io_uring requests still in flight as the backend closes: leaking their memory"
            );
            self.udp_bufs.leak();
            self.tun_bufs.leak();
            std::mem::forget(std::mem::take(&mut self.sends));
            std::mem::forget(std::mem::take(&mut self.tun_writes));
            std::mem::forget(std::mem::take(&mut self.closing));
            // SAFETY: msghdr is plain data, for which all zeros (null pointers, zero lengths)
            // is a valid value.
            let blank = Box::new(unsafe { zeroed::<libc::msghdr>() });
            std::mem::forget(std::mem::replace(&mut self.recv_msghdr, blank));
            DROPS_LEAKED.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.ring.submitter().unregister_files();
    }
}

const _: () = assert!(RECV_PREFIX <= DEFAULT_HEADROOM, "the pool's headroom holds the recvmsg prefix");
