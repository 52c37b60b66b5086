//! Timers (WireGuard whitepaper, section 6): what each event arms or cancels, when the next
//! one is due, and what firing each one does.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use sitelink_frame::Datagram;

use super::DeviceError;
use super::{Device, TimerEntry, live};
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
        if is_data {
            peer.last_data_at = Some(now);
        }
        let keepalive = peer.persistent_keepalive;
        if needs_new_handshake_timer {
            self.arm(
                pid,
                Timer::NewHandshake,
                now + timing.keepalive_timeout + timing.rekey_timeout + jitter,
            );
        }
        if let Some(interval) = keepalive {
            self.arm(pid, Timer::PersistentKeepalive, now + interval);
        }
        if is_data {
            self.arm_path_probe(now, pid);
        }
    }

    pub(super) fn on_authenticated_received(&mut self, now: Instant, pid: PeerId) {
        let peer = self.peer_mut(pid);
        peer.cancel_timer(Timer::NewHandshake);
        if let Some(interval) = peer.persistent_keepalive {
            self.arm(pid, Timer::PersistentKeepalive, now + interval);
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
        self.arm(pid, Timer::ZeroKeyMaterial, now + t);
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
        // A new session is about to carry traffic: rank the peer now (while the ranking has
        // room), so the I/O layer connects its socket before the data flows, not mid-stream.
        self.note_traffic(now, pid, 0);
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

    /// Grows the timer queue's capacity with the peers (a peer's timers each take an entry,
    /// and a timer pulled earlier a second one until the first is tidied), at least 64, so
    /// that arming a timer on the data path does not allocate.
    pub(super) fn reserve_timer_queue(&mut self) {
        let want = (Timer::ALL.len() * self.peers.len()).max(64);
        if self.timer_queue.capacity() < want {
            self.timer_queue.reserve_exact(want - self.timer_queue.len());
        }
    }

    /// Sets `pid`'s timer `t` to `at`, queueing an entry for it unless one is queued at or
    /// before `at` (a timer pushed back, as most are on every packet, costs no queue work).
    pub(super) fn arm(&mut self, pid: PeerId, t: Timer, at: Instant) {
        let peer = self.peer_mut(pid);
        if peer.set_timer(t, at) {
            let epoch = peer.epoch;
            self.timer_queue.push(Reverse(TimerEntry { at, pid: pid.0, epoch, timer: t as u8 }));
        }
    }

    /// The earliest time at which [`on_timers`](Self::on_timers) has work, if any: the head of
    /// the timer queue, O(1). (It may be a little early, after a timer was cancelled or
    /// removed with its peer: `on_timers` then finds nothing due, and moves it on.)
    pub fn next_deadline(&self) -> Option<Instant> {
        let timers = self.timer_queue.peek().map(|e| e.0.at);
        match (timers, self.busy.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every timer due at `now`: handshake retries, keepalives, rekeys, key erasure. It
    /// touches only the peers whose timers are due, whatever the number of peers.
    pub fn on_timers(&mut self, now: Instant, out: &mut Vec<Datagram>) {
        self.with_scratch(|dev, batch| {
            dev.adopt_batch(batch);
            // Entries queued while firing (a timer armed for `now`) wait for the next call.
            let mut budget = dev.timer_queue.len();
            while budget > 0 {
                budget -= 1;
                match dev.timer_queue.peek() {
                    Some(Reverse(e)) if e.at <= now => {}
                    _ => break,
                }
                let Some(Reverse(entry)) = dev.timer_queue.pop() else { break };
                if let Some((pid, timer)) = dev.settle(entry, now) {
                    dev.fire(now, pid, timer, batch, out);
                }
            }
            dev.tidy_timer_queue(now);
            dev.rank_busy_peers(now);
            // Keepalives and staged packets: few, so sealed here rather than handed out.
            batch.seal_into(out);
        });
    }

    /// Takes a popped queue entry: the timer to fire now (cancelled in its peer), or `None`
    /// when the entry is stale (its peer gone, an earlier entry queued since, the timer
    /// cancelled) or the timer was pushed back (queued again for its new time).
    fn settle(&mut self, entry: TimerEntry, now: Instant) -> Option<(PeerId, Timer)> {
        let pid = PeerId(entry.pid);
        let peer = live(&mut self.peers, pid).filter(|p| p.epoch == entry.epoch)?;
        let timer = Timer::ALL[usize::from(entry.timer)];
        let t = timer as usize;
        if peer.queued[t] != Some(entry.at) {
            return None;
        }
        peer.queued[t] = None;
        match peer.timers[t] {
            None => None,
            Some(at) if at > now => {
                peer.queued[t] = Some(at);
                self.timer_queue.push(Reverse(TimerEntry { at, ..entry }));
                None
            }
            Some(_) => {
                peer.cancel_timer(timer);
                Some((pid, timer))
            }
        }
    }

    /// Drops stale entries from the queue's head and moves pushed-back ones to their time,
    /// so that [`next_deadline`](Self::next_deadline) is the earliest live timer's.
    fn tidy_timer_queue(&mut self, now: Instant) {
        while let Some(&Reverse(entry)) = self.timer_queue.peek() {
            let pid = PeerId(entry.pid);
            let t = usize::from(entry.timer);
            let live_entry = live(&mut self.peers, pid)
                .filter(|p| p.epoch == entry.epoch && p.queued[t] == Some(entry.at))
                .map(|p| p.timers[t]);
            match live_entry {
                // The head is a live timer at its own time: the queue is in order.
                Some(Some(at)) if at == entry.at || at <= now => break,
                // Pushed back: queue it at its time.
                Some(Some(_)) => {
                    self.timer_queue.pop();
                    let _ = self.settle(entry, now);
                }
                // Cancelled, superseded, or its peer gone.
                _ => {
                    self.timer_queue.pop();
                    if let Some(p) = live(&mut self.peers, pid).filter(|p| p.epoch == entry.epoch)
                        && p.queued[t] == Some(entry.at)
                    {
                        p.queued[t] = None;
                    }
                }
            }
        }
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
                        self.arm(pid, Timer::ZeroKeyMaterial, now + timing.reject_after_time * 3);
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
                    self.arm(pid, Timer::SendKeepalive, now + timing.keepalive_timeout);
                }
            }
            Timer::NewHandshake => self.initiate(now, pid, out, false),
            Timer::ZeroKeyMaterial => self.clear_sessions(pid),
            Timer::PersistentKeepalive => {
                if self.peer_mut(pid).persistent_keepalive.is_some() {
                    self.send_keepalive(now, pid, batch, out);
                }
            }
            Timer::PathProbe => self.on_path_probe(now, pid, batch, out),
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
