//! A deterministic simulation of the whole system, in one thread and in simulated time.
//!
//! One metadata server, several users (each a control session and a voice engine, see
//! [`adapter`]) and the network between them ([`network`]: latency, loss, reordering, NATs)
//! run in a [`World`] that owns the only clock. The world steps straight to the next moment
//! anything is due: a core's `poll_timeout`, the next datagram or control message arrival, a
//! user's next captured frame (20 ms) or playout chunk (10 ms). No sockets, no threads, no
//! sleeps: a 20 s call runs in about a second, and one seed always gives the same call, down
//! to the last byte (see [`World::digest`]).
//!
//! Control messages travel as typed values with a per-user latency (TCP is reliable and in
//! order, so nothing more is needed); voice datagrams cross the simulated network as bytes.
//! What users hear is measured by [`listen`]: every talker speaks its own tone.
//!
//! ```text
//! let mut w = World::new(seed);
//! let a = w.add_user(UserSpec::new("alice", 440.0));
//! w.connect(a); w.join(a, "Lobby"); w.set_talking(a, true);
//! w.run_for(Duration::from_secs(10));
//! w.hears(b, a, from, to)   // amplitude of alice's tone in bob's ears
//! ```

pub mod adapter;
pub mod listen;
pub mod network;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use adapter::{
    ConnId, ControlOut, PeerPath, ServerOut, SimClient, SimServer, DATAGRAM_BUF, PLAYOUT_SAMPLES,
};
use listen::Ear;
use network::{LinkProfile, NatKind, NetStats, Network, Node, SimRng};

use crate::client::session::PeerIdentityStatus;
use crate::protocol::{ClientMsg, ServerMsg, UserId};

/// The audio sample rate of every client.
pub use crate::audio::SAMPLE_RATE;
/// The server's public address (TCP control and UDP registration share the port).
pub const SERVER_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 7700);
/// Channels of the simulated server.
pub const CHANNELS: [&str; 2] = ["Lobby", "Gaming"];
/// Playout chunk duration (10 ms).
const PLAYOUT_PERIOD: Duration = Duration::from_millis(10);
/// Step taken when the earliest due time is not in the future: a timer with a strict deadline
/// ("more than 5 s") fires on the first call after it, so time must move on.
const MIN_STEP: Duration = Duration::from_millis(1);
/// Peak amplitude of every talker's tone.
const TONE_AMPLITUDE: f32 = 0.3;

/// How one simulated user is set up.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub name: String,
    /// The tone this user speaks.
    pub tone_hz: f32,
    pub nat: NatKind,
    /// The user's access link (voice datagrams).
    pub link: LinkProfile,
    /// One-way delay of control messages between this user and the server.
    pub control_latency: Duration,
    /// Whether the user's router maps its voice port on request (PCP, NAT-PMP, UPnP-IGD).
    pub port_mapped: bool,
}

impl UserSpec {
    /// A user on a home router with a clean 10 ms link.
    pub fn new(name: &str, tone_hz: f32) -> Self {
        Self {
            name: name.to_string(),
            tone_hz,
            nat: NatKind::Home,
            link: LinkProfile::default(),
            control_latency: Duration::from_millis(15),
            port_mapped: false,
        }
    }

    /// The user's router maps its voice port, and the user announces the mapped address.
    pub fn port_mapped(mut self) -> Self {
        self.port_mapped = true;
        self
    }

    pub fn nat(mut self, nat: NatKind) -> Self {
        self.nat = nat;
        self
    }

    pub fn link(mut self, link: LinkProfile) -> Self {
        self.link = link;
        self
    }

    pub fn control_latency(mut self, d: Duration) -> Self {
        self.control_latency = d;
        self
    }
}

struct User {
    client: SimClient,
    tone_hz: f32,
    phase: f32,
    talking: bool,
    /// The control connection the client believes it has.
    conn: Option<ConnId>,
    control_latency: Duration,
    next_capture: Duration,
    next_playout: Duration,
    ear: Ear,
}

/// Control-plane happenings in flight, delivered after a latency.
#[derive(Debug)]
enum Control {
    /// A client's connection attempt reaches the server.
    Syn {
        user: usize,
        conn: ConnId,
    },
    Connected {
        user: usize,
        conn: ConnId,
    },
    Lost {
        user: usize,
        conn: ConnId,
    },
    ToServer {
        conn: ConnId,
        msg: ClientMsg,
    },
    ToClient {
        user: usize,
        conn: ConnId,
        msg: ServerMsg,
    },
    /// The client closed the connection; the server notices.
    Fin {
        conn: ConnId,
    },
}

