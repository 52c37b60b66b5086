#![no_main]
//! The initiator consuming cookie replies naming its pending handshake.
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use sitelink_frame::wire::{COOKIE_REPLY_LEN, MessageType};
use sitelink_fuzz::Scene;

static SCENE: Mutex<Option<Scene>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = SCENE.lock().unwrap_or_else(|e| e.into_inner());
    let scene = guard.get_or_insert_with(|| Scene::new(false));
    let Some(init) = scene.first(MessageType::HandshakeInitiation) else { return };
    let mut msg = vec![0u8; COOKIE_REPLY_LEN];
    for (m, b) in msg.iter_mut().zip(data) {
        *m = *b;
    }
    msg[..4].copy_from_slice(&[3, 0, 0, 0]);
    msg[4..8].copy_from_slice(&init[4..8]);
    scene.deliver(0, &msg);
});
