//! `VoiceEngine`: the whole voice plane of one client as one pure state machine.
//!
//! It composes the layers below it: the net layer's peer table (one link per remote member:
//! hole punching, keepalives, datagram routing), one `Peer` per member (its cipher,
//! its receive path through jitter buffer and decoder, its volume and mute), the mixer, and on
//! the sending side the capture chain and encoder. It owns no socket, no thread and no clock:
//! the voice thread (`thread.rs`) feeds it datagrams, capture frames and playout requests with
//! the current time, fires [`VoiceEngine::handle_timeout`] when [`VoiceEngine::poll_timeout`] is
//! due, and sends what [`VoiceEngine::poll_transmit`] returns. Everything here is therefore
//! testable with simulated time and a simulated network.
//!
//! Files: this one holds the public API and the datagram, capture and playout paths;
//! `peer.rs` the per-member state, `registration.rs` the UDP registration with the server,
//! `outbox.rs` the queue of sealed voice, `snapshot.rs` what the UI sees, `chat.rs` the text
//! chat (sealed per member, on the path of that member's voice).

mod chat;
pub mod echo_test;
mod mic_test;
mod outbox;
mod peer;
mod registration;
mod setting;
mod snapshot;
#[cfg(test)]
mod tests;
mod tunnel;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

pub use self::chat::{ChatEvent, ChatMessage, ChatSent};
use self::outbox::Outbox;
pub use self::outbox::{Transmit, MAX_DATAGRAM_LEN};
use self::peer::Peer;
pub use self::peer::PeerSettings;
use self::registration::Registration;
pub use self::setting::VoiceSetting;
pub use self::snapshot::{PeerSnapshot, PeerState, RelayVia, Unreachable, VoiceSnapshot};
use self::tunnel::Tunnel;
use super::codec::{is_dtx_payload, opus_frame_duration, CodecError, FrameDuration};
use super::net::crypto::{CryptoError, PeerCipher, SessionKeys, TAG_LEN};
use super::net::link::LinkConfig;
use super::net::peers::{DropCounters, DropReason, Incoming, Outgoing, PeerTable, Route, Upsert};
use super::net::received::Received;
use super::net::relay::Via;
use super::rx::cues::{Cue, CuePlayer, CueSounds};
use super::rx::mixer::{MixInput, Mixer};
use super::tx::capture::{CaptureChain, CaptureConfig, TransmitMode};
use super::tx::levels::rms_dbfs;
use super::tx::ProcessingConfig;
use super::tx::{bitrate_for_loss, LossShape, OpusEncoder};
use crate::audio::CHUNK_SAMPLES;
use crate::protocol::datagram::{
    relay_header, Datagram, DatagramKind, ReceiverReport, MAX_VOICE_PAYLOAD, PEER_CONTROL_LEN,
    RELAY_HEADER_LEN, VOICE_HEADER_LEN,
};
use crate::protocol::{PeerInfo, UserId};

/// How often we tell each peer how its voice reaches us.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// A listener's Report counts for this long (they come every [`REPORT_INTERVAL`]).
const REPORT_FRESH: Duration = Duration::from_secs(5);

/// Retired peer keys remembered per key pair of ours (32 bytes each).
const MAX_RETIRED_PEER_KEYS: usize = 1024;

/// Settings of the voice plane.
#[derive(Debug, Clone)]
pub struct VoiceConfig {
    /// Frame duration we capture and send with (peers may use another; we adapt per peer).
    pub frame: FrameDuration,
    pub bitrate_bps: u32,
    pub capture: CaptureConfig,
    pub link: LinkConfig,
    /// Bring every peer's speech to the same level before the per-peer volume (off by
    /// default: some people want to hear who speaks up).
    pub normalize_loudness: bool,
    /// Join, leave and mute sounds in the playout (off by default: headless clients, tests
    /// and benchmarks want only the call in their output; the window turns them on).
    pub sounds: bool,
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
            normalize_loudness: false,
            sounds: false,
        }
    }
}

