//! `ServerPlugin`: the thin Bevy shell around [`ServerState`]. Each tick it accepts connections,
//! reads the sockets that mio reports ready (non-blocking, zero-timeout poll), feeds the rules,
//! and writes what they ask. Password hashes are checked on worker threads so argon2 never
//! stalls the tick.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use bevy::prelude::*;
use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use rand::RngCore;

use super::components::*;
use super::conn::Conn;
use super::fanout::Batches;
use super::state::{Output, ServerRules, ServerState, SessionId};
use crate::config::{verify_password, ChannelConfig};
use crate::protocol::datagram::Datagram;
use crate::protocol::{encode_frame, ClientMsg, ServerMsg};
use crate::tls::ServerIdentity;
use std::sync::Arc;

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
    /// Connections accepted from one IP address at once; more are closed on accept.
    pub max_connections_per_ip: usize,
}

/// Default of [`ServerConfig::max_connections_per_ip`]: a household or office behind one NAT
/// fits, one host cannot take the server's file descriptors.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;

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
    pub protocol_errors: u64,
    /// Connections refused because their IP already had the maximum.
    pub refused_per_ip: u64,
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
    /// When connections closing without output were last swept up.
    last_sweep: Duration,
    /// Sessions whose mirrored components must be refreshed.
    changed: HashSet<SessionId>,
    next_id: SessionId,
    start: Instant,
    scratch: Vec<u8>,
    verify_tx: Sender<VerifyJob>,
    verify_rx: Receiver<VerifyResult>,
    channel_entities: HashMap<String, Entity>,
    tls: Arc<rustls::ServerConfig>,
    per_ip: HashMap<IpAddr, usize>,
    max_per_ip: usize,
}

struct VerifyJob {
    session: SessionId,
    ticket: u64,
    hash: String,
    password: String,
}

struct VerifyResult {
    session: SessionId,
    ticket: u64,
    ok: bool,
}

#[derive(Resource)]
struct Rules(ServerState);

#[derive(Resource, Default)]
struct Outbox(Vec<Output>);

/// Binds the sockets up front so a bad port fails the command with a clear message.
pub struct ServerPlugin {
    net: std::sync::Mutex<Option<(TcpListener, UdpSocket, Poll)>>,
    config: ServerConfig,
    tls: Arc<rustls::ServerConfig>,
    fingerprint: String,
}

impl ServerPlugin {
    pub fn bind(config: ServerConfig) -> Result<Self, ServerStartError> {
        let (listener, udp) = bind_pair(config.bind, config.port)?;
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
        let (verify_tx, jobs_rx) = crossbeam_channel::unbounded::<VerifyJob>();
        let (results_tx, verify_rx) = crossbeam_channel::unbounded::<VerifyResult>();
        for i in 0..2 {
            let jobs_rx = jobs_rx.clone();
            let results_tx = results_tx.clone();
            std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    for job in jobs_rx {
                        let ok = verify_password(&job.hash, &job.password);
                        if results_tx
                            .send(VerifyResult {
                                session: job.session,
                                ticket: job.ticket,
                                ok,
                            })
                            .is_err()
                        {
                            break;
                        }
                    }
                })
                .expect("spawn password worker");
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
            last_sweep: Duration::ZERO,
            changed: HashSet::new(),
            next_id: 1,
            start: Instant::now(),
            scratch: vec![0u8; 64 * 1024],
            verify_tx,
            verify_rx,
            channel_entities,
            tls: self.tls.clone(),
            per_ip: HashMap::new(),
            max_per_ip: self.config.max_connections_per_ip.max(1),
        })
        .insert_resource(Rules(ServerState::new(
            self.config.channels.clone(),
            self.config.rules.clone(),
        )))
        .insert_resource(ServerStats {
            local_addr: local,
            ..default()
        })
        .init_resource::<Outbox>()
        .add_systems(
            Update,
            (
                accept_connections,
                read_connections,
                read_udp,
                collect_password_results,
                expire_sessions,
                apply_outputs,
                flush_connections,
                mirror_sessions,
            )
                .chain(),
        );
    }
}

fn release_ip(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = per_ip.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&ip);
        }
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
            Ok((mut stream, peer)) => {
                let count = net.per_ip.entry(peer.ip()).or_default();
                if *count >= net.max_per_ip {
                    // Dropping the stream closes it; nothing was read, nothing to answer.
                    stats.refused_per_ip += 1;
                    continue;
                }
                *count += 1;
                let id = net.next_id;
                net.next_id += 1;
                let _ = stream.set_nodelay(true);
                if let Err(e) = net.poll.registry().register(
                    &mut stream,
                    Token(id as usize),
                    Interest::READABLE,
                ) {
                    warn!("cannot register connection from {peer}: {e}");
                    continue;
                }
                let tls = match rustls::ServerConnection::new(net.tls.clone()) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!("TLS setup failed for {peer}: {e}");
                        continue;
                    }
                };
                let token = rand::rngs::OsRng.next_u64();
                rules.0.session_opened(t, id, token);
                rules.0.set_session_ip(id, peer.ip());
                let entity = commands.spawn(Session(id)).id();
                net.conns.insert(id, (entity, Conn::new(stream, peer, tls)));
                // Data may already be waiting: edge-triggered readiness would not report it again.
                net.still_readable.insert(id);
                stats.accepted += 1;
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

