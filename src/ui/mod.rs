//! The desktop UI: egui panels ([`panels`]) as pure functions of plain views ([`view`])
//! returning [`actions::UiAction`]s, and the `UiPlugin` that builds those views from ECS each
//! frame and turns the actions into control and voice intents. The UI never touches sockets.

pub mod actions;
pub mod devices;
pub mod display_check;
pub mod global_ptt;
pub mod link_history;
pub mod mesh;
pub mod notices;
pub mod panels;
pub mod perf;
pub mod ptt_scope;
pub mod screenshot;
pub mod settings_writer;
pub mod view;

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;
use bevy_egui::{egui, EguiContexts, EguiPrimaryContextPass};

use crate::audio::{InputSource, OutputSink};
use crate::client::{
    Channel, ClientIntent, ControlEvent, ControlLink, IsSelf, LinkStatus, MemberOf, Muted,
    PersonSettings, Phase, SessionEvent, Speaking, User, VoiceLevel, Volume,
};
use crate::config::ClientSettings;
use crate::protocol::{Password, Status};
use crate::voice::{AudioProblem, PeerState, Voice, VoiceCommand, VoiceSetting};
use actions::UiAction;
use notices::{Notices, Topic};
use settings_writer::{SettingsChange, SettingsWriter};
use view::*;

/// Settings the UI starts with.
#[derive(Debug, Clone, Default)]
pub struct UiOptions {
    /// Host mode: the address others should use to reach our embedded server.
    pub host_address: Option<String>,
    /// Host mode: the embedded server's port, and this machine's addresses guests may reach
    /// it at (see `panels::share`).
    pub host_port: Option<u16>,
    pub host_local: Vec<std::net::SocketAddr>,
    /// Prefilled server address.
    pub server: String,
    /// Prefilled username (else the remembered one).
    pub username: Option<String>,
    /// Connect right away (host mode with a known username, or `client --server --username`).
    pub auto_connect: bool,
    pub input_devices: Vec<String>,
    pub output_devices: Vec<String>,
    /// Channel (and password) to join once connected (`client --channel`).
    pub join: Option<(String, Option<Password>)>,
    /// Voice settings the command line gave explicitly: they win over the remembered ones.
    pub voice_choices: Vec<VoiceSetting>,
}

/// Everything the panels edit or remember between frames.
#[derive(Resource, Default)]
pub struct UiState {
    pub connect: ConnectView,
    pub password: Option<PasswordPromptView>,
    pub show_help: bool,
    pub show_perf: bool,
    /// The mesh view is on (drawn while in a channel).
    pub show_mesh: bool,
    pub notices: Notices,
    pub controls: ControlsView,
    pub host_address: Option<String>,
    /// Host mode: the server's port and this machine's addresses (the invitation).
    pub host_port: Option<u16>,
    pub host_local: Vec<std::net::SocketAddr>,
    pub mix: MixHistory,
    /// Channel we asked to join (name), for matching the answer.
    pending_join: Option<String>,
    auto_connect: bool,
    /// The voice plane's audio problems as last mirrored into `notices`.
    audio_shown: Vec<AudioProblem>,
    /// Peers whose unreachability was already reported, so each episode is said once (a
    /// dismissed notice does not come back while the episode lasts).
    unreachable_reported: std::collections::HashSet<u32>,
    auto_join: Option<(String, Option<Password>)>,
    /// The chat input line.
    chat_draft: String,
    /// Host mode: guests' connections by the address of ours they dialled.
    host_arrivals: std::collections::BTreeMap<std::net::IpAddr, u64>,
    /// The echo test as the last voice snapshot had it.
    echo_test_seen: Option<crate::voice::EchoTestStatus>,
    /// Local time's offset from UTC (read once at start), for message times.
    utc_offset_minutes: i32,
}

/// Adds the panels to a windowed app (requires `EguiPlugin`).
pub struct UiPlugin(pub UiOptions);

