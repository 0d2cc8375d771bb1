//! `PeerTable`: every peer of our channel, each with its [`PeerLink`], behind one UDP socket.
//!
//! Sans-IO like the links it holds, with the crate's calling contract: the engine calls
//! [`PeerTable::handle_parsed`] for every datagram once its cipher authenticated it (or
//! [`PeerTable::handle_datagram`] with raw bytes, as the fuzz target and benchmark do), and [`PeerTable::handle_timeout`] when
//! [`PeerTable::poll_timeout`] is due, sends whatever [`PeerTable::poll_transmit`] returns, and
//! sends each encoded voice frame to every address in [`PeerTable::voice_targets`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::link::{LinkConfig, LinkOutcome, LinkReject, PeerLink, Transmit};
use super::relay::{ForwardRefusal, RelayConfig, RelayRoute, RelayedTransmit, Via};
use crate::protocol::datagram::{peer_sender, Datagram, DatagramError, RELAY_HEADER_LEN};
use crate::protocol::relay_budget::RelayBudget;

/// What one member forwards for each pair it bridges, in bytes per second (and the burst):
/// 96 kb/s, a voice stream at 10 ms frames with its headers and room for punches and pings.
pub const MEMBER_RELAY_BYTES_PER_SEC: f64 = 12_000.0;

/// Most peers one client links to. Each one punches and probes within its own small budget,
/// so the table's size bounds what a server (or a flood of announcements) can make us send to
/// addresses nobody verified; and a full mesh sends our voice once per peer, so past this many
/// the call could not work anyway. A bigger channel (the server allows any size, for lobbies
/// where few talk) links each client to the first `MAX_PEERS` members announced.
pub const MAX_PEERS: usize = 128;

/// Why an incoming datagram was dropped. Dropped datagrams are counted, never played.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("unparseable datagram: {0}")]
    Garbage(DatagramError),
    #[error("datagram from unknown sender id {0}")]
    UnknownSender(u32),
    #[error("datagram addressed to peer {0}, not to us")]
    WrongRecipient(u32),
    #[error("voice from peer {0} at an address that is not one of its candidates")]
    UnauthenticatedSource(u32),
    /// Counted by the engine when the peer's cipher refuses a replay (see `super::replay`):
    /// the table itself never sees one.
    #[error("replayed or too old voice sequence number from peer {0}")]
    Replay(u32),
    #[error("stale punch answer or unsolicited pong from peer {0}")]
    StaleControl(u32),
    #[error("datagram kind not expected from a peer")]
    UnexpectedKind,
    /// A `RelayFrom` from an address that is neither a member we are directly connected to
    /// nor the server.
    #[error("relayed datagram from an address that is no relay of ours")]
    UnknownRelay,
    /// A `RelayTo` we would not forward.
    #[error("relay request refused: {0}")]
    RelayRefused(ForwardRefusal),
}

/// How many datagrams were dropped, per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub garbage: u64,
    pub unknown_sender: u64,
    pub wrong_recipient: u64,
    pub unauthenticated_source: u64,
    pub replay: u64,
    pub stale_control: u64,
    pub unexpected_kind: u64,
    pub unknown_relay: u64,
    pub relay_refused: u64,
}

impl DropCounters {
    pub fn total(&self) -> u64 {
        self.garbage
            + self.unknown_sender
            + self.wrong_recipient
            + self.unauthenticated_source
            + self.replay
            + self.stale_control
            + self.unexpected_kind
            + self.unknown_relay
            + self.relay_refused
    }

    /// Adds one drop for `reason`.
    pub fn count(&mut self, reason: &DropReason) {
        let counter = match reason {
            DropReason::Garbage(_) => &mut self.garbage,
            DropReason::UnknownSender(_) => &mut self.unknown_sender,
            DropReason::WrongRecipient(_) => &mut self.wrong_recipient,
            DropReason::UnauthenticatedSource(_) => &mut self.unauthenticated_source,
            DropReason::Replay(_) => &mut self.replay,
            DropReason::StaleControl(_) => &mut self.stale_control,
            DropReason::UnexpectedKind => &mut self.unexpected_kind,
            DropReason::UnknownRelay => &mut self.unknown_relay,
            DropReason::RelayRefused(_) => &mut self.relay_refused,
        };
        *counter += 1;
    }

    /// Adds every counter of `other` to this one.
    pub fn add(&mut self, other: &DropCounters) {
        self.garbage += other.garbage;
        self.unknown_sender += other.unknown_sender;
        self.wrong_recipient += other.wrong_recipient;
        self.unauthenticated_source += other.unauthenticated_source;
        self.replay += other.replay;
        self.stale_control += other.stale_control;
        self.unexpected_kind += other.unexpected_kind;
        self.unknown_relay += other.unknown_relay;
        self.relay_refused += other.relay_refused;
    }
}

/// What one received datagram turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A fresh voice frame from a known peer: feed it to that peer's jitter buffer.
    Voice {
        peer_id: u32,
        seq: u32,
        timestamp: u32,
        payload: &'a [u8],
    },
    /// Punch/PunchAck/Ping/Pong from a peer, handled by its link (answers are queued).
    Control { peer_id: u32 },
    /// The server's answer to our Register. The caller must check `from` is the server.
    RegisterAck { observed: SocketAddr },
    /// Dropped and counted.
    Dropped(DropReason),
}

