//! The only part of sitelink that talks to the kernel.
//!
//! * [`Tun`]: a TUN interface (created or attached by name, multi-queue capable, or an already
//!   open descriptor), and [`PacketPipe`], the same packet-at-a-time contract over a Unix
//!   datagram socket pair for applications that hand packets in and out themselves.
//! * [`UdpSocket`]: the dual-stack UDP socket with large buffers and options set up front.
//! * [`PacketIo`]: batched I/O of both, one trait with two backends: [`BackendKind::Uring`]
//!   (io_uring: reads, writes and sends submitted in batches, one enter per batch) and
//!   [`BackendKind::Mmsg`] (`recvmmsg`/`sendmmsg` with UDP GSO, and `epoll`).
//!   [`open_backend`] picks io_uring and falls back to `mmsg` when the kernel or a seccomp
//!   profile refuses it, saying why once.
//!
//! The crate knows packet buffers ([`sitelink_frame`]), not the protocol. Every `unsafe`
//! block lives in the private `sys` module (and `sys::uring`), each with a `// SAFETY:` line;
//! the crate root denies `unsafe` everywhere else.

#![deny(unsafe_code)]

mod mmsg;
mod peers;
// Every `unsafe` of the crate is in `sys`; the rest may not hold any.
#[allow(unsafe_code)]
mod sys;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use sitelink_frame::{BufPool, Datagram, PacketBuf};

pub use mmsg::MmsgIo;
pub use peers::MAX_CONNECTED_PEERS;
pub use sys::adopt_inherited_fd;
pub use sys::uring::{DEFAULT_IDLE_AFTER, UringIo};

/// Helpers for tests of this crate and the ones above, which may not hold `unsafe`
/// themselves; only with the `testing` feature, never part of the API.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::sys::counting::CountingAllocator;

    /// How many `uring` backends were dropped with requests still in flight, their memory
    /// leaked rather than freed under the kernel (see [`UringIo`](crate::UringIo)'s `Drop`).
    pub fn uring_drops_leaked() -> u64 {
        crate::sys::uring::DROPS_LEAKED.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Datagrams or packets moved per batch by default.
pub const DEFAULT_BATCH: usize = 64;

/// A TUN interface (layer 3, no packet information header): one IP packet per read or write.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    multi_queue: bool,
}

impl Tun {
    /// Creates the TUN interface `name`, or attaches to it if it exists. With `multi_queue`,
    /// each call attaches one more queue (one per worker; see [`open_queue`](Self::open_queue)).
    /// Needs CAP_NET_ADMIN.
    pub fn open(name: &str, multi_queue: bool) -> io::Result<Tun> {
        let (fd, name) = sys::tun_open(name, multi_queue)?;
        Ok(Tun { fd, name, multi_queue })
    }

    /// Takes an already open TUN descriptor (such as one handed over in `WG_TUN_FD`).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tun> {
        let (name, multi_queue) = sys::tun_info(fd.as_fd())?;
        Ok(Tun { fd, name, multi_queue })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the interface was attached with `IFF_MULTI_QUEUE`, so that more queues can be
    /// attached to it.
    pub fn is_multi_queue(&self) -> bool {
        self.multi_queue
    }

    /// Attaches one more queue to this multi-queue interface: the kernel spreads the packets
    /// it hands to userspace over the queues by flow, keeping each flow on one queue.
    /// Fails with `InvalidInput` if the interface is not multi-queue.
    pub fn open_queue(&self) -> io::Result<Tun> {
        if !self.multi_queue {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the TUN interface is not multi-queue"));
        }
        Tun::open(&self.name, true)
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        sys::set_mtu(&self.name, mtu)
    }

    /// The interface MTU.
    pub fn mtu(&self) -> io::Result<u32> {
        sys::mtu(&self.name)
    }

    /// Brings the interface up.
    pub fn set_up(&self) -> io::Result<()> {
        sys::set_up(&self.name)
    }

    /// The descriptor, for a backend.
    pub fn into_packet_fd(self) -> PacketFd {
        PacketFd(self.fd)
    }
}

/// A descriptor that moves one IP packet per `read`/`write`: a TUN device or one end of a
/// [`PacketPipe`].
#[derive(Debug)]
pub struct PacketFd(OwnedFd);

