#![no_main]
//! The UAPI `set=1` parser over arbitrary text.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sitelink::uapi::parse_set(text);
    }
});
