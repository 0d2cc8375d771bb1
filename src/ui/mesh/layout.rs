//! Where the mesh view puts things: pure geometry and colours, no Bevy, so the placement and
//! the colour of each link are unit tests and the systems in [`super::systems`] only copy the
//! result onto sprites.
//!
//! The view is a star: the local member in the middle, the others on a circle around it, one
//! line from the middle to each. Every member measures only its own links, so our links are
//! the ones this client knows (state, round trip, loss); the links between two other members
//! exist (the mesh is full) but their state is theirs, and drawing them would invent it.

use crate::voice::{PeerState, RelayVia};

/// Radius of a silent member's node, in logical pixels.
pub const NODE_RADIUS: f32 = 14.0;
/// How much a node grows at full voice level (0.5: half its radius again).
pub const PULSE: f32 = 0.5;
/// Room kept between the circle and the edge of the area, for the name under each node.
pub const MARGIN: f32 = 34.0;
/// Thickness of a link line.
pub const LINE_WIDTH: f32 = 3.0;

/// A point in the view's own coordinates: the origin is the area's centre, y grows upwards
/// (as in Bevy's 2D world, so the systems copy it as is).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Point {
    pub x: f32,
    pub y: f32,
}

impl Point {
    pub const ORIGIN: Point = Point { x: 0.0, y: 0.0 };

    pub fn new(x: f32, y: f32) -> Self {
        Self { x, y }
    }

    fn distance(self, other: Point) -> f32 {
        (other.x - self.x).hypot(other.y - self.y)
    }
}

/// What a link line says by its colour. The same four as the overview's link dot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkKind {
    /// A direct UDP path.
    Direct,
    /// Voice goes through another member or the server.
    Relayed,
    /// Hole punching has not answered yet.
    Punching,
    /// Neither a direct path nor a relay works.
    Unreachable,
}

impl LinkKind {
    /// The kind of a link in the state the voice plane reports.
    pub fn of(state: &PeerState) -> Self {
        match state {
            PeerState::Direct(_) => Self::Direct,
            PeerState::Relayed(_) => Self::Relayed,
            PeerState::Punching => Self::Punching,
            PeerState::Unreachable(_) => Self::Unreachable,
        }
    }

    /// sRGB colour: green direct, teal relayed, amber punching, red unreachable. The overview's
    /// link dot uses the same (`panels::peer_details::link_color`).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::Direct => [60, 200, 90],
            Self::Relayed => [60, 170, 200],
            Self::Punching => [230, 170, 40],
            Self::Unreachable => [220, 60, 60],
        }
    }

    /// The word in the legend.
    pub fn word(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relayed => "relayed",
            Self::Punching => "punching",
            Self::Unreachable => "unreachable",
        }
    }

    /// All four, in the legend's order.
    pub const ALL: [LinkKind; 4] = [
        Self::Direct,
        Self::Relayed,
        Self::Punching,
        Self::Unreachable,
    ];
}

/// Our link to one member, as the mesh draws it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshLink {
    pub kind: LinkKind,
    /// Who relays, for a relayed link ("carol", "server").
    pub via: Option<String>,
    pub rtt_ms: Option<f32>,
    /// Loss in per cent; `None` while nothing flows (punching, unreachable).
    pub loss_pct: Option<f32>,
}

impl MeshLink {
    /// The link in `state` with its figures; loss counts only while voice flows.
    pub fn new(state: &PeerState, rtt_ms: Option<f32>, loss_pct: f32) -> Self {
        let kind = LinkKind::of(state);
        let via = match state {
            PeerState::Relayed(RelayVia::Member { name, .. }) => Some(name.clone()),
            PeerState::Relayed(RelayVia::Server) => Some("server".to_owned()),
            _ => None,
        };
        let flows = matches!(kind, LinkKind::Direct | LinkKind::Relayed);
        Self {
            kind,
            via,
            rtt_ms: rtt_ms.filter(|_| flows),
            loss_pct: flows.then_some(loss_pct),
        }
    }