impl AsFd for PacketFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The application's end of an embedded link: IP packets go in with [`send`](Self::send) and
/// come out with [`recv`](Self::recv), as they would through a TUN device, with no root and no
/// interface. The link holds the other ends (see [`PacketPipe::with_queues`]).
///
/// Like a multi-queue TUN device, a pipe has one queue per link worker: [`send`](Self::send)
/// picks the queue by the packet's flow ([`sitelink_frame::ip::flow_hash`]), so that each flow
/// stays on one worker and in order, and [`recv`](Self::recv) takes from every queue.
#[derive(Debug)]
pub struct PacketPipe {
    queues: Vec<OwnedFd>,
    /// Where [`recv`](Self::recv) looks first: queues take turns, so none starves.
    next_recv: std::sync::atomic::AtomicUsize,
    /// [`recv`](Self::recv)'s timeout in nanoseconds (`u64::MAX` for none), with several queues.
    read_timeout_ns: std::sync::atomic::AtomicU64,
}

impl PacketPipe {
    /// A connected pair: the application's end and the link's end. Packets up to 64 KiB.
    pub fn pair() -> io::Result<(PacketPipe, PacketFd)> {
        let (pipe, mut ends) = PacketPipe::with_queues(1)?;
        Ok((pipe, ends.pop().expect("one queue")))
    }

    /// The application's end with `queues` queues (1 to 64), and the link's end of each.
    pub fn with_queues(queues: usize) -> io::Result<(PacketPipe, Vec<PacketFd>)> {
        if !(1..=sys::POLL_MAX).contains(&queues) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a packet pipe has 1 to 64 queues"));
        }
        let mut app = Vec::with_capacity(queues);
        let mut link = Vec::with_capacity(queues);
        for _ in 0..queues {
            // A datagram socket pair keeps packet boundaries, as TUN does.
            let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
            app.push(OwnedFd::from(a));
            link.push(PacketFd(OwnedFd::from(b)));
        }
        let pipe = PacketPipe {
            queues: app,
            next_recv: Default::default(),
            read_timeout_ns: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        Ok((pipe, link))
    }

    /// The number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Hands one IP packet to the link, blocking while its queue is full.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let q = match self.queues.len() {
            1 => 0,
            n => sitelink_frame::ip::flow_hash(packet) as usize % n,
        };
        sys::write(self.queues[q].as_fd(), packet).map(|_| ())
    }

    /// Takes one IP packet from the link into `buf`, blocking until one comes (or until
    /// `timeout`, if [`set_read_timeout`](Self::set_read_timeout) set one, with `WouldBlock`).
    /// Returns its length.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.queues.len() == 1 {
            return sys::read(self.queues[0].as_fd(), buf);
        }
        let n = self.queues.len();
        let timeout_ns = self.read_timeout_ns.load(Relaxed);
        let deadline =
            (timeout_ns != u64::MAX).then(|| std::time::Instant::now() + Duration::from_nanos(timeout_ns));
        let mut ready = [false; sys::POLL_MAX];
        loop {
            let first = self.next_recv.fetch_add(1, Relaxed) % n;
            for i in (first..n).chain(0..first) {
                if let Some(len) = sys::recv_now(self.queues[i].as_fd(), buf)? {
                    return Ok(len);
                }
            }
            let wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(io::ErrorKind::WouldBlock.into()),
                },
            };
            let fds: [BorrowedFd<'_>; sys::POLL_MAX] =
                std::array::from_fn(|i| self.queues[i.min(n - 1)].as_fd());
            sys::poll(&fds[..n], &mut ready[..n], wait)?;
        }
    }

    /// Another handle on the same end (for a reader thread beside a writer).
    pub fn try_clone(&self) -> io::Result<PacketPipe> {
        use std::sync::atomic::Ordering::Relaxed;
        Ok(PacketPipe {
            queues: self.queues.iter().map(|q| q.try_clone()).collect::<io::Result<_>>()?,
            next_recv: Default::default(),
            read_timeout_ns: self.read_timeout_ns.load(Relaxed).into(),
        })
    }

    /// Makes [`recv`](Self::recv) give up with `WouldBlock` after `timeout`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let ns = timeout.map_or(u64::MAX, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX - 1));
        self.read_timeout_ns.store(ns, std::sync::atomic::Ordering::Relaxed);
        sys::set_recv_timeout(self.queues[0].as_fd(), timeout)
    }
}

