//! The Noise IKpsk2 handshake in both roles (WireGuard whitepaper, section 5.4).
//!
//! Each role's progress is a value: the initiator holds an [`InitiatorState`] between sending an
//! initiation and receiving the response; the responder turns a received initiation into an
//! [`UnverifiedInitiation`] (the initiator's static key is known, nothing is yet proven), then,
//! once it has found that key among its peers, into a [`ReceivedInitiation`] whose timestamp
//! the caller checks before it [`responds`](ReceivedInitiation::respond). Both ends finish with
//! [`SessionKeys`].
//!
//! This module writes and reads every field except `mac1` and `mac2`, which belong to
//! [`crate::cookie`] because they are checked before any Diffie-Hellman work.

use sitelink_frame::wire::{HandshakeInitiation, HandshakeResponse};
use zeroize::{Zeroize, Zeroizing};

use crate::aead::{open_to, seal_to};
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::primitives::{LABEL_COOKIE, LABEL_MAC1, hash, kdf1, kdf2, kdf3};
use crate::{Random, Tai64N};

/// `HASH(CONSTRUCTION)`: the initial chaining key.
const INITIAL_CHAIN_KEY: [u8; 32] = [
    0x60, 0xe2, 0x6d, 0xae, 0xf3, 0x27, 0xef, 0xc0, 0x2e, 0xc3, 0x35, 0xe2, 0xa0, 0x25, 0xd2, 0xd0, 0x16,
    0xeb, 0x42, 0x06, 0xf8, 0x72, 0x77, 0xf5, 0x2d, 0x38, 0xd1, 0x98, 0x8b, 0x78, 0xcd, 0x36,
];
/// `HASH(HASH(CONSTRUCTION) || IDENTIFIER)`: the initial hash.
const INITIAL_HASH: [u8; 32] = [
    0x22, 0x11, 0xb3, 0x61, 0x08, 0x1a, 0xc5, 0x66, 0x69, 0x12, 0x43, 0xdb, 0x45, 0x8a, 0xd5, 0x32, 0x2d,
    0x9c, 0x6c, 0x66, 0x22, 0x93, 0xe8, 0xb7, 0x0e, 0xe1, 0x9c, 0x65, 0xba, 0x07, 0x9e, 0xf3,
];

/// Why a handshake message was refused. All of these are the sender's doing (or an attacker's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// An AEAD field did not authenticate: wrong keys, a wrong preshared key, or tampering.
    #[error("handshake field failed to authenticate")]
    Decrypt,
    /// A Diffie-Hellman result was all zeros: a low-order public key.
    #[error("low-order public key")]
    LowOrderPoint,
}

/// The local static identity, with what is derived from it once.
pub struct Identity {
    private: PrivateKey,
    public: PublicKey,
    /// `HASH(INITIAL_HASH || S_local.pub)`, the responder's starting hash.
    initial_hash: [u8; 32],
    pub(crate) mac1_key: [u8; 32],
    pub(crate) cookie_key: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("public", &self.public).finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity of `private`.
    pub fn new(private: PrivateKey) -> Self {
        let public = private.public_key();
        Identity {
            initial_hash: hash(&[&INITIAL_HASH, public.as_bytes()]),
            mac1_key: hash(&[LABEL_MAC1, public.as_bytes()]),
            cookie_key: hash(&[LABEL_COOKIE, public.as_bytes()]),
            private,
            public,
        }
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The private key.
    pub fn private_key(&self) -> &PrivateKey {
        &self.private
    }
}

/// What the handshake needs to know of one remote peer, precomputed.
pub struct PeerKeys {
    public: PublicKey,
    psk: PresharedKey,
    /// `DH(S_local, S_remote)`, or `None` for a low-order remote key (no handshake can succeed).
    static_static: Option<Zeroizing<[u8; 32]>>,
    /// `HASH(INITIAL_HASH || S_remote.pub)`, the initiator's starting hash.
    initial_hash: [u8; 32],
}

impl std::fmt::Debug for PeerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerKeys").field("public", &self.public).finish_non_exhaustive()
    }
}

impl PeerKeys {
    /// Precomputes the handshake values for the peer `public` with preshared key `psk`.
    pub fn new(local: &Identity, public: PublicKey, psk: PresharedKey) -> Self {
        PeerKeys {
            static_static: local.private.diffie_hellman(&public),
            initial_hash: hash(&[&INITIAL_HASH, public.as_bytes()]),
            public,
            psk,
        }
    }

    /// The peer's public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Replaces the preshared key.
    pub fn set_preshared_key(&mut self, psk: PresharedKey) {
        self.psk = psk;
    }

    /// The preshared key.
    pub fn preshared_key(&self) -> &PresharedKey {
        &self.psk
    }
}

