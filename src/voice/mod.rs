//! The voice plane: peers hear each other directly over UDP.
//!
//! Pure parts (no sockets, no threads, time passed in): [`link`] and [`peers`] (hole punching,
//! keepalives, replay protection), [`codec`] (Opus), [`jitter`] and [`receiver`] (adaptive
//! playout), [`mixer`], [`vad`], [`capture`], [`levels`], and [`engine`] which combines them.
//! Shells: [`thread`] (UDP socket + audio rings) and [`plugin`] (ECS bridge).

#[cfg(feature = "app")]
pub mod audio_problem;
#[cfg(feature = "app")]
pub mod capture;
#[cfg(feature = "app")]
pub mod codec;
pub mod crypto;
#[cfg(feature = "app")]
pub mod engine;
pub mod impair;
#[cfg(feature = "app")]
pub mod jitter;
#[cfg(feature = "app")]
pub mod levels;
pub mod link;
#[cfg(feature = "app")]
pub mod mixer;
pub mod peers;
#[cfg(feature = "app")]
pub mod plugin;
#[cfg(feature = "app")]
pub mod receiver;
pub mod setting;
#[cfg(feature = "app")]
pub mod thread;
#[cfg(feature = "app")]
pub mod vad;

#[cfg(feature = "app")]
pub use audio_problem::AudioProblem;
#[cfg(feature = "app")]
pub use engine::{PeerSnapshot, PeerState, VoiceConfig, VoiceEngine, VoiceSnapshot};
#[cfg(feature = "app")]
pub use plugin::{Voice, VoicePlugin};
pub use setting::VoiceSetting;
#[cfg(feature = "app")]
pub use thread::{VoiceCommand, VoiceEvent, VoiceThread, VoiceThreadConfig};
