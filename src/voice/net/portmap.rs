//! When to ask the router for a port mapping, when to renew it, what to announce, and when to
//! give up: the pure schedule behind the port-mapping thread (`voice::port_mapping`).
//!
//! A router that speaks PCP, NAT-PMP or UPnP-IGD can open our voice port on its public address for
//! a lease. Announced as one more candidate, that address lets a peer reach us even behind a
//! NAT that punching cannot get through (a symmetric one picks a new public port for every
//! destination, so the port the server saw is useless to peers; a mapped port is not).
//!
//! [`PortMapSchedule`] owns no socket and no clock, in the crate's calling contract: the shell
//! asks [`poll_request`](PortMapSchedule::poll_request) what to do now, performs it (blocking,
//! on its own thread), feeds the outcome back with
//! [`handle_mapped`](PortMapSchedule::handle_mapped) or
//! [`handle_failed`](PortMapSchedule::handle_failed), sleeps until
//! [`poll_timeout`](PortMapSchedule::poll_timeout) and then calls
//! [`handle_timeout`](PortMapSchedule::handle_timeout), and hands every
//! [`poll_event`](PortMapSchedule::poll_event) to the voice thread.
//!
//! ```text
//! Searching --mapped----------------> Mapped (announce; renew at half the lease)
//! Searching --failed----------------> Unavailable (search again after a back-off: 1, 2, 4 ... 30 min)
//! Mapped    --renew due-------------> Renewing (still announced)
//! Renewing  --mapped----------------> Mapped (announce again only if the address changed)
//! Renewing  --failed----------------> Mapped, retry at a quarter of what is left
//! Mapped    --lease ran out---------> Unavailable (withdraw)
//! any       --stop------------------> Stopping: remove the lease we hold, then Stopped
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// The lease we ask for. Short enough that a mapping left behind by a crash closes on its
/// own within the hour; renewed at half, so a living client never loses it.
pub const REQUESTED_LIFETIME: Duration = Duration::from_secs(20 * 60);
/// Back-off after a search found no router that maps, doubling up to [`MAX_SEARCH_BACKOFF`]:
/// a laptop that moves to another network finds a mapping router there before long, and a
/// network without one costs one search now and then.
pub const FIRST_SEARCH_BACKOFF: Duration = Duration::from_secs(60);
pub const MAX_SEARCH_BACKOFF: Duration = Duration::from_secs(30 * 60);
/// Shortest gap between renewal attempts, whatever the lease (a router granting a lease of a
/// few seconds must not make us hammer it).
pub const MIN_RENEW_GAP: Duration = Duration::from_secs(2);

/// How the router granted the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapProtocol {
    /// Port Control Protocol (RFC 6887), NAT-PMP's successor on the same port.
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886), UDP to the gateway's port 5351.
    NatPmp,
    /// UPnP Internet Gateway Device: SSDP discovery, then SOAP over HTTP.
    Upnp,
}

impl fmt::Display for MapProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapProtocol::Pcp => "pcp",
            MapProtocol::NatPmp => "natpmp",
            MapProtocol::Upnp => "upnp",
        })
    }
}

/// A mapping the router granted: packets to `external` reach our voice socket until
/// `lifetime` after it was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortLease {
    pub protocol: MapProtocol,
    pub external: SocketAddr,
    pub lifetime: Duration,
}

/// The mapping the voice thread announces, as its snapshot shows it: the lease, and when it
/// arrived (time since the voice thread started, so about since the socket was bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnouncedMapping {
    pub lease: PortLease,
    pub since: Duration,
}

/// What the shell should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapRequest {
    /// Ask for a mapping of our port, for `external_port` if the router agrees (another one
    /// is fine). `only` is the protocol to ask with when renewing (the router that granted
    /// the lease); `None` means search: try each protocol in turn.
    Map {
        only: Option<MapProtocol>,
        external_port: u16,
        lifetime: Duration,
    },
    /// Delete this lease (we are stopping).
    Remove(PortLease),
}

/// What the voice thread should learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapEvent {
    /// Announce this mapped address as a candidate (replacing any earlier one).
    Mapped(PortLease),
    /// The mapping is gone: stop announcing it.
    Withdrawn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A search is due at `at` (or in flight when `in_flight`).
    Searching {
        at: Duration,
        in_flight: bool,
    },
    /// No mapping router found; search again at `retry_at`.
    Unavailable {
        retry_at: Duration,
    },
    /// We hold `lease`, granted at `granted`; renew at `renew_at` (in flight when `in_flight`).
    Mapped {
        lease: PortLease,
        granted: Duration,
        renew_at: Duration,
        in_flight: bool,
    },
    /// Removing `lease` (in flight when `in_flight`).
    Stopping {
        lease: Option<PortLease>,
        in_flight: bool,
    },
    Stopped,
}

