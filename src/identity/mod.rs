//! Long-term identities: who a peer is across sessions, checked by the peers themselves.
//!
//! The metadata server hands out user ids, names, addresses and voice keys, so on its own it
//! could swap a member's voice key for its own and sit in the middle of a call. To rule that
//! out every user has an Ed25519 identity key pair that lives in their config directory
//! ([`store`]) and never changes, and signs each session's X25519 voice key with it
//! ([`sign_voice_key`]). Peers check the signature ([`verify_voice_key`]) before they derive a
//! cipher from the voice key, and remember each (server, username)'s identity key on first
//! sight, like SSH's known_hosts ([`trust::PeerTrust`]): a server that later presents another
//! identity key for a known member is caught, and a server that presents someone's real
//! identity key with a voice key of its own cannot sign it. What is left to trust on first
//! use is the very first contact; the [`safety_number`] of two identity keys, compared by
//! other means (read aloud, say), closes that gap.
//!
//! Pure: no I/O (the key file and the trust file are [`store`]'s, the shell's).

pub mod gate;
#[cfg(feature = "app")]
pub mod store;
pub mod trust;

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

pub use crate::protocol::VoiceKeyProof;

/// Length of an Ed25519 public (verifying) key.
pub const IDENTITY_KEY_LEN: usize = 32;

/// Domain separation of voice-key signatures: a signature made for this purpose can never be
/// taken for a signature of anything else this key may sign one day (chat, say).
const VOICE_KEY_LABEL: &[u8] = b"p2p-voice v1 voice key signature";

/// Why a peer's voice key was refused. The peer gets no cipher (so no voice, in either
/// direction) until a key that checks out arrives; it is never accepted unchecked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{username} announced a voice key without an identity signature; refusing it")]
    MissingProof { username: String },
    #[error("{username}'s identity key is not a valid Ed25519 public key; refusing it")]
    MalformedIdentityKey { username: String },
    #[error(
        "{username}'s voice key is not signed by the identity key that came with it (a server \
         or someone on the way may have replaced it); refusing it"
    )]
    BadSignature { username: String },
    #[error(
        "cannot check {username}'s identity: {path} is unreadable ({reason}); fix or remove \
         that file"
    )]
    TrustStoreUnreadable {
        username: String,
        path: String,
        reason: String,
    },
}

/// This user's long-term identity key pair. Exists so every session's voice key can be tied to
/// one key that peers can remember; the secret never leaves the process (nor is it ever
/// printed) and is wiped on drop by `ed25519-dalek`.
#[derive(Clone)]
pub struct IdentityKey {
    signing: SigningKey,
}

impl IdentityKey {
    /// A fresh key pair from the operating system's random number generator.
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// The key pair of a 32-byte secret seed (as kept on disk, and for tests).
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// The secret seed, for the key file only.
    #[cfg(feature = "app")]
    pub(crate) fn secret_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.signing.to_bytes())
    }

    /// The public key that peers remember.
    pub fn public_key(&self) -> [u8; IDENTITY_KEY_LEN] {
        self.signing.verifying_key().to_bytes()
    }

    /// [`identity_fingerprint`] of our public key, for the UI.
    pub fn fingerprint(&self) -> String {
        identity_fingerprint(&self.public_key())
    }
}

impl fmt::Debug for IdentityKey {
    /// Shows only the public fingerprint, never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKey")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// What a voice-key signature is bound to, besides the key itself.
///
/// Why each part: `server` (the SHA-256 fingerprint of the server's TLS certificate, which
/// every member of a call sees alike) keeps a key signed for one server from being replayed on
/// another; `username` (the server's spelling) keeps a server from passing Alice's signed key
/// off as Bob's; `user_id` (the sender id that voice datagrams carry and that the voice keys
/// are derived with) keeps a key signed for one session from being replayed under another id.
/// A TLS man in the middle shows each side another certificate, so signatures would not check
/// out across it either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBinding<'a> {
    pub server: &'a str,
    pub username: &'a str,
    pub user_id: u32,
}

impl KeyBinding<'_> {
    /// The exact bytes signed: the label, then each part length-prefixed (so no two bindings
    /// can run into each other), then the voice key.
    fn message(&self, voice_key: &[u8; 32]) -> Vec<u8> {
        let mut m = Vec::with_capacity(VOICE_KEY_LABEL.len() + 16 + 64 + 32 + 4);
        m.extend_from_slice(VOICE_KEY_LABEL);
        for part in [self.server.as_bytes(), self.username.as_bytes()] {
            m.extend_from_slice(&(part.len() as u32).to_be_bytes());
            m.extend_from_slice(part);
        }
        m.extend_from_slice(&self.user_id.to_be_bytes());
        m.extend_from_slice(voice_key);
        m
    }
}

/// Signs our voice key for `binding` (our own name and id on this server).
pub fn sign_voice_key(
    identity: &IdentityKey,
    binding: &KeyBinding<'_>,
    voice_key: &[u8; 32],
) -> VoiceKeyProof {
    let signature = identity
        .signing
        .sign(&binding.message(voice_key))
        .to_bytes();
    let mut halves = [[0u8; 32]; 2];
    halves[0].copy_from_slice(&signature[..32]);
    halves[1].copy_from_slice(&signature[32..]);
    VoiceKeyProof {
        identity_key: identity.public_key(),
        signature: halves,
    }
}

