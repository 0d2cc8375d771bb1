//! Every call the simulation makes into the real cores: [`ServerState`], [`ControlSession`]
//! and [`VoiceEngine`]. Nothing else in `sim/` names them, so when their APIs change only this
//! file changes.
//!
//! It does what the real shells do and nothing more: [`SimServer`] is `server/plugin.rs`
//! without sockets (outputs applied, broadcasts fanned out, `Register` answered with
//! `RegisterAck`), and [`SimClient`] is `client/plugin.rs` + `voice/plugin.rs` +
//! `voice/thread.rs` without sockets, threads or devices (session events become engine calls
//! exactly as `forward_control_events` turns them into voice commands).

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::audio::CHUNK_SAMPLES;
use crate::client::session::{
    Action, ControlSession, PeerIdentityStatus, SessionEvent, TransportError,
};
use crate::config::ChannelConfig;
use crate::identity::IdentityKey;
use crate::protocol::{ClientMsg, ServerMsg, UserId};
use crate::server::{ConnectionAddrs, Output, RelayRules, ServerRules, ServerState, SessionId};
use crate::voice::engine::{
    PeerState, RelayVia, VoiceConfig, VoiceEngine, VoiceSetting, MAX_DATAGRAM_LEN,
};
use crate::voice::net::crypto::SessionKeys;

/// The server's name for one control connection (a new one for every connect).
pub type ConnId = SessionId;

/// Samples per playout call (10 ms at 48 kHz), as the voice thread tops up its ring.
pub const PLAYOUT_SAMPLES: usize = CHUNK_SAMPLES;

/// Largest datagram an engine writes.
pub const DATAGRAM_BUF: usize = MAX_DATAGRAM_LEN;

/// What the server wants done with its control connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOut {
    Send(ConnId, ServerMsg),
    /// Say `Closing{reason}` and drop the connection (the server has already forgotten it).
    Close(ConnId, String),
}

/// The metadata server: [`ServerState`] plus the bookkeeping its shell does.
#[derive(Debug)]
pub struct SimServer {
    state: ServerState,
    /// Open connections, in id order: broadcasts reach them in this fixed order.
    conns: BTreeSet<ConnId>,
}

impl SimServer {
    /// A fresh server (as after a restart: no sessions, ids start again) with open channels,
    /// relaying for members that cannot reach each other when `relay` is set.
    pub fn new(channels: &[&str], relay: bool) -> Self {
        let channels = channels
            .iter()
            .map(|name| ChannelConfig {
                name: name.to_string(),
                password_hash: None,
                max_members: 16,
            })
            .collect();
        Self {
            state: ServerState::new(
                channels,
                ServerRules {
                    relay: relay.then(RelayRules::default),
                    ..ServerRules::default()
                },
            ),
            conns: BTreeSet::new(),
        }
    }

    /// A client's connection arrived from `ip`.
    pub fn opened(&mut self, now: Duration, conn: ConnId, udp_token: u64, ip: IpAddr) {
        // Every simulated client dials the server's public address.
        let server_ip = super::SERVER_ADDR.ip();
        self.state
            .handle_connected(now, conn, ConnectionAddrs::new(ip, server_ip), udp_token);
        self.conns.insert(conn);
    }

    /// The client closed its connection.
    pub fn closed(&mut self, now: Duration, conn: ConnId) -> Vec<ServerOut> {
        self.conns.remove(&conn);
        self.state.handle_closed(now, conn);
        self.drain(now)
    }

    /// One control message from `conn`. Returns the datagrams it makes the server send (a
    /// tunnelled relay envelope goes out on UDP) and the outputs.
    pub fn handle(
        &mut self,
        now: Duration,
        conn: ConnId,
        msg: ClientMsg,
    ) -> (Vec<(SocketAddr, Vec<u8>)>, Vec<ServerOut>) {
        self.state.handle_message(now, conn, msg);
        (self.transmits(now), self.drain(now))
    }