/// Options for [`UdpSocket::bind`].
#[derive(Debug, Clone, Copy)]
pub struct UdpConfig {
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// `SO_MARK` for outgoing datagrams (0 for none).
    pub fwmark: u32,
    /// Send and receive buffer size asked of the kernel.
    pub buffer_bytes: u32,
    /// Listen on loopback only (for tests and the demo).
    pub loopback_only: bool,
    /// Set `SO_REUSEPORT`, so that several workers share the port, and so that the backend
    /// can give each peer a connected socket of its own on it ([`PacketIo::connect_peers`]).
    pub reuse_port: bool,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig { port: 0, fwmark: 0, buffer_bytes: 8 << 20, loopback_only: false, reuse_port: false }
    }
}

/// The UDP socket a link sends and receives WireGuard messages on: dual-stack where the kernel
/// allows it (IPv4 peers then appear as plain IPv4 addresses), else IPv4.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    ipv6: bool,
    port: u16,
    /// How it was bound: what a connected sibling on the same port needs.
    opts: sys::UdpOptions,
    loopback_only: bool,
}

impl UdpSocket {
    /// Binds a socket as `config` says.
    pub fn bind(config: UdpConfig) -> io::Result<UdpSocket> {
        let opts = sys::UdpOptions {
            port: config.port,
            fwmark: config.fwmark,
            buffer_bytes: config.buffer_bytes,
            reuse_port: config.reuse_port,
        };
        let (fd, ipv6) = sys::udp_bind(opts, config.loopback_only)?;
        let port = sys::local_port(fd.as_fd())?;
        Ok(UdpSocket {
            fd,
            ipv6,
            port,
            opts: sys::UdpOptions { port, ..opts },
            loopback_only: config.loopback_only,
        })
    }

    /// A socket on this one's port connected to `peer`: IPv4 for an IPv4 peer, IPv6-only for
    /// an IPv6 one, with the same buffers and mark. The kernel hands it that peer's datagrams
    /// (they no longer reach this socket) and finds them by its early demultiplexing, without
    /// a route lookup; sends on it reuse the route cached at `connect`. This socket must have
    /// been bound with `reuse_port` (else `EADDRINUSE`).
    pub fn connect_sibling(&self, peer: SocketAddr) -> io::Result<UdpSocket> {
        if !self.opts.reuse_port {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "the socket was bound without SO_REUSEPORT",
            ));
        }
        let fd = sys::udp_connected(self.opts, self.loopback_only, peer)?;
        Ok(UdpSocket {
            fd,
            ipv6: peer.is_ipv6(),
            port: self.port,
            opts: self.opts,
            loopback_only: self.loopback_only,
        })
    }

    /// The port the socket is bound to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the socket is IPv6 (dual-stack).
    pub fn is_ipv6(&self) -> bool {
        self.ipv6
    }

    /// Sets `SO_MARK` (sockets later made by [`connect_sibling`](Self::connect_sibling) get it too).
    pub fn set_fwmark(&mut self, mark: u32) -> io::Result<()> {
        sys::set_fwmark(self.fd.as_fd(), mark)?;
        self.opts.fwmark = mark;
        Ok(())
    }

    /// The receive buffer the kernel granted.
    pub fn recv_buffer_size(&self) -> io::Result<usize> {
        sys::recv_buffer_size(self.fd.as_fd())
    }

    /// Whether the kernel takes `UDP_SEGMENT` on this socket.
    pub fn supports_gso(&self) -> bool {
        sys::probe_udp_gso(self.fd.as_fd())
    }
}

impl AsFd for UdpSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Wakes a worker blocked in [`PacketIo::wait`] from another thread.
#[derive(Debug, Clone)]
pub struct Waker(Arc<OwnedFd>);

impl Waker {
    fn new() -> io::Result<Waker> {
        Ok(Waker(Arc::new(sys::eventfd()?)))
    }

    /// Wakes the worker.
    pub fn wake(&self) {
        sys::eventfd_signal(self.0.as_fd());
    }

    fn drain(&self) {
        sys::eventfd_drain(self.0.as_fd());
    }
}

/// Which batched I/O backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// io_uring: reads, writes and sends queued and submitted in batches.
    Uring,
    /// `recvmmsg`/`sendmmsg` (with UDP GSO when the kernel has it) and `poll`.
    Mmsg,
}

impl BackendKind {
    /// The backend's name, as configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Uring => "uring",
            BackendKind::Mmsg => "mmsg",
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" => Ok(BackendKind::Uring),
            "mmsg" => Ok(BackendKind::Mmsg),
            other => Err(format!("unknown backend {other:?} (uring or mmsg)")),
        }
    }
}

