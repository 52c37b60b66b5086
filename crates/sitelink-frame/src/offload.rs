//! Segmentation offloads in safe code: the Internet checksum, the virtio-net header that a TUN
//! device opened with `IFF_VNET_HDR` puts before every packet, and the splitting of a TCP or
//! UDP super-packet (what the kernel hands over with TSO or USO on) into segments of at most
//! the MTU, each with its own headers and full checksums.
//!
//! Nothing here trusts the header: `hdr_len`, `csum_start` and `csum_offset` are checked
//! against the packet's own IP and transport headers, and every length is bounded before it
//! is used, so that bad input is a typed [`OffloadError`], never a panic.

use crate::buf::{BufPool, PacketBuf};
use crate::ip::{IPV4_MIN_HEADER_LEN, IPV6_HEADER_LEN};

/// Bytes of the virtio-net header (`struct virtio_net_hdr`, without the `num_buffers` field).
pub const VIRTIO_NET_HDR_LEN: usize = 10;

/// Most segments one super-packet may be split into (64 KiB at the smallest useful size).
pub const MAX_SEGMENTS: usize = 128;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Why a packet could not be segmented or its checksum finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// Shorter than its headers say.
    #[error("packet truncated")]
    Truncated,
    /// Neither IPv4 nor IPv6, or IPv6 with extension headers before TCP/UDP.
    #[error("unsupported network header")]
    UnsupportedNetwork,
    /// The transport protocol is not the one the GSO type names, or not TCP/UDP.
    #[error("the transport protocol does not match the GSO type")]
    ProtocolMismatch,
    /// A GSO type this code does not split (ECN-marked, or unknown).
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedGso(u8),
    /// `gso_size` is zero, or the packet would split into more than [`MAX_SEGMENTS`].
    #[error("bad segment size")]
    BadSegmentSize,
    /// A segment (headers and payload) would not fit a pooled buffer.
    #[error("segment larger than a buffer")]
    SegmentTooLarge,
    /// `csum_start`/`csum_offset` point outside the packet.
    #[error("checksum offsets outside the packet")]
    BadChecksumOffsets,
}

/// The Internet checksum (RFC 1071), in pieces: a running sum, folded at the end.
pub mod csum {
    /// Adds `bytes` (big-endian 16-bit words; an odd last byte is padded with zero) to the
    /// running sum `acc`.
    ///
    /// The bytes are summed as little-endian words, 32 bytes a step into sixteen 32-bit
    /// lanes, which the compiler turns into vector adds; the folded sum is then byte-swapped
    /// into network order. That is exact: ones' complement addition does not care about byte
    /// order so long as the result is swapped back (RFC 1071, section 2(B)). A lane takes one
    /// word per step, so a block of [`LANE_BLOCK`] bytes cannot overflow it.
    #[inline]
    pub fn add(acc: u64, bytes: &[u8]) -> u64 {
        let mut native = 0u64;
        for block in bytes.chunks(LANE_BLOCK) {
            let mut lanes = [0u32; 16];
            let mut steps = block.chunks_exact(32);
            for step in &mut steps {
                for (i, lane) in lanes.iter_mut().enumerate() {
                    *lane += u32::from(u16::from_le_bytes([step[2 * i], step[2 * i + 1]]));
                }
            }
            native += lanes.iter().map(|&lane| u64::from(lane)).sum::<u64>();
            let mut words = steps.remainder().chunks_exact(2);
            for w in &mut words {
                native += u64::from(u16::from_le_bytes([w[0], w[1]]));
            }
            if let [last] = words.remainder() {
                native += u64::from(*last);
            }
        }
        acc + u64::from(fold(native).swap_bytes())
    }

    /// The most bytes summed into one set of 32-bit lanes: each lane takes at most
    /// `LANE_BLOCK / 32` words of at most `0xffff`, far below `u32::MAX`.
    pub const LANE_BLOCK: usize = 1 << 16;

    /// Folds a running sum to 16 bits (ones' complement addition of its 16-bit pieces).
    #[inline]
    pub fn fold(mut acc: u64) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// The checksum to store: the complement of the folded sum.
    #[inline]
    pub fn finish(acc: u64) -> u16 {
        !fold(acc)
    }

