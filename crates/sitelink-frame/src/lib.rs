//! Packet memory and wire formats for sitelink.
//!
//! This crate knows how packets live in memory and how WireGuard's messages look on the wire;
//! it knows nothing of keys, peers, clocks or sockets.
//!
//! * [`PacketBuf`] is one piece of packet memory with *headroom* before the data (room for the
//!   16-byte transport header, and more for a virtio-net header) and *tailroom* after it (room
//!   for padding and the 16-byte AEAD tag), so that a packet is read, sealed and sent from one
//!   allocation. [`BufPool`] recycles them so that the steady state allocates nothing.
//! * [`wire`] has typed zero-copy views of the four WireGuard message types.
//! * [`ip`] peeks at the inner IPv4/IPv6 header of a decrypted packet.
//! * [`offload`] splits TCP/UDP super-packets from a TUN device with offloads into segments,
//!   with the Internet checksum and the virtio-net header.
//!
//! # Contract: no panics on input
//! Every function that reads bytes from outside checks lengths once, up front, and returns a
//! typed error ([`FrameError`], [`ip::IpError`]); once a view has been made by its
//! `new_checked` constructor, none of its accessors can panic.

#![forbid(unsafe_code)]

mod buf;
pub mod ip;
pub mod offload;
pub mod wire;

pub use buf::{BufPool, DEFAULT_HEADROOM, DEFAULT_TAILROOM, Datagram, PacketBuf};

/// Errors from parsing or building packet memory and wire messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The message is shorter than its type requires.
    #[error("message too short: {len} bytes, need {need}")]
    Truncated {
        /// Length received.
        len: usize,
        /// Length the message type requires.
        need: usize,
    },
    /// A fixed-size message had the wrong length.
    #[error("bad length for message type {ty}: {len} bytes, expected {expected}")]
    BadLength {
        /// Message type byte.
        ty: u8,
        /// Length received.
        len: usize,
        /// Length the message type requires.
        expected: usize,
    },
    /// The type byte names no WireGuard message.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Bytes 1..4 of the header, which must be zero, were not.
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    /// A buffer had too little headroom to prepend a header.
    #[error("not enough headroom: have {have}, need {need}")]
    NoHeadroom {
        /// Headroom available.
        have: usize,
        /// Headroom needed.
        need: usize,
    },
    /// A buffer had too little tailroom to append padding or a tag.
    #[error("not enough tailroom: have {have}, need {need}")]
    NoTailroom {
        /// Tailroom available.
        have: usize,
        /// Tailroom needed.
        need: usize,
    },
}
