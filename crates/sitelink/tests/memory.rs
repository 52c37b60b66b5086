//! What a hub's peers cost: 10,000 peers (each with an endpoint and an allowed IP) applied to
//! a running link in one request, measured as heap bytes still allocated afterwards.

use std::net::SocketAddr;

use sitelink::{IpNet, LinkBuilder, PeerChange, PrivateKey, PublicKey, SetRequest};
use sitelink_io::testing::CountingAllocator;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator::new();

const PEERS: u32 = 10_000;

/// The most heap a configured, idle peer may cost, everything the link keeps for it included
/// (the engine's peer, the key and index tables, the route trie). Measured: about 1,240 bytes;
/// 1,940 before the keypairs and the peer table were boxed.
const MAX_BYTES_PER_PEER: i64 = 1536;

#[test]
fn ten_thousand_idle_peers_cost_under_one_and_a_half_kib_each() {
    let (link, _pipe) = LinkBuilder::new(PrivateKey::from_bytes([9; 32]))
        .loopback_only(true)
        .workers(1)
        .start_embedded()
        .expect("link");
    let before = GLOBAL.live_bytes();
    let peers = (0..PEERS)
        .map(|i| {
            let mut key = [0x42u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            let ip = std::net::Ipv4Addr::new(10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            PeerChange {
                public_key: PublicKey::from_bytes(key),
                remove: false,
                update_only: false,
                preshared_key: None,
                endpoint: Some(SocketAddr::from(([127, 0, 0, 1], 1024 + (i % 60_000) as u16))),
                persistent_keepalive: None,
                replace_allowed_ips: true,
                allowed_ips: vec![IpNet::new(ip.into(), 32).expect("prefix")],
                removed_allowed_ips: Vec::new(),
            }
        })
        .collect();
    link.apply(SetRequest { peers, ..SetRequest::default() }).expect("apply");
    let after = GLOBAL.live_bytes();
    assert_eq!(link.peers().len(), PEERS as usize);
    let per_peer = (after - before) / i64::from(PEERS);
    eprintln!("{PEERS} peers: {} KiB of heap, {per_peer} bytes per peer", (after - before) / 1024);
    assert!(per_peer <= MAX_BYTES_PER_PEER, "{per_peer} bytes per idle peer");
    link.shutdown();
}
