//! The metadata server: a pure rule core ([`state::ServerState`]) and the Bevy shell that feeds
//! it from non-blocking sockets ([`plugin::ServerPlugin`]).

pub mod components;
pub mod conn;
pub mod fanout;
pub mod plugin;
pub mod state;

pub use plugin::{ServerConfig, ServerPlugin, ServerStats};
pub use state::{Output, ServerRules, ServerState, SessionId};
