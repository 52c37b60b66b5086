//! TAI64N timestamps, as carried (encrypted) in handshake initiations.

/// A 12-byte TAI64N timestamp: big-endian `2^62 + 10 + unix seconds`, then big-endian
/// nanoseconds. Big-endian makes byte order the same as time order, so timestamps compare as
/// byte strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tai64N([u8; 12]);

/// TAI64 label offset plus the 10 s TAI offset the reference implementations use.
const TAI64_BASE: u64 = (1 << 62) + 10;

/// Nanoseconds are rounded down to a multiple of this, so that the timestamp does not leak a
/// precise clock reading: 2^24 ns (about 16.8 ms), the largest power of two within 1/50 s, as
/// the kernel module (`ALIGN_DOWN` to `rounddown_pow_of_two(NSEC_PER_SEC / 50)`) and
/// wireguard-go (its 24-bit whitener mask) do.
pub const TIMESTAMP_GRANULARITY_NS: u32 = 1 << 24;

impl Tai64N {
    /// The timestamp for a time `unix_secs` seconds and `nanos` nanoseconds after the Unix
    /// epoch, rounded down to [`TIMESTAMP_GRANULARITY_NS`].
    pub fn from_unix(unix_secs: u64, nanos: u32) -> Self {
        let nanos = nanos.min(999_999_999);
        let nanos = nanos & !(TIMESTAMP_GRANULARITY_NS - 1);
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&TAI64_BASE.wrapping_add(unix_secs).to_be_bytes());
        b[8..].copy_from_slice(&nanos.to_be_bytes());
        Tai64N(b)
    }

    /// From the 12 wire bytes.
    pub fn from_bytes(bytes: [u8; 12]) -> Self {
        Tai64N(bytes)
    }

    /// The 12 wire bytes.
    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_order() {
        let t = Tai64N::from_unix(1, 123_456_789);
        assert_eq!(&t.as_bytes()[..8], &((1u64 << 62) + 11).to_be_bytes());
        assert_eq!(&t.as_bytes()[8..], &117_440_512u32.to_be_bytes());
        assert!(Tai64N::from_unix(1, 999_999_999) < Tai64N::from_unix(2, 0));
        assert!(Tai64N::from_unix(5, 40_000_000) > Tai64N::from_unix(5, 20_000_000));
        // Within one granule, timestamps are equal (a responder rejects the second).
        assert_eq!(Tai64N::from_unix(5, 1), Tai64N::from_unix(5, 2));
    }
}
