//! WireGuard's cryptography for sitelink.
//!
//! * [`TransportKey`]: ChaCha20-Poly1305 (ring) sealing and opening transport messages in place
//!   in a [`PacketBuf`](sitelink_frame::PacketBuf), with WireGuard's nonce layout and padding.
//! * [`ReplayWindow`]: the sliding window of accepted counters.
//! * [`noise`]: the Noise IKpsk2 handshake in both roles, as values consumed step by step.
//! * [`cookie`]: MAC1, MAC2 and cookie replies.
//! * [`PrivateKey`], [`PublicKey`], [`PresharedKey`]: keys that erase themselves, keep out of
//!   `Debug`, compare in constant time and read and write base64 and hex.
//!
//! Nothing here reads a clock or makes a syscall: time is an argument, and randomness comes in
//! through the [`Random`] trait.

#![forbid(unsafe_code)]

mod aead;
pub mod cookie;
mod keys;
pub mod noise;
pub mod primitives;
mod replay;
mod rng;
mod tai64n;

pub use aead::{OpenError, SealError, TransportKey};
pub use keys::{KEY_LEN, KeyParseError, PresharedKey, PrivateKey, PublicKey};
pub use replay::{REJECT_AFTER_MESSAGES, ReplayError, ReplayWindow, WINDOW_SIZE};
pub use rng::Random;
pub use tai64n::{TIMESTAMP_GRANULARITY_NS, Tai64N};
