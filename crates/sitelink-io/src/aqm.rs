//! Keeping the receive queue short: CoDel (RFC 8289) over the time datagrams waited in the
//! socket's receive queue.
//!
//! When a link's receiving end is its bottleneck (it opens and writes out less than the
//! sender seals and sends, as a CPU-bound worker on a small machine does under a bulk
//! transfer), the queue forms in the UDP socket's receive buffer, and TCP through the tunnel
//! fills whatever that buffer holds: megabytes, milliseconds of delay for every packet behind
//! it, a ping or a video call's frames included. The kernel stamps each datagram as it
//! arrives (`SO_TIMESTAMPNS`); the backend tells this controller how long each waited, and
//! once the wait has stayed above [`TARGET`] for an [`INTERVAL`] it drops bulk datagrams, one
//! at a time and more often the longer the queue persists, so that TCP backs off and the
//! queue drains to the target, as fq_codel does for the kernel's own queues.
//!
//! Only datagrams larger than [`crate::SMALL_PACKET`] are ever dropped, so the
//! packets of small flows (pings, acknowledgements, handshakes, keepalives) never are; they
//! are dropped before they are opened, so dropping also saves the work of opening them. Each
//! drop is counted (`IoStats::udp_queue_drops`). The controller only sees the time a datagram
//! waited and the time now (nanoseconds of the realtime clock, the kernel's stamp): it reads no
//! clock itself, and its tests drive it with made-up times.

/// The queue delay CoDel lets stand: a bulk transfer through the link keeps the link busy with
/// this much queue (its round trip here is about a millisecond), and a ping behind it waits
/// about this long.
pub(crate) const TARGET: u64 = 500_000;

/// How long the delay must stay above [`TARGET`] before dropping starts, and the base of the
/// drop rate: a few round trips of a transfer through the link.
pub(crate) const INTERVAL: u64 = 5_000_000;

/// CoDel's state for one receive queue (the datagrams a backend takes from its sockets).
#[derive(Debug, Default)]
pub(crate) struct Codel {
    /// When the delay first stayed above the target, plus an interval: dropping may start then.
    first_above: Option<u64>,
    /// Dropping now (the delay has stayed above the target for an interval).
    dropping: bool,
    /// When the next drop is due while dropping.
    drop_next: u64,
    /// Drops in this dropping state, and in the one before.
    count: u32,
    last_count: u32,
}

impl Codel {
    /// Whether to drop a bulk datagram that waited `sojourn` ns, taken from the queue at
    /// `now` (ns; any clock that only moves forward during the link's life), with more
    /// waiting behind it (`backlog`) or not. (A datagram that finds the queue empty behind it
    /// did not wait behind a standing queue but for a reader that was busy elsewhere: as in
    /// RFC 8289, that is no reason to drop.)
    pub(crate) fn drop(&mut self, sojourn: u64, now: u64, backlog: bool) -> bool {
        let ok_to_drop = if sojourn < TARGET || !backlog {
            self.first_above = None;
            false
        } else {
            match self.first_above {
                None => {
                    self.first_above = Some(now + INTERVAL);
                    false
                }
                Some(at) => now >= at,
            }
        };
        if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
                return false;
            }
            if now >= self.drop_next {
                self.count = self.count.saturating_add(1);
                self.drop_next = control_law(self.drop_next, self.count);
                return true;
            }
            return false;
        }
        if !ok_to_drop {
            return false;
        }
        self.dropping = true;
        // Coming back into dropping soon after leaving it: start from the rate it had reached.
        let delta = self.count.saturating_sub(self.last_count);
        self.count = if delta > 1 && now.saturating_sub(self.drop_next) < 16 * INTERVAL { delta } else { 1 };
        self.drop_next = control_law(now, self.count);
        self.last_count = self.count;
        true
    }
}

/// The next drop time: `interval / sqrt(count)` after `at`.
fn control_law(at: u64, count: u32) -> u64 {
    at + (INTERVAL as f64 / f64::from(count.max(1)).sqrt()) as u64
}

/// The time a datagram stamped at `stamp` (ns of the realtime clock) has waited at `now` (the
/// same clock); 0 if the clock went back.
pub(crate) fn sojourn(stamp: u64, now: u64) -> u64 {
    now.saturating_sub(stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Feeds `codel` a datagram every `every` ns from `start` to `end`, each having waited
    /// `sojourn(t)`; returns the times of the drops.
    fn run(codel: &mut Codel, start: u64, end: u64, every: u64, sojourn: impl Fn(u64) -> u64) -> Vec<u64> {
        let mut drops = Vec::new();
        let mut t = start;
        while t < end {
            if codel.drop(sojourn(t), t, true) {
                drops.push(t);
            }
            t += every;
        }
        drops
    }

    #[test]
    fn a_short_queue_is_never_dropped_from() {
        let mut c = Codel::default();
        assert!(run(&mut c, 0, 1000 * MS, 10_000, |_| TARGET - 1).is_empty());
    }

    #[test]
    fn a_burst_shorter_than_an_interval_is_let_through() {
        let mut c = Codel::default();
        let burst = |t: u64| if (100 * MS..100 * MS + INTERVAL - MS).contains(&t) { 20 * MS } else { 0 };
        assert!(run(&mut c, 0, 1000 * MS, 10_000, burst).is_empty());
    }

    #[test]
    fn a_standing_queue_is_dropped_from_ever_faster_until_it_drains() {
        let mut c = Codel::default();
        let drops = run(&mut c, 0, 100 * MS, 10_000, |_| 3 * MS);
        // Nothing for the first interval, then a drop, then drops at interval / sqrt(n).
        assert!(drops[0] >= INTERVAL && drops[0] < INTERVAL + MS, "{drops:?}");
        let gaps: Vec<u64> = drops.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] <= g[0] + 10_000), "gaps shrink: {gaps:?}");
        assert!(gaps[0] >= INTERVAL - 10_000 && *gaps.last().unwrap() < INTERVAL / 4, "{gaps:?}");
        // The queue drains: dropping stops at once.
        let after = run(&mut c, 100 * MS, 200 * MS, 10_000, |_| TARGET / 2);
        assert!(after.is_empty());
        assert!(!c.dropping);
    }

    #[test]
    fn coming_back_soon_resumes_at_the_rate_reached() {
        let mut c = Codel::default();
        run(&mut c, 0, 60 * MS, 10_000, |_| 3 * MS);
        let reached = c.count;
        assert!(reached > 4);
        run(&mut c, 60 * MS, 61 * MS, 10_000, |_| 0);
        let drops = run(&mut c, 61 * MS, 80 * MS, 10_000, |_| 3 * MS);
        // The first drop comes an interval after the queue came back, then faster than a
        // fresh start's interval.
        assert!(drops.len() >= 2, "{drops:?}");
        assert!(drops[1] - drops[0] < INTERVAL / 2, "{drops:?}");
        assert_eq!(sojourn(5, 3), 0, "a clock that went back means no wait");
    }

    #[test]
    fn a_long_wait_with_nothing_behind_is_no_queue() {
        let mut c = Codel::default();
        let mut t = 0;
        while t < 100 * MS {
            assert!(!c.drop(10 * MS, t, false));
            t += 10_000;
        }
    }
}
