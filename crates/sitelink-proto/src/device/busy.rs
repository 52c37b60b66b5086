//! Which peers are busiest: the ones whose endpoints deserve the I/O layer's few connected
//! sockets (see `sitelink_io::peers`).
//!
//! A hub may have ten thousand peers and room for a few dozen connected sockets, so the
//! choice must follow the traffic, and cost nothing per idle peer. The transport path notes
//! each peer's bytes ([`Device::note_traffic`]: an addition, and on a peer's first packet of
//! an interval one push onto the active list). Once per [`RANK_INTERVAL`], and only when
//! something was active, the ranking looks at the ranked peers and the active ones, nobody
//! else: a ranked peer keeps its place unless a newcomer moved more than twice its bytes, so
//! two peers of equal traffic do not take turns. While the ranking has room, a peer joins it
//! on its first packet, so a link with a few peers has them all connected at once.

use std::time::{Duration, Instant};

use super::{Device, live};
use crate::peer::PeerId;

/// How many peers the ranking holds, busiest first: as many as an I/O layer may connect.
pub const BUSIEST_PEERS: usize = 32;

/// How often the ranking is redone while peers carry traffic.
pub const RANK_INTERVAL: Duration = Duration::from_secs(1);

/// The ranking's state (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct BusyPeers {
    /// At most [`BUSIEST_PEERS`] live peers, busiest first at the last ranking.
    ranked: Vec<PeerId>,
    /// The peers with traffic since the last ranking, each once (`Peer::busy_listed`).
    active: Vec<PeerId>,
    /// When the ranking is next redone: set by the first traffic after a ranking.
    rank_at: Option<Instant>,
    /// The ranking's working list: (peer, score, was ranked).
    scratch: Vec<(PeerId, u64, bool)>,
}

impl BusyPeers {
    /// When [`Device::on_timers`] should redo the ranking, if anything is to rank.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.rank_at
    }

    /// Forgets a peer that is being removed.
    pub(super) fn forget(&mut self, pid: PeerId) -> bool {
        self.active.retain(|&p| p != pid);
        let before = self.ranked.len();
        self.ranked.retain(|&p| p != pid);
        before != self.ranked.len()
    }

    #[cfg(test)]
    fn ranked(&self) -> &[PeerId] {
        &self.ranked
    }

    #[cfg(test)]
    fn active(&self) -> &[PeerId] {
        &self.active
    }
}

impl Device {
    /// Counts `bytes` of transport traffic (either way) for `pid` in the busy-peer ranking.
    /// O(1) but for the peer's first packet of an interval, which may scan the short ranking.
    #[inline]
    pub(super) fn note_traffic(&mut self, now: Instant, pid: PeerId, bytes: usize) {
        let peer = self.peer_mut(pid);
        peer.busy_bytes = peer.busy_bytes.saturating_add(bytes as u64);
        if peer.busy_listed {
            return;
        }
        peer.busy_listed = true;
        let busy = &mut self.busy;
        busy.active.push(pid);
        busy.rank_at.get_or_insert(now + RANK_INTERVAL);
        if busy.ranked.len() < BUSIEST_PEERS && !busy.ranked.contains(&pid) {
            busy.ranked.push(pid);
            self.endpoint_generation += 1;
        }
    }

