//! The sending side of the voice plane: the [`capture`] chain (high-pass filter and echo
//! cancellation, noise suppression, gain control, voice activity detection with pre-roll, mute
//! and push-to-talk) decides which microphone frames go out, [`processing`] holds the WebRTC
//! stages of that chain, [`vad`] and [`levels`] measure, and the Opus [`encoder`] compresses.
//! Pure: time is passed in.

pub mod capture;
pub mod encoder;
pub mod levels;
pub mod processing;
pub mod vad;

pub use encoder::{bitrate_for_loss, LossShape, OpusEncoder};
pub use processing::{EchoAndGain, EchoStats, ProcessingConfig};
