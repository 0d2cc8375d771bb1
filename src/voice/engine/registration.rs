//! Registration of our UDP address with the server: a `Register` carrying the token from the
//! control session, repeated until the server's `RegisterAck` tells us the public address it
//! saw, then refreshed slowly to keep our NAT mapping towards the server open.

use std::net::SocketAddr;
use std::time::Duration;

use super::Transmit;
use crate::protocol::datagram::Datagram;

/// How often the UDP registration with the server is repeated once acknowledged (keeps our
/// NAT mapping towards the server alive, and re-learns the address if it changes).
const REGISTER_REFRESH: Duration = Duration::from_secs(15);
/// Registration retry while unacknowledged.
const REGISTER_RETRY: Duration = Duration::from_millis(250);
/// Without an answer for this long, UDP to the server is taken to be blocked (five tries: at
/// 20 % loss each way all five round trips fail about once in 170, and then the tunnel only
/// carries the call until the first answer closes it), and voice falls back to the tunnel.
/// 1.5 s (six tries) put first audio through the tunnel at 2.06-2.08 s from start, over
/// issue 12's 2 s goal for a relayed call.
pub(super) const UDP_BLOCKED_AFTER: Duration = Duration::from_millis(1_250);
/// Registration retry once UDP looks blocked: slow, just enough to notice it opening up.
const REGISTER_RETRY_BLOCKED: Duration = Duration::from_secs(5);

/// The registration timer and what the server told us. Pure, driven by the engine.
///
/// Invariant: only an ack from the server's own address moves `public_addr`; acks from
/// anywhere else are only counted, since anyone could otherwise make us announce an address of
/// their choosing.
#[derive(Debug, Default)]
pub(super) struct Registration {
    /// The server's UDP address and our token; `None` until the control session has both.
    server: Option<(SocketAddr, u64)>,
    /// When registering with this server began (for telling that UDP is blocked).
    since: Duration,
    acked: bool,
    next: Duration,
    /// A Register is due: `handle_timeout` found it so, `poll_transmit` sends it.
    due: bool,
    public_addr: Option<SocketAddr>,
    foreign_acks: u64,
}

impl Registration {
    /// Starts (or restarts) registering with `addr` at `now`.
    pub(super) fn set_server(&mut self, now: Duration, addr: SocketAddr, token: u64) {
        self.server = Some((addr, token));
        self.since = now;
        self.acked = false;
        self.next = now;
    }

    /// Whether `from` is the server's UDP address.
    pub(super) fn is_server(&self, from: SocketAddr) -> bool {
        self.server.is_some_and(|(server, _)| server == from)
    }

    /// The server's UDP address (where server-relayed datagrams go), once known.
    pub(super) fn server_addr(&self) -> Option<SocketAddr> {
        self.server.map(|(addr, _)| addr)
    }

    /// The server acknowledged our registration; `observed` is our public address.
    pub(super) fn handle_ack(&mut self, now: Duration, observed: SocketAddr) {
        self.public_addr = Some(observed);
        self.acked = true;
        self.next = now + REGISTER_REFRESH;
    }

    /// A `RegisterAck` came from somewhere else than the server: ignored, counted.
    pub(super) fn count_foreign_ack(&mut self) {
        self.foreign_acks += 1;
    }

    pub(super) fn handle_timeout(&mut self, now: Duration) {
        if self.server.is_some() && now >= self.next {
            self.due = true;
            self.next = now
                + if self.acked {
                    REGISTER_REFRESH
                } else if self.udp_blocked(now) {
                    REGISTER_RETRY_BLOCKED
                } else {
                    REGISTER_RETRY
                };
        }
    }

    /// Whether the server has not answered a single registration in [`UDP_BLOCKED_AFTER`]:
    /// this network does not let our UDP reach it (or its answers reach us).
    pub(super) fn udp_blocked(&self, now: Duration) -> bool {
        self.server.is_some() && !self.acked && now.saturating_sub(self.since) >= UDP_BLOCKED_AFTER
    }

    /// The due `Register`, written into `buf`.
    pub(super) fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        if !std::mem::take(&mut self.due) {
            return None;
        }
        let (server, token) = self.server?;
        let len = (Datagram::Register { token }).write(buf).ok()?;
        Some(Transmit { to: server, len })
    }

    pub(super) fn poll_timeout(&self) -> Option<Duration> {
        self.server.map(|_| self.next)
    }

    pub(super) fn public_addr(&self) -> Option<SocketAddr> {
        self.public_addr
    }

    pub(super) fn foreign_acks(&self) -> u64 {
        self.foreign_acks
    }
}
