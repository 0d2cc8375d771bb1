//! Why the server ends a session.
//!
//! The server decides on these variants (which counter to bump, whether a close came from the
//! client or from us) and sends their `Display` text to the client in `Closing{reason}`, so
//! the wording clients and tests see is written once, here.

use crate::protocol::{FramingError, Status, PROTOCOL_VERSION};

/// Why a session was (or is being) closed. `Display` is the user-facing text of the
/// `Closing` message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CloseReason {
    /// The client closed its side of the connection (end of stream).
    #[error("connection closed by peer")]
    PeerClosed,
    /// The TLS layer refused what the client sent. Holds rustls's description.
    #[error("TLS error: {0}")]
    Tls(String),
    /// Reading the socket failed. Holds the I/O error's description.
    #[error("read error: {0}")]
    Read(String),
    /// The client sent a frame that is not a valid message.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// The client does not read what we send (its output queue is full).
    #[error("too slow: output queue full")]
    TooSlow,
    /// The client sent more control messages than the rate limit allows.
    #[error("too many messages (limit {limit} per second)")]
    TooManyMessages { limit: f64 },
    /// The client speaks another protocol version than we do.
    #[error("{}: server speaks protocol {PROTOCOL_VERSION}, client speaks {client}",
        Status::VersionMismatch.message())]
    VersionMismatch { client: u32 },
    /// The first message was not `Hello`.
    #[error("protocol error: the first message must be Hello")]
    HelloFirst,
    /// `Hello` came a second time.
    #[error("protocol error: Hello sent twice")]
    HelloTwice,
    /// The client said `Disconnect`.
    #[error("goodbye")]
    Goodbye,
    /// Nothing arrived for longer than the heartbeat timeout.
    #[error("no heartbeat for {silent_secs} s")]
    HeartbeatTimeout { silent_secs: u64 },
    /// The connection did not identify within the identify timeout.
    #[error("did not identify in time")]
    IdentifyTimeout,
}

impl CloseReason {
    /// Did the client break the protocol or the transport (as opposed to leaving, being too
    /// slow, or being timed out)? The shell counts these in `ServerStats::protocol_errors`.
    pub fn is_transport_error(&self) -> bool {
        matches!(self, Self::Tls(_) | Self::Read(_) | Self::Framing(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients and integration tests match on these texts; they must not drift.
    #[test]
    fn display_is_the_text_clients_have_always_seen() {
        let cases = [
            (CloseReason::PeerClosed, "connection closed by peer"),
            (CloseReason::Tls("bad record".into()), "TLS error: bad record"),
            (CloseReason::Read("reset".into()), "read error: reset"),
            (
                CloseReason::Framing(FramingError::Empty),
                "empty frame",
            ),
            (CloseReason::TooSlow, "too slow: output queue full"),
            (
                CloseReason::TooManyMessages { limit: 20.0 },
                "too many messages (limit 20 per second)",
            ),
            (
                CloseReason::VersionMismatch { client: 99 },
                "client and server speak different protocol versions: server speaks protocol 6, client speaks 99",
            ),
            (
                CloseReason::HelloFirst,
                "protocol error: the first message must be Hello",
            ),
            (CloseReason::HelloTwice, "protocol error: Hello sent twice"),
            (CloseReason::Goodbye, "goodbye"),
            (
                CloseReason::HeartbeatTimeout { silent_secs: 16 },
                "no heartbeat for 16 s",
            ),
            (CloseReason::IdentifyTimeout, "did not identify in time"),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    #[test]
    fn an_oversized_frame_says_it_exceeds_the_limit() {
        let reason = CloseReason::from(FramingError::TooLarge { len: 1 << 20 });
        assert!(reason.to_string().contains("exceeds"));
        assert!(reason.is_transport_error());
    }

    #[test]
    fn only_broken_transports_count_as_protocol_errors() {
        assert!(!CloseReason::PeerClosed.is_transport_error());
        assert!(!CloseReason::Goodbye.is_transport_error());
        assert!(!CloseReason::TooSlow.is_transport_error());
        assert!(CloseReason::Tls("x".into()).is_transport_error());
        assert!(CloseReason::Read("x".into()).is_transport_error());
    }
}
