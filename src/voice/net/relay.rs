//! `RelayRoute`: reaching one peer through a relay while no direct path works.
//!
//! Two members behind symmetric or carrier NATs cannot punch through to each other, but each
//! may reach a third member directly, and both reach the server. A relay forwards the pair's
//! sealed datagrams (`RelayTo` in, `RelayFrom` out, see `protocol::datagram`): it cannot read
//! voice nor forge control, so what it could do is drop, delay or replay, and replays die in
//! the receiver's replay window.
//!
//! A route starts probing at the same moment the link starts punching, so audio flows over
//! whichever path answers first: every `probe_interval` a tagged Ping goes to the peer through
//! each possible relay (every member we are directly connected to, and the server if it
//! relays). A relay path becomes usable only when a Pong for one of *our* Pings comes back
//! through it (consent: a replayed or forwarded Ping proves nothing about the path). Among the
//! paths that answered within `path_timeout`, a member is preferred to the server (the design
//! keeps the server out of voice), then the lowest round trip (which is the sum of the two
//! legs). While the route is in use, keepalive Pings go every `keepalive_interval` on every
//! path, so a better or backup path is known before the current one dies. Once the direct link
//! connects, the caller stops wanting the route; voice moves to the direct path at once, and
//! relayed datagrams still in flight are played (they are sealed and replay-checked the same).
//!
//! Sans-IO with the crate's calling contract: [`RelayRoute::handle_timeout`],
//! [`RelayRoute::handle_pong`] / [`RelayRoute::handle_ping`] feed it, [`RelayRoute::poll_transmit`]
//! drains what it wants sent, [`RelayRoute::poll_timeout`] says when to call it again.

use std::collections::VecDeque;
use std::time::Duration;

use crate::protocol::datagram::Datagram;

/// Who forwards a relayed datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    /// A member of our channel (user id) connected directly to both ends.
    Member(u32),
    /// The metadata server (when its operator lets it relay).
    Server,
}

/// Why a member does not forward a `RelayTo` it received. Refusals are counted, never
/// answered (an answer would let anyone bounce traffic off us).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardRefusal {
    #[error("the sender is not a member we are directly connected to")]
    NotConnected,
    #[error("the inner datagram was not written by the member that sent it")]
    ForgedSender,
    #[error("no such member to forward to")]
    NoSuchTarget,
    #[error("we have no direct path to the addressed member")]
    TargetNotConnected,
    #[error("the pair is over its relay budget")]
    OverBudget,
}

/// Timing of relay paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Gap between probe rounds while no relay path has answered.
    pub probe_interval: Duration,
    /// Gap between Pings on every path once one answered.
    pub keepalive_interval: Duration,
    /// A path that answered nothing for this long is not used.
    pub path_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(200),
            keepalive_interval: Duration::from_secs(1),
            path_timeout: Duration::from_millis(3500),
        }
    }
}

/// Most relay paths tried per peer: every member of a big channel would be a lot of probes,
/// and the first few connected members already give a choice.
pub const MAX_RELAY_PATHS: usize = 8;

/// How much better (lower RTT) another path of the same kind must be before voice moves to it:
/// moving on every small difference would reorder frames for nothing.
const SWITCH_RTT_RATIO: f64 = 0.7;

/// Recent Pings remembered to validate Pongs.
const PING_MEMORY: usize = 16;

/// One possible relay path and what it measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPath {
    pub via: Via,
    /// Smoothed round trip through the relay, once a Pong came back.
    pub rtt: Option<Duration>,
    /// When a Pong to one of our Pings last came back through it.
    pub last_answer: Option<Duration>,
}

/// A control datagram to send to the peer through `via` (the caller tags it for the peer and
/// wraps it in a `RelayTo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayedTransmit {
    pub via: Via,
    pub datagram: Datagram<'static>,
}