/// The keys and indices a completed handshake yields. Erased on drop.
pub struct SessionKeys {
    /// Key for messages this side sends.
    pub send: Zeroizing<[u8; 32]>,
    /// Key for messages this side receives.
    pub recv: Zeroizing<[u8; 32]>,
    /// The index this side chose (peers put it in the messages they send us).
    pub local_index: u32,
    /// The index the other side chose (we put it in the messages we send).
    pub remote_index: u32,
    /// Whether this side initiated the handshake.
    pub initiator: bool,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("initiator", &self.initiator)
            .finish_non_exhaustive()
    }
}

/// Chaining key and hash, carried through a handshake.
struct Transcript {
    ck: Zeroizing<[u8; 32]>,
    h: [u8; 32],
}

impl Transcript {
    fn mix_hash(&mut self, data: &[u8]) {
        self.h = hash(&[&self.h, data]);
    }

    fn mix_key(&mut self, input: &[u8]) {
        self.ck = kdf1(&self.ck, input);
    }

    /// `(C, k) = KDF2(C, input)`; returns k.
    fn mix_key2(&mut self, input: &[u8]) -> Zeroizing<[u8; 32]> {
        let (ck, k) = kdf2(&self.ck, input);
        self.ck = ck;
        k
    }

    /// `(C, t, k) = KDF3(C, psk)`; `H = HASH(H || t)`; returns k.
    fn mix_psk(&mut self, psk: &PresharedKey) -> Zeroizing<[u8; 32]> {
        let (ck, t, k) = kdf3(&self.ck, psk.as_bytes());
        self.ck = ck;
        self.mix_hash(&t[..]);
        k
    }

    /// The two transport keys: `(T1, T2) = KDF2(C, empty)`; T1 is the initiator's sending key.
    fn split(&self) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
        kdf2(&self.ck, &[])
    }
}

impl Drop for Transcript {
    fn drop(&mut self) {
        self.h.zeroize();
    }
}

fn dh(private: &PrivateKey, public: &PublicKey) -> Result<Zeroizing<[u8; 32]>, HandshakeError> {
    private.diffie_hellman(public).ok_or(HandshakeError::LowOrderPoint)
}

/// An initiator between sending its initiation and receiving the response.
pub struct InitiatorState {
    t: Transcript,
    ephemeral: PrivateKey,
    local_index: u32,
}

impl std::fmt::Debug for InitiatorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitiatorState").field("local_index", &self.local_index).finish_non_exhaustive()
    }
}

/// Writes a handshake initiation to `peer` into `msg` (all fields but the MACs) and returns the
/// state to finish it with.
pub fn initiate(
    local: &Identity,
    peer: &PeerKeys,
    local_index: u32,
    timestamp: Tai64N,
    rng: &mut dyn Random,
    msg: &mut HandshakeInitiation<&mut [u8]>,
) -> Result<InitiatorState, HandshakeError> {
    let static_static = peer.static_static.as_ref().ok_or(HandshakeError::LowOrderPoint)?;
    let mut t = Transcript { ck: Zeroizing::new(INITIAL_CHAIN_KEY), h: peer.initial_hash };
    let ephemeral = PrivateKey::generate(rng);
    let e_pub = ephemeral.public_key();
    msg.init_header();
    msg.set_sender_index(local_index);
    *msg.ephemeral_mut() = *e_pub.as_bytes();
    t.mix_key(e_pub.as_bytes());
    t.mix_hash(e_pub.as_bytes());

    let k = t.mix_key2(&dh(&ephemeral, &peer.public)?[..]);
    seal_to(&k, &t.h, local.public.as_bytes(), msg.encrypted_static_mut());
    t.mix_hash(msg.encrypted_static());

    let k = t.mix_key2(&static_static[..]);
    seal_to(&k, &t.h, timestamp.as_bytes(), msg.encrypted_timestamp_mut());
    t.mix_hash(msg.encrypted_timestamp());
    Ok(InitiatorState { t, ephemeral, local_index })
}

impl InitiatorState {
    /// The index this initiation carries as its sender index.
    pub fn local_index(&self) -> u32 {
        self.local_index
    }

    /// Finishes the handshake with the peer's response. The state is kept on failure (a forged
    /// response must not end a handshake in progress), so this borrows it.
    pub fn consume_response(
        &self,
        local: &Identity,
        peer: &PeerKeys,
        msg: &HandshakeResponse<&[u8]>,
    ) -> Result<SessionKeys, HandshakeError> {
        let mut t = Transcript { ck: self.t.ck.clone(), h: self.t.h };
        let e_r = PublicKey::from_bytes(*msg.ephemeral());
        t.mix_key(e_r.as_bytes());
        t.mix_hash(e_r.as_bytes());
        t.mix_key(&dh(&self.ephemeral, &e_r)?[..]);
        t.mix_key(&dh(&local.private, &e_r)?[..]);
        let k = t.mix_psk(&peer.psk);
        open_to(&k, &t.h, msg.encrypted_nothing(), &mut []).map_err(|_| HandshakeError::Decrypt)?;
        t.mix_hash(msg.encrypted_nothing());
        let (send, recv) = t.split();
        Ok(SessionKeys {
            send,
            recv,
            local_index: self.local_index,
            remote_index: msg.sender_index(),
            initiator: true,
        })
    }
}