/// The port-mapping schedule of one voice socket. Invariants: at most one request is in
/// flight; a lease is announced only while it is valid, and withdrawn when it expires; after
/// [`stop`](Self::stop) nothing but the removal of the lease we hold is requested.
#[derive(Debug, Clone)]
pub struct PortMapSchedule {
    internal_port: u16,
    state: State,
    backoff: Duration,
    events: VecDeque<MapEvent>,
    /// Whether the current mapping has been announced (so expiry must withdraw it).
    announced: bool,
    searches: u32,
}

impl PortMapSchedule {
    /// A schedule for our voice socket's `internal_port`, searching at once.
    pub fn new(now: Duration, internal_port: u16) -> Self {
        Self {
            internal_port,
            state: State::Searching {
                at: now,
                in_flight: false,
            },
            backoff: FIRST_SEARCH_BACKOFF,
            events: VecDeque::new(),
            announced: false,
            searches: 0,
        }
    }

    /// The lease held now, if any.
    pub fn lease(&self) -> Option<PortLease> {
        match self.state {
            State::Mapped { lease, .. } => Some(lease),
            State::Stopping { lease, .. } => lease,
            _ => None,
        }
    }

    /// Whether everything is done: stopped, and no lease left to remove.
    pub fn is_stopped(&self) -> bool {
        matches!(
            self.state,
            State::Stopped
                | State::Stopping {
                    lease: None,
                    in_flight: false
                }
        )
    }

    /// How many searches were started (for the log and the tests).
    pub fn searches(&self) -> u32 {
        self.searches
    }

    /// What to do now, if anything; the request is then in flight until its outcome is fed
    /// back. `None` while one is in flight or nothing is due.
    pub fn poll_request(&mut self, now: Duration) -> Option<MapRequest> {
        let internal_port = self.internal_port;
        match &mut self.state {
            State::Searching { at, in_flight } if !*in_flight && now >= *at => {
                *in_flight = true;
                self.searches += 1;
                Some(MapRequest::Map {
                    only: None,
                    external_port: internal_port,
                    lifetime: REQUESTED_LIFETIME,
                })
            }
            State::Mapped {
                lease,
                renew_at,
                in_flight,
                ..
            } if !*in_flight && now >= *renew_at => {
                *in_flight = true;
                Some(MapRequest::Map {
                    only: Some(lease.protocol),
                    external_port: lease.external.port(),
                    lifetime: REQUESTED_LIFETIME,
                })
            }
            State::Stopping {
                lease: Some(lease),
                in_flight,
            } if !*in_flight => {
                *in_flight = true;
                Some(MapRequest::Remove(*lease))
            }
            _ => None,
        }
    }

    /// The router granted `lease` for the request in flight.
    pub fn handle_mapped(&mut self, now: Duration, lease: PortLease) {
        let changed = self.lease().map(|l| l.external) != Some(lease.external);
        match self.state {
            State::Searching {
                in_flight: true, ..
            }
            | State::Mapped {
                in_flight: true, ..
            } => {
                self.backoff = FIRST_SEARCH_BACKOFF;
                self.state = State::Mapped {
                    lease,
                    granted: now,
                    renew_at: now + (lease.lifetime / 2).max(MIN_RENEW_GAP),
                    in_flight: false,
                };
                if changed || !self.announced {
                    self.events.push_back(MapEvent::Mapped(lease));
                    self.announced = true;
                }
            }
            // Stopped while the request was in flight: the new lease must go too.
            State::Stopping {
                in_flight: false, ..
            } => {
                self.state = State::Stopping {
                    lease: Some(lease),
                    in_flight: false,
                };
            }
            _ => {}
        }
    }

    /// The request in flight failed (no router answered, or it refused).
    pub fn handle_failed(&mut self, now: Duration) {
        match self.state {
            State::Searching {
                in_flight: true, ..
            } => self.unavailable(now),
            State::Mapped {
                lease,
                granted,
                in_flight: true,
                ..
            } => {
                let expires = granted + lease.lifetime;
                if now >= expires {
                    self.expire(now);
                } else {
                    // Keep announcing what still works; try again while there is time.
                    let left = expires - now;
                    self.state = State::Mapped {
                        lease,
                        granted,
                        renew_at: now + (left / 4).max(MIN_RENEW_GAP).min(left),
                        in_flight: false,
                    };
                }
            }
            // A removal that failed: nothing more to do, the lease runs out by itself.
            State::Stopping {
                in_flight: true, ..
            } => self.state = State::Stopped,
            _ => {}
        }
    }