    /// When the server's timers (heartbeats, identify deadline, batched news) are next due.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.state.poll_timeout()
    }

    /// Fires the server's timers that are due.
    pub fn handle_timeout(&mut self, now: Duration) -> Vec<ServerOut> {
        self.state.handle_timeout(now);
        self.drain(now)
    }

    /// One datagram on the server's UDP port: a `Register` is answered with the address it
    /// came from (`RegisterAck`). Returns the replies, each with its destination.
    pub fn udp(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
    ) -> (Vec<(SocketAddr, Vec<u8>)>, Vec<ServerOut>) {
        self.state.handle_datagram(now, from, bytes);
        (self.transmits(now), self.drain(now))
    }

    /// The datagrams the state has queued, each with its destination.
    fn transmits(&mut self, now: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        let mut out = Vec::new();
        while let Some(t) = self.state.poll_transmit(now, &mut buf) {
            out.push((t.to, buf[..t.len].to_vec()));
        }
        out
    }

    /// Carries out the state's outputs as the plugin does: broadcasts go to every identified
    /// connection, a close drops the connection (the state has already forgotten it), password
    /// checks fail at once (the simulation's channels have none).
    fn drain(&mut self, now: Duration) -> Vec<ServerOut> {
        let mut done = Vec::new();
        while let Some(output) = self.state.poll_output() {
            match output {
                Output::Send(id, msg) => {
                    if self.conns.contains(&id) {
                        done.push(ServerOut::Send(id, msg));
                    }
                }
                Output::Broadcast { msg, .. } => {
                    for &id in &self.conns {
                        if self.state.is_identified(id) {
                            done.push(ServerOut::Send(id, msg.clone()));
                        }
                    }
                }
                Output::Close(id, reason) => {
                    if self.conns.remove(&id) {
                        done.push(ServerOut::Close(id, reason.to_string()));
                    }
                }
                Output::VerifyPassword {
                    session, ticket, ..
                } => self
                    .state
                    .handle_password_checked(now, session, ticket, false),
            }
        }
        while self.state.poll_event().is_some() {}
        done
    }
}

/// What a client's control transport must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOut {
    Open,
    Send(ClientMsg),
    Close,
}

/// How one peer's link looks from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerPath {
    Punching,
    Direct,
    /// Through another member (its user id) or, with `None`, through the server.
    Relayed(Option<UserId>),
    Unreachable,
}

/// One datagram a client wants sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTransmit {
    pub to: SocketAddr,
    pub len: usize,
}

/// One user's app: the control session and the voice engine, wired as the plugins wire them.
pub struct SimClient {
    session: ControlSession,
    engine: VoiceEngine,
    /// The voice socket's address inside its site (announced as the local candidate).
    local: SocketAddr,
    /// The port its router mapped for it, announced after the local candidate (as the voice
    /// thread announces what the port-mapping thread got).
    mapped: Option<SocketAddr>,
    server: SocketAddr,
    username: String,
    /// Session events in the order they happened, for the trace.
    log: VecDeque<String>,
    /// The voice key last announced (the engine takes a new one per join; see
    /// `voice/thread.rs`, which announces it again).
    announced_key: Option<[u8; 32]>,
}

/// What the simulated clients bind voice-key signatures to, in place of the certificate
/// fingerprint a real server's TLS shows.
pub const SIM_SERVER_BINDING: &str = "sim-server";

impl SimClient {
    /// A client whose voice socket is bound at `local`, all randomness drawn from `seed`.
    ///
    /// Noise suppression is off (as for tone and file inputs in the real app) and the
    /// engine sends on push-to-talk: the voice-activity detector's noise floor follows a steady
    /// tone up by about 3 dB/s, so after a few seconds a pure tone would count as background
    /// noise and stop being sent. Push-to-talk held down sends whatever the input is, which is
    /// what a test of the network needs; [`SimClient::set_talking`] is the key.
    pub fn new(username: &str, local: SocketAddr, server: SocketAddr, seed: u64) -> Self {
        let mut cfg = VoiceConfig::default();
        cfg.capture.denoise = false;
        cfg.capture.processing = crate::voice::tx::ProcessingConfig::NONE;
        let mut engine = VoiceEngine::new(cfg, seed).expect("Opus encoder for 48 kHz mono");
        let mut secret = [0u8; 32];
        let mut s = seed;
        for chunk in secret.chunks_mut(8) {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            chunk.copy_from_slice(&s.to_le_bytes());
        }
        engine.set_keys(SessionKeys::from_secret_bytes(secret));
        // Later keys (one pair per join) from the same seed, so runs repeat.
        secret.reverse();
        engine.set_key_seed(secret);
        engine.apply(Duration::ZERO, VoiceSetting::PushToTalk(true));
        let mut session = ControlSession::new();
        secret[0] ^= 0x5a;
        session.set_identity(IdentityKey::from_secret_bytes(secret));
        // No TLS in the simulation: every client binds its signatures to the same name.
        session.set_server_binding(SIM_SERVER_BINDING);
        Self {
            session,
            announced_key: None,
            engine,
            local,
            mapped: None,
            server,
            username: username.to_string(),
            log: VecDeque::new(),
        }
    }

    /// The router mapped our port at `mapped` mid-call: announce our endpoints again with it,
    /// as the voice thread does when the mapping thread reports one.
    pub fn announce_mapped(&mut self, now: Duration, mapped: Option<SocketAddr>) {
        self.mapped = mapped;
        self.announce(now);
    }

