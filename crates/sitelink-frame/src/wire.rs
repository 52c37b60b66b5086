//! Typed zero-copy views of WireGuard's four message types.
//!
//! A view wraps any `T: AsRef<[u8]>` (read) or `T: AsMut<[u8]>` (write). `new_checked` checks
//! the type byte, the three reserved bytes and the length once; after that no accessor can
//! panic. Emitting a message is `new_unchecked` on a buffer of the message's length,
//! [`init_header`](HandshakeInitiation::init_header), then the `set_*`/`*_mut` accessors.
//! All integers on the wire are little-endian (WireGuard whitepaper, section 5.4).

use crate::FrameError;

/// Length of the common header: type byte and three reserved zero bytes.
pub const HEADER_LEN: usize = 4;
/// Length of a handshake initiation (type 1).
pub const INITIATION_LEN: usize = 148;
/// Length of a handshake response (type 2).
pub const RESPONSE_LEN: usize = 92;
/// Length of a cookie reply (type 3).
pub const COOKIE_REPLY_LEN: usize = 64;
/// Length of a transport message's header: type, reserved, receiver index, counter.
pub const TRANSPORT_HEADER_LEN: usize = 16;
/// Length of the Poly1305 tag that ends every transport message.
pub const TAG_LEN: usize = 16;
/// Shortest transport message: a header and the tag of an empty plaintext (a keepalive).
pub const TRANSPORT_MIN_LEN: usize = TRANSPORT_HEADER_LEN + TAG_LEN;
/// Transport plaintext is zero-padded to a multiple of this.
pub const PADDING_MULTIPLE: usize = 16;

/// The type of a WireGuard message (byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Noise IKpsk2 first message.
    HandshakeInitiation = 1,
    /// Noise IKpsk2 second message.
    HandshakeResponse = 2,
    /// Cookie reply sent by a responder under load.
    CookieReply = 3,
    /// Encrypted transport data (or a keepalive).
    TransportData = 4,
}

impl MessageType {
    /// The message length this type requires: exact for handshake and cookie messages, the
    /// minimum for transport data.
    pub const fn wire_len(self) -> usize {
        match self {
            MessageType::HandshakeInitiation => INITIATION_LEN,
            MessageType::HandshakeResponse => RESPONSE_LEN,
            MessageType::CookieReply => COOKIE_REPLY_LEN,
            MessageType::TransportData => TRANSPORT_MIN_LEN,
        }
    }
}

/// Reads the header of a datagram and checks its length against its type.
///
/// This is the one check every datagram from the network passes first.
#[inline]
pub fn classify(bytes: &[u8]) -> Result<MessageType, FrameError> {
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::Truncated { len: bytes.len(), need: HEADER_LEN });
    }
    let ty = match bytes[0] {
        1 => MessageType::HandshakeInitiation,
        2 => MessageType::HandshakeResponse,
        3 => MessageType::CookieReply,
        4 => MessageType::TransportData,
        other => return Err(FrameError::UnknownType(other)),
    };
    if bytes[1..4] != [0, 0, 0] {
        return Err(FrameError::ReservedNotZero);
    }
    let need = ty.wire_len();
    if ty == MessageType::TransportData {
        if bytes.len() < need {
            return Err(FrameError::Truncated { len: bytes.len(), need });
        }
    } else if bytes.len() != need {
        return Err(FrameError::BadLength { ty: ty as u8, len: bytes.len(), expected: need });
    }
    Ok(ty)
}

fn check(bytes: &[u8], want: MessageType) -> Result<(), FrameError> {
    let got = classify(bytes)?;
    if got != want {
        // Correct length for `got`; report it against the type the caller wanted.
        return Err(FrameError::BadLength { ty: got as u8, len: bytes.len(), expected: want.wire_len() });
    }
    Ok(())
}

#[inline]
fn read_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
fn array<const N: usize>(b: &[u8], off: usize) -> &[u8; N] {
    b[off..off + N].try_into().expect("range has length N")
}

#[inline]
fn array_mut<const N: usize>(b: &mut [u8], off: usize) -> &mut [u8; N] {
    (&mut b[off..off + N]).try_into().expect("range has length N")
}

