//! What a backend is: the [`PacketIo`] contract every backend keeps, and their names.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use sitelink_frame::{BufPool, Datagram, PacketBuf};

use crate::socket::UdpSocket;
use crate::stats::IoStats;
use crate::waker::Waker;

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

    /// Hands the kernel what the sends so far have queued, when the backend queues them (the
    /// uring backend submits at its next [`wait`](Self::wait) otherwise); a no-op where sends
    /// go out as they are made.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Writes and drains `packets` to the TUN side. A packet the kernel refuses is counted
    /// and dropped.
    fn write_packets(&mut self, packets: &mut Vec<PacketBuf>, pool: &mut BufPool) -> io::Result<()>;

    /// Replaces the UDP socket (the listen port changed).
    fn replace_socket(&mut self, udp: UdpSocket, pool: &mut BufPool) -> io::Result<()>;

    /// The bound UDP port.
    fn port(&self) -> u16;

    /// Gives each of `peers` (up to [`MAX_CONNECTED_PEERS`](crate::MAX_CONNECTED_PEERS), the first ones) a socket of its
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

/// What `write_packets` does on a backend without a packet side: the buffers go back to the
/// pool, and the caller hears that it has the wrong backend.
pub(crate) fn no_packet_side(packets: &mut Vec<PacketBuf>, pool: &mut BufPool) -> io::Result<()> {
    if packets.is_empty() {
        return Ok(());
    }
    packets.drain(..).for_each(|b| pool.put(b));
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "this backend has no packet side (packets move in process)",
    ))
}
