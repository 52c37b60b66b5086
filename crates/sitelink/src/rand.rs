//! The operating system's random generator for the engine.

use sitelink_crypto::Random;

/// [`Random`] from the operating system (`getrandom(2)`). Used for ephemeral keys, session
/// indices, cookie secrets and jitter: the handshake path, never per packet.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl Random for OsRandom {
    fn fill(&mut self, dest: &mut [u8]) {
        // The kernel's generator does not fail once seeded; if it ever does, going on with
        // predictable keys would be worse than stopping.
        getrandom::fill(dest).expect("the operating system's random generator failed");
    }
}
