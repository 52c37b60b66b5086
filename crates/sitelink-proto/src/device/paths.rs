//! Several underlay paths per peer, watched, with failover: a site with two uplinks, or a peer
//! reachable at two addresses.
//!
//! A peer configured with more than one endpoint (the preferred first, then fallbacks in
//! order) has one path per endpoint. A path is alive while authenticated transport messages
//! arrive from its endpoint; it dies after [`PathTiming::silence_limit`] without one. Traffic
//! uses the active path: the preferred live one. When the active path dies, traffic moves to
//! the first live path at once; when a better path comes back, traffic returns to it only
//! once it has been alive for [`PathTiming::hold_down`] (no flapping).
//!
//! Between two sitelink peers each side probes every path: a keepalive (an empty transport
//! message, ordinary WireGuard) to each endpoint every [`PathTiming::probe_interval`], while
//! the link carries data or has a persistent keepalive. Packets from a configured endpoint do
//! not roam the peer (its other paths' probes would move it back and forth); packets from any
//! other address do, as in plain WireGuard.
//!
//! A stock WireGuard peer must not be probed (`PeerConfig::probe_paths` false): it roams to
//! the source of every authenticated packet, so probes on a second path would move its
//! replies there and back. Such a peer's active path is judged by its own packets (its
//! persistent keepalive must be shorter than [`PathTiming::unprobed_silence_limit`]); when the
//! active path goes silent, traffic tries the next endpoint in order and starts a handshake
//! there, whose source address makes the peer follow.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sitelink_frame::Datagram;

use super::{Device, live};
use crate::batch::CryptoBatch;
use crate::peer::{PeerId, Timer};

/// How paths are probed and judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathTiming {
    /// Between probes of each path (a keepalive per path).
    pub probe_interval: Duration,
    /// A probed path is dead after this long without an authenticated packet from it.
    pub silence_limit: Duration,
    /// An unprobed path (a stock peer's) is dead after this long without one.
    pub unprobed_silence_limit: Duration,
    /// A better path that came back takes the traffic again after being alive this long.
    pub hold_down: Duration,
}

impl Default for PathTiming {
    fn default() -> Self {
        PathTiming {
            probe_interval: Duration::from_millis(200),
            silence_limit: Duration::from_millis(600),
            unprobed_silence_limit: Duration::from_millis(1500),
            hold_down: Duration::from_secs(3),
        }
    }
}

/// Why the active path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathSwitchReason {
    /// The active path went silent; this one was alive.
    ActiveDied,
    /// A better path has been alive for the hold-down time.
    BetterPathBack,
    /// The active path went silent and no path was known alive (an unprobed peer's next
    /// endpoint, or a probed peer's first path to come back).
    Trying,
}

/// A change of a peer's active path, for the embedding application to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathSwitch {
    /// The peer.
    pub peer: PeerId,
    /// Its public key (for the log).
    pub public_key: sitelink_crypto::PublicKey,
    /// The endpoint traffic left (`None` if it had roamed to an unconfigured address).
    pub from: Option<SocketAddr>,
    /// The endpoint traffic now goes to.
    pub to: SocketAddr,
    /// Why.
    pub reason: PathSwitchReason,
    /// When.
    pub at: Instant,
}

/// One path's state, as shown in a peer's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStats {
    /// The peer's endpoint on this path.
    pub endpoint: SocketAddr,
    /// Whether authenticated packets arrive on it.
    pub alive: bool,
    /// Whether traffic uses it now (filled in when the statistics are taken).
    pub active: bool,
    /// When the last authenticated packet came from it. (No round-trip time: a WireGuard
    /// keepalive has no answer to time.)
    pub last_received: Option<Instant>,
    /// How many times traffic moved to this path.
    pub switches_to: u64,
    /// Probes sent on it, and their bytes on the wire (WireGuard messages, without UDP/IP).
    pub probes_sent: u64,
    /// See `probes_sent`.
    pub probe_bytes: u64,
}

/// One path: what the statistics show, and since when it has been alive.
#[derive(Debug, Clone)]
pub(crate) struct Path {
    pub(crate) stats: PathStats,
    /// Start of the current run of life (the hold-down counts from here).
    alive_since: Option<Instant>,
}

/// A peer's paths (see the module documentation). Empty or one endpoint: plain WireGuard.
#[derive(Debug, Default)]
pub(crate) struct Paths {
    pub(crate) list: Vec<Path>,
    /// Index into `list` of the path in use; `None` after roaming to another address.
    pub(crate) active: Option<usize>,
    /// Probe every path (a sitelink peer), or judge by the peer's own packets (stock).
    pub(crate) probe: bool,
    /// When traffic last changed path (an unprobed peer tries the next one after a silence).
    pub(crate) switched_at: Option<Instant>,
}

