//! Audio problems the voice plane reports for the window to show while they last.

use thiserror::Error;

use crate::audio::Direction;

/// A live problem with the audio devices. The window shows each one until it is over (a lost
/// device that comes back withdraws its [`AudioProblem::DeviceLost`]); the text is the
/// `Display`.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AudioProblem {
    /// No capture device could be opened; we can hear but not speak.
    #[error("no microphone: {0}")]
    NoMicrophone(String),
    /// No playback device could be opened; we can speak but not hear.
    #[error("no speaker: {0}")]
    NoSpeaker(String),
    /// A running device failed; the device thread retries until it is back.
    #[error("{which:?} device lost: {reason}")]
    DeviceLost { which: Direction, reason: String },
    /// The device the user picked is gone (unplugged); the system default plays or records
    /// instead until it is back.
    #[error("{which:?} device {lost} is gone: using the system default, {desc}")]
    FellBack {
        which: Direction,
        lost: String,
        desc: String,
    },
    /// The user picked a device that could not be opened; the old one keeps running.
    #[error("could not switch device: {0}")]
    SwitchFailed(String),
}
