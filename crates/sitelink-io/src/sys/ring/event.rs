//! What the ring's completions bring its owner's caller.

use sitelink_frame::{Datagram, PacketBuf};

/// What a completion brought, handed to [`Ring::reap`](super::Ring::reap)'s caller.
#[derive(Debug)]
pub(crate) enum Event {
    /// The TUN read delivered a packet.
    Packet(PacketBuf),
    /// The TUN read failed with this errno (not counting cancellation, `EAGAIN`, `ENOBUFS`).
    ReadFailed(i32),
    /// A TUN write completed (its buffers went to the done list).
    Written {
        /// The kernel's result: bytes, or a negative errno.
        result: i32,
        /// The packets it carried (more than one: a coalesced run).
        packets: usize,
    },
    /// A datagram arrived (from `Datagram::addr`).
    Received(Datagram),
    /// With UDP GRO: socket `id` (0: the shared one) has input to receive.
    Readable(u32),
    /// A datagram was larger than the buffers (dropped).
    Truncated,
    /// A receive failed (other than by cancellation or `ENOBUFS`).
    RecvFailed,
    /// A send of `datagrams` datagrams on socket `socket` completed with `result` (bytes, or
    /// a negative errno); its buffers went to the done list.
    Sent {
        /// The socket's id (0: the shared socket).
        socket: u32,
        /// How many datagrams the send carried.
        datagrams: usize,
        /// The kernel's result.
        result: i32,
    },
    /// The waker's descriptor became readable.
    Woken,
}
