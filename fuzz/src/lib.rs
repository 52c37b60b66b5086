//! Shared set-up for the fuzz targets: two simulated devices and what they said.

use std::time::Duration;

use sitelink_frame::wire::MessageType;
use sitelink_frame::{Datagram, PacketBuf};
use sitelink_proto::sim::{Net, is_type};

/// Two devices; node 0 initiated. Input is delivered at a fixed simulated time, so keys and
/// indices stay those recorded while the fuzzer runs.
pub struct Scene {
    /// The network (nodes 0 and 1).
    pub net: Net,
    /// Every datagram sent during set-up: (from node, bytes).
    pub recorded: Vec<(usize, Vec<u8>)>,
}

impl Scene {
    /// Node 0 sends to node 1 and back, so a session is up both ways; with `complete` false,
    /// node 0's initiation is lost and node 0 waits for a response.
    pub fn new(complete: bool) -> Scene {
        // Fuzz input arrives far faster than any real handshake load: keep the devices out of
        // cookie mode so that the handshake code itself is reached.
        let mut net = Net::new(3);
        net.add_node(|c| c.handshake_load_threshold = u32::MAX);
        net.add_node(|c| c.handshake_load_threshold = u32::MAX);
        net.link(0, 1, None, None);
        net.record = Some(Vec::new());
        if !complete {
            net.filter = Some(Box::new(|_, _| false));
        }
        net.send(0, 1, b"hello");
        net.run_for(Duration::from_millis(20));
        if complete {
            net.send(1, 0, b"hello back");
            net.run_for(Duration::from_millis(20));
        }
        let a = net.nodes[0].addr;
        let recorded = net
            .record
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(|(from, _, bytes)| (usize::from(from != a), bytes))
            .collect();
        net.filter = None;
        Scene { net, recorded }
    }

    /// The first recorded message of type `ty`.
    pub fn first(&self, ty: MessageType) -> Option<Vec<u8>> {
        self.recorded.iter().find(|(_, b)| is_type(b, ty)).map(|(_, b)| b.clone())
    }

    /// Delivers `bytes` to node `to` as if from the other node, now, and throws away what it
    /// delivers and sends.
    pub fn deliver(&mut self, to: usize, bytes: &[u8]) {
        let from = self.net.nodes[1 - to].addr;
        let now = self.net.now;
        let dev = &mut self.net.nodes[to].dev;
        let mut buf = dev.alloc_buf();
        if buf.copy_from(bytes).is_err() {
            buf = PacketBuf::from_slice(bytes);
        }
        let mut input = vec![Datagram { addr: from, buf }];
        let (mut packets, mut out) = (Vec::new(), Vec::new());
        dev.decapsulate(now, &mut input, &mut packets, &mut out);
        for p in packets {
            dev.recycle(p);
        }
        for d in out {
            dev.recycle(d.buf);
        }
    }
}