    /// Our endpoints and current voice key, to the server.
    fn announce(&mut self, now: Duration) {
        let key = self.engine.public_key();
        self.announced_key = Some(key);
        let mut local = vec![self.local];
        local.extend(self.mapped);
        self.session.set_local_endpoints(now, local, Some(key));
    }

    /// Announces again if the engine took a new voice key, as the voice thread does.
    fn announce_new_key(&mut self, now: Duration) {
        if self
            .announced_key
            .is_some_and(|k| k != self.engine.public_key())
        {
            self.announce(now);
        }
    }

    /// The router mapped our port at `mapped`: announce it too.
    pub fn set_mapped(&mut self, mapped: Option<SocketAddr>) {
        self.mapped = mapped;
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    /// Samples per captured frame.
    pub fn frame_samples(&self) -> usize {
        self.engine.frame().samples()
    }

    /// Frame duration of capture.
    pub fn frame_duration(&self) -> Duration {
        Duration::from_micros(self.frame_samples() as u64 * 1_000_000 / 48_000)
    }

    // --- user intents ---

    pub fn connect(&mut self, now: Duration) {
        let server = self.server.to_string();
        self.session.connect(now, &server, &self.username.clone());
        self.forward_events(now);
    }

    pub fn join(&mut self, now: Duration, channel: &str) {
        self.session.join(now, channel, None);
        self.forward_events(now);
    }

    pub fn leave(&mut self, now: Duration) {
        self.session.leave(now);
        self.forward_events(now);
    }

    /// Holds or releases the push-to-talk key.
    pub fn set_talking(&mut self, now: Duration, talking: bool) {
        self.engine.apply(now, VoiceSetting::PttPressed(talking));
    }

    /// Sends a chat message to the channel; its wall-clock time is the simulated time.
    pub fn send_chat(
        &mut self,
        now: Duration,
        text: &str,
    ) -> Result<crate::voice::engine::ChatSent, crate::voice::net::chat::ChatError> {
        self.engine.send_chat(now, now.as_millis() as u64, text)
    }

    /// Chat messages delivered since the last call, in order.
    pub fn take_chat(&mut self) -> Vec<crate::voice::engine::ChatMessage> {
        std::iter::from_fn(|| self.engine.poll_chat_event())
            .filter_map(|ev| match ev {
                crate::voice::engine::ChatEvent::Received(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    // --- control transport news ---

    pub fn transport_connected(&mut self, now: Duration) {
        self.session.transport_connected(now);
        self.forward_events(now);
    }

    /// The connection broke or could not be opened (the server is down or restarted).
    pub fn transport_lost(&mut self, now: Duration, why: &str) {
        self.session
            .transport_lost(now, TransportError::Lost(why.to_string()));
        self.forward_events(now);
    }

    pub fn handle_message(&mut self, now: Duration, msg: ServerMsg) {
        self.session.handle_message(now, msg);
        self.forward_events(now);
        // Datagrams the server tunnelled to us, as `voice/plugin.rs` forwards them.
        while let Some(datagram) = self.session.poll_tunnelled() {
            self.engine.handle_tunnelled(now, &datagram);
        }
    }

    /// The next thing the control transport must do.
    pub fn poll_control(&mut self) -> Option<ControlOut> {
        Some(match self.session.poll_action()? {
            Action::OpenTransport { .. } => ControlOut::Open,
            Action::Send(msg) => ControlOut::Send(msg),
            Action::CloseTransport => ControlOut::Close,
        })
    }

    /// Session events become engine calls, as `voice/plugin.rs` forwards them (and the voice
    /// thread answers `SetServer` with our local endpoints and key).
    fn forward_events(&mut self, now: Duration) {
        while let Some(ev) = self.session.poll_event() {
            self.log.push_back(format!("{ev:?}"));
            match ev {
                SessionEvent::Welcome { udp_token, relay } => {
                    self.engine.set_server(now, self.server, udp_token);
                    self.engine.set_server_relays(relay);
                    self.announce(now);
                }
                SessionEvent::Identified { user_id, .. } => {
                    self.engine.set_self_id(user_id);
                    self.announce_new_key(now);
                }
                SessionEvent::PeerEndpoints(peer) => self.engine.upsert_peer(now, &peer),
                SessionEvent::PeerGone { user_id } => self.engine.remove_peer(user_id),
                SessionEvent::Left { .. } | SessionEvent::Disconnected { retry_in: None, .. } => {
                    self.engine.clear_peers();
                    self.announce_new_key(now);
                }
                _ => {}
            }
        }
    }

    /// Session events so far, oldest first (drained).
    pub fn take_log(&mut self) -> Vec<String> {
        self.log.drain(..).collect()
    }

    // --- voice plane ---

    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        self.engine.handle_datagram(now, from, bytes);
    }

    pub fn capture(&mut self, now: Duration, pcm: &[f32]) {
        self.engine.handle_capture(now, pcm);
    }

    /// Fills `out` ([`PLAYOUT_SAMPLES`]) with what the user hears.
    pub fn playout(&mut self, now: Duration, out: &mut [f32]) {
        self.engine.playout_frame(now, out);
    }

    /// Fires whichever of the session's and the engine's timers are due.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
            self.forward_events(now);
        }
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
    }

    /// The earliest timer of either core.
    pub fn poll_timeout(&self) -> Option<Duration> {
        [self.session.poll_timeout(), self.engine.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next datagram to send, written into `buf` ([`DATAGRAM_BUF`] bytes).
    /// Datagrams for the server that the engine tunnels go to the control session here, as
    /// the voice thread and `voice/plugin.rs` pass them on.
    pub fn poll_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Option<ClientTransmit> {
        let Some(t) = self.engine.poll_transmit(now, buf) else {
            while let Some(datagram) = self.engine.poll_tunnel() {
                self.session.send_tunnel(now, datagram);
            }
            return None;
        };
        Some(ClientTransmit {
            to: t.to,
            len: t.len,
        })
    }

    // --- what the user sees ---

    /// What our control session made of peer `id`'s identity.
    pub fn peer_identity(&self, id: UserId) -> Option<PeerIdentityStatus> {
        self.session.peer_identity(id).cloned()
    }

    /// The safety number of us and peer `id`.
    pub fn safety_number(&self, id: UserId) -> Option<String> {
        self.session.safety_number(id)
    }

    /// Our identity's public key.
    pub fn identity_public(&self) -> Option<[u8; 32]> {
        self.session.identity_public()
    }

    /// The user accepts peer `id`'s changed identity.
    pub fn accept_identity(&mut self, now: Duration, id: UserId) -> bool {
        let accepted = self.session.accept_identity(now, id);
        self.forward_events(now);
        accepted
    }

    /// Voice keys our engine refused because a peer had used them before.
    pub fn reused_keys_refused(&self) -> u64 {
        self.engine.reused_keys_refused()
    }

    /// Our id as the control session knows it.
    pub fn user_id(&self) -> Option<UserId> {
        self.session.user_id()
    }

    /// Our id as the voice engine uses it (must follow the session's).
    pub fn voice_self_id(&self, now: Duration) -> Option<UserId> {
        self.engine.snapshot(now).self_id
    }

    pub fn channel(&self) -> Option<&str> {
        self.session.channel()
    }

    pub fn is_ready(&self) -> bool {
        self.session.is_ready()
    }

    /// Our public address as the server saw it.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.engine.public_addr()
    }

    /// Every peer the voice engine knows, with its link state, by id.
    /// The loss peer `id` last reported of our voice (its Report), in per cent.
    pub fn reported_loss(&self, now: Duration, id: UserId) -> Option<f32> {
        self.engine
            .snapshot(now)
            .peers
            .iter()
            .find(|p| p.user_id == id)
            .and_then(|p| p.reported_loss_pct)
    }

    pub fn peer_paths(&self, now: Duration) -> Vec<(UserId, PeerPath)> {
        let mut v: Vec<_> = self
            .engine
            .snapshot(now)
            .peers
            .iter()
            .map(|p| {
                let path = match &p.state {
                    PeerState::Punching => PeerPath::Punching,
                    PeerState::Direct(_) => PeerPath::Direct,
                    PeerState::Relayed(RelayVia::Member { user_id, .. }) => {
                        PeerPath::Relayed(Some(*user_id))
                    }
                    PeerState::Relayed(RelayVia::Server) => PeerPath::Relayed(None),
                    PeerState::Unreachable(_) => PeerPath::Unreachable,
                };
                (p.user_id, path)
            })
            .collect();
        v.sort();
        v
    }

    /// Voice frames we sent (counted once per frame, whatever the number of peers).
    pub fn frames_sent(&self, now: Duration) -> u64 {
        self.engine.snapshot(now).frames_sent
    }

    /// Datagrams that failed authentication or had no key.
    pub fn undecryptable(&self, now: Duration) -> u64 {
        self.engine.snapshot(now).undecryptable
    }

    /// `RelayTo` datagrams this client refused to forward for others (over a pair's budget,
    /// mostly).
    pub fn relay_refused(&self, now: Duration) -> u64 {
        self.engine.snapshot(now).drops.relay_refused
    }
}
