//! `ControlSession`: the client's side of the control protocol as a pure state machine.
//!
//! It owns no socket and reads no clock. The shell tells it when the transport connected,
//! failed or closed and hands it each server message with the current time; it answers with
//! [`Action`]s (open the transport, send a message, close) and [`SessionEvent`]s for the app.
//! Reconnection with exponential backoff and rejoining the previous channel live here, so they
//! are tested with a simulated clock.
//!
//! The calling contract is the one every pure core follows: `handle_*` feeds it (user intents,
//! transport news, [`ControlSession::handle_message`]), [`ControlSession::handle_timeout`]
//! fires its timers, `poll_action` / `poll_event` drain what it wants done, and
//! [`ControlSession::poll_timeout`] says when to call `handle_timeout` next.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

pub use crate::identity::gate::PeerIdentityStatus;
use crate::identity::gate::{IdentityGate, IdentityNews};
use crate::identity::trust::PeerTrust;
use crate::identity::{IdentityKey, IDENTITY_KEY_LEN};
use crate::protocol::{
    ChannelInfo, ClientMsg, MemberInfo, Password, PeerInfo, ServerMsg, Status, UserId, APP_VERSION,
    PROTOCOL_VERSION,
};

/// Interval between heartbeats while connected.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(4);
/// A server silent this long is considered gone (it answers every heartbeat).
pub const SERVER_SILENCE_TIMEOUT: Duration = Duration::from_secs(12);
/// Giving up on a connect attempt that neither succeeds nor fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// A join the server answered "busy, retry" (`Status::ServerBusy`: it checks as many
/// passwords as it may) is sent again after this, doubling, at most [`BUSY_RETRIES`] times
/// before the refusal is reported.
const BUSY_RETRY_AFTER: Duration = Duration::from_millis(500);
const BUSY_RETRIES: u32 = 4;
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Where the session stands, for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not asked to connect, or disconnected on purpose.
    Idle,
    /// Transport being opened.
    Connecting,
    /// Hello sent, waiting for Welcome.
    Handshake,
    /// Identify sent.
    Identifying,
    /// Identified; may or may not be in a channel.
    Ready,
    /// Lost the server; next attempt at `retry_at`.
    Reconnecting {
        retry_at: Duration,
        reason: DisconnectReason,
    },
    /// Refused for a reason retrying will not fix (version mismatch, name taken on first try).
    Failed(DisconnectReason),
}

/// Why the control transport failed or closed, as the shell's transport reports it. A type
/// rather than a sentence so that code decides on the variant (is it final? is the address
/// wrong?) and people read the `Display`, which is the text the client has always shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Nothing to connect to.
    #[error("server address is empty")]
    EmptyAddress,
    /// The host name does not resolve.
    #[error("cannot resolve {server}: {detail}")]
    Unresolvable { server: String, detail: String },
    /// The name resolved to no address at all.
    #[error("{server} has no address")]
    NoAddress { server: String },
    /// The resolver thread went away without answering.
    #[error("name resolution failed")]
    ResolverGone,
    /// Nothing listens on that port.
    #[error("no server at {target} (connection refused)")]
    Refused { target: String },
    /// Connecting failed for another reason (unreachable network, timeout from the OS, ...).
    #[error("cannot connect to {target}: {detail}")]
    ConnectFailed { target: String, detail: String },
    /// The TLS client could not be set up for this server name.
    #[error("TLS setup failed: {0}")]
    TlsSetup(String),
    /// The TLS layer rejected what the server sent (handshake or record).
    #[error("TLS error with the server: {0}")]
    Tls(String),
    /// The handshake finished without a certificate to check against the pin.
    #[error("the server presented no certificate")]
    NoCertificate,
    /// The server's certificate is not the one pinned for this address.
    #[error(
        "the server's certificate changed (pinned {}…, now {}…): this may be an impersonation. \
         If the server was reinstalled on purpose, reconnect with --accept-new-cert or remove it \
         from {pin_store}",
        fingerprint_prefix(.pinned),
        fingerprint_prefix(.presented)
    )]
    CertificateChanged {
        pinned: String,
        presented: String,
        /// Where the pin lives, for the user to edit.
        pin_store: String,
    },
    /// First connection to this server, and the user wants to check its certificate before
    /// trusting it (the desktop app asks, showing `presented`).
    #[error(
        "first connection to this server: check its certificate fingerprint {} with its \
         operator (the server prints it at start) before you trust it",
        fingerprint_prefix(.presented)
    )]
    NotYetTrusted { presented: String },
    /// The file of pinned server certificates is corrupt or unreadable, so no server's
    /// identity can be checked.
    #[error(
        "cannot check the server's certificate: {path} is unreadable ({reason}); \
         fix or remove that file"
    )]
    PinStoreUnreadable { path: String, reason: String },
    /// The socket took no bytes.
    #[error("connection to server lost")]
    LostOnWrite,
    /// Reading or writing the socket failed.
    #[error("connection to server lost: {0}")]
    Lost(String),
    /// The server closed the TCP or TLS stream without a `Closing` message.
    #[error("server closed the connection")]
    Closed,
    /// A frame from the server did not decode.
    #[error("bad data from server: {0}")]
    BadData(String),
}

/// The first bytes of a certificate fingerprint ("ab:cd:…"), enough to compare by eye.
fn fingerprint_prefix(fp: &str) -> &str {
    fp.get(..fp.len().min(23)).unwrap_or(fp)
}

impl TransportError {
    /// Whether retrying cannot help: the server's identity does not check out, and connecting
    /// again would only ask the user to trust it without being asked.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TransportError::NoCertificate
                | TransportError::NotYetTrusted { .. }
                | TransportError::CertificateChanged { .. }
                | TransportError::PinStoreUnreadable { .. }
        )
    }
}

/// Why the session lost or gave up its server, carried by [`SessionEvent::Disconnected`] and
/// [`Phase`]. The UI and the headless runner decide on the variant; the `Display` is the text
/// a person reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DisconnectReason {
    /// The transport failed or closed.
    #[error(transparent)]
    Transport(TransportError),
    /// Neither connected nor failed within [`CONNECT_TIMEOUT`].
    #[error("connection attempt timed out")]
    ConnectTimeout,
    /// Nothing heard for [`SERVER_SILENCE_TIMEOUT`].
    #[error("server stopped answering")]
    ServerSilent,
    /// The server said `Closing` with this reason.
    #[error("server closed the connection: {0}")]
    ClosedByServer(String),
    /// After a drop the server still has our old session under our name; retried.
    #[error("the server still holds our previous session")]
    PreviousSessionHeld,
    /// The server's `Welcome` names another protocol version.
    #[error(
        "server speaks protocol {server}, this app speaks {PROTOCOL_VERSION}: update one of them"
    )]
    VersionMismatch { server: u32 },
    /// The server refused our `Hello`'s version, in its own words.
    #[error("{0}")]
    VersionRefused(String),
    /// The server refused our username (taken on the first try, or invalid).
    #[error("{username:?}: {status}")]
    IdentifyRefused { username: String, status: Status },
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    OpenTransport { server: String },
    Send(ClientMsg),
    CloseTransport,
}