fn read_connections(
    mut net: ResMut<ServerNet>,
    mut rules: ResMut<Rules>,
    mut outbox: ResMut<Outbox>,
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
        if conn.closing {
            continue;
        }
        let outcome = conn.read(&mut net.scratch);
        // Heartbeats change nothing the ECS mirror shows; skip the refresh for them.
        let mut news = outcome.closed.is_some();
        for msg in outcome.messages {
            stats.messages_in += 1;
            news |= !matches!(msg, ClientMsg::Heartbeat);
            rules.0.handle(t, id, msg, &mut outbox.0);
        }
        if outcome.more {
            net.still_readable.insert(id);
        }
        // TLS handshake records (and alerts) are produced by reading.
        if conn.has_output() {
            net.dirty.insert(id);
        }
        if let Some(reason) = outcome.closed {
            if reason != "connection closed by peer" {
                stats.protocol_errors += 1;
                debug!("closing session {id}: {reason}");
            }
            outbox.0.push(Output::Close(id, reason));
        }
        if news {
            net.changed.insert(id);
        }
    }
}

fn read_udp(
    mut net: ResMut<ServerNet>,
    mut rules: ResMut<Rules>,
    mut outbox: ResMut<Outbox>,
    mut stats: ResMut<ServerStats>,
) {
    let net = &mut *net;
    let t = now(net);
    let mut buf = [0u8; 1500];
    let mut reply = [0u8; 64];
    for _ in 0..4096 {
        let (len, from) = match net.udp.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ICMP errors surface here on some systems; they say nothing about us.
            Err(_) => continue,
        };
        match Datagram::parse(&buf[..len]) {
            Ok(Datagram::Register { token }) => {
                match rules.0.udp_register(t, token, from, &mut outbox.0) {
                    Some(id) => {
                        stats.udp_registered += 1;
                        net.changed.insert(id);
                        if let Ok(n) = (Datagram::RegisterAck { observed: from }).write(&mut reply)
                        {
                            let _ = net.udp.send_to(&reply[..n], from);
                        }
                    }
                    None => stats.udp_dropped += 1,
                }
            }
            _ => stats.udp_dropped += 1,
        }
    }
}

fn collect_password_results(
    net: Res<ServerNet>,
    mut rules: ResMut<Rules>,
    mut outbox: ResMut<Outbox>,
) {
    let t = now(&net);
    while let Ok(r) = net.verify_rx.try_recv() {
        rules
            .0
            .password_checked(t, r.session, r.ticket, r.ok, &mut outbox.0);
    }
}

fn expire_sessions(
    net: Res<ServerNet>,
    mut rules: ResMut<Rules>,
    mut outbox: ResMut<Outbox>,
    mut last: Local<Option<Duration>>,
) {
    let t = now(&net);
    // Timeouts are in seconds: checking every 250 ms is plenty and keeps big servers cheap.
    if last.is_some_and(|l| t.saturating_sub(l) < Duration::from_millis(250)) {
        return;
    }
    *last = Some(t);
    rules.0.tick(t, &mut outbox.0);
}

