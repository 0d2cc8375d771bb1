//! TLS for the control connection, with trust on first use.
//!
//! The server makes a self-signed certificate the first time it starts and keeps it in its
//! data directory, so its identity stays the same across restarts. A client has no authority to
//! check that certificate against; instead it remembers the certificate's SHA-256 fingerprint
//! per server address the first time it connects (like SSH's known_hosts) and refuses, with a
//! clear warning, when a server later presents another one. TLS 1.3/1.2 still proves that the
//! server holds the key of the certificate it shows, so a pinned server cannot be impersonated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::protocol::server_key;

/// Errors setting up TLS, worded for the operator or user.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot create the server certificate: {0}")]
    Generate(String),
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
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's certificate and private key (DER).
pub struct ServerIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// A fresh self-signed identity (kept in memory only).
    pub fn generate() -> Result<Self, TlsError> {
        let ck = rcgen::generate_simple_self_signed(vec!["p2p-voice".to_string()])
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Self {
            cert: ck.cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der())),
        })
    }

    /// Loads the identity kept in `dir`, or creates and stores one.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join("server-cert.der");
        let key_path = dir.join("server-key.der");
        if cert_path.exists() && key_path.exists() {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|source| TlsError::Read {
                    path: p.to_path_buf(),
                    source,
                })
            };
            return Ok(Self {
                cert: CertificateDer::from(read(&cert_path)?),
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(read(&key_path)?)),
            });
        }
        let id = Self::generate()?;
        let write = |p: &Path, bytes: &[u8]| {
            std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(p, bytes))
                .map_err(|source| TlsError::Write {
                    path: p.to_path_buf(),
                    source,
                })
        };
        write(&cert_path, id.cert.as_ref())?;
        write(&key_path, id.key.secret_der())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(id)
    }

    pub fn fingerprint(&self) -> String {
        cert_fingerprint(&self.cert)
    }

    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }
}

/// Where the server keeps its identity: `P2P_VOICE_DATA_DIR`, else the platform data dir.
pub fn default_data_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("P2P_VOICE_DATA_DIR") {
        return Some(PathBuf::from(d));
    }
    directories::ProjectDirs::from("", "", "p2p-voice").map(|p| p.data_dir().to_path_buf())
}

/// SHA-256 of a certificate, as colon-separated hex (the form people compare).
pub fn cert_fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts any certificate during the handshake (the pin is checked right after it by
/// [`PinStore::check`]) but still verifies the handshake signature, so the server must hold
/// the certificate's private key.
#[derive(Debug)]
pub struct PinAfterHandshake {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinAfterHandshake {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client TLS configuration (pinning happens after the handshake).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinAfterHandshake { provider }))
        .with_no_client_auth();
    Arc::new(cfg)
}

/// The name to put in the TLS handshake for a server address (the certificate is not checked
/// against it; pins are per address).
pub fn server_name(host: &str) -> ServerName<'static> {
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("p2p-voice").expect("valid name"))
}

/// Outcome of checking a server's certificate against the pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinCheck {
    /// Seen before with this certificate.
    Known,
    /// First time: now pinned.
    Pinned,
    /// A different certificate than the one pinned: refuse.
    Changed { pinned: String, presented: String },
    /// Never seen, and the user wants to be asked first (the desktop app): refuse until they
    /// accept this fingerprint.
    Unknown { presented: String },
    /// The pin file exists but cannot be read or parsed: nothing can be checked, so refuse
    /// rather than trust whatever answers (and leave the file as it is for the user to see).
    Unreadable { path: String, reason: String },
}

/// What the user allows for a server certificate that is not pinned yet, or not the one
/// pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustChoice {
    /// Pin a server seen for the first time without asking (trust on first use: headless
    /// clients and scripts, which have nobody to ask).
    pub pin_first_use: bool,
    /// Replace a pin that no longer matches (`--accept-new-cert`).
    pub accept_any_change: bool,
    /// The one fingerprint the user accepted in the window, after comparing it: pinned
    /// whether it is the first or a changed one.
    pub accepted: Option<String>,
}

impl Default for TrustChoice {
    fn default() -> Self {
        Self {
            pin_first_use: true,
            accept_any_change: false,
            accepted: None,
        }
    }
}

