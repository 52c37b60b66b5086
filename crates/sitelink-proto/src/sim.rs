//! A deterministic simulation: devices on an in-memory wire, with a fake clock and a wire that
//! can lose, delay, reorder and duplicate datagrams. Everything is seeded, so a failing run
//! replays exactly.
//!
//! ```
//! use sitelink_proto::sim::Net;
//! let mut net = Net::pair(1);
//! net.send(0, 1, b"hello");
//! net.run_for(std::time::Duration::from_secs(1));
//! assert_eq!(net.take_delivered(1), vec![b"hello".to_vec()]);
//! ```

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sitelink_crypto::primitives::hash;
use sitelink_frame::ip;
use sitelink_frame::wire::{MessageType, classify};

use crate::{Datagram, Device, DeviceConfig, IpNet, PacketBuf, PeerConfig, PrivateKey, Random};

/// Deterministic [`Random`]: BLAKE2s in counter mode over a seed. For tests only.
#[derive(Debug, Clone)]
pub struct SeededRandom {
    seed: u64,
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl SeededRandom {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRandom { seed, counter: 0, block: [0; 32], used: 32 }
    }

    /// A uniform float in [0, 1).
    pub fn unit(&mut self) -> f64 {
        f64::from(self.next_u32()) / (f64::from(u32::MAX) + 1.0)
    }
}

impl Random for SeededRandom {
    fn fill(&mut self, dest: &mut [u8]) {
        for b in dest {
            if self.used == 32 {
                self.counter += 1;
                self.block = hash(&[&self.seed.to_le_bytes(), &self.counter.to_le_bytes()]);
                self.used = 0;
            }
            *b = self.block[self.used];
            self.used += 1;
        }
    }
}

/// A [`Random`] that counts the calls made of it, so tests can see which paths draw
/// randomness (only handshakes and cookies should).
struct Counted {
    inner: SeededRandom,
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Random for Counted {
    fn fill(&mut self, dest: &mut [u8]) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.fill(dest);
    }
}

/// How the wire treats datagrams.
#[derive(Debug, Clone, Copy)]
pub struct WireConfig {
    /// One-way delay.
    pub delay: Duration,
    /// Extra random delay of up to this (reorders datagrams).
    pub jitter: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram arrives twice.
    pub duplicate: f64,
}

impl Default for WireConfig {
    fn default() -> Self {
        WireConfig { delay: Duration::from_millis(1), jitter: Duration::ZERO, loss: 0.0, duplicate: 0.0 }
    }
}

/// A filter that may drop a datagram before the wire sees it: `(from node, bytes) -> keep?`.
pub type DropFilter = Box<dyn FnMut(usize, &[u8]) -> bool + Send>;

/// One simulated host: a device and its UDP address.
pub struct Node {
    /// The device.
    pub dev: Device,
    /// Its UDP address on the wire.
    pub addr: SocketAddr,
    /// Its inner (tunnel) address.
    pub inner: Ipv4Addr,
    /// How many times the device has drawn from its random source.
    pub rng_calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// More UDP addresses (other uplinks): path `k` (from 1) of the node is `extra_addrs[k -
    /// 1]`, path 0 is `addr`. A datagram to another node's path-`k` address leaves from this
    /// node's path-`k` address (the routes of a two-uplink site), or from `addr` without one.
    pub extra_addrs: Vec<SocketAddr>,
    delivered: Vec<PacketBuf>,
}

impl Node {
    /// The node's address on path `k`.
    pub fn path_addr(&self, k: usize) -> Option<SocketAddr> {
        if k == 0 { Some(self.addr) } else { self.extra_addrs.get(k - 1).copied() }
    }

    fn path_of(&self, addr: SocketAddr) -> Option<usize> {
        if addr == self.addr {
            Some(0)
        } else {
            self.extra_addrs.iter().position(|a| *a == addr).map(|i| i + 1)
        }
    }
}

struct InFlight {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    buf: PacketBuf,
}

