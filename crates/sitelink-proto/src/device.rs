//! The [`Device`]: many peers, one identity, driven by packets, datagrams and the time.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sitelink_crypto::cookie::{MacCheck, MacChecker};
use sitelink_crypto::noise::{self, Identity, PeerKeys};
use sitelink_crypto::{PresharedKey, PrivateKey, PublicKey, Random, Tai64N};
use sitelink_frame::wire::{
    self, COOKIE_REPLY_LEN, CookieReply, HandshakeInitiation, HandshakeResponse, INITIATION_LEN, MessageType,
    RESPONSE_LEN, TAG_LEN, TRANSPORT_HEADER_LEN, TransportData, mac_offsets,
};
use sitelink_frame::{BufPool, Datagram, PacketBuf, ip};

use crate::batch::{CryptoBatch, OpenJob};
use crate::config::{DeviceConfig, IpNet, PeerConfig, Timing};
use crate::peer::{Keypair, Peer, Pending, Slot, Timer};
use crate::ratelimit::RateLimiter;
use crate::routing::AllowedIps;
use crate::stats::{DeviceStats, DropReason, PeerStats};

/// Names a peer of a [`Device`]. Stable until the peer is removed; then it may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u32);

impl PeerId {
    /// The id as an index (dense, from 0).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

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
    peers: Vec<Option<Peer>>,
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
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("public_key", self.identity.public_key())
            .field("peers", &self.by_key.len())
            .finish_non_exhaustive()
    }
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
            config,
        }
    }

    // ---- Configuration -----------------------------------------------------------------

    /// The device's public key.
    pub fn public_key(&self) -> &PublicKey {
        self.identity.public_key()
    }

    /// The configuration in force.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Replaces the private key. Every session is dropped (peers handshake again); a peer with
    /// the new public key is removed. Setting the key already in force changes nothing (a
    /// reload such as `wg syncconf` keeps every session), as the kernel module does.
    pub fn set_private_key(&mut self, key: PrivateKey) {
        if key.public_key() == *self.identity.public_key() {
            return;
        }
        self.identity = Identity::new(key.clone());
        self.config.private_key = key;
        self.checker = MacChecker::new(&self.identity);
        if let Some(&own) = self.by_key.get(self.identity.public_key()) {
            let _ = self.remove_peer(own);
        }
        for pid in self.peer_ids().collect::<Vec<_>>() {
            self.clear_sessions(pid);
            let peer = self.peers[pid.index()].as_mut().expect("live peer");
            let psk = peer.keys.preshared_key().clone();
            let public = *peer.keys.public_key();
            peer.keys = PeerKeys::new(&self.identity, public, psk);
        }
    }

    /// Adds a peer, or updates the peer with the same public key: preshared key, endpoint,
    /// persistent keepalive and allowed IPs are all set from `config` (the allowed IPs replace
    /// the old ones). Sessions of an existing peer survive.
    pub fn upsert_peer(&mut self, now: Instant, config: PeerConfig) -> Result<PeerId, DeviceError> {
        if config.public_key == *self.identity.public_key() {
            return Err(DeviceError::OwnPublicKey);
        }
        let pid = match self.by_key.get(&config.public_key) {
            Some(&pid) => pid,
            None => {
                let keys = PeerKeys::new(&self.identity, config.public_key, PresharedKey::none());
                let peer = Peer::new(keys);
                let pid = match self.free_ids.pop() {
                    Some(i) => {
                        self.peers[i as usize] = Some(peer);
                        PeerId(i)
                    }
                    None => {
                        self.peers.push(Some(peer));
                        PeerId((self.peers.len() - 1) as u32)
                    }
                };
                self.by_key.insert(config.public_key, pid);
                pid
            }
        };
        self.peer_mut(pid).keys.set_preshared_key(config.preshared_key.unwrap_or_default());
        if let Some(ep) = config.endpoint {
            self.move_endpoint(pid, ep);
        }
        self.set_persistent_keepalive(now, pid, config.persistent_keepalive)?;
        self.set_allowed_ips(pid, &config.allowed_ips)?;
        Ok(pid)
    }

    /// Removes a peer, erasing its keys and dropping its waiting packets.
    pub fn remove_peer(&mut self, pid: PeerId) -> Result<(), DeviceError> {
        let peer = self.peers.get_mut(pid.index()).and_then(Option::take).ok_or(DeviceError::NoSuchPeer)?;
        for idx in peer.indices() {
            self.by_index.remove(&idx);
        }
        self.by_key.remove(peer.keys.public_key());
        for net in &peer.allowed_ips {
            self.prefix_owner.remove(net);
        }
        for buf in peer.staged {
            self.pool.put(buf);
        }
        self.free_ids.push(pid.0);
        self.rebuild_routes();
        self.endpoint_generation += 1;
        Ok(())
    }

    /// Removes every peer.
    pub fn clear_peers(&mut self) {
        for pid in self.peer_ids().collect::<Vec<_>>() {
            let _ = self.remove_peer(pid);
        }
    }

    /// Sets a peer's endpoint (it changes again when the peer roams).
    pub fn set_endpoint(&mut self, pid: PeerId, endpoint: SocketAddr) -> Result<(), DeviceError> {
        self.peer_checked(pid)?;
        self.move_endpoint(pid, endpoint);
        Ok(())
    }

    /// Sets a live peer's endpoint, noting a change in `endpoint_generation`.
    fn move_endpoint(&mut self, pid: PeerId, endpoint: SocketAddr) {
        let peer = self.peer_mut(pid);
        if peer.endpoint != Some(endpoint) {
            peer.endpoint = Some(endpoint);
            self.endpoint_generation += 1;
        }
    }

    /// A number that changes whenever a peer's endpoint may have: set by configuration, moved
    /// by roaming, or gone with its peer. I/O layers that keep something per endpoint (a
    /// connected socket) compare it with the value they last saw, and only then walk
    /// [`endpoints`](Self::endpoints) again.
    pub fn endpoint_generation(&self) -> u64 {
        self.endpoint_generation
    }

    /// Every peer's current endpoint, in peer order (peers with none are skipped).
    pub fn endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.peers.iter().flatten().filter_map(|p| p.endpoint)
    }

    /// Sets a peer's preshared key (`PresharedKey::none()` for none). Applies from the next
    /// handshake.
    pub fn set_preshared_key(&mut self, pid: PeerId, psk: PresharedKey) -> Result<(), DeviceError> {
        self.peer_checked(pid)?.keys.set_preshared_key(psk);
        Ok(())
    }

    /// Sets or clears the persistent keepalive. Turning it on sends a keepalive at once (at the
    /// next [`on_timers`](Self::on_timers)), as the reference implementations do.
    pub fn set_persistent_keepalive(
        &mut self,
        now: Instant,
        pid: PeerId,
        interval: Option<Duration>,
    ) -> Result<(), DeviceError> {
        let interval = interval.filter(|d| !d.is_zero());
        let peer = self.peer_checked(pid)?;
        let turned_on = interval.is_some() && peer.persistent_keepalive != interval;
        peer.persistent_keepalive = interval;
        if interval.is_none() {
            peer.cancel_timer(Timer::PersistentKeepalive);
        } else if turned_on {
            peer.set_timer(Timer::PersistentKeepalive, now);
        }
        Ok(())
    }

    /// Replaces a peer's allowed IPs. A prefix another peer had moves to this one.
    pub fn set_allowed_ips(&mut self, pid: PeerId, nets: &[IpNet]) -> Result<(), DeviceError> {
        let old = std::mem::take(&mut self.peer_checked(pid)?.allowed_ips);
        for net in &old {
            self.prefix_owner.remove(net);
        }
        let rebuild = !old.is_empty();
        for net in nets {
            self.claim_prefix(pid, *net);
        }
        if rebuild {
            self.rebuild_routes();
        }
        Ok(())
    }

    /// Adds one allowed IP prefix to a peer. A prefix another peer had moves to this one.
    pub fn add_allowed_ip(&mut self, pid: PeerId, net: IpNet) -> Result<(), DeviceError> {
        self.peer_checked(pid)?;
        self.claim_prefix(pid, net);
        Ok(())
    }

    /// Removes one allowed IP prefix from a peer (nothing if it does not have it).
    pub fn remove_allowed_ip(&mut self, pid: PeerId, net: IpNet) -> Result<(), DeviceError> {
        let peer = self.peer_checked(pid)?;
        let before = peer.allowed_ips.len();
        peer.allowed_ips.retain(|n| *n != net);
        if peer.allowed_ips.len() != before {
            self.prefix_owner.remove(&net);
            self.rebuild_routes();
        }
        Ok(())
    }

    fn claim_prefix(&mut self, pid: PeerId, net: IpNet) {
        if let Some(prev) = self.prefix_owner.insert(net, pid) {
            if prev == pid {
                return;
            }
            if let Some(p) = self.peers.get_mut(prev.index()).and_then(Option::as_mut) {
                p.allowed_ips.retain(|n| *n != net);
            }
        }
        self.peer_mut(pid).allowed_ips.push(net);
        self.routes.insert(net, pid);
    }

    fn rebuild_routes(&mut self) {
        self.routes.clear();
        for (i, peer) in self.peers.iter().enumerate() {
            if let Some(peer) = peer {
                for net in &peer.allowed_ips {
                    self.routes.insert(*net, PeerId(i as u32));
                }
            }
        }
    }

    /// The peer with this public key.
    pub fn peer_by_key(&self, key: &PublicKey) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    /// The peer an inner destination address routes to.
    pub fn route(&self, ip: std::net::IpAddr) -> Option<PeerId> {
        self.routes.lookup(ip)
    }

    /// A view of a peer.
    pub fn peer(&self, pid: PeerId) -> Option<PeerView<'_>> {
        self.peers.get(pid.index()).and_then(Option::as_ref).map(|peer| PeerView { peer, id: pid })
    }

    /// Every peer's id, in id order.
    pub fn peer_ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.iter().enumerate().filter(|(_, p)| p.is_some()).map(|(i, _)| PeerId(i as u32))
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    /// Device-wide counters.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// Overrides the measured handshake load (for tests and for drivers that measure load by
    /// their own queue depth): the device counts as under load until `until`.
    pub fn set_under_load_until(&mut self, until: Option<Instant>) {
        self.load.under_load_until = until;
    }

    // ---- Buffers -------------------------------------------------------------------------

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

    // ---- Data path -----------------------------------------------------------------------

    /// Encrypts IP packets (drained from `packets`) to their peers; datagrams to send are
    /// pushed to `out`. A packet whose peer has no session waits for the handshake this starts.
    ///
    /// The same as [`encapsulate_deferred`](Self::encapsulate_deferred) followed at once by
    /// [`CryptoBatch::run`], for a driver with one thread.
    pub fn encapsulate(&mut self, now: Instant, packets: &mut Vec<PacketBuf>, out: &mut Vec<Datagram>) {
        self.with_scratch(|dev, batch| {
            dev.encapsulate_deferred(now, packets, batch, out);
            batch.run(out);
        });
    }

    /// Like [`encapsulate`](Self::encapsulate), but the sealing is left in `batch`, for
    /// [`CryptoBatch::run`] to do without the device (so that several threads can seal at
    /// once). Counters, timers and statistics are all settled here.
    pub fn encapsulate_deferred(
        &mut self,
        now: Instant,
        packets: &mut Vec<PacketBuf>,
        batch: &mut CryptoBatch,
        out: &mut Vec<Datagram>,
    ) {
        self.adopt_batch(batch);
        for buf in packets.drain(..) {
            let dst = match ip::peek(buf.data()) {
                Ok(p) => p.dst,
                Err(_) => {
                    self.drop_buf(None, DropReason::OutboundMalformed, buf);
                    continue;
                }
            };
            match self.routes.lookup(dst) {
                Some(pid) => self.send_packet(now, pid, buf, batch, out),
                None => self.drop_buf(None, DropReason::NoRoute, buf),
            }
        }
    }

    /// Handles received datagrams (drained from `datagrams`): IP packets to deliver go to
    /// `packets`, datagrams to send to `out`. Nothing received can make this panic; every
    /// datagram not delivered is counted by reason.
    ///
    /// The same as [`decapsulate_deferred`](Self::decapsulate_deferred), [`CryptoBatch::run`]
    /// and [`complete`](Self::complete) in a row, for a driver with one thread.
    pub fn decapsulate(
        &mut self,
        now: Instant,
        datagrams: &mut Vec<Datagram>,
        packets: &mut Vec<PacketBuf>,
        out: &mut Vec<Datagram>,
    ) {
        self.with_scratch(|dev, batch| {
            dev.decapsulate_deferred(now, datagrams, batch, out);
            batch.run(out);
            dev.complete(now, batch, packets, out);
        });
    }

    /// Like [`decapsulate`](Self::decapsulate), but transport messages are only looked up and
    /// checked against the replay window here; opening them is left in `batch` for
    /// [`CryptoBatch::run`], and delivering them for [`complete`](Self::complete). Handshake
    /// and cookie messages are handled in full (their answers go to `out`).
    pub fn decapsulate_deferred(
        &mut self,
        now: Instant,
        datagrams: &mut Vec<Datagram>,
        batch: &mut CryptoBatch,
        out: &mut Vec<Datagram>,
    ) {
        self.adopt_batch(batch);
        for d in datagrams.drain(..) {
            match wire::classify(d.buf.data()) {
                Ok(MessageType::TransportData) => self.receive_data(now, d, batch),
                Ok(MessageType::HandshakeInitiation) => self.receive_initiation(now, d, out),
                Ok(MessageType::HandshakeResponse) => self.receive_response(now, d, batch, out),
                Ok(MessageType::CookieReply) => self.receive_cookie_reply(now, d),
                Err(_) => self.drop_buf(None, DropReason::Malformed, d.buf),
            }
        }
    }

    /// Delivers the transport messages `batch` opened: each that authenticated is marked in
    /// its keypair's replay window, moves its peer's endpoint (roaming), confirms a new
    /// session, feeds the timers and, if its inner source is one of the peer's allowed IPs,
    /// goes to `packets` in the order received. Datagrams this sends (a keepalive, packets
    /// that waited for the session) go to `out`.
    ///
    /// Opens that [`CryptoBatch::run`] did not do yet are done here.
    pub fn complete(
        &mut self,
        now: Instant,
        batch: &mut CryptoBatch,
        packets: &mut Vec<PacketBuf>,
        out: &mut Vec<Datagram>,
    ) {
        if !batch.needs_completion() {
            return;
        }
        self.adopt_batch(batch);
        batch.open_pending();
        let mut opens = batch.take_opens();
        for job in opens.drain(..) {
            self.deliver(now, job, batch, packets, out);
        }
        batch.restore_opens(opens);
        // A confirmed session flushes the packets that waited for it: seal those now.
        batch.seal_into(out);
    }

    /// Runs `f` with the device's own batch, for the entry points that need no caller's.
    fn with_scratch<R>(&mut self, f: impl FnOnce(&mut Self, &mut CryptoBatch) -> R) -> R {
        let mut batch = std::mem::take(&mut self.scratch);
        let r = f(self, &mut batch);
        self.scratch = batch;
        r
    }

    /// Readies `batch` for this device: the MTU its seals pad to, and the seals it failed.
    #[inline]
    fn adopt_batch(&mut self, batch: &mut CryptoBatch) {
        batch.mtu = self.config.mtu;
        self.stats.drops.add_n(DropReason::NoTailroom, std::mem::take(&mut batch.failed_seals));
    }

    /// Sends the packet to `pid` if a session is up (its sealing queued in `batch`); else
    /// stages it and starts a handshake.
    #[inline]
    fn send_packet(
        &mut self,
        now: Instant,
        pid: PeerId,
        buf: PacketBuf,
        batch: &mut CryptoBatch,
        out: &mut Vec<Datagram>,
    ) {
        let timing = self.config.timing;
        let mtu = self.config.mtu;
        let peer = self.peer_mut(pid);
        let Some(endpoint) = peer.endpoint else {
            self.drop_buf(Some(pid), DropReason::NoEndpoint, buf);
            return;
        };
        if !peer.staged.is_empty() {
            self.stage(pid, buf);
            self.send_staged(now, pid, batch, out);
            return;
        }
        let Some(kp) = peer.current.as_mut().filter(|k| k.can_send(now, &timing)) else {
            self.stage(pid, buf);
            self.send_staged(now, pid, batch, out);
            return;
        };
        let len = buf.len();
        let tail = wire::padding_for(len, mtu) + TAG_LEN;
        if buf.tailroom() < tail || buf.headroom() < TRANSPORT_HEADER_LEN {
            self.drop_buf(Some(pid), DropReason::NoTailroom, buf);
            return;
        }
        let counter = kp.next_counter();
        batch.push_seal(&kp.send, counter, kp.remote_index, endpoint, buf);
        let rekey = (kp.initiator && now.saturating_duration_since(kp.created) >= timing.rekey_after_time)
            || kp.send_counter > timing.rekey_after_messages;
        peer.stats.tx_bytes += (TRANSPORT_HEADER_LEN + len + tail) as u64;
        let is_data = len != 0;
        if is_data {
            peer.stats.tx_packets += 1;
        } else {
            peer.stats.keepalives_sent += 1;
        }
        self.on_authenticated_sent(now, pid, is_data);
        if rekey {
            self.initiate(now, pid, out, false);
        }
    }

    fn stage(&mut self, pid: PeerId, buf: PacketBuf) {
        let max = self.config.max_staged_packets.max(1);
        let peer = self.peer_mut(pid);
        let overflow = if peer.staged.len() >= max { peer.staged.pop_front() } else { None };
        self.peer_mut(pid).staged.push_back(buf);
        if let Some(old) = overflow {
            self.drop_buf(Some(pid), DropReason::StagedOverflow, old);
        }
    }

    /// Sends every staged packet if a session is up, else starts a handshake.
    fn send_staged(&mut self, now: Instant, pid: PeerId, batch: &mut CryptoBatch, out: &mut Vec<Datagram>) {
        let timing = self.config.timing;
        let peer = self.peer_mut(pid);
        if peer.current.as_ref().is_none_or(|k| !k.can_send(now, &timing)) || peer.endpoint.is_none() {
            self.initiate(now, pid, out, false);
            return;
        }
        let mut staged = std::mem::take(&mut self.peer_mut(pid).staged);
        while let Some(buf) = staged.pop_front() {
            self.send_packet(now, pid, buf, batch, out);
        }
        // Keep the (now empty) queue's allocation for next time.
        let peer = self.peer_mut(pid);
        if peer.staged.is_empty() {
            peer.staged = staged;
        }
    }

    /// Sends a keepalive: staged packets if any are waiting, else an empty transport message.
    fn send_keepalive(
        &mut self,
        now: Instant,
        pid: PeerId,
        batch: &mut CryptoBatch,
        out: &mut Vec<Datagram>,
    ) {
        if self.peer_mut(pid).staged.is_empty() {
            let buf = self.pool.get();
            self.peer_mut(pid).staged.push_back(buf);
        }
        self.send_staged(now, pid, batch, out);
    }

    /// The first half of receiving a transport message: find its keypair, check it may still
    /// receive and that the counter is new, and queue the open.
    fn receive_data(&mut self, now: Instant, mut d: Datagram, batch: &mut CryptoBatch) {
        let timing = self.config.timing;
        let (index, counter) = match TransportData::new_checked(d.buf.data()) {
            Ok(m) => (m.receiver_index(), m.counter()),
            Err(_) => return self.drop_buf(None, DropReason::Malformed, d.buf),
        };
        let Some((pid, peer)) = self.peer_of_index(index) else {
            return self.drop_buf(None, DropReason::UnknownReceiverIndex, d.buf);
        };
        let Some(slot) = peer.slot_of(index) else {
            return self.drop_buf(Some(pid), DropReason::UnknownReceiverIndex, d.buf);
        };
        let kp = peer.keypair(slot).expect("slot_of found it");
        if !kp.can_receive(now, &timing) {
            return self.drop_buf(Some(pid), DropReason::ExpiredKeypair, d.buf);
        }
        if kp.replay.check(counter).is_err() {
            return self.drop_buf(Some(pid), DropReason::Replay, d.buf);
        }
        let wire_len = d.buf.len();
        d.buf.advance(TRANSPORT_HEADER_LEN).expect("length checked by classify");
        batch.push_open(&kp.recv, counter, pid, index, wire_len, d.addr, d.buf);
    }

    /// The second half: the message was opened (or failed to) outside the device.
    fn deliver(
        &mut self,
        now: Instant,
        job: OpenJob,
        batch: &mut CryptoBatch,
        packets: &mut Vec<PacketBuf>,
        out: &mut Vec<Datagram>,
    ) {
        let timing = self.config.timing;
        let pid = job.peer;
        let mut buf = job.buf;
        if job.opened != Some(true) {
            return self.drop_buf(Some(pid), DropReason::DecryptFailed, buf);
        }
        // The keypair may have been replaced (or the peer removed) while the message was
        // being opened: its replay window is then gone, so the message cannot be accepted.
        let peer = match self.peer_of_index(job.local_index) {
            Some((owner, peer)) if owner == pid => peer,
            _ => return self.drop_buf(None, DropReason::ExpiredKeypair, buf),
        };
        let Some(slot) = peer.slot_of(job.local_index) else {
            return self.drop_buf(Some(pid), DropReason::ExpiredKeypair, buf);
        };
        let kp = peer.keypair_mut(slot).expect("slot_of found it");
        if kp.replay.accept(job.counter).is_err() {
            return self.drop_buf(Some(pid), DropReason::Replay, buf);
        }
        let len = buf.len().saturating_sub(TAG_LEN);
        buf.truncate(len);
        // Authenticated from here on.
        peer.stats.rx_bytes += job.wire_len as u64;
        self.move_endpoint(pid, job.addr);
        let confirmed = slot == Slot::Next;
        if confirmed {
            self.confirm_next(now, pid);
        }
        self.on_authenticated_received(now, pid);
        self.keep_key_fresh_on_receive(now, pid, out);
        if len == 0 {
            self.peer_mut(pid).stats.keepalives_received += 1;
            self.pool.put(buf);
        } else {
            match ip::peek(buf.data()) {
                Err(_) => self.drop_buf(Some(pid), DropReason::InnerMalformed, buf),
                Ok(p) if self.routes.lookup(p.src) != Some(pid) => {
                    self.drop_buf(Some(pid), DropReason::SourceNotAllowed, buf)
                }
                Ok(p) => {
                    buf.truncate(p.total_len);
                    let peer = self.peer_mut(pid);
                    peer.stats.rx_packets += 1;
                    if peer.timer(Timer::SendKeepalive).is_none() {
                        peer.set_timer(Timer::SendKeepalive, now + timing.keepalive_timeout);
                    } else {
                        peer.need_another_keepalive = true;
                    }
                    packets.push(buf);
                }
            }
        }
        if confirmed {
            self.send_staged(now, pid, batch, out);
        }
    }

    /// The responder's new keypair is confirmed by the first message on it: it becomes current.
    fn confirm_next(&mut self, now: Instant, pid: PeerId) {
        let peer = self.peer_mut(pid);
        let old_previous = peer.previous.take();
        peer.previous = peer.current.take();
        peer.current = peer.next.take();
        if let Some(kp) = old_previous {
            self.by_index.remove(&kp.local_index);
        }
        self.handshake_complete(now, pid);
    }

    // ---- Handshakes ----------------------------------------------------------------------

    fn wall_clock(&self, now: Instant) -> Duration {
        self.anchor.1 + now.saturating_duration_since(self.anchor.0)
    }

    /// Timer jitter, up to REKEY_TIMEOUT's jitter. It only keeps peers from retrying in step,
    /// so it comes from a SplitMix64 sequence seeded once from `rng`, not from the CSPRNG: a
    /// data packet sent after one received arms a jittered timer, and an OS random call there
    /// would be a system call on the data path.
    fn jitter(&mut self) -> Duration {
        let max = self.config.timing.rekey_timeout_jitter.as_micros() as u64;
        if max == 0 {
            return Duration::ZERO;
        }
        self.jitter_state = self.jitter_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.jitter_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Duration::from_micros((z ^ (z >> 31)) % max)
    }

    /// A fresh random local index, registered to `pid`.
    fn new_index(&mut self, pid: PeerId) -> u32 {
        loop {
            let i = self.rng.next_u32();
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_index.entry(i) {
                e.insert(pid);
                return i;
            }
        }
    }

    /// Starts a handshake with `pid` (sends an initiation), unless one went out less than
    /// REKEY_TIMEOUT ago.
    fn initiate(&mut self, now: Instant, pid: PeerId, out: &mut Vec<Datagram>, is_retry: bool) {
        let timing = self.config.timing;
        let peer = self.peer_mut(pid);
        if peer.last_initiation_sent.is_some_and(|t| now.saturating_duration_since(t) < timing.rekey_timeout)
        {
            return;
        }
        if !is_retry {
            peer.handshake_attempts = 0;
        }
        let Some(endpoint) = peer.endpoint else { return };
        if let Some(old) = peer.pending.take() {
            self.by_index.remove(&old.state.local_index());
        }
        let index = self.new_index(pid);
        let unix = self.wall_clock(now);
        let timestamp = Tai64N::from_unix(unix.as_secs(), unix.subsec_nanos());
        let mut buf = self.pool.get();
        buf.set_len(INITIATION_LEN).expect("pool buffers hold a handshake message");
        let peer = self.peers[pid.index()].as_mut().expect("live peer");
        let result = noise::initiate(
            &self.identity,
            &peer.keys,
            index,
            timestamp,
            &mut *self.rng,
            &mut HandshakeInitiation::new_unchecked(buf.data_mut()),
        );
        let state = match result {
            Ok(state) => state,
            Err(_) => {
                // Only a low-order peer key gets here; nothing can be sent to such a peer.
                self.by_index.remove(&index);
                self.pool.put(buf);
                return;
            }
        };
        peer.sealer.seal(now, buf.data_mut(), mac_offsets::INITIATION_MAC1);
        peer.pending = Some(Pending { state });
        peer.last_initiation_sent = Some(now);
        peer.stats.handshake_initiations_sent += 1;
        peer.stats.tx_bytes += INITIATION_LEN as u64;
        self.stats.handshake_initiations_sent += 1;
        out.push(Datagram { addr: endpoint, buf });
        let jitter = self.jitter();
        self.peer_mut(pid).set_timer(Timer::RetransmitHandshake, now + timing.rekey_timeout + jitter);
        self.on_authenticated_sent(now, pid, false);
    }

    /// Checks mac1 (and under load mac2 and the source's rate), answering with a cookie reply
    /// when a cookie is needed. Returns whether to go on with the message.
    fn admit_handshake(
        &mut self,
        now: Instant,
        d: &Datagram,
        mac1_offset: usize,
        sender_index: u32,
        out: &mut Vec<Datagram>,
    ) -> bool {
        let check = self.checker.check(now, d.buf.data(), mac1_offset, d.addr);
        if check == MacCheck::BadMac1 {
            self.stats.drops.add(DropReason::BadMac1);
            return false;
        }
        let under_load = self.load.record(now, self.config.handshake_load_threshold);
        if !under_load {
            return true;
        }
        if check == MacCheck::Mac1 {
            if !self.cookie_limiter.allow(now, d.addr.ip()) {
                self.stats.drops.add(DropReason::RateLimited);
                return false;
            }
            let mut reply = self.pool.get();
            reply.set_len(COOKIE_REPLY_LEN).expect("pool buffers hold a cookie reply");
            let mac1: [u8; 16] =
                d.buf.data()[mac1_offset..mac1_offset + 16].try_into().expect("length checked by classify");
            self.checker.cookie_reply(
                now,
                &mut *self.rng,
                &mac1,
                sender_index,
                d.addr,
                &mut CookieReply::new_unchecked(reply.data_mut()),
            );
            out.push(Datagram { addr: d.addr, buf: reply });
            self.stats.cookie_replies_sent += 1;
            self.stats.drops.add(DropReason::CookieRequired);
            return false;
        }
        if !self.limiter.allow(now, d.addr.ip()) {
            self.stats.drops.add(DropReason::RateLimited);
            return false;
        }
        true
    }

    fn receive_initiation(&mut self, now: Instant, d: Datagram, out: &mut Vec<Datagram>) {
        let sender_index = match HandshakeInitiation::new_checked(d.buf.data()) {
            Ok(m) => m.sender_index(),
            Err(_) => return self.drop_buf(None, DropReason::Malformed, d.buf),
        };
        if !self.admit_handshake(now, &d, mac_offsets::INITIATION_MAC1, sender_index, out) {
            return self.pool.put(d.buf);
        }
        let msg = HandshakeInitiation::new_checked(d.buf.data()).expect("checked above");
        let unverified = match noise::consume_initiation(&self.identity, &msg) {
            Ok(u) => u,
            Err(_) => return self.drop_buf(None, DropReason::HandshakeDecryptFailed, d.buf),
        };
        let Some(&pid) = self.by_key.get(unverified.remote_static()) else {
            return self.drop_buf(None, DropReason::UnknownPeer, d.buf);
        };
        let peer = self.peers[pid.index()].as_mut().expect("live peer");
        let received = match unverified.verify(&peer.keys) {
            Ok(r) => r,
            Err(_) => return self.drop_buf(Some(pid), DropReason::HandshakeDecryptFailed, d.buf),
        };
        if peer.greatest_timestamp.is_some_and(|t| received.timestamp() <= t) {
            return self.drop_buf(Some(pid), DropReason::StaleTimestamp, d.buf);
        }
        let min_gap = Duration::from_secs(1) / 50;
        if peer.last_initiation_consumed.is_some_and(|t| now.saturating_duration_since(t) < min_gap) {
            return self.drop_buf(Some(pid), DropReason::InitiationFlood, d.buf);
        }
        peer.greatest_timestamp = Some(received.timestamp());
        peer.last_initiation_consumed = Some(now);
        peer.stats.rx_bytes += INITIATION_LEN as u64;
        self.move_endpoint(pid, d.addr);
        self.on_authenticated_received(now, pid);

        // Answer it. The response goes into the datagram's own buffer.
        let index = self.new_index(pid);
        let mut buf = d.buf;
        buf.set_len(RESPONSE_LEN).expect("an initiation's buffer holds a response");
        let peer = self.peers[pid.index()].as_mut().expect("live peer");
        let keys = match received.respond(
            &peer.keys,
            index,
            &mut *self.rng,
            &mut HandshakeResponse::new_unchecked(buf.data_mut()),
        ) {
            Ok(k) => k,
            Err(_) => {
                self.by_index.remove(&index);
                return self.drop_buf(Some(pid), DropReason::HandshakeDecryptFailed, buf);
            }
        };
        peer.sealer.seal(now, buf.data_mut(), mac_offsets::RESPONSE_MAC1);
        let old_next = peer.next.replace(Keypair::new(&keys, now));
        peer.stats.tx_bytes += RESPONSE_LEN as u64;
        if let Some(kp) = old_next {
            self.by_index.remove(&kp.local_index);
        }
        self.stats.handshake_responses_sent += 1;
        out.push(Datagram { addr: d.addr, buf });
        self.on_authenticated_sent(now, pid, false);
        self.session_derived(now, pid);
    }

    fn receive_response(
        &mut self,
        now: Instant,
        d: Datagram,
        batch: &mut CryptoBatch,
        out: &mut Vec<Datagram>,
    ) {
        let (sender_index, receiver_index) = match HandshakeResponse::new_checked(d.buf.data()) {
            Ok(m) => (m.sender_index(), m.receiver_index()),
            Err(_) => return self.drop_buf(None, DropReason::Malformed, d.buf),
        };
        // Only a response to a handshake in progress can cost Diffie-Hellman work, so that
        // cheap lookup comes before the load accounting.
        let awaited = self
            .peer_of_index(receiver_index)
            .filter(|(_, p)| p.pending.as_ref().is_some_and(|p| p.state.local_index() == receiver_index));
        let Some((pid, _)) = awaited else {
            return self.drop_buf(None, DropReason::UnexpectedHandshake, d.buf);
        };
        if !self.admit_handshake(now, &d, mac_offsets::RESPONSE_MAC1, sender_index, out) {
            return self.pool.put(d.buf);
        }
        // Looked up again (by field, so the identity stays readable): `admit_handshake`
        // needed the whole device.
        let Some(peer) = self.peers.get_mut(pid.index()).and_then(Option::as_mut) else {
            return self.drop_buf(None, DropReason::UnexpectedHandshake, d.buf);
        };
        let Some(pending) = peer.pending.as_ref() else {
            return self.drop_buf(Some(pid), DropReason::UnexpectedHandshake, d.buf);
        };
        let msg = HandshakeResponse::new_checked(d.buf.data()).expect("checked above");
        let keys = match pending.state.consume_response(&self.identity, &peer.keys, &msg) {
            Ok(k) => k,
            Err(_) => return self.drop_buf(Some(pid), DropReason::HandshakeDecryptFailed, d.buf),
        };
        peer.pending = None;
        peer.stats.rx_bytes += RESPONSE_LEN as u64;
        if peer.endpoint != Some(d.addr) {
            peer.endpoint = Some(d.addr);
            self.endpoint_generation += 1;
        }
        // The initiator's new keypair is confirmed at once: it becomes current. A keypair
        // waiting for confirmation (both sides initiated at once) is demoted to previous, and
        // the current one is then dropped, as the kernel module does; else current becomes
        // previous. Every keypair dropped gives its index up.
        let new = Keypair::new(&keys, now);
        let dropped = match peer.next.take() {
            Some(next) => [peer.current.take(), peer.previous.replace(next)],
            None => {
                let cur = peer.current.take();
                [std::mem::replace(&mut peer.previous, cur), None]
            }
        };
        peer.current = Some(new);
        for kp in dropped.into_iter().flatten() {
            self.by_index.remove(&kp.local_index);
        }
        self.pool.put(d.buf);
        self.session_derived(now, pid);
        self.handshake_complete(now, pid);
        self.on_authenticated_received(now, pid);
        self.send_keepalive(now, pid, batch, out);
    }

    fn receive_cookie_reply(&mut self, now: Instant, d: Datagram) {
        let Ok(msg) = CookieReply::new_checked(d.buf.data()) else {
            return self.drop_buf(None, DropReason::Malformed, d.buf);
        };
        let Some((pid, peer)) = self.peer_of_index(msg.receiver_index()) else {
            return self.drop_buf(None, DropReason::UnexpectedHandshake, d.buf);
        };
        match peer.sealer.consume_reply(now, &msg) {
            Ok(()) => self.pool.put(d.buf),
            Err(_) => self.drop_buf(Some(pid), DropReason::CookieDecryptFailed, d.buf),
        }
    }

    // ---- Timers --------------------------------------------------------------------------

    fn on_authenticated_sent(&mut self, now: Instant, pid: PeerId, is_data: bool) {
        let timing = self.config.timing;
        let needs_new_handshake_timer = is_data && self.peer_mut(pid).timer(Timer::NewHandshake).is_none();
        let jitter = if needs_new_handshake_timer { self.jitter() } else { Duration::ZERO };
        let peer = self.peer_mut(pid);
        peer.cancel_timer(Timer::SendKeepalive);
        if needs_new_handshake_timer {
            peer.set_timer(
                Timer::NewHandshake,
                now + timing.keepalive_timeout + timing.rekey_timeout + jitter,
            );
        }
        if let Some(interval) = peer.persistent_keepalive {
            peer.set_timer(Timer::PersistentKeepalive, now + interval);
        }
    }

    fn on_authenticated_received(&mut self, now: Instant, pid: PeerId) {
        let peer = self.peer_mut(pid);
        peer.cancel_timer(Timer::NewHandshake);
        if let Some(interval) = peer.persistent_keepalive {
            peer.set_timer(Timer::PersistentKeepalive, now + interval);
        }
    }

    fn keep_key_fresh_on_receive(&mut self, now: Instant, pid: PeerId, out: &mut Vec<Datagram>) {
        let timing = self.config.timing;
        let threshold =
            timing.reject_after_time.saturating_sub(timing.keepalive_timeout + timing.rekey_timeout);
        let peer = self.peer_mut(pid);
        let old = peer
            .current
            .as_ref()
            .is_some_and(|k| k.initiator && now.saturating_duration_since(k.created) >= threshold);
        if old && !peer.sent_lastminute_handshake {
            peer.sent_lastminute_handshake = true;
            self.initiate(now, pid, out, false);
        }
    }

    fn session_derived(&mut self, now: Instant, pid: PeerId) {
        let t = self.config.timing.reject_after_time * 3;
        self.peer_mut(pid).set_timer(Timer::ZeroKeyMaterial, now + t);
    }

    /// A session is up: on the initiator when the response arrives, on the responder when the
    /// first message on the new keypair confirms it. `wg` shows `now` as the last handshake,
    /// as the kernel module does.
    fn handshake_complete(&mut self, now: Instant, pid: PeerId) {
        let now_wall = self.wall_clock(now);
        let peer = self.peer_mut(pid);
        peer.cancel_timer(Timer::RetransmitHandshake);
        peer.handshake_attempts = 0;
        peer.sent_lastminute_handshake = false;
        peer.stats.handshakes_completed += 1;
        peer.stats.last_handshake = Some(now_wall);
        self.stats.sessions_established += 1;
    }

    fn clear_sessions(&mut self, pid: PeerId) {
        let peer = self.peer_mut(pid);
        let indices: [Option<u32>; 4] = [
            peer.next.take().map(|k| k.local_index),
            peer.current.take().map(|k| k.local_index),
            peer.previous.take().map(|k| k.local_index),
            peer.pending.take().map(|p| p.state.local_index()),
        ];
        for idx in indices.into_iter().flatten() {
            self.by_index.remove(&idx);
        }
    }

    /// The earliest time at which [`on_timers`](Self::on_timers) has work, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.peers.iter().flatten().flat_map(|p| p.timers.iter().flatten()).min().copied()
    }

    /// Runs every timer due at `now`: handshake retries, keepalives, rekeys, key erasure.
    pub fn on_timers(&mut self, now: Instant, out: &mut Vec<Datagram>) {
        self.with_scratch(|dev, batch| {
            dev.adopt_batch(batch);
            for i in 0..dev.peers.len() {
                let pid = PeerId(i as u32);
                for timer in Timer::ALL {
                    let Some(peer) = dev.peers[i].as_mut() else { break };
                    if peer.timer(timer).is_none_or(|t| t > now) {
                        continue;
                    }
                    peer.cancel_timer(timer);
                    dev.fire(now, pid, timer, batch, out);
                }
            }
            // Keepalives and staged packets: few, so sealed here rather than handed out.
            batch.seal_into(out);
        });
    }

    fn fire(
        &mut self,
        now: Instant,
        pid: PeerId,
        timer: Timer,
        batch: &mut CryptoBatch,
        out: &mut Vec<Datagram>,
    ) {
        let timing: Timing = self.config.timing;
        match timer {
            Timer::RetransmitHandshake => {
                let peer = self.peer_mut(pid);
                if peer.handshake_attempts > timing.max_handshake_attempts() {
                    peer.cancel_timer(Timer::SendKeepalive);
                    if let Some(p) = peer.pending.take() {
                        self.by_index.remove(&p.state.local_index());
                    }
                    let peer = self.peer_mut(pid);
                    let staged = std::mem::take(&mut peer.staged);
                    if peer.timer(Timer::ZeroKeyMaterial).is_none() {
                        peer.set_timer(Timer::ZeroKeyMaterial, now + timing.reject_after_time * 3);
                    }
                    for buf in staged {
                        self.drop_buf(Some(pid), DropReason::HandshakeGaveUp, buf);
                    }
                } else {
                    peer.handshake_attempts += 1;
                    self.initiate(now, pid, out, true);
                }
            }
            Timer::SendKeepalive => {
                self.send_keepalive(now, pid, batch, out);
                let peer = self.peer_mut(pid);
                if peer.need_another_keepalive {
                    peer.need_another_keepalive = false;
                    peer.set_timer(Timer::SendKeepalive, now + timing.keepalive_timeout);
                }
            }
            Timer::NewHandshake => self.initiate(now, pid, out, false),
            Timer::ZeroKeyMaterial => self.clear_sessions(pid),
            Timer::PersistentKeepalive => {
                if self.peer_mut(pid).persistent_keepalive.is_some() {
                    self.send_keepalive(now, pid, batch, out);
                }
            }
        }
    }

    /// Starts a handshake with `pid` now (unless one went out less than REKEY_TIMEOUT ago).
    pub fn force_handshake(
        &mut self,
        now: Instant,
        pid: PeerId,
        out: &mut Vec<Datagram>,
    ) -> Result<(), DeviceError> {
        self.peer_checked(pid)?;
        self.initiate(now, pid, out, false);
        Ok(())
    }

    // ---- Helpers -------------------------------------------------------------------------

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
        let mut held = 0;
        for (i, peer) in self.peers.iter().enumerate() {
            let Some(peer) = peer else { continue };
            if peer.staged.len() > self.config.max_staged_packets.max(1) {
                return Err(format!("peer {i} stages {} packets", peer.staged.len()));
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
        Ok(())
    }

    #[inline]
    fn peer_mut(&mut self, pid: PeerId) -> &mut Peer {
        self.peers[pid.index()].as_mut().expect("PeerId of a live peer")
    }

    fn peer_checked(&mut self, pid: PeerId) -> Result<&mut Peer, DeviceError> {
        self.peers.get_mut(pid.index()).and_then(Option::as_mut).ok_or(DeviceError::NoSuchPeer)
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
