//! Links with several workers, in the embedded mode (no root): two links in one process over
//! loopback UDP. Many flows go through, of small packets, large ones and both; each must
//! arrive whole and in order (a mixed flow: each size in order), and the work
//! must really be spread over the sending link's workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BufMut;
use sitelink::{BackendKind, Link, LinkBuilder, OsRandom, PacketQueues, PeerConfig, PrivateKey};
use sitelink_frame::ip;

const A: [u8; 4] = [10, 9, 0, 1];
const B: [u8; 4] = [10, 9, 0, 2];

fn pair(backend: BackendKind, workers: usize) -> ((Link, PacketQueues), (Link, PacketQueues)) {
    let (key_a, key_b) = (PrivateKey::generate(&mut OsRandom), PrivateKey::generate(&mut OsRandom));
    let (pub_a, pub_b) = (key_a.public_key(), key_b.public_key());
    let start = |key| {
        LinkBuilder::new(key)
            .loopback_only(true)
            .backend(backend)
            .workers(workers)
            .start_embedded()
            .expect("link starts")
    };
    let (a, b) = (start(key_a), start(key_b));
    let mut peer_b = PeerConfig::new(pub_b);
    peer_b.endpoint = Some(([127, 0, 0, 1], b.0.port()).into());
    peer_b.allowed_ips = vec!["10.9.0.2/32".parse().unwrap()];
    a.0.set_peer(peer_b).unwrap();
    let mut peer_a = PeerConfig::new(pub_a);
    peer_a.endpoint = Some(([127, 0, 0, 1], a.0.port()).into());
    peer_a.allowed_ips = vec!["10.9.0.1/32".parse().unwrap()];
    b.0.set_peer(peer_a).unwrap();
    (a, b)
}

/// Whether packet `seq` of `flow` is small: a 108-byte packet, 144 bytes sealed (small by
/// `sitelink_io::SMALL_PACKET`), else a 1,028-byte one. Flows 4k are mixed (every third
/// small), flows 4k + 1 all small, the others all large.
fn is_small(flow: u16, seq: u32) -> bool {
    match flow % 4 {
        0 => seq % 3 == 0,
        1 => true,
        _ => false,
    }
}

