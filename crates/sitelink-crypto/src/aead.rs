//! ChaCha20-Poly1305 (ring) for transport messages, in place, with WireGuard's nonce layout;
//! and the single-use AEAD calls of the handshake.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use sitelink_frame::PacketBuf;
use sitelink_frame::wire::{TAG_LEN, padding_for};

/// The transport message's ciphertext did not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct OpenError;

/// A packet could not be sealed in its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The buffer lacks tailroom for padding and tag.
    #[error("not enough tailroom for padding and tag: have {have}, need {need}")]
    NoTailroom {
        /// Tailroom available.
        have: usize,
        /// Tailroom needed.
        need: usize,
    },
}

/// WireGuard's 96-bit nonce: four zero bytes, then the counter little-endian.
#[inline]
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// ring's ChaCha20-Poly1305 key, overwritten in place when dropped.
///
/// ring does not erase its keys: a dropped `LessSafeKey` leaves the ChaCha20 key words in
/// freed memory. ring's ChaCha20 key is not expanded (its `LessSafeKey` holds the 32 key bytes
/// and the algorithm), so writing a key of zeros over the value in place overwrites the
/// secret, and `black_box` keeps the compiler from dropping that write as dead. What this
/// cannot reach: copies ring or the compiler made on the stack while the key was built (moves
/// of the key value through `UnboundKey::new` and `LessSafeKey::new`), which later calls
/// overwrite in the normal course but nothing erases on purpose.
struct ErasingKey(LessSafeKey);

impl ErasingKey {
    fn new(bytes: &[u8; 32]) -> Self {
        ErasingKey(LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32 bytes is ChaCha20's key length"),
        ))
    }

    /// Overwrites the key in place with a key of zeros.
    fn erase(&mut self) {
        self.0 = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[0; 32]).expect("32-byte key"));
        std::hint::black_box(&self.0);
    }
}

impl Drop for ErasingKey {
    fn drop(&mut self) {
        self.erase();
    }
}

/// One direction's transport key.
///
/// The raw key bytes handed to [`TransportKey::new`] are the caller's to erase (the handshake
/// hands them over in `Zeroizing` wrappers); ring's copy is overwritten when the key is
/// dropped (see the README's note on key erasure for what is and is not erased).
pub struct TransportKey {
    key: ErasingKey,
}

impl std::fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransportKey(<redacted>)")
    }
}

impl TransportKey {
    /// A key from its 32 bytes.
    pub fn new(bytes: &[u8; 32]) -> Self {
        TransportKey { key: ErasingKey::new(bytes) }
    }

    /// Pads the packet in `buf` with zeros to a multiple of 16 (never past `mtu`), seals it in
    /// place under `counter` and appends the tag. The caller then prepends the header.
    #[inline]
    pub fn seal(&self, counter: u64, buf: &mut PacketBuf, mtu: usize) -> Result<(), SealError> {
        let len = buf.len();
        let pad = padding_for(len, mtu);
        if buf.tailroom() < pad + TAG_LEN {
            return Err(SealError::NoTailroom { have: buf.tailroom(), need: pad + TAG_LEN });
        }
        buf.extend(pad + TAG_LEN).expect("tailroom checked").fill(0);
        let (body, tag_out) = buf.data_mut().split_at_mut(len + pad);
        let tag = self
            .key
            .0
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), body)
            .expect("ChaCha20-Poly1305 seals any length a PacketBuf can hold");
        tag_out.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens `ciphertext` (sealed data then tag) in place under `counter` and returns the
    /// plaintext, which is padded: the inner IP header tells its true length.
    #[inline]
    pub fn open<'a>(&self, counter: u64, ciphertext: &'a mut [u8]) -> Result<&'a mut [u8], OpenError> {
        self.key.0.open_in_place(nonce(counter), Aad::empty(), ciphertext).map_err(|_| OpenError)
    }
}

/// Handshake AEAD: seals `plaintext` under `key` with nonce counter 0 and additional data `aad`,
/// writing ciphertext and tag into `out` (`plaintext.len() + 16` bytes).
pub(crate) fn seal_to(key: &[u8; 32], aad: &[u8], plaintext: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), plaintext.len() + TAG_LEN);
    let key = ErasingKey::new(key);
    let (body, tag_out) = out.split_at_mut(plaintext.len());
    body.copy_from_slice(plaintext);
    let tag =
        key.0.seal_in_place_separate_tag(nonce(0), Aad::from(aad), body).expect("short handshake field");
    tag_out.copy_from_slice(tag.as_ref());
}

