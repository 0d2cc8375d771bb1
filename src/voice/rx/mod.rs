//! The receiving side of the voice plane, per peer and then for all of them: the adaptive
//! [`jitter`] buffer decides what to play each frame period, the [`receiver`] turns that into
//! PCM with the Opus [`decoder`] (decode, FEC recovery, rebuilding from deep redundancy, or concealment), and the [`mixer`] sums
//! every peer into what the speaker plays. Pure: time is passed in.

pub mod cues;
pub mod decoder;
pub mod dred;
pub mod jitter;
pub mod loudness;
pub mod mixer;
pub mod receiver;
pub mod timescale;

pub use decoder::OpusDecoder;
