//! The voice thread: the I/O shell around [`VoiceEngine`].
//!
//! It owns the UDP socket and the audio path, and sleeps in one `mio` poll until the socket is
//! readable, the audio device thread has moved samples through the rings, ECS sent a command,
//! or the engine's [`VoiceEngine::poll_timeout`] is due: no fixed wake-up. Each time it wakes
//! it feeds the engine (datagrams, captured frames, timers), drains every datagram the engine
//! wants sent, and tops the playback ring up with mixed audio. It runs apart from the Bevy
//! frame loop so voice latency does not depend on the window's frame rate (a vsync'd frame
//! can take 16 ms; the latency budget is 60 ms end to end). ECS talks to it through bounded
//! crossbeam channels: [`VoiceCommand`] in, [`VoiceEvent`] out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use thiserror::Error;

use super::engine::VoiceSetting;
use super::engine::{ChatEvent, VoiceConfig, VoiceEngine, VoiceSnapshot, MAX_DATAGRAM_LEN};
use super::net::impair::{ImpairConfig, Impairment};
use super::net::portmap::{AnnouncedMapping, MapEvent};
use super::port_mapping::PortMapper;
use crate::audio::{AudioConfig, AudioEvent, AudioIo, InputSource, OutputSink, RingWake};
use crate::protocol::{addr, PeerInfo, UserId};

/// How often a [`VoiceSnapshot`] is published to ECS.
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(100);
/// The playback ring is topped up with a new 10 ms mix whenever less than this is queued:
/// one 10 ms device chunk. Each sample then waits 5-15 ms in the ring, the output side of the
/// latency budget; the device thread wakes the voice loop each time it takes samples, so the
/// device never finds the ring empty.
const PLAYBACK_LOW_WATER_SAMPLES: usize = crate::audio::CHUNK_SAMPLES;
/// Poll tokens of the voice loop.
const SOCKET: mio::Token = mio::Token(0);
const WAKE: mio::Token = mio::Token(1);

/// Everything ECS asks of the voice plane: the one command type from the UI boundary to the
/// voice thread. It is also the Bevy event the UI and the control plane write, so a new
/// user-facing setting is one [`VoiceSetting`] variant and one engine arm, nothing else.
#[derive(bevy::prelude::Event, Debug, Clone, PartialEq)]
pub enum VoiceCommand {
    /// The server gave us this user id.
    SetSelfId(UserId),
    /// The server's UDP address, our registration token, and whether it relays.
    SetServer {
        addr: SocketAddr,
        token: u64,
        relay: bool,
    },
    /// A channel member's endpoints and key, new or changed.
    UpsertPeer(PeerInfo),
    /// A member left the channel.
    RemovePeer(UserId),
    /// We left the channel or the server refused us for good: end every link.
    ClearPeers,
    /// A change the user made (mute, push-to-talk, a peer's volume ...).
    Setting(VoiceSetting),
    /// Capture from another source.
    SwitchInput(InputSource),
    /// Play to another sink.
    SwitchOutput(OutputSink),
    /// A datagram the server sent through the control connection (our UDP is blocked).
    Tunnelled(Vec<u8>),
    /// The port-mapping thread's news: the router mapped our port (announce that address as
    /// a candidate) or the mapping is gone. Sent by that thread, not by ECS.
    PortMapping(MapEvent),
    /// Send a chat message to the channel's members, written at `sent_ms` (Unix ms, the
    /// sender's wall clock: the time shown with it). The outcome comes back as
    /// [`VoiceEvent::Chat`].
    SendChat { text: String, sent_ms: u64 },
}

/// What the voice thread reports.
#[derive(Debug, Clone)]
pub enum VoiceEvent {
    /// Our UDP socket's local candidate addresses (announced to the server for LAN peers).
    LocalEndpoints {
        addrs: Vec<SocketAddr>,
        voice_key: [u8; 32],
    },
    /// Boxed: it is by far the largest event, and sent only every few hundred ms.
    Snapshot(Box<VoiceSnapshot>),
    Audio(AudioEvent),
    /// A device switch failed; the previous device keeps running.
    SwitchFailed(String),
    /// A datagram for the server to send through the control connection (our UDP to the
    /// server is blocked).
    Tunnel(Vec<u8>),
    /// A chat message arrived, or ours was sent or refused.
    Chat(ChatEvent),
}

