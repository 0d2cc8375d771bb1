//! The status bar: server connection, reconnect countdown, host address with copy, voice state,
//! and recent error messages with dismiss buttons.

use egui::{Color32, RichText, Ui};

use crate::ui::actions::UiAction;
use crate::ui::view::{ConnectionState, StatusView};

/// How many of the most recent errors the bar shows at once.
pub const MAX_SHOWN_ERRORS: usize = 3;

/// Human text for a connection state, e.g. "Reconnecting in 3 s".
pub fn connection_text(state: &ConnectionState) -> String {
    match state {
        ConnectionState::Connected => "Connected".to_owned(),
        ConnectionState::Connecting => "Connecting…".to_owned(),
        ConnectionState::Reconnecting { in_secs: 0 } => "Reconnecting…".to_owned(),
        ConnectionState::Reconnecting { in_secs } => format!("Reconnecting in {in_secs} s"),
        ConnectionState::Disconnected(reason) if reason.is_empty() => "Disconnected".to_owned(),
        ConnectionState::Disconnected(reason) => format!("Disconnected: {reason}"),
        ConnectionState::Idle => "Not connected".to_owned(),
    }
}

/// The first four groups of a fingerprint: enough to spot a change at a glance; the whole one
/// is in the hover text.
pub fn fingerprint_short(fp: &str) -> String {
    let groups: Vec<&str> = fp.split(':').take(4).collect();
    if groups.len() < 4 {
        return fp.to_owned();
    }
    format!("{}…", groups.join(":"))
}

fn connection_color(state: &ConnectionState) -> Color32 {
    match state {
        ConnectionState::Connected => Color32::from_rgb(60, 200, 90),
        ConnectionState::Connecting | ConnectionState::Reconnecting { .. } => {
            Color32::from_rgb(230, 170, 40)
        }
        ConnectionState::Disconnected(_) => Color32::from_rgb(220, 60, 60),
        ConnectionState::Idle => Color32::GRAY,
    }
}