/// A UDP-in-IPv4 packet of flow `flow` (its source port) carrying `seq`, small or not as
/// [`is_small`] says.
fn packet(src: [u8; 4], dst: [u8; 4], flow: u16, seq: u32) -> Vec<u8> {
    let len = if is_small(flow, seq) { 80 } else { 1000 };
    let mut udp = Vec::with_capacity(8 + len);
    udp.extend_from_slice(&(10_000 + flow).to_be_bytes());
    udp.extend_from_slice(&9000u16.to_be_bytes());
    udp.extend_from_slice(&(8 + len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&seq.to_be_bytes());
    udp.resize(8 + len, (seq % 251) as u8);
    let mut buf = vec![0u8; 20 + udp.len()];
    let n = ip::build_ipv4(&mut buf, src.into(), dst.into(), 17, &udp).unwrap();
    buf.truncate(n);
    buf
}

/// (flow, seq) of a packet built by [`packet`], checking its body.
fn parse(p: &[u8]) -> (u16, u32) {
    let udp = &p[20..];
    let flow = u16::from_be_bytes([udp[0], udp[1]]) - 10_000;
    let seq = u32::from_be_bytes(udp[8..12].try_into().unwrap());
    assert!(udp[12..].iter().all(|&b| b == (seq % 251) as u8), "body of {flow}/{seq} corrupted");
    (flow, seq)
}

/// Hands one packet to the link.
fn send(queues: &PacketQueues, packet: &[u8]) {
    let mut out = queues.alloc();
    out.put_slice(packet);
    queues.send_batch(&mut vec![out], None).unwrap();
}

/// Receives until `want` packets came or `limit` passed.
fn receive(queues: &PacketQueues, want: usize, limit: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut batch = Vec::new();
    let start = Instant::now();
    while got.len() < want && start.elapsed() < limit {
        let _ = queues.recv_batch(&mut batch, want - got.len(), Some(Duration::from_millis(100)));
        got.extend(batch.drain(..).map(|p| p.to_vec()));
    }
    got
}

/// Waits until each of `link`'s workers has given the one peer a connected socket.
fn every_worker_connected(link: &Link) {
    let start = Instant::now();
    loop {
        let sockets: Vec<u64> = link.stats().io_per_worker.iter().map(|w| w.peer_sockets).collect();
        if sockets.iter().all(|&n| n == 1) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "workers' connected sockets: {sockets:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How long the bulk transfer may take before the test gives up.
const LIMIT: Duration = Duration::from_secs(30);

fn many_flows_arrive_whole_and_in_order(backend: BackendKind) {
    const FLOWS: u16 = 32;
    const PER_FLOW: u32 = 100;
    let ((a, pa), (b, pb)) = pair(backend, 2);
    assert_eq!((a.workers(), b.workers()), (2, 2));
    // What the workers' pools start with (filled before the links start).
    let prefilled = [a.stats().buffers_allocated, b.stats().buffers_allocated];
    assert!(prefilled.iter().all(|&n| n > 0), "{prefilled:?}");
    // The first packet starts the handshake; wait for it, so nothing waits in the small
    // staging queue while the bulk goes.
    send(&pa, &packet(A, B, 0, u32::MAX));
    assert_eq!(receive(&pb, 1, Duration::from_secs(10)).len(), 1, "handshake and first packet");
    send(&pb, &packet(B, A, 0, u32::MAX));
    assert_eq!(receive(&pa, 1, Duration::from_secs(10)).len(), 1, "first packet back");
    // The peer's first traffic gives it a connected socket in every worker, each worker at
    // its own next turn. The kernel hands a peer's datagrams to the newest of those sockets,
    // so while a worker is late to connect, the flows move to it mid-stream and a few
    // datagrams may overtake those still queued at the old socket. This test is about order
    // once that has settled: wait for it.
    every_worker_connected(&a);
    every_worker_connected(&b);

    // The sender keeps at most WINDOW packets unreceived: a receiving application that falls
    // behind loses packets at its full inbound queue, as at a full TUN queue (counted as
    // inbound_dropped), and this test is about order, not about overrunning the reader.
    const WINDOW: usize = 256;
    let received = Arc::new(AtomicUsize::new(0));
    let sender = {
        let received = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut sent = 0;
            let start = Instant::now();
            for seq in 0..PER_FLOW {
                for flow in 0..FLOWS {
                    while sent - received.load(Ordering::Relaxed) >= WINDOW && start.elapsed() < LIMIT {
                        std::thread::yield_now();
                    }
                    send(&pa, &packet(A, B, flow, seq));
                    sent += 1;
                }
            }
            pa
        })
    };
    // Every packet arrives but those the receiver's queue management dropped (CoDel, at B's
    // sockets: B's one busy worker opens what A's two seal, so a queue may stand there),
    // which are counted.
    let total = usize::from(FLOWS) * PER_FLOW as usize;
    let queue_drops =
        |link: &Link| link.stats().io_per_worker.iter().map(|w| w.udp_queue_drops as usize).sum::<usize>();
    let mut got = Vec::with_capacity(total);
    let mut batch = Vec::new();
    let start = Instant::now();
    while got.len() + queue_drops(&b) < total && start.elapsed() < LIMIT {
        let _ = pb.recv_batch(&mut batch, 64, Some(Duration::from_millis(100)));
        got.extend(batch.drain(..).map(|p| p.to_vec()));
        // What was dropped frees the sender's window as what was received does.
        received.store(got.len() + queue_drops(&b), Ordering::Relaxed);
    }
    let _pa = sender.join().unwrap();
    // Every flow of one size arrives in order. Small packets go ahead of bulk that came in
    // with them, and sealed, their flows cannot be told apart: a mixed flow's small packets
    // may overtake its large ones (see `gro::small_first`), but each kind keeps its order.
    let mut last: HashMap<(u16, bool), u32> = HashMap::new();
    for p in &got {
        let (flow, seq) = parse(p);
        let class = (flow, is_small(flow, seq));
        if let Some(&before) = last.get(&class) {
            assert!(seq > before, "flow {flow} out of order: {seq} after {before}");
        }
        last.insert(class, seq);
    }
    let mut seen: Vec<(u16, u32)> = got.iter().map(|p| parse(p)).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), got.len(), "no packet delivered twice");
    let dropped = queue_drops(&b);
    eprintln!("{} of {total} delivered, {dropped} dropped by CoDel", got.len());
    assert_eq!(got.len() + dropped, total, "every packet delivered or counted dropped");
    assert!(dropped * 100 <= total, "{dropped} dropped by CoDel of {total}");
    // Small packets are never dropped for the queue's delay.
    let small = (0..FLOWS).flat_map(|f| (0..PER_FLOW).map(move |q| (f, q))).filter(|&(f, q)| is_small(f, q));
    for (f, q) in small {
        assert!(seen.binary_search(&(f, q)).is_ok(), "small packet {f}/{q} lost");
    }

    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.io_per_worker.len(), 2);
    let (qa, qb) = (sa.in_process.clone().unwrap(), sb.in_process.clone().unwrap());
    for (i, w) in sa.io_per_worker.iter().enumerate() {
        assert!(qa.taken_per_worker[i] > 0 && w.udp_tx > 0, "A's worker {i} moved nothing: {w:?} {qa:?}");
    }
    assert_eq!(qa.sent, qa.taken_per_worker.iter().sum::<u64>());
    assert_eq!(sb.device.drops.total(), 0, "drops at B: {:?}", sb.device.drops);
    assert_eq!(qb.inbound_dropped, 0, "B's application queue overflowed: {qb:?}");
    assert_eq!(qb.delivered, got.len() as u64 + 1);
    assert_eq!(sb.peers[0].stats.rx_packets, got.len() as u64 + 1);
    // Pools start with what the backends keep posted and a turn's worth in flight, then
    // recycle: far fewer buffers allocated than packets moved.
    let packets = u64::from(FLOWS) * u64::from(PER_FLOW);
    for (side, n, first) in
        [("A", sa.buffers_allocated, prefilled[0]), ("B", sb.buffers_allocated, prefilled[1])]
    {
        eprintln!("{side}: {first} buffers prefilled, {} allocated since for {packets} packets", n - first);
        assert!(n - first < packets / 4, "{side} allocated {} buffers for {packets} packets", n - first);
    }
}

