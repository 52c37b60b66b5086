//! The TUN side with a virtio-net header ([`TunOffloads`](crate::TunOffloads)): what one read
//! brings (a packet, or a super-packet to split) and how a batch of packets to write becomes
//! fewer, larger writes. Both backends move packets with these; the splitting, coalescing and
//! checksums themselves are `sitelink_frame::offload`'s.

use std::io;

use sitelink_frame::offload::{self, VIRTIO_NET_HDR_LEN, VirtioNetHdr};
use sitelink_frame::{BufPool, PacketBuf};

use crate::stats::IoStats;

/// The most one TUN read returns with offloads on: the header, and a super-packet of up to
/// 64 KiB (an IPv6 one's payload length may be 65,535 after its 40-byte header).
pub(crate) const READ_MAX: usize = VIRTIO_NET_HDR_LEN + 65_535 + 40;

/// The most packets one write may coalesce (a 64 KiB super-packet of 1,380-byte segments is 48).
pub(crate) const MAX_RUN: usize = 64;

/// The most packets a backend hands its worker per call when they come from super-packets
/// or runs of datagrams (the rest wait for the next turn): a turn's work, and so the wait of
/// a packet of another flow behind a bulk transfer (a ping behind TCP), stays bounded. 256
/// MTU-sized packets are about 0.4 MB: what one core seals in about a quarter millisecond.
pub(crate) const TURN_PACKETS: usize = 64;

/// The most bytes of a coalesced super-packet: its IP length field's limit.
const MAX_SUPER_PACKET: usize = 65_535;

/// A backend's state for its TUN side: whether packets carry the header, whether writes
/// coalesce, and the memory reads and writes reuse.
pub(crate) struct VnetSide {
    /// Packets carry a virtio-net header.
    pub(crate) vnet_hdr: bool,
    /// Runs of TCP segments are written as super-packets (TSO accepted, and no `EINVAL` yet).
    pub(crate) coalesce: bool,
    /// Runs of UDP datagrams are coalesced too (USO accepted), while `coalesce` is on.
    pub(crate) uso: bool,
    /// Where a plain read lands before it is split ([`READ_MAX`] bytes with the header, else
    /// none: reads go straight into pooled buffers).
    scratch: Box<[u8]>,
    /// The writes of the batch being written.
    pub(crate) plan: Vec<TunWrite>,
    /// The packets of the write being made.
    pub(crate) run: Vec<PacketBuf>,
}

impl VnetSide {
    /// The state for a packet side with `offloads`, its fallbacks noted in `stats`.
    pub(crate) fn new(offloads: crate::TunOffloads, batch: usize, stats: &mut IoStats) -> VnetSide {
        stats.tun_offload_refused = u64::from(offloads.tso_refused.is_some());
        stats.uso_refused = u64::from(offloads.uso_refused.is_some());
        VnetSide {
            vnet_hdr: offloads.vnet_hdr,
            coalesce: offloads.vnet_hdr && offloads.tso,
            uso: offloads.vnet_hdr && offloads.uso,
            scratch: if offloads.vnet_hdr { vec![0; READ_MAX].into_boxed_slice() } else { Box::default() },
            plan: Vec::with_capacity(if offloads.vnet_hdr { batch.max(1) } else { 0 }),
            run: Vec::with_capacity(if offloads.vnet_hdr { MAX_RUN } else { 0 }),
        }
    }