    /// The text beside the line: "42 ms, 1.5 %", "via carol, 80 ms, 0.0 %", "punching",
    /// "unreachable". Rounded so it does not change (and get laid out again) every frame.
    pub fn label(&self) -> String {
        let mut parts: Vec<String> = Vec::with_capacity(3);
        if let Some(via) = &self.via {
            parts.push(format!("via {via}"));
        }
        match self.kind {
            LinkKind::Punching | LinkKind::Unreachable => parts.push(self.kind.word().to_owned()),
            LinkKind::Direct | LinkKind::Relayed => {
                parts.push(match self.rtt_ms {
                    Some(rtt) if rtt.is_finite() => format!("{rtt:.0} ms"),
                    // ASCII: Bevy's default font (a FiraMono subset) has no dash.
                    _ => "? ms".to_owned(),
                });
                if let Some(loss) = self.loss_pct.filter(|l| l.is_finite()) {
                    parts.push(format!("{loss:.1} %"));
                }
            }
        }
        parts.join(", ")
    }
}

/// One member as the mesh needs them.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshMember {
    pub user_id: u32,
    pub name: String,
    pub is_self: bool,
    pub speaking: bool,
    /// Voice level, 0..1 (the overview meter's scale).
    pub level: f32,
    /// Our link to them; `None` for ourselves.
    pub link: Option<MeshLink>,
}

/// Where one member's node goes and how big it is this frame.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedNode {
    pub user_id: u32,
    pub center: Point,
    /// Radius this frame: [`NODE_RADIUS`] grown by the voice level.
    pub radius: f32,
    pub is_self: bool,
    pub speaking: bool,
    pub level: f32,
}

/// The line from us to one member.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedLink {
    /// The member at the far end.
    pub user_id: u32,
    pub from: Point,
    pub to: Point,
    pub kind: LinkKind,
    pub label: String,
}

impl PlacedLink {
    /// Where a sprite for this line goes: its centre, length and angle (radians,
    /// counter-clockwise from the x axis), for a rectangle `length` wide rotated by `angle`.
    pub fn segment(&self) -> (Point, f32, f32) {
        let center = Point::new(
            (self.from.x + self.to.x) / 2.0,
            (self.from.y + self.to.y) / 2.0,
        );
        let angle = (self.to.y - self.from.y).atan2(self.to.x - self.from.x);
        (center, self.from.distance(self.to), angle)
    }

    /// Where the label goes: beside the line a little past its middle, above a mostly level
    /// line and to the right of a mostly upright one, so it never sits on its own line and
    /// keeps clear of the name under the far node.
    pub fn label_position(&self) -> (Point, LabelSide) {
        let (dx, dy) = (self.to.x - self.from.x, self.to.y - self.from.y);
        let len = dx.hypot(dy).max(f32::EPSILON);
        let (mut nx, mut ny) = (-dy / len, dx / len);
        let side = if ny.abs() >= nx.abs() {
            if ny < 0.0 {
                (nx, ny) = (-nx, -ny);
            }
            LabelSide::Above
        } else {
            if nx < 0.0 {
                (nx, ny) = (-nx, -ny);
            }
            LabelSide::Right
        };
        let at = Point::new(
            self.from.x + dx * 0.55 + nx * 7.0,
            self.from.y + dy * 0.55 + ny * 7.0,
        );
        (at, side)
    }
}

/// Which side of its line a label is on: the systems anchor the text at its bottom centre
/// (above) or at its left edge (right), so it grows away from the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelSide {
    Above,
    Right,
}

/// The whole picture for one frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MeshLayout {
    pub nodes: Vec<PlacedNode>,
    pub links: Vec<PlacedLink>,
}

/// The radius of a node at this voice level (clamped to 0..1).
pub fn node_radius(level: f32) -> f32 {
    let level = if level.is_finite() {
        level.clamp(0.0, 1.0)
    } else {
        0.0
    };
    NODE_RADIUS * (1.0 + PULSE * level)
}

/// `n` points evenly on a circle of `radius` around the origin, the first at the top, going
/// clockwise.
pub fn on_circle(n: usize, radius: f32) -> impl Iterator<Item = Point> {
    (0..n).map(move |i| {
        let angle = std::f32::consts::FRAC_PI_2 - std::f32::consts::TAU * i as f32 / n as f32;
        Point::new(radius * angle.cos(), radius * angle.sin())
    })
}

