//! The plain system calls both backends move packets with: `recvmmsg` and `sendmmsg` (with
//! UDP GSO) over pooled buffers, one `read`/`write` per packet on the packet side, and an
//! `epoll` set to sleep on. The `mmsg` backend is made of these; the `uring` backend uses them
//! in its readiness mode.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use sitelink_frame::{BufPool, DEFAULT_TAILROOM, Datagram, PacketBuf};

use crate::gro::GroReceiver;
use crate::peers::{self, MAX_CONNECTED_PEERS, PeerSockets};
use crate::socket::UdpSocket;
use crate::stats::IoStats;
use crate::sys::{self, GSO_MAX_SEGMENTS, MsgBatch, SendGroup};
use crate::tun::PacketFd;
use crate::vnet::VnetSide;
use crate::waker::Waker;

/// The most bytes one GSO send carries: a UDP datagram's limit, less headers. (The most
/// datagrams is [`GSO_MAX_SEGMENTS`].)
pub(crate) const GSO_MAX_BYTES: usize = 65_000;

/// Groups `dgrams` for sending: runs of datagrams to one address, all of one size but the
/// last (which may be shorter), become one GSO message when `gso` is on.
pub(crate) fn group_for_gso(dgrams: &[Datagram], gso: bool, groups: &mut Vec<SendGroup>) {
    groups.clear();
    let mut i = 0;
    while i < dgrams.len() {
        let first = &dgrams[i];
        let size = first.buf.len();
        let mut end = i + 1;
        if gso && size > 0 {
            let mut total = size;
            while end < dgrams.len() && end - i < GSO_MAX_SEGMENTS {
                let d = &dgrams[end];
                let len = d.buf.len();
                if d.addr != first.addr || len > size || len == 0 || total + len > GSO_MAX_BYTES {
                    break;
                }
                total += len;
                end += 1;
                if len < size {
                    break; // a shorter datagram can only come last
                }
            }
        }
        let segment = if end - i > 1 { size as u16 } else { 0 };
        groups.push(SendGroup { start: i, end, segment });
        i = end;
    }
}

/// What a failed `recvmmsg` means for [`MmsgCalls::recv`]'s answer: nothing waiting, or an
/// error counted. Pending ICMP errors (port unreachable from an old send) surface here; they
/// are counted and the socket stays usable.
pub(crate) fn recv_failed(e: io::Error, stats: &mut IoStats) -> (bool, io::Result<()>) {
    if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
        return (false, Ok(()));
    }
    stats.udp_recv_errors += 1;
    (true, if e.raw_os_error() == Some(libc::ECONNREFUSED) { Ok(()) } else { Err(e) })
}

/// One `recvmmsg` or `sendmmsg` call's worth of headers, buffers and results, reused call
/// after call.
pub(crate) struct MmsgCalls {
    msgs: MsgBatch,
    groups: Vec<SendGroup>,
    bufs: Vec<PacketBuf>,
    addrs: Vec<Option<SocketAddr>>,
    truncated: Vec<bool>,
    batch: usize,
    /// With UDP GRO on: the receives, scattered and held.
    gro: Option<GroReceiver>,
}

impl MmsgCalls {
    pub(crate) fn new(batch: usize) -> MmsgCalls {
        MmsgCalls {
            msgs: MsgBatch::new(batch),
            groups: Vec::with_capacity(batch),
            bufs: Vec::with_capacity(batch),
            addrs: vec![None; batch],
            truncated: vec![false; batch],
            batch,
            gro: None,
        }
    }

    /// Receives runs of datagrams (the sockets have UDP GRO on), scattered over pooled
    /// buffers; or, with `false`, one datagram per pooled buffer.
    pub(crate) fn set_gro(&mut self, on: bool) {
        self.gro = on.then(GroReceiver::new);
    }

