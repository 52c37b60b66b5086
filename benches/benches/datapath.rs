//! The per-packet path against ring's bare ChaCha20-Poly1305 on the same bytes:
//! `cargo bench -p sitelink-benches --bench datapath`.
//!
//! * `seal/{ring,sitelink}/N`: ring's `seal_in_place_separate_tag` on N bytes, next to
//!   sitelink-crypto's `TransportKey::seal` (padding, tag) on an N-byte packet.
//! * `open/{ring,sitelink}/N`: the same for opening.
//! * `engine/encapsulate` and `engine/decapsulate`: the whole engine per 1420-byte packet in
//!   batches of 64 (routing, counters, seal or open, replay window, source check, stats),
//!   next to `engine/ring_seal` and `engine/ring_open` measured the same way.
//! * `workers/encapsulate/{1,2}`: wall time per packet with one or two threads sharing one
//!   engine behind a mutex, sealing outside it, as a link's workers do; and
//!   `workers/encapsulate_under_lock/2`, the control, sealing inside it.
//! * `frame/*`: message classification and inner IP peek.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use sitelink_benches::{Established, fill_packet};
use sitelink_crypto::TransportKey;
use sitelink_frame::{DEFAULT_HEADROOM, Datagram, PacketBuf, ip, wire};
use sitelink_proto::{AllowedIps, IpNet};

const SIZES: [usize; 4] = [64, 512, 1420, 8192];
const BATCH: usize = 64;

