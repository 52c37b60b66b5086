//! The owner of one io_uring and of everything the kernel may touch through it: the one place
//! the `uring` backend's requests are made, with a safe interface.
//!
//! Every request takes what it needs by value (a packet to write, the datagrams of a send) or
//! lends memory the owner keeps (the provided buffer rings, the receive `msghdr`), and hands
//! it back through [`Ring::reap`] once its completion has arrived: nothing the kernel may read
//! or write is reachable from outside until then. The owner also knows which multishot
//! requests are armed, so that dropping it can wait for every request to end, and leak what
//! the kernel may still use when it cannot (see `Drop`).
//!
//! * UDP receives: a multishot `recvmsg` per socket over one provided buffer ring of pooled
//!   [`PacketBuf`]s, offered so that the kernel's `io_uring_recvmsg_out` header and the source
//!   address land in the headroom and the datagram at the buffer's normal data offset.
//! * TUN reads: one multishot read over a second buffer ring (buffers offered at their data
//!   offset, their tailroom kept free for padding and tag; with a virtio-net header, fewer
//!   buffers of a super-packet's size, from a pool of the ring's own, for the backend to
//!   split). TUN writes: one SQE per packet, or one `writev` per coalesced run.
//! * Sends: one `sendmsg` per group of datagrams, with `UDP_SEGMENT` (GSO) for runs of equal
//!   datagrams to one address, the iovecs pointing at the sealed buffers, from boxed slots
//!   that do not move.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use sitelink_frame::{BufPool, DEFAULT_HEADROOM, DEFAULT_TAILROOM, Datagram, PacketBuf};

mod event;

pub(crate) use event::Event;

use super::bufring::Provided;
use super::{GSO_CMSG_SPACE, GSO_MAX_SEGMENTS, RawAddr, set_gso_segment};

/// Kinds of request, in the top byte of their user data.
const KIND_SHIFT: u64 = 56;
const TUN_READ: u64 = 1;
const TUN_WRITE: u64 = 2;
const UDP_RECV: u64 = 3;
const UDP_SEND: u64 = 4;
const WAKE: u64 = 5;
const CANCEL: u64 = 6;

/// Registered file slots.
const FILE_TUN: u32 = 0;
const FILE_UDP: u32 = 1;

/// Provided-buffer group ids of the UDP and TUN buffer rings.
const BGID_UDP: u16 = 7;
const BGID_TUN: u16 = 8;

/// Bytes the kernel puts before a multishot `recvmsg` payload: the 16-byte
/// `io_uring_recvmsg_out` header and the address (we ask for a `sockaddr_in6`).
pub(crate) const RECV_PREFIX: usize = 16 + size_of::<libc::sockaddr_in6>();

const _: () = assert!(RECV_PREFIX <= DEFAULT_HEADROOM, "the pool's headroom holds the recvmsg prefix");
const _: () =
    assert!(LARGE_TUN_ENTRIES as usize <= crate::vnet::MAX_HELD_READS, "the backend can hold every read");

/// The user data of a request: its kind in the top byte, its slot (or socket id) below.
fn user_data(kind: u64, slot: usize) -> u64 {
    (kind << KIND_SHIFT) | slot as u64
}

/// Checks whether this kernel and process may use io_uring with what the backend needs.
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

/// Buffers in the TUN buffer ring when reads bring super-packets: each is 64 KiB, and a
/// run of small packets (acknowledgements) uses one each, so enough for a turn's worth.
const LARGE_TUN_ENTRIES: u16 = 32;

/// One in-flight TUN write: a packet, or a coalesced run gathered by `writev` (the first
/// packet whole, the others from `skip`), boxed so that the iovecs do not move.
struct WriteSlot {
    bufs: Vec<PacketBuf>,
    iovs: Vec<libc::iovec>,
}

/// The kernel structures of one in-flight `sendmsg`, boxed so they do not move.
struct SendSlot {
    hdr: libc::msghdr,
    iovs: Vec<libc::iovec>,
    addr: RawAddr,
    cmsg: [u64; GSO_CMSG_SPACE / 8],
    bufs: Vec<PacketBuf>,
    /// The socket it went out on (its id), or 0 for the shared socket.
    socket: u32,
}