/// Draws the status bar (meant for a bottom panel). Copying the host address goes straight to
/// the clipboard through egui; everything else is returned as actions (DismissError, ToggleHelp,
/// Disconnect).
pub fn status_bar(ui: &mut Ui, view: &StatusView) -> Vec<UiAction> {
    let mut actions = Vec::new();
    let error_color = ui.visuals().error_fg_color;
    let first_shown = view.errors.len().saturating_sub(MAX_SHOWN_ERRORS);
    for (index, message) in view.errors.iter().enumerate().skip(first_shown) {
        ui.push_id(("status_error", index), |ui| {
            ui.horizontal(|ui| {
                ui.label(RichText::new(format!("⚠ {message}")).color(error_color));
                if ui
                    .small_button("Dismiss")
                    .on_hover_text("Hide this message")
                    .clicked()
                {
                    actions.push(UiAction::DismissError(index));
                }
            });
        });
    }
    ui.horizontal(|ui| {
        ui.label(RichText::new("●").color(connection_color(&view.connection)));
        ui.label(connection_text(&view.connection));
        if let Some(address) = &view.host_address {
            ui.separator();
            ui.label("Others connect to");
            ui.monospace(address);
            if ui
                .small_button("Copy")
                .on_hover_text("Copy the address to the clipboard")
                .clicked()
            {
                ui.ctx().copy_text(address.clone());
            }
        }
        if let Some(fp) = &view.server_fingerprint {
            ui.separator();
            ui.label(format!("🔒 {}", fingerprint_short(fp)))
                .on_hover_text(format!(
                    "Server certificate {fp}\nPinned the first time you connected: compare it \
                 with the server's operator to be sure nobody sits in between."
                ));
        }
        if !view.voice_state.is_empty() {
            ui.separator();
            ui.label(&view.voice_state);
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui
                .small_button("Help")
                .on_hover_text("Shortcuts (F1)")
                .clicked()
            {
                actions.push(UiAction::ToggleHelp);
            }
            if matches!(
                view.connection,
                ConnectionState::Connected
                    | ConnectionState::Connecting
                    | ConnectionState::Reconnecting { .. }
            ) && ui.small_button("Disconnect").clicked()
            {
                actions.push(UiAction::Disconnect);
            }
        });
    });
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui::OutputCommand;
    use egui_kittest::{kittest::Queryable, Harness};

    struct State {
        view: StatusView,
        actions: Vec<UiAction>,
    }

    fn harness(view: StatusView) -> Harness<'static, State> {
        Harness::builder()
            .with_size(egui::Vec2::new(900.0, 120.0))
            .build_ui_state(
                |ui, state: &mut State| {
                    let actions = status_bar(ui, &state.view);
                    state.actions.extend(actions);
                },
                State {
                    view,
                    actions: Vec::new(),
                },
            )
    }

    #[test]
    fn reconnecting_shows_countdown() {
        let h = harness(StatusView {
            connection: ConnectionState::Reconnecting { in_secs: 3 },
            ..StatusView::default()
        });
        h.get_by_label("Reconnecting in 3 s");
    }

    #[test]
    fn the_server_fingerprint_is_shown_while_connected() {
        let h = harness(StatusView {
            connection: ConnectionState::Connected,
            server_fingerprint: Some("AB:CD:EF:01:23:45:67:89".into()),
            ..StatusView::default()
        });
        h.get_by_label("🔒 AB:CD:EF:01…");
        assert_eq!(fingerprint_short("AB:CD"), "AB:CD");
    }

    #[test]
    fn disconnected_shows_reason() {
        assert_eq!(
            connection_text(&ConnectionState::Disconnected(
                "server closed the connection".into()
            )),
            "Disconnected: server closed the connection"
        );
        assert_eq!(connection_text(&ConnectionState::Connected), "Connected");
    }

    #[test]
    fn errors_are_shown_and_dismiss_returns_their_index() {
        let mut h = harness(StatusView {
            errors: vec![
                "old one".into(),
                "could not open microphone".into(),
                "peer bob unreachable".into(),
                "wrong password for channel Private".into(),
            ],
            ..StatusView::default()
        });
        // Only the latest three are shown.
        assert!(h.query_by_label_contains("old one").is_none());
        h.get_by_label("⚠ could not open microphone");
        h.get_by_label("⚠ wrong password for channel Private");
        let dismiss: Vec<_> = h.get_all_by_label("Dismiss").collect();
        assert_eq!(dismiss.len(), 3);
        dismiss[0].click();
        h.run();
        assert_eq!(h.state().actions, vec![UiAction::DismissError(1)]);
    }

    #[test]
    fn host_address_copy_button_puts_it_on_the_clipboard() {
        let mut h = harness(StatusView {
            connection: ConnectionState::Connected,
            host_address: Some("192.168.1.20:7700".into()),
            voice_state: "2 peers, 2 direct".into(),
            ..StatusView::default()
        });
        h.get_by_label("192.168.1.20:7700");
        h.get_by_label("2 peers, 2 direct");
        assert!(
            h.query_by_label_contains("🔒").is_none(),
            "no fingerprint, no lock"
        );
        h.get_by_label("Copy").click();
        // One frame per queued event; the last one (button release) is the click frame.
        h.step();
        let copied = h
            .output()
            .platform_output
            .commands
            .iter()
            .any(|c| matches!(c, OutputCommand::CopyText(t) if t == "192.168.1.20:7700"));
        assert!(copied, "{:?}", h.output().platform_output.commands);
    }

    #[test]
    fn help_and_disconnect_buttons_emit_actions() {
        let mut h = harness(StatusView {
            connection: ConnectionState::Connected,
            ..StatusView::default()
        });
        h.get_by_label("Help").click();
        h.run();
        h.get_by_label("Disconnect").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::ToggleHelp, UiAction::Disconnect]
        );
    }
}