/// Counters of one backend: what moved, and every failure by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Datagrams received.
    pub udp_rx: u64,
    /// Datagrams sent.
    pub udp_tx: u64,
    /// Packets read from the TUN side.
    pub tun_rx: u64,
    /// Packets written to the TUN side.
    pub tun_tx: u64,
    /// Datagrams the kernel refused to send (unreachable destination, full buffer, ...).
    pub udp_send_errors: u64,
    /// Datagrams received larger than a buffer (dropped).
    pub udp_truncated: u64,
    /// Receive calls that failed with something other than "no data yet".
    pub udp_recv_errors: u64,
    /// Packets the TUN side refused.
    pub tun_write_errors: u64,
    /// Reads from the TUN side that failed.
    pub tun_read_errors: u64,
    /// UDP send system calls (or submissions) made: with GSO and batching, far fewer than
    /// datagrams.
    pub send_calls: u64,
    /// Peers with a connected socket of their own now ([`PacketIo::connect_peers`]): a level,
    /// not a count of events.
    pub peer_sockets: u64,
    /// Peer sockets closed because a send on them failed in a way that the socket itself
    /// causes (its source address left the host); the shared socket serves those peers.
    pub peer_sockets_stale: u64,
    /// Times the io_uring backend changed to readiness mode after the link went quiet.
    pub idle_entries: u64,
}

impl IoStats {
    /// Adds `other`'s counters to these (to sum the workers of one link).
    pub fn add(&mut self, other: &IoStats) {
        let IoStats {
            udp_rx,
            udp_tx,
            tun_rx,
            tun_tx,
            udp_send_errors,
            udp_truncated,
            udp_recv_errors,
            tun_write_errors,
            tun_read_errors,
            send_calls,
            peer_sockets,
            peer_sockets_stale,
            idle_entries,
        } = other;
        self.udp_rx += udp_rx;
        self.udp_tx += udp_tx;
        self.tun_rx += tun_rx;
        self.tun_tx += tun_tx;
        self.udp_send_errors += udp_send_errors;
        self.udp_truncated += udp_truncated;
        self.udp_recv_errors += udp_recv_errors;
        self.tun_write_errors += tun_write_errors;
        self.tun_read_errors += tun_read_errors;
        self.send_calls += send_calls;
        self.peer_sockets += peer_sockets;
        self.peer_sockets_stale += peer_sockets_stale;
        self.idle_entries += idle_entries;
    }
}

/// Batched packet I/O for one worker: datagrams on a UDP socket, packets on a TUN device or
/// pipe.
///
/// The contract: [`wait`](Self::wait) blocks until there may be input or the timeout passes;
/// the `recv`/`read` calls then take what is ready without blocking (up to one batch); the
/// `send`/`write` calls drain their vector, returning each buffer to the pool once the kernel
/// is done with it. Buffers come from, and go back to, the caller's pool.
pub trait PacketIo: Send {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Blocks until a datagram or packet may be ready, [`Waker::wake`] is called, or `timeout`
    /// passes.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()>;

    /// Moves received datagrams to `out` (up to one batch), without blocking.
    fn recv_datagrams(&mut self, pool: &mut BufPool, out: &mut Vec<Datagram>) -> io::Result<()>;

    /// Moves packets read from the TUN side to `out` (up to one batch), without blocking.
    fn read_packets(&mut self, pool: &mut BufPool, out: &mut Vec<PacketBuf>) -> io::Result<()>;

    /// Sends and drains `dgrams`. A datagram the kernel refuses is counted and dropped.
    fn send_datagrams(&mut self, dgrams: &mut Vec<Datagram>, pool: &mut BufPool) -> io::Result<()>;

    /// Writes and drains `packets` to the TUN side. A packet the kernel refuses is counted
    /// and dropped.
    fn write_packets(&mut self, packets: &mut Vec<PacketBuf>, pool: &mut BufPool) -> io::Result<()>;

    /// Replaces the UDP socket (the listen port changed).
    fn replace_socket(&mut self, udp: UdpSocket, pool: &mut BufPool) -> io::Result<()>;

    /// The bound UDP port.
    fn port(&self) -> u16;