/// The circle's radius in an area of `width` × `height`: as large as fits with the margin for
/// names, never below twice a node so a tiny window still shows something.
pub fn circle_radius(width: f32, height: f32) -> f32 {
    (width.min(height) / 2.0 - MARGIN).max(NODE_RADIUS * 2.0)
}

/// Lays the members out: ourselves in the middle, the others on a circle of `radius` in the
/// order given (the caller sorts by user id so nobody jumps around), a line to each. Without
/// ourselves among the members (not in a channel) there is nothing to draw.
pub fn layout(members: &[MeshMember], radius: f32) -> MeshLayout {
    let Some(me) = members.iter().find(|m| m.is_self) else {
        return MeshLayout::default();
    };
    let others: Vec<&MeshMember> = members.iter().filter(|m| !m.is_self).collect();
    let mut out = MeshLayout {
        nodes: Vec::with_capacity(members.len()),
        links: Vec::with_capacity(others.len()),
    };
    let node = |m: &MeshMember, center| PlacedNode {
        user_id: m.user_id,
        center,
        radius: node_radius(m.level),
        is_self: m.is_self,
        speaking: m.speaking,
        level: m.level,
    };
    out.nodes.push(node(me, Point::ORIGIN));
    for (m, center) in others.iter().zip(on_circle(others.len(), radius)) {
        out.nodes.push(node(m, center));
        // A member whose link we have not heard of yet is still being punched.
        let link = m.link.clone().unwrap_or(MeshLink {
            kind: LinkKind::Punching,
            via: None,
            rtt_ms: None,
            loss_pct: None,
        });
        out.links.push(PlacedLink {
            user_id: m.user_id,
            from: Point::ORIGIN,
            to: center,
            kind: link.kind,
            label: link.label(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::voice::{Unreachable, UnreachableReason};

    fn peer(id: u32, state: PeerState) -> MeshMember {
        MeshMember {
            user_id: id,
            name: format!("user{id}"),
            is_self: false,
            speaking: false,
            level: 0.0,
            link: Some(MeshLink::new(&state, Some(42.4), 1.3)),
        }
    }

    fn me(id: u32) -> MeshMember {
        MeshMember {
            user_id: id,
            name: "me".into(),
            is_self: true,
            speaking: false,
            level: 0.0,
            link: None,
        }
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

    #[test]
    fn sixteen_members_sit_on_the_circle_around_us_evenly_spaced() {
        let mut members = vec![me(0)];
        members.extend((1..16).map(|i| peer(i, PeerState::Direct(([10, 0, 0, 1], 1).into()))));
        let l = layout(&members, 100.0);
        assert_eq!(l.nodes.len(), 16);
        assert_eq!(l.links.len(), 15);
        assert_eq!(l.nodes[0].center, Point::ORIGIN, "we are in the middle");
        for n in &l.nodes[1..] {
            assert!((n.center.x.hypot(n.center.y) - 100.0).abs() < 1e-3, "{n:?}");
        }
        // The first peer at the top, the next clockwise (to the right).
        assert!((l.nodes[1].center.y - 100.0).abs() < 1e-3);
        assert!(l.nodes[2].center.x > 0.0);
        // Neighbours are all the same distance apart: an even circle.
        let gap = |a: &PlacedNode, b: &PlacedNode| a.center.distance(b.center);
        let first = gap(&l.nodes[1], &l.nodes[2]);
        for w in l.nodes[1..].windows(2) {
            assert!((gap(&w[0], &w[1]) - first).abs() < 1e-3);
        }
    }

    #[test]
    fn each_link_gets_the_colour_of_its_state() {
        let via = PeerState::Relayed(RelayVia::Member {
            user_id: 2,
            name: "carol".into(),
        });
        let members = vec![
            me(1),
            peer(2, PeerState::Direct(([10, 0, 0, 2], 1).into())),
            peer(3, via),
            peer(4, PeerState::Punching),
            peer(5, unreachable()),
            peer(6, PeerState::Relayed(RelayVia::Server)),
        ];
        let l = layout(&members, 80.0);
        let kinds: Vec<_> = l.links.iter().map(|s| (s.user_id, s.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (2, LinkKind::Direct),
                (3, LinkKind::Relayed),
                (4, LinkKind::Punching),
                (5, LinkKind::Unreachable),
                (6, LinkKind::Relayed),
            ]
        );
        let labels: Vec<_> = l.links.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            vec![
                "42 ms, 1.3 %",
                "via carol, 42 ms, 1.3 %",
                "punching",
                "unreachable",
                "via server, 42 ms, 1.3 %",
            ]
        );
        // Four distinct colours: none of the states can be mistaken for another.
        let colours: std::collections::HashSet<_> = LinkKind::ALL.iter().map(|k| k.rgb()).collect();
        assert_eq!(colours.len(), 4);
        assert_eq!(LinkKind::Direct.rgb(), [60, 200, 90]);
        assert_eq!(LinkKind::Unreachable.rgb(), [220, 60, 60]);
    }

    #[test]
    fn a_member_without_a_link_yet_is_drawn_as_punching() {
        let mut bob = peer(2, PeerState::Punching);
        bob.link = None;
        let l = layout(&[me(1), bob], 50.0);
        assert_eq!(l.links[0].kind, LinkKind::Punching);
    }

    #[test]
    fn nothing_is_drawn_outside_a_channel() {
        let l = layout(&[peer(2, PeerState::Punching)], 50.0);
        assert!(l.nodes.is_empty() && l.links.is_empty());
    }

    #[test]
    fn nodes_pulse_with_the_voice_level() {
        assert_eq!(node_radius(0.0), NODE_RADIUS);
        assert_eq!(node_radius(1.0), NODE_RADIUS * (1.0 + PULSE));
        assert_eq!(node_radius(7.0), node_radius(1.0), "clamped");
        assert_eq!(node_radius(f32::NAN), NODE_RADIUS);
        let mut loud = peer(2, PeerState::Punching);
        loud.level = 0.5;
        let l = layout(&[me(1), loud], 50.0);
        assert_eq!(l.nodes[1].radius, NODE_RADIUS * (1.0 + PULSE * 0.5));
    }

    #[test]
    fn a_segment_spans_its_two_ends() {
        let link = PlacedLink {
            user_id: 2,
            from: Point::ORIGIN,
            to: Point::new(0.0, -30.0),
            kind: LinkKind::Direct,
            label: String::new(),
        };
        let (center, length, angle) = link.segment();
        assert_eq!(center, Point::new(0.0, -15.0));
        assert!((length - 30.0).abs() < 1e-4);
        assert!(
            (angle + std::f32::consts::FRAC_PI_2).abs() < 1e-4,
            "{angle}"
        );
        // The label sits beside the line, not on it: right of an upright line, above a
        // level one.
        let (p, side) = link.label_position();
        assert_eq!(side, LabelSide::Right);
        assert!(p.x > 3.0, "{p:?}");
        let level = PlacedLink {
            to: Point::new(-40.0, 5.0),
            ..link
        };
        let (p, side) = level.label_position();
        assert_eq!(side, LabelSide::Above);
        assert!(p.y > 5.0 * 0.55 + 3.0, "{p:?}");
    }

    #[test]
    fn the_circle_fits_the_area_with_room_for_names() {
        assert_eq!(circle_radius(400.0, 300.0), 150.0 - MARGIN);
        assert_eq!(circle_radius(10.0, 10.0), NODE_RADIUS * 2.0);
    }

    #[test]
    fn figures_of_a_link_without_voice_are_not_shown() {
        let l = MeshLink::new(&PeerState::Punching, Some(30.0), 50.0);
        assert_eq!((l.rtt_ms, l.loss_pct), (None, None));
        let l = MeshLink::new(&PeerState::Direct(([10, 0, 0, 2], 1).into()), None, 0.0);
        assert_eq!(l.label(), "? ms, 0.0 %");
    }
}
