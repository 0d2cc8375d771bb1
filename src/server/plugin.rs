//! `ServerPlugin`: the Bevy shell around [`ServerState`]. It only moves bytes: each tick it
//! accepts connections, reads the sockets that mio reports ready (non-blocking, zero-timeout
//! poll), feeds what arrived to the rules (`handle_*`), fires their timers when
//! `poll_timeout` is due, and carries out what they queue (`poll_output`, `poll_transmit`,
//! `poll_event`). The decisions live in pure modules: [`super::limits`] (connections open per
//! prefix), [`super::connect_rate`] (new connections per second per prefix),
//! [`super::handshakes`] (TLS handshakes in progress), [`super::slow_clients`],
//! [`super::close_timing`], [`super::fanout`]; password hashes are checked by
//! [`super::password_pool`] so argon2 never stalls the tick.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bevy::prelude::*;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use rand::RngCore;

use super::close_timing::{after_flush, AfterFlush, SweepClock};
use super::components::*;
use super::conn::Conn;
use super::connect_rate::ConnectRate;
use super::fanout::{Batches, BATCH_CHUNK};
use super::handshakes::HandshakeLimit;
use super::limits::{AdmitError, ConnectionLimit};
use super::password_pool::{PasswordJob, PasswordPool, PASSWORD_WORKERS};
use super::prefix::PrefixWidths;
use super::slow_clients;
use super::state::{ConnectionAddrs, Output, ServerEvent, ServerRules, ServerState, SessionId};
use crate::config::{ChannelConfig, ServerLimits};
use crate::protocol::addr;
use crate::protocol::datagram::MAX_DATAGRAM_LEN;
use crate::protocol::{encode_frame, ClientMsg, ServerMsg};
use crate::tls::ServerIdentity;

pub use super::limits::DEFAULT_MAX_CONNECTIONS_PER_IP;

const LISTENER: Token = Token(usize::MAX);

/// How the server is started.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: IpAddr,
    /// 0 picks a free port (tests); TCP and UDP always share the number.
    pub port: u16,
    pub channels: Vec<ChannelConfig>,
    pub rules: ServerRules,
    /// Print one JSON line with the bound address on stdout (for scripts and tests).
    pub announce_json: bool,
    /// Where the TLS identity is kept; `None` makes a throwaway one for this run.
    pub data_dir: Option<std::path::PathBuf>,
    /// What one client (an address prefix) may take of the server: connections open, new
    /// connections per second, TLS handshakes in progress (the password limits travel in
    /// `rules`). Connections over a limit are closed on accept.
    pub limits: ServerLimits,
}

/// Counters for logs, benches and the host UI.
#[derive(Resource, Debug, Default, Clone)]
pub struct ServerStats {
    pub local_addr: Option<SocketAddr>,
    pub sessions: usize,
    pub accepted: u64,
    pub closed: u64,
    pub messages_in: u64,
    pub frames_out: u64,
    pub udp_registered: u64,
    pub udp_dropped: u64,
    /// Sealed peer datagrams forwarded (relaying on) and their bytes.
    pub relayed_datagrams: u64,
    pub relayed_bytes: u64,
    /// Tunnelled datagrams dropped because their client's connection was backed up.
    pub tunnel_dropped: u64,
    pub protocol_errors: u64,
    /// Connections refused because their prefix already had the maximum open.
    pub refused_per_ip: u64,
    /// Connections refused because their prefix opened them too fast.
    pub refused_rate: u64,
    /// Connections refused because their prefix had the maximum of TLS handshakes going.
    pub refused_handshakes: u64,
    /// Half-open TLS handshakes closed to make room for a new connection (the global cap).
    pub handshakes_evicted: u64,
    /// TLS handshakes closed because they took too long.
    pub handshakes_expired: u64,
    /// Connections from other machines, by the address of ours they dialled: host mode's
    /// invitation shows which of the addresses it offers guests really came in on. At most
    /// [`MAX_ARRIVAL_ADDRESSES`] addresses are counted.
    pub arrivals: std::collections::BTreeMap<IpAddr, u64>,
}

/// A machine has a handful of addresses; a cap keeps a strange setup from growing the map.
pub const MAX_ARRIVAL_ADDRESSES: usize = 16;