/// See the module docs.
pub struct VoiceEngine {
    cfg: VoiceConfig,
    /// The links to our peers (net layer); `None` until we know our own id.
    table: Option<PeerTable>,
    /// One [`Peer`] per link in `table`, under the same id.
    peers: BTreeMap<UserId, Peer>,
    /// Settings the UI chose for users that are not peers right now (not yet, or no longer):
    /// a user's settings live either here or in its [`Peer`], never in both.
    remembered: BTreeMap<UserId, PeerSettings>,
    capture: CaptureChain,
    encoder: OpusEncoder,
    mixer: Mixer,
    seq: u32,
    packet: Vec<u8>,
    registration: Registration,
    outbox: Outbox,
    seed: u64,
    // Sending-side figures.
    input_level_db: f32,
    vad_threshold_db: f32,
    speaking: bool,
    transmitting: bool,
    frames_sent: u64,
    bytes_sent: u64,
    mix_level_db: f32,
    /// When the next Reports go out (and the encoder is tuned again); see `exchange_reports`.
    next_report: Duration,
    /// Datagrams the engine drops before the peer table sees them (no table yet, garbage,
    /// replays refused by a cipher); the table counts the rest.
    drops: DropCounters,
    vad_above_floor_db: f32,
    targets: Vec<(u32, Route)>,
    /// Whether the server relays (told in its `Welcome`); kept across peer tables.
    server_relays: bool,
    /// Our X25519 key pair for this channel visit; peers derive per-direction voice keys from
    /// it. Replaced whenever our peers are reset (we left the channel, or got a new id), so a
    /// later join never derives the keys of an earlier one and no replay window restarts
    /// under an old key (see [`Self::rotate_keys`]).
    keys: SessionKeys,
    /// Where new key pairs come from: the operating system, or (simulation, tests) a seeded
    /// generator so runs repeat exactly.
    key_rng: Option<rand::rngs::StdRng>,
    /// Peers' voice keys whose ciphers under our current `keys` were dropped (the peer left).
    /// A fresh cipher from the same pair of keys would start an empty replay window, so
    /// recorded voice of the earlier visit would be accepted again: such a key is refused
    /// until our own keys change. Bounded, oldest forgotten first.
    retired_peer_keys: std::collections::VecDeque<[u8; 32]>,
    /// Voice keys refused because they had been retired (see `retired_peer_keys`).
    reused_keys_refused: u64,
    sealed: Vec<u8>,
    opened: Vec<u8>,
    undecryptable: u64,
    /// The TCP fallback while the server gets none of our UDP.
    tunnel: Tunnel,
    /// The `seq` of the last Report we sent (to any peer).
    report_seq: u32,
    /// Text chat: epochs, packet numbers, delivered messages (see `chat.rs`).
    chat: chat::ChatPlane,
    /// Join, leave and mute sounds, mixed into the playout.
    cues: CuePlayer,
    /// Until when "you are talking while muted" holds (the detector heard speech while the
    /// microphone was muted); held so the hint does not flicker between words.
    muted_speech_until: Option<Duration>,
    /// Playing our own processed voice back to us (the microphone test), when on.
    mic_test: Option<mic_test::MicTest>,
    /// The echo test while it runs, and the result of the last one.
    echo_test: Option<echo_test::EchoTest>,
    echo_test_result: Option<echo_test::EchoTestResult>,
}

