//! `HeadlessPlugin`: the windowless client used by tests, bots and benchmarks. It connects,
//! joins the requested channel, prints every control event as one JSON line on stdout and
//! exits after `--duration` (0), on a refused join (3) or on a fatal refusal (4).
//!
//! Chat: each `--say TEXT` is sent, in order, once we are in the channel and the peers are
//! connected (at least `--say-peers` of them, and every peer we know of has a path), or
//! [`SAY_WAIT`] after joining if that never happens. A message goes to the members in the
//! channel at that moment; one who joins later does not get it (there is no history). Sent
//! messages print as `{"event":"chat_sent",...}`, received ones as
//! `{"event":"chat","from":NAME,"text":...,"time":...}` (`time`: the sender's clock when it
//! wrote the message, Unix ms; `received_ms`: ours when we printed it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bevy::app::AppExit;
use bevy::prelude::*;
use serde_json::json;

use crate::client::session::PeerIdentityStatus;
use crate::client::{ClientIntent, ControlEvent, ControlLink, SessionEvent};
use crate::identity::identity_fingerprint;
use crate::protocol::{Password, Status, UserId};
use crate::voice::{
    ChatEvent, ChatNews, PeerSnapshot, PeerState, RelayVia, Voice, VoiceCommand, VoiceSetting,
    VoiceSnapshot, VoiceThreadConfig,
};

use crate::voice::plugin::unix_ms;

/// Longest wait for the peers after joining before `--say` messages go to whoever is there.
pub const SAY_WAIT: Duration = Duration::from_secs(10);

/// Exit code when the server refuses to let us join the channel.
pub const EXIT_JOIN_REFUSED: u8 = 3;
/// Exit code when the server refuses us for good (name taken, version mismatch).
pub const EXIT_REFUSED: u8 = 4;

/// What the headless client should do.
#[derive(Resource, Debug, Clone)]
pub struct HeadlessOptions {
    pub server: String,
    pub username: String,
    pub channel: Option<String>,
    pub password: Option<Password>,
    pub duration: Option<Duration>,
    pub voice: VoiceThreadConfig,
    /// Send continuously instead of following the voice activity detector.
    pub always_transmit: bool,
    pub start_muted: bool,
    /// Replace a server certificate pin that no longer matches.
    pub accept_new_cert: bool,
    /// Accept a member's changed identity key (after the `identity_changed` line).
    pub accept_new_identity: bool,
    /// Chat messages to send once joined and connected (`--say`), in order.
    pub say: Vec<String>,
    /// How many connected peers to wait for before sending them (`--say-peers`).
    pub say_peers: usize,
    /// Run the echo test at start and print its result (`--echo-test`).
    pub echo_test: bool,
}

#[derive(Resource)]
struct RunClock {
    start: Instant,
    stopping: Option<(Instant, u8)>,
    goodbye_sent: bool,
    /// When we joined the channel (the `--say` wait starts then).
    joined_at: Option<Instant>,
    said: bool,
}

/// See the module docs.
pub struct HeadlessPlugin(pub HeadlessOptions);

impl Plugin for HeadlessPlugin {
    fn build(&self, app: &mut App) {
        app.insert_resource(self.0.clone())
            .insert_resource(RunClock {
                start: Instant::now(),
                stopping: None,
                goodbye_sent: false,
                joined_at: None,
                said: false,
            })
            .add_systems(PostStartup, start_connect)
            .init_resource::<DepartedPeers>()
            .add_systems(
                Update,
                (
                    report_events,
                    say_when_connected,
                    report_chat,
                    report_echo_test,
                    track_departures,
                    stop_when_done,
                )
                    .chain(),
            );
    }
}

fn start_connect(opts: Res<HeadlessOptions>, voice: Res<Voice>, mut link: ResMut<ControlLink>) {
    if let Some(t) = &voice.thread {
        let us = t
            .audio_started()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        emit(format_args!(
            "{}",
            json!({"event": "audio_started", "unix_us": us, "voice_addr": t.local_addr().to_string()})
        ));
        if opts.always_transmit {
            t.send(VoiceCommand::Setting(VoiceSetting::PushToTalk(true)));
            t.send(VoiceCommand::Setting(VoiceSetting::PttPressed(true)));
        }
        if opts.start_muted {
            t.send(VoiceCommand::Setting(VoiceSetting::Muted(true)));
        }
        if opts.echo_test {
            t.send(VoiceCommand::Setting(VoiceSetting::EchoTest(true)));
        }
    }
    if let Some(e) = &voice.error {
        eprintln!("p2p-voice: {e}");
    }
    let now = link.now();
    link.session.connect(now, &opts.server, &opts.username);
    // Remembered by the session: joined after identification, and rejoined after reconnects.
    if let Some(channel) = &opts.channel {
        link.session.join(now, channel, opts.password.clone());
    }
}