impl ServerStats {
    /// Counts a connection that came in on our address `dialled` from `peer` (not loopback:
    /// that is our own client in host mode, or a guest on this machine).
    pub fn count_arrival(&mut self, dialled: IpAddr, peer: IpAddr) {
        if peer.to_canonical().is_loopback() {
            return;
        }
        let dialled = dialled.to_canonical();
        if self.arrivals.len() < MAX_ARRIVAL_ADDRESSES || self.arrivals.contains_key(&dialled) {
            *self.arrivals.entry(dialled).or_default() += 1;
        }
    }
}

/// Errors starting the server, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ServerStartError {
    #[error("cannot listen on TCP {addr}: {source} (is another server running? try --port)")]
    Tcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind UDP {addr}: {source}")]
    Udp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up socket polling: {0}")]
    Poll(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

#[derive(Resource)]
struct ServerNet {
    poll: Poll,
    events: Events,
    listener: TcpListener,
    udp: UdpSocket,
    conns: HashMap<SessionId, (Entity, Conn)>,
    /// Sessions whose read budget ran out last tick.
    still_readable: HashSet<SessionId>,
    /// Sessions with queued output.
    dirty: HashSet<SessionId>,
    /// Sessions with a message addressed to them alone (replies, a channel mate's endpoints):
    /// flushed before the lobby-wide broadcast backlog.
    urgent: HashSet<SessionId>,
    /// Sessions holding lobby-wide presence news back, by when it goes out.
    batches: Batches,
    /// Marks the prompt recipients of the broadcast being applied (see [`Conn::prompted`]).
    broadcast_seq: u64,
    /// When connections closing without output are next swept up.
    sweep: SweepClock,
    /// Sessions whose mirrored components must be refreshed.
    changed: HashSet<SessionId>,
    /// Open connections whose socket died under a write: the rules must forget them.
    lost: Vec<(SessionId, Entity)>,
    next_id: SessionId,
    start: Instant,
    scratch: Vec<u8>,
    passwords: PasswordPool,
    channel_entities: HashMap<String, Entity>,
    tls: Arc<rustls::ServerConfig>,
    limit: ConnectionLimit,
    prefixes: PrefixWidths,
    connect_rate: ConnectRate,
    handshakes: HandshakeLimit,
}

#[derive(Resource)]
struct Rules(ServerState);

/// Why an accepted connection could not be set up.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("cannot register with the poller: {0}")]
    Register(std::io::Error),
    #[error("TLS setup failed: {0}")]
    Tls(rustls::Error),
}

/// Binds the sockets up front so a bad port fails the command with a clear message.
pub struct ServerPlugin {
    net: std::sync::Mutex<Option<(TcpListener, UdpSocket, Poll)>>,
    config: ServerConfig,
    tls: Arc<rustls::ServerConfig>,
    fingerprint: String,
}

impl ServerPlugin {
    pub fn bind(config: ServerConfig) -> Result<Self, ServerStartError> {
        // `::` takes IPv6 and IPv4 alike (Linux's default, net.ipv6.bindv6only = 0); where
        // the machine has no IPv6 at all, IPv4 alone.
        let (listener, udp) = match bind_pair(config.bind, config.port) {
            Err(e) if config.bind == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) => {
                warn!("cannot listen on IPv6 ({e}); listening on IPv4 only");
                bind_pair(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), config.port)?
            }
            other => other?,
        };
        let poll = Poll::new().map_err(ServerStartError::Poll)?;
        let identity = match &config.data_dir {
            Some(dir) => ServerIdentity::load_or_create(dir)?,
            None => ServerIdentity::generate()?,
        };
        Ok(Self {
            net: std::sync::Mutex::new(Some((listener, udp, poll))),
            tls: identity.server_config()?,
            fingerprint: identity.fingerprint(),
            config,
        })
    }

    /// SHA-256 fingerprint of the server's TLS certificate (clients pin it on first use).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        let guard = self.net.lock().ok()?;
        guard.as_ref().and_then(|(l, _, _)| l.local_addr().ok())
    }
}

