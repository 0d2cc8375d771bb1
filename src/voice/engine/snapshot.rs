//! What the rest of the app sees of the voice plane: [`VoiceSnapshot`] and one [`PeerSnapshot`]
//! per peer, built from the engine's state on demand.

use std::net::SocketAddr;
use std::time::Duration;

use super::VoiceEngine;
use crate::audio::AudioStats;
use crate::protocol::UserId;
use crate::voice::net::crypto::fingerprint;
use crate::voice::net::link::{LinkState, UnreachableReason};
use crate::voice::net::peers::DropCounters;
use crate::voice::net::relay::Via;
use crate::voice::tx::{EchoStats, ProcessingConfig};

/// Link state of one peer: the one type the UI consumes (the link's own
/// [`LinkState`] keeps the timing details only the link needs).
#[derive(Debug, Clone, PartialEq)]
pub enum PeerState {
    Punching,
    Direct(SocketAddr),
    /// No direct path; voice goes through a relay. Its `Display` is "relayed via NAME".
    Relayed(RelayVia),
    /// Neither a direct path nor a relay works. Its `Display` is the sentence to show.
    Unreachable(Unreachable),
}

/// Who relays a peer's voice, as people read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayVia {
    /// A member of the channel connected to both of us (it forwards what it cannot read).
    Member { user_id: UserId, name: String },
    /// The metadata server (its operator lets it relay; it forwards what it cannot read).
    Server,
}

impl std::fmt::Display for RelayVia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Member { name, .. } => write!(f, "relayed via {name}"),
            Self::Server => f.write_str("relayed via the server"),
        }
    }
}

