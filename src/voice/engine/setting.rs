//! What a person can change about their side of the call, as one enum.
//!
//! The UI's panels, the keyboard shortcuts and the headless CLI all express a change as a
//! [`VoiceSetting`]; it travels unchanged through ECS and the voice thread's command channel to
//! [`VoiceEngine::apply`]. Adding a setting is one variant here and one arm there, instead of a
//! UI action, an ECS intent, a thread command and a setter that each restate it.

use std::time::Duration;

use crate::protocol::UserId;

use super::VoiceEngine;
use crate::voice::tx::ProcessingConfig;

/// One change to the local voice plane.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VoiceSetting {
    /// Stop (or resume) sending the microphone.
    Muted(bool),
    /// Stop (or resume) playing what others say; deafening does not mute by itself.
    Deafened(bool),
    /// Run (or bypass) the noise suppressor in the capture chain.
    NoiseSuppression(bool),
    /// Take the speaker's sound out of the microphone (echo cancellation), or not.
    EchoCancellation(bool),
    /// Bring the microphone to a steady level (automatic gain control), or not.
    GainControl(bool),
    /// Filter rumble below about 80 Hz out of the microphone, or not.
    HighPass(bool),
    /// Bring every speaker to the same loudness (before each one's own volume), or not.
    NormalizeLoudness(bool),
    /// Send only while the push-to-talk key is held, instead of on voice activity.
    PushToTalk(bool),
    /// The push-to-talk key went down (`true`) or up (`false`).
    PttPressed(bool),
    /// The voice-activity threshold, in dBFS.
    VadThreshold(f32),
    /// Playback gain for one peer, `0.0..=2.0` (1.0 = as sent).
    PeerVolume {
        /// The peer.
        user_id: UserId,
        /// The new gain.
        volume: f32,
    },
    /// Silence one peer for the local user only.
    PeerMuted {
        /// The peer.
        user_id: UserId,
        /// The new local-mute state.
        muted: bool,
    },
    /// Play (or stop playing) the join, leave and mute sounds.
    Sounds(bool),
    /// Hear yourself as the others hear you (the microphone test), or stop.
    MicTest(bool),
    /// Run the echo test (see `echo_test`), or stop it.
    EchoTest(bool),
}

impl VoiceEngine {
    /// Applies one setting; `now` matters for push-to-talk, whose release is timed.
    pub fn apply(&mut self, now: Duration, setting: VoiceSetting) {
        match setting {
            VoiceSetting::Muted(m) => self.set_muted(m),
            VoiceSetting::Deafened(d) => self.set_deafened(d),
            VoiceSetting::NoiseSuppression(on) => self.set_noise_suppression(on),
            VoiceSetting::NormalizeLoudness(on) => self.set_normalize_loudness(on),
            VoiceSetting::EchoCancellation(echo_cancel) => self.set_processing(ProcessingConfig {
                echo_cancel,
                ..self.processing()
            }),
            VoiceSetting::GainControl(gain_control) => self.set_processing(ProcessingConfig {
                gain_control,
                ..self.processing()
            }),
            VoiceSetting::HighPass(high_pass) => self.set_processing(ProcessingConfig {
                high_pass,
                ..self.processing()
            }),
            VoiceSetting::PushToTalk(on) => self.set_push_to_talk(on),
            VoiceSetting::PttPressed(p) => self.set_ptt_pressed(now, p),
            VoiceSetting::VadThreshold(db) => self.set_vad_threshold_abs(db),
            VoiceSetting::PeerVolume { user_id, volume } => self.set_peer_volume(user_id, volume),
            VoiceSetting::PeerMuted { user_id, muted } => self.set_peer_muted(user_id, muted),
            VoiceSetting::Sounds(on) => self.set_sounds(on),
            VoiceSetting::MicTest(on) => self.set_mic_test(on),
            VoiceSetting::EchoTest(on) => self.set_echo_test(on),
        }
    }
}
