//! `PeerLink`: the hole-punching and keepalive state machine for one remote peer.
//!
//! Sans-IO in the style of str0m's ICE agent, with the crate's calling contract (see the crate
//! docs): the link owns no socket and no clock. The caller feeds received datagrams with
//! [`PeerLink::handle`], fires its timers with [`PeerLink::handle_timeout`] when
//! [`PeerLink::poll_timeout`] is due, and drains what it wants sent with
//! [`PeerLink::poll_transmit`] (until `None`) after either. Time is a `Duration` since an
//! arbitrary start chosen by the caller.
//!
//! ```text
//! Punching     --consent from an address (see below)----------> Connected { addr }
//! Punching     --unreachable_after (10 s) without answer------> Unreachable { reason }
//! Unreachable  --consent (punches continue every 2 s)---------> Connected { addr }
//! Unreachable  --add_candidate with a new address-------------> Punching
//! Connected    --Ping unanswered for silence_timeout (5 s)----> Punching (reconnecting)
//! ```
//!
//! Consent (as ICE's): an address becomes the path only after it answered a fresh challenge of
//! ours, never because something, perhaps replayed, arrived from it. Proof is a PunchAck that
//! echoes a nonce we sent to that very address: the punching episode's nonce for a candidate we
//! punch, or a one-time challenge nonce for an address the peer's datagrams came from that we
//! did not know (its NAT picked another port). Voice from a known candidate counts too: it is
//! sealed, and the cipher's replay window has refused anything old. A Punch or Ping from an
//! unknown address is answered (the peer needs that for its own consent) and challenged, both
//! within a small byte budget, so replayed datagrams can neither move our voice elsewhere nor
//! make us flood a third party; only verified addresses are kept as candidates, so spoofers
//! cannot evict the real ones either.
//!
//! Liveness: a connected link sends a Ping every `keepalive_interval` (keeps NAT mappings open
//! and measures RTT). A Ping is answered by anything from the peer; while it is unanswered it
//! is repeated every `ping_retry_interval`, and if nothing at all arrives for `silence_timeout`
//! after it, the link goes back to punching. So an idle but healthy link never re-punches, and a
//! dead one is noticed at most `keepalive_interval + silence_timeout` after it died.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crate::protocol::datagram::{Datagram, PEER_CONTROL_LEN};
use crate::protocol::relay_budget::RelayBudget;

/// Most candidate addresses kept per peer (announced plus adopted peer-reflexive ones). Bounds
/// the punch traffic a spoofer can cause by sending punches from many addresses.
pub const MAX_CANDIDATES: usize = 16;

/// Most datagrams queued for sending before new ones are dropped (and counted). The caller
/// drains the queue every tick, so this only bites when it does not.
pub const MAX_QUEUED_TRANSMITS: usize = 64;

/// Timing of a [`PeerLink`]. Defaults follow the architecture: punch every 60 ms, keepalive
/// every 12 s (NAT mappings expire around 30 s), re-punch after 5 s of unanswered silence,
/// unreachable after 10 s of punching, then retry every 2 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Gap between punch rounds (a Punch to every candidate) while punching.
    pub punch_interval: Duration,
    /// Gap between keepalive Pings on a connected link.
    pub keepalive_interval: Duration,
    /// Gap between repeated Pings while one is unanswered.
    pub ping_retry_interval: Duration,
    /// How long after a Ping nothing may arrive before the link goes back to punching.
    pub silence_timeout: Duration,
    /// How long punching may go unanswered before the link is declared unreachable.
    pub unreachable_after: Duration,
    /// Gap between punch rounds while unreachable, so a late peer can still connect.
    pub unreachable_retry_interval: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            punch_interval: Duration::from_millis(60),
            keepalive_interval: Duration::from_secs(12),
            ping_retry_interval: Duration::from_secs(1),
            silence_timeout: Duration::from_secs(5),
            unreachable_after: Duration::from_secs(10),
            unreachable_retry_interval: Duration::from_secs(2),
        }
    }
}

/// Where a link stands, as shown in the UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Sending punches to every candidate; `since` is when this punching episode began.
    /// `reconnecting` is true when the link was connected before and went silent.
    Punching { since: Duration, reconnecting: bool },
    /// Packets from the peer arrive; voice goes to `addr`, the address they last came from.
    Connected { addr: SocketAddr },
    /// Punching got no answer; `reason` says why, its `Display` is for people. Punches
    /// continue slowly.
    Unreachable { reason: UnreachableReason },
}

/// Why a link is unreachable: what code can decide on, carried up to the UI unchanged
/// (`voice::PeerState::Unreachable`). Its `Display` is the sentence people read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnreachableReason {
    /// No address of the peer was ever announced.
    #[error("no address known for the peer after {secs} s", secs = .after.as_secs_f64())]
    NoAddress { after: Duration },
    /// Punching never got an answer from any candidate.
    #[error(
        "no answer from {candidates} {noun} after {secs} s (peer behind a symmetric NAT or offline?)",
        noun = candidate_noun(*.candidates),
        secs = .after.as_secs_f64()
    )]
    NoAnswer { candidates: usize, after: Duration },
    /// The link was up, went silent, and punching again got no answer.
    #[error(
        "connection lost: no answer from {candidates} {noun} for {secs} s (peer offline or its network changed?)",
        noun = candidate_noun(*.candidates),
        secs = .after.as_secs_f64()
    )]
    ConnectionLost { candidates: usize, after: Duration },
}

fn candidate_noun(n: usize) -> &'static str {
    if n == 1 {
        "candidate"
    } else {
        "candidates"
    }
}

/// How a candidate address became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateKind {
    /// Announced by the server (the peer's local addresses, then its public one).
    Announced,
    /// Learned from the source address of a packet from the peer (its NAT chose another port).
    PeerReflexive,
}

