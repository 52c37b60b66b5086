//! Handshakes: initiations sent and retried, initiations and responses received, MAC checks,
//! cookie replies under load, and the receiver indices each handshake registers.

use std::time::{Duration, Instant};

use sitelink_crypto::Tai64N;
use sitelink_crypto::cookie::MacCheck;
use sitelink_crypto::noise::{self};
use sitelink_frame::Datagram;
use sitelink_frame::wire::{
    COOKIE_REPLY_LEN, CookieReply, HandshakeInitiation, HandshakeResponse, INITIATION_LEN, RESPONSE_LEN,
    mac_offsets,
};

use super::{Device, live};
use crate::batch::CryptoBatch;
use crate::peer::{Keypair, PeerId, Pending, Timer};
use crate::stats::DropReason;

impl Device {
    pub(super) fn wall_clock(&self, now: Instant) -> Duration {
        self.anchor.1 + now.saturating_duration_since(self.anchor.0)
    }

    /// Timer jitter, up to REKEY_TIMEOUT's jitter. It only keeps peers from retrying in step,
    /// so it comes from a SplitMix64 sequence seeded once from `rng`, not from the CSPRNG: a
    /// data packet sent after one received arms a jittered timer, and an OS random call there
    /// would be a system call on the data path.
    pub(super) fn jitter(&mut self) -> Duration {
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
    pub(super) fn new_index(&mut self, pid: PeerId) -> u32 {
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
    pub(super) fn initiate(&mut self, now: Instant, pid: PeerId, out: &mut Vec<Datagram>, is_retry: bool) {
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
        let Some(peer) = live(&mut self.peers, pid) else {
            self.by_index.remove(&index);
            return self.pool.put(buf);
        };
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
        peer.pending = Some(Box::new(Pending { state }));
        peer.last_initiation_sent = Some(now);
        peer.stats.handshake_initiations_sent += 1;
        peer.stats.tx_bytes += INITIATION_LEN as u64;
        self.stats.handshake_initiations_sent += 1;
        out.push(Datagram { addr: endpoint, buf });
        let jitter = self.jitter();
        self.arm(pid, Timer::RetransmitHandshake, now + timing.rekey_timeout + jitter);
        self.on_authenticated_sent(now, pid, false);
    }

    /// Checks mac1 (and under load mac2 and the source's rate), answering with a cookie reply
    /// when a cookie is needed. Returns whether to go on with the message.
    pub(super) fn admit_handshake(
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

    pub(super) fn receive_initiation(&mut self, now: Instant, d: Datagram, out: &mut Vec<Datagram>) {
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
        let Some(peer) = live(&mut self.peers, pid) else {
            return self.drop_buf(None, DropReason::UnknownPeer, d.buf);
        };
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
        if !self.path_received(now, pid, d.addr) {
            self.move_endpoint(pid, d.addr);
        }
        self.on_authenticated_received(now, pid);

        // Answer it. The response goes into the datagram's own buffer.
        let index = self.new_index(pid);
        let mut buf = d.buf;
        buf.set_len(RESPONSE_LEN).expect("an initiation's buffer holds a response");
        let Some(peer) = live(&mut self.peers, pid) else {
            self.by_index.remove(&index);
            return self.drop_buf(None, DropReason::UnknownPeer, buf);
        };
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
        let old_next = peer.next.replace(Box::new(Keypair::new(&keys, now)));
        peer.stats.tx_bytes += RESPONSE_LEN as u64;
        if let Some(kp) = old_next {
            self.by_index.remove(&kp.local_index);
        }
        self.stats.handshake_responses_sent += 1;
        out.push(Datagram { addr: d.addr, buf });
        self.on_authenticated_sent(now, pid, false);
        self.session_derived(now, pid);
    }

    pub(super) fn receive_response(
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
        // The initiator's new keypair is confirmed at once: it becomes current. A keypair
        // waiting for confirmation (both sides initiated at once) is demoted to previous, and
        // the current one is then dropped, as the kernel module does; else current becomes
        // previous. Every keypair dropped gives its index up.
        let new = Box::new(Keypair::new(&keys, now));
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
        let from = d.addr;
        self.pool.put(d.buf);
        if !self.path_received(now, pid, from) {
            self.move_endpoint(pid, from);
        }
        self.session_derived(now, pid);
        self.handshake_complete(now, pid);
        self.on_authenticated_received(now, pid);
        self.send_keepalive(now, pid, batch, out);
    }

    pub(super) fn receive_cookie_reply(&mut self, now: Instant, d: Datagram) {
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
}
