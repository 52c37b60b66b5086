#![no_main]
//! Engine decapsulation with an established session. The first byte picks how the input is
//! used: raw; XORed over a real transport message after its receiver index (so the open,
//! replay and source checks are reached); or as the payload of a packet node 0 really seals.
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use sitelink_frame::wire::MessageType;
use sitelink_fuzz::Scene;

static SCENE: Mutex<Option<Scene>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut guard = SCENE.lock().unwrap_or_else(|e| e.into_inner());
    let scene = guard.get_or_insert_with(|| Scene::new(true));
    match mode % 3 {
        0 => scene.deliver(1, rest),
        1 => {
            let Some(mut msg) = scene.first(MessageType::TransportData) else { return };
            for (i, b) in rest.iter().enumerate() {
                match msg.get_mut(8 + i) {
                    Some(m) => *m ^= b,
                    None => msg.push(*b),
                }
            }
            scene.deliver(1, &msg);
        }
        _ => {
            // A real sealed packet whose inner bytes are the input (behind a valid header).
            let dst = scene.net.nodes[1].inner;
            let payload = &rest[..rest.len().min(1300)];
            scene.net.send_to_ip(0, dst, payload);
            scene.net.run_for(std::time::Duration::from_millis(2));
            let _ = scene.net.take_delivered_packets(1);
        }
    }
});