/// Known server fingerprints per address, kept in `known_servers.toml` next to the settings.
#[derive(Debug, Default)]
pub struct PinStore {
    path: Option<PathBuf>,
    pins: BTreeMap<String, String>,
    /// Why the file on disk could not be used, if it could not.
    unreadable: Option<String>,
}

impl PinStore {
    /// In-memory only (tests, or when there is no config directory).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads `dir/known_servers.toml`. A missing file means nothing is pinned yet; a file that
    /// cannot be read or parsed makes every check [`PinCheck::Unreadable`], since treating it
    /// as empty would silently trust any server again.
    pub fn load(dir: Option<PathBuf>) -> Self {
        let path = dir.map(|d| d.join("known_servers.toml"));
        let mut store = Self {
            path,
            ..Self::default()
        };
        if let Some(p) = &store.path {
            match std::fs::read_to_string(p) {
                Ok(text) => match toml::from_str(&text) {
                    Ok(pins) => store.pins = pins,
                    Err(e) => store.unreadable = Some(e.message().to_string()),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => store.unreadable = Some(e.to_string()),
            }
        }
        store
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Checks `fingerprint` for `server` and pins it where `trust` allows: a server seen for
    /// the first time when `trust.pin_first_use` (headless clients, scripts) or when the user
    /// accepted exactly this fingerprint; a changed certificate only with
    /// `trust.accept_any_change` (`--accept-new-cert`) or that same explicit acceptance.
    pub fn check(&mut self, server: &str, fingerprint: &str, trust: &TrustChoice) -> PinCheck {
        if let Some(reason) = &self.unreadable {
            return PinCheck::Unreadable {
                path: self.path_text(),
                reason: reason.clone(),
            };
        }
        let key = server_key(server);
        // Pins written before keys were normalised are under the text as typed: adopt them.
        if !self.pins.contains_key(&key) {
            if let Some(old) = self.pins.remove(server) {
                self.pins.insert(key.clone(), old);
            }
        }
        let accepted = trust.accepted.as_deref() == Some(fingerprint);
        match self.pins.get(&key) {
            Some(p) if p == fingerprint => return PinCheck::Known,
            Some(p) if !trust.accept_any_change && !accepted => {
                return PinCheck::Changed {
                    pinned: p.clone(),
                    presented: fingerprint.to_string(),
                }
            }
            None if !trust.pin_first_use && !accepted => {
                return PinCheck::Unknown {
                    presented: fingerprint.to_string(),
                }
            }
            _ => {}
        }
        self.pins.insert(key, fingerprint.to_string());
        self.save();
        PinCheck::Pinned
    }

    fn path_text(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the pin store".into())
    }

    /// Writes the pins to a temporary file beside the real one and renames it over it, so a
    /// crash or a full disk mid-write leaves the old pins, never half a file.
    fn save(&self) {
        let Some(path) = &self.path else {
            return;
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let Ok(text) = toml::to_string(&self.pins) else {
            return;
        };
        let tmp = path.with_extension("toml.tmp");
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            use std::io::Write;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        });
        if written.is_ok() {
            let _ = std::fs::rename(&tmp, path);
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOFU: TrustChoice = TrustChoice {
        pin_first_use: true,
        accept_any_change: false,
        accepted: None,
    };
    const ACCEPT_CHANGE: TrustChoice = TrustChoice {
        pin_first_use: true,
        accept_any_change: true,
        accepted: None,
    };

    /// The desktop app asks before it trusts a server it has never seen (issue 13), and a
    /// fingerprint the user accepted is pinned whether it is new or changed; another one is not.
    #[test]
    fn asking_first_pins_only_the_fingerprint_the_user_accepted() {
        let mut pins = PinStore::in_memory();
        let mut ask = TrustChoice {
            pin_first_use: false,
            ..TOFU
        };
        assert_eq!(
            pins.check("h:1", "AA", &ask),
            PinCheck::Unknown {
                presented: "AA".into()
            }
        );
        ask.accepted = Some("BB".into());
        assert!(matches!(
            pins.check("h:1", "AA", &ask),
            PinCheck::Unknown { .. }
        ));
        ask.accepted = Some("AA".into());
        assert_eq!(pins.check("h:1", "AA", &ask), PinCheck::Pinned);
        ask.accepted = None;
        assert_eq!(pins.check("h:1", "AA", &ask), PinCheck::Known);
        assert!(matches!(
            pins.check("h:1", "CC", &ask),
            PinCheck::Changed { .. }
        ));
        ask.accepted = Some("CC".into());
        assert_eq!(pins.check("h:1", "CC", &ask), PinCheck::Pinned);
        assert_eq!(pins.check("h:1", "CC", &TOFU), PinCheck::Known);
    }

    #[test]
    fn first_use_pins_then_same_is_known_and_change_is_refused_unless_accepted() {
        let mut pins = PinStore::in_memory();
        assert_eq!(pins.check("h:1", "AA", &TOFU), PinCheck::Pinned);
        assert_eq!(pins.check("h:1", "AA", &TOFU), PinCheck::Known);
        assert_eq!(
            pins.check("h:1", "BB", &TOFU),
            PinCheck::Changed {
                pinned: "AA".into(),
                presented: "BB".into()
            }
        );
        assert_eq!(pins.check("h:1", "BB", &ACCEPT_CHANGE), PinCheck::Pinned);
        assert_eq!(pins.check("h:1", "BB", &TOFU), PinCheck::Known);
        // Pins are per address.
        assert_eq!(pins.check("h:2", "CC", &TOFU), PinCheck::Pinned);
    }

    #[test]
    fn pins_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("pv-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        PinStore::load(Some(dir.clone())).check("h:1", "AA", &TOFU);
        assert_eq!(
            PinStore::load(Some(dir.clone())).check("h:1", "AA", &TOFU),
            PinCheck::Known
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_pin_file_refuses_every_server_and_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("pv-pins-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("known_servers.toml");
        std::fs::write(&file, "this is = = not toml").unwrap();
        let mut pins = PinStore::load(Some(dir.clone()));
        assert!(matches!(
            pins.check("h:1", "AA", &TOFU),
            PinCheck::Unreadable { .. }
        ));
        // Not even --accept-new-cert pins over it: the user must look at the file.
        assert!(matches!(
            pins.check("h:1", "AA", &ACCEPT_CHANGE),
            PinCheck::Unreadable { .. }
        ));
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "this is = = not toml"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_server_written_two_ways_is_one_pin() {
        assert_eq!(server_key("Example.ORG:7700"), "example.org:7700");
        assert_eq!(server_key("[0:0::1]:7700"), "[::1]:7700");
        assert_eq!(server_key("[::ffff:127.0.0.1]:7700"), "127.0.0.1:7700");
        let mut pins = PinStore::in_memory();
        assert_eq!(
            pins.check("Example.org:7700", "AA", &TOFU),
            PinCheck::Pinned
        );
        assert!(matches!(
            pins.check("example.org:7700", "BB", &TOFU),
            PinCheck::Changed { .. }
        ));
    }

    #[test]
    fn pins_saved_under_the_typed_text_are_still_honoured() {
        let dir = std::env::temp_dir().join(format!("pv-pins-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("known_servers.toml"),
            "\"Example.org:7700\" = \"AA\"\n",
        )
        .unwrap();
        let mut pins = PinStore::load(Some(dir.clone()));
        assert!(matches!(
            pins.check("Example.org:7700", "BB", &TOFU),
            PinCheck::Changed { .. }
        ));
        assert_eq!(pins.check("example.org:7700", "AA", &TOFU), PinCheck::Known);
        // Saved atomically: no temporary file left behind.
        pins.check("other:1", "CC", &TOFU);
        assert!(!dir.join("known_servers.toml.tmp").exists());
        assert_eq!(
            PinStore::load(Some(dir.clone())).check("other:1", "CC", &TOFU),
            PinCheck::Known
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_server_identity_is_kept_across_restarts() {
        let dir = std::env::temp_dir().join(format!("pv-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = ServerIdentity::load_or_create(&dir).unwrap();
        let b = ServerIdentity::load_or_create(&dir).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.server_config().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
