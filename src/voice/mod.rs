//! The voice plane: peers hear each other directly over UDP.
//!
//! Layers, lowest first; each may use the ones above it in this list, never the ones below:
//! - [`net`]: who we talk to and whether a datagram is really theirs: per-peer links (hole
//!   punching, keepalives), the peer table that routes datagrams, end-to-end crypto with the
//!   one replay window per direction, and a simulated network. Built without the `app` feature.
//! - [`codec`]: what both directions agree on about Opus (frame durations, limits, errors).
//! - [`rx`]: per-peer jitter buffer, Opus decoder and receiver, and the mixer of all peers.
//! - [`tx`]: the capture chain (denoise, VAD, mute, push-to-talk), levels and the Opus encoder.
//! - [`engine`]: [`VoiceEngine`], the whole voice plane of one client as one pure state machine:
//!   one `Peer` per remote member (its cipher, receive path and settings, next to its link in
//!   the peer table), registration with the server, the outbox and the snapshot.
//!
//! All of the above are pure (no sockets, no threads, time passed in). The only shells are
//! [`thread`] (UDP socket + audio rings, waking on `poll_timeout`), [`port_mapping`] (the
//! thread that asks the router to map our port, driven by `net::portmap`'s schedule) and
//! [`plugin`] (ECS bridge).

#[cfg(feature = "app")]
pub mod audio_problem;
#[cfg(feature = "engine")]
pub mod codec;
#[cfg(feature = "engine")]
pub mod engine;
pub mod net;
#[cfg(feature = "app")]
pub mod plugin;
#[cfg(feature = "app")]
pub mod port_mapping;
#[cfg(feature = "engine")]
pub mod rx;
#[cfg(feature = "app")]
pub mod thread;
#[cfg(feature = "engine")]
pub mod tx;

#[cfg(feature = "app")]
pub use audio_problem::AudioProblem;
#[cfg(feature = "engine")]
pub use engine::echo_test::{EchoTestResult, EchoTestStatus, EchoVerdict};
pub use engine::{
    ChatEvent, ChatMessage, ChatSent, PeerSettings, PeerSnapshot, PeerState, RelayVia, Unreachable,
    VoiceConfig, VoiceEngine, VoiceSetting, VoiceSnapshot,
};
pub use net::link::UnreachableReason;
#[cfg(feature = "app")]
pub use plugin::{ChatLine, ChatNews, Voice, VoicePlugin};
#[cfg(feature = "app")]
pub use thread::{VoiceCommand, VoiceCommander, VoiceEvent, VoiceThread, VoiceThreadConfig};