/// One peer of our channel.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    pub name: String,
    pub link: PeerLink,
    /// The way to it through a relay while the direct link is down.
    pub relay: RelayRoute,
    /// What we still forward from this peer to each other peer, when we bridge them.
    forward_budgets: BTreeMap<u32, RelayBudget>,
    /// Datagrams we forwarded from this peer.
    pub forwarded: u64,
}

/// Where a peer's voice goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Straight to the peer's address.
    Direct(SocketAddr),
    /// In a `RelayTo` envelope through a relay.
    Relayed(Via),
}

/// A datagram the table wants sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    /// To the peer's address, as it is (the caller tags it).
    Direct(Transmit),
    /// To the peer through a relay: the caller tags it and wraps it in a `RelayTo`.
    Relayed(RelayedTransmit),
}

/// What [`PeerTable::upsert_peer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// A new link was created and starts punching.
    Added,
    /// The peer was known: name updated, new candidates added, link state kept.
    Updated,
    /// The id is our own; we never link to ourselves.
    IgnoredSelf,
    /// The table holds [`MAX_PEERS`] already: no new link.
    TableFull,
}

/// All peer links of this client, keyed by peer id.
///
/// Invariants: never holds a link to `our_id`; every link's `our_id` is the table's; iteration
/// (and so the order of `poll_transmit`) is by ascending peer id, which keeps tests
/// deterministic.
#[derive(Debug, Clone)]
pub struct PeerTable {
    our_id: u32,
    config: LinkConfig,
    relay_config: RelayConfig,
    seed: u64,
    peers: BTreeMap<u32, PeerEntry>,
    drops: DropCounters,
    /// Whether the server forwards for us (it said so in `Welcome`).
    server_relays: bool,
    /// Members we are directly connected to, with their RTT: the relays possible right now.
    connected: Vec<(u32, Duration)>,
    vias: Vec<Via>,
}

impl PeerTable {
    /// An empty table for client `our_id`. `seed` (pass randomness) feeds the punch nonces.
    pub fn new(our_id: u32, config: LinkConfig, seed: u64) -> Self {
        Self {
            our_id,
            config,
            relay_config: RelayConfig::default(),
            seed,
            peers: BTreeMap::new(),
            drops: DropCounters::default(),
            server_relays: false,
            connected: Vec::new(),
            vias: Vec::new(),
        }
    }

    /// Whether the server relays for members that cannot reach each other; the server is
    /// then the last path tried.
    pub fn set_server_relays(&mut self, on: bool) {
        self.server_relays = on;
    }

    pub fn server_relays(&self) -> bool {
        self.server_relays
    }

    pub fn our_id(&self) -> u32 {
        self.our_id
    }

    /// Adds a peer (its link starts punching at `now`) or updates a known one.
    pub fn upsert_peer(
        &mut self,
        now: Duration,
        id: u32,
        name: impl Into<String>,
        candidates: &[SocketAddr],
    ) -> Upsert {
        if id == self.our_id {
            return Upsert::IgnoredSelf;
        }
        let name = name.into();
        if let Some(entry) = self.peers.get_mut(&id) {
            entry.name = name;
            for &c in candidates {
                entry.link.add_candidate(now, c);
            }
            return Upsert::Updated;
        }
        if self.peers.len() >= MAX_PEERS {
            return Upsert::TableFull;
        }
        let seed = self.seed ^ u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let link = PeerLink::new(now, self.our_id, id, candidates, self.config.clone(), seed);
        let relay = RelayRoute::new(self.our_id, id, self.relay_config.clone());
        self.peers.insert(
            id,
            PeerEntry {
                name,
                link,
                relay,
                forward_budgets: BTreeMap::new(),
                forwarded: 0,
            },
        );
        Upsert::Added
    }

    /// Forgets a peer (it left the channel). Returns its entry if it was known.
    pub fn remove_peer(&mut self, id: u32) -> Option<PeerEntry> {
        for entry in self.peers.values_mut() {
            entry.forward_budgets.remove(&id);
            // A relay that left carries nothing any more: fall back at once.
            entry.relay.forget(Via::Member(id));
        }
        self.peers.remove(&id)
    }

    pub fn peer(&self, id: u32) -> Option<&PeerEntry> {
        self.peers.get(&id)
    }

    /// All peers by ascending id.
    pub fn peers(&self) -> impl Iterator<Item = (u32, &PeerEntry)> {
        self.peers.iter().map(|(&id, e)| (id, e))
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn drop_counters(&self) -> DropCounters {
        self.drops
    }

    fn dropped(&mut self, reason: DropReason) -> Incoming<'static> {
        self.drops.count(&reason);
        Incoming::Dropped(reason)
    }