fn ring_key() -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7; 32]).expect("key"))
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn seal_open(c: &mut Criterion) {
    let ring = ring_key();
    let ours = TransportKey::new(&[7; 32]);
    let mut g = c.benchmark_group("seal");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let mut bytes = vec![0u8; size];
        let mut counter = 0u64;
        g.bench_with_input(BenchmarkId::new("ring", size), &size, |b, _| {
            b.iter(|| {
                counter += 1;
                black_box(
                    ring.seal_in_place_separate_tag(nonce(counter), Aad::empty(), &mut bytes).expect("seal"),
                )
            })
        });
        let mut buf = PacketBuf::new(DEFAULT_HEADROOM + size + 64, DEFAULT_HEADROOM);
        g.bench_with_input(BenchmarkId::new("sitelink", size), &size, |b, _| {
            b.iter(|| {
                counter += 1;
                buf.reset(DEFAULT_HEADROOM);
                buf.set_len(size).expect("fits");
                ours.seal(counter, &mut buf, usize::MAX).expect("seal");
                black_box(buf.len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("open");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let mut sealed = vec![0u8; size];
        let tag = ring.seal_in_place_separate_tag(nonce(1), Aad::empty(), &mut sealed).expect("seal");
        sealed.extend_from_slice(tag.as_ref());
        let mut work = sealed.clone();
        // Both variants restore the ciphertext before each open (a copy of the same length),
        // so the copy cancels out of the comparison.
        g.bench_with_input(BenchmarkId::new("ring", size), &size, |b, _| {
            b.iter(|| {
                work.copy_from_slice(&sealed);
                black_box(ring.open_in_place(nonce(1), Aad::empty(), &mut work).expect("open").len())
            })
        });
        g.bench_with_input(BenchmarkId::new("sitelink", size), &size, |b, _| {
            b.iter(|| {
                work.copy_from_slice(&sealed);
                black_box(ours.open(1, &mut work).expect("open").len())
            })
        });
    }
    g.finish();
}

fn engine(c: &mut Criterion) {
    const LEN: usize = 1420;
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Bytes(LEN as u64));

    // Bare ring, measured as the engine is: batches of 64 separate buffers.
    let ring = ring_key();
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; LEN + 16]).collect();
    let mut counter = 0u64;
    g.bench_function("ring_seal", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH as u64) as usize;
                let t = Instant::now();
                for buf in &mut bufs[..n] {
                    counter += 1;
                    let tag = ring
                        .seal_in_place_separate_tag(nonce(counter), Aad::empty(), &mut buf[..LEN])
                        .expect("seal");
                    buf[LEN..].copy_from_slice(tag.as_ref());
                }
                total += t.elapsed();
                left -= n as u64;
            }
            total
        })
    });
    let sealed: Vec<Vec<u8>> = (0..BATCH as u64)
        .map(|i| {
            let mut v = vec![0u8; LEN];
            let tag = ring.seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut v).expect("seal");
            v.extend_from_slice(tag.as_ref());
            v
        })
        .collect();
    g.bench_function("ring_open", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH as u64) as usize;
                for (w, s) in bufs.iter_mut().zip(&sealed).take(n) {
                    w.copy_from_slice(s);
                }
                let t = Instant::now();
                for (i, w) in bufs.iter_mut().enumerate().take(n) {
                    black_box(ring.open_in_place(nonce(i as u64), Aad::empty(), w).expect("open"));
                }
                total += t.elapsed();
                left -= n as u64;
            }
            total
        })
    });

    let mut est = Established::new();
    let (src, dst) = est.inner;
    let addr_a = est.addr_a;
    let now = est.now();
    let mut packets: Vec<PacketBuf> = Vec::with_capacity(BATCH);
    let mut out: Vec<Datagram> = Vec::with_capacity(BATCH * 2);
    let mut delivered: Vec<PacketBuf> = Vec::with_capacity(BATCH * 2);
    let mut replies: Vec<Datagram> = Vec::with_capacity(BATCH * 2);
    g.bench_function("encapsulate", |b| {
        b.iter_custom(|iters| {
            let (a, _) = est.devices();
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH as u64) as usize;
                for _ in 0..n {
                    let mut buf = a.alloc_buf();
                    fill_packet(&mut buf, DEFAULT_HEADROOM, src, dst, LEN);
                    packets.push(buf);
                }
                let t = Instant::now();
                a.encapsulate(now, &mut packets, &mut out);
                total += t.elapsed();
                for d in out.drain(..) {
                    a.recycle(d.buf);
                }
                left -= n as u64;
            }
            total
        })
    });
    g.bench_function("decapsulate", |b| {
        b.iter_custom(|iters| {
            let (a, bdev) = est.devices();
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH as u64) as usize;
                for _ in 0..n {
                    let mut buf = a.alloc_buf();
                    fill_packet(&mut buf, DEFAULT_HEADROOM, src, dst, LEN);
                    packets.push(buf);
                }
                a.encapsulate(now, &mut packets, &mut out);
                for d in &mut out {
                    d.addr = addr_a;
                }
                let t = Instant::now();
                bdev.decapsulate(now, &mut out, &mut delivered, &mut replies);
                total += t.elapsed();
                assert_eq!(delivered.len(), n, "all delivered");
                for p in delivered.drain(..) {
                    a.recycle(p);
                }
                for d in replies.drain(..) {
                    bdev.recycle(d.buf);
                }
                left -= n as u64;
            }
            total
        })
    });
    g.finish();
}

