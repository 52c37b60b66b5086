//! Statistics: traffic counters per peer and drop counters by reason.

use std::fmt;
use std::time::Duration;

/// Why the engine dropped a datagram or packet. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum DropReason {
    /// A datagram that is no WireGuard message: bad type, reserved bytes or length.
    Malformed,
    /// A transport message naming no keypair we hold.
    UnknownReceiverIndex,
    /// A transport message for a keypair past its age or message limit.
    ExpiredKeypair,
    /// A transport counter seen before, or too old for the replay window.
    Replay,
    /// A transport message that did not authenticate.
    DecryptFailed,
    /// A decrypted packet that is not a well-formed IP packet.
    InnerMalformed,
    /// A decrypted packet whose source is not among the sending peer's allowed IPs.
    SourceNotAllowed,
    /// An outbound packet whose destination routes to no peer.
    NoRoute,
    /// An outbound packet that is not a well-formed IP packet.
    OutboundMalformed,
    /// An outbound packet for a peer with no known endpoint.
    NoEndpoint,
    /// A packet waiting for a handshake, pushed out by newer ones.
    StagedOverflow,
    /// Packets waiting for a handshake that never completed.
    HandshakeGaveUp,
    /// An outbound packet with no tailroom for padding and tag.
    NoTailroom,
    /// A handshake message with a wrong mac1.
    BadMac1,
    /// A handshake message refused by the per-source rate limit under load.
    RateLimited,
    /// A handshake message answered with a cookie reply instead of being processed.
    CookieRequired,
    /// A handshake initiation from a public key that is not a peer.
    UnknownPeer,
    /// A handshake message that failed to authenticate.
    HandshakeDecryptFailed,
    /// A handshake initiation whose timestamp is not newer than the last one accepted.
    StaleTimestamp,
    /// A handshake initiation arriving too soon after the last one from the same peer.
    InitiationFlood,
    /// A handshake response or cookie reply naming no handshake in progress.
    UnexpectedHandshake,
    /// A cookie reply that failed to authenticate.
    CookieDecryptFailed,
}

impl DropReason {
    /// Every reason, in order.
    pub const ALL: [DropReason; 22] = [
        DropReason::Malformed,
        DropReason::UnknownReceiverIndex,
        DropReason::ExpiredKeypair,
        DropReason::Replay,
        DropReason::DecryptFailed,
        DropReason::InnerMalformed,
        DropReason::SourceNotAllowed,
        DropReason::NoRoute,
        DropReason::OutboundMalformed,
        DropReason::NoEndpoint,
        DropReason::StagedOverflow,
        DropReason::HandshakeGaveUp,
        DropReason::NoTailroom,
        DropReason::BadMac1,
        DropReason::RateLimited,
        DropReason::CookieRequired,
        DropReason::UnknownPeer,
        DropReason::HandshakeDecryptFailed,
        DropReason::StaleTimestamp,
        DropReason::InitiationFlood,
        DropReason::UnexpectedHandshake,
        DropReason::CookieDecryptFailed,
    ];

    /// A short stable name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownReceiverIndex => "unknown_receiver_index",
            DropReason::ExpiredKeypair => "expired_keypair",
            DropReason::Replay => "replay",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::NoRoute => "no_route",
            DropReason::OutboundMalformed => "outbound_malformed",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::StagedOverflow => "staged_overflow",
            DropReason::HandshakeGaveUp => "handshake_gave_up",
            DropReason::NoTailroom => "no_tailroom",
            DropReason::BadMac1 => "bad_mac1",
            DropReason::RateLimited => "rate_limited",
            DropReason::CookieRequired => "cookie_required",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::HandshakeDecryptFailed => "handshake_decrypt_failed",
            DropReason::StaleTimestamp => "stale_timestamp",
            DropReason::InitiationFlood => "initiation_flood",
            DropReason::UnexpectedHandshake => "unexpected_handshake",
            DropReason::CookieDecryptFailed => "cookie_decrypt_failed",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Drop counters, one per [`DropReason`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// Counts one drop.
    #[inline]
    pub fn add(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }

    /// Counts `n` drops.
    #[inline]
    pub fn add_n(&mut self, reason: DropReason, n: u64) {
        self.0[reason as usize] += n;
    }

    /// Drops counted for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// All drops counted.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The non-zero counters.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r))).filter(|(_, n)| *n > 0)
    }
}

impl fmt::Debug for DropCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter().map(|(r, n)| (r.name(), n))).finish()
    }
}

/// Device-wide counters.
#[derive(Debug, Clone, Default)]
pub struct DeviceStats {
    /// Every drop, by reason (peer-attributable drops are also counted on the peer).
    pub drops: DropCounts,
    /// Cookie replies sent.
    pub cookie_replies_sent: u64,
    /// Handshake initiations sent.
    pub handshake_initiations_sent: u64,
    /// Handshake responses sent.
    pub handshake_responses_sent: u64,
    /// Sessions established (handshakes completed, either role).
    pub sessions_established: u64,
}

/// Counters of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerStats {
    /// Bytes of WireGuard messages sent to the peer (headers and tags included, as `wg` shows).
    pub tx_bytes: u64,
    /// Bytes of authenticated WireGuard messages received from the peer.
    pub rx_bytes: u64,
    /// Inner packets sent.
    pub tx_packets: u64,
    /// Inner packets delivered.
    pub rx_packets: u64,
    /// Keepalives sent.
    pub keepalives_sent: u64,
    /// Keepalives received.
    pub keepalives_received: u64,
    /// Handshakes completed with this peer.
    pub handshakes_completed: u64,
    /// Handshake initiations sent to this peer (retries included).
    pub handshake_initiations_sent: u64,
    /// Time since the Unix epoch of the last completed handshake, as `wg` shows it.
    pub last_handshake: Option<Duration>,
    /// Drops attributable to this peer, by reason.
    pub drops: DropCounts,
}