impl Plugin for UiPlugin {
    fn build(&self, app: &mut App) {
        let (settings, settings_set_aside) = ClientSettings::load_checked();
        let (people, people_set_aside) =
            crate::client::person_settings::load_people(ClientSettings::dir().as_deref());
        let mut notices = Notices::default();
        for set_aside in [settings_set_aside, people_set_aside].into_iter().flatten() {
            warn!("{set_aside}");
            notices.push(Topic::Other, capitalize(&set_aside.to_string()));
        }
        let o = &self.0;
        let username = o.username.clone().or(settings.username.clone());
        let mut connect = ConnectView::new(o.server.clone(), settings.username.clone());
        if let Some(u) = &username {
            connect.username = u.clone();
        }
        let mut controls = ControlsView {
            ptt_key: settings
                .ptt_key
                .clone()
                .filter(|k| egui::Key::from_name(k).is_some())
                .unwrap_or_else(|| "Space".into()),
            noise_suppression: settings.noise_suppression.unwrap_or(true),
            normalize_loudness: settings.normalize_loudness.unwrap_or(false),
            echo_cancellation: settings.echo_cancellation.unwrap_or(true),
            gain_control: settings.gain_control.unwrap_or(true),
            high_pass: settings.high_pass.unwrap_or(false),
            sounds: settings.sounds.unwrap_or(true),
            ptt_enabled: settings.push_to_talk.unwrap_or(false),
            ptt_outside_window: settings.ptt_outside_window.unwrap_or(true),
            input_devices: o.input_devices.clone(),
            output_devices: o.output_devices.clone(),
            selected_input: settings.input_device.clone(),
            selected_output: settings.output_device.clone(),
            input_level_db: -120.0,
            vad_threshold_db: -60.0,
            ..Default::default()
        };
        for choice in &o.voice_choices {
            controls.reflect(choice);
        }
        app.insert_resource(UiState {
            connect,
            password: None,
            show_help: false,
            show_perf: false,
            // `make screenshots` starts with it shown.
            show_mesh: std::env::var_os("P2P_VOICE_MESH_VIEW").is_some(),
            notices,
            unreachable_reported: Default::default(),
            controls,
            host_address: o.host_address.clone(),
            host_port: o.host_port,
            host_local: o.host_local.clone(),
            mix: MixHistory::default(),
            pending_join: None,
            auto_connect: o.auto_connect && username.is_some(),
            audio_shown: Vec::new(),
            auto_join: o.join.clone(),
            chat_draft: String::new(),
            echo_test_seen: None,
            host_arrivals: Default::default(),
            utc_offset_minutes: local_utc_offset_minutes(),
        })
        .insert_resource(SettingsWriter::spawn(ClientSettings::path()))
        // Volumes and mutes chosen for people in earlier runs (the headless client keeps
        // none: the client plugin's empty map stays).
        .insert_resource(people)
        .add_systems(
            Startup,
            (setup_camera, auto_connect, start_with_shown_settings),
        )
        .add_plugins(mesh::MeshViewPlugin)
        .add_systems(
            Update,
            (
                track_control_events,
                release_ptt_when_unfocused,
                follow_global_ptt,
                mirror_arrivals,
                devices::follow_device_list,
                link_history::record_link_history,
            ),
        )
        .add_systems(EguiPrimaryContextPass, draw_ui);
    }
}

fn setup_camera(
    mut commands: Commands,
    mut state: ResMut<UiState>,
    mut perf: ResMut<perf::PerfOverlay>,
) {
    commands.spawn(Camera2d);
    // Start with the performance overlay shown (F3 toggles it); used by `make screenshots`.
    if std::env::var_os("P2P_VOICE_PERF_OVERLAY").is_some() {
        state.show_perf = true;
        perf.visible = true;
    }
}

/// The voice plane starts with what the controls show: the remembered settings (push-to-talk,
/// the capture chain's stages, loudness), overridden by the command line. Before this the window showed
/// a remembered "push-to-talk" or "noise suppression off" that the voice thread did not know.
fn start_with_shown_settings(mut state: ResMut<UiState>, mut voice: EventWriter<VoiceCommand>) {
    // `make screenshots` shows the echo test's result.
    if std::env::var_os("P2P_VOICE_ECHO_TEST").is_some() {
        let test = VoiceSetting::EchoTest(true);
        state.controls.reflect(&test);
        voice.write(VoiceCommand::Setting(test));
    }
    let c = &state.controls;
    for setting in [
        VoiceSetting::PushToTalk(c.ptt_enabled),
        VoiceSetting::NoiseSuppression(c.noise_suppression),
        VoiceSetting::NormalizeLoudness(c.normalize_loudness),
        VoiceSetting::EchoCancellation(c.echo_cancellation),
        VoiceSetting::GainControl(c.gain_control),
        VoiceSetting::HighPass(c.high_pass),
        VoiceSetting::Sounds(c.sounds),
    ] {
        voice.write(VoiceCommand::Setting(setting));
    }
}

/// A window that loses focus never sees the push-to-talk key's release, so the microphone
/// would stay open: release it then. Not while the key is grabbed for the whole desktop: the
/// grab sees the release wherever it happens, and the user may be talking into another window.
fn release_ptt_when_unfocused(
    mut focus: EventReader<bevy::window::WindowFocused>,
    state: Res<UiState>,
    mut voice: EventWriter<VoiceCommand>,
) {
    let c = &state.controls;
    if focus.read().any(|f| !f.focused)
        && c.ptt_enabled
        && c.ptt_scope != ptt_scope::PttScope::Everywhere
    {
        voice.write(VoiceCommand::Setting(VoiceSetting::PttPressed(false)));
    }
}

/// Keeps the desktop-wide grab of the push-to-talk key in line with the controls: the key
/// grabbed when push-to-talk is on with "outside this window" and a key that may be grabbed,
/// none otherwise; the grab's answer shows in the controls. The grab thread starts with the
/// first grab and sends presses straight to the voice thread.
fn follow_global_ptt(
    mut state: ResMut<UiState>,
    voice: Res<Voice>,
    mut grab: Local<Option<global_ptt::GlobalPtt>>,
    mut display: Local<Option<ptt_scope::DisplayServer>>,
) {
    use ptt_scope::{global_key, DisplayServer, PttScope, WindowOnly};
    let display = *display.get_or_insert_with(DisplayServer::current);
    let c = &state.controls;
    let scope = match global_key(c.ptt_enabled, c.ptt_outside_window, &c.ptt_key, display) {
        Ok(code) => {
            if grab.is_none() {
                let Some(thread) = &voice.thread else {
                    return;
                };
                let commander = thread.commander();
                match global_ptt::GlobalPtt::spawn(move |pressed| {
                    commander.send(VoiceCommand::Setting(VoiceSetting::PttPressed(pressed)));
                }) {
                    Ok(g) => *grab = Some(g),
                    Err(e) => {
                        let why = WindowOnly::GrabFailed(format!("cannot start: {e}"));
                        set_ptt_scope(&mut state, PttScope::WindowOnly(why));
                        return;
                    }
                }
            }
            let Some(g) = grab.as_mut() else { return };
            if g.want(Some(code)) {
                Some(PttScope::Pending)
            } else {
                g.poll_scope()
            }
        }
        Err(scope) => {
            if let Some(g) = grab.as_mut() {
                g.want(None);
            }
            Some(scope)
        }
    };
    if let Some(scope) = scope {
        set_ptt_scope(&mut state, scope);
    }
}