/// Devices on an in-memory wire with a simulated clock.
pub struct Net {
    /// The hosts.
    pub nodes: Vec<Node>,
    /// The simulated time.
    pub now: Instant,
    /// Wire behaviour; may be changed between steps.
    pub wire: WireConfig,
    /// Drops datagrams for which it returns false (for targeted loss).
    pub filter: Option<DropFilter>,
    /// Every datagram put on the wire, for replay tests: `(from, to, bytes)`.
    pub record: Option<Vec<(SocketAddr, SocketAddr, Vec<u8>)>>,
    /// Paths (by index, see [`Node::extra_addrs`]) that are down: whatever is sent to or from
    /// an address of theirs vanishes, in silence.
    pub down_paths: Vec<usize>,
    flight: VecDeque<InFlight>,
    seq: u64,
    rng: SeededRandom,
    scratch_out: Vec<Datagram>,
    scratch_in: Vec<Datagram>,
    scratch_pkts: Vec<PacketBuf>,
}

/// The private key of simulated node `i` (deterministic).
pub fn node_key(i: usize) -> PrivateKey {
    let mut b = hash(&[b"sim node key", &(i as u64).to_le_bytes()]);
    b[0] &= 248;
    PrivateKey::from_bytes(b)
}

/// The tunnel address of simulated node `i`: 10.(i >> 16).(i >> 8).(i) + 1 offset.
pub fn node_inner(i: usize) -> Ipv4Addr {
    let n = i as u32 + 1;
    Ipv4Addr::from(0x0a00_0000 | n)
}

/// The UDP address of simulated node `i` on the wire: one host per node, in the benchmarking
/// range 198.18.0.0/15 (never reached: the wire is in memory).
pub fn node_addr(i: usize) -> SocketAddr {
    let host = 0xc612_0000u32 | (i as u32 + 1);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(host)), 51820)
}

impl Net {
    /// An empty network at an arbitrary start time.
    pub fn new(seed: u64) -> Self {
        Net {
            nodes: Vec::new(),
            now: Instant::now(),
            wire: WireConfig::default(),
            filter: None,
            record: None,
            down_paths: Vec::new(),
            flight: VecDeque::new(),
            seq: 0,
            rng: SeededRandom::new(seed ^ 0x5eed),
            scratch_out: Vec::new(),
            scratch_in: Vec::new(),
            scratch_pkts: Vec::new(),
        }
    }

    /// Adds a node with a deterministic key and returns its index. `tweak` may change the
    /// configuration (timers, MTU, load threshold).
    pub fn add_node(&mut self, tweak: impl FnOnce(&mut DeviceConfig)) -> usize {
        let i = self.nodes.len();
        let mut config = DeviceConfig::new(node_key(i));
        tweak(&mut config);
        let unix = Duration::from_secs(1_700_000_000);
        let rng_calls = std::sync::Arc::default();
        let rng =
            Counted { inner: SeededRandom::new(i as u64 + 1000), calls: std::sync::Arc::clone(&rng_calls) };
        let dev = Device::new(config, Box::new(rng), self.now, unix);
        self.nodes.push(Node {
            dev,
            addr: node_addr(i),
            inner: node_inner(i),
            rng_calls,
            extra_addrs: Vec::new(),
            delivered: Vec::new(),
        });
        i
    }

    /// Makes `a` and `b` peers of each other, each knowing the other's endpoint, each allowed
    /// the other's inner /32.
    pub fn link(&mut self, a: usize, b: usize, psk_a: Option<[u8; 32]>, psk_b: Option<[u8; 32]>) {
        self.add_peer(a, b, psk_a);
        self.add_peer(b, a, psk_b);
    }

    /// Makes `y` a peer of `x` (or sets it again): `y`'s key, endpoint and inner /32.
    pub fn add_peer(&mut self, x: usize, y: usize, psk: Option<[u8; 32]>) {
        let mut pc = PeerConfig::new(node_key(y).public_key());
        pc.endpoint = Some(self.nodes[y].addr);
        pc.allowed_ips = vec![IpNet::new(IpAddr::V4(self.nodes[y].inner), 32).expect("valid /32")];
        pc.preshared_key = psk.map(crate::PresharedKey::from_bytes);
        let now = self.now;
        self.nodes[x].dev.upsert_peer(now, pc).expect("distinct keys");
        self.check(x);
    }

