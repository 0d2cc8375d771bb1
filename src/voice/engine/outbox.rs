//! Where the engine's outgoing datagrams wait for [`VoiceEngine::poll_transmit`](super::VoiceEngine::poll_transmit).

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::protocol::datagram::{MAX_VOICE_PAYLOAD, VOICE_HEADER_LEN};

/// Largest datagram the engine writes: a sealed voice frame.
pub const MAX_DATAGRAM_LEN: usize = VOICE_HEADER_LEN + MAX_VOICE_PAYLOAD;

pub use crate::protocol::Transmit;

/// Most sealed voice datagrams queued between two drains (a channel's worth of frames many
/// times over); beyond it new ones are dropped, since the shell is not draining.
const MAX_QUEUED_VOICE: usize = 512;

/// Sealed voice datagrams waiting for `poll_transmit`, back to back in one buffer that is
/// reused: once it has grown to a channel's size, a frame costs no allocation.
#[derive(Default)]
pub(super) struct Outbox {
    bytes: Vec<u8>,
    queue: VecDeque<(SocketAddr, std::ops::Range<usize>)>,
}

impl Outbox {
    pub(super) fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        if self.queue.len() >= MAX_QUEUED_VOICE {
            return;
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.queue.push_back((to, start..self.bytes.len()));
    }

    pub(super) fn pop(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        let (to, range) = self.queue.pop_front()?;
        let len = range.len();
        buf[..len].copy_from_slice(&self.bytes[range]);
        if self.queue.is_empty() {
            self.bytes.clear();
        }
        Some(Transmit { to, len })
    }
}