impl Paths {
    /// Several paths: the watching is on.
    pub(crate) fn multipath(&self) -> bool {
        self.list.len() > 1
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.list.iter().position(|p| p.stats.endpoint == addr)
    }

    /// The paths' statistics (`active` derived from the active index, the one place kept).
    pub(crate) fn stats(&self) -> Vec<PathStats> {
        self.list
            .iter()
            .enumerate()
            .map(|(i, p)| PathStats { active: Some(i) == self.active, ..p.stats.clone() })
            .collect()
    }
}

/// How long the active path has been silent: since its last packet, or since traffic moved
/// to it; `None` while it has never carried anything (a link just configured waits for its
/// first handshake rather than trying other endpoints).
fn silent_for(paths: &Paths, now: Instant) -> Option<Duration> {
    let active = &paths.list[paths.active?];
    let since = match (active.stats.last_received, paths.switched_at) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b)?,
    };
    Some(now.saturating_duration_since(since))
}

/// Most path switches kept for the application to take ([`Device::take_path_switches`]).
const MAX_SWITCH_EVENTS: usize = 256;

impl Device {
    /// Sets a peer's endpoints: `endpoints[0]` preferred, the rest fallbacks in order. Paths
    /// that stay keep their state; traffic moves to the preferred endpoint if the one in use
    /// is no longer listed (or nothing was in use).
    pub(super) fn set_paths(&mut self, now: Instant, pid: PeerId, endpoints: &[SocketAddr], probe: bool) {
        let peer = self.peer_mut(pid);
        let distinct = endpoints.iter().enumerate().filter(|(i, ep)| !endpoints[..*i].contains(ep)).count();
        if distinct < 2 {
            // One endpoint (perhaps listed twice): plain WireGuard, no paths to watch.
            peer.paths = Paths::default();
            if let Some(&ep) = endpoints.first() {
                self.move_endpoint(pid, ep);
            }
            return;
        }
        let old = std::mem::take(&mut peer.paths.list);
        peer.paths.probe = probe;
        for &ep in endpoints {
            if peer.paths.index_of(ep).is_some() {
                continue;
            }
            let kept = old.iter().find(|p| p.stats.endpoint == ep).cloned();
            peer.paths.list.push(kept.unwrap_or(Path {
                stats: PathStats {
                    endpoint: ep,
                    alive: false,
                    active: false,
                    last_received: None,
                    switches_to: 0,
                    probes_sent: 0,
                    probe_bytes: 0,
                },
                alive_since: None,
            }));
        }
        if peer.paths.list.is_empty() {
            peer.paths.active = None;
            return;
        }
        let target = peer.endpoint.and_then(|ep| peer.paths.index_of(ep)).unwrap_or(0);
        peer.paths.active = Some(target);
        let endpoint = peer.paths.list[target].stats.endpoint;
        self.move_endpoint(pid, endpoint);
        self.arm_path_probe(now, pid);
    }

    /// An authenticated transport message came from `addr`: notes it on its path. Returns
    /// whether the address is one of the peer's paths (then the peer does not roam).
    pub(super) fn path_received(&mut self, now: Instant, pid: PeerId, addr: SocketAddr) -> bool {
        let paths = &mut self.peer_mut(pid).paths;
        if !paths.multipath() {
            return false;
        }
        let Some(i) = paths.index_of(addr) else {
            // Roaming to an address not configured: plain WireGuard's rule.
            paths.active = None;
            return false;
        };
        let path = &mut paths.list[i];
        if !path.stats.alive {
            path.stats.alive = true;
            path.alive_since = Some(now);
        }
        path.stats.last_received = Some(now);
        true
    }

    /// Arms the probe timer of a multipath peer, unless it is armed.
    pub(super) fn arm_path_probe(&mut self, now: Instant, pid: PeerId) {
        let interval = self.config.paths.probe_interval;
        let peer = self.peer_mut(pid);
        if peer.paths.multipath() && peer.timer(Timer::PathProbe).is_none() {
            self.arm(pid, Timer::PathProbe, now + interval);
        }
    }

