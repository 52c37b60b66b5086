//! sitelink: an encrypted site-to-site link that speaks WireGuard, to embed in your program.
//!
//! A [`Link`] runs the sans-IO engine ([`sitelink_proto::Device`]) on worker threads over
//! batched kernel I/O ([`sitelink_io`]): inner IP packets become WireGuard datagrams on a UDP
//! socket, and back. Where the inner packets come from and go to is the one choice to make:
//!
//! # Over a TUN device
//!
//! [`LinkBuilder::start_tun`]: the kernel routes packets into an interface, the link's workers
//! read and write it (one queue each with a multi-queue device), and the operating system's
//! network stack does the rest. This is what `sitelinkd` does; it needs `CAP_NET_ADMIN`.
//!
//! ```no_run
//! use sitelink::{LinkBuilder, PeerConfig, PrivateKey, PublicKey, Tun};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let key = PrivateKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=")?;
//! let mut peer = PeerConfig::new(PublicKey::from_base64("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=")?);
//! peer.endpoint = Some("192.0.2.1:51820".parse()?);
//! peer.allowed_ips = vec!["10.0.0.2/32".parse()?];
//! let link = LinkBuilder::new(key).listen_port(51820).peer(peer).workers(2).start_tun(Tun::open("site0", true)?)?;
//! // Give site0 an address and bring it up (ip addr add 10.0.0.1/24 dev site0; ip link set site0 up).
//! link.wait_stopped(None);
//! # Ok(()) }
//! ```
//!
//! # Embedded: the application moves the packets
//!
//! [`LinkBuilder::start_embedded`] returns [`PacketQueues`]: the application takes a buffer from
//! the link ([`PacketQueues::alloc`]), writes an IP packet into it through `bytes::BufMut`,
//! and hands a batch over ([`PacketQueues::send_batch`]); the workers seal each packet where it
//! lies. Opened packets come out as [`InPacket`]s ([`PacketQueues::recv_batch`]), each its
//! pooled buffer, returned when dropped. No system call and no copy per packet between the
//! application and the workers, no TUN device, no root: for a userspace TCP/IP stack, a proxy,
//! an appliance with its own packet path. The queues' descriptor ([`std::os::fd::AsFd`]) is
//! readable while packets wait, for an event loop (see `examples/src/bin/event_loop.rs`).
//!
//! ```
//! use bytes::BufMut;
//! use sitelink::{LinkBuilder, OsRandom, PeerConfig, PrivateKey};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Two sites in one process, over loopback.
//! let (key_a, key_b) = (PrivateKey::generate(&mut OsRandom), PrivateKey::generate(&mut OsRandom));
//! let (pub_a, pub_b) = (key_a.public_key(), key_b.public_key());
//! let (a, packets_a) = LinkBuilder::new(key_a).loopback_only(true).start_embedded()?;
//! let (b, packets_b) = LinkBuilder::new(key_b).loopback_only(true).start_embedded()?;
//! let mut peer_b = PeerConfig::new(pub_b);
//! peer_b.endpoint = Some(([127, 0, 0, 1], b.port()).into());
//! peer_b.allowed_ips = vec!["10.0.0.2/32".parse()?];
//! a.set_peer(peer_b)?;
//! let mut peer_a = PeerConfig::new(pub_a);
//! peer_a.endpoint = Some(([127, 0, 0, 1], a.port()).into());
//! peer_a.allowed_ips = vec!["10.0.0.1/32".parse()?];
//! b.set_peer(peer_a)?;
//!
//! // An empty UDP datagram from 10.0.0.1 to 10.0.0.2, written into the link's own buffer.
//! let mut packet = packets_a.alloc();
//! packet.put_slice(&[0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0x66, 0xcf, 10, 0, 0, 1, 10, 0, 0, 2]);
//! packet.put_slice(&[0x23, 0x28, 0x23, 0x28, 0, 8, 0, 0]);
//! packets_a.send_batch(&mut vec![packet], None)?;
//!
//! let mut received = Vec::new();
//! packets_b.recv_batch(&mut received, 64, Some(std::time::Duration::from_secs(10)))?;
//! assert_eq!(&received[0][16..20], &[10, 0, 0, 2]);
//! println!("{:?}", b.stats().in_process);
//! # Ok(()) }
//! ```
//!
//! Configuration can change while traffic flows ([`Link::set_peer`], [`Link::remove_peer`],
//! [`Link::set_listen_port`], ...); [`uapi`] serves the same changes to the stock `wg` tool,
//! and [`conf`] reads wg-quick style files.

