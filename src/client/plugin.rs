//! `ClientNetPlugin`: drives [`ControlSession`] from a non-blocking TCP [`Transport`] every
//! frame (firing its timers only when its `poll_timeout` is due) and mirrors the overview into
//! `Channel` / `User` entities.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bevy::prelude::*;

use super::components::*;
use super::person_settings::PersonSettings;
use super::session::{Action, ControlSession, SessionEvent};
use super::transport::Transport;
use crate::protocol::{ChannelInfo, MemberInfo, Password, UserId};
use crate::voice::VoiceCommand;

/// User intents for the control plane (from the UI, the CLI or tests).
#[derive(Event, Debug, Clone, PartialEq, Eq)]
pub enum ClientIntent {
    Connect {
        server: String,
        username: String,
    },
    Join {
        channel: String,
        password: Option<Password>,
    },
    Leave,
    Disconnect,
    /// Mark member `user_id`'s identity verified or not (kept in the trust store).
    SetVerified {
        user_id: UserId,
        verified: bool,
    },
    /// Accept member `user_id`'s changed identity key.
    AcceptIdentity {
        user_id: UserId,
    },
    /// The user compared the server's certificate fingerprint and trusts it: pin it on the
    /// next connection (a new server, or one whose certificate changed).
    TrustCertificate {
        fingerprint: String,
    },
}

/// Everything the control session reports, re-published for other plugins (voice, UI,
/// headless printer).
#[derive(Event, Debug, Clone, PartialEq, Eq)]
pub struct ControlEvent(pub SessionEvent);

/// The control session and its transport.
#[derive(Resource)]
pub struct ControlLink {
    pub session: ControlSession,
    transport: Transport,
    start: Instant,
    /// Where the identity key and the remembered peers live (`None`: this run only).
    identity_dir: Option<std::path::PathBuf>,
    /// Why our identity could not be loaded, if it could not (peers then refuse our voice).
    pub identity_problem: Option<String>,
}

impl ControlLink {
    /// Time since the app started, the clock handed to the pure session.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn server_addr(&self) -> Option<std::net::SocketAddr> {
        self.transport.remote()
    }

    /// The certificate fingerprint of the server we are connected to (checked against the pin).
    pub fn server_fingerprint(&self) -> Option<&str> {
        self.transport.fingerprint()
    }

    /// A session with our identity and the remembered peers of `dir` (the config directory):
    /// the identity is created there on first run. Without a directory, an identity for this
    /// run only. A key file that cannot be used leaves the session without one, and says why:
    /// making a new key would show every peer a changed identity.
    fn with_identity(transport: Transport, dir: Option<std::path::PathBuf>) -> Self {
        let mut session = ControlSession::new();
        let mut identity_problem = None;
        match &dir {
            Some(d) => match crate::identity::store::load_or_create_identity(d) {
                Ok(key) => session.set_identity(key),
                Err(e) => {
                    let why = format!("no identity key, peers will refuse our voice: {e}");
                    eprintln!("p2p-voice: {why}");
                    identity_problem = Some(why);
                }
            },
            None => session.set_identity(crate::identity::IdentityKey::generate()),
        }
        session.set_trust(crate::identity::store::load_trust(dir.as_deref()));
        Self {
            session,
            transport,
            start: Instant::now(),
            identity_dir: dir,
            identity_problem,
        }
    }

    /// Writes the remembered peers if they changed.
    fn save_trust(&mut self) {
        let Some(trust) = self.session.trust_to_save() else {
            return;
        };
        if let Some(dir) = &self.identity_dir {
            if let Err(e) = crate::identity::store::save_trust(dir, trust) {
                warn!("cannot remember peers' identities: {e}");
            }
        }
    }
}

/// Index from server names/ids to the mirrored entities.
#[derive(Resource, Default)]
pub struct Directory {
    pub channels: HashMap<String, Entity>,
    pub users: HashMap<UserId, Entity>,
}

/// Adds the control plane to an app.
#[derive(Default)]
pub struct ClientNetPlugin {
    /// Replace a server certificate pin that no longer matches (`--accept-new-cert`).
    pub accept_new_cert: bool,
    /// Refuse a server never seen before until the user accepts its fingerprint
    /// ([`ClientIntent::TrustCertificate`]); otherwise pin it on first use.
    pub ask_first_use: bool,
}

