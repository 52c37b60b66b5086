//! Known-answer vectors for every WireGuard construction in sitelink-crypto, computed by an
//! implementation sitelink did not write: `tests/vectors/generate.py`, which builds MAC1, MAC2,
//! the cookie reply, the whole Noise IKpsk2 handshake and the first transport messages from
//! the whitepaper on CPython's hashlib BLAKE2s (the reference C code), `hmac`, OpenSSL's X25519
//! and ChaCha20-Poly1305 (the `cryptography` package) and libsodium's XChaCha20-Poly1305
//! (PyNaCl). Its output is pasted below unchanged; run it again to check.
//!
//! A test between two sitelinks passes when both share a bug; these pin the bytes on the wire.

use std::net::SocketAddr;
use std::time::Instant;

use sitelink_crypto::cookie::{MacCheck, MacChecker, MacSealer};
use sitelink_crypto::noise::{self, Identity, PeerKeys};
use sitelink_crypto::{PresharedKey, PrivateKey, Random, Tai64N, TransportKey};
use sitelink_frame::PacketBuf;
use sitelink_frame::wire::{
    CookieReply, HandshakeInitiation, HandshakeResponse, INITIATION_LEN, RESPONSE_LEN, TRANSPORT_HEADER_LEN,
    mac_offsets,
};

// ---- Output of tests/vectors/generate.py ------------------------------------------------
const S_I: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
const S_R: &str = "c0de000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c5f";
const E_I: &str = "a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a85f";
const E_R: &str = "481717171717171717171717171717171717171717171717171717171717176e";
const PSK: &str = "6465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f80818283";
const TIMESTAMP: &str = "400000006553f10a07000000";
const COOKIE_SECRET: &str = "c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7";
const COOKIE_NONCE: &str = "303132333435363738393a3b3c3d3e3f4041424344454647";
const INITIATION: &str = "01000000443322113c56f976a937090263b8dc537af3dd5265f806f841719d3c9cfa6e345abb9e37d4bec9c3ae2bae943cbac2b2ff1b13d3e5e0071b2d3a9e27691568702a7429f065f1b7b6318ea83835e28dffd31e26cb7310a9eec285391b26a7b6948dfa7bf415de12b3fc291cc92c29fc3550294ceee11088e1d1266d6516aaf2c700000000000000000000000000000000";
const RESPONSE: &str = "020000008877665544332211296d82a3597d594123fbc783189bf4a6c0cf5d25c73ea3006c512a546d99a763ae95919346ed0565b5f9738bfc78f5370b5a358b6f774c9fb5c5567b35ffe13d00000000000000000000000000000000";
const T_SEND_I: &str = "68927202edf9d6e1b1e33e713ca613da1f9a9ba257f885984fff65845e181388";
const T_RECV_I: &str = "16c39455ce2e0d27767981aea0a127f6566801a5475323cd93e61c72e0e4e79e";
const KEEPALIVE: &str = "04000000887766550000000000000000b39602cef15bf257421cf975eb86f53d";
const DATA1: &str = "04000000887766550100000000000000b96e162b079bb2269db5d575a2530d3232be9e067d14088ae9d957844a5b05da2c1d555cd512e4662bea97d048a17752";
const COOKIE: &str = "dfb1628bbb53fabbed1048e959d4f4df";
const COOKIE_REPLY: &str = "0300000044332211303132333435363738393a3b3c3d3e3f40414243444546479bf97303c1c213d7ca7a89061f6ab61872615374fba2953bfbbbdb78e47a7415";
const INITIATION_WITH_MAC2: &str = "01000000443322113c56f976a937090263b8dc537af3dd5265f806f841719d3c9cfa6e345abb9e37d4bec9c3ae2bae943cbac2b2ff1b13d3e5e0071b2d3a9e27691568702a7429f065f1b7b6318ea83835e28dffd31e26cb7310a9eec285391b26a7b6948dfa7bf415de12b3fc291cc92c29fc3550294ceee11088e1d1266d6516aaf2c79025a99903cb0a4ba0c1eb77801922a8";
const MAC2_PADDED_KEY_WRONG: &str = "8550fff0433cfa90ec010016535a55d6";
// ------------------------------------------------------------------------------------------