mod change;
pub mod conf;
mod open_sharing;
mod parse;
mod rand;
mod scheduling;
mod sync;
pub mod uapi;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use change::{PeerChange, SetRequest};
pub use rand::OsRandom;
pub use sitelink_io::{BackendKind, InPacket, InProcessStats, IoStats, OutPacket, PacketQueues, Tun};
pub use sitelink_proto::{
    DeviceConfig, DeviceStats, DropReason, IpNet, PathStats, PathSwitch, PathSwitchReason, PathTiming,
    PeerConfig, PeerStats, PresharedKey, PrivateKey, PublicKey, Timing,
};

use sitelink_io::{UdpConfig, UdpSocket};
use sitelink_proto::{Device, DeviceError};

use crate::sync::lock;
use crate::worker::{Shared, WorkerSlot};

/// Errors of starting or reconfiguring a link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// A system call failed (binding the port, opening the TUN device, ...).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// No peer has this public key.
    #[error("no such peer")]
    NoSuchPeer,
    /// The engine refused a change (a peer with the link's own public key, ...).
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl LinkError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> LinkError {
        move |source| LinkError::Io { what, source }
    }
}

/// Builds a [`Link`].
#[derive(Debug, Clone)]
pub struct LinkBuilder {
    keyed: bool,
    device: DeviceConfig,
    peers: Vec<PeerConfig>,
    udp: UdpConfig,
    backend: BackendKind,
    batch: usize,
    workers: usize,
    offload: bool,
    real_time: Option<u8>,
}

/// The most worker threads a link runs.
pub const MAX_WORKERS: usize = 64;

impl LinkBuilder {
    /// A link with this private key, the protocol's defaults, a random port and the io_uring
    /// backend (falling back to `mmsg` where io_uring is unavailable).
    pub fn new(private_key: PrivateKey) -> Self {
        LinkBuilder {
            keyed: true,
            device: DeviceConfig::new(private_key),
            peers: Vec::new(),
            udp: UdpConfig::default(),
            backend: BackendKind::Uring,
            batch: sitelink_io::DEFAULT_BATCH,
            workers: 1,
            offload: true,
            real_time: None,
        }
    }

    /// A link whose private key is not configured yet (as `sitelinkd` starts, before `wg`
    /// sets one): it holds a random key, which `get` does not report, so that it answers no
    /// one until [`Link::set_private_key`].
    pub fn unkeyed() -> Self {
        let mut b = LinkBuilder::new(PrivateKey::generate(&mut OsRandom));
        b.keyed = false;
        b
    }

    /// The UDP port to listen on (0, the default, picks a free one).
    pub fn listen_port(mut self, port: u16) -> Self {
        self.udp.port = port;
        self
    }

    /// Listens on loopback only (tests, demos).
    pub fn loopback_only(mut self, on: bool) -> Self {
        self.udp.loopback_only = on;
        self
    }

    /// `SO_MARK` for the link's datagrams.
    pub fn fwmark(mut self, mark: u32) -> Self {
        self.udp.fwmark = mark;
        self
    }

    /// Segmentation offloads (on by default): TCP and UDP super-packets through the TUN
    /// device where it was opened with them ([`Tun::open`]), and UDP GRO on receive. Off, the
    /// link moves one packet per TUN read and write and one datagram per receive (its
    /// device's offloads are turned off at start), for a kernel whose offloads misbehave.
    /// UDP GSO on send stays: it has its own fallback, and the peer never sees it.
    pub fn offload(mut self, on: bool) -> Self {
        self.offload = on;
        self.udp.gro = on;
        self
    }

