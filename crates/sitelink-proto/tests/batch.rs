//! The deferred data path: the device fills `CryptoBatch`es, other threads seal and open them
//! without the device, and the device completes them. What must hold: order within a batch,
//! each counter accepted once even when two batches carry it at the same time, nothing
//! delivered whose keypair went away in between, and every loss counted.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sitelink_frame::ip;
use sitelink_proto::sim::Net;
use sitelink_proto::{CryptoBatch, Datagram, Device, DropReason, PacketBuf};

/// Two devices with a session up both ways; returns the net (nodes 0 and 1).
fn established(seed: u64) -> Net {
    let mut net = Net::pair(seed);
    net.send(0, 1, b"hello");
    net.send(1, 0, b"hello");
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.take_delivered(1).len(), 1);
    assert_eq!(net.take_delivered(0).len(), 1);
    net
}

fn packets(dev: &mut Device, src: Ipv4Addr, dst: Ipv4Addr, range: std::ops::Range<u32>) -> Vec<PacketBuf> {
    range
        .map(|i| {
            let mut buf = dev.alloc_buf();
            let payload = [i.to_be_bytes().as_slice(), &[(i % 251) as u8; 300]].concat();
            let n = ip::build_ipv4(buf.spare_mut(), src, dst, 17, &payload).expect("fits");
            buf.set_len(n).expect("fits");
            buf
        })
        .collect()
}

fn seq_of(packet: &PacketBuf) -> u32 {
    // build_ipv4 writes a 20-byte header with no options.
    let body = &packet.data()[20..];
    u32::from_be_bytes(body[..4].try_into().unwrap())
}

/// Seals `n` packets from node 0 to node 1 with the crypto on another thread.
fn seal_elsewhere(
    net: &mut Net,
    range: std::ops::Range<u32>,
    from: SocketAddr,
    now: Instant,
) -> Vec<Datagram> {
    let (src, dst) = (net.nodes[0].inner, net.nodes[1].inner);
    let a = &mut net.nodes[0].dev;
    let mut pkts = packets(a, src, dst, range);
    let mut batch = CryptoBatch::with_capacity(64);
    let mut out = Vec::new();
    a.encapsulate_deferred(now, &mut pkts, &mut batch, &mut out);
    assert!(out.is_empty(), "a session is up: nothing but seals");
    assert!(pkts.is_empty());
    let mut sealed = std::thread::spawn(move || {
        let mut out = Vec::new();
        batch.run(&mut out);
        assert!(batch.is_empty());
        out
    })
    .join()
    .unwrap();
    for d in &mut sealed {
        d.addr = from;
    }
    sealed
}

