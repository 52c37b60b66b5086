//! The io_uring backend: safe code over the ring's owner ([`crate::sys::ring`]).
//!
//! * UDP: one multishot `recvmsg` per socket (the shared one and each peer's) over a provided
//!   buffer ring of pooled [`PacketBuf`]s: the engine gets the very memory the kernel wrote.
//!   With UDP GRO on, a receive may bring a run of datagrams, which must land one to a buffer
//!   (a buffer ring gives a receive one buffer): then each socket has a multishot poll
//!   instead, and the worker's turn receives with `recvmmsg`, each receive scattered over a
//!   pooled buffer per datagram ([`crate::gro::ScatterSlot`]), up to a turn's worth.
//! * TUN: one multishot read over a second buffer ring; writes queued as SQEs, submitted in
//!   the turn that made them.
//! * Sends: one `sendmsg` SQE per group of datagrams, with `UDP_SEGMENT` (GSO) for runs of
//!   equal datagrams to one address.
//! * Everything queued during a turn goes to the kernel with the next [`wait`]: one
//!   `io_uring_enter` per turn submits the writes, the sends and the re-armed reads, and waits.
//! * Readiness mode ([`readiness`]): once the link has been quiet for a while
//!   ([`UringIo::set_idle_after`]), the multishot requests are cancelled and the backend uses
//!   the plain calls the `mmsg` backend is made of ([`crate::calls`]): it sleeps in
//!   `epoll_wait` and moves packets with `read`/`write` and `recvmmsg`/`sendmmsg`. A packet
//!   now and then, after the caches went cold, gets through those faster than through the
//!   ring: idle ping RTT measured 20-35 µs lower (benches/RESULTS.md). A full batch, or input
//!   wake after wake, brings the ring back.
//!
//! Ownership: the ring's owner holds every buffer and kernel structure a request may touch
//! until its completion; dropping the backend drops the owner first, which waits for every
//! request to end (or leaks what the kernel may still use). Peer sockets taken off the list
//! stay open (`closing`) until their receive has ended.
//!
//! [`wait`]: crate::PacketIo::wait

mod readiness;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use sitelink_frame::{BufPool, Datagram, PacketBuf};

use crate::backend::BackendKind;
use crate::backend::{PacketIo, no_packet_side};
use crate::calls::group_for_gso;
use crate::peers::{PeerSocket, PeerSockets};
use crate::socket::UdpSocket;
use crate::stats::IoStats;
use crate::sys::SendGroup;
use crate::sys::ring::{Event, Ring, Socket};
use crate::tun::PacketFd;
use crate::vnet::{TunWrite, VnetSide};
use crate::waker::Waker;

pub use readiness::DEFAULT_IDLE_AFTER;
use readiness::{Quiet, READY_TUN, READY_UDP};

