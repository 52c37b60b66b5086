//! MAC1, MAC2 and cookie replies: WireGuard's defence against handshake floods (whitepaper,
//! section 5.4.7).
//!
//! A sender seals every handshake message with `mac1`, keyed by the receiver's public key, and
//! with `mac2` keyed by a cookie when it holds a fresh one ([`MacSealer`], one per peer). A
//! receiver checks `mac1` before any Diffie-Hellman work and, under load, asks for `mac2`,
//! answering messages without it with a cookie reply bound to their source address
//! ([`MacChecker`], one per device). Which sources get how much work is the caller's policy:
//! [`MacChecker::check`] reports what the message proved, and the caller's rate limiter decides.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use sitelink_frame::wire::CookieReply;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::Random;
use crate::keys::PublicKey;
use crate::noise::Identity;
pub use crate::primitives::{LABEL_COOKIE, LABEL_MAC1};
use crate::primitives::{hash, mac};

/// How long a cookie secret (and so a cookie) lives: COOKIE_REFRESH_TIME.
pub const COOKIE_REFRESH_TIME: Duration = Duration::from_secs(120);
/// A sender stops using a cookie this long before the receiver's secret could have changed.
const COOKIE_LATENCY: Duration = Duration::from_secs(5);

/// What a received handshake message proved with its MACs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacCheck {
    /// `mac1` is wrong: drop without further work.
    BadMac1,
    /// `mac1` is right; `mac2` is absent or not from a current cookie for this source.
    Mac1,
    /// Both are right: the source address has answered a cookie reply recently.
    Mac1AndMac2,
}

/// A cookie reply could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CookieError {
    /// No handshake message was sent that this could answer.
    #[error("cookie reply answers no message we sent")]
    Unexpected,
    /// The cookie did not decrypt under the mac1 of our last message.
    #[error("cookie reply failed to authenticate")]
    Decrypt,
}

/// Seals outgoing handshake messages to one peer and keeps the cookie it sent us.
pub struct MacSealer {
    mac1_key: [u8; 32],
    cookie_key: Zeroizing<[u8; 32]>,
    cookie: Option<(Zeroizing<[u8; 16]>, Instant)>,
    last_mac1: Option<[u8; 16]>,
}

impl std::fmt::Debug for MacSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacSealer").field("has_cookie", &self.cookie.is_some()).finish_non_exhaustive()
    }
}

impl MacSealer {
    /// A sealer for messages to the peer whose public key is `remote`.
    pub fn new(remote: &PublicKey) -> Self {
        MacSealer {
            mac1_key: hash(&[LABEL_MAC1, remote.as_bytes()]),
            cookie_key: Zeroizing::new(hash(&[LABEL_COOKIE, remote.as_bytes()])),
            cookie: None,
            last_mac1: None,
        }
    }

    /// Writes `mac1` at `mac1_offset` and `mac2` right after it (the two MACs end every
    /// handshake message): `mac2` from the cookie if it is fresh at `now`, else zeros.
    pub fn seal(&mut self, now: Instant, msg: &mut [u8], mac1_offset: usize) {
        let mac1 = mac(&self.mac1_key, &[&msg[..mac1_offset]]);
        msg[mac1_offset..mac1_offset + 16].copy_from_slice(&mac1);
        self.last_mac1 = Some(mac1);
        let mac2_offset = mac1_offset + 16;
        let mac2 = match &self.cookie {
            Some((cookie, at))
                if now.saturating_duration_since(*at) < COOKIE_REFRESH_TIME - COOKIE_LATENCY =>
            {
                mac(cookie, &[&msg[..mac2_offset]])
            }
            _ => [0; 16],
        };
        msg[mac2_offset..mac2_offset + 16].copy_from_slice(&mac2);
    }

    /// Takes the cookie from a reply to our last sealed message.
    pub fn consume_reply(&mut self, now: Instant, reply: &CookieReply<&[u8]>) -> Result<(), CookieError> {
        let last_mac1 = self.last_mac1.ok_or(CookieError::Unexpected)?;
        let cipher = XChaCha20Poly1305::new((&*self.cookie_key).into());
        let sealed = reply.encrypted_cookie();
        let mut cookie = Zeroizing::new([0u8; 16]);
        cookie.copy_from_slice(&sealed[..16]);
        let tag = sealed[16..].try_into().expect("16-byte tag");
        cipher
            .decrypt_inout_detached(&XNonce::from(*reply.nonce()), &last_mac1, (&mut cookie[..]).into(), tag)
            .map_err(|_| CookieError::Decrypt)?;
        self.cookie = Some((cookie, now));
        Ok(())
    }

