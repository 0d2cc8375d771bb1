//! The client's control plane: the pure [`session::ControlSession`] and the Bevy
//! [`plugin::ClientNetPlugin`] that connects it to a TCP socket and mirrors the server's
//! overview as `Channel` and `User` entities.

#[cfg(feature = "app")]
pub mod components;
#[cfg(feature = "app")]
pub mod person_settings;
#[cfg(feature = "app")]
pub mod plugin;
pub mod session;
#[cfg(feature = "app")]
pub mod transport;

#[cfg(feature = "app")]
pub use components::*;
#[cfg(feature = "app")]
pub use person_settings::PersonSettings;
#[cfg(feature = "app")]
pub use plugin::{ClientIntent, ClientNetPlugin, ControlEvent, ControlLink};
pub use session::{ControlSession, DisconnectReason, Phase, SessionEvent, TransportError};
