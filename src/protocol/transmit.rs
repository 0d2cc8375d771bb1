//! The one output shape of every pure core that sends datagrams.

use std::net::SocketAddr;

/// One datagram a core's `poll_transmit(now, &mut buf)` wrote into the caller's buffer: send
/// its first `len` bytes to `to`. The server (RegisterAck) and the voice engine (voice,
/// punches, keepalives) both answer with it, so every shell drains them the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub len: usize,
}
