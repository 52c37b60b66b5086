//! UDP GRO on receive: with `UDP_GRO` set on a socket, the kernel may hand over a run of
//! datagrams from one sender, all of one size but the last, in one receive, with the size in
//! a control message. The receive is scattered over pooled buffers, one iovec a datagram
//! ([`ScatterSlot`]), so that each datagram lands in a buffer of its own and the engine sees
//! one buffer per datagram without a copy; only a run whose size differs from the guess is
//! copied apart.

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use sitelink_frame::{BufPool, Datagram, PacketBuf};

use crate::SMALL_PACKET;
use crate::aqm::Codel;
use crate::sys::MsgBatch;

use crate::stats::IoStats;

/// `UDP_GRO` (`linux/udp.h`): the socket option, and the control message's type.
pub(crate) const UDP_GRO: libc::c_int = 104;

/// The most one receive with GRO returns: a whole UDP datagram's worth.
pub(crate) const GRO_READ_MAX: usize = 65_535;

/// What a receive's control messages tell: the `UDP_GRO` segment size and the arrival stamp.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Control {
    /// The segment size of a run (0: one datagram).
    pub(crate) segment: u16,
    /// When the kernel took the datagram in (`SCM_TIMESTAMPNS`: ns of the realtime clock).
    pub(crate) stamp: Option<u64>,
}

impl Control {
    /// Reads `control` (the raw bytes the kernel wrote: `cmsghdr`s, each followed by its
    /// data), stopping at a header that does not fit.
    pub(crate) fn parse(control: &[u8]) -> Control {
        const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
        const ALIGN: usize = std::mem::size_of::<usize>();
        let mut found = Control::default();
        let mut at = 0;
        while at + HDR <= control.len() {
            let c = &control[at..];
            let len = usize::from_ne_bytes(c[..ALIGN].try_into().expect("a usize"));
            let level = libc::c_int::from_ne_bytes(c[ALIGN..ALIGN + 4].try_into().expect("an int"));
            let kind = libc::c_int::from_ne_bytes(c[ALIGN + 4..ALIGN + 8].try_into().expect("an int"));
            if len < HDR || at + len > control.len() {
                break;
            }
            let data = &c[HDR..len];
            if level == libc::SOL_UDP && kind == UDP_GRO && data.len() >= 4 {
                let size = libc::c_int::from_ne_bytes(data[..4].try_into().expect("an int"));
                found.segment = u16::try_from(size).unwrap_or(0);
            }
            if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS && data.len() >= 16 {
                let sec = i64::from_ne_bytes(data[..8].try_into().expect("8 bytes"));
                let nsec = i64::from_ne_bytes(data[8..16].try_into().expect("8 bytes"));
                found.stamp = u64::try_from(sec)
                    .ok()
                    .zip(u64::try_from(nsec).ok())
                    .map(|(s, n)| s.saturating_mul(1_000_000_000).saturating_add(n));
            }
            at += len.next_multiple_of(ALIGN);
        }
        found
    }
}

/// The most datagrams the kernel merges into one receive (`UDP_GRO_CNT_MAX`).
pub(crate) const GRO_MAX_SEGMENTS: usize = 64;

/// Which of the held receives `held` (each one's length and segment size, in arrival order)
/// go out first: the small ones, a lone datagram or a run of datagrams of at most
/// [`SMALL_PACKET`] bytes (a ping's, an acknowledgement's, a keepalive's, a cookie reply's),
/// in their order, ahead of the bulk ones, which keep theirs. What a bulk transfer's runs
/// hold back is then a turn's wait for a ping or an acknowledgement at most. The flows
/// inside are sealed, so this is a guess at them; it never reorders small datagrams among
/// themselves (a small flow's packets may come lone or in a run: a sender batches datagrams
/// by size and peer, not by flow). A flow that mixes sizes may see a small
/// datagram overtake its own larger ones, each size keeping its order (the workers test
/// checks exactly that): for a bulk TCP flow that is the odd short segment ending a burst,
/// which TCP takes as reordering, not loss; a flow of one size is never reordered. Marks
/// them in `ahead`.
pub(crate) fn small_first(held: impl IntoIterator<Item = (usize, u16)>, ahead: &mut [bool]) {
    for ((len, segment), ahead) in held.into_iter().zip(ahead.iter_mut()) {
        let lone = segment == 0 || len <= usize::from(segment);
        *ahead = if lone { len <= SMALL_PACKET } else { usize::from(segment) <= SMALL_PACKET };
    }
}

