//! Per-source token buckets for handshake messages under load, in bounded memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Tokens of one source; one token is one handshake message.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets keyed by source address (IPv6 sources by their /64, so one host cannot
/// escape the limit by hopping addresses in its subnet).
///
/// The table holds at most `capacity` sources: when it is full, entries idle long enough to
/// have refilled are swept; if none are, a new source is refused until some are. Memory is
/// bounded whatever the flood.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: HashMap<IpAddr, Bucket>,
    capacity: usize,
    rate: f64,
    burst: f64,
}

impl RateLimiter {
    /// A limiter admitting `per_second` messages per source, bursts of up to `burst`, for at
    /// most `capacity` sources at once.
    pub fn new(per_second: u32, burst: u32, capacity: usize) -> Self {
        RateLimiter {
            buckets: HashMap::with_capacity(capacity.min(4096)),
            capacity,
            rate: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !((1u128 << 64) - 1)).into()),
        }
    }

    /// Whether a message from `ip` may be processed at `now`; takes a token if so.
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        let key = Self::key(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.capacity {
            self.sweep(now);
            if self.buckets.len() >= self.capacity {
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(key).or_insert(Bucket { tokens: burst, last: now });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets sources whose buckets would be full again at `now`.
    pub fn sweep(&mut self, now: Instant) {
        let refill = Duration::from_secs_f64(self.burst / self.rate);
        self.buckets.retain(|_, b| now.saturating_duration_since(b.last) < refill);
    }

    /// Number of sources tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_source_and_refills() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, 3, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| rl.allow(t0, a)));
        assert!(!rl.allow(t0, a));
        assert!(rl.allow(t0, b));
        assert!(rl.allow(t0 + Duration::from_millis(100), a));
        assert!(!rl.allow(t0 + Duration::from_millis(100), a));
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1, 1, 100);
        assert!(rl.allow(t0, "2001:db8::1".parse().unwrap()));
        assert!(!rl.allow(t0, "2001:db8::2".parse().unwrap()));
        assert!(rl.allow(t0, "2001:db8:0:1::1".parse().unwrap()));
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, 2, 50);
        for i in 0..1000u32 {
            rl.allow(t0, IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(rl.len(), 50);
        // Once the old entries have refilled they are swept to make room.
        assert!(rl.allow(t0 + Duration::from_secs(1), "198.51.100.1".parse().unwrap()));
        assert_eq!(rl.len(), 1);
    }
}