    /// Redoes the ranking if it is due: O(ranked + active), whatever the number of peers.
    pub(super) fn rank_busy_peers(&mut self, now: Instant) {
        if self.busy.rank_at.is_none_or(|t| t > now) {
            return;
        }
        self.busy.rank_at = None;
        // (peer, score, was ranked): a ranked peer counts double, so only a clearly busier
        // newcomer displaces it.
        // Both lists keep their capacity: once warm, a ranking allocates nothing.
        let mut candidates = std::mem::take(&mut self.busy.scratch);
        candidates.clear();
        for &pid in &self.busy.ranked {
            let bytes = self.peers[pid.index()].as_ref().map_or(0, |p| p.busy_bytes);
            candidates.push((pid, bytes.saturating_mul(2), true));
        }
        let mut active = std::mem::take(&mut self.busy.active);
        for &pid in &active {
            let Some(peer) = live(&mut self.peers, pid) else { continue };
            let bytes = std::mem::take(&mut peer.busy_bytes);
            peer.busy_listed = false;
            if !self.busy.ranked.contains(&pid) {
                candidates.push((pid, bytes, false));
            }
        }
        active.clear();
        self.busy.active = active;
        // Busiest first; among equals, the ranked before the newcomers, then by id (stable).
        candidates.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        candidates.truncate(BUSIEST_PEERS);
        let changed = candidates.len() != self.busy.ranked.len()
            || candidates.iter().zip(&self.busy.ranked).any(|(c, &r)| c.0 != r);
        if changed {
            self.busy.ranked.clear();
            self.busy.ranked.extend(candidates.iter().map(|c| c.0));
            self.endpoint_generation += 1;
        }
        self.busy.scratch = candidates;
    }

    /// The ranking holds at most [`BUSIEST_PEERS`] live peers, each once; the active list
    /// holds live peers, each once, exactly those marked `busy_listed`; something active
    /// means a ranking is due.
    pub(super) fn check_busy_invariants(&self) -> Result<(), String> {
        let busy = &self.busy;
        if busy.ranked.len() > BUSIEST_PEERS {
            return Err(format!("{} peers ranked", busy.ranked.len()));
        }
        for (what, list) in [("ranked", &busy.ranked), ("active", &busy.active)] {
            for (i, pid) in list.iter().enumerate() {
                if self.peers.get(pid.index()).and_then(Option::as_ref).is_none() {
                    return Err(format!("{what} {pid:?} is gone"));
                }
                if list[..i].contains(pid) {
                    return Err(format!("{what} {pid:?} is listed twice"));
                }
            }
        }
        let listed = self.peers.iter().flatten().filter(|p| p.busy_listed).count();
        if listed != busy.active.len()
            || busy.active.iter().any(|p| !self.peers[p.index()].as_ref().is_some_and(|p| p.busy_listed))
        {
            return Err("the active list and the peers' marks disagree".into());
        }
        if !busy.active.is_empty() && busy.rank_at.is_none() {
            return Err("peers are active but no ranking is due".into());
        }
        Ok(())
    }

    /// The endpoints of the busiest peers, busiest first (peers without one are skipped):
    /// where an I/O layer with room for a few connected sockets should put them. Changes
    /// only when [`endpoint_generation`](Self::endpoint_generation) does.
    pub fn busiest_endpoints(&self) -> impl Iterator<Item = std::net::SocketAddr> + '_ {
        self.busy.ranked.iter().filter_map(|pid| self.peers.get(pid.index())?.as_ref()?.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeviceConfig, PeerConfig};
    use sitelink_crypto::{PrivateKey, Random};
    use std::net::SocketAddr;

    struct Counter(u64);
    impl Random for Counter {
        fn fill(&mut self, dest: &mut [u8]) {
            for b in dest {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                *b = (self.0 >> 56) as u8;
            }
        }
    }

    fn device_with_peers(n: usize) -> (Device, Vec<PeerId>, Instant) {
        let now = Instant::now();
        let config = DeviceConfig::new(PrivateKey::from_bytes([1; 32]));
        let mut dev = Device::new(config, Box::new(Counter(7)), now, Duration::from_secs(1_700_000_000));
        let pids = (0..n)
            .map(|i| {
                let key = PrivateKey::from_bytes([i as u8 + 2; 32]).public_key();
                let mut pc = PeerConfig::new(key);
                pc.endpoint = Some(SocketAddr::from(([192, 0, 2, 1], 1000 + i as u16)));
                dev.upsert_peer(now, pc).expect("add peer")
            })
            .collect();
        (dev, pids, now)
    }

    fn ranked_ports(dev: &Device) -> Vec<u16> {
        dev.busiest_endpoints().map(|a| a.port()).collect()
    }