/// The fixed inputs the generator used besides the keys.
const I_INDEX: u32 = 0x1122_3344;
const R_INDEX: u32 = 0x5566_7788;
const UNIX_SECS: u64 = 1_700_000_000;
const UNIX_NANOS: u32 = 123_456_789;
const SOURCE: &str = "192.0.2.1:51820";

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0);
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn key32(s: &str) -> [u8; 32] {
    unhex(s).try_into().unwrap()
}

/// Randomness that hands out the given bytes in order, and fails the test if asked for more.
struct Script(Vec<u8>);

impl Random for Script {
    fn fill(&mut self, dest: &mut [u8]) {
        assert!(self.0.len() >= dest.len(), "the code under test drew more randomness than scripted");
        let rest = self.0.split_off(dest.len());
        dest.copy_from_slice(&self.0);
        self.0 = rest;
    }
}

struct Ends {
    i: Identity,
    r: Identity,
    i_peer: PeerKeys,
    r_peer: PeerKeys,
}

fn ends() -> Ends {
    let i = Identity::new(PrivateKey::from_bytes(key32(S_I)));
    let r = Identity::new(PrivateKey::from_bytes(key32(S_R)));
    let psk = || PresharedKey::from_bytes(key32(PSK));
    Ends {
        i_peer: PeerKeys::new(&i, *r.public_key(), psk()),
        r_peer: PeerKeys::new(&r, *i.public_key(), psk()),
        i,
        r,
    }
}

#[test]
fn tai64n_matches() {
    assert_eq!(Tai64N::from_unix(UNIX_SECS, UNIX_NANOS).as_bytes().to_vec(), unhex(TIMESTAMP));
}

#[test]
fn whole_handshake_and_first_transport_messages_match() {
    let e = ends();
    let now = Instant::now();

    // Initiator: the initiation, sealed with mac1 and a zero mac2 (no cookie yet).
    let mut init = [0u8; INITIATION_LEN];
    let state = noise::initiate(
        &e.i,
        &e.i_peer,
        I_INDEX,
        Tai64N::from_unix(UNIX_SECS, UNIX_NANOS),
        &mut Script(unhex(E_I)),
        &mut HandshakeInitiation::new_unchecked(&mut init[..]),
    )
    .unwrap();
    MacSealer::new(e.r.public_key()).seal(now, &mut init, mac_offsets::INITIATION_MAC1);
    assert_eq!(init.to_vec(), unhex(INITIATION), "initiation");

    // Responder: consumes the reference initiation and answers with the reference response.
    let checker = MacChecker::new(&e.r);
    let src: SocketAddr = SOURCE.parse().unwrap();
    assert_eq!(checker.check(now, &unhex(INITIATION), mac_offsets::INITIATION_MAC1, src), MacCheck::Mac1);
    let reference = unhex(INITIATION);
    let msg = HandshakeInitiation::new_checked(&reference[..]).unwrap();
    let received = noise::consume_initiation(&e.r, &msg).unwrap().verify(&e.r_peer).unwrap();
    assert_eq!(received.timestamp().as_bytes().to_vec(), unhex(TIMESTAMP));
    assert_eq!(received.remote_index(), I_INDEX);
    let mut resp = [0u8; RESPONSE_LEN];
    let r_keys = received
        .respond(
            &e.r_peer,
            R_INDEX,
            &mut Script(unhex(E_R)),
            &mut HandshakeResponse::new_unchecked(&mut resp[..]),
        )
        .unwrap();
    MacSealer::new(e.i.public_key()).seal(now, &mut resp, mac_offsets::RESPONSE_MAC1);
    assert_eq!(resp.to_vec(), unhex(RESPONSE), "response");
    assert_eq!((*r_keys.send, *r_keys.recv), (key32(T_RECV_I), key32(T_SEND_I)), "responder's keys");

    // Initiator: the reference response yields the reference transport keys.
    let reference = unhex(RESPONSE);
    let i_keys = state
        .consume_response(&e.i, &e.i_peer, &HandshakeResponse::new_checked(&reference[..]).unwrap())
        .unwrap();
    assert_eq!((*i_keys.send, *i_keys.recv), (key32(T_SEND_I), key32(T_RECV_I)), "initiator's keys");
    assert_eq!((i_keys.local_index, i_keys.remote_index), (I_INDEX, R_INDEX));

    // Transport: the keepalive sealed here is the reference one; the reference data message
    // opens here to its padded payload.
    let send = TransportKey::new(&i_keys.send);
    let mut keepalive = PacketBuf::from_slice(&[]);
    send.seal(0, &mut keepalive, 1420).unwrap();
    assert_eq!(keepalive.data().to_vec(), unhex(KEEPALIVE)[TRANSPORT_HEADER_LEN..].to_vec(), "keepalive");
    let recv = TransportKey::new(&r_keys.recv);
    let mut data = unhex(DATA1);
    let plain = recv.open(1, &mut data[TRANSPORT_HEADER_LEN..]).unwrap();
    let mut expected: Vec<u8> = (0..20).collect();
    expected.resize(32, 0);
    assert_eq!(plain.to_vec(), expected);
}