/// Why a peer cannot be heard: the direct path's failure, and why no relay stepped in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    pub direct: UnreachableReason,
    /// Whether the server offers to relay: when it does not, that is what to change.
    pub server_relays: bool,
    /// Whether our own UDP never reached the server: then no direct path can work either,
    /// and only a relaying server (through the tunnel) can carry the call.
    pub udp_blocked: bool,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.udp_blocked && !self.server_relays {
            write!(
                f,
                "{}; this network seems to block UDP, and this server does not relay over \
                 its TCP connection (its operator can start it with --relay)",
                self.direct
            )
        } else if self.server_relays {
            write!(f, "{}; no member nor the server could relay", self.direct)
        } else {
            write!(
                f,
                "{}; no member could relay, and this server does not relay \
                 (its operator can start it with --relay)",
                self.direct
            )
        }
    }
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
    /// Lost frames rebuilt from a later packet's deep redundancy (DRED).
    pub frames_rebuilt: u64,
    /// Frames played a pitch period shorter to take out excess delay (time-scaling).
    pub frames_shortened: u64,
    /// This peer's packets that never arrived (sequence gaps), over the whole call.
    pub packets_lost: u64,
    /// Payloads the decoder refused or that held another frame length (concealed instead).
    pub decode_errors: u64,
    /// The share of our voice this peer last reported losing, in per cent (`None` before its
    /// first Report, or when its last one is more than 5 s old).
    pub reported_loss_pct: Option<f32>,
    /// Frames played by concealment: lost or late ones, undecodable ones, and the ones
    /// inserted to raise the delay (`frames_stretched` of them). Not the pause concealment
    /// (`frames_pause_concealed`), nor frames whose fate the next packet will tell.
    pub frames_concealed: u64,
    /// Frames concealed while the stream had stopped for a pause in sending (voice detection
    /// or DTX): nothing was lost; the buffer cannot know a pause until the next packet.
    pub frames_pause_concealed: u64,
    /// Pre-roll frames skipped at a talkspurt's start because they did not fit the delay
    /// (not in `frames_dropped`).
    pub frames_preroll_skipped: u64,
    /// Frames inserted to raise the delay to a higher target.
    pub frames_stretched: u64,
    /// Frames dropped to bring the delay down to the target.
    pub frames_dropped: u64,
    pub late: u64,
    pub duplicates: u64,
    /// Text chat with this peer: what our stream sent, retransmitted, delivered and refused.
    pub chat: crate::voice::net::chat::ChatStats,
    /// Our chat fragments to this peer not yet acknowledged.
    pub chat_unacked: usize,
    pub speaking: bool,
    pub level_db: f32,
    /// Short fingerprint of the peer's voice key, to compare by other means.
    pub fingerprint: Option<String>,
    /// Voice datagrams from this peer that failed authentication.
    pub auth_failures: u64,
    /// Datagrams of this peer we forwarded to another member (we bridge them).
    pub forwarded: u64,
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
    /// The voice detector heard us while muted, within the last [`super::MUTED_SPEECH_HOLD`]:
    /// the window says "you are muted".
    pub talking_while_muted: bool,
    /// Whether the join, leave and mute sounds play.
    pub sounds: bool,
    pub deafened: bool,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub public_addr: Option<SocketAddr>,
    pub drops: DropCounters,
    pub peers: Vec<PeerSnapshot>,
    /// Recent level of the channel mix, dBFS.
    pub mix_level_db: f32,
    /// Whether the capture chain's noise suppressor runs.
    pub noise_suppression: bool,
    /// Which of the capture chain's high-pass filter, echo canceller and gain controller run.
    pub processing: ProcessingConfig,
    /// The echo canceller's figures (how much echo it takes out, the delay it found), while
    /// it runs and once it has some.
    pub echo: Option<EchoStats>,
    /// The echo test: running, or the last one's result.
    pub echo_test: Option<super::echo_test::EchoTestStatus>,
    /// Fingerprint of our own voice key.
    pub fingerprint: String,
    /// Voice and peer-control datagrams dropped because no key was known for their sender or
    /// they did not authenticate (spoofed punches land here).
    pub undecryptable: u64,
    /// `RegisterAck`s that did not come from the server's address: ignored, since anyone could
    /// otherwise tell us a false public address to announce.
    pub foreign_register_acks: u64,
    /// Whether the server has answered none of our UDP (this network blocks it).
    pub udp_blocked: bool,
    /// Whether datagrams for the server go through the control connection instead, and how
    /// many did so far (and were dropped because the connection was backed up).
    pub tunnelled: bool,
    pub tunnel_datagrams: u64,
    pub tunnel_dropped: u64,
    /// The audio path's glitch counters. The engine does no I/O, so it leaves them at zero;
    /// the voice thread, which owns the devices, fills them in.
    pub audio: AudioStats,
    /// The router's mapping of our voice port, announced as a candidate; filled in by the
    /// voice thread (the port-mapping thread talks to the router), `None` without one.
    pub port_mapping: Option<crate::voice::net::portmap::AnnouncedMapping>,
}

