//! `VoicePlugin`: bridges ECS and the voice thread. Control events (our id, the server's UDP
//! token, peers' endpoints) become voice commands; voice snapshots become `Speaking`,
//! `VoiceLevel` and `LinkStatus` components on the user entities the UI draws; chat events
//! become the session's chat history ([`Voice::chat`]) and [`ChatNews`] events.

use bevy::prelude::*;

use super::audio_problem::AudioProblem;
use super::engine::{ChatEvent, VoiceSnapshot};
use super::thread::{VoiceCommand, VoiceEvent, VoiceThread, VoiceThreadConfig};
use crate::audio::{AudioEvent, Direction};
use crate::client::{
    ControlEvent, ControlLink, IsSelf, LinkStatus, SessionEvent, Speaking, User, VoiceLevel,
};

/// The running voice plane as seen from ECS.
#[derive(Resource, Default)]
pub struct Voice {
    pub thread: Option<VoiceThread>,
    /// Why there is no voice, if there is none (shown in the UI).
    pub error: Option<String>,
    pub last: VoiceSnapshot,
    /// Latest audio device status for the UI ("no microphone", "device unplugged", ...).
    pub audio_status: Vec<AudioProblem>,
    pub input_desc: Option<String>,
    pub output_desc: Option<String>,
    /// Mix level history (dBFS), newest last, for the waveform.
    pub mix_history: std::collections::VecDeque<f32>,
    /// This session's chat, oldest first (at most [`MAX_CHAT_LINES`]); kept in memory only.
    pub chat: std::collections::VecDeque<ChatLine>,
    /// Why the last message we tried to send was refused, for the chat panel.
    pub chat_notice: Option<String>,
}

/// Most chat lines kept for the window; older ones scroll away for good.
pub const MAX_CHAT_LINES: usize = 1000;

/// One line of the chat history as the window shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatLine {
    /// Who wrote it (our own name for our messages).
    pub from: String,
    /// Whether we wrote it.
    pub own: bool,
    pub text: String,
    /// The writer's wall clock when it was written (Unix ms).
    pub sent_ms: u64,
}

/// Every chat event from the voice thread, as it came (the headless client prints them).
#[derive(Event, Debug, Clone, PartialEq, Eq)]
pub struct ChatNews(pub ChatEvent);

impl Voice {
    fn send(&self, cmd: VoiceCommand) {
        if let Some(t) = &self.thread {
            if !t.send(cmd) {
                warn!("the voice thread is not taking commands; one was dropped");
            }
        }
    }
}

/// Starts the voice thread with the given configuration when the app starts.
pub struct VoicePlugin(pub VoiceThreadConfig);

#[derive(Resource, Clone)]
struct VoiceStartConfig(VoiceThreadConfig);

impl Plugin for VoicePlugin {
    fn build(&self, app: &mut App) {
        app.insert_resource(VoiceStartConfig(self.0.clone()))
            .init_resource::<Voice>()
            .add_event::<VoiceCommand>()
            .add_event::<ChatNews>()
            .add_systems(Startup, start_voice)
            .add_systems(
                Update,
                (
                    forward_control_events,
                    forward_tunnelled,
                    forward_commands,
                    receive_voice_events,
                )
                    .chain(),
            );
    }
}

fn start_voice(cfg: Res<VoiceStartConfig>, mut voice: ResMut<Voice>) {
    match VoiceThread::spawn(cfg.0.clone()) {
        Ok(t) => {
            info!("voice socket on UDP {}", t.local_addr());
            voice.thread = Some(t);
        }
        Err(e) => {
            warn!("voice disabled: {e}");
            voice.error = Some(format!("voice disabled: {e}"));
        }
    }
}

fn forward_control_events(
    voice: Res<Voice>,
    link: Res<ControlLink>,
    mut events: EventReader<ControlEvent>,
) {
    for ControlEvent(ev) in events.read() {
        match ev {
            SessionEvent::Welcome { udp_token, relay } => {
                if let Some(addr) = link.server_addr() {
                    voice.send(VoiceCommand::SetServer {
                        addr,
                        token: *udp_token,
                        relay: *relay,
                    });
                }
            }
            SessionEvent::Identified { user_id, .. } => {
                voice.send(VoiceCommand::SetSelfId(*user_id))
            }
            SessionEvent::PeerEndpoints(peer) => voice.send(VoiceCommand::UpsertPeer(peer.clone())),
            SessionEvent::PeerGone { user_id } => voice.send(VoiceCommand::RemovePeer(*user_id)),
            // A server outage keeps the call going (retry_in is set); leaving the channel or a
            // final refusal ends it.
            SessionEvent::Left { .. } | SessionEvent::Disconnected { retry_in: None, .. } => {
                voice.send(VoiceCommand::ClearPeers)
            }
            _ => {}
        }
    }
}

