//! End-to-end encryption of voice datagrams. Pure: no I/O except drawing randomness when a
//! session key pair is generated; [`PeerCipher::seal`] and [`PeerCipher::open`] never allocate.
//!
//! # Scheme (version 1)
//!
//! 1. Each client makes one X25519 key pair per session ([`SessionKeys`]). The public key
//!    travels with its endpoint announcements; the secret never leaves the process.
//! 2. For every peer, both sides compute the X25519 shared secret. A result that is all zero
//!    (the peer sent a low-order point, which would make the "secret" public) is refused.
//! 3. HKDF-SHA256 turns it into two 32-byte keys, one per direction:
//!    `salt = min(pub_a, pub_b) || max(pub_a, pub_b)` (bytewise order, so both sides agree),
//!    `info = "p2p-voice v1 voice {sender_id}->{receiver_id}"`. A's send key is B's receive
//!    key and vice versa; the two directions never share a key.
//! 4. Every voice datagram is sealed with ChaCha20-Poly1305: the 13-byte voice header
//!    (type byte, sender id, sequence number, timestamp) is the associated data, the Opus
//!    payload is encrypted, and the 16-byte tag is appended. On the wire:
//!    `header (13) || ciphertext (n) || tag (16)`.
//! 5. The 12-byte nonce is the header without its type byte: `from || seq || timestamp`
//!    (big-endian, exactly as on the wire). `from` is fixed per directional key, so the nonce
//!    is unique as long as a key never seals the same sequence number twice. [`PeerCipher`]
//!    enforces that: sequence numbers passed to `seal` must increase (with wrap-around), and
//!    after 2^32 of them the cipher refuses to seal further (about 994 days of 20 ms frames).
//!    Sequence numbers must therefore not restart while the same [`SessionKeys`] are in use:
//!    a new sequence counter needs new session keys (and new `PeerCipher`s).
//! 6. The receiving side keeps a [`VoiceReplayWindow`] that is updated only by datagrams that
//!    authenticated, so forged packets cannot push the window forward and starve real ones.
//!
//! The metadata server relays public keys, so it could substitute its own (a man in the
//! middle). Each voice key is therefore signed by its owner's long-term identity key, and
//! peers check the signature and remember identity keys (see `crate::identity`); the UI shows
//! a [`safety_number`] over two identity keys that people can compare by other means. The
//! server never holds a key that decrypts voice.

use std::fmt;

use chacha20poly1305::{AeadInPlace, ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::replay::{ReplayVerdict, VoiceReplayWindow};
use crate::protocol::datagram::{
    voice_header, DatagramKind, MAX_VOICE_PAYLOAD, PEER_CONTROL_LEN, VOICE_HEADER_LEN,
};

/// Bytes the AEAD tag adds to every voice payload. A sealed payload is `plaintext + TAG_LEN`.
pub const TAG_LEN: usize = 16;

/// Length of an X25519 public key (and of a secret key).
pub const PUBLIC_KEY_LEN: usize = 32;

/// Largest plaintext (Opus frame) that still fits in a voice datagram once sealed.
pub const MAX_PLAINTEXT_LEN: usize = MAX_VOICE_PAYLOAD - TAG_LEN;

/// Prefix of the HKDF info string; the directional suffix is `" {sender}->{receiver}"`.
const KDF_LABEL: &str = "p2p-voice v1 voice";

/// Prefix of the HKDF info string for the keys that authenticate Punch, PunchAck, Ping and
/// Pong. Separate from the voice keys, so their nonces can never meet voice nonces.
const CONTROL_KDF_LABEL: &str = "p2p-voice v1 control";

/// Domain separation for [`safety_number`].
const SAFETY_LABEL: &[u8] = b"p2p-voice v2 identity safety number";

/// Sealed sequence numbers a key may cover before it must be replaced (all of `u32`).
const SEQUENCE_SPACE: u64 = 1 << 32;

/// Why keys could not be derived or a datagram could not be sealed or opened. Opening never
/// panics: every malformed, forged or replayed input maps to one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "peer {peer_id} sent a low-order public key (the shared secret would be all zeros); \
         refusing to talk to it"
    )]
    LowOrderPublicKey { peer_id: u32 },
    #[error("cannot derive voice keys between a peer and itself (both ids are {id})")]
    SamePeerId { id: u32 },
    #[error("voice header must be {VOICE_HEADER_LEN} bytes, got {len}")]
    HeaderLength { len: usize },
    #[error("header type byte {type_byte:#04x} is not a Voice datagram of this version")]
    NotVoiceHeader { type_byte: u8 },
    #[error("voice header names sender {found}, but this key is for sender {expected}")]
    WrongSender { expected: u32, found: u32 },
    #[error("voice payload of {len} bytes exceeds the {max}-byte limit", max = MAX_PLAINTEXT_LEN)]
    PlaintextTooLarge { len: usize },
    #[error("output buffer holds {available} bytes but {needed} are needed")]
    BufferTooSmall { needed: usize, available: usize },
    #[error("refusing to seal sequence number {seq}: it does not follow {last}, and reusing a sequence number would reuse an encryption nonce")]
    SequenceNotIncreasing { seq: u32, last: u32 },
    #[error("this key has sealed 2^32 sequence numbers; new session keys are needed")]
    SequenceSpaceExhausted,
    #[error("encrypted voice payload of {len} bytes is shorter than its {TAG_LEN}-byte tag")]
    Truncated { len: usize },
    #[error("voice sequence number {seq} already seen or too old (replay)")]
    Replay { seq: u32 },
    #[error("voice datagram failed authentication (wrong key, or header or payload altered)")]
    AuthenticationFailed,
    #[error("peer control datagram must be {PEER_CONTROL_LEN} bytes plus a {TAG_LEN}-byte tag, got {len}")]
    ControlLength { len: usize },
    #[error("peer control datagram names sender {found}, but this key is for sender {expected}")]
    ControlWrongSender { expected: u32, found: u32 },
}

