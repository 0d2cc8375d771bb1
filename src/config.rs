//! Configuration files: the server's channel list (TOML, read before start) and the client's
//! remembered settings (in the platform's config directory).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The channel list compiled into the binary, used when no `--channels` file is given.
pub const DEFAULT_CHANNELS_TOML: &str = include_str!("../assets/channels.toml");

/// Members allowed in a channel when the file does not say.
pub const DEFAULT_MAX_MEMBERS: u32 = 16;

/// Errors reading configuration, worded for the person who wrote the file.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One channel as configured by the server operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    /// Argon2 PHC string made by `p2p-voice hash-password`; absent for open channels.
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default = "default_max_members")]
    pub max_members: u32,
}

fn default_max_members() -> u32 {
    DEFAULT_MAX_MEMBERS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsFile {
    #[serde(rename = "channel", default)]
    channels: Vec<ChannelConfig>,
}

/// Parses a channels file. `origin` names the file in error messages.
pub fn parse_channels(text: &str, origin: &str) -> Result<Vec<ChannelConfig>, ConfigError> {
    let file: ChannelsFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_string(),
        message: e.to_string(),
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: origin.to_string(),
        message,
    };
    if file.channels.is_empty() {
        return Err(invalid("no [[channel]] defined".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for ch in &file.channels {
        let name = ch.name.trim();
        if name.is_empty() || name != ch.name || ch.name.chars().count() > 64 {
            return Err(invalid(format!(
                "channel name {:?} must be 1..64 characters without leading/trailing spaces",
                ch.name
            )));
        }
        if !seen.insert(ch.name.to_lowercase()) {
            return Err(invalid(format!("channel {:?} is defined twice", ch.name)));
        }
        if ch.max_members == 0 {
            return Err(invalid(format!(
                "channel {:?}: max_members must be at least 1",
                ch.name
            )));
        }
        if let Some(hash) = &ch.password_hash {
            if argon2::PasswordHash::new(hash).is_err() {
                return Err(invalid(format!(
                    "channel {:?}: password_hash is not an argon2 hash (make one with `p2p-voice hash-password`)",
                    ch.name
                )));
            }
        }
    }
    Ok(file.channels)
}

/// Loads the channels file at `path`, or the built-in list when `path` is `None`.
pub fn load_channels(path: Option<&Path>) -> Result<Vec<ChannelConfig>, ConfigError> {
    match path {
        None => parse_channels(DEFAULT_CHANNELS_TOML, "built-in channels"),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            parse_channels(&text, &p.display().to_string())
        }
    }
}

/// Hashes a channel password for the channels file (argon2id, random salt, PHC string).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a PHC hash. Slow on purpose (argon2): call it off the tick thread.
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    match argon2::PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// What the desktop client remembers between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ClientSettings {
    pub username: Option<String>,
    pub server: Option<String>,
    pub input_device: Option<String>,
    pub output_device: Option<String>,
    pub noise_suppression: Option<bool>,
    pub normalize_loudness: Option<bool>,
    pub echo_cancellation: Option<bool>,
    pub gain_control: Option<bool>,
    pub high_pass: Option<bool>,
    pub push_to_talk: Option<bool>,
    /// Push-to-talk key, an egui key name such as "Space", "F5" or "T".
    pub ptt_key: Option<String>,
    /// Join, leave and mute sounds (on unless turned off).
    pub sounds: Option<bool>,
}

impl ClientSettings {
    /// Directory holding settings and pinned server certificates. `P2P_VOICE_CONFIG_DIR`
    /// overrides the platform default (tests use it to stay hermetic).
    pub fn dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("P2P_VOICE_CONFIG_DIR") {
            return Some(PathBuf::from(d));
        }
        directories::ProjectDirs::from("", "", "p2p-voice").map(|p| p.config_dir().to_path_buf())
    }

    /// Where the settings live, if this system has a config directory.
    pub fn path() -> Option<PathBuf> {
        Self::dir().map(|d| d.join("settings.toml"))
    }

    /// Loads settings; a missing or unreadable file gives defaults (settings are a convenience).
    pub fn load() -> Self {
        Self::path()
            .map(|p| Self::load_from(&p))
            .unwrap_or_default()
    }

    /// Loads settings from `path`; missing or unreadable gives defaults.
    pub fn load_from(path: &std::path::Path) -> Self {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Writes the settings to `path`, creating its directory.
    pub fn save_to(&self, path: &std::path::Path) -> Result<(), ConfigError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ConfigError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let text = toml::to_string(self).unwrap_or_default();
        write_atomically(path, text.as_bytes()).map_err(|source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Writes `bytes` to `path` so that a reader (or a crash, or a full disk) sees the old file or
/// the new one, never half of one: a temporary file beside it, synced, then renamed over it.
/// The directory is created if needed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    let renamed = written.and_then(|()| std::fs::rename(&tmp, path));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_channels_parse_and_private_needs_the_documented_password() {
        let chans = load_channels(None).unwrap();
        let names: Vec<_> = chans.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["Lobby", "Gaming", "Music", "Private"]);
        let private = chans.iter().find(|c| c.name == "Private").unwrap();
        let hash = private.password_hash.as_deref().unwrap();
        assert!(verify_password(hash, "letmein"));
        assert!(!verify_password(hash, "wrong"));
    }

    #[test]
    fn duplicate_and_bad_channels_are_refused_with_a_reason() {
        let dup = "[[channel]]\nname='A'\n[[channel]]\nname='a'\n";
        assert!(parse_channels(dup, "t")
            .unwrap_err()
            .to_string()
            .contains("defined twice"));
        let zero = "[[channel]]\nname='A'\nmax_members=0\n";
        assert!(parse_channels(zero, "t").is_err());
        let badhash = "[[channel]]\nname='A'\npassword_hash='plain'\n";
        assert!(parse_channels(badhash, "t")
            .unwrap_err()
            .to_string()
            .contains("hash-password"));
        assert!(parse_channels("", "t").is_err());
        assert!(parse_channels("[[channel]]\nnom='x'", "t").is_err());
    }

    #[test]
    fn hash_then_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "s3cret "));
    }
}
