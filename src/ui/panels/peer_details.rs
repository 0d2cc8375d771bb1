//! Link details of one channel member: state, round trip, loss both ways, jitter, buffer delay,
//! fingerprint, and who they are: your own identity fingerprint on your row, each peer's
//! safety number and verified mark. Shown as the hover tooltip of a member in the overview;
//! the verified checkbox ([`identity_controls`]) sits in the member's row, and a changed
//! identity gets a banner above everything ([`identity_banner`]).

use egui::{Color32, Grid, RichText, Ui};

use super::sparkline::{scale_max, sparkline};
use crate::ui::actions::UiAction;
use crate::ui::link_history::{LinkHistory, HISTORY_LEN};
use crate::ui::mesh::layout::LinkKind;
use crate::ui::view::{IdentityView, MemberLink, MemberView, OverviewView};

/// Colour of identity warnings.
const WARNING_COLOR: Color32 = Color32::from_rgb(230, 70, 60);
use crate::voice::PeerState;

/// Short human text for a link state ("direct", "relayed via NAME", "punching…",
/// "unreachable: reason", "you").
pub fn link_state_text(state: &MemberLink) -> String {
    match state {
        MemberLink::Peer(PeerState::Direct(_)) => "direct".to_owned(),
        MemberLink::Peer(PeerState::Punching) => "punching…".to_owned(),
        MemberLink::Peer(PeerState::Relayed(via)) => via.to_string(),
        MemberLink::Peer(PeerState::Unreachable(reason)) => format!("unreachable: {reason}"),
        MemberLink::Local => "you".to_owned(),
        MemberLink::OtherChannel => "in another channel".to_owned(),
    }
}

/// Colour of the small link dot: green direct, teal relayed, amber punching, red unreachable,
/// grey for self.
/// The same palette as the mesh view's lines ([`LinkKind::rgb`]).
pub fn link_color(state: &MemberLink) -> Color32 {
    match state {
        MemberLink::Peer(s) => kind_color(LinkKind::of(s)),
        MemberLink::Local | MemberLink::OtherChannel => Color32::GRAY,
    }
}

/// The colour of a kind of link, as egui wants it.
pub fn kind_color(kind: LinkKind) -> Color32 {
    let [r, g, b] = kind.rgb();
    Color32::from_rgb(r, g, b)
}

/// Formats an optional measurement, a dash when not measured yet.
pub fn format_measure(value: Option<f32>, unit: &str) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.0} {unit}"),
        _ => "–".to_owned(),
    }
}

/// A percentage with one decimal, a dash when not measured yet.
fn format_percent(value: Option<f32>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.1} %"),
        _ => "–".to_owned(),
    }
}

/// Draws the details grid for one member.
pub fn peer_details(ui: &mut Ui, member: &MemberView) {
    ui.strong(&member.name);
    Grid::new(("peer_details", member.user_id))
        .num_columns(2)
        .show(ui, |ui| {
            let link = &member.link;
            ui.label("Link");
            ui.colored_label(link_color(&link.state), link_state_text(&link.state));
            ui.end_row();
            if link.state != MemberLink::Local {
                ui.label("Round trip");
                ui.label(format_measure(link.rtt_ms, "ms"));
                ui.end_row();
                ui.label("Loss");
                ui.label(format_percent(link.loss_pct));
                ui.end_row();
                // What they hear of us: from their receiver reports.
                ui.label("Loss of your voice");
                ui.label(format_percent(link.reported_loss_pct));
                ui.end_row();
                ui.label("Jitter");
                ui.label(format_measure(link.jitter_ms, "ms"));
                ui.end_row();
                ui.label("Buffer delay");
                ui.label(format_measure(link.buffer_ms, "ms"));
                ui.end_row();
                if let Some(history) = member.history.as_ref().filter(|h| !h.is_empty()) {
                    history_rows(ui, history);
                }
            }
            // Our own row has no voice-key fingerprint to show; our identity stands there.
            if !(member.fingerprint.is_none()
                && matches!(member.identity, IdentityView::Own { .. }))
            {
                ui.label("Fingerprint");
                ui.monospace(member.fingerprint.as_deref().unwrap_or("–"));
                ui.end_row();
            }
            identity_rows(ui, &member.identity);
        });
}

