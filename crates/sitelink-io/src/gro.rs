//! UDP GRO on receive: with `UDP_GRO` set on a socket, the kernel may hand over a run of
//! datagrams from one sender, all of one size but the last, in one buffer, with the size in a
//! control message. Here the run is cut back into one pooled buffer per datagram for the
//! engine (one copy of each datagram, which costs less than the kernel's segmentation, skb
//! and system call per datagram that it replaces: benches/RESULTS.md).

use std::net::SocketAddr;

#[cfg(test)]
use sitelink_frame::PacketBuf;
use sitelink_frame::{BufPool, Datagram};

use crate::stats::IoStats;

/// `UDP_GRO` (`linux/udp.h`): the socket option, and the control message's type.
pub(crate) const UDP_GRO: libc::c_int = 104;

/// Bytes of control space a receive needs for the `UDP_GRO` message (an `int`).
pub(crate) const GRO_CMSG_SPACE: usize = 32;

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

/// A lone datagram this small (a ping's, an acknowledgement's, a keepalive's, a handshake's
/// cookie reply: not a bulk transfer's) may go ahead of held runs.
pub(crate) const SMALL_DATAGRAM: usize = 256;

/// Which of the held receives `runs` (a buffer and its segment size, in arrival order) may go
/// ahead of the others: a lone datagram of at most [`SMALL_DATAGRAM`] bytes behind a run of
/// several. What a bulk transfer's runs hold back is then a turn's wait for it at most. (Small
/// datagrams are not all of other flows, but a bulk flow's are few: at worst one segment of it
/// arrives before its elders, which TCP takes as reordering, not loss.) Marks them in `ahead`.
pub(crate) fn small_first(runs: &[(Datagram, u16)], ahead: &mut [bool]) {
    let mut behind_a_run = false;
    for ((run, segment), ahead) in runs.iter().zip(ahead.iter_mut()) {
        let len = run.buf.len();
        let lone = *segment == 0 || len <= usize::from(*segment);
        *ahead = behind_a_run && lone && len <= SMALL_DATAGRAM;
        behind_a_run |= !lone;
    }
}

/// Cuts what one receive brought (`data`, from `addr`) into datagrams of `segment` bytes (the
/// last may be shorter; 0: one datagram), each copied into a buffer from `pool` and pushed to
/// `out`. A piece larger than a pooled buffer is counted as truncated and dropped.
pub(crate) fn split_datagrams(
    addr: SocketAddr,
    data: &[u8],
    segment: u16,
    pool: &mut BufPool,
    out: &mut Vec<Datagram>,
    stats: &mut IoStats,
) {
    let size = match usize::from(segment) {
        0 => data.len().max(1),
        s => s,
    };
    if data.len() > size {
        stats.udp_gro_reads += 1;
    }
    for piece in data.chunks(size) {
        let mut buf = pool.get();
        if buf.copy_from(piece).is_ok() {
            stats.udp_rx += 1;
            out.push(Datagram { addr, buf });
        } else {
            stats.udp_truncated += 1;
            pool.put(buf);
        }
    }
    if data.is_empty() {
        // An empty datagram is still one (the engine counts and drops it).
        let buf = pool.get();
        stats.udp_rx += 1;
        out.push(Datagram { addr, buf });
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
        let addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let d = |len: usize, segment: u16| {
            (Datagram { addr, buf: PacketBuf::from_slice(&vec![0; len]) }, segment)
        };
        let held = [d(128, 0), d(4000, 1000), d(128, 0), d(1400, 0), d(96, 96), d(500, 100)];
        let mut ahead = [false; 6];
        small_first(&held, &mut ahead);
        assert_eq!(ahead, [false, false, true, false, true, false]);
    }

    #[test]
    fn a_run_is_cut_into_its_datagrams() {
        let mut pool = BufPool::for_mtu(1420, 64);
        let mut out = Vec::new();
        let mut stats = IoStats::default();
        let addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        split_datagrams(addr, &data, 300, &mut pool, &mut out, &mut stats);
        let lens: Vec<usize> = out.iter().map(|d| d.buf.len()).collect();
        assert_eq!(lens, vec![300, 300, 300, 100]);
        assert_eq!(out.iter().flat_map(|d| d.buf.data().to_vec()).collect::<Vec<_>>(), data);
        assert_eq!((stats.udp_rx, stats.udp_gro_reads), (4, 1));
        out.clear();
        split_datagrams(addr, &data[..50], 0, &mut pool, &mut out, &mut stats);
        assert_eq!(out.len(), 1);
        // A piece larger than a buffer is dropped and counted.
        split_datagrams(addr, &vec![0; 3000], 3000, &mut pool, &mut out, &mut stats);
        assert_eq!(stats.udp_truncated, 1);
    }
}
