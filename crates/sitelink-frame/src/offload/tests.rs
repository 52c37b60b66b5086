//! The offload code's tests: proptests against a reference checksum and round trips of
//! split and coalesce, and the cases where runs must stop and bad input is refused.

use super::*;
use proptest::prelude::*;

/// The checksum the plain way (RFC 1071's reference loop), to check the fast one by.
fn reference(bytes: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u64::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if i < bytes.len() {
        sum += u64::from(bytes[i]) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether a packet's IPv4 header (if any) and transport checksums verify, by the
/// reference implementation.
fn verifies(p: &[u8]) -> bool {
    let h = Headers::parse(p).expect("headers");
    let ip_ok = h.v6 || reference(&p[..h.ip_len]) == 0;
    let (src, dst) = h.addresses(p);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    let l4 = h.total - h.ip_len;
    if h.v6 {
        pseudo.extend_from_slice(&(l4 as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, h.protocol]);
    } else {
        pseudo.extend_from_slice(&[0, h.protocol]);
        pseudo.extend_from_slice(&(l4 as u16).to_be_bytes());
    }
    pseudo.extend_from_slice(&p[h.ip_len..h.total]);
    ip_ok && reference(&pseudo) == 0
}

/// A TCP or UDP super-packet: IPv4 or IPv6, `payload` bytes after a 20- or 32-byte TCP
/// header (with options) or the UDP header, checksums left partial as the kernel leaves
/// them (not that segmenting reads them).
fn super_packet(v6: bool, tcp: bool, options: bool, payload: &[u8], flags: u8) -> Vec<u8> {
    let l4_len = if tcp { if options { 32 } else { 20 } } else { 8 };
    let mut l4 = vec![0u8; l4_len];
    l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&5201u16.to_be_bytes());
    if tcp {
        l4[4..8].copy_from_slice(&0xfffff000u32.to_be_bytes()); // wraps while segmenting
        l4[8..12].copy_from_slice(&77u32.to_be_bytes());
        l4[12] = ((l4_len / 4) as u8) << 4;
        l4[13] = flags;
        l4[14..16].copy_from_slice(&512u16.to_be_bytes());
        if options {
            l4[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        }
    } else {
        l4[4..6].copy_from_slice(&(((8 + payload.len()) as u32) as u16).to_be_bytes());
    }
    l4.extend_from_slice(payload);
    let mut out = vec![0u8; 40 + l4.len()];
    let n = if v6 {
        crate::ip::build_ipv6(
            &mut out,
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            if tcp { 6 } else { 17 },
            &l4,
        )
    } else {
        crate::ip::build_ipv4(
            &mut out,
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            if tcp { 6 } else { 17 },
            &l4,
        )
    }
    .unwrap();
    out.truncate(n);
    if !v6 {
        out[4..6].copy_from_slice(&0xfff0u16.to_be_bytes()); // the IP ID wraps too
        fill_ipv4_checksum(&mut out, 20);
    }
    out
}

fn gso(v6: bool, tcp: bool, size: u16) -> VirtioNetHdr {
    let gso_type = match (tcp, v6) {
        (true, false) => VirtioNetHdr::GSO_TCPV4,
        (true, true) => VirtioNetHdr::GSO_TCPV6,
        (false, _) => VirtioNetHdr::GSO_UDP_L4,
    };
    VirtioNetHdr {
        flags: VirtioNetHdr::NEEDS_CSUM,
        gso_type,
        gso_size: size,
        csum_start: if v6 { 40 } else { 20 },
        csum_offset: if tcp { 16 } else { 6 },
        ..Default::default()
    }
}

/// Past one block of lanes, with the largest words (the case that would overflow a lane).
#[test]
fn the_fast_sum_spans_lane_blocks() {
    for len in [csum::LANE_BLOCK - 1, csum::LANE_BLOCK, csum::LANE_BLOCK + 33, 3 * csum::LANE_BLOCK + 1] {
        let ones = vec![0xffu8; len];
        assert_eq!(csum::finish(csum::add(0, &ones)), reference(&ones), "all ones, {len} bytes");
        let mixed: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
        assert_eq!(csum::finish(csum::add(0, &mixed)), reference(&mixed), "mixed, {len} bytes");
    }
}

proptest! {
    #[test]
    fn the_fast_sum_is_the_reference_sum(bytes in proptest::collection::vec(any::<u8>(), 0..3000), split in 0usize..3000) {
        prop_assert_eq!(csum::finish(csum::add(0, &bytes)), reference(&bytes));
        // In two pieces, when the first is even (as headers then payload are).
        let split = (split.min(bytes.len())) & !1;
        prop_assert_eq!(csum::finish(csum::add(csum::add(0, &bytes[..split]), &bytes[split..])), reference(&bytes));
    }

    #[test]
    fn segments_reassemble_the_super_packet_and_each_verifies(
        v6 in any::<bool>(),
        tcp in any::<bool>(),
        options in any::<bool>(),
        len in 1usize..20_000,
        size in 500u16..1400,
        fin_psh in any::<bool>(),
        seed in any::<u8>(),
    ) {
        let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let flags = 0x10 | 0x80 | if fin_psh { 0x09 } else { 0 };
        let sp = super_packet(v6, tcp, options, &payload, flags);
        let mut pool = BufPool::for_mtu(1500, 256);
        let mut out = Vec::new();
        let n = segment(&sp, &gso(v6, tcp, size), &mut pool, &mut out).unwrap();
        prop_assert_eq!(n, out.len());
        prop_assert_eq!(n, len.div_ceil(usize::from(size)).max(1));
        let h = Headers::parse(&sp).unwrap();
        let headers = h.ip_len + h.l4_len;
        let mut joined = Vec::new();
        for (i, seg) in out.iter().enumerate() {
            let p = seg.data();
            prop_assert!(verifies(p), "segment {} does not verify", i);
            prop_assert!(p.len() - headers <= usize::from(size));
            let sh = Headers::parse(p).unwrap();
            prop_assert_eq!(sh.total, p.len());
            if tcp {
                let seq = u32::from_be_bytes(p[h.ip_len + 4..h.ip_len + 8].try_into().unwrap());
                prop_assert_eq!(seq, 0xfffff000u32.wrapping_add(joined.len() as u32));
                let f = p[h.ip_len + 13];
                let last = i + 1 == n;
                prop_assert_eq!(f & 0x09 != 0, fin_psh && last, "FIN/PSH only on the last");
                prop_assert_eq!(f & 0x80 != 0, i == 0, "CWR only on the first");
                prop_assert_eq!(&p[h.ip_len + 20..headers], &sp[h.ip_len + 20..headers], "options kept");
            }
            if !v6 {
                prop_assert_eq!(u16::from_be_bytes([p[4], p[5]]), 0xfff0u16.wrapping_add(i as u16));
            }
            joined.extend_from_slice(&p[headers..]);
        }
        prop_assert_eq!(joined, payload);
    }
}

proptest! {
    #[test]
    fn split_then_coalesce_then_split_gives_the_same_segments(
        v6 in any::<bool>(),
        options in any::<bool>(),
        len in 1usize..30_000,
        size in 500u16..1400,
        psh in any::<bool>(),
    ) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let sp = super_packet(v6, true, options, &payload, 0x10 | if psh { 0x08 } else { 0 });
        let mut pool = BufPool::for_mtu(1500, 256);
        let mut segs = Vec::new();
        segment(&sp, &gso(v6, true, size), &mut pool, &mut segs).unwrap();
        let n = tcp_run_len(&segs, 65_535);
        prop_assert_eq!(n, segs.len(), "every segment of one super-packet merges");
        let mut merged = vec![0u8; 70_000];
        let (total, hdr) = coalesce_tcp(&segs, &mut merged).unwrap();
        prop_assert_eq!(total, sp.len());
        let mut again = Vec::new();
        segment(&merged[..total], &hdr, &mut pool, &mut again).unwrap();
        prop_assert_eq!(again.len(), segs.len());
        for (a, b) in again.iter().zip(&segs) {
            prop_assert_eq!(a.data(), b.data());
        }
        // In place: the first segment's rewritten headers, then every payload, is the
        // same super-packet, with the same virtio-net header.
        let (hdr_in_place, skip) = coalesce_tcp_in_place(&mut segs).unwrap();
        prop_assert_eq!(hdr_in_place, hdr);
        let mut gathered = segs[0].data().to_vec();
        for s in &segs[1..] {
            gathered.extend_from_slice(&s.data()[skip..]);
        }
        prop_assert_eq!(&gathered[..], &merged[..total]);
    }
}

proptest! {
    #[test]
    fn udp_split_then_coalesce_in_place_then_split_gives_the_same_datagrams(
        v6 in any::<bool>(),
        len in 1usize..30_000,
        size in 500u16..1400,
    ) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
        let sp = super_packet(v6, false, false, &payload, 0);
        let mut pool = BufPool::for_mtu(1500, 256);
        let mut segs = Vec::new();
        segment(&sp, &gso(v6, false, size), &mut pool, &mut segs).unwrap();
        let n = udp_run_len(&segs, 65_535);
        prop_assert_eq!(n, segs.len().min(MAX_UDP_SEGMENTS), "a super-packet's datagrams merge");
        let mut run: Vec<PacketBuf> = segs[..n].iter().map(|s| PacketBuf::from_slice(s.data())).collect();
        let (hdr, skip) = coalesce_udp_in_place(&mut run).unwrap();
        let mut gathered = run[0].data().to_vec();
        for s in &run[1..] {
            gathered.extend_from_slice(&s.data()[skip..]);
        }
        let mut again = Vec::new();
        segment(&gathered, &hdr, &mut pool, &mut again).unwrap();
        prop_assert_eq!(again.len(), n);
        for (a, b) in again.iter().zip(&segs) {
            prop_assert_eq!(a.data(), b.data());
        }
    }
}

