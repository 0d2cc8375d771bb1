//! End-to-end sealing of chat datagrams, one [`ChatCipher`] per peer. Pure: no I/O.
//!
//! # Why chat has keys of its own
//!
//! Chat frames are sealed with ChaCha20-Poly1305 under keys derived from the same X25519
//! shared secret as the voice keys (see `super::crypto`), but with another HKDF label,
//! [`CHAT_KDF_LABEL`], so they are independent keys. A nonce must never repeat under a key;
//! voice nonces are `from || seq || timestamp`, and a chat datagram's nonce is
//! `from || to || packet`. Under a shared key the two nonce spaces could meet (a voice
//! sequence number and timestamp that happen to equal a recipient id and a packet number),
//! and one collision would leak both plaintexts' XOR and let the tag be forged. With a key of
//! its own, chat only has to keep its own nonces unique, which [`ChatCipher::seal`] enforces:
//! packet numbers must increase. The engine takes them from one counter for the whole run (not
//! per peer), so a peer that leaves and comes back (same session keys, so the same derived
//! keys) never sees a packet number twice either.
//!
//! On the wire: `chat header (13: type, from, to, packet) || ciphertext || tag (16)`; the
//! header is the associated data, so no byte of it can be altered. The receiving side keeps a
//! replay window over packet numbers, moved only by datagrams that authenticated. (The chat
//! stream above it drops duplicates by message number too; the window keeps replays from even
//! reaching it, and from drawing acknowledgements.)

use chacha20poly1305::{AeadInPlace, ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};

use super::crypto::{pair_keys, CryptoError, SessionKeys, PUBLIC_KEY_LEN, TAG_LEN};
use super::replay::{ReplayVerdict, VoiceReplayWindow};
use crate::protocol::datagram::{
    chat_header, DatagramKind, CHAT_HEADER_LEN, MAX_DATAGRAM_LEN, RELAY_HEADER_LEN,
};

/// HKDF label of the chat keys (the voice keys use `"p2p-voice v1 voice"`).
pub const CHAT_KDF_LABEL: &str = "p2p-voice v1 chat";

/// Largest chat frame (plaintext) that still fits in one datagram once sealed and wrapped in a
/// relay envelope, so any frame can take any path.
pub const MAX_CHAT_FRAME_LEN: usize =
    MAX_DATAGRAM_LEN - RELAY_HEADER_LEN - CHAT_HEADER_LEN - TAG_LEN;

/// Largest sealed chat datagram (header, frame, tag).
pub const MAX_SEALED_CHAT_LEN: usize = CHAT_HEADER_LEN + MAX_CHAT_FRAME_LEN + TAG_LEN;

/// Why a chat datagram could not be sealed or opened. Opening never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatCryptoError {
    #[error("cannot derive chat keys: {0}")]
    Keys(#[from] CryptoError),
    #[error("chat frame of {len} bytes exceeds the {max}-byte limit", max = MAX_CHAT_FRAME_LEN)]
    FrameTooLarge { len: usize },
    #[error("output buffer holds {available} bytes but {needed} are needed")]
    BufferTooSmall { needed: usize, available: usize },
    #[error(
        "refusing to seal chat packet {packet}: it does not follow {last} (a nonce would repeat)"
    )]
    PacketNotIncreasing { packet: u32, last: u32 },
    #[error("chat datagram of {len} bytes is shorter than its header and tag")]
    Truncated { len: usize },
    #[error("not a chat datagram of this version (type byte {type_byte:#04x})")]
    NotChat { type_byte: u8 },
    #[error("chat datagram from {found}, but this key is for {expected}")]
    WrongSender { expected: u32, found: u32 },
    #[error("chat datagram addressed to {found}, not to us ({expected})")]
    WrongRecipient { expected: u32, found: u32 },
    #[error("chat packet {packet} already seen or too old (replay)")]
    Replay { packet: u32 },
    #[error("chat datagram failed authentication (wrong key, or altered)")]
    AuthenticationFailed,
}

/// Seals our chat frames for one peer and opens theirs.
///
/// Invariants: the send key is the peer's receive key and vice versa, and neither is a voice or
/// control key; `seal` never uses a packet number twice; the replay window records only packet
/// numbers of datagrams that authenticated.
pub struct ChatCipher {
    our_id: u32,
    peer_id: u32,
    peer_public: [u8; PUBLIC_KEY_LEN],
    send: ChaCha20Poly1305,
    recv: ChaCha20Poly1305,
    last_sealed: Option<u32>,
    replay: VoiceReplayWindow,
    pub auth_failures: u64,
}

