//! Wire formats shared by server and clients. Pure: no sockets, no clocks.
//!
//! - [`messages`]: the control messages exchanged over TCP.
//! - [`framing`]: length-prefixed bincode frames with a size limit and an incremental decoder.
//! - [`status`]: the outcome codes of control requests, each with a human message.
//! - [`datagram`]: the UDP datagram format of the voice plane.

pub mod datagram;
pub mod framing;
pub mod messages;
pub mod status;
pub mod transmit;

pub use framing::{encode_frame, FrameDecoder, FramingError, MAX_FRAME_LEN};
pub use messages::{ChannelInfo, ClientMsg, MemberInfo, PeerInfo, ServerMsg, UserId};
pub use status::Status;
pub use transmit::Transmit;

/// Version of the control protocol and datagram format. Bumped on any incompatible change;
/// a client and server with different versions refuse each other with [`Status::VersionMismatch`].
pub const PROTOCOL_VERSION: u32 = 2;

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
}

/// Checks a username: 1..=32 characters, printable, no leading or trailing whitespace.
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
    Ok(())
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