    /// The pseudo-header's sum for TCP/UDP: source and destination addresses (4 or 16 bytes
    /// each), protocol, and the transport length.
    pub fn pseudo_header(src: &[u8], dst: &[u8], protocol: u8, len: usize) -> u64 {
        add(add(0, src), dst) + u64::from(protocol) + len as u64
    }
}

/// What the virtio-net header says of a packet. Its fields are little-endian, as a TUN
/// device gives them on a little-endian host (and when `TUNSETVNETLE` is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// [`VirtioNetHdr::NEEDS_CSUM`], [`VirtioNetHdr::DATA_VALID`].
    pub flags: u8,
    /// [`VirtioNetHdr::GSO_NONE`], `GSO_TCPV4`, `GSO_TCPV6`, `GSO_UDP_L4`.
    pub gso_type: u8,
    /// Length of the headers (advisory; never trusted here).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Where in it the checksum field is.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// The transport checksum is partial (the pseudo-header's sum only): finish it.
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksum was checked already.
    pub const DATA_VALID: u8 = 2;
    /// One packet, not a super-packet.
    pub const GSO_NONE: u8 = 0;
    /// TCP over IPv4.
    pub const GSO_TCPV4: u8 = 1;
    /// TCP over IPv6.
    pub const GSO_TCPV6: u8 = 4;
    /// UDP (USO), either IP version.
    pub const GSO_UDP_L4: u8 = 5;
    /// Flag on `gso_type`: the segments carry ECN CWR handling.
    pub const GSO_ECN: u8 = 0x80;

    /// Reads the header from the first [`VIRTIO_NET_HDR_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Result<VirtioNetHdr, OffloadError> {
        let b = bytes.get(..VIRTIO_NET_HDR_LEN).ok_or(OffloadError::Truncated)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Writes the header into the first [`VIRTIO_NET_HDR_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) -> Result<(), OffloadError> {
        let b = out.get_mut(..VIRTIO_NET_HDR_LEN).ok_or(OffloadError::Truncated)?;
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        Ok(())
    }
}

/// The headers of a TCP or UDP packet, found from the packet itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Headers {
    v6: bool,
    ip_len: usize,
    protocol: u8,
    l4_len: usize,
    /// The packet's length by its IP header (the rest of the buffer is ignored).
    total: usize,
}

impl Headers {
    fn parse(p: &[u8]) -> Result<Headers, OffloadError> {
        let first = *p.first().ok_or(OffloadError::Truncated)?;
        let (v6, ip_len, protocol, total) = match first >> 4 {
            4 => {
                if p.len() < IPV4_MIN_HEADER_LEN {
                    return Err(OffloadError::Truncated);
                }
                let ihl = usize::from(first & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
                if ihl < IPV4_MIN_HEADER_LEN || total < ihl {
                    return Err(OffloadError::Truncated);
                }
                (false, ihl, p[9], total)
            }
            6 => {
                if p.len() < IPV6_HEADER_LEN {
                    return Err(OffloadError::Truncated);
                }
                let total = IPV6_HEADER_LEN + usize::from(u16::from_be_bytes([p[4], p[5]]));
                (true, IPV6_HEADER_LEN, p[6], total)
            }
            _ => return Err(OffloadError::UnsupportedNetwork),
        };
        if total > p.len() {
            return Err(OffloadError::Truncated);
        }
        let l4_len = match protocol {
            TCP => {
                let off = *p.get(ip_len + 12).ok_or(OffloadError::Truncated)?;
                let len = usize::from(off >> 4) * 4;
                if len < 20 {
                    return Err(OffloadError::Truncated);
                }
                len
            }
            UDP => 8,
            _ if v6 => return Err(OffloadError::UnsupportedNetwork),
            _ => return Err(OffloadError::ProtocolMismatch),
        };
        if ip_len + l4_len > total {
            return Err(OffloadError::Truncated);
        }
        Ok(Headers { v6, ip_len, protocol, l4_len, total })
    }

    fn addresses<'a>(&self, p: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        if self.v6 { (&p[8..24], &p[24..40]) } else { (&p[12..16], &p[16..20]) }
    }

    /// The transport checksum field's offset from the transport header.
    fn csum_field(&self) -> usize {
        if self.protocol == TCP { 16 } else { 6 }
    }
}

/// Writes the full transport checksum of a TCP or UDP packet `p` (its IP length) in place.
fn fill_l4_checksum(p: &mut [u8], h: &Headers) {
    let field = h.ip_len + h.csum_field();
    p[field..field + 2].fill(0);
    let l4 = h.total - h.ip_len;
    let (src, dst) = h.addresses(p);
    let acc = csum::add(csum::pseudo_header(src, dst, h.protocol, l4), &p[h.ip_len..h.total]);
    let mut sum = csum::finish(acc);
    if sum == 0 && h.protocol == UDP {
        sum = 0xffff; // zero would mean "no checksum"
    }
    p[field..field + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Rewrites an IPv4 header's checksum.
fn fill_ipv4_checksum(p: &mut [u8], ihl: usize) {
    p[10..12].fill(0);
    let sum = csum::finish(csum::add(0, &p[..ihl]));
    p[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Finishes a packet's transport checksum where the header says it is partial
/// (`NEEDS_CSUM`), after checking that the offsets name the packet's own checksum field.
pub fn finish_checksum(packet: &mut [u8], hdr: &VirtioNetHdr) -> Result<(), OffloadError> {
    if hdr.flags & VirtioNetHdr::NEEDS_CSUM == 0 {
        return Ok(());
    }
    let h = Headers::parse(packet)?;
    if usize::from(hdr.csum_start) != h.ip_len || usize::from(hdr.csum_offset) != h.csum_field() {
        return Err(OffloadError::BadChecksumOffsets);
    }
    fill_l4_checksum(&mut packet[..h.total], &h);
    Ok(())
}

/// Splits the super-packet `packet` (the bytes after the virtio-net header) into segments of
/// at most `hdr.gso_size` payload bytes, each in a buffer from `pool` pushed onto `out`, with
/// its own IP header (length, IPv4 identification and checksum), TCP sequence number and
/// flags (FIN and PSH on the last segment only, CWR on the first only) or UDP length, and a
/// full transport checksum. A packet without GSO is copied as is, its checksum finished if
/// partial. Returns the number of segments. On error `out` is left as it was.
pub fn segment(
    packet: &[u8],
    hdr: &VirtioNetHdr,
    pool: &mut BufPool,
    out: &mut Vec<PacketBuf>,
) -> Result<usize, OffloadError> {
    if packet.is_empty() {
        return Err(OffloadError::Truncated);
    }
    if hdr.gso_type == VirtioNetHdr::GSO_NONE && hdr.flags & VirtioNetHdr::NEEDS_CSUM == 0 {
        // One whole packet of any protocol (ICMP, a fragment, ...): copied as it is.
        let mut buf = pool.get();
        if buf.copy_from(packet).is_err() {
            pool.put(buf);
            return Err(OffloadError::SegmentTooLarge);
        }
        out.push(buf);
        return Ok(1);
    }
    let h = Headers::parse(packet)?;
    let gso = hdr.gso_type & !VirtioNetHdr::GSO_ECN;
    if hdr.gso_type & VirtioNetHdr::GSO_ECN != 0 {
        return Err(OffloadError::UnsupportedGso(hdr.gso_type));
    }
    let expected = match gso {
        VirtioNetHdr::GSO_NONE => None,
        VirtioNetHdr::GSO_TCPV4 if !h.v6 => Some(TCP),
        VirtioNetHdr::GSO_TCPV6 if h.v6 => Some(TCP),
        VirtioNetHdr::GSO_UDP_L4 => Some(UDP),
        VirtioNetHdr::GSO_TCPV4 | VirtioNetHdr::GSO_TCPV6 => return Err(OffloadError::ProtocolMismatch),
        other => return Err(OffloadError::UnsupportedGso(other)),
    };
    let headers = h.ip_len + h.l4_len;
    let payload = h.total - headers;
    let Some(protocol) = expected.filter(|_| payload > usize::from(hdr.gso_size)) else {
        // One packet: copied, its checksum finished if the kernel left it partial.
        let mut buf = pool.get();
        if buf.copy_from(&packet[..h.total]).is_err() {
            pool.put(buf);
            return Err(OffloadError::SegmentTooLarge);
        }
        if let Err(e) = finish_checksum(buf.data_mut(), hdr) {
            pool.put(buf);
            return Err(e);
        }
        out.push(buf);
        return Ok(1);
    };
    if protocol != h.protocol {
        return Err(OffloadError::ProtocolMismatch);
    }
    let size = usize::from(hdr.gso_size);
    if size == 0 || payload.div_ceil(size) > MAX_SEGMENTS {
        return Err(OffloadError::BadSegmentSize);
    }
    let count = payload.div_ceil(size);
    let start = out.len();
    let ip_id = u16::from_be_bytes([packet[4], packet[5]]);
    let seq = u32::from_be_bytes(packet[h.ip_len + 4..h.ip_len + 8].try_into().expect("4 bytes"));
    for i in 0..count {
        let chunk = &packet[headers + i * size..headers + ((i + 1) * size).min(payload)];
        let len = headers + chunk.len();
        let mut buf = pool.get();
        if buf.set_len(len).is_err() {
            pool.put(buf);
            for b in out.drain(start..) {
                pool.put(b);
            }
            return Err(OffloadError::SegmentTooLarge);
        }
        let p = buf.data_mut();
        p[..headers].copy_from_slice(&packet[..headers]);
        p[headers..].copy_from_slice(chunk);
        if h.v6 {
            p[4..6].copy_from_slice(&((len - IPV6_HEADER_LEN) as u16).to_be_bytes());
        } else {
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[4..6].copy_from_slice(&ip_id.wrapping_add(i as u16).to_be_bytes());
            fill_ipv4_checksum(p, h.ip_len);
        }
        let l4 = h.ip_len;
        if protocol == TCP {
            let s = seq.wrapping_add((i * size) as u32);
            p[l4 + 4..l4 + 8].copy_from_slice(&s.to_be_bytes());
            const FIN: u8 = 0x01;
            const PSH: u8 = 0x08;
            const CWR: u8 = 0x80;
            if i + 1 < count {
                p[l4 + 13] &= !(FIN | PSH);
            }
            if i > 0 {
                p[l4 + 13] &= !CWR;
            }
        } else {
            p[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
        }
        let seg = Headers { total: len, ..h };
        fill_l4_checksum(p, &seg);
        out.push(buf);
    }
    Ok(count)
}

/// TCP flags that end or forbid a merge: FIN, SYN, RST, URG, ECE, CWR (ACK and PSH may merge;
/// PSH only as the last of a run).
const TCP_FLAGS_UNMERGEABLE: u8 = 0x01 | 0x02 | 0x04 | 0x20 | 0x40 | 0x80;
const TCP_PSH: u8 = 0x08;

/// How many of `segments`, from the first, merge into one TCP super-packet of at most
/// `max_len` bytes for a write with GSO: the same flow and IP header fields (TOS/traffic class,
/// TTL/hop limit, no IPv4 options), contiguous sequence numbers, the same acknowledgment,
/// window and options, only ACK (and PSH on the last) set, payloads of one size but a shorter
/// last one, and every segment's checksums verified. 1 when the first merges with nothing
/// (write it as it is), 0 when `segments` is empty.
pub fn tcp_run_len(segments: &[PacketBuf], max_len: usize) -> usize {
    let Some(first) = segments.first() else { return 0 };
    let Some(h0) = mergeable_tcp(first.data()) else { return 1 };
    let p0 = first.data();
    let headers = h0.ip_len + h0.l4_len;
    let size = h0.total - headers;
    if size == 0 || p0[h0.ip_len + 13] & TCP_PSH != 0 {
        return 1;
    }
    let mut next_seq = tcp_seq(p0, &h0).wrapping_add(size as u32);
    let mut len = h0.total;
    let mut n = 1;
    for seg in &segments[1..] {
        let p = seg.data();
        let Some(h) = mergeable_tcp(p) else { break };
        let payload = h.total - headers;
        if h.ip_len != h0.ip_len
            || h.l4_len != h0.l4_len
            || payload == 0
            || payload > size
            || len + payload > max_len
            || n == MAX_SEGMENTS
            || tcp_seq(p, &h) != next_seq
            || !same_flow_and_fields(p0, p, &h0)
        {
            break;
        }
        len += payload;
        n += 1;
        next_seq = next_seq.wrapping_add(payload as u32);
        // A short segment or PSH ends the run.
        if payload < size || p[h.ip_len + 13] & TCP_PSH != 0 {
            break;
        }
    }
    n
}

/// Writes the super-packet of the run `segments` (found by [`tcp_run_len`]) into `out`:
/// the first segment's headers with the whole length (and a fresh IPv4 header checksum), the
/// last segment's flags, every payload in order, and the TCP checksum left partial (the
/// pseudo-header's sum) for the kernel to finish per segment. Returns the length written and
/// the virtio-net header to write before it.
pub fn coalesce_tcp(segments: &[PacketBuf], out: &mut [u8]) -> Result<(usize, VirtioNetHdr), OffloadError> {
    let first = segments.first().ok_or(OffloadError::Truncated)?.data();
    let h0 = Headers::parse(first)?;
    if h0.protocol != TCP {
        return Err(OffloadError::ProtocolMismatch);
    }
    let headers = h0.ip_len + h0.l4_len;
    let total: usize = headers + segments.iter().map(|s| s.len().saturating_sub(headers)).sum::<usize>();
    if total > out.len() || total - h0.ip_len > usize::from(u16::MAX) {
        return Err(OffloadError::SegmentTooLarge);
    }
    out[..headers].copy_from_slice(&first[..headers]);
    let mut at = headers;
    for s in segments {
        let payload = s.data().get(headers..).ok_or(OffloadError::Truncated)?;
        out[at..at + payload.len()].copy_from_slice(payload);
        at += payload.len();
    }
    let last_flags = segments[segments.len() - 1].data()[h0.ip_len + 13];
    let hdr =
        super_headers(&mut out[..headers], &h0, total, last_flags, first.len() - headers, segments.len());
    Ok((total, hdr))
}

/// Turns the run `segments` (found by [`tcp_run_len`]) into one super-packet without copying
/// a payload: the first segment's headers are rewritten in place as [`coalesce_tcp`] writes
/// them, so that the first segment's data followed by every other segment's data from the
/// returned offset (their headers skipped) is the super-packet, for one gathered write.
/// Returns the virtio-net header to write before it and that offset.
pub fn coalesce_tcp_in_place(segments: &mut [PacketBuf]) -> Result<(VirtioNetHdr, usize), OffloadError> {
    if segments.is_empty() {
        return Err(OffloadError::Truncated);
    }
    let first = segments[0].data();
    let h0 = Headers::parse(first)?;
    if h0.protocol != TCP || h0.total != first.len() {
        return Err(OffloadError::ProtocolMismatch);
    }
    let headers = h0.ip_len + h0.l4_len;
    let mut total = first.len();
    for s in &segments[1..] {
        total += s.len().checked_sub(headers).ok_or(OffloadError::Truncated)?;
    }
    if total - h0.ip_len > usize::from(u16::MAX) || (!h0.v6 && total > usize::from(u16::MAX)) {
        return Err(OffloadError::SegmentTooLarge);
    }
    let last_flags =
        *segments[segments.len() - 1].data().get(h0.ip_len + 13).ok_or(OffloadError::Truncated)?;
    let gso_size = first.len() - headers;
    let count = segments.len();
    let hdr = super_headers(&mut segments[0].data_mut()[..headers], &h0, total, last_flags, gso_size, count);
    Ok((hdr, headers))
}

/// Rewrites `out` (the first segment's IP and TCP headers) as the headers of a super-packet
/// of `total` bytes made of `count` segments: the whole length (and a fresh IPv4 header
/// checksum), the last segment's flags, and the TCP checksum left partial (the
/// pseudo-header's sum) for the kernel to finish per segment. Returns the virtio-net header.
fn super_headers(
    out: &mut [u8],
    h0: &Headers,
    total: usize,
    last_flags: u8,
    gso_size: usize,
    count: usize,
) -> VirtioNetHdr {
    out[h0.ip_len + 13] = last_flags;
    if h0.v6 {
        out[4..6].copy_from_slice(&((total - IPV6_HEADER_LEN) as u16).to_be_bytes());
    } else {
        out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        fill_ipv4_checksum(out, h0.ip_len);
    }
    let (src, dst) = h0.addresses(out);
    let partial = csum::fold(csum::pseudo_header(src, dst, TCP, total - h0.ip_len));
    out[h0.ip_len + 16..h0.ip_len + 18].copy_from_slice(&partial.to_be_bytes());
    VirtioNetHdr {
        flags: VirtioNetHdr::NEEDS_CSUM,
        gso_type: if count > 1 {
            if h0.v6 { VirtioNetHdr::GSO_TCPV6 } else { VirtioNetHdr::GSO_TCPV4 }
        } else {
            VirtioNetHdr::GSO_NONE
        },
        hdr_len: (h0.ip_len + h0.l4_len) as u16,
        gso_size: gso_size as u16,
        csum_start: h0.ip_len as u16,
        csum_offset: 16,
    }
}

/// The headers of `p` if it is a TCP segment that may join a run: no IPv4 options, only ACK
/// or PSH among the flags, and checksums that verify.
fn mergeable_tcp(p: &[u8]) -> Option<Headers> {
    let h = Headers::parse(p).ok()?;
    if h.protocol != TCP || (!h.v6 && h.ip_len != IPV4_MIN_HEADER_LEN) || h.total != p.len() {
        return None;
    }
    if p[h.ip_len + 13] & TCP_FLAGS_UNMERGEABLE != 0 {
        return None;
    }
    if !h.v6 && csum::finish(csum::add(0, &p[..h.ip_len])) != 0 {
        return None;
    }
    let (src, dst) = h.addresses(p);
    let l4 = h.total - h.ip_len;
    let acc = csum::add(csum::pseudo_header(src, dst, TCP, l4), &p[h.ip_len..h.total]);
    (csum::finish(acc) == 0).then_some(h)
}

/// The most datagrams one UDP super-packet written with USO may hold (the kernel's
/// `UDP_MAX_SEGMENTS` on older kernels).
pub const MAX_UDP_SEGMENTS: usize = 64;

/// How many of `segments`, from the first, merge into one UDP super-packet of at most
/// `max_len` bytes for a write with USO: one flow (addresses and ports) with the same IP
/// fields (TOS/traffic class, TTL/hop limit, no IPv4 options), payloads of one size but a
/// shorter last one, each with a checksum that verifies (a zero IPv4 checksum, "none", ends a
/// run: the kernel would give the segments one). 1 when the first merges with nothing.
pub fn udp_run_len(segments: &[PacketBuf], max_len: usize) -> usize {
    let Some(first) = segments.first() else { return 0 };
    let Some(h0) = mergeable_udp(first.data()) else { return 1 };
    let p0 = first.data();
    let size = h0.total - h0.ip_len - 8;
    if size == 0 {
        return 1;
    }
    let mut len = h0.total;
    let mut n = 1;
    for seg in &segments[1..] {
        let p = seg.data();
        let Some(h) = mergeable_udp(p) else { break };
        let payload = h.total - h.ip_len - 8;
        if h.ip_len != h0.ip_len
            || payload == 0
            || payload > size
            || len + payload > max_len
            || n == MAX_UDP_SEGMENTS
            || !same_udp_flow(p0, p, &h0)
        {
            break;
        }
        len += payload;
        n += 1;
        if payload < size {
            break; // a short datagram can only come last
        }
    }
    n
}

/// As [`coalesce_tcp_in_place`], for a UDP run found by [`udp_run_len`]: the first datagram's
/// headers become the super-packet's (IP length and IPv4 checksum, UDP length, the UDP
/// checksum left partial), the others are written from the returned offset (their headers
/// skipped), and the virtio-net header says `GSO_UDP_L4` with the datagrams' size.
pub fn coalesce_udp_in_place(segments: &mut [PacketBuf]) -> Result<(VirtioNetHdr, usize), OffloadError> {
    let first = segments.first().ok_or(OffloadError::Truncated)?.data();
    let h0 = Headers::parse(first)?;
    if h0.protocol != UDP || h0.total != first.len() {
        return Err(OffloadError::ProtocolMismatch);
    }
    let headers = h0.ip_len + 8;
    let mut total = first.len();
    for s in &segments[1..] {
        total += s.len().checked_sub(headers).ok_or(OffloadError::Truncated)?;
    }
    if total - h0.ip_len > usize::from(u16::MAX) || (!h0.v6 && total > usize::from(u16::MAX)) {
        return Err(OffloadError::SegmentTooLarge);
    }
    let gso_size = first.len() - headers;
    let count = segments.len();
    let out = &mut segments[0].data_mut()[..headers];
    if h0.v6 {
        out[4..6].copy_from_slice(&((total - IPV6_HEADER_LEN) as u16).to_be_bytes());
    } else {
        out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        fill_ipv4_checksum(out, h0.ip_len);
    }
    let l4 = total - h0.ip_len;
    out[h0.ip_len + 4..h0.ip_len + 6].copy_from_slice(&(l4 as u16).to_be_bytes());
    let (src, dst) = h0.addresses(out);
    let partial = csum::fold(csum::pseudo_header(src, dst, UDP, l4));
    out[h0.ip_len + 6..h0.ip_len + 8].copy_from_slice(&partial.to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: VirtioNetHdr::NEEDS_CSUM,
        gso_type: if count > 1 { VirtioNetHdr::GSO_UDP_L4 } else { VirtioNetHdr::GSO_NONE },
        hdr_len: headers as u16,
        gso_size: gso_size as u16,
        csum_start: h0.ip_len as u16,
        csum_offset: 6,
    };
    Ok((hdr, headers))
}

/// The headers of `p` if it is a UDP datagram that may join a run: no IPv4 options, not a
/// fragment, a UDP length that is the packet's, and checksums that verify (not zero).
fn mergeable_udp(p: &[u8]) -> Option<Headers> {
    let h = Headers::parse(p).ok()?;
    if h.protocol != UDP || (!h.v6 && h.ip_len != IPV4_MIN_HEADER_LEN) || h.total != p.len() {
        return None;
    }
    if !h.v6 && (p[6] & 0x3f != 0 || p[7] != 0 || csum::finish(csum::add(0, &p[..h.ip_len])) != 0) {
        return None; // a fragment (MF or an offset), or a bad header checksum
    }
    let l4 = h.total - h.ip_len;
    if usize::from(u16::from_be_bytes([p[h.ip_len + 4], p[h.ip_len + 5]])) != l4
        || p[h.ip_len + 6..h.ip_len + 8] == [0, 0]
    {
        return None;
    }
    let (src, dst) = h.addresses(p);
    let acc = csum::add(csum::pseudo_header(src, dst, UDP, l4), &p[h.ip_len..h.total]);
    (csum::finish(acc) == 0).then_some(h)
}

/// Whether `p` belongs to `p0`'s UDP flow with the same IP fields.
fn same_udp_flow(p0: &[u8], p: &[u8], h: &Headers) -> bool {
    let l4 = h.ip_len;
    same_ip_fields(p0, p, h.v6) && p0[l4..l4 + 4] == p[l4..l4 + 4]
}

/// Whether `p`'s IP header has `p0`'s fields a merge must keep: IPv6's version, traffic
/// class, flow label, next header, hop limit and addresses; IPv4's version/IHL, TOS,
/// flags/fragment, TTL, protocol and addresses (not its length, ID or checksum).
fn same_ip_fields(p0: &[u8], p: &[u8], v6: bool) -> bool {
    if v6 {
        p0[..4] == p[..4] && p0[6..40] == p[6..40]
    } else {
        p0[..2] == p[..2] && p0[6..10] == p[6..10] && p0[12..20] == p[12..20]
    }
}

fn tcp_seq(p: &[u8], h: &Headers) -> u32 {
    u32::from_be_bytes(p[h.ip_len + 4..h.ip_len + 8].try_into().expect("4 bytes"))
}

/// Whether `p` belongs to `p0`'s flow with the same IP fields, acknowledgment, window and
/// options (headers of equal lengths already checked).
fn same_flow_and_fields(p0: &[u8], p: &[u8], h: &Headers) -> bool {
    let l4 = h.ip_len;
    same_ip_fields(p0, p, h.v6)
        && p0[l4..l4 + 4] == p[l4..l4 + 4] // ports
        && p0[l4 + 8..l4 + 12] == p[l4 + 8..l4 + 12] // acknowledgment
        && p0[l4 + 12] == p[l4 + 12] // data offset
        && p0[l4 + 14..l4 + 16] == p[l4 + 14..l4 + 16] // window
        && p0[l4 + 18..l4 + h.l4_len] == p[l4 + 18..l4 + h.l4_len] // urgent pointer, options
}

#[cfg(test)]
mod tests;