    #[test]
    fn peers_join_the_ranking_on_their_first_packet_while_it_has_room() {
        let (mut dev, pids, now) = device_with_peers(3);
        assert!(ranked_ports(&dev).is_empty(), "nobody has carried traffic");
        let g = dev.endpoint_generation();
        dev.note_traffic(now, pids[2], 100);
        assert_eq!(ranked_ports(&dev), [1002]);
        assert_ne!(dev.endpoint_generation(), g);
        let g = dev.endpoint_generation();
        dev.note_traffic(now, pids[2], 100);
        assert_eq!(dev.endpoint_generation(), g, "a second packet changes nothing");
        assert_eq!(dev.next_deadline(), Some(now + RANK_INTERVAL));
        dev.check_invariants().unwrap();
    }

    #[test]
    fn a_busy_newcomer_displaces_an_idle_ranked_peer_at_the_next_ranking() {
        let (mut dev, pids, mut now) = device_with_peers(BUSIEST_PEERS + 1);
        for &pid in &pids[..BUSIEST_PEERS] {
            dev.note_traffic(now, pid, 100);
        }
        let newcomer = pids[BUSIEST_PEERS];
        dev.note_traffic(now, newcomer, 100);
        assert_eq!(dev.busy.ranked().len(), BUSIEST_PEERS);
        assert!(!dev.busy.ranked().contains(&newcomer), "no room yet");
        // Next interval: only the newcomer and peer 0 carry traffic.
        now += RANK_INTERVAL;
        let mut out = Vec::new();
        dev.on_timers(now, &mut out);
        dev.note_traffic(now, pids[0], 10_000);
        dev.note_traffic(now, newcomer, 10_000);
        now += RANK_INTERVAL;
        let g = dev.endpoint_generation();
        dev.on_timers(now, &mut out);
        assert_ne!(dev.endpoint_generation(), g);
        let ranked = dev.busy.ranked();
        assert_eq!(ranked.len(), BUSIEST_PEERS);
        assert_eq!(ranked[0], pids[0], "the busiest first (ranked, so counted double)");
        assert_eq!(ranked[1], newcomer);
        assert!(!ranked.contains(&pids[BUSIEST_PEERS - 1]), "the idle peer with the highest id left");
        dev.check_invariants().unwrap();
    }

    #[test]
    fn a_newcomer_with_no_more_than_twice_a_ranked_peers_traffic_waits() {
        let (mut dev, pids, mut now) = device_with_peers(BUSIEST_PEERS + 1);
        let mut out = Vec::new();
        for &pid in &pids[..BUSIEST_PEERS] {
            dev.note_traffic(now, pid, 100);
        }
        now += RANK_INTERVAL;
        dev.on_timers(now, &mut out);
        let before = dev.busy.ranked().to_vec();
        let g = dev.endpoint_generation();
        for &pid in &pids[..BUSIEST_PEERS] {
            dev.note_traffic(now, pid, 1000);
        }
        dev.note_traffic(now, pids[BUSIEST_PEERS], 2000);
        now += RANK_INTERVAL;
        dev.on_timers(now, &mut out);
        assert_eq!(dev.busy.ranked(), before, "equal or slightly busier: no churn");
        assert_eq!(dev.endpoint_generation(), g);
    }

    #[test]
    fn an_idle_device_has_no_ranking_deadline_and_keeps_its_ranking() {
        let (mut dev, pids, mut now) = device_with_peers(2);
        dev.note_traffic(now, pids[0], 100);
        now += RANK_INTERVAL;
        let mut out = Vec::new();
        dev.on_timers(now, &mut out);
        assert!(dev.busy.deadline().is_none(), "nothing active, nothing to redo");
        assert!(dev.busy.active().is_empty());
        assert_eq!(ranked_ports(&dev), [1000], "an idle ranked peer keeps its place");
        let g = dev.endpoint_generation();
        dev.remove_peer(pids[0]).unwrap();
        assert!(ranked_ports(&dev).is_empty());
        assert_ne!(dev.endpoint_generation(), g);
        dev.check_invariants().unwrap();
    }
}