/// One receive with UDP GRO, laid out so that a run of datagrams lands one to a buffer: the
/// kernel fills the iovecs in order, so with every iovec exactly one datagram long (`piece`
/// bytes of a pooled buffer each) datagram `i` of the run is buffer `i`, whole, and the
/// engine gets the very memory the kernel wrote. The piece size is a guess (the size of the
/// last run), right for every run of a steady flow; a run of another size lands across the
/// pieces and the overflow buffer behind them, and is copied out datagram by datagram.
pub(crate) struct ScatterSlot {
    /// Pooled buffers, each lending `piece` bytes of its spare room to the receive.
    pub(crate) bufs: Vec<PacketBuf>,
    /// Where the bytes land that the pieces do not hold ([`GRO_READ_MAX`] bytes).
    pub(crate) overflow: PacketBuf,
    /// The size of each piece.
    pub(crate) piece: usize,
    /// How many of `bufs` the receive uses.
    pub(crate) pieces: usize,
    /// After the receive: bytes received, the source, whether the kernel cut the datagram
    /// short, and the `UDP_GRO` segment size (0: one datagram).
    pub(crate) len: usize,
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) truncated: bool,
    pub(crate) segment: u16,
    /// When the kernel took the receive in (ns of the realtime clock), if it said.
    pub(crate) stamp: Option<u64>,
}

impl ScatterSlot {
    pub(crate) fn new() -> ScatterSlot {
        ScatterSlot {
            bufs: Vec::with_capacity(GRO_MAX_SEGMENTS),
            overflow: PacketBuf::new(GRO_READ_MAX, 0),
            piece: 0,
            pieces: 0,
            len: 0,
            addr: None,
            truncated: false,
            segment: 0,
            stamp: None,
        }
    }

    /// Lays the slot out for a receive in pieces of `piece` bytes (at most what a buffer of
    /// `pool` has room for), taking buffers from `pool` for the pieces that lack one.
    pub(crate) fn prepare(&mut self, piece: usize, pool: &mut BufPool) {
        let room = pool.buf_capacity() - pool.buf_headroom();
        self.piece = piece.clamp(1, room.max(1));
        self.pieces = GRO_READ_MAX.div_ceil(self.piece).min(GRO_MAX_SEGMENTS);
        while self.bufs.len() < self.pieces {
            self.bufs.push(pool.get());
        }
        for buf in &mut self.bufs[..self.pieces] {
            if buf.spare_mut().len() < self.piece {
                *buf = pool.get(); // (from another pool: every piece must be whole)
            }
        }
        self.len = 0;
        self.addr = None;
        self.truncated = false;
        self.segment = 0;
        self.stamp = None;
    }

    /// How many datagrams the receive brought.
    pub(crate) fn datagrams(&self) -> usize {
        match usize::from(self.segment) {
            0 => 1,
            s => self.len.div_ceil(s).max(1),
        }
    }

    /// Whether each datagram of the receive is whole in a buffer of its own: one datagram that
    /// fit the first piece, or a run whose segment size is the piece size.
    fn landed_in_place(&self) -> bool {
        let one = self.datagrams() == 1;
        self.len <= self.piece * self.pieces
            && ((one && self.len <= self.piece) || usize::from(self.segment) == self.piece)
    }