/// Defines a view of a fixed-length message: the struct, `new_checked`/`new_unchecked`,
/// `init_header`, and one getter plus one mutable getter per field.
macro_rules! fixed_message {
    (
        $(#[$meta:meta])*
        $name:ident, $ty:expr, $len:expr,
        u32 { $( $(#[$idoc:meta])* $iget:ident, $iset:ident @ $ioff:expr; )* }
        bytes { $( $(#[$fdoc:meta])* $get:ident, $get_mut:ident : $n:expr, @ $off:expr; )* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name<T> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// Length of this message on the wire.
            pub const LEN: usize = $len;

            /// Wraps a buffer after checking type, reserved bytes and exact length.
            pub fn new_checked(buffer: T) -> Result<Self, FrameError> {
                check(buffer.as_ref(), $ty)?;
                Ok($name { buffer })
            }

            /// Wraps a buffer without checks, for emitting. Accessors panic unless the buffer
            /// is exactly [`Self::LEN`] bytes long; use [`Self::new_checked`] for input.
            pub fn new_unchecked(buffer: T) -> Self {
                $name { buffer }
            }

            /// The whole message.
            pub fn as_bytes(&self) -> &[u8] {
                self.buffer.as_ref()
            }

            /// Gives the buffer back.
            pub fn into_inner(self) -> T {
                self.buffer
            }

            $(
                $(#[$idoc])*
                #[inline]
                pub fn $iget(&self) -> u32 {
                    read_u32(self.buffer.as_ref(), $ioff)
                }
            )*
            $(
                $(#[$fdoc])*
                #[inline]
                pub fn $get(&self) -> &[u8; $n] {
                    array(self.buffer.as_ref(), $off)
                }
            )*
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $name<T> {
            /// Writes the type byte and zeroes the reserved bytes.
            pub fn init_header(&mut self) {
                let b = self.buffer.as_mut();
                b[0] = $ty as u8;
                b[1..4].fill(0);
            }
            $(
                #[doc = concat!("Sets the field read by [`", stringify!($iget), "`](Self::", stringify!($iget), ").")]
                #[inline]
                pub fn $iset(&mut self, value: u32) {
                    self.buffer.as_mut()[$ioff..$ioff + 4].copy_from_slice(&value.to_le_bytes());
                }
            )*
            $(
                #[doc = concat!("The field read by [`", stringify!($get), "`](Self::", stringify!($get), "), writable.")]
                #[inline]
                pub fn $get_mut(&mut self) -> &mut [u8; $n] {
                    array_mut(self.buffer.as_mut(), $off)
                }
            )*
        }
    };
}

fixed_message! {
    /// Handshake initiation (type 1, 148 bytes).
    HandshakeInitiation, MessageType::HandshakeInitiation, INITIATION_LEN,
    u32 {
        /// The initiator's index for this handshake.
        sender_index, set_sender_index @ 4;
    }
    bytes {
        /// The initiator's ephemeral public key.
        ephemeral, ephemeral_mut: 32, @ 8;
        /// The initiator's static public key, AEAD-sealed (32 + 16 bytes).
        encrypted_static, encrypted_static_mut: 48, @ 40;
        /// TAI64N timestamp, AEAD-sealed (12 + 16 bytes).
        encrypted_timestamp, encrypted_timestamp_mut: 28, @ 88;
        /// MAC over the bytes before it, keyed by the responder's public key.
        mac1, mac1_mut: 16, @ 116;
        /// MAC over the bytes before it keyed by a cookie, or zeros.
        mac2, mac2_mut: 16, @ 132;
    }
}

fixed_message! {
    /// Handshake response (type 2, 92 bytes).
    HandshakeResponse, MessageType::HandshakeResponse, RESPONSE_LEN,
    u32 {
        /// The responder's index for this handshake.
        sender_index, set_sender_index @ 4;
        /// The initiator's index, echoed.
        receiver_index, set_receiver_index @ 8;
    }
    bytes {
        /// The responder's ephemeral public key.
        ephemeral, ephemeral_mut: 32, @ 12;
        /// An AEAD tag over the empty plaintext.
        encrypted_nothing, encrypted_nothing_mut: 16, @ 44;
        /// MAC over the bytes before it, keyed by the initiator's public key.
        mac1, mac1_mut: 16, @ 60;
        /// MAC over the bytes before it keyed by a cookie, or zeros.
        mac2, mac2_mut: 16, @ 76;
    }
}

fixed_message! {
    /// Cookie reply (type 3, 64 bytes).
    CookieReply, MessageType::CookieReply, COOKIE_REPLY_LEN,
    u32 {
        /// The sender index of the handshake message this answers.
        receiver_index, set_receiver_index @ 4;
    }
    bytes {
        /// Random XChaCha20 nonce.
        nonce, nonce_mut: 24, @ 8;
        /// The cookie, XAEAD-sealed (16 + 16 bytes).
        encrypted_cookie, encrypted_cookie_mut: 32, @ 32;
    }
}

/// Offsets of the MACs in the handshake messages: `mac1` covers the bytes before `MAC1`,
/// `mac2` the bytes before `MAC2`.
pub mod mac_offsets {
    /// Offset of mac1 in an initiation.
    pub const INITIATION_MAC1: usize = 116;
    /// Offset of mac2 in an initiation.
    pub const INITIATION_MAC2: usize = 132;
    /// Offset of mac1 in a response.
    pub const RESPONSE_MAC1: usize = 60;
    /// Offset of mac2 in a response.
    pub const RESPONSE_MAC2: usize = 76;
}

/// Transport data message (type 4): a 16-byte header, then the sealed padded packet and tag.
#[derive(Debug, Clone, Copy)]
pub struct TransportData<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TransportData<T> {
    /// Wraps a buffer after checking type, reserved bytes and the minimum length (32).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, FrameError> {
        check(buffer.as_ref(), MessageType::TransportData)?;
        Ok(TransportData { buffer })
    }

    /// The index the receiver chose for this keypair.
    #[inline]
    pub fn receiver_index(&self) -> u32 {
        read_u32(self.buffer.as_ref(), 4)
    }

    /// The nonce counter.
    #[inline]
    pub fn counter(&self) -> u64 {
        u64::from_le_bytes(*array(self.buffer.as_ref(), 8))
    }

    /// The sealed payload followed by its tag (at least 16 bytes).
    #[inline]
    pub fn ciphertext(&self) -> &[u8] {
        &self.buffer.as_ref()[TRANSPORT_HEADER_LEN..]
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// Writes a transport header (type, reserved, receiver index, counter) into `header`.
#[inline]
pub fn write_transport_header(header: &mut [u8; TRANSPORT_HEADER_LEN], receiver_index: u32, counter: u64) {
    header[0] = MessageType::TransportData as u8;
    header[1..4].fill(0);
    header[4..8].copy_from_slice(&receiver_index.to_le_bytes());
    header[8..16].copy_from_slice(&counter.to_le_bytes());
}

/// Number of zero bytes to append to a plaintext of `len` bytes: up to the next multiple of 16,
/// but never past `mtu` (WireGuard pads to `min(round_up(len, 16), max(mtu, len))`).
#[inline]
pub fn padding_for(len: usize, mtu: usize) -> usize {
    let padded = len.div_ceil(PADDING_MULTIPLE) * PADDING_MULTIPLE;
    padded.min(mtu.max(len)) - len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classify_checks_header_and_length() {
        assert_eq!(classify(&[]), Err(FrameError::Truncated { len: 0, need: 4 }));
        assert_eq!(classify(&[9, 0, 0, 0]), Err(FrameError::UnknownType(9)));
        assert_eq!(classify(&[4, 0, 1, 0]), Err(FrameError::ReservedNotZero));
        assert_eq!(classify(&[4, 0, 0, 0]), Err(FrameError::Truncated { len: 4, need: 32 }));
        let mut m = [0u8; 148];
        m[0] = 1;
        assert_eq!(classify(&m), Ok(MessageType::HandshakeInitiation));
        assert_eq!(classify(&m[..147]), Err(FrameError::BadLength { ty: 1, len: 147, expected: 148 }));
        let mut t = [0u8; 32];
        t[0] = 4;
        assert_eq!(classify(&t), Ok(MessageType::TransportData));
    }

    #[test]
    fn initiation_round_trip() {
        let mut buf = [0u8; INITIATION_LEN];
        let mut m = HandshakeInitiation::new_unchecked(&mut buf[..]);
        m.init_header();
        m.set_sender_index(0xdead_beef);
        m.ephemeral_mut().fill(1);
        m.encrypted_static_mut().fill(2);
        m.encrypted_timestamp_mut().fill(3);
        m.mac1_mut().fill(4);
        m.mac2_mut().fill(5);
        assert_eq!(&buf[..8], &[1, 0, 0, 0, 0xef, 0xbe, 0xad, 0xde]);
        let v = HandshakeInitiation::new_checked(&buf[..]).unwrap();
        assert_eq!(v.sender_index(), 0xdead_beef);
        assert_eq!(v.ephemeral(), &[1; 32]);
        assert_eq!(v.encrypted_static(), &[2; 48]);
        assert_eq!(v.encrypted_timestamp(), &[3; 28]);
        assert_eq!(v.mac1(), &[4; 16]);
        assert_eq!(v.mac2(), &[5; 16]);
        assert_eq!(buf[mac_offsets::INITIATION_MAC1], 4);
        assert_eq!(buf[mac_offsets::INITIATION_MAC2], 5);
        assert!(HandshakeResponse::new_checked(&buf[..]).is_err());
    }

    #[test]
    fn response_and_cookie_layout() {
        let mut buf = [0u8; RESPONSE_LEN];
        let mut m = HandshakeResponse::new_unchecked(&mut buf[..]);
        m.init_header();
        m.set_sender_index(1);
        m.set_receiver_index(2);
        m.mac1_mut().fill(9);
        m.mac2_mut().fill(8);
        assert_eq!(buf[0], 2);
        assert_eq!(buf[mac_offsets::RESPONSE_MAC1], 9);
        assert_eq!(buf[mac_offsets::RESPONSE_MAC2], 8);
        let v = HandshakeResponse::new_checked(&buf[..]).unwrap();
        assert_eq!((v.sender_index(), v.receiver_index()), (1, 2));

        let mut c = [0u8; COOKIE_REPLY_LEN];
        let mut m = CookieReply::new_unchecked(&mut c[..]);
        m.init_header();
        m.set_receiver_index(77);
        m.nonce_mut().fill(1);
        m.encrypted_cookie_mut().fill(2);
        let v = CookieReply::new_checked(&c[..]).unwrap();
        assert_eq!(v.receiver_index(), 77);
        assert_eq!(v.nonce(), &[1; 24]);
        assert_eq!(v.encrypted_cookie(), &[2; 32]);
    }

    #[test]
    fn transport_header() {
        let mut m = [0u8; 40];
        write_transport_header((&mut m[..16]).try_into().unwrap(), 5, 0x0102_0304_0506_0708);
        let v = TransportData::new_checked(&m[..]).unwrap();
        assert_eq!(v.receiver_index(), 5);
        assert_eq!(v.counter(), 0x0102_0304_0506_0708);
        assert_eq!(v.ciphertext().len(), 24);
    }

    #[test]
    fn padding() {
        assert_eq!(padding_for(0, 1420), 0);
        assert_eq!(padding_for(1, 1420), 15);
        assert_eq!(padding_for(16, 1420), 0);
        assert_eq!(padding_for(1419, 1420), 1);
        assert_eq!(padding_for(1418, 1420), 2);
        assert_eq!(padding_for(1420, 1420), 0);
        assert_eq!(padding_for(1500, 1420), 0);
    }

    proptest! {
        #[test]
        fn classify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&bytes);
            let _ = HandshakeInitiation::new_checked(&bytes[..]);
            let _ = HandshakeResponse::new_checked(&bytes[..]);
            let _ = CookieReply::new_checked(&bytes[..]);
            if let Ok(t) = TransportData::new_checked(&bytes[..]) {
                prop_assert!(t.ciphertext().len() >= TAG_LEN);
                let _ = (t.receiver_index(), t.counter());
            }
        }

        #[test]
        fn padding_is_bounded(len in 0usize..70000, mtu in 0usize..70000) {
            let p = padding_for(len, mtu);
            prop_assert!(p < 16);
            prop_assert!(len + p <= mtu.max(len));
            prop_assert!((len + p) % 16 == 0 || len + p == mtu.max(len));
        }
    }
}