/// One address at which the peer may be reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub kind: CandidateKind,
}

/// One datagram the caller should send. Control datagrams carry no payload, hence `'static`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub datagram: Datagram<'static>,
}

/// What [`PeerLink::handle`] made of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// A control datagram from the peer, fully handled (any answer is queued).
    Control,
    /// A fresh voice datagram from an authenticated address: hand the payload to the decoder.
    Voice,
    /// Ignored; nothing changed except counters.
    Rejected(LinkReject),
}

/// Why a link ignored a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkReject {
    #[error("sender id is not this link's peer")]
    NotFromPeer,
    #[error("addressed to another peer")]
    WrongRecipient,
    #[error("voice from an address that is neither a candidate nor confirmed by a punch")]
    UnauthenticatedSource,
    #[error("punch answer with a nonce we did not send")]
    StaleNonce,
    #[error("pong for a ping we did not send")]
    UnsolicitedPong,
    #[error("datagram kind not used between peers")]
    UnexpectedKind,
}

/// Traffic and timing figures of one link, for the UI and the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Smoothed round-trip time (RFC 6298 SRTT), once a Pong arrived.
    pub rtt: Option<Duration>,
    /// Round-trip variation (RFC 6298 RTTVAR).
    pub rtt_var: Option<Duration>,
    /// The most recent round-trip sample.
    pub latest_rtt: Option<Duration>,
    /// Accepted datagrams from the peer.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Datagrams handed out by `poll_transmit` plus voice reported with `record_voice_sent`.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// When an accepted datagram from the peer last arrived.
    pub last_heard: Option<Duration>,
    /// Datagrams not queued because the send queue was full.
    pub queue_overflows: u64,
    /// Answers and challenges not sent to unverified addresses, over their byte budget.
    pub unverified_refused: u64,
}

/// Small deterministic generator for punch nonces (the caller seeds it with real randomness).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Number of recent Ping timestamps remembered to validate Pongs.
const PING_MEMORY: usize = 4;

/// Challenges to unknown addresses outstanding at once; a new one replaces the oldest.
const MAX_CHALLENGES: usize = 4;
/// One address is challenged at most this often.
const CHALLENGE_REPEAT: Duration = Duration::from_millis(500);
/// A challenge not answered within this long is forgotten.
const CHALLENGE_EXPIRY: Duration = Duration::from_secs(3);
/// Bytes per second (and burst) this link may send to addresses not yet verified (answers and
/// challenges): about 30 tagged control datagrams, so replayed punches sent from (or spoofed
/// as) many addresses cannot turn us into a flood aimed at them.
const UNVERIFIED_BYTES_PER_SEC: f64 = 1000.0;
/// A tagged control datagram on the wire.
const TAGGED_CONTROL_LEN: usize = PEER_CONTROL_LEN + 16;

/// A one-time nonce sent in a Punch to an address we did not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Challenge {
    addr: SocketAddr,
    nonce: u64,
    sent_at: Duration,
}

/// Hole punching, keepalive and liveness for one remote peer.
///
/// Invariants: the active address of a `Connected` link is always one of its candidates; a
/// candidate list never holds duplicates nor more than [`MAX_CANDIDATES`] entries; voice is
/// accepted only from a candidate address (that it is fresh, the cipher checked before).
#[derive(Debug, Clone)]
pub struct PeerLink {
    our_id: u32,
    peer_id: u32,
    config: LinkConfig,
    candidates: Vec<Candidate>,
    state: LinkState,
    /// Next punch round while punching or unreachable.
    next_punch: Duration,
    /// Nonce of the current punching episode and of the previous one (late answers).
    nonce: u64,
    prev_nonce: u64,
    rng: u64,
    /// When the last Ping went out (connected only).
    last_ping_sent: Duration,
    /// When the first still-unanswered Ping went out.
    ping_outstanding_since: Option<Duration>,
    recent_pings: [Option<u64>; PING_MEMORY],
    next_ping_slot: usize,
    srtt_micros: Option<u64>,
    rttvar_micros: u64,
    outbox: VecDeque<Transmit>,
    stats: LinkStats,
    challenges: [Option<Challenge>; MAX_CHALLENGES],
    unverified_budget: RelayBudget,
}

impl PeerLink {
    /// A link that starts punching `candidates` (in priority order: the peer's local addresses
    /// first, then its public one) at `now`. `seed` feeds the punch nonces; pass randomness.
    pub fn new(
        now: Duration,
        our_id: u32,
        peer_id: u32,
        candidates: &[SocketAddr],
        config: LinkConfig,
        seed: u64,
    ) -> Self {
        let mut rng = seed;
        let nonce = splitmix64(&mut rng);
        let mut link = Self {
            our_id,
            peer_id,
            config,
            candidates: Vec::new(),
            state: LinkState::Punching {
                since: now,
                reconnecting: false,
            },
            next_punch: now,
            nonce,
            prev_nonce: nonce,
            rng,
            last_ping_sent: now,
            ping_outstanding_since: None,
            recent_pings: [None; PING_MEMORY],
            next_ping_slot: 0,
            srtt_micros: None,
            rttvar_micros: 0,
            outbox: VecDeque::new(),
            stats: LinkStats::default(),
            challenges: [None; MAX_CHALLENGES],
            unverified_budget: RelayBudget::new(now, UNVERIFIED_BYTES_PER_SEC),
        };
        for &addr in candidates {
            link.push_announced(addr);
        }
        link
    }

    pub fn peer_id(&self) -> u32 {
        self.peer_id
    }

    pub fn our_id(&self) -> u32 {
        self.our_id
    }