    /// Moves the receive's datagrams to `out`: the buffers they landed in, replaced from
    /// `pool`; or, where they did not land one to a buffer, copies in buffers from `pool`.
    /// Bulk datagrams (larger than [`SMALL_PACKET`]) that `queue` says waited too long by
    /// `now` (ns of the realtime clock), with more input waiting behind them (`backlog`), are
    /// dropped instead, and counted.
    pub(crate) fn take(
        &mut self,
        pool: &mut BufPool,
        out: &mut Vec<Datagram>,
        stats: &mut IoStats,
        queue: &mut Codel,
        now: u64,
        backlog: bool,
    ) {
        let addr = match (self.addr, self.truncated) {
            (Some(addr), false) => addr,
            _ => {
                stats.udp_truncated += 1;
                return;
            }
        };
        let count = self.datagrams();
        if count > 1 {
            stats.udp_gro_reads += 1;
        }
        let size = match usize::from(self.segment) {
            0 => self.len.max(1),
            s => s,
        };
        let waited = self.stamp.map(|stamp| crate::aqm::sojourn(stamp, now));
        let mut too_late = |len: usize| {
            let drop = len > SMALL_PACKET && waited.is_some_and(|w| queue.drop(w, now, backlog));
            stats.udp_queue_drops += u64::from(drop);
            drop
        };
        if self.landed_in_place() {
            for i in 0..count {
                let len = (self.len - i * size).min(size);
                if too_late(len) {
                    continue; // (the buffer stays, for the next receive)
                }
                let mut buf = std::mem::replace(&mut self.bufs[i], pool.get());
                buf.set_len(len).expect("the kernel wrote within the piece");
                stats.udp_rx += 1;
                stats.udp_rx_bytes += len as u64;
                out.push(Datagram { addr, buf });
            }
            return;
        }
        for i in 0..count {
            let from = i * size;
            let to = (from + size).min(self.len);
            if too_late(to - from) {
                continue;
            }
            stats.udp_gro_copied += 1;
            let mut buf = pool.get();
            match buf.set_len(to - from) {
                Ok(()) => {
                    self.gather(from, buf.data_mut());
                    stats.udp_rx += 1;
                    stats.udp_rx_bytes += (to - from) as u64;
                    out.push(Datagram { addr, buf });
                }
                Err(_) => {
                    stats.udp_truncated += 1;
                    pool.put(buf);
                }
            }
        }
    }

    /// Copies the received bytes from `from` on into `dst` (as many as it holds), across the
    /// pieces and the overflow.
    fn gather(&mut self, mut from: usize, mut dst: &mut [u8]) {
        let in_pieces = self.piece * self.pieces;
        while !dst.is_empty() {
            let src = if from < in_pieces {
                let (i, at) = (from / self.piece, from % self.piece);
                &self.bufs[i].spare_mut()[at..self.piece]
            } else {
                &self.overflow.spare_mut()[from - in_pieces..]
            };
            let n = src.len().min(dst.len());
            dst[..n].copy_from_slice(&src[..n]);
            dst = &mut dst[n..];
            from += n;
        }
    }
}

/// Receives one `recvmmsg` makes with UDP GRO on (runs of up to 64 datagrams each).
pub(crate) const RECV_SLOTS: usize = 8;

/// Receives held at most: two calls' worth. A call receives whenever a call's worth of slots
/// is free, before handing anything out, so that a small datagram that arrived behind held
/// runs is seen a call later at most, and goes first ([`small_first`]).
pub(crate) const HELD_SLOTS: usize = 2 * RECV_SLOTS;

/// The receive side of a backend with UDP GRO on: receives scattered one datagram to a
/// buffer ([`ScatterSlot`]), held and handed out a turn's worth
/// ([`TURN_PACKETS`](crate::vnet::TURN_PACKETS)) at a time, small datagrams first
/// ([`small_first`]), with the queue's delay kept short ([`Codel`]).
pub(crate) struct GroReceiver {
    /// `slots[..held]` hold receives not handed out yet, in arrival order; the rest are free.
    slots: Vec<ScatterSlot>,
    held: usize,
    /// The piece size receives are laid out for: the segment size of the last run (0 until
    /// one came: then pieces as large as a buffer takes).
    piece: usize,
    /// The last `recvmmsg` filled every slot it was given: the socket may hold more.
    full: bool,
    /// Receives the next `recvmmsg` asks for (2 to [`RECV_SLOTS`]).
    want: usize,
    /// The receive queue's delay, kept short.
    queue: Codel,
}

impl GroReceiver {
    pub(crate) fn new() -> GroReceiver {
        GroReceiver {
            slots: (0..HELD_SLOTS).map(|_| ScatterSlot::new()).collect(),
            held: 0,
            piece: 0,
            full: false,
            want: RECV_SLOTS,
            queue: Codel::default(),
        }
    }

    /// Whether receives are held, not handed out yet.
    pub(crate) fn has_held(&self) -> bool {
        self.held > 0
    }

