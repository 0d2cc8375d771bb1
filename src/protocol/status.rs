//! Outcome codes of control requests. Each carries a message a person can read.

use serde::{Deserialize, Serialize};

/// The result of a control request (hello, identify, join). Sent by the server with the context
/// needed to render a human message on the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    Ok,
    NoSuchChannel,
    WrongPassword,
    ChannelFull,
    NameTaken,
    InvalidName,
    NotIdentified,
    AlreadyIdentified,
    AlreadyInChannel,
    NotInChannel,
    VersionMismatch,
    /// Refused after too many wrong passwords (or other requests over a limit): wait.
    RateLimited,
    ServerFull,
    /// A join with a password is still being checked; this request changed nothing and the
    /// earlier one's answer follows.
    PasswordCheckPending,
    /// The server checks as many passwords as it may right now; nothing was counted, retry.
    ServerBusy,
}

impl Status {
    /// A short sentence for the user interface.
    pub fn message(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NoSuchChannel => "no such channel",
            Status::WrongPassword => "wrong password",
            Status::ChannelFull => "channel is full",
            Status::NameTaken => "username is already taken",
            Status::InvalidName => "username is not valid",
            Status::NotIdentified => "identify with a username first",
            Status::AlreadyIdentified => "already identified",
            Status::AlreadyInChannel => "already in that channel",
            Status::NotInChannel => "not in a channel",
            Status::VersionMismatch => "client and server speak different protocol versions",
            Status::RateLimited => "too many attempts, wait a moment",
            Status::ServerFull => "server is full",
            Status::PasswordCheckPending => "the password is still being checked",
            Status::ServerBusy => "the server is busy checking passwords, try again in a moment",
        }
    }

    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}
