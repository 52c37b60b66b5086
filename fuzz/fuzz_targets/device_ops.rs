#![no_main]
//! Stateful: two devices driven by a fuzzer-chosen sequence of operations (peers removed and
//! added, both sides initiating at once, time jumps, lossy spells, roaming, and replays,
//! mutations and misdeliveries of every datagram seen on the wire, old receiver indices
//! included). `sitelink_proto::sim::run_script` checks both devices' bookkeeping after every
//! step; a panic or an inconsistency is a crash. The same driver runs as a property test in
//! crates/sitelink-proto/tests/sim.rs.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Bounded work per input: a script of at most 512 operations.
    sitelink_proto::sim::run_script(&data[..data.len().min(1024)]);
});
