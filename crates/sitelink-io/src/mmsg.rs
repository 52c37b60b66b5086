//! The portable backend: `epoll`, `recvmmsg`, `sendmmsg` with UDP GSO, and one `read`/`write`
//! per TUN packet.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use sitelink_frame::{BufPool, Datagram, PacketBuf};

use crate::backend::BackendKind;
use crate::backend::{PacketIo, no_packet_side};
use crate::calls::{MmsgCalls, POLL_OWN, Readiness, read_packet_batch, write_packet_batch};
use crate::peers::PeerSockets;
use crate::socket::UdpSocket;
use crate::stats::IoStats;
use crate::sys;
use crate::tun::PacketFd;
use crate::vnet::{ReadAhead, VnetSide};
use crate::waker::Waker;

/// `recvmmsg`/`sendmmsg` and `epoll`.
pub struct MmsgIo {
    /// The TUN side; `None` when packets move in process ([`open_backend`](crate::open_backend)).
    packets: Option<PacketFd>,
    udp: UdpSocket,
    batch: usize,
    calls: MmsgCalls,
    gso: bool,
    more_udp: bool,
    more_packets: bool,
    waker: Waker,
    stats: IoStats,
    /// The peers' connected sockets (`flag`: datagrams may be waiting).
    peers: PeerSockets,
    readiness: Readiness,
    /// The TUN side's header, coalescing and read memory.
    vnet: VnetSide,
    /// With a virtio-net header: the reads held between turns (`None` without).
    read_ahead: Option<ReadAhead>,
}

impl std::fmt::Debug for MmsgIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmsgIo")
            .field("port", &self.udp.port())
            .field("gso", &self.gso)
            .finish_non_exhaustive()
    }
}

impl MmsgIo {
    /// A backend over `packets` and `udp` moving up to `batch` items per call.
    pub fn new(packets: PacketFd, udp: UdpSocket, batch: usize) -> io::Result<MmsgIo> {
        MmsgIo::with_packet_side(Some(packets), udp, batch)
    }

    /// A backend over `udp` alone: its worker moves packets in process, and
    /// [`read_packets`](PacketIo::read_packets) finds none.
    pub fn without_packets(udp: UdpSocket, batch: usize) -> io::Result<MmsgIo> {
        MmsgIo::with_packet_side(None, udp, batch)
    }

    fn with_packet_side(packets: Option<PacketFd>, mut udp: UdpSocket, batch: usize) -> io::Result<MmsgIo> {
        if let Some(p) = &packets {
            sys::set_nonblocking(p.as_fd(), true)?;
        }
        let gso = udp.supports_gso();
        let mut stats = IoStats::default();
        let vnet =
            VnetSide::new(packets.as_ref().map(PacketFd::offloads).unwrap_or_default(), batch, &mut stats);
        let mut calls = MmsgCalls::new(batch);
        calls.set_gro(udp.enable_gro(&mut stats));
        let read_ahead = vnet.vnet_hdr.then(ReadAhead::new);
        Ok(MmsgIo {
            read_ahead,
            more_packets: packets.is_some(),
            packets,
            udp,
            batch,
            calls,
            gso,
            more_udp: true,
            waker: Waker::new()?,
            stats,
            peers: PeerSockets::new(),
            readiness: Readiness::new(),
            vnet,
        })
    }

    /// Whether sends use UDP GSO.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// One `recvmmsg` on the shared socket (`None`) or a peer's: returns whether more may be
    /// waiting, and the error to report.
    fn recv_from(
        &mut self,
        peer: Option<usize>,
        pool: &mut BufPool,
        out: &mut Vec<Datagram>,
    ) -> (bool, io::Result<()>) {
        let sock = match peer {
            None => &self.udp,
            Some(i) => &self.peers.list[i].sock,
        };
        self.calls.recv(sock.as_fd(), pool, out, &mut self.stats)
    }
}

