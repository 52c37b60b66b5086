//! One peer's state: keypairs, handshake, timers, staged packets and counters.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sitelink_crypto::cookie::MacSealer;
use sitelink_crypto::noise::{InitiatorState, PeerKeys, SessionKeys};
use sitelink_crypto::{ReplayWindow, Tai64N, TransportKey};
use sitelink_frame::PacketBuf;

use crate::config::{IpNet, Timing};
use crate::stats::PeerStats;

/// Names a peer of a [`Device`](crate::Device). Stable until the peer is removed; then it may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub(crate) u32);

impl PeerId {
    /// The id as an index (dense, from 0).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The timers of a peer (WireGuard whitepaper, section 6), indexing [`Peer::timers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Timer {
    /// Resend the initiation if no response came (REKEY_TIMEOUT plus jitter).
    RetransmitHandshake,
    /// Send a keepalive if data was received and nothing sent back (KEEPALIVE_TIMEOUT).
    SendKeepalive,
    /// Start a handshake if data was sent and nothing came back.
    NewHandshake,
    /// Erase all keys after 3 x REJECT_AFTER_TIME without a new session.
    ZeroKeyMaterial,
    /// Configured persistent keepalive.
    PersistentKeepalive,
    /// Judge and probe the paths of a peer with several endpoints (see `device/paths.rs`).
    PathProbe,
}

impl Timer {
    pub(crate) const ALL: [Timer; 6] = [
        Timer::RetransmitHandshake,
        Timer::SendKeepalive,
        Timer::NewHandshake,
        Timer::ZeroKeyMaterial,
        Timer::PersistentKeepalive,
        Timer::PathProbe,
    ];
}

/// A transport keypair: one key each way, the sending counter and the replay window.
///
/// The keys are shared (by reference count) with the [`CryptoBatch`](crate::CryptoBatch)es
/// that seal and open under them outside the device; the counter and the window stay here.
pub(crate) struct Keypair {
    pub(crate) send: Arc<TransportKey>,
    pub(crate) recv: Arc<TransportKey>,
    pub(crate) send_counter: u64,
    pub(crate) replay: ReplayWindow,
    pub(crate) local_index: u32,
    pub(crate) remote_index: u32,
    pub(crate) created: Instant,
    pub(crate) initiator: bool,
}

impl Keypair {
    pub(crate) fn new(keys: &SessionKeys, now: Instant) -> Self {
        Keypair {
            send: Arc::new(TransportKey::new(&keys.send)),
            recv: Arc::new(TransportKey::new(&keys.recv)),
            send_counter: 0,
            replay: ReplayWindow::new(),
            local_index: keys.local_index,
            remote_index: keys.remote_index,
            created: now,
            initiator: keys.initiator,
        }
    }

    /// Whether this keypair may still send at `now`.
    #[inline]
    pub(crate) fn can_send(&self, now: Instant, timing: &Timing) -> bool {
        now.saturating_duration_since(self.created) < timing.reject_after_time
            && self.send_counter < timing.reject_after_messages
    }

    /// Whether this keypair may still receive at `now`.
    #[inline]
    pub(crate) fn can_receive(&self, now: Instant, timing: &Timing) -> bool {
        now.saturating_duration_since(self.created) < timing.reject_after_time
            && self.replay.next_expected() < timing.reject_after_messages
    }

    /// Takes the next sending counter.
    #[inline]
    pub(crate) fn next_counter(&mut self) -> u64 {
        let counter = self.send_counter;
        self.send_counter += 1;
        counter
    }
}

/// Which of a peer's three keypairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Next,
    Current,
    Previous,
}

/// An initiation we sent and await the response to.
pub(crate) struct Pending {
    pub(crate) state: InitiatorState,
}

