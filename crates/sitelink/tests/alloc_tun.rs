//! The TUN path with offloads on allocates nothing once warm: super-packets read from the TUN
//! device and split, runs of datagrams received with UDP GRO, one datagram to a buffer, TCP runs coalesced
//! and written as super-packets, all watched by a counting global allocator (every thread of
//! the process).
//!
//! Needs root: the test runs its own binary twice inside a network namespace it creates (and
//! deletes). Process A runs link A over a TUN device with offloads, and counts; process B runs
//! link B, embedded, on loopback (in a process of its own, so that only link A's allocations
//! count). A Python process sends UDP super-packets (UDP_SEGMENT) into the TUN device, which A
//! reads as USO super-packets and splits; B's application receives them, and sends back
//! batches of one TCP flow's segments, which A receives as GRO runs, coalesces and writes as
//! TCP super-packets. Without root the test says so loudly and passes; with `CI=true` it must
//! run.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::BufMut;
use sitelink::{BackendKind, LinkBuilder, OsRandom, PeerConfig, PrivateKey, Tun};
use sitelink_frame::ip;
use sitelink_io::testing::CountingAllocator;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator::new();

/// Set for the processes the test runs in its namespace (the test binary again, running this
/// same test, which then plays side A or B): `a` or `b`.
const ROLE: &str = "SITELINK_ALLOC_TUN_ROLE";
/// The backend those processes use.
const BACKEND: &str = "SITELINK_ALLOC_TUN_BACKEND";
/// The links' ports, for the uring round (the mmsg round adds 10: a killed process's
/// io_uring lets go of its sockets a little after the process is gone).
const PORTS: [u16; 2] = [51001, 51002];
const BATCH: usize = 32;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn sh(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(cmd).status().is_ok_and(|s| s.success())
}

/// Deletes the namespace, even when the test fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        sh(&format!("ip netns del {} 2>/dev/null", self.0));
    }
}

/// Kills a process of ours (by its handle) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tun_path_with_offloads_allocates_nothing() {
    match std::env::var(ROLE).as_deref() {
        Ok("a") => return side_a(),
        Ok("b") => return side_b(),
        _ => {}
    }
    if !sitelink_io::is_root() || !sh("command -v ip >/dev/null && command -v python3 >/dev/null") {
        let msg = "alloc_tun cannot run: needs root, ip and python3";
        assert!(!in_ci(), "{msg} (CI=true: it may not skip)");
        eprintln!("\n*** SKIPPED: {msg} ***\n");
        return;
    }
    let ns = Netns(format!("slalloc{}", std::process::id()));
    assert!(sh(&format!("ip netns add {} && ip -n {} link set lo up", ns.0, ns.0)), "netns");
    let exe = std::env::current_exe().expect("test binary");
    let keys =
        [PrivateKey::generate(&mut OsRandom), PrivateKey::generate(&mut OsRandom)].map(|k| k.to_base64());
    let run = |role: &str, backend: &str| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.0])
            .arg(&exe)
            .args(["--exact", "tun_path_with_offloads_allocates_nothing", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(BACKEND, backend)
            .env("KEY_A", &keys[0])
            .env("KEY_B", &keys[1]);
        cmd
    };
    for backend in ["uring", "mmsg"] {
        let _b = Killed(run("b", backend).spawn().expect("run side B"));
        let out = run("a", backend).output().expect("run side A");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        eprintln!("{text}");
        assert!(out.status.success(), "side A ({backend}) failed");
        assert!(
            text.contains("1 passed") && text.contains("allocations in 3 s"),
            "side A ({backend}) did not run"
        );
    }
}

fn key(var: &str) -> PrivateKey {
    PrivateKey::from_base64(&std::env::var(var).expect("set by the parent")).expect("a key")
}

fn backend() -> BackendKind {
    std::env::var(BACKEND).expect("run by the parent").parse().expect("backend")
}

fn port(side: usize) -> u16 {
    PORTS[side] + if backend() == BackendKind::Mmsg { 10 } else { 0 }
}

/// Link B, embedded, and its application: receives what A's TUN device sends, and answers
/// each turn with as many of one TCP flow's segments (2 to 32) as it received, until killed.
fn side_b() {
    let (b, qb) = LinkBuilder::new(key("KEY_B"))
        .loopback_only(true)
        .listen_port(port(1))
        .backend(backend())
        .start_embedded()
        .expect("link B");
    let mut peer_a = PeerConfig::new(key("KEY_A").public_key());
    peer_a.endpoint = Some(([127, 0, 0, 1], port(0)).into());
    peer_a.allowed_ips = vec!["10.9.0.0/24".parse().unwrap()];
    b.set_peer(peer_a).unwrap();
    // One TCP flow's segments from B to A: in order within a batch, checksums right (the
    // kernel answers them with resets, which B's application drops).
    let segments: Vec<Vec<u8>> = (0..BATCH as u32)
        .map(|i| {
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&5201u16.to_be_bytes());
            tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
            tcp[4..8].copy_from_slice(&(1000 + i * 1200).to_be_bytes());
            tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x10;
            tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
            tcp.extend_from_slice(&[i as u8; 1200]);
            let mut p = vec![0u8; 1300];
            let n = ip::build_ipv4(&mut p, [10, 9, 0, 2].into(), [10, 9, 0, 1].into(), 6, &tcp).unwrap();
            p.truncate(n);
            fill_tcp_checksum(&mut p);
            p
        })
        .collect();
    let (mut out, mut got) = (Vec::with_capacity(BATCH), Vec::with_capacity(256));
    let mut echo = BATCH;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        for s in &segments[..echo.clamp(2, BATCH)] {
            let mut p = qb.alloc();
            p.put_slice(s);
            out.push(p);
        }
        qb.send_batch(&mut out, Some(Duration::from_secs(1))).expect("send");
        // A pause, so that the links are not overrun (what is measured is the path); then
        // everything that came.
        std::thread::sleep(Duration::from_micros(300));
        let mut wait = Some(Duration::from_millis(1));
        echo = 0;
        while qb.recv_batch(&mut got, 256, wait).is_ok() && !got.is_empty() {
            echo += got.len();
            got.clear();
            wait = Some(Duration::ZERO);
        }
    }
}