    /// Runs the workers under `SCHED_FIFO` at `priority` (1-99) while the link is loaded and
    /// they have time to spare (off, `None`, by default in the library; sitelinkd turns it
    /// on). On a machine whose processors the link shares with busy applications, most of a
    /// packet's wait through a loaded link is its worker waiting for a processor; a real-time
    /// worker runs as soon as a packet wakes it. A worker starts in the fair class, takes real
    /// time once it uses over 8% of a processor and goes back to the fair class, each judged
    /// on its last 100 ms:
    /// - under 3% (idle: a packet waking an idle real-time worker waits longer than in the
    ///   fair class);
    /// - over 97% of a processor (a flood), so that it cannot starve the machine, until it is
    ///   under 50%;
    /// - over 40% for 500 ms in turns that move under 8 KiB each on average (small packets
    ///   one by one, which take a real-time worker up to three times the processor time
    ///   they take in the fair class's batches, time it takes from their senders when they
    ///   run on the same machine), until it is under 20%, or for 5 s before it tries again.
    ///
    /// It needs `CAP_SYS_NICE`; where the kernel refuses it, the link logs why and runs in the
    /// fair class. A worker started real-time (`chrt`) keeps what it was given. The
    /// figures are in benches/RESULTS.md.
    pub fn real_time_workers(mut self, priority: Option<u8>) -> Self {
        self.real_time = priority;
        self
    }

    /// Adds a peer.
    pub fn peer(mut self, peer: PeerConfig) -> Self {
        self.peers.push(peer);
        self
    }

    /// The tunnel MTU (default 1420): packets are padded up to a multiple of 16, never past it.
    pub fn mtu(mut self, mtu: usize) -> Self {
        self.device.mtu = mtu.clamp(576, 65_535 - 80);
        self
    }

