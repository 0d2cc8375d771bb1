//! The metadata server's rules as a pure state machine.
//!
//! `ServerState` owns no socket and reads no clock: the shell (see `plugin.rs`) hands it what
//! happened (a connection opened, a message or a datagram arrived, a password was checked, a
//! connection is gone, time passed) and carries out what it queues: [`Output`]s per session,
//! [`Transmit`]s on the UDP socket, [`ServerEvent`]s for counters and the ECS mirror. Every rule
//! of the server is therefore a deterministic unit test, and a whole-system simulation can
//! drive it in simulated time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use super::close_reason::CloseReason;
use super::password_limits::{CheckRefusal, PasswordChecks, PasswordRules};
use super::prefix::PrefixWidths;
use super::relay::{RelayBudget, RelayRefusal, RelayRules};
use crate::config::ChannelConfig;
use crate::protocol::datagram::{
    peer_sender, Datagram, DatagramKind, MAX_DATAGRAM_LEN, RELAY_HEADER_LEN,
};
use crate::protocol::messages::OVERVIEW_PART_MEMBERS;
use crate::protocol::{
    username_key, validate_username, ChannelInfo, ClientMsg, MemberInfo, Password, PeerInfo,
    ServerMsg, Status, UserId, VoiceKeyProof, APP_VERSION, PROTOCOL_VERSION,
};

mod output;
mod reachable;
pub use output::{DatagramDrop, Output, ServerEvent, Transmit};
use reachable::endpoints_for;
pub use reachable::ConnectionAddrs;

/// Identifier the shell gives each TCP connection.
pub type SessionId = u64;

/// Tunables of the rules; defaults are what `p2p-voice server` uses.
#[derive(Debug, Clone)]
pub struct ServerRules {
    /// A session that sends nothing for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// A connection that has not identified within this time is dropped.
    pub identify_timeout: Duration,
    /// Wrong passwords allowed per session within `wrong_password_window`.
    pub max_wrong_passwords: usize,
    pub wrong_password_window: Duration,
    /// How addresses are grouped for the per-address limits (see `super::prefix`).
    pub prefixes: PrefixWidths,
    /// Password checks in flight, and the lockout per (prefix, channel) after wrong guesses,
    /// which survives reconnects (see `super::password_limits`).
    pub passwords: PasswordRules,
    /// Local endpoints accepted per announcement.
    pub max_local_endpoints: usize,
    /// Sustained control messages per second one session may send (token bucket rate)...
    pub message_rate: f64,
    /// ...and the burst it may send at once. A session over the limit is closed: a real
    /// client sends a heartbeat every 4 s and a handful of messages per user action.
    pub message_burst: f64,
    /// Whether (and how much) the server forwards sealed peer datagrams between members of a
    /// channel that cannot reach each other (see `super::relay`); `None`: it does not.
    pub relay: Option<RelayRules>,
}

impl Default for ServerRules {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(15),
            identify_timeout: Duration::from_secs(30),
            max_wrong_passwords: 5,
            wrong_password_window: Duration::from_secs(60),
            prefixes: PrefixWidths::default(),
            passwords: PasswordRules::default(),
            max_local_endpoints: 8,
            message_rate: 20.0,
            message_burst: 60.0,
            relay: None,
        }
    }
}

/// How often the silence and identify timers are checked. Timeouts are in seconds: checking
/// every 250 ms is plenty, and one check walks every session, so it stays cheap on big servers.
pub const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Registers per second one session may send, and its burst. A client sends one every 15 s
/// once registered, four a second until then.
pub const REGISTER_RATE: f64 = 5.0;
pub const REGISTER_BURST: f64 = 10.0;
/// A session's changed public endpoint reaches its channel at most this often.
pub const ENDPOINT_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);

/// Most `RegisterAck`s and events kept for a shell that is not draining; beyond it new ones
/// are dropped (a shell reading a burst of datagrams drains after each batch of reads).
const MAX_QUEUED_UDP: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    AwaitingIdentity,
    Identified { user_id: UserId, username: String },
}

#[derive(Debug)]
struct PendingJoin {
    ticket: u64,
    channel: usize,
}

