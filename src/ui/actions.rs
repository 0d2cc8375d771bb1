//! What the user asked for, as returned by the panel functions.
//!
//! Panels never perform I/O: they return `UiAction`s and the UI plugin turns each into the
//! matching Bevy event for the network, voice or audio systems.

use crate::protocol::Password;
use crate::voice::VoiceSetting;

/// One user intent produced by a panel during a frame.
///
/// Invariants: peer volumes are within `0.0..=2.0`; `DismissError` indexes into the
/// `StatusView::errors` list the panel was drawn with in the same frame.
#[derive(Debug, Clone, PartialEq)]
pub enum UiAction {
    /// Connect to a metadata server with this (already validated) address and username.
    Connect {
        /// `host:port` as typed.
        address: String,
        /// Username, validated as 1..32 printable chars without surrounding spaces.
        username: String,
    },
    /// Join a channel without a password (or ask for one: the plugin opens the prompt when the
    /// channel is protected).
    Join {
        /// Channel to join.
        channel_id: u32,
    },
    /// Join a protected channel with this password.
    SubmitPassword {
        /// Channel to join.
        channel_id: u32,
        /// Password as typed (taken out of the text field, which is wiped).
        password: Password,
    },
    /// Close the password prompt without joining.
    CancelPassword,
    /// Leave the current channel.
    Leave,
    /// Change a voice setting (mute, deafen, push-to-talk, a peer's volume ...); handed to the
    /// voice thread unchanged.
    Voice(VoiceSetting),
    /// Push-to-talk also while other windows have focus (where the desktop allows it).
    SetPttOutsideWindow(bool),
    /// Start (true) or cancel (false) choosing the push-to-talk key: the next key pressed.
    ChoosePttKey(bool),
    /// Use this key (an egui key name) for push-to-talk.
    SetPttKey(String),
    /// Use this input device (by name).
    SelectInput(String),
    /// Use this output device (by name).
    SelectOutput(String),
    /// Remove the error message at this index from the status bar.
    DismissError(usize),
    /// Show or hide the keyboard-shortcut help window.
    ToggleHelp,
    /// Show or hide the performance overlay.
    TogglePerfOverlay,
    /// Show or hide the mesh view (the channel's links as a graph under the overview).
    ToggleMeshView,
    /// Disconnect from the server.
    Disconnect,
    /// Trust this server certificate fingerprint (checked with the operator) and connect.
    TrustCertificate {
        fingerprint: String,
        address: String,
        username: String,
    },
    /// Do not trust the certificate shown: close the prompt.
    DistrustCertificate,
    /// Mark a member's identity verified (the safety number was compared) or not; remembered
    /// across restarts for that name on this server and that identity key.
    SetVerified { user_id: u32, verified: bool },
    /// Accept a member's changed identity key (their voice is held back until then).
    AcceptIdentity { user_id: u32 },
    /// Send this chat message (checked: not blank, within the length limit) to the channel.
    SendChat(String),
}
