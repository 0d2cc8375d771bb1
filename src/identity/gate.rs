//! [`IdentityGate`]: what stands between the server's word about a peer and the voice plane.
//!
//! The control session hands every `PeerEndpoints` it gets to [`IdentityGate::admit`], which
//! checks the voice key's signature against the binding this client sees itself (the server's
//! certificate, the peer's name and id) and the identity key against the remembered ones
//! ([`PeerTrust`]), and passes the peer on with its voice key only if both hold. Everything
//! else the window or the headless runner asks about identities (safety numbers, verified
//! marks, accepting a changed identity) is answered here too. Pure: the trust file is the
//! shell's ([`super::store`]); news comes out of [`IdentityGate::poll_news`].

use std::collections::{HashMap, VecDeque};

use super::trust::{PeerTrust, TrustVerdict};
use super::{
    safety_number, sign_voice_key, verify_voice_key, IdentityError, IdentityKey, KeyBinding,
    VoiceKeyProof, IDENTITY_KEY_LEN,
};
use crate::protocol::{PeerInfo, UserId};

/// What the control plane made of a peer's identity: whether its voice key may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentityStatus {
    /// The voice key is signed by this identity key, which is the one remembered for the
    /// peer's name on this server (or was seen here for the first time: `first_seen`).
    /// `verified` if the user compared the safety number and said so.
    Trusted {
        identity: [u8; IDENTITY_KEY_LEN],
        first_seen: bool,
        verified: bool,
    },
    /// Signed, but by another identity key than the one remembered for this name: the server
    /// may be in the middle, or the person reinstalled. Its voice keys are held back (no voice
    /// with it) until the user accepts the new identity ([`IdentityGate::accept`]).
    Changed {
        previous: [u8; IDENTITY_KEY_LEN],
        presented: [u8; IDENTITY_KEY_LEN],
    },
    /// The voice key cannot be tied to an identity (no or a bad signature, or the trust file
    /// is unreadable): refused, no voice with this peer.
    Refused(IdentityError),
}

impl PeerIdentityStatus {
    /// Whether the peer's voice key may be used.
    pub fn is_trusted(&self) -> bool {
        matches!(self, PeerIdentityStatus::Trusted { .. })
    }

    /// The peer's identity key, when one checked out (the new one, for a changed identity).
    pub fn identity(&self) -> Option<[u8; IDENTITY_KEY_LEN]> {
        match self {
            PeerIdentityStatus::Trusted { identity, .. } => Some(*identity),
            PeerIdentityStatus::Changed { presented, .. } => Some(*presented),
            PeerIdentityStatus::Refused(_) => None,
        }
    }

    /// Same standing (first sight or not is news once, not a new standing).
    fn same_standing(&self, other: &Self) -> bool {
        match (self, other) {
            (
                PeerIdentityStatus::Trusted {
                    identity: a,
                    verified: va,
                    ..
                },
                PeerIdentityStatus::Trusted {
                    identity: b,
                    verified: vb,
                    ..
                },
            ) => a == b && va == vb,
            (a, b) => a == b,
        }
    }
}

/// A peer's identity standing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityNews {
    pub user_id: UserId,
    pub username: String,
    pub status: PeerIdentityStatus,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct IdentityGate {
    /// Our long-term identity key, which signs every voice key we announce; `None`: we
    /// announce unsigned keys, which peers refuse.
    identity: Option<IdentityKey>,
    /// The server's certificate fingerprint, which our signatures are bound to and our
    /// peers' are checked against (see [`KeyBinding`]).
    server_binding: String,
    /// The key the server is remembered under in the trust store (canonical `host:port`).
    trust_server: String,
    /// Identity keys remembered per (server, username), and verified marks.
    trust: PeerTrust,
    /// What we made of each current peer's identity, and its name.
    statuses: HashMap<UserId, (String, PeerIdentityStatus)>,
    /// Peers whose identity changed, as last announced, until the user accepts.
    held: HashMap<UserId, PeerInfo>,
    news: VecDeque<IdentityNews>,
}