    /// The probe timer fired: judge the paths, switch if needed, probe, and re-arm while the
    /// link is in use (data within KEEPALIVE_TIMEOUT) or has a persistent keepalive.
    pub(super) fn on_path_probe(
        &mut self,
        now: Instant,
        pid: PeerId,
        batch: &mut CryptoBatch,
        out: &mut Vec<Datagram>,
    ) {
        let timing = self.config.paths;
        let keepalive_timeout = self.config.timing.keepalive_timeout;
        let Some(peer) = live(&mut self.peers, pid) else { return };
        if !peer.paths.multipath() {
            return;
        }
        let limit = if peer.paths.probe { timing.silence_limit } else { timing.unprobed_silence_limit };
        for p in &mut peer.paths.list {
            if p.stats.alive
                && p.stats.last_received.is_none_or(|t| now.saturating_duration_since(t) >= limit)
            {
                p.stats.alive = false;
                p.alive_since = None;
            }
        }
        self.choose_path(now, pid, limit, out);
        let peer = self.peer_mut(pid);
        if peer.paths.probe {
            self.send_probes(now, pid, batch);
        }
        let peer = self.peer_mut(pid);
        let in_use = peer.last_data_at.is_some_and(|t| now.saturating_duration_since(t) < keepalive_timeout)
            || peer.persistent_keepalive.is_some();
        if in_use {
            self.arm(pid, Timer::PathProbe, now + timing.probe_interval);
        }
    }

    fn choose_path(&mut self, now: Instant, pid: PeerId, limit: Duration, out: &mut Vec<Datagram>) {
        let hold_down = self.config.paths.hold_down;
        let peer = self.peer_mut(pid);
        let paths = &peer.paths;
        let active_ok = paths.active.is_some_and(|a| paths.list[a].stats.alive);
        let candidate = (0..paths.list.len()).find(|&k| {
            let p = &paths.list[k];
            p.stats.alive
                && (Some(k) == paths.active
                    || !active_ok
                    || p.alive_since.is_some_and(|t| now.saturating_duration_since(t) >= hold_down))
        });
        let (next, reason) = match candidate {
            Some(k) if Some(k) == paths.active => return,
            Some(k) if active_ok => (k, PathSwitchReason::BetterPathBack),
            Some(k) => (k, PathSwitchReason::ActiveDied),
            // Nothing known alive. A probed peer's probes will find the first path back; an
            // unprobed peer's next endpoint is tried after each silence.
            None if !paths.probe && silent_for(paths, now) >= Some(limit) => {
                let next = paths.active.map_or(0, |a| (a + 1) % paths.list.len());
                (next, PathSwitchReason::Trying)
            }
            None => return,
        };
        let from = peer.endpoint;
        let to = peer.paths.list[next].stats.endpoint;
        peer.paths.active = Some(next);
        peer.paths.switched_at = Some(now);
        peer.paths.list[next].stats.switches_to += 1;
        let unprobed = !peer.paths.probe;
        let public_key = *peer.keys.public_key();
        self.move_endpoint(pid, to);
        if self.path_switches.len() == MAX_SWITCH_EVENTS {
            self.path_switches.remove(0);
        }
        self.path_switches.push(PathSwitch { peer: pid, public_key, from, to, reason, at: now });
        if unprobed {
            // A handshake from the new path: its source address makes the peer follow.
            self.initiate(now, pid, out, false);
        }
    }

    /// A keepalive to every path's endpoint, sealed under the current keypair (none without
    /// a session: the handshake comes first).
    fn send_probes(&mut self, now: Instant, pid: PeerId, batch: &mut CryptoBatch) {
        let timing = self.config.timing;
        let tail = sitelink_frame::wire::padding_for(0, self.config.mtu) + sitelink_frame::wire::TAG_LEN;
        let bytes = (sitelink_frame::wire::TRANSPORT_HEADER_LEN + tail) as u64;
        let n = self.peer_mut(pid).paths.list.len();
        for i in 0..n {
            let buf = self.pool.get();
            let Some(peer) = live(&mut self.peers, pid) else { return self.pool.put(buf) };
            let Some(kp) = peer.current.as_mut().filter(|k| k.can_send(now, &timing)) else {
                return self.pool.put(buf);
            };
            if buf.tailroom() < tail {
                return self.pool.put(buf);
            }
            let counter = kp.next_counter();
            let endpoint = peer.paths.list[i].stats.endpoint;
            batch.push_seal(&kp.send, counter, kp.remote_index, endpoint, buf);
            let path = &mut peer.paths.list[i].stats;
            path.probes_sent += 1;
            path.probe_bytes += bytes;
            peer.stats.keepalives_sent += 1;
            peer.stats.tx_bytes += bytes;
        }
    }

    /// Moves the path switches since the last call to `out` (at most the last 256).
    pub fn take_path_switches(&mut self, out: &mut Vec<PathSwitch>) {
        out.append(&mut self.path_switches);
    }
}
