//! What [`ServerState`] asks of its shell: per-session [`Output`]s, UDP [`Transmit`]s and
//! [`ServerEvent`]s, each drained one at a time with its `poll_*` method.
//!
//! [`ServerState`]: super::ServerState

use std::net::SocketAddr;

use super::{CloseReason, SessionId};
use crate::protocol::datagram::DatagramError;
use crate::protocol::{Password, ServerMsg};

/// What the shell must do for a session, drained with
/// [`poll_output`](super::ServerState::poll_output) in the order the rules produced them.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send one message to one session.
    Send(SessionId, ServerMsg),
    /// Send one message to every identified session (encode once, copy many).
    ///
    /// `prompt` are the sessions that must get it without delay: the members of the channel
    /// it is about, whose call it changes. Everyone else only keeps a lobby-wide overview
    /// current, so the shell may batch it with other presence news (one TLS record and one
    /// write per client instead of one per event); order per session is kept either way.
    Broadcast {
        msg: ServerMsg,
        prompt: Vec<SessionId>,
    },
    /// Send `Closing{reason}` (its `Display` text) if possible, then close the connection.
    /// The session is already gone from the rules: nothing more is sent to it.
    Close(SessionId, CloseReason),
    /// Check `password` against `hash` off the tick thread (argon2 is slow on purpose) and
    /// call [`handle_password_checked`](super::ServerState::handle_password_checked) with
    /// the same ticket.
    VerifyPassword {
        session: SessionId,
        ticket: u64,
        hash: String,
        password: Password,
    },
}

/// What became of a UDP datagram to the server, for the shell's counters and its ECS mirror;
/// drained with [`poll_event`](super::ServerState::poll_event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// The session's client registered its UDP (public, NAT-mapped) address; a `RegisterAck`
    /// is queued for [`poll_transmit`](super::ServerState::poll_transmit).
    UdpRegistered(SessionId),
    /// A sealed peer datagram of `bytes` was queued for forwarding (relaying is on).
    Relayed { bytes: usize },
    /// A datagram was dropped, unanswered.
    DatagramDropped { from: SocketAddr, why: DatagramDrop },
    /// A datagram tunnelled over session `session`'s connection was dropped, unanswered.
    TunnelDropped {
        session: SessionId,
        why: DatagramDrop,
    },
}

/// Why a datagram to the server was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramDrop {
    #[error("malformed datagram: {0}")]
    Malformed(#[from] DatagramError),
    /// A well-formed datagram the server has no use for (voice-plane traffic between peers).
    #[error("not a datagram for the server")]
    Unexpected,
    /// `Register` with a token no session holds (stale, or guessed).
    #[error("register with an unknown token")]
    UnknownToken,
    /// A valid token from an IP address other than its session's TCP connection.
    #[error("register from another address than the session's connection")]
    RegisterFromElsewhere,
    #[error("registers sent too fast")]
    RegisterRateLimited,
    /// A tunnelled datagram longer than any UDP datagram of ours.
    #[error("tunnelled datagram of {len} bytes is too long")]
    TooLong { len: usize },
    #[error("relay refused: {0}")]
    Relay(#[from] super::super::relay::RelayRefusal),
}

pub use crate::protocol::Transmit;
