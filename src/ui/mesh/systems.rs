//! The mesh view's Bevy side: copies [`super::layout`]'s picture onto sprites and 2D text.
//!
//! Entities are made once per member and kept while the member stays: each frame only the
//! fields that changed are written (position, size, colour, label text), so an idle call
//! costs a walk over sixteen members and no re-layout of text, and nothing is spawned or
//! despawned unless someone joins or leaves.

use std::collections::HashMap;

use bevy::asset::RenderAssetUsages;
use bevy::prelude::*;
use bevy::render::render_resource::{Extent3d, TextureDimension, TextureFormat};
use bevy::sprite::Anchor;

use super::layout::{
    circle_radius, layout, LabelSide, LinkKind, MeshLink, MeshMember, PlacedLink, PlacedNode,
    LINE_WIDTH,
};
use crate::client::{IsSelf, LinkStatus, MemberOf, Speaking, User, VoiceLevel};

/// Where the window left room for the mesh this frame, written by the UI: in Bevy's 2D world
/// coordinates (logical pixels, origin at the window's centre, y up).
#[derive(Resource, Debug, Clone, Default, PartialEq)]
pub struct MeshViewArea {
    /// Whether the mesh is shown at all (the toggle is on and we are in a channel).
    pub shown: bool,
    pub center: Vec2,
    pub size: Vec2,
    /// The colour of egui's panels: the mesh is seen through a transparent panel, so the
    /// window's clear colour is made the same and nothing looks different around it.
    pub backdrop: Option<Color>,
}

/// The parent of every mesh entity, placed at the area's centre; hiding it hides the view.
#[derive(Component, Debug)]
pub struct MeshRoot;

/// What a mesh entity draws, and for which member.
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MeshPart {
    Node(u32),
    /// The glow around a speaking member, sized and faded by their level.
    Halo(u32),
    Name(u32),
    /// The line from us to this member.
    Line(u32),
    LineLabel(u32),
}

/// The entities of one member's part of the picture.
#[derive(Debug, Clone, Copy)]
struct MemberParts {
    node: Entity,
    halo: Entity,
    name: Entity,
    /// Our own node has no line.
    line: Option<(Entity, Entity)>,
}

impl MemberParts {
    fn despawn(self, commands: &mut Commands) {
        for e in [self.node, self.halo, self.name] {
            commands.entity(e).despawn();
        }
        if let Some((line, label)) = self.line {
            commands.entity(line).despawn();
            commands.entity(label).despawn();
        }
    }
}

/// The mesh's entities by member, and the round disc image the nodes are drawn with.
#[derive(Resource, Default)]
pub struct MeshEntities {
    root: Option<Entity>,
    members: HashMap<u32, MemberParts>,
    disc: Handle<Image>,
}

impl MeshEntities {
    /// How many members have entities now (for tests and the bench).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

const SELF_COLOR: Color = Color::srgb(0.35, 0.55, 0.9);
const PEER_COLOR: Color = Color::srgb(0.78, 0.78, 0.8);
const SPEAKING_RGB: (f32, f32, f32) = (60.0 / 255.0, 200.0 / 255.0, 90.0 / 255.0);
const NAME_COLOR: Color = Color::srgb(0.86, 0.86, 0.86);
const Z_LINE: f32 = 0.0;
const Z_HALO: f32 = 0.1;
const Z_NODE: f32 = 0.2;
const Z_TEXT: f32 = 0.3;

/// Makes the root (hidden until the UI shows the view) and the disc image, where there are
/// image assets (not in tests and benches without a renderer: sprites are then squares).
pub fn setup_mesh_view(
    mut commands: Commands,
    mut entities: ResMut<MeshEntities>,
    images: Option<ResMut<Assets<Image>>>,
) {
    if let Some(mut images) = images {
        entities.disc = images.add(disc_image(64));
    }
    let root = commands
        .spawn((
            MeshRoot,
            Name::new("mesh view"),
            Transform::default(),
            Visibility::Hidden,
        ))
        .id();
    entities.root = Some(root);
}

/// A white disc with a soft edge, tinted per sprite.
fn disc_image(size: u32) -> Image {
    let r = size as f32 / 2.0;
    let mut data = Vec::with_capacity((size * size * 4) as usize);
    for y in 0..size {
        for x in 0..size {
            let d = (x as f32 + 0.5 - r).hypot(y as f32 + 0.5 - r);
            let alpha = (r - d).clamp(0.0, 1.0);
            data.extend_from_slice(&[255, 255, 255, (alpha * 255.0) as u8]);
        }
    }
    Image::new(
        Extent3d {
            width: size,
            height: size,
            depth_or_array_layers: 1,
        },
        TextureDimension::D2,
        data,
        TextureFormat::Rgba8UnormSrgb,
        RenderAssetUsages::RENDER_WORLD,
    )
}

/// The window's clear colour follows egui's panels while the mesh shows through one.
pub fn match_backdrop(area: Res<MeshViewArea>, clear: Option<ResMut<ClearColor>>) {
    if let (Some(backdrop), Some(mut clear)) = (area.backdrop, clear) {
        if clear.0 != backdrop {
            clear.0 = backdrop;
        }
    }
}

type UserParts<'a> = (
    &'a User,
    &'a MemberOf,
    &'a Speaking,
    &'a VoiceLevel,
    Option<&'a LinkStatus>,
    Has<IsSelf>,
);