/// An initiation whose sender's static key has been decrypted, not yet authenticated.
pub struct UnverifiedInitiation {
    t: Transcript,
    remote_ephemeral: PublicKey,
    remote_static: PublicKey,
    remote_index: u32,
    encrypted_timestamp: [u8; 28],
}

impl std::fmt::Debug for UnverifiedInitiation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnverifiedInitiation")
            .field("remote_static", &self.remote_static)
            .finish_non_exhaustive()
    }
}

/// First half of receiving an initiation: recovers the initiator's static public key so the
/// caller can look the peer up.
pub fn consume_initiation(
    local: &Identity,
    msg: &HandshakeInitiation<&[u8]>,
) -> Result<UnverifiedInitiation, HandshakeError> {
    let mut t = Transcript { ck: Zeroizing::new(INITIAL_CHAIN_KEY), h: local.initial_hash };
    let e_i = PublicKey::from_bytes(*msg.ephemeral());
    t.mix_key(e_i.as_bytes());
    t.mix_hash(e_i.as_bytes());
    let k = t.mix_key2(&dh(&local.private, &e_i)?[..]);
    let mut s_i = [0u8; 32];
    open_to(&k, &t.h, msg.encrypted_static(), &mut s_i).map_err(|_| HandshakeError::Decrypt)?;
    t.mix_hash(msg.encrypted_static());
    Ok(UnverifiedInitiation {
        t,
        remote_ephemeral: e_i,
        remote_static: PublicKey::from_bytes(s_i),
        remote_index: msg.sender_index(),
        encrypted_timestamp: *msg.encrypted_timestamp(),
    })
}

impl UnverifiedInitiation {
    /// The initiator's static public key, as it claims.
    pub fn remote_static(&self) -> &PublicKey {
        &self.remote_static
    }

    /// Second half: authenticates the initiation against the peer found for
    /// [`remote_static`](Self::remote_static) and decrypts its timestamp.
    pub fn verify(mut self, peer: &PeerKeys) -> Result<ReceivedInitiation, HandshakeError> {
        let static_static = peer.static_static.as_ref().ok_or(HandshakeError::LowOrderPoint)?;
        let k = self.t.mix_key2(&static_static[..]);
        let mut ts = [0u8; 12];
        open_to(&k, &self.t.h, &self.encrypted_timestamp, &mut ts).map_err(|_| HandshakeError::Decrypt)?;
        self.t.mix_hash(&self.encrypted_timestamp);
        Ok(ReceivedInitiation {
            t: self.t,
            remote_ephemeral: self.remote_ephemeral,
            remote_static: self.remote_static,
            remote_index: self.remote_index,
            timestamp: Tai64N::from_bytes(ts),
        })
    }
}

/// An authenticated initiation, ready to be answered once its timestamp is checked.
pub struct ReceivedInitiation {
    t: Transcript,
    remote_ephemeral: PublicKey,
    remote_static: PublicKey,
    remote_index: u32,
    timestamp: Tai64N,
}

impl std::fmt::Debug for ReceivedInitiation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceivedInitiation")
            .field("remote_static", &self.remote_static)
            .field("remote_index", &self.remote_index)
            .finish_non_exhaustive()
    }
}

impl ReceivedInitiation {
    /// The initiator's timestamp; a responder answers only initiations newer than any before.
    pub fn timestamp(&self) -> Tai64N {
        self.timestamp
    }

    /// The initiator's sender index.
    pub fn remote_index(&self) -> u32 {
        self.remote_index
    }

    /// Writes the response into `msg` (all fields but the MACs) and derives the session keys.
    pub fn respond(
        self,
        peer: &PeerKeys,
        local_index: u32,
        rng: &mut dyn Random,
        msg: &mut HandshakeResponse<&mut [u8]>,
    ) -> Result<SessionKeys, HandshakeError> {
        let mut t = Transcript { ck: self.t.ck.clone(), h: self.t.h };
        let ephemeral = PrivateKey::generate(rng);
        let e_pub = ephemeral.public_key();
        msg.init_header();
        msg.set_sender_index(local_index);
        msg.set_receiver_index(self.remote_index);
        *msg.ephemeral_mut() = *e_pub.as_bytes();
        t.mix_key(e_pub.as_bytes());
        t.mix_hash(e_pub.as_bytes());
        t.mix_key(&dh(&ephemeral, &self.remote_ephemeral)?[..]);
        t.mix_key(&dh(&ephemeral, &self.remote_static)?[..]);
        let k = t.mix_psk(&peer.psk);
        seal_to(&k, &t.h, &[], msg.encrypted_nothing_mut());
        t.mix_hash(msg.encrypted_nothing());
        let (recv, send) = t.split();
        Ok(SessionKeys { send, recv, local_index, remote_index: self.remote_index, initiator: false })
    }
}