    /// Makes `y` a peer of `x` reached over every path `y` has: its `addr` preferred, then its
    /// `extra_addrs` in order; `probe` as in [`PeerConfig::probe_paths`].
    pub fn add_multipath_peer(&mut self, x: usize, y: usize, probe: bool) {
        let mut pc = PeerConfig::new(node_key(y).public_key());
        pc.endpoint = Some(self.nodes[y].addr);
        pc.fallback_endpoints = self.nodes[y].extra_addrs.clone();
        pc.probe_paths = probe;
        pc.allowed_ips = vec![IpNet::new(IpAddr::V4(self.nodes[y].inner), 32).expect("valid /32")];
        let now = self.now;
        self.nodes[x].dev.upsert_peer(now, pc).expect("distinct keys");
        self.check(x);
    }

    /// Two nodes with two paths each (path 1 on 203.0.113.0/24), peers of each other over
    /// both, probing.
    pub fn multipath_pair(seed: u64) -> Self {
        let mut net = Net::new(seed);
        for i in 0..2 {
            net.add_node(|_| {});
            net.nodes[i].extra_addrs.push(SocketAddr::from(([203, 0, 113, 1 + i as u8], 51820)));
        }
        net.add_multipath_peer(0, 1, true);
        net.add_multipath_peer(1, 0, true);
        net
    }

    /// Two linked nodes with default configuration.
    pub fn pair(seed: u64) -> Self {
        let mut net = Net::new(seed);
        net.add_node(|_| {});
        net.add_node(|_| {});
        net.link(0, 1, None, None);
        net
    }

    /// Builds an IPv4/UDP-ish packet from `from`'s inner address to `to`'s carrying `payload`
    /// and hands it to `from`'s device.
    pub fn send(&mut self, from: usize, to: usize, payload: &[u8]) {
        let dst = self.nodes[to].inner;
        self.send_to_ip(from, dst, payload);
    }

    /// Like [`send`](Self::send) but to any inner destination address.
    pub fn send_to_ip(&mut self, from: usize, dst: Ipv4Addr, payload: &[u8]) {
        let src = self.nodes[from].inner;
        let mut buf = self.nodes[from].dev.alloc_buf();
        let n = ip::build_ipv4(buf.spare_mut(), src, dst, 17, payload).expect("payload fits the MTU");
        buf.set_len(n).expect("fits");
        let mut pkts = std::mem::take(&mut self.scratch_pkts);
        pkts.push(buf);
        let mut out = std::mem::take(&mut self.scratch_out);
        let now = self.now;
        self.nodes[from].dev.encapsulate(now, &mut pkts, &mut out);
        self.put_on_wire(from, &mut out);
        self.scratch_out = out;
        self.scratch_pkts = pkts;
    }

    /// Injects raw bytes as a datagram from `from_addr` arriving at node `to` now.
    pub fn inject(&mut self, from_addr: SocketAddr, to: usize, bytes: &[u8]) {
        let mut buf = self.nodes[to].dev.alloc_buf();
        if buf.copy_from(bytes).is_err() {
            buf = PacketBuf::from_slice(bytes);
        }
        self.deliver(to, from_addr, buf);
    }

    fn put_on_wire(&mut self, from: usize, out: &mut Vec<Datagram>) {
        for d in out.drain(..) {
            // The route to the destination's path picks the source address.
            let path = self.nodes.iter().find_map(|n| n.path_of(d.addr)).unwrap_or(0);
            let src = self.nodes[from].path_addr(path).unwrap_or(self.nodes[from].addr);
            if self.down_paths.contains(&path) {
                self.nodes[from].dev.recycle(d.buf);
                continue;
            }
            if let Some(rec) = self.record.as_mut() {
                rec.push((src, d.addr, d.buf.data().to_vec()));
            }
            let keep = self.filter.as_mut().is_none_or(|f| f(from, d.buf.data()));
            if !keep || self.rng.unit() < self.wire.loss {
                self.nodes[from].dev.recycle(d.buf);
                continue;
            }
            let copy = (self.rng.unit() < self.wire.duplicate).then(|| PacketBuf::from_slice(d.buf.data()));
            self.enqueue(src, d.addr, d.buf);
            if let Some(copy) = copy {
                self.enqueue(src, d.addr, copy);
            }
        }
    }

    fn enqueue(&mut self, from: SocketAddr, to: SocketAddr, buf: PacketBuf) {
        let jitter = self.wire.jitter.mul_f64(self.rng.unit());
        self.seq += 1;
        self.flight.push_back(InFlight {
            at: self.now + self.wire.delay + jitter,
            seq: self.seq,
            from,
            to,
            buf,
        });
    }