#[test]
fn udp_runs_stop_where_a_merge_would_be_wrong() {
    let mut pool = BufPool::for_mtu(1500, 256);
    let sp = super_packet(false, false, false, &[5; 4000], 0);
    let mut segs = Vec::new();
    segment(&sp, &gso(false, false, 1000), &mut pool, &mut segs).unwrap();
    assert_eq!(udp_run_len(&segs, 65_535), 4);
    assert_eq!(udp_run_len(&segs, 2_100), 2, "the size limit");
    // Another port (checksum fixed, so only the field differs).
    let mut other = [segs[0].data(), segs[1].data()].map(PacketBuf::from_slice);
    other[1].data_mut()[21] ^= 1;
    let h = Headers::parse(other[1].data()).unwrap();
    fill_l4_checksum(other[1].data_mut(), &h);
    assert_eq!(udp_run_len(&other, 65_535), 1);
    // A bad checksum, or none.
    let mut bad = [segs[0].data(), segs[1].data()].map(PacketBuf::from_slice);
    bad[1].data_mut()[40] ^= 1;
    assert_eq!(udp_run_len(&bad, 65_535), 1);
    let mut none = [segs[0].data(), segs[1].data()].map(PacketBuf::from_slice);
    none[0].data_mut()[26..28].fill(0);
    assert_eq!(udp_run_len(&none, 65_535), 1);
    // A longer datagram after a shorter one ends the run at the shorter.
    let short = super_packet(false, false, false, &[5; 500], 0);
    let mixed = [PacketBuf::from_slice(&short), PacketBuf::from_slice(segs[0].data())];
    assert_eq!(udp_run_len(&mixed, 65_535), 1);
    // TCP never merges here.
    let tcp = super_packet(false, true, false, &[1; 100], 0x10);
    assert_eq!(udp_run_len(&[PacketBuf::from_slice(&tcp)], 65_535), 1);
}