/// What happened, for the ECS mirror, the voice plane and the UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Welcome {
        udp_token: u64,
        /// Whether the server relays sealed datagrams for members that cannot reach each other.
        relay: bool,
    },
    Identified {
        user_id: UserId,
        username: String,
    },
    /// Full picture (after identification and after each reconnect).
    Overview {
        channels: Vec<ChannelInfo>,
    },
    Joined {
        channel: String,
    },
    JoinRefused {
        channel: String,
        status: Status,
    },
    Left {
        channel: String,
    },
    MemberJoined {
        channel: String,
        member: MemberInfo,
    },
    MemberLeft {
        channel: String,
        user_id: UserId,
    },
    /// A peer's endpoints, with its voice key only if its identity checked out (see
    /// [`SessionEvent::PeerIdentity`]); otherwise `voice_key` is `None`.
    PeerEndpoints(PeerInfo),
    PeerGone {
        user_id: UserId,
    },
    /// What we made of a peer's identity, whenever that changes (first check, a changed or
    /// refused key, a verified mark set or cleared, a new identity accepted).
    PeerIdentity {
        user_id: UserId,
        username: String,
        status: PeerIdentityStatus,
    },
    /// The connection is gone; a new attempt follows after `retry_in` unless `None`.
    Disconnected {
        reason: DisconnectReason,
        retry_in: Option<Duration>,
    },
    /// A refusal or problem to show the user.
    Error {
        status: Option<Status>,
        message: String,
    },
}

/// The client's control-plane state machine. See the module docs.
#[derive(Debug)]
pub struct ControlSession {
    phase: Phase,
    server: String,
    username: String,
    user_id: Option<UserId>,
    /// The channel we are in (server's spelling).
    channel: Option<String>,
    /// Channel (and password) to be in after a reconnect, or requested and not yet answered.
    wanted_channel: Option<(String, Option<Password>)>,
    /// When the wanted channel's join is sent again after a "busy, retry"...
    busy_retry: Option<Duration>,
    /// ...and how many times it was, since the user asked.
    busy_retries: u32,
    channels: Vec<ChannelInfo>,
    peers: HashMap<UserId, PeerInfo>,
    /// Peers from before a lost connection, still talking to us directly.
    stale_peers: HashMap<UserId, PeerInfo>,
    local_endpoints: Vec<std::net::SocketAddr>,
    voice_key: Option<[u8; 32]>,
    attempts: u32,
    ever_identified: bool,
    phase_since: Duration,
    last_sent: Duration,
    last_heard: Duration,
    actions: VecDeque<Action>,
    events: VecDeque<SessionEvent>,
    /// Datagrams the server tunnelled to us (relayed voice while our UDP is blocked), for
    /// the voice plane. Kept apart from `events`: they are data, ~50 a second, not news.
    tunnelled: VecDeque<Vec<u8>>,
    /// Our identity, and what we made of our peers' (see [`IdentityGate`]).
    identity: IdentityGate,
}

/// Most tunnelled datagrams kept for a voice plane that is not draining (2 s of voice from
/// a few peers); beyond it the oldest are dropped, as late voice is worthless.
const MAX_TUNNELLED_QUEUE: usize = 256;

impl Default for ControlSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlSession {
    pub fn new() -> Self {
        Self {
            phase: Phase::Idle,
            server: String::new(),
            username: String::new(),
            user_id: None,
            channel: None,
            wanted_channel: None,
            busy_retry: None,
            busy_retries: 0,
            channels: Vec::new(),
            peers: HashMap::new(),
            stale_peers: HashMap::new(),
            local_endpoints: Vec::new(),
            voice_key: None,
            attempts: 0,
            ever_identified: false,
            phase_since: Duration::ZERO,
            last_sent: Duration::ZERO,
            last_heard: Duration::ZERO,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            tunnelled: VecDeque::new(),
            identity: IdentityGate::new(),
        }
    }

    /// Our identity key (from the config directory; see `identity::store`).
    pub fn set_identity(&mut self, identity: IdentityKey) {
        self.identity.set_identity(identity);
    }

    /// Our identity's public key, if we have one.
    pub fn identity_public(&self) -> Option<[u8; IDENTITY_KEY_LEN]> {
        self.identity.identity_public()
    }

    /// The remembered identities (loaded by the shell from the trust file).
    pub fn set_trust(&mut self, trust: PeerTrust) {
        self.identity.set_trust(trust);
    }

    /// The remembered identities, if they changed since the last call: the shell saves them.
    pub fn trust_to_save(&mut self) -> Option<&PeerTrust> {
        self.identity.trust_to_save()
    }

    /// The certificate fingerprint of the server the transport just connected to: our voice
    /// key signatures are bound to it, and peers' are checked against it. Call before
    /// [`Self::transport_connected`].
    pub fn set_server_binding(&mut self, fingerprint: &str) {
        self.identity.set_server_binding(fingerprint);
    }

    /// What we made of peer `user_id`'s identity.
    pub fn peer_identity(&self, user_id: UserId) -> Option<&PeerIdentityStatus> {
        self.identity.status(user_id)
    }

    /// The safety number of us and peer `user_id` (see [`IdentityGate::safety_number`]).
    pub fn safety_number(&self, user_id: UserId) -> Option<String> {
        self.identity.safety_number(user_id)
    }

    /// The user accepts the changed identity of peer `user_id`: it is remembered, unverified,
    /// and its voice key passed on. False if that peer's identity had not changed.
    pub fn accept_identity(&mut self, _now: Duration, user_id: UserId) -> bool {
        let Some(peer) = self.identity.accept(user_id) else {
            return false;
        };
        self.take_identity_news();
        self.peers.insert(peer.user_id, peer.clone());
        self.events.push_back(SessionEvent::PeerEndpoints(peer));
        true
    }

    /// Marks peer `user_id`'s current identity verified (or not); see
    /// [`IdentityGate::set_verified`].
    pub fn set_verified(&mut self, user_id: UserId, verified: bool) -> bool {
        let done = self.identity.set_verified(user_id, verified);
        self.take_identity_news();
        done
    }

    /// The identity gate's news, as session events.
    fn take_identity_news(&mut self) {
        while let Some(IdentityNews {
            user_id,
            username,
            status,
        }) = self.identity.poll_news()
        {
            self.events.push_back(SessionEvent::PeerIdentity {
                user_id,
                username,
                status,
            });
        }
    }

    /// A peer's endpoints, through the identity gate (its voice key only if it checks out).
    fn handle_peer_endpoints(&mut self, peer: PeerInfo) {
        let peer = self.identity.admit(peer);
        self.take_identity_news();
        self.peers.insert(peer.user_id, peer.clone());
        self.events.push_back(SessionEvent::PeerEndpoints(peer));
    }

