//! Timers (WireGuard whitepaper, section 6): what each event arms or cancels, when the next
//! one is due, and what firing each one does.

use std::time::{Duration, Instant};

use sitelink_frame::Datagram;

use super::Device;
use super::DeviceError;
use crate::batch::CryptoBatch;
use crate::config::Timing;
use crate::peer::{PeerId, Timer};
use crate::stats::DropReason;

impl Device {
    pub(super) fn on_authenticated_sent(&mut self, now: Instant, pid: PeerId, is_data: bool) {
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

    pub(super) fn on_authenticated_received(&mut self, now: Instant, pid: PeerId) {
        let peer = self.peer_mut(pid);
        peer.cancel_timer(Timer::NewHandshake);
        if let Some(interval) = peer.persistent_keepalive {
            peer.set_timer(Timer::PersistentKeepalive, now + interval);
        }
    }

    pub(super) fn keep_key_fresh_on_receive(&mut self, now: Instant, pid: PeerId, out: &mut Vec<Datagram>) {
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

    pub(super) fn session_derived(&mut self, now: Instant, pid: PeerId) {
        let t = self.config.timing.reject_after_time * 3;
        self.peer_mut(pid).set_timer(Timer::ZeroKeyMaterial, now + t);
    }

    /// A session is up: on the initiator when the response arrives, on the responder when the
    /// first message on the new keypair confirms it. `wg` shows `now` as the last handshake,
    /// as the kernel module does.
    pub(super) fn handshake_complete(&mut self, now: Instant, pid: PeerId) {
        let now_wall = self.wall_clock(now);
        let peer = self.peer_mut(pid);
        peer.cancel_timer(Timer::RetransmitHandshake);
        peer.handshake_attempts = 0;
        peer.sent_lastminute_handshake = false;
        peer.stats.handshakes_completed += 1;
        peer.stats.last_handshake = Some(now_wall);
        self.stats.sessions_established += 1;
    }

    pub(super) fn clear_sessions(&mut self, pid: PeerId) {
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

    pub(super) fn fire(
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
}