/// A socket a receive or send goes through: the shared one (registered), or a peer's.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Socket<'a> {
    /// The link's shared UDP socket (id 0).
    Shared,
    /// A peer's connected socket, its id (never 0) and descriptor. The descriptor must stay
    /// open while a request on it is in flight (else the request fails, or meets whatever the
    /// number names next): its owner closes it only once [`Ring::recv_armed`] is false for it
    /// and its sends have completed.
    Peer(u32, BorrowedFd<'a>),
}

impl Socket<'_> {
    fn id(self) -> u32 {
        match self {
            Socket::Shared => 0,
            Socket::Peer(id, _) => id,
        }
    }
}

/// Backends dropped with requests still in flight, whose memory was leaked (see `Drop`).
pub(crate) static DROPS_LEAKED: AtomicU64 = AtomicU64::new(0);

/// Buffers in each provided-buffer ring of a ring for `batch` items a turn.
pub(crate) fn provided_entries(batch: usize) -> usize {
    (batch * 4).next_power_of_two().clamp(64, 4096)
}

/// The most buffers one [`Ring::reap`] can hand back: every send slot's datagrams (a GSO send
/// holds up to [`GSO_MAX_SEGMENTS`]), every TUN write's packets (a run holds up to
/// [`MAX_RUN`](crate::vnet::MAX_RUN)), and both provided rings' buffers. A done list made with
/// this capacity never grows, so reaping never allocates, whatever the timing.
pub(crate) fn most_done(batch: usize) -> usize {
    batch * GSO_MAX_SEGMENTS + batch * 2 * crate::vnet::MAX_RUN + 2 * provided_entries(batch)
}

/// One io_uring with the memory its requests use. See the module documentation.
pub(crate) struct Ring {
    // Field order matters for drop: `Drop` drains (or leaks) first; the ring's file closes
    // before the memory below is freed.
    ring: IoUring,
    udp_bufs: Provided,
    tun_bufs: Provided,
    recv_msghdr: Box<libc::msghdr>,
    /// The TUN ring's own buffers when reads bring super-packets (None: the caller's pool).
    tun_pool: Option<BufPool>,
    /// The sockets have UDP GRO on: instead of a multishot receive into the UDP buffer ring,
    /// each socket has a multishot poll, and the caller receives runs itself, scattered over
    /// its buffers (a run of datagrams must land one to a buffer, which a buffer ring cannot
    /// do).
    udp_poll: bool,
    #[allow(clippy::vec_box)]
    tun_writes: Vec<Box<WriteSlot>>,
    tun_writes_free: Vec<usize>,
    /// Boxed so that a slot the kernel points into never moves, whatever the vector does.
    #[allow(clippy::vec_box)]
    sends: Vec<Box<SendSlot>>,
    sends_free: Vec<usize>,
    /// Sockets (ids) whose multishot receive is armed.
    recv_armed: Vec<u32>,
    tun_read_armed: bool,
    wake_armed: bool,
    enabled: bool,
    /// Sends queued since the last submission, whose completions are posted as they go in.
    queued_sends: usize,
}

// SAFETY: the raw pointers inside (buffer ring, msghdrs, iovecs) point into memory this value
// owns; nothing is shared with another thread, and the ring is used from one thread at a time.
unsafe impl Send for Ring {}

