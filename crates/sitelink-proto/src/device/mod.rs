//! The [`Device`]: many peers, one identity, driven by packets, datagrams and the time.
//!
//! This file holds the state and what every part shares (the index table, buffers, lookups
//! that cannot panic); the methods live by responsibility: [`configure`] (identity, peers,
//! keys, routes), [`datapath`] (encapsulate, decapsulate, complete), [`handshake`]
//! (initiations, responses, cookies) and [`timers`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sitelink_crypto::cookie::MacChecker;
use sitelink_crypto::noise::Identity;
use sitelink_crypto::{PresharedKey, PublicKey, Random};
use sitelink_frame::wire;
use sitelink_frame::{BufPool, PacketBuf};

use crate::batch::CryptoBatch;
use crate::config::{DeviceConfig, IpNet};
use crate::peer::{Peer, PeerId};
use crate::ratelimit::RateLimiter;
use crate::routing::AllowedIps;
use crate::stats::{DeviceStats, DropReason, PeerStats};

pub use busy::{BUSIEST_PEERS, RANK_INTERVAL};
pub(crate) use paths::Paths;
pub use paths::{PathStats, PathSwitch, PathSwitchReason, PathTiming};

mod busy;
mod configure;
mod datapath;
mod handshake;
mod paths;
mod timers;

/// Errors of the control-path methods.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// No peer has this id.
    #[error("no such peer")]
    NoSuchPeer,
    /// A peer cannot have the device's own public key.
    #[error("a peer cannot have the device's own public key")]
    OwnPublicKey,
}

/// Receiver indices are random, so a multiplicative hash spreads them well and costs one
/// multiply (SipHash would cost more per packet than the rest of the lookup).
#[derive(Default)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IndexMap = HashMap<u32, PeerId, BuildHasherDefault<IndexHasher>>;

/// Handshake messages per second, to tell when the device is under load.
#[derive(Debug, Default)]
struct LoadMeter {
    window_start: Option<Instant>,
    count: u32,
    under_load_until: Option<Instant>,
}

impl LoadMeter {
    fn record(&mut self, now: Instant, threshold: u32) -> bool {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window_start = Some(now);
                self.count = 0;
            }
        }
        self.count = self.count.saturating_add(1);
        if self.count > threshold {
            self.under_load_until = Some(now + Duration::from_secs(1));
        }
        self.under_load_until.is_some_and(|until| now < until)
    }
}

/// A read-only view of one peer.
#[derive(Clone, Copy)]
pub struct PeerView<'a> {
    peer: &'a Peer,
    id: PeerId,
}

impl std::fmt::Debug for PeerView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerView")
            .field("id", &self.id)
            .field("public_key", self.public_key())
            .field("endpoint", &self.endpoint())
            .field("allowed_ips", &self.allowed_ips())
            .finish_non_exhaustive()
    }
}

impl<'a> PeerView<'a> {
    /// The peer's id.
    pub fn id(&self) -> PeerId {
        self.id
    }
    /// The peer's public key.
    pub fn public_key(&self) -> &'a PublicKey {
        self.peer.keys.public_key()
    }
    /// The preshared key (all zeros when none).
    pub fn preshared_key(&self) -> &'a PresharedKey {
        self.peer.keys.preshared_key()
    }
    /// The current endpoint.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.peer.endpoint
    }
    /// The allowed IPs.
    pub fn allowed_ips(&self) -> &'a [IpNet] {
        &self.peer.allowed_ips
    }
    /// The persistent keepalive interval.
    pub fn persistent_keepalive(&self) -> Option<Duration> {
        self.peer.persistent_keepalive
    }
    /// The counters.
    pub fn stats(&self) -> &'a PeerStats {
        &self.peer.stats
    }
    /// Each configured path's state, preferred first (empty with fewer than two endpoints).
    pub fn paths(&self) -> Vec<PathStats> {
        if self.peer.paths.multipath() { self.peer.paths.stats() } else { Vec::new() }
    }
    /// Whether a keypair is ready to send on at `now`.
    pub fn has_session(&self, now: Instant, device: &Device) -> bool {
        self.peer.current.as_ref().is_some_and(|k| k.can_send(now, &device.config.timing))
    }
}

