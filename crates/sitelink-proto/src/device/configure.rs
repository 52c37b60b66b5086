//! Configuration: the identity, peers, their keys, endpoints and allowed IPs (cryptokey
//! routing), and read-only views of them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sitelink_crypto::cookie::MacChecker;
use sitelink_crypto::noise::{Identity, PeerKeys};
use sitelink_crypto::{PresharedKey, PrivateKey, PublicKey};

use super::DeviceError;
use super::{Device, PeerView, live};
use crate::config::{DeviceConfig, IpNet, PeerConfig};
use crate::peer::{Peer, PeerId, Timer};
use crate::stats::DeviceStats;

impl Device {
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
            let Some(peer) = live(&mut self.peers, pid) else { continue };
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
                let mut peer = Peer::new(keys);
                peer.epoch = self.next_epoch;
                self.next_epoch = self.next_epoch.wrapping_add(1);
                let pid = match self.free_ids.pop() {
                    Some(i) => {
                        self.peers[i as usize] = Some(Box::new(peer));
                        PeerId(i)
                    }
                    None => {
                        self.peers.push(Some(Box::new(peer)));
                        PeerId((self.peers.len() - 1) as u32)
                    }
                };
                self.by_key.insert(config.public_key, pid);
                self.reserve_timer_queue();
                pid
            }
        };
        self.peer_mut(pid).keys.set_preshared_key(config.preshared_key.unwrap_or_default());
        if let Some(ep) = config.endpoint {
            let mut endpoints = Vec::with_capacity(1 + config.fallback_endpoints.len());
            endpoints.push(ep);
            endpoints.extend_from_slice(&config.fallback_endpoints);
            self.set_paths(now, pid, &endpoints, config.probe_paths);
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
        self.busy.forget(pid);
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

    /// Sets a peer's endpoint (it changes again when the peer roams). One endpoint replaces
    /// a list of them, as `wg set ... endpoint` does.
    pub fn set_endpoint(&mut self, pid: PeerId, endpoint: SocketAddr) -> Result<(), DeviceError> {
        self.peer_checked(pid)?.paths = super::Paths::default();
        self.move_endpoint(pid, endpoint);
        Ok(())
    }

    /// Sets a live peer's endpoint, noting a change in `endpoint_generation`.
    pub(super) fn move_endpoint(&mut self, pid: PeerId, endpoint: SocketAddr) {
        let peer = self.peer_mut(pid);
        if peer.endpoint != Some(endpoint) {
            peer.endpoint = Some(endpoint);
            self.endpoint_generation += 1;
        }
    }

    /// A number that changes whenever a peer's endpoint may have: set by configuration, moved
    /// by roaming, or gone with its peer. I/O layers that keep something per endpoint (a
    /// connected socket) compare it with the value they last saw, and only then walk
    /// [`busiest_endpoints`](Self::busiest_endpoints) again.
    pub fn endpoint_generation(&self) -> u64 {
        self.endpoint_generation
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
            self.arm(pid, Timer::PersistentKeepalive, now);
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

    pub(super) fn claim_prefix(&mut self, pid: PeerId, net: IpNet) {
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

    pub(super) fn rebuild_routes(&mut self) {
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
}