impl Ring {
    /// A ring for `batch` items a turn over the packet descriptor and the shared UDP socket
    /// (registered as files), built disabled: [`enable`](Self::enable) it on the thread that
    /// will drive it.
    /// (`packets` is `None` for a backend without a packet side: its slot is left empty and
    /// no TUN read may be armed.) With `vnet_hdr`, TUN reads bring a virtio-net header and up
    /// to a super-packet, into buffers of [`READ_MAX`](crate::vnet::READ_MAX) bytes from the
    /// ring's own pool, which [`recycle_tun_buf`](Self::recycle_tun_buf) takes back; writes
    /// may be gathered runs. With `udp_gro` (the sockets have `UDP_GRO` on), the sockets are
    /// polled instead of received on ([`Event::Readable`]).
    pub(crate) fn new(
        batch: usize,
        packets: Option<BorrowedFd<'_>>,
        udp: BorrowedFd<'_>,
        vnet_hdr: bool,
        udp_gro: bool,
    ) -> io::Result<Ring> {
        let entries = (batch * 4).next_power_of_two().clamp(64, 4096) as u32;
        // Enabled by the first `wait`, on the worker thread that drives it from then on: that
        // lets it be single-issuer with deferred task running (the kernel finishes a read
        // whose data arrived, such as a multishot receive's next datagram, only when this
        // thread enters with GETEVENTS, which every enter here does: see `submit`; nothing
        // interrupts the worker for it). Kernels before 6.1 get cooperative task running,
        // older ones a plain ring.
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
        // A sparse slot (-1) where there is no packet descriptor.
        ring.submitter().register_files(&[packets.map_or(-1, |p| p.as_raw_fd()), udp.as_raw_fd()])?;
        let ring_entries = provided_entries(batch) as u16;
        // (With GRO the UDP buffer ring stays empty: never refilled, never received into.)
        let udp_bufs = Provided::new(if udp_gro { 1 } else { ring_entries }, BGID_UDP, RECV_PREFIX, 0)?;
        let (tun_bufs, tun_pool) = if vnet_hdr {
            let mut pool = BufPool::new(crate::vnet::READ_MAX, 0, usize::from(LARGE_TUN_ENTRIES));
            pool.prefill(usize::from(LARGE_TUN_ENTRIES));
            (Provided::new(LARGE_TUN_ENTRIES, BGID_TUN, 0, 0)?, Some(pool))
        } else {
            (Provided::new(ring_entries, BGID_TUN, 0, DEFAULT_TAILROOM)?, None)
        };
        for p in [&udp_bufs, &tun_bufs] {
            // SAFETY: the entries stay allocated (owned by `p`, a field of the ring's owner)
            // for its life, and past it if the kernel may still use them: `Drop` drains every
            // request before the ring closes, or leaks them.
            unsafe { ring.submitter().register_buf_ring_with_flags(p.ring_addr(), p.entries(), p.bgid, 0)? };
        }
        let run = if vnet_hdr { crate::vnet::MAX_RUN } else { 1 };
        // SAFETY: msghdr is plain old data; zeros are valid.
        let mut recv_msghdr: Box<libc::msghdr> = Box::new(unsafe { zeroed() });
        recv_msghdr.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let sends = (0..batch)
            .map(|_| {
                Box::new(SendSlot {
                    // SAFETY: msghdr is plain old data; zeros are valid.
                    hdr: unsafe { zeroed() },
                    iovs: Vec::with_capacity(GSO_MAX_SEGMENTS),
                    addr: RawAddr::new(SocketAddr::from(([0, 0, 0, 0], 0)), false),
                    cmsg: [0; GSO_CMSG_SPACE / 8],
                    bufs: Vec::with_capacity(GSO_MAX_SEGMENTS),
                    socket: 0,
                })
            })
            .collect();
        Ok(Ring {
            ring,
            udp_bufs,
            tun_bufs,
            recv_msghdr,
            tun_pool,
            udp_poll: udp_gro,
            tun_writes: (0..batch * 2)
                .map(|_| Box::new(WriteSlot { bufs: Vec::with_capacity(run), iovs: Vec::with_capacity(run) }))
                .collect(),
            tun_writes_free: (0..batch * 2).collect(),
            sends,
            sends_free: (0..batch).collect(),
            recv_armed: Vec::with_capacity(8),
            tun_read_armed: false,
            wake_armed: false,
            enabled: false,
            queued_sends: 0,
        })
    }

