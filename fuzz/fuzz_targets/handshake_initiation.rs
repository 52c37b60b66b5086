#![no_main]
//! The responder consuming initiations: arbitrary bytes framed as an initiation, with a valid
//! mac1 (an attacker knows the public key), so Diffie-Hellman and decryption are reached; or a
//! real initiation with bytes XORed in.
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use sitelink_crypto::cookie::MacSealer;
use sitelink_frame::wire::{INITIATION_LEN, MessageType, mac_offsets};
use sitelink_fuzz::Scene;

static SCENE: Mutex<Option<Scene>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut guard = SCENE.lock().unwrap_or_else(|e| e.into_inner());
    let scene = guard.get_or_insert_with(|| Scene::new(true));
    let mut msg = match mode % 3 {
        0 => return scene.deliver(1, rest),
        1 => scene.first(MessageType::HandshakeInitiation).unwrap_or_default(),
        _ => vec![0u8; INITIATION_LEN],
    };
    if msg.len() != INITIATION_LEN {
        return;
    }
    for (m, b) in msg[4..].iter_mut().zip(rest) {
        *m ^= b;
    }
    msg[..4].copy_from_slice(&[1, 0, 0, 0]);
    let now = scene.net.now;
    let responder = *scene.net.nodes[1].dev.public_key();
    MacSealer::new(&responder).seal(now, &mut msg, mac_offsets::INITIATION_MAC1);
    scene.deliver(1, &msg);
});