    /// One `recvmmsg` on `sock` into pooled buffers, appending what arrived whole to `out`:
    /// returns whether more may be waiting (the batch filled, or an error left data behind),
    /// and the error to report.
    pub(crate) fn recv(
        &mut self,
        sock: BorrowedFd<'_>,
        pool: &mut BufPool,
        out: &mut Vec<Datagram>,
        stats: &mut IoStats,
    ) -> (bool, io::Result<()>) {
        if let Some(gro) = &mut self.gro {
            return gro.recv(&mut self.msgs, sock, pool, out, stats);
        }
        while self.bufs.len() < self.batch {
            self.bufs.push(pool.get());
        }
        let got = match self.msgs.recv(sock, &mut self.bufs, &mut self.addrs, &mut self.truncated) {
            Ok(n) => n,
            Err(e) => return recv_failed(e, stats),
        };
        for i in 0..got {
            let buf = std::mem::replace(&mut self.bufs[i], pool.get());
            match (self.addrs[i], self.truncated[i]) {
                (Some(addr), false) => {
                    stats.udp_rx += 1;
                    stats.udp_rx_bytes += buf.data().len() as u64;
                    out.push(Datagram { addr, buf });
                }
                _ => {
                    stats.udp_truncated += 1;
                    pool.put(buf);
                }
            }
        }
        (got == self.batch, Ok(()))
    }

    /// Whether GRO receives are held, not handed out yet ([`cut_held`](Self::cut_held)).
    pub(crate) fn has_held(&self) -> bool {
        self.gro.as_ref().is_some_and(GroReceiver::has_held)
    }

    /// Hands out a turn's worth of held receives into `out` (for a backend that has no socket
    /// to call [`recv`](Self::recv) on this turn); returns whether some are still held.
    pub(crate) fn cut_held(
        &mut self,
        pool: &mut BufPool,
        out: &mut Vec<Datagram>,
        stats: &mut IoStats,
    ) -> bool {
        self.gro.as_mut().is_some_and(|gro| gro.hand_out(out.len(), pool, out, stats))
    }