    /// The protocol timers (tests and fault drills shorten them).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.device.timing = timing;
        self
    }

    /// The I/O backend.
    pub fn backend(mut self, kind: BackendKind) -> Self {
        self.backend = kind;
        self
    }

    /// Datagrams or packets per I/O batch (default 64).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.clamp(1, 1024);
        self
    }

    /// Worker threads (default 1, at most [`MAX_WORKERS`]). Each has its own I/O: a queue of
    /// the TUN device (which must then be multi-queue; see [`Tun::open`]) or of the embedded
    /// pipe, a UDP socket on the shared port (`SO_REUSEPORT`), its own io_uring and buffers.
    /// The kernel spreads packets over the queues by flow and datagrams over the sockets by
    /// source address, so each flow keeps its order. Workers share the engine, holding it only
    /// to route, count and check; sealing and opening run outside it, in parallel.
    ///
    /// One exception to the order: when a busy peer's endpoint changes (its first traffic,
    /// roaming), every worker connects a socket of its own to it, each at its next turn, and
    /// the kernel hands the peer's datagrams to the newest of them. A few datagrams that
    /// arrive while that moves may overtake ones still queued at the older socket, once.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.clamp(1, MAX_WORKERS);
        self
    }

    /// Gives access to the engine's configuration (load thresholds, staging queue).
    pub fn device_config(mut self, f: impl FnOnce(&mut DeviceConfig)) -> Self {
        f(&mut self.device);
        self
    }

    /// Starts the link over a TUN device. With more than one worker, the device must be
    /// multi-queue (`Tun::open(name, true)`): one more queue is attached per worker. A device
    /// that is not runs one worker, and says so in the log.
    pub fn start_tun(mut self, mut tun: Tun) -> Result<Link, LinkError> {
        let name = tun.name().to_owned();
        if !self.offload {
            tun.disable_offloads().map_err(LinkError::io("turning the TUN offloads off"))?;
        }
        if self.workers > 1 && !tun.is_multi_queue() {
            tracing::warn!(
                interface = %name,
                workers = self.workers,
                "the TUN device is not multi-queue; running one worker"
            );
            self.workers = 1;
        }
        let mut queues = Vec::with_capacity(self.workers);
        for _ in 1..self.workers {
            queues.push(tun.open_queue().map_err(LinkError::io("attaching a TUN queue"))?.into_packet_fd());
        }
        queues.insert(0, tun.into_packet_fd());
        Ok(self.start(queues.into_iter().map(Some).collect(), Some(name))?.0)
    }

    /// Starts the link in the embedded mode: the application sends and receives the inner IP
    /// packets itself through the returned [`PacketQueues`], in process (bounded lock-free
    /// queues, one per worker, and pooled buffers the workers seal and open in place: no
    /// system call and no copy per packet); no TUN device, no root.
    pub fn start_embedded(self) -> Result<(Link, PacketQueues), LinkError> {
        let queues = (0..self.workers).map(|_| None).collect();
        let (link, app) = self.start(queues, None)?;
        Ok((link, app.expect("no packet descriptors: in process")))
    }

    /// Starts the workers, one per queue: over the TUN queues given, or, when none is (the
    /// embedded mode), over in-process queues whose application end is returned.
    fn start(
        self,
        queues: Vec<Option<sitelink_io::PacketFd>>,
        ifname: Option<String>,
    ) -> Result<(Link, Option<PacketQueues>), LinkError> {
        let embedded = queues.iter().all(Option::is_none);
        let mut udp_config = self.udp;
        // Shared by the workers' sockets, and by the peers' connected ones beside them.
        udp_config.reuse_port = true;
        let sockets = bind_sockets(udp_config, queues.len())?;
        let port = sockets[0].port();
        udp_config.port = port;
        let mut ios = Vec::with_capacity(queues.len());
        for (packets, udp) in queues.into_iter().zip(sockets) {
            let (io, fallback) = sitelink_io::open_backend(self.backend, packets, udp, self.batch)
                .map_err(LinkError::io("opening the I/O backend"))?;
            if let Some(why) = &fallback
                && ios.is_empty()
            {
                tracing::warn!("{why}");
            }
            ios.push(io);
        }
        let backend = ios[0].kind();
        let now = Instant::now();
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut device = Device::new(self.device, Box::new(OsRandom), now, unix);
        for peer in self.peers {
            device.upsert_peer(now, peer)?;
        }
        // In process, the application writes into buffers like the workers' own.
        let (app, in_process) = if embedded {
            let mtu = device.config().mtu;
            let (app, side) = sitelink_io::in_process(ios.len(), device.pool_mut(), mtu)
                .map_err(LinkError::io("creating the in-process packet queues"))?;
            (Some(app), Some(side))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            device: Mutex::new(device),
            workers: ios.iter().map(|_| WorkerSlot::default()).collect(),
            wakers: ios.iter().map(|io| io.waker()).collect(),
            open_sharing: open_sharing::OpenSharing::new(ios.len()),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
            finished: Mutex::new(0),
            finished_changed: Condvar::new(),
            inject_panic: AtomicBool::new(false),
            keyed: AtomicBool::new(self.keyed),
            port: AtomicU16::new(port),
            fwmark: AtomicU32::new(self.udp.fwmark),
            udp: udp_config,
            in_process,
            real_time: self.real_time,
        });
        if let Some(side) = &shared.in_process {
            for (index, waker) in shared.wakers.iter().enumerate() {
                side.set_waker(index, waker.clone());
            }
        }
        let mut threads = Vec::with_capacity(ios.len());
        for (index, io) in ios.into_iter().enumerate() {
            let worker_shared = Arc::clone(&shared);
            // Filled here, so that a link's startup allocations are all made when it returns.
            let mut pool = lock(&shared.device).pool_mut().clone_empty();
            pool.prefill(worker::WORKER_PREFILL);
            shared.workers[index].buffers_allocated.store(pool.allocated(), Ordering::Relaxed);
            let spawned = std::thread::Builder::new()
                .name(format!("sitelink-worker-{index}"))
                .spawn(move || worker::run_guarded(worker_shared, index, io, pool));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Stop the workers already running before giving up.
                    shared.stop_all();
                    threads.into_iter().for_each(|t: JoinHandle<()>| drop(t.join()));
                    return Err(LinkError::Io { what: "spawning a worker thread", source: e });
                }
            }
        }
        Ok((Link { shared, threads: Mutex::new(threads), backend, ifname }, app))
    }
}

