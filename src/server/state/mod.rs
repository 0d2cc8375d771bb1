//! The metadata server's rules as a pure state machine.
//!
//! `ServerState` owns no socket and reads no clock: the shell (see `plugin.rs`) hands it what
//! happened (a session opened, a message arrived, a UDP registration, time passed) and applies the
//! [`Output`]s it returns. Every rule of the server is therefore a deterministic unit test.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::ChannelConfig;
use crate::protocol::messages::OVERVIEW_PART_MEMBERS;
use crate::protocol::{
    validate_username, ChannelInfo, ClientMsg, MemberInfo, PeerInfo, ServerMsg, Status, UserId,
    APP_VERSION, PROTOCOL_VERSION,
};

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
    /// Wrong passwords allowed per IP address (all its sessions) within the same window, so
    /// reconnecting does not reset the count.
    pub max_wrong_passwords_per_ip: usize,
    pub wrong_password_window: Duration,
    /// Local endpoints accepted per announcement.
    pub max_local_endpoints: usize,
    /// Sustained control messages per second one session may send (token bucket rate)...
    pub message_rate: f64,
    /// ...and the burst it may send at once. A session over the limit is closed: a real
    /// client sends a heartbeat every 4 s and a handful of messages per user action.
    pub message_burst: f64,
}

impl Default for ServerRules {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(15),
            identify_timeout: Duration::from_secs(30),
            max_wrong_passwords: 5,
            max_wrong_passwords_per_ip: 20,
            wrong_password_window: Duration::from_secs(60),
            max_local_endpoints: 8,
            message_rate: 20.0,
            message_burst: 60.0,
        }
    }
}

/// What the shell must do after feeding an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send one message to one session.
    Send(SessionId, ServerMsg),
    /// Send one message to every identified session (encode once, copy many).
    ///
    /// `prompt` are the sessions that must get it without delay: the members of the channel
    /// it is about, whose call it changes. Everyone else only keeps a lobby-wide overview
    /// current, so the shell may batch it with other presence news (one TLS record and one
    /// write per client instead of one per event); order per session is kept either way.
    Broadcast {
        msg: ServerMsg,
        prompt: Vec<SessionId>,
    },
    /// Send `Closing{reason}` if possible, then close the connection.
    Close(SessionId, String),
    /// Check `password` against `hash` off the tick thread (argon2 is slow on purpose) and call
    /// [`ServerState::password_checked`] with the same ticket.
    VerifyPassword {
        session: SessionId,
        ticket: u64,
        hash: String,
        password: String,
    },
}

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
    pending_join: Option<PendingJoin>,
    wrong_passwords: VecDeque<Duration>,
    /// Token bucket for the message rate limit: tokens left and when they were counted.
    tokens: f64,
    tokens_at: Duration,
    ip: Option<std::net::IpAddr>,
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
#[derive(Debug)]
pub struct ServerState {
    rules: ServerRules,
    channels: Vec<Channel>,
    channel_index: HashMap<String, usize>,
    sessions: HashMap<SessionId, Session>,
    /// Lower-cased username -> session, so "Alice" and "alice" cannot both exist.
    names: HashMap<String, SessionId>,
    tokens: HashMap<u64, SessionId>,
    /// Recent wrong-password times per client address.
    wrong_by_ip: HashMap<std::net::IpAddr, VecDeque<Duration>>,
    next_user_id: UserId,
    next_ticket: u64,
}