    pub fn state(&self) -> &LinkState {
        &self.state
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// The address voice should be sent to: `Some` only while connected.
    pub fn active_addr(&self) -> Option<SocketAddr> {
        match self.state {
            LinkState::Connected { addr } => Some(addr),
            _ => None,
        }
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.candidates.iter().position(|c| c.addr == addr)
    }

    fn push_announced(&mut self, addr: SocketAddr) -> bool {
        if self.index_of(addr).is_some() || self.candidates.len() >= MAX_CANDIDATES {
            return false;
        }
        // Announced candidates rank before peer-reflexive ones.
        let at = self
            .candidates
            .iter()
            .position(|c| c.kind == CandidateKind::PeerReflexive)
            .unwrap_or(self.candidates.len());
        self.candidates.insert(
            at,
            Candidate {
                addr,
                kind: CandidateKind::Announced,
            },
        );
        true
    }

    /// Adds an announced candidate learned later (e.g. the peer's public address). Returns
    /// whether it was new. An unreachable link starts punching again at full rate, since the
    /// new address may be the one that works.
    pub fn add_candidate(&mut self, now: Duration, addr: SocketAddr) -> bool {
        if !self.push_announced(addr) {
            return false;
        }
        if matches!(self.state, LinkState::Unreachable { .. }) {
            self.start_punching(now, false);
        }
        true
    }

    /// Learns `addr` as a peer-reflexive candidate, evicting the oldest peer-reflexive one that
    /// is not in use when the list is full.
    fn adopt_peer_reflexive(&mut self, addr: SocketAddr) {
        if self.candidates.len() >= MAX_CANDIDATES {
            let active = self.active_addr();
            let evict = self
                .candidates
                .iter()
                .position(|c| c.kind == CandidateKind::PeerReflexive && Some(c.addr) != active);
            match evict {
                Some(i) => {
                    self.candidates.remove(i);
                }
                // Full of announced candidates: replace the last one (lowest priority).
                None => {
                    self.candidates.pop();
                }
            }
        }
        self.candidates.push(Candidate {
            addr,
            kind: CandidateKind::PeerReflexive,
        });
    }

    fn queue(&mut self, to: SocketAddr, datagram: Datagram<'static>) {
        if self.outbox.len() >= MAX_QUEUED_TRANSMITS {
            self.stats.queue_overflows += 1;
            return;
        }
        self.outbox.push_back(Transmit { to, datagram });
    }

    fn queue_punch_round(&mut self) {
        for i in 0..self.candidates.len() {
            let to = self.candidates[i].addr;
            let punch = Datagram::Punch {
                from: self.our_id,
                to: self.peer_id,
                nonce: self.nonce,
            };
            self.queue(to, punch);
        }
    }

    fn send_ping(&mut self, now: Duration, to: SocketAddr) {
        let sent_micros = now.as_micros() as u64;
        self.recent_pings[self.next_ping_slot] = Some(sent_micros);
        self.next_ping_slot = (self.next_ping_slot + 1) % PING_MEMORY;
        self.last_ping_sent = now;
        if self.ping_outstanding_since.is_none() {
            self.ping_outstanding_since = Some(now);
        }
        let ping = Datagram::Ping {
            from: self.our_id,
            to: self.peer_id,
            sent_micros,
        };
        self.queue(to, ping);
    }

    fn start_punching(&mut self, now: Duration, reconnecting: bool) {
        self.state = LinkState::Punching {
            since: now,
            reconnecting,
        };
        self.prev_nonce = self.nonce;
        self.nonce = splitmix64(&mut self.rng);
        self.next_punch = now;
        self.ping_outstanding_since = None;
    }

    fn unreachable_reason(&self, reconnecting: bool) -> UnreachableReason {
        let candidates = self.candidates.len();
        let after = self.config.unreachable_after;
        if candidates == 0 {
            UnreachableReason::NoAddress { after }
        } else if reconnecting {
            UnreachableReason::ConnectionLost { candidates, after }
        } else {
            UnreachableReason::NoAnswer { candidates, after }
        }
    }

    /// Runs the timers due at `now`, queueing punches and pings for `poll_transmit`. Calling it
    /// early does nothing.
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.state {
            LinkState::Punching {
                since,
                reconnecting,
            } => {
                if now >= since + self.config.unreachable_after {
                    self.state = LinkState::Unreachable {
                        reason: self.unreachable_reason(reconnecting),
                    };
                    self.next_punch = now + self.config.unreachable_retry_interval;
                } else if now >= self.next_punch {
                    self.queue_punch_round();
                    self.next_punch = now + self.config.punch_interval;
                }
            }
            LinkState::Unreachable { .. } => {
                if now >= self.next_punch {
                    self.queue_punch_round();
                    self.next_punch = now + self.config.unreachable_retry_interval;
                }
            }
            LinkState::Connected { addr } => match self.ping_outstanding_since {
                Some(t) if now >= t + self.config.silence_timeout => {
                    self.start_punching(now, true);
                    self.queue_punch_round();
                    self.next_punch = now + self.config.punch_interval;
                }
                Some(_) => {
                    if now >= self.last_ping_sent + self.config.ping_retry_interval {
                        self.send_ping(now, addr);
                    }
                }
                None => {
                    if now >= self.last_ping_sent + self.config.keepalive_interval {
                        self.send_ping(now, addr);
                    }
                }
            },
        }
    }