    /// Our endpoint announcement, the voice key signed for this server, our name and id.
    fn announcement(&self) -> ClientMsg {
        let voice_key_proof = match (self.voice_key, self.user_id) {
            (Some(key), Some(user_id)) => self.identity.sign(&self.username, user_id, &key),
            _ => None,
        };
        ClientMsg::AnnounceEndpoints {
            local: self.local_endpoints.clone(),
            voice_key: self.voice_key,
            voice_key_proof,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }
    pub fn user_id(&self) -> Option<UserId> {
        self.user_id
    }
    pub fn username(&self) -> &str {
        &self.username
    }
    pub fn server(&self) -> &str {
        &self.server
    }
    pub fn channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }
    pub fn channels(&self) -> &[ChannelInfo] {
        &self.channels
    }
    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers.values()
    }
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// The next datagram the server tunnelled to us, to hand to the voice engine as if it
    /// had come from the server's UDP address.
    pub fn poll_tunnelled(&mut self) -> Option<Vec<u8>> {
        self.tunnelled.pop_front()
    }

    /// Sends a datagram for the server's UDP port through this connection instead (the voice
    /// plane found UDP blocked). Dropped unless we are identified: the server would refuse it.
    pub fn send_tunnel(&mut self, now: Duration, datagram: Vec<u8>) {
        if self.phase == Phase::Ready {
            self.send(now, ClientMsg::Tunnel { datagram });
        }
    }

    fn set_phase(&mut self, now: Duration, phase: Phase) {
        self.phase = phase;
        self.phase_since = now;
    }

    fn send(&mut self, now: Duration, msg: ClientMsg) {
        self.last_sent = now;
        self.actions.push_back(Action::Send(msg));
    }

    /// User intent: connect to `server` ("host:port") as `username`.
    pub fn connect(&mut self, now: Duration, server: &str, username: &str) {
        if !matches!(
            self.phase,
            Phase::Idle | Phase::Failed(_) | Phase::Reconnecting { .. }
        ) {
            self.actions.push_back(Action::CloseTransport);
        }
        // A new connection starts a new call: the voice plane must stop talking to the peers
        // of this one (the new server may even hand out the same user ids to other people).
        self.clear_membership();
        self.server = server.to_string();
        self.identity
            .set_trust_server(crate::protocol::server_key(&self.server));
        self.username = username.to_string();
        self.attempts = 0;
        self.ever_identified = false;
        self.channel = None;
        self.wanted_channel = None;
        self.open(now);
    }

    fn open(&mut self, now: Duration) {
        self.set_phase(now, Phase::Connecting);
        self.actions.push_back(Action::OpenTransport {
            server: self.server.clone(),
        });
    }

    /// User intent: join `channel` (leaving the current one).
    pub fn join(&mut self, now: Duration, channel: &str, password: Option<Password>) {
        self.wanted_channel = Some((channel.to_string(), password.clone()));
        self.busy_retry = None;
        self.busy_retries = 0;
        if self.phase == Phase::Ready {
            self.send(
                now,
                ClientMsg::Join {
                    channel: channel.to_string(),
                    password,
                },
            );
        }
    }

    /// User intent: leave the current channel, stay connected.
    pub fn leave(&mut self, now: Duration) {
        self.wanted_channel = None;
        if self.phase == Phase::Ready && self.channel.is_some() {
            self.send(now, ClientMsg::Leave);
        }
    }

    /// User intent: hang up completely (no reconnect).
    pub fn disconnect(&mut self, now: Duration) {
        if matches!(
            self.phase,
            Phase::Handshake | Phase::Identifying | Phase::Ready
        ) {
            self.send(now, ClientMsg::Disconnect);
        }
        self.actions.push_back(Action::CloseTransport);
        self.clear_membership();
        self.wanted_channel = None;
        self.set_phase(now, Phase::Idle);
    }

    /// Our local UDP addresses and voice public key, announced to the server (now and after
    /// every reconnect).
    pub fn set_local_endpoints(
        &mut self,
        now: Duration,
        local: Vec<std::net::SocketAddr>,
        voice_key: Option<[u8; 32]>,
    ) {
        self.local_endpoints = local;
        self.voice_key = voice_key;
        if self.phase == Phase::Ready {
            let msg = self.announcement();
            self.send(now, msg);
        }
    }

    /// Transport is up: say Hello.
    pub fn transport_connected(&mut self, now: Duration) {
        if self.phase != Phase::Connecting {
            return;
        }
        self.last_heard = now;
        self.set_phase(now, Phase::Handshake);
        self.send(
            now,
            ClientMsg::Hello {
                protocol_version: PROTOCOL_VERSION,
                app_version: APP_VERSION.to_string(),
            },
        );
    }

    /// The transport refused the server for a reason retrying will not fix (its certificate
    /// changed): give up and tell the user.
    pub fn transport_refused(&mut self, now: Duration, reason: TransportError) {
        if matches!(self.phase, Phase::Idle | Phase::Failed(_)) {
            return;
        }
        self.fail(now, None, DisconnectReason::Transport(reason));
    }

    /// Transport failed to open or broke.
    pub fn transport_lost(&mut self, now: Duration, reason: TransportError) {
        self.lose(now, DisconnectReason::Transport(reason));
    }

    /// The server is gone for `reason`: keep the call, schedule a reconnect.
    fn lose(&mut self, now: Duration, reason: DisconnectReason) {
        match self.phase {
            Phase::Idle | Phase::Failed(_) | Phase::Reconnecting { .. } => return,
            _ => {}
        }
        self.actions.push_back(Action::CloseTransport);
        if self.channel.is_some() {
            let ch = self.channel.clone().unwrap_or_default();
            if self.wanted_channel.is_none() {
                self.wanted_channel = Some((ch, None));
            }
        }
        // Voice never needed the server: keep the peers so the call goes on while we
        // reconnect. Only our channel is forgotten until the rejoin; the peers learned before
        // are retired once the server has introduced us again (see `Identified`).
        self.channel = None;
        self.stale_peers.extend(self.peers.drain());
        self.schedule_retry(now, reason);
    }

    fn clear_membership(&mut self) {
        if let Some(ch) = self.channel.take() {
            self.events.push_back(SessionEvent::Left { channel: ch });
        }
        self.peers.extend(self.stale_peers.drain());
        for id in self.peers.keys().copied().collect::<Vec<_>>() {
            self.events
                .push_back(SessionEvent::PeerGone { user_id: id });
        }
        self.peers.clear();
        self.identity.forget_all();
    }

    fn schedule_retry(&mut self, now: Duration, reason: DisconnectReason) {
        let exp = self.attempts.min(5);
        self.attempts += 1;
        let delay = (BACKOFF_MIN * 2u32.pow(exp)).min(BACKOFF_MAX);
        self.events.push_back(SessionEvent::Disconnected {
            reason: reason.clone(),
            retry_in: Some(delay),
        });
        self.set_phase(
            now,
            Phase::Reconnecting {
                retry_at: now + delay,
                reason,
            },
        );
    }

    fn fail(&mut self, now: Duration, status: Option<Status>, reason: DisconnectReason) {
        self.actions.push_back(Action::CloseTransport);
        self.clear_membership();
        self.events.push_back(SessionEvent::Error {
            status,
            message: reason.to_string(),
        });
        self.events.push_back(SessionEvent::Disconnected {
            reason: reason.clone(),
            retry_in: None,
        });
        self.set_phase(now, Phase::Failed(reason));
    }

    /// Time passes: heartbeats, timeouts, reconnect attempts. Does nothing before
    /// [`Self::poll_timeout`], so a shell calls it only once that is due.
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.phase.clone() {
            Phase::Connecting if now.saturating_sub(self.phase_since) > CONNECT_TIMEOUT => {
                self.lose(now, DisconnectReason::ConnectTimeout);
            }
            Phase::Handshake | Phase::Identifying | Phase::Ready => {
                if now.saturating_sub(self.last_heard) > SERVER_SILENCE_TIMEOUT {
                    self.lose(now, DisconnectReason::ServerSilent);
                } else if now.saturating_sub(self.last_sent) >= HEARTBEAT_INTERVAL {
                    self.send(now, ClientMsg::Heartbeat);
                }
                self.retry_busy_join(now);
            }
            Phase::Reconnecting { retry_at, .. } if now >= retry_at => self.open(now),
            _ => {}
        }
    }

    /// When [`Self::handle_timeout`] next may have something to do (never later than that;
    /// a timer with a strict deadline fires on the first call after it).
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.phase {
            Phase::Connecting => Some(self.phase_since + CONNECT_TIMEOUT),
            Phase::Handshake | Phase::Identifying | Phase::Ready => {
                let due = (self.last_sent + HEARTBEAT_INTERVAL)
                    .min(self.last_heard + SERVER_SILENCE_TIMEOUT);
                Some(self.busy_retry.map_or(due, |at| due.min(at)))
            }
            Phase::Reconnecting { retry_at, .. } => Some(*retry_at),
            _ => None,
        }
    }

    /// Sends the wanted channel's join again once a "busy, retry" has waited long enough.
    fn retry_busy_join(&mut self, now: Duration) {
        if self.phase != Phase::Ready || self.busy_retry.is_none_or(|at| now < at) {
            return;
        }
        self.busy_retry = None;
        if let Some((channel, password)) = self.wanted_channel.clone() {
            self.send(now, ClientMsg::Join { channel, password });
        }
    }

    /// One message from the server.
    pub fn handle_message(&mut self, now: Duration, msg: ServerMsg) {
        self.last_heard = now;
        match msg {
            ServerMsg::Welcome {
                protocol_version,
                udp_token,
                relay,
                ..
            } => {
                if self.phase != Phase::Handshake {
                    return;
                }
                if protocol_version != PROTOCOL_VERSION {
                    self.fail(
                        now,
                        Some(Status::VersionMismatch),
                        DisconnectReason::VersionMismatch {
                            server: protocol_version,
                        },
                    );
                    return;
                }
                self.events
                    .push_back(SessionEvent::Welcome { udp_token, relay });
                self.set_phase(now, Phase::Identifying);
                let username = self.username.clone();
                self.send(now, ClientMsg::Identify { username });
            }
            ServerMsg::Identified {
                status,
                user_id,
                username,
            } => {
                if self.phase != Phase::Identifying {
                    return;
                }
                match (status, user_id) {
                    (Status::Ok, Some(id)) => {
                        // Introduced again: the server will announce the channel's members
                        // anew (with new ids); retire the ones from the previous session.
                        for (old, _) in std::mem::take(&mut self.stale_peers) {
                            self.identity.forget(old);
                            self.events
                                .push_back(SessionEvent::PeerGone { user_id: old });
                        }
                        self.user_id = Some(id);
                        self.username = username.clone();
                        self.attempts = 0;
                        self.ever_identified = true;
                        self.set_phase(now, Phase::Ready);
                        self.events.push_back(SessionEvent::Identified {
                            user_id: id,
                            username,
                        });
                        if !self.local_endpoints.is_empty() || self.voice_key.is_some() {
                            let msg = self.announcement();
                            self.send(now, msg);
                        }
                        if let Some((ch, pw)) = self.wanted_channel.clone() {
                            // This join replaces any retry still waiting.
                            self.busy_retry = None;
                            self.send(
                                now,
                                ClientMsg::Join {
                                    channel: ch,
                                    password: pw,
                                },
                            );
                        }
                    }
                    // After a network drop the server may still hold our old session for a
                    // few seconds: keep retrying instead of giving up.
                    (Status::NameTaken, _) if self.ever_identified => {
                        self.actions.push_back(Action::CloseTransport);
                        self.schedule_retry(now, DisconnectReason::PreviousSessionHeld);
                    }
                    (status, _) => {
                        self.fail(
                            now,
                            Some(status),
                            DisconnectReason::IdentifyRefused { username, status },
                        );
                    }
                }
            }
            ServerMsg::Overview { channels } => {
                self.channels = channels.clone();
                self.events.push_back(SessionEvent::Overview { channels });
            }
            ServerMsg::OverviewMembers { channel, members } => {
                if let Some(ch) = self.channels.iter_mut().find(|c| c.name == channel) {
                    for m in members {
                        if !ch.members.iter().any(|x| x.user_id == m.user_id) {
                            ch.members.push(m);
                        }
                    }
                    self.events.push_back(SessionEvent::Overview {
                        channels: self.channels.clone(),
                    });
                }
            }
            ServerMsg::Joined { status, channel } => {
                if status == Status::Ok {
                    if let Some(old) = self.channel.replace(channel.clone()) {
                        if old != channel {
                            self.events.push_back(SessionEvent::Left { channel: old });
                        }
                    }
                    if let Some((want, pw)) = self.wanted_channel.take() {
                        self.wanted_channel = Some((
                            if want.eq_ignore_ascii_case(&channel) {
                                channel.clone()
                            } else {
                                want
                            },
                            pw,
                        ));
                    }
                    self.events.push_back(SessionEvent::Joined { channel });
                } else if status == Status::PasswordCheckPending {
                    // A repeated request while the first one's password is being checked:
                    // nothing changed, that one's answer follows.
                } else if status == Status::ServerBusy
                    && self.busy_retries < BUSY_RETRIES
                    && self
                        .wanted_channel
                        .as_ref()
                        .is_some_and(|(w, _)| w.eq_ignore_ascii_case(&channel))
                {
                    // Nothing was refused for good: ask again in a moment, unseen.
                    let wait = BUSY_RETRY_AFTER * 2u32.pow(self.busy_retries);
                    self.busy_retries += 1;
                    self.busy_retry = Some(now + wait);
                } else {
                    // "Busy, retry" refuses nothing for good: the channel stays the one to
                    // rejoin. Any other refusal makes our current channel the target again.
                    if status != Status::ServerBusy
                        && self
                            .wanted_channel
                            .as_ref()
                            .is_some_and(|(w, _)| w.eq_ignore_ascii_case(&channel))
                    {
                        self.wanted_channel = self.channel.clone().map(|c| (c, None));
                    }
                    self.events.push_back(SessionEvent::Error {
                        status: Some(status),
                        message: format!("cannot join {channel}: {}", status.message()),
                    });
                    self.events
                        .push_back(SessionEvent::JoinRefused { channel, status });
                }
            }
            ServerMsg::Left { status, channel } => {
                if status == Status::Ok {
                    self.clear_membership();
                    if let Some(c) = channel {
                        // clear_membership already reported our channel; report the server's
                        // spelling only if we did not know we were in one.
                        if !self
                            .events
                            .iter()
                            .any(|e| matches!(e, SessionEvent::Left { .. }))
                        {
                            self.events.push_back(SessionEvent::Left { channel: c });
                        }
                    }
                }
            }
            ServerMsg::MemberJoined { channel, member } => {
                for ch in &mut self.channels {
                    ch.members.retain(|m| m.user_id != member.user_id);
                    if ch.name == channel {
                        ch.members.push(member.clone());
                    }
                }
                self.events
                    .push_back(SessionEvent::MemberJoined { channel, member });
            }
            ServerMsg::MemberLeft { channel, user_id } => {
                for ch in &mut self.channels {
                    if ch.name == channel {
                        ch.members.retain(|m| m.user_id != user_id);
                    }
                }
                self.events
                    .push_back(SessionEvent::MemberLeft { channel, user_id });
            }
            ServerMsg::PeerEndpoints { peer } => {
                if Some(peer.user_id) == self.user_id {
                    return;
                }
                self.handle_peer_endpoints(peer);
            }
            ServerMsg::PeerGone { user_id } => {
                self.identity.forget(user_id);
                if self.peers.remove(&user_id).is_some() {
                    self.events.push_back(SessionEvent::PeerGone { user_id });
                }
            }
            ServerMsg::HeartbeatAck => {}
            ServerMsg::Tunnel { datagram } => {
                if self.tunnelled.len() >= MAX_TUNNELLED_QUEUE {
                    self.tunnelled.pop_front();
                }
                self.tunnelled.push_back(datagram);
            }
            ServerMsg::Error { status, message } => {
                if status == Status::VersionMismatch {
                    self.fail(now, Some(status), DisconnectReason::VersionRefused(message));
                } else if !matches!(status, Status::NameTaken | Status::InvalidName) {
                    // Identify refusals are reported through `Identified`; avoid doubling them.
                    self.events.push_back(SessionEvent::Error {
                        status: Some(status),
                        message,
                    });
                }
            }
            ServerMsg::Closing { reason } => {
                if matches!(self.phase, Phase::Failed(_)) {
                    return;
                }
                self.lose(now, DisconnectReason::ClosedByServer(reason));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ChannelInfo;

    const MS: Duration = Duration::from_millis(1);

    fn ready(s: &mut ControlSession, now: Duration, id: UserId) {
        s.transport_connected(now);
        s.handle_message(
            now,
            ServerMsg::Welcome {
                protocol_version: PROTOCOL_VERSION,
                app_version: "t".into(),
                udp_token: 1,
                heartbeat_timeout_ms: 15_000,
                relay: false,
            },
        );
        s.handle_message(
            now,
            ServerMsg::Identified {
                status: Status::Ok,
                user_id: Some(id),
                username: "me".into(),
            },
        );
        s.handle_message(
            now,
            ServerMsg::Overview {
                channels: Vec::<ChannelInfo>::new(),
            },
        );
    }

    fn drain_actions(s: &mut ControlSession) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn drain_events(s: &mut ControlSession) -> Vec<SessionEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    /// Tunnelled datagrams go out only once we are identified, come in apart from the
    /// session's news, and a voice plane that stops draining keeps only the newest.
    #[test]
    fn tunnelled_datagrams_pass_both_ways_and_a_stalled_reader_keeps_the_newest() {
        let mut s = ControlSession::new();
        s.connect(MS, "127.0.0.1:7700", "me");
        s.send_tunnel(MS, vec![1]);
        assert!(!drain_actions(&mut s)
            .iter()
            .any(|a| matches!(a, Action::Send(ClientMsg::Tunnel { .. }))));
        ready(&mut s, MS, 1);
        drain_actions(&mut s);
        drain_events(&mut s);
        s.send_tunnel(MS, vec![2, 3]);
        assert_eq!(
            drain_actions(&mut s),
            vec![Action::Send(ClientMsg::Tunnel {
                datagram: vec![2, 3]
            })]
        );
        for i in 0..(MAX_TUNNELLED_QUEUE + 10) {
            s.handle_message(
                MS,
                ServerMsg::Tunnel {
                    datagram: (i as u32).to_le_bytes().to_vec(),
                },
            );
        }
        assert!(
            drain_events(&mut s).is_empty(),
            "tunnelled data is not news"
        );
        let got: Vec<Vec<u8>> = std::iter::from_fn(|| s.poll_tunnelled()).collect();
        assert_eq!(got.len(), MAX_TUNNELLED_QUEUE);
        assert_eq!(got[0], 10u32.to_le_bytes().to_vec());
    }

    fn peer(id: UserId) -> PeerInfo {
        PeerInfo {
            user_id: id,
            username: format!("p{id}"),
            local: vec![],
            public: None,
            voice_key: None,
            voice_key_proof: None,
        }
    }

    #[test]
    fn connect_handshake_identify_and_join() {
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        assert!(matches!(
            drain_actions(&mut s)[..],
            [Action::OpenTransport { .. }]
        ));
        s.join(Duration::ZERO, "Lobby", None);
        ready(&mut s, MS, 7);
        let sent: Vec<ClientMsg> = drain_actions(&mut s)
            .into_iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(m),
                _ => None,
            })
            .collect();
        assert!(matches!(sent[0], ClientMsg::Hello { .. }));
        assert!(matches!(sent[1], ClientMsg::Identify { .. }));
        assert!(matches!(&sent[2], ClientMsg::Join { channel, .. } if channel == "Lobby"));
        assert!(s.is_ready());
    }

    /// Found by the whole-system simulation: connecting again mid-call kept the old peers, so
    /// the voice plane went on punching and sealing towards them.
    #[test]
    fn connecting_again_mid_call_ends_the_call() {
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        s.join(Duration::ZERO, "Lobby", None);
        ready(&mut s, MS, 7);
        s.handle_message(
            MS,
            ServerMsg::Joined {
                status: Status::Ok,
                channel: "Lobby".into(),
            },
        );
        s.handle_message(MS, ServerMsg::PeerEndpoints { peer: peer(9) });
        drain_events(&mut s);
        s.connect(Duration::from_secs(1), "h:1", "me");
        let events = drain_events(&mut s);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, SessionEvent::Left { channel } if channel == "Lobby")),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, SessionEvent::PeerGone { user_id: 9 })),
            "{events:?}"
        );
        assert_eq!(s.peers().count(), 0);
    }

    #[test]
    fn losing_the_server_keeps_peers_then_reconnects_with_backoff_and_rejoins() {
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        s.join(Duration::ZERO, "Private", Some("pw".into()));
        ready(&mut s, MS, 7);
        s.handle_message(
            MS,
            ServerMsg::Joined {
                status: Status::Ok,
                channel: "Private".into(),
            },
        );
        s.handle_message(MS, ServerMsg::PeerEndpoints { peer: peer(9) });
        drain_events(&mut s);
        drain_actions(&mut s);

        s.transport_lost(
            Duration::from_secs(1),
            TransportError::Lost("connection reset".into()),
        );
        let events = drain_events(&mut s);
        // The call goes on: no PeerGone while the server is away.
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, SessionEvent::PeerGone { .. })),
            "{events:?}"
        );
        assert!(events.iter().any(|e| matches!(
            e,
            SessionEvent::Disconnected {
                retry_in: Some(_),
                ..
            }
        )));
        // Backoff: nothing before the retry time, then a new attempt.
        s.handle_timeout(Duration::from_millis(1_400));
        assert!(!drain_actions(&mut s)
            .iter()
            .any(|a| matches!(a, Action::OpenTransport { .. })));
        s.handle_timeout(Duration::from_millis(1_600));
        assert!(drain_actions(&mut s)
            .iter()
            .any(|a| matches!(a, Action::OpenTransport { .. })));
        // Introduced again: the old peer is retired and the channel rejoined with its password.
        ready(&mut s, Duration::from_secs(2), 12);
        let events = drain_events(&mut s);
        assert!(events
            .iter()
            .any(|e| matches!(e, SessionEvent::PeerGone { user_id: 9 })));
        let rejoin = drain_actions(&mut s).into_iter().any(|a| {
            matches!(a, Action::Send(ClientMsg::Join { channel, password: Some(p) }) if channel == "Private" && p.as_str() == "pw")
        });
        assert!(rejoin);
    }

    /// Issue 13: a second Join while the first one's password was checked came back as
    /// `RateLimited`, and the client then made its old channel the one to rejoin.
    #[test]
    fn a_pending_or_busy_password_check_keeps_the_channel_to_rejoin() {
        for status in [Status::PasswordCheckPending, Status::ServerBusy] {
            let mut s = ControlSession::new();
            s.connect(Duration::ZERO, "h:1", "me");
            s.join(Duration::ZERO, "Lobby", None);
            ready(&mut s, MS, 7);
            s.handle_message(
                MS,
                ServerMsg::Joined {
                    status: Status::Ok,
                    channel: "Lobby".into(),
                },
            );
            s.join(MS, "Private", Some("pw".into()));
            s.handle_message(
                MS,
                ServerMsg::Joined {
                    status,
                    channel: "Private".into(),
                },
            );
            let events = drain_events(&mut s);
            assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, SessionEvent::JoinRefused { .. })),
                "{status:?}: {events:?}"
            );
            drain_actions(&mut s);
            s.transport_lost(
                Duration::from_secs(1),
                TransportError::Lost("connection reset".into()),
            );
            s.handle_timeout(Duration::from_secs(2));
            ready(&mut s, Duration::from_secs(2), 12);
            let joins: Vec<String> = drain_actions(&mut s)
                .into_iter()
                .filter_map(|a| match a {
                    Action::Send(ClientMsg::Join { channel, .. }) => Some(channel),
                    _ => None,
                })
                .collect();
            assert_eq!(joins, ["Private"], "{status:?}");
            // The retry that was waiting does not send a second join.
            s.handle_timeout(Duration::from_secs(3));
            assert!(!drain_actions(&mut s)
                .iter()
                .any(|a| matches!(a, Action::Send(ClientMsg::Join { .. }))));
        }
    }

    /// "Busy, retry" is retried, after 0.5 s doubling, and reported only when it persists.
    #[test]
    fn a_busy_server_is_asked_again_then_the_refusal_is_reported() {
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        ready(&mut s, MS, 7);
        s.join(MS, "Private", Some("pw".into()));
        drain_actions(&mut s);
        drain_events(&mut s);
        let busy = |s: &mut ControlSession, now: Duration| {
            s.handle_message(
                now,
                ServerMsg::Joined {
                    status: Status::ServerBusy,
                    channel: "Private".into(),
                },
            );
        };
        let joined_again = |s: &mut ControlSession| {
            drain_actions(s).into_iter().any(|a| {
                matches!(a, Action::Send(ClientMsg::Join { channel, password: Some(p) }) if channel == "Private" && p.as_str() == "pw")
            })
        };
        let mut now = MS;
        for wait_ms in [500, 1000, 2000, 4000] {
            busy(&mut s, now);
            assert!(drain_events(&mut s).is_empty());
            let due = now + Duration::from_millis(wait_ms);
            assert_eq!(s.poll_timeout(), Some(due));
            s.handle_timeout(due - MS);
            assert!(!joined_again(&mut s), "too early");
            s.handle_timeout(due);
            assert!(joined_again(&mut s), "retry after {wait_ms} ms");
            now = due;
        }
        busy(&mut s, now);
        let events = drain_events(&mut s);
        assert!(
            events.iter().any(|e| matches!(
                e,
                SessionEvent::JoinRefused {
                    status: Status::ServerBusy,
                    ..
                }
            )),
            "{events:?}"
        );
    }

    #[test]
    fn a_silent_server_is_declared_lost() {
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        ready(&mut s, MS, 1);
        drain_events(&mut s);
        s.handle_timeout(Duration::from_secs(13));
        assert!(matches!(s.phase(), Phase::Reconnecting { .. }));
        assert!(drain_events(&mut s).iter().any(|e| matches!(
            e,
            SessionEvent::Disconnected {
                reason: DisconnectReason::ServerSilent,
                ..
            }
        )));
    }

    #[test]
    fn heartbeats_go_out_while_idle() {
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        ready(&mut s, MS, 1);
        drain_actions(&mut s);
        s.handle_message(Duration::from_secs(3), ServerMsg::HeartbeatAck);
        s.handle_timeout(Duration::from_secs(5));
        assert!(drain_actions(&mut s).contains(&Action::Send(ClientMsg::Heartbeat)));
    }

    #[test]
    fn a_taken_name_on_first_connect_is_final_but_after_a_reconnect_is_retried() {
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        s.transport_connected(MS);
        s.handle_message(
            MS,
            ServerMsg::Welcome {
                protocol_version: PROTOCOL_VERSION,
                app_version: "t".into(),
                udp_token: 1,
                heartbeat_timeout_ms: 1,
                relay: false,
            },
        );
        s.handle_message(
            MS,
            ServerMsg::Identified {
                status: Status::NameTaken,
                user_id: None,
                username: "me".into(),
            },
        );
        assert!(matches!(s.phase(), Phase::Failed(_)));

        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        ready(&mut s, MS, 1);
        s.transport_lost(Duration::from_secs(1), TransportError::Lost("reset".into()));
        s.handle_timeout(Duration::from_secs(2));
        s.transport_connected(Duration::from_secs(2));
        s.handle_message(
            Duration::from_secs(2),
            ServerMsg::Welcome {
                protocol_version: PROTOCOL_VERSION,
                app_version: "t".into(),
                udp_token: 1,
                heartbeat_timeout_ms: 1,
                relay: false,
            },
        );
        s.handle_message(
            Duration::from_secs(2),
            ServerMsg::Identified {
                status: Status::NameTaken,
                user_id: None,
                username: "me".into(),
            },
        );
        assert!(matches!(s.phase(), Phase::Reconnecting { .. }));
    }

    /// People read these in the status bar, the connect form and the headless client's
    /// stderr and JSON; typing the reasons must not change a word of them.
    #[test]
    fn reasons_read_as_they_always_have() {
        let cases: Vec<(DisconnectReason, &str)> = vec![
            (
                DisconnectReason::ConnectTimeout,
                "connection attempt timed out",
            ),
            (DisconnectReason::ServerSilent, "server stopped answering"),
            (
                DisconnectReason::ClosedByServer("idle".into()),
                "server closed the connection: idle",
            ),
            (
                DisconnectReason::PreviousSessionHeld,
                "the server still holds our previous session",
            ),
            (
                DisconnectReason::VersionMismatch { server: 9 },
                "server speaks protocol 9, this app speaks 6: update one of them",
            ),
            (
                DisconnectReason::VersionRefused("as said".into()),
                "as said",
            ),
            (
                DisconnectReason::IdentifyRefused {
                    username: "bob".into(),
                    status: Status::NameTaken,
                },
                "\"bob\": username is already taken",
            ),
        ];
        let transport: Vec<(TransportError, &str)> = vec![
            (TransportError::EmptyAddress, "server address is empty"),
            (
                TransportError::Unresolvable {
                    server: "nowhere".into(),
                    detail: "no such host".into(),
                },
                "cannot resolve nowhere: no such host",
            ),
            (
                TransportError::NoAddress { server: "h".into() },
                "h has no address",
            ),
            (TransportError::ResolverGone, "name resolution failed"),
            (
                TransportError::Refused {
                    target: "10.0.0.1:7700".into(),
                },
                "no server at 10.0.0.1:7700 (connection refused)",
            ),
            (
                TransportError::ConnectFailed {
                    target: "10.0.0.1:7700".into(),
                    detail: "unreachable".into(),
                },
                "cannot connect to 10.0.0.1:7700: unreachable",
            ),
            (TransportError::TlsSetup("x".into()), "TLS setup failed: x"),
            (
                TransportError::Tls("x".into()),
                "TLS error with the server: x",
            ),
            (
                TransportError::NoCertificate,
                "the server presented no certificate",
            ),
            (
                TransportError::CertificateChanged {
                    pinned: "aa:".repeat(20),
                    presented: "bb".into(),
                    pin_store: "/pins.toml".into(),
                },
                "the server's certificate changed (pinned aa:aa:aa:aa:aa:aa:aa:aa…, now bb…): \
                 this may be an impersonation. If the server was reinstalled on purpose, \
                 reconnect with --accept-new-cert or remove it from /pins.toml",
            ),
            (TransportError::LostOnWrite, "connection to server lost"),
            (
                TransportError::Lost("reset".into()),
                "connection to server lost: reset",
            ),
            (TransportError::Closed, "server closed the connection"),
            (
                TransportError::BadData("x".into()),
                "bad data from server: x",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
        for (error, text) in transport {
            assert_eq!(error.to_string(), text);
            assert_eq!(DisconnectReason::Transport(error).to_string(), text);
        }
    }

    #[test]
    fn only_a_server_identity_that_does_not_check_out_is_final() {
        assert!(TransportError::NoCertificate.is_final());
        assert!(TransportError::CertificateChanged {
            pinned: "a".into(),
            presented: "b".into(),
            pin_store: "p".into(),
        }
        .is_final());
        assert!(!TransportError::Refused { target: "t".into() }.is_final());
        assert!(!TransportError::Closed.is_final());
    }

    #[test]
    fn a_changed_certificate_fails_the_session_without_retrying() {
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        let changed = TransportError::CertificateChanged {
            pinned: "a".into(),
            presented: "b".into(),
            pin_store: "p".into(),
        };
        s.transport_refused(MS, changed.clone());
        assert_eq!(
            s.phase(),
            &Phase::Failed(DisconnectReason::Transport(changed.clone()))
        );
        assert!(drain_events(&mut s).contains(&SessionEvent::Disconnected {
            reason: DisconnectReason::Transport(changed),
            retry_in: None,
        }));
        assert_eq!(s.poll_timeout(), None);
    }

    /// The shell calls `handle_timeout` only once `poll_timeout` is due; that must lose
    /// nothing: before the deadline a call changes nothing, and one call after it does the
    /// work (connect timeout, heartbeat, silence, backoff).
    #[test]
    fn timers_fire_only_once_poll_timeout_is_due() {
        fn quiet_until_due(s: &mut ControlSession) -> Duration {
            let due = s.poll_timeout().expect("a timer is armed");
            let phase = s.phase().clone();
            s.handle_timeout(due - MS);
            assert_eq!(s.phase(), &phase, "fired before {due:?}");
            assert!(drain_actions(s).is_empty(), "acted before {due:?}");
            assert!(drain_events(s).is_empty(), "reported before {due:?}");
            due
        }
        let mut s = ControlSession::new();
        s.connect(Duration::ZERO, "h:1", "me");
        drain_actions(&mut s);
        // Connecting: the connect timeout.
        let due = quiet_until_due(&mut s);
        s.handle_timeout(due + MS);
        assert!(matches!(
            s.phase(),
            Phase::Reconnecting {
                reason: DisconnectReason::ConnectTimeout,
                ..
            }
        ));
        drain_actions(&mut s);
        drain_events(&mut s);
        // Reconnecting: the backoff.
        let due = quiet_until_due(&mut s);
        s.handle_timeout(due);
        assert_eq!(s.phase(), &Phase::Connecting);
        // Ready: the heartbeat, then the silence timeout.
        ready(&mut s, due, 1);
        drain_actions(&mut s);
        drain_events(&mut s);
        let due = quiet_until_due(&mut s);
        s.handle_timeout(due);
        assert!(drain_actions(&mut s).contains(&Action::Send(ClientMsg::Heartbeat)));
        while !matches!(s.phase(), Phase::Reconnecting { .. }) {
            let due = quiet_until_due(&mut s);
            s.handle_timeout(due + MS);
            drain_actions(&mut s);
        }
        assert!(matches!(
            s.phase(),
            Phase::Reconnecting {
                reason: DisconnectReason::ServerSilent,
                ..
            }
        ));
    }

    // --- identities ---

    use crate::identity::trust::PeerTrust;
    use crate::identity::{
        sign_voice_key, verify_voice_key, IdentityError, IdentityKey, KeyBinding,
    };

    const SERVER_FP: &str = "AA:BB:CC";

    /// A session of "me" (user 1) on server "h:7700" with an identity, ready.
    fn with_identity() -> ControlSession {
        let mut s = ControlSession::new();
        s.set_identity(IdentityKey::from_secret_bytes([1; 32]));
        s.connect(Duration::ZERO, "h:7700", "me");
        s.set_server_binding(SERVER_FP);
        ready(&mut s, Duration::ZERO, 1);
        drain_actions(&mut s);
        drain_events(&mut s);
        s
    }

    /// Peer `id` ("alice") announcing `voice` signed by `identity` for this server.
    fn signed_peer(id: UserId, identity: &IdentityKey, voice: [u8; 32]) -> PeerInfo {
        let binding = KeyBinding {
            server: SERVER_FP,
            username: "alice",
            user_id: id,
        };
        PeerInfo {
            username: "alice".into(),
            voice_key: Some(voice),
            voice_key_proof: Some(sign_voice_key(identity, &binding, &voice)),
            ..peer(id)
        }
    }

    fn announce(s: &mut ControlSession, p: PeerInfo) -> Vec<SessionEvent> {
        s.handle_message(Duration::ZERO, ServerMsg::PeerEndpoints { peer: p });
        drain_events(s)
    }

    fn forwarded_key(events: &[SessionEvent]) -> Option<Option<[u8; 32]>> {
        events.iter().find_map(|e| match e {
            SessionEvent::PeerEndpoints(p) => Some(p.voice_key),
            _ => None,
        })
    }

    fn identity_news(events: &[SessionEvent]) -> Vec<PeerIdentityStatus> {
        events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::PeerIdentity { status, .. } => Some(status.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn our_voice_key_goes_out_signed_for_this_server_our_name_and_id() {
        let mut s = with_identity();
        s.set_local_endpoints(Duration::ZERO, vec![], Some([5; 32]));
        let sent = drain_actions(&mut s);
        let Some(Action::Send(ClientMsg::AnnounceEndpoints {
            voice_key: Some(key),
            voice_key_proof,
            ..
        })) = sent.last()
        else {
            panic!("{sent:?}");
        };
        let binding = KeyBinding {
            server: SERVER_FP,
            username: "me",
            user_id: 1,
        };
        assert_eq!(
            verify_voice_key(&binding, key, voice_key_proof.as_ref()),
            Ok(s.identity_public().unwrap())
        );
    }

    #[test]
    fn an_unsigned_or_badly_signed_voice_key_is_refused_and_never_forwarded() {
        let mut s = with_identity();
        let alice = IdentityKey::from_secret_bytes([2; 32]);
        let unsigned = PeerInfo {
            voice_key: Some([9; 32]),
            username: "alice".into(),
            ..peer(2)
        };
        let ev = announce(&mut s, unsigned);
        assert_eq!(forwarded_key(&ev), Some(None), "the key is stripped");
        assert!(matches!(
            identity_news(&ev)[..],
            [PeerIdentityStatus::Refused(
                IdentityError::MissingProof { .. }
            )]
        ));
        // A swapped key under Alice's genuine signature.
        let mut swapped = signed_peer(2, &alice, [9; 32]);
        swapped.voice_key = Some([8; 32]);
        let ev = announce(&mut s, swapped);
        assert_eq!(forwarded_key(&ev), Some(None));
        assert!(matches!(
            identity_news(&ev)[..],
            [PeerIdentityStatus::Refused(
                IdentityError::BadSignature { .. }
            )]
        ));
        // Signed for another server (a replay from elsewhere).
        let mut elsewhere = signed_peer(2, &alice, [9; 32]);
        s.set_server_binding("OTHER");
        let ev = announce(&mut s, elsewhere.clone());
        assert_eq!(forwarded_key(&ev), Some(None));
        s.set_server_binding(SERVER_FP);
        elsewhere.local = vec!["10.0.0.1:5".parse().unwrap()];
        let ev = announce(&mut s, elsewhere);
        assert_eq!(
            forwarded_key(&ev),
            Some(Some([9; 32])),
            "good once bound right"
        );
    }

    #[test]
    fn first_sight_is_trusted_and_remembered_and_a_changed_identity_is_held_until_accepted() {
        let mut s = with_identity();
        let alice = IdentityKey::from_secret_bytes([2; 32]);
        let ev = announce(&mut s, signed_peer(2, &alice, [9; 32]));
        assert_eq!(forwarded_key(&ev), Some(Some([9; 32])));
        assert_eq!(
            identity_news(&ev),
            vec![PeerIdentityStatus::Trusted {
                identity: alice.public_key(),
                first_seen: true,
                verified: false
            }]
        );
        assert!(s.trust_to_save().is_some(), "the shell must save it");
        // A new voice key under the same identity (she rejoined) is no news.
        let ev = announce(&mut s, signed_peer(2, &alice, [10; 32]));
        assert_eq!(forwarded_key(&ev), Some(Some([10; 32])));
        assert!(identity_news(&ev).is_empty());

        let mallory = IdentityKey::from_secret_bytes([3; 32]);
        let ev = announce(&mut s, signed_peer(2, &mallory, [11; 32]));
        assert_eq!(forwarded_key(&ev), Some(None), "held back");
        let changed = PeerIdentityStatus::Changed {
            previous: alice.public_key(),
            presented: mallory.public_key(),
        };
        assert_eq!(identity_news(&ev), vec![changed.clone()]);
        assert_eq!(s.peer_identity(2), Some(&changed));
        assert!(
            !s.set_verified(2, true),
            "a changed identity cannot be marked"
        );

        assert!(s.accept_identity(Duration::ZERO, 2));
        let ev = drain_events(&mut s);
        assert_eq!(forwarded_key(&ev), Some(Some([11; 32])));
        assert_eq!(
            identity_news(&ev),
            vec![PeerIdentityStatus::Trusted {
                identity: mallory.public_key(),
                first_seen: false,
                verified: false
            }]
        );
        assert!(
            !s.accept_identity(Duration::ZERO, 2),
            "nothing held any more"
        );
    }

    #[test]
    fn a_verified_mark_is_kept_in_the_trust_store_and_a_changed_key_does_not_inherit_it() {
        let mut s = with_identity();
        let alice = IdentityKey::from_secret_bytes([2; 32]);
        announce(&mut s, signed_peer(2, &alice, [9; 32]));
        assert!(s.set_verified(2, true));
        assert!(matches!(
            identity_news(&drain_events(&mut s))[..],
            [PeerIdentityStatus::Trusted { verified: true, .. }]
        ));
        let saved = s.trust_to_save().cloned().unwrap();
        assert!(saved.is_verified("h:7700", "alice", &alice.public_key()));

        // The next run, from the saved store.
        let mut next = with_identity();
        next.set_trust(saved);
        let ev = announce(&mut next, signed_peer(5, &alice, [12; 32]));
        assert!(matches!(
            identity_news(&ev)[..],
            [PeerIdentityStatus::Trusted {
                verified: true,
                first_seen: false,
                ..
            }]
        ));
        let mallory = IdentityKey::from_secret_bytes([3; 32]);
        announce(&mut next, signed_peer(5, &mallory, [13; 32]));
        assert!(next.accept_identity(Duration::ZERO, 5));
        assert!(matches!(
            next.peer_identity(5),
            Some(PeerIdentityStatus::Trusted {
                verified: false,
                ..
            })
        ));
    }

    #[test]
    fn an_unreadable_trust_store_refuses_every_peer() {
        let mut s = with_identity();
        s.set_trust(PeerTrust::unreadable(
            "known_peers.toml".into(),
            "bad".into(),
        ));
        let alice = IdentityKey::from_secret_bytes([2; 32]);
        let ev = announce(&mut s, signed_peer(2, &alice, [9; 32]));
        assert_eq!(forwarded_key(&ev), Some(None));
        assert!(matches!(
            identity_news(&ev)[..],
            [PeerIdentityStatus::Refused(
                IdentityError::TrustStoreUnreadable { .. }
            )]
        ));
    }

    #[test]
    fn both_sides_compute_one_safety_number_from_the_identity_keys() {
        let mut s = with_identity();
        let alice = IdentityKey::from_secret_bytes([2; 32]);
        announce(&mut s, signed_peer(2, &alice, [9; 32]));
        let ours = s.safety_number(2).unwrap();
        let theirs =
            crate::identity::safety_number(&alice.public_key(), &s.identity_public().unwrap());
        assert_eq!(ours, theirs);
        // Not from the voice keys: a new voice key leaves it as it is.
        announce(&mut s, signed_peer(2, &alice, [10; 32]));
        assert_eq!(s.safety_number(2), Some(ours));
        s.handle_message(Duration::ZERO, ServerMsg::PeerGone { user_id: 2 });
        assert_eq!(s.safety_number(2), None);
    }
}