/// Lays out the members of our channel and brings the sprites up to date.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn sync_mesh(
    area: Res<MeshViewArea>,
    mut entities: ResMut<MeshEntities>,
    mut commands: Commands,
    mut members: Local<Vec<MeshMember>>,
    me: Query<&MemberOf, With<IsSelf>>,
    users: Query<UserParts>,
    mut roots: Query<(&mut Transform, &mut Visibility), (With<MeshRoot>, Without<MeshPart>)>,
    mut sprites: Sprites,
    mut texts: Texts,
) {
    let Some(root) = entities.root else {
        return;
    };
    let Ok((mut root_transform, mut visibility)) = roots.get_mut(root) else {
        return;
    };
    let channel = me.single().ok().map(|m| m.0);
    if !area.shown || channel.is_none() {
        visibility.set_if_neq(Visibility::Hidden);
        return;
    }
    visibility.set_if_neq(Visibility::Inherited);
    root_transform.set_if_neq(Transform::from_xyz(area.center.x, area.center.y, 0.0));

    members.clear();
    members.extend(users.iter().filter(|u| Some(u.1 .0) == channel).map(
        |(user, _, speaking, level, link, is_self)| {
            MeshMember {
                user_id: user.id,
                name: user.name.clone(),
                is_self,
                speaking: speaking.0,
                level: level.0,
                link: (!is_self)
                    .then(|| link.map(|l| MeshLink::new(&l.state, l.rtt_ms, l.loss_pct)))
                    .flatten(),
            }
        },
    ));
    members.sort_by_key(|m| m.user_id);
    let picture = layout(&members, circle_radius(area.size.x, area.size.y));

    // Who left (or changed between being us and a peer): their entities go.
    let entities = &mut *entities;
    entities.members.retain(|id, parts| {
        let stays = picture
            .nodes
            .iter()
            .any(|n| n.user_id == *id && n.is_self == parts.line.is_none());
        if !stays {
            parts.despawn(&mut commands);
        }
        stays
    });
    for node in &picture.nodes {
        let link = picture.links.iter().find(|l| l.user_id == node.user_id);
        match entities.members.get(&node.user_id) {
            Some(parts) => {
                update_node(parts, node, &mut sprites, &mut texts);
                if let (Some((line, label)), Some(link)) = (parts.line, link) {
                    update_line(line, label, link, &mut sprites, &mut texts);
                }
            }
            None => {
                let name = members
                    .iter()
                    .find(|m| m.user_id == node.user_id)
                    .map(|m| m.name.as_str())
                    .unwrap_or_default();
                let parts = spawn_member(&mut commands, root, &entities.disc, node, name, link);
                entities.members.insert(node.user_id, parts);
            }
        }
    }
}

fn rgb(kind: LinkKind) -> Color {
    let [r, g, b] = kind.rgb();
    Color::srgb_u8(r, g, b)
}

fn node_color(node: &PlacedNode) -> Color {
    if node.is_self {
        SELF_COLOR
    } else {
        PEER_COLOR
    }
}

/// The glow: wider and brighter with the level, brightest while the member's voice detector
/// says they speak; none in silence.
fn halo(node: &PlacedNode) -> (Color, f32) {
    let (r, g, b) = SPEAKING_RGB;
    let level = node.level.clamp(0.0, 1.0);
    let alpha = match (node.speaking, level > 0.05) {
        (true, _) => 0.2 + 0.35 * level,
        (false, true) => 0.45 * level,
        (false, false) => 0.0,
    };
    (
        Color::srgba(r, g, b, alpha),
        node.radius * 2.0 * (1.3 + 0.5 * level),
    )
}