/// Most chat events held back while the events channel is full (ECS not reading); beyond it
/// the oldest go. Chat is not dropped at the first full channel like a snapshot: a message
/// the sender saw acknowledged must still reach the screen.
const MAX_CHAT_BACKLOG: usize = 1024;

#[derive(Debug, Error)]
pub enum VoiceError {
    #[error("cannot open the voice UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("audio: {0}")]
    Audio(#[from] crate::audio::AudioError),
    #[error("codec: {0}")]
    Codec(#[from] super::codec::CodecError),
    #[error("cannot start the voice thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot set up the voice thread's poll: {0}")]
    Poll(std::io::Error),
}

/// Handle to the running voice thread. Dropping it stops the thread.
pub struct VoiceThread {
    commands: Sender<VoiceCommand>,
    waker: Arc<mio::Waker>,
    events: Receiver<VoiceEvent>,
    stop: Sender<Sender<VoiceSnapshot>>,
    join: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
    audio_started: std::time::SystemTime,
    /// Maps our port on the router (`None` when switched off or it could not start).
    port_mapper: Option<PortMapper>,
}

/// Sends commands to the voice thread from any thread.
#[derive(Clone)]
pub struct VoiceCommander {
    commands: Sender<VoiceCommand>,
    waker: Arc<mio::Waker>,
}

impl VoiceCommander {
    /// Sends a command and wakes the thread; false if it is gone or hopelessly behind.
    pub fn send(&self, cmd: VoiceCommand) -> bool {
        let sent = self.commands.try_send(cmd).is_ok();
        let _ = self.waker.wake();
        sent
    }
}

/// Options of the voice thread.
#[derive(Debug, Clone)]
pub struct VoiceThreadConfig {
    pub voice: VoiceConfig,
    pub input: InputSource,
    pub output: OutputSink,
    pub audio: AudioConfig,
    /// Local address to bind the voice socket to (port 0 = any; `[::]`, the default, takes
    /// IPv6 and IPv4).
    pub bind: SocketAddr,
    /// Simulated bad network on received datagrams (tests, benchmarks).
    pub impair: Option<ImpairConfig>,
    /// Ask the router to map the voice port (PCP, NAT-PMP, UPnP-IGD) and announce the mapped
    /// address. Off unless asked for: the CLI turns it on for the desktop app
    /// (`--port-mapping`); tests and benchmarks must not talk to the machine's router.
    pub port_mapping: bool,
}

impl Default for VoiceThreadConfig {
    fn default() -> Self {
        Self {
            voice: VoiceConfig::default(),
            input: InputSource::Device(None),
            output: OutputSink::Device(None),
            audio: AudioConfig::default(),
            bind: SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            impair: None,
            port_mapping: false,
        }
    }
}

impl VoiceThread {
    pub fn spawn(cfg: VoiceThreadConfig) -> Result<Self, VoiceError> {
        let poll = mio::Poll::new().map_err(VoiceError::Poll)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE).map_err(VoiceError::Poll)?);
        let ring_waker = Arc::clone(&waker);
        let mut audio_cfg = cfg.audio.clone();
        audio_cfg.ring_wake = Some(RingWake(Arc::new(move || {
            let _ = ring_waker.wake();
        })));
        // The devices open first (PulseAudio takes up to two seconds), then the socket: bound
        // before, it collected every peer's voice of that time, which the jitter buffer then
        // got all at once.
        let mut audio = AudioIo::start(&cfg.input, &cfg.output, audio_cfg)?;
        let audio_started = std::time::SystemTime::now();
        // `[::]` takes IPv6 and IPv4 (Linux's default); without IPv6 on the machine, IPv4.
        let socket = match UdpSocket::bind(cfg.bind) {
            Err(_) if cfg.bind.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => UdpSocket::bind(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), cfg.bind.port()),
            ),
            other => other,
        }
        .map_err(VoiceError::Socket)?;
        socket.set_nonblocking(true).map_err(VoiceError::Socket)?;
        let local_addr = socket.local_addr().map_err(VoiceError::Socket)?;
        let mut socket = mio::net::UdpSocket::from_std(socket);
        poll.registry()
            .register(&mut socket, SOCKET, mio::Interest::READABLE)
            .map_err(VoiceError::Poll)?;
        let seed = rand::random::<u64>();
        let engine = VoiceEngine::new(cfg.voice.clone(), seed)?;
        let (cmd_tx, cmd_rx) = crossbeam_channel::bounded(256);
        let (ev_tx, ev_rx) = crossbeam_channel::bounded(256);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        // In parallel with everything else: the call never waits for the router.
        let port_mapper = if cfg.port_mapping {
            let (commands, waker) = (cmd_tx.clone(), Arc::clone(&waker));
            PortMapper::spawn(local_addr.port(), move |ev| {
                let _ = commands.try_send(VoiceCommand::PortMapping(ev));
                let _ = waker.wake();
            })
            .map_err(|e| bevy::log::debug!("port mapping: cannot start its thread: {e}"))
            .ok()
        } else {
            None
        };
        let capture = audio
            .take_capture()
            .expect("fresh AudioIo has its capture ring");
        let playback = audio
            .take_playback()
            .expect("fresh AudioIo has its playback ring");
        let join = std::thread::Builder::new()
            .name("voice".into())
            .spawn(move || {
                let mut w = Worker {
                    engine,
                    socket,
                    poll,
                    audio,
                    capture,
                    playback,
                    local: local_addr,
                    commands: cmd_rx,
                    events: ev_tx,
                    stop: stop_rx,
                    start: Instant::now(),
                    impair: cfg.impair.map(Impairment::new),
                    server: None,
                    mapping: None,
                    announced_key: None,
                    chat_backlog: std::collections::VecDeque::new(),
                };
                w.run();
            })
            .map_err(VoiceError::Thread)?;
        Ok(Self {
            commands: cmd_tx,
            waker,
            events: ev_rx,
            stop: stop_tx,
            join: Some(join),
            local_addr,
            audio_started,
            port_mapper,
        })
    }

    /// The voice socket's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Wall-clock time at which the audio path started: virtual inputs and outputs (WAV, tone)
    /// begin their sample 0 within a couple of milliseconds of it. Used to line up one client's
    /// input with another's output when measuring mouth-to-ear latency.
    pub fn audio_started(&self) -> std::time::SystemTime {
        self.audio_started
    }

    /// Sends a command; false if the thread is gone or hopelessly behind.
    pub fn send(&self, cmd: VoiceCommand) -> bool {
        self.commander().send(cmd)
    }

    /// A handle other threads can send commands with, without going through a Bevy frame
    /// (the global push-to-talk key must reach the voice thread while the window is hidden).
    pub fn commander(&self) -> VoiceCommander {
        VoiceCommander {
            commands: self.commands.clone(),
            waker: Arc::clone(&self.waker),
        }
    }

    pub fn events(&self) -> &Receiver<VoiceEvent> {
        &self.events
    }

    /// Stops the thread (closing audio devices and finalizing WAV output) and returns the last
    /// snapshot.
    pub fn shutdown(&mut self) -> Option<VoiceSnapshot> {
        let join = self.join.take()?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.stop.send(tx);
        let _ = self.waker.wake();
        let snap = rx.recv_timeout(Duration::from_secs(5)).ok();
        let _ = join.join();
        // The router's mapping goes with the socket it pointed at.
        if let Some(mut mapper) = self.port_mapper.take() {
            mapper.shutdown();
        }
        snap
    }
}

