//! The data path: IP packets to datagrams (`encapsulate*`), datagrams to IP packets
//! (`decapsulate*`, then `complete` once a [`CryptoBatch`] has opened them), and the staging
//! of packets while a handshake runs.

use std::time::Instant;

use sitelink_frame::wire::{self, MessageType, TAG_LEN, TRANSPORT_HEADER_LEN, TransportData};
use sitelink_frame::{Datagram, PacketBuf, ip};

use super::Device;
use crate::batch::{CryptoBatch, OpenJob};
use crate::peer::{PeerId, Slot, Timer};
use crate::stats::DropReason;

impl Device {
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
    pub(super) fn with_scratch<R>(&mut self, f: impl FnOnce(&mut Self, &mut CryptoBatch) -> R) -> R {
        let mut batch = std::mem::take(&mut self.scratch);
        let r = f(self, &mut batch);
        self.scratch = batch;
        r
    }

    /// Readies `batch` for this device: the MTU its seals pad to, and the seals it failed.
    #[inline]
    pub(super) fn adopt_batch(&mut self, batch: &mut CryptoBatch) {
        batch.mtu = self.config.mtu;
        self.stats.drops.add_n(DropReason::NoTailroom, std::mem::take(&mut batch.failed_seals));
    }

    /// Sends the packet to `pid` if a session is up (its sealing queued in `batch`); else
    /// stages it and starts a handshake.
    #[inline]
    pub(super) fn send_packet(
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
        let wire_len = TRANSPORT_HEADER_LEN + len + tail;
        peer.stats.tx_bytes += wire_len as u64;
        let is_data = len != 0;
        if is_data {
            peer.stats.tx_packets += 1;
        } else {
            peer.stats.keepalives_sent += 1;
        }
        self.on_authenticated_sent(now, pid, is_data);
        self.note_traffic(now, pid, wire_len);
        if rekey {
            self.initiate(now, pid, out, false);
        }
    }

    pub(super) fn stage(&mut self, pid: PeerId, buf: PacketBuf) {
        let max = self.config.max_staged_packets.max(1);
        let peer = self.peer_mut(pid);
        let overflow = if peer.staged.len() >= max { peer.staged.pop_front() } else { None };
        self.peer_mut(pid).staged.push_back(buf);
        if let Some(old) = overflow {
            self.drop_buf(Some(pid), DropReason::StagedOverflow, old);
        }
    }

    /// Sends every staged packet if a session is up, else starts a handshake.
    pub(super) fn send_staged(
        &mut self,
        now: Instant,
        pid: PeerId,
        batch: &mut CryptoBatch,
        out: &mut Vec<Datagram>,
    ) {
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
    pub(super) fn send_keepalive(
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
    pub(super) fn receive_data(&mut self, now: Instant, mut d: Datagram, batch: &mut CryptoBatch) {
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
    pub(super) fn deliver(
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
        if len > 0 {
            peer.last_data_at = Some(now);
        }
        if !self.path_received(now, pid, job.addr) {
            self.move_endpoint(pid, job.addr);
        }
        if len > 0 {
            // Data, not a probe or keepalive: the link is in use, so its paths are watched.
            self.arm_path_probe(now, pid);
        }
        self.note_traffic(now, pid, job.wire_len);
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
                        self.arm(pid, Timer::SendKeepalive, now + timing.keepalive_timeout);
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
    pub(super) fn confirm_next(&mut self, now: Instant, pid: PeerId) {
        let peer = self.peer_mut(pid);
        let old_previous = peer.previous.take();
        peer.previous = peer.current.take();
        peer.current = peer.next.take();
        if let Some(kp) = old_previous {
            self.by_index.remove(&kp.local_index);
        }
        self.handshake_complete(now, pid);
    }
}
