//! `VoiceEngine`: the whole voice plane of one client as pure logic.
//!
//! It ties together the peer links (hole punching, keepalives), the capture chain and encoder
//! on the sending side, and one jitter buffer + decoder per peer and the mixer on the receiving
//! side. It owns no socket, no thread and no clock: the voice thread (`thread.rs`) feeds it
//! datagrams, capture frames and playout requests with the current time, and sends what it
//! returns. Everything here is therefore testable with simulated time and a simulated network.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use super::capture::{CaptureChain, CaptureConfig, TransmitMode};
use super::codec::{is_dtx_payload, CodecError, FrameDuration, OpusEncoder};
use super::crypto::{fingerprint, CryptoError, PeerCipher, SessionKeys, TAG_LEN};
use super::jitter::JitterConfig;
use super::levels::rms_dbfs;
use super::link::{LinkConfig, LinkState};
use super::mixer::{MixInput, Mixer};
use super::peers::{DropCounters, Incoming, PeerTable};
use super::receiver::{PeerReceiver, PlayoutKind};
use crate::protocol::datagram::{Datagram, MAX_VOICE_PAYLOAD, PEER_CONTROL_LEN, VOICE_HEADER_LEN};
use crate::protocol::{PeerInfo, UserId};

/// How often the UDP registration with the server is repeated once acknowledged (keeps our
/// NAT mapping towards the server alive, and re-learns the address if it changes).
const REGISTER_REFRESH: Duration = Duration::from_secs(15);
/// Registration retry while unacknowledged.
const REGISTER_RETRY: Duration = Duration::from_millis(250);
/// A peer counts as speaking for this long after its last decoded audible frame.
const SPEAKING_HOLD: Duration = Duration::from_millis(250);
/// Level under which decoded audio does not count as speech for the speaking indicator.
const SPEAKING_FLOOR_DB: f32 = -50.0;

/// Settings of the voice plane.
#[derive(Debug, Clone)]
pub struct VoiceConfig {
    /// Frame duration we capture and send with (peers may use another; we adapt per peer).
    pub frame: FrameDuration,
    pub bitrate_bps: u32,
    pub capture: CaptureConfig,
    pub link: LinkConfig,
}

impl Default for VoiceConfig {
    fn default() -> Self {
        Self::for_frame(FrameDuration::Ms20)
    }
}

impl VoiceConfig {
    pub fn for_frame(frame: FrameDuration) -> Self {
        Self {
            frame,
            bitrate_bps: 24_000,
            capture: CaptureConfig::for_frame(frame),
            link: LinkConfig::default(),
        }
    }
}

/// Link state of one peer as shown to people.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerState {
    Punching,
    Direct(SocketAddr),
    Unreachable(String),
}

/// Figures of one peer for the UI, the headless summary and the benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSnapshot {
    pub user_id: UserId,
    pub name: String,
    pub state: PeerState,
    pub rtt_ms: Option<f32>,
    pub loss_pct: f32,
    pub jitter_ms: f32,
    pub buffer_ms: f32,
    pub target_ms: f32,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub frames_decoded: u64,
    pub frames_fec: u64,
    /// Frames played by concealment: lost ones, and the ones inserted to raise the delay
    /// (`frames_stretched` of them).
    pub frames_concealed: u64,
    /// Frames inserted to raise the delay to a higher target.
    pub frames_stretched: u64,
    /// Frames dropped to bring the delay down to the target (or skipped at a talkspurt start).
    pub frames_dropped: u64,
    pub late: u64,
    pub duplicates: u64,
    pub speaking: bool,
    pub level_db: f32,
    /// Short fingerprint of the peer's voice key, to compare by other means.
    pub fingerprint: Option<String>,
    /// Voice datagrams from this peer that failed authentication.
    pub auth_failures: u64,
}

/// Everything the rest of the app wants to know about the voice plane, taken periodically.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VoiceSnapshot {
    pub self_id: Option<UserId>,
    pub input_level_db: f32,
    pub vad_threshold_db: f32,
    pub speaking: bool,
    pub transmitting: bool,
    pub muted: bool,
    pub deafened: bool,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub public_addr: Option<SocketAddr>,
    pub drops: DropCounters,
    pub peers: Vec<PeerSnapshot>,
    /// Recent level of the channel mix, dBFS.
    pub mix_level_db: f32,
    /// Fingerprint of our own voice key.
    pub fingerprint: String,
    /// Voice and peer-control datagrams dropped because no key was known for their sender or
    /// they did not authenticate (spoofed punches land here).
    pub undecryptable: u64,
    /// `RegisterAck`s that did not come from the server's address: ignored, since anyone could
    /// otherwise tell us a false public address to announce.
    pub foreign_register_acks: u64,
}

/// Per-peer receive side: jitter buffer + decoder, a small PCM queue to bridge the peer's frame
/// size and ours, and local playback settings.
struct PeerAudio {
    receiver: PeerReceiver,
    frame: FrameDuration,
    pcm: VecDeque<f32>,
    scratch: Vec<f32>,
    out: Vec<f32>,
    volume: f32,
    muted: bool,
    last_audible: Option<Duration>,
    level_db: f32,
    decoded: u64,
    fec: u64,
    concealed: u64,
}

impl PeerAudio {
    fn new(frame: FrameDuration) -> Result<Self, CodecError> {
        Ok(Self {
            receiver: PeerReceiver::with_config(JitterConfig::for_frame(frame))?,
            frame,
            pcm: VecDeque::with_capacity(4 * 960),
            scratch: vec![0.0; frame.samples()],
            out: vec![0.0; PLAYOUT_CHUNK],
            volume: 1.0,
            muted: false,
            last_audible: None,
            level_db: -120.0,
            decoded: 0,
            fec: 0,
            concealed: 0,
        })
    }

