#!/usr/bin/env python3
"""Known-answer vectors for sitelink-crypto, computed by an implementation sitelink did not write.

Independent primitives only: hashlib.blake2s (CPython's bundled reference BLAKE2), hmac,
the `cryptography` package (OpenSSL) for X25519 and ChaCha20-Poly1305, and PyNaCl (libsodium)
for XChaCha20-Poly1305. The WireGuard constructions on top (MAC1, MAC2, cookie reply, the
Noise IKpsk2 handshake, the first transport message) follow the whitepaper, section 5.4,
written here from the paper without looking at sitelink's code.

    pip install cryptography pynacl && python3 generate.py

prints the constants pasted into ../vectors.rs.
"""
import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives import serialization
import nacl.bindings


def HASH(*parts):
    return hashlib.blake2s(b"".join(parts)).digest()


def MAC(key, *parts):
    # Keyed BLAKE2s, 16-byte output, the key at its own length (32 for MAC1, 16 for a cookie).
    return hashlib.blake2s(b"".join(parts), key=key, digest_size=16).digest()


def HMAC(key, *parts):
    return hmac.new(key, b"".join(parts), hashlib.blake2s).digest()


def KDF(n, key, inp):
    t0 = HMAC(key, inp)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = HMAC(t0, prev + bytes([i]))
        out.append(prev)
    return out


def pub(priv):
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def DH(priv, pub_bytes):
    return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub_bytes))


def AEAD(key, counter, plain, aad):
    return ChaCha20Poly1305(key).encrypt(b"\0" * 4 + struct.pack("<Q", counter), plain, aad)


def TAI64N(secs, nanos):
    # Nanoseconds whitened to a multiple of 2^24, as the kernel module and wireguard-go send them.
    return struct.pack(">QI", (1 << 62) + 10 + secs, nanos & ~0xFFFFFF)


CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# Inputs: arbitrary fixed bytes.
S_i = bytes.fromhex("e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a")
S_r = bytes.fromhex("c0de000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c5f")
E_i = bytes.fromhex("a8" * 31 + "5f")
E_r = bytes.fromhex("48" + "17" * 30 + "6e")
PSK = bytes(range(100, 132))
I_INDEX = 0x11223344
R_INDEX = 0x55667788
TS = TAI64N(1_700_000_000, 123_456_789)
SECRET = bytes(range(200, 232))         # the responder's cookie secret
NONCE = bytes(range(0x30, 0x30 + 24))   # the cookie reply's nonce
SRC_IP, SRC_PORT = bytes([192, 0, 2, 1]), 51820  # the initiator's address as the responder sees it

Sp_i, Sp_r, Ep_i, Ep_r = pub(S_i), pub(S_r), pub(E_i), pub(E_r)

# Initiation.
C = HASH(CONSTRUCTION)
H = HASH(C, IDENTIFIER)
H = HASH(H, Sp_r)
C, = KDF(1, C, Ep_i)
H = HASH(H, Ep_i)
C, k = KDF(2, C, DH(E_i, Sp_r))
enc_static = AEAD(k, 0, Sp_i, H)
H = HASH(H, enc_static)
C, k = KDF(2, C, DH(S_i, Sp_r))
enc_ts = AEAD(k, 0, TS, H)
H = HASH(H, enc_ts)
init = struct.pack("<I", 1) + struct.pack("<I", I_INDEX) + Ep_i + enc_static + enc_ts
mac1_init = MAC(HASH(LABEL_MAC1, Sp_r), init)
init_no_cookie = init + mac1_init + bytes(16)

# Response.
C, = KDF(1, C, Ep_r)
H = HASH(H, Ep_r)
C, = KDF(1, C, DH(E_r, Ep_i))
C, = KDF(1, C, DH(E_r, Sp_i))
C, t, k = KDF(3, C, PSK)
H = HASH(H, t)
enc_nothing = AEAD(k, 0, b"", H)
H = HASH(H, enc_nothing)
resp = struct.pack("<I", 2) + struct.pack("<II", R_INDEX, I_INDEX) + Ep_r + enc_nothing
mac1_resp = MAC(HASH(LABEL_MAC1, Sp_i), resp)
resp = resp + mac1_resp + bytes(16)
T_send_i, T_recv_i = KDF(2, C, b"")

# The initiator's first transport message: a keepalive (empty), counter 0.
keepalive = struct.pack("<I", 4) + struct.pack("<IQ", R_INDEX, 0) + AEAD(T_send_i, 0, b"", b"")
# And one with 20 bytes of payload padded to 32, counter 1.
payload = bytes(range(20)) + bytes(12)
data1 = struct.pack("<I", 4) + struct.pack("<IQ", R_INDEX, 1) + AEAD(T_send_i, 1, payload, b"")

# The responder under load answers the initiation with a cookie reply.
cookie = MAC(SECRET, SRC_IP, struct.pack(">H", SRC_PORT))
enc_cookie = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
    cookie, mac1_init, NONCE, HASH(LABEL_COOKIE, Sp_r))
cookie_reply = struct.pack("<I", 3) + struct.pack("<I", I_INDEX) + NONCE + enc_cookie
# The initiator sends the same initiation again with mac2 keyed by the 16-byte cookie.
mac2_init = MAC(cookie, init + mac1_init)
init_with_cookie = init + mac1_init + mac2_init


def rust(name, b):
    print(f'const {name}: &str = "{b.hex()}";')


for name, val in [
    ("S_I", S_i), ("S_R", S_r), ("E_I", E_i), ("E_R", E_r), ("PSK", PSK), ("TIMESTAMP", TS),
    ("COOKIE_SECRET", SECRET), ("COOKIE_NONCE", NONCE),
    ("INITIATION", init_no_cookie), ("RESPONSE", resp),
    ("T_SEND_I", T_send_i), ("T_RECV_I", T_recv_i),
    ("KEEPALIVE", keepalive), ("DATA1", data1),
    ("COOKIE", cookie), ("COOKIE_REPLY", cookie_reply), ("INITIATION_WITH_MAC2", init_with_cookie),
    ("MAC2_PADDED_KEY_WRONG", MAC(cookie + bytes(16), init + mac1_init)),
]:
    rust(name, val)