impl ChatCipher {
    /// Derives the chat keys with `peer_id`, whose announced public key is `peer_public`.
    pub fn new(
        keys: &SessionKeys,
        our_id: u32,
        peer_id: u32,
        peer_public: [u8; PUBLIC_KEY_LEN],
    ) -> Result<Self, ChatCryptoError> {
        let (send, recv) = pair_keys(keys, our_id, peer_id, &peer_public, CHAT_KDF_LABEL)?;
        Ok(Self {
            our_id,
            peer_id,
            peer_public,
            send: ChaCha20Poly1305::new(Key::from_slice(&send[..])),
            recv: ChaCha20Poly1305::new(Key::from_slice(&recv[..])),
            last_sealed: None,
            replay: VoiceReplayWindow::new(),
            auth_failures: 0,
        })
    }

    /// The public key these keys were derived with (a new announced key needs a new cipher).
    pub fn peer_public(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.peer_public
    }

    /// Writes the whole sealed chat datagram for `frame` under packet number `packet` into
    /// `out`; returns its length. `packet` must be above every one sealed before (no wrap:
    /// 2^32 chat datagrams are far more than a run sends).
    pub fn seal(
        &mut self,
        packet: u32,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, ChatCryptoError> {
        if frame.len() > MAX_CHAT_FRAME_LEN {
            return Err(ChatCryptoError::FrameTooLarge { len: frame.len() });
        }
        let needed = CHAT_HEADER_LEN + frame.len() + TAG_LEN;
        if out.len() < needed {
            return Err(ChatCryptoError::BufferTooSmall {
                needed,
                available: out.len(),
            });
        }
        if let Some(last) = self.last_sealed {
            if packet <= last {
                return Err(ChatCryptoError::PacketNotIncreasing { packet, last });
            }
        }
        let header = chat_header(self.our_id, self.peer_id, packet);
        let (head, rest) = out.split_at_mut(CHAT_HEADER_LEN);
        head.copy_from_slice(&header);
        let (body, tail) = rest.split_at_mut(frame.len());
        body.copy_from_slice(frame);
        let tag = self
            .send
            .encrypt_in_place_detached(&nonce(&header), &header, body)
            .map_err(|_| ChatCryptoError::FrameTooLarge { len: frame.len() })?;
        tail[..TAG_LEN].copy_from_slice(&tag);
        self.last_sealed = Some(packet);
        Ok(needed)
    }

    /// Verifies and decrypts a whole received chat datagram from the peer, writing the frame
    /// into `out` and returning its length. Refuses anything truncated, not from this peer to
    /// us, replayed or altered; `out` holds no unauthenticated plaintext afterwards.
    pub fn open(&mut self, datagram: &[u8], out: &mut [u8]) -> Result<usize, ChatCryptoError> {
        if datagram.len() < CHAT_HEADER_LEN + TAG_LEN {
            return Err(ChatCryptoError::Truncated {
                len: datagram.len(),
            });
        }
        let (header, sealed) = datagram.split_at(CHAT_HEADER_LEN);
        if header[0] != DatagramKind::Chat.type_byte() {
            return Err(ChatCryptoError::NotChat {
                type_byte: header[0],
            });
        }
        let be = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let (from, to, packet) = (be(1), be(5), be(9));
        if from != self.peer_id {
            return Err(ChatCryptoError::WrongSender {
                expected: self.peer_id,
                found: from,
            });
        }
        if to != self.our_id {
            return Err(ChatCryptoError::WrongRecipient {
                expected: self.our_id,
                found: to,
            });
        }
        let len = sealed.len() - TAG_LEN;
        if out.len() < len {
            return Err(ChatCryptoError::BufferTooSmall {
                needed: len,
                available: out.len(),
            });
        }
        let mut window = self.replay;
        if window.check_and_update(packet) != ReplayVerdict::Fresh {
            self.replay = window;
            return Err(ChatCryptoError::Replay { packet });
        }
        let (body_in, tag) = sealed.split_at(len);
        let body = &mut out[..len];
        body.copy_from_slice(body_in);
        let fixed: &[u8; CHAT_HEADER_LEN] = header.try_into().expect("split at the length");
        match self
            .recv
            .decrypt_in_place_detached(&nonce(fixed), header, body, Tag::from_slice(tag))
        {
            Ok(()) => {
                self.replay = window;
                Ok(len)
            }
            Err(_) => {
                body.fill(0);
                self.auth_failures += 1;
                Err(ChatCryptoError::AuthenticationFailed)
            }
        }
    }
}

/// The nonce of a chat datagram: its header without the type byte, `from || to || packet`.
fn nonce(header: &[u8; CHAT_HEADER_LEN]) -> Nonce {
    *Nonce::from_slice(&header[1..13])
}

impl std::fmt::Debug for ChatCipher {
    /// Never shows key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatCipher")
            .field("our_id", &self.our_id)
            .field("peer_id", &self.peer_id)
            .field("last_sealed", &self.last_sealed)
            .field("auth_failures", &self.auth_failures)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::voice::net::crypto::PeerCipher;

    const A: u32 = 7;
    const B: u32 = 42;

