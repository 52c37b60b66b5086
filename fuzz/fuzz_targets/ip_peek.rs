#![no_main]
//! The inner IPv4/IPv6 header peek over arbitrary bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = sitelink_frame::ip::peek(data) {
        assert!(p.total_len <= data.len());
    }
});