/// Checks that `proof` signs `voice_key` for `binding` (the peer's name and id on this
/// server); returns the identity key that signed it. Strict verification: weak (small-order)
/// identity keys and malleable signatures are refused.
pub fn verify_voice_key(
    binding: &KeyBinding<'_>,
    voice_key: &[u8; 32],
    proof: Option<&VoiceKeyProof>,
) -> Result<[u8; IDENTITY_KEY_LEN], IdentityError> {
    let username = binding.username.to_string();
    let Some(proof) = proof else {
        return Err(IdentityError::MissingProof { username });
    };
    let key = VerifyingKey::from_bytes(&proof.identity_key)
        .ok()
        .filter(|k| !k.is_weak())
        .ok_or_else(|| IdentityError::MalformedIdentityKey {
            username: username.clone(),
        })?;
    let signature = Signature::from_bytes(&proof.signature_bytes());
    key.verify_strict(&binding.message(voice_key), &signature)
        .map_err(|_| IdentityError::BadSignature { username })?;
    Ok(proof.identity_key)
}

/// A human-checkable fingerprint of an identity key: the first 16 bytes (128 bits) of its
/// SHA-256 as eight groups of four lowercase hex digits, e.g. `a1b2-c3d4-…-0718`.
pub fn identity_fingerprint(key: &[u8; IDENTITY_KEY_LEN]) -> String {
    let digest = Sha256::digest(key);
    let groups: Vec<String> = digest[..16]
        .chunks(2)
        .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
        .collect();
    groups.join("-")
}

/// The safety number of two members: see [`crate::voice::net::crypto::safety_number`], taken
/// over their identity keys (not the per-session voice keys, so it stays the same from one
/// call to the next and a verification once is worth something).
pub fn safety_number(a: &[u8; IDENTITY_KEY_LEN], b: &[u8; IDENTITY_KEY_LEN]) -> String {
    crate::voice::net::crypto::safety_number(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> IdentityKey {
        IdentityKey::from_secret_bytes([1; 32])
    }

    const VOICE: [u8; 32] = [7; 32];

    fn binding(username: &str) -> KeyBinding<'_> {
        KeyBinding {
            server: "AA:BB",
            username,
            user_id: 3,
        }
    }

    #[test]
    fn a_signed_voice_key_verifies_and_names_its_identity() {
        let a = alice();
        let proof = sign_voice_key(&a, &binding("alice"), &VOICE);
        assert_eq!(
            verify_voice_key(&binding("alice"), &VOICE, Some(&proof)),
            Ok(a.public_key())
        );
    }

    #[test]
    fn a_signature_is_refused_for_another_key_server_name_or_id() {
        let a = alice();
        let proof = sign_voice_key(&a, &binding("alice"), &VOICE);
        let bad = |b: &KeyBinding<'_>, key: &[u8; 32]| {
            matches!(
                verify_voice_key(b, key, Some(&proof)),
                Err(IdentityError::BadSignature { .. })
            )
        };
        assert!(bad(&binding("alice"), &[8; 32]), "another voice key");
        assert!(bad(&binding("bob"), &VOICE), "another name");
        let other_server = KeyBinding {
            server: "CC:DD",
            ..binding("alice")
        };
        assert!(bad(&other_server, &VOICE), "another server");
        let other_id = KeyBinding {
            user_id: 4,
            ..binding("alice")
        };
        assert!(bad(&other_id, &VOICE), "another session's id");
        // Length prefixes: moving bytes between server and name is another binding.
        let shifted = KeyBinding {
            server: "AA:BBa",
            username: "lice",
            user_id: 3,
        };
        assert!(bad(&shifted, &VOICE));
    }

    #[test]
    fn a_server_cannot_pass_its_own_voice_key_under_someone_elses_identity() {
        let a = alice();
        let mallory = IdentityKey::from_secret_bytes([9; 32]);
        let mut proof = sign_voice_key(&mallory, &binding("alice"), &[8; 32]);
        proof.identity_key = a.public_key();
        assert_eq!(
            verify_voice_key(&binding("alice"), &[8; 32], Some(&proof)),
            Err(IdentityError::BadSignature {
                username: "alice".into()
            })
        );
        // Its own identity signs, but that is another identity key: trust decides (see trust).
        let own = sign_voice_key(&mallory, &binding("alice"), &[8; 32]);
        assert_eq!(
            verify_voice_key(&binding("alice"), &[8; 32], Some(&own)),
            Ok(mallory.public_key())
        );
    }

    #[test]
    fn missing_flipped_or_malformed_proofs_are_refused() {
        assert_eq!(
            verify_voice_key(&binding("alice"), &VOICE, None),
            Err(IdentityError::MissingProof {
                username: "alice".into()
            })
        );
        let proof = sign_voice_key(&alice(), &binding("alice"), &VOICE);
        for i in 0..64 {
            let mut p = proof.clone();
            p.signature[i / 32][i % 32] ^= 1;
            assert!(
                verify_voice_key(&binding("alice"), &VOICE, Some(&p)).is_err(),
                "byte {i}"
            );
        }
        // The identity point of Edwards25519 (a weak key every signature would "match").
        let mut weak = proof.clone();
        weak.identity_key = [0; 32];
        weak.identity_key[0] = 1;
        assert_eq!(
            verify_voice_key(&binding("alice"), &VOICE, Some(&weak)),
            Err(IdentityError::MalformedIdentityKey {
                username: "alice".into()
            })
        );
    }

    #[test]
    fn identity_fingerprints_are_128_bits_in_eight_hex_groups() {
        let fp = alice().fingerprint();
        let groups: Vec<&str> = fp.split('-').collect();
        assert_eq!(groups.len(), 8);
        assert!(groups
            .iter()
            .all(|g| g.len() == 4 && g.chars().all(|c| c.is_ascii_hexdigit())));
        assert_ne!(fp, IdentityKey::from_secret_bytes([2; 32]).fingerprint());
        assert!(format!("{:?}", alice()).contains(&fp));
        assert!(!format!("{:?}", alice()).contains("secret"));
    }
}
