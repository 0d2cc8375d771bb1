//! Wire formats shared by server and clients. Pure: no sockets, no clocks.
//!
//! - [`messages`]: the control messages exchanged over TCP.
//! - [`framing`]: length-prefixed bincode frames with a size limit and an incremental decoder.
//! - [`status`]: the outcome codes of control requests, each with a human message.
//! - [`datagram`]: the UDP datagram format of the voice plane, relay envelopes included.
//! - [`relay_budget`]: the byte budget every relay (member or server) forwards within.

pub mod addr;
pub mod datagram;
pub mod framing;
pub mod messages;
pub mod password;
pub mod relay_budget;
pub mod status;
pub mod transmit;

pub use framing::{encode_frame, FrameDecoder, FramingError, MAX_FRAME_LEN};
pub use messages::{
    ChannelInfo, ClientMsg, MemberInfo, PeerInfo, ServerMsg, UserId, VoiceKeyProof,
};
pub use password::Password;
pub use status::Status;
pub use transmit::Transmit;

/// Version of the control protocol and datagram format. Bumped on any incompatible change;
/// a client and server with different versions refuse each other with [`Status::VersionMismatch`].
/// 5: voice keys travel with their identity signature (`VoiceKeyProof`).
/// 6: `Status::PasswordCheckPending` and `Status::ServerBusy` (a pending or busy password check
/// is no longer reported as `RateLimited`).
pub const PROTOCOL_VERSION: u32 = 6;

/// Version of this build, sent in `Hello` for diagnostics.
pub const APP_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default TCP port of the metadata server; its UDP endpoint-discovery socket uses the same number.
pub const DEFAULT_PORT: u16 = 7700;

/// Longest accepted username, in characters.
pub const MAX_USERNAME_CHARS: usize = 32;

/// Why a username is refused. The server and the connect panel apply the same rules through
/// [`validate_username`], so a name the panel lets through is never refused as invalid.
/// `Display` is the sentence the server sends in `ServerMsg::Error` (after "username is not
/// valid: "); the panel words its inline hints for a form field from the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// Nothing typed.
    #[error("username is empty")]
    Empty,
    /// More than [`MAX_USERNAME_CHARS`] characters (the count is in characters, not bytes).
    #[error("username is too long ({0} characters, at most {MAX_USERNAME_CHARS})")]
    TooLong(usize),
    /// Starts or ends with whitespace (checked before printability, so a leading tab is this).
    #[error("username starts or ends with a space")]
    SurroundingSpace,
    /// Contains a control character (tab, newline, bell, ...).
    #[error("username contains a non-printable character (U+{:04X})", *.0 as u32)]
    NotPrintable(char),
    /// Contains a character that shows as nothing (zero-width space or joiner, a bidi
    /// override, a soft hyphen ...): two names that look the same must not both exist, and a
    /// bidi override can make a name read backwards in everyone's list.
    #[error("username contains an invisible character (U+{:04X})", *.0 as u32)]
    Invisible(char),
}

/// Checks a username: 1..=32 characters, printable, nothing invisible, no leading or
/// trailing whitespace.
pub fn validate_username(name: &str) -> Result<(), UsernameError> {
    let count = name.chars().count();
    if count == 0 {
        return Err(UsernameError::Empty);
    }
    if count > MAX_USERNAME_CHARS {
        return Err(UsernameError::TooLong(count));
    }
    if name.trim() != name {
        return Err(UsernameError::SurroundingSpace);
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(UsernameError::NotPrintable(c));
    }
    if let Some(c) = name.chars().find(|c| is_invisible(*c)) {
        return Err(UsernameError::Invisible(c));
    }
    Ok(())
}

/// Characters UTS #39 classes as default-ignorable (they render as nothing), deprecated or
/// non-characters.
fn is_invisible(c: char) -> bool {
    use unicode_security::general_security_profile::IdentifierType;
    use unicode_security::GeneralSecurityProfile;
    matches!(
        c.identifier_type(),
        Some(
            IdentifierType::Default_Ignorable
                | IdentifierType::Deprecated
                | IdentifierType::Not_Character
        )
    )
}

/// What makes two usernames "the same" for uniqueness: the UTS #39 confusable skeleton of
/// the lower-cased name, so "Alice", "alice" and "аlice" (with a Cyrillic а) are one name and
/// only the first to arrive gets it.
pub fn username_key(name: &str) -> String {
    unicode_security::skeleton(&name.to_lowercase()).collect()
}

/// The one name of a server, under which its certificate is pinned and its members'
/// identities are remembered: `host:port` with the host lower-cased and an IP address
/// in its canonical form, so "Example.org:7700" and "example.org:7700", or "[::1]:7700" and
/// "[0:0::1]:7700", are one server. Anything unparsable is kept as typed.
pub fn server_key(server: &str) -> String {
    let Some((host, port)) = server.trim().rsplit_once(':') else {
        return server.trim().to_lowercase();
    };
    let Ok(port) = port.parse::<u16>() else {
        return server.trim().to_lowercase();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip.to_canonical(), port).to_string(),
        Err(_) => format!("{}:{port}", host.to_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_validated() {
        assert!(validate_username("alice").is_ok());
        assert!(validate_username("Zoë the 2nd").is_ok());
        assert!(validate_username(&"x".repeat(32)).is_ok());
        assert!(validate_username("").is_err());
        assert!(validate_username(&"x".repeat(33)).is_err());
        assert!(validate_username(" bob").is_err());
        assert!(validate_username("bob ").is_err());
        assert!(validate_username("b\u{7}ob").is_err());
        assert!(validate_username("b\nob").is_err());
        // Invisible characters: zero-width space and joiner, bidi override, soft hyphen.
        for sneaky in [
            "al\u{200B}ice",
            "al\u{200D}ice",
            "\u{202E}ecila",
            "al\u{AD}ice",
        ] {
            assert!(
                matches!(validate_username(sneaky), Err(UsernameError::Invisible(_))),
                "{sneaky:?}"
            );
        }
        // Real names in other scripts stay welcome.
        assert!(validate_username("Андрей").is_ok());
        assert!(validate_username("李小龙").is_ok());
    }

    #[test]
    fn look_alike_names_share_one_key() {
        let alice = username_key("alice");
        assert_eq!(username_key("Alice"), alice);
        assert_eq!(username_key("\u{430}lice"), alice, "Cyrillic a");
        assert_eq!(username_key("ALICE"), alice);
        assert_ne!(username_key("alicia"), alice);
        assert_ne!(username_key("Андрей"), username_key("Andrei"));
    }

    /// The server sends these sentences to clients; they must not change with the type.
    #[test]
    fn refusals_read_as_the_server_has_always_sent_them() {
        let why = |name: &str| validate_username(name).unwrap_err().to_string();
        assert_eq!(why(""), "username is empty");
        assert_eq!(
            why(&"é".repeat(33)),
            "username is too long (33 characters, at most 32)"
        );
        assert_eq!(why(" bob"), "username starts or ends with a space");
        assert_eq!(why("\tbob"), "username starts or ends with a space");
        assert_eq!(
            why("b\u{7}ob"),
            "username contains a non-printable character (U+0007)"
        );
        assert_eq!(
            validate_username("b\nob"),
            Err(UsernameError::NotPrintable('\n'))
        );
    }
}