fn bind_pair(ip: IpAddr, port: u16) -> Result<(TcpListener, UdpSocket), ServerStartError> {
    // With port 0 the OS picks the TCP port; UDP must then get the same number, which can
    // collide with another socket: retry a few times.
    for _ in 0..20 {
        let addr = SocketAddr::new(ip, port);
        let listener =
            TcpListener::bind(addr).map_err(|source| ServerStartError::Tcp { addr, source })?;
        let tcp_addr = listener
            .local_addr()
            .map_err(|source| ServerStartError::Tcp { addr, source })?;
        match UdpSocket::bind(tcp_addr) {
            Ok(udp) => {
                udp.set_nonblocking(true)
                    .map_err(|source| ServerStartError::Udp {
                        addr: tcp_addr,
                        source,
                    })?;
                return Ok((listener, udp));
            }
            Err(source) if port != 0 => {
                return Err(ServerStartError::Udp {
                    addr: tcp_addr,
                    source,
                })
            }
            Err(_) => continue,
        }
    }
    Err(ServerStartError::Udp {
        addr: SocketAddr::new(ip, port),
        source: std::io::Error::other("no port free for both TCP and UDP"),
    })
}

impl Plugin for ServerPlugin {
    fn build(&self, app: &mut App) {
        let (mut listener, udp, poll) = self
            .net
            .lock()
            .expect("server plugin lock")
            .take()
            .expect("ServerPlugin added twice");
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .expect("register listener");
        let local = listener.local_addr().ok();
        if let Some(addr) = local {
            info!("metadata server listening on TCP and UDP {addr}");
            info!("TLS certificate fingerprint {}", self.fingerprint);
            if self.config.announce_json {
                println!(
                    "{}",
                    serde_json::json!({"event": "listening", "addr": addr.to_string(), "fingerprint": self.fingerprint})
                );
            }
        }
        let mut channel_entities = HashMap::new();
        for ch in &self.config.channels {
            let mut e = app.world_mut().spawn((
                Channel,
                ChannelName(ch.name.clone()),
                MaxMembers(ch.max_members),
            ));
            if let Some(h) = &ch.password_hash {
                e.insert(PasswordHash(h.clone()));
            }
            channel_entities.insert(ch.name.clone(), e.id());
        }
        app.insert_resource(ServerNet {
            poll,
            events: Events::with_capacity(4096),
            listener,
            udp,
            conns: HashMap::new(),
            still_readable: HashSet::new(),
            dirty: HashSet::new(),
            urgent: HashSet::new(),
            batches: Batches::default(),
            broadcast_seq: 0,
            sweep: SweepClock::default(),
            changed: HashSet::new(),
            lost: Vec::new(),
            next_id: 1,
            start: Instant::now(),
            scratch: vec![0u8; 64 * 1024],
            passwords: PasswordPool::spawn(PASSWORD_WORKERS),
            channel_entities,
            tls: self.tls.clone(),
            limit: ConnectionLimit::new(self.config.limits.max_connections_per_prefix),
            prefixes: self.config.limits.prefix_widths(),
            connect_rate: ConnectRate::new(
                self.config.limits.new_connections_per_sec,
                self.config.limits.new_connections_burst,
            ),
            handshakes: HandshakeLimit::new(self.config.limits.handshake_rules()),
        })
        .insert_resource(Rules(ServerState::new(
            self.config.channels.clone(),
            self.config.rules.clone(),
        )))
        .insert_resource(ServerStats {
            local_addr: local,
            ..default()
        })
        .add_systems(
            Update,
            (
                accept_connections,
                read_connections,
                read_udp,
                collect_password_results,
                fire_timers,
                expire_handshakes,
                apply_outputs,
                flush_connections,
                mirror_sessions,
            )
                .chain(),
        );
    }
}

fn now(net: &ServerNet) -> Duration {
    net.start.elapsed()
}

