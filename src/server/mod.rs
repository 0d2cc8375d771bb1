//! The metadata server: a pure rule core ([`state::ServerState`]), pure policy around it, and
//! the Bevy shell that feeds it from non-blocking sockets ([`plugin::ServerPlugin`]).
//!
//! Pure (time is an argument, no sockets): [`state`] (the rules and their calling contract),
//! [`close_reason`] (why a session ends, worded for the client), [`prefix`] (the address
//! prefix every per-address limit counts by), [`limits`] (connections open per prefix),
//! [`connect_rate`] (new connections per second per prefix), [`handshakes`] (TLS handshakes
//! in progress, bounded in number and time), [`password_limits`] (password checks in flight
//! and wrong-password lockouts), [`slow_clients`] (when a client that does not read is dropped),
//! [`close_timing`] (how long a closing connection may flush), [`fanout`] (when lobby-wide
//! presence news goes out, and how much of a tick writing it may take), [`relay`] (the
//! operator's relay settings and each client's relay budget).
//!
//! Shells: [`plugin`] (the Bevy systems), [`conn`] (one TLS connection), [`password_pool`]
//! (argon2 on worker threads).

pub mod close_reason;
pub mod close_timing;
pub mod components;
pub mod conn;
pub mod connect_rate;
pub mod fanout;
pub mod handshakes;
pub mod limits;
pub mod password_limits;
pub mod password_pool;
pub mod plugin;
pub mod prefix;
pub mod relay;
pub mod slow_clients;
pub mod state;

pub use close_reason::CloseReason;
pub use plugin::{ServerConfig, ServerPlugin, ServerStats};
pub use relay::{RelayRefusal, RelayRules};
pub use state::{
    ConnectionAddrs, DatagramDrop, Output, ServerEvent, ServerRules, ServerState, SessionId,
    Transmit,
};