impl Plugin for ClientNetPlugin {
    fn build(&self, app: &mut App) {
        let mut transport = Transport::new(
            crate::tls::PinStore::load(crate::config::ClientSettings::dir()),
            self.accept_new_cert,
        );
        if self.ask_first_use {
            transport.ask_before_first_use();
        }
        app.insert_resource(ControlLink::with_identity(
            transport,
            crate::config::ClientSettings::dir(),
        ))
        .init_resource::<Directory>()
        .add_event::<ClientIntent>()
        .add_event::<ControlEvent>()
        .add_event::<VoiceCommand>()
        .init_resource::<PersonSettings>()
        .add_systems(
            PreUpdate,
            (apply_intents, drive_transport, mirror_overview).chain(),
        );
    }
}

fn apply_intents(mut link: ResMut<ControlLink>, mut intents: EventReader<ClientIntent>) {
    let now = link.now();
    for intent in intents.read() {
        match intent.clone() {
            ClientIntent::Connect { server, username } => {
                link.session.connect(now, &server, &username)
            }
            ClientIntent::Join { channel, password } => link.session.join(now, &channel, password),
            ClientIntent::Leave => link.session.leave(now),
            ClientIntent::TrustCertificate { fingerprint } => {
                link.transport.accept_certificate(fingerprint)
            }
            ClientIntent::Disconnect => link.session.disconnect(now),
            ClientIntent::SetVerified { user_id, verified } => {
                link.session.set_verified(user_id, verified);
            }
            ClientIntent::AcceptIdentity { user_id } => {
                link.session.accept_identity(now, user_id);
            }
        }
    }
}

fn apply_actions(link: &mut ControlLink) {
    while let Some(action) = link.session.poll_action() {
        match action {
            Action::OpenTransport { server } => link.transport.open(&server),
            Action::Send(msg) => link.transport.send(&msg),
            Action::CloseTransport => link.transport.close(),
        }
    }
}

fn drive_transport(mut link: ResMut<ControlLink>, mut events: EventWriter<ControlEvent>) {
    let link = &mut *link;
    let now = link.start.elapsed();
    // The session's timers (heartbeat, silence, connect timeout, backoff) fire only when due.
    if link.session.poll_timeout().is_some_and(|due| now >= due) {
        link.session.handle_timeout(now);
    }
    // A reply produced by a message is written by the next poll; loop a few times so that a
    // handshake step does not wait for the next frame. Every poll's progress is handled.
    for _ in 0..4 {
        apply_actions(link);
        let progress = link.transport.poll();
        let busy = progress.connected || !progress.messages.is_empty();
        if progress.connected {
            let fingerprint = link.transport.fingerprint().unwrap_or_default().to_string();
            link.session.set_server_binding(&fingerprint);
            link.session.transport_connected(now);
        }
        for msg in progress.messages {
            link.session.handle_message(now, msg);
        }
        if let Some(reason) = progress.lost {
            if reason.is_final() {
                link.session.transport_refused(now, reason);
            } else {
                link.session.transport_lost(now, reason);
            }
        }
        if !busy {
            break;
        }
    }
    // Queue whatever the last messages asked for; it is written on the next poll.
    apply_actions(link);
    link.save_trust();
    while let Some(event) = link.session.poll_event() {
        events.write(ControlEvent(event));
    }
}

/// Where a member entity's settings come from and where the voice engine hears of them.
struct Members<'a, 'w> {
    /// The server we are on, as typed: half of each person's key.
    server: &'a str,
    people: &'a PersonSettings,
    voice: &'a mut EventWriter<'w, VoiceCommand>,
}

fn spawn_member(
    commands: &mut Commands,
    dir: &mut Directory,
    channel: Entity,
    member: &MemberInfo,
    self_id: Option<UserId>,
    members: &mut Members,
) {
    if let Some(old) = dir.users.remove(&member.user_id) {
        commands.entity(old).despawn();
    }
    let mut e = commands.spawn((
        User {
            id: member.user_id,
            name: member.username.clone(),
        },
        MemberOf(channel),
        Speaking::default(),
        VoiceLevel::default(),
    ));
    if Some(member.user_id) == self_id {
        e.insert((IsSelf, Muted::default(), Volume::default()));
    } else {
        let chosen = members.people.get(members.server, &member.username);
        e.insert((
            LinkStatus::default(),
            Muted(chosen.muted),
            Volume(chosen.volume),
        ));
        for cmd in members
            .people
            .commands_for(members.server, &member.username, member.user_id)
        {
            members.voice.write(cmd);
        }
    }
    dir.users.insert(member.user_id, e.id());
}