    /// The removal in flight is done.
    pub fn handle_removed(&mut self) {
        if let State::Stopping {
            in_flight: true, ..
        } = self.state
        {
            self.state = State::Stopped;
        }
    }

    fn unavailable(&mut self, now: Duration) {
        self.state = State::Unavailable {
            retry_at: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(MAX_SEARCH_BACKOFF);
    }

    fn expire(&mut self, now: Duration) {
        if self.announced {
            self.events.push_back(MapEvent::Withdrawn);
            self.announced = false;
        }
        self.unavailable(now);
    }

    /// Fires what is due at `now`: a search after the back-off, the end of a lease that could
    /// not be renewed. Renewals themselves come out of [`poll_request`](Self::poll_request).
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.state {
            State::Unavailable { retry_at } if now >= retry_at => {
                self.state = State::Searching {
                    at: now,
                    in_flight: false,
                };
            }
            State::Mapped {
                lease,
                granted,
                in_flight: false,
                ..
            } if now >= granted + lease.lifetime => self.expire(now),
            _ => {}
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) or
    /// [`poll_request`](Self::poll_request) has something to do; `None` while a request is
    /// in flight or when stopped.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::Searching {
                at,
                in_flight: false,
            } => Some(at),
            State::Unavailable { retry_at } => Some(retry_at),
            State::Mapped {
                lease,
                granted,
                renew_at,
                in_flight: false,
            } => Some(renew_at.min(granted + lease.lifetime)),
            // The removal is due at once.
            State::Stopping {
                lease: Some(_),
                in_flight: false,
            } => Some(Duration::ZERO),
            _ => None,
        }
    }

    /// We are shutting down: remove the lease we hold (now, or when the request in flight
    /// returns one), withdraw it, and request nothing else.
    pub fn stop(&mut self) {
        if self.announced {
            self.events.push_back(MapEvent::Withdrawn);
            self.announced = false;
        }
        self.state = match self.state {
            // The shell feeds every outcome back before it stops us, so nothing is in flight
            // here but through misuse; a lease that still comes back is then removed too.
            State::Mapped { lease, .. } => State::Stopping {
                lease: Some(lease),
                in_flight: false,
            },
            State::Searching {
                in_flight: true, ..
            } => State::Stopping {
                lease: None,
                in_flight: false,
            },
            State::Stopping { .. } => return,
            _ => State::Stopped,
        };
    }

    pub fn poll_event(&mut self) -> Option<MapEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 40_000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn lease(port: u16, lifetime: u64) -> PortLease {
        PortLease {
            protocol: MapProtocol::NatPmp,
            external: SocketAddr::from(([198, 20, 0, 1], port)),
            lifetime: secs(lifetime),
        }
    }

    fn events(s: &mut PortMapSchedule) -> Vec<MapEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    #[test]
    fn searches_at_once_for_our_own_port_with_any_protocol() {
        let mut s = PortMapSchedule::new(secs(5), PORT);
        assert_eq!(s.poll_timeout(), Some(secs(5)));
        assert_eq!(
            s.poll_request(secs(5)),
            Some(MapRequest::Map {
                only: None,
                external_port: PORT,
                lifetime: REQUESTED_LIFETIME,
            })
        );
        // One request at a time.
        assert_eq!(s.poll_request(secs(5)), None);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_granted_lease_is_announced_once_and_renewed_at_half_with_the_same_router() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        // The router gave another external port than asked: accepted.
        s.handle_mapped(secs(1), lease(51_000, 600));
        assert_eq!(events(&mut s), vec![MapEvent::Mapped(lease(51_000, 600))]);
        assert_eq!(s.poll_timeout(), Some(secs(301)));
        assert_eq!(s.poll_request(secs(300)), None, "not yet due");
        assert_eq!(
            s.poll_request(secs(301)),
            Some(MapRequest::Map {
                only: Some(MapProtocol::NatPmp),
                external_port: 51_000,
                lifetime: REQUESTED_LIFETIME,
            })
        );
        // Renewed with the same address: nothing new to announce.
        s.handle_mapped(secs(302), lease(51_000, 600));
        assert_eq!(events(&mut s), vec![]);
        assert_eq!(s.poll_timeout(), Some(secs(602)));
    }

    #[test]
    fn a_renewal_that_moves_the_address_announces_the_new_one() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        s.handle_mapped(Duration::ZERO, lease(PORT, 100));
        events(&mut s);
        s.poll_request(secs(50)).unwrap();
        s.handle_mapped(secs(50), lease(PORT + 1, 100));
        assert_eq!(events(&mut s), vec![MapEvent::Mapped(lease(PORT + 1, 100))]);
    }

    #[test]
    fn failed_renewals_retry_while_the_lease_lasts_then_withdraw_it() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        s.handle_mapped(Duration::ZERO, lease(PORT, 100));
        events(&mut s);
        s.poll_request(secs(50)).unwrap();
        s.handle_failed(secs(50));
        // Still valid: still announced, retried after a quarter of the 50 s left.
        assert_eq!(events(&mut s), vec![]);
        assert_eq!(s.lease(), Some(lease(PORT, 100)));
        assert_eq!(
            s.poll_timeout(),
            Some(secs(50) + Duration::from_millis(12_500))
        );
        let mut now = secs(50);
        while let Some(t) = s.poll_timeout() {
            if t >= secs(100) {
                break;
            }
            now = t;
            s.poll_request(now).unwrap();
            s.handle_failed(now);
        }
        assert!(now < secs(100));
        assert_eq!(s.poll_timeout(), Some(secs(100)), "the lease's end");
        s.handle_timeout(secs(100));
        assert_eq!(events(&mut s), vec![MapEvent::Withdrawn]);
        assert_eq!(s.lease(), None);
        // And then it searches again, later.
        assert_eq!(s.poll_timeout(), Some(secs(100) + FIRST_SEARCH_BACKOFF));
    }

    #[test]
    fn retries_are_never_closer_than_the_minimum_gap() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        // A silly 1 s lease.
        s.handle_mapped(Duration::ZERO, lease(PORT, 1));
        assert_eq!(
            s.poll_timeout(),
            Some(secs(1)),
            "it expires before the renewal"
        );
        s.handle_timeout(secs(1));
        assert_eq!(
            events(&mut s),
            vec![MapEvent::Mapped(lease(PORT, 1)), MapEvent::Withdrawn]
        );
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        s.handle_mapped(Duration::ZERO, lease(PORT, 6));
        assert_eq!(s.poll_timeout(), Some(secs(3)));
        s.poll_request(secs(3)).unwrap();
        s.handle_failed(secs(3));
        assert_eq!(s.poll_timeout(), Some(secs(5)), "2 s at least, not 0.75 s");
    }

    #[test]
    fn no_router_backs_off_doubling_up_to_half_an_hour_without_announcing() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        let mut now = Duration::ZERO;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            s.handle_timeout(now);
            assert!(matches!(
                s.poll_request(now),
                Some(MapRequest::Map { only: None, .. })
            ));
            s.handle_failed(now);
            let next = s.poll_timeout().unwrap();
            gaps.push((next - now).as_secs() / 60);
            now = next;
        }
        assert_eq!(gaps, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(events(&mut s), vec![]);
        assert_eq!(s.searches(), 8);
    }

    #[test]
    fn stopping_removes_the_lease_and_withdraws_it_then_requests_nothing() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        s.handle_mapped(Duration::ZERO, lease(PORT, 600));
        events(&mut s);
        s.stop();
        assert_eq!(events(&mut s), vec![MapEvent::Withdrawn]);
        assert_eq!(
            s.poll_request(secs(1)),
            Some(MapRequest::Remove(lease(PORT, 600)))
        );
        assert_eq!(s.poll_request(secs(1)), None);
        s.handle_removed();
        assert!(s.is_stopped());
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.poll_request(secs(10_000)), None);
    }

    #[test]
    fn stopping_without_a_lease_ends_at_once() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        s.handle_failed(Duration::ZERO);
        s.stop();
        assert!(s.is_stopped());
        assert_eq!(events(&mut s), vec![]);
    }

    #[test]
    fn a_lease_granted_after_stopping_is_removed_not_announced() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        s.stop();
        assert_eq!(s.poll_request(secs(1)), None, "the search is still out");
        s.handle_mapped(secs(2), lease(PORT, 600));
        assert_eq!(events(&mut s), vec![]);
        assert_eq!(
            s.poll_request(secs(2)),
            Some(MapRequest::Remove(lease(PORT, 600)))
        );
        s.handle_removed();
        assert!(s.is_stopped());
    }

    #[test]
    fn a_failed_removal_still_ends() {
        let mut s = PortMapSchedule::new(Duration::ZERO, PORT);
        s.poll_request(Duration::ZERO);
        s.handle_mapped(Duration::ZERO, lease(PORT, 600));
        s.stop();
        s.poll_request(Duration::ZERO).unwrap();
        s.handle_failed(secs(1));
        assert!(s.is_stopped());
    }
}