    /// Next queued datagram to send. Call until `None`.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.outbox.pop_front()?;
        self.stats.packets_out += 1;
        self.stats.bytes_out += t.datagram.encoded_len() as u64;
        Some(t)
    }

    /// When the link next needs [`PeerLink::handle_timeout`]. Queued datagrams are not
    /// reflected here: drain them right after every `handle*` call.
    pub fn poll_timeout(&self) -> Duration {
        match self.state {
            LinkState::Punching { since, .. } => {
                self.next_punch.min(since + self.config.unreachable_after)
            }
            LinkState::Unreachable { .. } => self.next_punch,
            LinkState::Connected { .. } => match self.ping_outstanding_since {
                Some(t) => (t + self.config.silence_timeout)
                    .min(self.last_ping_sent + self.config.ping_retry_interval),
                None => self.last_ping_sent + self.config.keepalive_interval,
            },
        }
    }

    /// Counts voice the caller sent to this peer (it bypasses `poll_transmit`).
    pub fn record_voice_sent(&mut self, bytes: usize) {
        self.stats.packets_out += 1;
        self.stats.bytes_out += bytes as u64;
    }

    fn update_rtt(&mut self, sample: u64) {
        self.stats.latest_rtt = Some(Duration::from_micros(sample));
        match self.srtt_micros {
            None => {
                self.srtt_micros = Some(sample);
                self.rttvar_micros = sample / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(sample);
                self.rttvar_micros = (3 * self.rttvar_micros + delta) / 4;
                self.srtt_micros = Some((7 * srtt + sample) / 8);
            }
        }
        self.stats.rtt = self.srtt_micros.map(Duration::from_micros);
        self.stats.rtt_var = Some(Duration::from_micros(self.rttvar_micros));
    }

    /// Handles one datagram that arrived from `from`. Answers (PunchAck, Pong) are queued for
    /// `poll_transmit`. A valid datagram from the peer connects a punching or unreachable link
    /// to the address it came from; control datagrams from an unknown address of the peer make
    /// that address a peer-reflexive candidate and the active one.
    pub fn handle(
        &mut self,
        now: Duration,
        from: SocketAddr,
        datagram: &Datagram<'_>,
    ) -> LinkOutcome {
        match self.check(now, from, datagram) {
            Ok(outcome) => outcome,
            Err(reject) => LinkOutcome::Rejected(reject),
        }
    }

    fn check(
        &mut self,
        now: Duration,
        from: SocketAddr,
        datagram: &Datagram<'_>,
    ) -> Result<LinkOutcome, LinkReject> {
        if datagram.sender().ok_or(LinkReject::UnexpectedKind)? != self.peer_id {
            return Err(LinkReject::NotFromPeer);
        }
        if let Some(to) = datagram.recipient() {
            if to != self.our_id {
                return Err(LinkReject::WrongRecipient);
            }
        }
        let known = self.index_of(from).is_some();
        let active = self.active_addr() == Some(from);
        // Validate fully before anything changes state.
        match *datagram {
            // Replays never get here: the peer's cipher refused them (`super::replay`).
            Datagram::Voice { .. } if !known => return Err(LinkReject::UnauthenticatedSource),
            Datagram::Pong { echo_micros, .. }
                if !self.recent_pings.contains(&Some(echo_micros)) =>
            {
                return Err(LinkReject::UnsolicitedPong);
            }
            Datagram::PunchAck { nonce, .. } => {
                let episode = nonce == self.nonce || nonce == self.prev_nonce;
                let challenged = self.challenge_of(from, nonce).is_some();
                if !challenged && !episode {
                    return Err(LinkReject::StaleNonce);
                }
            }
            _ => {}
        }
        self.stats.packets_in += 1;
        self.stats.bytes_in += datagram.encoded_len() as u64;
        let outcome = match *datagram {
            Datagram::Punch { nonce, .. } => {
                // Answer: the peer needs our PunchAck for its own consent on this path.
                let ack = Datagram::PunchAck {
                    from: self.our_id,
                    to: self.peer_id,
                    nonce,
                };
                if known {
                    self.queue(from, ack);
                    if !active {
                        // Punch back at once rather than at the next round (and, while
                        // connected elsewhere, to learn whether this candidate works).
                        self.queue_punch(from);
                    }
                } else {
                    self.queue_unverified(now, from, ack);
                    self.challenge(now, from);
                }
                if active {
                    self.mark_alive(now);
                }
                LinkOutcome::Control
            }
            Datagram::PunchAck { nonce, .. } => {
                if let Some(i) = self.challenge_of(from, nonce) {
                    // A fresh challenge of ours came back from `from`: the peer is there.
                    self.challenges[i] = None;
                    if !known {
                        self.adopt_peer_reflexive(from);
                    }
                    self.consent(now, from, !known);
                } else if known {
                    // The episode's nonce, echoed from a candidate we punched.
                    self.consent(now, from, false);
                } else {
                    // The episode's nonce from elsewhere proves nothing (it may be a replay):
                    // challenge that address afresh.
                    self.challenge(now, from);
                }
                LinkOutcome::Control
            }
            Datagram::Ping { sent_micros, .. } => {
                let pong = Datagram::Pong {
                    from: self.our_id,
                    to: self.peer_id,
                    echo_micros: sent_micros,
                };
                if known {
                    self.queue(from, pong);
                    if !active {
                        self.queue_punch(from);
                    }
                } else {
                    self.queue_unverified(now, from, pong);
                    self.challenge(now, from);
                }
                if active {
                    self.mark_alive(now);
                }
                LinkOutcome::Control
            }
            Datagram::Pong { echo_micros, .. } => {
                // Our Pings go to the active address; a Pong from anywhere else is a copy.
                if active {
                    let now_micros = now.as_micros() as u64;
                    if now_micros >= echo_micros {
                        self.update_rtt(now_micros - echo_micros);
                    }
                    self.mark_alive(now);
                } else if !known {
                    self.challenge(now, from);
                }
                LinkOutcome::Control
            }
            Datagram::Voice { .. } => {
                // Fresh (the cipher refused replays) and from a candidate address.
                if active {
                    self.mark_alive(now);
                } else if !matches!(self.state, LinkState::Connected { .. }) {
                    self.consent(now, from, false);
                }
                LinkOutcome::Voice
            }
            _ => LinkOutcome::Control,
        };
        Ok(outcome)
    }

    /// The index of the outstanding challenge to `addr` with `nonce`, if any.
    fn challenge_of(&self, addr: SocketAddr, nonce: u64) -> Option<usize> {
        self.challenges
            .iter()
            .position(|c| c.is_some_and(|c| c.addr == addr && c.nonce == nonce))
    }

    /// Sends a Punch with a one-time nonce to `addr`, which the peer's datagrams came from but
    /// which we have not verified, unless it was challenged a moment ago.
    fn challenge(&mut self, now: Duration, addr: SocketAddr) {
        for slot in &mut self.challenges {
            if slot.is_some_and(|c| now.saturating_sub(c.sent_at) > CHALLENGE_EXPIRY) {
                *slot = None;
            }
        }
        let recent = self
            .challenges
            .iter()
            .flatten()
            .any(|c| c.addr == addr && now.saturating_sub(c.sent_at) < CHALLENGE_REPEAT);
        if recent {
            return;
        }
        let nonce = splitmix64(&mut self.rng);
        let punch = Datagram::Punch {
            from: self.our_id,
            to: self.peer_id,
            nonce,
        };
        if !self.queue_unverified(now, addr, punch) {
            return;
        }
        let slot = match self.challenges.iter().position(Option::is_none) {
            Some(free) => free,
            None => self
                .challenges
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.map(|c| c.sent_at))
                .map(|(i, _)| i)
                .unwrap_or(0),
        };
        self.challenges[slot] = Some(Challenge {
            addr,
            nonce,
            sent_at: now,
        });
    }

    /// Queues `datagram` to an address not verified yet, within the byte budget for such
    /// addresses. Returns whether it was queued.
    fn queue_unverified(
        &mut self,
        now: Duration,
        to: SocketAddr,
        datagram: Datagram<'static>,
    ) -> bool {
        let rate = UNVERIFIED_BYTES_PER_SEC;
        if !self
            .unverified_budget
            .try_spend(now, TAGGED_CONTROL_LEN, rate, rate)
        {
            self.stats.unverified_refused += 1;
            return false;
        }
        self.queue(to, datagram);
        true
    }

    /// A Punch of this episode to `to` (a known candidate), outside the punch rounds.
    fn queue_punch(&mut self, to: SocketAddr) {
        let punch = Datagram::Punch {
            from: self.our_id,
            to: self.peer_id,
            nonce: self.nonce,
        };
        self.queue(to, punch);
    }

    /// Something arrived that only the live peer can send (fresh proof, or traffic from the
    /// active address): the link is alive.
    fn mark_alive(&mut self, now: Duration) {
        self.stats.last_heard = Some(now);
        self.ping_outstanding_since = None;
    }

    /// `from` proved to be a working path to the peer: connect to it, or move to it when it
    /// is newly verified (the peer's NAT changed its mapping) or ranks better; never back to a
    /// worse one.
    fn consent(&mut self, now: Duration, from: SocketAddr, newly_verified: bool) {
        self.mark_alive(now);
        match self.state {
            LinkState::Connected { addr } => {
                let better = match (self.index_of(from), self.index_of(addr)) {
                    (Some(new), Some(cur)) => new < cur,
                    _ => false,
                };
                if from != addr && (newly_verified || better) {
                    self.state = LinkState::Connected { addr: from };
                }
            }
            LinkState::Punching { .. } | LinkState::Unreachable { .. } => {
                self.state = LinkState::Connected { addr: from };
                // An immediate Ping measures RTT and tells the peer we hear it, in case our
                // PunchAck is lost.
                self.send_ping(now, from);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u32 = 1;
    const PEER: u32 = 2;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn link(candidates: &[&str]) -> PeerLink {
        let c: Vec<SocketAddr> = candidates.iter().map(|s| addr(s)).collect();
        PeerLink::new(Duration::ZERO, US, PEER, &c, LinkConfig::default(), 7)
    }

    fn drain(l: &mut PeerLink, now: Duration) -> Vec<Transmit> {
        l.handle_timeout(now);
        std::iter::from_fn(|| l.poll_transmit()).collect()
    }

    fn punch_nonce(t: &[Transmit]) -> u64 {
        match t[0].datagram {
            Datagram::Punch { nonce, .. } => nonce,
            other => panic!("expected a punch, got {other:?}"),
        }
    }

    /// The peer punches us from `from`; we answer and punch (or challenge) back; the peer
    /// answers that: the path is verified.
    fn connect(l: &mut PeerLink, now: Duration, from: SocketAddr) {
        let out = l.handle(
            now,
            from,
            &Datagram::Punch {
                from: PEER,
                to: US,
                nonce: 5,
            },
        );
        assert_eq!(out, LinkOutcome::Control);
        let sent = drain(l, now);
        let nonce = sent
            .iter()
            .find_map(|t| match t.datagram {
                Datagram::Punch { nonce, .. } if t.to == from => Some(nonce),
                _ => None,
            })
            .expect("a punch or challenge back to the source");
        let ack = Datagram::PunchAck {
            from: PEER,
            to: US,
            nonce,
        };
        assert_eq!(l.handle(now, from, &ack), LinkOutcome::Control);
        drain(l, now);
    }

    #[test]
    fn punching_sends_a_punch_to_every_candidate_each_interval() {
        let mut l = link(&["10.0.0.2:5000", "198.51.100.2:6000"]);
        let first = drain(&mut l, Duration::ZERO);
        let to: Vec<_> = first.iter().map(|t| t.to).collect();
        assert_eq!(to, vec![addr("10.0.0.2:5000"), addr("198.51.100.2:6000")]);
        assert!(first.iter().all(|t| matches!(
            t.datagram,
            Datagram::Punch {
                from: US,
                to: PEER,
                ..
            }
        )));
        assert_eq!(l.poll_timeout(), ms(60));
        assert!(drain(&mut l, ms(59)).is_empty());
        assert_eq!(drain(&mut l, ms(60)).len(), 2);
        assert_eq!(l.stats().packets_out, 4);
    }

    #[test]
    fn a_punch_is_answered_and_punched_back_and_only_the_answer_to_ours_connects() {
        let mut l = link(&["198.51.100.2:6000"]);
        let nonce = punch_nonce(&drain(&mut l, Duration::ZERO));
        let src = addr("198.51.100.2:6000");
        let out = l.handle(
            ms(30),
            src,
            &Datagram::Punch {
                from: PEER,
                to: US,
                nonce: 99,
            },
        );
        assert_eq!(out, LinkOutcome::Control);
        assert!(
            matches!(l.state(), LinkState::Punching { .. }),
            "a punch (perhaps replayed) is no proof the path works"
        );
        let sent = drain(&mut l, ms(30));
        assert_eq!(
            sent[..2],
            [
                Transmit {
                    to: src,
                    datagram: Datagram::PunchAck {
                        from: US,
                        to: PEER,
                        nonce: 99
                    }
                },
                Transmit {
                    to: src,
                    datagram: Datagram::Punch {
                        from: US,
                        to: PEER,
                        nonce
                    }
                }
            ]
        );
        let ack = Datagram::PunchAck {
            from: PEER,
            to: US,
            nonce,
        };
        assert_eq!(l.handle(ms(40), src, &ack), LinkOutcome::Control);
        assert_eq!(l.state(), &LinkState::Connected { addr: src });
        let sent = drain(&mut l, ms(40));
        assert!(matches!(sent[0].datagram, Datagram::Ping { .. }));
    }

    #[test]
    fn punch_ack_must_echo_our_nonce() {
        let mut l = link(&["198.51.100.2:6000"]);
        let nonce = punch_nonce(&drain(&mut l, Duration::ZERO));
        let src = addr("198.51.100.2:6000");
        let bad = Datagram::PunchAck {
            from: PEER,
            to: US,
            nonce: nonce ^ 1,
        };
        assert_eq!(
            l.handle(ms(10), src, &bad),
            LinkOutcome::Rejected(LinkReject::StaleNonce)
        );
        assert!(matches!(l.state(), LinkState::Punching { .. }));
        let good = Datagram::PunchAck {
            from: PEER,
            to: US,
            nonce,
        };
        assert_eq!(l.handle(ms(11), src, &good), LinkOutcome::Control);
        assert_eq!(l.state(), &LinkState::Connected { addr: src });
    }

    #[test]
    fn packets_for_another_peer_or_from_another_sender_are_rejected() {
        let mut l = link(&["198.51.100.2:6000"]);
        let src = addr("198.51.100.2:6000");
        let wrong_to = Datagram::Ping {
            from: PEER,
            to: 77,
            sent_micros: 1,
        };
        assert_eq!(
            l.handle(ms(1), src, &wrong_to),
            LinkOutcome::Rejected(LinkReject::WrongRecipient)
        );
        let wrong_from = Datagram::Ping {
            from: 77,
            to: US,
            sent_micros: 1,
        };
        assert_eq!(
            l.handle(ms(1), src, &wrong_from),
            LinkOutcome::Rejected(LinkReject::NotFromPeer)
        );
        assert_eq!(
            l.handle(ms(1), src, &Datagram::Register { token: 1 }),
            LinkOutcome::Rejected(LinkReject::UnexpectedKind)
        );
        assert_eq!(l.stats().packets_in, 0);
        assert!(matches!(l.state(), LinkState::Punching { .. }));
    }

    #[test]
    fn an_unknown_address_that_answers_our_challenge_is_adopted_as_peer_reflexive_and_made_active()
    {
        let mut l = link(&["10.0.0.2:5000", "198.51.100.2:6000"]);
        connect(&mut l, ms(5), addr("198.51.100.2:6000"));
        let nat = addr("198.51.100.2:6001");
        connect(&mut l, ms(50), nat);
        assert_eq!(l.state(), &LinkState::Connected { addr: nat });
        assert_eq!(
            l.candidates()[2],
            Candidate {
                addr: nat,
                kind: CandidateKind::PeerReflexive
            }
        );
    }

    #[test]
    fn active_address_moves_to_a_better_candidate_but_never_back() {
        let mut l = link(&["10.0.0.2:5000", "198.51.100.2:6000"]);
        let (local, public) = (addr("10.0.0.2:5000"), addr("198.51.100.2:6000"));
        connect(&mut l, ms(5), public);
        connect(&mut l, ms(6), local);
        assert_eq!(l.state(), &LinkState::Connected { addr: local });
        connect(&mut l, ms(7), public);
        assert_eq!(l.state(), &LinkState::Connected { addr: local });
    }

    #[test]
    fn voice_from_an_unconfirmed_address_is_rejected_and_does_not_connect() {
        let mut l = link(&["198.51.100.2:6000"]);
        let v = Datagram::Voice {
            from: PEER,
            seq: 1,
            timestamp: 0,
            payload: b"x",
        };
        assert_eq!(
            l.handle(ms(1), addr("203.0.113.9:1"), &v),
            LinkOutcome::Rejected(LinkReject::UnauthenticatedSource)
        );
        assert!(matches!(l.state(), LinkState::Punching { .. }));
        assert_eq!(
            l.handle(ms(2), addr("198.51.100.2:6000"), &v),
            LinkOutcome::Voice
        );
        assert_eq!(
            l.state(),
            &LinkState::Connected {
                addr: addr("198.51.100.2:6000")
            }
        );
        // Replays are the cipher's to refuse (its window is the only one); the link judges
        // only the address, so the same datagram again is still voice to it.
        assert_eq!(
            l.handle(ms(3), addr("198.51.100.2:6000"), &v),
            LinkOutcome::Voice
        );
    }

    #[test]
    fn unanswered_punching_becomes_unreachable_with_a_reason_then_retries_every_2_s() {
        let mut l = link(&["10.0.0.2:5000", "198.51.100.2:6000", "198.51.100.2:6001"]);
        let mut now = Duration::ZERO;
        while now < ms(9_990) {
            drain(&mut l, now);
            now = l.poll_timeout();
        }
        assert!(matches!(l.state(), LinkState::Punching { .. }));
        assert_eq!(l.poll_timeout(), ms(10_000));
        drain(&mut l, ms(10_000));
        match l.state() {
            LinkState::Unreachable { reason } => {
                assert_eq!(
                    reason,
                    &UnreachableReason::NoAnswer {
                        candidates: 3,
                        after: ms(10_000)
                    }
                );
                assert_eq!(
                    reason.to_string(),
                    "no answer from 3 candidates after 10 s (peer behind a symmetric NAT or offline?)"
                );
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
        assert_eq!(l.poll_timeout(), ms(12_000));
        assert!(drain(&mut l, ms(11_999)).is_empty());
        assert_eq!(drain(&mut l, ms(12_000)).len(), 3);
        assert_eq!(l.poll_timeout(), ms(14_000));
        // A late peer still connects.
        connect(&mut l, ms(13_000), addr("198.51.100.2:6000"));
        assert!(matches!(l.state(), LinkState::Connected { .. }));
    }

    #[test]
    fn a_new_candidate_restarts_fast_punching_of_an_unreachable_link() {
        let mut l = link(&["10.0.0.2:5000"]);
        drain(&mut l, Duration::ZERO);
        drain(&mut l, ms(10_000));
        assert!(matches!(l.state(), LinkState::Unreachable { .. }));
        assert!(l.add_candidate(ms(10_500), addr("198.51.100.2:6000")));
        assert!(!l.add_candidate(ms(10_500), addr("198.51.100.2:6000")));
        assert!(matches!(
            l.state(),
            LinkState::Punching { since, reconnecting: false } if *since == ms(10_500)
        ));
        assert_eq!(drain(&mut l, ms(10_500)).len(), 2);
    }

    #[test]
    fn rtt_is_smoothed_like_rfc_6298() {
        let mut l = link(&["198.51.100.2:6000"]);
        let src = addr("198.51.100.2:6000");
        connect(&mut l, ms(1_000), src); // sends a ping stamped 1 s
        let pong = |echo: Duration| Datagram::Pong {
            from: PEER,
            to: US,
            echo_micros: echo.as_micros() as u64,
        };
        l.handle(ms(1_100), src, &pong(ms(1_000)));
        assert_eq!(l.stats().rtt, Some(ms(100)));
        assert_eq!(l.stats().rtt_var, Some(ms(50)));
        // Next keepalive at 13 s; answer after 20 ms.
        let sent = drain(&mut l, ms(13_100));
        assert!(
            matches!(sent[0].datagram, Datagram::Ping { sent_micros, .. } if sent_micros == 13_100_000)
        );
        l.handle(ms(13_120), src, &pong(ms(13_100)));
        let s = l.stats();
        assert_eq!(s.latest_rtt, Some(ms(20)));
        assert_eq!(s.rtt, Some(ms(90))); // 7/8 * 100 + 1/8 * 20
        assert_eq!(s.rtt_var, Some(ms(57_500) / 1_000)); // 3/4 * 50 + 1/4 * 80
    }

    #[test]
    fn a_pong_for_a_ping_we_never_sent_is_rejected() {
        let mut l = link(&["198.51.100.2:6000"]);
        let src = addr("198.51.100.2:6000");
        connect(&mut l, ms(1_000), src);
        let forged = Datagram::Pong {
            from: PEER,
            to: US,
            echo_micros: 123,
        };
        assert_eq!(
            l.handle(ms(1_010), src, &forged),
            LinkOutcome::Rejected(LinkReject::UnsolicitedPong)
        );
        assert_eq!(l.stats().rtt, None);
    }

    #[test]
    fn a_ping_is_answered_with_a_pong_echoing_its_timestamp() {
        let mut l = link(&["198.51.100.2:6000"]);
        let src = addr("198.51.100.2:6000");
        connect(&mut l, ms(10), src);
        let ping = Datagram::Ping {
            from: PEER,
            to: US,
            sent_micros: 4242,
        };
        assert_eq!(l.handle(ms(20), src, &ping), LinkOutcome::Control);
        assert_eq!(
            drain(&mut l, ms(20)),
            vec![Transmit {
                to: src,
                datagram: Datagram::Pong {
                    from: US,
                    to: PEER,
                    echo_micros: 4242
                }
            }]
        );
    }

    #[test]
    fn unanswered_keepalive_is_retried_then_the_link_repunches_after_the_silence_timeout() {
        let mut l = link(&["10.0.0.2:5000", "198.51.100.2:6000"]);
        let src = addr("198.51.100.2:6000");
        connect(&mut l, ms(0), src); // connect-time ping at 0 is outstanding
        l.handle(
            ms(10),
            src,
            &Datagram::Pong {
                from: PEER,
                to: US,
                echo_micros: 0,
            },
        );
        assert_eq!(l.poll_timeout(), ms(12_000));
        let sent = drain(&mut l, ms(12_000));
        assert!(matches!(
            sent[..],
            [Transmit {
                datagram: Datagram::Ping { .. },
                ..
            }]
        ));
        assert_eq!(l.poll_timeout(), ms(13_000));
        for retry in [13_000, 14_000, 15_000, 16_000] {
            let sent = drain(&mut l, ms(retry));
            assert_eq!(sent.len(), 1, "retry at {retry} ms");
            assert!(matches!(l.state(), LinkState::Connected { .. }));
        }
        assert_eq!(l.poll_timeout(), ms(17_000));
        let sent = drain(&mut l, ms(17_000));
        assert!(matches!(
            l.state(),
            LinkState::Punching { since, reconnecting: true } if *since == ms(17_000)
        ));
        assert_eq!(sent.len(), 2, "re-punch goes to every candidate at once");
        // Recovery: the peer answers the re-punch.
        let nonce = punch_nonce(&sent);
        l.handle(
            ms(17_030),
            src,
            &Datagram::PunchAck {
                from: PEER,
                to: US,
                nonce,
            },
        );
        assert_eq!(l.state(), &LinkState::Connected { addr: src });
    }

    #[test]
    fn lost_connection_reason_differs_from_never_connected() {
        let mut l = link(&["198.51.100.2:6000"]);
        connect(&mut l, ms(0), addr("198.51.100.2:6000"));
        let mut now = ms(0);
        while !matches!(l.state(), LinkState::Unreachable { .. }) {
            now = l.poll_timeout();
            drain(&mut l, now);
        }
        assert_eq!(
            now,
            ms(15_000),
            "5 s silence after the connect ping, then 10 s punching"
        );
        match l.state() {
            LinkState::Unreachable { reason } => {
                assert!(matches!(reason, UnreachableReason::ConnectionLost { .. }));
                assert!(reason.to_string().starts_with("connection lost"));
            }
            _ => unreachable!(),
        }
    }

    /// A punch recorded from the peer and replayed from 100 addresses (or with 100 spoofed
    /// sources): none becomes a candidate or the path, the real ones stay, and what we send
    /// to those addresses stays within the unverified budget.
    #[test]
    fn replayed_punches_from_many_addresses_move_nothing_and_cost_little() {
        let mut l = link(&["198.51.100.2:6000"]);
        let real = addr("198.51.100.2:6000");
        connect(&mut l, ms(0), real);
        let mut to_unverified = 0;
        for port in 0..100u16 {
            let from = SocketAddr::from(([203, 0, 113, 5], 1000 + port));
            let now = ms(1 + u64::from(port));
            l.handle(
                now,
                from,
                &Datagram::Punch {
                    from: PEER,
                    to: US,
                    nonce: 5,
                },
            );
            to_unverified += drain(&mut l, now).iter().filter(|t| t.to != real).count();
        }
        assert_eq!(l.active_addr(), Some(real));
        assert_eq!(l.candidates().len(), 1);
        // 1000 B/s with as much burst, 33 B each: 30 at once, 3 more over the 0.1 s.
        assert!(
            to_unverified <= 34,
            "{to_unverified} datagrams to unverified addresses"
        );
        assert!(l.stats().unverified_refused > 60);
    }

    /// What an attacker who recorded our traffic can replay from a third address: the peer's
    /// Punch, Ping, Pong and PunchAck of this episode. None moves the path; only an answer to
    /// the fresh challenge we send there would (and that the attacker cannot produce).
    #[test]
    fn replayed_control_from_a_third_address_does_not_move_the_path() {
        let mut l = link(&["198.51.100.2:6000"]);
        let real = addr("198.51.100.2:6000");
        let episode = punch_nonce(&drain(&mut l, ms(0)));
        let ack = Datagram::PunchAck {
            from: PEER,
            to: US,
            nonce: episode,
        };
        l.handle(ms(10), real, &ack);
        let sent = drain(&mut l, ms(10));
        let Datagram::Ping { sent_micros, .. } = sent[0].datagram else {
            panic!("{sent:?}")
        };
        let attacker = addr("203.0.113.66:4444");
        let replays = [
            Datagram::Punch {
                from: PEER,
                to: US,
                nonce: 5,
            },
            ack,
            Datagram::Ping {
                from: PEER,
                to: US,
                sent_micros: 1,
            },
            Datagram::Pong {
                from: PEER,
                to: US,
                echo_micros: sent_micros,
            },
        ];
        let mut challenges = Vec::new();
        for (i, d) in replays.iter().enumerate() {
            let now = ms(20 + 600 * i as u64);
            l.handle(now, attacker, d);
            for t in drain(&mut l, now) {
                if let (true, Datagram::Punch { nonce, .. }) = (t.to == attacker, t.datagram) {
                    challenges.push(nonce);
                }
            }
            assert_eq!(l.active_addr(), Some(real), "after replaying {d:?}");
        }
        assert!(!challenges.is_empty());
        assert!(
            !challenges.contains(&episode),
            "challenges are one-time nonces"
        );
        assert_eq!(l.candidates().len(), 1, "nothing unverified is kept");
    }

    /// The texts people read are exactly the ones shown before the reason was typed.
    #[test]
    fn unreachable_reasons_read_as_sentences() {
        let after = Duration::from_secs(10);
        assert_eq!(
            UnreachableReason::NoAddress { after }.to_string(),
            "no address known for the peer after 10 s"
        );
        assert_eq!(
            UnreachableReason::NoAnswer {
                candidates: 1,
                after
            }
            .to_string(),
            "no answer from 1 candidate after 10 s (peer behind a symmetric NAT or offline?)"
        );
        assert_eq!(
            UnreachableReason::ConnectionLost {
                candidates: 2,
                after: Duration::from_millis(2_500)
            }
            .to_string(),
            "connection lost: no answer from 2 candidates for 2.5 s (peer offline or its network changed?)"
        );
    }
}
