//! WireGuard's hash-based primitives: HASH, MAC, HMAC and KDF1..3 (WireGuard whitepaper,
//! section 5.4), built on the `blake2` and `hmac` crates.

use blake2::digest::consts::U16;
use blake2::digest::{Digest, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac};
use hmac::SimpleHmac;
use zeroize::Zeroizing;

type HmacBlake2s = SimpleHmac<Blake2s256>;

/// `LABEL_MAC1`: hashed with the receiver's public key into MAC1's key.
pub const LABEL_MAC1: &[u8] = b"mac1----";
/// `LABEL_COOKIE`: hashed with the receiver's public key into the cookie reply's key.
pub const LABEL_COOKIE: &[u8] = b"cookie--";

/// 32 secret bytes, erased on drop.
pub type Secret32 = Zeroizing<[u8; 32]>;

/// `HASH(a || b || ...)`: BLAKE2s with a 32-byte output.
pub fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// `MAC(key, a || b || ...)`: keyed BLAKE2s with a 16-byte output, the key used at its own
/// length: 32 bytes for MAC1's key (a HASH), 16 for a cookie (MAC2). Keyed BLAKE2s writes the
/// key length into its parameter block, so a key padded to another length is another MAC.
pub fn mac<const N: usize>(key: &[u8; N], parts: &[&[u8]]) -> [u8; 16] {
    const { assert!(N >= 1 && N <= 32, "keyed BLAKE2s takes 1 to 32 key bytes") };
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("1 to 32 key bytes, checked above");
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// `HMAC(key, a || b || ...)`: HMAC over BLAKE2s-256 (64-byte block).
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <HmacBlake2s as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        Mac::update(&mut m, p);
    }
    Zeroizing::new(m.finalize().into_bytes().into())
}

/// `KDFn(key, input)` for n = 1..=3: `t0 = HMAC(key, input)`, `t1 = HMAC(t0, 0x1)`,
/// `ti = HMAC(t0, t(i-1) || i)`. Returns `t1..tn`.
fn kdf<const N: usize>(key: &[u8; 32], input: &[u8]) -> [Zeroizing<[u8; 32]>; N] {
    let t0 = hmac(key, &[input]);
    let mut out: [Zeroizing<[u8; 32]>; N] = std::array::from_fn(|_| Zeroizing::new([0u8; 32]));
    let mut prev: Option<Zeroizing<[u8; 32]>> = None;
    for (i, slot) in out.iter_mut().enumerate() {
        let counter = [i as u8 + 1];
        let t = match &prev {
            None => hmac(&t0[..], &[&counter]),
            Some(p) => hmac(&t0[..], &[&p[..], &counter]),
        };
        **slot = *t;
        prev = Some(t);
    }
    out
}

/// `KDF1(key, input)`.
pub fn kdf1(key: &[u8; 32], input: &[u8]) -> Zeroizing<[u8; 32]> {
    let [a] = kdf::<1>(key, input);
    a
}

/// `KDF2(key, input)`.
pub fn kdf2(key: &[u8; 32], input: &[u8]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let [a, b] = kdf::<2>(key, input);
    (a, b)
}

/// `KDF3(key, input)`.
pub fn kdf3(key: &[u8; 32], input: &[u8]) -> (Secret32, Secret32, Secret32) {
    let [a, b, c] = kdf::<3>(key, input);
    (a, b, c)
}

#[cfg(test)]
mod tests {
    //! Vectors: RFC 7693 Appendix B (BLAKE2s-256 of "abc"); the BLAKE2 reference KAT
    //! (blake2s-kat.txt: keyed, key 00..1f); and HMAC-BLAKE2s / 16-byte keyed BLAKE2s computed
    //! by CPython's `hmac` and `hashlib.blake2s`, which wrap the reference BLAKE2 code.
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn seq(n: usize) -> Vec<u8> {
        (0..n).map(|i| i as u8).collect()
    }

    #[test]
    fn blake2s_rfc7693() {
        assert_eq!(
            hash(&[b"abc"]).to_vec(),
            unhex("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
        );
        // Split input hashes the same as joined input.
        assert_eq!(hash(&[b"a", b"bc"]), hash(&[b"abc"]));
    }

    #[test]
    fn blake2s_empty() {
        assert_eq!(
            hash(&[]).to_vec(),
            unhex("69217a3079908094e11121d042354a7c1f55b6482ca1a51e1b250dfd1ed0eef9")
        );
    }

    #[test]
    fn keyed_blake2s_kat_and_mac16() {
        let key: [u8; 32] = seq(32).try_into().unwrap();
        let mut m32 = <blake2::Blake2sMac256 as KeyInit>::new((&key).into());
        Mac::update(&mut m32, b"");
        assert_eq!(
            m32.finalize().into_bytes().to_vec(),
            unhex("48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49")
        );
        assert_eq!(mac(&key, &[]).to_vec(), unhex("9536f9b267655743dee97b8a670f9f53"));
        assert_eq!(mac(&key, &[&seq(64)]).to_vec(), unhex("f1efa90d2547036841ecd3627fafbc36"));
        // A 16-byte key (a cookie as MAC2's key): hashlib.blake2s(bytes(range(64)),
        // key=bytes(range(16)), digest_size=16). Not the same as the key zero-padded to 32.
        let short: [u8; 16] = seq(16).try_into().unwrap();
        assert_eq!(mac(&short, &[&seq(64)]).to_vec(), unhex("dd55c51c98f8ab96ed272882941f0b6a"));
        let mut padded = [0u8; 32];
        padded[..16].copy_from_slice(&short);
        assert_ne!(mac(&padded, &[&seq(64)]), mac(&short, &[&seq(64)]));
    }

    #[test]
    fn hmac_blake2s() {
        assert_eq!(
            hmac(b"key", &[b"The quick brown fox ", b"jumps over the lazy dog"]).to_vec(),
            unhex("f93215bb90d4af4c3061cd932fb169fb8bb8a91d0b4022baea1271e1323cd9a0")
        );
        // A key longer than the 64-byte block is hashed first.
        assert_eq!(
            hmac(&seq(100), &[b"sitelink"]).to_vec(),
            unhex("32ef32993ff9f8129a280df71986fd803338ecdc099d3f17a6485117a41cfff3")
        );
    }

    #[test]
    fn kdf_chain() {
        let key: [u8; 32] = seq(32).try_into().unwrap();
        let (a, b, c) = kdf3(&key, b"input");
        assert_eq!(a.to_vec(), unhex("87b7f70b24183c6db5dc4f6d9f4c47cdb203321aa2a0bef714896adb3107a040"));
        assert_eq!(b.to_vec(), unhex("538a02e1eb2e31b7e4d4b82476d1fe2acf50085d3fb584537279195f5d1f5824"));
        assert_eq!(c.to_vec(), unhex("9ad858025593be88de0f9442a589cfe84a88dc19e4753d93684d1c5efc4837f9"));
        let (a2, b2) = kdf2(&key, b"input");
        assert_eq!((*a2, *b2), (*a, *b));
        assert_eq!(*kdf1(&key, b"input"), *a);
    }

    #[test]
    fn wireguard_initial_chain_key_and_hash() {
        // The constants every WireGuard implementation precomputes.
        let c = hash(&[b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"]);
        assert_eq!(c.to_vec(), unhex("60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"));
        let h = hash(&[&c, b"WireGuard v1 zx2c4 Jason@zx2c4.com"]);
        assert_eq!(h.to_vec(), unhex("2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"));
    }
}
