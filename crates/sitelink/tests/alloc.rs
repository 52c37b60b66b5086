//! The data path allocates nothing once warm: a counting global allocator watches 10,000
//! rounds of encapsulate and decapsulate, in batches of 64, both ways.

use std::net::SocketAddr;
use std::time::Duration;

use sitelink_frame::ip;
use sitelink_io::testing::CountingAllocator;
use sitelink_proto::sim::Net;
use sitelink_proto::{Datagram, Device, PacketBuf};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator::new();

const BATCH: usize = 64;

struct Side {
    packets: Vec<PacketBuf>,
    out: Vec<Datagram>,
    delivered: Vec<PacketBuf>,
    replies: Vec<Datagram>,
}

impl Side {
    fn new() -> Self {
        Side {
            packets: Vec::with_capacity(BATCH),
            out: Vec::with_capacity(BATCH * 2),
            delivered: Vec::with_capacity(BATCH * 2),
            replies: Vec::with_capacity(BATCH * 2),
        }
    }
}

/// One round: `from` encapsulates a batch of 1,400-byte packets, `to` decapsulates them.
#[allow(clippy::too_many_arguments)]
fn round(
    from: &mut Device,
    to: &mut Device,
    side: &mut Side,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    from_addr: SocketAddr,
    now: std::time::Instant,
    payload: &[u8],
) {
    for _ in 0..BATCH {
        let mut buf = from.alloc_buf();
        let n = ip::build_ipv4(buf.spare_mut(), src, dst, 17, payload).expect("fits");
        buf.set_len(n).expect("fits");
        side.packets.push(buf);
    }
    from.encapsulate(now, &mut side.packets, &mut side.out);
    assert_eq!(side.out.len(), BATCH, "every packet sealed and sent");
    for d in &mut side.out {
        d.addr = from_addr;
    }
    to.decapsulate(now, &mut side.out, &mut side.delivered, &mut side.replies);
    assert_eq!(side.delivered.len(), BATCH, "every packet delivered");
    for b in side.delivered.drain(..) {
        from.recycle(b);
    }
    for d in side.replies.drain(..) {
        to.recycle(d.buf);
    }
}

#[test]
fn steady_state_data_path_allocates_nothing() {
    let mut net = Net::pair(7);
    net.send(0, 1, b"handshake");
    net.send(1, 0, b"handshake");
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.take_delivered(1).len(), 1);
    assert_eq!(net.take_delivered(0).len(), 1);
    let (addr_a, addr_b) = (net.nodes[0].addr, net.nodes[1].addr);
    let (inner_a, inner_b) = (net.nodes[0].inner, net.nodes[1].inner);
    let mut now = net.now;
    let (left, right) = net.nodes.split_at_mut(1);
    let (a, b) = (&mut left[0].dev, &mut right[0].dev);
    let payload = vec![0x5a; 1400 - 20];
    let (mut ab, mut ba) = (Side::new(), Side::new());

    // Warm the pools and vectors.
    for _ in 0..50 {
        round(a, b, &mut ab, inner_a, inner_b, addr_a, now, &payload);
        round(b, a, &mut ba, inner_b, inner_a, addr_b, now, &payload);
    }
    GLOBAL.start();
    for _ in 0..10_000 {
        now += Duration::from_micros(500);
        round(a, b, &mut ab, inner_a, inner_b, addr_a, now, &payload);
        round(b, a, &mut ba, inner_b, inner_a, addr_b, now, &payload);
    }
    let n = GLOBAL.stop();
    assert_eq!(n, 0, "{n} heap allocations in 2 x 10,000 batches of {BATCH} packets");
    assert_eq!(a.stats().drops.total() + b.stats().drops.total(), 0);
}
