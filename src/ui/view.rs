//! Plain data the egui panels read each frame.
//!
//! The UI plugin builds these structs from ECS components (or keeps the editable ones, like
//! [`ConnectView`], as resources) and hands them to the panel functions in `panels`. Nothing in
//! here knows about egui, Bevy or sockets, so the panels can be driven by tests and benches with
//! hand-made values.

use std::collections::VecDeque;

pub use crate::ui::link_history::LinkHistory;
use crate::voice::{PeerState, VoiceSetting};

/// State of the connect screen: the two text fields the user edits in place plus what the
/// client knows about the last attempt.
///
/// Invariant: `server_address` and `username` are whatever the user typed; validation happens in
/// the panel (see `panels::connect::validate_username` / `validate_server_address`), never by
/// rewriting the text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectView {
    /// Server address as typed, expected as `host:port`.
    pub server_address: String,
    /// Username as typed.
    pub username: String,
    /// Why the server refused the last attempt ("Name taken", ...), shown next to the username.
    pub refusal: Option<String>,
    /// Network-level failure of the last attempt ("connection refused"), shown next to the address.
    pub address_problem: Option<String>,
    /// True while a connection attempt is in flight; the Connect button is disabled meanwhile.
    pub connecting: bool,
    /// The username used last time (from the config directory), offered as a one-click fill-in.
    pub remembered_username: Option<String>,
    /// The server's certificate waits for the user's decision: a new server, or a changed one.
    pub trust_prompt: Option<TrustPrompt>,
}

/// A server certificate to check before trusting it: the user compares `presented` with the
/// fingerprint its operator sees (the server prints it at start). `pinned` is the one trusted
/// before, when the certificate changed (a reinstall, or someone impersonating the server).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrustPrompt {
    pub presented: String,
    pub pinned: Option<String>,
}

impl ConnectView {
    /// A connect screen prefilled with a default address and the remembered username.
    pub fn new(server_address: impl Into<String>, remembered_username: Option<String>) -> Self {
        Self {
            server_address: server_address.into(),
            username: remembered_username.clone().unwrap_or_default(),
            remembered_username,
            ..Self::default()
        }
    }
}

/// How one channel member stands to us: ourselves, in another channel, or a peer whose voice
/// link is in the state the voice plane reports (the same [`PeerState`] from engine to panel).
#[derive(Debug, Clone, PartialEq)]
pub enum MemberLink {
    /// A peer in our channel.
    Peer(PeerState),
    /// This member is the local user; there is no link to show.
    Local,
    /// This member is in another channel: no voice link with them.
    OtherChannel,
}

impl Default for MemberLink {
    /// A peer we just heard of: punching has not answered yet.
    fn default() -> Self {
        Self::Peer(PeerState::Punching)
    }
}

/// Link quality numbers for one peer. `None` means "not measured yet", shown as a dash.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinkView {
    /// Current link state.
    pub state: MemberLink,
    /// Round-trip time in milliseconds.
    pub rtt_ms: Option<f32>,
    /// Packet loss in percent (0..=100).
    pub loss_pct: Option<f32>,
    /// The share of our voice this member reports losing, in percent.
    pub reported_loss_pct: Option<f32>,
    /// Measured inter-arrival jitter in milliseconds.
    pub jitter_ms: Option<f32>,
    /// Current jitter-buffer delay (playout target) in milliseconds.
    pub buffer_ms: Option<f32>,
}

/// One member of a channel as the overview shows them.
///
/// Invariants: `level` is in `0.0..=1.0`, `volume` in `0.0..=2.0` (1.0 = unchanged);
/// `muted_locally` and `volume` are meaningless for `is_self` and the panel does not offer them.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    /// Server-assigned user id.
    pub user_id: u32,
    /// Display name.
    pub name: String,
    /// Voice activity right now (drives the speaking ring).
    pub speaking: bool,
    /// Recent voice level, 0..1.
    pub level: f32,
    /// True for the local user.
    pub is_self: bool,
    /// The local user has silenced this member for themselves only.
    pub muted_locally: bool,
    /// Local playback gain for this member, 0..2.
    pub volume: f32,
    /// Link state and quality.
    pub link: LinkView,
    /// Key fingerprint of the peer, if the protocol exchanged one.
    pub fingerprint: Option<String>,
    /// Who this member is, as far as their identity key tells (see `crate::identity`).
    pub identity: IdentityView,
    /// The last minute of our link's loss and jitter, for the sparklines; `None` for
    /// ourselves and for members of other channels.
    pub history: Option<LinkHistory>,
}