#[test]
fn cookie_reply_and_mac2_match() {
    let e = ends();
    let now = Instant::now();
    let src: SocketAddr = SOURCE.parse().unwrap();

    // The responder under load answers the initiation with the reference cookie reply.
    let mut checker = MacChecker::new(&e.r);
    let init = unhex(INITIATION);
    let mac1: [u8; 16] = init[mac_offsets::INITIATION_MAC1..][..16].try_into().unwrap();
    let mut reply = [0u8; 64];
    let mut rng = Script([unhex(COOKIE_SECRET), unhex(COOKIE_NONCE)].concat());
    checker.cookie_reply(now, &mut rng, &mac1, I_INDEX, src, &mut CookieReply::new_unchecked(&mut reply[..]));
    assert_eq!(reply.to_vec(), unhex(COOKIE_REPLY), "cookie reply");

    // The initiator takes the cookie from it, and its next seal carries the reference mac2:
    // keyed BLAKE2s-128 with the 16-byte cookie as the key.
    let mut sealer = MacSealer::new(e.r.public_key());
    let mut msg: [u8; INITIATION_LEN] = init.clone().try_into().unwrap();
    sealer.seal(now, &mut msg, mac_offsets::INITIATION_MAC1);
    let reference = unhex(COOKIE_REPLY);
    sealer.consume_reply(now, &CookieReply::new_checked(&reference[..]).unwrap()).unwrap();
    assert!(sealer.has_fresh_cookie(now));
    sealer.seal(now, &mut msg, mac_offsets::INITIATION_MAC1);
    assert_eq!(msg.to_vec(), unhex(INITIATION_WITH_MAC2), "initiation with mac2");
    assert_eq!(&msg[mac_offsets::INITIATION_MAC1 + 16..], &unhex(INITIATION_WITH_MAC2)[132..]);
    let _ = COOKIE; // the cookie itself travels only encrypted; generate.py shows it for reference

    // The responder accepts the reference mac2 from that source only, and refuses the MAC
    // keyed with the cookie zero-extended to 32 bytes (a different MAC, which no other
    // WireGuard accepts).
    let with_mac2 = unhex(INITIATION_WITH_MAC2);
    assert_eq!(checker.check(now, &with_mac2, mac_offsets::INITIATION_MAC1, src), MacCheck::Mac1AndMac2);
    let elsewhere: SocketAddr = "192.0.2.1:51821".parse().unwrap();
    assert_eq!(checker.check(now, &with_mac2, mac_offsets::INITIATION_MAC1, elsewhere), MacCheck::Mac1);
    let mut padded = with_mac2.clone();
    padded[132..].copy_from_slice(&unhex(MAC2_PADDED_KEY_WRONG));
    assert_eq!(checker.check(now, &padded, mac_offsets::INITIATION_MAC1, src), MacCheck::Mac1);
}
