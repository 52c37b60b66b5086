//! A validated peek at the inner IPv4/IPv6 header of a tunnelled packet.
//!
//! Cryptokey routing needs the destination (outbound) or the source (inbound), and the receiver
//! needs the packet's true length to strip WireGuard's padding. Nothing else of the header is
//! read, and checksums are not checked: the packet is the application's, not ours.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of an IPv4 header without options.
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;

/// Why a packet is not a well-formed IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IpError {
    /// No bytes at all.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("unknown IP version {0}")]
    BadVersion(u8),
    /// Shorter than the fixed header of its version.
    #[error("packet shorter than its IP header: {0} bytes")]
    Truncated(usize),
    /// The IPv4 header length field is below 5 words or past the total length.
    #[error("bad IPv4 header length")]
    BadHeaderLength,
    /// The length in the header is longer than the bytes present (or, for IPv4, shorter than
    /// the header).
    #[error("IP length field {claimed} does not fit the {present} bytes present")]
    BadTotalLength {
        /// Total length the header claims.
        claimed: usize,
        /// Bytes present.
        present: usize,
    },
}

/// What cryptokey routing and padding removal need from an inner IP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPeek {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Length of the packet according to its header (header included); at most the bytes given.
    pub total_len: usize,
}

/// Reads version, length, source and destination of the IP packet at the start of `bytes`,
/// checking that the header's length fits in `bytes` (trailing bytes, such as WireGuard's
/// padding, are allowed: [`IpPeek::total_len`] tells where the packet ends).
#[inline]
pub fn peek(bytes: &[u8]) -> Result<IpPeek, IpError> {
    let first = *bytes.first().ok_or(IpError::Empty)?;
    match first >> 4 {
        4 => {
            if bytes.len() < IPV4_MIN_HEADER_LEN {
                return Err(IpError::Truncated(bytes.len()));
            }
            let ihl = usize::from(first & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
            if ihl < IPV4_MIN_HEADER_LEN {
                return Err(IpError::BadHeaderLength);
            }
            if total_len > bytes.len() || total_len < ihl {
                return Err(IpError::BadTotalLength { claimed: total_len, present: bytes.len() });
            }
            let src: [u8; 4] = bytes[12..16].try_into().expect("4 bytes");
            let dst: [u8; 4] = bytes[16..20].try_into().expect("4 bytes");
            Ok(IpPeek { src: Ipv4Addr::from(src).into(), dst: Ipv4Addr::from(dst).into(), total_len })
        }
        6 => {
            if bytes.len() < IPV6_HEADER_LEN {
                return Err(IpError::Truncated(bytes.len()));
            }
            let total_len = IPV6_HEADER_LEN + usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
            if total_len > bytes.len() {
                return Err(IpError::BadTotalLength { claimed: total_len, present: bytes.len() });
            }
            let src: [u8; 16] = bytes[8..24].try_into().expect("16 bytes");
            let dst: [u8; 16] = bytes[24..40].try_into().expect("16 bytes");
            Ok(IpPeek { src: Ipv6Addr::from(src).into(), dst: Ipv6Addr::from(dst).into(), total_len })
        }
        v => Err(IpError::BadVersion(v)),
    }
}

/// A hash of the packet's flow: addresses, protocol and, for TCP, UDP, SCTP and UDP-Lite,
/// ports. Packets of one flow hash alike, so a sender that spreads packets over queues by it
/// keeps each flow on one queue, in order (as the kernel does for TUN multi-queue). Anything
/// that does not parse as IP hashes to 0; IPv6 extension headers are not walked (such packets
/// hash by addresses alone). Never panics.
pub fn flow_hash(bytes: &[u8]) -> u32 {
    const PORTS: [u8; 4] = [6, 17, 132, 136];
    let (addrs, proto, l4) = match bytes.first().map(|b| b >> 4) {
        Some(4) if bytes.len() >= IPV4_MIN_HEADER_LEN => {
            let ihl = usize::from(bytes[0] & 0x0f) * 4;
            (&bytes[12..20], bytes[9], bytes.get(ihl.max(IPV4_MIN_HEADER_LEN)..))
        }
        Some(6) if bytes.len() >= IPV6_HEADER_LEN => (&bytes[8..40], bytes[6], bytes.get(IPV6_HEADER_LEN..)),
        _ => return 0,
    };
    // FNV-1a: cheap, and enough to spread flows; nothing depends on it resisting collisions.
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |b: u8| h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    addrs.iter().for_each(|&b| mix(b));
    mix(proto);
    if PORTS.contains(&proto)
        && let Some(ports) = l4.and_then(|l4| l4.get(..4))
    {
        ports.iter().for_each(|&b| mix(b));
    }
    h
}

/// Builds a minimal IPv4 packet (header without options, then `payload`) into `out`, returning
/// its length. For tests, examples and traffic generators; the checksum is computed.
pub fn build_ipv4(
    out: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload: &[u8],
) -> Option<usize> {
    let total = IPV4_MIN_HEADER_LEN + payload.len();
    if total > usize::from(u16::MAX) || out.len() < total {
        return None;
    }
    let h = &mut out[..IPV4_MIN_HEADER_LEN];
    h.fill(0);
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = crate::offload::csum::finish(crate::offload::csum::add(0, h));
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    out[IPV4_MIN_HEADER_LEN..total].copy_from_slice(payload);
    Some(total)
}

/// Builds a minimal IPv6 packet (fixed header, then `payload`) into `out`, returning its length.
pub fn build_ipv6(
    out: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    payload: &[u8],
) -> Option<usize> {
    let total = IPV6_HEADER_LEN + payload.len();
    if payload.len() > usize::from(u16::MAX) || out.len() < total {
        return None;
    }
    let h = &mut out[..IPV6_HEADER_LEN];
    h.fill(0);
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next_header;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    out[IPV6_HEADER_LEN..total].copy_from_slice(payload);
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn flow_hash_follows_the_flow() {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let mut p1 = [0u8; 64];
        let mut p2 = [0u8; 64];
        // UDP: ports 1000 -> 2000, then another payload of the same flow, then another port.
        let n1 = build_ipv4(&mut p1, a, b, 17, &[0x03, 0xe8, 0x07, 0xd0, 1, 2, 3]).unwrap();
        let n2 = build_ipv4(&mut p2, a, b, 17, &[0x03, 0xe8, 0x07, 0xd0, 9, 9]).unwrap();
        assert_eq!(flow_hash(&p1[..n1]), flow_hash(&p2[..n2]));
        let n3 = build_ipv4(&mut p2, a, b, 17, &[0x03, 0xe9, 0x07, 0xd0]).unwrap();
        assert_ne!(flow_hash(&p1[..n1]), flow_hash(&p2[..n3]), "another source port, another flow");
        let n4 = build_ipv4(&mut p2, b, a, 17, &[0x03, 0xe8, 0x07, 0xd0]).unwrap();
        assert_ne!(flow_hash(&p1[..n1]), flow_hash(&p2[..n4]));
        assert_eq!(flow_hash(&[]), 0);
        assert_eq!(flow_hash(&[0x45, 0, 0]), 0);
    }

    proptest! {
        #[test]
        fn flow_hash_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = flow_hash(&bytes);
        }
    }

    #[test]
    fn peeks_ipv4_with_padding() {
        let mut b = [0u8; 64];
        let n = build_ipv4(&mut b, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 17, &[1, 2, 3])
            .unwrap();
        assert_eq!(n, 23);
        let p = peek(&b[..32]).unwrap();
        assert_eq!(p.src, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(p.dst, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(p.total_len, 23);
        assert_eq!(peek(&b[..22]), Err(IpError::BadTotalLength { claimed: 23, present: 22 }));
        // A real checksum: summing the header with its checksum gives 0xffff.
        let sum: u32 = b[..20].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff);
    }

    #[test]
    fn peeks_ipv6() {
        let mut b = [0u8; 64];
        let s: Ipv6Addr = "fd00::1".parse().unwrap();
        let d: Ipv6Addr = "fd00::2".parse().unwrap();
        let n = build_ipv6(&mut b, s, d, 58, &[0; 8]).unwrap();
        let p = peek(&b[..n]).unwrap();
        assert_eq!((p.src, p.dst, p.total_len), (IpAddr::V6(s), IpAddr::V6(d), 48));
        assert_eq!(peek(&b[..39]), Err(IpError::Truncated(39)));
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(peek(&[]), Err(IpError::Empty));
        assert_eq!(peek(&[0x50; 40]), Err(IpError::BadVersion(5)));
        let mut b = [0u8; 20];
        b[0] = 0x44;
        assert_eq!(peek(&b), Err(IpError::BadHeaderLength));
        b[0] = 0x45;
        b[3] = 10; // total length 10 < header
        assert!(matches!(peek(&b), Err(IpError::BadTotalLength { .. })));
    }

    proptest! {
        #[test]
        fn peek_never_panics_and_stays_in_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(p) = peek(&bytes) {
                prop_assert!(p.total_len <= bytes.len());
            }
        }
    }
}