/// What the window shows of a member's identity. Exists so the panels can show the safety
/// number, the verified mark and a changed identity without knowing about keys or trust files.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum IdentityView {
    /// Not checked (yet): no voice key announced, or a member of another channel.
    #[default]
    Unknown,
    /// The local user: the fingerprint of their own identity key, to read out to others.
    Own { fingerprint: String },
    /// The signature checked out and the identity is the one remembered (or new here).
    Trusted {
        safety_number: String,
        verified: bool,
    },
    /// Another identity key than the one remembered for this name: their voice is held back
    /// until the user accepts the new one.
    Changed {
        previous: String,
        presented: String,
        safety_number: Option<String>,
    },
    /// The voice key could not be tied to an identity: no voice with them.
    Refused { reason: String },
}

impl MemberView {
    /// A silent member at unity volume with an unmeasured link; handy for building views.
    pub fn new(user_id: u32, name: impl Into<String>) -> Self {
        Self {
            user_id,
            name: name.into(),
            speaking: false,
            level: 0.0,
            is_self: false,
            muted_locally: false,
            volume: 1.0,
            link: LinkView::default(),
            fingerprint: None,
            identity: IdentityView::Unknown,
            history: None,
        }
    }
}

/// One channel in the overview.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelView {
    /// Server-assigned channel id.
    pub id: u32,
    /// Channel name.
    pub name: String,
    /// Joining asks for a password (the client never sees the password itself).
    pub has_password: bool,
    /// Current members, in server order.
    pub members: Vec<MemberView>,
    /// Capacity; `None` means unlimited.
    pub max_members: Option<u32>,
}

/// Everything the overview panel shows: all channels and which one the local user is in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OverviewView {
    /// All channels the server announced.
    pub channels: Vec<ChannelView>,
    /// Id of the channel the local user is in, if any.
    pub my_channel: Option<u32>,
}

/// The modal password prompt for a protected channel. `password` is edited in place.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PasswordPromptView {
    /// Channel being joined.
    pub channel_id: u32,
    /// Its name, for the title.
    pub channel_name: String,
    /// Password as typed (masked on screen).
    pub password: String,
    /// Server answer to the last attempt, e.g. "Wrong password".
    pub error: Option<String>,
    /// True while the join request is in flight.
    pub pending: bool,
}

/// Connection to the metadata server, as shown in the status bar.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ConnectionState {
    /// Identified and receiving the overview.
    Connected,
    /// First attempt in flight.
    Connecting,
    /// Lost the server; the next attempt happens in `in_secs` seconds.
    Reconnecting {
        /// Seconds until the next attempt.
        in_secs: u32,
    },
    /// Not connected; the string says why ("server closed the connection").
    Disconnected(String),
    /// Never connected (start-up).
    #[default]
    Idle,
}

/// The status bar contents.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatusView {
    /// Server connection state.
    pub connection: ConnectionState,
    /// In host mode: the address other people should type to reach this server.
    pub host_address: Option<String>,
    /// Short description of the voice state ("3 peers, 2 direct", "muted", ...).
    pub voice_state: String,
    /// Fingerprint of the server's certificate while connected (pinned on first use): what to
    /// compare with the server's operator, who sees the same in their window or log.
    pub server_fingerprint: Option<String>,
    /// Recent human-readable error messages, oldest first; dismissed by index.
    pub errors: Vec<String>,
}

/// The local audio controls.
///
/// Invariant: `selected_input` / `selected_output` are names from the respective device list or
/// `None` for the system default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ControlsView {
    /// Microphone muted (nothing is sent).
    pub muted: bool,
    /// Output silenced (implies nothing heard; usually also muted).
    pub deafened: bool,
    /// Push-to-talk mode instead of voice activation.
    pub ptt_enabled: bool,
    /// Human label of the push-to-talk key, e.g. "Space" (an egui key name).
    pub ptt_key: String,
    /// Push-to-talk should also work while another window has focus.
    pub ptt_outside_window: bool,
    /// Where the push-to-talk key works now (decided in `ptt_scope`, answered by the grab).
    pub ptt_scope: crate::ui::ptt_scope::PttScope,
    /// The next key pressed becomes the push-to-talk key (Escape cancels).
    pub choosing_ptt_key: bool,
    /// Noise suppression on the capture chain.
    pub noise_suppression: bool,
    /// Every speaker brought to the same loudness.
    pub normalize_loudness: bool,
    /// Echo cancellation on the capture chain.
    pub echo_cancellation: bool,
    /// Automatic gain control on the capture chain.
    pub gain_control: bool,
    /// High-pass filter on the capture chain.
    pub high_pass: bool,
    /// What the echo canceller reports: echo taken out (dB) and the delay it found (ms).
    pub echo: Option<(f32, i32)>,
    /// Names of the available input devices.
    pub input_devices: Vec<String>,
    /// Names of the available output devices.
    pub output_devices: Vec<String>,
    /// Chosen input device, `None` = system default.
    pub selected_input: Option<String>,
    /// Chosen output device, `None` = system default.
    pub selected_output: Option<String>,
    /// Current own input level in dBFS (-inf..0).
    pub input_level_db: f32,
    /// Voice activity threshold in dBFS.
    pub vad_threshold_db: f32,
    /// The VAD currently says "speaking".
    pub speaking: bool,
    /// The VAD hears us although the microphone is muted: show "you are muted".
    pub talking_while_muted: bool,
    /// Join, leave and mute sounds play.
    pub sounds: bool,
    /// The microphone test is on: you hear yourself as the others do.
    pub mic_test: bool,
    /// The echo test: running (with its progress), or the last one's result.
    pub echo_test: Option<crate::voice::EchoTestStatus>,
}

