//! The sans-IO WireGuard engine of sitelink.
//!
//! A [`Device`] holds one identity and many peers. It consumes IP packets, UDP datagrams and
//! the time, and produces datagrams to send, packets to deliver and the next time it wants to
//! be woken; it never reads a clock, makes a syscall or spawns a thread. Any I/O can drive it:
//! io_uring, `recvmmsg`, an async runtime, or a test with a simulated clock and an in-memory
//! wire, so that every protocol behaviour (rekeys, retries, keepalives, roaming, replay) is
//! testable in milliseconds.
//!
//! See [`Device`] for the driving contract.

#![forbid(unsafe_code)]

mod batch;
mod config;
mod device;
mod peer;
mod ratelimit;
mod routing;
mod stats;

#[cfg(feature = "sim")]
pub mod sim;

pub use batch::CryptoBatch;
pub use config::{DeviceConfig, IpNet, IpNetError, PeerConfig, Timing};
pub use device::{
    BUSIEST_PEERS, Device, DeviceError, PathStats, PathSwitch, PathSwitchReason, PathTiming, PeerView,
    RANK_INTERVAL,
};
pub use peer::PeerId;
pub use ratelimit::RateLimiter;
pub use routing::AllowedIps;
pub use stats::{DeviceStats, DropCounts, DropReason, PeerStats};

pub use sitelink_crypto::{PresharedKey, PrivateKey, PublicKey, Random};
pub use sitelink_frame::{BufPool, Datagram, PacketBuf};
