//! Connected per-peer sockets, kept the same way by both backends.
//!
//! A datagram to or from an unconnected socket costs the kernel a route lookup: on a send to
//! find the way out, on a receive to find that the destination is local. A socket connected
//! to the peer skips both: the route is cached at `connect`, and the kernel's early
//! demultiplexing finds the socket (and its cached input route) from the datagram's addresses
//! before any lookup. On the 2-core test machine that is about 25 µs per round trip, most of
//! what a userspace tunnel adds to an idle ping. So each backend gives the link's peers a
//! socket each (up to [`MAX_CONNECTED_PEERS`]), on the link's port beside the shared socket,
//! which still receives everything else (handshakes from new addresses, roaming peers).

use std::io;
use std::net::SocketAddr;

use crate::socket::UdpSocket;

/// At most this many peers get a connected socket of their own (per worker); the others are
/// served by the shared socket. With the backend's own three descriptors it stays within what
/// the `mmsg` backend polls at once.
pub const MAX_CONNECTED_PEERS: usize = 32;

/// Whether a send error on a connected socket means the socket itself has gone stale: its
/// source address was taken at `connect`, and when that address leaves the host (the site's
/// uplink is renumbered) every send fails, while the shared socket would pick a new source.
/// The peer is then better served by the shared socket, whose datagrams also let the other end
/// see the new address.
pub(crate) fn is_stale(errno: i32) -> bool {
    matches!(
        errno,
        libc::EINVAL
            | libc::EADDRNOTAVAIL
            | libc::ENETUNREACH
            | libc::EHOSTUNREACH
            | libc::ENETDOWN
            | libc::ENODEV
    )
}

/// One peer's connected socket.
#[derive(Debug)]
pub(crate) struct PeerSocket {
    pub(crate) addr: SocketAddr,
    pub(crate) sock: UdpSocket,
    /// Names the socket in io_uring user data; never 0, which is the shared socket.
    pub(crate) id: u32,
    /// `mmsg`: datagrams may be waiting on the socket (it was readable, or is new).
    pub(crate) readable: bool,
}

/// The connected sockets of one backend.
#[derive(Debug)]
pub(crate) struct PeerSockets {
    pub(crate) list: Vec<PeerSocket>,
    next_id: u32,
}

impl PeerSockets {
    pub(crate) fn new() -> PeerSockets {
        PeerSockets { list: Vec::with_capacity(MAX_CONNECTED_PEERS), next_id: 0 }
    }

    /// The index of the socket connected to `addr`, if any. (A linear scan: the list is short,
    /// and for the usual one or two peers it is one or two comparisons.)
    #[inline]
    pub(crate) fn find(&self, addr: &SocketAddr) -> Option<usize> {
        self.list.iter().position(|p| p.addr == *addr)
    }

    /// Sets `SO_MARK` on every connected socket.
    pub(crate) fn set_fwmark(&mut self, mark: u32) -> io::Result<()> {
        self.list.iter_mut().try_for_each(|p| p.sock.set_fwmark(mark))
    }

    /// The addresses connected now: the first `n` of the array.
    pub(crate) fn addrs(&self) -> ([SocketAddr; MAX_CONNECTED_PEERS], usize) {
        let unused = SocketAddr::from(([0, 0, 0, 0], 0));
        let out = std::array::from_fn(|i| self.list.get(i).map_or(unused, |p| p.addr));
        (out, self.list.len())
    }

    /// Makes the list match the first [`MAX_CONNECTED_PEERS`] distinct addresses of `peers`:
    /// sockets no longer wanted are handed to `gone` (which closes them, or holds them until
    /// the kernel is done with them), and new ones are connected beside `main`, marked
    /// `readable` (they may already hold datagrams). Returns the first connect error, after trying every address.
    pub(crate) fn update(
        &mut self,
        main: &UdpSocket,
        peers: impl IntoIterator<Item = SocketAddr>,
        mut gone: impl FnMut(PeerSocket),
    ) -> io::Result<()> {
        let mut wanted = [None; MAX_CONNECTED_PEERS];
        let mut n = 0;
        for addr in peers {
            if n == MAX_CONNECTED_PEERS {
                break;
            }
            if !wanted[..n].contains(&Some(addr)) {
                wanted[n] = Some(addr);
                n += 1;
            }
        }
        let wanted = &wanted[..n];
        let mut i = 0;
        while i < self.list.len() {
            if wanted.contains(&Some(self.list[i].addr)) {
                i += 1;
            } else {
                gone(self.list.swap_remove(i));
            }
        }
        let mut first_error = None;
        for addr in wanted.iter().flatten() {
            if self.find(addr).is_some() {
                continue;
            }
            match main.connect_sibling(*addr) {
                Ok(sock) => {
                    self.next_id = self.next_id.checked_add(1).unwrap_or(1);
                    self.list.push(PeerSocket { addr: *addr, sock, id: self.next_id, readable: true });
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
