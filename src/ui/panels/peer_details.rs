//! Link details of one channel member: state, round trip, loss both ways, jitter, buffer delay,
//! fingerprint.
//! Shown as the hover tooltip of a member in the overview.

use egui::{Color32, Grid, Ui};

use crate::ui::view::{MemberLink, MemberView};
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
pub fn link_color(state: &MemberLink) -> Color32 {
    match state {
        MemberLink::Peer(PeerState::Direct(_)) => Color32::from_rgb(60, 200, 90),
        MemberLink::Peer(PeerState::Relayed(_)) => Color32::from_rgb(60, 170, 200),
        MemberLink::Peer(PeerState::Punching) => Color32::from_rgb(230, 170, 40),
        MemberLink::Peer(PeerState::Unreachable(_)) => Color32::from_rgb(220, 60, 60),
        MemberLink::Local | MemberLink::OtherChannel => Color32::GRAY,
    }
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
            }
            ui.label("Fingerprint");
            ui.monospace(member.fingerprint.as_deref().unwrap_or("–"));
            ui.end_row();
        });
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
}