/// This client's X25519 key pair for one session. Exists so one secret can do Diffie-Hellman
/// with every peer of the session; it is never serialized and is wiped from memory on drop.
///
/// Invariant: `public` is the public key of `secret`.
pub struct SessionKeys {
    secret: StaticSecret,
    public: PublicKey,
}

impl SessionKeys {
    /// A fresh key pair from the operating system's random number generator.
    pub fn generate() -> Self {
        Self::from_secret(StaticSecret::random_from_rng(rand::rngs::OsRng))
    }

    /// A key pair from fixed secret bytes (clamped as X25519 requires). For tests and test
    /// vectors; real sessions use [`SessionKeys::generate`].
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        Self::from_secret(StaticSecret::from(bytes))
    }

    fn from_secret(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// The public key to announce to peers.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.public.to_bytes()
    }

    /// [`fingerprint`] of our own public key, for the UI.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.public.as_bytes())
    }

    /// The raw X25519 result with `peer_public`, refusing non-contributory (all-zero) results.
    fn shared_secret(
        &self,
        peer_id: u32,
        peer_public: &[u8; PUBLIC_KEY_LEN],
    ) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(CryptoError::LowOrderPublicKey { peer_id });
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }
}

impl fmt::Debug for SessionKeys {
    /// Shows only the public fingerprint, never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A short human-checkable fingerprint of a public key: the first 8 bytes of its SHA-256 as
/// four groups of four lowercase hex digits, e.g. `a1b2-c3d4-e5f6-0718`.
pub fn fingerprint(public_key: &[u8; PUBLIC_KEY_LEN]) -> String {
    let digest = Sha256::digest(public_key);
    let mut s = String::with_capacity(19);
    for (i, pair) in digest[..8].chunks(2).enumerate() {
        if i > 0 {
            s.push('-');
        }
        for b in pair {
            s.push_str(&format!("{b:02x}"));
        }
    }
    s
}

/// One number for a pair of members to compare (read aloud, say): eight groups of five decimal
/// digits (about 133 bits) from SHA-512 over both members' long-term identity keys in
/// bytewise order. Both sides compute the same string; it changes if either key is
/// substituted. Taken over identity keys, not the per-session voice keys (which are new on
/// every join), so the number stays the same from one call to the next and comparing it once
/// means something; the voice keys are tied to the identity keys by their signatures.
pub fn safety_number(a: &[u8; PUBLIC_KEY_LEN], b: &[u8; PUBLIC_KEY_LEN]) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let digest = sha2::Sha512::new()
        .chain_update(SAFETY_LABEL)
        .chain_update(lo)
        .chain_update(hi)
        .finalize();
    let groups: Vec<String> = digest[..SAFETY_GROUPS * 5]
        .chunks(5)
        .map(|c| {
            // 40 bits reduced mod 10^5: the bias is below 10^-7, irrelevant for comparison.
            let v = c.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", v % 100_000)
        })
        .collect();
    groups.join(" ")
}

/// Groups of five digits in a [`safety_number`]: 8 x log2(10^5) = 132.9 bits.
pub const SAFETY_GROUPS: usize = 8;

/// Send and receive keys derived for one peer. Wiped on drop.
struct DirectionalKeys {
    send: Zeroizing<[u8; 32]>,
    recv: Zeroizing<[u8; 32]>,
    control_send: Zeroizing<[u8; 32]>,
    control_recv: Zeroizing<[u8; 32]>,
}

fn derive_keys(
    keys: &SessionKeys,
    our_id: u32,
    peer_id: u32,
    peer_public: &[u8; PUBLIC_KEY_LEN],
) -> Result<DirectionalKeys, CryptoError> {
    let hkdf = pair_hkdf(keys, our_id, peer_id, peer_public)?;
    Ok(DirectionalKeys {
        send: expand(&hkdf, KDF_LABEL, our_id, peer_id),
        recv: expand(&hkdf, KDF_LABEL, peer_id, our_id),
        control_send: expand(&hkdf, CONTROL_KDF_LABEL, our_id, peer_id),
        control_recv: expand(&hkdf, CONTROL_KDF_LABEL, peer_id, our_id),
    })
}

/// A pair's send key and receive key, in that order. Wiped on drop.
pub(super) type SendAndReceive = (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>);

/// The send and receive keys of one pair under `label`, derived exactly like the voice keys
/// (same salt and directional info string, `"{label} {sender}->{receiver}"`), for planes that
/// keep keys of their own (the text chat, `super::chat_cipher`). A distinct label gives keys
/// independent of every other label's, so nonces of one plane never meet another's key.
pub(super) fn pair_keys(
    keys: &SessionKeys,
    our_id: u32,
    peer_id: u32,
    peer_public: &[u8; PUBLIC_KEY_LEN],
    label: &str,
) -> Result<SendAndReceive, CryptoError> {
    let hkdf = pair_hkdf(keys, our_id, peer_id, peer_public)?;
    Ok((
        expand(&hkdf, label, our_id, peer_id),
        expand(&hkdf, label, peer_id, our_id),
    ))
}

