//! p2p-voice: peer-to-peer voice chat.
//!
//! A metadata server (TCP) introduces clients: channels, unique usernames, a live overview and
//! each member's UDP endpoints. Voice never passes through it: every client sends its
//! Opus-encoded microphone over UDP straight to every other member of its channel and mixes
//! what it receives through an adaptive jitter buffer.
//!
//! # Layers
//! - Pure cores (no I/O, no threads, time passed in): [`protocol`], `server::state`
//!   (`ServerState`), `client::session` (`ControlSession`), and the voice plane's
//!   `voice::engine` (`VoiceEngine`) with its `net`, `rx` and `tx` parts, and
//!   `voice::net::portmap` (`PortMapSchedule`: when to map, renew and remove our port on the
//!   router); the protocols themselves come from the `crab_nat` and `igd-next` crates.
//! - Thin shells around them: the Bevy plugins (`server::ServerPlugin`,
//!   `client::ClientNetPlugin`, `voice::VoicePlugin`, `ui::UiPlugin`), the voice thread
//!   (`voice::thread`), the port-mapping thread (`voice::port_mapping`) and the audio device
//!   thread (`audio`).
//! - `sim`: the whole system (server, control sessions, voice engines) over a simulated
//!   network with NATs, in simulated time, driving the very same calls as the shells.
//!
//! # The calling contract of a pure core
//! Every state machine has the shape of quinn-proto's `Connection`:
//! - `handle_*(now, input)` feeds it (a datagram, a message, a captured frame);
//! - `handle_timeout(now)` fires its timers; `poll_timeout()` says when that is next due;
//! - `poll_transmit(now, &mut buf) -> Option<Transmit>` drains the datagrams it wants sent,
//!   written into the caller's buffer (no callbacks), and `poll_event()` / `poll_action()` /
//!   `poll_output()` drain what it wants the application or the stream transport to do.
//!
//! A shell's whole loop: wait until a socket is readable or `poll_timeout` is due, feed what
//! arrived, fire due timers, drain everything, repeat. Here it is for the voice engine, with
//! the socket left out (the voice thread adds one `mio` poll around exactly this):
//!
#![cfg_attr(feature = "app", doc = "```")]
#![cfg_attr(not(feature = "app"), doc = "```ignore")]
//! use std::time::Duration;
//! use p2p_voice::voice::engine::{VoiceConfig, VoiceEngine, MAX_DATAGRAM_LEN};
//!
//! let cfg = VoiceConfig::default();
//! let mut engine = VoiceEngine::new(cfg, 7).expect("Opus is built in");
//! let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
//! let frame = vec![0.0f32; engine.frame().samples()];
//! let mut now = Duration::ZERO;
//! for _ in 0..50 {
//!     // 1. Feed: a captured frame here; datagrams go to `engine.handle_datagram(now, from, b)`.
//!     engine.handle_capture(now, &frame);
//!     // 2. Fire the timers that are due.
//!     if engine.poll_timeout().is_some_and(|due| due <= now) {
//!         engine.handle_timeout(now);
//!     }
//!     // 3. Drain everything it wants sent (`socket.send_to(&buf[..t.len], t.to)`).
//!     while let Some(t) = engine.poll_transmit(now, &mut buf) {
//!         assert!(t.len <= MAX_DATAGRAM_LEN);
//!     }
//!     //    Where UDP is blocked, what is for the server goes on the control connection
//!     //    instead (`ClientMsg::Tunnel`); what comes back is `engine.handle_tunnelled(now, b)`.
//!     while let Some(datagram) = engine.poll_tunnel() {
//!         assert!(datagram.len() <= MAX_DATAGRAM_LEN);
//!     }
//!     // 4. Sleep until the next input or `poll_timeout`, whichever comes first.
//!     now += engine.frame().duration();
//! }
//! assert_eq!(engine.snapshot(now).peers.len(), 0, "no peers announced yet");
//! ```

#[cfg(feature = "app")]
pub mod app;
#[cfg(feature = "engine")]
pub mod audio;
#[cfg(feature = "engine")]
pub mod client;
#[cfg(feature = "app")]
pub mod config;
#[cfg(feature = "app")]
pub mod headless;
pub mod identity;
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