fn apply_outputs(
    mut net: ResMut<ServerNet>,
    mut rules: ResMut<Rules>,
    mut outbox: ResMut<Outbox>,
    mut stats: ResMut<ServerStats>,
    mut commands: Commands,
) {
    let net = &mut *net;
    let t = now(net);
    // Closing a session produces more outputs (leave notifications): loop until quiet.
    let mut rounds = 0;
    while !outbox.0.is_empty() && rounds < 8 {
        rounds += 1;
        let outputs = std::mem::take(&mut outbox.0);
        let mut to_close: Vec<(SessionId, String)> = Vec::new();
        for output in outputs {
            match output {
                Output::Send(id, msg) => {
                    if let Some((_, conn)) = net.conns.get_mut(&id) {
                        match encode_frame(&msg) {
                            Ok(frame) if conn.queue(&frame) => {
                                stats.frames_out += 1;
                                net.urgent.insert(id);
                            }
                            Ok(_) => to_close.push((id, "too slow: output queue full".into())),
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
                        if conn.closing {
                            continue;
                        }
                        if conn.queue(&frame) {
                            stats.frames_out += 1;
                            net.urgent.insert(id);
                        } else {
                            to_close.push((id, "too slow: output queue full".into()));
                        }
                    }
                    // Everyone else: batched (see `fanout`).
                    let sessions = net.conns.len();
                    for (&id, (_, conn)) in net.conns.iter_mut() {
                        if conn.prompted == seq || conn.closing || !rules.0.is_identified(id) {
                            continue;
                        }
                        match conn.defer(&frame) {
                            Some(first) => {
                                stats.frames_out += 1;
                                if first {
                                    net.batches.schedule(id, t, sessions);
                                }
                            }
                            None => to_close.push((id, "too slow: output queue full".into())),
                        }
                    }
                }
                Output::Close(id, reason) => to_close.push((id, reason)),
                Output::VerifyPassword {
                    session,
                    ticket,
                    hash,
                    password,
                } => {
                    let _ = net.verify_tx.send(VerifyJob {
                        session,
                        ticket,
                        hash,
                        password,
                    });
                }
            }
        }
        for (id, reason) in to_close {
            let Some((entity, conn)) = net.conns.get_mut(&id) else {
                continue;
            };
            if conn.closing {
                continue;
            }
            conn.closing = true;
            if let Ok(frame) = encode_frame(&ServerMsg::Closing {
                reason: reason.clone(),
            }) {
                conn.queue(&frame);
            }
            conn.send_close_notify();
            net.dirty.insert(id);
            commands.entity(*entity).despawn();
            rules.0.session_closed(t, id, &mut outbox.0);
            stats.closed += 1;
            debug!("session {id} closed: {reason}");
        }
    }
}

/// Connections with leftover TLS output (the socket would have blocked) written per tick
/// beyond the urgent ones, so a crowd of slow readers cannot hold up the next tick's reads.
const FLUSH_BUDGET: usize = 2_000;

/// Wall time per tick spent writing batches of presence news. One broadcast starts a batch
/// at every client at once; written in one go, 10,000 of them would hold the tick (and every
/// join waiting behind it) for well over 100 ms. A millisecond a tick still writes tens of
/// thousands a second, more than `fanout::BATCHED_WRITES_PER_SEC` asks for.
const BATCH_TIME_BUDGET: Duration = Duration::from_millis(1);

/// Batches taken from the queue between two looks at the clock.
const BATCH_CHUNK: usize = 16;

fn flush_connections(
    mut net: ResMut<ServerNet>,
    mut stats: ResMut<ServerStats>,
    mut outbox: ResMut<Outbox>,
) {
    let net = &mut *net;
    let t = now(net);
    // Replies and the channel concerned first: they are what someone is waiting for.
    let urgent: Vec<SessionId> = net.urgent.drain().collect();
    for id in urgent {
        net.dirty.remove(&id);
        flush_one(net, id);
    }
    // Then lobby-wide presence that has waited long enough, within the time budget.
    let started = Instant::now();
    let mut due = Vec::with_capacity(BATCH_CHUNK);
    loop {
        due.clear();
        net.batches.take_due(t, BATCH_CHUNK, &mut due);
        if due.is_empty() {
            break;
        }
        for &id in &due {
            let Some((_, conn)) = net.conns.get_mut(&id) else {
                continue;
            };
            // Already pushed out by a prompt message, or never will be.
            if !conn.has_deferred() || conn.closing {
                continue;
            }
            if conn.release_deferred() {
                net.dirty.remove(&id);
                flush_one(net, id);
            } else {
                outbox
                    .0
                    .push(Output::Close(id, "too slow: output queue full".into()));
            }
        }
        if started.elapsed() >= BATCH_TIME_BUDGET {
            break;
        }
    }
    // Last, connections whose socket would have blocked before.
    let backlog: Vec<SessionId> = net.dirty.iter().copied().take(FLUSH_BUDGET).collect();
    for id in backlog {
        net.dirty.remove(&id);
        flush_one(net, id);
    }
    // Connections that closed while we were not writing to them still need cleanup: a read
    // error marks them closing without output; sweep those too (a walk over every
    // connection, so a few times a second rather than every tick).
    if t.saturating_sub(net.last_sweep) >= Duration::from_millis(250) {
        net.last_sweep = t;
        let stale: Vec<SessionId> = net
            .conns
            .iter()
            .filter(|(_, (_, c))| c.closing && !c.has_output())
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some((_, mut conn)) = net.conns.remove(&id) {
                release_ip(&mut net.per_ip, conn.peer.ip());
                let _ = net.poll.registry().deregister(&mut conn.stream);
            }
        }
    }
    stats.sessions = net.conns.len();
}

/// Writes what `id` has queued until its socket would block; leftovers go to the backlog.
/// Removes the connection once it is dead, or closing and done.
fn flush_one(net: &mut ServerNet, id: SessionId) {
    let Some((_, conn)) = net.conns.get_mut(&id) else {
        return;
    };
    let result = conn.flush();
    if conn.closing {
        conn.close_attempts += 1;
    }
    // A closing client that does not read gets about a second to take its Closing message.
    let done =
        result.is_err() || (conn.closing && (!conn.has_output() || conn.close_attempts > 1000));
    if conn.has_output() && !done {
        net.dirty.insert(id);
    }
    if done {
        if let Some((_, mut conn)) = net.conns.remove(&id) {
            release_ip(&mut net.per_ip, conn.peer.ip());
            let _ = net.poll.registry().deregister(&mut conn.stream);
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn mirror_sessions(mut net: ResMut<ServerNet>, rules: Res<Rules>, mut commands: Commands) {
    let net = &mut *net;
    for id in net.changed.drain() {
        let Some((entity, conn)) = net.conns.get(&id) else {
            continue;
        };
        if conn.closing {
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
