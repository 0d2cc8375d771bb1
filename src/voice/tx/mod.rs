//! The sending side of the voice plane: the [`capture`] chain (noise suppression, voice
//! activity detection with pre-roll, mute and push-to-talk) decides which microphone frames go
//! out, [`vad`] and [`levels`] measure them, and the Opus [`encoder`] compresses them. Pure:
//! time is passed in.

pub mod capture;
pub mod encoder;
pub mod levels;
pub mod vad;

pub use encoder::{bitrate_for_loss, OpusEncoder};