/// A WireGuard device without I/O: one identity, many peers.
///
/// # Driving it
/// Inputs are methods taking `now`; outputs go into vectors the caller owns and drains:
/// * [`encapsulate`](Self::encapsulate): IP packets from the application (TUN) become
///   datagrams to send; packets for peers without a session wait while a handshake runs.
/// * [`decapsulate`](Self::decapsulate): received datagrams become IP packets to deliver, plus
///   datagrams to send (handshake responses, cookie replies, keepalives, packets that waited).
/// * [`on_timers`](Self::on_timers): call when [`next_deadline`](Self::next_deadline) passes
///   (and after any batch of input, whose handling may have moved it).
///
/// Buffers flow in a circle: take empty ones from [`alloc_buf`](Self::alloc_buf), and give
/// every buffer that came out back through [`recycle`](Self::recycle) once sent or delivered.
/// Once warm, nothing on the data path allocates.
///
/// # Time
/// The device never reads a clock. `now` must not go backwards. Handshake timestamps need the
/// wall-clock time: the device derives it from the anchor given to [`new`](Self::new).
pub struct Device {
    config: DeviceConfig,
    identity: Identity,
    checker: MacChecker,
    /// The peers by id, boxed: a free slot costs a pointer, and a growing table moves
    /// pointers rather than whole peers.
    peers: Vec<Option<Box<Peer>>>,
    free_ids: Vec<u32>,
    by_key: HashMap<PublicKey, PeerId>,
    by_index: IndexMap,
    prefix_owner: HashMap<IpNet, PeerId>,
    routes: AllowedIps<PeerId>,
    rng: Box<dyn Random + Send>,
    pool: BufPool,
    anchor: (Instant, Duration),
    stats: DeviceStats,
    limiter: RateLimiter,
    cookie_limiter: RateLimiter,
    load: LoadMeter,
    /// The batch the one-thread entry points (`encapsulate`, `decapsulate`, `on_timers`) run.
    scratch: CryptoBatch,
    /// State of the timer-jitter sequence (see `jitter`).
    jitter_state: u64,
    /// Bumped whenever the set of peer endpoints may have changed (see `endpoint_generation`).
    endpoint_generation: u64,
    /// Every armed timer of every peer, earliest first (see `timers.rs`): the turn touches
    /// only the peers whose timers are due.
    timer_queue: BinaryHeap<Reverse<TimerEntry>>,
    /// The epoch the next peer gets (see `Peer::epoch`).
    next_epoch: u32,
    /// The busiest peers, whose endpoints get connected sockets (see `busy.rs`).
    busy: busy::BusyPeers,
    /// Changes of peers' active paths not yet taken by the application (see `paths.rs`).
    path_switches: Vec<PathSwitch>,
}