impl VoiceEngine {
    /// The engine's figures at `now`, for the UI, the headless summary and the benchmarks.
    pub fn snapshot(&self, now: Duration) -> VoiceSnapshot {
        let mut peers = Vec::new();
        if let Some(table) = &self.table {
            for (id, entry) in table.peers() {
                let link = entry.link.stats();
                let relayed = entry.relay.active_path();
                let state = match (entry.link.state(), relayed) {
                    (LinkState::Connected { addr }, _) => PeerState::Direct(*addr),
                    (_, Some(path)) => PeerState::Relayed(match path.via {
                        Via::Member(m) => RelayVia::Member {
                            user_id: m,
                            name: table.peer(m).map(|e| e.name.clone()).unwrap_or_default(),
                        },
                        Via::Server => RelayVia::Server,
                    }),
                    (LinkState::Punching { .. }, None) => PeerState::Punching,
                    (LinkState::Unreachable { reason }, None) => {
                        PeerState::Unreachable(Unreachable {
                            direct: reason.clone(),
                            server_relays: table.server_relays(),
                            udp_blocked: self.registration.udp_blocked(now),
                        })
                    }
                };
                // Over a relay the round trip is the relay path's (both legs).
                let rtt = match (&state, relayed) {
                    (PeerState::Relayed(_), Some(path)) => path.rtt,
                    _ => link.rtt,
                };
                let peer = self.peers.get(&id);
                let audio = peer.and_then(|p| p.rx.as_ref());
                let cipher = peer.and_then(|p| p.cipher.as_ref());
                let rx = audio.map(|a| a.receiver.stats());
                let ms = |d: Duration| d.as_secs_f32() * 1000.0;
                peers.push(PeerSnapshot {
                    user_id: id,
                    name: entry.name.clone(),
                    state,
                    rtt_ms: rtt.map(ms),
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
                    frames_rebuilt: audio.map(|a| a.rebuilt).unwrap_or(0),
                    frames_shortened: rx.map(|r| r.jitter.shortened).unwrap_or(0),
                    packets_lost: rx.map(|r| r.jitter.lost).unwrap_or(0),
                    decode_errors: rx.map(|r| r.decode_errors).unwrap_or(0),
                    reported_loss_pct: peer
                        .and_then(|p| p.reported_loss_percent(now, super::REPORT_FRESH)),
                    frames_concealed: audio
                        .zip(rx)
                        .map(|(a, r)| {
                            a.concealed.saturating_sub(
                                r.jitter.pause_concealed + r.jitter.unresolved_concealed,
                            )
                        })
                        .unwrap_or(0),
                    frames_pause_concealed: rx.map(|r| r.jitter.pause_concealed).unwrap_or(0),
                    frames_preroll_skipped: rx.map(|r| r.jitter.preroll_skipped).unwrap_or(0),
                    frames_stretched: rx.map(|r| r.jitter.stretched).unwrap_or(0),
                    frames_dropped: rx.map(|r| r.jitter.dropped).unwrap_or(0),
                    late: rx.map(|r| r.jitter.late).unwrap_or(0),
                    duplicates: rx.map(|r| r.jitter.duplicates).unwrap_or(0),
                    chat: peer
                        .and_then(|p| p.chat.as_ref())
                        .map(|c| c.stream.stats)
                        .unwrap_or_default(),
                    chat_unacked: peer
                        .and_then(|p| p.chat.as_ref())
                        .map_or(0, |c| c.stream.unacked()),
                    speaking: audio.is_some_and(|a| a.speaking(now)),
                    level_db: audio.map(|a| a.level_db).unwrap_or(-120.0),
                    fingerprint: cipher.map(|c| fingerprint(&c.peer_public())),
                    auth_failures: cipher.map(|c| c.auth_failures()).unwrap_or(0),
                    forwarded: entry.forwarded,
                });
            }
        }
        let mut drops = self
            .table
            .as_ref()
            .map(|t| t.drop_counters())
            .unwrap_or_default();
        drops.add(&self.drops);
        VoiceSnapshot {
            self_id: self.table.as_ref().map(|t| t.our_id()),
            input_level_db: self.input_level_db,
            vad_threshold_db: self.vad_threshold_db,
            speaking: self.speaking,
            transmitting: self.transmitting,
            muted: self.capture.is_muted(),
            talking_while_muted: self.capture.is_muted()
                && self.muted_speech_until.is_some_and(|until| now < until),
            sounds: self.cues.is_enabled(),
            echo_test: self.echo_test(),
            deafened: self.mixer.is_deafened(),
            frames_sent: self.frames_sent,
            bytes_sent: self.bytes_sent,
            public_addr: self.registration.public_addr(),
            drops,
            peers,
            mix_level_db: self.mix_level_db,
            noise_suppression: self.capture.denoise(),
            processing: self.capture.processing(),
            echo: self.capture.echo_stats(),
            fingerprint: self.keys.fingerprint(),
            undecryptable: self.undecryptable,
            foreign_register_acks: self.registration.foreign_acks(),
            udp_blocked: self.registration.udp_blocked(now),
            tunnelled: self.tunnel.is_on(),
            tunnel_datagrams: self.tunnel.counts().0,
            tunnel_dropped: self.tunnel.counts().1,
            audio: AudioStats::default(),
            port_mapping: None,
        }
    }
}