#[test]
fn many_flows_over_two_workers_uring() {
    many_flows_arrive_whole_and_in_order(BackendKind::Uring);
}

#[test]
fn many_flows_over_two_workers_mmsg() {
    many_flows_arrive_whole_and_in_order(BackendKind::Mmsg);
}

#[test]
fn a_new_listen_port_reaches_every_worker() {
    let ((a, pa), (b, pb)) = pair(BackendKind::Mmsg, 3);
    send(&pa, &packet(A, B, 0, 0));
    assert_eq!(receive(&pb, 1, Duration::from_secs(10)).len(), 1);
    let old = b.port();
    let new = b.set_listen_port(0).unwrap();
    assert_ne!(new, old);
    assert_eq!(b.port(), new);
    // A learns of the move from B's next packet (roaming), so B speaks first.
    send(&pb, &packet(B, A, 1, 1));
    assert_eq!(receive(&pa, 1, Duration::from_secs(10)).len(), 1, "B reaches A from its new port");
    for seq in 0..40 {
        send(&pa, &packet(A, B, seq as u16, seq));
    }
    assert_eq!(receive(&pb, 40, Duration::from_secs(10)).len(), 40, "A reaches B on its new port");
    let endpoint = a.stats().peers[0].endpoint.unwrap();
    assert_eq!(endpoint.port(), new);
}

#[test]
fn shutdown_stops_every_worker() {
    let ((a, _pa), (b, _pb)) = pair(BackendKind::Uring, 4);
    assert_eq!(a.workers(), 4);
    assert!(!a.is_stopped());
    a.shutdown();
    assert!(a.is_stopped());
    a.shutdown();
    drop(b);
}

#[test]
fn a_panicking_worker_stops_the_whole_link_loudly() {
    for backend in [BackendKind::Mmsg, BackendKind::Uring] {
        let ((a, _pa), (b, _pb)) = pair(backend, 2);
        assert!(!a.is_stopped() && a.failure().is_none());
        a.inject_worker_panic();
        let start = Instant::now();
        while !a.is_stopped() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{backend:?}: the link ran on after a worker panicked"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let failure = a.failure().expect("the failure is reported");
        assert!(failure.contains("panicked") && failure.contains("injected"), "{failure}");
        // The other link is untouched, and a clean shutdown reports no failure.
        assert!(!b.is_stopped());
        b.shutdown();
        assert!(b.is_stopped() && b.failure().is_none());
    }
}

#[test]
fn wait_stopped_returns_when_the_link_stops() {
    let ((a, _pa), (b, _pb)) = pair(BackendKind::Mmsg, 2);
    assert!(!a.wait_stopped(Some(Duration::from_millis(20))), "a running link is not stopped");
    let a = Arc::new(a);
    let stopper = {
        let a = Arc::clone(&a);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            a.shutdown();
        })
    };
    assert!(a.wait_stopped(Some(Duration::from_secs(5))), "shutdown from another thread ends the wait");
    stopper.join().unwrap();
    assert!(a.is_stopped() && a.failure().is_none());
    b.inject_worker_panic();
    assert!(b.wait_stopped(Some(Duration::from_secs(5))), "a failure ends the wait");
    assert!(b.failure().is_some());
}