/// How long the "you are muted" hint stays after the voice detector last heard us muted.
pub const MUTED_SPEECH_HOLD: Duration = Duration::from_millis(1500);

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
            mixer: Mixer::with_frame_samples(CHUNK_SAMPLES),
            encoder,
            table: None,
            peers: BTreeMap::new(),
            remembered: BTreeMap::new(),
            seq: 0,
            packet: vec![0u8; VOICE_HEADER_LEN + MAX_VOICE_PAYLOAD],
            registration: Registration::default(),
            outbox: Outbox::default(),
            seed,
            input_level_db: -120.0,
            speaking: false,
            transmitting: false,
            frames_sent: 0,
            bytes_sent: 0,
            mix_level_db: -120.0,
            next_report: Duration::ZERO,
            drops: DropCounters::default(),
            vad_above_floor_db: vad_above,
            targets: Vec::with_capacity(32),
            server_relays: false,
            keys: SessionKeys::generate(),
            key_rng: None,
            retired_peer_keys: std::collections::VecDeque::new(),
            reused_keys_refused: 0,
            sealed: vec![0u8; VOICE_HEADER_LEN + MAX_VOICE_PAYLOAD],
            opened: vec![0u8; MAX_VOICE_PAYLOAD],
            undecryptable: 0,
            tunnel: Tunnel::default(),
            report_seq: 0,
            chat: chat::ChatPlane::default(),
            cues: CuePlayer::new(CueSounds::embedded(), cfg.sounds),
            muted_speech_until: None,
            mic_test: None,
            echo_test: None,
            echo_test_result: None,
            cfg,
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
        self.retired_peer_keys.clear();
        for peer in self.peers.values_mut() {
            peer.cipher = None;
            peer.chat = None;
        }
    }

    /// Draws later key pairs (see [`Self::rotate_keys`]) from a generator seeded with `seed`
    /// instead of the operating system: for the simulation and tests, which must repeat.
    pub fn set_key_seed(&mut self, seed: [u8; 32]) {
        use rand::SeedableRng;
        self.key_rng = Some(rand::rngs::StdRng::from_seed(seed));
    }

    /// A new key pair for a new set of peers. Called whenever the peers are reset, so that
    /// keys are fresh for every join: a peer table is never rebuilt under keys that an
    /// earlier one used. The shell must announce the new [`Self::public_key`] (it compares it
    /// with the one it announced after every command).
    fn rotate_keys(&mut self) {
        let keys = match &mut self.key_rng {
            Some(rng) => {
                let mut secret = zeroize::Zeroizing::new([0u8; 32]);
                rand::RngCore::fill_bytes(rng, &mut secret[..]);
                SessionKeys::from_secret_bytes(*secret)
            }
            None => SessionKeys::generate(),
        };
        self.set_keys(keys);
    }

    /// Voice keys refused because a peer came back with a key it had used with us before.
    pub fn reused_keys_refused(&self) -> u64 {
        self.reused_keys_refused
    }

    /// Our user id on the server (after identification). A new id (after a reconnect) starts a
    /// fresh peer table: peers are re-announced by the server. Their ciphers go with them: the
    /// keys and the sender id they seal with are bound to our old id, and our key pair is
    /// replaced too (fresh keys for every new set of peers). The first id keeps the key pair
    /// the engine started with: no peer has seen it yet, and the server may already have
    /// handed it to the channel, so replacing it then only made the first datagrams fail
    /// authentication at every peer until the new key caught up.
    pub fn set_self_id(&mut self, id: UserId) {
        if self.table.as_ref().map(|t| t.our_id()) != Some(id) {
            let earlier_id = self.table.is_some();
            self.forget_peers();
            if earlier_id {
                self.rotate_keys();
            }
            let mut table = PeerTable::new(id, self.cfg.link.clone(), self.seed);
            table.set_server_relays(self.server_relays);
            self.table = Some(table);
        }
    }

    /// Where to register our UDP address, and the token the server gave us over TCP.
    pub fn set_server(&mut self, now: Duration, addr: SocketAddr, token: u64) {
        self.registration.set_server(now, addr, token);
    }

    /// Whether the server relays for peers we cannot reach directly (its `Welcome` says).
    pub fn set_server_relays(&mut self, on: bool) {
        self.server_relays = on;
        if let Some(table) = &mut self.table {
            table.set_server_relays(on);
        }
    }

    /// The public address the server saw, once it answered.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.registration.public_addr()
    }

    /// Whether datagrams for the server go through the control connection (UDP to the
    /// server is blocked and the server relays); drain them with [`Self::poll_tunnel`].
    pub fn tunnels(&self) -> bool {
        self.tunnel.is_on()
    }

    /// The next datagram to send through the control connection (`ClientMsg::Tunnel`).
    /// Call until `None` after `poll_transmit` returned `None`.
    pub fn poll_tunnel(&mut self) -> Option<Vec<u8>> {
        self.tunnel.poll()
    }

    /// A datagram the server sent us through the control connection (`ServerMsg::Tunnel`):
    /// handled exactly as if it had come from the server's UDP address.
    pub fn handle_tunnelled(&mut self, now: Duration, bytes: &[u8]) {
        if let Some(server) = self.registration.server_addr() {
            self.handle_datagram(now, server, bytes);
        }
    }

    /// A member of our channel, announced (again) by the server: its link starts punching, and
    /// a new voice key replaces the cipher. Without a voice key (none announced yet, or the
    /// control plane refused the one announced: a bad identity signature, a changed identity)
    /// the member has no cipher, so nothing is sent to it or accepted from it. The caller has
    /// checked the key's signature (see `crate::identity`); the engine takes what it is given.
    pub fn upsert_peer(&mut self, now: Duration, info: &PeerInfo) {
        let Some(table) = &mut self.table else {
            return;
        };
        let id = info.user_id;
        let upsert = table.upsert_peer(now, id, info.username.clone(), &info.candidates());
        if matches!(upsert, Upsert::IgnoredSelf | Upsert::TableFull) {
            return;
        }
        let our_id = table.our_id();
        if !self.peers.contains_key(&id) {
            self.cues.play(Cue::Join);
        }
        let remembered = &mut self.remembered;
        let peer = self
            .peers
            .entry(id)
            .or_insert_with(|| Peer::new(remembered.remove(&id).unwrap_or_default()));
        let current = peer.cipher.as_ref().map(PeerCipher::peer_public);
        if info.voice_key.is_some() && info.voice_key == current {
            return;
        }
        // Whatever replaces a cipher, its key is retired: were it announced again, a new
        // cipher from it would start an empty replay window.
        if let Some(old) = current {
            retire(&mut self.retired_peer_keys, old);
        }
        peer.cipher = match info.voice_key {
            Some(key) if self.retired_peer_keys.contains(&key) => {
                self.reused_keys_refused += 1;
                None
            }
            // A bad key (low order) means no voice with that peer, never plaintext.
            Some(key) => PeerCipher::new(&self.keys, our_id, id, key).ok(),
            None => None,
        };
        // Chat follows the voice cipher: keys from the same installed voice key, or none (a
        // refused or held-back identity gets no chat either).
        match (peer.cipher.is_some(), info.voice_key) {
            (true, Some(key)) => self.update_chat_peer(our_id, id, key),
            _ => {
                self.chat.remember(id, peer.chat.as_ref());
                peer.chat = None;
            }
        }
    }

    /// A member left the channel.
    pub fn remove_peer(&mut self, id: UserId) {
        if let Some(table) = &mut self.table {
            table.remove_peer(id);
        }
        if let Some(peer) = self.peers.remove(&id) {
            if let Some(cipher) = &peer.cipher {
                retire(&mut self.retired_peer_keys, cipher.peer_public());
            }
            self.chat.remember(id, peer.chat.as_ref());
            self.remembered.insert(id, peer.settings);
            self.cues.play(Cue::Leave);
        }
    }

    /// Forget every peer (we left the channel or lost the server's session), and take a new
    /// key pair for the next channel.
    pub fn clear_peers(&mut self) {
        // We left people: the same sound as someone leaving us.
        if !self.peers.is_empty() {
            self.cues.play(Cue::Leave);
        }
        self.forget_peers();
        self.rotate_keys();
        if let Some(table) = &self.table {
            let id = table.our_id();
            let mut table = PeerTable::new(id, self.cfg.link.clone(), self.seed);
            table.set_server_relays(self.server_relays);
            self.table = Some(table);
        }
    }

    /// Drops every [`Peer`], keeping the settings chosen for them.
    fn forget_peers(&mut self) {
        for (id, peer) in std::mem::take(&mut self.peers) {
            self.chat.remember(id, peer.chat.as_ref());
            self.remembered.insert(id, peer.settings);
        }
    }

    /// Mutes or unmutes the microphone; a change is heard (its cue), a repeat is not.
    pub fn set_muted(&mut self, muted: bool) {
        if muted != self.capture.is_muted() {
            self.cues.play(if muted { Cue::Mute } else { Cue::Unmute });
        }
        if !muted {
            self.muted_speech_until = None;
        }
        self.capture.set_muted(muted);
    }
    /// Turns the join, leave and mute sounds on or off.
    pub fn set_sounds(&mut self, on: bool) {
        self.cues.set_enabled(on);
    }
    /// Plays `cue` now (if sounds are on).
    pub fn play_cue(&mut self, cue: Cue) {
        self.cues.play(cue);
    }
    pub fn set_deafened(&mut self, deafened: bool) {
        self.mixer.set_deafened(deafened);
    }
    /// Turns per-speaker loudness normalisation on or off.
    pub fn set_normalize_loudness(&mut self, on: bool) {
        self.cfg.normalize_loudness = on;
    }

    pub fn set_noise_suppression(&mut self, on: bool) {
        self.capture.set_denoise(on);
    }
    /// Turns the capture chain's high-pass filter, echo canceller and gain controller on or
    /// off.
    pub fn set_processing(&mut self, cfg: ProcessingConfig) {
        self.capture.set_processing(cfg);
    }
    /// Which of the high-pass filter, echo canceller and gain controller run.
    pub fn processing(&self) -> ProcessingConfig {
        self.capture.processing()
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
    /// Gain of user `id` in the mix, clamped to `0.0..=2.0`; kept for a user that is not (yet)
    /// a peer.
    pub fn set_peer_volume(&mut self, id: UserId, volume: f32) {
        self.settings_mut(id).volume = volume.clamp(0.0, 2.0);
    }
    /// Leaves user `id` out of the mix (or back in); kept for a user that is not (yet) a peer.
    pub fn set_peer_muted(&mut self, id: UserId, muted: bool) {
        self.settings_mut(id).muted = muted;
    }
    /// The volume and mute in effect for user `id` (the defaults if none were chosen).
    pub fn peer_settings(&self, id: UserId) -> PeerSettings {
        match self.peers.get(&id) {
            Some(peer) => peer.settings,
            None => self.remembered.get(&id).copied().unwrap_or_default(),
        }
    }

    fn settings_mut(&mut self, id: UserId) -> &mut PeerSettings {
        match self.peers.get_mut(&id) {
            Some(peer) => &mut peer.settings,
            None => self.remembered.entry(id).or_default(),
        }
    }

    /// One datagram arrived on our voice socket. It is parsed once ([`Received`]); a peer's
    /// datagram is authenticated (and voice decrypted) by that peer's cipher before the peer
    /// table, its link or its jitter buffer look at it, so forged packets cannot move replay
    /// windows or addresses. Relay envelopes are forwarded (`RelayTo`, when we bridge two
    /// members) or opened and handled like a direct datagram (`RelayFrom`).
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        // The server sends us its answer to our registration, and relayed datagrams.
        if self.registration.is_server(from) {
            match Datagram::parse(bytes) {
                Ok(Datagram::RegisterAck { observed }) => {
                    self.registration.handle_ack(now, observed)
                }
                Ok(Datagram::RelayFrom {
                    from: origin,
                    inner,
                }) => self.handle_relayed(now, Via::Server, origin, inner),
                _ => self.drops.unexpected_kind += 1,
            }
            return;
        }
        // Chat is opened by its own keys and needs no link: a sealed frame proves its author
        // wherever it came from, and answers go on the peer's voice path, not to `from`.
        if bytes.first() == Some(&DatagramKind::Chat.type_byte()) {
            self.handle_chat(now, bytes, None);
            return;
        }
        let Some(table) = &mut self.table else {
            self.drops.unknown_sender += 1;
            return;
        };
        let received = match Received::parse(bytes) {
            Ok(received) => received,
            Err(e) => {
                self.drops.count(&DropReason::Garbage(e));
                return;
            }
        };
        match received {
            Received::Plain(Datagram::RelayTo { to, inner }) => {
                if let Ok((sender, dest)) = table.forward(now, from, to, inner) {
                    let envelope = Datagram::RelayFrom {
                        from: sender,
                        inner,
                    };
                    if let Ok(n) = envelope.write(&mut self.sealed) {
                        self.outbox.push(dest, &self.sealed[..n]);
                    }
                }
                return;
            }
            Received::Plain(Datagram::RelayFrom {
                from: origin,
                inner,
            }) => {
                match table.member_at(from) {
                    Some(member) => self.handle_relayed(now, Via::Member(member), origin, inner),
                    None => self.drops.count(&DropReason::UnknownRelay),
                }
                return;
            }
            _ => {}
        }
        let mut gate = Gate {
            peers: &mut self.peers,
            drops: &mut self.drops,
            undecryptable: &mut self.undecryptable,
        };
        let Some(datagram) = gate.authenticate(&mut self.opened, received) else {
            return;
        };
        if let Datagram::Report { from: sender, .. } = datagram {
            take_report(
                &mut self.peers,
                &mut self.drops,
                table.our_id(),
                now,
                sender,
                datagram,
            );
            return;
        }
        match table.handle_parsed(now, from, datagram) {
            Incoming::Voice {
                peer_id,
                seq,
                timestamp,
                payload,
            } => deliver_voice(&mut self.peers, now, peer_id, seq, timestamp, payload),
            // The server's own ack was handled above: this one is from someone else.
            Incoming::RegisterAck { .. } => self.registration.count_foreign_ack(),
            Incoming::Control { .. } | Incoming::Dropped(_) => {}
        }
    }

    /// `inner`, a datagram of peer `origin` that `via` forwarded to us: authenticated by that
    /// peer's cipher like a direct one, then handled by its relay route.
    fn handle_relayed(&mut self, now: Duration, via: Via, origin: UserId, inner: &[u8]) {
        if inner.first() == Some(&DatagramKind::Chat.type_byte()) {
            self.handle_chat(now, inner, Some(origin));
            return;
        }
        let Some(table) = &mut self.table else {
            self.drops.unknown_sender += 1;
            return;
        };
        let received = match Received::parse(inner) {
            Ok(received) => received,
            Err(e) => {
                self.drops.count(&DropReason::Garbage(e));
                return;
            }
        };
        let mut gate = Gate {
            peers: &mut self.peers,
            drops: &mut self.drops,
            undecryptable: &mut self.undecryptable,
        };
        let Some(datagram) = gate.authenticate(&mut self.opened, received) else {
            return;
        };
        if let Datagram::Report { .. } = datagram {
            take_report(
                &mut self.peers,
                &mut self.drops,
                table.our_id(),
                now,
                origin,
                datagram,
            );
            return;
        }
        if let Incoming::Voice {
            peer_id,
            seq,
            timestamp,
            payload,
        } = table.handle_relayed(now, via, origin, datagram)
        {
            deliver_voice(&mut self.peers, now, peer_id, seq, timestamp, payload);
        }
    }

    /// Starts or stops the microphone test (see [`mic_test`]).
    pub fn set_mic_test(&mut self, on: bool) {
        match (on, self.mic_test.is_some()) {
            // A decoder that cannot be made leaves the test off; nothing else depends on it.
            (true, false) => {
                self.echo_test = None;
                self.mic_test = mic_test::MicTest::new().ok();
            }
            (false, true) => self.mic_test = None,
            _ => {}
        }
    }

    /// Starts the echo test (see [`echo_test`]), forgetting the last result, or stops it. The
    /// microphone test stops meanwhile: hearing yourself would be measured as echo.
    pub fn set_echo_test(&mut self, on: bool) {
        if on {
            self.mic_test = None;
            self.echo_test = Some(echo_test::EchoTest::new());
            self.echo_test_result = None;
        } else {
            self.echo_test = None;
        }
    }

    /// Where the echo test stands: running, or the last one's result.
    pub fn echo_test(&self) -> Option<echo_test::EchoTestStatus> {
        match (&self.echo_test, self.echo_test_result) {
            (Some(t), _) => Some(echo_test::EchoTestStatus::Running(t.progress())),
            (None, Some(r)) => Some(echo_test::EchoTestStatus::Done(r)),
            (None, None) => None,
        }
    }

    /// Whether the microphone test is on.
    pub fn mic_test(&self) -> bool {
        self.mic_test.is_some()
    }

    /// One captured frame (exactly `frame().samples()` samples). The encoded frame is sealed
    /// once per connected peer and queued for [`VoiceEngine::poll_transmit`].
    pub fn handle_capture(&mut self, now: Duration, pcm: &[f32]) {
        let muted = self.capture.is_muted();
        let echo_cancellation = self.capture.processing().echo_cancel;
        let out = self.capture.process(now, pcm);
        self.input_level_db = out.level_db;
        self.vad_threshold_db = out.threshold_db;
        self.speaking = out.speaking;
        self.transmitting = out.transmitting;
        if out.speaking && muted {
            self.muted_speech_until = Some(now + MUTED_SPEECH_HOLD);
        }
        if let Some(test) = &mut self.echo_test {
            let raw = crate::voice::tx::levels::rms(pcm).powi(2);
            if let Some(result) =
                test.capture(raw, out.after_echo_power, pcm.len(), echo_cancellation)
            {
                self.echo_test_result = Some(result);
                self.echo_test = None;
            }
        }
        let samples = self.cfg.frame.samples() as u64;
        if out.frames().len() == 0 {
            if let Some(test) = &mut self.mic_test {
                test.push_silence(pcm.len());
            }
        }
        // Out of a call nothing is encoded, unless the microphone test wants to hear it.
        if self.table.is_none() && self.mic_test.is_none() {
            return;
        }
        for frame in out.frames() {
            // Leave room for the AEAD tag and a relay envelope inside the datagram size limit,
            // so any frame can take any path.
            let body = &mut self.packet[..MAX_VOICE_PAYLOAD - TAG_LEN - RELAY_HEADER_LEN];
            let Ok(len) = self.encoder.encode(frame.samples, body) else {
                continue;
            };
            if is_dtx_payload(len) {
                if let Some(test) = &mut self.mic_test {
                    test.push_silence(frame.samples.len());
                }
                continue;
            }
            if let Some(test) = &mut self.mic_test {
                test.push_packet(&self.packet[..len]);
            }
            let Some(table) = &mut self.table else {
                continue;
            };
            let timestamp = (frame.index.wrapping_mul(samples)) as u32;
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1);
            // Reused buffer: no allocation per frame once it has grown to the channel size.
            self.targets.clear();
            self.targets.extend(table.voice_targets());
            for &(peer, route) in &self.targets {
                // Only peers whose key we know get voice, and only sealed for them alone.
                let cipher = self.peers.get_mut(&peer).and_then(|p| p.cipher.as_mut());
                let Some(cipher) = cipher else {
                    continue;
                };
                // Relayed voice is sealed in place behind its envelope header.
                let (Some(addr), at) = route_target(table, &self.registration, route) else {
                    continue;
                };
                if at > 0 {
                    self.sealed[..at].copy_from_slice(&relay_header(DatagramKind::RelayTo, peer));
                }
                let Ok(sealed) = cipher.seal_datagram(
                    seq,
                    timestamp,
                    &self.packet[..len],
                    &mut self.sealed[at..],
                ) else {
                    continue;
                };
                let total = at + sealed;
                self.outbox.push(addr, &self.sealed[..total]);
                table.record_voice_sent(peer, total);
                self.bytes_sent += total as u64;
            }
            self.frames_sent += 1;
        }
    }

    /// Fills `out` (any multiple of [`CHUNK_SAMPLES`] samples) with the mix of every peer's
    /// audio through its jitter buffer.
    pub fn playout_frame(&mut self, now: Duration, out: &mut [f32]) {
        for chunk in out.chunks_mut(CHUNK_SAMPLES) {
            self.playout_chunk(now, chunk);
        }
    }

    /// One 10 ms chunk. Mixing in 10 ms steps whatever the codec frame means a frame that
    /// arrives just after a mix waits at most 10 ms for the next one, not a whole frame.
    fn playout_chunk(&mut self, now: Duration, out: &mut [f32]) {
        for rx in self.peers.values_mut().filter_map(|p| p.rx.as_mut()) {
            rx.render(now);
        }
        self.mixer.begin();
        for peer in self.peers.values() {
            let Some(rx) = &peer.rx else {
                continue;
            };
            let evened = if self.cfg.normalize_loudness {
                rx.loudness.gain()
            } else {
                1.0
            };
            self.mixer.add(MixInput {
                samples: &rx.out,
                gain: peer.settings.volume * evened,
                muted: peer.settings.muted,
            });
        }
        let mixed = self.mixer.finish();
        let n = out.len().min(mixed.len());
        out[..n].copy_from_slice(&mixed[..n]);
        out[n..].fill(0.0);
        self.mix_level_db = rms_dbfs(&out[..n]);
        // After the level (the trace shows the call), before the echo canceller's reference
        // (a cue the speaker plays must not reach the others through our microphone).
        self.cues.mix_into(out);
        // Ourselves, in the microphone test: also part of what the speaker plays.
        if let Some(test) = &mut self.mic_test {
            test.mix_into(out);
        }
        // The echo test's sound, which the canceller must see like any other.
        if let Some(test) = &mut self.echo_test {
            test.render(out);
        }
        // What goes to the speaker is what the echo canceller must take out of the microphone.
        self.capture.analyze_render(out);
    }

    /// Tells every peer we hear how its voice reaches us (a Report), and tunes our encoder's
    /// redundancy and bit rate to the worst loss our listeners report of ours. Before any
    /// report (a peer that has not heard us yet, or one too old to send them), the loss we
    /// see from our peers stands in for it.
    fn exchange_reports(&mut self, now: Duration) {
        let Some(table) = &mut self.table else {
            return;
        };
        let our_id = table.our_id();
        self.targets.clear();
        self.targets.extend(table.voice_targets());
        for &(peer_id, route) in &self.targets {
            let Some(peer) = self.peers.get(&peer_id) else {
                continue;
            };
            let (Some(rx), Some(cipher)) = (peer.rx.as_ref(), peer.cipher.as_ref()) else {
                continue;
            };
            // One counter for every report of this run: the tag's nonce never repeats under
            // a key, even for a peer that left and came back.
            let Some(seq) = self.report_seq.checked_add(1) else {
                continue;
            };
            let stats = rx.receiver.stats().jitter;
            let report = ReceiverReport {
                seq,
                loss_permille: (stats.loss_fraction * 1000.0).round().clamp(0.0, 1000.0) as u16,
                loss_run: stats.loss_run.min(ReceiverReport::MAX_LOSS_RUN),
                jitter_ms: stats
                    .jitter
                    .as_millis()
                    .min(u128::from(ReceiverReport::MAX_JITTER_MS))
                    as u16,
            };
            let datagram = Datagram::Report {
                from: our_id,
                to: peer_id,
                report,
            };
            let (Some(addr), at) = route_target(table, &self.registration, route) else {
                continue;
            };
            let mut fixed = [0u8; PEER_CONTROL_LEN];
            if datagram.write(&mut fixed).is_err() {
                continue;
            }
            let Ok(tag) = cipher.tag_control(&fixed) else {
                continue;
            };
            self.report_seq = seq;
            let wire = &mut self.sealed[..at + PEER_CONTROL_LEN + TAG_LEN];
            if at > 0 {
                wire[..at].copy_from_slice(&relay_header(DatagramKind::RelayTo, peer_id));
            }
            wire[at..at + PEER_CONTROL_LEN].copy_from_slice(&fixed);
            wire[at + PEER_CONTROL_LEN..].copy_from_slice(&tag);
            self.outbox.push(addr, wire);
        }

        let reported = self
            .peers
            .values()
            .filter_map(|p| p.reported_loss_percent(now, REPORT_FRESH))
            .reduce(f32::max);
        let loss_pct = reported.unwrap_or_else(|| {
            self.peers
                .values()
                .filter_map(|p| p.rx.as_ref())
                .map(|rx| rx.receiver.stats().jitter.loss_fraction * 100.0)
                .fold(0.0f32, f32::max)
        });
        // Deep redundancy rather than FEC when every listener who loses our voice loses it in
        // bursts (see `LossShape::for_listeners`); before any report, how we lose theirs.
        let reports = self.peers.values().filter_map(|p| {
            Some((
                p.reported_loss_percent(now, REPORT_FRESH)?,
                p.reported_loss_run(now, REPORT_FRESH)?,
            ))
        });
        let shape = if reports.clone().next().is_none() {
            LossShape::for_listeners(self.peers.values().filter_map(|p| p.rx.as_ref()).map(|rx| {
                let jitter = &rx.receiver.stats().jitter;
                (jitter.loss_fraction * 100.0, jitter.loss_run)
            }))
        } else {
            LossShape::for_listeners(reports)
        };
        let pct = loss_pct.round().clamp(0.0, 50.0) as u8;
        let _ = self.encoder.set_expected_loss_percent(pct.max(5));
        let _ = self.encoder.set_loss_shape(shape);
        let _ = self
            .encoder
            .set_bitrate(bitrate_for_loss(self.cfg.bitrate_bps, pct));
    }

    /// Fires the timers due at `now`: registration with the server, punches and keepalives.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.registration.handle_timeout(now);
        self.tunnel
            .update(self.registration.udp_blocked(now), self.server_relays);
        if let Some(table) = &mut self.table {
            table.handle_timeout(now);
        }
        if self.table.is_some() && now >= self.next_report {
            self.next_report = now + REPORT_INTERVAL;
            self.exchange_reports(now);
        }
        // Retransmissions, and what waited for a path that just came up.
        self.flush_chat(now);
    }

    /// The next datagram to send, written into `buf` (at least [`MAX_DATAGRAM_LEN`] bytes):
    /// the server registration, sealed voice, then punches, keepalives and answers, each
    /// tagged for its peer. Call until `None` after every `handle_*` call. While the engine
    /// [tunnels](Self::tunnels), what is for the server is held for [`Self::poll_tunnel`]
    /// instead (registrations still try UDP, to notice it opening up).
    pub fn poll_transmit(&mut self, _now: Duration, buf: &mut [u8]) -> Option<Transmit> {
        if let Some(t) = self.registration.poll_transmit(buf) {
            return Some(t);
        }
        let server = self.registration.server_addr();
        while let Some(t) = self.poll_peer_transmit(buf) {
            if !self.tunnel.divert(t.to, server, &buf[..t.len]) {
                return Some(t);
            }
        }
        None
    }

    /// Sealed voice, then punches, keepalives and answers: everything but registration.
    fn poll_peer_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        if let Some(t) = self.outbox.pop(buf) {
            return Some(t);
        }
        let table = self.table.as_mut()?;
        while let Some(out) = table.poll_transmit() {
            // A relayed datagram is written behind its envelope header.
            let (datagram, to, at) = match out {
                Outgoing::Direct(t) => (t.datagram, Some(t.to), 0),
                Outgoing::Relayed(t) => (
                    t.datagram,
                    relay_addr(table, &self.registration, t.via),
                    RELAY_HEADER_LEN,
                ),
            };
            let Some(to) = to else {
                continue;
            };
            let Some(peer_id) = datagram.recipient() else {
                continue;
            };
            let Ok(n) = datagram.write(&mut buf[at..]) else {
                continue;
            };
            // Every peer datagram is authenticated; a peer without a key cannot verify
            // ours (and gets no voice either), so nothing is sent to it.
            let cipher = self.peers.get(&peer_id).and_then(|p| p.cipher.as_ref());
            let Some(cipher) = cipher else {
                continue;
            };
            let Ok(fixed) = <&[u8; PEER_CONTROL_LEN]>::try_from(&buf[at..at + n]) else {
                continue;
            };
            let Ok(tag) = cipher.tag_control(fixed) else {
                continue;
            };
            buf[at + n..at + n + TAG_LEN].copy_from_slice(&tag);
            if at > 0 {
                buf[..at].copy_from_slice(&relay_header(DatagramKind::RelayTo, peer_id));
            }
            return Some(Transmit {
                to,
                len: at + n + TAG_LEN,
            });
        }
        None
    }

    /// When [`VoiceEngine::handle_timeout`] is next due; `None` with no server and no peers.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let link = self
            .table
            .as_ref()
            .and_then(|t| t.poll_timeout())
            .map(|t| t.min(self.next_report));
        let link = match (link, self.chat_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let reg = self.registration.poll_timeout();
        match (link, reg) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What authenticates a peer's datagram: the peers' ciphers and the engine's counters,
/// borrowed apart from the peer table so a direct and a relayed datagram go through the same
/// check.
struct Gate<'e> {
    peers: &'e mut BTreeMap<UserId, Peer>,
    drops: &'e mut DropCounters,
    undecryptable: &'e mut u64,
}