/// See the module docs.
///
/// Invariants: `active`, when set, is a path that answered within `path_timeout` of the last
/// `handle_timeout`; at most [`MAX_RELAY_PATHS`] paths; no datagram is queued while the route
/// is not wanted, except answers to the peer's own Pings.
#[derive(Debug, Clone)]
pub struct RelayRoute {
    our_id: u32,
    peer_id: u32,
    config: RelayConfig,
    paths: Vec<RelayPath>,
    active: Option<Via>,
    wanted: bool,
    next_probe: Duration,
    recent_pings: [Option<u64>; PING_MEMORY],
    next_ping_slot: usize,
    outbox: VecDeque<RelayedTransmit>,
    /// Voice datagrams received through a relay.
    pub voice_in: u64,
}

impl RelayRoute {
    pub fn new(our_id: u32, peer_id: u32, config: RelayConfig) -> Self {
        Self {
            our_id,
            peer_id,
            config,
            paths: Vec::new(),
            active: None,
            wanted: false,
            next_probe: Duration::ZERO,
            recent_pings: [None; PING_MEMORY],
            next_ping_slot: 0,
            outbox: VecDeque::new(),
            voice_in: 0,
        }
    }

    /// The relay voice goes through, if the route is wanted and a path answered.
    pub fn active(&self) -> Option<Via> {
        self.active.filter(|_| self.wanted)
    }

    /// The path in use and its figures.
    pub fn active_path(&self) -> Option<&RelayPath> {
        let via = self.active()?;
        self.paths.iter().find(|p| p.via == via)
    }

    pub fn paths(&self) -> &[RelayPath] {
        &self.paths
    }

    fn alive(&self, path: &RelayPath, now: Duration) -> bool {
        path.last_answer
            .is_some_and(|t| now.saturating_sub(t) < self.config.path_timeout)
    }

    /// Fires the route's timers. `wanted`: the direct link is not connected, so the peer is
    /// reachable only through a relay. `vias`: the relays possible right now (members we are
    /// directly connected to, other than the peer, and the server if it relays), best first.
    pub fn handle_timeout(&mut self, now: Duration, wanted: bool, vias: &[Via]) {
        if wanted && !self.wanted {
            // Probe at once: the direct path just failed or has not come up yet.
            self.next_probe = now;
        }
        self.wanted = wanted;
        // Keep measured paths that are still possible; add new ones up to the cap.
        self.paths.retain(|p| vias.contains(&p.via));
        for &via in vias {
            if self.paths.len() >= MAX_RELAY_PATHS {
                break;
            }
            if !self.paths.iter().any(|p| p.via == via) {
                self.paths.push(RelayPath {
                    via,
                    rtt: None,
                    last_answer: None,
                });
            }
        }
        self.choose(now);
        if self.wanted && now >= self.next_probe {
            for i in 0..self.paths.len() {
                let via = self.paths[i].via;
                self.send_ping(now, via);
            }
            let gap = if self.active.is_some() {
                self.config.keepalive_interval
            } else {
                self.config.probe_interval
            };
            self.next_probe = now + gap;
        }
    }

