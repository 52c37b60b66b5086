//! The link's UDP socket, and its connected siblings for peers.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

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
    /// can give each peer a connected socket of its own on it
    /// ([`PacketIo::connect_peers`](crate::PacketIo::connect_peers)).
    pub reuse_port: bool,
    /// Let the backend turn UDP GRO on (`UDP_GRO`), so that a run of datagrams from one sender
    /// comes in with one receive (the backends cut it up; a plain reader of the socket never
    /// sees runs, as the socket itself is bound without it).
    pub gro: bool,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            port: 0,
            fwmark: 0,
            buffer_bytes: 8 << 20,
            loopback_only: false,
            reuse_port: false,
            gro: true,
        }
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
    /// The backend may turn GRO on ([`UdpConfig::gro`]).
    gro_wanted: bool,
}

impl UdpSocket {
    /// Binds a socket as `config` says.
    pub fn bind(config: UdpConfig) -> io::Result<UdpSocket> {
        let opts = sys::UdpOptions {
            port: config.port,
            fwmark: config.fwmark,
            buffer_bytes: config.buffer_bytes,
            reuse_port: config.reuse_port,
            gro: false,
        };
        let (fd, ipv6) = sys::udp_bind(opts, config.loopback_only)?;
        let port = sys::local_port(fd.as_fd())?;
        Ok(UdpSocket {
            fd,
            ipv6,
            port,
            opts: sys::UdpOptions { port, ..opts },
            loopback_only: config.loopback_only,
            gro_wanted: config.gro,
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
            gro_wanted: self.gro_wanted,
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

    /// Turns UDP GRO on (`UDP_GRO`) if the configuration lets it, for this socket and the
    /// siblings made from it later: a receive may then bring a run of datagrams in one
    /// buffer, which only a backend that reads the segment size may do (the backends turn it
    /// on themselves). Returns whether it is on; a refusal is counted in `stats` and logged
    /// once per process.
    pub(crate) fn enable_gro(&mut self, stats: &mut crate::IoStats) -> bool {
        if !self.gro_wanted {
            return false;
        }
        match sys::set_udp_gro(self.fd.as_fd()) {
            Ok(()) => {
                self.opts.gro = true;
                true
            }
            Err(e) => {
                stats.udp_gro_refused = 1;
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::warn!("UDP GRO refused by the kernel ({e}); receiving datagrams one by one")
                });
                false
            }
        }
    }

    /// Whether UDP GRO is on.
    pub fn gro(&self) -> bool {
        self.opts.gro
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
