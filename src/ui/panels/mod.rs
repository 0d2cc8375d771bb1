//! The app's egui panels as pure functions: plain view data in, [`UiAction`]s out.
//!
//! Each panel draws into a `Ui` (or, for windows, a `Context`) and returns what the user asked
//! for this frame; none performs I/O. The Bevy `UiPlugin` builds the views from ECS components,
//! calls these functions inside bevy_egui contexts and turns the actions into events.
//!
//! [`UiAction`]: crate::ui::actions::UiAction

pub mod chat;
pub mod connect;
pub mod controls;
pub mod help;
pub mod mesh_view;
pub mod meters;
pub mod overview;
pub mod password;
pub mod peer_details;
pub mod share;
pub mod sparkline;
pub mod status_bar;
pub mod waveform;

pub use chat::chat;
pub use connect::connect;
pub use controls::controls;
pub use help::{help_window, keyboard_shortcuts};
pub use overview::overview;
pub use password::password_prompt;
pub use share::share_panel;
pub use status_bar::status_bar;
pub use waveform::waveform;