    fn deliver(&mut self, to: usize, from: SocketAddr, buf: PacketBuf) {
        let mut dgrams = std::mem::take(&mut self.scratch_in);
        let mut pkts = std::mem::take(&mut self.scratch_pkts);
        let mut out = std::mem::take(&mut self.scratch_out);
        dgrams.push(Datagram { addr: from, buf });
        let now = self.now;
        self.nodes[to].dev.decapsulate(now, &mut dgrams, &mut pkts, &mut out);
        self.check(to);
        self.nodes[to].delivered.append(&mut pkts);
        self.put_on_wire(to, &mut out);
        self.scratch_in = dgrams;
        self.scratch_pkts = pkts;
        self.scratch_out = out;
    }

    fn run_timers(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            if self.nodes[i].dev.next_deadline().is_some_and(|d| d <= now) {
                let mut out = std::mem::take(&mut self.scratch_out);
                self.nodes[i].dev.on_timers(now, &mut out);
                self.check(i);
                self.put_on_wire(i, &mut out);
                self.scratch_out = out;
            }
        }
    }

    /// Fails the test if node `i`'s bookkeeping went wrong (checked after every step).
    fn check(&self, i: usize) {
        if let Err(e) = self.nodes[i].dev.check_invariants() {
            panic!("node {i}: {e}");
        }
    }

    /// Has node `from` start a handshake with node `to` now (unless one went out less than
    /// REKEY_TIMEOUT ago), as a rekey or `wg` would.
    pub fn force_handshake(&mut self, from: usize, to: usize) {
        let pid = self.nodes[from].dev.peer_by_key(&node_key(to).public_key()).expect("linked nodes");
        let mut out = std::mem::take(&mut self.scratch_out);
        let now = self.now;
        self.nodes[from].dev.force_handshake(now, pid, &mut out).expect("live peer");
        self.put_on_wire(from, &mut out);
        self.scratch_out = out;
        self.check(from);
    }

    /// Like [`force_handshake`](Self::force_handshake), but nothing happens when `to` is not
    /// (or no longer) a peer of `from`.
    pub fn force_handshake_if_linked(&mut self, from: usize, to: usize) {
        if self.nodes[from].dev.peer_by_key(&node_key(to).public_key()).is_some() {
            self.force_handshake(from, to);
        }
    }

    /// Runs until `until`: delivers datagrams and fires timers in time order.
    pub fn run_until(&mut self, until: Instant) {
        loop {
            let next_wire = self.flight.iter().map(|f| (f.at, f.seq)).min();
            let next_timer = self.nodes.iter().filter_map(|n| n.dev.next_deadline()).min();
            let next = match (next_wire.map(|w| w.0), next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => until + Duration::from_nanos(1),
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            if let Some((at, seq)) = next_wire
                && at <= self.now
            {
                let pos = self.flight.iter().position(|f| f.seq == seq).expect("present");
                let f = self.flight.remove(pos).expect("present");
                match self.nodes.iter().position(|n| n.path_of(f.to).is_some()) {
                    Some(to) => self.deliver(to, f.from, f.buf),
                    None => drop(f.buf), // nobody at that address any more (roamed away)
                }
                continue;
            }
            self.run_timers();
        }
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Takes the payloads (after the 20-byte IPv4 header) delivered to node `i` so far.
    pub fn take_delivered(&mut self, i: usize) -> Vec<Vec<u8>> {
        let bufs = std::mem::take(&mut self.nodes[i].delivered);
        let mut out = Vec::with_capacity(bufs.len());
        for b in bufs {
            out.push(b.data()[ip::IPV4_MIN_HEADER_LEN..].to_vec());
            self.nodes[i].dev.recycle(b);
        }
        out
    }

    /// Takes the whole inner packets delivered to node `i` so far.
    pub fn take_delivered_packets(&mut self, i: usize) -> Vec<Vec<u8>> {
        let bufs = std::mem::take(&mut self.nodes[i].delivered);
        bufs.into_iter().map(|b| b.data().to_vec()).collect()
    }

    /// Moves node `i` to a new UDP address (roaming); datagrams in flight to the old one are lost.
    pub fn move_node(&mut self, i: usize, addr: SocketAddr) {
        self.nodes[i].addr = addr;
    }
}

/// Whether `bytes` is a WireGuard message of type `ty`.
pub fn is_type(bytes: &[u8], ty: MessageType) -> bool {
    classify(bytes) == Ok(ty)
}

/// Datagrams a script keeps on record for replays: the first half of the cap stays (the
/// first sessions' messages, whose indices go stale), the rest is the most recent.
const SCRIPT_RECORD_CAP: usize = 512;

/// Drives two linked nodes through the operations a byte string names, checking both
/// devices' bookkeeping after every step (a violation panics): the stateful fuzz target
/// (`fuzz/fuzz_targets/device_ops.rs`) and a property test share it.
///
/// Each byte picks an operation (its value modulo 16) and the next byte, where one is
/// needed, its argument: data either way, a handshake from one side or from both at once,
/// time passing (milliseconds, or up to 255 s at once), a peer removed, added again or all
/// peers replaced, the same private key set again, a side's datagrams all lost, a side
/// roaming to another port, and replays, mutations and misdeliveries of any datagram seen on
/// the wire so far, old sessions' receiver indices included.
pub fn run_script(script: &[u8]) {
    let mut net = Net::new(u64::from(script.first().copied().unwrap_or(0)));
    // A low load threshold on one side puts it in cookie mode now and then.
    let low_threshold = script.first().is_some_and(|b| b & 1 == 1);
    net.add_node(|c| {
        if low_threshold {
            c.handshake_load_threshold = 3;
        }
        c.max_staged_packets = 8;
    });
    net.add_node(|_| {});
    net.link(0, 1, None, None);
    net.record = Some(Vec::new());
    let mut lossy = [false; 2];
    let mut bytes = script.iter().copied().skip(1);
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        let side = usize::from(arg & 1);
        match op % 16 {
            0 | 1 => {
                let from = usize::from(op % 16);
                let payload = vec![arg; usize::from(arg) * 4];
                net.send(from, 1 - from, &payload);
            }
            2 | 3 => net.force_handshake_if_linked(usize::from(op % 2), 1 - usize::from(op % 2)),
            4 => {
                net.force_handshake_if_linked(0, 1);
                net.force_handshake_if_linked(1, 0);
            }
            5 => net.run_for(Duration::from_millis(u64::from(arg))),
            6 => net.run_for(Duration::from_secs(u64::from(arg))),
            7 => {
                let other = node_key(1 - side).public_key();
                if let Some(pid) = net.nodes[side].dev.peer_by_key(&other) {
                    net.nodes[side].dev.remove_peer(pid).expect("live peer");
                }
                net.check(side);
            }
            8 => net.add_peer(side, 1 - side, None),
            9..=11 => {
                let Some(rec) = net.record.as_ref().filter(|r| !r.is_empty()) else { continue };
                let (from, to, mut msg) = rec[usize::from(arg) % rec.len()].clone();
                let at = usize::from(bytes.next().unwrap_or(0));
                let xor = bytes.next().unwrap_or(0);
                if op % 16 == 10 && !msg.is_empty() {
                    let i = at % msg.len();
                    msg[i] ^= xor.max(1);
                }
                let dest = net.nodes.iter().position(|n| n.addr == to);
                let dest = if op % 16 == 11 { dest.map(|d| 1 - d) } else { dest };
                if let Some(d) = dest {
                    net.inject(from, d, &msg);
                }
            }
            12 => {
                net.nodes[side].dev.set_private_key(node_key(side));
                net.check(side);
            }
            13 => {
                lossy[side] = !lossy[side];
                let lossy = lossy;
                net.filter = Some(Box::new(move |from, _| !lossy[from]));
            }
            14 => {
                net.nodes[side].dev.clear_peers();
                net.add_peer(side, 1 - side, None);
            }
            _ => {
                let port = 51_820 + u16::from(arg);
                let ip = net.nodes[side].addr.ip();
                net.move_node(side, SocketAddr::new(ip, port));
            }
        }
        if let Some(rec) = net.record.as_mut()
            && rec.len() > SCRIPT_RECORD_CAP
        {
            rec.drain(SCRIPT_RECORD_CAP / 2..rec.len() - SCRIPT_RECORD_CAP / 4);
        }
    }
    net.filter = None;
    net.run_for(Duration::from_secs(1));
    for i in 0..2 {
        net.check(i);
        assert!(net.nodes[i].dev.peer_count() <= 1, "node {i} has more peers than configured");
    }
}
