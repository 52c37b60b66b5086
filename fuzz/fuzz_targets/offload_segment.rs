#![no_main]
//! Segmenting arbitrary super-packets under arbitrary virtio-net headers (what a TUN read with
//! offloads brings): never a panic, the count is what was pushed, no empty segment, nothing
//! pushed on error; then the write side on what came out: a run found by `tcp_run_len`
//! coalesces in place without a panic, and the gathered super-packet is the copying
//! coalescer's, byte for byte.
use libfuzzer_sys::fuzz_target;
use sitelink_frame::BufPool;
use sitelink_frame::offload::{
    VIRTIO_NET_HDR_LEN, VirtioNetHdr, coalesce_tcp, coalesce_tcp_in_place, segment, tcp_run_len,
};

fuzz_target!(|data: &[u8]| {
    let Ok(hdr) = VirtioNetHdr::parse(data) else { return };
    let packet = &data[VIRTIO_NET_HDR_LEN..];
    let mut pool = BufPool::for_mtu(1500, 256);
    let mut out = Vec::new();
    match segment(packet, &hdr, &mut pool, &mut out) {
        Ok(n) => {
            assert_eq!(n, out.len());
            assert!(out.iter().all(|s| !s.data().is_empty()));
        }
        Err(_) => {
            assert!(out.is_empty());
            return;
        }
    }
    let run = tcp_run_len(&out, 65_535);
    if run > 1 {
        let mut copied = vec![0u8; 70_000];
        let by_copy = coalesce_tcp(&out[..run], &mut copied);
        let in_place = coalesce_tcp_in_place(&mut out[..run]);
        if let (Ok((total, h1)), Ok((h2, skip))) = (by_copy, in_place) {
            assert_eq!(h1, h2);
            let mut gathered = out[0].data().to_vec();
            for s in &out[1..run] {
                gathered.extend_from_slice(&s.data()[skip..]);
            }
            assert_eq!(&gathered[..], &copied[..total]);
        }
    }
});
