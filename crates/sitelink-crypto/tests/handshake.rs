//! The handshake in both roles, end to end, with MACs and cookies.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sitelink_crypto::cookie::{MacCheck, MacChecker, MacSealer};
use sitelink_crypto::noise::{self, HandshakeError, Identity, PeerKeys};
use sitelink_crypto::primitives::hash;
use sitelink_crypto::{PresharedKey, PrivateKey, Random, Tai64N, TransportKey};
use sitelink_frame::PacketBuf;
use sitelink_frame::wire::{
    COOKIE_REPLY_LEN, CookieReply, HandshakeInitiation, HandshakeResponse, INITIATION_LEN, RESPONSE_LEN,
    mac_offsets,
};

/// Deterministic test randomness: BLAKE2s in counter mode.
struct TestRng(u64);

impl Random for TestRng {
    fn fill(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(32) {
            self.0 += 1;
            let block = hash(&[b"test rng", &self.0.to_le_bytes()]);
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }
}

struct Side {
    id: Identity,
    peer: PeerKeys,
}

fn pair(psk_a: PresharedKey, psk_b: PresharedKey) -> (Side, Side) {
    let a = Identity::new(PrivateKey::from_bytes([1; 32]));
    let b = Identity::new(PrivateKey::from_bytes([2; 32]));
    let a_peer = PeerKeys::new(&a, *b.public_key(), psk_a);
    let b_peer = PeerKeys::new(&b, *a.public_key(), psk_b);
    (Side { id: a, peer: a_peer }, Side { id: b, peer: b_peer })
}

fn handshake(
    a: &Side,
    b: &Side,
    rng: &mut TestRng,
) -> Result<(noise::SessionKeys, noise::SessionKeys), HandshakeError> {
    let mut init = [0u8; INITIATION_LEN];
    let state = noise::initiate(
        &a.id,
        &a.peer,
        0x1111,
        Tai64N::from_unix(1000, 0),
        rng,
        &mut HandshakeInitiation::new_unchecked(&mut init[..]),
    )?;
    let unverified = noise::consume_initiation(&b.id, &HandshakeInitiation::new_checked(&init[..]).unwrap())?;
    assert_eq!(unverified.remote_static(), a.id.public_key());
    let received = unverified.verify(&b.peer)?;
    assert_eq!(received.timestamp(), Tai64N::from_unix(1000, 0));
    assert_eq!(received.remote_index(), 0x1111);
    let mut resp = [0u8; RESPONSE_LEN];
    let b_keys =
        received.respond(&b.peer, 0x2222, rng, &mut HandshakeResponse::new_unchecked(&mut resp[..]))?;
    let a_keys =
        state.consume_response(&a.id, &a.peer, &HandshakeResponse::new_checked(&resp[..]).unwrap())?;
    Ok((a_keys, b_keys))
}

#[test]
fn both_roles_derive_matching_keys() {
    let psk = PresharedKey::from_bytes([9; 32]);
    let (a, b) = pair(psk.clone(), psk);
    let (ka, kb) = handshake(&a, &b, &mut TestRng(0)).unwrap();
    assert_eq!(*ka.send, *kb.recv);
    assert_eq!(*ka.recv, *kb.send);
    assert_ne!(*ka.send, *ka.recv);
    assert_eq!((ka.local_index, ka.remote_index, ka.initiator), (0x1111, 0x2222, true));
    assert_eq!((kb.local_index, kb.remote_index, kb.initiator), (0x2222, 0x1111, false));

    // And the keys carry data.
    let tx = TransportKey::new(&ka.send);
    let rx = TransportKey::new(&kb.recv);
    let mut buf = PacketBuf::from_slice(b"hello over the link");
    tx.seal(0, &mut buf, 1420).unwrap();
    assert_eq!(&rx.open(0, buf.data_mut()).unwrap()[..19], b"hello over the link");
}

#[test]
fn each_handshake_gives_fresh_keys() {
    let (a, b) = pair(PresharedKey::none(), PresharedKey::none());
    let mut rng = TestRng(0);
    let (k1, _) = handshake(&a, &b, &mut rng).unwrap();
    let (k2, _) = handshake(&a, &b, &mut rng).unwrap();
    assert_ne!(*k1.send, *k2.send);
}

#[test]
fn preshared_key_mismatch_fails_at_the_response() {
    let (a, b) = pair(PresharedKey::from_bytes([1; 32]), PresharedKey::from_bytes([2; 32]));
    assert_eq!(handshake(&a, &b, &mut TestRng(0)).err(), Some(HandshakeError::Decrypt));
}

#[test]
fn initiation_to_someone_else_does_not_decrypt() {
    let (a, _) = pair(PresharedKey::none(), PresharedKey::none());
    let mut init = [0u8; INITIATION_LEN];
    noise::initiate(
        &a.id,
        &a.peer,
        1,
        Tai64N::from_unix(1, 0),
        &mut TestRng(0),
        &mut HandshakeInitiation::new_unchecked(&mut init[..]),
    )
    .unwrap();
    let c = Identity::new(PrivateKey::from_bytes([3; 32]));
    let r = noise::consume_initiation(&c, &HandshakeInitiation::new_checked(&init[..]).unwrap());
    assert_eq!(r.err(), Some(HandshakeError::Decrypt));
}

#[test]
fn tampered_initiation_and_response_fail() {
    let (a, b) = pair(PresharedKey::none(), PresharedKey::none());
    let mut rng = TestRng(5);
    for byte in [10usize, 50, 100] {
        let mut init = [0u8; INITIATION_LEN];
        noise::initiate(
            &a.id,
            &a.peer,
            1,
            Tai64N::from_unix(1, 0),
            &mut rng,
            &mut HandshakeInitiation::new_unchecked(&mut init[..]),
        )
        .unwrap();
        init[byte] ^= 0x40;
        let r = noise::consume_initiation(&b.id, &HandshakeInitiation::new_checked(&init[..]).unwrap())
            .and_then(|u| u.verify(&b.peer));
        assert!(r.is_err(), "flipped byte {byte}");
    }
    // A forged response leaves the initiator's state usable for the genuine one.
    let mut init = [0u8; INITIATION_LEN];
    let state = noise::initiate(
        &a.id,
        &a.peer,
        1,
        Tai64N::from_unix(2, 0),
        &mut rng,
        &mut HandshakeInitiation::new_unchecked(&mut init[..]),
    )
    .unwrap();
    let received = noise::consume_initiation(&b.id, &HandshakeInitiation::new_checked(&init[..]).unwrap())
        .unwrap()
        .verify(&b.peer)
        .unwrap();
    let mut resp = [0u8; RESPONSE_LEN];
    received.respond(&b.peer, 7, &mut rng, &mut HandshakeResponse::new_unchecked(&mut resp[..])).unwrap();
    let mut forged = resp;
    forged[50] ^= 1;
    assert!(
        state
            .consume_response(&a.id, &a.peer, &HandshakeResponse::new_checked(&forged[..]).unwrap())
            .is_err()
    );
    assert!(
        state.consume_response(&a.id, &a.peer, &HandshakeResponse::new_checked(&resp[..]).unwrap()).is_ok()
    );
}

#[test]
fn mac1_mac2_and_cookie_reply() {
    let (a, b) = pair(PresharedKey::none(), PresharedKey::none());
    let t0 = Instant::now();
    let src: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let mut rng = TestRng(9);
    let mut sealer = MacSealer::new(b.id.public_key());
    let mut checker = MacChecker::new(&b.id);

    let mut init = [0u8; INITIATION_LEN];
    noise::initiate(
        &a.id,
        &a.peer,
        42,
        Tai64N::from_unix(1, 0),
        &mut rng,
        &mut HandshakeInitiation::new_unchecked(&mut init[..]),
    )
    .unwrap();
    sealer.seal(t0, &mut init, mac_offsets::INITIATION_MAC1);
    assert_eq!(checker.check(t0, &init, mac_offsets::INITIATION_MAC1, src), MacCheck::Mac1);
    assert_eq!(&init[mac_offsets::INITIATION_MAC2..], &[0; 16]);

    // Bad mac1 (tampered body) is caught before any DH.
    let mut bad = init;
    bad[20] ^= 1;
    assert_eq!(checker.check(t0, &bad, mac_offsets::INITIATION_MAC1, src), MacCheck::BadMac1);

    // Under load: the responder answers with a cookie; the initiator's next message carries mac2.
    let mut reply = [0u8; COOKIE_REPLY_LEN];
    checker.cookie_reply(
        t0,
        &mut rng,
        HandshakeInitiation::new_checked(&init[..]).unwrap().mac1(),
        42,
        src,
        &mut CookieReply::new_unchecked(&mut reply[..]),
    );
    let reply_view = CookieReply::new_checked(&reply[..]).unwrap();
    assert_eq!(reply_view.receiver_index(), 42);
    // A tampered reply is refused.
    let mut bad_reply = reply;
    bad_reply[40] ^= 1;
    assert!(sealer.consume_reply(t0, &CookieReply::new_checked(&bad_reply[..]).unwrap()).is_err());
    sealer.consume_reply(t0, &reply_view).unwrap();
    assert!(sealer.has_fresh_cookie(t0 + Duration::from_secs(100)));

    let t1 = t0 + Duration::from_secs(1);
    sealer.seal(t1, &mut init, mac_offsets::INITIATION_MAC1);
    assert_eq!(checker.check(t1, &init, mac_offsets::INITIATION_MAC1, src), MacCheck::Mac1AndMac2);
    // The cookie is bound to the source address and port.
    let other: SocketAddr = "192.0.2.1:51821".parse().unwrap();
    assert_eq!(checker.check(t1, &init, mac_offsets::INITIATION_MAC1, other), MacCheck::Mac1);
    // And expires with the secret.
    let late = t0 + Duration::from_secs(121);
    assert_eq!(checker.check(late, &init, mac_offsets::INITIATION_MAC1, src), MacCheck::Mac1);
    assert!(!sealer.has_fresh_cookie(t0 + Duration::from_secs(116)));
}

#[test]
fn unexpected_cookie_reply_is_refused() {
    let (_, b) = pair(PresharedKey::none(), PresharedKey::none());
    let mut sealer = MacSealer::new(b.id.public_key());
    let mut reply = [0u8; COOKIE_REPLY_LEN];
    CookieReply::new_unchecked(&mut reply[..]).init_header();
    assert!(sealer.consume_reply(Instant::now(), &CookieReply::new_checked(&reply[..]).unwrap()).is_err());
}
