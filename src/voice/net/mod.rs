//! The network layer of the voice plane: who we talk to, at which address, and whether a
//! datagram really came from them. Pure (no sockets, no clock) and built without the `app`
//! feature, so the fuzz targets reach it.
//!
//! - [`link`]: one peer's hole punching, consent and keepalive state machine ([`PeerLink`]).
//! - [`peers`]: the table of every peer's link behind our one UDP socket; routes each
//!   datagram by sender id and counts what it drops.
//! - [`crypto`]: per-peer keys, sealing and opening of voice, tags on control datagrams.
//! - [`chat`]: per-peer reliable, ordered text chat ([`ChatStream`]); [`chat_cipher`]: its
//!   own per-pair keys and the sealing of chat datagrams.
//! - [`relay`]: reaching a peer through a member or the server while no direct path works
//!   ([`RelayRoute`]), and the [`Via`] naming the relay.
//! - [`received`]: a datagram from the socket, parsed once, waiting for its cipher.
//! - [`replay`]: the replay window, kept by the cipher per direction of each peer.
//! - [`impair`]: a simulated lossy, jittery network for tests and `--impair`.
//! - [`portmap`]: when to ask the router for a port mapping (PCP, NAT-PMP, UPnP-IGD), renew
//!   it, announce it and remove it; [`gateway`]: which router to ask. The requests themselves
//!   (crab_nat for PCP and NAT-PMP, igd-next for UPnP) run on `voice::port_mapping`'s thread.

pub mod chat;
pub mod chat_cipher;
pub mod crypto;
pub mod gateway;
pub mod impair;
pub mod link;
pub mod peers;
pub mod portmap;
pub mod received;
pub mod relay;
pub mod replay;

pub use chat::ChatStream;
pub use link::{LinkConfig, LinkState, PeerLink};
pub use peers::{DropCounters, DropReason, Incoming, PeerTable};
pub use relay::{RelayRoute, Via};
