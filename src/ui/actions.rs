//! What the user asked for, as returned by the panel functions.
//!
//! Panels never perform I/O: they return `UiAction`s and the UI plugin turns each into the
//! matching Bevy event for the network, voice or audio systems.

/// One user intent produced by a panel during a frame.
///
/// Invariants: `volume` values are within `0.0..=2.0`; `DismissError` indexes into the
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
        /// Password as typed.
        password: String,
    },
    /// Close the password prompt without joining.
    CancelPassword,
    /// Leave the current channel.
    Leave,
    /// Mute or unmute the microphone.
    SetMute(bool),
    /// Deafen or undeafen the output.
    SetDeafen(bool),
    /// Switch push-to-talk mode on or off.
    SetPtt(bool),
    /// The push-to-talk key went down (`true`) or up (`false`) while push-to-talk is enabled.
    PushToTalk(bool),
    /// Switch noise suppression on or off.
    SetNoiseSuppression(bool),
    /// Change the voice-activity threshold (dBFS).
    SetVadThreshold(f32),
    /// Change one peer's local playback volume.
    SetUserVolume {
        /// Peer.
        user_id: u32,
        /// New gain, 0..2.
        volume: f32,
    },
    /// Silence or unsilence one peer for the local user only.
    SetUserMuted {
        /// Peer.
        user_id: u32,
        /// New local-mute state.
        muted: bool,
    },
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
    /// Disconnect from the server.
    Disconnect,
}