/// HKDF over the pair's X25519 secret, salted with both public keys in bytewise order (so
/// both sides agree): the one root every key of the pair is expanded from.
fn pair_hkdf(
    keys: &SessionKeys,
    our_id: u32,
    peer_id: u32,
    peer_public: &[u8; PUBLIC_KEY_LEN],
) -> Result<Hkdf<Sha256>, CryptoError> {
    if our_id == peer_id {
        return Err(CryptoError::SamePeerId { id: our_id });
    }
    let shared = keys.shared_secret(peer_id, peer_public)?;
    let ours = keys.public_key();
    let (lo, hi) = if ours <= *peer_public {
        (ours, *peer_public)
    } else {
        (*peer_public, ours)
    };
    let mut salt = [0u8; 2 * PUBLIC_KEY_LEN];
    salt[..PUBLIC_KEY_LEN].copy_from_slice(&lo);
    salt[PUBLIC_KEY_LEN..].copy_from_slice(&hi);
    Ok(Hkdf::<Sha256>::new(Some(&salt), &shared[..]))
}

/// One directional key: `info = "{label} {sender}->{receiver}"`.
fn expand(hkdf: &Hkdf<Sha256>, label: &str, sender: u32, receiver: u32) -> Zeroizing<[u8; 32]> {
    let info = format!("{label} {sender}->{receiver}");
    let mut okm = Zeroizing::new([0u8; 32]);
    hkdf.expand(info.as_bytes(), &mut okm[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// The fields of a voice header that the cipher needs.
struct HeaderFields {
    from: u32,
    seq: u32,
    nonce: [u8; 12],
}

fn parse_header(header: &[u8]) -> Result<HeaderFields, CryptoError> {
    if header.len() != VOICE_HEADER_LEN {
        return Err(CryptoError::HeaderLength { len: header.len() });
    }
    if header[0] != DatagramKind::Voice.type_byte() {
        return Err(CryptoError::NotVoiceHeader {
            type_byte: header[0],
        });
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&header[1..13]);
    let from = u32::from_be_bytes([nonce[0], nonce[1], nonce[2], nonce[3]]);
    let seq = u32::from_be_bytes([nonce[4], nonce[5], nonce[6], nonce[7]]);
    Ok(HeaderFields { from, seq, nonce })
}

/// Encrypts our voice for one peer and decrypts theirs. One per peer per session.
///
/// Invariants: the send and receive keys differ and match the peer's receive and send keys;
/// `seal` never uses a sequence number twice (so never a nonce twice); the replay window only
/// ever records sequence numbers of datagrams that authenticated.
pub struct PeerCipher {
    our_id: u32,
    peer_id: u32,
    peer_public: [u8; PUBLIC_KEY_LEN],
    send: ChaCha20Poly1305,
    recv: ChaCha20Poly1305,
    control_send: ChaCha20Poly1305,
    control_recv: ChaCha20Poly1305,
    /// Sequence number of the last sealed datagram.
    last_sealed: Option<u32>,
    /// How far sealed sequence numbers have advanced since the first one (< 2^32).
    sealed_span: u64,
    replay: VoiceReplayWindow,
    auth_failures: u64,
}

impl PeerCipher {
    /// Derives the keys for talking with `peer_id`, whose announced public key is
    /// `peer_public`. Fails for a low-order key or when both ids are equal.
    pub fn new(
        keys: &SessionKeys,
        our_id: u32,
        peer_id: u32,
        peer_public: [u8; PUBLIC_KEY_LEN],
    ) -> Result<Self, CryptoError> {
        let derived = derive_keys(keys, our_id, peer_id, &peer_public)?;
        Ok(Self {
            our_id,
            peer_id,
            peer_public,
            send: ChaCha20Poly1305::new(Key::from_slice(&derived.send[..])),
            recv: ChaCha20Poly1305::new(Key::from_slice(&derived.recv[..])),
            control_send: ChaCha20Poly1305::new(Key::from_slice(&derived.control_send[..])),
            control_recv: ChaCha20Poly1305::new(Key::from_slice(&derived.control_recv[..])),
            last_sealed: None,
            sealed_span: 0,
            replay: VoiceReplayWindow::new(),
            auth_failures: 0,
        })
    }

    pub fn our_id(&self) -> u32 {
        self.our_id
    }

    pub fn peer_id(&self) -> u32 {
        self.peer_id
    }

    /// The public key the keys were derived from.
    pub fn peer_public(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.peer_public
    }

    /// [`fingerprint`] of the peer's public key, for the UI.
    pub fn peer_fingerprint(&self) -> String {
        fingerprint(&self.peer_public)
    }

    /// Replay bookkeeping of received voice. `accepted` counts authenticated datagrams;
    /// `duplicates` and `too_old` count datagrams dropped before authentication was tried.
    pub fn replay_window(&self) -> &VoiceReplayWindow {
        &self.replay
    }

    /// Datagrams that carried this peer's id but failed authentication.
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures
    }

    /// Encrypts `plaintext` into `out` with `header` (a Voice header from us, see
    /// `voice_header`) as associated data. Writes `ciphertext || tag` and returns its length,
    /// `plaintext.len() + TAG_LEN`. The header's sequence number must follow the previous
    /// sealed one (wrap-around allowed); nothing is written or recorded on error.
    pub fn seal(
        &mut self,
        header: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        let h = parse_header(header)?;
        if h.from != self.our_id {
            return Err(CryptoError::WrongSender {
                expected: self.our_id,
                found: h.from,
            });
        }
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(CryptoError::PlaintextTooLarge {
                len: plaintext.len(),
            });
        }
        let needed = plaintext.len() + TAG_LEN;
        if out.len() < needed {
            return Err(CryptoError::BufferTooSmall {
                needed,
                available: out.len(),
            });
        }
        let span = self.next_sealed_span(h.seq)?;
        let (body, rest) = out.split_at_mut(plaintext.len());
        body.copy_from_slice(plaintext);
        let tag = self
            .send
            .encrypt_in_place_detached(Nonce::from_slice(&h.nonce), header, body)
            // Only fails for buffers beyond ChaCha20's 256 GiB limit, excluded above.
            .map_err(|_| CryptoError::PlaintextTooLarge {
                len: plaintext.len(),
            })?;
        rest[..TAG_LEN].copy_from_slice(&tag);
        self.last_sealed = Some(h.seq);
        self.sealed_span = span;
        Ok(needed)
    }

    /// Writes a whole sealed Voice datagram `header || ciphertext || tag` from us into `out`
    /// and returns its length.
    pub fn seal_datagram(
        &mut self,
        seq: u32,
        timestamp: u32,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        let needed = VOICE_HEADER_LEN + plaintext.len() + TAG_LEN;
        if out.len() < needed {
            return Err(CryptoError::BufferTooSmall {
                needed,
                available: out.len(),
            });
        }
        let header = voice_header(self.our_id, seq, timestamp);
        let (head, body) = out.split_at_mut(VOICE_HEADER_LEN);
        let n = self.seal(&header, plaintext, body)?;
        head.copy_from_slice(&header);
        Ok(VOICE_HEADER_LEN + n)
    }

    /// Verifies and decrypts `ciphertext` (`encrypted payload || tag`) sent by the peer under
    /// `header`, writing the plaintext into `out` and returning its length. Refuses datagrams
    /// that are truncated, not from this peer, replayed, or altered in any byte; `out` holds
    /// no unauthenticated plaintext afterwards. Never panics.
    pub fn open(
        &mut self,
        header: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        let h = parse_header(header)?;
        if h.from != self.peer_id {
            return Err(CryptoError::WrongSender {
                expected: self.peer_id,
                found: h.from,
            });
        }
        let Some(len) = ciphertext.len().checked_sub(TAG_LEN) else {
            return Err(CryptoError::Truncated {
                len: ciphertext.len(),
            });
        };
        if out.len() < len {
            return Err(CryptoError::BufferTooSmall {
                needed: len,
                available: out.len(),
            });
        }
        // Classify on a copy: only an authenticated datagram may move the window.
        let mut window = self.replay;
        if window.check_and_update(h.seq) != ReplayVerdict::Fresh {
            // A non-fresh verdict changed only the counters.
            self.replay = window;
            return Err(CryptoError::Replay { seq: h.seq });
        }
        let (body_in, tag) = ciphertext.split_at(len);
        let body = &mut out[..len];
        body.copy_from_slice(body_in);
        match self.recv.decrypt_in_place_detached(
            Nonce::from_slice(&h.nonce),
            header,
            body,
            Tag::from_slice(tag),
        ) {
            Ok(()) => {
                self.replay = window;
                Ok(len)
            }
            Err(_) => {
                body.fill(0);
                self.auth_failures += 1;
                Err(CryptoError::AuthenticationFailed)
            }
        }
    }

    /// Opens a whole received Voice datagram (`header || ciphertext || tag`).
    pub fn open_datagram(&mut self, datagram: &[u8], out: &mut [u8]) -> Result<usize, CryptoError> {
        if datagram.len() < VOICE_HEADER_LEN {
            return Err(CryptoError::HeaderLength {
                len: datagram.len(),
            });
        }
        let (header, ciphertext) = datagram.split_at(VOICE_HEADER_LEN);
        self.open(header, ciphertext, out)
    }

    /// The tag that goes after a Punch, PunchAck, Ping or Pong we send to this peer
    /// (`datagram` is its [`PEER_CONTROL_LEN`] bytes). Without it anyone who knows two user
    /// ids could spoof a punch and have a client adopt, and stream its voice to, any address.
    ///
    /// The datagram is the associated data of an empty message. The nonce is the kind byte and
    /// the datagram's 64-bit value (punch nonce or ping time); sender and receiver are fixed per
    /// key, so two different datagrams never share a nonce, and the same datagram sent twice
    /// only repeats the same tag.
    pub fn tag_control(
        &self,
        datagram: &[u8; PEER_CONTROL_LEN],
    ) -> Result<[u8; TAG_LEN], CryptoError> {
        let from = u32::from_be_bytes([datagram[1], datagram[2], datagram[3], datagram[4]]);
        if from != self.our_id {
            return Err(CryptoError::ControlWrongSender {
                expected: self.our_id,
                found: from,
            });
        }
        let tag = self
            .control_send
            .encrypt_in_place_detached(&control_nonce(datagram), datagram, &mut [])
            .map_err(|_| CryptoError::AuthenticationFailed)?;
        Ok(tag.into())
    }

    /// Checks a received `control datagram || tag` from this peer; returns the datagram.
    pub fn verify_control<'a>(&mut self, wire: &'a [u8]) -> Result<&'a [u8], CryptoError> {
        if wire.len() != PEER_CONTROL_LEN + TAG_LEN {
            return Err(CryptoError::ControlLength { len: wire.len() });
        }
        let (datagram, tag) = wire.split_at(PEER_CONTROL_LEN);
        let from = u32::from_be_bytes([datagram[1], datagram[2], datagram[3], datagram[4]]);
        if from != self.peer_id {
            return Err(CryptoError::ControlWrongSender {
                expected: self.peer_id,
                found: from,
            });
        }
        let fixed: &[u8; PEER_CONTROL_LEN] = datagram.try_into().expect("split at the length");
        match self.control_recv.decrypt_in_place_detached(
            &control_nonce(fixed),
            datagram,
            &mut [],
            Tag::from_slice(tag),
        ) {
            Ok(()) => Ok(datagram),
            Err(_) => {
                self.auth_failures += 1;
                Err(CryptoError::AuthenticationFailed)
            }
        }
    }

    /// The sealed span after sealing `seq`, or why `seq` may not be sealed.
    fn next_sealed_span(&self, seq: u32) -> Result<u64, CryptoError> {
        let Some(last) = self.last_sealed else {
            return Ok(0);
        };
        let ahead = seq.wrapping_sub(last);
        if ahead == 0 || ahead >= 1 << 31 {
            return Err(CryptoError::SequenceNotIncreasing { seq, last });
        }
        let span = self.sealed_span + u64::from(ahead);
        if span >= SEQUENCE_SPACE {
            return Err(CryptoError::SequenceSpaceExhausted);
        }
        Ok(span)
    }
}