/// Loss and jitter charts of the last minute; the scale's floor keeps a quiet link flat.
fn history_rows(ui: &mut Ui, history: &LinkHistory) {
    let size = egui::vec2(120.0, 24.0);
    let loss: Vec<f32> = history.loss_pct().collect();
    let top = scale_max(loss.iter().copied(), 5.0);
    ui.label("Loss, last minute");
    ui.horizontal(|ui| {
        let peak = scale_max(loss.iter().copied(), 0.0);
        let color = kind_color(LinkKind::Unreachable);
        let text = format!("peak {peak:.1} %");
        sparkline(
            ui,
            &loss,
            HISTORY_LEN,
            top,
            size,
            color,
            &format!("loss, last minute, {text}"),
        );
        ui.weak(text);
    });
    ui.end_row();
    let jitter: Vec<f32> = history.jitter_ms().collect();
    let top = scale_max(jitter.iter().copied(), 20.0);
    ui.label("Jitter, last minute");
    ui.horizontal(|ui| {
        let peak = scale_max(jitter.iter().copied(), 0.0);
        let text = format!("peak {peak:.0} ms");
        let color = ui.visuals().hyperlink_color;
        sparkline(
            ui,
            &jitter,
            HISTORY_LEN,
            top,
            size,
            color,
            &format!("jitter, last minute, {text}"),
        );
        ui.weak(text);
    });
    ui.end_row();
}

/// The identity lines of the details grid.
fn identity_rows(ui: &mut Ui, identity: &IdentityView) {
    match identity {
        IdentityView::Unknown => {}
        IdentityView::Own { fingerprint } => {
            ui.label("Your identity");
            ui.monospace(fingerprint);
            ui.end_row();
        }
        IdentityView::Trusted {
            safety_number,
            verified,
        } => {
            ui.label("Safety number");
            ui.monospace(safety_number);
            ui.end_row();
            ui.label("Identity");
            ui.label(if *verified {
                "verified"
            } else {
                "not verified: compare the safety number by other means"
            });
            ui.end_row();
        }
        IdentityView::Changed {
            previous,
            presented,
            safety_number,
        } => {
            ui.label("Identity");
            ui.colored_label(WARNING_COLOR, "CHANGED: voice held back");
            ui.end_row();
            ui.label("Was");
            ui.monospace(previous);
            ui.end_row();
            ui.label("Now");
            ui.monospace(presented);
            ui.end_row();
            if let Some(n) = safety_number {
                ui.label("New safety number");
                ui.monospace(n);
                ui.end_row();
            }
        }
        IdentityView::Refused { reason } => {
            ui.label("Identity");
            ui.colored_label(WARNING_COLOR, reason);
            ui.end_row();
        }
    }
}

/// The member row's identity control: a "Verified" checkbox for a peer whose identity checked
/// out (ticking it says the safety number was compared; it is remembered), a warning mark
/// for a changed or refused one, nothing for ourselves.
pub fn identity_controls(ui: &mut Ui, member: &MemberView) -> Vec<UiAction> {
    let mut actions = Vec::new();
    match &member.identity {
        IdentityView::Trusted {
            safety_number,
            verified,
        } => {
            let mut checked = *verified;
            if ui
                .checkbox(&mut checked, "Verified")
                .on_hover_text(format!(
                    "Tick once you compared this safety number with {} by other means:                      {safety_number}",
                    member.name
                ))
                .changed()
            {
                actions.push(UiAction::SetVerified {
                    user_id: member.user_id,
                    verified: checked,
                });
            }
        }
        IdentityView::Changed { .. } => {
            ui.label(RichText::new("⚠ identity changed").color(WARNING_COLOR))
                .on_hover_ui(|ui| peer_details(ui, member));
        }
        IdentityView::Refused { reason } => {
            ui.label(RichText::new("⚠ refused").color(WARNING_COLOR))
                .on_hover_text(reason);
        }
        IdentityView::Own { .. } | IdentityView::Unknown => {}
    }
    actions
}

/// A member whose identity key changed, for the banner.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityAlert {
    pub user_id: u32,
    pub name: String,
    pub previous: String,
    pub presented: String,
    pub safety_number: Option<String>,
}