impl Gate<'_> {
    /// The datagram once its sender's cipher verified (control) or opened (voice) it; `None`,
    /// counted, when it did not. Voice plaintext is written into `opened`.
    fn authenticate<'a>(
        &mut self,
        opened: &'a mut [u8],
        received: Received<'a>,
    ) -> Option<Datagram<'a>> {
        match received {
            // Punch, PunchAck, Ping and Pong carry a tag from the peer's control key: a spoofed
            // punch would otherwise make the link adopt (and stream voice to) any address.
            Received::Control { datagram, tagged } => {
                let verified = datagram
                    .sender()
                    .and_then(|sender| self.peers.get_mut(&sender))
                    .and_then(|p| p.cipher.as_mut())
                    .is_some_and(|c| c.verify_control(tagged).is_ok());
                if !verified {
                    *self.undecryptable += 1;
                    return None;
                }
                Some(datagram)
            }
            Received::Voice {
                from: sender,
                seq,
                timestamp,
                sealed,
            } => {
                let cipher = self.peers.get_mut(&sender).and_then(|p| p.cipher.as_mut());
                let Some(cipher) = cipher else {
                    *self.undecryptable += 1;
                    return None;
                };
                match cipher.open_datagram(sealed, opened) {
                    Ok(n) => Some(Datagram::Voice {
                        from: sender,
                        seq,
                        timestamp,
                        payload: &opened[..n],
                    }),
                    // The cipher's window is the one replay window of this direction: a
                    // replayed or duplicated datagram is no attack on the key, count it as such.
                    Err(CryptoError::Replay { .. }) => {
                        self.drops.count(&DropReason::Replay(sender));
                        None
                    }
                    Err(_) => {
                        *self.undecryptable += 1;
                        None
                    }
                }
            }
            // Relay envelopes were handled before; anything else is not a peer's.
            Received::Plain(datagram) => Some(datagram),
        }
    }
}