impl Drop for VoiceThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The local addresses peers on our LAN may reach us at: the source address used to reach
/// `towards` (the server), then our address of the other IP family if we have one (a global
/// IPv6 address next to IPv4, or the reverse), for peers who only have that family; loopback
/// when the server is local.
pub fn local_candidates(port: u16, towards: SocketAddr) -> Vec<SocketAddr> {
    if towards.ip().is_loopback() {
        return vec![SocketAddr::new(towards.ip(), port)];
    }
    // Only the route is looked up (connect() on UDP sends nothing); documentation addresses
    // stand for "anywhere" in the other family.
    let other_family: SocketAddr = if towards.is_ipv4() {
        (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9).into()
    } else {
        (Ipv4Addr::new(192, 0, 2, 1), 9).into()
    };
    let mut out = Vec::new();
    for target in [towards, other_family] {
        let Some(ip) = route_source(target) else {
            continue;
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        let candidate = SocketAddr::new(ip, port);
        if !ip.is_loopback() && !link_local && !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    out
}

/// The source address the kernel would use to reach `target`, if it has a route there.
pub(crate) fn route_source(target: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = UdpSocket::bind(any).ok()?;
    probe.connect(target).ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

struct Worker {
    engine: VoiceEngine,
    socket: mio::net::UdpSocket,
    poll: mio::Poll,
    audio: AudioIo,
    capture: crate::audio::CaptureRing,
    playback: crate::audio::PlaybackRing,
    /// The socket's own address (its family decides how destinations are written).
    local: SocketAddr,
    commands: Receiver<VoiceCommand>,
    events: Sender<VoiceEvent>,
    stop: Receiver<Sender<VoiceSnapshot>>,
    start: Instant,
    impair: Option<Impairment>,
    /// The server's UDP address, once known: our local candidates are the ones towards it.
    server: Option<SocketAddr>,
    /// The router's mapping of our port, announced as one more candidate.
    mapping: Option<AnnouncedMapping>,
    /// The voice key last announced: the engine takes a new one for every join, which must
    /// then be announced too.
    announced_key: Option<[u8; 32]>,
    /// Chat events waiting for room in the events channel.
    chat_backlog: std::collections::VecDeque<ChatEvent>,
}

impl Worker {
    /// The engine's snapshot with the audio path's counters and the port mapping, which only
    /// this thread sees.
    fn snapshot(&self, now: Duration) -> VoiceSnapshot {
        let mut snap = self.engine.snapshot(now);
        snap.audio = self.audio.stats();
        snap.port_mapping = self.mapping;
        snap
    }

    /// Tells ECS our candidates (for the server to announce): the local ones towards the
    /// server, then the router's mapping of our port.
    fn announce_endpoints(&mut self) {
        let (Some(server), Ok(local)) = (self.server, self.socket.local_addr()) else {
            return;
        };
        let mut addrs = local_candidates(local.port(), server);
        if let Some(m) = self.mapping {
            if !addrs.contains(&m.lease.external) {
                addrs.push(m.lease.external);
            }
        }
        let voice_key = self.engine.public_key();
        self.announced_key = Some(voice_key);
        self.publish(VoiceEvent::LocalEndpoints { addrs, voice_key });
    }

    /// Announces our endpoints again if the engine took a new voice key (a new join).
    fn announce_new_key(&mut self) {
        if self
            .announced_key
            .is_some_and(|k| k != self.engine.public_key())
        {
            self.announce_endpoints();
        }
    }

    fn publish(&self, ev: VoiceEvent) {
        // Bounded: if ECS is not reading (window minimised, app exiting), drop rather than block.
        if let Err(TrySendError::Full(_)) = self.events.try_send(ev) {}
    }

    /// Hands the engine's chat events to ECS, keeping what does not fit for later.
    fn publish_chat(&mut self) {
        while let Some(ev) = self.engine.poll_chat_event() {
            self.chat_backlog.push_back(ev);
        }
        while self.chat_backlog.len() > MAX_CHAT_BACKLOG {
            self.chat_backlog.pop_front();
        }
        while let Some(ev) = self.chat_backlog.pop_front() {
            if let Err(e) = self.events.try_send(VoiceEvent::Chat(ev)) {
                if let VoiceEvent::Chat(ev) = e.into_inner() {
                    self.chat_backlog.push_front(ev);
                }
                break;
            }
        }
    }

    /// Sends every datagram the engine has ready.
    fn flush(&mut self, now: Duration, buf: &mut [u8]) {
        while let Some(t) = self.engine.poll_transmit(now, buf) {
            // A full socket buffer or an ICMP error from a vanished peer loses one datagram;
            // the voice stream and the links' retries cope with that.
            let _ = self
                .socket
                .send_to(&buf[..t.len], addr::for_socket(t.to, self.local));
        }
        while let Some(datagram) = self.engine.poll_tunnel() {
            self.publish(VoiceEvent::Tunnel(datagram));
        }
    }

    fn run(&mut self) {
        let frame = self.engine.frame().samples();
        let mut cap = vec![0.0f32; frame];
        let mut mix = vec![0.0f32; crate::audio::CHUNK_SAMPLES];
        let mut buf = [0u8; 2048];
        let mut out = [0u8; MAX_DATAGRAM_LEN];
        let mut events = mio::Events::with_capacity(8);
        let mut next_snapshot = Duration::ZERO;
        loop {
            let now = self.start.elapsed();
            if let Ok(reply) = self.stop.try_recv() {
                let _ = reply.send(self.snapshot(now));
                let _ = self.audio.stop();
                return;
            }
            while let Ok(cmd) = self.commands.try_recv() {
                self.apply(now, cmd);
            }
            while let Ok(ev) = self.audio.events().try_recv() {
                self.publish(VoiceEvent::Audio(ev));
            }
            // Receive until the socket would block (edge-triggered poll: drain it all). Other
            // errors (ICMP unreachable from a vanished peer) are skipped.
            for _ in 0..4096 {
                match self.socket.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        let from = addr::canonical(from);
                        let now = self.start.elapsed();
                        match &mut self.impair {
                            Some(imp) => imp.push(now, from, &buf[..n]),
                            None => self.engine.handle_datagram(now, from, &buf[..n]),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {}
                }
            }
            let now = self.start.elapsed();
            if let Some(imp) = &mut self.impair {
                while let Some((from, bytes)) = imp.pop_due(now) {
                    self.engine.handle_datagram(now, from, &bytes);
                }
            }
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
            self.flush(now, &mut out);
            // Send side: every complete captured frame.
            while self.capture.available() >= frame {
                self.capture.pop_into(&mut cap);
                self.engine.handle_capture(now, &cap);
                self.flush(now, &mut out);
            }
            // Playout side: keep the device fed, with as little queued as is safe.
            while self.playback.queued() < PLAYBACK_LOW_WATER_SAMPLES
                && self.playback.free() >= mix.len()
            {
                self.engine.playout_frame(now, &mut mix);
                self.playback.push(&mix);
            }
            self.publish_chat();
            if now >= next_snapshot {
                next_snapshot = now + SNAPSHOT_INTERVAL;
                self.publish(VoiceEvent::Snapshot(Box::new(self.snapshot(now))));
            }
            // Sleep until something happens or a timer is due.
            let due = [
                self.engine.poll_timeout(),
                self.impair.as_ref().and_then(|i| i.next_due()),
                Some(next_snapshot),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_snapshot);
            let wait = due.saturating_sub(self.start.elapsed());
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    // Without a working poll, fall back to a short sleep rather than spin.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    fn apply(&mut self, now: Duration, cmd: VoiceCommand) {
        match cmd {
            VoiceCommand::SetSelfId(id) => {
                self.engine.set_self_id(id);
                self.announce_new_key();
            }
            VoiceCommand::SetServer { addr, token, relay } => {
                self.engine.set_server(now, addr, token);
                self.engine.set_server_relays(relay);
                self.server = Some(addr);
                self.announce_endpoints();
            }
            VoiceCommand::PortMapping(ev) => {
                self.mapping = match ev {
                    MapEvent::Mapped(lease) => Some(AnnouncedMapping { lease, since: now }),
                    MapEvent::Withdrawn => None,
                };
                self.announce_endpoints();
            }
            VoiceCommand::UpsertPeer(p) => self.engine.upsert_peer(now, &p),
            VoiceCommand::RemovePeer(id) => self.engine.remove_peer(id),
            VoiceCommand::ClearPeers => {
                self.engine.clear_peers();
                self.announce_new_key();
            }
            VoiceCommand::Tunnelled(datagram) => self.engine.handle_tunnelled(now, &datagram),
            VoiceCommand::Setting(s) => self.engine.apply(now, s),
            VoiceCommand::SendChat { text, sent_ms } => {
                let ev = match self.engine.send_chat(now, sent_ms, &text) {
                    Ok(result) => ChatEvent::Sent {
                        text,
                        sent_ms,
                        result,
                    },
                    Err(reason) => ChatEvent::Refused { text, reason },
                };
                self.chat_backlog.push_back(ev);
            }
            // Never wait for the device thread here: opening a device can take seconds, and
            // meanwhile nothing would be played, sent or kept alive. The outcome comes back
            // as an audio event.
            VoiceCommand::SwitchInput(src) => {
                if let Err(e) = self.audio.request_input(src) {
                    self.publish(VoiceEvent::SwitchFailed(e.to_string()));
                }
            }
            VoiceCommand::SwitchOutput(sink) => {
                if let Err(e) = self.audio.request_output(sink) {
                    self.publish(VoiceEvent::SwitchFailed(e.to_string()));
                }
            }
        }
    }
}