    fn keys(seed: u8) -> SessionKeys {
        SessionKeys::from_secret_bytes([seed; 32])
    }

    fn pair() -> (ChatCipher, ChatCipher) {
        let (a, b) = (keys(1), keys(2));
        (
            ChatCipher::new(&a, A, B, b.public_key()).unwrap(),
            ChatCipher::new(&b, B, A, a.public_key()).unwrap(),
        )
    }

    fn sealed(c: &mut ChatCipher, packet: u32, frame: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; MAX_SEALED_CHAT_LEN];
        let n = c.seal(packet, frame, &mut out).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn a_sealed_frame_opens_on_the_other_side_only_and_hides_its_text() {
        let (mut a, mut b) = pair();
        let d = sealed(&mut a, 1, b"meet at noon");
        assert!(!d.windows(4).any(|w| w == b"noon"), "the text is encrypted");
        let mut out = [0u8; 64];
        let n = b.open(&d, &mut out).unwrap();
        assert_eq!(&out[..n], b"meet at noon");
        // Our own datagram reflected back to us is not from the peer.
        assert!(matches!(
            a.open(&d, &mut out),
            Err(ChatCryptoError::WrongSender { .. })
        ));
        // A third party with its own keys cannot open it.
        let eve = keys(3);
        let mut e = ChatCipher::new(&eve, B, A, keys(1).public_key()).unwrap();
        assert_eq!(
            e.open(&d, &mut out),
            Err(ChatCryptoError::AuthenticationFailed)
        );
    }

    #[test]
    fn every_altered_byte_is_refused_and_leaves_the_window_alone() {
        let (mut a, mut b) = pair();
        let d = sealed(&mut a, 5, b"hello there");
        let mut out = [0u8; 64];
        for i in 0..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x01;
            assert!(b.open(&t, &mut out).is_err(), "byte {i}");
        }
        assert_eq!(b.replay.highest(), None);
        assert!(b.open(&d, &mut out).is_ok());
        for len in 0..d.len() {
            assert!(b.open(&d[..len], &mut out).is_err(), "len {len}");
        }
    }

    #[test]
    fn replays_are_refused_and_packet_numbers_must_increase() {
        let (mut a, mut b) = pair();
        let d1 = sealed(&mut a, 1, b"one");
        let d3 = sealed(&mut a, 3, b"three");
        let mut out = [0u8; 64];
        assert!(b.open(&d3, &mut out).is_ok());
        assert!(b.open(&d1, &mut out).is_ok(), "reordered is fine");
        assert_eq!(
            b.open(&d1, &mut out),
            Err(ChatCryptoError::Replay { packet: 1 })
        );
        let mut buf = [0u8; 64];
        assert_eq!(
            a.seal(3, b"again", &mut buf),
            Err(ChatCryptoError::PacketNotIncreasing { packet: 3, last: 3 })
        );
        assert_eq!(
            a.seal(2, b"back", &mut buf),
            Err(ChatCryptoError::PacketNotIncreasing { packet: 2, last: 3 })
        );
    }

    /// The chat keys are not the voice keys: a voice cipher between the same pair cannot open
    /// a chat datagram's body, whatever header it is given.
    #[test]
    fn chat_keys_differ_from_voice_keys() {
        let (a, b) = (keys(1), keys(2));
        let mut chat = ChatCipher::new(&a, A, B, b.public_key()).unwrap();
        let mut voice_rx = PeerCipher::new(&b, B, A, a.public_key()).unwrap();
        let d = sealed(&mut chat, 1, b"secret");
        let mut as_voice = crate::protocol::datagram::voice_header(A, 1, 0).to_vec();
        as_voice.extend_from_slice(&d[CHAT_HEADER_LEN..]);
        let mut out = [0u8; 64];
        assert_eq!(
            voice_rx.open_datagram(&as_voice, &mut out),
            Err(CryptoError::AuthenticationFailed)
        );
    }

    #[test]
    fn the_largest_frame_fits_a_relayed_datagram() {
        let (mut a, mut b) = pair();
        let frame = vec![b'x'; MAX_CHAT_FRAME_LEN];
        let d = sealed(&mut a, 1, &frame);
        assert_eq!(d.len() + RELAY_HEADER_LEN, MAX_DATAGRAM_LEN);
        let mut out = vec![0u8; MAX_CHAT_FRAME_LEN];
        assert_eq!(b.open(&d, &mut out), Ok(MAX_CHAT_FRAME_LEN));
        let mut buf = vec![0u8; 2 * MAX_DATAGRAM_LEN];
        assert_eq!(
            a.seal(2, &vec![0u8; MAX_CHAT_FRAME_LEN + 1], &mut buf),
            Err(ChatCryptoError::FrameTooLarge {
                len: MAX_CHAT_FRAME_LEN + 1
            })
        );
    }
}