    /// Enables the ring on the calling thread, which drives it from then on (once).
    pub(crate) fn enable(&mut self) -> io::Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
        }
        Ok(())
    }

    /// Whether [`enable`](Self::enable) has run: until then nothing queued reaches the kernel.
    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled
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
                return Ok(());
            }
            self.submit(0)?;
        }
    }

    /// Submits the queued requests, runs the completion work the kernel has deferred to this
    /// thread (a ring with `DEFER_TASKRUN` runs it only when asked: this is what posts the
    /// completions of reads whose data has arrived), and waits for `want` completions.
    pub(crate) fn submit(&mut self, want: usize) -> io::Result<usize> {
        let queued = self.ring.submission().len();
        self.queued_sends = 0;
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

    /// Submits the queued requests and sleeps until one completion beyond the sends among
    /// them has arrived (each send posts its completion as it goes in, unless its socket's
    /// buffer is full: then the wait also lasts until it goes, which the buffer draining
    /// bounds), or `timeout` passes (`ETIME`).
    pub(crate) fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<usize> {
        let want = 1 + std::mem::take(&mut self.queued_sends);
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        self.ring.submitter().submit_with_args(want, &args)
    }

    /// Whether requests wait in the submission queue.
    pub(crate) fn has_queued(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// Lends fresh pool buffers to both buffer rings for every one consumed.
    /// (The ring's own pools of large buffers are fixed: a buffer the backend still holds is
    /// not replaced, so that holding input back bounds what the kernel may add.)
    pub(crate) fn refill(&mut self, pool: &mut BufPool) -> io::Result<()> {
        if !self.udp_poll {
            self.udp_bufs.refill(pool, false)?;
        }
        match &mut self.tun_pool {
            Some(own) => self.tun_bufs.refill(own, true),
            None => self.tun_bufs.refill(pool, false),
        }
    }

    /// Takes back a TUN read buffer of the ring's own pool (with a virtio-net header), once
    /// its packet has been split out of it.
    pub(crate) fn recycle_tun_buf(&mut self, buf: PacketBuf) {
        if let Some(pool) = &mut self.tun_pool {
            pool.put(buf);
        }
    }

    /// Whether the multishot receive (with GRO: poll) of `socket` (an id; 0: the shared
    /// socket) is armed.
    pub(crate) fn recv_armed(&self, socket: u32) -> bool {
        self.recv_armed.contains(&socket)
    }

    /// Whether the multishot TUN read is armed.
    pub(crate) fn tun_read_armed(&self) -> bool {
        self.tun_read_armed
    }

    /// Whether the waker's multishot poll is armed.
    pub(crate) fn wake_armed(&self) -> bool {
        self.wake_armed
    }

    /// Arms the multishot receive of `socket` into the UDP buffer ring (if it is not); with
    /// GRO, a multishot poll for input instead.
    pub(crate) fn arm_recv(&mut self, socket: Socket<'_>) -> io::Result<()> {
        let id = socket.id();
        if self.recv_armed(id) {
            return Ok(());
        }
        if self.udp_poll {
            let builder = match socket {
                Socket::Shared => opcode::PollAdd::new(Fixed(FILE_UDP), libc::POLLIN as u32),
                Socket::Peer(_, fd) => {
                    opcode::PollAdd::new(io_uring::types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
                }
            };
            let entry = builder.multi(true).build().user_data(user_data(UDP_RECV, id as usize));
            // SAFETY: a poll request carries no buffers.
            unsafe { self.push(&entry)? };
            self.recv_armed.push(id);
            return Ok(());
        }
        let builder = match socket {
            Socket::Shared => opcode::RecvMsgMulti::new(Fixed(FILE_UDP), &*self.recv_msghdr, BGID_UDP),
            Socket::Peer(_, fd) => {
                opcode::RecvMsgMulti::new(io_uring::types::Fd(fd.as_raw_fd()), &*self.recv_msghdr, BGID_UDP)
            }
        };
        let entry = builder.build().user_data(user_data(UDP_RECV, id as usize));
        // SAFETY: the msghdr is boxed in `self`, and the buffers come from the buffer ring,
        // whose memory `self.udp_bufs` owns: both outlive the request (see `Drop`).
        unsafe { self.push(&entry)? };
        self.recv_armed.push(id);
        Ok(())
    }

    /// Arms the multishot TUN read into the TUN buffer ring (if it is not).
    pub(crate) fn arm_tun_read(&mut self) -> io::Result<()> {
        if !self.tun_read_armed {
            let entry = opcode::ReadMulti::new(Fixed(FILE_TUN), 0, BGID_TUN)
                .build()
                .user_data(user_data(TUN_READ, 0));
            // SAFETY: the buffers come from the TUN buffer ring, whose memory `self.tun_bufs`
            // owns until every request has ended (see `Drop`).
            unsafe { self.push(&entry)? };
            self.tun_read_armed = true;
        }
        Ok(())
    }

    /// Arms a multishot poll for input on `waker` (an eventfd that outlives the ring).
    pub(crate) fn arm_wake(&mut self, waker: BorrowedFd<'_>) -> io::Result<()> {
        if !self.wake_armed {
            let entry = opcode::PollAdd::new(io_uring::types::Fd(waker.as_raw_fd()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(user_data(WAKE, 0));
            // SAFETY: a poll request carries no buffers.
            unsafe { self.push(&entry)? };
            self.wake_armed = true;
        }
        Ok(())
    }

    fn cancel(&mut self, target: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target).build().user_data(user_data(CANCEL, 0));
        // SAFETY: a cancel request carries no buffers.
        unsafe { self.push(&entry) }
    }

    /// Queues the cancellation of `socket`'s multishot receive (it stays armed until its last
    /// completion is reaped).
    pub(crate) fn cancel_recv(&mut self, socket: u32) -> io::Result<()> {
        self.cancel(user_data(UDP_RECV, socket as usize))
    }

    /// Queues the cancellation of the multishot TUN read.
    pub(crate) fn cancel_tun_read(&mut self) -> io::Result<()> {
        self.cancel(user_data(TUN_READ, 0))
    }

    /// Whether a TUN write can be queued now (else submit and reap first).
    pub(crate) fn can_write(&self) -> bool {
        !self.tun_writes_free.is_empty()
    }

    /// Queues a write of `buf` to the TUN side; the buffer comes back through `reap`. With no
    /// slot free ([`can_write`](Self::can_write)), hands it back.
    pub(crate) fn write_tun(&mut self, buf: PacketBuf) -> Result<(), (io::Error, PacketBuf)> {
        let Some(slot) = self.tun_writes_free.pop() else {
            return Err((io::Error::from(io::ErrorKind::WouldBlock), buf));
        };
        let data = buf.data();
        let entry = opcode::Write::new(Fixed(FILE_TUN), data.as_ptr(), data.len() as u32)
            .build()
            .user_data(user_data(TUN_WRITE, slot));
        self.tun_writes[slot].bufs.push(buf);
        // SAFETY: the buffer is held in `tun_writes[slot]` until the write completes.
        if let Err(e) = unsafe { self.push(&entry) } {
            // The entry was never queued: the buffer is ours again.
            let buf = self.tun_writes[slot].bufs.pop().expect("just stored");
            self.tun_writes_free.push(slot);
            return Err((e, buf));
        }
        Ok(())
    }

    /// Queues one gathered write of the run `bufs` (drained; at most
    /// [`MAX_RUN`](crate::vnet::MAX_RUN)): the first buffer's data whole, then each other's
    /// from `skip`. The buffers come back through `reap`. With no slot free, or too many
    /// buffers, fails with them untouched in `bufs`.
    pub(crate) fn write_tun_gathered(&mut self, bufs: &mut Vec<PacketBuf>, skip: usize) -> io::Result<()> {
        if bufs.len() > crate::vnet::MAX_RUN || bufs.iter().skip(1).any(|b| b.len() < skip) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a run one write can gather"));
        }
        let Some(slot) = self.tun_writes_free.pop() else {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        };
        let w = &mut *self.tun_writes[slot];
        w.bufs.append(bufs);
        w.iovs.clear();
        for (i, b) in w.bufs.iter().enumerate() {
            let data = if i == 0 { b.data() } else { &b.data()[skip..] };
            w.iovs.push(libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() });
        }
        let entry = opcode::Writev::new(Fixed(FILE_TUN), w.iovs.as_ptr(), w.iovs.len() as u32)
            .build()
            .user_data(user_data(TUN_WRITE, slot));
        // SAFETY: the slot is boxed and holds the iovecs and the buffers they point into until
        // the write completes.
        if let Err(e) = unsafe { self.push(&entry) } {
            let w = &mut *self.tun_writes[slot];
            bufs.append(&mut w.bufs);
            self.tun_writes_free.push(slot);
            return Err(e);
        }
        Ok(())
    }

    /// Whether a send can be queued now (else submit and reap first).
    pub(crate) fn can_send(&self) -> bool {
        !self.sends_free.is_empty()
    }

    /// Queues one `sendmsg` of `bufs` (at most 64) on `socket`: to `to` through the shared
    /// socket, unaddressed through a peer's connected one; with `segment` > 0 the kernel cuts
    /// them into datagrams of that size (GSO). The buffers come back through `reap`. With no
    /// slot free ([`can_send`](Self::can_send)) or too many buffers, fails with them untouched
    /// in `bufs`.
    pub(crate) fn send(
        &mut self,
        socket: Socket<'_>,
        to: SocketAddr,
        ipv6_socket: bool,
        bufs: &mut Vec<PacketBuf>,
        segment: u16,
    ) -> io::Result<()> {
        if bufs.len() > GSO_MAX_SEGMENTS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many datagrams for one send"));
        }
        let Some(slot) = self.sends_free.pop() else {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        };
        let s = &mut *self.sends[slot];
        s.iovs.clear();
        s.bufs.clear();
        s.bufs.append(bufs);
        for b in &s.bufs {
            let data = b.data();
            s.iovs.push(libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() });
        }
        s.socket = socket.id();
        match socket {
            Socket::Peer(..) => {
                s.hdr.msg_name = std::ptr::null_mut();
                s.hdr.msg_namelen = 0;
            }
            Socket::Shared => {
                s.addr = RawAddr::new(to, ipv6_socket);
                s.hdr.msg_name = (&mut s.addr.storage as *mut libc::sockaddr_in6).cast();
                s.hdr.msg_namelen = s.addr.len;
            }
        }
        s.hdr.msg_iov = s.iovs.as_mut_ptr();
        s.hdr.msg_iovlen = s.iovs.len();
        s.hdr.msg_flags = 0;
        set_gso_segment(&mut s.hdr, &mut s.cmsg, segment);
        let entry = match socket {
            Socket::Peer(_, fd) => opcode::SendMsg::new(io_uring::types::Fd(fd.as_raw_fd()), &s.hdr).build(),
            Socket::Shared => opcode::SendMsg::new(Fixed(FILE_UDP), &s.hdr).build(),
        }
        .user_data(user_data(UDP_SEND, slot));
        // SAFETY: the slot is boxed and owns the msghdr, iovecs, address, control space and the
        // buffers the iovecs point at until the completion returns it.
        if let Err(e) = unsafe { self.push(&entry) } {
            let s = &mut *self.sends[slot];
            bufs.append(&mut s.bufs);
            self.sends_free.push(slot);
            return Err(e);
        }
        // (Counted after the push: a push that flushes a full queue submits, and forgets,
        // what was counted before.)
        self.queued_sends += 1;
        Ok(())
    }

    /// Sends and TUN writes in flight.
    pub(crate) fn transfers_in_flight(&self) -> usize {
        (self.sends.len() - self.sends_free.len()) + (self.tun_writes.len() - self.tun_writes_free.len())
    }

    /// Requests still in flight (or armed).
    fn outstanding(&self) -> usize {
        self.transfers_in_flight()
            + self.recv_armed.len()
            + usize::from(self.wake_armed)
            + usize::from(self.tun_read_armed)
    }

    /// Points the shared socket's registered file at `udp` (its receive must not be armed).
    pub(crate) fn replace_udp(&mut self, udp: BorrowedFd<'_>) -> io::Result<()> {
        debug_assert!(!self.recv_armed(0));
        self.ring.submitter().register_files_update(FILE_UDP, &[udp.as_raw_fd()])?;
        Ok(())
    }

    /// Reaps every completion: what came in or failed goes to `event`, the buffers the
    /// kernel is done with (written, sent, or not used) to `done`.
    pub(crate) fn reap(&mut self, done: &mut Vec<PacketBuf>, mut event: impl FnMut(Event)) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let (kind, slot) = (cqe.user_data() >> KIND_SHIFT, (cqe.user_data() & 0xffff_ffff) as usize);
            let result = cqe.result();
            let more = cqueue::more(cqe.flags());
            match kind {
                TUN_READ => {
                    if !more {
                        self.tun_read_armed = false;
                    }
                    let buf = cqueue::buffer_select(cqe.flags()).and_then(|bid| self.tun_bufs.take(bid));
                    match (buf, result) {
                        (Some(mut buf), n) if n > 0 => {
                            buf.set_len(n as usize).expect("the kernel read within the room given");
                            event(Event::Packet(buf));
                        }
                        (buf, n) => {
                            if let Some(buf) = buf {
                                match &mut self.tun_pool {
                                    Some(own) => own.put(buf),
                                    None => done.push(buf),
                                }
                            }
                            if n < 0 && ![libc::ECANCELED, libc::EAGAIN, libc::ENOBUFS].contains(&-n) {
                                event(Event::ReadFailed(-n));
                            }
                        }
                    }
                }
                TUN_WRITE => {
                    let Some(w) = self.tun_writes.get_mut(slot).filter(|w| !w.bufs.is_empty()) else {
                        continue;
                    };
                    let packets = w.bufs.len();
                    done.append(&mut w.bufs);
                    self.tun_writes_free.push(slot);
                    event(Event::Written { result, packets });
                }
                UDP_RECV => {
                    if !more {
                        self.recv_armed.retain(|&id| id as usize != slot);
                    }
                    if self.udp_poll {
                        if result > 0 {
                            event(Event::Readable(slot as u32));
                        } else if result < 0 && result != -libc::ECANCELED {
                            event(Event::RecvFailed);
                        }
                        continue;
                    }
                    let Some(bid) = cqueue::buffer_select(cqe.flags()) else {
                        if result < 0 && result != -libc::ENOBUFS && result != -libc::ECANCELED {
                            event(Event::RecvFailed);
                        }
                        continue;
                    };
                    let Some(mut buf) = self.udp_bufs.take(bid) else { continue };
                    if result < 0 {
                        done.push(buf);
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
                            event(Event::Received(Datagram { addr, buf }));
                        }
                        _ => {
                            done.push(buf);
                            event(Event::Truncated);
                        }
                    }
                }
                UDP_SEND => {
                    let Some(s) = self.sends.get_mut(slot) else { continue };
                    let datagrams = s.bufs.len();
                    let socket = s.socket;
                    done.append(&mut s.bufs);
                    self.sends_free.push(slot);
                    event(Event::Sent { socket, datagrams, result });
                }
                WAKE => {
                    if !more {
                        self.wake_armed = false;
                    }
                    event(Event::Woken);
                }
                _ => {}
            }
        }
    }
}

impl Drop for Ring {
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
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut done = Vec::new();
            while self.outstanding() > 0 && Instant::now() < deadline {
                let ts = Timespec::from(Duration::from_millis(50));
                let args = SubmitArgs::new().timespec(&ts);
                if let Err(e) = self.ring.submitter().submit_with_args(1, &args)
                    && !matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY))
                {
                    break;
                }
                self.reap(&mut done, drop);
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
            // SAFETY: msghdr is plain data, for which all zeros (null pointers, zero lengths)
            // is a valid value.
            let blank = Box::new(unsafe { zeroed::<libc::msghdr>() });
            std::mem::forget(std::mem::replace(&mut self.recv_msghdr, blank));
            DROPS_LEAKED.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.ring.submitter().unregister_files();
    }
}
