//! The mesh view's cost per frame with 16 members in a live call: every member's level changes
//! every frame (the nodes pulse), round trips every 5th frame, and one link changes state
//! every 10th (direct, relayed, punching, unreachable in turn). Headless: one `App::update`
//! with Bevy's minimal plugins, transform propagation and the mesh systems, no window or GPU
//! (sprite extraction and drawing are the renderer's and not in here; bevy_text's layout of
//! the labels is, in the `_with_text_layout` case). `empty_frame` is the same App without the
//! mesh, to subtract.

use std::hint::black_box;

use bevy::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion};
use p2p_voice::client::{Channel, IsSelf, LinkStatus, MemberOf, Speaking, User, VoiceLevel};
use p2p_voice::ui::mesh::{MeshEntities, MeshViewArea, MeshViewPlugin};
use p2p_voice::voice::{PeerState, RelayVia, Unreachable, UnreachableReason};

const MEMBERS: u32 = 16;

fn state(turn: u32) -> PeerState {
    match turn % 4 {
        0 => PeerState::Direct(([192, 0, 2, 7], 7700).into()),
        1 => PeerState::Relayed(RelayVia::Member {
            user_id: 1,
            name: "user1".into(),
        }),
        2 => PeerState::Punching,
        _ => PeerState::Unreachable(Unreachable {
            direct: UnreachableReason::NoAnswer {
                candidates: 2,
                after: std::time::Duration::from_secs(10),
            },
            server_relays: false,
            udp_blocked: false,
        }),
    }
}

/// What the App has besides the call.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// Bevy's minimal plugins and transform propagation only.
    Empty,
    /// Plus the mesh view.
    Mesh,
    /// Plus bevy_text, which lays out the labels the mesh changes (the default font).
    MeshAndText,
}

/// An App with a call of [`MEMBERS`] (user 0 is us).
fn call(setup: Setup) -> (App, Vec<Entity>) {
    let with_mesh = setup != Setup::Empty;
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, bevy::transform::TransformPlugin));
    if setup == Setup::MeshAndText {
        app.add_plugins((bevy::asset::AssetPlugin::default(), bevy::text::TextPlugin))
            .init_asset::<Image>()
            .init_asset::<TextureAtlasLayout>();
    }
    if with_mesh {
        app.add_plugins(MeshViewPlugin)
            .insert_resource(MeshViewArea {
                shown: true,
                center: Vec2::new(40.0, -60.0),
                size: Vec2::new(520.0, 420.0),
                backdrop: None,
            });
    }
    let lobby = app
        .world_mut()
        .spawn(Channel {
            name: "Lobby".into(),
            has_password: false,
            max_members: 25,
            order: 0,
        })
        .id();
    let users = (0..MEMBERS)
        .map(|id| {
            let mut e = app.world_mut().spawn((
                User {
                    id,
                    name: format!("user{id}"),
                },
                MemberOf(lobby),
                Speaking(false),
                VoiceLevel(0.0),
            ));
            if id == 0 {
                e.insert(IsSelf);
            } else {
                e.insert(LinkStatus {
                    state: state(id),
                    rtt_ms: Some(20.0 + id as f32),
                    loss_pct: 0.5,
                    ..LinkStatus::default()
                });
            }
            e.id()
        })
        .collect();
    app.update();
    app.update();
    if setup == Setup::MeshAndText {
        // The labels really are laid out (with the default font), not skipped.
        let mut q = app.world_mut().query::<&bevy::text::TextLayoutInfo>();
        let laid_out = q.iter(app.world()).filter(|l| l.size.x > 0.0).count();
        assert_eq!(laid_out, 2 * MEMBERS as usize - 1, "names and link labels");
    }
    if with_mesh {
        assert_eq!(
            app.world().resource::<MeshEntities>().len(),
            MEMBERS as usize
        );
    }
    (app, users)
}

/// What the voice plugin does to the user entities between two frames of a live call.
fn live_call_frame(app: &mut App, users: &[Entity], frame: u32) {
    for (i, &e) in users.iter().enumerate() {
        let i = i as u32;
        let mut user = app.world_mut().entity_mut(e);
        let level = ((frame + i * 3) % 20) as f32 / 20.0;
        user.insert((VoiceLevel(level), Speaking(level > 0.3)));
        if let Some(mut link) = user.get_mut::<LinkStatus>() {
            if frame % 5 == 0 {
                link.rtt_ms = Some(20.0 + ((frame / 5 + i) % 40) as f32);
                link.loss_pct = ((frame / 5 + i) % 7) as f32 * 0.5;
            }
            if frame % 10 == 0 && (frame / 10) % (MEMBERS - 1) + 1 == i {
                link.state = state(frame / 10 + i);
            }
        }
    }
}

fn mesh_frame(c: &mut Criterion) {
    for (name, setup) in [
        ("mesh_view_frame_16_members", Setup::Mesh),
        (
            "mesh_view_frame_16_members_with_text_layout",
            Setup::MeshAndText,
        ),
        ("empty_frame", Setup::Empty),
    ] {
        let (mut app, users) = call(setup);
        let mut frame = 0;
        c.bench_function(name, |b| {
            b.iter(|| {
                frame += 1;
                live_call_frame(&mut app, &users, frame);
                app.update();
                black_box(&app);
            })
        });
    }
}

criterion_group!(benches, mesh_frame);
criterion_main!(benches);
