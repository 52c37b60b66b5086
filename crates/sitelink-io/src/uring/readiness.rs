//! The uring backend's readiness mode: when the link is quiet, the backend puts the ring aside
//! and moves the odd packet with the plain calls the `mmsg` backend is made of
//! ([`crate::calls`]): it sleeps in `epoll_wait`, reads and writes with `read`/`write`, and
//! receives and sends with `recvmmsg`/`sendmmsg`. Input wake after wake, or a full batch,
//! brings the ring back.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use sitelink_frame::{BufPool, Datagram, PacketBuf};

use super::UringIo;
use crate::calls::{MmsgCalls, POLL_OWN, Readiness, write_packet_batch};
use crate::peers::{MAX_CONNECTED_PEERS, PeerSockets};
use crate::vnet::TURN_PACKETS;

/// How long the link must have been quiet before the backend sleeps in readiness mode.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_millis(1);

/// Readiness mode's wakes with input, each within the quiet time of the one before, after
/// which the ring takes over again. (A request and its answer are two such wakes; a sustained
/// flow makes many.)
const BUSY_WAKES: u32 = 8;

/// Bits of [`Quiet::ready`]: the shared socket, the packet side, then peer socket `i` at
/// `PEER_BIT0 + i`.
pub(super) const READY_UDP: u64 = 1;
pub(super) const READY_TUN: u64 = 2;
const PEER_BIT0: usize = 2;
const _: () = assert!(PEER_BIT0 + MAX_CONNECTED_PEERS <= 64, "readiness bits fit a u64");

/// The readiness bit of the socket with ring id `id` (0: the shared socket; else a peer's, by
/// its place in `peers`); 0 for a socket no longer listed.
pub(super) fn ready_bit(peers: &PeerSockets, id: u32) -> u64 {
    if id == 0 {
        return READY_UDP;
    }
    peers.list.iter().position(|p| p.id == id).map_or(0, |i| 1 << (PEER_BIT0 + i))
}

/// The readiness mode's state, and the plain calls it moves packets with.
pub(super) struct Quiet {
    /// In readiness mode now: the multishot requests are cancelled, `wait` sleeps in
    /// `epoll_wait`, input is read with plain system calls.
    pub(super) active: bool,
    /// How long the link must be quiet before the mode starts.
    pub(super) idle_after: Duration,
    /// What `epoll_wait` found readable and has not been read yet (bits `READY_*`).
    pub(super) ready: u64,
    /// When input last arrived (in readiness mode: when the last wake with input came).
    pub(super) last_input: Instant,
    /// A completion since the last `wait` brought input (for `last_input`).
    pub(super) input_seen: bool,
    /// Wakes with input in a row that came within `idle_after` of the one before.
    close_wakes: u32,
    /// `recvmmsg` and `sendmmsg` state.
    pub(super) calls: MmsgCalls,
    /// The epoll set.
    pub(super) readiness: Readiness,
}

impl Quiet {
    pub(super) fn new(batch: usize) -> Quiet {
        Quiet {
            active: false,
            idle_after: DEFAULT_IDLE_AFTER,
            ready: 0,
            last_input: Instant::now(),
            input_seen: false,
            close_wakes: 0,
            calls: MmsgCalls::new(batch),
            readiness: Readiness::new(),
        }
    }
}

impl UringIo {
    /// Readiness mode from now on: cancels the multishot receives and the multishot read and
    /// waits for their last completions (what they read before that is kept for the worker).
    pub(super) fn enter_idle(&mut self) -> io::Result<()> {
        self.quiet.active = true;
        self.stats.idle_entries += 1;
        if self.ring.tun_read_armed() {
            self.ring.cancel_tun_read()?;
        }
        if self.ring.recv_armed(0) {
            self.ring.cancel_recv(0)?;
        }
        for i in 0..self.peers.list.len() {
            if self.ring.recv_armed(self.peers.list[i].id) {
                self.ring.cancel_recv(self.peers.list[i].id)?;
            }
        }
        while self.ring.tun_read_armed()
            || self.ring.recv_armed(0)
            || self.peers.list.iter().any(|p| self.ring.recv_armed(p.id))
        {
            self.ring.submit(1)?;
            self.reap();
        }
        Ok(())
    }