/// Host mode: which of our addresses guests came in on, from the embedded server.
fn mirror_arrivals(stats: Option<Res<crate::server::ServerStats>>, mut state: ResMut<UiState>) {
    if let Some(stats) = stats {
        if state.host_arrivals != stats.arrivals {
            state.host_arrivals = stats.arrivals.clone();
        }
    }
}

/// Changes the shown scope only when it differs (this runs every frame).
fn set_ptt_scope(state: &mut ResMut<UiState>, scope: ptt_scope::PttScope) {
    if state.controls.ptt_scope != scope {
        state.controls.ptt_scope = scope;
    }
}

fn auto_connect(mut state: ResMut<UiState>, mut intents: EventWriter<ClientIntent>) {
    if state.auto_connect {
        state.connect.connecting = true;
        intents.write(ClientIntent::Connect {
            server: state.connect.server_address.clone(),
            username: state.connect.username.clone(),
        });
    }
}

/// Mirrors the voice plane's live audio problems into the notices: a new one appears, and
/// one that is over (a lost device came back) disappears instead of lingering in red.
fn sync_audio_problems(state: &mut UiState, live: &[AudioProblem]) {
    // Runs every frame; almost always nothing changed.
    if state.audio_shown.as_slice() == live {
        return;
    }
    for over in state.audio_shown.iter().filter(|p| !live.contains(p)) {
        state.notices.withdraw(&Topic::Audio(over.clone()));
    }
    for fresh in live.iter().filter(|p| !state.audio_shown.contains(p)) {
        state
            .notices
            .push(Topic::Audio(fresh.clone()), capitalize(&fresh.to_string()));
    }
    state.audio_shown = live.to_vec();
}

/// A notice that stays until dismissed or pushed out by newer ones.
fn push_error(state: &mut UiState, message: String) {
    state.notices.push(Topic::Other, message);
}