/// Binds `n` sockets on one port: the first as `config` says (port 0 picks one), the others
/// on the port the first got (`config.reuse_port` must be set when `n` > 1).
///
/// The sockets share the port with `SO_REUSEPORT`, which would also let another process of
/// the same user join them on a port it already holds (or on one the kernel picks). So the
/// port is first taken without the option, which fails if anyone holds it, and let go just
/// before the sockets bind it.
fn bind_sockets(mut config: UdpConfig, n: usize) -> Result<Vec<UdpSocket>, LinkError> {
    let probe = UdpSocket::bind(UdpConfig { reuse_port: false, buffer_bytes: 0, ..config })
        .map_err(LinkError::io("binding the UDP port"))?;
    config.port = probe.port();
    drop(probe);
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = UdpSocket::bind(config).map_err(LinkError::io("binding the UDP port"))?;
        config.port = socket.port();
        sockets.push(socket);
    }
    Ok(sockets)
}

/// A running link. Dropping it stops the workers.
pub struct Link {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    backend: BackendKind,
    ifname: Option<String>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("public_key", &self.public_key())
            .field("port", &self.port())
            .field("backend", &self.backend)
            .field("workers", &self.workers())
            .field("interface", &self.ifname)
            .finish_non_exhaustive()
    }
}

/// A snapshot of one peer.
#[derive(Debug, Clone)]
pub struct PeerSnapshot {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Its preshared key, if one is set.
    pub preshared_key: Option<PresharedKey>,
    /// Its current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Its persistent keepalive interval.
    pub persistent_keepalive: Option<Duration>,
    /// Its counters.
    pub stats: PeerStats,
    /// Each configured path (preferred first) when the peer has several endpoints: alive,
    /// active, last received, switches, probe traffic. Empty with one endpoint.
    pub paths: Vec<PathStats>,
}

/// A snapshot of a link's counters.
#[derive(Debug, Clone)]
pub struct LinkStats {
    /// The engine's counters: drops by reason, handshakes, cookies.
    pub device: DeviceStats,
    /// The I/O counters, summed over the workers.
    pub io: IoStats,
    /// The I/O counters of each worker, in worker order.
    pub io_per_worker: Vec<IoStats>,
    /// Packet buffers allocated over the link's life, by the workers' pools and the engine's:
    /// it stops growing once the pools are warm, whatever the traffic (memory is bounded).
    pub buffers_allocated: u64,
    /// Transport messages a worker opened for another (which received them with a large batch
    /// while it was idle).
    pub opens_shared: u64,
    /// Every peer.
    pub peers: Vec<PeerSnapshot>,
    /// The embedded mode's packet queues (`None` over a TUN device): packets sent, taken by
    /// each worker, delivered, and dropped because the application did not keep up.
    pub in_process: Option<InProcessStats>,
}

impl LinkStats {
    /// Drops counted for `reason` by the engine.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.device.drops.get(reason)
    }
}

impl Link {
    /// The link's public key.
    pub fn public_key(&self) -> PublicKey {
        *lock(&self.shared.device).public_key()
    }

    /// The UDP port the link listens on.
    pub fn port(&self) -> u16 {
        self.shared.port.load(Ordering::Relaxed)
    }

    /// The backend in use (after any fallback).
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The number of worker threads.
    pub fn workers(&self) -> usize {
        self.shared.workers.len()
    }

    fn wake_all(&self) {
        self.shared.wake_all();
    }

    /// The TUN interface's name, if the link runs over one.
    pub fn interface(&self) -> Option<&str> {
        self.ifname.as_deref()
    }

    /// The `SO_MARK` set on the link's socket (0 for none).
    pub fn fwmark(&self) -> u32 {
        self.shared.fwmark.load(Ordering::Relaxed)
    }

    /// Counters of the engine, the I/O and every peer.
    pub fn stats(&self) -> LinkStats {
        let io_per_worker: Vec<IoStats> =
            self.shared.workers.iter().map(|w| lock(&w.io_stats).clone()).collect();
        let mut io = IoStats::default();
        io_per_worker.iter().for_each(|w| io.add(w));
        let worker_buffers: u64 =
            self.shared.workers.iter().map(|w| w.buffers_allocated.load(Ordering::Relaxed)).sum();
        let mut dev = lock(&self.shared.device);
        LinkStats {
            buffers_allocated: worker_buffers + dev.pool_mut().allocated(),
            device: dev.stats().clone(),
            io,
            io_per_worker,
            opens_shared: self.shared.open_sharing.opens_shared.load(Ordering::Relaxed),
            peers: snapshot_peers(&dev),
            in_process: self.shared.in_process.as_ref().map(|side| side.stats()),
        }
    }