#[derive(Debug)]
struct Session {
    phase: Phase,
    opened_at: Duration,
    last_seen: Duration,
    udp_token: u64,
    channel: Option<usize>,
    local_endpoints: Vec<SocketAddr>,
    public_endpoint: Option<SocketAddr>,
    voice_key: Option<[u8; 32]>,
    /// Passed on to peers unchanged: the server cannot forge it and does not check it.
    voice_key_proof: Option<VoiceKeyProof>,
    pending_join: Option<PendingJoin>,
    wrong_passwords: VecDeque<Duration>,
    /// Token bucket for the message rate limit: tokens left and when they were counted.
    tokens: f64,
    tokens_at: Duration,
    /// Where the connection comes from (wrong-password limits per address survive
    /// reconnects) and which of our addresses it reached (what it can reach our host at).
    addrs: ConnectionAddrs,
    /// What this client may still send through the relay.
    relay_budget: RelayBudget,
    /// Registers this client may still send (a token bucket counting datagrams).
    register_budget: RelayBudget,
    /// When the channel was last told of this client's public endpoint, and whether a later
    /// change waits for the announce interval.
    endpoint_announced_at: Option<Duration>,
    endpoint_change_pending: bool,
    /// The client tunnels its datagrams through this connection (its network blocks UDP):
    /// what is relayed to it goes back the same way, as [`ServerMsg::Tunnel`].
    tunnelled: bool,
}

#[derive(Debug)]
struct Channel {
    config: ChannelConfig,
    /// Members in join order.
    members: Vec<SessionId>,
}

/// A snapshot of one session, for mirroring into ECS components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub username: Option<String>,
    pub user_id: Option<UserId>,
    pub channel: Option<String>,
    pub local_endpoints: Vec<SocketAddr>,
    pub public_endpoint: Option<SocketAddr>,
}

/// All server rules: channels, sessions, unique usernames, membership, endpoint introductions.
///
/// The calling contract (see the crate docs): the shell feeds what happened with the
/// `handle_*` methods (a connection, a message, a password check's result, a datagram, a
/// connection gone) and `handle_timeout` once [`Self::poll_timeout`] is due, then drains
/// [`Self::poll_output`] (messages and closes per session), [`Self::poll_transmit`] (UDP
/// answers) and [`Self::poll_event`] (what its counters and ECS mirror need).
#[derive(Debug)]
pub struct ServerState {
    rules: ServerRules,
    channels: Vec<Channel>,
    channel_index: HashMap<String, usize>,
    sessions: HashMap<SessionId, Session>,
    /// [`username_key`] -> session, so "Alice", "alice" and a Cyrillic "аlice" cannot all
    /// exist at once.
    names: HashMap<String, SessionId>,
    tokens: HashMap<u64, SessionId>,
    /// Registered UDP address -> session: who a relay request comes from.
    by_endpoint: HashMap<SocketAddr, SessionId>,
    /// Relayed datagrams owed to members: (destination, the whole `RelayFrom` datagram).
    relayed: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Password checks in flight and wrong-password lockouts per (prefix, channel).
    password_checks: PasswordChecks,
    next_user_id: UserId,
    next_ticket: u64,
    /// When the silence and identify timers are next checked.
    next_expiry_check: Duration,
    outputs: VecDeque<Output>,
    /// Addresses owed a `RegisterAck`, each the source of a valid `Register`.
    acks: VecDeque<SocketAddr>,
    events: VecDeque<ServerEvent>,
}