fn name_position(node: &PlacedNode) -> Vec3 {
    Vec3::new(node.center.x, node.center.y - node.radius - 9.0, Z_TEXT)
}

fn line_transform(link: &PlacedLink) -> (Transform, Vec2) {
    let (center, length, angle) = link.segment();
    (
        Transform::from_xyz(center.x, center.y, Z_LINE).with_rotation(Quat::from_rotation_z(angle)),
        Vec2::new(length, LINE_WIDTH),
    )
}

fn label_position(link: &PlacedLink) -> (Vec3, Anchor) {
    let (p, side) = link.label_position();
    let anchor = match side {
        LabelSide::Above => Anchor::BottomCenter,
        LabelSide::Right => Anchor::CenterLeft,
    };
    (Vec3::new(p.x, p.y, Z_TEXT), anchor)
}

fn spawn_member(
    commands: &mut Commands,
    root: Entity,
    disc: &Handle<Image>,
    node: &PlacedNode,
    name: &str,
    link: Option<&PlacedLink>,
) -> MemberParts {
    let id = node.user_id;
    let at = |z| Transform::from_xyz(node.center.x, node.center.y, z);
    let (halo_color, halo_size) = halo(node);
    let disc_sprite = |color, size: f32| Sprite {
        image: disc.clone(),
        color,
        custom_size: Some(Vec2::splat(size)),
        ..default()
    };
    let node_entity = commands
        .spawn((
            MeshPart::Node(id),
            disc_sprite(node_color(node), node.radius * 2.0),
            at(Z_NODE),
            ChildOf(root),
        ))
        .id();
    let halo_entity = commands
        .spawn((
            MeshPart::Halo(id),
            disc_sprite(halo_color, halo_size),
            at(Z_HALO),
            ChildOf(root),
        ))
        .id();
    let name_entity = commands
        .spawn((
            MeshPart::Name(id),
            Text2d::new(name),
            TextFont::from_font_size(13.0),
            TextColor(NAME_COLOR),
            Anchor::TopCenter,
            Transform::from_translation(name_position(node)),
            ChildOf(root),
        ))
        .id();
    let line = link.map(|link| {
        let (transform, size) = line_transform(link);
        let line = commands
            .spawn((
                MeshPart::Line(id),
                Sprite::from_color(rgb(link.kind), size),
                transform,
                ChildOf(root),
            ))
            .id();
        let (at, anchor) = label_position(link);
        let label = commands
            .spawn((
                MeshPart::LineLabel(id),
                Text2d::new(link.label.clone()),
                TextFont::from_font_size(11.0),
                TextColor(rgb(link.kind)),
                anchor,
                Transform::from_translation(at),
                ChildOf(root),
            ))
            .id();
        (line, label)
    });
    MemberParts {
        node: node_entity,
        halo: halo_entity,
        name: name_entity,
        line,
    }
}

type Sprites<'w, 's> = Query<
    'w,
    's,
    (&'static mut Transform, &'static mut Sprite),
    (With<MeshPart>, Without<MeshRoot>),
>;
type Texts<'w, 's> = Query<
    'w,
    's,
    (
        &'static mut Transform,
        &'static mut Text2d,
        &'static mut TextColor,
        &'static mut Anchor,
    ),
    (With<MeshPart>, Without<Sprite>, Without<MeshRoot>),
>;

/// Writes `value` into a sprite field only when it differs, so an unchanged sprite is not
/// marked changed (and not re-extracted or re-propagated).
fn sprite_set(sprite: &mut Mut<Sprite>, color: Color, size: Vec2) {
    if sprite.color != color {
        sprite.color = color;
    }
    if sprite.custom_size != Some(size) {
        sprite.custom_size = Some(size);
    }
}