impl PacketIo for MmsgIo {
    fn kind(&self) -> BackendKind {
        BackendKind::Mmsg
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // With input left over from a full batch, only look (no sleeping) at the others.
        let more_peer = self.peers.list.iter().any(|p| p.readable);
        let timeout =
            if self.more_udp || self.more_packets || more_peer { Some(Duration::ZERO) } else { timeout };
        let ready =
            self.readiness.wait(&self.udp, self.packets.as_ref(), &self.waker, &self.peers, timeout)?;
        let n = POLL_OWN + self.peers.list.len();
        self.more_udp |= ready[0];
        self.more_packets |= ready[1];
        if ready[2] {
            self.waker.drain();
        }
        for (p, r) in self.peers.list.iter_mut().zip(&ready[POLL_OWN..n]) {
            p.readable |= *r;
        }
        Ok(())
    }

    fn recv_datagrams(&mut self, pool: &mut BufPool, out: &mut Vec<Datagram>) -> io::Result<()> {
        let mut result = Ok(());
        if self.more_udp {
            let (more, r) = self.recv_from(None, pool, out);
            self.more_udp = more;
            result = r;
        }
        for i in 0..self.peers.list.len() {
            if self.peers.list[i].readable {
                let (more, r) = self.recv_from(Some(i), pool, out);
                self.peers.list[i].readable = more;
                if result.is_ok() {
                    result = r;
                }
            }
        }
        result
    }

    fn read_packets(&mut self, pool: &mut BufPool, out: &mut Vec<PacketBuf>) -> io::Result<()> {
        let Some(packets) = self.packets.as_ref().filter(|_| self.more_packets) else {
            return Ok(());
        };
        // With a header, reads are held ahead of the turn, so that a packet of another flow
        // behind a bulk transfer's super-packets goes first, as the uring backend's do.
        let result = match &mut self.read_ahead {
            Some(ahead) => ahead.read(packets.as_fd(), pool, out, &mut self.stats),
            None => read_packet_batch(packets, self.batch, pool, out, &mut self.stats, &mut self.vnet),
        };
        self.more_packets = matches!(result, Ok(true));
        result.map(|_| ())
    }

    fn send_datagrams(&mut self, dgrams: &mut Vec<Datagram>, pool: &mut BufPool) -> io::Result<()> {
        self.calls.send(&self.udp, &mut self.peers, &mut self.gso, &mut self.stats, dgrams, pool);
        Ok(())
    }

    fn write_packets(&mut self, packets: &mut Vec<PacketBuf>, pool: &mut BufPool) -> io::Result<()> {
        // What the kernel answers at once (a ping's reply, a TCP acknowledgement) is there by
        // the time the write returns: the same turn's read takes it, without a sleep between.
        let Some(fd) = &self.packets else {
            return no_packet_side(packets, pool);
        };
        self.more_packets |= !packets.is_empty();
        write_packet_batch(fd, packets, pool, &mut self.stats, &mut self.vnet);
        Ok(())
    }

    fn replace_socket(&mut self, mut udp: UdpSocket, _pool: &mut BufPool) -> io::Result<()> {
        self.calls.set_gro(udp.enable_gro(&mut self.stats));
        self.gso = udp.supports_gso();
        self.udp = udp;
        self.readiness.reset();
        self.more_udp = true;
        // The peers' sockets move to the new port too. (Datagrams still queued on the old
        // ones were sent to the old port, which the link has left.)
        let (addrs, n) = self.peers.addrs();
        self.peers.update(&self.udp, [], drop)?;
        self.connect_peers(&addrs[..n])
    }

    fn connect_peers(&mut self, peers: &[SocketAddr]) -> io::Result<()> {
        // A new socket may already hold datagrams (it shares the port before it connects):
        // look at it in the next turn.
        let result = self.peers.update(&self.udp, peers.iter().copied(), drop);
        self.stats.peer_sockets = self.peers.list.len() as u64;
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