#[test]
fn a_whole_packet_of_any_protocol_is_copied_as_it_is() {
    let mut pool = BufPool::for_mtu(1500, 8);
    let mut out = Vec::new();
    let mut icmp = vec![0u8; 84];
    let n =
        crate::ip::build_ipv4(&mut icmp, [10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 1, &[8; 64]).unwrap();
    assert_eq!(segment(&icmp[..n], &VirtioNetHdr::default(), &mut pool, &mut out), Ok(1));
    assert_eq!(out[0].data(), &icmp[..n]);
    // A header and no packet is an error, not an empty packet.
    assert_eq!(segment(&[], &VirtioNetHdr::default(), &mut pool, &mut out), Err(OffloadError::Truncated));
    // With a partial checksum to finish, it must be TCP or UDP.
    let partial = VirtioNetHdr { flags: VirtioNetHdr::NEEDS_CSUM, ..Default::default() };
    assert!(segment(&icmp[..n], &partial, &mut pool, &mut out).is_err());
    assert_eq!(out.len(), 1);
}

#[test]
fn runs_stop_where_a_merge_would_be_wrong() {
    let mut pool = BufPool::for_mtu(1500, 256);
    let sp = super_packet(false, true, false, &[5; 4000], 0x10);
    let mut segs = Vec::new();
    segment(&sp, &gso(false, true, 1000), &mut pool, &mut segs).unwrap();
    assert_eq!(tcp_run_len(&segs, 65_535), 4);
    assert_eq!(tcp_run_len(&segs, 2_100), 2, "the size limit");
    assert_eq!(tcp_run_len(&segs[..0], 65_535), 0);
    // A gap in the sequence.
    let gap = [segs[0].data(), segs[2].data()].map(PacketBuf::from_slice);
    assert_eq!(tcp_run_len(&gap, 65_535), 1);
    // A bad checksum.
    let mut bad = [segs[0].data(), segs[1].data()].map(PacketBuf::from_slice);
    bad[1].data_mut()[45] ^= 1;
    assert_eq!(tcp_run_len(&bad, 65_535), 1);
    // Another acknowledgment number (checksum fixed, so only the field differs).
    let mut ack = [segs[0].data(), segs[1].data()].map(PacketBuf::from_slice);
    ack[1].data_mut()[28] ^= 1;
    let h = Headers::parse(ack[1].data()).unwrap();
    fill_l4_checksum(ack[1].data_mut(), &h);
    assert_eq!(tcp_run_len(&ack, 65_535), 1);
    // FIN on the first, or a SYN.
    let mut fin = [segs[0].data(), segs[1].data()].map(PacketBuf::from_slice);
    fin[0].data_mut()[33] |= 0x01;
    let h = Headers::parse(fin[0].data()).unwrap();
    fill_l4_checksum(fin[0].data_mut(), &h);
    assert_eq!(tcp_run_len(&fin, 65_535), 1);
    // UDP never merges here.
    let udp = super_packet(false, false, false, &[1; 100], 0);
    assert_eq!(tcp_run_len(&[PacketBuf::from_slice(&udp)], 65_535), 1);
}

#[test]
fn a_single_packet_gets_its_partial_checksum_finished() {
    let sp = super_packet(false, true, false, b"hello", 0x18);
    let mut pool = BufPool::for_mtu(1500, 8);
    let mut out = Vec::new();
    let hdr = VirtioNetHdr {
        flags: VirtioNetHdr::NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 16,
        ..Default::default()
    };
    assert_eq!(segment(&sp, &hdr, &mut pool, &mut out), Ok(1));
    assert!(verifies(out[0].data()));
    // Offsets that do not name the packet's own checksum field are refused.
    let bad = VirtioNetHdr { csum_offset: 40, ..hdr };
    assert_eq!(segment(&sp, &bad, &mut pool, &mut out), Err(OffloadError::BadChecksumOffsets));
}

#[test]
fn bad_headers_are_errors_not_panics() {
    let mut pool = BufPool::for_mtu(1500, 8);
    let mut out = Vec::new();
    let sp = super_packet(false, true, false, &[7; 3000], 0x10);
    let tcp4 = gso(false, true, 1000);
    assert_eq!(segment(&sp[..30], &tcp4, &mut pool, &mut out), Err(OffloadError::Truncated));
    assert_eq!(
        segment(&sp, &VirtioNetHdr { gso_size: 0, ..tcp4 }, &mut pool, &mut out),
        Err(OffloadError::BadSegmentSize)
    );
    assert_eq!(
        segment(&sp, &gso(true, true, 1000), &mut pool, &mut out),
        Err(OffloadError::ProtocolMismatch)
    );
    assert_eq!(
        segment(&sp, &gso(false, false, 1000), &mut pool, &mut out),
        Err(OffloadError::ProtocolMismatch)
    );
    assert_eq!(
        segment(&sp, &VirtioNetHdr { gso_type: 0x81, ..tcp4 }, &mut pool, &mut out),
        Err(OffloadError::UnsupportedGso(0x81))
    );
    assert_eq!(
        segment(&sp, &VirtioNetHdr { gso_size: 20, ..tcp4 }, &mut pool, &mut out),
        Err(OffloadError::BadSegmentSize)
    );
    let mut small = BufPool::new(600, 16, 8);
    assert_eq!(
        segment(&sp, &gso(false, true, 1400), &mut small, &mut out),
        Err(OffloadError::SegmentTooLarge)
    );
    assert!(out.is_empty());
    assert_eq!(VirtioNetHdr::parse(&[0; 9]), Err(OffloadError::Truncated));
    let h =
        VirtioNetHdr { flags: 1, gso_type: 4, hdr_len: 74, gso_size: 1388, csum_start: 40, csum_offset: 16 };
    let mut b = [0u8; 10];
    h.write(&mut b).unwrap();
    assert_eq!(VirtioNetHdr::parse(&b), Ok(h));
}