/// io_uring batched I/O. See the module documentation.
pub struct UringIo {
    // Field order matters for drop: the ring's owner goes first and waits for every request
    // to end, before the descriptors below close.
    ring: Ring,
    /// The TUN device (or pipe); the ring's registered file table refers to it.
    /// The TUN side; `None` when packets move in process ([`open_backend`](crate::open_backend)).
    packets: Option<PacketFd>,
    udp: UdpSocket,
    batch: usize,
    groups: Vec<SendGroup>,
    /// The datagrams of the send being queued.
    send_bufs: Vec<PacketBuf>,
    ready_packets: Vec<PacketBuf>,
    ready_datagrams: Vec<Datagram>,
    /// Buffers the kernel is done with, to go back to the pool at the next call that has it.
    done: Vec<PacketBuf>,
    waker: Waker,
    gso: bool,
    tun_read_error: Option<io::Error>,
    stats: IoStats,
    /// The peers' connected sockets; the ring names each by its id (the shared socket is 0).
    peers: PeerSockets,
    /// Sockets no longer wanted whose receive is being cancelled: each is closed once the ring
    /// says its receive has ended, so that no request in flight meets a reused descriptor.
    closing: Vec<PeerSocket>,
    /// Peer sockets let go before the ring was enabled: queued sends may name their
    /// descriptors, so they close only after the first submission has taken those in.
    close_after_first_submit: Vec<PeerSocket>,
    /// Peer sockets (ids) whose sends failed because the socket went stale.
    stale: Vec<u32>,
    /// The waker fired since the last `wait` returned.
    woken: bool,
    /// Readiness mode: its state and the plain calls it moves packets with.
    quiet: Quiet,
    /// The TUN side's header, coalescing and memory.
    vnet: VnetSide,
    /// TUN reads (header and packet or super-packet) waiting to be split, in the ring's
    /// own buffers.
    ready_reads: Vec<PacketBuf>,
    /// The sockets have UDP GRO on: the ring polls them, and receives go through the plain
    /// calls (`quiet.calls`), which scatter runs one datagram to a buffer.
    gro: bool,
}

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
        UringIo::with_packet_side(Some(packets), udp, batch)
    }

    /// A backend over `udp` alone: its worker moves packets in process, and
    /// [`read_packets`](PacketIo::read_packets) finds none.
    pub fn without_packets(udp: UdpSocket, batch: usize) -> io::Result<UringIo> {
        UringIo::with_packet_side(None, udp, batch)
    }

    fn with_packet_side(packets: Option<PacketFd>, mut udp: UdpSocket, batch: usize) -> io::Result<UringIo> {
        // Non-blocking: the ring reads it with a multishot read, which the kernel then serves
        // as packets arrive (on a blocking descriptor each read would park a kernel worker
        // thread, and every packet would cost a wake-up of one of them before ours); readiness
        // mode reads it with plain calls after epoll says it is readable.
        if let Some(p) = &packets {
            crate::sys::set_nonblocking(p.as_fd(), true)?;
        }
        let offloads = packets.as_ref().map(PacketFd::offloads).unwrap_or_default();
        let mut stats = IoStats::default();
        let gro = udp.enable_gro(&mut stats);
        let ring = Ring::new(batch, packets.as_ref().map(AsFd::as_fd), udp.as_fd(), offloads.vnet_hdr, gro)?;
        let gso = udp.supports_gso();
        let vnet = VnetSide::new(offloads, batch, &mut stats);
        let mut quiet = Quiet::new(batch);
        quiet.calls.set_gro(gro);
        Ok(UringIo {
            ring,
            packets,
            udp,
            batch,
            groups: Vec::with_capacity(batch),
            send_bufs: Vec::with_capacity(crate::sys::GSO_MAX_SEGMENTS),
            // Each ready list holds at most its provided ring's buffers.
            ready_packets: Vec::with_capacity(crate::sys::ring::provided_entries(batch)),
            ready_datagrams: Vec::with_capacity(crate::sys::ring::provided_entries(batch)),
            // (Sized for the most a reap returns: growing it later would allocate mid-traffic.)
            done: Vec::with_capacity(crate::sys::ring::most_done(batch)),
            waker: Waker::new()?,
            gso,
            tun_read_error: None,
            stats,
            peers: PeerSockets::new(),
            closing: Vec::new(),
            close_after_first_submit: Vec::new(),
            stale: Vec::with_capacity(crate::MAX_CONNECTED_PEERS),
            woken: false,
            quiet,
            gro,
            ready_reads: Vec::with_capacity(if vnet.vnet_hdr { 64 } else { 0 }),
            vnet,
        })
    }

    /// Sets how long the link must be quiet (no datagram received, no packet read) before the
    /// backend changes to readiness mode ([`DEFAULT_IDLE_AFTER`] unless set): the multishot
    /// requests are cancelled, the worker sleeps in `epoll_wait` and moves packets with
    /// `read`/`write` and `recvmmsg`/`sendmmsg`, which wake and run faster than the ring for a
    /// packet now and then. A full batch at once, or eight wakes with input in a row each
    /// within this time of the last, brings the ring back. `Duration::MAX`: never.
    pub fn set_idle_after(&mut self, quiet: Duration) {
        self.quiet.idle_after = quiet;
    }

    /// Re-arms the multishot receives, the multishot TUN read and the waker where they ended,
    /// lending fresh buffers for every one consumed; closes stale peer sockets.
    fn refill(&mut self, pool: &mut BufPool) -> io::Result<()> {
        if self.quiet.active {
            // Readiness mode: nothing but the waker is armed, nothing consumes the buffer
            // rings; what is left to do waits for the ring's return (and the turn touches no
            // more memory than it needs: it runs after a sleep, with cold caches).
            return self.ring.arm_wake(self.waker.0.as_fd());
        }
        while let Some(id) = self.stale.pop() {
            if let Some(i) = self.peers.list.iter().position(|p| p.id == id) {
                let p = self.peers.list.swap_remove(i);
                self.closing.push(p);
                self.close_from(self.closing.len() - 1)?;
                self.stats.peer_sockets_stale += 1;
            }
        }
        self.ring.refill(pool)?;
        self.ring.arm_recv(Socket::Shared)?;
        for p in &self.peers.list {
            self.ring.arm_recv(Socket::Peer(p.id, p.sock.as_fd()))?;
        }
        if self.packets.is_some() && self.tun_read_error.is_none() {
            self.ring.arm_tun_read()?;
        }
        self.ring.arm_wake(self.waker.0.as_fd())
    }

    /// Reaps every completion: input to the ready lists, counters, stale sockets, and the
    /// buffers the kernel is done with to `done`.
    fn reap(&mut self) {
        let UringIo {
            ring,
            ready_packets,
            ready_reads,
            vnet,
            ready_datagrams,
            done,
            stats,
            stale,
            woken,
            gso,
            tun_read_error,
            quiet,
            closing,
            waker,
            peers,
            ..
        } = self;
        ring.reap(done, |event| match event {
            Event::Packet(buf) if vnet.vnet_hdr => {
                // Split in the worker's turn, into its pool's buffers.
                quiet.input_seen = true;
                ready_reads.push(buf);
            }
            Event::Packet(buf) => {
                stats.tun_rx += 1;
                stats.tun_rx_bytes += buf.data().len() as u64;
                quiet.input_seen = true;
                ready_packets.push(buf);
            }
            Event::ReadFailed(errno) => {
                stats.tun_read_errors += 1;
                *tun_read_error = Some(io::Error::from_raw_os_error(errno));
            }
            Event::Written { result, packets } => {
                let write = TunWrite { count: packets, skip: 0, ok: true };
                let result =
                    if result < 0 { Err(io::Error::from_raw_os_error(-result)) } else { Ok(result as usize) };
                crate::vnet::after_write(&result, &write, stats, &mut vnet.coalesce);
            }
            Event::Readable(id) => {
                // Received in the worker's turn, scattered over its pool's buffers.
                quiet.input_seen = true;
                quiet.ready |= readiness::ready_bit(peers, id);
            }
            Event::Received(d) => {
                stats.udp_rx += 1;
                stats.udp_rx_bytes += d.buf.data().len() as u64;
                quiet.input_seen = true;
                ready_datagrams.push(d);
            }
            Event::Truncated => stats.udp_truncated += 1,
            Event::RecvFailed => stats.udp_recv_errors += 1,
            Event::Sent { socket, datagrams, result } => {
                if result < 0 {
                    if result == -libc::EIO && *gso {
                        tracing::warn!("UDP GSO refused by the kernel (EIO); sending datagrams one by one");
                        *gso = false;
                        stats.gso_send_refused += 1;
                    }
                    stats.udp_send_errors += datagrams as u64;
                    if socket != 0 && crate::peers::is_stale(-result) && !stale.contains(&socket) {
                        // Closed at the next refill; the shared socket serves the peer.
                        stale.push(socket);
                    }
                } else {
                    stats.udp_tx += datagrams as u64;
                }
            }
            Event::Woken => {
                waker.drain();
                *woken = true;
            }
        });
        // A closed peer's receive has ended: its socket may go now.
        closing.retain(|p| ring.recv_armed(p.id));
    }

    fn recycle_done(&mut self, pool: &mut BufPool) {
        for buf in self.done.drain(..) {
            pool.put(buf);
        }
    }

    /// Submits what is queued and reaps, until the ring has room for another send.
    fn wait_for_send_slot(&mut self) -> io::Result<()> {
        while !self.ring.can_send() {
            self.ring.submit(1)?;
            self.reap();
        }
        Ok(())
    }

    /// Whether the worker has something to do: input ready, a wake-up, an error to report, or
    /// a request to re-arm or a socket to retire (both done in its turn).
    fn has_work(&mut self) -> bool {
        !self.ready_packets.is_empty()
            || !self.ready_reads.is_empty()
            || !self.ready_datagrams.is_empty()
            || self.quiet.calls.has_held()
            || self.quiet.ready != 0
            || std::mem::take(&mut self.woken)
            || self.tun_read_error.is_some()
            || !self.stale.is_empty()
            || self.unarmed()
    }

    /// Whether a request that should be in flight is not (and the next turn arms it).
    fn unarmed(&self) -> bool {
        !self.ring.wake_armed()
            || (!self.quiet.active
                && (!self.ring.recv_armed(0)
                    || (self.packets.is_some() && !self.ring.tun_read_armed())
                    || self.peers.list.iter().any(|p| !self.ring.recv_armed(p.id))))
    }

    /// Closes the peer sockets `closing[start..]`, just taken off the list. One whose receive
    /// is armed stays there until that receive, cancelled here, has ended; the others close
    /// now, once the requests already queued (sends may name them) have gone in.
    fn close_from(&mut self, start: usize) -> io::Result<()> {
        if self.ring.is_enabled() && self.closing[start..].iter().any(|p| !self.ring.recv_armed(p.id)) {
            self.ring.submit(0)?;
        }
        let mut i = start;
        while i < self.closing.len() {
            if self.ring.recv_armed(self.closing[i].id) {
                self.ring.cancel_recv(self.closing[i].id)?;
                i += 1;
            } else if !self.ring.is_enabled() {
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
}

impl PacketIo for UringIo {
    fn kind(&self) -> BackendKind {
        BackendKind::Uring
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if !self.ring.is_enabled() {
            self.ring.enable()?;
            if !self.close_after_first_submit.is_empty() {
                self.ring.submit(0)?;
                self.close_after_first_submit.clear();
            }
        }
        if self.quiet.active {
            return self.wait_idle(timeout);
        }
        // Until the receive, the reads and the waker are armed (the first turn, or after the
        // buffer ring ran dry), nothing may complete: go round once to arm them.
        if self.unarmed()
            || !self.ready_packets.is_empty()
            || !self.ready_reads.is_empty()
            || !self.ready_datagrams.is_empty()
            || self.quiet.calls.has_held()
            || self.quiet.ready != 0
        {
            self.ring.submit(0)?;
            self.reap();
            return Ok(());
        }
        let now = Instant::now();
        if std::mem::take(&mut self.quiet.input_seen) {
            self.quiet.last_input = now;
        }
        let deadline = timeout.map(|d| now + d);
        // Sleep no longer than until the link has been quiet for `idle_after`: from then on,
        // readiness mode.
        let (until, then_idle) = match (deadline, self.quiet.last_input.checked_add(self.quiet.idle_after)) {
            (Some(at), Some(quiet)) if at <= quiet => (at, false),
            (_, Some(quiet)) => (quiet, true),
            (Some(at), None) => (at, false),
            // No deadline, never idle: wake now and then for nothing, harmlessly.
            (None, None) => (now + Duration::from_secs(3600), false),
        };
        loop {
            // Sleep until something arrives, in this one call, instead of returning for the
            // bookkeeping of this turn's sends and entering again.
            let result = self.ring.submit_and_wait(until.saturating_duration_since(Instant::now()));
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
        // Sockets readiness mode, or with GRO the ring's polls, found readable: received,
        // and what is held handed out (a turn's worth, [`TURN_PACKETS`]).
        let start = out.len();
        let result = self.idle_recv_ready(pool, out);
        if out.len() == start && self.quiet.calls.has_held() {
            // No socket to receive on this turn: what is held still goes out.
            self.quiet.calls.cut_held(pool, out, &mut self.stats);
        }
        self.refill(pool)?;
        result
    }

    fn read_packets(&mut self, pool: &mut BufPool, out: &mut Vec<PacketBuf>) -> io::Result<()> {
        self.recycle_done(pool);
        out.append(&mut self.ready_packets);
        // Super-packets are split a turn's worth at a time, as runs are above; single packets
        // of other flows go first (`sparse_first`).
        let ring = &mut self.ring;
        crate::vnet::hand_out_reads(&mut self.ready_reads, pool, out, &mut self.stats, |raw| {
            ring.recycle_tun_buf(raw)
        });
        if let Some(e) = self.tun_read_error.take() {
            // Re-armed at the next turn, not now: a broken descriptor would fail again at once.
            return Err(e);
        }
        if self.quiet.ready & READY_TUN != 0 {
            self.quiet.ready &= !READY_TUN;
            // A full batch: more is waiting, the traffic is no longer sparse; the ring takes
            // over (the multishot read, armed below, reads the rest).
            if let Some(packets) = &self.packets
                && crate::calls::read_packet_batch(
                    packets,
                    self.batch,
                    pool,
                    out,
                    &mut self.stats,
                    &mut self.vnet,
                )?
            {
                self.quiet.active = false;
            }
        }
        self.refill(pool)
    }

    fn send_datagrams(&mut self, dgrams: &mut Vec<Datagram>, pool: &mut BufPool) -> io::Result<()> {
        self.recycle_done(pool);
        if self.quiet.active {
            self.idle_send(dgrams, pool);
            return Ok(());
        }
        let ipv6 = self.udp.is_ipv6();
        while !dgrams.is_empty() {
            let take = dgrams.len().min(self.batch);
            group_for_gso(&dgrams[..take], self.gso, &mut self.groups);
            // Groups are taken from the front; drain the batch's datagrams into sends.
            let mut drained = dgrams.drain(..take);
            for gi in 0..self.groups.len() {
                let g = self.groups[gi];
                self.wait_for_send_slot()?;
                self.send_bufs.clear();
                let mut to = None;
                for _ in g.start..g.end {
                    let d = drained.next().expect("groups cover the batch");
                    to.get_or_insert(d.addr);
                    self.send_bufs.push(d.buf);
                }
                let to = to.expect("a group holds a datagram");
                // A peer with a connected socket gets its datagrams through it, unaddressed.
                let socket = match self.peers.find(&to) {
                    Some(i) => Socket::Peer(self.peers.list[i].id, self.peers.list[i].sock.as_fd()),
                    None => Socket::Shared,
                };
                self.stats.send_calls += 1;
                if g.segment != 0 && self.gso && crate::faults::refused(crate::Fault::GsoSend) {
                    // A forced refusal: what the kernel's EIO completion does (see `reap`).
                    tracing::warn!("UDP GSO refused by the kernel (EIO); sending datagrams one by one");
                    self.gso = false;
                    self.stats.gso_send_refused += 1;
                    self.stats.udp_send_errors += self.send_bufs.len() as u64;
                    self.done.append(&mut self.send_bufs);
                    continue;
                }
                if let Err(e) = self.ring.send(socket, to, ipv6, &mut self.send_bufs, g.segment) {
                    self.done.append(&mut self.send_bufs);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.ring.is_enabled() && self.ring.has_queued() {
            self.ring.submit(0)?;
            self.reap();
        }
        Ok(())
    }

    fn write_packets(&mut self, packets: &mut Vec<PacketBuf>, pool: &mut BufPool) -> io::Result<()> {
        self.recycle_done(pool);
        if self.packets.is_none() {
            return no_packet_side(packets, pool);
        }
        if self.quiet.active {
            self.idle_write(packets, pool);
            return Ok(());
        }
        let mut wrote = false;
        if self.vnet.vnet_hdr {
            let udp = self.vnet.coalesce && self.vnet.uso;
            crate::vnet::plan_writes(packets, self.vnet.coalesce, udp, &mut self.vnet.plan);
        }
        let mut bufs = packets.drain(..);
        let mut next = 0;
        loop {
            let write = match self.vnet.plan.get(next) {
                Some(w) if self.vnet.vnet_hdr => *w,
                _ if self.vnet.vnet_hdr => break,
                _ => TunWrite { count: 1, skip: 0, ok: true },
            };
            next += 1;
            self.vnet.run.clear();
            self.vnet.run.extend(bufs.by_ref().take(write.count));
            if self.vnet.run.is_empty() {
                break;
            }
            if !write.ok || (write.count > 1 && crate::faults::refused(crate::Fault::GroWrite)) {
                // No header (dropped), or a forced refusal: counted as the kernel's would be.
                let result = Err(io::Error::from_raw_os_error(libc::EINVAL));
                let counted = TunWrite { count: self.vnet.run.len(), ..write };
                if write.ok {
                    crate::vnet::after_write(&result, &counted, &mut self.stats, &mut self.vnet.coalesce);
                } else {
                    self.stats.tun_write_errors += counted.count as u64;
                }
                self.vnet.run.drain(..).for_each(|b| pool.put(b));
                continue;
            }
            while !self.ring.can_write() {
                self.ring.submit(1)?;
                self.reap();
                for b in self.done.drain(..) {
                    pool.put(b);
                }
            }
            let queued = if write.count == 1 {
                let buf = self.vnet.run.pop().expect("one packet");
                self.ring.write_tun(buf).map_err(|(e, buf)| {
                    pool.put(buf);
                    e
                })
            } else {
                let r = self.ring.write_tun_gathered(&mut self.vnet.run, write.skip);
                self.vnet.run.drain(..).for_each(|b| pool.put(b));
                r
            };
            queued?;
            wrote = true;
        }
        drop(bufs);
        if wrote || self.ring.has_queued() {
            // The packets go to the TUN side now, not at the end of the turn: whoever waits
            // for them (a ping) gets them a turn's work sooner, and what the kernel answers at
            // once (the ping's reply, on the far side) has been read by the time this returns
            // (the enter runs the multishot read's deferred work), so the same turn sends it.
            self.ring.submit(0)?;
            self.reap();
        }
        Ok(())
    }

    fn replace_socket(&mut self, mut udp: UdpSocket, _pool: &mut BufPool) -> io::Result<()> {
        // The peers' sockets move to the new port too.
        let (addrs, n) = self.peers.addrs();
        self.connect_peers(&[])?;
        while !self.closing.is_empty() {
            self.ring.submit(1)?;
            self.reap();
        }
        if self.ring.recv_armed(0) {
            self.ring.cancel_recv(0)?;
            // Wait for the multishot receive to end before its socket goes.
            while self.ring.recv_armed(0) {
                self.ring.submit(1)?;
                self.reap();
            }
        }
        if self.gro {
            // The ring polls the sockets and receives take runs: the new socket may have GRO
            // (or, refused, not).
            udp.enable_gro(&mut self.stats);
        }
        self.ring.replace_udp(udp.as_fd())?;
        self.quiet.ready &= !READY_UDP;
        self.quiet.readiness.reset();
        self.gso = udp.supports_gso();
        self.udp = udp;
        self.connect_peers(&addrs[..n])
    }

    fn connect_peers(&mut self, peers: &[SocketAddr]) -> io::Result<()> {
        // The list's indices change: readiness found for peer sockets is looked for again.
        self.quiet.ready &= READY_UDP | READY_TUN;
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
        self.peers.set_fwmark(mark)
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }
}
