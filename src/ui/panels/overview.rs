//! The channel overview: every channel with its members live, join/leave, per-member voice
//! activity, link details on hover, and per-peer volume and local mute.
//!
//! Channels and members are laid out as one list of equally tall rows so only the rows inside
//! the visible scroll viewport are built (`ScrollArea::show_rows`); 50 channels with 500 users
//! cost about as much as the ~35 rows that fit on screen.

use egui::{Button, Label, RichText, ScrollArea, Sense, Slider, Stroke, Ui, Vec2};

use super::meters::{level_meter, SPEAKING_COLOR};
use super::peer_details::{identity_controls, link_color, peer_details};
use crate::ui::actions::UiAction;
use crate::ui::view::{ChannelView, MemberView, OverviewView};
use crate::voice::VoiceSetting;

/// Glyph shown before the name of a password-protected channel.
pub const LOCK_GLYPH: &str = "🔒";

/// Indentation of member rows under their channel.
const MEMBER_INDENT: f32 = 18.0;

/// What one row of the flattened list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// Channel header at this channel index.
    Channel(usize),
    /// Member `member` of channel `channel`.
    Member {
        /// Channel index.
        channel: usize,
        /// Member index inside that channel.
        member: usize,
    },
}

/// Number of rows the overview needs: one per channel plus one per member.
pub fn row_count(view: &OverviewView) -> usize {
    view.channels.iter().map(|c| 1 + c.members.len()).sum()
}

/// Finds the row at `index` of the flattened list, walking channels (not members), so the cost
/// is proportional to the number of channels.
pub fn row_at(view: &OverviewView, index: usize) -> Option<Row> {
    let mut start = 0;
    for (ci, channel) in view.channels.iter().enumerate() {
        let len = 1 + channel.members.len();
        if index < start + len {
            return Some(if index == start {
                Row::Channel(ci)
            } else {
                Row::Member {
                    channel: ci,
                    member: index - start - 1,
                }
            });
        }
        start += len;
    }
    None
}

/// The "members/max" text of a channel header ("3/10", or "3" without a limit).
pub fn occupancy_text(channel: &ChannelView) -> String {
    match channel.max_members {
        Some(max) => format!("{}/{}", channel.members.len(), max),
        None => channel.members.len().to_string(),
    }
}

fn is_full(channel: &ChannelView) -> bool {
    channel
        .max_members
        .is_some_and(|max| channel.members.len() >= max as usize)
}

/// Draws the overview. Returns Join / Leave and per-peer volume / mute actions.
pub fn overview(ui: &mut Ui, view: &OverviewView) -> Vec<UiAction> {
    let mut actions = Vec::new();
    if view.channels.is_empty() {
        ui.label("No channels yet. Waiting for the server's overview…");
        return actions;
    }
    let row_height = ui.spacing().interact_size.y.max(20.0);
    let total = row_count(view);
    ScrollArea::vertical()
        .auto_shrink([false, false])
        .show_rows(ui, row_height, total, |ui, range| {
            for index in range {
                let Some(row) = row_at(view, index) else {
                    break;
                };
                match row {
                    Row::Channel(ci) => {
                        channel_row(ui, view, &view.channels[ci], row_height, &mut actions)
                    }
                    Row::Member { channel, member } => member_row(
                        ui,
                        &view.channels[channel].members[member],
                        row_height,
                        &mut actions,
                    ),
                }
            }
        });
    actions
}

fn channel_row(
    ui: &mut Ui,
    view: &OverviewView,
    channel: &ChannelView,
    row_height: f32,
    actions: &mut Vec<UiAction>,
) {
    let mine = view.my_channel == Some(channel.id);
    ui.push_id(("channel", channel.id), |ui| {
        // Allocates exactly `row_height`, as `show_rows` assumes.
        ui.allocate_ui_with_layout(
            Vec2::new(ui.available_width(), row_height),
            egui::Layout::left_to_right(egui::Align::Center),
            |ui| {
                if channel.has_password {
                    ui.label(LOCK_GLYPH).on_hover_text("Password protected");
                }
                let mut name = RichText::new(&channel.name).strong();
                if mine {
                    name = name.color(ui.visuals().selection.stroke.color);
                }
                let name_response = ui
                    .add(Label::new(name).sense(Sense::click()))
                    .on_hover_text(if mine {
                        "You are here"
                    } else {
                        "Double-click to join"
                    });
                ui.weak(occupancy_text(channel));
                let full = is_full(channel);
                if mine {
                    if ui.small_button("Leave").clicked() {
                        actions.push(UiAction::Leave);
                    }
                } else {
                    let join = ui
                        .add_enabled(!full, Button::new("Join").small())
                        .on_disabled_hover_text("Channel full");
                    if join.clicked() || (name_response.double_clicked() && !full) {
                        actions.push(UiAction::Join {
                            channel_id: channel.id,
                        });
                    }
                }
            },
        );
    });
}