fn accept_connections(
    mut net: ResMut<ServerNet>,
    mut rules: ResMut<Rules>,
    mut stats: ResMut<ServerStats>,
    mut commands: Commands,
) {
    let net = &mut *net;
    let t = now(net);
    loop {
        match net.listener.accept() {
            Ok((stream, peer)) => {
                // Which of our addresses the client dialled: in host mode, what it can reach
                // the host's own voice socket at.
                let local = stream.local_addr().map_or(peer.ip(), |a| a.ip());
                let prefix = net.prefixes.prefix_of(peer.ip());
                // Cheap refusals first, before anything is counted: dropping the stream closes
                // it, nothing was read, nothing to answer.
                if net.limit.is_full(prefix) {
                    stats.refused_per_ip += 1;
                    continue;
                }
                if net.handshakes.is_full(prefix) {
                    stats.refused_handshakes += 1;
                    continue;
                }
                if net.connect_rate.try_admit(t, prefix).is_err() {
                    stats.refused_rate += 1;
                    continue;
                }
                let id = net.next_id;
                net.next_id += 1;
                let (poll, tls) = (&net.poll, &net.tls);
                match net
                    .limit
                    .admit(prefix, || set_up_connection(poll, tls, stream, id))
                {
                    Ok((stream, tls)) => {
                        // Not full (checked above), so this only ever evicts another's.
                        if let Ok(Some(evicted)) = net.handshakes.admit(t, id, prefix) {
                            stats.handshakes_evicted += 1;
                            drop_connection(net, evicted);
                        }
                        let token = rand::rngs::OsRng.next_u64();
                        rules.0.handle_connected(
                            t,
                            id,
                            ConnectionAddrs::new(peer.ip(), local),
                            token,
                        );
                        let entity = commands.spawn(Session(id)).id();
                        net.conns
                            .insert(id, (entity, Conn::new(stream, peer, prefix, tls)));
                        // Data may already be waiting: edge-triggered readiness would not
                        // report it again.
                        net.still_readable.insert(id);
                        stats.accepted += 1;
                        stats.count_arrival(local, peer.ip());
                    }
                    Err(AdmitError::OverLimit(_)) => stats.refused_per_ip += 1,
                    Err(AdmitError::Setup(e)) => warn!("connection from {peer}: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: keep serving the others; try again next tick.
                warn!("accept failed: {e}");
                break;
            }
        }
    }
    stats.sessions = net.conns.len();
}

fn set_up_connection(
    poll: &Poll,
    tls: &Arc<rustls::ServerConfig>,
    mut stream: TcpStream,
    id: SessionId,
) -> Result<(TcpStream, rustls::ServerConnection), SetupError> {
    let _ = stream.set_nodelay(true);
    poll.registry()
        .register(&mut stream, Token(id as usize), Interest::READABLE)
        .map_err(SetupError::Register)?;
    let tls = rustls::ServerConnection::new(tls.clone()).map_err(SetupError::Tls)?;
    Ok((stream, tls))
}

fn read_connections(
    mut net: ResMut<ServerNet>,
    mut rules: ResMut<Rules>,
    mut stats: ResMut<ServerStats>,
) {
    let net = &mut *net;
    let t = now(net);
    if let Err(e) = net.poll.poll(&mut net.events, Some(Duration::ZERO)) {
        if e.kind() != std::io::ErrorKind::Interrupted {
            warn!("poll failed: {e}");
        }
    }
    let mut ready: Vec<SessionId> = net.still_readable.drain().collect();
    for event in net.events.iter() {
        if event.token() != LISTENER {
            ready.push(event.token().0 as SessionId);
        }
    }
    for id in ready {
        let Some((_, conn)) = net.conns.get_mut(&id) else {
            continue;
        };
        if conn.is_closing() {
            continue;
        }
        let outcome = conn.read(&mut net.scratch);
        if net.handshakes.contains(id) {
            if !conn.is_handshaking() {
                net.handshakes.finished(id);
            } else if conn.has_output() {
                // A complete ClientHello was read and answered.
                net.handshakes.answered(t, id);
            }
        }
        // Heartbeats change nothing the ECS mirror shows; skip the refresh for them.
        let mut news = outcome.closed.is_some();
        for msg in outcome.messages {
            stats.messages_in += 1;
            news |= !matches!(msg, ClientMsg::Heartbeat);
            rules.0.handle_message(t, id, msg);
        }
        if outcome.more {
            net.still_readable.insert(id);
        }
        // TLS handshake records (and alerts) are produced by reading.
        if conn.has_output() {
            net.dirty.insert(id);
        }
        if let Some(reason) = outcome.closed {
            if reason.is_transport_error() {
                stats.protocol_errors += 1;
                debug!("closing session {id}: {reason}");
            }
            rules.0.close(id, reason);
        }
        if news {
            net.changed.insert(id);
        }
    }
}

fn read_udp(mut net: ResMut<ServerNet>, mut rules: ResMut<Rules>, mut stats: ResMut<ServerStats>) {
    let net = &mut *net;
    let t = now(net);
    let mut buf = [0u8; 1500];
    let mut reply = [0u8; MAX_DATAGRAM_LEN];
    let local = net
        .udp
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    // Relays of datagrams tunnelled over TCP (read just before) go out in the first pass.
    for _ in 0..4096 {
        while let Some(transmit) = rules.0.poll_transmit(t, &mut reply) {
            let to = addr::for_socket(transmit.to, local);
            let _ = net.udp.send_to(&reply[..transmit.len], to);
        }
        let (len, from) = match net.udp.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ICMP errors surface here on some systems; they say nothing about us.
            Err(_) => continue,
        };
        rules
            .0
            .handle_datagram(t, addr::canonical(from), &buf[..len]);
    }
    while let Some(transmit) = rules.0.poll_transmit(t, &mut reply) {
        let to = addr::for_socket(transmit.to, local);
        let _ = net.udp.send_to(&reply[..transmit.len], to);
    }
    while let Some(event) = rules.0.poll_event() {
        match event {
            ServerEvent::UdpRegistered(id) => {
                stats.udp_registered += 1;
                net.changed.insert(id);
            }
            ServerEvent::Relayed { bytes } => {
                stats.relayed_datagrams += 1;
                stats.relayed_bytes += bytes as u64;
            }
            ServerEvent::DatagramDropped { .. } | ServerEvent::TunnelDropped { .. } => {
                stats.udp_dropped += 1
            }
        }
    }
}

fn collect_password_results(net: Res<ServerNet>, mut rules: ResMut<Rules>) {
    let t = now(&net);
    while let Some(r) = net.passwords.try_result() {
        rules
            .0
            .handle_password_checked(t, r.session, r.ticket, r.ok);
    }
}

fn fire_timers(net: Res<ServerNet>, mut rules: ResMut<Rules>) {
    let t = now(&net);
    if rules.0.poll_timeout().is_some_and(|due| due <= t) {
        rules.0.handle_timeout(t);
    }
}

/// Carries out what the rules queued, until they are quiet (closing a session queues more:
/// leave notifications).
fn apply_outputs(
    mut net: ResMut<ServerNet>,
    mut rules: ResMut<Rules>,
    mut stats: ResMut<ServerStats>,
    mut commands: Commands,
) {
    let net = &mut *net;
    let t = now(net);
    while let Some(output) = rules.0.poll_output() {
        match output {
            Output::Send(id, msg) => {
                if let Some((_, conn)) = net.conns.get_mut(&id) {
                    if matches!(msg, ServerMsg::Tunnel { .. })
                        && !slow_clients::admit_tunnelled(conn.unflushed())
                    {
                        stats.tunnel_dropped += 1;
                        continue;
                    }
                    match encode_frame(&msg) {
                        Ok(frame) => match conn.queue(&frame) {
                            Ok(()) => {
                                stats.frames_out += 1;
                                net.urgent.insert(id);
                            }
                            Err(too_slow) => rules.0.close(id, too_slow),
                        },
                        Err(e) => warn!("cannot encode message: {e}"),
                    }
                }
                if matches!(
                    msg,
                    ServerMsg::Joined { .. }
                        | ServerMsg::Left { .. }
                        | ServerMsg::Identified { .. }
                ) {
                    net.changed.insert(id);
                }
            }
            Output::Broadcast { msg, prompt } => {
                let Ok(frame) = encode_frame(&msg) else {
                    continue;
                };
                net.broadcast_seq += 1;
                let seq = net.broadcast_seq;
                // The channel concerned first, with the replies of this tick.
                for id in prompt {
                    let Some((_, conn)) = net.conns.get_mut(&id) else {
                        continue;
                    };
                    conn.prompted = seq;
                    if conn.is_closing() {
                        continue;
                    }
                    match conn.queue(&frame) {
                        Ok(()) => {
                            stats.frames_out += 1;
                            net.urgent.insert(id);
                        }
                        Err(too_slow) => rules.0.close(id, too_slow),
                    }
                }
                // Everyone else: batched (see `fanout`).
                let sessions = net.conns.len();
                for (&id, (_, conn)) in net.conns.iter_mut() {
                    if conn.prompted == seq || conn.is_closing() || !rules.0.is_identified(id) {
                        continue;
                    }
                    match conn.defer(&frame) {
                        Ok(first) => {
                            stats.frames_out += 1;
                            if first {
                                net.batches.schedule(id, t, sessions);
                            }
                        }
                        Err(too_slow) => rules.0.close(id, too_slow),
                    }
                }
            }
            Output::Close(id, reason) => {
                let Some((entity, conn)) = net.conns.get_mut(&id) else {
                    continue;
                };
                if conn.is_closing() {
                    continue;
                }
                conn.closing_since = Some(t);
                if let Ok(frame) = encode_frame(&ServerMsg::Closing {
                    reason: reason.to_string(),
                }) {
                    let _ = conn.queue(&frame);
                }
                conn.send_close_notify();
                net.dirty.insert(id);
                commands.entity(*entity).despawn();
                stats.closed += 1;
                debug!("session {id} closed: {reason}");
            }
            Output::VerifyPassword {
                session,
                ticket,
                hash,
                password,
            } => net.passwords.submit(PasswordJob {
                session,
                ticket,
                hash,
                password,
            }),
        }
    }
}

/// Connections with leftover TLS output (the socket would have blocked) written per tick
/// beyond the urgent ones, so a crowd of slow readers cannot hold up the next tick's reads.
const FLUSH_BUDGET: usize = 2_000;

fn flush_connections(
    mut net: ResMut<ServerNet>,
    mut rules: ResMut<Rules>,
    mut stats: ResMut<ServerStats>,
    mut commands: Commands,
) {
    let net = &mut *net;
    let t = now(net);
    // Replies and the channel concerned first: they are what someone is waiting for.
    let urgent: Vec<SessionId> = net.urgent.drain().collect();
    for id in urgent {
        net.dirty.remove(&id);
        flush_one(net, id, t);
    }
    // Then lobby-wide presence that has waited long enough, within the time budget.
    let started = Instant::now();
    let mut due = Vec::with_capacity(BATCH_CHUNK);
    while net.batches.next_chunk(t, started.elapsed(), &mut due) {
        for &id in &due {
            let Some((_, conn)) = net.conns.get_mut(&id) else {
                continue;
            };
            // Already pushed out by a prompt message, or never will be.
            if !conn.has_deferred() || conn.is_closing() {
                continue;
            }
            match conn.release_deferred() {
                Ok(()) => {
                    net.dirty.remove(&id);
                    flush_one(net, id, t);
                }
                Err(too_slow) => rules.0.close(id, too_slow),
            }
        }
    }
    // Last, connections whose socket would have blocked before.
    let backlog: Vec<SessionId> = net.dirty.iter().copied().take(FLUSH_BUDGET).collect();
    for id in backlog {
        net.dirty.remove(&id);
        flush_one(net, id, t);
    }
    // Connections that closed while we were not writing to them still need cleanup: a read
    // error marks them closing without output; sweep those too.
    if net.sweep.due(t) {
        let stale: Vec<SessionId> = net
            .conns
            .iter()
            .filter(|(_, (_, c))| c.is_closing() && !c.has_output())
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            remove_conn(net, id);
        }
    }
    // Open connections that died under a write: the rules forget them (their channel hears
    // they left) and so does the ECS mirror.
    for (id, entity) in net.lost.drain(..) {
        rules.0.handle_closed(t, id);
        commands.entity(entity).despawn();
        stats.closed += 1;
        debug!("session {id} lost: write failed");
    }
    stats.sessions = net.conns.len();
}