/// Handshake AEAD: opens `sealed` (ciphertext then tag) under `key` with nonce counter 0 and
/// additional data `aad`, writing the plaintext into `out` (`sealed.len() - 16` bytes).
pub(crate) fn open_to(key: &[u8; 32], aad: &[u8], sealed: &[u8], out: &mut [u8]) -> Result<(), OpenError> {
    debug_assert_eq!(out.len() + TAG_LEN, sealed.len());
    // The longest sealed handshake field is the 48-byte encrypted static key.
    let mut work = [0u8; 64];
    let work = work.get_mut(..sealed.len()).ok_or(OpenError)?;
    work.copy_from_slice(sealed);
    let key = ErasingKey::new(key);
    let plain = key.0.open_in_place(nonce(0), Aad::from(aad), work).map_err(|_| OpenError)?;
    out.copy_from_slice(plain);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trips_with_padding() {
        let key = TransportKey::new(&[3; 32]);
        let mut buf = PacketBuf::from_slice(&[0xab; 21]);
        key.seal(9, &mut buf, 1420).unwrap();
        assert_eq!(buf.len(), 32 + TAG_LEN);
        let plain = key.open(9, buf.data_mut()).unwrap();
        assert_eq!(&plain[..21], &[0xab; 21]);
        assert_eq!(&plain[21..], &[0; 11]);
    }

    #[test]
    fn wrong_counter_key_or_bit_fails() {
        let key = TransportKey::new(&[3; 32]);
        let mut buf = PacketBuf::from_slice(&[1; 64]);
        key.seal(1, &mut buf, 1420).unwrap();
        let sealed = buf.data().to_vec();
        assert_eq!(key.open(2, &mut sealed.clone()), Err(OpenError));
        assert_eq!(TransportKey::new(&[4; 32]).open(1, &mut sealed.clone()), Err(OpenError));
        let mut flipped = sealed.clone();
        flipped[10] ^= 1;
        assert_eq!(key.open(1, &mut flipped), Err(OpenError));
        assert_eq!(key.open(1, &mut sealed.clone()[..15]), Err(OpenError));
    }

    #[test]
    fn keepalive_is_tag_only() {
        let key = TransportKey::new(&[5; 32]);
        let mut buf = PacketBuf::from_slice(&[]);
        key.seal(0, &mut buf, 1420).unwrap();
        assert_eq!(buf.len(), TAG_LEN);
        assert!(key.open(0, buf.data_mut()).unwrap().is_empty());
    }

    #[test]
    fn no_tailroom_is_an_error() {
        let key = TransportKey::new(&[5; 32]);
        let mut buf = PacketBuf::new(64 + 20, 64);
        buf.extend(17).unwrap();
        assert_eq!(key.seal(0, &mut buf, 1420), Err(SealError::NoTailroom { have: 3, need: 31 }));
    }

    #[test]
    fn erasing_overwrites_the_key_in_place() {
        // What Drop does: afterwards the same value seals as a key of zeros would, and what
        // the old key sealed no longer opens.
        let mut key = TransportKey::new(&[7; 32]);
        let mut sealed = PacketBuf::from_slice(&[1; 32]);
        key.seal(3, &mut sealed, 1420).unwrap();
        key.key.erase();
        assert_eq!(key.open(3, &mut sealed.data().to_vec()), Err(OpenError));
        let mut a = PacketBuf::from_slice(&[2; 16]);
        let mut b = PacketBuf::from_slice(&[2; 16]);
        key.seal(0, &mut a, 1420).unwrap();
        TransportKey::new(&[0; 32]).seal(0, &mut b, 1420).unwrap();
        assert_eq!(a.data(), b.data());
    }

    #[test]
    fn handshake_aead_binds_aad() {
        // seal_to/open_to must round trip and bind the additional data.
        let key = [9u8; 32];
        let mut out = [0u8; 28];
        seal_to(&key, b"aad", &[1; 12], &mut out);
        let mut back = [0u8; 12];
        open_to(&key, b"aad", &out, &mut back).unwrap();
        assert_eq!(back, [1; 12]);
        assert_eq!(open_to(&key, b"aaD", &out, &mut back), Err(OpenError));
    }
}