/// Datagrams the server tunnelled to us go to the voice thread as they came (the other
/// direction is [`VoiceEvent::Tunnel`], in `receive_voice_events`).
fn forward_tunnelled(voice: Res<Voice>, mut link: ResMut<ControlLink>) {
    while let Some(datagram) = link.session.poll_tunnelled() {
        voice.send(VoiceCommand::Tunnelled(datagram));
    }
}

/// Hands the UI's and the CLI's commands to the voice thread unchanged.
fn forward_commands(voice: Res<Voice>, mut commands: EventReader<VoiceCommand>) {
    for cmd in commands.read() {
        voice.send(cmd.clone());
    }
}

/// Adds a chat event to the session's history: messages in the order they came (ours when
/// the voice thread sent them), a refusal as the notice to show.
pub fn record_chat(voice: &mut Voice, ev: &ChatEvent, own_name: &str) {
    let line = match ev {
        ChatEvent::Received(m) => ChatLine {
            from: m.from_name.clone(),
            own: false,
            text: m.text.clone(),
            sent_ms: m.sent_ms,
        },
        ChatEvent::Sent { text, sent_ms, .. } => {
            voice.chat_notice = None;
            ChatLine {
                from: own_name.to_string(),
                own: true,
                text: text.clone(),
                sent_ms: *sent_ms,
            }
        }
        ChatEvent::Refused { reason, .. } => {
            voice.chat_notice = Some(format!("not sent: {reason}"));
            return;
        }
    };
    voice.chat.push_back(line);
    while voice.chat.len() > MAX_CHAT_LINES {
        voice.chat.pop_front();
    }
}

/// The wall clock in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// dBFS to a 0..1 meter position (-60 dBFS and below is empty).
pub fn meter_from_db(db: f32) -> f32 {
    ((db + 60.0) / 60.0).clamp(0.0, 1.0)
}