/// Writes what `id` has queued until its socket would block; leftovers go to the backlog.
/// Removes the connection once it is dead, or closing and done (see `close_timing`).
fn flush_one(net: &mut ServerNet, id: SessionId, now: Duration) {
    let Some((entity, conn)) = net.conns.get_mut(&id) else {
        return;
    };
    let failed = conn.flush().is_err();
    match after_flush(now, failed, conn.has_output(), conn.closing_since) {
        AfterFlush::Idle => {}
        AfterFlush::FlushLater => {
            net.dirty.insert(id);
        }
        AfterFlush::Drop => {
            if !conn.is_closing() {
                net.lost.push((id, *entity));
            }
            remove_conn(net, id);
        }
    }
}

/// Forgets connection `id` in the shell: its slot per prefix, its handshake place, its
/// registration with the poller; dropping it closes the socket. The one place a connection
/// is removed, so no slot can leak.
fn remove_conn(net: &mut ServerNet, id: SessionId) {
    net.handshakes.finished(id);
    if let Some((_, mut conn)) = net.conns.remove(&id) {
        net.limit.release(conn.prefix);
        let _ = net.poll.registry().deregister(&mut conn.stream);
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    }
    net.still_readable.remove(&id);
    net.dirty.remove(&id);
    net.urgent.remove(&id);
}