    /// Sends `dgrams` (drained, their buffers back to `pool`): runs of equal datagrams to one
    /// address as one GSO message when `gso`, each peer's through its connected socket in
    /// `peers`, the others through `udp`. A failed message's datagrams are counted and the
    /// rest go on; a peer socket that went stale is dropped from `peers`; a device that
    /// cannot segment turns `gso` off.
    pub(crate) fn send(
        &mut self,
        udp: &UdpSocket,
        peers: &mut PeerSockets,
        gso: &mut bool,
        stats: &mut IoStats,
        dgrams: &mut Vec<Datagram>,
        pool: &mut BufPool,
    ) {
        while !dgrams.is_empty() {
            let take = dgrams.len().min(self.batch);
            let chunk = &dgrams[..take];
            group_for_gso(chunk, *gso, &mut self.groups);
            let mut g = 0;
            while g < self.groups.len() {
                // A run of groups for one socket: a peer's connected one, or the shared one.
                let target = peers.find(&chunk[self.groups[g].start].addr);
                let mut run_end = g + 1;
                while run_end < self.groups.len()
                    && peers.find(&chunk[self.groups[run_end].start].addr) == target
                {
                    run_end += 1;
                }
                let (sock, addressed) = match target {
                    Some(i) => (&peers.list[i].sock, false),
                    None => (udp, true),
                };
                stats.send_calls += 1;
                let sent = if self.groups[g].segment != 0 && crate::faults::refused(crate::Fault::GsoSend) {
                    Err(io::Error::from_raw_os_error(libc::EIO))
                } else {
                    self.msgs.send(sock.as_fd(), sock.is_ipv6(), addressed, chunk, &self.groups[g..run_end])
                };
                match sent {
                    Ok(n) => {
                        for grp in &self.groups[g..g + n] {
                            stats.udp_tx += (grp.end - grp.start) as u64;
                        }
                        g += n.max(1);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.raw_os_error() == Some(libc::EIO) && self.groups[g].segment != 0 => {
                        // The device cannot segment: send without GSO from here on.
                        tracing::warn!("UDP GSO refused by the kernel (EIO); sending datagrams one by one");
                        *gso = false;
                        stats.gso_send_refused += 1;
                        let base = self.groups[g].start;
                        group_for_gso(&chunk[base..], false, &mut self.groups);
                        for grp in &mut self.groups {
                            grp.start += base;
                            grp.end += base;
                        }
                        g = 0;
                    }
                    Err(e) => {
                        // This message failed (unreachable, no route, a pending ICMP error):
                        // count its datagrams and go on with the rest.
                        let grp = self.groups[g];
                        stats.udp_send_errors += (grp.end - grp.start) as u64;
                        g += 1;
                        if let Some(i) = target
                            && e.raw_os_error().is_some_and(peers::is_stale)
                        {
                            // The peer's socket lost its source address: the shared socket
                            // serves the peer from here on.
                            drop(peers.list.swap_remove(i));
                            stats.peer_sockets = peers.list.len() as u64;
                            stats.peer_sockets_stale += 1;
                        }
                    }
                }
            }
            for d in dgrams.drain(..take) {
                pool.put(d.buf);
            }
        }
    }
}

/// Reads packets from a packet descriptor into pooled buffers, keeping each buffer's tailroom
/// free for padding and tag; with a virtio-net header, each read (a packet or super-packet)
/// is split into pooled buffers ([`VnetSide::read_one`]), until a turn's worth
/// ([`TURN_PACKETS`](crate::vnet::TURN_PACKETS)) has come. Returns whether the batch of reads
/// filled (more may be waiting).
pub(crate) fn read_packet_batch(
    fd: &PacketFd,
    batch: usize,
    pool: &mut BufPool,
    out: &mut Vec<PacketBuf>,
    stats: &mut IoStats,
    vnet: &mut VnetSide,
) -> io::Result<bool> {
    let start = out.len();
    for _ in 0..batch {
        if out.len() - start >= crate::vnet::TURN_PACKETS {
            return Ok(true);
        }
        let result = if vnet.vnet_hdr {
            vnet.read_one(fd.as_fd(), pool, out, stats)
        } else {
            let mut buf = pool.get();
            let spare = buf.spare_mut();
            let room = spare.len().saturating_sub(DEFAULT_TAILROOM);
            match sys::read(fd.as_fd(), &mut spare[..room]) {
                Ok(0) => {
                    pool.put(buf);
                    Ok(false)
                }
                Ok(n) => {
                    buf.set_len(n).expect("read within the spare room");
                    stats.tun_rx += 1;
                    stats.tun_rx_bytes += n as u64;
                    out.push(buf);
                    Ok(true)
                }
                Err(e) => {
                    pool.put(buf);
                    Err(e)
                }
            }
        };
        match result {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                return Ok(false);
            }
            Err(e) => {
                stats.tun_read_errors += 1;
                return Err(e);
            }
        }
    }
    Ok(true)
}

/// The descriptors [`Readiness`] watches before the peers' sockets: the shared socket, the
/// packet side, the waker.
pub(crate) const POLL_OWN: usize = 3;

/// Which of the link's descriptors are readable: the shared socket, the packet side, the
/// waker, then the peers' sockets in their list's order.
pub(crate) type Ready = [bool; POLL_OWN + MAX_CONNECTED_PEERS];

/// Sleeps until one of the link's descriptors is readable: a level-triggered epoll set,
/// registered once and again only when the descriptors change. (`poll` registers and
/// unregisters every descriptor on every sleep and asks each for its state on every wake: the
/// largest share of an idle packet's kernel time.)
pub(crate) struct Readiness {
    epoll: Option<OwnedFd>,
    /// What the set holds: the shared socket's descriptor and the peers' socket ids, in order
    /// (each registered with its index as data).
    udp_fd: RawFd,
    peer_ids: [u32; MAX_CONNECTED_PEERS],
    peers: usize,
}

impl Readiness {
    pub(crate) fn new() -> Readiness {
        Readiness { epoll: None, udp_fd: -1, peer_ids: [0; MAX_CONNECTED_PEERS], peers: 0 }
    }

    /// Builds the set anew at the next wait (the shared socket was replaced: its descriptor
    /// number may be the old one's).
    pub(crate) fn reset(&mut self) {
        self.epoll = None;
    }

