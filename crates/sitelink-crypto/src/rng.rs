//! Randomness comes in through a trait, so that the crates without I/O make no syscall and
//! tests are deterministic.

/// A source of cryptographically secure random bytes.
///
/// Production code passes the operating system's generator (implemented in the crates that may
/// make syscalls); tests pass a seeded generator. Implementations must be CSPRNGs: ephemeral
/// keys, session indices, cookie secrets and nonces come from here.
pub trait Random {
    /// Fills `dest` with random bytes.
    fn fill(&mut self, dest: &mut [u8]);

    /// A random `u32`.
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        u32::from_le_bytes(b)
    }
}
