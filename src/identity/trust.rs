//! Trust on first use for peers' identity keys, and the verified marks people set.
//!
//! [`PeerTrust`] remembers, per (server, username), the identity key first seen for it and
//! whether the user verified it (compared the safety number by other means). A different
//! key for a known (server, username) is reported as [`TrustVerdict::Changed`]: the caller
//! must not use that peer's voice keys until the user accepts the new identity
//! ([`PeerTrust::accept`]), which also clears the verified mark. Pure: the file behind it is
//! [`super::store`]'s; this map only says when it changed ([`PeerTrust::take_dirty`]).

use std::collections::BTreeMap;

use super::IDENTITY_KEY_LEN;

/// What [`PeerTrust::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustVerdict {
    /// Never seen on this server under this name: remembered now.
    FirstSeen,
    /// The identity remembered for this name; `verified` if the user said so.
    Known { verified: bool },
    /// Another identity than the one remembered: possibly a server in the middle, or the
    /// person reinstalled. Not remembered; the caller holds the peer back until accepted.
    Changed { previous: [u8; IDENTITY_KEY_LEN] },
    /// The trust file exists but cannot be read: nothing can be checked, so nothing is
    /// trusted (and the file is left as it is for the user to see).
    Unreadable { path: String, reason: String },
}

/// One remembered identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedIdentity {
    pub identity: [u8; IDENTITY_KEY_LEN],
    pub verified: bool,
}

/// See the module docs. Keys are (canonical server `host:port`, username lower-cased: the
/// server treats names case-insensitively, so "Alice" and "alice" are one person to it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTrust {
    peers: BTreeMap<(String, String), TrustedIdentity>,
    /// Where the file lives and why it could not be used, if it could not.
    unreadable: Option<(String, String)>,
    dirty: bool,
}

fn key(server: &str, username: &str) -> (String, String) {
    (server.to_string(), username.to_lowercase())
}

impl PeerTrust {
    /// Nothing remembered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose file at `path` could not be read for `reason`: every check is
    /// [`TrustVerdict::Unreadable`] and nothing is ever written over the file.
    pub fn unreadable(path: String, reason: String) -> Self {
        Self {
            unreadable: Some((path, reason)),
            ..Self::default()
        }
    }

    /// A store with these entries, as loaded from the file.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (String, String, TrustedIdentity)>,
    ) -> Self {
        let peers = entries
            .into_iter()
            .map(|(server, username, id)| (key(&server, &username), id))
            .collect();
        Self {
            peers,
            ..Self::default()
        }
    }

    /// Every entry as (server, username, identity), for the file.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, &TrustedIdentity)> {
        self.peers
            .iter()
            .map(|((s, u), id)| (s.as_str(), u.as_str(), id))
    }

    pub fn is_unreadable(&self) -> bool {
        self.unreadable.is_some()
    }

    /// Checks `identity` for (`server`, `username`), remembering it on first sight.
    pub fn check(
        &mut self,
        server: &str,
        username: &str,
        identity: &[u8; IDENTITY_KEY_LEN],
    ) -> TrustVerdict {
        if let Some((path, reason)) = &self.unreadable {
            return TrustVerdict::Unreadable {
                path: path.clone(),
                reason: reason.clone(),
            };
        }
        match self.peers.get(&key(server, username)) {
            Some(known) if known.identity == *identity => TrustVerdict::Known {
                verified: known.verified,
            },
            Some(known) => TrustVerdict::Changed {
                previous: known.identity,
            },
            None => {
                self.peers.insert(
                    key(server, username),
                    TrustedIdentity {
                        identity: *identity,
                        verified: false,
                    },
                );
                self.dirty = true;
                TrustVerdict::FirstSeen
            }
        }
    }

    /// The user accepts `identity` as (`server`, `username`)'s new identity key. Not
    /// verified: a new key has to be compared again. False when the store is unreadable.
    pub fn accept(
        &mut self,
        server: &str,
        username: &str,
        identity: &[u8; IDENTITY_KEY_LEN],
    ) -> bool {
        if self.unreadable.is_some() {
            return false;
        }
        self.peers.insert(
            key(server, username),
            TrustedIdentity {
                identity: *identity,
                verified: false,
            },
        );
        self.dirty = true;
        true
    }

    /// Sets or clears the verified mark of (`server`, `username`), only while `identity` is
    /// the identity remembered for it (a mark is for one key, never for a name). Returns
    /// whether it was set as asked.
    pub fn set_verified(
        &mut self,
        server: &str,
        username: &str,
        identity: &[u8; IDENTITY_KEY_LEN],
        verified: bool,
    ) -> bool {
        if self.unreadable.is_some() {
            return false;
        }
        match self.peers.get_mut(&key(server, username)) {
            Some(known) if known.identity == *identity => {
                if known.verified != verified {
                    known.verified = verified;
                    self.dirty = true;
                }
                true
            }
            _ => false,
        }
    }

    /// Whether `identity` is the one remembered for (`server`, `username`) and verified.
    pub fn is_verified(
        &self,
        server: &str,
        username: &str,
        identity: &[u8; IDENTITY_KEY_LEN],
    ) -> bool {
        self.peers
            .get(&key(server, username))
            .is_some_and(|k| k.identity == *identity && k.verified)
    }

    /// Whether something changed since the last call (the shell then saves the file).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [1; 32];
    const B: [u8; 32] = [2; 32];

    #[test]
    fn first_sight_is_remembered_then_known_and_a_change_is_reported_not_taken() {
        let mut t = PeerTrust::new();
        assert_eq!(t.check("h:1", "alice", &A), TrustVerdict::FirstSeen);
        assert!(t.take_dirty());
        assert_eq!(
            t.check("h:1", "Alice", &A),
            TrustVerdict::Known { verified: false }
        );
        assert!(!t.take_dirty());
        assert_eq!(
            t.check("h:1", "alice", &B),
            TrustVerdict::Changed { previous: A }
        );
        assert_eq!(
            t.check("h:1", "alice", &A),
            TrustVerdict::Known { verified: false },
            "a change is not remembered until accepted"
        );
        // Per server: the same name elsewhere is someone else.
        assert_eq!(t.check("h:2", "alice", &B), TrustVerdict::FirstSeen);
    }

    #[test]
    fn a_verified_mark_belongs_to_one_key_and_accepting_a_new_key_clears_it() {
        let mut t = PeerTrust::new();
        t.check("h:1", "alice", &A);
        assert!(!t.set_verified("h:1", "alice", &B, true), "not her key");
        assert!(t.set_verified("h:1", "alice", &A, true));
        assert!(t.is_verified("h:1", "alice", &A));
        assert_eq!(
            t.check("h:1", "alice", &A),
            TrustVerdict::Known { verified: true }
        );
        assert!(t.accept("h:1", "alice", &B));
        assert!(!t.is_verified("h:1", "alice", &B));
        assert!(!t.is_verified("h:1", "alice", &A));
        assert_eq!(
            t.check("h:1", "alice", &B),
            TrustVerdict::Known { verified: false }
        );
    }

    #[test]
    fn an_unreadable_store_trusts_nothing_and_changes_nothing() {
        let mut t = PeerTrust::unreadable("f".into(), "bad".into());
        assert!(matches!(
            t.check("h:1", "alice", &A),
            TrustVerdict::Unreadable { .. }
        ));
        assert!(!t.accept("h:1", "alice", &A));
        assert!(!t.set_verified("h:1", "alice", &A, true));
        assert!(!t.take_dirty());
    }
}