impl IdentityGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Our identity key (from the config directory; see `identity::store`).
    pub fn set_identity(&mut self, identity: IdentityKey) {
        self.identity = Some(identity);
    }

    /// Our identity's public key, if we have one.
    pub fn identity_public(&self) -> Option<[u8; IDENTITY_KEY_LEN]> {
        self.identity.as_ref().map(IdentityKey::public_key)
    }

    /// The remembered identities (loaded by the shell from the trust file).
    pub fn set_trust(&mut self, trust: PeerTrust) {
        self.trust = trust;
    }

    /// The remembered identities, if they changed since the last call: the shell saves them.
    pub fn trust_to_save(&mut self) -> Option<&PeerTrust> {
        if self.trust.take_dirty() {
            Some(&self.trust)
        } else {
            None
        }
    }

    /// The server we are on: `trust_server` is its key in the trust store (canonical
    /// `host:port`); peers met from now on are remembered under it.
    pub fn set_trust_server(&mut self, trust_server: String) {
        self.trust_server = trust_server;
    }

    /// The certificate fingerprint of the server the transport connected to.
    pub fn set_server_binding(&mut self, fingerprint: &str) {
        self.server_binding = fingerprint.to_string();
    }

    /// The signature over our voice key for this server, our (server-given) name and id.
    pub fn sign(
        &self,
        username: &str,
        user_id: UserId,
        voice_key: &[u8; 32],
    ) -> Option<VoiceKeyProof> {
        let identity = self.identity.as_ref()?;
        let binding = KeyBinding {
            server: &self.server_binding,
            username,
            user_id,
        };
        Some(sign_voice_key(identity, &binding, voice_key))
    }

    /// What we made of peer `user_id`'s identity.
    pub fn status(&self, user_id: UserId) -> Option<&PeerIdentityStatus> {
        self.statuses.get(&user_id).map(|(_, s)| s)
    }

    /// The safety number of us and peer `user_id` (from both identity keys; for a changed
    /// identity, from the new one): the same on both sides, to compare by other means.
    pub fn safety_number(&self, user_id: UserId) -> Option<String> {
        let ours = self.identity_public()?;
        let theirs = self.status(user_id)?.identity()?;
        Some(safety_number(&ours, &theirs))
    }

    /// Checks a peer's voice key against its signature and the remembered identities;
    /// returns the peer with its voice key only if both hold (otherwise with none).
    pub fn admit(&mut self, peer: PeerInfo) -> PeerInfo {
        let Some(voice_key) = peer.voice_key else {
            return peer;
        };
        let binding = KeyBinding {
            server: &self.server_binding,
            username: &peer.username,
            user_id: peer.user_id,
        };
        let status = match verify_voice_key(&binding, &voice_key, peer.voice_key_proof.as_ref()) {
            Err(e) => PeerIdentityStatus::Refused(e),
            Ok(identity) => match self
                .trust
                .check(&self.trust_server, &peer.username, &identity)
            {
                TrustVerdict::FirstSeen => PeerIdentityStatus::Trusted {
                    identity,
                    first_seen: true,
                    verified: false,
                },
                TrustVerdict::Known { verified } => PeerIdentityStatus::Trusted {
                    identity,
                    first_seen: false,
                    verified,
                },
                TrustVerdict::Changed { previous } => PeerIdentityStatus::Changed {
                    previous,
                    presented: identity,
                },
                TrustVerdict::Unreadable { path, reason } => {
                    PeerIdentityStatus::Refused(IdentityError::TrustStoreUnreadable {
                        username: peer.username.clone(),
                        path,
                        reason,
                    })
                }
            },
        };
        if matches!(status, PeerIdentityStatus::Changed { .. }) {
            self.held.insert(peer.user_id, peer.clone());
        } else {
            self.held.remove(&peer.user_id);
        }
        let trusted = status.is_trusted();
        self.note(peer.user_id, &peer.username, status);
        if trusted {
            peer
        } else {
            PeerInfo {
                voice_key: None,
                voice_key_proof: None,
                ..peer
            }
        }
    }

    /// The user accepts the changed identity of peer `user_id` (after checking the new safety
    /// number, one hopes): it is remembered, unverified, and the peer is returned with its
    /// voice key, to pass on. `None` if that peer's identity had not changed.
    pub fn accept(&mut self, user_id: UserId) -> Option<PeerInfo> {
        let Some(PeerIdentityStatus::Changed { presented, .. }) = self.status(user_id).cloned()
        else {
            return None;
        };
        let peer = self.held.remove(&user_id)?;
        if !self
            .trust
            .accept(&self.trust_server, &peer.username, &presented)
        {
            return None;
        }
        Some(self.admit(peer))
    }

    /// Marks peer `user_id`'s current identity verified (or not). Kept per (server, username)
    /// and identity key across restarts; a changed key does not inherit it. False if the peer
    /// has no trusted identity.
    pub fn set_verified(&mut self, user_id: UserId, verified: bool) -> bool {
        let Some((
            username,
            PeerIdentityStatus::Trusted {
                identity,
                first_seen,
                ..
            },
        )) = self.statuses.get(&user_id).cloned()
        else {
            return false;
        };
        if !self
            .trust
            .set_verified(&self.trust_server, &username, &identity, verified)
        {
            return false;
        }
        self.note(
            user_id,
            &username,
            PeerIdentityStatus::Trusted {
                identity,
                first_seen,
                verified,
            },
        );
        true
    }

    /// Forgets what we made of a peer that is gone.
    pub fn forget(&mut self, user_id: UserId) {
        self.statuses.remove(&user_id);
        self.held.remove(&user_id);
    }

    /// Forgets every peer (we left the channel or the server).
    pub fn forget_all(&mut self) {
        self.statuses.clear();
        self.held.clear();
    }

    /// The next change of a peer's standing, oldest first.
    pub fn poll_news(&mut self) -> Option<IdentityNews> {
        self.news.pop_front()
    }

    /// Records `status` for a peer and reports it if its standing changed.
    fn note(&mut self, user_id: UserId, username: &str, status: PeerIdentityStatus) {
        if self
            .statuses
            .get(&user_id)
            .is_some_and(|(_, old)| old.same_standing(&status))
        {
            return;
        }
        self.statuses
            .insert(user_id, (username.to_string(), status.clone()));
        self.news.push_back(IdentityNews {
            user_id,
            username: username.to_string(),
            status,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(gate_binding: &str, id: UserId, who: &IdentityKey, voice: [u8; 32]) -> PeerInfo {
        let binding = KeyBinding {
            server: gate_binding,
            username: "alice",
            user_id: id,
        };
        PeerInfo {
            user_id: id,
            username: "alice".into(),
            local: vec![],
            public: None,
            voice_key: Some(voice),
            voice_key_proof: Some(sign_voice_key(who, &binding, &voice)),
        }
    }

    fn gate() -> IdentityGate {
        let mut g = IdentityGate::new();
        g.set_identity(IdentityKey::from_secret_bytes([1; 32]));
        g.set_trust_server("h:1".into());
        g.set_server_binding("FP");
        g
    }

    #[test]
    fn news_comes_once_per_standing_and_accept_needs_a_change() {
        let mut g = gate();
        let alice = IdentityKey::from_secret_bytes([2; 32]);
        assert!(g
            .admit(signed("FP", 2, &alice, [9; 32]))
            .voice_key
            .is_some());
        assert!(g.poll_news().is_some());
        g.admit(signed("FP", 2, &alice, [10; 32]));
        assert_eq!(g.poll_news(), None, "a new voice key is no news");
        assert_eq!(g.accept(2), None, "nothing changed, nothing to accept");
        let other = IdentityKey::from_secret_bytes([3; 32]);
        assert_eq!(g.admit(signed("FP", 2, &other, [11; 32])).voice_key, None);
        assert!(matches!(
            g.poll_news().map(|n| n.status),
            Some(PeerIdentityStatus::Changed { .. })
        ));
        g.forget(2);
        assert_eq!(g.accept(2), None, "a peer that left cannot be accepted");
        assert_eq!(g.status(2), None);
    }

    #[test]
    fn our_signature_is_bound_to_the_server_binding_set() {
        let g = gate();
        let proof = g.sign("me", 4, &[5; 32]).unwrap();
        let binding = KeyBinding {
            server: "FP",
            username: "me",
            user_id: 4,
        };
        assert_eq!(
            verify_voice_key(&binding, &[5; 32], Some(&proof)),
            Ok(g.identity_public().unwrap())
        );
        assert_eq!(IdentityGate::new().sign("me", 4, &[5; 32]), None);
    }
}