impl Control {
    /// Who receives it: the server first, then users by index. Part of the queue key, so
    /// that arrivals at one instant are handled in an order that does not depend on the order
    /// they were produced in.
    fn rank(&self) -> usize {
        match self {
            Control::Syn { .. } | Control::ToServer { .. } | Control::Fin { .. } => 0,
            Control::Connected { user, .. }
            | Control::Lost { user, .. }
            | Control::ToClient { user, .. } => user + 1,
        }
    }
}

/// A 64-bit FNV-1a digest of everything that crossed a wire and everything heard.
#[derive(Debug, Clone, Copy)]
struct Digest(u64);

impl Digest {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// See the module docs.
pub struct World {
    now: Duration,
    rng: SimRng,
    seed: u64,
    net: Network,
    server: Option<SimServer>,
    /// Whether the server (and any restart of it) relays.
    server_relays: bool,
    users: Vec<User>,
    control: BTreeMap<(Duration, usize, u64), Control>,
    control_seq: u64,
    next_conn: ConnId,
    conn_owner: BTreeMap<ConnId, usize>,
    digest: Digest,
    tx_buf: Vec<u8>,
    mix_buf: Vec<f32>,
    /// A server that lies: rewrites each control message before it reaches a user (the
    /// user's index and the message). `None`: an honest server.
    hostile: Option<HostileServer>,
}

/// Rewrites a control message from the server to user `usize` (a key-swapping server).
pub type HostileServer = Box<dyn FnMut(usize, &mut ServerMsg)>;

impl World {
    /// An empty world with the server up (not relaying, as a dedicated `server` starts).
    pub fn new(seed: u64) -> Self {
        Self::with_server_relay(seed, false)
    }

    /// An empty world whose server relays (`relay`) or not: host mode and `server --relay`
    /// relay for members that cannot reach each other, a plain dedicated server does not.
    pub fn with_server_relay(seed: u64, relay: bool) -> Self {
        Self {
            now: Duration::ZERO,
            rng: SimRng::new(seed),
            seed,
            net: Network::new(seed, SERVER_ADDR),
            server: Some(SimServer::new(&CHANNELS, relay)),
            server_relays: relay,
            users: Vec::new(),
            control: BTreeMap::new(),
            control_seq: 0,
            next_conn: 1,
            conn_owner: BTreeMap::new(),
            digest: Digest(0xcbf2_9ce4_8422_2325),
            tx_buf: vec![0u8; DATAGRAM_BUF],
            mix_buf: vec![0.0; PLAYOUT_SAMPLES],
            hostile: None,
        }
    }

    /// From now on the server rewrites what it tells users with `f` (see [`HostileServer`]).
    pub fn set_hostile_server(&mut self, f: impl FnMut(usize, &mut ServerMsg) + 'static) {
        self.hostile = Some(Box::new(f));
    }

    /// What user `user`'s control session made of user `other`'s identity.
    pub fn peer_identity(&self, user: usize, other: usize) -> Option<PeerIdentityStatus> {
        let id = self.users[other].client.user_id()?;
        self.users[user].client.peer_identity(id)
    }

    /// User `user`'s safety number with user `other`.
    pub fn safety_number(&self, user: usize, other: usize) -> Option<String> {
        let id = self.users[other].client.user_id()?;
        self.users[user].client.safety_number(id)
    }

    /// User `user` accepts user `other`'s changed identity.
    pub fn accept_identity(&mut self, user: usize, other: usize) -> bool {
        let Some(id) = self.users[other].client.user_id() else {
            return false;
        };
        let now = self.now;
        let accepted = self.users[user].client.accept_identity(now, id);
        self.pump(user);
        accepted
    }

    pub fn now(&self) -> Duration {
        self.now
    }

    /// Adds a user (not yet connected); returns its index. Add every user before running:
    /// each ear listens for the tones of the users there are when it starts hearing.
    pub fn add_user(&mut self, spec: UserSpec) -> usize {
        let i = self.users.len();
        let local = self.net.add_site(spec.nat, spec.link);
        let seed = self.seed ^ (i as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f);
        let mut client = SimClient::new(&spec.name, local, SERVER_ADDR, seed);
        if spec.port_mapped {
            client.set_mapped(self.net.map_port(i));
        }
        // Each user's audio clock starts at its own offset, as real devices do.
        let offset = Duration::from_micros(1_700 * i as u64);
        self.users.push(User {
            client,
            tone_hz: spec.tone_hz,
            phase: 0.0,
            talking: false,
            conn: None,
            control_latency: spec.control_latency,
            next_capture: self.now + offset,
            next_playout: self.now + offset,
            ear: Ear::new(Vec::new(), self.now + offset),
        });
        // Every ear listens for every talker's tone.
        let freqs: Vec<f32> = self.users.iter().map(|u| u.tone_hz).collect();
        for u in &mut self.users {
            if u.ear.blocks().is_empty() {
                u.ear = Ear::new(freqs.clone(), u.next_playout);
            }
        }
        i
    }