    /// Receives on `sock` (with `msgs`) if a call's worth of slots is free, then hands out a
    /// turn's worth of what is held to `out`. Returns whether more may be waiting (held, or
    /// left in the socket by a full call), and the error to report.
    pub(crate) fn recv(
        &mut self,
        msgs: &mut MsgBatch,
        sock: BorrowedFd<'_>,
        pool: &mut BufPool,
        out: &mut Vec<Datagram>,
        stats: &mut IoStats,
    ) -> (bool, io::Result<()>) {
        let start = out.len();
        let mut result = Ok(());
        if self.held + RECV_SLOTS <= HELD_SLOTS {
            // As many receives as the last call brought, doubled, and at least two (on an idle
            // link the kernel would set up every message's iovecs for one datagram; and a call
            // that fills all it asked for says more may wait, which one datagram should not).
            let want = self.want;
            let free = &mut self.slots[self.held..self.held + want];
            let piece = if self.piece == 0 { usize::MAX } else { self.piece };
            for slot in free.iter_mut() {
                slot.prepare(piece, pool);
            }
            match msgs.recv_scattered(sock, free) {
                Ok(got) => {
                    // The next receives are laid out for the size of the last run.
                    if let Some(run) = free[..got].iter().rev().find(|s| s.datagrams() > 1) {
                        self.piece = usize::from(run.segment);
                    }
                    self.full = got == free.len();
                    self.held += got;
                    self.want = (2 * got).clamp(2, RECV_SLOTS);
                }
                Err(e) => {
                    let (more, r) = crate::calls::recv_failed(e, stats);
                    self.full = more;
                    self.want = 2;
                    result = r;
                }
            }
        }
        let held = self.hand_out(start, pool, out, stats);
        (held || self.full, result)
    }

    /// Hands out held receives until `out` has grown by a turn's worth since `start`, small
    /// ones first ([`small_first`]); returns whether some are still held.
    pub(crate) fn hand_out(
        &mut self,
        start: usize,
        pool: &mut BufPool,
        out: &mut Vec<Datagram>,
        stats: &mut IoStats,
    ) -> bool {
        if self.held == 0 {
            return false;
        }
        let now = crate::sys::realtime_ns();
        let mut ahead = [false; HELD_SLOTS];
        small_first(self.slots[..self.held].iter().map(|s| (s.len, s.segment)), &mut ahead);
        // Taken out of the held ones keeping their order, a turn's worth; input waits behind a
        // receive if a later one is held, or the socket had more than the last call took.
        let mut i = 0;
        for ahead in &ahead[..self.held] {
            if *ahead && out.len() - start < crate::vnet::TURN_PACKETS {
                self.take(i, pool, out, stats, now);
            } else {
                i += 1;
            }
        }
        while self.held > 0 && out.len() - start < crate::vnet::TURN_PACKETS {
            self.take(0, pool, out, stats, now);
        }
        self.held > 0
    }

    /// Hands out held receive `i` and frees its slot.
    fn take(&mut self, i: usize, pool: &mut BufPool, out: &mut Vec<Datagram>, stats: &mut IoStats, now: u64) {
        let backlog = i + 1 < self.held || self.full;
        self.slots[i].take(pool, out, stats, &mut self.queue, now, backlog);
        self.slots[i..self.held].rotate_left(1);
        self.held -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: libc::c_int, kind: libc::c_int, data: &[u8]) -> Vec<u8> {
        let len = std::mem::size_of::<libc::cmsghdr>() + data.len();
        let mut c = Vec::new();
        c.extend_from_slice(&len.to_ne_bytes());
        c.extend_from_slice(&level.to_ne_bytes());
        c.extend_from_slice(&kind.to_ne_bytes());
        c.extend_from_slice(data);
        c.resize(len.next_multiple_of(8), 0);
        c
    }