    /// Gives each of `peers` (up to [`MAX_CONNECTED_PEERS`], the first ones) a socket of its
    /// own, connected to it on the backend's port ([`UdpSocket::connect_sibling`]): sends to a
    /// peer and its datagrams in then skip the kernel's per-datagram route lookups, which is
    /// most of what a userspace tunnel adds to an idle round trip on a small machine. Peers
    /// already connected keep their socket; the sockets of addresses no longer listed are
    /// closed; an empty list closes them all. Every other address is served by the shared
    /// socket, as is a peer whose socket cannot be made (the first such error is returned,
    /// after the rest are set up). Call it when the peers' endpoints change, not per turn.
    fn connect_peers(&mut self, peers: &[SocketAddr]) -> io::Result<()>;

    /// Sets `SO_MARK` on the socket.
    fn set_fwmark(&mut self, mark: u32) -> io::Result<()>;

    /// A handle that wakes this worker's [`wait`](Self::wait).
    fn waker(&self) -> Waker;

    /// The counters.
    fn stats(&self) -> &IoStats;
}

/// Opens the backend `kind` over `packets` and `udp`. If io_uring is asked for but cannot be
/// set up (an old kernel's ENOSYS, a container's EPERM), falls back to `mmsg` and returns the
/// reason as the second value, for the caller to log once.
pub fn open_backend(
    kind: BackendKind,
    packets: PacketFd,
    udp: UdpSocket,
    batch: usize,
) -> io::Result<(Box<dyn PacketIo>, Option<String>)> {
    let batch = batch.clamp(1, 1024);
    match kind {
        BackendKind::Mmsg => Ok((Box::new(MmsgIo::new(packets, udp, batch)?), None)),
        BackendKind::Uring => match sys::uring::probe() {
            Ok(()) => Ok((Box::new(UringIo::new(packets, udp, batch)?), None)),
            Err(e) => {
                let why = format!("io_uring unavailable ({e}); using the mmsg backend");
                Ok((Box::new(MmsgIo::new(packets, udp, batch)?), Some(why)))
            }
        },
    }
}

/// Whether this process runs as root (netns and TUN tests need it).
pub fn is_root() -> bool {
    sys::is_root()
}

/// Whether an error from the TUN side means the device is gone (the interface was deleted),
/// so that a worker stops instead of retrying forever.
pub fn is_device_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADFD) | Some(libc::ENXIO) | Some(libc::ENODEV))
}

/// Takes the descriptor a parent process handed over in environment variable `var` (such as
/// `WG_TUN_FD` or `WG_UAPI_FD`): `Ok(None)` if the variable is not set. Each variable can be
/// taken once per process (a second take is an error), so safe code cannot make two owners
/// of one descriptor this way; setting the variable after start is itself `unsafe`.
pub fn take_inherited_fd(var: &str) -> io::Result<Option<OwnedFd>> {
    match std::env::var(var) {
        Ok(value) => sys::take_numbered_fd(var, &value).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{var} is not a descriptor number")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn udp_packet(src_port: u16) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let udp = [(src_port >> 8) as u8, src_port as u8, 0x23, 0x28, 0, 12, 0, 0, 1, 2, 3, 4];
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let n = sitelink_frame::ip::build_ipv4(&mut buf, a, b, 17, &udp).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn a_multi_queue_pipe_keeps_each_flow_on_one_queue_and_receives_from_all() {
        let (pipe, ends) = PacketPipe::with_queues(3).unwrap();
        assert_eq!(pipe.queues(), 3);
        let mut queue_of_flow = Vec::new();
        let mut buf = [0u8; 128];
        for port in 1000..1016u16 {
            for _ in 0..2 {
                pipe.send(&udp_packet(port)).unwrap();
                let q = (0..3)
                    .find(|&q| matches!(sys::recv_now(ends[q].as_fd(), &mut buf), Ok(Some(_))))
                    .expect("the packet is on some queue");
                queue_of_flow.push((port, q));
            }
        }
        for pair in queue_of_flow.chunks(2) {
            assert_eq!(pair[0].1, pair[1].1, "flow {} moved between queues", pair[0].0);
        }
        let used: std::collections::HashSet<usize> = queue_of_flow.iter().map(|(_, q)| *q).collect();
        assert!(used.len() > 1, "16 flows all on one queue");

        // The link may write on any queue; the application receives from every one.
        for (q, end) in ends.iter().enumerate() {
            sys::write(end.as_fd(), &[q as u8; 5]).unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            let n = pipe.recv(&mut buf).unwrap();
            assert_eq!(n, 5);
            seen.push(buf[0]);
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2]);
        pipe.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let err = pipe.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(PacketPipe::with_queues(0).is_err() && PacketPipe::with_queues(65).is_err());
    }
}
