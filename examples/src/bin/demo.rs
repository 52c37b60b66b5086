//! The sitelink demo: two links in one process, joined over loopback UDP, in the embedded
//! mode (the application writes IP packets into the link's own buffers and takes the opened
//! ones out, in batches, with no system call or copy between it and the workers; no TUN, no
//! root). Pushes traffic from site A to site B for a few seconds and prints the throughput as
//! it goes.
//!
//! `cargo run --release --bin demo [-- SECONDS]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BufMut;
use sitelink::{LinkBuilder, OsRandom, PeerConfig, PrivateKey};

/// Packets per batch, each way.
const BATCH: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);

    // Two sites, each with its own key; each knows the other's public key and inner address.
    let (key_a, key_b) = (PrivateKey::generate(&mut OsRandom), PrivateKey::generate(&mut OsRandom));
    let (pub_a, pub_b) = (key_a.public_key(), key_b.public_key());
    let (site_a, packets_a) = LinkBuilder::new(key_a).loopback_only(true).start_embedded()?;
    let (site_b, packets_b) = LinkBuilder::new(key_b).loopback_only(true).start_embedded()?;

    let mut b_seen_by_a = PeerConfig::new(pub_b);
    b_seen_by_a.endpoint = Some(([127, 0, 0, 1], site_b.port()).into());
    b_seen_by_a.allowed_ips = vec!["10.9.0.2/32".parse()?];
    site_a.set_peer(b_seen_by_a)?;
    let mut a_seen_by_b = PeerConfig::new(pub_a);
    a_seen_by_b.endpoint = Some(([127, 0, 0, 1], site_a.port()).into());
    a_seen_by_b.allowed_ips = vec!["10.9.0.1/32".parse()?];
    site_b.set_peer(a_seen_by_b)?;
    println!(
        "site A on udp/{}, site B on udp/{}, backend {}",
        site_a.port(),
        site_b.port(),
        site_a.backend().name()
    );

    // Site B's application: count the packets that come out of the tunnel, a batch at a time
    // (each is its pooled buffer; dropping it hands the buffer back to the link).
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (received, done) = (Arc::clone(&received), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            while !done.load(Ordering::Relaxed) {
                if packets_b.recv_batch(&mut batch, BATCH, Some(Duration::from_millis(200))).is_ok() {
                    let bytes: usize = batch.iter().map(|p| p.len()).sum();
                    received.fetch_add(bytes as u64, Ordering::Relaxed);
                    batch.clear();
                }
            }
        })
    };

    // Site A's application: write 1,400-byte UDP-in-IPv4 packets from 10.9.0.1 to 10.9.0.2
    // straight into the link's buffers (bytes::BufMut), a batch at a time; the workers seal
    // them where they lie. `send_batch` waits while the link's queues are full.
    let packet = ipv4_udp([10, 9, 0, 1], [10, 9, 0, 2], 1400 - 28);
    let start = Instant::now();
    let mut next_report = start + Duration::from_secs(1);
    let mut last_bytes = 0;
    let mut batch = Vec::with_capacity(BATCH);
    while start.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..BATCH {
            let mut out = packets_a.alloc();
            out.put_slice(&packet);
            batch.push(out);
        }
        packets_a.send_batch(&mut batch, None)?;
        if Instant::now() >= next_report {
            let bytes = received.load(Ordering::Relaxed);
            println!(
                "{:>4.1} s  {:>7.1} Mbit/s through the tunnel",
                start.elapsed().as_secs_f64(),
                (bytes - last_bytes) as f64 * 8e-6
            );
            last_bytes = bytes;
            next_report += Duration::from_secs(1);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    receiver.join().expect("receiver");

    let total = received.load(Ordering::Relaxed);
    let (a, b) = (site_a.stats(), site_b.stats());
    println!(
        "delivered {:.1} MB in {:.1} s: {:.1} Mbit/s; handshakes {}; A sent {} datagrams in {} send calls; drops at B: {:?}; B's queues: {:?}",
        total as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        total as f64 * 8e-6 / start.elapsed().as_secs_f64(),
        a.device.sessions_established,
        a.io.udp_tx,
        a.io.send_calls,
        b.device.drops,
        b.in_process,
    );
    if std::env::var_os("DEMO_DEBUG").is_some() {
        eprintln!("A: {a:#?}\nB: {b:#?}");
    }
    site_a.shutdown();
    site_b.shutdown();
    if total == 0 {
        return Err("no traffic made it through the tunnel".into());
    }
    Ok(())
}

/// An IPv4 packet carrying a UDP datagram of `payload` zero bytes (checksums left to zero,
/// which the receiving application here does not check).
fn ipv4_udp(src: [u8; 4], dst: [u8; 4], payload: usize) -> Vec<u8> {
    let total = 20 + 8 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&9000u16.to_be_bytes());
    p[22..24].copy_from_slice(&9000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    p
}