impl ControlsView {
    /// Shows a setting the user just made, before the voice thread confirms anything: the
    /// controls must not flicker back for a frame.
    pub fn reflect(&mut self, setting: &VoiceSetting) {
        match *setting {
            VoiceSetting::Muted(m) => self.muted = m,
            VoiceSetting::Deafened(d) => self.deafened = d,
            VoiceSetting::PushToTalk(on) => self.ptt_enabled = on,
            VoiceSetting::NoiseSuppression(on) => self.noise_suppression = on,
            VoiceSetting::NormalizeLoudness(on) => self.normalize_loudness = on,
            VoiceSetting::EchoCancellation(on) => self.echo_cancellation = on,
            VoiceSetting::GainControl(on) => self.gain_control = on,
            VoiceSetting::HighPass(on) => self.high_pass = on,
            VoiceSetting::Sounds(on) => self.sounds = on,
            VoiceSetting::MicTest(on) => {
                self.mic_test = on;
                if on
                    && matches!(
                        self.echo_test,
                        Some(crate::voice::EchoTestStatus::Running(_))
                    )
                {
                    self.echo_test = None;
                }
            }
            VoiceSetting::EchoTest(on) => {
                self.echo_test = on.then_some(crate::voice::EchoTestStatus::Running(0.0));
                if on {
                    self.mic_test = false;
                }
            }
            // The threshold and the peers' settings are drawn from the voice snapshot and
            // the user entities; the key press has no lasting state.
            VoiceSetting::VadThreshold(_)
            | VoiceSetting::PttPressed(_)
            | VoiceSetting::PeerVolume { .. }
            | VoiceSetting::PeerMuted { .. } => {}
        }
    }
}

/// A bounded history of channel-mix levels (or decimated samples) for the scrolling waveform.
///
/// Invariant: never holds more than `capacity` values; pushing beyond drops the oldest.
/// Values are expected in `-1.0..=1.0` (samples) or `0.0..=1.0` (levels).
#[derive(Debug, Clone, PartialEq)]
pub struct MixHistory {
    values: VecDeque<f32>,
    capacity: usize,
}

impl MixHistory {
    /// An empty history keeping at most `capacity` values (at least 2, so a line can be drawn).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(2);
        Self {
            values: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends one value, dropping the oldest if full. Non-finite values are stored as 0.
    pub fn push(&mut self, value: f32) {
        if self.values.len() == self.capacity {
            self.values.pop_front();
        }
        self.values
            .push_back(if value.is_finite() { value } else { 0.0 });
    }

    /// Appends many values in order.
    pub fn extend(&mut self, values: impl IntoIterator<Item = f32>) {
        for v in values {
            self.push(v);
        }
    }

    /// Values oldest first.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.values.iter().copied()
    }

    /// Number of stored values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when nothing was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Maximum number of values kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Default for MixHistory {
    /// Five seconds of 20 ms levels.
    fn default() -> Self {
        Self::new(250)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_history_drops_oldest_when_full() {
        let mut h = MixHistory::new(3);
        h.extend([0.1, 0.2, 0.3, 0.4]);
        assert_eq!(h.iter().collect::<Vec<_>>(), vec![0.2, 0.3, 0.4]);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn mix_history_stores_non_finite_as_silence() {
        let mut h = MixHistory::new(4);
        h.push(f32::NAN);
        h.push(f32::INFINITY);
        assert_eq!(h.iter().collect::<Vec<_>>(), vec![0.0, 0.0]);
    }

    #[test]
    fn connect_view_prefills_remembered_username() {
        let v = ConnectView::new("example.org:7700", Some("alice".into()));
        assert_eq!(v.username, "alice");
        assert_eq!(v.server_address, "example.org:7700");
        assert!(!v.connecting);
    }
}