    /// Parses and handles one datagram received from `from` (plaintext: tests, fuzzing and
    /// benchmarks; the engine authenticates first and calls [`PeerTable::handle_parsed`]).
    pub fn handle_datagram<'a>(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &'a [u8],
    ) -> Incoming<'a> {
        match Datagram::parse(bytes) {
            Ok(datagram) => self.handle_parsed(now, from, datagram),
            Err(e) => self.dropped(DropReason::Garbage(e)),
        }
    }

    /// Routes one parsed datagram received from `from` to its sender's link.
    pub fn handle_parsed<'a>(
        &mut self,
        now: Duration,
        from: SocketAddr,
        datagram: Datagram<'a>,
    ) -> Incoming<'a> {
        if let Datagram::RegisterAck { observed } = datagram {
            return Incoming::RegisterAck { observed };
        }
        let Some(sender) = datagram.sender() else {
            return self.dropped(DropReason::UnexpectedKind);
        };
        if let Some(to) = datagram.recipient() {
            if to != self.our_id {
                return self.dropped(DropReason::WrongRecipient(to));
            }
        }
        let Some(entry) = self.peers.get_mut(&sender) else {
            return self.dropped(DropReason::UnknownSender(sender));
        };
        match entry.link.handle(now, from, &datagram) {
            LinkOutcome::Control => Incoming::Control { peer_id: sender },
            LinkOutcome::Voice => match datagram {
                Datagram::Voice {
                    seq,
                    timestamp,
                    payload,
                    ..
                } => Incoming::Voice {
                    peer_id: sender,
                    seq,
                    timestamp,
                    payload,
                },
                // The link answers Voice only for voice datagrams.
                _ => self.dropped(DropReason::UnexpectedKind),
            },
            LinkOutcome::Rejected(reject) => {
                let reason = match reject {
                    LinkReject::UnauthenticatedSource => DropReason::UnauthenticatedSource(sender),
                    LinkReject::StaleNonce | LinkReject::UnsolicitedPong => {
                        DropReason::StaleControl(sender)
                    }
                    LinkReject::WrongRecipient => {
                        DropReason::WrongRecipient(datagram.recipient().unwrap_or(0))
                    }
                    LinkReject::NotFromPeer => DropReason::UnknownSender(sender),
                    LinkReject::UnexpectedKind => DropReason::UnexpectedKind,
                };
                self.dropped(reason)
            }
        }
    }

    /// Fires every link's and relay route's timers due at `now`. A route is wanted while its
    /// peer's direct link is not connected; its possible relays are the members we are
    /// directly connected to (lowest RTT first), then the server if it relays.
    pub fn handle_timeout(&mut self, now: Duration) {
        for entry in self.peers.values_mut() {
            entry.link.handle_timeout(now);
        }
        self.connected.clear();
        self.connected
            .extend(self.peers.iter().filter_map(|(&id, e)| {
                e.link.active_addr()?;
                Some((id, e.link.stats().rtt.unwrap_or(Duration::MAX)))
            }));
        self.connected.sort_by_key(|&(id, rtt)| (rtt, id));
        for (&id, entry) in self.peers.iter_mut() {
            self.vias.clear();
            self.vias.extend(
                self.connected
                    .iter()
                    .filter(|&&(member, _)| member != id)
                    .map(|&(member, _)| Via::Member(member)),
            );
            if self.server_relays {
                self.vias.push(Via::Server);
            }
            let wanted = entry.link.active_addr().is_none();
            entry.relay.handle_timeout(now, wanted, &self.vias);
        }
    }

    /// Next datagram any link or relay route wants sent. Call until `None`.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.peers.values_mut().find_map(|entry| {
            entry
                .link
                .poll_transmit()
                .map(Outgoing::Direct)
                .or_else(|| entry.relay.poll_transmit().map(Outgoing::Relayed))
        })
    }

    /// Earliest time any link or route needs `handle_timeout` again; `None` with no peers.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.peers
            .values()
            .map(|e| match e.relay.poll_timeout() {
                Some(r) => r.min(e.link.poll_timeout()),
                None => e.link.poll_timeout(),
            })
            .min()
    }

    /// Where each encoded voice frame goes: every peer with a direct path, and every other
    /// peer with a working relay path.
    pub fn voice_targets(&self) -> impl Iterator<Item = (u32, Route)> + '_ {
        self.peers.iter().filter_map(|(&id, e)| {
            let route = match e.link.active_addr() {
                Some(addr) => Route::Direct(addr),
                None => Route::Relayed(e.relay.active()?),
            };
            Some((id, route))
        })
    }

    /// The address of member relay `id`: its direct path (a relay is never itself relayed).
    pub fn member_addr(&self, id: u32) -> Option<SocketAddr> {
        self.peers.get(&id)?.link.active_addr()
    }

    /// The member we are directly connected to at `from`, if any: who a relay envelope that
    /// arrived from `from` comes from.
    pub fn member_at(&self, from: SocketAddr) -> Option<u32> {
        self.peers
            .iter()
            .find(|(_, e)| e.link.active_addr() == Some(from))
            .map(|(&id, _)| id)
    }

    /// A `RelayTo { to, inner }` arrived from `from`: may we forward it? Only between two
    /// members we are both directly connected to, only what the sender itself wrote (the inner
    /// datagram names it), and within [`MEMBER_RELAY_BYTES_PER_SEC`] per pair. Returns the
    /// sender's id (the `RelayFrom` names it) and where to send. Refusals are counted.
    pub fn forward(
        &mut self,
        now: Duration,
        from: SocketAddr,
        to: u32,
        inner: &[u8],
    ) -> Result<(u32, SocketAddr), ForwardRefusal> {
        let result = self.check_forward(now, from, to, inner);
        if let Err(refusal) = result {
            self.drops.count(&DropReason::RelayRefused(refusal));
        }
        result
    }

    fn check_forward(
        &mut self,
        now: Duration,
        from: SocketAddr,
        to: u32,
        inner: &[u8],
    ) -> Result<(u32, SocketAddr), ForwardRefusal> {
        let sender = self.member_at(from).ok_or(ForwardRefusal::NotConnected)?;
        if peer_sender(inner) != Some(sender) {
            return Err(ForwardRefusal::ForgedSender);
        }
        if to == sender || to == self.our_id {
            return Err(ForwardRefusal::NoSuchTarget);
        }
        let dest = self
            .peers
            .get(&to)
            .ok_or(ForwardRefusal::NoSuchTarget)?
            .link
            .active_addr()
            .ok_or(ForwardRefusal::TargetNotConnected)?;
        let entry = self
            .peers
            .get_mut(&sender)
            .ok_or(ForwardRefusal::NotConnected)?;
        let rate = MEMBER_RELAY_BYTES_PER_SEC;
        let budget = entry
            .forward_budgets
            .entry(to)
            .or_insert_with(|| RelayBudget::new(now, rate));
        if !budget.try_spend(now, RELAY_HEADER_LEN + inner.len(), rate, rate) {
            return Err(ForwardRefusal::OverBudget);
        }
        entry.forwarded += 1;
        Ok((sender, dest))
    }

    /// Handles one datagram of peer `from`, relayed to us through `via` and already
    /// authenticated by that peer's cipher. Voice is handed on; Pings are answered through
    /// the same relay; Pongs tell the peer's route that the path works.
    pub fn handle_relayed<'a>(
        &mut self,
        now: Duration,
        via: Via,
        from: u32,
        datagram: Datagram<'a>,
    ) -> Incoming<'a> {
        if datagram.sender() != Some(from) {
            return self.dropped(DropReason::UnknownSender(datagram.sender().unwrap_or(0)));
        }
        if let Some(to) = datagram.recipient() {
            if to != self.our_id {
                return self.dropped(DropReason::WrongRecipient(to));
            }
        }
        let Some(entry) = self.peers.get_mut(&from) else {
            return self.dropped(DropReason::UnknownSender(from));
        };
        match datagram {
            Datagram::Voice {
                seq,
                timestamp,
                payload,
                ..
            } => {
                entry.relay.voice_in += 1;
                Incoming::Voice {
                    peer_id: from,
                    seq,
                    timestamp,
                    payload,
                }
            }
            Datagram::Ping { sent_micros, .. } => {
                entry.relay.handle_ping(via, sent_micros);
                Incoming::Control { peer_id: from }
            }
            Datagram::Pong { echo_micros, .. } => {
                if entry.relay.handle_pong(now, via, echo_micros) {
                    Incoming::Control { peer_id: from }
                } else {
                    self.dropped(DropReason::StaleControl(from))
                }
            }
            // Punching is about direct paths; through a relay it means nothing.
            _ => self.dropped(DropReason::UnexpectedKind),
        }
    }

    /// Counts a voice datagram of `bytes` sent to `peer_id` in that link's stats.
    pub fn record_voice_sent(&mut self, peer_id: u32, bytes: usize) {
        if let Some(e) = self.peers.get_mut(&peer_id) {
            e.link.record_voice_sent(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::link::{CandidateKind, LinkState, UnreachableReason};
    use super::*;
    use std::collections::HashMap;
    use std::net::IpAddr;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Announcements beyond [`MAX_PEERS`] make no new link (so nothing more punches), while
    /// the peers already known keep being updated.
    #[test]
    fn the_table_stops_growing_at_max_peers() {
        let mut t = PeerTable::new(1, LinkConfig::default(), 7);
        for id in 2..(2 + MAX_PEERS as u32) {
            assert_eq!(
                t.upsert_peer(ms(0), id, "p", &[addr("192.0.2.1:9")]),
                Upsert::Added
            );
        }
        let extra = 2 + MAX_PEERS as u32;
        assert_eq!(
            t.upsert_peer(ms(0), extra, "x", &[addr("192.0.2.2:9")]),
            Upsert::TableFull
        );
        assert!(t.peer(extra).is_none());
        assert_eq!(
            t.upsert_peer(ms(0), 2, "renamed", &[addr("192.0.2.3:9")]),
            Upsert::Updated
        );
        t.remove_peer(2);
        assert_eq!(
            t.upsert_peer(ms(0), extra, "x", &[addr("192.0.2.2:9")]),
            Upsert::Added
        );
    }

    /// Tiny deterministic PRNG for simulated loss (xorshift64).
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn percent(&mut self) -> u64 {
            self.next() % 100
        }
    }

    /// A NAT with address-and-port-dependent mapping and filtering (a "symmetric" NAT): every
    /// new destination gets a new public port, and only that destination may answer on it.
    struct Nat {
        public_ip: IpAddr,
        next_port: u16,
        by_flow: HashMap<(SocketAddr, SocketAddr), u16>,
        by_port: HashMap<u16, (SocketAddr, SocketAddr)>,
    }

    impl Nat {
        fn new(public_ip: &str, first_port: u16) -> Self {
            Self {
                public_ip: public_ip.parse().unwrap(),
                next_port: first_port,
                by_flow: HashMap::new(),
                by_port: HashMap::new(),
            }
        }

        fn outbound(&mut self, inner: SocketAddr, dst: SocketAddr) -> SocketAddr {
            let port = *self.by_flow.entry((inner, dst)).or_insert_with(|| {
                let p = self.next_port;
                self.next_port += 1;
                self.by_port.insert(p, (inner, dst));
                p
            });
            SocketAddr::new(self.public_ip, port)
        }
    }

    struct Node {
        table: PeerTable,
        addr: SocketAddr,
        nat: Option<Nat>,
        alive: bool,
        voice_in: Vec<(u32, u32)>,
    }

    struct InFlight {
        at: Duration,
        from: SocketAddr,
        to: SocketAddr,
        bytes: Vec<u8>,
    }

    /// A simulated network: fixed one-way latency, seeded random loss, optional total cut,
    /// NATs; destinations that match no node are black holes.
    struct Sim {
        now: Duration,
        nodes: Vec<Node>,
        in_flight: Vec<InFlight>,
        latency: Duration,
        loss_percent: u64,
        rng: XorShift,
        cut: bool,
        /// (time, sending node, destination, datagram bytes) of every datagram sent.
        sent: Vec<(Duration, usize, SocketAddr, Vec<u8>)>,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                now: Duration::ZERO,
                nodes: Vec::new(),
                in_flight: Vec::new(),
                latency: ms(5),
                loss_percent: 0,
                rng: XorShift(0x2545_f491_4f6c_dd1d),
                cut: false,
                sent: Vec::new(),
            }
        }

        fn add_node(&mut self, id: u32, addr: &str, nat: Option<Nat>) -> usize {
            self.nodes.push(Node {
                table: PeerTable::new(id, LinkConfig::default(), u64::from(id) * 1000 + 1),
                addr: self.addr_of(addr),
                nat,
                alive: true,
                voice_in: Vec::new(),
            });
            self.nodes.len() - 1
        }

        fn addr_of(&self, s: &str) -> SocketAddr {
            addr(s)
        }

        fn introduce(&mut self, node: usize, peer: usize, candidates: &[SocketAddr]) {
            let id = self.nodes[peer].table.our_id();
            let now = self.now;
            self.nodes[node]
                .table
                .upsert_peer(now, id, format!("peer{id}"), candidates);
        }

        fn send(&mut self, node: usize, to: SocketAddr, bytes: Vec<u8>) {
            self.sent.push((self.now, node, to, bytes.clone()));
            if self.cut || self.rng.percent() < self.loss_percent {
                return;
            }
            let inner = self.nodes[node].addr;
            let from = match &mut self.nodes[node].nat {
                Some(nat) => nat.outbound(inner, to),
                None => inner,
            };
            self.in_flight.push(InFlight {
                at: self.now + self.latency,
                from,
                to,
                bytes,
            });
        }

        /// Which node receives a datagram from `from` to `to`, after NAT filtering.
        fn route(&self, from: SocketAddr, to: SocketAddr) -> Option<usize> {
            self.nodes.iter().position(|n| match &n.nat {
                None => n.addr == to,
                Some(nat) => {
                    to.ip() == nat.public_ip && nat.by_port.get(&to.port()) == Some(&(n.addr, from))
                }
            })
        }

        fn flush_transmits(&mut self) {
            for i in 0..self.nodes.len() {
                if !self.nodes[i].alive {
                    continue;
                }
                self.nodes[i].table.handle_timeout(self.now);
                // This plaintext simulation has no relay: relayed probes are dropped.
                while let Some(t) = self.nodes[i].table.poll_transmit() {
                    if let Outgoing::Direct(t) = t {
                        self.send(i, t.to, t.datagram.to_vec().unwrap());
                    }
                }
            }
        }

        fn send_voice(&mut self, node: usize, seq: u32) {
            let id = self.nodes[node].table.our_id();
            let bytes = Datagram::Voice {
                from: id,
                seq,
                timestamp: seq * 960,
                payload: b"frame",
            }
            .to_vec()
            .unwrap();
            let targets: Vec<_> = self.nodes[node].table.voice_targets().collect();
            for (peer, route) in targets {
                let Route::Direct(to) = route else { continue };
                self.nodes[node].table.record_voice_sent(peer, bytes.len());
                self.send(node, to, bytes.clone());
            }
        }

        /// Advances simulated time to `end`, event by event (timeouts and deliveries).
        fn run_until(&mut self, end: Duration) {
            let mut spins = 0;
            loop {
                self.flush_transmits();
                let next_delivery = self.in_flight.iter().map(|f| f.at).min();
                let next_timer = self
                    .nodes
                    .iter()
                    .filter(|n| n.alive)
                    .filter_map(|n| n.table.poll_timeout())
                    .min();
                let next = match (next_delivery, next_timer) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b).unwrap_or(end),
                };
                if next > end {
                    self.now = end;
                    self.flush_transmits();
                    return;
                }
                if next <= self.now {
                    spins += 1;
                    assert!(spins < 10_000, "no progress at {:?}", self.now);
                } else {
                    spins = 0;
                }
                self.now = self.now.max(next);
                let now = self.now;
                let (due, later): (Vec<_>, Vec<_>) =
                    self.in_flight.drain(..).partition(|f| f.at <= now);
                self.in_flight = later;
                for f in due {
                    let Some(j) = self.route(f.from, f.to) else {
                        continue;
                    };
                    if !self.nodes[j].alive {
                        continue;
                    }
                    let node = &mut self.nodes[j];
                    if let Incoming::Voice { peer_id, seq, .. } =
                        node.table.handle_datagram(now, f.from, &f.bytes)
                    {
                        node.voice_in.push((peer_id, seq));
                    }
                }
            }
        }

        fn state(&self, node: usize, peer: usize) -> LinkState {
            let id = self.nodes[peer].table.our_id();
            self.nodes[node]
                .table
                .peer(id)
                .unwrap()
                .link
                .state()
                .clone()
        }

        fn connected(&self, node: usize, peer: usize) -> bool {
            matches!(self.state(node, peer), LinkState::Connected { .. })
        }

        fn sent_kinds(&self, node: usize, kind: DatagramKindTag) -> Vec<Duration> {
            self.sent
                .iter()
                .filter(|(_, n, _, b)| *n == node && kind.matches(b))
                .map(|(t, ..)| *t)
                .collect()
        }
    }

    #[derive(Clone, Copy)]
    enum DatagramKindTag {
        Punch,
        Ping,
    }

    impl DatagramKindTag {
        fn matches(self, bytes: &[u8]) -> bool {
            matches!(
                (self, Datagram::parse(bytes)),
                (Self::Punch, Ok(Datagram::Punch { .. })) | (Self::Ping, Ok(Datagram::Ping { .. }))
            )
        }
    }

    /// Two public nodes that know each other's true address.
    fn pair() -> Sim {
        let mut sim = Sim::new();
        let a = sim.add_node(1, "198.51.100.1:7000", None);
        let b = sim.add_node(2, "198.51.100.2:7000", None);
        let (aa, ba) = (sim.nodes[a].addr, sim.nodes[b].addr);
        sim.introduce(a, b, &[ba]);
        sim.introduce(b, a, &[aa]);
        sim
    }

    #[test]
    fn direct_delivery_connects_within_100_ms() {
        let mut sim = pair();
        sim.run_until(ms(100));
        assert_eq!(
            sim.state(0, 1),
            LinkState::Connected {
                addr: addr("198.51.100.2:7000")
            }
        );
        assert!(sim.connected(1, 0));
        sim.send_voice(0, 1);
        sim.run_until(ms(200));
        assert_eq!(sim.nodes[1].voice_in, vec![(1, 1)]);
        let rtt = sim.nodes[0].table.peer(2).unwrap().link.stats().rtt;
        assert_eq!(rtt, Some(ms(10)), "two 5 ms hops");
    }

    #[test]
    fn three_peers_form_a_full_mesh_and_voice_reaches_everyone() {
        let mut sim = Sim::new();
        for (id, a) in [
            (1, "198.51.100.1:7000"),
            (2, "198.51.100.2:7000"),
            (3, "198.51.100.3:7000"),
        ] {
            sim.add_node(id, a, None);
        }
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    let c = [sim.nodes[j].addr];
                    sim.introduce(i, j, &c);
                }
            }
        }
        sim.run_until(ms(100));
        for i in 0..3 {
            assert_eq!(sim.nodes[i].table.voice_targets().count(), 2, "node {i}");
        }
        sim.send_voice(0, 7);
        sim.run_until(ms(150));
        assert_eq!(sim.nodes[1].voice_in, vec![(1, 7)]);
        assert_eq!(sim.nodes[2].voice_in, vec![(1, 7)]);
    }

    #[test]
    fn a_black_holed_first_candidate_still_connects_via_the_second() {
        let mut sim = Sim::new();
        let a = sim.add_node(1, "198.51.100.1:7000", None);
        let b = sim.add_node(2, "198.51.100.2:7000", None);
        let wrong_local = addr("10.9.9.9:7000");
        let (aa, ba) = (sim.nodes[a].addr, sim.nodes[b].addr);
        sim.introduce(a, b, &[wrong_local, ba]);
        sim.introduce(b, a, &[addr("10.8.8.8:7000"), aa]);
        sim.run_until(ms(100));
        assert_eq!(sim.state(a, b), LinkState::Connected { addr: ba });
        assert_eq!(sim.state(b, a), LinkState::Connected { addr: aa });
    }

    #[test]
    fn a_nat_that_rewrites_the_source_port_is_handled_by_peer_reflexive_adoption() {
        let mut sim = Sim::new();
        // A sits behind a symmetric NAT: the server saw port 40000, but A's packets to B
        // leave from a fresh port.
        let a = sim.add_node(1, "192.168.1.2:4000", Some(Nat::new("203.0.113.1", 40001)));
        let b = sim.add_node(2, "198.51.100.2:7000", None);
        let ba = sim.nodes[b].addr;
        sim.introduce(a, b, &[ba]);
        sim.introduce(b, a, &[addr("192.168.1.2:4000"), addr("203.0.113.1:40000")]);
        sim.run_until(ms(100));
        let reflexive = addr("203.0.113.1:40001");
        assert_eq!(sim.state(b, a), LinkState::Connected { addr: reflexive });
        assert_eq!(sim.state(a, b), LinkState::Connected { addr: ba });
        let link = &sim.nodes[b].table.peer(1).unwrap().link;
        assert!(link
            .candidates()
            .iter()
            .any(|c| c.addr == reflexive && c.kind == CandidateKind::PeerReflexive));
        sim.send_voice(a, 1);
        sim.send_voice(b, 1);
        sim.run_until(ms(200));
        assert_eq!(sim.nodes[b].voice_in, vec![(1, 1)]);
        assert_eq!(sim.nodes[a].voice_in, vec![(2, 1)]);
    }

    #[test]
    fn twenty_percent_loss_still_connects_for_every_seed() {
        for seed in 1..=25u64 {
            let mut sim = pair();
            sim.loss_percent = 20;
            sim.rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            sim.run_until(ms(1_000));
            assert!(sim.connected(0, 1) && sim.connected(1, 0), "seed {seed}");
            // And stays connected through keepalives under loss.
            sim.run_until(ms(60_000));
            assert!(
                sim.connected(0, 1) && sim.connected(1, 0),
                "seed {seed} later"
            );
        }
    }

    #[test]
    fn a_peer_that_never_answers_becomes_unreachable_after_10_s_with_a_reason() {
        let mut sim = pair();
        sim.nodes[1].alive = false;
        sim.run_until(ms(9_990));
        assert!(matches!(sim.state(0, 1), LinkState::Punching { .. }));
        sim.run_until(ms(10_010));
        let LinkState::Unreachable { reason } = sim.state(0, 1) else {
            panic!("unreachable expected");
        };
        assert_eq!(
            reason.to_string(),
            "no answer from 1 candidate after 10 s (peer behind a symmetric NAT or offline?)"
        );
        assert_eq!(
            sim.state(0, 1),
            LinkState::Unreachable {
                reason: UnreachableReason::NoAnswer {
                    candidates: 1,
                    after: ms(10_000)
                }
            }
        );
        // Keeps trying every 2 s ...
        sim.run_until(ms(19_000));
        let late: Vec<_> = sim
            .sent_kinds(0, DatagramKindTag::Punch)
            .into_iter()
            .filter(|t| *t > ms(10_000))
            .collect();
        assert_eq!(late, vec![ms(12_000), ms(14_000), ms(16_000), ms(18_000)]);
        // ... so a peer that comes online late still connects.
        sim.nodes[1].table = PeerTable::new(2, LinkConfig::default(), 99);
        sim.nodes[1].alive = true;
        let a_addr = sim.nodes[0].addr;
        sim.introduce(1, 0, &[a_addr]);
        sim.run_until(ms(19_100));
        assert!(sim.connected(0, 1) && sim.connected(1, 0));
    }

    #[test]
    fn a_silent_link_repunches_after_5_s_without_answer_and_recovers_when_traffic_returns() {
        let mut sim = pair();
        sim.run_until(ms(1_000));
        assert!(sim.connected(0, 1));
        sim.cut = true;
        // Healthy-but-idle and dead look alike until the next keepalive goes unanswered.
        sim.run_until(ms(16_900));
        assert!(sim.connected(0, 1));
        sim.run_until(ms(17_100));
        let LinkState::Punching {
            since,
            reconnecting: true,
        } = sim.state(0, 1)
        else {
            panic!("expected re-punching, got {:?}", sim.state(0, 1));
        };
        let last_heard = sim.nodes[0]
            .table
            .peer(2)
            .unwrap()
            .link
            .stats()
            .last_heard
            .unwrap();
        assert!(
            since - last_heard >= ms(5_000),
            "re-punch only after 5 s of silence"
        );
        assert_eq!(sim.nodes[0].table.voice_targets().count(), 0);
        sim.cut = false;
        sim.run_until(ms(20_000));
        assert!(sim.connected(0, 1) && sim.connected(1, 0));
        sim.send_voice(0, 1);
        sim.run_until(ms(20_100));
        assert_eq!(sim.nodes[1].voice_in, vec![(1, 1)]);
    }

    #[test]
    fn keepalives_are_sent_every_12_s_while_idle_and_the_link_stays_up() {
        let mut sim = pair();
        sim.run_until(ms(61_000));
        let pings = sim.sent_kinds(0, DatagramKindTag::Ping);
        assert!(pings.len() >= 5, "pings: {pings:?}");
        for w in pings.windows(2) {
            let gap = w[1] - w[0];
            assert!(gap >= ms(11_900) && gap <= ms(12_100), "gap {gap:?}");
        }
        let punches_after_connect = sim
            .sent_kinds(0, DatagramKindTag::Punch)
            .into_iter()
            .filter(|t| *t > ms(100))
            .count();
        assert_eq!(punches_after_connect, 0);
        assert!(sim.connected(0, 1) && sim.connected(1, 0));
    }

    #[test]
    fn garbage_unknown_wrong_recipient_and_unauthenticated_datagrams_are_dropped_and_counted() {
        let mut sim = pair();
        sim.run_until(ms(100));
        let b_addr = sim.nodes[1].addr;
        let table = &mut sim.nodes[0].table;
        let now = ms(100);
        let voice = |from: u32, seq: u32| {
            Datagram::Voice {
                from,
                seq,
                timestamp: 0,
                payload: b"opus",
            }
            .to_vec()
            .unwrap()
        };

        assert!(matches!(
            table.handle_datagram(now, b_addr, &[0xff, 1, 2, 3]),
            Incoming::Dropped(DropReason::Garbage(DatagramError::WrongVersion {
                found: 15
            }))
        ));
        assert_eq!(
            table.handle_datagram(now, b_addr, &voice(99, 1)),
            Incoming::Dropped(DropReason::UnknownSender(99))
        );
        let for_someone_else = Datagram::Ping {
            from: 2,
            to: 3,
            sent_micros: 0,
        }
        .to_vec()
        .unwrap();
        assert_eq!(
            table.handle_datagram(now, b_addr, &for_someone_else),
            Incoming::Dropped(DropReason::WrongRecipient(3))
        );
        assert_eq!(
            table.handle_datagram(now, addr("203.0.113.66:1234"), &voice(2, 1)),
            Incoming::Dropped(DropReason::UnauthenticatedSource(2))
        );
        let v = voice(2, 1);
        assert_eq!(
            table.handle_datagram(now, b_addr, &v),
            Incoming::Voice {
                peer_id: 2,
                seq: 1,
                timestamp: 0,
                payload: b"opus"
            }
        );
        // Replays are refused by the peer's cipher before the table (the engine counts them
        // as `replay`, see its tests); the table routes what it is given.
        assert_eq!(
            table.handle_datagram(now, b_addr, &v),
            Incoming::Voice {
                peer_id: 2,
                seq: 1,
                timestamp: 0,
                payload: b"opus"
            }
        );
        assert_eq!(
            table.handle_datagram(
                now,
                b_addr,
                &Datagram::Register { token: 1 }.to_vec().unwrap()
            ),
            Incoming::Dropped(DropReason::UnexpectedKind)
        );
        let c = table.drop_counters();
        assert_eq!(
            c,
            DropCounters {
                garbage: 1,
                unknown_sender: 1,
                wrong_recipient: 1,
                unauthenticated_source: 1,
                replay: 0,
                stale_control: 0,
                unexpected_kind: 1,
                unknown_relay: 0,
                relay_refused: 0,
            }
        );
        assert_eq!(c.total(), 5);
        assert_eq!(
            DropReason::Replay(2).to_string(),
            "replayed or too old voice sequence number from peer 2"
        );
    }

    #[test]
    fn register_ack_is_passed_to_the_caller() {
        let mut t = PeerTable::new(1, LinkConfig::default(), 1);
        let observed = addr("203.0.113.1:40000");
        let bytes = Datagram::RegisterAck { observed }.to_vec().unwrap();
        assert_eq!(
            t.handle_datagram(ms(0), addr("198.51.100.9:7700"), &bytes),
            Incoming::RegisterAck { observed }
        );
    }

    #[test]
    fn upsert_adds_updates_and_refuses_ourselves_and_remove_forgets() {
        let mut t = PeerTable::new(1, LinkConfig::default(), 1);
        let (x, y) = (addr("10.0.0.2:5000"), addr("198.51.100.2:6000"));
        assert_eq!(t.upsert_peer(ms(0), 1, "me", &[x]), Upsert::IgnoredSelf);
        assert!(t.is_empty());
        assert_eq!(t.upsert_peer(ms(0), 2, "bob", &[x]), Upsert::Added);
        assert_eq!(t.upsert_peer(ms(5), 2, "bobby", &[x, y]), Upsert::Updated);
        let e = t.peer(2).unwrap();
        assert_eq!(e.name, "bobby");
        let addrs: Vec<_> = e.link.candidates().iter().map(|c| c.addr).collect();
        assert_eq!(addrs, vec![x, y]);
        assert_eq!(t.poll_timeout(), Some(ms(0)));
        assert!(t.remove_peer(2).is_some());
        assert!(t.remove_peer(2).is_none());
        assert_eq!(t.poll_timeout(), None);
        t.handle_timeout(ms(10));
        assert!(t.poll_transmit().is_none());
    }
}
