//! UDP GRO on receive: with `UDP_GRO` set on a socket, the kernel may hand over a run of
//! datagrams from one sender, all of one size but the last, in one receive, with the size in
//! a control message. The receive is scattered over pooled buffers, one iovec a datagram
//! ([`ScatterSlot`]), so that each datagram lands in a buffer of its own and the engine sees
//! one buffer per datagram without a copy; only a run whose size differs from the guess is
//! copied apart.

use std::net::SocketAddr;

use sitelink_frame::{BufPool, Datagram, PacketBuf};

use crate::stats::IoStats;

/// `UDP_GRO` (`linux/udp.h`): the socket option, and the control message's type.
pub(crate) const UDP_GRO: libc::c_int = 104;

/// The most one receive with GRO returns: a whole UDP datagram's worth.
pub(crate) const GRO_READ_MAX: usize = 65_535;

/// The segment size a `UDP_GRO` control message in `control` (the raw bytes the kernel wrote:
/// `cmsghdr`s, each followed by its data) gives, if there is one.
pub(crate) fn gro_segment(control: &[u8]) -> Option<u16> {
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    const ALIGN: usize = std::mem::size_of::<usize>();
    let mut at = 0;
    while at + HDR <= control.len() {
        let c = &control[at..];
        let len = usize::from_ne_bytes(c[..ALIGN].try_into().expect("a usize"));
        let level = libc::c_int::from_ne_bytes(c[ALIGN..ALIGN + 4].try_into().expect("an int"));
        let kind = libc::c_int::from_ne_bytes(c[ALIGN + 4..ALIGN + 8].try_into().expect("an int"));
        if len < HDR || at + len > control.len() {
            return None;
        }
        if level == libc::SOL_UDP && kind == UDP_GRO && len >= HDR + 4 {
            let size = libc::c_int::from_ne_bytes(c[HDR..HDR + 4].try_into().expect("an int"));
            return u16::try_from(size).ok();
        }
        at += len.next_multiple_of(ALIGN);
    }
    None
}

/// The most datagrams the kernel merges into one receive (`UDP_GRO_CNT_MAX`).
pub(crate) const GRO_MAX_SEGMENTS: usize = 64;

/// A lone datagram this small (a ping's, an acknowledgement's, a keepalive's, a handshake's
/// cookie reply: not a bulk transfer's) may go ahead of held runs.
pub(crate) const SMALL_DATAGRAM: usize = 256;

/// Which of the held receives `held` (each one's length and segment size, in arrival order)
/// may go ahead of the others: a lone datagram of at most [`SMALL_DATAGRAM`] bytes behind a
/// run of several. What a bulk transfer's runs hold back is then a turn's wait for it at
/// most. (Small datagrams are not all of other flows, but a bulk flow's are few: at worst one
/// segment of it arrives before its elders, which TCP takes as reordering, not loss.) Marks
/// them in `ahead`.
pub(crate) fn small_first(held: impl IntoIterator<Item = (usize, u16)>, ahead: &mut [bool]) {
    let mut behind_a_run = false;
    for ((len, segment), ahead) in held.into_iter().zip(ahead.iter_mut()) {
        let lone = segment == 0 || len <= usize::from(segment);
        *ahead = behind_a_run && lone && len <= SMALL_DATAGRAM;
        behind_a_run |= !lone;
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
    pub(crate) fn take(&mut self, pool: &mut BufPool, out: &mut Vec<Datagram>, stats: &mut IoStats) {
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
        if self.landed_in_place() {
            for i in 0..count {
                let len = (self.len - i * size).min(size);
                let mut buf = std::mem::replace(&mut self.bufs[i], pool.get());
                buf.set_len(len).expect("the kernel wrote within the piece");
                stats.udp_rx += 1;
                out.push(Datagram { addr, buf });
            }
            return;
        }
        stats.udp_gro_copied += count as u64;
        for i in 0..count {
            let from = i * size;
            let to = (from + size).min(self.len);
            let mut buf = pool.get();
            match buf.set_len(to - from) {
                Ok(()) => {
                    self.gather(from, buf.data_mut());
                    stats.udp_rx += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: libc::c_int, kind: libc::c_int, value: libc::c_int) -> Vec<u8> {
        let len = std::mem::size_of::<libc::cmsghdr>() + 4;
        let mut c = Vec::new();
        c.extend_from_slice(&len.to_ne_bytes());
        c.extend_from_slice(&level.to_ne_bytes());
        c.extend_from_slice(&kind.to_ne_bytes());
        c.extend_from_slice(&value.to_ne_bytes());
        c.resize(len.next_multiple_of(8), 0);
        c
    }

    #[test]
    fn finds_the_segment_size_among_control_messages() {
        let mut control = cmsg(libc::SOL_IP, 8, 7);
        control.extend(cmsg(libc::SOL_UDP, UDP_GRO, 1452));
        assert_eq!(gro_segment(&control), Some(1452));
        assert_eq!(gro_segment(&cmsg(libc::SOL_IP, 8, 7)), None);
        assert_eq!(gro_segment(&[]), None);
        // A length that runs past the end is not followed.
        let mut bad = cmsg(libc::SOL_UDP, UDP_GRO, 1452);
        bad[0] = 200;
        assert_eq!(gro_segment(&bad), None);
        assert_eq!(gro_segment(&bad[..10]), None);
    }

    #[test]
    fn small_lone_datagrams_behind_a_run_go_first() {
        let held = [(128, 0), (4000, 1000), (128, 0), (1400, 0), (96, 96), (500, 100)];
        let mut ahead = [false; 6];
        small_first(held, &mut ahead);
        assert_eq!(ahead, [false, false, true, false, true, false]);
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
        slot.take(&mut pool, &mut out, &mut stats);
        assert_eq!(out.len(), 45);
        assert_eq!(out.iter().map(|d| d.buf.data().as_ptr()).collect::<Vec<_>>(), first, "the same buffers");
        assert_eq!(out.iter().flat_map(|d| d.buf.data().to_vec()).collect::<Vec<_>>(), data);
        assert_eq!(out[44].buf.len(), 700);
        assert_eq!((stats.udp_rx, stats.udp_gro_reads, stats.udp_gro_copied), (45, 1, 0));
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
        slot.take(&mut pool, &mut out, &mut stats);
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
            slot.take(&mut pool, &mut out, &mut stats);
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
        slot.take(&mut pool, &mut out, &mut stats);
        slot.truncated = false;
        slot.addr = None;
        slot.take(&mut pool, &mut out, &mut stats);
        assert!(out.is_empty());
        assert_eq!(stats.udp_truncated, 2);
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
