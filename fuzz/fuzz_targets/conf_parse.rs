#![no_main]
//! The wg-quick configuration parser over arbitrary text (numeric endpoints only: nothing
//! here reaches the resolver or the network).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sitelink::conf::parse(text);
    }
});