    /// The user's router maps its voice port now, mid-call, and the user announces it (a
    /// direct path appears where there was none).
    pub fn map_port_now(&mut self, user: usize) {
        let mapped = self.net.map_port(user);
        let now = self.now;
        self.users[user].client.announce_mapped(now, mapped);
    }

    /// The longest gap in `talker`'s tone as `listener` heard it within `from..to`, in
    /// 20 ms blocks.
    pub fn longest_gap(
        &self,
        listener: usize,
        talker: usize,
        from: Duration,
        to: Duration,
    ) -> Duration {
        let hz = self.users[talker].tone_hz;
        self.users[listener]
            .ear
            .longest_gap(hz, from, to)
            .unwrap_or_else(|| panic!("user {listener} has no measured audio in {from:?}..{to:?}"))
    }

    pub fn connect(&mut self, user: usize) {
        let now = self.now;
        self.users[user].client.connect(now);
        self.pump(user);
    }

    pub fn join(&mut self, user: usize, channel: &str) {
        let now = self.now;
        self.users[user].client.join(now, channel);
        self.pump(user);
    }

    pub fn leave(&mut self, user: usize) {
        let now = self.now;
        self.users[user].client.leave(now);
        self.pump(user);
    }

    /// Starts or stops talking (push-to-talk held with the user's tone at the microphone, or
    /// released with silence).
    pub fn set_talking(&mut self, user: usize, talking: bool) {
        let now = self.now;
        let u = &mut self.users[user];
        u.talking = talking;
        u.client.set_talking(now, talking);
    }

    /// `user` sends a chat message to its channel (to the members it knows now); returns how
    /// many members it was queued for.
    pub fn send_chat(&mut self, user: usize, text: &str) -> usize {
        let now = self.now;
        let sent = self.users[user]
            .client
            .send_chat(now, text)
            .expect("a valid chat message");
        self.pump(user);
        sent.to.len()
    }

    /// The chat messages `user` received since the last call: (sender's name, text, sent ms).
    pub fn take_chat(&mut self, user: usize) -> Vec<(String, String, u64)> {
        self.users[user]
            .client
            .take_chat()
            .into_iter()
            .map(|m| (m.from_name, m.text, m.sent_ms))
            .collect()
    }

    pub fn set_control_latency(&mut self, user: usize, d: Duration) {
        self.users[user].control_latency = d;
    }

    pub fn set_link(&mut self, user: usize, link: LinkProfile) {
        self.net.set_link(user, link);
    }

    /// The server process dies: every open connection breaks (clients see it one latency
    /// later) and its UDP port goes quiet.
    pub fn stop_server(&mut self) {
        self.server = None;
        for i in 0..self.users.len() {
            if let Some(conn) = self.users[i].conn {
                self.schedule(
                    self.users[i].control_latency,
                    Control::Lost { user: i, conn },
                );
            }
        }
    }

    /// A fresh server process starts: no sessions, user ids counted from the start again.
    pub fn start_server(&mut self) {
        self.server = Some(SimServer::new(&CHANNELS, self.server_relays));
    }

