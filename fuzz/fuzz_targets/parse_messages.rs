#![no_main]
//! Every wire view over arbitrary bytes: classification, checked constructors, accessors.
use libfuzzer_sys::fuzz_target;
use sitelink_frame::wire::{self, CookieReply, HandshakeInitiation, HandshakeResponse, TransportData};

fuzz_target!(|data: &[u8]| {
    let _ = wire::classify(data);
    if let Ok(m) = HandshakeInitiation::new_checked(data) {
        let _ = (m.sender_index(), m.ephemeral(), m.as_bytes().len());
    }
    if let Ok(m) = HandshakeResponse::new_checked(data) {
        let _ = (m.sender_index(), m.receiver_index(), m.ephemeral());
    }
    if let Ok(m) = CookieReply::new_checked(data) {
        let _ = m.receiver_index();
    }
    if let Ok(m) = TransportData::new_checked(data) {
        let _ = (m.receiver_index(), m.counter(), m.ciphertext().len());
    }
});