fn rebuild(
    commands: &mut Commands,
    dir: &mut Directory,
    channels: &[ChannelInfo],
    self_id: Option<UserId>,
    members: &mut Members,
) {
    for (_, e) in dir.users.drain() {
        commands.entity(e).despawn();
    }
    for (_, e) in dir.channels.drain() {
        commands.entity(e).despawn();
    }
    for (order, ch) in channels.iter().enumerate() {
        let e = commands
            .spawn(Channel {
                name: ch.name.clone(),
                has_password: ch.has_password,
                max_members: ch.max_members,
                order,
            })
            .id();
        dir.channels.insert(ch.name.clone(), e);
        for m in &ch.members {
            spawn_member(commands, dir, e, m, self_id, members);
        }
    }
}

fn mirror_overview(
    mut commands: Commands,
    mut dir: ResMut<Directory>,
    link: Res<ControlLink>,
    mut events: EventReader<ControlEvent>,
    people: Res<PersonSettings>,
    mut voice: EventWriter<VoiceCommand>,
) {
    let self_id = link.session.user_id();
    let mut members = Members {
        server: link.session.server(),
        people: &people,
        voice: &mut voice,
    };
    for ControlEvent(event) in events.read() {
        match event {
            SessionEvent::Overview { channels } => {
                rebuild(&mut commands, &mut dir, channels, self_id, &mut members);
            }
            SessionEvent::MemberJoined { channel, member } => {
                if let Some(&ch) = dir.channels.get(channel) {
                    spawn_member(&mut commands, &mut dir, ch, member, self_id, &mut members);
                }
            }
            SessionEvent::MemberLeft { user_id, .. } => {
                if let Some(e) = dir.users.remove(user_id) {
                    commands.entity(e).despawn();
                }
            }
            SessionEvent::Disconnected { .. } => {
                rebuild(&mut commands, &mut dir, &[], self_id, &mut members);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ChannelInfo;
    use crate::voice::VoiceSetting;
    use bevy::ecs::system::RunSystemOnce;

    fn world() -> World {
        let mut world = World::new();
        world.insert_resource(ControlLink::with_identity(Transport::default(), None));
        world.init_resource::<Directory>();
        world.init_resource::<PersonSettings>();
        world.init_resource::<Events<ControlEvent>>();
        world.init_resource::<Events<VoiceCommand>>();
        world
    }

    fn overview(bob_id: UserId) -> ControlEvent {
        ControlEvent(SessionEvent::Overview {
            channels: vec![ChannelInfo {
                name: "Lobby".into(),
                has_password: false,
                max_members: 16,
                members: vec![bob(bob_id)],
            }],
        })
    }

    /// A world on server `h:7700` (the session's server is half of a person's key).
    fn world_on_server() -> World {
        let mut world = world();
        world
            .resource_mut::<ControlLink>()
            .session
            .connect(Duration::ZERO, "h:7700", "me");
        world
    }

    /// Runs the mirror once over the events sent so far, then drops them (a one-shot
    /// system's reader starts from the oldest event still buffered).
    fn mirror(world: &mut World) {
        world.run_system_once(mirror_overview).unwrap();
        world.resource_mut::<Events<ControlEvent>>().clear();
    }

    fn bob(user_id: UserId) -> MemberInfo {
        MemberInfo {
            user_id,
            username: "bob".into(),
        }
    }

    fn bobs_row(world: &mut World) -> (UserId, bool, f32) {
        let mut q = world.query::<(&User, &Muted, &Volume)>();
        let (user, muted, volume) = q.single(world).unwrap();
        (user.id, muted.0, volume.0)
    }

    fn sent(world: &mut World) -> Vec<VoiceCommand> {
        world
            .resource_mut::<Events<VoiceCommand>>()
            .drain()
            .collect()
    }

    fn told(user_id: UserId, volume: f32, muted: bool) -> Vec<VoiceCommand> {
        vec![
            VoiceCommand::Setting(VoiceSetting::PeerVolume { user_id, volume }),
            VoiceCommand::Setting(VoiceSetting::PeerMuted { user_id, muted }),
        ]
    }

    /// Found in the desktop app: a rebuilt member entity showed "unmuted, 100 %" for someone
    /// the engine still muted, and after a reconnect (new id) the engine forgot the choice.
    #[test]
    fn a_rebuilt_member_keeps_the_chosen_settings_and_the_engine_hears_them_under_the_new_id() {
        let mut world = world_on_server();
        world.resource_mut::<PersonSettings>().remember(
            "h:7700",
            "bob",
            &VoiceSetting::PeerMuted {
                user_id: 2,
                muted: true,
            },
        );
        // A reconnect: the overview now lists bob as user 9.
        world.send_event(overview(9));
        world.run_system_once(mirror_overview).unwrap();
        assert_eq!(bobs_row(&mut world), (9, true, 1.0));
        assert_eq!(sent(&mut world), told(9, 1.0, true));
    }

    /// Item 3 of issue 14 end to end in ECS: bob muted at 40 % in the window, leaves, rejoins
    /// under a new id, and the app restarts (the settings go through `people.toml`); each
    /// time his row shows the choice and the engine is told it under his id of the moment.
    /// Someone else who gets bob's old id is told the defaults, so the engine's per-id memory
    /// cannot mute them.
    #[test]
    fn a_mute_survives_a_rejoin_under_a_new_id_and_a_restart() {
        use super::super::person_settings::{load_people, save_people};
        let dir = std::env::temp_dir().join(format!("pv-plugin-people-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut world = world_on_server();
        world.send_event(overview(2));
        mirror(&mut world);
        // What the window's dispatch does for a click on bob's Mute and his slider.
        for setting in [
            VoiceSetting::PeerMuted {
                user_id: 2,
                muted: true,
            },
            VoiceSetting::PeerVolume {
                user_id: 2,
                volume: 0.4,
            },
        ] {
            world
                .resource_mut::<PersonSettings>()
                .remember("h:7700", "bob", &setting);
        }
        sent(&mut world);

        world.send_event(ControlEvent(SessionEvent::MemberLeft {
            channel: "Lobby".into(),
            user_id: 2,
        }));
        world.send_event(ControlEvent(SessionEvent::MemberJoined {
            channel: "Lobby".into(),
            member: bob(5),
        }));
        mirror(&mut world);
        assert_eq!(bobs_row(&mut world), (5, true, 0.4), "rejoined as 5");
        assert_eq!(sent(&mut world), told(5, 0.4, true));

        // Carol gets bob's old id 2 (bob left again): the engine hears her defaults.
        world.send_event(ControlEvent(SessionEvent::MemberLeft {
            channel: "Lobby".into(),
            user_id: 5,
        }));
        world.send_event(ControlEvent(SessionEvent::MemberJoined {
            channel: "Lobby".into(),
            member: MemberInfo {
                user_id: 2,
                username: "carol".into(),
            },
        }));
        mirror(&mut world);
        assert_eq!(sent(&mut world), told(2, 1.0, false));

        save_people(&dir, world.resource::<PersonSettings>()).unwrap();
        drop(world);

        // The next run: a fresh world that loads the file, bob now user 12.
        let mut world = world_on_server();
        world.insert_resource(load_people(Some(&dir)).0);
        world.send_event(overview(12));
        mirror(&mut world);
        assert_eq!(bobs_row(&mut world), (12, true, 0.4), "after a restart");
        assert_eq!(sent(&mut world), told(12, 0.4, true));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The window's side of item 3, with egui_kittest: after bob rejoins under a new id, the
    /// member row drawn from the rebuilt entities shows his Mute on and his volume at 40 %.
    #[test]
    fn the_member_row_shows_the_kept_setting_after_a_rejoin() {
        use crate::ui::view::OverviewView;
        use egui::accesskit::Role;
        use egui_kittest::kittest::{NodeT, Queryable};
        let mut world = world_on_server();
        let mut people = world.resource_mut::<PersonSettings>();
        people.remember(
            "h:7700",
            "bob",
            &VoiceSetting::PeerMuted {
                user_id: 2,
                muted: true,
            },
        );
        people.remember(
            "h:7700",
            "bob",
            &VoiceSetting::PeerVolume {
                user_id: 2,
                volume: 0.4,
            },
        );
        world.send_event(overview(31));
        mirror(&mut world);
        let view: OverviewView = world
            .run_system_once(
                |channels: Query<(Entity, &Channel)>, users: Query<crate::ui::UserRow>| {
                    crate::ui::build_overview(&channels, &users, Some("Lobby"))
                },
            )
            .unwrap();
        let mut h = egui_kittest::Harness::builder()
            .with_size(egui::Vec2::new(700.0, 300.0))
            .build_ui_state(
                move |ui, actions: &mut Vec<crate::ui::actions::UiAction>| {
                    actions.extend(crate::ui::panels::overview(ui, &view));
                },
                Vec::new(),
            );
        h.get_by_label("bob");
        let slider = h.get_by_role(Role::Slider).accesskit_node();
        let value = slider.numeric_value().expect("a slider has a value");
        assert!((value - 0.4).abs() < 1e-6, "volume shown {value}");
        // egui does not tell accesskit a toggle's state; what a click asks for does: the
        // toggle shows bob muted when clicking it unmutes him (under his new id).
        h.get_by_label("Mute").click();
        h.run();
        assert_eq!(
            h.state(),
            &vec![crate::ui::actions::UiAction::Voice(
                VoiceSetting::PeerMuted {
                    user_id: 31,
                    muted: false
                }
            )]
        );
    }

    /// The shell's half of identities: the key is made in the config directory on first run
    /// and the same the next time, and a Verified mark set through an intent is saved to
    /// `known_peers.toml` and read back by the next run.
    #[test]
    fn the_identity_and_a_verified_mark_are_kept_in_the_config_directory() {
        use crate::identity::{sign_voice_key, IdentityKey, KeyBinding};
        use crate::protocol::{PeerInfo, ServerMsg, Status, PROTOCOL_VERSION};
        let dir = std::env::temp_dir().join(format!("pv-plugin-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut world = World::new();
        let link = ControlLink::with_identity(Transport::default(), Some(dir.clone()));
        let ours = link.session.identity_public().expect("made on first run");
        world.insert_resource(link);
        world.init_resource::<Events<ClientIntent>>();
        {
            let mut link = world.resource_mut::<ControlLink>();
            let s = &mut link.session;
            let now = Duration::ZERO;
            s.connect(now, "h:7700", "me");
            s.set_server_binding("FP");
            s.transport_connected(now);
            s.handle_message(
                now,
                ServerMsg::Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    app_version: "t".into(),
                    udp_token: 1,
                    heartbeat_timeout_ms: 15_000,
                    relay: false,
                },
            );
            s.handle_message(
                now,
                ServerMsg::Identified {
                    status: Status::Ok,
                    user_id: Some(1),
                    username: "me".into(),
                },
            );
            let alice = IdentityKey::from_secret_bytes([2; 32]);
            let binding = KeyBinding {
                server: "FP",
                username: "alice",
                user_id: 2,
            };
            let peer = PeerInfo {
                user_id: 2,
                username: "alice".into(),
                local: vec![],
                public: None,
                voice_key: Some([9; 32]),
                voice_key_proof: Some(sign_voice_key(&alice, &binding, &[9; 32])),
            };
            s.handle_message(now, ServerMsg::PeerEndpoints { peer });
        }
        world.send_event(ClientIntent::SetVerified {
            user_id: 2,
            verified: true,
        });
        world.run_system_once(apply_intents).unwrap();
        world.resource_mut::<ControlLink>().save_trust();

        let next = ControlLink::with_identity(Transport::default(), Some(dir.clone()));
        assert_eq!(
            next.session.identity_public(),
            Some(ours),
            "the same identity"
        );
        let trust = crate::identity::store::load_trust(Some(&dir));
        let alice = IdentityKey::from_secret_bytes([2; 32]).public_key();
        assert!(trust.is_verified("h:7700", "alice", &alice));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