    /// Reads one packet or super-packet from `fd` with a plain `read`, splitting it into
    /// `out`. `Ok(false)` when nothing was waiting.
    pub(crate) fn read_one(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        pool: &mut BufPool,
        out: &mut Vec<PacketBuf>,
        stats: &mut IoStats,
    ) -> io::Result<bool> {
        match crate::sys::read(fd, &mut self.scratch) {
            Ok(0) => Ok(false),
            Ok(n) => {
                split_read(&self.scratch[..n], pool, out, stats);
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes `packets` (drained, buffers back to `pool`) with plain `write`/`writev` calls:
    /// one per packet or coalesced run.
    pub(crate) fn write_all(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        packets: &mut Vec<PacketBuf>,
        pool: &mut BufPool,
        stats: &mut IoStats,
    ) {
        plan_writes(packets, self.coalesce, self.coalesce && self.uso, &mut self.plan);
        let mut bufs = packets.drain(..);
        for w in &self.plan {
            self.run.clear();
            self.run.extend(bufs.by_ref().take(w.count));
            if !w.ok {
                stats.tun_write_errors += w.count as u64;
            } else {
                let result = if w.count == 1 {
                    crate::sys::write(fd, self.run[0].data())
                } else if crate::faults::refused(crate::Fault::GroWrite) {
                    Err(io::Error::from_raw_os_error(libc::EINVAL))
                } else {
                    let mut iov = [io::IoSlice::new(&[]); MAX_RUN];
                    iov[0] = io::IoSlice::new(self.run[0].data());
                    for (slot, b) in iov[1..].iter_mut().zip(&self.run[1..]) {
                        *slot = io::IoSlice::new(&b.data()[w.skip..]);
                    }
                    crate::sys::writev(fd, &iov[..w.count])
                };
                after_write(&result, w, stats, &mut self.coalesce);
            }
            for b in self.run.drain(..) {
                pool.put(b);
            }
        }
    }
}

/// Which of `reads` (what TUN reads brought, each a virtio-net header and a packet, in
/// arrival order) may go ahead of the others: a single packet (not a super-packet) whose flow
/// has no super-packet ahead of it. A ping, a DNS query, another flow's acknowledgement then
/// waits for no bulk transfer's super-packets, and no flow is reordered. Marks them in
/// `ahead` (as long as `reads`, at most [`MAX_HELD_READS`]).
pub(crate) fn sparse_first(reads: &[PacketBuf], ahead: &mut [bool]) {
    let mut bulk = [0u32; MAX_HELD_READS];
    let mut nbulk = 0;
    for (raw, ahead) in reads.iter().zip(ahead.iter_mut()) {
        let data = raw.data();
        let flow = sitelink_frame::ip::flow_hash(data.get(VIRTIO_NET_HDR_LEN..).unwrap_or_default());
        let single = VirtioNetHdr::parse(data).is_ok_and(|h| h.gso_type == VirtioNetHdr::GSO_NONE);
        *ahead = single && nbulk > 0 && !bulk[..nbulk].contains(&flow);
        if !single && nbulk < MAX_HELD_READS {
            bulk[nbulk] = flow;
            nbulk += 1;
        }
    }
}

/// The most TUN reads a backend holds at once (the uring backend's large read buffers).
pub(crate) const MAX_HELD_READS: usize = 64;

/// Hands out a turn's worth of the held `reads` (each a virtio-net header and a packet or
/// super-packet, in arrival order), split into segments from `pool` appended to `out`:
/// first every single packet that may go ahead of the bulk ([`sparse_first`]), then the
/// others in order until [`TURN_PACKETS`] have come. The reads handed out leave `reads`
/// (the rest keep their order) and go to `recycle`.
pub(crate) fn hand_out_reads(
    reads: &mut Vec<PacketBuf>,
    pool: &mut BufPool,
    out: &mut Vec<PacketBuf>,
    stats: &mut IoStats,
    mut recycle: impl FnMut(PacketBuf),
) {
    let start = out.len();
    let held = reads.len().min(MAX_HELD_READS);
    let mut taken = [false; MAX_HELD_READS];
    sparse_first(&reads[..held], &mut taken[..held]);
    for (raw, _) in reads.iter().zip(&taken).filter(|(_, t)| **t) {
        split_read(raw.data(), pool, out, stats);
    }
    for (raw, taken) in reads.iter().zip(taken.iter_mut()) {
        if out.len() - start >= TURN_PACKETS {
            break;
        }
        if !*taken {
            split_read(raw.data(), pool, out, stats);
            *taken = true;
        }
    }
    let mut i = 0;
    for t in &taken[..held] {
        if *t {
            recycle(reads.remove(i));
        } else {
            i += 1;
        }
    }
}

/// How many TUN reads a backend reading with plain `read` calls holds between turns: about a
/// millisecond of a bulk transfer's super-packets at 3 Gbit/s, so that a packet of another
/// flow read behind them goes first. 1 MiB of buffers, touched only as far as reads reach.
pub(crate) const READ_AHEAD: usize = 16;

/// The reads a backend reading with plain `read` calls (the `mmsg` backend, with a
/// virtio-net header) holds between turns, and their buffers: what the uring backend's
/// multishot reads give it, reading ahead of the turn being handed out.
pub(crate) struct ReadAhead {
    /// Reads not yet handed out, in arrival order.
    held: Vec<PacketBuf>,
    /// Buffers of [`READ_MAX`] bytes for the next reads.
    free: Vec<PacketBuf>,
}

impl ReadAhead {
    /// [`READ_AHEAD`] buffers of [`READ_MAX`] bytes, allocated once.
    pub(crate) fn new() -> ReadAhead {
        ReadAhead {
            held: Vec::with_capacity(READ_AHEAD),
            free: (0..READ_AHEAD).map(|_| PacketBuf::new(READ_MAX, 0)).collect(),
        }
    }

    /// Whether reads are held for a later turn.
    pub(crate) fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// Reads from `fd` until [`READ_AHEAD`] reads are held or nothing is waiting, then hands
    /// out a turn's worth ([`hand_out_reads`]). Returns whether more may be waiting (reads
    /// are still held, or every buffer filled). A read error is counted and returned after
    /// what was held has been handed out.
    pub(crate) fn read(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        pool: &mut BufPool,
        out: &mut Vec<PacketBuf>,
        stats: &mut IoStats,
    ) -> io::Result<bool> {
        let mut drained = false;
        let mut failed = None;
        while !drained && failed.is_none() {
            let Some(mut buf) = self.free.pop() else { break };
            buf.reset(0);
            match crate::sys::read(fd, buf.spare_mut()) {
                Ok(n) if n > 0 => {
                    buf.set_len(n).expect("a read within the buffer");
                    self.held.push(buf);
                    continue;
                }
                Ok(_) => drained = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    drained = true;
                }
                Err(e) => {
                    stats.tun_read_errors += 1;
                    failed = Some(e);
                }
            }
            self.free.push(buf);
        }
        let free = &mut self.free;
        hand_out_reads(&mut self.held, pool, out, stats, |b| free.push(b));
        match failed {
            Some(e) => Err(e),
            None => Ok(self.has_held() || !drained),
        }
    }
}

/// Splits what one read returned (`raw`: the header, then the packet) into segments from
/// `pool`, appended to `out`. A read that cannot be split is counted and dropped.
pub(crate) fn split_read(raw: &[u8], pool: &mut BufPool, out: &mut Vec<PacketBuf>, stats: &mut IoStats) {
    let result = VirtioNetHdr::parse(raw)
        .and_then(|hdr| offload::segment(&raw[VIRTIO_NET_HDR_LEN..], &hdr, pool, out).map(|n| (n, hdr)));
    match result {
        Ok((n, hdr)) => {
            stats.tun_rx += n as u64;
            stats.tun_rx_bytes += (raw.len() - VIRTIO_NET_HDR_LEN) as u64;
            if hdr.gso_type != VirtioNetHdr::GSO_NONE {
                stats.tun_gso_reads += 1;
            }
        }
        Err(e) => {
            if stats.tun_offload_errors == 0 {
                tracing::warn!("a TUN read could not be split ({e}); dropped (counted from now on)");
            }
            stats.tun_offload_errors += 1;
        }
    }
}

/// One write to the TUN side: `count` packets from where the last ended; when more than one,
/// the first carries the super-packet's headers and the others are written from `skip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TunWrite {
    pub(crate) count: usize,
    pub(crate) skip: usize,
    /// False when the packet could not be given a header (it is dropped and counted).
    pub(crate) ok: bool,
}

/// Plans the writes of `packets` to a TUN device with a virtio-net header, preparing the
/// packets in place: each gets its header in its headroom, with `udp` runs of one UDP flow's
/// datagrams become USO super-packets ([`offload::udp_run_len`],
/// [`offload::coalesce_udp_in_place`]), and with `coalesce`, runs of one
/// TCP flow's segments ([`offload::tcp_run_len`], checksums verified) become super-packets
/// (the first segment's headers rewritten, [`offload::coalesce_tcp_in_place`]). `plan` is
/// cleared and then lists the writes in order, covering every packet.
pub(crate) fn plan_writes(packets: &mut [PacketBuf], coalesce: bool, udp: bool, plan: &mut Vec<TunWrite>) {
    plan.clear();
    let mut i = 0;
    while i < packets.len() {
        let end = packets.len().min(i + MAX_RUN);
        let tcp_run = if coalesce { offload::tcp_run_len(&packets[i..end], MAX_SUPER_PACKET) } else { 1 };
        let udp_run =
            if udp && tcp_run <= 1 { offload::udp_run_len(&packets[i..end], MAX_SUPER_PACKET) } else { 1 };
        let mut write = TunWrite { count: 1, skip: 0, ok: true };
        let mut hdr = VirtioNetHdr::default();
        let merged = if tcp_run > 1 {
            offload::coalesce_tcp_in_place(&mut packets[i..i + tcp_run]).map(|m| (m, tcp_run)).ok()
        } else if udp_run > 1 {
            offload::coalesce_udp_in_place(&mut packets[i..i + udp_run]).map(|m| (m, udp_run)).ok()
        } else {
            None
        };
        if let Some(((h, skip), run)) = merged {
            hdr = h;
            write = TunWrite { count: run, skip, ok: true };
        }
        write.ok = match packets[i].prepend(VIRTIO_NET_HDR_LEN) {
            Ok(head) => hdr.write(head).is_ok(),
            Err(_) => false,
        };
        plan.push(write);
        i += write.count;
    }
}

/// Counts a write's result, and what it means for the writes after it: an `EINVAL` on a
/// super-packet is the kernel refusing GSO writes (a known regression): `coalesce` goes off,
/// said once and counted once (the other runs of the batch fail too, counted as errors).
pub(crate) fn after_write(
    result: &io::Result<usize>,
    write: &TunWrite,
    stats: &mut IoStats,
    coalesce: &mut bool,
) {
    match result {
        Ok(_) => {
            stats.tun_tx += write.count as u64;
            if write.count > 1 {
                stats.tun_gso_writes += 1;
            }
        }
        Err(e) => {
            stats.tun_write_errors += write.count as u64;
            if write.count > 1 && e.raw_os_error() == Some(libc::EINVAL) && *coalesce {
                *coalesce = false;
                stats.gro_write_refused += 1;
                tracing::warn!(
                    "the TUN device refused a coalesced write (EINVAL); writing packets one by one from now on"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_segments(n: usize) -> Vec<PacketBuf> {
        // A super-packet split by the frame code is a run that merges whole.
        let raw = tcp_read(n, 4000, 7);
        let mut pool = BufPool::for_mtu(1420, 256);
        let mut out = Vec::new();
        let mut stats = IoStats::default();
        split_read(&raw, &mut pool, &mut out, &mut stats);
        assert_eq!((stats.tun_rx, stats.tun_gso_reads), (n as u64, 1));
        assert_eq!(stats.tun_rx_bytes, (raw.len() - VIRTIO_NET_HDR_LEN) as u64);
        out
    }

    /// What a TUN read with a virtio-net header brings for a TCP super-packet of `n`
    /// 1000-byte segments from `port` (a single packet if `n` is 1), each payload byte `fill`.
    fn tcp_read(n: usize, port: u16, fill: u8) -> Vec<u8> {
        let payload = vec![fill; 1000 * n];
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&port.to_be_bytes());
        l4[2..4].copy_from_slice(&5201u16.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = 0x10;
        l4.extend_from_slice(&payload);
        let mut sp = vec![0u8; 20 + l4.len()];
        let len = sitelink_frame::ip::build_ipv4(&mut sp, [10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 6, &l4)
            .unwrap();
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::NEEDS_CSUM,
            // As the kernel gives it: a packet of one segment is no super-packet.
            gso_type: if n > 1 { VirtioNetHdr::GSO_TCPV4 } else { VirtioNetHdr::GSO_NONE },
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN];
        hdr.write(&mut raw).unwrap();
        raw.extend_from_slice(&sp[..len]);
        raw
    }

    /// What a TUN read with a virtio-net header brings for one ICMP packet, numbered `id`.
    fn icmp_read(id: u8) -> Vec<u8> {
        let mut sp = [0u8; 28];
        let len = sitelink_frame::ip::build_ipv4(
            &mut sp,
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            1,
            &[8, 0, 0, 0, 0, id, 0, 1],
        )
        .unwrap();
        let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN];
        raw.extend_from_slice(&sp[..len]);
        raw
    }

    /// A packet descriptor stand-in: one datagram a read, as a TUN device gives one packet.
    fn packet_pair() -> (std::os::unix::net::UnixDatagram, std::os::unix::net::UnixDatagram) {
        let (tun, kernel) = std::os::unix::net::UnixDatagram::pair().unwrap();
        tun.set_nonblocking(true).unwrap();
        (tun, kernel)
    }

    /// ICMP packets' ids and TCP segments' (source port, payload byte), in the order given.
    fn what(packets: &[PacketBuf]) -> Vec<(u16, u8)> {
        packets
            .iter()
            .map(|p| {
                let d = p.data();
                if d[9] == 1 { (0, d[25]) } else { (u16::from_be_bytes([d[20], d[21]]), d[40]) }
            })
            .collect()
    }

    #[test]
    fn reading_ahead_lets_another_flows_packet_pass_a_bulk_transfer_but_keeps_each_flow_in_order() {
        use std::os::fd::AsFd;
        let (tun, kernel) = packet_pair();
        for fill in 1..=3 {
            kernel.send(&tcp_read(40, 4000, fill)).unwrap();
        }
        kernel.send(&icmp_read(9)).unwrap();
        kernel.send(&tcp_read(1, 4000, 4)).unwrap(); // the bulk flow's own single packet
        let mut ahead = ReadAhead::new();
        let mut pool = BufPool::for_mtu(1420, 256);
        let (mut out, mut stats) = (Vec::new(), IoStats::default());

        // A turn's worth: the ping first, then the bulk in order until 64 or more have come.
        assert!(ahead.read(tun.as_fd(), &mut pool, &mut out, &mut stats).unwrap());
        let mut expected = vec![(0, 9)];
        expected.extend(std::iter::repeat_n((4000, 1), 40));
        expected.extend(std::iter::repeat_n((4000, 2), 40));
        assert_eq!(what(&out), expected);
        assert!(ahead.has_held());

        // The rest, still in order, with the bulk flow's single packet after its segments.
        out.clear();
        assert!(!ahead.read(tun.as_fd(), &mut pool, &mut out, &mut stats).unwrap());
        let mut expected: Vec<_> = std::iter::repeat_n((4000, 3), 40).collect();
        expected.push((4000, 4));
        assert_eq!(what(&out), expected);
        assert!(!ahead.has_held());
        assert_eq!((stats.tun_rx, stats.tun_gso_reads), (122, 3));

        out.clear();
        assert!(!ahead.read(tun.as_fd(), &mut pool, &mut out, &mut stats).unwrap());
        assert!(out.is_empty());
    }

    #[test]
    fn reading_ahead_stops_at_its_buffers_and_says_more_is_waiting() {
        use std::os::fd::AsFd;
        let (tun, kernel) = packet_pair();
        let n = READ_AHEAD + 4;
        for id in 0..n {
            kernel.send(&icmp_read(id as u8)).unwrap();
        }
        let mut ahead = ReadAhead::new();
        let mut pool = BufPool::for_mtu(1420, 256);
        let (mut out, mut stats) = (Vec::new(), IoStats::default());
        assert!(ahead.read(tun.as_fd(), &mut pool, &mut out, &mut stats).unwrap(), "every buffer filled");
        assert_eq!(out.len(), READ_AHEAD);
        assert!(!ahead.read(tun.as_fd(), &mut pool, &mut out, &mut stats).unwrap());
        let ids: Vec<u8> = what(&out).iter().map(|w| w.1).collect();
        assert_eq!(ids, (0..n as u8).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_read_is_counted_after_what_was_held_is_handed_out() {
        use std::os::fd::AsFd;
        let (tun, kernel) = packet_pair();
        kernel.send(&icmp_read(1)).unwrap();
        let mut ahead = ReadAhead::new();
        let mut pool = BufPool::for_mtu(1420, 256);
        let (mut out, mut stats) = (Vec::new(), IoStats::default());
        // A read into a write-only descriptor fails with EBADF after the first read.
        let wronly = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
        assert!(ahead.read(wronly.as_fd(), &mut pool, &mut out, &mut stats).is_err());
        assert_eq!(stats.tun_read_errors, 1);
        assert!(ahead.read(tun.as_fd(), &mut pool, &mut out, &mut stats).is_ok());
        assert_eq!(what(&out), vec![(0, 1)]);
        assert_eq!(ahead.free.len(), READ_AHEAD, "every buffer back");
    }

    #[test]
    fn a_batch_plans_one_write_per_run_and_one_per_other_packet() {
        let mut packets = tcp_segments(5);
        packets.push(PacketBuf::from_slice(&[0x45; 20])); // not TCP: alone
        packets.extend(tcp_segments(2));
        let mut plan = Vec::new();
        plan_writes(&mut packets, true, true, &mut plan);
        let counts: Vec<usize> = plan.iter().map(|w| w.count).collect();
        assert_eq!(counts, vec![5, 1, 2]);
        assert!(plan.iter().all(|w| w.ok));
        assert_eq!(plan[0].skip, 40);
        let first = VirtioNetHdr::parse(packets[0].data()).unwrap();
        assert_eq!((first.gso_type, first.gso_size), (VirtioNetHdr::GSO_TCPV4, 1000));
        let alone = VirtioNetHdr::parse(packets[5].data()).unwrap();
        assert_eq!(alone, VirtioNetHdr::default());

        let mut packets = tcp_segments(3);
        plan_writes(&mut packets, false, false, &mut plan);
        assert_eq!(plan.iter().map(|w| w.count).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert!(packets.iter().all(|p| p.data()[..VIRTIO_NET_HDR_LEN] == [0; VIRTIO_NET_HDR_LEN]));
    }

    /// `n` datagrams of one UDP flow, 700 bytes each, as a USO read splits them.
    fn udp_datagrams(n: usize) -> Vec<PacketBuf> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&4000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&443u16.to_be_bytes());
        l4.extend_from_slice(&vec![3u8; 700 * n]);
        let len16 = (l4.len() as u16).to_be_bytes();
        l4[4..6].copy_from_slice(&len16);
        let mut sp = vec![0u8; 20 + l4.len()];
        let len =
            sitelink_frame::ip::build_ipv4(&mut sp, [10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 17, &l4)
                .unwrap();
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_UDP_L4,
            gso_size: 700,
            csum_start: 20,
            csum_offset: 6,
            ..Default::default()
        };
        let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN];
        hdr.write(&mut raw).unwrap();
        raw.extend_from_slice(&sp[..len]);
        let mut pool = BufPool::for_mtu(1420, 256);
        let (mut out, mut stats) = (Vec::new(), IoStats::default());
        split_read(&raw, &mut pool, &mut out, &mut stats);
        assert_eq!(out.len(), n);
        out
    }

    #[test]
    fn udp_runs_coalesce_only_with_uso() {
        let mut packets = udp_datagrams(6);
        packets.extend(tcp_segments(3));
        let mut plan = Vec::new();
        plan_writes(&mut packets, true, true, &mut plan);
        assert_eq!(plan.iter().map(|w| w.count).collect::<Vec<_>>(), vec![6, 3]);
        assert_eq!(plan[0].skip, 28);
        let first = VirtioNetHdr::parse(packets[0].data()).unwrap();
        assert_eq!((first.gso_type, first.gso_size), (VirtioNetHdr::GSO_UDP_L4, 700));
        let mut packets = udp_datagrams(4);
        plan_writes(&mut packets, true, false, &mut plan);
        assert_eq!(plan.iter().map(|w| w.count).collect::<Vec<_>>(), vec![1, 1, 1, 1]);
    }

    #[test]
    fn a_read_that_cannot_be_split_is_counted_and_dropped() {
        let mut pool = BufPool::for_mtu(1420, 8);
        let mut out = Vec::new();
        let mut stats = IoStats::default();
        split_read(&[1, 2, 3], &mut pool, &mut out, &mut stats);
        let bad_gso = [0, VirtioNetHdr::GSO_TCPV4, 0, 0, 0, 0, 0, 0, 0, 0, 0x45, 0];
        split_read(&bad_gso, &mut pool, &mut out, &mut stats);
        assert!(out.is_empty());
        assert_eq!(stats.tun_offload_errors, 2);
    }

    #[test]
    fn einval_on_a_coalesced_write_turns_coalescing_off() {
        let mut stats = IoStats::default();
        let mut coalesce = true;
        let run = TunWrite { count: 4, skip: 40, ok: true };
        after_write(&Ok(100), &run, &mut stats, &mut coalesce);
        assert_eq!((stats.tun_tx, stats.tun_gso_writes), (4, 1));
        let einval = Err(io::Error::from_raw_os_error(libc::EINVAL));
        after_write(&einval, &TunWrite { count: 1, ..run }, &mut stats, &mut coalesce);
        assert!(coalesce, "a single packet's EINVAL");
        after_write(&einval, &run, &mut stats, &mut coalesce);
        after_write(&einval, &run, &mut stats, &mut coalesce);
        assert!(!coalesce);
        assert_eq!((stats.tun_write_errors, stats.gro_write_refused), (9, 1), "counted once");
    }
}
