//! The files behind identities, in the client's config directory (`P2P_VOICE_CONFIG_DIR` or the
//! platform's, as `ClientSettings::dir` finds it; tests give every client its own):
//!
//! - `identity.key`: our identity secret (32 bytes), created on first run, mode 0600, never
//!   overwritten. A file that cannot be used is an error, never a reason to make a new key: a
//!   new key would make every peer see a changed identity.
//! - `known_peers.toml`: [`PeerTrust`], written atomically (a temporary file renamed over the
//!   old one). A file that cannot be read is an error that trusts nobody, not an empty store,
//!   as `known_servers.toml` is (see `tls.rs`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::trust::{PeerTrust, TrustedIdentity};
use super::IdentityKey;

/// Name of the identity secret's file.
pub const IDENTITY_FILE: &str = "identity.key";
/// Name of the remembered peers' file.
pub const KNOWN_PEERS_FILE: &str = "known_peers.toml";

/// Why the identity or the trust file could not be used, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum IdentityStoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an identity key ({len} bytes, 32 expected); move it away to make a new \
         identity (peers will then see your identity change)"
    )]
    Corrupt { path: PathBuf, len: usize },
}

/// Loads our identity from `dir/identity.key`, or makes one and stores it there. Two
/// processes starting at once in one directory end up with the same key: the file is written
/// under a temporary name and linked into place only if no key is there yet.
pub fn load_or_create_identity(dir: &Path) -> Result<IdentityKey, IdentityStoreError> {
    let path = dir.join(IDENTITY_FILE);
    match read_identity(&path) {
        Err(IdentityStoreError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let key = IdentityKey::generate();
    std::fs::create_dir_all(dir).map_err(|source| IdentityStoreError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let tmp = dir.join(format!("{IDENTITY_FILE}.{}.tmp", std::process::id()));
    let written = write_private(&tmp, &key.secret_bytes()[..]);
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, &path) {
        // No hard links on this file system: a rename, which a racing process could undo.
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => std::fs::rename(&tmp, &path),
        other => other,
    });
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        // Someone else's key got there first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_identity(&path),
        Err(source) => Err(IdentityStoreError::Write { path, source }),
    }
}

fn read_identity(path: &Path) -> Result<IdentityKey, IdentityStoreError> {
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| {
        IdentityStoreError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?);
    let secret: [u8; 32] =
        bytes
            .as_slice()
            .try_into()
            .map_err(|_| IdentityStoreError::Corrupt {
                path: path.to_path_buf(),
                len: bytes.len(),
            })?;
    Ok(IdentityKey::from_secret_bytes(secret))
}

/// Creates `path` readable by its owner only (mode 0600 from the start, not chmod'ed after)
/// and writes `bytes` to disk.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// One line of `known_peers.toml`.
#[derive(Debug, Serialize, Deserialize)]
struct PeerEntry {
    server: String,
    username: String,
    /// The identity key, 64 hex digits.
    identity: String,
    #[serde(default)]
    verified: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KnownPeersFile {
    #[serde(default)]
    peer: Vec<PeerEntry>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The trust store of `dir` (`None`: no config directory, remember for this run only). A
/// missing file is an empty store; one that cannot be read or parsed, or holds a malformed
/// key, is [`PeerTrust::unreadable`].
pub fn load_trust(dir: Option<&Path>) -> PeerTrust {
    let Some(dir) = dir else {
        return PeerTrust::new();
    };
    let path = dir.join(KNOWN_PEERS_FILE);
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return PeerTrust::new(),
        Err(e) => return PeerTrust::unreadable(shown, e.to_string()),
    };
    let file: KnownPeersFile = match toml::from_str(&text) {
        Ok(f) => f,
        Err(e) => return PeerTrust::unreadable(shown, e.message().to_string()),
    };
    let mut entries = Vec::with_capacity(file.peer.len());
    for p in file.peer {
        let Some(identity) = unhex32(&p.identity) else {
            return PeerTrust::unreadable(
                shown,
                format!("the identity key of {} is not 64 hex digits", p.username),
            );
        };
        entries.push((
            p.server,
            p.username,
            TrustedIdentity {
                identity,
                verified: p.verified,
            },
        ));
    }
    PeerTrust::from_entries(entries)
}

/// Writes `trust` to `dir/known_peers.toml` atomically: a temporary file beside it, synced,
/// then renamed over it, so a crash or a full disk leaves the old file, never half of one.
/// An unreadable store is never written (that would erase what the user must look at).
pub fn save_trust(dir: &Path, trust: &PeerTrust) -> Result<(), IdentityStoreError> {
    if trust.is_unreadable() {
        return Ok(());
    }
    let path = dir.join(KNOWN_PEERS_FILE);
    let file = KnownPeersFile {
        peer: trust
            .entries()
            .map(|(server, username, id)| PeerEntry {
                server: server.to_string(),
                username: username.to_string(),
                identity: hex(&id.identity),
                verified: id.verified,
            })
            .collect(),
    };
    let text = toml::to_string(&file).unwrap_or_default();
    let write_err = |source| IdentityStoreError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(write_err)?;
    let tmp = path.with_extension("toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = write_private(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::trust::TrustVerdict;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pv-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_identity_is_made_once_kept_private_and_the_same_after_a_restart() {
        let d = dir("keep");
        let a = load_or_create_identity(&d).unwrap();
        let b = load_or_create_identity(&d).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leftovers: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_identity_file_is_an_error_and_is_left_alone() {
        let d = dir("corrupt");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(IDENTITY_FILE), b"short").unwrap();
        assert!(matches!(
            load_or_create_identity(&d),
            Err(IdentityStoreError::Corrupt { len: 5, .. })
        ));
        assert_eq!(std::fs::read(d.join(IDENTITY_FILE)).unwrap(), b"short");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn remembered_peers_and_verified_marks_survive_a_restart() {
        let d = dir("trust");
        let mut t = load_trust(Some(&d));
        assert_eq!(t.check("h:1", "alice", &[1; 32]), TrustVerdict::FirstSeen);
        t.check("h:1", "bob", &[2; 32]);
        assert!(t.set_verified("h:1", "bob", &[2; 32], true));
        save_trust(&d, &t).unwrap();
        assert!(!d.join("known_peers.toml.tmp").exists());
        let mut again = load_trust(Some(&d));
        assert_eq!(again, {
            let mut t = t.clone();
            t.take_dirty();
            t
        });
        assert!(again.is_verified("h:1", "bob", &[2; 32]));
        assert_eq!(
            again.check("h:1", "alice", &[3; 32]),
            TrustVerdict::Changed { previous: [1; 32] }
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unreadable_trust_file_trusts_nobody_and_is_not_overwritten() {
        let d = dir("bad-trust");
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join(KNOWN_PEERS_FILE);
        for bad in [
            "not = = toml",
            "[[peer]]\nserver = \"h:1\"\nusername = \"a\"\nidentity = \"zz\"\n",
        ] {
            std::fs::write(&file, bad).unwrap();
            let mut t = load_trust(Some(&d));
            assert!(matches!(
                t.check("h:1", "alice", &[1; 32]),
                TrustVerdict::Unreadable { .. }
            ));
            save_trust(&d, &t).unwrap();
            assert_eq!(std::fs::read_to_string(&file).unwrap(), bad);
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