/// Prints one JSON line; a closed stdout (the reader went away) is not worth a panic.
fn emit(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// The JSON form of a control event, one line per event.
pub fn event_json(event: &SessionEvent) -> serde_json::Value {
    match event {
        SessionEvent::Welcome { .. } => json!({"event": "connected"}),
        SessionEvent::Identified { user_id, username } => {
            json!({"event": "identified", "user_id": user_id, "username": username})
        }
        SessionEvent::Overview { channels } => json!({
            "event": "overview",
            "channels": channels.iter().map(|c| json!({
                "name": c.name,
                "has_password": c.has_password,
                "max_members": c.max_members,
                "members": c.members.iter().map(|m| json!({"user_id": m.user_id, "username": m.username})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
        SessionEvent::Joined { channel } => json!({"event": "joined", "channel": channel}),
        SessionEvent::JoinRefused { channel, status } => json!({
            "event": "join_refused", "channel": channel, "status": format!("{status:?}"), "message": status.message(),
        }),
        SessionEvent::Left { channel } => json!({"event": "left", "channel": channel}),
        SessionEvent::MemberJoined { channel, member } => json!({
            "event": "member_joined", "channel": channel, "user_id": member.user_id, "username": member.username,
        }),
        SessionEvent::MemberLeft { channel, user_id } => {
            json!({"event": "member_left", "channel": channel, "user_id": user_id})
        }
        SessionEvent::PeerEndpoints(p) => json!({
            "event": "peer_endpoints", "user_id": p.user_id, "username": p.username,
            "candidates": p.candidates().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        }),
        SessionEvent::PeerGone { user_id } => json!({"event": "peer_gone", "user_id": user_id}),
        SessionEvent::Disconnected { reason, retry_in } => json!({
            "event": "disconnected", "reason": reason.to_string(), "retry_in_ms": retry_in.map(|d| d.as_millis() as u64),
        }),
        SessionEvent::Error { status, message } => json!({
            "event": "error", "status": status.map(|s| format!("{s:?}")), "message": message,
        }),
        SessionEvent::PeerIdentity {
            user_id,
            username,
            status,
        } => identity_json(*user_id, username, status),
    }
}

/// A peer's identity news: `peer_identity` while it checks out, `identity_changed` (loud:
/// its voice is held back until accepted) or `peer_refused` with the reason.
fn identity_json(
    user_id: UserId,
    username: &str,
    status: &PeerIdentityStatus,
) -> serde_json::Value {
    match status {
        PeerIdentityStatus::Trusted {
            identity,
            first_seen,
            verified,
        } => json!({
            "event": "peer_identity", "user_id": user_id, "username": username,
            "identity_fingerprint": identity_fingerprint(identity),
            "first_seen": first_seen, "verified": verified,
        }),
        PeerIdentityStatus::Changed {
            previous,
            presented,
        } => json!({
            "event": "identity_changed", "user_id": user_id, "username": username,
            "previous_fingerprint": identity_fingerprint(previous),
            "presented_fingerprint": identity_fingerprint(presented),
            "voice": "held until the new identity is accepted",
        }),
        PeerIdentityStatus::Refused(reason) => json!({
            "event": "peer_refused", "user_id": user_id, "username": username,
            "reason": reason.to_string(),
        }),
    }
}

fn report_events(
    mut clock: ResMut<RunClock>,
    mut events: EventReader<ControlEvent>,
    mut link: ResMut<ControlLink>,
    opts: Res<HeadlessOptions>,
) {
    for ControlEvent(event) in events.read() {
        let mut line = event_json(event);
        if matches!(event, SessionEvent::Welcome { .. }) {
            // What to compare with the server operator's fingerprint (pinned on first use).
            line["server_fingerprint"] = json!(link.server_fingerprint());
        }
        if matches!(event, SessionEvent::Identified { .. }) {
            line["identity_fingerprint"] = json!(link
                .session
                .identity_public()
                .map(|k| identity_fingerprint(&k)));
        }
        if let SessionEvent::PeerIdentity {
            user_id, status, ..
        } = event
        {
            line["safety_number"] = json!(link.session.safety_number(*user_id));
            if let PeerIdentityStatus::Changed { .. } = status {
                let who = line["username"].as_str().unwrap_or_default();
                if opts.accept_new_identity {
                    eprintln!(
                        "p2p-voice: WARNING: {who}'s identity key changed; accepted \
                         (--accept-new-identity)"
                    );
                    let now = link.now();
                    link.session.accept_identity(now, *user_id);
                } else {
                    eprintln!(
                        "p2p-voice: WARNING: {who}'s identity key changed: the server may be \
                         listening in; their voice is not used (run with --accept-new-identity \
                         once you have checked the new safety number with them)"
                    );
                }
            }
        }
        emit(format_args!("{line}"));
        match event {
            SessionEvent::Joined { .. } => {
                clock.joined_at.get_or_insert_with(Instant::now);
            }
            SessionEvent::JoinRefused { channel, status } => {
                eprintln!("p2p-voice: cannot join {channel}: {}", status.message());
                clock
                    .stopping
                    .get_or_insert((Instant::now(), EXIT_JOIN_REFUSED));
            }
            SessionEvent::Disconnected {
                reason,
                retry_in: None,
            } => {
                eprintln!("p2p-voice: {reason}");
                clock.stopping.get_or_insert((Instant::now(), EXIT_REFUSED));
            }
            SessionEvent::Disconnected {
                reason,
                retry_in: Some(d),
            } => {
                eprintln!(
                    "p2p-voice: {reason}; reconnecting in {:.1} s",
                    d.as_secs_f32()
                );
            }
            SessionEvent::Error {
                status: Some(Status::NameTaken | Status::InvalidName),
                ..
            } => {}
            _ => {}
        }
    }
}

/// Whether the `--say` messages may go: at least `want` peers, and every peer known has a
/// path (direct or relayed).
pub fn peers_ready(peers: &[PeerSnapshot], want: usize) -> bool {
    let connected =
        |p: &&PeerSnapshot| matches!(p.state, PeerState::Direct(_) | PeerState::Relayed(_));
    peers.len() >= want && peers.iter().filter(connected).count() == peers.len()
}

/// Sends the `--say` messages once, when we are in the channel and the peers are connected
/// (or [`SAY_WAIT`] after joining).
fn say_when_connected(opts: Res<HeadlessOptions>, voice: Res<Voice>, mut clock: ResMut<RunClock>) {
    if clock.said || opts.say.is_empty() {
        return;
    }
    let (Some(joined), Some(thread)) = (clock.joined_at, &voice.thread) else {
        return;
    };
    if !peers_ready(&voice.last.peers, opts.say_peers) && joined.elapsed() < SAY_WAIT {
        return;
    }
    clock.said = true;
    for text in &opts.say {
        thread.send(VoiceCommand::SendChat {
            text: text.clone(),
            sent_ms: unix_ms(),
        });
    }
}

/// The JSON line of a chat event (`received_ms` is when it is printed).
pub fn chat_json(event: &ChatEvent, received_ms: u64) -> serde_json::Value {
    match event {
        ChatEvent::Received(m) => json!({
            "event": "chat", "from": m.from_name, "from_id": m.from, "text": m.text,
            "time": m.sent_ms, "received_ms": received_ms,
        }),
        ChatEvent::Sent {
            text,
            sent_ms,
            result,
        } => json!({
            "event": "chat_sent", "text": text, "time": sent_ms,
            "to": result.to.iter().map(|(_, name)| name).collect::<Vec<_>>(),
            "queue_full": result.queue_full.iter().map(|(_, name)| name).collect::<Vec<_>>(),
        }),
        ChatEvent::Refused { text, reason } => json!({
            "event": "chat_refused", "text": text, "reason": reason.to_string(),
        }),
    }
}

/// Prints the echo test's result once, when the voice thread has it.
fn report_echo_test(voice: Res<Voice>, mut reported: Local<bool>) {
    let Some(crate::voice::EchoTestStatus::Done(r)) = voice.last.echo_test else {
        return;
    };
    if std::mem::replace(&mut *reported, true) {
        return;
    }
    let verdict = match r.verdict {
        crate::voice::EchoVerdict::NoEcho => "no_echo",
        crate::voice::EchoVerdict::Cancelled => "cancelled",
        crate::voice::EchoVerdict::Remains => "remains",
    };
    emit(format_args!(
        "{}",
        json!({
            "event": "echo_test",
            "verdict": verdict,
            "echo_cancellation": r.echo_cancellation,
            "background_db": r.background_db,
            "played_db": r.played_db,
            "picked_up_db": r.picked_up_db,
            "after_cancel_db": r.after_cancel_db,
            "coupling_db": r.coupling_db(),
            "removed_db": r.removed_db(),
        })
    ));
}

fn report_chat(mut news: EventReader<ChatNews>) {
    for ChatNews(ev) in news.read() {
        emit(format_args!("{}", chat_json(ev, unix_ms())));
    }
}

/// Peers that were in the call and are gone (they left, or their run ended before ours), with
/// their figures as last seen. Without them a summary taken at our end would hide whoever
/// finished a moment earlier: calls end one participant at a time.
#[derive(Resource, Default)]
struct DepartedPeers {
    /// The peers of the latest snapshot, by user id.
    current: BTreeMap<UserId, PeerSnapshot>,
    departed: Vec<PeerSnapshot>,
}

impl DepartedPeers {
    /// Takes in the peers of a new snapshot; the known ones missing from it have departed.
    fn update(&mut self, live: &[PeerSnapshot]) {
        let gone: Vec<UserId> = self
            .current
            .keys()
            .filter(|id| !live.iter().any(|p| p.user_id == **id))
            .copied()
            .collect();
        for id in gone {
            if let Some(p) = self.current.remove(&id) {
                self.departed.push(p);
            }
        }
        for p in live {
            self.current.insert(p.user_id, p.clone());
        }
    }
}

fn track_departures(voice: Res<Voice>, mut peers: ResMut<DepartedPeers>) {
    if voice.is_changed() {
        peers.update(&voice.last.peers);
    }
}

/// The devices in use, as the audio path described them when it opened them.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceDescs<'a> {
    pub input: Option<&'a str>,
    pub output: Option<&'a str>,
}

/// The final JSON line: each peer's link state and stats, the same for the peers that
/// departed during the run (`departed_peers`, in the order they went), and the audio path's
/// devices and glitch counters (`audio`).
/// User plus system CPU time of this process so far, ms (`None` where unknown).
fn process_cpu_ms() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes the struct we hand it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return None;
        }
        let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
        Some(ms(usage.ru_utime) + ms(usage.ru_stime))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

pub fn summary_json(
    snap: &VoiceSnapshot,
    departed: &[PeerSnapshot],
    devices: DeviceDescs<'_>,
) -> serde_json::Value {
    let peer_json = |p: &PeerSnapshot| {
        json!({
            "user_id": p.user_id,
            "username": p.name,
            "link": match &p.state {
                PeerState::Punching => json!({"state": "punching"}),
                PeerState::Direct(a) => json!({"state": "direct", "addr": a.to_string()}),
                PeerState::Relayed(via) => json!({
                    "state": "relayed",
                    "via": match via {
                        RelayVia::Member { name, .. } => name.as_str(),
                        RelayVia::Server => "server",
                    },
                    "text": via.to_string(),
                }),
                PeerState::Unreachable(r) => {
                    json!({"state": "unreachable", "reason": r.to_string()})
                }
            },
            "rtt_ms": p.rtt_ms,
            "loss_pct": p.loss_pct,
            "jitter_ms": p.jitter_ms,
            "buffer_ms": p.buffer_ms,
            "target_ms": p.target_ms,
            "packets_in": p.packets_in,
            "packets_out": p.packets_out,
            "bytes_in": p.bytes_in,
            "bytes_out": p.bytes_out,
            "frames_decoded": p.frames_decoded,
            "frames_fec": p.frames_fec,
            "frames_rebuilt": p.frames_rebuilt,
            "frames_shortened": p.frames_shortened,
            "packets_lost": p.packets_lost,
            "decode_errors": p.decode_errors,
            "reported_loss_pct": p.reported_loss_pct,
            "frames_concealed": p.frames_concealed,
            "frames_pause_concealed": p.frames_pause_concealed,
            "frames_preroll_skipped": p.frames_preroll_skipped,
            "frames_stretched": p.frames_stretched,
            "frames_dropped": p.frames_dropped,
            "late": p.late,
            "duplicates": p.duplicates,
            "chat": {
                "unacked": p.chat_unacked,
                "data_sent": p.chat.data_sent,
                "retransmitted": p.chat.retransmitted,
                "delivered": p.chat.messages_delivered,
                "duplicates": p.chat.duplicates,
                "stale": p.chat.stale,
            },
            "fingerprint": p.fingerprint,
            "auth_failures": p.auth_failures,
            "forwarded": p.forwarded,
        })
    };
    json!({
        "event": "summary",
        "self_id": snap.self_id,
        "frames_sent": snap.frames_sent,
        "bytes_sent": snap.bytes_sent,
        "public_addr": snap.public_addr.map(|a| a.to_string()),
        // The router's mapping of our voice port, announced as a candidate (null: none).
        "port_mapping": snap.port_mapping.map(|m| json!({
            "protocol": m.lease.protocol.to_string(),
            "external": m.lease.external.to_string(),
            "lifetime_s": m.lease.lifetime.as_secs(),
            "mapped_after_ms": m.since.as_millis() as u64,
        })),
        "fingerprint": snap.fingerprint,
        "undecryptable_datagrams": snap.undecryptable,
        "foreign_register_acks": snap.foreign_register_acks,
        "udp_blocked": snap.udp_blocked,
        "tunnel": {
            "on": snap.tunnelled,
            "datagrams": snap.tunnel_datagrams,
            "dropped": snap.tunnel_dropped,
        },
        "dropped_datagrams": {
            "garbage": snap.drops.garbage,
            "unknown_sender": snap.drops.unknown_sender,
            "wrong_recipient": snap.drops.wrong_recipient,
            "unauthenticated_source": snap.drops.unauthenticated_source,
            "replay": snap.drops.replay,
            "stale_control": snap.drops.stale_control,
            "unexpected_kind": snap.drops.unexpected_kind,
        },
        "peers": snap.peers.iter().map(peer_json).collect::<Vec<_>>(),
        "departed_peers": departed.iter().map(peer_json).collect::<Vec<_>>(),
        "audio": {
            "input": devices.input,
            "output": devices.output,
            "capture_overrun_samples": snap.audio.capture_overrun_samples,
            "playback_underrun_samples": snap.audio.playback_underrun_samples,
            "device_xruns": snap.audio.device_xruns,
            "device_errors": snap.audio.device_errors,
            "paced_chunks_skipped": snap.audio.paced_chunks_skipped,
            "stream_restarts": snap.audio.stream_restarts,
            "devices_lost": snap.audio.devices_lost,
            "capture_block_max_frames": snap.audio.capture_block_max_frames,
            "capture_missing_ms": snap.audio.capture_missing_ms,
            "playback_block_max_frames": snap.audio.playback_block_max_frames,
        },
        "process": {
            // This process's CPU time so far (all threads), for benchmarks: what a member
            // spends on, say, forwarding others' streams.
            "cpu_ms": process_cpu_ms(),
        },
        "capture": {
            "noise_suppression": snap.noise_suppression,
            "echo_cancellation": snap.processing.echo_cancel,
            "gain_control": snap.processing.gain_control,
            "high_pass": snap.processing.high_pass,
            "echo_erle_db": snap.echo.map(|e| e.erle_db),
            "echo_delay_ms": snap.echo.map(|e| e.delay_ms),
        },
    })
}

fn stop_when_done(
    opts: Res<HeadlessOptions>,
    mut voice: ResMut<Voice>,
    mut clock: ResMut<RunClock>,
    mut departed: ResMut<DepartedPeers>,
    mut intents: EventWriter<ClientIntent>,
    mut exit: EventWriter<AppExit>,
) {
    if clock.stopping.is_none() {
        if let Some(d) = opts.duration {
            if clock.start.elapsed() >= d {
                clock.stopping = Some((Instant::now(), 0));
            }
        }
    }
    if let Some((since, code)) = clock.stopping {
        // Stop voice first, while the peers are still known, so the summary describes the
        // call (this also finalizes the output WAV); then say goodbye to the server.
        if !clock.goodbye_sent {
            clock.goodbye_sent = true;
            if let Some(mut t) = voice.thread.take() {
                if let Some(snap) = t.shutdown() {
                    // Whoever left since the last periodic snapshot departs now.
                    departed.update(&snap.peers);
                    let devices = DeviceDescs {
                        input: voice.input_desc.as_deref(),
                        output: voice.output_desc.as_deref(),
                    };
                    let line = summary_json(&snap, &departed.departed, devices);
                    emit(format_args!("{line}"));
                }
            }
            intents.write(ClientIntent::Disconnect);
        }
        // Give the goodbye a few frames to reach the socket.
        if since.elapsed() >= Duration::from_millis(50) {
            exit.write(if code == 0 {
                AppExit::Success
            } else {
                AppExit::from_code(code)
            });
        }
    }
}