    /// Readiness mode's wait: submits what the turn queued, then sleeps in `epoll_wait` on the
    /// descriptors until one is readable, the waker fires or `timeout` passes. Wakes with
    /// input coming one after another (each within `idle_after` of the last, `BUSY_WAKES` in a
    /// row) bring the ring back.
    pub(super) fn wait_idle(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // Only a request left over from the ring (a send that found its socket's buffer full,
        // a socket being closed) may have completions to run and reap; otherwise the ring's
        // memory is not touched. (The waker's multishot poll stays armed; its completions run
        // when the ring is back; the epoll set watches the eventfd itself.)
        let leftover =
            self.ring.has_queued() || self.ring.transfers_in_flight() > 0 || !self.closing.is_empty();
        if leftover {
            self.ring.submit(0)?;
            self.reap();
        }
        if self.has_work() {
            return Ok(());
        }
        let ready =
            self.quiet.readiness.wait(&self.udp, self.packets.as_ref(), &self.waker, &self.peers, timeout)?;
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
        let quiet = &mut self.quiet;
        if bits != 0 {
            let now = Instant::now();
            if now.saturating_duration_since(quiet.last_input) < quiet.idle_after {
                quiet.close_wakes += 1;
            } else {
                quiet.close_wakes = 0;
            }
            if quiet.close_wakes >= BUSY_WAKES {
                // Input wake after wake: the link is busy, the ring takes over. (What
                // `epoll_wait` found is still read the plain way first, in this turn.)
                quiet.active = false;
                quiet.close_wakes = 0;
            }
            quiet.last_input = now;
        }
        quiet.ready |= bits;
        Ok(())
    }

    /// Receives, the plain way, on every socket `epoll_wait` (or, with GRO, the ring's poll)
    /// found readable. A full batch means more is waiting: the ring takes over.
    pub(super) fn idle_recv_ready(&mut self, pool: &mut BufPool, out: &mut Vec<Datagram>) -> io::Result<()> {
        let mut result = Ok(());
        if self.quiet.ready & READY_UDP != 0 {
            self.quiet.ready &= !READY_UDP;
            result = self.idle_recv(None, pool, out);
        }
        for i in 0..self.peers.list.len() {
            let bit = 1 << (PEER_BIT0 + i);
            if self.quiet.ready & bit != 0 {
                self.quiet.ready &= !bit;
                let r = self.idle_recv(Some(i), pool, out);
                if result.is_ok() {
                    result = r;
                }
            }
        }
        result
    }

    /// Receives on the shared socket (`None`) or peer socket `i`. More waiting brings the
    /// ring back; with GRO (the ring polls the sockets, and a poll reports new input, not
    /// input left over) the socket also stays marked readable, for the next turn.
    fn idle_recv(
        &mut self,
        peer: Option<usize>,
        pool: &mut BufPool,
        out: &mut Vec<Datagram>,
    ) -> io::Result<()> {
        let fd = match peer {
            None => self.udp.as_fd(),
            Some(i) => self.peers.list[i].sock.as_fd(),
        };
        let start = out.len();
        let (mut more, mut result) = self.quiet.calls.recv(fd, pool, out, &mut self.stats);
        // With GRO in ring mode, each call brings a few receives: runs, or single datagrams
        // from a peer that sends them one by one. Up to a turn's worth in one go.
        while self.gro && !self.quiet.active && more && result.is_ok() && out.len() - start < TURN_PACKETS {
            (more, result) = self.quiet.calls.recv(fd, pool, out, &mut self.stats);
        }
        if more && result.is_ok() {
            self.quiet.active = false;
            if self.gro {
                self.quiet.ready |= match peer {
                    None => READY_UDP,
                    Some(i) => 1 << (PEER_BIT0 + i),
                };
            }
        }
        result
    }

    /// A few datagrams now and then: a direct `sendmmsg` wakes the kernel's cold paths faster
    /// than a submission does.
    pub(super) fn idle_send(&mut self, dgrams: &mut Vec<Datagram>, pool: &mut BufPool) {
        let peers = self.peers.list.len();
        self.quiet.calls.send(&self.udp, &mut self.peers, &mut self.gso, &mut self.stats, dgrams, pool);
        if self.peers.list.len() != peers {
            // A stale peer socket was dropped (none is armed in this mode): the indices of
            // readiness found changed.
            self.quiet.ready &= READY_UDP | READY_TUN;
            self.stats.peer_sockets = self.peers.list.len() as u64;
        }
    }

    /// Writes the plain way; as the ring does, what the kernel answers at once is read this
    /// turn.
    pub(super) fn idle_write(&mut self, packets: &mut Vec<PacketBuf>, pool: &mut BufPool) {
        let Some(fd) = &self.packets else {
            // (write_packets answered already: no packet side.)
            packets.drain(..).for_each(|b| pool.put(b));
            return;
        };
        if !packets.is_empty() {
            self.quiet.ready |= READY_TUN;
        }
        write_packet_batch(fd, packets, pool, &mut self.stats, &mut self.vnet);
    }
}
