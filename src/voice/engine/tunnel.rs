//! The TCP fallback for networks that block UDP: when the server never answers our UDP
//! registration, what we would send to the server's UDP port (relay envelopes) goes through
//! the control connection instead, and the server sends what it relays to us back the same
//! way. Peers reach us through the server's relay, which only forwards sealed datagrams, so
//! the tunnel sees no more than the relay does.

use std::collections::VecDeque;
use std::net::SocketAddr;

/// Most datagrams waiting for the control connection; beyond it new ones are dropped (a
/// stalled shell must not grow memory, and late voice is worthless anyway).
const MAX_QUEUED: usize = 256;

/// Whether we tunnel, and what waits to go through the tunnel. Pure, driven by the engine.
///
/// Invariant: only datagrams addressed to the server's UDP address are ever diverted; peer
/// datagrams to other addresses always go out on UDP (a peer on the LAN may still answer).
#[derive(Debug, Default)]
pub(super) struct Tunnel {
    on: bool,
    queue: VecDeque<Vec<u8>>,
    diverted: u64,
    dropped: u64,
}

impl Tunnel {
    /// Tunnels while UDP to the server gets no answer and the server relays (without a relay
    /// there is nothing for the tunnel to carry). Turns back off once UDP works after all.
    pub(super) fn update(&mut self, udp_blocked: bool, server_relays: bool) {
        self.on = udp_blocked && server_relays;
    }

    pub(super) fn is_on(&self) -> bool {
        self.on
    }

    /// Takes `bytes` for the tunnel if it is on and they are for `server`; returns whether it
    /// took them (the caller then does not send them on UDP).
    pub(super) fn divert(
        &mut self,
        to: SocketAddr,
        server: Option<SocketAddr>,
        bytes: &[u8],
    ) -> bool {
        if !self.on || Some(to) != server {
            return false;
        }
        if self.queue.len() < MAX_QUEUED {
            self.queue.push_back(bytes.to_vec());
            self.diverted += 1;
        } else {
            self.dropped += 1;
        }
        true
    }

    /// The next datagram for the control connection.
    pub(super) fn poll(&mut self) -> Option<Vec<u8>> {
        self.queue.pop_front()
    }

    /// Datagrams sent through the tunnel so far, and dropped because it was backed up.
    pub(super) fn counts(&self) -> (u64, u64) {
        (self.diverted, self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_datagrams_for_the_server_are_diverted_and_only_while_on() {
        let server: SocketAddr = "198.51.100.1:7700".parse().unwrap();
        let peer: SocketAddr = "192.168.1.20:5000".parse().unwrap();
        let mut t = Tunnel::default();
        assert!(
            !t.divert(server, Some(server), b"a"),
            "off until UDP is found blocked"
        );
        t.update(true, false);
        assert!(
            !t.divert(server, Some(server), b"a"),
            "no relay: nothing to carry"
        );
        t.update(true, true);
        assert!(t.is_on());
        assert!(!t.divert(peer, Some(server), b"p"));
        assert!(t.divert(server, Some(server), b"s"));
        assert_eq!(t.poll(), Some(b"s".to_vec()));
        assert_eq!(t.poll(), None);
        t.update(false, true);
        assert!(!t.divert(server, Some(server), b"s"), "UDP works again");
    }

    #[test]
    fn a_backed_up_tunnel_drops_new_datagrams_and_counts_them() {
        let server: SocketAddr = "198.51.100.1:7700".parse().unwrap();
        let mut t = Tunnel::default();
        t.update(true, true);
        for i in 0..(MAX_QUEUED + 5) {
            assert!(t.divert(server, Some(server), &[i as u8]));
        }
        assert_eq!(t.counts(), (MAX_QUEUED as u64, 5));
        assert_eq!(t.poll(), Some(vec![0]));
    }
}
