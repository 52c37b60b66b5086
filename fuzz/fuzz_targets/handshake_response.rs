#![no_main]
//! The initiator consuming responses to its pending initiation: arbitrary bytes framed as a
//! response naming the pending index, with a valid mac1, so the handshake's Diffie-Hellman
//! and decryption are reached.
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use sitelink_crypto::cookie::MacSealer;
use sitelink_frame::wire::{MessageType, RESPONSE_LEN, mac_offsets};
use sitelink_fuzz::Scene;

static SCENE: Mutex<Option<Scene>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut guard = SCENE.lock().unwrap_or_else(|e| e.into_inner());
    let scene = guard.get_or_insert_with(|| Scene::new(false));
    if mode % 2 == 0 {
        return scene.deliver(0, rest);
    }
    let Some(init) = scene.first(MessageType::HandshakeInitiation) else { return };
    let mut msg = vec![0u8; RESPONSE_LEN];
    for (m, b) in msg.iter_mut().zip(rest) {
        *m = *b;
    }
    msg[..4].copy_from_slice(&[2, 0, 0, 0]);
    msg[8..12].copy_from_slice(&init[4..8]); // receiver index: the pending handshake's
    let now = scene.net.now;
    let initiator = *scene.net.nodes[0].dev.public_key();
    MacSealer::new(&initiator).seal(now, &mut msg, mac_offsets::RESPONSE_MAC1);
    scene.deliver(0, &msg);
});
