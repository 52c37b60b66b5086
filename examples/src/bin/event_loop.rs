//! An embedded link driven by an async runtime: a UDP echo through the tunnel, in one process.
//!
//! Two sites over loopback. Site B's application is a tokio task that waits on the link's
//! readiness descriptor ([`tokio::io::unix::AsyncFd`] over [`sitelink::PacketQueues`]), takes
//! the opened packets in batches, and answers every UDP datagram to port 7 with the same
//! payload. Site A's application, another task, sends numbered requests and checks each echo.
//! No thread blocks on the link: this is the integration an application with its own event
//! loop (tokio, mio, plain epoll) writes.
//!
//! `cargo run --release --bin event_loop [-- REQUESTS]`

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::BufMut;
use sitelink::{InPacket, LinkBuilder, OsRandom, PacketQueues, PeerConfig, PrivateKey};
use sitelink_frame::ip;
use tokio::io::unix::AsyncFd;

const A: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
const ECHO_PORT: u16 = 7;

/// Writes an IPv4/UDP packet into a buffer of the link and returns it.
fn udp_packet(
    queues: &PacketQueues,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> sitelink::OutPacket {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.put_u16(src.1);
    udp.put_u16(dst.1);
    udp.put_u16((8 + payload.len()) as u16);
    udp.put_u16(0); // no UDP checksum (allowed over IPv4)
    udp.put_slice(payload);
    let mut out = queues.alloc();
    let n = ip::build_ipv4(out.spare_mut(), src.0, dst.0, 17, &udp).expect("fits the MTU");
    out.set_len(n).expect("fits the MTU");
    out
}

/// An IPv4 address and UDP port.
type UdpAddr = (Ipv4Addr, u16);

/// (source, destination, payload) of an IPv4/UDP packet, if it is one.
fn parse_udp(p: &[u8]) -> Option<(UdpAddr, UdpAddr, &[u8])> {
    if p.len() < 28 || p[0] != 0x45 || p[9] != 17 {
        return None;
    }
    let addr = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
    let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    let end = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    Some(((addr(12), port(20)), (addr(16), port(22)), &p[28..end]))
}

/// Registers the link's readiness descriptor with tokio's reactor.
fn watch(queues: PacketQueues) -> std::io::Result<AsyncFd<PacketQueues>> {
    // tokio deprecates `AsyncFd::new` for types whose descriptor might change or close while
    // registered, in favour of `AsyncFd::register`, whose caller must vouch for that; this
    // project keeps such code in sitelink-io. `PacketQueues` owns its eventfd, returns the
    // same one from every `as_raw_fd`, and closes it only when dropped, which the `AsyncFd`
    // that owns it does after deregistering: the condition tokio asks for holds.
    #[allow(deprecated)]
    AsyncFd::new(queues)
}

/// Waits until the link has opened packets and takes up to 64 (at least one).
async fn recv(fd: &AsyncFd<PacketQueues>, batch: &mut Vec<InPacket>) -> std::io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        // WouldBlock clears the readiness: tokio then waits on the descriptor again.
        match guard.try_io(|q| q.get_ref().recv_batch(batch, 64, Some(Duration::ZERO))) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// Site B's application: echoes UDP datagrams to port 7 until the link stops.
async fn echo_server(fd: AsyncFd<PacketQueues>) -> std::io::Result<u64> {
    let (mut batch, mut replies, mut echoed) = (Vec::with_capacity(64), Vec::with_capacity(64), 0);
    loop {
        if let Err(e) = recv(&fd, &mut batch).await {
            return if e.kind() == std::io::ErrorKind::BrokenPipe { Ok(echoed) } else { Err(e) };
        }
        for packet in batch.drain(..) {
            if let Some((src, dst, payload)) = parse_udp(&packet)
                && dst.1 == ECHO_PORT
            {
                replies.push(udp_packet(fd.get_ref(), dst, src, payload));
                echoed += 1;
            }
        }
        // Zero timeout: an event loop must not block; a full queue would drop the replies
        // (a UDP echo may), and say so.
        if let Err(e) = fd.get_ref().send_batch(&mut replies, Some(Duration::ZERO)) {
            eprintln!("echo: {} replies dropped ({e})", replies.len());
            replies.clear();
        }
    }
}

/// Site A's application: `requests` numbered requests, one at a time; returns the round trips.
async fn client(fd: AsyncFd<PacketQueues>, requests: u32) -> Result<Vec<Duration>, String> {
    let mut batch = Vec::with_capacity(64);
    let mut rtts = Vec::with_capacity(requests as usize);
    for seq in 0..requests {
        let payload = format!("request {seq}");
        let sent = Instant::now();
        let request = udp_packet(fd.get_ref(), (A, 40_000), (B, ECHO_PORT), payload.as_bytes());
        fd.get_ref().send_batch(&mut vec![request], Some(Duration::ZERO)).map_err(|e| e.to_string())?;
        // The first request waits for the handshake too.
        let echoed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                recv(&fd, &mut batch).await?;
                for packet in batch.drain(..) {
                    if parse_udp(&packet).is_some_and(|(_, _, p)| p == payload.as_bytes()) {
                        return Ok::<(), std::io::Error>(());
                    }
                }
            }
        })
        .await;
        match echoed {
            Ok(Ok(())) => rtts.push(sent.elapsed()),
            Ok(Err(e)) => return Err(format!("request {seq}: {e}")),
            Err(_) => return Err(format!("request {seq}: no echo within 10 s")),
        }
    }
    Ok(rtts)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let requests: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let (key_a, key_b) = (PrivateKey::generate(&mut OsRandom), PrivateKey::generate(&mut OsRandom));
    let (pub_a, pub_b) = (key_a.public_key(), key_b.public_key());
    let (site_a, packets_a) = LinkBuilder::new(key_a).loopback_only(true).start_embedded()?;
    let (site_b, packets_b) = LinkBuilder::new(key_b).loopback_only(true).start_embedded()?;
    let mut b_seen_by_a = PeerConfig::new(pub_b);
    b_seen_by_a.endpoint = Some(([127, 0, 0, 1], site_b.port()).into());
    b_seen_by_a.allowed_ips = vec![format!("{B}/32").parse()?];
    site_a.set_peer(b_seen_by_a)?;
    let mut a_seen_by_b = PeerConfig::new(pub_a);
    a_seen_by_b.endpoint = Some(([127, 0, 0, 1], site_a.port()).into());
    a_seen_by_b.allowed_ips = vec![format!("{A}/32").parse()?];
    site_b.set_peer(a_seen_by_b)?;

    // One runtime thread runs both applications.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    let (rtts, echoed) = runtime.block_on(async {
        let server = tokio::spawn(echo_server(watch(packets_b)?));
        let rtts = client(watch(packets_a)?, requests).await;
        site_b.shutdown(); // the server's next receive answers BrokenPipe
        let echoed = server.await.map_err(std::io::Error::other)??;
        Ok::<_, std::io::Error>((rtts, echoed))
    })?;
    let mut rtts = rtts?;
    let first = rtts[0];
    rtts.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{requests} UDP echoes through the tunnel under tokio: first (with the handshake) {:.0} us; \
         then median {:.0} us, p99 {:.0} us; the server echoed {echoed}",
        us(first),
        us(rtts[rtts.len() / 2]),
        us(rtts[rtts.len() * 99 / 100]),
    );
    site_a.shutdown();
    if echoed != u64::from(requests) {
        return Err(format!("{requests} requests, {echoed} echoed").into());
    }
    Ok(())
}
