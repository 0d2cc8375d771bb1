//! p2p-voice: peer-to-peer voice chat.
//!
//! A metadata server (TCP) introduces clients: channels, unique usernames, a live overview and
//! each member's UDP endpoints. Voice never passes through it: every client sends its
//! Opus-encoded microphone over UDP straight to every other member of its channel and mixes
//! what it receives through an adaptive jitter buffer.
//!
//! Pure cores (no I/O, time passed in): [`protocol`], [`server::state`], [`client::session`].
//! Thin Bevy shells around them: [`server::ServerPlugin`], [`client::ClientNetPlugin`].

#[cfg(feature = "app")]
pub mod app;
#[cfg(feature = "app")]
pub mod audio;
#[cfg(feature = "app")]
pub mod client;
#[cfg(feature = "app")]
pub mod config;
#[cfg(feature = "app")]
pub mod headless;
pub mod protocol;
#[cfg(feature = "app")]
pub mod server;
#[cfg(feature = "app")]
pub mod sim;
#[cfg(feature = "app")]
pub mod tls;
#[cfg(feature = "app")]
pub mod ui;
pub mod voice;
