//! Shared helpers for the benchmarks: two engines with an established session.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use sitelink_frame::{PacketBuf, ip};
use sitelink_proto::Device;
use sitelink_proto::sim::Net;

/// Two devices with a confirmed session both ways, and their addresses.
pub struct Established {
    /// The simulated network holding both devices (nodes 0 and 1).
    pub net: Net,
    /// Node 0's UDP address.
    pub addr_a: SocketAddr,
    /// Inner addresses of nodes 0 and 1.
    pub inner: (Ipv4Addr, Ipv4Addr),
}

impl Established {
    /// Runs a handshake between two fresh simulated devices.
    pub fn new() -> Self {
        let mut net = Net::pair(42);
        net.send(0, 1, b"x");
        net.send(1, 0, b"y");
        net.run_for(std::time::Duration::from_millis(50));
        assert_eq!(net.take_delivered(1).len(), 1, "session up");
        assert_eq!(net.take_delivered(0).len(), 1, "session up");
        let addr_a = net.nodes[0].addr;
        let inner = (net.nodes[0].inner, net.nodes[1].inner);
        Established { net, addr_a, inner }
    }

    /// The current simulated time.
    pub fn now(&self) -> Instant {
        self.net.now
    }

    /// Both devices, mutably.
    pub fn devices(&mut self) -> (&mut Device, &mut Device) {
        let (l, r) = self.net.nodes.split_at_mut(1);
        (&mut l[0].dev, &mut r[0].dev)
    }
}

impl Default for Established {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes an IPv4 packet of `len` bytes in all from `src` to `dst` into `buf` (reset first).
pub fn fill_packet(buf: &mut PacketBuf, headroom: usize, src: Ipv4Addr, dst: Ipv4Addr, len: usize) {
    buf.reset(headroom);
    buf.set_len(len).expect("buffer holds the packet");
    let header = ip::IPV4_MIN_HEADER_LEN;
    let mut h = [0u8; 20];
    ip::build_ipv4(&mut h, src, dst, 17, &[]).expect("header");
    h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    buf.data_mut()[..header].copy_from_slice(&h);
}