/// `workers/encapsulate/N`: wall time per 1420-byte packet when N threads encapsulate through
/// one engine behind a mutex, as a link's workers do: each takes the lock to route and take
/// counters (`encapsulate_deferred`), then seals its batch without it (`CryptoBatch::run`).
/// With the AEAD outside the lock, two threads on two idle cores approach half the time of one.
fn workers(c: &mut Criterion) {
    let mut g = c.benchmark_group("workers");
    g.throughput(Throughput::Elements(1));
    let mut est = Established::new();
    let (src, dst) = est.inner;
    let now = est.now();
    const LEN: usize = 1420;
    let engine = std::sync::Mutex::new(est.net.nodes.swap_remove(0).dev);
    // The control, `under_lock`: the same work with the seal inside the lock, as before the
    // engine handed the AEAD out; two threads then take turns instead of overlapping.
    for (name, threads, under_lock) in
        [("encapsulate", 1usize, false), ("encapsulate", 2, false), ("encapsulate_under_lock", 2, true)]
    {
        g.bench_function(BenchmarkId::new(name, threads), |b| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(threads as u64);
                let start = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(|| {
                            let mut pool = engine.lock().expect("engine").pool_mut().clone_empty();
                            let mut batch = sitelink_proto::CryptoBatch::with_capacity(BATCH);
                            let mut packets: Vec<PacketBuf> = Vec::with_capacity(BATCH);
                            let mut out: Vec<Datagram> = Vec::with_capacity(BATCH * 2);
                            let mut left = per_thread;
                            while left > 0 {
                                let n = left.min(BATCH as u64) as usize;
                                for _ in 0..n {
                                    let mut buf = pool.get();
                                    fill_packet(&mut buf, DEFAULT_HEADROOM, src, dst, LEN);
                                    packets.push(buf);
                                }
                                let mut dev = engine.lock().expect("engine");
                                dev.encapsulate_deferred(now, &mut packets, &mut batch, &mut out);
                                if !under_lock {
                                    drop(dev);
                                    batch.run(&mut out);
                                } else {
                                    batch.run(&mut out);
                                    drop(dev);
                                }
                                for d in out.drain(..) {
                                    pool.put(d.buf);
                                }
                                left -= n as u64;
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let mut msg = vec![0u8; 1452];
    wire::write_transport_header((&mut msg[..16]).try_into().expect("16"), 7, 9);
    g.bench_function("classify_transport", |b| b.iter(|| black_box(wire::classify(black_box(&msg)))));
    let mut pkt = vec![0u8; 1420];
    ip::build_ipv4(&mut pkt, [10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 6, &[0; 1400]).expect("pkt");
    g.bench_function("ip_peek_v4", |b| b.iter(|| black_box(ip::peek(black_box(&pkt)))));
    // The Internet checksum over a 1,400-byte segment: the fast sum (little-endian words into
    // sixteen 32-bit lanes, which the compiler vectorizes) against the plain 16-bit loop of
    // RFC 1071.
    let seg: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    g.throughput(Throughput::Bytes(seg.len() as u64));
    g.bench_function("csum_1400", |b| {
        b.iter(|| {
            black_box(sitelink_frame::offload::csum::finish(sitelink_frame::offload::csum::add(
                0,
                black_box(&seg),
            )))
        })
    });
    g.bench_function("csum_1400_rfc1071_loop", |b| {
        b.iter(|| {
            let bytes = black_box(&seg);
            let mut sum: u32 =
                bytes.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            black_box(!(sum as u16))
        })
    });
    g.finish();
}

/// Cryptokey routing, the per-packet lookup that grows with a hub's configuration: one /32 per
/// peer for 1, 1,000 and 10,000 peers (spread over a /16, as a hub's sites would be), looked
/// up in a pseudo-random order that defeats the cache as a busy hub's traffic would.
fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for peers in [1u32, 1_000, 10_000] {
        let mut table = AllowedIps::new();
        let addr = |i: u32| std::net::Ipv4Addr::from(0x0a64_0000 | (i.wrapping_mul(40_503) & 0xffff));
        for i in 0..peers {
            table.insert(IpNet::new(addr(i).into(), 32).expect("prefix"), i);
        }
        table.insert(IpNet::new(std::net::Ipv4Addr::new(10, 0, 0, 0).into(), 8).expect("prefix"), u32::MAX);
        let probes: Vec<std::net::IpAddr> =
            (0..4096u32).map(|k| addr(k.wrapping_mul(7919) % peers).into()).collect();
        g.throughput(Throughput::Elements(probes.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(peers), |b| {
            b.iter(|| {
                let mut hits = 0u32;
                for ip in &probes {
                    hits = hits.wrapping_add(black_box(table.lookup(*ip)).unwrap_or(0));
                }
                hits
            })
        });
    }
    g.finish();
}

criterion_group!(benches, seal_open, engine, workers, frame, routing);
criterion_main!(benches);