/// Nonce of a peer control datagram: its type byte, three zero bytes, its 64-bit value.
fn control_nonce(datagram: &[u8; PEER_CONTROL_LEN]) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[0] = datagram[0];
    nonce[4..].copy_from_slice(&datagram[9..17]);
    *Nonce::from_slice(&nonce)
}

impl fmt::Debug for PeerCipher {
    /// Never shows key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCipher")
            .field("our_id", &self.our_id)
            .field("peer_id", &self.peer_id)
            .field("peer_fingerprint", &self.peer_fingerprint())
            .field("last_sealed", &self.last_sealed)
            .field("replay", &self.replay)
            .field("auth_failures", &self.auth_failures)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::datagram::Datagram;
    use proptest::prelude::*;

    const A: u32 = 7;
    const B: u32 = 42;

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// RFC 7748 section 6.1 key pairs.
    fn alice() -> SessionKeys {
        SessionKeys::from_secret_bytes(hex32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ))
    }

    fn bob() -> SessionKeys {
        SessionKeys::from_secret_bytes(hex32(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ))
    }

    fn pair() -> (PeerCipher, PeerCipher) {
        let (a, b) = (alice(), bob());
        (
            PeerCipher::new(&a, A, B, b.public_key()).unwrap(),
            PeerCipher::new(&b, B, A, a.public_key()).unwrap(),
        )
    }

    fn punch(from: u32, to: u32, nonce: u64) -> [u8; PEER_CONTROL_LEN] {
        let mut buf = [0u8; 64];
        let n = Datagram::Punch { from, to, nonce }.write(&mut buf).unwrap();
        buf[..n].try_into().unwrap()
    }

    fn tagged(c: &PeerCipher, d: &[u8; PEER_CONTROL_LEN]) -> Vec<u8> {
        let mut wire = d.to_vec();
        wire.extend_from_slice(&c.tag_control(d).unwrap());
        wire
    }

    #[test]
    fn control_tags_verify_only_for_the_right_peer_and_bytes() {
        let (a, mut b) = pair();
        let d = punch(A, B, 0xDEAD_BEEF);
        let wire = tagged(&a, &d);
        assert_eq!(b.verify_control(&wire).unwrap(), &d[..]);
        // Any changed bit fails: header, value, tag.
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x01;
            assert!(b.verify_control(&bad).is_err(), "byte {i}");
        }
        // Untagged, or with a tag of zeros (what a spoofer without the key can send).
        assert_eq!(
            b.verify_control(&d),
            Err(CryptoError::ControlLength {
                len: PEER_CONTROL_LEN
            })
        );
        let mut zeros = d.to_vec();
        zeros.extend_from_slice(&[0u8; TAG_LEN]);
        assert_eq!(
            b.verify_control(&zeros),
            Err(CryptoError::AuthenticationFailed)
        );
        // A tag is good in one direction only, and a third party's key does not help.
        let (mut a2, _) = pair();
        assert!(a2.verify_control(&wire).is_err());
        let eve = SessionKeys::generate();
        let mallory = PeerCipher::new(&eve, A, B, b.peer_public()).unwrap();
        assert!(b.verify_control(&tagged(&mallory, &d)).is_err());
    }

    #[test]
    fn control_tags_refuse_a_foreign_sender() {
        let (a, _) = pair();
        assert_eq!(
            a.tag_control(&punch(B, A, 1)),
            Err(CryptoError::ControlWrongSender {
                expected: A,
                found: B
            })
        );
    }

    fn sealed(c: &mut PeerCipher, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut buf = [0u8; 1400];
        let n = c.seal_datagram(seq, seq * 960, payload, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn key_pairs_and_shared_secret_match_the_rfc_7748_vectors() {
        let (a, b) = (alice(), bob());
        assert_eq!(
            a.public_key(),
            hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            b.public_key(),
            hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
        let expected = hex32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(*a.shared_secret(B, &b.public_key()).unwrap(), expected);
        assert_eq!(*b.shared_secret(A, &a.public_key()).unwrap(), expected);
    }

    #[test]
    fn both_sides_derive_matching_directional_keys() {
        let (a, b) = (alice(), bob());
        let ka = derive_keys(&a, A, B, &b.public_key()).unwrap();
        let kb = derive_keys(&b, B, A, &a.public_key()).unwrap();
        assert_eq!(*ka.send, *kb.recv);
        assert_eq!(*ka.recv, *kb.send);
    }

    #[test]
    fn the_two_directions_use_different_keys() {
        let (a, b) = (alice(), bob());
        let ka = derive_keys(&a, A, B, &b.public_key()).unwrap();
        assert_ne!(*ka.send, *ka.recv);
        // The keys also depend on the ids: another pair of ids gives other keys.
        let other = derive_keys(&a, A + 1, B, &b.public_key()).unwrap();
        assert_ne!(*ka.send, *other.send);
        assert_ne!(*ka.recv, *other.recv);
    }

    #[test]
    fn voice_round_trips_in_both_directions_and_parses_as_a_voice_datagram() {
        let (mut a, mut b) = pair();
        let mut out = [0u8; MAX_PLAINTEXT_LEN];
        for seq in 0..20u32 {
            let payload: Vec<u8> = (0..(seq as usize * 7)).map(|i| i as u8 ^ 0x5a).collect();
            let d = sealed(&mut a, seq, &payload);
            assert_eq!(d.len(), VOICE_HEADER_LEN + payload.len() + TAG_LEN);
            match Datagram::parse(&d).unwrap() {
                Datagram::Voice {
                    from,
                    seq: s,
                    payload: p,
                    ..
                } => {
                    assert_eq!((from, s), (A, seq));
                    assert_eq!(p.len(), payload.len() + TAG_LEN);
                    if !payload.is_empty() {
                        assert_ne!(&p[..payload.len()], &payload[..], "payload is encrypted");
                    }
                }
                other => panic!("not a voice datagram: {other:?}"),
            }
            let n = b.open_datagram(&d, &mut out).unwrap();
            assert_eq!(&out[..n], &payload[..]);

            let back = sealed(&mut b, seq, &payload);
            let n = a.open_datagram(&back, &mut out).unwrap();
            assert_eq!(&out[..n], &payload[..]);
        }
        assert_eq!(b.replay_window().accepted, 20);
    }

    #[test]
    fn seal_and_open_with_separate_header_match_seal_datagram() {
        let (mut a, mut b) = pair();
        let header = voice_header(A, 5, 4800);
        let mut ct = [0u8; 100];
        let n = a.seal(&header, b"opus frame", &mut ct).unwrap();
        assert_eq!(n, 10 + TAG_LEN);
        let mut out = [0u8; 10];
        assert_eq!(b.open(&header, &ct[..n], &mut out), Ok(10));
        assert_eq!(&out, b"opus frame");
    }

    #[test]
    fn altering_any_header_byte_makes_open_fail_and_leaves_the_window_untouched() {
        let (mut a, mut b) = pair();
        let d = sealed(
            &mut a,
            3,
            b"sixty bytes of opus, more or less....................",
        );
        let mut out = [0u8; 128];
        for i in 0..VOICE_HEADER_LEN {
            for bit in 0..8 {
                let mut t = d.clone();
                t[i] ^= 1 << bit;
                assert!(b.open_datagram(&t, &mut out).is_err(), "byte {i} bit {bit}");
            }
        }
        // Changes to seq and timestamp reach the AEAD and fail authentication.
        assert_eq!(b.auth_failures(), 8 * 8);
        assert_eq!(b.replay_window().highest(), None);
        assert!(b.open_datagram(&d, &mut out).is_ok());
    }

    #[test]
    fn altering_any_ciphertext_or_tag_byte_makes_open_fail() {
        let (mut a, mut b) = pair();
        let d = sealed(&mut a, 1, &[0x11; 60]);
        let mut out = [0u8; 128];
        for i in VOICE_HEADER_LEN..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x80;
            assert_eq!(
                b.open_datagram(&t, &mut out),
                Err(CryptoError::AuthenticationFailed),
                "byte {i}"
            );
            assert!(out.iter().all(|&x| x == 0), "no unauthenticated plaintext");
        }
        assert!(b.open_datagram(&d, &mut out).is_ok());
    }

    #[test]
    fn truncated_datagrams_are_refused() {
        let (mut a, mut b) = pair();
        let d = sealed(&mut a, 1, &[0x22; 60]);
        let mut out = [0u8; 128];
        for len in 0..d.len() {
            let r = b.open_datagram(&d[..len], &mut out);
            let expected_kind = match len {
                l if l < VOICE_HEADER_LEN => matches!(r, Err(CryptoError::HeaderLength { .. })),
                l if l < VOICE_HEADER_LEN + TAG_LEN => {
                    matches!(r, Err(CryptoError::Truncated { .. }))
                }
                _ => r == Err(CryptoError::AuthenticationFailed),
            };
            assert!(expected_kind, "len {len}: {r:?}");
        }
    }

    #[test]
    fn a_third_party_with_its_own_keys_cannot_open() {
        let (mut a, _) = pair();
        let eve = SessionKeys::generate();
        let mut eavesdropper = PeerCipher::new(&eve, B, A, alice().public_key()).unwrap();
        let d = sealed(&mut a, 1, b"secret words");
        let mut out = [0u8; 64];
        assert_eq!(
            eavesdropper.open_datagram(&d, &mut out),
            Err(CryptoError::AuthenticationFailed)
        );
    }

    #[test]
    fn zero_and_low_order_public_keys_are_refused() {
        let p = |first: u8, last: u8| {
            let mut k = [0xffu8; 32];
            k[0] = first;
            k[31] = last;
            k
        };
        let low_order = [
            [0u8; 32],
            {
                let mut k = [0u8; 32];
                k[0] = 1;
                k
            },
            hex32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex32("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            p(0xec, 0x7f), // p - 1
            p(0xed, 0x7f), // p
            p(0xee, 0x7f), // p + 1
        ];
        let a = alice();
        for key in low_order {
            assert_eq!(
                PeerCipher::new(&a, A, B, key).err(),
                Some(CryptoError::LowOrderPublicKey { peer_id: B }),
                "{key:02x?}"
            );
        }
    }

    #[test]
    fn a_cipher_with_ourselves_is_refused() {
        let a = alice();
        assert_eq!(
            PeerCipher::new(&a, A, A, bob().public_key()).err(),
            Some(CryptoError::SamePeerId { id: A })
        );
    }

    #[test]
    fn replays_are_refused_but_reordering_is_accepted() {
        let (mut a, mut b) = pair();
        let d: Vec<Vec<u8>> = (10..14)
            .map(|s| sealed(&mut a, s, &[s as u8; 30]))
            .collect();
        let mut out = [0u8; 64];
        assert!(b.open_datagram(&d[1], &mut out).is_ok());
        assert!(b.open_datagram(&d[0], &mut out).is_ok());
        assert!(b.open_datagram(&d[3], &mut out).is_ok());
        assert_eq!(
            b.open_datagram(&d[1], &mut out),
            Err(CryptoError::Replay { seq: 11 })
        );
        assert!(b.open_datagram(&d[2], &mut out).is_ok());
        assert_eq!(
            b.open_datagram(&d[2], &mut out),
            Err(CryptoError::Replay { seq: 12 })
        );
        assert_eq!(b.replay_window().accepted, 4);
        assert_eq!(b.replay_window().duplicates, 2);
    }

    #[test]
    fn a_forged_datagram_far_ahead_does_not_advance_the_replay_window() {
        let (mut a, mut b) = pair();
        let mut out = [0u8; 64];
        assert!(b.open_datagram(&sealed(&mut a, 1, b"x"), &mut out).is_ok());
        let mut forged = voice_header(A, 1_000_000, 0).to_vec();
        forged.extend_from_slice(&[0u8; 40]);
        assert_eq!(
            b.open_datagram(&forged, &mut out),
            Err(CryptoError::AuthenticationFailed)
        );
        assert_eq!(b.replay_window().highest(), Some(1));
        assert!(b.open_datagram(&sealed(&mut a, 2, b"y"), &mut out).is_ok());
    }

    #[test]
    fn seal_refuses_repeated_or_backward_sequence_numbers_but_follows_wrap_around() {
        let (mut a, mut b) = pair();
        let mut buf = [0u8; 64];
        let mut out = [0u8; 64];
        assert!(a.seal_datagram(u32::MAX - 1, 0, b"a", &mut buf).is_ok());
        assert_eq!(
            a.seal_datagram(u32::MAX - 1, 960, b"b", &mut buf),
            Err(CryptoError::SequenceNotIncreasing {
                seq: u32::MAX - 1,
                last: u32::MAX - 1
            })
        );
        assert_eq!(
            a.seal_datagram(5, 960, b"b", &mut buf),
            Ok(VOICE_HEADER_LEN + 1 + TAG_LEN),
            "5 follows u32::MAX - 1 across the wrap"
        );
        assert!(b
            .open_datagram(&buf[..VOICE_HEADER_LEN + 1 + TAG_LEN], &mut out)
            .is_ok());
        assert_eq!(
            a.seal_datagram(4, 960, b"c", &mut buf),
            Err(CryptoError::SequenceNotIncreasing { seq: 4, last: 5 })
        );
    }

    #[test]
    fn seal_stops_before_a_sequence_number_could_come_around_again() {
        let (mut a, _) = pair();
        let mut buf = [0u8; 64];
        let step = (1u32 << 31) - 1;
        assert!(a.seal_datagram(0, 0, b"", &mut buf).is_ok());
        assert!(a.seal_datagram(step, 0, b"", &mut buf).is_ok());
        assert!(a
            .seal_datagram(step.wrapping_mul(2), 0, b"", &mut buf)
            .is_ok());
        // 2^32 - 1: the last sequence number not yet used with this key.
        assert!(a.seal_datagram(u32::MAX, 0, b"", &mut buf).is_ok());
        assert_eq!(
            a.seal_datagram(0, 0, b"", &mut buf),
            Err(CryptoError::SequenceSpaceExhausted)
        );
    }

    #[test]
    fn headers_naming_another_sender_are_refused() {
        let (mut a, mut b) = pair();
        let mut buf = [0u8; 64];
        assert_eq!(
            a.seal(&voice_header(B, 1, 0), b"x", &mut buf),
            Err(CryptoError::WrongSender {
                expected: A,
                found: B
            })
        );
        let d = sealed(&mut b, 1, b"x");
        // B's own datagram reflected back to B.
        assert_eq!(
            b.open_datagram(&d, &mut buf),
            Err(CryptoError::WrongSender {
                expected: A,
                found: B
            })
        );
        let mut not_voice = voice_header(A, 1, 0);
        not_voice[0] = DatagramKind::Ping.type_byte();
        assert!(matches!(
            a.seal(&not_voice, b"x", &mut buf),
            Err(CryptoError::NotVoiceHeader { .. })
        ));
    }

    #[test]
    fn short_buffers_and_oversized_payloads_are_errors_and_consume_no_sequence_number() {
        let (mut a, mut b) = pair();
        let header = voice_header(A, 1, 0);
        let mut small = [0u8; 5 + TAG_LEN];
        assert_eq!(
            a.seal(&header, &[0u8; 5], &mut small),
            Ok(5 + TAG_LEN),
            "exactly enough room"
        );
        let header = voice_header(A, 2, 0);
        assert_eq!(
            a.seal(&header, &[0u8; 6], &mut small),
            Err(CryptoError::BufferTooSmall {
                needed: 6 + TAG_LEN,
                available: 5 + TAG_LEN
            })
        );
        let big = vec![0u8; MAX_PLAINTEXT_LEN + 1];
        let mut huge = vec![0u8; 4096];
        assert_eq!(
            a.seal(&voice_header(A, 2, 0), &big, &mut huge),
            Err(CryptoError::PlaintextTooLarge {
                len: MAX_PLAINTEXT_LEN + 1
            })
        );
        // Sequence 2 was never sealed, so it is still available.
        let n = a
            .seal(&voice_header(A, 2, 0), &[9u8; 4], &mut small)
            .unwrap();
        let mut out = [0u8; 3];
        assert_eq!(
            b.open(&voice_header(A, 2, 0), &small[..n], &mut out),
            Err(CryptoError::BufferTooSmall {
                needed: 4,
                available: 3
            })
        );
        let mut out = [0u8; 4];
        assert_eq!(b.open(&voice_header(A, 2, 0), &small[..n], &mut out), Ok(4));
        let max = vec![1u8; MAX_PLAINTEXT_LEN];
        let n = a.seal_datagram(3, 0, &max, &mut huge).unwrap();
        assert_eq!(n, crate::protocol::datagram::MAX_DATAGRAM_LEN);
    }

    #[test]
    fn fingerprints_are_four_hex_groups_and_differ_between_keys() {
        let (a, b) = (alice(), bob());
        let fa = fingerprint(&a.public_key());
        assert_eq!(fa.len(), 19);
        let groups: Vec<&str> = fa.split('-').collect();
        assert_eq!(groups.len(), 4);
        assert!(groups.iter().all(|g| g.len() == 4
            && g.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())));
        let digest = Sha256::digest(a.public_key());
        assert_eq!(u8::from_str_radix(&fa[..2], 16).unwrap(), digest[0]);
        assert_eq!(u8::from_str_radix(&fa[17..19], 16).unwrap(), digest[7]);
        assert_eq!(fa, a.fingerprint());
        assert_ne!(fa, fingerprint(&b.public_key()));
        let (pa, _) = pair();
        assert_eq!(pa.peer_fingerprint(), b.fingerprint());
        assert!(
            format!("{a:?}").contains(&fa),
            "Debug shows the fingerprint"
        );
    }

    #[test]
    fn safety_numbers_agree_on_both_sides_and_change_with_either_key() {
        let (a, b) = (alice(), bob());
        let (pa, pb) = (a.public_key(), b.public_key());
        let n = safety_number(&pa, &pb);
        assert_eq!(n, safety_number(&pb, &pa));
        let groups: Vec<&str> = n.split(' ').collect();
        assert_eq!(groups.len(), SAFETY_GROUPS);
        assert!(SAFETY_GROUPS as f64 * 100_000f64.log2() >= 128.0);
        assert!(groups
            .iter()
            .all(|g| g.len() == 5 && g.chars().all(|c| c.is_ascii_digit())));
        let mallory = SessionKeys::generate().public_key();
        assert_ne!(n, safety_number(&pa, &mallory));
        assert_ne!(n, safety_number(&mallory, &pb));
    }

    #[test]
    fn generated_keys_are_distinct_and_interoperate() {
        let (x, y) = (SessionKeys::generate(), SessionKeys::generate());
        assert_ne!(x.public_key(), y.public_key());
        let mut cx = PeerCipher::new(&x, 1, 2, y.public_key()).unwrap();
        let mut cy = PeerCipher::new(&y, 2, 1, x.public_key()).unwrap();
        let mut buf = [0u8; 64];
        let n = cx.seal_datagram(0, 0, b"hi", &mut buf).unwrap();
        let mut out = [0u8; 2];
        assert_eq!(cy.open_datagram(&buf[..n], &mut out), Ok(2));
        assert_eq!(&out, b"hi");
    }

    #[test]
    fn errors_read_as_sentences() {
        assert_eq!(
            CryptoError::LowOrderPublicKey { peer_id: 3 }.to_string(),
            "peer 3 sent a low-order public key (the shared secret would be all zeros); \
             refusing to talk to it"
        );
        assert_eq!(
            CryptoError::Truncated { len: 5 }.to_string(),
            "encrypted voice payload of 5 bytes is shorter than its 16-byte tag"
        );
    }

    /// Timing of seal + open for a 60-byte payload (a 20 ms Opus frame at ~24 kbit/s).
    /// Run: `cargo test --release -- --ignored --nocapture seal_and_open_timing`.
    #[test]
    #[ignore]
    fn seal_and_open_timing() {
        let (mut a, mut b) = pair();
        let payload = [0x33u8; 60];
        let mut buf = [0u8; 128];
        let mut out = [0u8; 60];
        let iterations = 200_000u32;
        let start = std::time::Instant::now();
        for seq in 0..iterations {
            let n = a.seal_datagram(seq, seq, &payload, &mut buf).unwrap();
            assert_eq!(b.open_datagram(&buf[..n], &mut out), Ok(60));
        }
        let per = start.elapsed() / iterations;
        println!("seal + open of a 60-byte payload: {per:?} per datagram");
        let start = std::time::Instant::now();
        for _ in 0..1_000 {
            std::hint::black_box(PeerCipher::new(&alice(), A, B, bob().public_key()).unwrap());
        }
        println!("PeerCipher::new: {:?}", start.elapsed() / 1_000);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_open(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            out_len in 0usize..256,
        ) {
            let (_, mut b) = pair();
            let mut out = vec![0u8; out_len];
            prop_assert!(b.open_datagram(&bytes, &mut out).is_err());
            let split = bytes.len().min(VOICE_HEADER_LEN);
            prop_assert!(b.open(&bytes[..split], &bytes[split..], &mut out).is_err());
        }

        #[test]
        fn arbitrary_payloads_behind_a_valid_header_never_open(
            seq in any::<u32>(),
            timestamp in any::<u32>(),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let (_, mut b) = pair();
            let mut d = voice_header(A, seq, timestamp).to_vec();
            d.extend_from_slice(&body);
            let mut out = [0u8; 256];
            prop_assert!(b.open_datagram(&d, &mut out).is_err());
        }

        #[test]
        fn any_payload_round_trips(
            seq in any::<u32>(),
            timestamp in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..=MAX_PLAINTEXT_LEN),
        ) {
            let (mut a, mut b) = pair();
            let mut buf = [0u8; 1400];
            let n = a.seal_datagram(seq, timestamp, &payload, &mut buf).unwrap();
            let mut out = [0u8; MAX_PLAINTEXT_LEN];
            let m = b.open_datagram(&buf[..n], &mut out).unwrap();
            prop_assert_eq!(&out[..m], &payload[..]);
        }
    }
}