    /// Produces our next playout frame into `self.out`.
    fn render(&mut self, now: Duration) {
        let want = self.out.len();
        let mut audible = false;
        while self.pcm.len() < want {
            let kind = self.receiver.pop_pcm(now, &mut self.scratch);
            match kind {
                PlayoutKind::Decoded => self.decoded += 1,
                PlayoutKind::Fec => self.fec += 1,
                PlayoutKind::Concealed => self.concealed += 1,
                PlayoutKind::Silence => {}
            }
            if matches!(kind, PlayoutKind::Decoded | PlayoutKind::Fec) {
                audible = true;
            }
            if kind == PlayoutKind::Silence && !self.receiver.is_playing() {
                // Waiting for a talkspurt: hand out silence one playout chunk at a time, so
                // the first frame can start on any 10 ms boundary instead of only every whole
                // frame (up to 10 ms less delay with 20 ms frames). Only while idle: during a
                // pause in a talkspurt every pop advances the playout by one frame.
                self.pcm.resize(want, 0.0);
                break;
            }
            self.pcm.extend(self.scratch.iter().copied());
        }
        for (o, s) in self.out.iter_mut().zip(self.pcm.drain(..want)) {
            *o = s;
        }
        self.level_db = rms_dbfs(&self.out);
        if audible && self.level_db > SPEAKING_FLOOR_DB {
            self.last_audible = Some(now);
        }
    }

    fn speaking(&self, now: Duration) -> bool {
        self.last_audible
            .is_some_and(|t| now.saturating_sub(t) < SPEAKING_HOLD)
    }
}

/// Granularity of playout and mixing: 10 ms at 48 kHz, whatever the codec frame length.
pub const PLAYOUT_CHUNK: usize = 480;

/// Frame duration announced by an Opus packet's TOC byte (RFC 6716 section 3.1), if it is one
/// we can play (10 or 20 ms, one frame per packet).
pub fn opus_frame_duration(payload: &[u8]) -> Option<FrameDuration> {
    let toc = *payload.first()?;
    if toc & 0x03 != 0 {
        return None; // several frames per packet: our senders never do that
    }
    let config = toc >> 3;
    let tenth_ms = match config {
        0..=11 => [100, 200, 400, 600][(config % 4) as usize],
        12..=15 => [100, 200][(config % 2) as usize],
        _ => [25, 50, 100, 200][(config % 4) as usize],
    };
    match tenth_ms {
        100 => Some(FrameDuration::Ms10),
        200 => Some(FrameDuration::Ms20),
        _ => None,
    }
}

/// Largest datagram the engine writes: a sealed voice frame.
pub const MAX_DATAGRAM_LEN: usize = VOICE_HEADER_LEN + MAX_VOICE_PAYLOAD;

/// One datagram [`VoiceEngine::poll_transmit`] wrote into the caller's buffer: send its first
/// `len` bytes to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub len: usize,
}

/// Most sealed voice datagrams queued between two drains (a channel's worth of frames many
/// times over); beyond it new ones are dropped, since the shell is not draining.
const MAX_QUEUED_VOICE: usize = 512;

/// Sealed voice datagrams waiting for `poll_transmit`, back to back in one buffer that is
/// reused: once it has grown to a channel's size, a frame costs no allocation.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    queue: VecDeque<(SocketAddr, std::ops::Range<usize>)>,
}

impl Outbox {
    fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        if self.queue.len() >= MAX_QUEUED_VOICE {
            return;
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.queue.push_back((to, start..self.bytes.len()));
    }

    fn pop(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        let (to, range) = self.queue.pop_front()?;
        let len = range.len();
        buf[..len].copy_from_slice(&self.bytes[range]);
        if self.queue.is_empty() {
            self.bytes.clear();
        }
        Some(Transmit { to, len })
    }
}

/// See the module docs.
pub struct VoiceEngine {
    cfg: VoiceConfig,
    table: Option<PeerTable>,
    audio: BTreeMap<UserId, PeerAudio>,
    /// Remembered per-user settings, applied when their audio appears (again).
    settings: BTreeMap<UserId, (f32, bool)>,
    capture: CaptureChain,
    encoder: OpusEncoder,
    mixer: Mixer,
    seq: u32,
    packet: Vec<u8>,
    server: Option<(SocketAddr, u64)>,
    register_acked: bool,
    next_register: Duration,
    /// A Register is due: `handle_timeout` found it so, `poll_transmit` sends it.
    register_due: bool,
    outbox: Outbox,
    public_addr: Option<SocketAddr>,
    seed: u64,
    // Sending-side figures.
    input_level_db: f32,
    vad_threshold_db: f32,
    speaking: bool,
    transmitting: bool,
    frames_sent: u64,
    bytes_sent: u64,
    mix_level_db: f32,
    last_loss_update: Duration,
    foreign_drops: u64,
    vad_above_floor_db: f32,
    targets: Vec<(u32, SocketAddr)>,
    /// Our X25519 key pair for this run; peers derive per-direction voice keys from it.
    keys: SessionKeys,
    ciphers: BTreeMap<UserId, PeerCipher>,
    sealed: Vec<u8>,
    opened: Vec<u8>,
    undecryptable: u64,
    replayed: u64,
    foreign_register_acks: u64,
}

impl VoiceEngine {
    pub fn new(cfg: VoiceConfig, seed: u64) -> Result<Self, CodecError> {
        let mut encoder = OpusEncoder::new(cfg.frame, cfg.bitrate_bps)?;
        let vad_above = cfg.capture.vad.threshold_above_floor_db;
        encoder.set_expected_loss_percent(5)?;
        let capture = CaptureChain::new(cfg.capture.clone());
        Ok(Self {
            // Shown on the input meter before any frame arrives (and with no microphone).
            vad_threshold_db: capture.vad_threshold_db(),
            capture,
            mixer: Mixer::with_frame_samples(PLAYOUT_CHUNK),
            encoder,
            cfg,
            table: None,
            audio: BTreeMap::new(),
            settings: BTreeMap::new(),
            seq: 0,
            packet: vec![0u8; VOICE_HEADER_LEN + MAX_VOICE_PAYLOAD],
            server: None,
            register_acked: false,
            next_register: Duration::ZERO,
            register_due: false,
            outbox: Outbox::default(),
            public_addr: None,
            seed,
            input_level_db: -120.0,
            speaking: false,
            transmitting: false,
            frames_sent: 0,
            bytes_sent: 0,
            mix_level_db: -120.0,
            last_loss_update: Duration::ZERO,
            foreign_drops: 0,
            vad_above_floor_db: vad_above,
            targets: Vec::with_capacity(32),
            keys: SessionKeys::generate(),
            ciphers: BTreeMap::new(),
            sealed: vec![0u8; VOICE_HEADER_LEN + MAX_VOICE_PAYLOAD],
            opened: vec![0u8; VOICE_HEADER_LEN + MAX_VOICE_PAYLOAD],
            undecryptable: 0,
            replayed: 0,
            foreign_register_acks: 0,
        })
    }

