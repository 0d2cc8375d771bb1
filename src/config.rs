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

/// The optional `[limits]` table of the channels file: how much of the server one client may
/// take. Every per-address limit counts by address prefix (`ipv4_prefix`, `ipv6_prefix` bits;
/// see `server::prefix`). Absent keys keep their defaults, which are what the README states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Leading bits of an IPv4 address that say who it is (32: the address itself).
    pub ipv4_prefix: u8,
    /// Leading bits of an IPv6 address that say who it is (64: one host or home network).
    pub ipv6_prefix: u8,
    /// Connections open at once per prefix (`--max-connections-per-ip` overrides it).
    pub max_connections_per_prefix: usize,
    /// New connections per second per prefix, sustained...
    pub new_connections_per_sec: f64,
    /// ...after a burst of this many.
    pub new_connections_burst: f64,
    /// TLS handshakes in progress per prefix.
    pub max_handshakes_per_prefix: usize,
    /// TLS handshakes in progress in all; when full, the one that has gone longest without
    /// progress is closed.
    pub max_handshakes: usize,
    /// Time a TLS handshake may take before the connection is closed.
    pub handshake_timeout_ms: u64,
    /// Password checks (argon2) in flight in all; a join beyond it is told "busy, retry".
    pub max_password_checks: usize,
    /// Password checks in flight per prefix.
    pub max_password_checks_per_prefix: usize,
    /// Wrong passwords per prefix and channel before the lockout starts.
    pub free_password_failures: u32,
    /// First lockout after the free failures; it doubles with each further failure...
    pub lockout_base_ms: u64,
    /// ...up to this.
    pub lockout_max_ms: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        use crate::server::{connect_rate, handshakes, limits, password_limits, prefix};
        Self {
            ipv4_prefix: prefix::DEFAULT_IPV4_PREFIX,
            ipv6_prefix: prefix::DEFAULT_IPV6_PREFIX,
            max_connections_per_prefix: limits::DEFAULT_MAX_CONNECTIONS_PER_IP,
            new_connections_per_sec: connect_rate::DEFAULT_NEW_CONNECTIONS_PER_SEC,
            new_connections_burst: connect_rate::DEFAULT_NEW_CONNECTIONS_BURST,
            max_handshakes_per_prefix: handshakes::DEFAULT_HANDSHAKES_PER_PREFIX,
            max_handshakes: handshakes::DEFAULT_HANDSHAKES,
            handshake_timeout_ms: handshakes::DEFAULT_HANDSHAKE_DEADLINE.as_millis() as u64,
            max_password_checks: password_limits::DEFAULT_MAX_CHECKS,
            max_password_checks_per_prefix: password_limits::DEFAULT_MAX_CHECKS_PER_PREFIX,
            free_password_failures: password_limits::DEFAULT_FREE_FAILURES,
            lockout_base_ms: password_limits::DEFAULT_LOCKOUT_BASE.as_millis() as u64,
            lockout_max_ms: password_limits::DEFAULT_LOCKOUT_MAX.as_millis() as u64,
        }
    }
}

impl ServerLimits {
    /// How addresses are grouped for every per-address limit.
    pub fn prefix_widths(&self) -> crate::server::prefix::PrefixWidths {
        crate::server::prefix::PrefixWidths {
            ipv4: self.ipv4_prefix,
            ipv6: self.ipv6_prefix,
        }
    }

    /// The TLS handshake caps.
    pub fn handshake_rules(&self) -> crate::server::handshakes::HandshakeRules {
        crate::server::handshakes::HandshakeRules {
            per_prefix: self.max_handshakes_per_prefix,
            global: self.max_handshakes,
            deadline: std::time::Duration::from_millis(self.handshake_timeout_ms),
        }
    }

    /// The password-check caps and the lockout.
    pub fn password_rules(&self) -> crate::server::password_limits::PasswordRules {
        use std::time::Duration;
        crate::server::password_limits::PasswordRules {
            max_checks: self.max_password_checks,
            max_checks_per_prefix: self.max_password_checks_per_prefix,
            free_failures: self.free_password_failures,
            lockout_base: Duration::from_millis(self.lockout_base_ms),
            lockout_max: Duration::from_millis(self.lockout_max_ms),
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=32).contains(&self.ipv4_prefix) {
            return Err(format!(
                "[limits] ipv4_prefix must be 1..32, not {}",
                self.ipv4_prefix
            ));
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err(format!(
                "[limits] ipv6_prefix must be 1..128, not {}",
                self.ipv6_prefix
            ));
        }
        let positive = [
            (
                "max_connections_per_prefix",
                self.max_connections_per_prefix as f64,
            ),
            ("new_connections_per_sec", self.new_connections_per_sec),
            ("new_connections_burst", self.new_connections_burst),
            (
                "max_handshakes_per_prefix",
                self.max_handshakes_per_prefix as f64,
            ),
            ("max_handshakes", self.max_handshakes as f64),
            ("handshake_timeout_ms", self.handshake_timeout_ms as f64),
            ("max_password_checks", self.max_password_checks as f64),
            (
                "max_password_checks_per_prefix",
                self.max_password_checks_per_prefix as f64,
            ),
        ];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("[limits] {name} must be above 0"));
            }
        }
        Ok(())
    }
}

