//! The voice plane: peers hear each other directly over UDP.
//!
//! Pure parts (no sockets, no threads, time passed in): [`link`] and [`peers`] (hole punching,
//! keepalives, replay protection), [`codec`] (Opus), [`jitter`] and [`receiver`] (adaptive
//! playout), [`mixer`], [`vad`], [`capture`], [`levels`], and [`engine`] which combines them.
//! Shells: [`thread`] (UDP socket + audio rings) and [`plugin`] (ECS bridge).

pub mod capture;
pub mod codec;
pub mod crypto;
pub mod engine;
pub mod impair;
pub mod jitter;
pub mod levels;
pub mod link;
pub mod mixer;
pub mod peers;
pub mod plugin;
pub mod receiver;
pub mod thread;
pub mod vad;

pub use engine::{PeerSnapshot, PeerState, VoiceConfig, VoiceEngine, VoiceSnapshot};
pub use plugin::{Voice, VoiceIntent, VoicePlugin};
pub use thread::{VoiceCommand, VoiceEvent, VoiceThread, VoiceThreadConfig};