    /// Runs `f` on the engine with the workers held off it, then wakes them (its timers may
    /// have moved). The escape hatch for anything the methods here do not cover.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut Device, Instant) -> R) -> R {
        let r = {
            let mut dev = lock(&self.shared.device);
            f(&mut dev, Instant::now())
        };
        self.wake_all();
        r
    }

    /// Adds a peer or replaces the configuration of the peer with the same public key;
    /// sessions in progress survive.
    pub fn set_peer(&self, peer: PeerConfig) -> Result<(), LinkError> {
        self.with_device(|dev, now| dev.upsert_peer(now, peer).map(|_| ()).map_err(LinkError::from))
    }

    /// Removes a peer.
    pub fn remove_peer(&self, key: &PublicKey) -> Result<(), LinkError> {
        self.with_device(|dev, _| {
            let pid = dev.peer_by_key(key).ok_or(LinkError::NoSuchPeer)?;
            dev.remove_peer(pid).map_err(LinkError::from)
        })
    }

    /// Applies a configuration change in order, as `wg set` and `wg syncconf` send it: the
    /// listen port, the fwmark, the private key, then the peers (all removed first with
    /// `replace_peers`). Values equal to those in force change nothing, so an unchanged
    /// reload keeps every session. A peer with the link's own public key is ignored, as
    /// wireguard-go does. All or nothing: only the listen port can fail (a port another
    /// socket holds), and it is applied first, so a change that fails changes nothing.
    pub fn apply(&self, change: SetRequest) -> Result<(), LinkError> {
        if let Some(port) = change.listen_port {
            self.set_listen_port(port)?;
        }
        if let Some(mark) = change.fwmark {
            self.set_fwmark(mark);
        }
        if let Some(key) = change.private_key {
            self.set_private_key(key);
        }
        self.with_device(|dev, now| {
            if change.replace_peers {
                dev.clear_peers();
            }
            for peer in change.peers {
                apply_peer_change(dev, now, peer)?;
            }
            Ok(())
        })
    }

    /// The private key, if one has been configured (see [`LinkBuilder::unkeyed`]).
    pub fn private_key(&self) -> Option<PrivateKey> {
        self.has_private_key().then(|| lock(&self.shared.device).config().private_key.clone())
    }

    /// A snapshot of every peer: keys, endpoint, allowed IPs, counters.
    pub fn peers(&self) -> Vec<PeerSnapshot> {
        snapshot_peers(&lock(&self.shared.device))
    }

    /// Replaces the private key (every peer handshakes again).
    pub fn set_private_key(&self, key: PrivateKey) {
        self.with_device(|dev, _| dev.set_private_key(key));
        self.shared.keyed.store(true, Ordering::Relaxed);
    }

    /// Whether a private key has been configured (see [`LinkBuilder::unkeyed`]).
    pub fn has_private_key(&self) -> bool {
        self.shared.keyed.load(Ordering::Relaxed)
    }

    /// Moves the link to another UDP port (0 for any free one). Returns once every worker has
    /// taken its new socket (or after a second, if some worker does not come round), so that
    /// what the link sends from then on leaves from the new port: a peer learns the move from
    /// the next packet it receives (roaming), and no packet sent after the move can teach it
    /// the old port again.
    pub fn set_listen_port(&self, port: u16) -> Result<u16, LinkError> {
        if port != 0 && port == self.port() {
            return Ok(port);
        }
        let config = UdpConfig { port, fwmark: self.fwmark(), ..self.shared.udp };
        let sockets = bind_sockets(config, self.shared.workers.len())?;
        let bound = sockets[0].port();
        for (slot, socket) in self.shared.workers.iter().zip(sockets) {
            *lock(&slot.pending_socket) = Some(socket);
        }
        self.shared.port.store(bound, Ordering::Relaxed);
        self.wake_all();
        // A worker takes its socket at the start of a turn, before that turn's sends.
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline
            && self.shared.workers.iter().any(|slot| lock(&slot.pending_socket).is_some())
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(bound)
    }

    /// Sets `SO_MARK` on the link's socket (0 clears it).
    pub fn set_fwmark(&self, mark: u32) {
        self.shared.fwmark.store(mark, Ordering::Relaxed);
        self.wake_all();
    }

    /// Stops the workers and waits for them. Idempotent.
    pub fn shutdown(&self) {
        self.shared.stop_all();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }

    /// Whether the workers have stopped (after [`shutdown`](Self::shutdown), or a fatal
    /// error: one worker's stop stops them all).
    pub fn is_stopped(&self) -> bool {
        lock(&self.threads).iter().all(|t| t.is_finished())
    }

    /// Blocks until the link has stopped, whatever stopped it ([`shutdown`](Self::shutdown)
    /// from another thread, the TUN device gone, a worker failing; see
    /// [`failure`](Self::failure)), or until `timeout` passes. Returns whether it stopped. A
    /// program that runs a link until told otherwise waits here rather than polling.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut finished = lock(&self.shared.finished);
        loop {
            // A failed link counts as stopped at once: a worker may still be unwinding.
            if *finished >= self.shared.workers.len() || lock(&self.shared.failure).is_some() {
                return true;
            }
            finished = match deadline {
                None => self.shared.finished_changed.wait(finished).unwrap_or_else(PoisonError::into_inner),
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.shared
                        .finished_changed
                        .wait_timeout(finished, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Why the link stopped by itself, if it did because a worker failed: a worker that
    /// panics stops the whole link (the engine it shared may be half-updated, so no worker
    /// goes on with it), logs the panic as an error, and leaves its message here. A program
    /// that supervises the link should then exit non-zero or start a new one, as
    /// `sitelinkd` does. `None` while the link runs, and after a clean stop.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    /// Test hook: makes the next turn of a worker panic, to check that a failing worker stops
    /// the link loudly (see [`failure`](Self::failure)). Never call it on a production link.
    #[doc(hidden)]
    pub fn inject_worker_panic(&self) {
        self.shared.inject_panic.store(true, Ordering::Relaxed);
        self.wake_all();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub(crate) fn snapshot_peers(dev: &Device) -> Vec<PeerSnapshot> {
    dev.peer_ids()
        .filter_map(|pid| dev.peer(pid))
        .map(|p| PeerSnapshot {
            public_key: *p.public_key(),
            preshared_key: (!p.preshared_key().is_none()).then(|| p.preshared_key().clone()),
            endpoint: p.endpoint(),
            allowed_ips: p.allowed_ips().to_vec(),
            persistent_keepalive: p.persistent_keepalive(),
            stats: p.stats().clone(),
            paths: p.paths(),
        })
        .collect()
}

/// One peer's part of [`Link::apply`].
fn apply_peer_change(dev: &mut Device, now: Instant, change: PeerChange) -> Result<(), LinkError> {
    let existing = dev.peer_by_key(&change.public_key);
    if change.remove {
        if let Some(pid) = existing {
            dev.remove_peer(pid)?;
        }
        return Ok(());
    }
    let pid = match existing {
        Some(pid) => pid,
        None if change.update_only => return Ok(()),
        None => match dev.upsert_peer(now, PeerConfig::new(change.public_key)) {
            Ok(pid) => pid,
            Err(DeviceError::OwnPublicKey) => return Ok(()),
            Err(e) => return Err(e.into()),
        },
    };
    if let Some(psk) = change.preshared_key {
        dev.set_preshared_key(pid, psk)?;
    }
    if let Some(ep) = change.endpoint {
        dev.set_endpoint(pid, ep)?;
    }
    if let Some(secs) = change.persistent_keepalive {
        dev.set_persistent_keepalive(now, pid, Some(Duration::from_secs(secs.into())))?;
    }
    if change.replace_allowed_ips {
        dev.set_allowed_ips(pid, &change.allowed_ips)?;
    } else {
        for net in &change.removed_allowed_ips {
            dev.remove_allowed_ip(pid, *net)?;
        }
        for net in &change.allowed_ips {
            dev.add_allowed_ip(pid, *net)?;
        }
    }
    Ok(())
}