fn update_node(parts: &MemberParts, node: &PlacedNode, sprites: &mut Sprites, texts: &mut Texts) {
    let at = |z| Transform::from_xyz(node.center.x, node.center.y, z);
    if let Ok((mut t, mut s)) = sprites.get_mut(parts.node) {
        t.set_if_neq(at(Z_NODE));
        sprite_set(&mut s, node_color(node), Vec2::splat(node.radius * 2.0));
    }
    if let Ok((mut t, mut s)) = sprites.get_mut(parts.halo) {
        t.set_if_neq(at(Z_HALO));
        let (color, size) = halo(node);
        sprite_set(&mut s, color, Vec2::splat(size));
    }
    if let Ok((mut t, ..)) = texts.get_mut(parts.name) {
        t.set_if_neq(Transform::from_translation(name_position(node)));
    }
}

fn update_line(
    line: Entity,
    label: Entity,
    link: &PlacedLink,
    sprites: &mut Sprites,
    texts: &mut Texts,
) {
    if let Ok((mut t, mut s)) = sprites.get_mut(line) {
        let (transform, size) = line_transform(link);
        t.set_if_neq(transform);
        sprite_set(&mut s, rgb(link.kind), size);
    }
    if let Ok((mut t, mut text, mut color, mut anchor)) = texts.get_mut(label) {
        let (at, wanted) = label_position(link);
        t.set_if_neq(Transform::from_translation(at));
        anchor.set_if_neq(wanted);
        if text.0 != link.label {
            text.0.clone_from(&link.label);
        }
        color.set_if_neq(TextColor(rgb(link.kind)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Channel;
    use crate::voice::{PeerState, RelayVia, Unreachable, UnreachableReason};

    fn direct() -> PeerState {
        PeerState::Direct(([10, 0, 0, 2], 7700).into())
    }

    fn unreachable() -> PeerState {
        PeerState::Unreachable(Unreachable {
            direct: UnreachableReason::NoAnswer {
                candidates: 1,
                after: std::time::Duration::from_secs(10),
            },
            server_relays: false,
            udp_blocked: false,
        })
    }

    /// Peer `id`'s link in the test call: a mix of all four states.
    fn state_of(id: u32) -> PeerState {
        match id % 4 {
            0 => direct(),
            1 => PeerState::Relayed(RelayVia::Member {
                user_id: 2,
                name: "user2".into(),
            }),
            2 => PeerState::Punching,
            _ => unreachable(),
        }
    }

    /// A call of `n` members (user 0 is us) in Lobby, one more member in another channel,
    /// and the mesh shown; after two frames (spawn, then the first update).
    fn call(n: u32) -> (App, HashMap<u32, Entity>) {
        let mut app = App::new();
        app.add_plugins(super::super::MeshViewPlugin)
            .insert_resource(MeshViewArea {
                shown: true,
                center: Vec2::new(50.0, -20.0),
                size: Vec2::new(600.0, 400.0),
                backdrop: None,
            });
        let channel = |app: &mut App, name: &str, order| {
            app.world_mut()
                .spawn(Channel {
                    name: name.into(),
                    has_password: false,
                    max_members: 20,
                    order,
                })
                .id()
        };
        let lobby = channel(&mut app, "Lobby", 0);
        let gaming = channel(&mut app, "Gaming", 1);
        let mut users = HashMap::new();
        for id in 0..n {
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
                    state: state_of(id),
                    rtt_ms: Some(30.0 + id as f32),
                    loss_pct: 1.0,
                    ..LinkStatus::default()
                });
            }
            users.insert(id, e.id());
        }
        app.world_mut().spawn((
            User {
                id: 99,
                name: "elsewhere".into(),
            },
            MemberOf(gaming),
            Speaking(true),
            VoiceLevel(0.5),
            LinkStatus::default(),
        ));
        app.update();
        app.update();
        (app, users)
    }

    fn parts(app: &mut App) -> HashMap<MeshPart, Entity> {
        let mut q = app.world_mut().query::<(Entity, &MeshPart)>();
        q.iter(app.world()).map(|(e, p)| (*p, e)).collect()
    }

    fn sprite(app: &App, e: Entity) -> Sprite {
        app.world().get::<Sprite>(e).unwrap().clone()
    }

    #[test]
    fn sixteen_members_get_a_node_each_and_a_line_coloured_by_its_link() {
        let (mut app, _) = call(16);
        let parts = parts(&mut app);
        let count = |f: fn(&MeshPart) -> bool| parts.keys().filter(|p| f(p)).count();
        assert_eq!(count(|p| matches!(p, MeshPart::Node(_))), 16);
        assert_eq!(
            count(|p| matches!(p, MeshPart::Line(_))),
            15,
            "none to ourselves"
        );
        assert!(
            !parts.contains_key(&MeshPart::Node(99)),
            "other channels stay out"
        );
        assert_eq!(app.world().resource::<MeshEntities>().len(), 16);
        for id in 1..16 {
            let line = sprite(&app, parts[&MeshPart::Line(id)]);
            assert_eq!(line.color, rgb(LinkKind::of(&state_of(id))), "user {id}");
        }
        let red = sprite(&app, parts[&MeshPart::Line(3)]).color;
        assert_eq!(red, Color::srgb_u8(220, 60, 60), "unreachable is red");
        let label = app
            .world()
            .get::<Text2d>(parts[&MeshPart::LineLabel(4)])
            .unwrap();
        assert_eq!(label.0, "34 ms, 1.0 %");
        let root = app.world().resource::<MeshEntities>().root.unwrap();
        assert_eq!(
            app.world().get::<Transform>(root).unwrap().translation,
            Vec3::new(50.0, -20.0, 0.0),
            "the picture sits where the UI left room"
        );
    }

    #[test]
    fn levels_and_link_changes_update_the_same_entities() {
        let (mut app, users) = call(16);
        let before = parts(&mut app);
        let quiet = sprite(&app, before[&MeshPart::Node(5)])
            .custom_size
            .unwrap();
        {
            let mut bob = app.world_mut().entity_mut(users[&5]);
            bob.insert((Speaking(true), VoiceLevel(1.0)));
            let mut link = bob.get_mut::<LinkStatus>().unwrap();
            link.state = unreachable();
        }
        app.update();
        app.update();
        let after = parts(&mut app);
        assert_eq!(before, after, "nothing respawned");
        let loud = sprite(&app, after[&MeshPart::Node(5)]).custom_size.unwrap();
        assert!(
            loud.x > quiet.x * 1.4,
            "{quiet:?} -> {loud:?}: the node pulses"
        );
        let halo = sprite(&app, after[&MeshPart::Halo(5)]).color;
        assert!(halo.alpha() > 0.5, "a speaker glows");
        assert_eq!(
            sprite(&app, after[&MeshPart::Line(5)]).color,
            rgb(LinkKind::Unreachable)
        );
        let label = app
            .world()
            .get::<Text2d>(after[&MeshPart::LineLabel(5)])
            .unwrap();
        assert_eq!(label.0, "unreachable");
    }

    /// How many mesh entities the last frame changed, counted after the mesh's systems.
    #[derive(Resource, Default)]
    struct Touched(usize);

    #[allow(clippy::type_complexity)]
    fn count_touched(
        q: Query<
            Entity,
            (
                With<MeshPart>,
                Or<(Changed<Sprite>, Changed<Transform>, Changed<Text2d>)>,
            ),
        >,
        mut touched: ResMut<Touched>,
    ) {
        touched.0 = q.iter().count();
    }

    #[test]
    fn an_unchanged_frame_writes_nothing_and_a_change_writes_only_its_entities() {
        let (mut app, users) = call(16);
        app.init_resource::<Touched>()
            .add_systems(PostUpdate, count_touched);
        app.update(); // the counter's first run sees everything as new
        app.update();
        assert_eq!(app.world().resource::<Touched>().0, 0);
        app.world_mut()
            .entity_mut(users[&7])
            .insert((Speaking(true), VoiceLevel(0.8)));
        app.update();
        // Node and halo grow, the name moves down.
        assert_eq!(app.world().resource::<Touched>().0, 3);
    }

    #[test]
    fn a_member_who_leaves_takes_their_entities_and_hiding_keeps_the_rest() {
        let (mut app, users) = call(5);
        app.world_mut().despawn(users[&2]);
        app.update();
        let parts = parts(&mut app);
        assert!(!parts.keys().any(|p| matches!(
            p,
            MeshPart::Node(2)
                | MeshPart::Halo(2)
                | MeshPart::Name(2)
                | MeshPart::Line(2)
                | MeshPart::LineLabel(2)
        )));
        assert_eq!(parts.len(), 4 * 3 + 3 * 2);
        app.world_mut().resource_mut::<MeshViewArea>().shown = false;
        app.update();
        let root = app.world().resource::<MeshEntities>().root.unwrap();
        assert_eq!(
            app.world().get::<Visibility>(root),
            Some(&Visibility::Hidden)
        );
        assert_eq!(self::parts(&mut app), parts, "hidden, not despawned");
    }
}
