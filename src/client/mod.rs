//! The client's control plane: the pure [`session::ControlSession`] and the Bevy
//! [`plugin::ClientNetPlugin`] that connects it to a TCP socket and mirrors the server's
//! overview as `Channel` and `User` entities.

pub mod components;
pub mod person_settings;
pub mod plugin;
pub mod session;
pub mod transport;

pub use components::*;
pub use person_settings::PersonSettings;
pub use plugin::{ClientIntent, ClientNetPlugin, ControlEvent, ControlLink};
pub use session::{ControlSession, DisconnectReason, Phase, SessionEvent, TransportError};
