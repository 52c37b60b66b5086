//! The only part of sitelink that talks to the kernel.
//!
//! * [`Tun`]: a TUN interface (created or attached by name, multi-queue capable, or an already
//!   open descriptor), and [`PacketPipe`], the same packet-at-a-time contract over a Unix
//!   datagram socket pair for applications that hand packets in and out themselves.
//! * [`UdpSocket`]: the dual-stack UDP socket with large buffers and options set up front.
//! * [`PacketIo`]: batched I/O of both, one trait with two backends: [`BackendKind::Uring`]
//!   (io_uring: reads, writes and sends submitted in batches, one enter per batch) and
//!   [`BackendKind::Mmsg`] (`recvmmsg`/`sendmmsg` with UDP GSO, and `poll`).
//!   [`open_backend`] picks io_uring and falls back to `mmsg` when the kernel or a seccomp
//!   profile refuses it, saying why once.
//!
//! The crate knows packet buffers ([`sitelink_frame`]), not the protocol. Every `unsafe`
//! block lives in the private `sys` module (and `sys::uring`), each with a `// SAFETY:` line.

mod mmsg;
mod sys;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use sitelink_frame::{BufPool, Datagram, PacketBuf};

pub use mmsg::MmsgIo;
pub use sys::uring::UringIo;

/// Helpers for tests of the crates above, which may not hold `unsafe` themselves.
pub mod testing {
    pub use crate::sys::counting::CountingAllocator;
}

/// Datagrams or packets moved per batch by default.
pub const DEFAULT_BATCH: usize = 64;

/// A TUN interface (layer 3, no packet information header): one IP packet per read or write.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
}

impl Tun {
    /// Creates the TUN interface `name`, or attaches to it if it exists. With `multi_queue`,
    /// each call attaches one more queue (one per worker). Needs CAP_NET_ADMIN.
    pub fn open(name: &str, multi_queue: bool) -> io::Result<Tun> {
        let (fd, name) = sys::tun_open(name, multi_queue)?;
        Ok(Tun { fd, name })
    }

    /// Takes an already open TUN descriptor (such as one handed over in `WG_TUN_FD`).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tun> {
        let name = sys::tun_name(fd.as_fd())?;
        Ok(Tun { fd, name })
    }

    /// Takes the descriptor number `fd`, inherited from a parent process.
    pub fn from_raw_inherited(fd: RawFd) -> io::Result<Tun> {
        Tun::from_fd(sys::adopt_fd(fd)?)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
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
/// interface. The link holds the other end (see [`PacketPipe::pair`]).
#[derive(Debug)]
pub struct PacketPipe {
    fd: OwnedFd,
}

impl PacketPipe {
    /// A connected pair: the application's end and the link's end. Packets up to 64 KiB.
    pub fn pair() -> io::Result<(PacketPipe, PacketFd)> {
        let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
        // A datagram socket pair keeps packet boundaries, as TUN does.
        let (a, b): (OwnedFd, OwnedFd) = (a.into(), b.into());
        Ok((PacketPipe { fd: a }, PacketFd(b)))
    }

    /// Hands one IP packet to the link, blocking while the link's queue is full.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        sys::write(self.fd.as_fd(), packet).map(|_| ())
    }

    /// Takes one IP packet from the link into `buf`, blocking until one comes (or until
    /// `timeout`, if [`set_read_timeout`](Self::set_read_timeout) set one). Returns its length.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.fd.as_fd(), buf)
    }

    /// Another handle on the same end (for a reader thread beside a writer).
    pub fn try_clone(&self) -> io::Result<PacketPipe> {
        Ok(PacketPipe { fd: self.fd.try_clone()? })
    }

    /// Makes [`recv`](Self::recv) give up with `WouldBlock` after `timeout`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        sys::set_recv_timeout(self.fd.as_fd(), timeout)
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
    /// Set `SO_REUSEPORT`, so that several workers share the port.
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
        Ok(UdpSocket { fd, ipv6, port })
    }

    /// The port the socket is bound to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the socket is IPv6 (dual-stack).
    pub fn is_ipv6(&self) -> bool {
        self.ipv6
    }

    /// Sets `SO_MARK`.
    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        sys::set_fwmark(self.fd.as_fd(), mark)
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

/// The system's text for an errno value.
pub fn errno_text(errno: i32) -> String {
    sys::errno_name(errno)
}

/// Whether an error from the TUN side means the device is gone (the interface was deleted),
/// so that a worker stops instead of retrying forever.
pub fn is_device_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADFD) | Some(libc::ENXIO) | Some(libc::ENODEV))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and the threads it starts afterwards, so
/// that [`wait_termination_signal`] receives them. Call it first thing in `main`.
pub fn block_termination_signals() -> io::Result<()> {
    sys::block_termination_signals()
}

/// Waits up to `timeout` for SIGINT, SIGTERM or SIGHUP; returns the signal number.
pub fn wait_termination_signal(timeout: Duration) -> Option<i32> {
    sys::wait_signal(timeout)
}

/// Takes ownership of descriptor `fd` inherited from a parent process (such as `WG_UAPI_FD`),
/// after checking that it is open.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    sys::adopt_fd(fd)
}