/// Everything the channels file configures.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerFile {
    pub channels: Vec<ChannelConfig>,
    pub limits: ServerLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsFile {
    #[serde(rename = "channel", default)]
    channels: Vec<ChannelConfig>,
    #[serde(default)]
    limits: ServerLimits,
}

/// Parses a channels file's channels. `origin` names the file in error messages.
pub fn parse_channels(text: &str, origin: &str) -> Result<Vec<ChannelConfig>, ConfigError> {
    parse_server_file(text, origin).map(|f| f.channels)
}

/// Parses a channels file: its channels and its `[limits]`. `origin` names the file in error
/// messages.
pub fn parse_server_file(text: &str, origin: &str) -> Result<ServerFile, ConfigError> {
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
    file.limits.validate().map_err(invalid)?;
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
    Ok(ServerFile {
        channels: file.channels,
        limits: file.limits,
    })
}

/// Loads the channels file at `path`, or the built-in list when `path` is `None`.
pub fn load_channels(path: Option<&Path>) -> Result<Vec<ChannelConfig>, ConfigError> {
    load_server_file(path).map(|f| f.channels)
}

/// Loads the channels file (channels and `[limits]`) at `path`, or the built-in channels with
/// default limits when `path` is `None`.
pub fn load_server_file(path: Option<&Path>) -> Result<ServerFile, ConfigError> {
    match path {
        None => parse_server_file(DEFAULT_CHANNELS_TOML, "built-in channels"),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            parse_server_file(&text, &p.display().to_string())
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
    /// Push-to-talk also while another window has focus, where the desktop allows it (on
    /// unless turned off).
    pub ptt_outside_window: Option<bool>,
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
        Self::load_checked().0
    }

    /// Like [`Self::load`], and says whether a file that was there could not be read (it is
    /// then set aside: see [`load_toml`]).
    pub fn load_checked() -> (Self, Option<SetAside>) {
        match Self::path() {
            Some(p) => load_toml(&p),
            None => (Self::default(), None),
        }
    }

    /// Loads settings from `path`; missing gives defaults, and so does unreadable, after
    /// setting the file aside (see [`load_toml`]).
    pub fn load_from(path: &std::path::Path) -> Self {
        load_toml(path).0
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

/// A remembered-settings file that was there but could not be read or parsed. It is renamed
/// (`settings.toml` to `settings.toml.unreadable-<unix seconds>`) before anything is saved, so
/// the next save cannot replace what the user had: a typo made by hand costs the defaults for
/// one run, never the file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{} could not be read ({reason}); {}", path.display(), match kept_as {
    Some(k) => format!("it was kept as {} and defaults are used", k.display()),
    None => "it could not be moved aside either, so nothing will be saved over it".to_owned(),
})]
pub struct SetAside {
    pub path: PathBuf,
    /// Where the file now is (`None`: it could not be renamed and stays where it was).
    pub kept_as: Option<PathBuf>,
    pub reason: String,
}

/// Reads a TOML settings file: a missing file gives the defaults; one that cannot be read or
/// parsed gives the defaults too, and is set aside ([`SetAside`]).
pub fn load_toml<T: serde::de::DeserializeOwned + Default>(path: &Path) -> (T, Option<SetAside>) {
    let reason = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (T::default(), None),
        Err(e) => e.to_string(),
        Ok(text) => match toml::from_str(&text) {
            Ok(value) => return (value, None),
            Err(e) => match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("line {line}: {}", e.message())
                }
                None => e.message().to_owned(),
            },
        },
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".unreadable-{secs}"));
    let aside = PathBuf::from(name);
    // Only a file is moved (a directory in its place is not ours to move).
    let kept_as = (path.is_file() && std::fs::rename(path, &aside).is_ok()).then_some(aside);
    let set_aside = SetAside {
        path: path.to_path_buf(),
        kept_as,
        reason,
    };
    (T::default(), Some(set_aside))
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
    fn a_limits_table_sets_what_it_names_and_keeps_the_other_defaults() {
        let text = "[[channel]]\nname='A'\n[limits]\nipv6_prefix = 56\nmax_handshakes = 100\n";
        let file = parse_server_file(text, "t").unwrap();
        assert_eq!(file.limits.ipv6_prefix, 56);
        assert_eq!(file.limits.max_handshakes, 100);
        assert_eq!(file.limits.ipv4_prefix, 32);
        assert_eq!(file.limits.max_password_checks, 32);
        assert_eq!(
            parse_server_file("[[channel]]\nname='A'\n", "t")
                .unwrap()
                .limits,
            ServerLimits::default()
        );
        for bad in [
            "ipv4_prefix = 33",
            "ipv6_prefix = 0",
            "max_handshakes = 0",
            "burst = 3",
        ] {
            let text = format!("[[channel]]\nname='A'\n[limits]\n{bad}\n");
            assert!(parse_server_file(&text, "t").is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hash_then_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "s3cret "));
    }
}