#[allow(clippy::type_complexity)]
fn receive_voice_events(
    mut voice: ResMut<Voice>,
    mut link: ResMut<ControlLink>,
    mut chat_news: EventWriter<ChatNews>,
    mut users: Query<(
        &User,
        Option<&IsSelf>,
        &mut Speaking,
        &mut VoiceLevel,
        Option<&mut LinkStatus>,
    )>,
) {
    let Some(thread) = &voice.thread else {
        return;
    };
    let events: Vec<VoiceEvent> = thread.events().try_iter().collect();
    for ev in events {
        match ev {
            VoiceEvent::LocalEndpoints { addrs, voice_key } => {
                let now = link.now();
                link.session
                    .set_local_endpoints(now, addrs, Some(voice_key));
            }
            VoiceEvent::Snapshot(s) => {
                voice.mix_history.push_back(s.mix_level_db);
                while voice.mix_history.len() > 200 {
                    voice.mix_history.pop_front();
                }
                voice.last = *s;
            }
            VoiceEvent::Audio(a) => match a {
                AudioEvent::Started {
                    input_desc,
                    output_desc,
                } => {
                    voice.input_desc = Some(input_desc);
                    voice.output_desc = Some(output_desc);
                }
                AudioEvent::InputChanged(d) => {
                    voice.input_desc = Some(d);
                    clear_device_problems(&mut voice.audio_status, Direction::Input);
                }
                AudioEvent::OutputChanged(d) => {
                    voice.output_desc = Some(d);
                    clear_device_problems(&mut voice.audio_status, Direction::Output);
                }
                AudioEvent::FellBackToDefault { which, lost, desc } => {
                    warn!("{which:?} device {lost} is gone: using the system default, {desc}");
                    match which {
                        Direction::Input => voice.input_desc = Some(desc.clone()),
                        Direction::Output => voice.output_desc = Some(desc.clone()),
                    }
                    clear_device_problems(&mut voice.audio_status, which);
                    voice
                        .audio_status
                        .push(AudioProblem::FellBack { which, lost, desc });
                }
                AudioEvent::NoMicrophone(why) => {
                    voice.audio_status.push(AudioProblem::NoMicrophone(why))
                }
                AudioEvent::NoSpeaker(why) => voice.audio_status.push(AudioProblem::NoSpeaker(why)),
                AudioEvent::DeviceLost { which, reason } => voice
                    .audio_status
                    .push(AudioProblem::DeviceLost { which, reason }),
                AudioEvent::DeviceRestored { which, desc } => {
                    info!("{which:?} device back: {desc}");
                    match which {
                        Direction::Input => voice.input_desc = Some(desc),
                        Direction::Output => voice.output_desc = Some(desc),
                    }
                    // The loss message has served its purpose; keep the list to live problems.
                    clear_device_problems(&mut voice.audio_status, which);
                }
                // The sound goes on (a rerouted default device, a quietly restarted stream):
                // worth a log line, not a red message.
                AudioEvent::SwitchFailed { which, reason } => voice
                    .audio_status
                    .push(AudioProblem::SwitchFailed(format!("{which:?}: {reason}"))),
                AudioEvent::DeviceWarning { which, reason } => {
                    warn!("{which:?} device: {reason}")
                }
                _ => {}
            },
            VoiceEvent::SwitchFailed(why) => {
                voice.audio_status.push(AudioProblem::SwitchFailed(why))
            }
            VoiceEvent::Tunnel(datagram) => {
                let now = link.now();
                link.session.send_tunnel(now, datagram);
            }
            VoiceEvent::Chat(ev) => {
                let own_name = link.session.username().to_string();
                record_chat(&mut voice, &ev, &own_name);
                chat_news.write(ChatNews(ev));
            }
        }
    }
    let len = voice.audio_status.len();
    if len > 20 {
        voice.audio_status.drain(..len - 20);
    }
    let snap = &voice.last;
    for (user, is_self, mut speaking, mut level, peer_link) in &mut users {
        if is_self.is_some() {
            let s = snap.transmitting && !snap.muted;
            if speaking.0 != s {
                speaking.0 = s;
            }
            level.0 = meter_from_db(snap.input_level_db);
            continue;
        }
        let Some(p) = snap.peers.iter().find(|p| p.user_id == user.id) else {
            continue;
        };
        if speaking.0 != p.speaking {
            speaking.0 = p.speaking;
        }
        level.0 = meter_from_db(p.level_db);
        if let Some(mut pl) = peer_link {
            if pl.state != p.state {
                pl.state = p.state.clone();
            }
            pl.rtt_ms = p.rtt_ms;
            pl.loss_pct = p.loss_pct;
            pl.reported_loss_pct = p.reported_loss_pct;
            pl.jitter_ms = p.jitter_ms;
            pl.buffer_ms = p.buffer_ms;
            pl.fingerprint = p.fingerprint.clone();
        }
    }
}

/// Drops the loss and fallback messages of one direction: its device runs again.
fn clear_device_problems(problems: &mut Vec<AudioProblem>, which: Direction) {
    problems.retain(|p| {
        !matches!(p, AudioProblem::DeviceLost { which: w, .. } | AudioProblem::FellBack { which: w, .. } if *w == which)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::voice::engine::{ChatMessage, ChatSent};
    use crate::voice::net::chat::ChatError;

    #[test]
    fn chat_history_keeps_order_names_our_own_lines_and_shows_refusals() {
        let mut voice = Voice::default();
        let received = |i: u64| {
            ChatEvent::Received(ChatMessage {
                from: 2,
                from_name: "bob".into(),
                text: format!("m{i}"),
                sent_ms: i,
            })
        };
        record_chat(&mut voice, &received(1), "alice");
        record_chat(
            &mut voice,
            &ChatEvent::Refused {
                text: " ".into(),
                reason: ChatError::Empty,
            },
            "alice",
        );
        assert_eq!(
            voice.chat_notice.as_deref(),
            Some("not sent: the message is empty")
        );
        record_chat(
            &mut voice,
            &ChatEvent::Sent {
                text: "mine".into(),
                sent_ms: 5,
                result: ChatSent {
                    to: vec![(2, "bob".into())],
                    queue_full: vec![],
                },
            },
            "alice",
        );
        assert_eq!(voice.chat_notice, None, "a message that went out clears it");
        let lines: Vec<(&str, bool, &str)> = voice
            .chat
            .iter()
            .map(|l| (l.from.as_str(), l.own, l.text.as_str()))
            .collect();
        assert_eq!(lines, [("bob", false, "m1"), ("alice", true, "mine")]);
        for i in 0..(MAX_CHAT_LINES as u64 + 10) {
            record_chat(&mut voice, &received(i), "alice");
        }
        assert_eq!(voice.chat.len(), MAX_CHAT_LINES);
        assert_eq!(
            voice.chat.back().unwrap().text,
            format!("m{}", MAX_CHAT_LINES + 9)
        );
    }
}