fn track_control_events(
    mut state: ResMut<UiState>,
    mut events: EventReader<ControlEvent>,
    mut intents: EventWriter<ClientIntent>,
    link: Res<ControlLink>,
    settings: Res<SettingsWriter>,
) {
    for e in settings.errors() {
        push_error(&mut state, e);
    }
    for ControlEvent(ev) in events.read() {
        match ev {
            SessionEvent::Overview { channels } => {
                if let Some((name, password)) = state.auto_join.take() {
                    let Some((id, ch)) = channels
                        .iter()
                        .enumerate()
                        .find(|(_, c)| c.name.eq_ignore_ascii_case(&name))
                    else {
                        push_error(&mut state, format!("Cannot join {name}: no such channel"));
                        continue;
                    };
                    if ch.has_password && password.is_none() {
                        state.password = Some(PasswordPromptView {
                            channel_id: id as u32,
                            channel_name: ch.name.clone(),
                            ..Default::default()
                        });
                    } else {
                        if let Some(p) = &mut state.password {
                            p.pending = true;
                        }
                        intents.write(ClientIntent::Join {
                            channel: ch.name.clone(),
                            password,
                        });
                    }
                }
            }
            SessionEvent::Identified { username, .. } => {
                state.connect.connecting = false;
                state.connect.refusal = None;
                state.connect.address_problem = None;
                settings.remember(SettingsChange::Identity {
                    username: username.clone(),
                    server: link.session.server().to_string(),
                });
            }
            SessionEvent::Joined { channel } => {
                if state
                    .password
                    .as_ref()
                    .is_some_and(|p| p.channel_name.eq_ignore_ascii_case(channel))
                {
                    state.password = None;
                }
                state.pending_join = None;
            }
            SessionEvent::JoinRefused { channel, status } => {
                let message = capitalize(status.message());
                match (&mut state.password, status) {
                    (Some(p), Status::WrongPassword | Status::RateLimited)
                        if p.channel_name.eq_ignore_ascii_case(channel) =>
                    {
                        p.error = Some(message);
                        p.pending = false;
                        p.password.clear();
                    }
                    _ => {
                        state.password = None;
                        push_error(
                            &mut state,
                            format!("Cannot join {channel}: {}", status.message()),
                        );
                    }
                }
                state.pending_join = None;
            }
            SessionEvent::Disconnected { reason, retry_in } => {
                if retry_in.is_none() {
                    state.connect.connecting = false;
                    let text = capitalize(&reason.to_string());
                    use crate::client::{DisconnectReason, TransportError};
                    // The address itself is wrong: say so next to the address field.
                    if matches!(
                        reason,
                        DisconnectReason::Transport(
                            TransportError::Refused { .. } | TransportError::Unresolvable { .. }
                        )
                    ) {
                        state.connect.address_problem = Some(text);
                    } else if let DisconnectReason::Transport(TransportError::NotYetTrusted {
                        presented,
                    }) = reason
                    {
                        state.connect.trust_prompt = Some(crate::ui::view::TrustPrompt {
                            presented: presented.clone(),
                            pinned: None,
                        });
                    } else if let DisconnectReason::Transport(
                        TransportError::CertificateChanged {
                            pinned, presented, ..
                        },
                    ) = reason
                    {
                        state.connect.trust_prompt = Some(crate::ui::view::TrustPrompt {
                            presented: presented.clone(),
                            pinned: Some(pinned.clone()),
                        });
                    } else {
                        state.connect.refusal = Some(text);
                    }
                } else {
                    push_error(&mut state, format!("Server lost: {reason}"));
                }
                state.password = None;
            }
            SessionEvent::Error { status, message }
                if !matches!(
                    status,
                    Some(Status::NameTaken | Status::InvalidName | Status::WrongPassword)
                ) =>
            {
                push_error(&mut state, capitalize(message));
            }
            _ => {}
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn link_view(p: Option<&LinkStatus>, is_self: bool) -> LinkView {
    if is_self {
        return LinkView {
            state: MemberLink::Local,
            ..Default::default()
        };
    }
    let Some(p) = p else {
        return LinkView::default();
    };
    let measured = matches!(p.state, PeerState::Direct(_) | PeerState::Relayed(_));
    LinkView {
        state: MemberLink::Peer(p.state.clone()),
        rtt_ms: p.rtt_ms,
        loss_pct: measured.then_some(p.loss_pct),
        reported_loss_pct: p.reported_loss_pct.filter(|_| measured),
        jitter_ms: measured.then_some(p.jitter_ms),
        buffer_ms: measured.then_some(p.buffer_ms),
    }
}

/// The user entity as the overview reads it (the tests build views from it too).
pub type UserRow<'a> = (
    Entity,
    &'a User,
    &'a MemberOf,
    &'a Speaking,
    &'a VoiceLevel,
    &'a Muted,
    &'a Volume,
    Option<&'a LinkStatus>,
    Option<&'a IsSelf>,
    Option<&'a link_history::PeerLinkHistory>,
);

/// Builds the overview from the mirrored entities.
pub fn build_overview(
    channels: &Query<(Entity, &Channel)>,
    users: &Query<UserRow>,
    my_channel: Option<&str>,
) -> OverviewView {
    let mut list: Vec<(Entity, &Channel)> = channels.iter().collect();
    list.sort_by_key(|(_, c)| c.order);
    let mut out = OverviewView::default();
    for (e, c) in list {
        let mut members: Vec<MemberView> = users
            .iter()
            .filter(|u| u.2 .0 == e)
            .map(
                |(_, user, _, speaking, level, muted, volume, link, is_self, history)| MemberView {
                    user_id: user.id,
                    name: user.name.clone(),
                    speaking: speaking.0,
                    level: level.0,
                    is_self: is_self.is_some(),
                    muted_locally: muted.0,
                    volume: volume.0,
                    link: if is_self.is_none() && my_channel != Some(c.name.as_str()) {
                        LinkView {
                            state: MemberLink::OtherChannel,
                            ..Default::default()
                        }
                    } else {
                        link_view(link, is_self.is_some())
                    },
                    fingerprint: link.and_then(|l| l.fingerprint.clone()),
                    identity: IdentityView::Unknown,
                    history: history
                        .filter(|_| my_channel == Some(c.name.as_str()))
                        .map(|h| h.0.clone()),
                },
            )
            .collect();
        members.sort_by_key(|m| m.user_id);
        if my_channel == Some(c.name.as_str()) {
            out.my_channel = Some(c.order as u32);
        }
        out.channels.push(ChannelView {
            id: c.order as u32,
            name: c.name.clone(),
            has_password: c.has_password,
            members,
            max_members: Some(c.max_members),
        });
    }
    out
}

/// What the control session made of each member's identity, into the overview: our own
/// fingerprint on our row, each peer's safety number and verified mark, or why not.
pub fn fill_identities(overview: &mut OverviewView, session: &crate::client::ControlSession) {
    use crate::client::session::PeerIdentityStatus;
    use crate::identity::identity_fingerprint;
    for member in overview
        .channels
        .iter_mut()
        .flat_map(|c| c.members.iter_mut())
    {
        member.identity = if member.is_self {
            session
                .identity_public()
                .map(|k| IdentityView::Own {
                    fingerprint: identity_fingerprint(&k),
                })
                .unwrap_or_default()
        } else {
            match session.peer_identity(member.user_id) {
                None => IdentityView::Unknown,
                Some(PeerIdentityStatus::Trusted { verified, .. }) => IdentityView::Trusted {
                    safety_number: session.safety_number(member.user_id).unwrap_or_default(),
                    verified: *verified,
                },
                Some(PeerIdentityStatus::Changed {
                    previous,
                    presented,
                }) => IdentityView::Changed {
                    previous: identity_fingerprint(previous),
                    presented: identity_fingerprint(presented),
                    safety_number: session.safety_number(member.user_id),
                },
                Some(PeerIdentityStatus::Refused(reason)) => IdentityView::Refused {
                    reason: reason.to_string(),
                },
            }
        };
    }
}

/// What the UI's systems write: intents for the control plane and the voice thread, entity
/// updates, the perf overlay and remembered settings.
#[derive(SystemParam)]
struct UiOutputs<'w, 's> {
    commands: Commands<'w, 's>,
    intents: EventWriter<'w, ClientIntent>,
    voice: EventWriter<'w, VoiceCommand>,
    perf: ResMut<'w, perf::PerfOverlay>,
    settings: Res<'w, SettingsWriter>,
    /// Per-person volume and mute, so rebuilt member entities start from them.
    people: ResMut<'w, PersonSettings>,
    /// The part of the window the Bevy mesh view may draw in.
    mesh_area: ResMut<'w, mesh::MeshViewArea>,
}

/// The local time zone's offset from UTC now, in minutes (0 where it cannot be read).
fn local_utc_offset_minutes() -> i32 {
    #[cfg(unix)]
    {
        let now = crate::voice::plugin::unix_ms() as libc::time_t / 1000;
        // SAFETY: localtime_r only reads `now` and writes the struct we hand it.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
            return 0;
        }
        (tm.tm_gmtoff / 60) as i32
    }
    #[cfg(not(unix))]
    {
        0
    }
}

/// One frame of the window: mirror the voice plane's facts into the views, draw the panels,
/// carry out what the user asked for.
fn draw_ui(
    mut contexts: EguiContexts,
    mut state: ResMut<UiState>,
    link: Res<ControlLink>,
    voice: Res<Voice>,
    channels: Query<(Entity, &Channel)>,
    users: Query<UserRow>,
    mut out: UiOutputs,
) -> Result {
    let ctx = contexts.ctx_mut()?;
    let state = &mut *state;
    mirror_voice(state, &voice);
    if let Some(problem) = &link.identity_problem {
        state
            .notices
            .push_once(Topic::IdentityProblem, capitalize(problem));
    }
    let status = status_view(state, &link, &voice);
    let mut mesh_rect = None;
    let actions = draw_panels(
        ctx,
        state,
        &link,
        &voice,
        &status,
        &channels,
        &users,
        &mut mesh_rect,
    );
    out.mesh_area.set_if_neq(mesh_view_area(ctx, mesh_rect));
    for action in actions {
        dispatch(
            action,
            state,
            &channels,
            &users,
            link.session.server(),
            &mut out,
        );
    }
    Ok(())
}

/// Where the mesh goes, from egui's screen coordinates (points, y down, origin top left) to
/// Bevy's 2D world (logical pixels, y up, origin at the centre); egui's points are the
/// window's logical pixels (bevy_egui's scale factor is 1).
fn mesh_view_area(ctx: &egui::Context, rect: Option<egui::Rect>) -> mesh::MeshViewArea {
    let screen = ctx.screen_rect();
    let [r, g, b, _] = ctx.style().visuals.panel_fill.to_array();
    let backdrop = Some(Color::srgb_u8(r, g, b));
    match rect {
        Some(rect) => mesh::MeshViewArea {
            shown: true,
            center: Vec2::new(
                rect.center().x - screen.center().x,
                screen.center().y - rect.center().y,
            ),
            size: Vec2::new(rect.width(), rect.height()),
            backdrop,
        },
        None => mesh::MeshViewArea {
            backdrop,
            ..Default::default()
        },
    }
}

/// The voice plane's facts into the views: meters, the mix trace, and notices for audio
/// problems and unreachable peers.
fn mirror_voice(state: &mut UiState, voice: &Voice) {
    // Voice-side facts into the views.
    let snap = &voice.last;
    state.controls.input_level_db = snap.input_level_db;
    state.controls.vad_threshold_db = snap.vad_threshold_db;
    state.controls.echo = snap.echo.map(|e| (e.erle_db, e.delay_ms));
    // Only news from the voice thread: a snapshot taken before a click must not undo it.
    if state.echo_test_seen != snap.echo_test {
        state.echo_test_seen = snap.echo_test;
        state.controls.echo_test = snap.echo_test;
    }
    state.controls.speaking = snap.transmitting && !snap.muted;
    state.controls.talking_while_muted = snap.talking_while_muted;
    state
        .mix
        .push(crate::voice::plugin::meter_from_db(snap.mix_level_db));
    sync_audio_problems(state, &voice.audio_status);
    if snap.udp_blocked {
        let text = if snap.tunnelled {
            "UDP is blocked on this network: voice goes through the server's TCP connection \
             (a little more delay)"
        } else {
            "UDP is blocked on this network and this server does not relay: nobody can hear \
             you (its operator can start it with --relay)"
        };
        state.notices.push_once(Topic::UdpBlocked, text.into());
    } else {
        state.notices.withdraw(&Topic::UdpBlocked);
    }
    for p in &snap.peers {
        let topic = Topic::Unreachable(p.user_id);
        match &p.state {
            PeerState::Unreachable(reason) => {
                if state.unreachable_reported.insert(p.user_id) {
                    let text = format!("Cannot reach {}: {reason}", p.name);
                    state.notices.push(topic, text);
                }
            }
            // Reachable again: the old complaint no longer describes the call.
            PeerState::Direct(_) | PeerState::Relayed(_) => {
                state.unreachable_reported.remove(&p.user_id);
                state.notices.withdraw(&topic);
            }
            PeerState::Punching => {}
        }
    }
    if let Some(e) = &voice.error {
        state.notices.push_once(Topic::VoiceDisabled, capitalize(e));
    }
}

/// The status bar's view: connection phase, a one-line voice summary, the notices.
fn status_view(state: &UiState, link: &ControlLink, voice: &Voice) -> StatusView {
    let snap = &voice.last;
    let phase = link.session.phase().clone();
    let now = link.now();
    let connection = match &phase {
        Phase::Ready => ConnectionState::Connected,
        Phase::Connecting | Phase::Handshake | Phase::Identifying => ConnectionState::Connecting,
        Phase::Reconnecting { retry_at, .. } => ConnectionState::Reconnecting {
            in_secs: retry_at.saturating_sub(now).as_secs_f32().ceil() as u32,
        },
        Phase::Failed(r) => ConnectionState::Disconnected(r.to_string()),
        Phase::Idle => ConnectionState::Idle,
    };
    let peers = &snap.peers;
    let direct = peers
        .iter()
        .filter(|p| matches!(p.state, PeerState::Direct(_)))
        .count();
    let relayed = peers
        .iter()
        .filter(|p| matches!(p.state, PeerState::Relayed(_)))
        .count();
    let voice_state = if let Some(e) = &voice.error {
        e.clone()
    } else if snap.muted {
        "muted".into()
    } else if link.session.channel().is_none() {
        "not in a channel".into()
    } else {
        format!(
            "{} peer{}, {direct} direct{}{}",
            peers.len(),
            if peers.len() == 1 { "" } else { "s" },
            if relayed > 0 {
                format!(", {relayed} relayed")
            } else {
                String::new()
            },
            snap.public_addr
                .map(|a| format!(" — you are {a}"))
                .unwrap_or_default()
        )
    };
    StatusView {
        connection,
        host_address: state.host_address.clone(),
        voice_state,
        server_fingerprint: matches!(phase, Phase::Ready)
            .then(|| link.server_fingerprint().map(str::to_owned))
            .flatten(),
        errors: state.notices.texts(),
    }
}

/// Draws the connect screen or the call (controls, overview, password prompt) and the help
/// window; returns what the user did, and in `mesh_rect` where the mesh view goes when shown.
#[allow(clippy::too_many_arguments)]
fn draw_panels(
    ctx: &egui::Context,
    state: &mut UiState,
    link: &ControlLink,
    voice: &Voice,
    status: &StatusView,
    channels: &Query<(Entity, &Channel)>,
    users: &Query<UserRow>,
    mesh_rect: &mut Option<egui::Rect>,
) -> Vec<UiAction> {
    let phase = link.session.phase();
    let mut actions = Vec::new();
    actions.extend(panels::keyboard_shortcuts(ctx, &state.controls));
    egui::TopBottomPanel::bottom("status").show(ctx, |ui| {
        actions.extend(panels::status_bar(ui, status));
    });
    let show_connect = matches!(phase, Phase::Idle | Phase::Failed(_))
        || (matches!(
            phase,
            Phase::Connecting | Phase::Handshake | Phase::Identifying
        ) && link.session.user_id().is_none());
    if show_connect {
        egui::CentralPanel::default().show(ctx, |ui| {
            ui.heading("p2p-voice");
            ui.add_space(8.0);
            actions.extend(panels::connect(ui, &mut state.connect));
        });
    } else {
        egui::SidePanel::right("controls")
            .resizable(false)
            .min_width(260.0)
            .show(ctx, |ui| {
                if let Some(port) = state.host_port {
                    let public = voice.last.port_mapping.map(|m| m.lease.external.ip());
                    let invite = panels::share::with_arrivals(
                        panels::share::share_addresses(&state.host_local, port, public),
                        &state.host_arrivals,
                        port,
                    );
                    panels::share_panel(ui, &invite);
                    ui.separator();
                }
                actions.extend(panels::controls(ui, &state.controls));
                ui.separator();
                ui.label("Channel mix");
                panels::waveform(ui, &state.mix, egui::vec2(ui.available_width(), 60.0));
            });
        let mut overview = build_overview(channels, users, link.session.channel());
        fill_identities(&mut overview, &link.session);
        let alerts = panels::peer_details::identity_alerts(&overview);
        if !alerts.is_empty() {
            egui::TopBottomPanel::top("identity_alerts").show(ctx, |ui| {
                actions.extend(panels::peer_details::identity_banner(ui, &alerts));
            });
        }
        egui::SidePanel::left("chat")
            .resizable(true)
            .default_width(300.0)
            .min_width(200.0)
            .show(ctx, |ui| {
                let view = panels::chat::ChatView {
                    lines: &voice.chat,
                    notice: voice.chat_notice.as_deref(),
                    in_channel: link.session.channel().is_some(),
                    utc_offset_minutes: state.utc_offset_minutes,
                };
                actions.extend(panels::chat(ui, &view, &mut state.chat_draft));
            });
        let in_channel = link.session.channel().is_some();
        let mesh_shown = state.show_mesh && in_channel;
        let mut frame = egui::Frame::central_panel(&ctx.style());
        if mesh_shown {
            // Bevy draws the mesh under egui: this panel lets it show through.
            frame = frame.fill(egui::Color32::TRANSPARENT);
        }
        egui::CentralPanel::default().frame(frame).show(ctx, |ui| {
            if in_channel {
                actions.extend(panels::mesh_view::mesh_toggle(ui, state.show_mesh));
            }
            if mesh_shown {
                let (area, more) = panels::mesh_view::overview_and_mesh(ui, &overview);
                actions.extend(more);
                *mesh_rect = Some(area);
            } else {
                actions.extend(panels::overview(ui, &overview));
            }
        });
        if let Some(p) = &mut state.password {
            actions.extend(panels::password_prompt(ctx, p));
        }
    }
    if state.show_help {
        actions.extend(panels::help_window(
            ctx,
            &panels::help::default_shortcuts(&state.controls.ptt_key),
        ));
    }

    actions
}

/// Carries out one user action.
fn dispatch(
    action: UiAction,
    state: &mut UiState,
    channels: &Query<(Entity, &Channel)>,
    users: &Query<UserRow>,
    server: &str,
    out: &mut UiOutputs,
) {
    match action {
        UiAction::TrustCertificate {
            fingerprint,
            address,
            username,
        } => {
            state.connect.trust_prompt = None;
            state.connect.connecting = true;
            state.connect.refusal = None;
            out.intents
                .write(ClientIntent::TrustCertificate { fingerprint });
            out.intents.write(ClientIntent::Connect {
                server: address,
                username,
            });
        }
        UiAction::DistrustCertificate => state.connect.trust_prompt = None,
        UiAction::Connect { address, username } => {
            state.connect.trust_prompt = None;
            state.connect.connecting = true;
            state.connect.refusal = None;
            state.connect.address_problem = None;
            out.intents.write(ClientIntent::Connect {
                server: address,
                username,
            });
        }
        UiAction::Join { channel_id } => {
            let Some((_, ch)) = channels.iter().find(|(_, c)| c.order as u32 == channel_id) else {
                return;
            };
            if ch.has_password {
                state.password = Some(PasswordPromptView {
                    channel_id,
                    channel_name: ch.name.clone(),
                    ..Default::default()
                });
            } else {
                state.pending_join = Some(ch.name.clone());
                out.intents.write(ClientIntent::Join {
                    channel: ch.name.clone(),
                    password: None,
                });
            }
        }
        UiAction::SubmitPassword {
            channel_id,
            password,
        } => {
            if let Some((_, ch)) = channels.iter().find(|(_, c)| c.order as u32 == channel_id) {
                if let Some(p) = &mut state.password {
                    p.pending = true;
                    p.error = None;
                }
                out.intents.write(ClientIntent::Join {
                    channel: ch.name.clone(),
                    password: Some(password),
                });
            }
        }
        UiAction::CancelPassword => state.password = None,
        UiAction::Leave => {
            out.intents.write(ClientIntent::Leave);
        }
        UiAction::Disconnect => {
            out.intents.write(ClientIntent::Disconnect);
        }
        UiAction::Voice(setting) => {
            state.controls.reflect(&setting);
            match setting {
                VoiceSetting::PeerVolume { user_id, volume } => {
                    for (e, u, ..) in users.iter() {
                        if u.id == user_id {
                            out.commands.entity(e).insert(Volume(volume));
                            if out.people.remember(server, &u.name, &setting) {
                                out.settings.remember_people(&out.people);
                            }
                        }
                    }
                }
                VoiceSetting::PeerMuted { user_id, muted } => {
                    for (e, u, ..) in users.iter() {
                        if u.id == user_id {
                            out.commands.entity(e).insert(Muted(muted));
                            if out.people.remember(server, &u.name, &setting) {
                                out.settings.remember_people(&out.people);
                            }
                        }
                    }
                }
                _ => {}
            }
            if let Some(change) = SettingsChange::from_voice(&setting) {
                out.settings.remember(change);
            }
            out.voice.write(VoiceCommand::Setting(setting));
        }
        UiAction::SetPttOutsideWindow(on) => {
            state.controls.ptt_outside_window = on;
            out.settings.remember(SettingsChange::PttOutsideWindow(on));
        }
        UiAction::ChoosePttKey(on) => state.controls.choosing_ptt_key = on,
        UiAction::SetPttKey(key) => {
            state.controls.choosing_ptt_key = false;
            if key != state.controls.ptt_key {
                // A press of the old key may still be held: its release would not count.
                out.voice
                    .write(VoiceCommand::Setting(VoiceSetting::PttPressed(false)));
                state.controls.ptt_key = key.clone();
                out.settings.remember(SettingsChange::PttKey(key));
            }
        }
        UiAction::SelectInput(name) => {
            state.controls.selected_input = Some(name.clone());
            out.voice
                .write(VoiceCommand::SwitchInput(InputSource::Device(Some(
                    name.clone(),
                ))));
            out.settings.remember(SettingsChange::InputDevice(name));
        }
        UiAction::SelectOutput(name) => {
            state.controls.selected_output = Some(name.clone());
            out.voice
                .write(VoiceCommand::SwitchOutput(OutputSink::Device(Some(
                    name.clone(),
                ))));
            out.settings.remember(SettingsChange::OutputDevice(name));
        }
        UiAction::SetVerified { user_id, verified } => {
            out.intents
                .write(ClientIntent::SetVerified { user_id, verified });
        }
        UiAction::AcceptIdentity { user_id } => {
            out.intents.write(ClientIntent::AcceptIdentity { user_id });
        }
        UiAction::DismissError(i) => state.notices.dismiss(i),
        UiAction::ToggleHelp => state.show_help = !state.show_help,
        UiAction::SendChat(text) => {
            out.voice.write(VoiceCommand::SendChat {
                text,
                sent_ms: crate::voice::plugin::unix_ms(),
            });
        }
        UiAction::ToggleMeshView => state.show_mesh = !state.show_mesh,
        UiAction::TogglePerfOverlay => {
            state.show_perf = !state.show_perf;
            out.perf.visible = state.show_perf;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bevy checks system parameters for conflicting access when a system is initialised;
    /// doing it here catches a conflict without opening a window.
    #[test]
    fn ui_systems_have_no_conflicting_parameters() {
        let mut world = World::new();
        let mut draw = IntoSystem::into_system(draw_ui);
        draw.initialize(&mut world);
        let mut track = IntoSystem::into_system(track_control_events);
        track.initialize(&mut world);
    }

    #[test]
    fn losing_window_focus_releases_push_to_talk() {
        let mut app = App::new();
        app.add_event::<bevy::window::WindowFocused>()
            .add_event::<VoiceCommand>()
            .insert_resource(UiState::default())
            .add_systems(Update, release_ptt_when_unfocused);
        let lose_focus = |app: &mut App| {
            app.world_mut().send_event(bevy::window::WindowFocused {
                window: Entity::PLACEHOLDER,
                focused: false,
            });
            app.update();
            let events = app.world().resource::<Events<VoiceCommand>>();
            events
                .get_cursor()
                .read(events)
                .filter(|c| matches!(c, VoiceCommand::Setting(VoiceSetting::PttPressed(false))))
                .count()
        };
        assert_eq!(
            lose_focus(&mut app),
            0,
            "voice activation: nothing to release"
        );
        app.world_mut()
            .resource_mut::<UiState>()
            .controls
            .ptt_enabled = true;
        assert_eq!(lose_focus(&mut app), 1, "push-to-talk is released");
    }

    #[test]
    fn a_device_that_comes_back_takes_its_error_with_it() {
        let mut state = UiState::default();
        push_error(&mut state, "Cannot join Private: wrong password".into());
        let lost = AudioProblem::DeviceLost {
            which: crate::audio::Direction::Output,
            reason: "I/O error".into(),
        };
        let shown = "Output device lost: I/O error".to_string();
        sync_audio_problems(&mut state, std::slice::from_ref(&lost));
        assert!(state.notices.texts().contains(&shown));
        // Shown once, however many frames it stays a problem.
        sync_audio_problems(&mut state, std::slice::from_ref(&lost));
        assert_eq!(
            state
                .notices
                .texts()
                .iter()
                .filter(|e| **e == shown)
                .count(),
            1
        );
        // Restored: gone; other errors stay.
        sync_audio_problems(&mut state, &[]);
        assert_eq!(
            state.notices.texts(),
            vec!["Cannot join Private: wrong password".to_string()]
        );
        // Lost again later: shown again.
        sync_audio_problems(&mut state, std::slice::from_ref(&lost));
        assert!(state.notices.texts().contains(&shown));
    }

    /// The voice plane's "UDP is blocked" reaches the status bar, worded for whether the
    /// server relays (and so tunnels), once however many frames it lasts, and goes when UDP
    /// answers after all.
    #[test]
    fn blocked_udp_is_shown_once_in_the_words_of_the_case_and_withdrawn() {
        let mut state = UiState::default();
        let mut voice = Voice::default();
        voice.last.udp_blocked = true;
        voice.last.tunnelled = true;
        mirror_voice(&mut state, &voice);
        mirror_voice(&mut state, &voice);
        let texts = state.notices.texts();
        let shown: Vec<_> = texts
            .iter()
            .filter(|t| t.contains("UDP is blocked"))
            .collect();
        assert_eq!(shown.len(), 1, "{texts:?}");
        assert!(shown[0].contains("TCP connection"), "{}", shown[0]);
        voice.last.udp_blocked = false;
        voice.last.tunnelled = false;
        mirror_voice(&mut state, &voice);
        assert!(!state.notices.texts().iter().any(|t| t.contains("UDP")));
        let mut state = UiState::default();
        voice.last.udp_blocked = true;
        mirror_voice(&mut state, &voice);
        let texts = state.notices.texts();
        assert!(
            texts
                .iter()
                .any(|t| t.contains("does not relay") && t.contains("--relay")),
            "{texts:?}"
        );
    }

    /// The voice plane's "heard you while muted" reaches the controls' hint, and goes with it.
    #[test]
    fn talking_while_muted_reaches_the_controls_hint() {
        let mut state = UiState::default();
        let mut voice = Voice::default();
        voice.last.muted = true;
        voice.last.talking_while_muted = true;
        mirror_voice(&mut state, &voice);
        assert!(state.controls.talking_while_muted);
        voice.last.talking_while_muted = false;
        mirror_voice(&mut state, &voice);
        assert!(!state.controls.talking_while_muted);
    }

    #[test]
    fn capitalize_makes_messages_read_as_sentences() {
        assert_eq!(capitalize("wrong password"), "Wrong password");
        assert_eq!(capitalize(""), "");
    }
}