fn member_row(ui: &mut Ui, member: &MemberView, row_height: f32, actions: &mut Vec<UiAction>) {
    ui.push_id(("member", member.user_id), |ui| {
        // Allocates exactly `row_height`, as `show_rows` assumes.
        ui.allocate_ui_with_layout(
            Vec2::new(ui.available_width(), row_height),
            egui::Layout::left_to_right(egui::Align::Center),
            |ui| {
                ui.add_space(MEMBER_INDENT);
                speaking_ring(ui, member.speaking, row_height * 0.35);
                let mut name = RichText::new(&member.name);
                if member.is_self {
                    name = name.strong();
                }
                if member.speaking {
                    name = name.color(SPEAKING_COLOR);
                }
                ui.add(Label::new(name).truncate())
                    .on_hover_ui(|ui| peer_details(ui, member));
                if member.is_self {
                    ui.weak("(you)");
                }
                level_meter(ui, member.level, Vec2::new(40.0, 6.0), member.speaking);
                ui.label(RichText::new("●").color(link_color(&member.link.state)))
                    .on_hover_ui(|ui| peer_details(ui, member));
                actions.extend(identity_controls(ui, member));
                if !member.is_self {
                    let mut muted = member.muted_locally;
                    if ui
                        .toggle_value(&mut muted, "Mute")
                        .on_hover_text(format!("Silence {} for you only", member.name))
                        .changed()
                    {
                        actions.push(UiAction::Voice(VoiceSetting::PeerMuted {
                            user_id: member.user_id,
                            muted,
                        }));
                    }
                    let mut volume = member.volume.clamp(0.0, 2.0);
                    let slider = ui
                        .add(
                            Slider::new(&mut volume, 0.0..=2.0)
                                .step_by(0.05)
                                .show_value(false),
                        )
                        .on_hover_text(format!("Volume {:.0}%", volume * 100.0));
                    if slider.changed() {
                        actions.push(UiAction::Voice(VoiceSetting::PeerVolume {
                            user_id: member.user_id,
                            volume,
                        }));
                    }
                }
            },
        );
    });
}