    /// Runs the world for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.process_due();
            let next = self.next_due();
            self.now = if next <= self.now {
                self.now + MIN_STEP
            } else {
                next
            }
            .min(end);
        }
    }

    // --- what tests look at ---

    pub fn user_id(&self, user: usize) -> Option<UserId> {
        self.users[user].client.user_id()
    }

    pub fn voice_self_id(&self, user: usize) -> Option<UserId> {
        self.users[user].client.voice_self_id(self.now)
    }

    pub fn channel(&self, user: usize) -> Option<&str> {
        self.users[user].client.channel()
    }

    pub fn is_ready(&self, user: usize) -> bool {
        self.users[user].client.is_ready()
    }

    pub fn public_addr(&self, user: usize) -> Option<SocketAddr> {
        self.users[user].client.public_addr()
    }

    /// How `user` sees its link to the user at index `other` (by the id `other` has now).
    pub fn path(&self, user: usize, other: usize) -> Option<PeerPath> {
        let id = self.user_id(other)?;
        self.users[user]
            .client
            .peer_paths(self.now)
            .into_iter()
            .find(|(p, _)| *p == id)
            .map(|(_, path)| path)
    }

    /// The loss the user at index `listener` last reported of `talker`'s voice (`None`: no
    /// fresh Report reached `talker`).
    pub fn reported_loss(&self, talker: usize, listener: usize) -> Option<f32> {
        let id = self.user_id(listener)?;
        self.users[talker].client.reported_loss(self.now, id)
    }

    /// Amplitude of `talker`'s tone in what `listener` heard between `from` and `to`.
    ///
    /// Panics if no 100 ms block of `listener`'s output lies within the window (each user's
    /// blocks start at its own audio clock offset), rather than report silence.
    pub fn hears(&self, listener: usize, talker: usize, from: Duration, to: Duration) -> f32 {
        let hz = self.users[talker].tone_hz;
        self.users[listener]
            .ear
            .level(hz, from, to)
            .unwrap_or_else(|| panic!("user {listener} has no measured audio in {from:?}..{to:?}"))
    }

    pub fn frames_sent(&self, user: usize) -> u64 {
        self.users[user].client.frames_sent(self.now)
    }

    pub fn undecryptable(&self, user: usize) -> u64 {
        self.users[user].client.undecryptable(self.now)
    }

    /// Datagrams `user` refused to forward as a member relay.
    pub fn relay_refused(&self, user: usize) -> u64 {
        self.users[user].client.relay_refused(self.now)
    }

    pub fn net_stats(&self) -> NetStats {
        self.net.stats()
    }

    /// A digest of every datagram and control message delivered (with its time) and every
    /// 100 ms of every user's hearing: equal digests mean equal runs.
    pub fn digest(&mut self) -> u64 {
        let mut d = self.digest;
        for u in &self.users {
            for (start, amps) in u.ear.blocks() {
                d.add(&start.as_nanos().to_le_bytes());
                for a in amps {
                    d.add(&a.to_bits().to_le_bytes());
                }
            }
        }
        d.0
    }

    // --- the loop ---

    fn schedule(&mut self, after: Duration, what: Control) {
        self.control_seq += 1;
        let key = (self.now + after, what.rank(), self.control_seq);
        self.control.insert(key, what);
    }

    /// The earliest moment anything is due.
    fn next_due(&self) -> Duration {
        let mut due = self.net.next_arrival().unwrap_or(Duration::MAX);
        if let Some((&(at, _, _), _)) = self.control.first_key_value() {
            due = due.min(at);
        }
        if let Some(t) = self.server.as_ref().and_then(|s| s.poll_timeout()) {
            due = due.min(t);
        }
        for u in &self.users {
            due = due.min(u.next_capture).min(u.next_playout);
            if let Some(t) = u.client.poll_timeout() {
                due = due.min(t);
            }
        }
        due
    }

    /// Handles everything due by now, in a fixed order: control arrivals, datagram arrivals,
    /// the server's tick, then each user's timers, capture and playout.
    fn process_due(&mut self) {
        let now = self.now;
        while let Some(entry) = self.control.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let what = entry.remove();
            self.deliver_control(what);
        }
        while let Some(d) = self.net.pop_due(now) {
            self.digest.add(&d.at.as_nanos().to_le_bytes());
            self.digest.add(d.from.to_string().as_bytes());
            self.digest.add(&d.bytes);
            match d.to {
                Node::Server => {
                    let Some((replies, outs)) =
                        self.server.as_mut().map(|s| s.udp(now, d.from, &d.bytes))
                    else {
                        continue;
                    };
                    for (to, reply) in replies {
                        self.net.send(now, Node::Server, to, &reply);
                    }
                    self.server_outputs(outs);
                }
                Node::Client(i) => {
                    self.users[i].client.handle_datagram(now, d.from, &d.bytes);
                    self.pump(i);
                }
            }
        }
        if let Some(server) = &mut self.server {
            if server.poll_timeout().is_some_and(|t| t <= now) {
                let outs = server.handle_timeout(now);
                self.server_outputs(outs);
            }
        }
        for i in 0..self.users.len() {
            if self.users[i]
                .client
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.users[i].client.handle_timeout(now);
                self.pump(i);
            }
            while self.users[i].next_capture <= now {
                self.capture(i);
                self.pump(i);
            }
            while self.users[i].next_playout <= now {
                let u = &mut self.users[i];
                let at = u.next_playout;
                u.client.playout(at, &mut self.mix_buf);
                u.ear.hear(&self.mix_buf);
                u.next_playout += PLAYOUT_PERIOD;
            }
        }
    }

    /// One captured frame: the user's tone while talking, silence otherwise.
    fn capture(&mut self, i: usize) {
        let u = &mut self.users[i];
        let at = u.next_capture;
        let n = u.client.frame_samples();
        let step = u.tone_hz / SAMPLE_RATE as f32;
        let talking = u.talking;
        let pcm: Vec<f32> = (0..n)
            .map(|_| {
                u.phase = (u.phase + step).fract();
                if talking {
                    TONE_AMPLITUDE * (u.phase * std::f32::consts::TAU).sin()
                } else {
                    0.0
                }
            })
            .collect();
        u.client.capture(at, &pcm);
        u.next_capture += u.client.frame_duration();
    }

    /// Drains what user `i`'s cores want done: control actions and datagrams.
    fn pump(&mut self, i: usize) {
        let now = self.now;
        // Datagrams first: what the engine tunnels becomes control messages sent below.
        while let Some(t) = self.users[i].client.poll_transmit(now, &mut self.tx_buf) {
            self.net
                .send(now, Node::Client(i), t.to, &self.tx_buf[..t.len]);
        }
        while let Some(out) = self.users[i].client.poll_control() {
            let lat = self.users[i].control_latency;
            match out {
                ControlOut::Open => {
                    let conn = self.next_conn;
                    self.next_conn += 1;
                    self.conn_owner.insert(conn, i);
                    self.users[i].conn = Some(conn);
                    self.schedule(lat, Control::Syn { user: i, conn });
                }
                ControlOut::Send(msg) => {
                    if let Some(conn) = self.users[i].conn {
                        self.schedule(lat, Control::ToServer { conn, msg });
                    }
                }
                ControlOut::Close => {
                    if let Some(conn) = self.users[i].conn.take() {
                        self.schedule(lat, Control::Fin { conn });
                    }
                }
            }
        }
        // Sorted: the session reports some batches (peers gone) in hash-map order.
        let mut log = self.users[i].client.take_log();
        log.sort();
        for line in log {
            self.digest.add(line.as_bytes());
        }
    }

    fn deliver_control(&mut self, what: Control) {
        let now = self.now;
        self.digest.add(format!("{now:?} {what:?}").as_bytes());
        match what {
            Control::Syn { user, conn } => {
                let lat = self.users[user].control_latency;
                let token = self.rng.next_u64();
                let ip = self.net.public_ip(user);
                match &mut self.server {
                    Some(server) => {
                        server.opened(now, conn, token, ip);
                        self.schedule(lat, Control::Connected { user, conn });
                    }
                    // Nobody listens: the connection is refused.
                    None => self.schedule(lat, Control::Lost { user, conn }),
                }
            }
            Control::Connected { user, conn } => {
                if self.users[user].conn == Some(conn) {
                    self.users[user].client.transport_connected(now);
                    self.pump(user);
                }
            }
            Control::Lost { user, conn } => {
                if self.users[user].conn == Some(conn) {
                    self.users[user].conn = None;
                    self.users[user]
                        .client
                        .transport_lost(now, "connection reset");
                    self.pump(user);
                }
            }
            Control::ToServer { conn, msg } => {
                let Some((datagrams, outs)) =
                    self.server.as_mut().map(|s| s.handle(now, conn, msg))
                else {
                    return;
                };
                for (to, bytes) in datagrams {
                    self.net.send(now, Node::Server, to, &bytes);
                }
                self.server_outputs(outs);
            }
            Control::ToClient { user, conn, msg } => {
                if self.users[user].conn == Some(conn) {
                    self.users[user].client.handle_message(now, msg);
                    self.pump(user);
                }
            }
            Control::Fin { conn } => {
                let outs = self.server.as_mut().map(|s| s.closed(now, conn));
                self.server_outputs(outs.unwrap_or_default());
            }
        }
    }

    fn server_outputs(&mut self, outs: Vec<ServerOut>) {
        for out in outs {
            match out {
                ServerOut::Send(conn, mut msg) => {
                    if let Some(&user) = self.conn_owner.get(&conn) {
                        if let Some(f) = &mut self.hostile {
                            f(user, &mut msg);
                        }
                        let lat = self.users[user].control_latency;
                        self.schedule(lat, Control::ToClient { user, conn, msg });
                    }
                }
                ServerOut::Close(conn, reason) => {
                    if let Some(&user) = self.conn_owner.get(&conn) {
                        let lat = self.users[user].control_latency;
                        let msg = ServerMsg::Closing { reason };
                        self.schedule(lat, Control::ToClient { user, conn, msg });
                        self.schedule(lat, Control::Lost { user, conn });
                    }
                }
            }
        }
    }
}