/// Every member of the overview whose identity changed.
pub fn identity_alerts(overview: &OverviewView) -> Vec<IdentityAlert> {
    overview
        .channels
        .iter()
        .flat_map(|c| &c.members)
        .filter_map(|m| match &m.identity {
            IdentityView::Changed {
                previous,
                presented,
                safety_number,
            } => Some(IdentityAlert {
                user_id: m.user_id,
                name: m.name.clone(),
                previous: previous.clone(),
                presented: presented.clone(),
                safety_number: safety_number.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// A banner that cannot be missed, one line per member whose identity key changed: the server
/// may be listening in, or the person reinstalled. Their voice is held back until the user
/// accepts the new identity here (ideally after comparing the new safety number).
pub fn identity_banner(ui: &mut Ui, alerts: &[IdentityAlert]) -> Vec<UiAction> {
    let mut actions = Vec::new();
    for alert in alerts {
        ui.horizontal_wrapped(|ui| {
            ui.label(
                RichText::new(format!(
                    "⚠ {}'s identity key changed (was {}, now {}). The server may be                      listening in, or they reinstalled. Their voice is not used.",
                    alert.name, alert.previous, alert.presented
                ))
                .color(WARNING_COLOR)
                .strong(),
            );
            if let Some(n) = &alert.safety_number {
                ui.label(format!("New safety number: {n}"));
            }
            if ui
                .button("Accept new identity")
                .on_hover_text(format!(
                    "Trust {}'s new key (compare the new safety number with them first)",
                    alert.name
                ))
                .clicked()
            {
                actions.push(UiAction::AcceptIdentity {
                    user_id: alert.user_id,
                });
            }
        });
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::view::LinkView;
    use egui_kittest::{kittest::Queryable, Harness};

    #[test]
    fn unreachable_state_names_the_reason() {
        let reason = crate::voice::UnreachableReason::NoAnswer {
            candidates: 2,
            after: std::time::Duration::from_secs(10),
        };
        let state = |server_relays| {
            MemberLink::Peer(PeerState::Unreachable(crate::voice::Unreachable {
                direct: reason.clone(),
                server_relays,
                udp_blocked: false,
            }))
        };
        assert_eq!(
            link_state_text(&state(true)),
            "unreachable: no answer from 2 candidates after 10 s \
             (peer behind a symmetric NAT or offline?); no member nor the server could relay"
        );
        assert!(
            link_state_text(&state(false)).ends_with(
                "no member could relay, and this server does not relay \
                 (its operator can start it with --relay)"
            ),
            "says what to change when the server does not relay"
        );
        let blocked = MemberLink::Peer(PeerState::Unreachable(crate::voice::Unreachable {
            direct: reason.clone(),
            server_relays: false,
            udp_blocked: true,
        }));
        assert!(
            link_state_text(&blocked).contains("this network seems to block UDP"),
            "{}",
            link_state_text(&blocked)
        );
        let relayed = MemberLink::Peer(PeerState::Relayed(crate::voice::RelayVia::Member {
            user_id: 3,
            name: "carol".into(),
        }));
        assert_eq!(link_state_text(&relayed), "relayed via carol");
    }

    #[test]
    fn unmeasured_values_show_a_dash() {
        assert_eq!(format_measure(None, "ms"), "–");
        assert_eq!(format_measure(Some(23.4), "ms"), "23 ms");
    }

    #[test]
    fn details_show_link_numbers_and_fingerprint() {
        let mut member = MemberView::new(7, "bob");
        member.link = LinkView {
            state: MemberLink::Peer(PeerState::Direct(([192, 0, 2, 7], 7700).into())),
            rtt_ms: Some(42.0),
            loss_pct: Some(1.5),
            reported_loss_pct: Some(7.3),
            jitter_ms: Some(3.0),
            buffer_ms: Some(40.0),
        };
        member.fingerprint = Some("ab:cd:ef".into());
        let harness = Harness::new_ui(|ui| peer_details(ui, &member));
        harness.get_by_label("direct");
        harness.get_by_label("42 ms");
        harness.get_by_label("1.5 %");
        harness.get_by_label("Loss of your voice");
        harness.get_by_label("7.3 %");
        harness.get_by_label("40 ms");
        harness.get_by_label("ab:cd:ef");
    }

    #[test]
    fn details_chart_the_last_minute_of_loss_and_jitter() {
        let mut bob = MemberView::new(7, "bob");
        bob.link.state = MemberLink::Peer(PeerState::Direct(([192, 0, 2, 7], 7700).into()));
        let mut history = LinkHistory::default();
        for second in 0..30 {
            let loss = if second == 20 { 4.0 } else { 0.5 };
            history.push(Some((loss, 10.0 + second as f32 / 3.0)));
        }
        history.push(None); // a second without voice: a gap, not a zero
        bob.history = Some(history);
        let h = Harness::new_ui(|ui| peer_details(ui, &bob));
        h.get_by_label("Loss, last minute");
        h.get_by_label("loss, last minute, peak 4.0 %");
        h.get_by_label("Jitter, last minute");
        h.get_by_label("jitter, last minute, peak 20 ms");
        drop(h);
        // No history yet, or an empty one: no charts.
        let mut young = bob.clone();
        young.history = Some(LinkHistory::default());
        let h = Harness::new_ui(|ui| peer_details(ui, &young));
        assert!(h.query_by_label("Loss, last minute").is_none());
        let mut none = bob.clone();
        none.history = None;
        let h = Harness::new_ui(|ui| peer_details(ui, &none));
        assert!(h.query_by_label("Jitter, last minute").is_none());
    }

    #[test]
    fn details_show_our_fingerprint_and_a_peers_safety_number() {
        let mut me = MemberView::new(1, "alice");
        me.link.state = MemberLink::Local;
        me.identity = IdentityView::Own {
            fingerprint: "a1b2-c3d4".into(),
        };
        let h = Harness::new_ui(|ui| peer_details(ui, &me));
        h.get_by_label("Your identity");
        h.get_by_label("a1b2-c3d4");
        assert!(h.query_by_label("–").is_none(), "no empty fingerprint row");
        let mut bob = MemberView::new(2, "bob");
        bob.identity = IdentityView::Trusted {
            safety_number: "12345 67890".into(),
            verified: true,
        };
        let h = Harness::new_ui(|ui| peer_details(ui, &bob));
        h.get_by_label("Safety number");
        h.get_by_label("12345 67890");
        h.get_by_label("verified");
    }

    struct Clicked {
        member: MemberView,
        actions: Vec<UiAction>,
    }

    #[test]
    fn ticking_verified_asks_to_remember_the_mark() {
        let mut bob = MemberView::new(2, "bob");
        bob.identity = IdentityView::Trusted {
            safety_number: "12345".into(),
            verified: false,
        };
        let mut h = Harness::new_ui_state(
            |ui, s: &mut Clicked| {
                let actions = identity_controls(ui, &s.member);
                s.actions.extend(actions);
            },
            Clicked {
                member: bob,
                actions: Vec::new(),
            },
        );
        h.get_by_label("Verified").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::SetVerified {
                user_id: 2,
                verified: true
            }]
        );
    }

    #[test]
    fn a_changed_identity_gets_a_banner_whose_button_accepts_it() {
        let mut bob = MemberView::new(2, "bob");
        bob.identity = IdentityView::Changed {
            previous: "aaaa-bbbb".into(),
            presented: "cccc-dddd".into(),
            safety_number: Some("55555".into()),
        };
        let overview = OverviewView {
            channels: vec![crate::ui::view::ChannelView {
                id: 0,
                name: "Lobby".into(),
                has_password: false,
                members: vec![MemberView::new(1, "alice"), bob],
                max_members: None,
            }],
            my_channel: Some(0),
        };
        let alerts = identity_alerts(&overview);
        assert_eq!(alerts.len(), 1);
        let mut h = Harness::new_ui_state(
            |ui, s: &mut Vec<UiAction>| {
                let actions = identity_banner(ui, &alerts);
                s.extend(actions);
            },
            Vec::new(),
        );
        h.get_by_label_contains("bob's identity key changed (was aaaa-bbbb, now cccc-dddd)");
        h.get_by_label("New safety number: 55555");
        h.get_by_label("Accept new identity").click();
        h.run();
        assert_eq!(*h.state(), vec![UiAction::AcceptIdentity { user_id: 2 }]);
    }
}
