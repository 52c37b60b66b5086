//! The sliding replay window for transport counters (RFC 6479's bitmap scheme).
//!
//! A receiver accepts each counter at most once, and only counters no more than
//! [`WINDOW_SIZE`] - 1 behind the greatest accepted one. The bitmap is a ring of 64-bit words;
//! moving the window forward clears whole words, so each step costs O(words skipped), at most
//! the ring's size.

/// Counters at or past this are never accepted (WireGuard's REJECT_AFTER_MESSAGES).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

const WORD_BITS: u64 = 64;
const WORDS: usize = 64;
/// How far behind the greatest accepted counter a counter may be and still be accepted: the
/// ring's bits less one word (the word being refilled).
pub const WINDOW_SIZE: u64 = (WORDS as u64 - 1) * WORD_BITS;
const _: () = assert!(WINDOW_SIZE >= 2048, "the window must hold at least 2048 counters");

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// This counter was accepted before.
    #[error("counter already seen")]
    Duplicate,
    /// The counter is too far behind the window to tell.
    #[error("counter too old for the replay window")]
    TooOld,
    /// The counter is past the keypair's message limit.
    #[error("counter past REJECT_AFTER_MESSAGES")]
    Exhausted,
}

/// The replay window of one receiving keypair.
#[derive(Clone)]
pub struct ReplayWindow {
    /// One past the greatest accepted counter; 0 when none was accepted.
    next: u64,
    ring: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { next: 0, ring: [0; WORDS] }
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayWindow").field("next", &self.next).finish_non_exhaustive()
    }
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    fn slot(counter: u64) -> (usize, u64) {
        (((counter / WORD_BITS) % WORDS as u64) as usize, 1u64 << (counter % WORD_BITS))
    }

    /// Whether `counter` would be accepted, without marking it. Called before decryption to
    /// spare the work for an obvious replay; [`accept`](Self::accept) decides after.
    #[inline]
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(ReplayError::Exhausted);
        }
        if counter >= self.next {
            return Ok(());
        }
        if self.next - 1 - counter >= WINDOW_SIZE {
            return Err(ReplayError::TooOld);
        }
        let (word, bit) = Self::slot(counter);
        if self.ring[word] & bit != 0 { Err(ReplayError::Duplicate) } else { Ok(()) }
    }

    /// Accepts and marks `counter`, or refuses it. Call only once the packet has authenticated.
    #[inline]
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        if counter >= self.next {
            // Clear the words between the old greatest counter's word and the new one's.
            let old_word = if self.next == 0 { None } else { Some((self.next - 1) / WORD_BITS) };
            let new_word = counter / WORD_BITS;
            match old_word {
                Some(old) if new_word - old < WORDS as u64 => {
                    for w in old + 1..=new_word {
                        self.ring[(w % WORDS as u64) as usize] = 0;
                    }
                }
                Some(_) => self.ring = [0; WORDS],
                None => {}
            }
            self.next = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.ring[word] |= bit;
        Ok(())
    }

    /// One past the greatest accepted counter (0 when none was accepted).
    pub fn next_expected(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The plain model: a set of accepted counters and the rule in words.
    #[derive(Default)]
    struct Model {
        seen: BTreeSet<u64>,
        greatest: Option<u64>,
    }

    impl Model {
        fn accept(&mut self, c: u64) -> Result<(), ReplayError> {
            if c >= REJECT_AFTER_MESSAGES {
                return Err(ReplayError::Exhausted);
            }
            if let Some(g) = self.greatest
                && c < g
                && g - c >= WINDOW_SIZE
            {
                return Err(ReplayError::TooOld);
            }
            if !self.seen.insert(c) {
                return Err(ReplayError::Duplicate);
            }
            self.greatest = Some(self.greatest.map_or(c, |g| g.max(c)));
            Ok(())
        }
    }

    #[test]
    fn basic_sequence() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(0), Ok(()));
        assert_eq!(w.accept(0), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(2), Ok(()));
        assert_eq!(w.accept(1), Ok(()));
        assert_eq!(w.accept(1), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(2 + WINDOW_SIZE), Ok(()));
        assert_eq!(w.accept(3), Ok(()), "exactly WINDOW_SIZE - 1 behind");
        assert_eq!(w.accept(2), Err(ReplayError::TooOld));
        assert_eq!(w.accept(1_000_000), Ok(()));
        assert_eq!(w.accept(1_000_000 - WINDOW_SIZE + 1), Ok(()));
        assert_eq!(w.accept(1_000_000 - WINDOW_SIZE), Err(ReplayError::TooOld));
        assert_eq!(w.accept(REJECT_AFTER_MESSAGES), Err(ReplayError::Exhausted));
        assert_eq!(w.accept(REJECT_AFTER_MESSAGES - 1), Ok(()));
        assert_eq!(w.accept(u64::MAX), Err(ReplayError::Exhausted));
    }

    fn counters() -> impl Strategy<Value = Vec<u64>> {
        // Mostly near each other (reordering, duplicates), sometimes large jumps.
        proptest::collection::vec(
            prop_oneof![
                8 => 0u64..6000,
                1 => 0u64..200_000,
                1 => (REJECT_AFTER_MESSAGES - 10_000)..=u64::MAX,
            ],
            1..600,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_model(seq in counters()) {
            let mut w = ReplayWindow::new();
            let mut m = Model::default();
            for c in seq {
                let want = m.accept(c);
                prop_assert_eq!(w.check(c), want, "check of {}", c);
                prop_assert_eq!(w.accept(c), want, "counter {}", c);
            }
        }
    }
}