impl ServerState {
    pub fn new(channels: Vec<ChannelConfig>, rules: ServerRules) -> Self {
        let password_checks = PasswordChecks::new(rules.passwords);
        let channel_index = channels
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.to_lowercase(), i))
            .collect();
        Self {
            rules,
            channels: channels
                .into_iter()
                .map(|config| Channel {
                    config,
                    members: Vec::new(),
                })
                .collect(),
            channel_index,
            sessions: HashMap::new(),
            names: HashMap::new(),
            tokens: HashMap::new(),
            by_endpoint: HashMap::new(),
            relayed: VecDeque::new(),
            password_checks,
            next_user_id: 1,
            next_ticket: 1,
            next_expiry_check: Duration::ZERO,
            outputs: VecDeque::new(),
            acks: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn rules(&self) -> &ServerRules {
        &self.rules
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn channel_names(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|c| c.config.name.as_str())
    }

    /// The next thing the shell must do for a session, in the order the rules decided them.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next UDP datagram to send (a `RegisterAck` or a relayed datagram), written into
    /// `buf`, which should hold
    /// [`MAX_DATAGRAM_LEN`](crate::protocol::datagram::MAX_DATAGRAM_LEN) bytes.
    pub fn poll_transmit(&mut self, _now: Duration, buf: &mut [u8]) -> Option<Transmit> {
        while let Some(to) = self.acks.pop_front() {
            // Fails only when `buf` is too small; then no ack fits and all are dropped.
            if let Ok(len) = (Datagram::RegisterAck { observed: to }).write(buf) {
                return Some(Transmit { to, len });
            }
        }
        while let Some((to, bytes)) = self.relayed.pop_front() {
            if let Some(out) = buf.get_mut(..bytes.len()) {
                out.copy_from_slice(&bytes);
                return Some(Transmit {
                    to,
                    len: bytes.len(),
                });
            }
        }
        None
    }

    /// Whether this server forwards sealed peer datagrams (told to clients in `Welcome`).
    pub fn relays(&self) -> bool {
        self.rules.relay.is_some()
    }

    /// The next event for the shell's counters and ECS mirror.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] next has something to check; `None` while there is
    /// nothing to time out.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.password_checks.poll_timeout() {
            _ if !self.sessions.is_empty() => Some(self.next_expiry_check),
            // Only lockouts to forget: no need to wake every check interval.
            Some(forget) => Some(forget.max(self.next_expiry_check)),
            None => None,
        }
    }

    /// Password checks handed to the shell and not answered yet.
    pub fn password_checks_in_flight(&self) -> usize {
        self.password_checks.in_flight()
    }

    /// A new connection from `ip`. `udp_token` must be unpredictable (the shell draws it from
    /// an OS RNG); the client gets it in `Welcome` and proves its UDP address with it. The
    /// address keeps wrong-password limits across reconnects.
    pub fn handle_connected(
        &mut self,
        now: Duration,
        id: SessionId,
        addrs: ConnectionAddrs,
        udp_token: u64,
    ) {
        self.tokens.insert(udp_token, id);
        self.sessions.insert(
            id,
            Session {
                phase: Phase::AwaitingHello,
                opened_at: now,
                last_seen: now,
                udp_token,
                channel: None,
                local_endpoints: Vec::new(),
                public_endpoint: None,
                voice_key: None,
                voice_key_proof: None,
                pending_join: None,
                wrong_passwords: VecDeque::new(),
                tokens: self.rules.message_burst,
                tokens_at: now,
                addrs,
                relay_budget: RelayBudget::new(
                    now,
                    self.rules.relay.unwrap_or_default().burst_bytes,
                ),
                register_budget: RelayBudget::new(now, REGISTER_BURST),
                endpoint_announced_at: None,
                endpoint_change_pending: false,
                tunnelled: false,
            },
        );
    }

    /// The connection is gone without us closing it (the shell lost it). Its channel hears
    /// that it left; no [`Output::Close`] follows, there is nothing to close.
    pub fn handle_closed(&mut self, _now: Duration, id: SessionId) {
        self.remove_session(id);
    }

    /// Ends a session: queues [`Output::Close`] with `reason` for the shell, then forgets the
    /// session, telling its channel. The shell calls this for what it sees on the transport
    /// (end of stream, a broken frame, a client too slow to read); the rules call it for what
    /// they decide. Closing a session that is already gone does nothing.
    pub fn close(&mut self, id: SessionId, reason: CloseReason) {
        if !self.sessions.contains_key(&id) {
            return;
        }
        self.outputs.push_back(Output::Close(id, reason));
        self.remove_session(id);
    }

    fn remove_session(&mut self, id: SessionId) {
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        if session.channel.is_some() {
            self.leave_channel(id);
        }
        if let Some(session) = self.sessions.remove(&id) {
            self.tokens.remove(&session.udp_token);
            if let Some(ep) = session.public_endpoint {
                self.by_endpoint.remove(&ep);
            }
            if let Phase::Identified { username, .. } = &session.phase {
                self.names.remove(&username_key(username));
            }
        }
    }

    /// Handles one message from a session.
    pub fn handle_message(&mut self, now: Duration, id: SessionId, msg: ClientMsg) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.last_seen = now;
        if session.phase != Phase::AwaitingHello {
            if let ClientMsg::Tunnel { datagram } = msg {
                // Bounded by the relay budget, not the message rate (voice is ~50 a second).
                self.handle_tunnelled(now, id, &datagram);
                return;
            }
        }
        let elapsed = now.saturating_sub(session.tokens_at).as_secs_f64();
        session.tokens =
            (session.tokens + elapsed * self.rules.message_rate).min(self.rules.message_burst);
        session.tokens_at = now;
        if session.tokens < 1.0 {
            let limit = self.rules.message_rate;
            self.close(id, CloseReason::TooManyMessages { limit });
            return;
        }
        session.tokens -= 1.0;
        match (&session.phase, msg) {
            (
                Phase::AwaitingHello,
                ClientMsg::Hello {
                    protocol_version, ..
                },
            ) => {
                if protocol_version != PROTOCOL_VERSION {
                    let reason = CloseReason::VersionMismatch {
                        client: protocol_version,
                    };
                    self.outputs.push_back(Output::Send(
                        id,
                        ServerMsg::Error {
                            status: Status::VersionMismatch,
                            message: reason.to_string(),
                        },
                    ));
                    self.close(id, reason);
                    return;
                }
                session.phase = Phase::AwaitingIdentity;
                self.outputs.push_back(Output::Send(
                    id,
                    ServerMsg::Welcome {
                        protocol_version: PROTOCOL_VERSION,
                        app_version: APP_VERSION.to_string(),
                        udp_token: session.udp_token,
                        relay: self.rules.relay.is_some(),
                        heartbeat_timeout_ms: self.rules.heartbeat_timeout.as_millis() as u32,
                    },
                ));
            }
            (Phase::AwaitingHello, _) => self.close(id, CloseReason::HelloFirst),
            // Taken above, before the message-rate limit.
            (_, ClientMsg::Tunnel { .. }) => {}
            (_, ClientMsg::Hello { .. }) => self.close(id, CloseReason::HelloTwice),
            (_, ClientMsg::Heartbeat) => self
                .outputs
                .push_back(Output::Send(id, ServerMsg::HeartbeatAck)),
            (_, ClientMsg::Disconnect) => self.close(id, CloseReason::Goodbye),
            (Phase::AwaitingIdentity, ClientMsg::Identify { username }) => {
                self.identify(id, username);
            }
            (Phase::Identified { username, .. }, ClientMsg::Identify { .. }) => {
                let username = username.clone();
                self.outputs.push_back(Output::Send(
                    id,
                    ServerMsg::Identified {
                        status: Status::AlreadyIdentified,
                        user_id: None,
                        username,
                    },
                ));
            }
            (Phase::AwaitingIdentity, ClientMsg::Join { channel, .. }) => {
                self.outputs.push_back(Output::Send(
                    id,
                    ServerMsg::Joined {
                        status: Status::NotIdentified,
                        channel,
                    },
                ));
            }
            (Phase::AwaitingIdentity, ClientMsg::Leave) => {
                self.outputs.push_back(Output::Send(
                    id,
                    ServerMsg::Left {
                        status: Status::NotIdentified,
                        channel: None,
                    },
                ));
            }
            (Phase::Identified { .. }, ClientMsg::Join { channel, password }) => {
                self.join(now, id, channel, password);
            }
            (Phase::Identified { .. }, ClientMsg::Leave) => {
                if session.channel.is_none() {
                    self.outputs.push_back(Output::Send(
                        id,
                        ServerMsg::Left {
                            status: Status::NotInChannel,
                            channel: None,
                        },
                    ));
                } else {
                    let name = self.leave_channel(id);
                    self.outputs.push_back(Output::Send(
                        id,
                        ServerMsg::Left {
                            status: Status::Ok,
                            channel: name,
                        },
                    ));
                }
            }
            (
                _,
                ClientMsg::AnnounceEndpoints {
                    mut local,
                    voice_key,
                    voice_key_proof,
                },
            ) => {
                local.truncate(self.rules.max_local_endpoints);
                local.dedup();
                if session.local_endpoints != local
                    || session.voice_key != voice_key
                    || session.voice_key_proof != voice_key_proof
                {
                    session.local_endpoints = local;
                    session.voice_key = voice_key;
                    session.voice_key_proof = voice_key_proof;
                    self.endpoints_changed(id);
                }
            }
        }
    }

    fn identify(&mut self, id: SessionId, username: String) {
        let status = if validate_username(&username).is_err() {
            Status::InvalidName
        } else if self.names.contains_key(&username_key(&username)) {
            Status::NameTaken
        } else {
            Status::Ok
        };
        if status != Status::Ok {
            let message = match validate_username(&username) {
                Err(why) => format!("{}: {why}", status.message()),
                Ok(()) => format!("username {username:?} is already taken"),
            };
            self.outputs.push_back(Output::Send(
                id,
                ServerMsg::Identified {
                    status,
                    user_id: None,
                    username,
                },
            ));
            self.outputs
                .push_back(Output::Send(id, ServerMsg::Error { status, message }));
            return;
        }
        let user_id = self.next_user_id;
        self.next_user_id = self.next_user_id.wrapping_add(1).max(1);
        self.names.insert(username_key(&username), id);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.phase = Phase::Identified {
                user_id,
                username: username.clone(),
            };
        }
        self.outputs.push_back(Output::Send(
            id,
            ServerMsg::Identified {
                status: Status::Ok,
                user_id: Some(user_id),
                username,
            },
        ));
        self.send_overview(id);
    }

    /// The overview, in one message when it fits comfortably and otherwise as the channel list
    /// followed by member parts.
    fn send_overview(&mut self, id: SessionId) {
        let mut channels = self.overview();
        let total: usize = channels.iter().map(|c| c.members.len()).sum();
        if total <= OVERVIEW_PART_MEMBERS {
            self.outputs
                .push_back(Output::Send(id, ServerMsg::Overview { channels }));
            return;
        }
        let parts: Vec<(String, Vec<MemberInfo>)> = channels
            .iter_mut()
            .map(|c| (c.name.clone(), std::mem::take(&mut c.members)))
            .collect();
        self.outputs
            .push_back(Output::Send(id, ServerMsg::Overview { channels }));
        for (channel, members) in parts {
            for chunk in members.chunks(OVERVIEW_PART_MEMBERS) {
                self.outputs.push_back(Output::Send(
                    id,
                    ServerMsg::OverviewMembers {
                        channel: channel.clone(),
                        members: chunk.to_vec(),
                    },
                ));
            }
        }
    }

    fn join(&mut self, now: Duration, id: SessionId, channel: String, password: Option<Password>) {
        let outputs = &mut self.outputs;
        let mut refuse = |status: Status, channel: String| {
            outputs.push_back(Output::Send(id, ServerMsg::Joined { status, channel }));
        };
        let Some(&index) = self.channel_index.get(&channel.to_lowercase()) else {
            refuse(Status::NoSuchChannel, channel);
            return;
        };
        let canonical = self.channels[index].config.name.clone();
        let rules = &self.rules;
        let session = self.sessions.get_mut(&id).expect("caller checked");
        if session.channel == Some(index) {
            refuse(Status::AlreadyInChannel, canonical);
            return;
        }
        if session.pending_join.is_some() {
            // Not a refusal of the channel: the earlier join's answer is still to come.
            refuse(Status::PasswordCheckPending, canonical);
            return;
        }
        while session
            .wrong_passwords
            .front()
            .is_some_and(|t| now.saturating_sub(*t) > rules.wrong_password_window)
        {
            session.wrong_passwords.pop_front();
        }
        let ch = &self.channels[index];
        if ch.members.len() >= ch.config.max_members as usize {
            refuse(Status::ChannelFull, canonical);
            return;
        }
        match &ch.config.password_hash {
            None => self.enter_channel(id, index),
            Some(hash) => {
                if session.wrong_passwords.len() >= rules.max_wrong_passwords {
                    refuse(Status::RateLimited, canonical);
                    return;
                }
                let Some(password) = password.filter(|p| !p.is_empty()) else {
                    refuse(Status::WrongPassword, canonical);
                    return;
                };
                let prefix = rules.prefixes.prefix_of(session.addrs.peer);
                match self.password_checks.may_check(now, prefix, index) {
                    Ok(()) => {}
                    Err(CheckRefusal::LockedOut { .. }) => {
                        refuse(Status::RateLimited, canonical);
                        return;
                    }
                    Err(CheckRefusal::Busy) => {
                        refuse(Status::ServerBusy, canonical);
                        return;
                    }
                }
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.password_checks.start(ticket, prefix, index);
                session.pending_join = Some(PendingJoin {
                    ticket,
                    channel: index,
                });
                self.outputs.push_back(Output::VerifyPassword {
                    session: id,
                    ticket,
                    hash: hash.clone(),
                    password,
                });
            }
        }
    }

    /// The result of an [`Output::VerifyPassword`] request: `ok` when the password matched.
    /// Every result frees its place among the checks in flight and a wrong password counts
    /// against its prefix and channel, even when the session is gone; otherwise a result for
    /// a join that is no longer pending (another ticket, a closed session) is ignored.
    pub fn handle_password_checked(&mut self, now: Duration, id: SessionId, ticket: u64, ok: bool) {
        self.password_checks.finish(now, ticket, ok);
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        let Some(pending) = session.pending_join.take_if(|p| p.ticket == ticket) else {
            return;
        };
        let index = pending.channel;
        let canonical = self.channels[index].config.name.clone();
        if !ok {
            session.wrong_passwords.push_back(now);
            self.outputs.push_back(Output::Send(
                id,
                ServerMsg::Joined {
                    status: Status::WrongPassword,
                    channel: canonical,
                },
            ));
            return;
        }
        // The channel may have filled up or we may have joined it while argon2 ran.
        if session.channel == Some(index) {
            return;
        }
        let ch = &self.channels[index];
        if ch.members.len() >= ch.config.max_members as usize {
            self.outputs.push_back(Output::Send(
                id,
                ServerMsg::Joined {
                    status: Status::ChannelFull,
                    channel: canonical,
                },
            ));
            return;
        }
        self.enter_channel(id, index);
    }

    fn member_info(&self, id: SessionId) -> Option<MemberInfo> {
        match &self.sessions.get(&id)?.phase {
            Phase::Identified { user_id, username } => Some(MemberInfo {
                user_id: *user_id,
                username: username.clone(),
            }),
            _ => None,
        }
    }

    /// Member `id`'s endpoints as `recipient` can use them (see [`reachable`]).
    fn peer_info_for(&self, id: SessionId, recipient: SessionId) -> Option<PeerInfo> {
        let s = self.sessions.get(&id)?;
        let to = self.sessions.get(&recipient)?;
        let member = self.member_info(id)?;
        let (local, public) = endpoints_for(&s.local_endpoints, s.public_endpoint, to.addrs);
        Some(PeerInfo {
            user_id: member.user_id,
            username: member.username,
            local,
            public,
            voice_key: s.voice_key,
            voice_key_proof: s.voice_key_proof.clone(),
        })
    }

    fn enter_channel(&mut self, id: SessionId, index: usize) {
        if self.sessions.get(&id).and_then(|s| s.channel).is_some() {
            self.leave_channel(id);
        }
        let Some(member) = self.member_info(id) else {
            return;
        };
        let canonical = self.channels[index].config.name.clone();
        self.outputs.push_back(Output::Send(
            id,
            ServerMsg::Joined {
                status: Status::Ok,
                channel: canonical.clone(),
            },
        ));
        for &other in &self.channels[index].members {
            if let Some(peer) = self.peer_info_for(other, id) {
                self.outputs
                    .push_back(Output::Send(id, ServerMsg::PeerEndpoints { peer }));
            }
            if let Some(peer) = self.peer_info_for(id, other) {
                self.outputs
                    .push_back(Output::Send(other, ServerMsg::PeerEndpoints { peer }));
            }
        }
        self.channels[index].members.push(id);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.channel = Some(index);
        }
        self.outputs.push_back(Output::Broadcast {
            msg: ServerMsg::MemberJoined {
                channel: canonical,
                member,
            },
            prompt: self.channels[index].members.clone(),
        });
    }

    /// Removes `id` from its channel, telling everyone; returns the channel's name.
    fn leave_channel(&mut self, id: SessionId) -> Option<String> {
        let session = self.sessions.get_mut(&id)?;
        let index = session.channel.take()?;
        let user_id = match &session.phase {
            Phase::Identified { user_id, .. } => *user_id,
            _ => return None,
        };
        let ch = &mut self.channels[index];
        ch.members.retain(|m| *m != id);
        for &other in &ch.members {
            self.outputs
                .push_back(Output::Send(other, ServerMsg::PeerGone { user_id }));
        }
        let name = ch.config.name.clone();
        // The one leaving sees its old channel update as promptly as those who stay.
        let mut prompt = ch.members.clone();
        prompt.push(id);
        self.outputs.push_back(Output::Broadcast {
            msg: ServerMsg::MemberLeft {
                channel: name.clone(),
                user_id,
            },
            prompt,
        });
        Some(name)
    }

    fn endpoints_changed(&mut self, id: SessionId) {
        let Some(index) = self.sessions.get(&id).and_then(|s| s.channel) else {
            return;
        };
        let members = self.channels[index].members.clone();
        for other in members {
            if other == id {
                continue;
            }
            if let Some(peer) = self.peer_info_for(id, other) {
                self.outputs
                    .push_back(Output::Send(other, ServerMsg::PeerEndpoints { peer }));
            }
        }
    }

    /// One UDP datagram arrived at the server's socket from `from`. A `Register{token}` of a
    /// known session records `from` as the session's public address (telling its channel if it
    /// changed) and queues a `RegisterAck` to `from`; anything else is dropped. Either way an
    /// event says what happened.
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        let why = match Datagram::parse(bytes) {
            Ok(Datagram::RelayTo { to, inner }) => {
                let relayed = match self.by_endpoint.get(&from) {
                    Some(&sender) => self.relay(now, sender, to, inner),
                    None => Err(RelayRefusal::UnknownSource),
                };
                match relayed {
                    Ok(()) => return,
                    Err(refusal) => DatagramDrop::Relay(refusal),
                }
            }
            Ok(Datagram::Register { token }) => match self.register_udp(now, token, from) {
                Ok(id) => {
                    if self.acks.len() < MAX_QUEUED_UDP {
                        self.acks.push_back(from);
                    }
                    self.push_event(ServerEvent::UdpRegistered(id));
                    return;
                }
                Err(why) => why,
            },
            Ok(_) => DatagramDrop::Unexpected,
            Err(e) => DatagramDrop::Malformed(e),
        };
        self.push_event(ServerEvent::DatagramDropped { from, why });
    }

    /// A datagram session `id` tunnelled over its TCP connection because its network blocks
    /// UDP. Only `RelayTo` has a meaning here (registering a UDP address over TCP would
    /// register nothing); it is relayed exactly as one over UDP would be, from this session,
    /// and from now on what is relayed to the session comes back through the tunnel.
    fn handle_tunnelled(&mut self, now: Duration, id: SessionId, bytes: &[u8]) {
        if bytes.len() > MAX_DATAGRAM_LEN {
            let why = DatagramDrop::TooLong { len: bytes.len() };
            self.push_event(ServerEvent::TunnelDropped { session: id, why });
            return;
        }
        let why = match Datagram::parse(bytes) {
            Ok(Datagram::RelayTo { to, inner }) => {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.tunnelled = true;
                }
                match self.relay(now, id, to, inner) {
                    Ok(()) => return,
                    Err(refusal) => DatagramDrop::Relay(refusal),
                }
            }
            Ok(_) => DatagramDrop::Unexpected,
            Err(e) => DatagramDrop::Malformed(e),
        };
        self.push_event(ServerEvent::TunnelDropped { session: id, why });
    }

    fn push_event(&mut self, event: ServerEvent) {
        if self.events.len() < MAX_QUEUED_UDP {
            self.events.push_back(event);
        }
    }

    /// The session holding `token` is reachable at `from`. Refused when `from` is not the
    /// address the session's TCP connection comes from (a token seen on the wire cannot
    /// register someone else's address) or the session registers faster than
    /// [`REGISTER_RATE`]. A changed address reaches the channel at most once per
    /// [`ENDPOINT_ANNOUNCE_INTERVAL`]: alternating source ports cannot make us flood members.
    fn register_udp(
        &mut self,
        now: Duration,
        token: u64,
        from: SocketAddr,
    ) -> Result<SessionId, DatagramDrop> {
        let id = *self.tokens.get(&token).ok_or(DatagramDrop::UnknownToken)?;
        let session = self
            .sessions
            .get_mut(&id)
            .ok_or(DatagramDrop::UnknownToken)?;
        if from.ip().to_canonical() != session.addrs.peer {
            return Err(DatagramDrop::RegisterFromElsewhere);
        }
        if !session
            .register_budget
            .try_spend(now, 1, REGISTER_RATE, REGISTER_BURST)
        {
            return Err(DatagramDrop::RegisterRateLimited);
        }
        if session.public_endpoint != Some(from) {
            if let Some(old) = session.public_endpoint.replace(from) {
                self.by_endpoint.remove(&old);
            }
            self.by_endpoint.insert(from, id);
            let due = session
                .endpoint_announced_at
                .is_none_or(|t| now.saturating_sub(t) >= ENDPOINT_ANNOUNCE_INTERVAL);
            if due {
                session.endpoint_announced_at = Some(now);
                session.endpoint_change_pending = false;
                self.endpoints_changed(id);
            } else {
                // Told with the next expiry check once the interval has passed.
                session.endpoint_change_pending = true;
            }
        }
        Ok(id)
    }

    /// Tells channels about endpoint changes held back by the announce interval.
    fn announce_pending_endpoints(&mut self, now: Duration) {
        let due: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.endpoint_change_pending
                    && s.endpoint_announced_at
                        .is_none_or(|t| now.saturating_sub(t) >= ENDPOINT_ANNOUNCE_INTERVAL)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.endpoint_change_pending = false;
                s.endpoint_announced_at = Some(now);
            }
            self.endpoints_changed(id);
        }
    }

    /// Forwards `inner` from session `sender` (found by its UDP address, or the connection
    /// it tunnelled on) to member `to` of its channel, as `RelayFrom`, if relaying is on, the
    /// inner datagram names the sender as its author, and the sender's budget allows it. The
    /// target gets it on its UDP address, or through its tunnel if it tunnels.
    fn relay(
        &mut self,
        now: Duration,
        sender: SessionId,
        to: UserId,
        inner: &[u8],
    ) -> Result<(), RelayRefusal> {
        let rules = self.rules.relay.ok_or(RelayRefusal::Disabled)?;
        let session = self
            .sessions
            .get(&sender)
            .ok_or(RelayRefusal::UnknownSource)?;
        let Phase::Identified { user_id, .. } = session.phase else {
            return Err(RelayRefusal::UnknownSource);
        };
        let channel = session.channel.ok_or(RelayRefusal::NotInChannel)?;
        if peer_sender(inner) != Some(user_id) {
            return Err(RelayRefusal::ForgedSender);
        }
        let (target_id, target) = self.channels[channel]
            .members
            .iter()
            .filter_map(|m| Some((*m, self.sessions.get(m)?)))
            .find(|(_, s)| matches!(s.phase, Phase::Identified { user_id: u, .. } if u == to && u != user_id))
            .ok_or(RelayRefusal::NotInSameChannel)?;
        let dest = if target.tunnelled {
            None
        } else {
            Some(target.public_endpoint.ok_or(RelayRefusal::NoEndpoint)?)
        };
        if dest.is_some() && self.relayed.len() >= MAX_QUEUED_UDP {
            return Err(RelayRefusal::OverBudget);
        }
        let budget = &mut self
            .sessions
            .get_mut(&sender)
            .ok_or(RelayRefusal::UnknownSource)?
            .relay_budget;
        let len = RELAY_HEADER_LEN + inner.len();
        if !budget.try_spend(now, len, rules.bytes_per_sec, rules.burst_bytes) {
            return Err(RelayRefusal::OverBudget);
        }
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(&crate::protocol::datagram::relay_header(
            DatagramKind::RelayFrom,
            user_id,
        ));
        bytes.extend_from_slice(inner);
        match dest {
            Some(dest) => self.relayed.push_back((dest, bytes)),
            None => self.outputs.push_back(Output::Send(
                target_id,
                ServerMsg::Tunnel { datagram: bytes },
            )),
        }
        self.push_event(ServerEvent::Relayed { bytes: len });
        Ok(())
    }

    /// Closes sessions that went silent or never identified, and forgets old failures. Does
    /// nothing before [`Self::poll_timeout`] is due.
    pub fn handle_timeout(&mut self, now: Duration) {
        if now < self.next_expiry_check {
            return;
        }
        self.next_expiry_check = now + EXPIRY_CHECK_INTERVAL;
        self.announce_pending_endpoints(now);
        self.password_checks.handle_timeout(now);
        let mut expired = Vec::new();
        for (&id, s) in &self.sessions {
            let silent = now.saturating_sub(s.last_seen);
            if silent > self.rules.heartbeat_timeout {
                let silent_secs = silent.as_secs();
                expired.push((id, CloseReason::HeartbeatTimeout { silent_secs }));
            } else if !matches!(s.phase, Phase::Identified { .. })
                && now.saturating_sub(s.opened_at) > self.rules.identify_timeout
            {
                expired.push((id, CloseReason::IdentifyTimeout));
            }
        }
        for (id, reason) in expired {
            self.close(id, reason);
        }
    }

    /// The overview every identified session sees.
    pub fn overview(&self) -> Vec<ChannelInfo> {
        self.channels
            .iter()
            .map(|c| ChannelInfo {
                name: c.config.name.clone(),
                has_password: c.config.password_hash.is_some(),
                max_members: c.config.max_members,
                members: c
                    .members
                    .iter()
                    .filter_map(|m| self.member_info(*m))
                    .collect(),
            })
            .collect()
    }

    /// Is this session past identification? Broadcasts go only to those.
    pub fn is_identified(&self, id: SessionId) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|s| matches!(s.phase, Phase::Identified { .. }))
    }

    pub fn session_view(&self, id: SessionId) -> Option<SessionView> {
        let s = self.sessions.get(&id)?;
        let (username, user_id) = match &s.phase {
            Phase::Identified { user_id, username } => (Some(username.clone()), Some(*user_id)),
            _ => (None, None),
        };
        Some(SessionView {
            username,
            user_id,
            channel: s.channel.map(|i| self.channels[i].config.name.clone()),
            local_endpoints: s.local_endpoints.clone(),
            public_endpoint: s.public_endpoint,
        })
    }
}

#[cfg(test)]
mod tests;