impl ServerState {
    pub fn new(channels: Vec<ChannelConfig>, rules: ServerRules) -> Self {
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
            wrong_by_ip: HashMap::new(),
            next_user_id: 1,
            next_ticket: 1,
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

    /// A new connection. `udp_token` must be unpredictable (the shell draws it from an OS RNG).
    pub fn session_opened(&mut self, now: Duration, id: SessionId, udp_token: u64) {
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
                pending_join: None,
                wrong_passwords: VecDeque::new(),
                tokens: self.rules.message_burst,
                tokens_at: now,
                ip: None,
            },
        );
    }

    /// Where a session connects from (for limits that must survive reconnecting).
    pub fn set_session_ip(&mut self, id: SessionId, ip: std::net::IpAddr) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.ip = Some(ip);
        }
    }

    /// The connection is gone (closed by the peer, by an error, or by us).
    pub fn session_closed(&mut self, _now: Duration, id: SessionId, out: &mut Vec<Output>) {
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        if session.channel.is_some() {
            self.leave_channel(id, out);
        }
        if let Some(session) = self.sessions.remove(&id) {
            self.tokens.remove(&session.udp_token);
            if let Phase::Identified { username, .. } = &session.phase {
                self.names.remove(&username.to_lowercase());
            }
        }
    }

    /// Handles one message from a session.
    pub fn handle(&mut self, now: Duration, id: SessionId, msg: ClientMsg, out: &mut Vec<Output>) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.last_seen = now;
        let elapsed = now.saturating_sub(session.tokens_at).as_secs_f64();
        session.tokens =
            (session.tokens + elapsed * self.rules.message_rate).min(self.rules.message_burst);
        session.tokens_at = now;
        if session.tokens < 1.0 {
            out.push(Output::Close(
                id,
                format!(
                    "too many messages (limit {} per second)",
                    self.rules.message_rate
                ),
            ));
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
                    let reason = format!(
                        "{}: server speaks protocol {PROTOCOL_VERSION}, client speaks {protocol_version}",
                        Status::VersionMismatch.message()
                    );
                    out.push(Output::Send(
                        id,
                        ServerMsg::Error {
                            status: Status::VersionMismatch,
                            message: reason.clone(),
                        },
                    ));
                    out.push(Output::Close(id, reason));
                    return;
                }
                session.phase = Phase::AwaitingIdentity;
                out.push(Output::Send(
                    id,
                    ServerMsg::Welcome {
                        protocol_version: PROTOCOL_VERSION,
                        app_version: APP_VERSION.to_string(),
                        udp_token: session.udp_token,
                        heartbeat_timeout_ms: self.rules.heartbeat_timeout.as_millis() as u32,
                    },
                ));
            }
            (Phase::AwaitingHello, _) => {
                out.push(Output::Close(
                    id,
                    "protocol error: the first message must be Hello".into(),
                ));
            }
            (_, ClientMsg::Hello { .. }) => {
                out.push(Output::Close(id, "protocol error: Hello sent twice".into()));
            }
            (_, ClientMsg::Heartbeat) => out.push(Output::Send(id, ServerMsg::HeartbeatAck)),
            (_, ClientMsg::Disconnect) => out.push(Output::Close(id, "goodbye".into())),
            (Phase::AwaitingIdentity, ClientMsg::Identify { username }) => {
                self.identify(id, username, out);
            }
            (Phase::Identified { username, .. }, ClientMsg::Identify { .. }) => {
                let username = username.clone();
                out.push(Output::Send(
                    id,
                    ServerMsg::Identified {
                        status: Status::AlreadyIdentified,
                        user_id: None,
                        username,
                    },
                ));
            }
            (Phase::AwaitingIdentity, ClientMsg::Join { channel, .. }) => {
                out.push(Output::Send(
                    id,
                    ServerMsg::Joined {
                        status: Status::NotIdentified,
                        channel,
                    },
                ));
            }
            (Phase::AwaitingIdentity, ClientMsg::Leave) => {
                out.push(Output::Send(
                    id,
                    ServerMsg::Left {
                        status: Status::NotIdentified,
                        channel: None,
                    },
                ));
            }
            (Phase::Identified { .. }, ClientMsg::Join { channel, password }) => {
                self.join(now, id, channel, password, out);
            }
            (Phase::Identified { .. }, ClientMsg::Leave) => {
                if session.channel.is_none() {
                    out.push(Output::Send(
                        id,
                        ServerMsg::Left {
                            status: Status::NotInChannel,
                            channel: None,
                        },
                    ));
                } else {
                    let name = self.leave_channel(id, out);
                    out.push(Output::Send(
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
                },
            ) => {
                local.truncate(self.rules.max_local_endpoints);
                local.dedup();
                if session.local_endpoints != local || session.voice_key != voice_key {
                    session.local_endpoints = local;
                    session.voice_key = voice_key;
                    self.endpoints_changed(id, out);
                }
            }
        }
    }

    fn identify(&mut self, id: SessionId, username: String, out: &mut Vec<Output>) {
        let status = if validate_username(&username).is_err() {
            Status::InvalidName
        } else if self.names.contains_key(&username.to_lowercase()) {
            Status::NameTaken
        } else {
            Status::Ok
        };
        if status != Status::Ok {
            let message = match validate_username(&username) {
                Err(why) => format!("{}: {why}", status.message()),
                Ok(()) => format!("username {username:?} is already taken"),
            };
            out.push(Output::Send(
                id,
                ServerMsg::Identified {
                    status,
                    user_id: None,
                    username,
                },
            ));
            out.push(Output::Send(id, ServerMsg::Error { status, message }));
            return;
        }
        let user_id = self.next_user_id;
        self.next_user_id = self.next_user_id.wrapping_add(1).max(1);
        self.names.insert(username.to_lowercase(), id);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.phase = Phase::Identified {
                user_id,
                username: username.clone(),
            };
        }
        out.push(Output::Send(
            id,
            ServerMsg::Identified {
                status: Status::Ok,
                user_id: Some(user_id),
                username,
            },
        ));
        self.send_overview(id, out);
    }

    /// The overview, in one message when it fits comfortably and otherwise as the channel list
    /// followed by member parts.
    fn send_overview(&self, id: SessionId, out: &mut Vec<Output>) {
        let mut channels = self.overview();
        let total: usize = channels.iter().map(|c| c.members.len()).sum();
        if total <= OVERVIEW_PART_MEMBERS {
            out.push(Output::Send(id, ServerMsg::Overview { channels }));
            return;
        }
        let parts: Vec<(String, Vec<MemberInfo>)> = channels
            .iter_mut()
            .map(|c| (c.name.clone(), std::mem::take(&mut c.members)))
            .collect();
        out.push(Output::Send(id, ServerMsg::Overview { channels }));
        for (channel, members) in parts {
            for chunk in members.chunks(OVERVIEW_PART_MEMBERS) {
                out.push(Output::Send(
                    id,
                    ServerMsg::OverviewMembers {
                        channel: channel.clone(),
                        members: chunk.to_vec(),
                    },
                ));
            }
        }
    }

    fn join(
        &mut self,
        now: Duration,
        id: SessionId,
        channel: String,
        password: Option<String>,
        out: &mut Vec<Output>,
    ) {
        let refuse = |out: &mut Vec<Output>, status: Status, channel: String| {
            out.push(Output::Send(id, ServerMsg::Joined { status, channel }));
        };
        let Some(&index) = self.channel_index.get(&channel.to_lowercase()) else {
            refuse(out, Status::NoSuchChannel, channel);
            return;
        };
        let canonical = self.channels[index].config.name.clone();
        let rules = self.rules.clone();
        let session = self.sessions.get_mut(&id).expect("caller checked");
        if session.channel == Some(index) {
            refuse(out, Status::AlreadyInChannel, canonical);
            return;
        }
        if session.pending_join.is_some() {
            refuse(out, Status::RateLimited, canonical);
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
            refuse(out, Status::ChannelFull, canonical);
            return;
        }
        match &ch.config.password_hash {
            None => self.enter_channel(id, index, out),
            Some(hash) => {
                let ip_failures = session
                    .ip
                    .and_then(|ip| self.wrong_by_ip.get_mut(&ip))
                    .map(|q| {
                        while q
                            .front()
                            .is_some_and(|t| now.saturating_sub(*t) > rules.wrong_password_window)
                        {
                            q.pop_front();
                        }
                        q.len()
                    })
                    .unwrap_or(0);
                if session.wrong_passwords.len() >= rules.max_wrong_passwords
                    || ip_failures >= rules.max_wrong_passwords_per_ip
                {
                    refuse(out, Status::RateLimited, canonical);
                    return;
                }
                let Some(password) = password.filter(|p| !p.is_empty()) else {
                    refuse(out, Status::WrongPassword, canonical);
                    return;
                };
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                session.pending_join = Some(PendingJoin {
                    ticket,
                    channel: index,
                });
                out.push(Output::VerifyPassword {
                    session: id,
                    ticket,
                    hash: hash.clone(),
                    password,
                });
            }
        }
    }

    /// Result of an [`Output::VerifyPassword`] request.
    pub fn password_checked(
        &mut self,
        now: Duration,
        id: SessionId,
        ticket: u64,
        ok: bool,
        out: &mut Vec<Output>,
    ) {
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
            if let Some(ip) = session.ip {
                self.wrong_by_ip.entry(ip).or_default().push_back(now);
            }
            out.push(Output::Send(
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
            out.push(Output::Send(
                id,
                ServerMsg::Joined {
                    status: Status::ChannelFull,
                    channel: canonical,
                },
            ));
            return;
        }
        self.enter_channel(id, index, out);
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

    fn peer_info(&self, id: SessionId) -> Option<PeerInfo> {
        let s = self.sessions.get(&id)?;
        let member = self.member_info(id)?;
        Some(PeerInfo {
            user_id: member.user_id,
            username: member.username,
            local: s.local_endpoints.clone(),
            public: s.public_endpoint,
            voice_key: s.voice_key,
        })
    }

    fn enter_channel(&mut self, id: SessionId, index: usize, out: &mut Vec<Output>) {
        if self.sessions.get(&id).and_then(|s| s.channel).is_some() {
            self.leave_channel(id, out);
        }
        let Some(member) = self.member_info(id) else {
            return;
        };
        let canonical = self.channels[index].config.name.clone();
        out.push(Output::Send(
            id,
            ServerMsg::Joined {
                status: Status::Ok,
                channel: canonical.clone(),
            },
        ));
        let me = self.peer_info(id);
        for &other in &self.channels[index].members {
            if let Some(peer) = self.peer_info(other) {
                out.push(Output::Send(id, ServerMsg::PeerEndpoints { peer }));
            }
            if let Some(peer) = me.clone() {
                out.push(Output::Send(other, ServerMsg::PeerEndpoints { peer }));
            }
        }
        self.channels[index].members.push(id);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.channel = Some(index);
        }
        out.push(Output::Broadcast {
            msg: ServerMsg::MemberJoined {
                channel: canonical,
                member,
            },
            prompt: self.channels[index].members.clone(),
        });
    }

    /// Removes `id` from its channel, telling everyone; returns the channel's name.
    fn leave_channel(&mut self, id: SessionId, out: &mut Vec<Output>) -> Option<String> {
        let session = self.sessions.get_mut(&id)?;
        let index = session.channel.take()?;
        let user_id = match &session.phase {
            Phase::Identified { user_id, .. } => *user_id,
            _ => return None,
        };
        let ch = &mut self.channels[index];
        ch.members.retain(|m| *m != id);
        for &other in &ch.members {
            out.push(Output::Send(other, ServerMsg::PeerGone { user_id }));
        }
        let name = ch.config.name.clone();
        // The one leaving sees its old channel update as promptly as those who stay.
        let mut prompt = ch.members.clone();
        prompt.push(id);
        out.push(Output::Broadcast {
            msg: ServerMsg::MemberLeft {
                channel: name.clone(),
                user_id,
            },
            prompt,
        });
        Some(name)
    }

    fn endpoints_changed(&mut self, id: SessionId, out: &mut Vec<Output>) {
        let Some(index) = self.sessions.get(&id).and_then(|s| s.channel) else {
            return;
        };
        let Some(peer) = self.peer_info(id) else {
            return;
        };
        for &other in &self.channels[index].members {
            if other != id {
                out.push(Output::Send(
                    other,
                    ServerMsg::PeerEndpoints { peer: peer.clone() },
                ));
            }
        }
    }

    /// A UDP `Register{token}` datagram arrived from `from`. Returns the session it belongs to,
    /// or `None` (unknown token: the shell drops and counts it).
    pub fn udp_register(
        &mut self,
        _now: Duration,
        token: u64,
        from: SocketAddr,
        out: &mut Vec<Output>,
    ) -> Option<SessionId> {
        let id = *self.tokens.get(&token)?;
        let session = self.sessions.get_mut(&id)?;
        if session.public_endpoint != Some(from) {
            session.public_endpoint = Some(from);
            self.endpoints_changed(id, out);
        }
        Some(id)
    }

    /// Drops sessions that went silent or never identified, and forgets old failures.
    pub fn tick(&mut self, now: Duration, out: &mut Vec<Output>) {
        let window = self.rules.wrong_password_window;
        self.wrong_by_ip
            .retain(|_, q| q.back().is_some_and(|t| now.saturating_sub(*t) <= window));
        for (&id, s) in &self.sessions {
            let silent = now.saturating_sub(s.last_seen);
            if silent > self.rules.heartbeat_timeout {
                out.push(Output::Close(
                    id,
                    format!("no heartbeat for {} s", silent.as_secs()),
                ));
            } else if !matches!(s.phase, Phase::Identified { .. })
                && now.saturating_sub(s.opened_at) > self.rules.identify_timeout
            {
                out.push(Output::Close(id, "did not identify in time".to_string()));
            }
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
mod tests {
    use super::*;
    use crate::config::hash_password;

    const S: Duration = Duration::from_secs(1);

    fn channels() -> Vec<ChannelConfig> {
        vec![
            ChannelConfig {
                name: "Lobby".into(),
                password_hash: None,
                max_members: 16,
            },
            ChannelConfig {
                name: "Duo".into(),
                password_hash: None,
                max_members: 2,
            },
            ChannelConfig {
                name: "Private".into(),
                password_hash: Some(hash_password("letmein").unwrap()),
                max_members: 4,
            },
        ]
    }

    struct World {
        state: ServerState,
        out: Vec<Output>,
        now: Duration,
    }

    impl World {
        fn new() -> Self {
            Self {
                state: ServerState::new(channels(), ServerRules::default()),
                out: Vec::new(),
                now: Duration::ZERO,
            }
        }

        fn send(&mut self, id: SessionId, msg: ClientMsg) -> Vec<Output> {
            self.out.clear();
            self.state.handle(self.now, id, msg, &mut self.out);
            // Run password checks synchronously, as the shell's worker would.
            let mut i = 0;
            while i < self.out.len() {
                if let Output::VerifyPassword {
                    session,
                    ticket,
                    hash,
                    password,
                } = self.out[i].clone()
                {
                    let ok = crate::config::verify_password(&hash, &password);
                    let mut more = Vec::new();
                    self.state
                        .password_checked(self.now, session, ticket, ok, &mut more);
                    self.out.extend(more);
                }
                i += 1;
            }
            std::mem::take(&mut self.out)
        }

        fn connect(&mut self, id: SessionId) -> Vec<Output> {
            self.state.session_opened(self.now, id, 1000 + id);
            self.send(
                id,
                ClientMsg::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    app_version: "t".into(),
                },
            )
        }

        fn login(&mut self, id: SessionId, name: &str) -> Vec<Output> {
            self.connect(id);
            self.send(
                id,
                ClientMsg::Identify {
                    username: name.into(),
                },
            )
        }

        fn join(&mut self, id: SessionId, channel: &str, pw: Option<&str>) -> Vec<Output> {
            self.send(
                id,
                ClientMsg::Join {
                    channel: channel.into(),
                    password: pw.map(str::to_string),
                },
            )
        }
    }

    fn join_status(out: &[Output], id: SessionId) -> Option<Status> {
        out.iter().find_map(|o| match o {
            Output::Send(to, ServerMsg::Joined { status, .. }) if *to == id => Some(*status),
            _ => None,
        })
    }

    fn identify_status(out: &[Output]) -> Option<Status> {
        out.iter().find_map(|o| match o {
            Output::Send(_, ServerMsg::Identified { status, .. }) => Some(*status),
            _ => None,
        })
    }

    #[test]
    fn hello_gets_welcome_with_the_session_token() {
        let mut w = World::new();
        let out = w.connect(1);
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send(
                1,
                ServerMsg::Welcome {
                    udp_token: 1001,
                    protocol_version: PROTOCOL_VERSION,
                    ..
                }
            )
        )));
    }

    #[test]
    fn version_mismatch_is_refused_and_closed_with_a_reason() {
        let mut w = World::new();
        w.state.session_opened(w.now, 1, 5);
        let out = w.send(
            1,
            ClientMsg::Hello {
                protocol_version: 99,
                app_version: "x".into(),
            },
        );
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send(
                1,
                ServerMsg::Error {
                    status: Status::VersionMismatch,
                    ..
                }
            )
        )));
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Close(1, r) if r.contains("protocol 2"))));
    }

    #[test]
    fn anything_before_hello_closes_the_connection() {
        let mut w = World::new();
        w.state.session_opened(w.now, 1, 5);
        let out = w.send(
            1,
            ClientMsg::Identify {
                username: "a".into(),
            },
        );
        assert!(matches!(out[..], [Output::Close(1, _)]));
    }

    #[test]
    fn identify_sends_the_overview() {
        let mut w = World::new();
        let out = w.login(1, "alice");
        assert_eq!(identify_status(&out), Some(Status::Ok));
        let overview = out.iter().find_map(|o| match o {
            Output::Send(1, ServerMsg::Overview { channels }) => Some(channels.clone()),
            _ => None,
        });
        let channels = overview.expect("overview sent");
        assert_eq!(channels.len(), 3);
        assert!(channels[2].has_password);
        assert!(!channels[0].has_password);
    }

    #[test]
    fn taken_name_is_refused_case_insensitively() {
        let mut w = World::new();
        w.login(1, "alice");
        let out = w.login(2, "Alice");
        assert_eq!(identify_status(&out), Some(Status::NameTaken));
        // Once alice leaves, the name is free again.
        let mut out = Vec::new();
        w.state.session_closed(w.now, 1, &mut out);
        let out = w.send(
            2,
            ClientMsg::Identify {
                username: "Alice".into(),
            },
        );
        assert_eq!(identify_status(&out), Some(Status::Ok));
    }

    #[test]
    fn invalid_names_are_refused_with_the_reason() {
        let mut w = World::new();
        for bad in ["", " x", &"y".repeat(40), "a\u{0}b"] {
            let out = w.login(9, bad);
            assert_eq!(identify_status(&out), Some(Status::InvalidName), "{bad:?}");
            assert!(out.iter().any(|o| matches!(o,
                Output::Send(9, ServerMsg::Error { status: Status::InvalidName, message }) if message.contains("username"))));
            w.state.session_closed(w.now, 9, &mut Vec::new());
        }
    }

    #[test]
    fn second_identify_is_refused() {
        let mut w = World::new();
        w.login(1, "alice");
        let out = w.send(
            1,
            ClientMsg::Identify {
                username: "bob".into(),
            },
        );
        assert_eq!(identify_status(&out), Some(Status::AlreadyIdentified));
    }

    #[test]
    fn join_before_identify_is_refused() {
        let mut w = World::new();
        w.connect(1);
        let out = w.join(1, "Lobby", None);
        assert_eq!(join_status(&out, 1), Some(Status::NotIdentified));
    }

    #[test]
    fn join_notifies_everyone_and_introduces_peers() {
        let mut w = World::new();
        w.login(1, "alice");
        w.login(2, "bob");
        w.join(1, "Lobby", None);
        let out = w.join(2, "lobby", None);
        assert_eq!(join_status(&out, 2), Some(Status::Ok));
        assert!(out.iter().any(|o| matches!(o,
            Output::Broadcast { msg: ServerMsg::MemberJoined { channel, member }, .. } if channel == "Lobby" && member.username == "bob")));
        // Each side learns the other's endpoints.
        assert!(out.iter().any(|o| matches!(o,
            Output::Send(2, ServerMsg::PeerEndpoints { peer }) if peer.username == "alice")));
        assert!(out.iter().any(|o| matches!(o,
            Output::Send(1, ServerMsg::PeerEndpoints { peer }) if peer.username == "bob")));
        let overview = w.state.overview();
        assert_eq!(overview[0].members.len(), 2);
    }

    /// Presence news reaches everyone, but only the channel concerned needs it at once.
    #[test]
    fn presence_is_prompt_for_the_channel_concerned() {
        let mut w = World::new();
        w.login(1, "alice");
        w.login(2, "bob");
        w.login(3, "carol");
        w.join(1, "Lobby", None);
        w.join(3, "Gaming", None);
        let prompt_of = |out: &[Output]| -> Vec<SessionId> {
            out.iter()
                .find_map(|o| match o {
                    Output::Broadcast { prompt, .. } => Some(prompt.clone()),
                    _ => None,
                })
                .expect("a broadcast")
        };
        let mut joined = prompt_of(&w.join(2, "Lobby", None));
        joined.sort();
        assert_eq!(joined, vec![1, 2], "Lobby's members, the newcomer included");
        let mut left = prompt_of(&w.send(2, ClientMsg::Leave));
        left.sort();
        assert_eq!(left, vec![1, 2], "who stays, and the one leaving");
        let mut out = Vec::new();
        w.state.session_closed(w.now, 1, &mut out);
        assert_eq!(prompt_of(&out), vec![1]);
    }

    #[test]
    fn unknown_channel_is_refused() {
        let mut w = World::new();
        w.login(1, "alice");
        assert_eq!(
            join_status(&w.join(1, "Nope", None), 1),
            Some(Status::NoSuchChannel)
        );
    }

    #[test]
    fn full_channel_is_refused() {
        let mut w = World::new();
        for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
            w.login(id, name);
        }
        assert_eq!(join_status(&w.join(1, "Duo", None), 1), Some(Status::Ok));
        assert_eq!(join_status(&w.join(2, "Duo", None), 2), Some(Status::Ok));
        assert_eq!(
            join_status(&w.join(3, "Duo", None), 3),
            Some(Status::ChannelFull)
        );
    }

    #[test]
    fn wrong_password_is_refused_and_right_one_admits() {
        let mut w = World::new();
        w.login(1, "alice");
        assert_eq!(
            join_status(&w.join(1, "Private", Some("nope")), 1),
            Some(Status::WrongPassword)
        );
        assert_eq!(
            join_status(&w.join(1, "Private", None), 1),
            Some(Status::WrongPassword)
        );
        assert_eq!(
            join_status(&w.join(1, "Private", Some("letmein")), 1),
            Some(Status::Ok)
        );
    }

    #[test]
    fn wrong_passwords_are_rate_limited_per_session() {
        let mut w = World::new();
        w.login(1, "alice");
        for _ in 0..5 {
            assert_eq!(
                join_status(&w.join(1, "Private", Some("x")), 1),
                Some(Status::WrongPassword)
            );
        }
        assert_eq!(
            join_status(&w.join(1, "Private", Some("letmein")), 1),
            Some(Status::RateLimited)
        );
        w.now += 61 * S;
        assert_eq!(
            join_status(&w.join(1, "Private", Some("letmein")), 1),
            Some(Status::Ok)
        );
    }

    #[test]
    fn joining_the_same_channel_twice_is_refused() {
        let mut w = World::new();
        w.login(1, "alice");
        w.join(1, "Lobby", None);
        assert_eq!(
            join_status(&w.join(1, "Lobby", None), 1),
            Some(Status::AlreadyInChannel)
        );
    }

    #[test]
    fn switching_channel_leaves_the_old_one_first() {
        let mut w = World::new();
        w.login(1, "alice");
        w.join(1, "Lobby", None);
        let out = w.join(1, "Duo", None);
        let left = out
            .iter()
            .position(|o| matches!(o, Output::Broadcast { msg: ServerMsg::MemberLeft { channel, .. }, .. } if channel == "Lobby"));
        let joined = out
            .iter()
            .position(|o| matches!(o, Output::Broadcast { msg: ServerMsg::MemberJoined { channel, .. }, .. } if channel == "Duo"));
        assert!(left.unwrap() < joined.unwrap());
        assert!(w.state.overview()[0].members.is_empty());
    }

    #[test]
    fn leave_notifies_and_tells_peers_to_stop_sending() {
        let mut w = World::new();
        w.login(1, "alice");
        w.login(2, "bob");
        w.join(1, "Lobby", None);
        w.join(2, "Lobby", None);
        let out = w.send(2, ClientMsg::Leave);
        assert!(out.iter().any(|o| matches!(o,
            Output::Send(2, ServerMsg::Left { status: Status::Ok, channel: Some(c) }) if c == "Lobby")));
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Send(1, ServerMsg::PeerGone { .. }))));
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Broadcast {
                msg: ServerMsg::MemberLeft { .. },
                ..
            }
        )));
        let out = w.send(2, ClientMsg::Leave);
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send(
                2,
                ServerMsg::Left {
                    status: Status::NotInChannel,
                    ..
                }
            )
        )));
    }

    #[test]
    fn closed_session_leaves_its_channel() {
        let mut w = World::new();
        w.login(1, "alice");
        w.login(2, "bob");
        w.join(1, "Lobby", None);
        w.join(2, "Lobby", None);
        let mut out = Vec::new();
        w.state.session_closed(w.now, 2, &mut out);
        assert!(out.iter().any(|o| matches!(o,
            Output::Broadcast { msg: ServerMsg::MemberLeft { channel, .. }, .. } if channel == "Lobby")));
        assert_eq!(w.state.overview()[0].members.len(), 1);
        assert_eq!(w.state.session_count(), 1);
    }

    #[test]
    fn silent_sessions_time_out_and_heartbeats_keep_them() {
        let mut w = World::new();
        w.login(1, "alice");
        w.login(2, "bob");
        for _ in 0..20 {
            w.now += S;
            w.send(1, ClientMsg::Heartbeat);
        }
        let mut out = Vec::new();
        w.state.tick(w.now, &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Output::Close(2, r) if r.contains("heartbeat")));
    }

    #[test]
    fn connections_that_never_identify_are_dropped() {
        let mut w = World::new();
        w.connect(1);
        for _ in 0..31 {
            w.now += S;
            w.send(1, ClientMsg::Heartbeat);
        }
        let mut out = Vec::new();
        w.state.tick(w.now, &mut out);
        assert!(matches!(&out[..], [Output::Close(1, r)] if r.contains("identify")));
    }

    #[test]
    fn udp_registration_publishes_the_public_endpoint_to_channel_members() {
        let mut w = World::new();
        w.login(1, "alice");
        w.login(2, "bob");
        w.join(1, "Lobby", None);
        w.join(2, "Lobby", None);
        let public: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut out = Vec::new();
        assert_eq!(w.state.udp_register(w.now, 1002, public, &mut out), Some(2));
        assert!(out.iter().any(|o| matches!(o,
            Output::Send(1, ServerMsg::PeerEndpoints { peer }) if peer.public == Some(public))));
        // Same address again: nothing to tell.
        out.clear();
        w.state.udp_register(w.now, 1002, public, &mut out);
        assert!(out.is_empty());
        assert_eq!(w.state.udp_register(w.now, 4242, public, &mut out), None);
    }

    #[test]
    fn announced_local_endpoints_reach_peers_and_are_capped() {
        let mut w = World::new();
        w.login(1, "alice");
        w.login(2, "bob");
        w.join(1, "Lobby", None);
        w.join(2, "Lobby", None);
        let many: Vec<SocketAddr> = (0..20)
            .map(|i| format!("10.0.0.{i}:5000").parse().unwrap())
            .collect();
        let out = w.send(
            2,
            ClientMsg::AnnounceEndpoints {
                local: many,
                voice_key: Some([7; 32]),
            },
        );
        let peer = out
            .iter()
            .find_map(|o| match o {
                Output::Send(1, ServerMsg::PeerEndpoints { peer }) => Some(peer.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(peer.local.len(), 8);
        assert_eq!(peer.voice_key, Some([7; 32]));
    }

    #[test]
    fn overview_never_contains_password_hashes() {
        let w = World::new();
        let text = format!("{:?}", w.state.overview());
        assert!(!text.contains("argon2"));
    }

    #[test]
    fn a_flooding_session_is_closed_and_normal_use_is_not() {
        let mut w = World::new();
        w.login(1, "alice");
        w.login(2, "bob");
        // Normal use: a heartbeat every 4 s and bursts of a few clicks never trip the limit.
        for _ in 0..100 {
            w.now += Duration::from_secs(4);
            let out = w.send(1, ClientMsg::Heartbeat);
            assert!(!out.iter().any(|o| matches!(o, Output::Close(..))));
        }
        // A flood within one instant is cut off after the burst.
        let mut closed_after = None;
        for i in 0..200 {
            let out = w.send(2, ClientMsg::Heartbeat);
            if out
                .iter()
                .any(|o| matches!(o, Output::Close(2, r) if r.contains("too many")))
            {
                closed_after = Some(i);
                break;
            }
        }
        assert!(
            closed_after.is_some_and(|n| (55..=62).contains(&n)),
            "{closed_after:?}"
        );
    }

    #[test]
    fn wrong_passwords_are_rate_limited_per_ip_across_reconnects() {
        let mut w = World::new();
        let ip: std::net::IpAddr = "203.0.113.5".parse().unwrap();
        for round in 0..4u64 {
            let id = 10 + round;
            w.login(id, &format!("guess{round}"));
            w.state.set_session_ip(id, ip);
            for _ in 0..5 {
                assert_eq!(
                    join_status(&w.join(id, "Private", Some("x")), id),
                    Some(Status::WrongPassword)
                );
            }
            w.state.session_closed(w.now, id, &mut Vec::new());
        }
        // A fresh connection from the same address is still limited...
        w.login(20, "fresh");
        w.state.set_session_ip(20, ip);
        assert_eq!(
            join_status(&w.join(20, "Private", Some("letmein")), 20),
            Some(Status::RateLimited)
        );
        // ...but another address is not.
        w.login(21, "other");
        w.state.set_session_ip(21, "198.51.100.1".parse().unwrap());
        assert_eq!(
            join_status(&w.join(21, "Private", Some("letmein")), 21),
            Some(Status::Ok)
        );
    }

    #[test]
    fn a_big_overview_is_sent_in_parts_that_each_fit_a_frame() {
        let mut big = channels();
        big[0].max_members = 5_000;
        let mut w = World {
            state: ServerState::new(big, ServerRules::default()),
            out: Vec::new(),
            now: Duration::ZERO,
        };
        for i in 0..1_000u64 {
            // 32-character names of 4-byte characters: the largest a member can be.
            w.login(100 + i, &format!("{:\u{1F600}<28}{i:04}", ""));
            w.join(100 + i, "Lobby", None);
        }
        let out = w.login(1, "late");
        let mut members = 0;
        let mut parts = 0;
        for o in &out {
            match o {
                Output::Send(1, msg @ ServerMsg::Overview { .. }) => {
                    assert!(crate::protocol::encode_frame(msg).is_ok());
                }
                Output::Send(1, msg @ ServerMsg::OverviewMembers { members: m, .. }) => {
                    let frame = crate::protocol::encode_frame(msg).expect("part fits a frame");
                    // ...and a client can decode it (the decoder's allocation bound is not hit).
                    let mut dec = crate::protocol::FrameDecoder::new();
                    dec.push(&frame);
                    assert!(matches!(dec.next::<ServerMsg>(), Ok(Some(_))));
                    members += m.len();
                    parts += 1;
                }
                _ => {}
            }
        }
        assert_eq!(members, 1_000);
        assert!(parts >= 3);
    }
}