/// Remembers a peer key whose cipher under our current keys was dropped (bounded, the oldest
/// forgotten first).
fn retire(retired: &mut std::collections::VecDeque<[u8; 32]>, key: [u8; 32]) {
    if retired.contains(&key) {
        return;
    }
    if retired.len() >= MAX_RETIRED_PEER_KEYS {
        retired.pop_front();
    }
    retired.push_back(key);
}

/// The address of relay `via`: a member's, or the server's.
fn relay_addr(table: &PeerTable, registration: &Registration, via: Via) -> Option<SocketAddr> {
    match via {
        Via::Member(m) => table.member_addr(m),
        Via::Server => registration.server_addr(),
    }
}

/// Where a datagram for a peer on `route` goes, and where the peer datagram starts in it:
/// after the envelope header when it goes through a relay.
fn route_target(
    table: &PeerTable,
    registration: &Registration,
    route: Route,
) -> (Option<SocketAddr>, usize) {
    match route {
        Route::Direct(addr) => (Some(addr), 0),
        Route::Relayed(via) => (relay_addr(table, registration, via), RELAY_HEADER_LEN),
    }
}

/// Takes a Report, already authenticated by the cipher of `sender` (the peer it came from, or
/// whose datagram a relay forwarded), if it is that peer's and addressed to us.
fn take_report(
    peers: &mut BTreeMap<UserId, Peer>,
    drops: &mut DropCounters,
    our_id: UserId,
    now: Duration,
    sender: UserId,
    datagram: Datagram<'_>,
) {
    let Datagram::Report { from, to, report } = datagram else {
        return;
    };
    if from != sender {
        drops.count(&DropReason::UnknownSender(from));
    } else if to != our_id {
        drops.count(&DropReason::WrongRecipient(to));
    } else if let Some(peer) = peers.get_mut(&from) {
        peer.handle_report(now, report);
    }
}

/// Hands a voice frame of peer `peer_id` to its receive path (made for the frame's duration).
fn deliver_voice(
    peers: &mut BTreeMap<UserId, Peer>,
    now: Duration,
    peer_id: UserId,
    seq: u32,
    timestamp: u32,
    payload: &[u8],
) {
    let Some(frame) = opus_frame_duration(payload) else {
        return;
    };
    let Some(peer) = peers.get_mut(&peer_id) else {
        return;
    };
    if let Ok(rx) = peer.receive_path(frame) {
        rx.receiver.push(now, seq, timestamp, payload);
    }
}
