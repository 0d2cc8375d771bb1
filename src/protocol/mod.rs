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

pub use framing::{encode_frame, FrameDecoder, FramingError, MAX_FRAME_LEN};
pub use messages::{ChannelInfo, ClientMsg, MemberInfo, PeerInfo, ServerMsg, UserId};
pub use status::Status;

/// Version of the control protocol and datagram format. Bumped on any incompatible change;
/// a client and server with different versions refuse each other with [`Status::VersionMismatch`].
pub const PROTOCOL_VERSION: u32 = 2;

/// Version of this build, sent in `Hello` for diagnostics.
pub const APP_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default TCP port of the metadata server; its UDP endpoint-discovery socket uses the same number.
pub const DEFAULT_PORT: u16 = 7700;

/// Longest accepted username, in characters.
pub const MAX_USERNAME_CHARS: usize = 32;

/// Checks a username: 1..=32 characters, printable, no leading or trailing whitespace.
/// Returns the human reason when it is refused.
pub fn validate_username(name: &str) -> Result<(), String> {
    let count = name.chars().count();
    if count == 0 {
        return Err("username is empty".into());
    }
    if count > MAX_USERNAME_CHARS {
        return Err(format!(
            "username is too long ({count} characters, at most {MAX_USERNAME_CHARS})"
        ));
    }
    if name.trim() != name {
        return Err("username starts or ends with a space".into());
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "username contains a non-printable character (U+{:04X})",
            c as u32
        ));
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
}