    /// Sleeps until a descriptor is readable or `timeout` passes; returns which are.
    pub(crate) fn wait(
        &mut self,
        udp: &UdpSocket,
        packets: Option<&PacketFd>,
        waker: &Waker,
        peers: &PeerSockets,
        timeout: Option<Duration>,
    ) -> io::Result<Ready> {
        let current = udp.as_fd().as_raw_fd() == self.udp_fd
            && peers.list.len() == self.peers
            && peers.list.iter().zip(&self.peer_ids).all(|(p, id)| p.id == *id);
        if self.epoll.is_none() || !current {
            self.epoll = None;
            let epoll = sys::epoll_new()?;
            sys::epoll_add(epoll.as_fd(), udp.as_fd(), 0)?;
            if let Some(packets) = packets {
                sys::epoll_add(epoll.as_fd(), packets.as_fd(), 1)?;
            }
            sys::epoll_add(epoll.as_fd(), waker.0.as_fd(), 2)?;
            for (i, p) in peers.list.iter().enumerate() {
                sys::epoll_add(epoll.as_fd(), p.sock.as_fd(), (POLL_OWN + i) as u64)?;
                self.peer_ids[i] = p.id;
            }
            self.udp_fd = udp.as_fd().as_raw_fd();
            self.peers = peers.list.len();
            self.epoll = Some(epoll);
        }
        let epoll = self.epoll.as_ref().expect("built above");
        let mut events = [sys::epoll_event(); POLL_OWN + MAX_CONNECTED_PEERS];
        let n = sys::epoll_wait(epoll.as_fd(), &mut events, timeout)?;
        let mut ready = [false; POLL_OWN + MAX_CONNECTED_PEERS];
        for e in &events[..n] {
            if let Some(r) = ready.get_mut(e.data.u64() as usize) {
                *r = true;
            }
        }
        Ok(ready)
    }
}

/// Writes `packets` (drained, their buffers back to `pool`) to a packet descriptor, one
/// `write` each, or with a virtio-net header one `write`/`writev` per packet or coalesced run
/// ([`VnetSide::write_all`]); a refused packet is counted and the rest go on.
pub(crate) fn write_packet_batch(
    fd: &PacketFd,
    packets: &mut Vec<PacketBuf>,
    pool: &mut BufPool,
    stats: &mut IoStats,
    vnet: &mut VnetSide,
) {
    if vnet.vnet_hdr {
        return vnet.write_all(fd.as_fd(), packets, pool, stats);
    }
    for buf in packets.drain(..) {
        match sys::write(fd.as_fd(), buf.data()) {
            Ok(_) => stats.tun_tx += 1,
            Err(_) => stats.tun_write_errors += 1,
        }
        pool.put(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(port: u16, len: usize) -> Datagram {
        Datagram { addr: SocketAddr::from(([127, 0, 0, 1], port)), buf: PacketBuf::from_slice(&vec![0; len]) }
    }

    #[test]
    fn groups_runs_of_equal_datagrams_to_one_address() {
        let ds = vec![d(1, 100), d(1, 100), d(1, 60), d(1, 100), d(2, 100), d(2, 100), d(1, 0)];
        let mut g = Vec::new();
        group_for_gso(&ds, true, &mut g);
        let got: Vec<_> = g.iter().map(|g| (g.start, g.end, g.segment)).collect();
        assert_eq!(got, vec![(0, 3, 100), (3, 4, 0), (4, 6, 100), (6, 7, 0)]);
        group_for_gso(&ds, false, &mut g);
        assert_eq!(g.len(), ds.len());
        assert!(g.iter().all(|g| g.segment == 0 && g.end == g.start + 1));
    }

    #[test]
    fn groups_respect_segment_and_byte_limits() {
        let ds: Vec<_> = (0..100).map(|_| d(1, 1452)).collect();
        let mut g = Vec::new();
        group_for_gso(&ds, true, &mut g);
        assert!(g.iter().all(|g| (g.end - g.start) * 1452 <= GSO_MAX_BYTES));
        assert_eq!(g.iter().map(|g| g.end - g.start).sum::<usize>(), 100);
        let small: Vec<_> = (0..100).map(|_| d(1, 100)).collect();
        group_for_gso(&small, true, &mut g);
        assert_eq!(g[0].end - g[0].start, GSO_MAX_SEGMENTS);
    }
}