/// Closes a connection still in its TLS handshake at once: there is no session to say goodbye
/// to, and a flood of them must not wait for a flush. The rules and the ECS mirror forget it
/// with the lost connections.
fn drop_connection(net: &mut ServerNet, id: SessionId) {
    if let Some((entity, conn)) = net.conns.get(&id) {
        // A closing connection is already forgotten by the rules and the mirror.
        if !conn.is_closing() {
            net.lost.push((id, *entity));
        }
    }
    remove_conn(net, id);
}

/// Closes TLS handshakes that ran out of time.
fn expire_handshakes(mut net: ResMut<ServerNet>, mut stats: ResMut<ServerStats>) {
    let net = &mut *net;
    let t = now(net);
    if net.handshakes.poll_timeout().is_none_or(|due| due > t) {
        return;
    }
    for id in net.handshakes.expired(t) {
        stats.handshakes_expired += 1;
        drop_connection(net, id);
    }
}

fn mirror_sessions(mut net: ResMut<ServerNet>, rules: Res<Rules>, mut commands: Commands) {
    let net = &mut *net;
    for id in net.changed.drain() {
        let Some((entity, conn)) = net.conns.get(&id) else {
            continue;
        };
        if conn.is_closing() {
            continue;
        }
        let Some(view) = rules.0.session_view(id) else {
            continue;
        };
        let mut e = commands.entity(*entity);
        if let Some(name) = view.username {
            e.insert(Username(name));
        }
        match view.channel.and_then(|c| net.channel_entities.get(&c)) {
            Some(ch) => {
                e.insert(InChannel(*ch));
            }
            None => {
                e.remove::<InChannel>();
            }
        }
        e.insert(VoiceEndpoints {
            local: view.local_endpoints,
            public: view.public_endpoint,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_count_other_machines_by_the_address_they_dialled() {
        let mut stats = ServerStats::default();
        let lan: IpAddr = "192.168.1.20".parse().unwrap();
        stats.count_arrival(lan, "192.168.1.31".parse().unwrap());
        stats.count_arrival(
            "::ffff:192.168.1.20".parse().unwrap(),
            "::ffff:192.168.1.32".parse().unwrap(),
        );
        // Our own client in host mode, over loopback (either family): not a guest.
        stats.count_arrival("127.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap());
        stats.count_arrival("::1".parse().unwrap(), "::ffff:127.0.0.1".parse().unwrap());
        assert_eq!(stats.arrivals, std::collections::BTreeMap::from([(lan, 2)]));
    }

    #[test]
    fn arrivals_keep_a_bounded_number_of_addresses() {
        let mut stats = ServerStats::default();
        let peer: IpAddr = "203.0.113.1".parse().unwrap();
        for i in 0..100u8 {
            stats.count_arrival(IpAddr::from([10, 0, 0, i]), peer);
        }
        assert_eq!(stats.arrivals.len(), MAX_ARRIVAL_ADDRESSES);
        stats.count_arrival(IpAddr::from([10, 0, 0, 0]), peer);
        assert_eq!(stats.arrivals[&IpAddr::from([10, 0, 0, 0])], 2);
    }
}