    pub fn frame(&self) -> FrameDuration {
        self.cfg.frame
    }

    /// Our voice public key, announced to peers through the server.
    pub fn public_key(&self) -> [u8; 32] {
        self.keys.public_key()
    }

    /// Replaces the key pair (tests use fixed keys). Drops every derived peer key.
    pub fn set_keys(&mut self, keys: SessionKeys) {
        self.keys = keys;
        self.ciphers.clear();
    }

    /// Our user id on the server (after identification). A new id (after a reconnect) starts a
    /// fresh peer table: peers are re-announced by the server. The ciphers go too: their keys
    /// and the sender id they seal with are bound to our old id.
    pub fn set_self_id(&mut self, id: UserId) {
        if self.table.as_ref().map(|t| t.our_id()) != Some(id) {
            self.table = Some(PeerTable::new(id, self.cfg.link.clone(), self.seed));
            self.audio.clear();
            self.ciphers.clear();
        }
    }

    /// Where to register our UDP address, and the token the server gave us over TCP.
    pub fn set_server(&mut self, now: Duration, addr: SocketAddr, token: u64) {
        self.server = Some((addr, token));
        self.register_acked = false;
        self.next_register = now;
    }

    /// The public address the server saw, once it answered.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public_addr
    }

    pub fn upsert_peer(&mut self, now: Duration, peer: &PeerInfo) {
        let Some(table) = &mut self.table else {
            return;
        };
        table.upsert_peer(now, peer.user_id, peer.username.clone(), &peer.candidates());
        let our_id = table.our_id();
        if let Some(key) = peer.voice_key {
            let same = self
                .ciphers
                .get(&peer.user_id)
                .is_some_and(|c| c.peer_public() == key);
            if !same {
                match PeerCipher::new(&self.keys, our_id, peer.user_id, key) {
                    Ok(c) => {
                        self.ciphers.insert(peer.user_id, c);
                    }
                    // A bad key (low order) means no voice with that peer, never plaintext.
                    Err(_) => {
                        self.ciphers.remove(&peer.user_id);
                    }
                }
            }
        }
    }

    pub fn remove_peer(&mut self, id: UserId) {
        if let Some(table) = &mut self.table {
            table.remove_peer(id);
        }
        self.audio.remove(&id);
        self.ciphers.remove(&id);
    }

    /// Forget every peer (we left the channel or lost the server's session).
    pub fn clear_peers(&mut self) {
        if let Some(table) = &self.table {
            let id = table.our_id();
            self.table = Some(PeerTable::new(id, self.cfg.link.clone(), self.seed));
        }
        self.audio.clear();
        self.ciphers.clear();
    }

    pub fn set_muted(&mut self, muted: bool) {
        self.capture.set_muted(muted);
    }
    pub fn set_deafened(&mut self, deafened: bool) {
        self.mixer.set_deafened(deafened);
    }
    pub fn set_noise_suppression(&mut self, on: bool) {
        self.capture.set_denoise(on);
    }
    pub fn set_push_to_talk(&mut self, enabled: bool) {
        self.capture.set_mode(if enabled {
            TransmitMode::PushToTalk
        } else {
            TransmitMode::VoiceActivity
        });
    }
    /// Moves the voice-activity threshold to `db` dBFS as shown on the input meter. The detector
    /// keeps its threshold relative to the adaptive noise floor, so the offset is adjusted.
    pub fn set_vad_threshold_abs(&mut self, db: f32) {
        let delta = db - self.vad_threshold_db;
        self.vad_above_floor_db = (self.vad_above_floor_db + delta).clamp(3.0, 40.0);
        self.capture.set_vad_threshold_db(self.vad_above_floor_db);
        self.vad_threshold_db = db;
    }
    pub fn set_ptt_pressed(&mut self, now: Duration, pressed: bool) {
        self.capture.set_ptt_pressed(now, pressed);
    }
    pub fn set_peer_volume(&mut self, id: UserId, volume: f32) {
        let entry = self.settings.entry(id).or_insert((1.0, false));
        entry.0 = volume.clamp(0.0, 2.0);
        if let Some(a) = self.audio.get_mut(&id) {
            a.volume = entry.0;
        }
    }
    pub fn set_peer_muted(&mut self, id: UserId, muted: bool) {
        let entry = self.settings.entry(id).or_insert((1.0, false));
        entry.1 = muted;
        if let Some(a) = self.audio.get_mut(&id) {
            a.muted = muted;
        }
    }

    /// One datagram arrived on our voice socket.
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        // The server's answer to our registration is not a peer datagram.
        if let Some((server, _)) = self.server {
            if from == server {
                if let Ok(Datagram::RegisterAck { observed }) = Datagram::parse(bytes) {
                    self.public_addr = Some(observed);
                    self.register_acked = true;
                    self.next_register = now + REGISTER_REFRESH;
                }
                return;
            }
        }
        let Some(table) = &mut self.table else {
            self.foreign_drops += 1;
            return;
        };
        // Voice is sealed end to end: authenticate and decrypt before anything else looks at
        // it, so forged packets cannot move replay windows or addresses.
        let mut bytes = bytes;
        // Punch, PunchAck, Ping and Pong carry a tag from the peer's control key: a spoofed
        // punch would otherwise make the link adopt (and stream voice to) any address.
        let head = &bytes[..bytes.len().min(PEER_CONTROL_LEN)];
        if let Ok(
            Datagram::Punch { from: sender, .. }
            | Datagram::PunchAck { from: sender, .. }
            | Datagram::Ping { from: sender, .. }
            | Datagram::Pong { from: sender, .. },
        ) = Datagram::parse(head)
        {
            let verified = self
                .ciphers
                .get_mut(&sender)
                .and_then(|c| c.verify_control(bytes).ok());
            match verified {
                Some(datagram) => bytes = datagram,
                None => {
                    self.undecryptable += 1;
                    return;
                }
            }
        } else if let Ok(Datagram::Voice { from: sender, .. }) = Datagram::parse(bytes) {
            let Some(cipher) = self.ciphers.get_mut(&sender) else {
                self.undecryptable += 1;
                return;
            };
            let (head, body) = self.opened.split_at_mut(VOICE_HEADER_LEN);
            match cipher.open_datagram(bytes, body) {
                Ok(n) => {
                    head.copy_from_slice(&bytes[..VOICE_HEADER_LEN]);
                    bytes = &self.opened[..VOICE_HEADER_LEN + n];
                }
                // A replayed or duplicated datagram is no attack on the key: count it as such.
                Err(CryptoError::Replay { .. }) => {
                    self.replayed += 1;
                    return;
                }
                Err(_) => {
                    self.undecryptable += 1;
                    return;
                }
            }
        }
        match table.handle_datagram(now, from, bytes) {
            Incoming::Voice {
                peer_id,
                seq,
                timestamp,
                payload,
            } => {
                let Some(frame) = opus_frame_duration(payload) else {
                    return;
                };
                let needs_new = self.audio.get(&peer_id).is_none_or(|a| a.frame != frame);
                if needs_new {
                    match PeerAudio::new(frame) {
                        Ok(mut a) => {
                            if let Some(&(v, m)) = self.settings.get(&peer_id) {
                                a.volume = v;
                                a.muted = m;
                            }
                            self.audio.insert(peer_id, a);
                        }
                        Err(_) => return,
                    }
                }
                if let Some(a) = self.audio.get_mut(&peer_id) {
                    a.receiver.push(now, seq, timestamp, payload);
                }
            }
            // The server's own ack was handled above: this one is from someone else.
            Incoming::RegisterAck { .. } => self.foreign_register_acks += 1,
            Incoming::Control { .. } | Incoming::Dropped(_) => {}
        }
    }

    /// One captured frame (exactly `frame().samples()` samples). The encoded frame is sealed
    /// once per connected peer and queued for [`VoiceEngine::poll_transmit`].
    pub fn handle_capture(&mut self, now: Duration, pcm: &[f32]) {
        let out = self.capture.process(now, pcm);
        self.input_level_db = out.level_db;
        self.vad_threshold_db = out.threshold_db;
        self.speaking = out.speaking;
        self.transmitting = out.transmitting;
        let samples = self.cfg.frame.samples() as u64;
        let Some(table) = &mut self.table else {
            return;
        };
        for frame in out.frames() {
            // Leave room for the AEAD tag inside the datagram size limit.
            let body = &mut self.packet[..MAX_VOICE_PAYLOAD - TAG_LEN];
            let Ok(len) = self.encoder.encode(frame.samples, body) else {
                continue;
            };
            if is_dtx_payload(len) {
                continue;
            }
            let timestamp = (frame.index.wrapping_mul(samples)) as u32;
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1);
            // Reused buffer: no allocation per frame once it has grown to the channel size.
            self.targets.clear();
            self.targets.extend(table.voice_targets());
            for &(peer, addr) in &self.targets {
                // Only peers whose key we know get voice, and only sealed for them alone.
                let Some(cipher) = self.ciphers.get_mut(&peer) else {
                    continue;
                };
                let Ok(total) =
                    cipher.seal_datagram(seq, timestamp, &self.packet[..len], &mut self.sealed)
                else {
                    continue;
                };
                self.outbox.push(addr, &self.sealed[..total]);
                table.record_voice_sent(peer, total);
                self.bytes_sent += total as u64;
            }
            self.frames_sent += 1;
        }
    }

    /// Fills `out` (any multiple of [`PLAYOUT_CHUNK`] samples) with the mix of every peer's
    /// audio through its jitter buffer.
    pub fn playout_frame(&mut self, now: Duration, out: &mut [f32]) {
        for chunk in out.chunks_mut(PLAYOUT_CHUNK) {
            self.playout_chunk(now, chunk);
        }
    }

    /// One 10 ms chunk. Mixing in 10 ms steps whatever the codec frame means a frame that
    /// arrives just after a mix waits at most 10 ms for the next one, not a whole frame.
    fn playout_chunk(&mut self, now: Duration, out: &mut [f32]) {
        for a in self.audio.values_mut() {
            a.render(now);
        }
        self.mixer.begin();
        for a in self.audio.values() {
            self.mixer.add(MixInput {
                samples: &a.out,
                gain: a.volume,
                muted: a.muted,
            });
        }
        let mixed = self.mixer.finish();
        let n = out.len().min(mixed.len());
        out[..n].copy_from_slice(&mixed[..n]);
        out[n..].fill(0.0);
        self.mix_level_db = rms_dbfs(&out[..n]);
        if now.saturating_sub(self.last_loss_update) >= Duration::from_secs(1) {
            self.last_loss_update = now;
            // Loss seen from our peers is the best guess of the loss they see from us:
            // tune the encoder's FEC to it.
            let loss = self
                .audio
                .values()
                .map(|a| a.receiver.stats().jitter.loss_fraction)
                .fold(0.0f32, f32::max);
            let pct = (loss * 100.0).round().clamp(0.0, 50.0) as u8;
            let _ = self.encoder.set_expected_loss_percent(pct.max(5));
        }
    }

    /// Fires the timers due at `now`: registration with the server, punches and keepalives.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.server.is_some() && now >= self.next_register {
            self.register_due = true;
            self.next_register = now
                + if self.register_acked {
                    REGISTER_REFRESH
                } else {
                    REGISTER_RETRY
                };
        }
        if let Some(table) = &mut self.table {
            table.handle_timeout(now);
        }
    }

    /// The next datagram to send, written into `buf` (at least [`MAX_DATAGRAM_LEN`] bytes):
    /// the server registration, sealed voice, then punches, keepalives and answers, each
    /// tagged for its peer. Call until `None` after every `handle_*` call.
    pub fn poll_transmit(&mut self, _now: Duration, buf: &mut [u8]) -> Option<Transmit> {
        if self.register_due {
            self.register_due = false;
            if let Some((server, token)) = self.server {
                if let Ok(len) = (Datagram::Register { token }).write(buf) {
                    return Some(Transmit { to: server, len });
                }
            }
        }
        if let Some(t) = self.outbox.pop(buf) {
            return Some(t);
        }
        let table = self.table.as_mut()?;
        while let Some(t) = table.poll_transmit() {
            let Ok(n) = t.datagram.write(buf) else {
                continue;
            };
            // Every peer datagram is authenticated; a peer without a key cannot verify
            // ours (and gets no voice either), so nothing is sent to it.
            let cipher = t.datagram.recipient().and_then(|to| self.ciphers.get(&to));
            let Some(cipher) = cipher else {
                continue;
            };
            let Ok(fixed) = <&[u8; PEER_CONTROL_LEN]>::try_from(&buf[..n]) else {
                continue;
            };
            let Ok(tag) = cipher.tag_control(fixed) else {
                continue;
            };
            buf[n..n + TAG_LEN].copy_from_slice(&tag);
            return Some(Transmit {
                to: t.to,
                len: n + TAG_LEN,
            });
        }
        None
    }

    /// When [`VoiceEngine::handle_timeout`] is next due; `None` with no server and no peers.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let link = self.table.as_ref().and_then(|t| t.poll_timeout());
        let reg = self.server.map(|_| self.next_register);
        match (link, reg) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn snapshot(&self, now: Duration) -> VoiceSnapshot {
        let mut peers = Vec::new();
        if let Some(table) = &self.table {
            for (id, entry) in table.peers() {
                let link = entry.link.stats();
                let state = match entry.link.state() {
                    LinkState::Punching { .. } => PeerState::Punching,
                    LinkState::Connected { addr } => PeerState::Direct(*addr),
                    LinkState::Unreachable { reason } => PeerState::Unreachable(reason.clone()),
                };
                let audio = self.audio.get(&id);
                let rx = audio.map(|a| a.receiver.stats());
                let ms = |d: Duration| d.as_secs_f32() * 1000.0;
                peers.push(PeerSnapshot {
                    user_id: id,
                    name: entry.name.clone(),
                    state,
                    rtt_ms: link.rtt.map(ms),
                    loss_pct: rx.map(|r| r.jitter.loss_fraction * 100.0).unwrap_or(0.0),
                    jitter_ms: rx.map(|r| ms(r.jitter.jitter)).unwrap_or(0.0),
                    buffer_ms: rx.map(|r| ms(r.jitter.current_delay)).unwrap_or(0.0),
                    target_ms: rx.map(|r| ms(r.jitter.target_delay)).unwrap_or(0.0),
                    packets_in: link.packets_in,
                    packets_out: link.packets_out,
                    bytes_in: link.bytes_in,
                    bytes_out: link.bytes_out,
                    frames_decoded: audio.map(|a| a.decoded).unwrap_or(0),
                    frames_fec: audio.map(|a| a.fec).unwrap_or(0),
                    frames_concealed: audio.map(|a| a.concealed).unwrap_or(0),
                    frames_stretched: rx.map(|r| r.jitter.stretched).unwrap_or(0),
                    frames_dropped: rx.map(|r| r.jitter.dropped).unwrap_or(0),
                    late: rx.map(|r| r.jitter.late).unwrap_or(0),
                    duplicates: rx.map(|r| r.jitter.duplicates).unwrap_or(0),
                    speaking: audio.is_some_and(|a| a.speaking(now)),
                    level_db: audio.map(|a| a.level_db).unwrap_or(-120.0),
                    fingerprint: self.ciphers.get(&id).map(|c| fingerprint(&c.peer_public())),
                    auth_failures: self
                        .ciphers
                        .get(&id)
                        .map(|c| c.auth_failures())
                        .unwrap_or(0),
                });
            }
        }
        let mut drops = self
            .table
            .as_ref()
            .map(|t| t.drop_counters())
            .unwrap_or_default();
        drops.unknown_sender += self.foreign_drops;
        drops.replay += self.replayed;
        VoiceSnapshot {
            self_id: self.table.as_ref().map(|t| t.our_id()),
            input_level_db: self.input_level_db,
            vad_threshold_db: self.vad_threshold_db,
            speaking: self.speaking,
            transmitting: self.transmitting,
            muted: self.capture.is_muted(),
            deafened: self.mixer.is_deafened(),
            frames_sent: self.frames_sent,
            bytes_sent: self.bytes_sent,
            public_addr: self.public_addr,
            drops,
            peers,
            mix_level_db: self.mix_level_db,
            fingerprint: self.keys.fingerprint(),
            undecryptable: self.undecryptable,
            foreign_register_acks: self.foreign_register_acks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::impair::{ImpairConfig, Impairment};
    use super::*;

    /// The engine's calls in the shape these tests were written in: every datagram it wants
    /// sent handed to a closure.
    trait Pump {
        /// Fires due timers, then drains every datagram.
        fn drain(&mut self, now: Duration, f: impl FnMut(SocketAddr, &[u8]));
        /// Feeds one captured frame, then drains every datagram.
        fn capture(&mut self, now: Duration, pcm: &[f32], f: impl FnMut(SocketAddr, &[u8]));
    }

    impl Pump for VoiceEngine {
        fn drain(&mut self, now: Duration, mut f: impl FnMut(SocketAddr, &[u8])) {
            self.handle_timeout(now);
            let mut buf = [0u8; MAX_DATAGRAM_LEN];
            while let Some(t) = self.poll_transmit(now, &mut buf) {
                f(t.to, &buf[..t.len]);
            }
        }

        fn capture(&mut self, now: Duration, pcm: &[f32], mut f: impl FnMut(SocketAddr, &[u8])) {
            self.handle_capture(now, pcm);
            let mut buf = [0u8; MAX_DATAGRAM_LEN];
            while let Some(t) = self.poll_transmit(now, &mut buf) {
                f(t.to, &buf[..t.len]);
            }
        }
    }

    /// Tone amplitude averaged over 100 ms blocks: robust to the phase jumps that jitter
    /// buffer adjustments cause, unlike one long Goertzel window.
    fn goertzel_amplitude(samples: &[f32], hz: f32, rate: u32) -> f32 {
        let blocks: Vec<f32> = samples
            .chunks(4800)
            .map(|b| crate::audio::goertzel_amplitude(b, hz, rate))
            .collect();
        blocks.iter().sum::<f32>() / blocks.len().max(1) as f32
    }

    fn engine(id: UserId) -> VoiceEngine {
        let mut cfg = VoiceConfig::default();
        cfg.capture.denoise = false;
        let mut e = VoiceEngine::new(cfg, id as u64).unwrap();
        e.set_self_id(id);
        e
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// With no microphone no frame ever arrives; the meter must still show the real threshold
    /// (it used to show 0 dBFS, i.e. "never transmit").
    #[test]
    fn threshold_is_known_before_the_first_frame() {
        let e = engine(1);
        let db = e.snapshot(Duration::ZERO).vad_threshold_db;
        assert!((-90.0..-20.0).contains(&db), "{db}");
    }

    fn peer(id: UserId, port: u16, key: [u8; 32]) -> PeerInfo {
        PeerInfo {
            user_id: id,
            username: format!("u{id}"),
            local: vec![addr(port)],
            public: None,
            voice_key: Some(key),
        }
    }

    /// Runs A (talking `hz`) and B (silent) for `secs` over a simulated network; returns B's output.
    fn call(hz: f32, secs: f64, impair: Option<ImpairConfig>) -> (Vec<f32>, VoiceSnapshot) {
        let (mut a, mut b) = (engine(1), engine(2));
        let now0 = Duration::ZERO;
        a.upsert_peer(now0, &peer(2, 2000, b.public_key()));
        b.upsert_peer(now0, &peer(1, 1000, a.public_key()));
        let mut net_to_b = Impairment::new(impair.unwrap_or_default());
        let mut to_a: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut out = Vec::new();
        let frame = 960;
        let mut phase = 0.0f32;
        let steps = (secs * 50.0) as usize;
        for step in 0..steps {
            let now = Duration::from_millis(20 * step as u64);
            let pcm: Vec<f32> = (0..frame)
                .map(|_| {
                    phase = (phase + hz / 48_000.0).fract();
                    0.3 * (phase * std::f32::consts::TAU).sin()
                })
                .collect();
            a.capture(now, &pcm, |to, bytes| {
                assert_eq!(to, addr(2000));
                net_to_b.push(now, addr(1000), bytes);
            });
            a.drain(now, |_, bytes| net_to_b.push(now, addr(1000), bytes));
            b.drain(now, |_, bytes| to_a.push((addr(2000), bytes.to_vec())));
            for (from, bytes) in to_a.drain(..) {
                a.handle_datagram(now, from, &bytes);
            }
            // Deliver in 1 ms slices so jitter is seen at its real arrival time.
            for ms in 0..20 {
                let t = now + Duration::from_millis(ms);
                while let Some((from, bytes)) = net_to_b.pop_due(t) {
                    b.handle_datagram(t, from, &bytes);
                }
            }
            let mut mix = vec![0.0; frame];
            b.playout_frame(now + Duration::from_millis(19), &mut mix);
            out.extend(mix);
        }
        let snap = b.snapshot(Duration::from_secs_f64(secs));
        (out, snap)
    }

    #[test]
    fn a_tone_sent_by_one_engine_is_heard_by_the_other() {
        let (out, snap) = call(440.0, 3.0, None);
        let tail = &out[48_000..];
        let level = goertzel_amplitude(tail, 440.0, 48_000);
        assert!(level > 0.15, "level {level} snap {snap:?}");
        assert!(goertzel_amplitude(tail, 1000.0, 48_000) < 0.01);
        assert_eq!(snap.peers.len(), 1);
        assert!(matches!(snap.peers[0].state, PeerState::Direct(_)));
        assert!(snap.peers[0].speaking);
    }

    #[test]
    fn a_lossy_jittery_link_is_concealed_without_long_gaps() {
        let cfg: ImpairConfig = "loss=0.1,jitter_ms=30,duplicate=0.05,seed=9"
            .parse()
            .unwrap();
        let (out, snap) = call(500.0, 6.0, Some(cfg));
        let tail = &out[48_000..];
        let mut longest = 0;
        let mut run = 0;
        for c in tail.chunks(48) {
            let rms = (c.iter().map(|x| x * x).sum::<f32>() / 48.0).sqrt();
            if rms < 0.01 {
                run += 1;
                longest = longest.max(run);
            } else {
                run = 0;
            }
        }
        assert!(longest <= 60, "gap of {longest} ms: {:?}", snap.peers[0]);
        let p = &snap.peers[0];
        assert!(p.frames_fec + p.frames_concealed > 10, "{p:?}");
        assert!(p.target_ms >= 20.0 && p.target_ms <= 121.0, "{p:?}");
    }

    /// Exchanges control datagrams between A (at `a_at`) and B (at `b_at`) for `rounds`
    /// rounds of 20 ms: enough rounds bring their links up.
    fn exchange(
        (a, a_at): (&mut VoiceEngine, SocketAddr),
        (b, b_at): (&mut VoiceEngine, SocketAddr),
        now: &mut Duration,
        rounds: usize,
    ) {
        for _ in 0..rounds {
            let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
            a.drain(*now, |to, d| {
                if to == b_at {
                    to_b.push(d.to_vec())
                }
            });
            b.drain(*now, |to, d| {
                if to == a_at {
                    to_a.push(d.to_vec())
                }
            });
            to_b.iter().for_each(|d| b.handle_datagram(*now, a_at, d));
            to_a.iter().for_each(|d| a.handle_datagram(*now, b_at, d));
            *now += Duration::from_millis(20);
        }
    }

    fn tone_frame(hz: f32) -> Vec<f32> {
        (0..960)
            .map(|i| 0.3 * (i as f32 * hz * std::f32::consts::TAU / 48_000.0).sin())
            .collect()
    }

    /// Destinations of the voice datagrams `e` sends for `frames` frames of a tone.
    fn voice_destinations(e: &mut VoiceEngine, now: &mut Duration, frames: u64) -> Vec<SocketAddr> {
        let pcm = tone_frame(440.0);
        let mut to = Vec::new();
        for _ in 0..frames {
            e.capture(*now, &pcm, |dst, b| {
                if matches!(Datagram::parse(b), Ok(Datagram::Voice { .. })) {
                    to.push(dst)
                }
            });
            *now += Duration::from_millis(20);
        }
        to
    }

    /// A (id 1, at :1000) and B (id 2, at :2000) with their link up, and the time reached.
    fn linked_pair() -> (VoiceEngine, VoiceEngine, Duration) {
        let (mut a, mut b) = (engine(1), engine(2));
        a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
        b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
        let mut now = Duration::ZERO;
        exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 20);
        (a, b, now)
    }

    #[test]
    fn muted_sender_sends_no_voice() {
        let (mut a, _b, mut now) = linked_pair();
        assert!(matches!(
            a.snapshot(now).peers[0].state,
            PeerState::Direct(_)
        ));
        a.set_muted(true);
        assert_eq!(voice_destinations(&mut a, &mut now, 50), vec![]);
        // The same link carries voice once unmuted: the silence above was the mute's doing.
        a.set_muted(false);
        assert!(voice_destinations(&mut a, &mut now, 50).len() > 20);
    }

    #[test]
    fn registration_repeats_until_acknowledged_then_refreshes_slowly() {
        let mut e = engine(1);
        let server = addr(7700);
        e.set_server(Duration::ZERO, server, 42);
        let mut regs = 0;
        for ms in (0..1000).step_by(10) {
            e.drain(Duration::from_millis(ms), |to, b| {
                if to == server
                    && matches!(Datagram::parse(b), Ok(Datagram::Register { token: 42 }))
                {
                    regs += 1;
                }
            });
        }
        assert!(regs >= 3, "{regs}");
        let ack = Datagram::RegisterAck {
            observed: addr(5555),
        }
        .to_vec()
        .unwrap();
        e.handle_datagram(Duration::from_secs(1), server, &ack);
        assert_eq!(e.public_addr(), Some(addr(5555)));
        let mut later = 0;
        for ms in (1000..10_000).step_by(10) {
            e.drain(Duration::from_millis(ms), |to, _| {
                if to == server {
                    later += 1;
                }
            });
        }
        assert_eq!(later, 0, "no re-registration within 15 s of an ack");
    }

    #[test]
    fn opus_toc_gives_the_frame_duration() {
        // CELT fullband 20 ms, one frame: config 31 -> 0b11111_0_00.
        assert_eq!(opus_frame_duration(&[31 << 3]), Some(FrameDuration::Ms20));
        assert_eq!(opus_frame_duration(&[30 << 3]), Some(FrameDuration::Ms10));
        // SILK 60 ms: not playable by us.
        assert_eq!(opus_frame_duration(&[3 << 3]), None);
        assert_eq!(opus_frame_duration(&[]), None);
        // Two frames per packet.
        assert_eq!(opus_frame_duration(&[(31 << 3) | 1]), None);
    }

    #[test]
    fn voice_on_the_wire_is_sealed_for_each_peer_and_opaque_to_others() {
        let (mut a, mut b) = (engine(1), engine(2));
        let eve = engine(3);
        a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
        b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
        // Connect the link first (punches), then capture what A sends.
        let mut wire: Vec<Vec<u8>> = Vec::new();
        for step in 0..20u64 {
            let now = Duration::from_millis(step * 20);
            let mut to_b = Vec::new();
            a.drain(now, |_, bytes| to_b.push(bytes.to_vec()));
            for d in to_b {
                b.handle_datagram(now, addr(1000), &d);
            }
            let mut to_a = Vec::new();
            b.drain(now, |_, bytes| to_a.push(bytes.to_vec()));
            for d in to_a {
                a.handle_datagram(now, addr(2000), &d);
            }
            let pcm: Vec<f32> = (0..960).map(|i| 0.3 * (i as f32 * 0.0575).sin()).collect();
            a.capture(now, &pcm, |_, bytes| {
                if matches!(Datagram::parse(bytes), Ok(Datagram::Voice { .. })) {
                    wire.push(bytes.to_vec())
                }
            });
        }
        assert!(!wire.is_empty(), "A sent voice");
        let mut dec = super::super::codec::OpusDecoder::new().unwrap();
        let mut out = vec![0.0; 960];
        for d in &wire {
            let Ok(Datagram::Voice { payload, .. }) = Datagram::parse(d) else {
                panic!("voice datagram expected");
            };
            // The payload is ciphertext: it carries a 16-byte tag and Opus cannot play it as is
            // (a decoder may accept garbage, but never produces the original signal).
            assert!(payload.len() > TAG_LEN);
            let _ = dec.decode(&payload[..payload.len() - TAG_LEN], &mut out);
        }
        // Eve, another channel member without the pair's key, gets nothing playable.
        let mut eve = eve;
        eve.upsert_peer(Duration::ZERO, &peer(1, 1000, [9; 32]));
        for d in &wire {
            eve.handle_datagram(Duration::from_secs(1), addr(1000), d);
        }
        let snap = eve.snapshot(Duration::from_secs(1));
        assert!(snap.peers.iter().all(|p| p.frames_decoded == 0));
        assert_eq!(snap.undecryptable, wire.len() as u64);
    }

    #[test]
    fn forged_and_unkeyed_voice_is_dropped_and_counted() {
        let mut b = engine(2);
        let a = engine(1);
        b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
        let forged = Datagram::Voice {
            from: 1,
            seq: 5,
            timestamp: 960,
            payload: &[
                0xfc, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
            ],
        }
        .to_vec()
        .unwrap();
        b.handle_datagram(Duration::ZERO, addr(1000), &forged);
        let unknown = Datagram::Voice {
            from: 77,
            seq: 1,
            timestamp: 0,
            payload: &[1, 2, 3],
        }
        .to_vec()
        .unwrap();
        b.handle_datagram(Duration::ZERO, addr(1000), &unknown);
        let snap = b.snapshot(Duration::ZERO);
        assert_eq!(snap.undecryptable, 2);
        assert_eq!(snap.peers[0].frames_decoded, 0);
    }

    /// A spoofed punch (anyone can learn two user ids from the overview) must neither get an
    /// answer nor move where our voice goes; the peer's own tagged punch from a new address
    /// (its NAT rebound) still does.
    #[test]
    fn spoofed_punches_are_ignored_and_tagged_ones_still_move_the_link() {
        let (mut a, mut b) = (engine(1), engine(2));
        a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
        b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
        let direct_to = |b: &VoiceEngine, now| match &b.snapshot(now).peers[0].state {
            PeerState::Direct(addr) => Some(*addr),
            _ => None,
        };
        // Link up over the simulated network: A at :1000, B at :2000.
        let mut now = Duration::ZERO;
        for _ in 0..20 {
            let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
            a.drain(now, |_, d| to_b.push(d.to_vec()));
            b.drain(now, |_, d| to_a.push(d.to_vec()));
            to_b.iter()
                .for_each(|d| b.handle_datagram(now, addr(1000), d));
            to_a.iter()
                .for_each(|d| a.handle_datagram(now, addr(2000), d));
            now += Duration::from_millis(20);
        }
        assert_eq!(direct_to(&b, now), Some(addr(1000)));

        let attacker = addr(6666);
        let punch = Datagram::Punch {
            from: 1,
            to: 2,
            nonce: 99,
        }
        .to_vec()
        .unwrap();
        let mut zero_tag = punch.clone();
        zero_tag.extend_from_slice(&[0u8; TAG_LEN]);
        let eve = SessionKeys::generate();
        let eve_cipher = PeerCipher::new(&eve, 1, 2, b.public_key()).unwrap();
        let mut eve_tagged = punch.clone();
        eve_tagged.extend_from_slice(
            &eve_cipher
                .tag_control(&punch[..].try_into().unwrap())
                .unwrap(),
        );
        let before = b.snapshot(now).undecryptable;
        for forged in [&punch, &zero_tag, &eve_tagged] {
            b.handle_datagram(now, attacker, forged);
        }
        assert_eq!(b.snapshot(now).undecryptable, before + 3);
        let mut answers_to_attacker = 0;
        for _ in 0..10 {
            now += Duration::from_millis(20);
            b.drain(now, |to, _| {
                answers_to_attacker += usize::from(to == attacker)
            });
        }
        assert_eq!(answers_to_attacker, 0);
        assert_eq!(direct_to(&b, now), Some(addr(1000)));

        // A's real (tagged) keepalives now arrive from a new address: the link follows them.
        let moved = addr(1001);
        for _ in 0..1000 {
            let mut to_b = Vec::new();
            a.drain(now, |_, d| to_b.push(d.to_vec()));
            to_b.iter().for_each(|d| b.handle_datagram(now, moved, d));
            let mut to_a = Vec::new();
            b.drain(now, |_, d| to_a.push(d.to_vec()));
            to_a.iter()
                .for_each(|d| a.handle_datagram(now, addr(2000), d));
            now += Duration::from_millis(20);
            if direct_to(&b, now) == Some(moved) {
                break;
            }
        }
        assert_eq!(
            direct_to(&b, now),
            Some(moved),
            "a tagged punch from a new address is adopted"
        );
    }

    /// Voice is only ever sealed for a peer: one whose key is unknown gets nothing at all (not
    /// even punches), and one whose key turns out invalid mid-call stops getting voice on a link
    /// that is still up, while a keyed peer next to them keeps getting it.
    #[test]
    fn a_peer_without_a_voice_key_gets_no_voice() {
        let (mut a, mut b) = (engine(1), engine(2));
        a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
        b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
        let mut keyless = peer(3, 3000, [0; 32]);
        keyless.voice_key = None;
        a.upsert_peer(Duration::ZERO, &keyless);
        let mut now = Duration::ZERO;
        let mut to_keyless = 0;
        for _ in 0..20 {
            a.drain(now, |to, _| to_keyless += usize::from(to == addr(3000)));
            exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 1);
        }
        assert_eq!(
            to_keyless, 0,
            "nothing goes to a peer we cannot authenticate to"
        );
        let sent = voice_destinations(&mut a, &mut now, 50);
        assert!(sent.iter().filter(|&&d| d == addr(2000)).count() > 20);
        assert!(!sent.contains(&addr(3000)));

        // B's key is re-announced as an invalid (all-zero, low-order) point: the link stays
        // up, but there is no key to seal with any more, so no voice, never plaintext.
        a.upsert_peer(now, &peer(2, 2000, [0; 32]));
        assert!(matches!(
            a.snapshot(now).peers[0].state,
            PeerState::Direct(_)
        ));
        assert_eq!(voice_destinations(&mut a, &mut now, 50), vec![]);
    }

    /// A restarted server may give us a new id while a peer keeps its own: the voice keys and
    /// the sender id we seal with must follow the new id, or the peer never hears us again.
    #[test]
    fn after_a_new_self_id_voice_is_sealed_under_the_new_id() {
        let (mut a, mut b, mut now) = linked_pair();
        a.set_self_id(3);
        a.upsert_peer(now, &peer(2, 2000, b.public_key()));
        b.remove_peer(1);
        b.upsert_peer(now, &peer(3, 1000, a.public_key()));
        exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 20);
        let pcm = tone_frame(440.0);
        let mut mix = vec![0.0; 960];
        for _ in 0..50 {
            let mut to_b = Vec::new();
            a.capture(now, &pcm, |to, d| {
                if to == addr(2000) {
                    to_b.push(d.to_vec())
                }
            });
            to_b.iter()
                .for_each(|d| b.handle_datagram(now, addr(1000), d));
            b.playout_frame(now, &mut mix);
            now += Duration::from_millis(20);
        }
        let snap = b.snapshot(now);
        assert_eq!(snap.undecryptable, 0, "{snap:?}");
        let p = &snap.peers[0];
        assert_eq!(p.user_id, 3);
        assert!(matches!(p.state, PeerState::Direct(_)), "{p:?}");
        assert!(p.frames_decoded > 20, "{p:?}");
    }

    /// Only the server may tell us our public address: a `RegisterAck` from anyone else would
    /// make us announce an address of the sender's choosing.
    #[test]
    fn a_register_ack_from_another_address_is_ignored_and_counted() {
        let mut e = engine(1);
        let server = addr(7700);
        e.set_server(Duration::ZERO, server, 42);
        let ack = |observed| Datagram::RegisterAck { observed }.to_vec().unwrap();
        e.handle_datagram(Duration::ZERO, addr(6666), &ack(addr(6666)));
        assert_eq!(e.public_addr(), None);
        assert_eq!(e.snapshot(Duration::ZERO).foreign_register_acks, 1);
        e.handle_datagram(Duration::ZERO, server, &ack(addr(5555)));
        assert_eq!(e.public_addr(), Some(addr(5555)));
        assert_eq!(e.snapshot(Duration::ZERO).foreign_register_acks, 1);
    }
}