    /// When [`RelayRoute::handle_timeout`] is next needed (`None` while not wanted).
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.wanted {
            return None;
        }
        // Also wake when the active path would time out, to fall back promptly.
        let expiry = self
            .active_path()
            .and_then(|p| p.last_answer)
            .map(|t| t + self.config.path_timeout);
        Some(match expiry {
            Some(e) => self.next_probe.min(e),
            None => self.next_probe,
        })
    }

    /// `via` can no longer relay (the member left the channel): drop its path now rather than
    /// at the next timeout.
    pub fn forget(&mut self, via: Via) {
        self.paths.retain(|p| p.via != via);
        if self.active == Some(via) {
            self.active = None;
            // Probe the remaining paths at once.
            self.next_probe = Duration::ZERO;
        }
    }

    /// A Pong from the peer came back through `via`. Returns whether it answered one of our
    /// Pings (only then does the path count as working).
    pub fn handle_pong(&mut self, now: Duration, via: Via, echo_micros: u64) -> bool {
        if !self.recent_pings.contains(&Some(echo_micros)) {
            return false;
        }
        let Some(path) = self.paths.iter_mut().find(|p| p.via == via) else {
            return false;
        };
        let sample = Duration::from_micros((now.as_micros() as u64).saturating_sub(echo_micros));
        path.rtt = Some(match path.rtt {
            None => sample,
            Some(rtt) => (rtt * 7 + sample) / 8,
        });
        path.last_answer = Some(now);
        self.choose(now);
        true
    }

    /// A Ping from the peer arrived through `via`: answer through the same relay. (It says
    /// nothing about our own Pings, so it does not make the path usable for us.)
    pub fn handle_ping(&mut self, via: Via, sent_micros: u64) {
        if self.outbox.len() < 2 * PING_MEMORY {
            self.outbox.push_back(RelayedTransmit {
                via,
                datagram: Datagram::Pong {
                    from: self.our_id,
                    to: self.peer_id,
                    echo_micros: sent_micros,
                },
            });
        }
    }

    /// Next datagram to send through a relay. Call until `None`.
    pub fn poll_transmit(&mut self) -> Option<RelayedTransmit> {
        self.outbox.pop_front()
    }

    fn send_ping(&mut self, now: Duration, via: Via) {
        // Distinct per path, so a Pong is matched to the Ping it echoes even within one tick.
        let sent_micros = self.unique_stamp(now.as_micros() as u64);
        self.recent_pings[self.next_ping_slot] = Some(sent_micros);
        self.next_ping_slot = (self.next_ping_slot + 1) % PING_MEMORY;
        if self.outbox.len() < 2 * PING_MEMORY {
            self.outbox.push_back(RelayedTransmit {
                via,
                datagram: Datagram::Ping {
                    from: self.our_id,
                    to: self.peer_id,
                    sent_micros,
                },
            });
        }
    }

    /// `stamp`, moved up by a microsecond until no remembered Ping carries it.
    fn unique_stamp(&self, mut stamp: u64) -> u64 {
        while self.recent_pings.contains(&Some(stamp)) {
            stamp += 1;
        }
        stamp
    }

    /// Picks the path voice goes through: keep the current one while it answers unless a
    /// member beats the server or another path is clearly faster.
    fn choose(&mut self, now: Duration) {
        let rank = |p: &RelayPath| {
            let class = match p.via {
                Via::Member(_) => 0u8,
                Via::Server => 1,
            };
            (class, p.rtt.unwrap_or(Duration::MAX))
        };
        let best = self
            .paths
            .iter()
            .filter(|p| self.alive(p, now))
            .min_by_key(|p| rank(p))
            .copied();
        let current = self
            .active
            .and_then(|via| self.paths.iter().find(|p| p.via == via))
            .filter(|p| self.alive(p, now))
            .copied();
        self.active = match (current, best) {
            (None, best) => best.map(|p| p.via),
            (Some(cur), Some(best)) => {
                let (cur_class, cur_rtt) = rank(&cur);
                let (best_class, best_rtt) = rank(&best);
                let clearly_faster =
                    best_rtt.as_secs_f64() < cur_rtt.as_secs_f64() * SWITCH_RTT_RATIO;
                if best_class < cur_class || (best_class == cur_class && clearly_faster) {
                    Some(best.via)
                } else {
                    Some(cur.via)
                }
            }
            (Some(cur), None) => Some(cur.via),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain(route: &mut RelayRoute) -> Vec<RelayedTransmit> {
        std::iter::from_fn(|| route.poll_transmit()).collect()
    }

    fn ping_stamp(t: &RelayedTransmit) -> u64 {
        match t.datagram {
            Datagram::Ping { sent_micros, .. } => sent_micros,
            other => panic!("expected a Ping, got {other:?}"),
        }
    }

    #[test]
    fn nothing_is_probed_while_the_direct_link_works() {
        let mut route = RelayRoute::new(1, 2, RelayConfig::default());
        route.handle_timeout(ms(0), false, &[Via::Member(3), Via::Server]);
        assert!(drain(&mut route).is_empty());
        assert_eq!(route.poll_timeout(), None);
        assert_eq!(route.active(), None);
    }

    #[test]
    fn a_path_is_used_only_after_a_pong_to_our_own_ping_and_a_member_beats_the_server() {
        let mut route = RelayRoute::new(1, 2, RelayConfig::default());
        route.handle_timeout(ms(0), true, &[Via::Server, Via::Member(3)]);
        let probes = drain(&mut route);
        assert_eq!(probes.len(), 2, "one probe per possible relay");
        // A Ping from the peer (perhaps replayed) proves nothing about our path.
        route.handle_ping(Via::Server, 42);
        assert_eq!(route.active(), None);
        let answers = drain(&mut route);
        assert!(matches!(
            answers[..],
            [RelayedTransmit {
                via: Via::Server,
                datagram: Datagram::Pong {
                    from: 1,
                    to: 2,
                    echo_micros: 42
                }
            }]
        ));
        // A Pong echoing a stamp we never sent is ignored.
        assert!(!route.handle_pong(ms(10), Via::Server, 999_999));
        assert_eq!(route.active(), None);
        let server_stamp = ping_stamp(probes.iter().find(|p| p.via == Via::Server).unwrap());
        let member_stamp = ping_stamp(probes.iter().find(|p| p.via == Via::Member(3)).unwrap());
        assert!(route.handle_pong(ms(30), Via::Server, server_stamp));
        assert_eq!(
            route.active(),
            Some(Via::Server),
            "first answer wins at first"
        );
        assert!(route.handle_pong(ms(80), Via::Member(3), member_stamp));
        assert_eq!(
            route.active(),
            Some(Via::Member(3)),
            "a member replaces the server even though slower"
        );
        let rtt = route.active_path().unwrap().rtt.unwrap();
        assert!(rtt.abs_diff(ms(80)) < ms(1), "{rtt:?}");
    }

    #[test]
    fn a_silent_path_is_dropped_and_probing_speeds_up_again() {
        let cfg = RelayConfig::default();
        let mut route = RelayRoute::new(1, 2, cfg.clone());
        route.handle_timeout(ms(0), true, &[Via::Member(3)]);
        let stamp = ping_stamp(&drain(&mut route)[0]);
        route.handle_pong(ms(20), Via::Member(3), stamp);
        assert_eq!(route.active(), Some(Via::Member(3)));
        // Keepalives go every second while in use; none is answered.
        let mut t = ms(20);
        let mut sent = 0;
        while t < ms(20) + cfg.path_timeout {
            t = route.poll_timeout().unwrap();
            route.handle_timeout(t, true, &[Via::Member(3)]);
            sent += drain(&mut route).len();
        }
        assert_eq!(route.active(), None, "the relay went silent");
        assert!((3..=5).contains(&sent), "{sent} keepalives in 3.5 s");
        let next = route.poll_timeout().unwrap();
        route.handle_timeout(next, true, &[Via::Member(3)]);
        drain(&mut route);
        assert_eq!(
            route.poll_timeout().unwrap() - next,
            cfg.probe_interval,
            "back to fast probing"
        );
    }

    #[test]
    fn a_relay_that_left_is_no_longer_a_path() {
        let mut route = RelayRoute::new(1, 2, RelayConfig::default());
        route.handle_timeout(ms(0), true, &[Via::Member(3)]);
        let stamp = ping_stamp(&drain(&mut route)[0]);
        route.handle_pong(ms(20), Via::Member(3), stamp);
        route.handle_timeout(ms(30), true, &[Via::Server]);
        assert_eq!(route.active(), None);
        assert_eq!(route.paths().len(), 1);
        assert_eq!(route.paths()[0].via, Via::Server);
    }
}