    #[test]
    fn finds_the_segment_size_and_stamp_among_control_messages() {
        let gro = cmsg(libc::SOL_UDP, UDP_GRO, &1452i32.to_ne_bytes());
        let stamp =
            cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &[5i64.to_ne_bytes(), 7i64.to_ne_bytes()].concat());
        let mut control = cmsg(libc::SOL_IP, 8, &7i32.to_ne_bytes());
        control.extend(&gro);
        control.extend(&stamp);
        assert_eq!(Control::parse(&control), Control { segment: 1452, stamp: Some(5_000_000_007) });
        assert_eq!(Control::parse(&stamp).segment, 0);
        assert_eq!(Control::parse(&[]), Control::default());
        // A length that runs past the end is not followed.
        let mut bad = gro.clone();
        bad[0] = 200;
        assert_eq!(Control::parse(&bad), Control::default());
        assert_eq!(Control::parse(&gro[..10]), Control::default());
    }

    #[test]
    fn small_datagrams_and_runs_go_first() {
        let held = [(128, 0), (4000, 1000), (128, 0), (1400, 0), (96, 96), (500, 100), (300, 0)];
        let mut ahead = [false; 7];
        small_first(held, &mut ahead);
        assert_eq!(ahead, [true, false, true, false, true, true, false]);
    }

    /// What a scattered receive of `data` (a run of `segment`-byte datagrams) leaves in
    /// `slot`: the bytes laid out over the pieces and the overflow as the kernel fills iovecs.
    fn receive(slot: &mut ScatterSlot, data: &[u8], segment: u16) {
        let mut rest = data;
        for buf in &mut slot.bufs[..slot.pieces] {
            let n = rest.len().min(slot.piece);
            buf.spare_mut()[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        slot.overflow.spare_mut()[..rest.len()].copy_from_slice(rest);
        slot.len = data.len();
        slot.segment = segment;
        slot.addr = Some("192.0.2.1:51820".parse().unwrap());
        slot.truncated = false;
    }

    fn run(len: usize) -> Vec<u8> {
        (0..len as u32).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_run_of_the_expected_size_lands_one_datagram_to_a_buffer() {
        let mut pool = BufPool::for_mtu(1420, 256);
        let mut slot = ScatterSlot::new();
        slot.prepare(1452, &mut pool);
        assert_eq!((slot.piece, slot.pieces), (1452, 46));
        let data = run(1452 * 44 + 700);
        receive(&mut slot, &data, 1452);
        let first: Vec<*const u8> = slot.bufs[..45].iter().map(|b| b.data().as_ptr()).collect();
        let (mut out, mut stats) = (Vec::new(), IoStats::default());
        slot.take(&mut pool, &mut out, &mut stats, &mut Codel::default(), 0, false);
        assert_eq!(out.len(), 45);
        assert_eq!(out.iter().map(|d| d.buf.data().as_ptr()).collect::<Vec<_>>(), first, "the same buffers");
        assert_eq!(out.iter().flat_map(|d| d.buf.data().to_vec()).collect::<Vec<_>>(), data);
        assert_eq!(out[44].buf.len(), 700);
        assert_eq!((stats.udp_rx, stats.udp_gro_reads, stats.udp_gro_copied), (45, 1, 0));
        assert_eq!(stats.udp_rx_bytes, data.len() as u64);
        // Fresh buffers took their places.
        assert!(slot.bufs[..45].iter().all(|b| b.is_empty() && !first.contains(&b.data().as_ptr())));
    }

    #[test]
    fn one_datagram_lands_whole_in_the_first_piece() {
        let mut pool = BufPool::for_mtu(1420, 256);
        let mut slot = ScatterSlot::new();
        slot.prepare(96, &mut pool);
        let data = run(80);
        receive(&mut slot, &data, 0);
        let (mut out, mut stats) = (Vec::new(), IoStats::default());
        slot.take(&mut pool, &mut out, &mut stats, &mut Codel::default(), 0, false);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].buf.data(), &data[..]);
        assert_eq!((stats.udp_gro_reads, stats.udp_gro_copied), (0, 0));
    }

    #[test]
    fn a_run_of_another_size_is_copied_apart() {
        let mut pool = BufPool::for_mtu(1420, 256);
        for (piece, segment, len) in
            [(96, 1452, 1452 * 45), (1452, 96, 96 * 64), (1452, 1000, 1000 * 3 + 1), (96, 0, 1400)]
        {
            let mut slot = ScatterSlot::new();
            slot.prepare(piece, &mut pool);
            let data = run(len);
            receive(&mut slot, &data, segment);
            let (mut out, mut stats) = (Vec::new(), IoStats::default());
            slot.take(&mut pool, &mut out, &mut stats, &mut Codel::default(), 0, false);
            let size = if segment == 0 { len } else { usize::from(segment) };
            assert_eq!(out.len(), len.div_ceil(size), "{piece} {segment}");
            assert!(out.iter().all(|d| d.buf.len() == size || d.buf.len() == len % size));
            assert_eq!(out.iter().flat_map(|d| d.buf.data().to_vec()).collect::<Vec<_>>(), data);
            assert_eq!(stats.udp_gro_copied, out.len() as u64);
        }
    }

    #[test]
    fn a_truncated_receive_or_one_without_a_source_is_dropped() {
        let mut pool = BufPool::for_mtu(1420, 256);
        let mut slot = ScatterSlot::new();
        slot.prepare(1452, &mut pool);
        receive(&mut slot, &run(100), 0);
        slot.truncated = true;
        let (mut out, mut stats) = (Vec::new(), IoStats::default());
        slot.take(&mut pool, &mut out, &mut stats, &mut Codel::default(), 0, false);
        slot.truncated = false;
        slot.addr = None;
        slot.take(&mut pool, &mut out, &mut stats, &mut Codel::default(), 0, false);
        assert!(out.is_empty());
        assert_eq!(stats.udp_truncated, 2);
    }

    #[test]
    fn held_receives_go_out_small_ones_first_then_in_order() {
        let mut pool = BufPool::for_mtu(1420, 1024);
        let mut gro = GroReceiver::new();
        let contents: [(Vec<u8>, u16); 4] = [
            (vec![1; 1452 * 40], 1452),
            (vec![2; 100], 0),
            (vec![3; 1452 * 40], 1452),
            (vec![4; 1452 * 5], 1452),
        ];
        for (i, (data, segment)) in contents.iter().enumerate() {
            gro.slots[i].prepare(1452, &mut pool);
            receive(&mut gro.slots[i], data, *segment);
        }
        gro.held = 4;
        let (mut out, mut stats) = (Vec::new(), IoStats::default());
        // A turn's worth: the small one, then whole receives in order until the turn is full.
        assert!(gro.hand_out(0, &mut pool, &mut out, &mut stats), "one receive is still held");
        let firsts: Vec<u8> = out.iter().map(|d| d.buf.data()[0]).collect();
        let mut want = vec![2];
        want.extend([1; 40]);
        want.extend([3; 40]);
        assert_eq!(firsts, want);
        assert_eq!(gro.held, 1);
        out.clear();
        assert!(!gro.hand_out(0, &mut pool, &mut out, &mut stats));
        assert_eq!(out.iter().map(|d| d.buf.data()[0]).collect::<Vec<_>>(), vec![4; 5]);
        assert_eq!(stats.udp_rx, 86);
    }

    #[test]
    fn bulk_datagrams_that_waited_behind_a_standing_queue_are_dropped_small_ones_never() {
        const MS: u64 = 1_000_000;
        let mut pool = BufPool::for_mtu(1420, 1024);
        let mut queue = Codel::default();
        let (mut out, mut stats) = (Vec::new(), IoStats::default());
        let mut slot = ScatterSlot::new();
        let mut small = 0;
        // Every 100 us a receive that waited 3 ms, with more behind it: a run, or a ping.
        for step in 0..1000u64 {
            let now = 1_000 * MS + step * 100_000;
            let (data, segment) = if step % 10 == 0 { (vec![7; 84], 0) } else { (vec![1; 1452 * 4], 1452) };
            slot.prepare(1452, &mut pool);
            receive(&mut slot, &data, segment);
            slot.stamp = Some(now - 3 * MS);
            slot.take(&mut pool, &mut out, &mut stats, &mut queue, now, true);
            small += out.iter().filter(|d| d.buf.len() == 84).count();
            out.drain(..).for_each(|d| pool.put(d.buf));
        }
        assert!(stats.udp_queue_drops > 10, "{stats:?}");
        assert_eq!(small, 100, "every ping went through");
        assert_eq!(stats.udp_rx + stats.udp_queue_drops, 900 * 4 + 100);
        // Without stamps, or with nothing behind, nothing is dropped.
        let mut fresh = IoStats::default();
        for (stamp, backlog) in [(None, true), (Some(0), false)] {
            slot.prepare(1452, &mut pool);
            receive(&mut slot, &[1; 1452 * 4], 1452);
            slot.stamp = stamp;
            slot.take(&mut pool, &mut out, &mut fresh, &mut queue, 2_000 * MS, backlog);
        }
        assert_eq!((fresh.udp_rx, fresh.udp_queue_drops), (8, 0));
    }

    #[test]
    fn pieces_never_exceed_a_buffer() {
        let mut pool = BufPool::for_mtu(1420, 256);
        let mut slot = ScatterSlot::new();
        slot.prepare(usize::MAX, &mut pool);
        assert_eq!(slot.piece, pool.buf_capacity() - pool.buf_headroom());
        slot.prepare(0, &mut pool);
        assert_eq!((slot.piece, slot.pieces), (1, GRO_MAX_SEGMENTS));
    }
}