/// One entry of the timer queue: peer `pid` (of `epoch`) has timer `timer` due at `at`, or
/// later if it was pushed back since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct TimerEntry {
    at: Instant,
    pid: u32,
    epoch: u32,
    timer: u8,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("public_key", self.identity.public_key())
            .field("peers", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

/// The live peer `pid` in `peers`, if any: a lookup that cannot panic, borrowing only the
/// peer table (so the identity and the random source stay usable beside it).
#[inline]
fn live(peers: &mut [Option<Box<Peer>>], pid: PeerId) -> Option<&mut Peer> {
    peers.get_mut(pid.index())?.as_deref_mut()
}

/// Cookie replies sent to one source address per second, at most.
const COOKIE_REPLIES_PER_SOURCE_PER_SECOND: u32 = 2;

/// Per-source rate-limiter table size: bounds its memory under a flood from many addresses.
const RATE_LIMITER_SOURCES: usize = 8192;

impl Device {
    /// A device with no peers. `now` and `unix_time` (time since the Unix epoch at `now`)
    /// anchor the wall clock that handshake timestamps need; `rng` must be a CSPRNG.
    pub fn new(
        config: DeviceConfig,
        mut rng: Box<dyn Random + Send>,
        now: Instant,
        unix_time: Duration,
    ) -> Self {
        let identity = Identity::new(config.private_key.clone());
        let jitter_state = u64::from(rng.next_u32()) << 32 | u64::from(rng.next_u32());
        let pool = BufPool::for_mtu(config.mtu.max(wire::INITIATION_LEN), 4096);
        Device {
            checker: MacChecker::new(&identity),
            identity,
            peers: Vec::new(),
            free_ids: Vec::new(),
            by_key: HashMap::new(),
            by_index: IndexMap::default(),
            prefix_owner: HashMap::new(),
            routes: AllowedIps::new(),
            rng,
            pool,
            anchor: (now, unix_time),
            stats: DeviceStats::default(),
            limiter: RateLimiter::new(
                config.handshakes_per_source_per_second,
                config.handshakes_per_source_per_second.div_ceil(2).max(1),
                RATE_LIMITER_SOURCES,
            ),
            // A source needs one cookie per COOKIE_REFRESH_TIME; answering every flooded
            // message with one would spend the data path's time on an attacker.
            cookie_limiter: RateLimiter::new(COOKIE_REPLIES_PER_SOURCE_PER_SECOND, 2, RATE_LIMITER_SOURCES),
            load: LoadMeter::default(),
            scratch: CryptoBatch::default(),
            jitter_state,
            endpoint_generation: 0,
            timer_queue: BinaryHeap::new(),
            next_epoch: 0,
            busy: busy::BusyPeers::default(),
            path_switches: Vec::new(),
            config,
        }
    }

    // ---- Buffers ---------------------------------------------------------------------

    /// An empty pooled buffer with the device's headroom, sized for one MTU packet.
    #[inline]
    pub fn alloc_buf(&mut self) -> PacketBuf {
        self.pool.get()
    }

    /// Returns a buffer to the pool.
    #[inline]
    pub fn recycle(&mut self, buf: PacketBuf) {
        self.pool.put(buf);
    }

    /// The buffer pool.
    pub fn pool_mut(&mut self) -> &mut BufPool {
        &mut self.pool
    }

    // ---- Helpers ---------------------------------------------------------------------

    /// The peer that receiver index `index` names, and the peer itself: `None` for an index
    /// nobody holds. Indices travel in clear and may name anything: this lookup is total.
    #[inline]
    fn peer_of_index(&mut self, index: u32) -> Option<(PeerId, &mut Peer)> {
        let pid = *self.by_index.get(&index)?;
        let peer = self.peers.get_mut(pid.index())?.as_mut()?;
        Some((pid, peer))
    }

    /// Checks the device's internal bookkeeping and says what is wrong: every registered
    /// receiver index belongs to a live peer that holds it (as a keypair's or its pending
    /// handshake's), and every index a peer holds is registered. For tests and fuzzing.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        for (&index, &pid) in &self.by_index {
            let Some(peer) = self.peers.get(pid.index()).and_then(Option::as_ref) else {
                return Err(format!("index {index:#x} names {pid:?}, which is gone"));
            };
            if !peer.indices().any(|i| i == index) {
                return Err(format!("index {index:#x} names {pid:?}, which does not hold it"));
            }
        }
        let in_queue: std::collections::HashSet<TimerEntry> = self.timer_queue.iter().map(|r| r.0).collect();
        let mut held = 0;
        for (i, peer) in self.peers.iter().enumerate() {
            let Some(peer) = peer else { continue };
            if peer.staged.len() > self.config.max_staged_packets.max(1) {
                return Err(format!("peer {i} stages {} packets", peer.staged.len()));
            }
            for (t, (at, queued)) in peer.timers.iter().zip(&peer.queued).enumerate() {
                let Some(at) = at else { continue };
                let entry =
                    queued.map(|q| TimerEntry { at: q, pid: i as u32, epoch: peer.epoch, timer: t as u8 });
                match entry {
                    Some(e) if e.at <= *at && in_queue.contains(&e) => {}
                    _ => return Err(format!("peer {i}'s timer {t} has no queue entry at or before it")),
                }
            }
            let paths = &peer.paths;
            if paths.active.is_some_and(|a| a >= paths.list.len()) {
                return Err(format!("peer {i}'s active path is not one of its paths"));
            }
            if let Some(a) = paths.active
                && peer.endpoint != Some(paths.list[a].stats.endpoint)
            {
                return Err(format!("peer {i}'s endpoint is not its active path's"));
            }
            for index in peer.indices() {
                held += 1;
                if self.by_index.get(&index) != Some(&PeerId(i as u32)) {
                    return Err(format!("peer {i} holds index {index:#x}, registered to another or none"));
                }
            }
        }
        if held != self.by_index.len() {
            return Err(format!("{} indices registered, {held} held", self.by_index.len()));
        }
        if self.by_key.len() != self.peers.iter().flatten().count() {
            return Err("the key table and the peer table disagree".into());
        }
        self.check_busy_invariants()
    }

    /// The peer `pid`, which the calling method has just found live (by key, index, route or
    /// [`peer_checked`](Self::peer_checked)) and not removed since: the one place that
    /// invariant is assumed. Where the lookup itself can miss, use [`live`].
    #[inline]
    fn peer_mut(&mut self, pid: PeerId) -> &mut Peer {
        self.peers[pid.index()].as_mut().expect("PeerId of a live peer")
    }

    fn peer_checked(&mut self, pid: PeerId) -> Result<&mut Peer, DeviceError> {
        self.peers.get_mut(pid.index()).and_then(Option::as_deref_mut).ok_or(DeviceError::NoSuchPeer)
    }

    /// Counts a drop (on the device, and on the peer if known) and recycles the buffer.
    #[inline]
    fn drop_buf(&mut self, pid: Option<PeerId>, reason: DropReason, buf: PacketBuf) {
        self.stats.drops.add(reason);
        if let Some(pid) = pid
            && let Some(peer) = self.peers.get_mut(pid.index()).and_then(Option::as_mut)
        {
            peer.stats.drops.add(reason);
        }
        self.pool.put(buf);
    }
}