/// A small circle: a filled green ring while speaking, a faint outline otherwise.
fn speaking_ring(ui: &mut Ui, speaking: bool, radius: f32) {
    let (rect, _) = ui.allocate_exact_size(Vec2::splat(radius * 2.0 + 4.0), Sense::hover());
    if !ui.is_rect_visible(rect) {
        return;
    }
    let painter = ui.painter();
    if speaking {
        painter.circle(
            rect.center(),
            radius,
            SPEAKING_COLOR.gamma_multiply(0.35),
            Stroke::new(2.0, SPEAKING_COLOR),
        );
    } else {
        painter.circle_stroke(
            rect.center(),
            radius,
            Stroke::new(1.0, ui.visuals().weak_text_color()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::view::{LinkView, MemberLink};
    use crate::voice::PeerState;
    use egui::accesskit::Role;
    use egui_kittest::{kittest::Queryable, Harness};

    struct State {
        view: OverviewView,
        actions: Vec<UiAction>,
    }

    fn harness(view: OverviewView) -> Harness<'static, State> {
        // 60 fps steps, so two clicks land within egui's double-click window.
        Harness::builder()
            .with_size(Vec2::new(700.0, 400.0))
            .with_step_dt(1.0 / 60.0)
            .build_ui_state(
                |ui, state: &mut State| {
                    let actions = overview(ui, &state.view);
                    state.actions.extend(actions);
                },
                State {
                    view,
                    actions: Vec::new(),
                },
            )
    }

    fn sample() -> OverviewView {
        let mut me = MemberView::new(1, "alice");
        me.is_self = true;
        me.link.state = MemberLink::Local;
        let mut bob = MemberView::new(2, "bob");
        bob.speaking = true;
        bob.level = 0.7;
        bob.link = LinkView {
            state: MemberLink::Peer(PeerState::Direct(([192, 0, 2, 7], 7700).into())),
            rtt_ms: Some(31.0),
            ..LinkView::default()
        };
        OverviewView {
            channels: vec![
                ChannelView {
                    id: 10,
                    name: "Lobby".into(),
                    has_password: false,
                    members: vec![me, bob],
                    max_members: Some(8),
                },
                ChannelView {
                    id: 11,
                    name: "Private".into(),
                    has_password: true,
                    members: vec![],
                    max_members: None,
                },
            ],
            my_channel: Some(10),
        }
    }

    #[test]
    fn rows_flatten_channels_then_their_members() {
        let view = sample();
        assert_eq!(row_count(&view), 4);
        assert_eq!(row_at(&view, 0), Some(Row::Channel(0)));
        assert_eq!(
            row_at(&view, 2),
            Some(Row::Member {
                channel: 0,
                member: 1
            })
        );
        assert_eq!(row_at(&view, 3), Some(Row::Channel(1)));
        assert_eq!(row_at(&view, 4), None);
    }

    #[test]
    fn channel_header_shows_lock_and_occupancy() {
        let h = harness(sample());
        h.get_by_label(LOCK_GLYPH);
        h.get_by_label("2/8");
        h.get_by_label("Private");
        h.get_by_label("(you)");
    }

    #[test]
    fn join_click_on_password_channel_emits_join() {
        let mut h = harness(sample());
        // Lobby is ours (Leave), so the only Join button belongs to Private.
        h.get_by_label("Join").click();
        h.run();
        assert_eq!(h.state().actions, vec![UiAction::Join { channel_id: 11 }]);
    }

    #[test]
    fn double_click_on_channel_name_joins() {
        let mut h = harness(sample());
        let node = h.get_by_label("Private");
        node.click();
        node.click();
        h.run();
        assert!(
            h.state()
                .actions
                .contains(&UiAction::Join { channel_id: 11 }),
            "{:?}",
            h.state().actions
        );
    }

    #[test]
    fn leave_button_on_current_channel_emits_leave() {
        let mut h = harness(sample());
        h.get_by_label("Leave").click();
        h.run();
        assert_eq!(h.state().actions, vec![UiAction::Leave]);
    }

    #[test]
    fn full_channel_cannot_be_joined() {
        let mut view = sample();
        view.channels[1].max_members = Some(0);
        let mut h = harness(view);
        h.get_by_label("Join").click();
        h.run();
        assert!(h.state().actions.is_empty());
    }

    #[test]
    fn volume_slider_keyboard_step_emits_set_user_volume() {
        let mut h = harness(sample());
        // Only bob (not self) has a slider.
        h.get_by_role(Role::Slider).focus();
        h.run();
        h.key_press(egui::Key::ArrowRight);
        h.run();
        let actions = &h.state().actions;
        assert_eq!(actions.len(), 1, "{actions:?}");
        match actions[0] {
            UiAction::Voice(VoiceSetting::PeerVolume { user_id, volume }) => {
                assert_eq!(user_id, 2);
                assert!((volume - 1.05).abs() < 1e-4, "volume {volume}");
            }
            ref other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn local_mute_toggle_emits_set_user_muted_for_peers_only() {
        let mut h = harness(sample());
        // Self has no Mute toggle, so there is exactly one.
        h.get_by_label("Mute").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::PeerMuted {
                user_id: 2,
                muted: true
            })]
        );
    }

    #[test]
    fn hovering_a_member_shows_link_details() {
        let mut h = harness(sample());
        h.get_by_label("bob").hover();
        // Tooltips appear after egui's hover delay (0.5 s); one second of 60 fps frames.
        h.run_steps(60);
        h.get_by_label("31 ms");
    }

    fn big_view() -> OverviewView {
        OverviewView {
            channels: (0..50)
                .map(|c| ChannelView {
                    id: c,
                    name: format!("Channel {c}"),
                    has_password: c % 5 == 0,
                    members: (0..10)
                        .map(|m| MemberView::new(c * 10 + m, format!("user{}", c * 10 + m)))
                        .collect(),
                    max_members: Some(16),
                })
                .collect(),
            my_channel: None,
        }
    }

    #[test]
    fn rows_have_the_uniform_height_show_rows_assumes() {
        let h = harness(big_view());
        let style = egui::Style::default();
        let pitch = style.spacing.interact_size.y.max(20.0) + style.spacing.item_spacing.y;
        let first = h.get_by_label("Channel 0").rect().center().y;
        let second = h.get_by_label("Channel 1").rect().center().y;
        // Channel 0 header + 10 members come before Channel 1's header.
        assert!(
            ((second - first) - 11.0 * pitch).abs() < 0.5,
            "offset {} vs {}",
            second - first,
            11.0 * pitch
        );
    }

    #[test]
    fn large_overview_builds_only_visible_rows() {
        let h = harness(big_view());
        assert!(h.query_by_label("Channel 0").is_some());
        assert!(h.query_by_label("Channel 49").is_none());
        assert!(h.query_all_by_label("Join").count() < 10);
    }
}
