//! Key types: private, public and preshared keys.
//!
//! Secrets ([`PrivateKey`], [`PresharedKey`]) are erased when dropped, never printed by `Debug`,
//! and compared in constant time. Every key reads and writes the two textual forms WireGuard
//! uses: base64 in configuration files and hexadecimal in the UAPI.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::Random;

/// Length of every key in bytes.
pub const KEY_LEN: usize = 32;

/// Why a textual key could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyParseError {
    /// Not valid base64, or not 32 bytes once decoded.
    #[error("not a base64-encoded 32-byte key")]
    Base64,
    /// Not 64 hexadecimal digits.
    #[error("not a 64-digit hexadecimal key")]
    Hex,
}

fn decode_base64(s: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyParseError> {
    // 32 bytes take 44 characters of padded base64; anything else is not a key.
    if s.len() != 44 {
        return Err(KeyParseError::Base64);
    }
    let mut out = Zeroizing::new([0u8; KEY_LEN + 2]);
    let n = BASE64.decode_slice(s.as_bytes(), &mut out[..]).map_err(|_| KeyParseError::Base64)?;
    if n != KEY_LEN {
        return Err(KeyParseError::Base64);
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&out[..KEY_LEN]);
    Ok(key)
}

fn encode_base64(key: &[u8; KEY_LEN]) -> String {
    BASE64.encode(key)
}

fn decode_hex(s: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyParseError> {
    let s = s.as_bytes();
    if s.len() != 2 * KEY_LEN {
        return Err(KeyParseError::Hex);
    }
    fn nibble(c: u8) -> Result<u8, KeyParseError> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(KeyParseError::Hex),
        }
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Ok(key)
}

fn encode_hex(key: &[u8; KEY_LEN]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * KEY_LEN);
    for b in key {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Implements the textual forms shared by all three key types.
macro_rules! text_forms {
    ($ty:ident) => {
        impl $ty {
            /// Reads the base64 form used in configuration files.
            pub fn from_base64(s: &str) -> Result<Self, KeyParseError> {
                Ok(Self::from_bytes(*decode_base64(s.trim())?))
            }

            /// Reads the hexadecimal form used by the UAPI.
            pub fn from_hex(s: &str) -> Result<Self, KeyParseError> {
                Ok(Self::from_bytes(*decode_hex(s.trim())?))
            }

            /// The base64 form used in configuration files.
            pub fn to_base64(&self) -> String {
                encode_base64(self.as_bytes())
            }

            /// The hexadecimal form used by the UAPI.
            pub fn to_hex(&self) -> String {
                encode_hex(self.as_bytes())
            }
        }
    };
}

/// A Curve25519 public key. Not secret: `Debug` shows its base64 form.
#[derive(Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PublicKey(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub(crate) fn to_dalek(self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

text_forms!(PublicKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A Curve25519 private key. Erased on drop; `Debug` prints no key material.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// Wraps raw bytes (clamping happens inside X25519, as RFC 7748 specifies).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PrivateKey(bytes)
    }

    /// A new random key.
    pub fn generate(rng: &mut dyn Random) -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rng.fill(&mut bytes);
        let key = PrivateKey(bytes);
        bytes.zeroize();
        key
    }

    /// The raw bytes. Handle with care.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// X25519 with `public`; `None` if the result is all zeros (a low-order point), which
    /// WireGuard rejects.
    pub fn diffie_hellman(&self, public: &PublicKey) -> Option<Zeroizing<[u8; KEY_LEN]>> {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        let shared = secret.diffie_hellman(&public.to_dalek());
        if !shared.was_contributory() {
            return None;
        }
        Some(Zeroizing::new(shared.to_bytes()))
    }
}

text_forms!(PrivateKey);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for PrivateKey {}

/// A symmetric preshared key mixed into the handshake (all zeros when none is configured).
/// Erased on drop; `Debug` prints no key material.
#[derive(Clone, Zeroize, ZeroizeOnDrop, Default)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    /// Wraps raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PresharedKey(bytes)
    }

    /// The all-zero key that stands for "no preshared key".
    pub fn none() -> Self {
        PresharedKey([0; KEY_LEN])
    }

    /// Whether this is the all-zero "no preshared key" key.
    pub fn is_none(&self) -> bool {
        self.0.ct_eq(&[0; KEY_LEN]).into()
    }

    /// A new random key.
    pub fn generate(rng: &mut dyn Random) -> Self {
        let mut key = PresharedKey([0; KEY_LEN]);
        rng.fill(&mut key.0);
        key
    }

    /// The raw bytes. Handle with care.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

text_forms!(PresharedKey);

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_none() { "PresharedKey(none)" } else { "PresharedKey(<redacted>)" })
    }
}

impl PartialEq for PresharedKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for PresharedKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7748_public_key() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let private =
            PrivateKey::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a").unwrap();
        assert_eq!(
            private.public_key().to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let bob_public =
            PublicKey::from_hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f").unwrap();
        assert_eq!(
            encode_hex(&private.diffie_hellman(&bob_public).unwrap()),
            "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
        );
    }

    #[test]
    fn low_order_point_is_rejected() {
        let private = PrivateKey::from_bytes([7; 32]);
        assert!(private.diffie_hellman(&PublicKey::from_bytes([0; 32])).is_none());
    }

    #[test]
    fn text_round_trips() {
        let k = PrivateKey::from_bytes(std::array::from_fn(|i| i as u8 * 7));
        assert_eq!(PrivateKey::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(PrivateKey::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(PrivateKey::from_hex(&k.to_hex().to_uppercase()).unwrap(), k);
        let p = k.public_key();
        assert_eq!(PublicKey::from_base64(&format!(" {}\n", p.to_base64())).unwrap(), p);
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyParseError::Base64));
        assert_eq!(PublicKey::from_base64(&"!".repeat(44)), Err(KeyParseError::Base64));
        assert_eq!(PublicKey::from_hex("zz"), Err(KeyParseError::Hex));
        assert_eq!(PublicKey::from_hex(&"g".repeat(64)), Err(KeyParseError::Hex));
        // 33 bytes of base64 (44 chars with one pad char is 32 bytes; 44 without is 33).
        assert!(PublicKey::from_base64(&"A".repeat(44)).is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let k = PrivateKey::from_bytes([0x41; 32]);
        let d = format!("{k:?}");
        assert!(!d.contains(&k.to_base64()) && !d.contains(&k.to_hex()) && !d.contains("41"));
        let psk = PresharedKey::from_bytes([0x42; 32]);
        assert_eq!(format!("{psk:?}"), "PresharedKey(<redacted>)");
        assert_eq!(format!("{:?}", PresharedKey::none()), "PresharedKey(none)");
    }

    #[test]
    fn zeroize_erases() {
        let mut k = PrivateKey::from_bytes([0x55; 32]);
        k.zeroize();
        assert_eq!(k.as_bytes(), &[0; 32]);
        let mut p = PresharedKey::from_bytes([0x55; 32]);
        p.zeroize();
        assert!(p.is_none());
    }
}