    /// Whether a cookie fresh enough to send is held at `now`.
    pub fn has_fresh_cookie(&self, now: Instant) -> bool {
        matches!(&self.cookie, Some((_, at)) if now.saturating_duration_since(*at) < COOKIE_REFRESH_TIME - COOKIE_LATENCY)
    }
}

/// Checks incoming handshake messages and makes cookie replies, for one local identity.
pub struct MacChecker {
    mac1_key: [u8; 32],
    cookie_key: Zeroizing<[u8; 32]>,
    secret: Zeroizing<[u8; 32]>,
    secret_born: Option<Instant>,
}

impl std::fmt::Debug for MacChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacChecker").finish_non_exhaustive()
    }
}

impl MacChecker {
    /// A checker for messages addressed to `local`.
    pub fn new(local: &Identity) -> Self {
        MacChecker {
            mac1_key: local.mac1_key,
            cookie_key: Zeroizing::new(local.cookie_key),
            secret: Zeroizing::new([0; 32]),
            secret_born: None,
        }
    }

    fn secret_is_current(&self, now: Instant) -> bool {
        matches!(self.secret_born, Some(born) if now.saturating_duration_since(born) < COOKIE_REFRESH_TIME)
    }

    /// The cookie for `src` under the current secret.
    fn cookie_for(&self, src: SocketAddr) -> [u8; 16] {
        let port = src.port().to_be_bytes();
        match src.ip() {
            IpAddr::V4(ip) => mac(&self.secret, &[&ip.octets(), &port]),
            IpAddr::V6(ip) => mac(&self.secret, &[&ip.octets(), &port]),
        }
    }

    /// Checks the MACs of a handshake message from `src`; `mac1` sits at `mac1_offset` and
    /// `mac2` right after it. Comparisons are in constant time.
    pub fn check(&self, now: Instant, msg: &[u8], mac1_offset: usize, src: SocketAddr) -> MacCheck {
        let mac2_offset = mac1_offset + 16;
        let Some(mac2_got) = msg.get(mac2_offset..mac2_offset + 16) else { return MacCheck::BadMac1 };
        let mac1 = mac(&self.mac1_key, &[&msg[..mac1_offset]]);
        if !bool::from(mac1.ct_eq(&msg[mac1_offset..mac2_offset])) {
            return MacCheck::BadMac1;
        }
        if !self.secret_is_current(now) {
            return MacCheck::Mac1;
        }
        let cookie = self.cookie_for(src);
        let mac2 = mac(&cookie, &[&msg[..mac2_offset]]);
        if bool::from(mac2.ct_eq(mac2_got)) { MacCheck::Mac1AndMac2 } else { MacCheck::Mac1 }
    }

    /// Writes into `out` a cookie reply to a message from `src` whose `mac1` was `msg_mac1` and
    /// whose sender index was `receiver_index`. Renews the secret when it is due.
    pub fn cookie_reply(
        &mut self,
        now: Instant,
        rng: &mut dyn Random,
        msg_mac1: &[u8; 16],
        receiver_index: u32,
        src: SocketAddr,
        out: &mut CookieReply<&mut [u8]>,
    ) {
        if !self.secret_is_current(now) {
            rng.fill(&mut self.secret[..]);
            self.secret_born = Some(now);
        }
        let cookie = self.cookie_for(src);
        out.init_header();
        out.set_receiver_index(receiver_index);
        rng.fill(out.nonce_mut());
        let nonce = *out.nonce();
        let sealed = out.encrypted_cookie_mut();
        sealed[..16].copy_from_slice(&cookie);
        let cipher = XChaCha20Poly1305::new((&*self.cookie_key).into());
        let (body, tag_out) = sealed.split_at_mut(16);
        let tag = cipher
            .encrypt_inout_detached(&XNonce::from(nonce), msg_mac1, body.into())
            .expect("16-byte plaintext");
        tag_out.copy_from_slice(&tag);
    }
}