#[test]
fn crypto_on_other_threads_keeps_order_and_delivers_everything() {
    let mut net = established(11);
    let now = net.now;
    let from = net.nodes[0].addr;
    let first = seal_elsewhere(&mut net, 0..64, from, now);
    let second = seal_elsewhere(&mut net, 64..128, from, now);
    assert_eq!((first.len(), second.len()), (64, 64));

    // Two batches opened at once on two threads, completed in turn.
    let b = &mut net.nodes[1].dev;
    let mut out = Vec::new();
    let mut batches = Vec::new();
    for mut dgrams in [first, second] {
        let mut batch = CryptoBatch::with_capacity(64);
        b.decapsulate_deferred(now, &mut dgrams, &mut batch, &mut out);
        assert_eq!(batch.opens_len(), 64);
        batches.push(batch);
    }
    let batches: Vec<CryptoBatch> = std::thread::scope(|s| {
        let handles: Vec<_> = batches
            .into_iter()
            .map(|mut batch| {
                s.spawn(move || {
                    let mut none = Vec::new();
                    batch.run(&mut none);
                    assert!(none.is_empty(), "opens send nothing");
                    batch
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut delivered = Vec::new();
    for mut batch in batches {
        assert!(batch.needs_completion());
        b.complete(now, &mut batch, &mut delivered, &mut out);
        assert!(batch.is_empty());
    }
    let seqs: Vec<u32> = delivered.iter().map(seq_of).collect();
    assert_eq!(seqs, (0..128).collect::<Vec<_>>());
    assert_eq!(b.stats().drops.total(), 0);
}

#[test]
fn a_counter_carried_by_two_batches_at_once_is_accepted_once() {
    let mut net = established(12);
    let now = net.now;
    let from = net.nodes[0].addr;
    let sealed = seal_elsewhere(&mut net, 0..8, from, now);
    let copy: Vec<Datagram> =
        sealed.iter().map(|d| Datagram { addr: d.addr, buf: PacketBuf::from_slice(d.buf.data()) }).collect();

    // Both copies pass the replay check before either is opened or completed.
    let b = &mut net.nodes[1].dev;
    let (mut out, mut delivered) = (Vec::new(), Vec::new());
    let (mut one, mut two) = (CryptoBatch::default(), CryptoBatch::default());
    b.decapsulate_deferred(now, &mut { sealed }, &mut one, &mut out);
    b.decapsulate_deferred(now, &mut { copy }, &mut two, &mut out);
    assert_eq!((one.opens_len(), two.opens_len()), (8, 8));
    one.run(&mut out);
    two.run(&mut out);
    b.complete(now, &mut two, &mut delivered, &mut out);
    b.complete(now, &mut one, &mut delivered, &mut out);
    assert_eq!(delivered.len(), 8, "each packet once");
    assert_eq!(b.stats().drops.get(DropReason::Replay), 8, "the copies counted as replays");
}

#[test]
fn a_message_whose_keypair_went_away_mid_batch_is_dropped_and_counted() {
    let mut net = established(13);
    let now = net.now;
    let from = net.nodes[0].addr;
    let mut sealed = seal_elsewhere(&mut net, 0..4, from, now);
    let b = &mut net.nodes[1].dev;
    let (mut out, mut delivered) = (Vec::new(), Vec::new());
    let mut batch = CryptoBatch::default();
    b.decapsulate_deferred(now, &mut sealed, &mut batch, &mut out);
    batch.run(&mut out);
    // The peer is removed (its keys erased) while the batch was out.
    let pid = b.peer_ids().next().unwrap();
    b.remove_peer(pid).unwrap();
    b.complete(now, &mut batch, &mut delivered, &mut out);
    assert!(delivered.is_empty());
    assert_eq!(b.stats().drops.get(DropReason::ExpiredKeypair), 4);
}

#[test]
fn complete_opens_what_run_did_not() {
    // A driver that skips `run` still gets its packets: `complete` opens them itself.
    let mut net = established(14);
    let now = net.now;
    let from = net.nodes[0].addr;
    let mut sealed = seal_elsewhere(&mut net, 0..5, from, now);
    let b = &mut net.nodes[1].dev;
    let (mut out, mut delivered) = (Vec::new(), Vec::new());
    let mut batch = CryptoBatch::default();
    b.decapsulate_deferred(now, &mut sealed, &mut batch, &mut out);
    b.complete(now, &mut batch, &mut delivered, &mut out);
    assert_eq!(delivered.iter().map(seq_of).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn a_tampered_message_in_a_batch_is_counted_and_the_rest_delivered() {
    let mut net = established(15);
    let now = net.now;
    let from = net.nodes[0].addr;
    let mut sealed = seal_elsewhere(&mut net, 0..6, from, now);
    let last = sealed[3].buf.len() - 1;
    sealed[3].buf.data_mut()[last] ^= 0x80;
    let b = &mut net.nodes[1].dev;
    let (mut out, mut delivered) = (Vec::new(), Vec::new());
    let mut batch = CryptoBatch::default();
    b.decapsulate_deferred(now, &mut sealed, &mut batch, &mut out);
    batch.run(&mut out);
    b.complete(now, &mut batch, &mut delivered, &mut out);
    assert_eq!(delivered.iter().map(seq_of).collect::<Vec<_>>(), vec![0, 1, 2, 4, 5]);
    assert_eq!(b.stats().drops.get(DropReason::DecryptFailed), 1);
}

#[test]
fn opens_shared_with_another_thread_deliver_in_their_place() {
    let mut net = established(16);
    let now = net.now;
    let from = net.nodes[0].addr;
    let mut sealed = seal_elsewhere(&mut net, 0..40, from, now);
    let b = &mut net.nodes[1].dev;
    let (mut out, mut delivered) = (Vec::new(), Vec::new());
    let mut batch = CryptoBatch::with_capacity(64);
    let mut spare = CryptoBatch::with_capacity(64);
    b.decapsulate_deferred(now, &mut sealed, &mut batch, &mut out);
    batch.share_opens(&mut spare, 15);
    assert_eq!((batch.opens_len(), spare.opens_len()), (25, 15));
    let mut spare = std::thread::spawn(move || {
        spare.run(&mut Vec::new());
        spare
    })
    .join()
    .unwrap();
    batch.run(&mut out);
    batch.take_back_opens(&mut spare);
    assert!(spare.is_empty());
    b.complete(now, &mut batch, &mut delivered, &mut out);
    assert_eq!(delivered.iter().map(seq_of).collect::<Vec<_>>(), (0..40).collect::<Vec<_>>());
    assert_eq!(b.stats().drops.total(), 0);

    // Taken back without anyone running them: they are opened then.
    let mut sealed = seal_elsewhere(&mut net, 40..50, from, now);
    let b = &mut net.nodes[1].dev;
    delivered.clear();
    b.decapsulate_deferred(now, &mut sealed, &mut batch, &mut out);
    batch.share_opens(&mut spare, 100);
    assert_eq!((batch.opens_len(), spare.opens_len()), (0, 10));
    batch.take_back_opens(&mut spare);
    batch.run(&mut out);
    b.complete(now, &mut batch, &mut delivered, &mut out);
    assert_eq!(delivered.iter().map(seq_of).collect::<Vec<_>>(), (40..50).collect::<Vec<_>>());
}