/// Link A over the TUN device, with offloads, and the count.
fn side_a() {
    let backend = backend();
    let tun = Tun::open("slalloc0", false).expect("TUN");
    let offloads = tun.offloads();
    assert!(offloads.tso && offloads.uso, "this kernel's TUN offloads: {offloads:?}");
    assert!(sh("ip addr add 10.9.0.1/24 dev slalloc0 && ip link set slalloc0 mtu 1420 up"));
    let a = LinkBuilder::new(key("KEY_A"))
        .loopback_only(true)
        .listen_port(port(0))
        .backend(backend)
        .start_tun(tun)
        .expect("link A");
    let mut peer_b = PeerConfig::new(key("KEY_B").public_key());
    peer_b.endpoint = Some(([127, 0, 0, 1], port(1)).into());
    peer_b.allowed_ips = vec!["10.9.0.2/32".parse().unwrap()];
    a.set_peer(peer_b).unwrap();

    // UDP super-packets into the TUN device from another process: 10 segments of 1,200 bytes
    // per send.
    let _sender = Killed(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import socket, time\n\
                 s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.setsockopt(17, 103, 1200)\n\
                 end = time.time() + 60\n\
                 while time.time() < end:\n\
                 \x20   for _ in range(4): s.sendto(bytes(12000), ('10.9.0.2', 9))\n\
                 \x20   time.sleep(0.001)\n",
            )
            .spawn()
            .expect("python3"),
    );

    // Warm: the handshake, connected sockets, busy-peer rankings, and the pools, which grow to
    // the most buffers this traffic ever has in flight at once: a peak first met only now and
    // then. Warm means half a second without an allocation (within 20 s). This thread only
    // sleeps meanwhile.
    let warm = Instant::now();
    loop {
        GLOBAL.start();
        std::thread::sleep(Duration::from_millis(500));
        let n = GLOBAL.stop();
        if n == 0 && warm.elapsed() >= sitelink_proto::RANK_INTERVAL * 5 / 2 {
            break;
        }
        assert!(
            warm.elapsed() < Duration::from_secs(20),
            "still allocating after 20 s: {n} in the last 0.5 s"
        );
    }
    let before = a.stats();
    GLOBAL.trace_first_allocation();
    GLOBAL.start();
    std::thread::sleep(Duration::from_secs(3));
    let allocations = GLOBAL.stop();
    let after = a.stats();
    a.shutdown();
    if let Some(first) = GLOBAL.first_allocation() {
        eprintln!("{backend:?}: the first allocation counted came from {first}");
    }
    let d = |f: fn(&sitelink::IoStats) -> u64| f(&after.io) - f(&before.io);
    eprintln!(
        "{backend:?}: warm after {:?}; {allocations} allocations in 3 s, while A moved {} packets from its TUN \
         ({} super-packets read) and {} to it ({} coalesced writes, {} GRO runs received, {} datagrams \
         copied out of runs); buffers {} -> {}",
        warm.elapsed() - Duration::from_millis(500),
        d(|s| s.tun_rx),
        d(|s| s.tun_gso_reads),
        d(|s| s.tun_tx),
        d(|s| s.tun_gso_writes),
        d(|s| s.udp_gro_reads),
        d(|s| s.udp_gro_copied),
        before.buffers_allocated,
        after.buffers_allocated,
    );
    assert!(d(|s| s.tun_gso_reads) > 0, "no super-packet was read: {:?}", after.io);
    assert!(d(|s| s.tun_gso_writes) > 0, "no coalesced write: {:?}", after.io);
    assert!(d(|s| s.udp_gro_reads) > 0, "no GRO run came in: {:?}", after.io);
    // The runs land one datagram to a buffer: only a run of a size other than the last one's
    // is copied apart.
    assert!(d(|s| s.udp_gro_copied) * 4 < d(|s| s.udp_rx), "runs copied apart: {:?}", after.io);
    assert!(d(|s| s.tun_rx) > 10_000 && d(|s| s.tun_tx) > 10_000, "too little traffic: {:?}", after.io);
    assert_eq!(after.io.tun_offload_errors, 0);
    assert_eq!(allocations, 0, "allocations once warm: {:?}", after.io);
}

/// Fills an IPv4 TCP packet's checksum (header of 20 bytes).
fn fill_tcp_checksum(p: &mut [u8]) {
    use sitelink_frame::offload::csum;
    p[36..38].fill(0);
    let sum = csum::finish(csum::add(csum::pseudo_header(&p[12..16], &p[16..20], 6, p.len() - 20), &p[20..]));
    p[36..38].copy_from_slice(&sum.to_be_bytes());
}