/// One peer.
pub(crate) struct Peer {
    pub(crate) keys: PeerKeys,
    pub(crate) sealer: MacSealer,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) allowed_ips: Vec<IpNet>,
    pub(crate) persistent_keepalive: Option<Duration>,

    /// The initiation awaiting its response, boxed (only a handshake in flight needs it).
    pub(crate) pending: Option<Box<Pending>>,
    pub(crate) handshake_attempts: u32,
    pub(crate) last_initiation_sent: Option<Instant>,
    pub(crate) last_initiation_consumed: Option<Instant>,
    pub(crate) greatest_timestamp: Option<Tai64N>,

    /// The three keypairs, boxed: a keypair (keys, replay window) is about 600 bytes, and a
    /// hub's idle peers hold none, so a peer costs a pointer each until it has a session.
    pub(crate) next: Option<Box<Keypair>>,
    pub(crate) current: Option<Box<Keypair>>,
    pub(crate) previous: Option<Box<Keypair>>,

    pub(crate) timers: [Option<Instant>; Timer::ALL.len()],
    /// The time of each timer's entry in the device's timer queue, if it has one: never later
    /// than the timer itself, so the queue's head is never later than the earliest timer of
    /// any peer. A timer pushed back keeps its entry (no queue work per packet).
    pub(crate) queued: [Option<Instant>; Timer::ALL.len()],
    /// Told apart from a later peer with the same id by the device's timer queue.
    pub(crate) epoch: u32,
    pub(crate) need_another_keepalive: bool,
    pub(crate) sent_lastminute_handshake: bool,

    pub(crate) staged: VecDeque<PacketBuf>,
    pub(crate) stats: PeerStats,
    /// Transport bytes since the last busy-peer ranking (see `device/busy.rs`).
    pub(crate) busy_bytes: u64,
    /// On the device's list of peers active since the last ranking.
    pub(crate) busy_listed: bool,
    /// The peer's paths when it has several endpoints (see `device/paths.rs`).
    pub(crate) paths: crate::device::Paths,
    /// When data (not a keepalive) last went either way: probing runs while it is recent.
    pub(crate) last_data_at: Option<Instant>,
}

impl Peer {
    pub(crate) fn new(keys: PeerKeys) -> Self {
        Peer {
            sealer: MacSealer::new(keys.public_key()),
            keys,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
            pending: None,
            handshake_attempts: 0,
            last_initiation_sent: None,
            last_initiation_consumed: None,
            greatest_timestamp: None,
            next: None,
            current: None,
            previous: None,
            timers: [None; Timer::ALL.len()],
            queued: [None; Timer::ALL.len()],
            epoch: 0,
            need_another_keepalive: false,
            sent_lastminute_handshake: false,
            staged: VecDeque::new(),
            stats: PeerStats::default(),
            busy_bytes: 0,
            busy_listed: false,
            paths: crate::device::Paths::default(),
            last_data_at: None,
        }
    }

    #[inline]
    pub(crate) fn timer(&self, t: Timer) -> Option<Instant> {
        self.timers[t as usize]
    }

    /// Sets timer `t` to `at`. Returns whether the device must queue an entry for it (none
    /// is queued at or before `at`); the entry's time is then recorded as queued.
    #[inline]
    #[must_use]
    pub(crate) fn set_timer(&mut self, t: Timer, at: Instant) -> bool {
        self.timers[t as usize] = Some(at);
        let queue = self.queued[t as usize].is_none_or(|q| q > at);
        if queue {
            self.queued[t as usize] = Some(at);
        }
        queue
    }

    #[inline]
    pub(crate) fn cancel_timer(&mut self, t: Timer) {
        self.timers[t as usize] = None;
    }

    /// Which keypair has local index `index`.
    #[inline]
    pub(crate) fn slot_of(&self, index: u32) -> Option<Slot> {
        let is = |kp: &Option<Box<Keypair>>| kp.as_ref().is_some_and(|k| k.local_index == index);
        if is(&self.current) {
            Some(Slot::Current)
        } else if is(&self.previous) {
            Some(Slot::Previous)
        } else if is(&self.next) {
            Some(Slot::Next)
        } else {
            None
        }
    }

    #[inline]
    pub(crate) fn keypair(&self, slot: Slot) -> Option<&Keypair> {
        match slot {
            Slot::Next => self.next.as_deref(),
            Slot::Current => self.current.as_deref(),
            Slot::Previous => self.previous.as_deref(),
        }
    }

    #[inline]
    pub(crate) fn keypair_mut(&mut self, slot: Slot) -> Option<&mut Keypair> {
        match slot {
            Slot::Next => self.next.as_deref_mut(),
            Slot::Current => self.current.as_deref_mut(),
            Slot::Previous => self.previous.as_deref_mut(),
        }
    }

    /// The local indices this peer holds (keypairs and the pending handshake), for freeing.
    pub(crate) fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        [&self.next, &self.current, &self.previous]
            .into_iter()
            .filter_map(|k| k.as_ref().map(|k| k.local_index))
            .chain(self.pending.as_ref().map(|p| p.state.local_index()))
    }
}

#[cfg(test)]
mod tests {
    /// A hub holds one `Peer` per site, most of them idle: keep the inline size small (the
    /// keypairs, about 600 bytes each, are boxed and exist only with a session).
    #[test]
    fn an_idle_peer_stays_under_a_kibibyte_inline() {
        let size = std::mem::size_of::<super::Peer>();
        assert!(size <= 1024, "Peer is {size} bytes");
    }
}
