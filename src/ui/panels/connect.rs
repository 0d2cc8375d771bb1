//! The connect screen: server address and username with inline validation.

use egui::{Button, Grid, Key, Response, RichText, TextEdit, Ui};
use thiserror::Error;

use crate::protocol::{validate_username, UsernameError, MAX_USERNAME_CHARS};
use crate::ui::actions::UiAction;
use crate::ui::view::{ConnectView, TrustPrompt};

/// The panel's inline wording for a refused username: a hint next to the field, in the
/// imperative, where the server's [`UsernameError`] `Display` is a sentence about the name
/// (both tell the same rule; the rules themselves live in [`validate_username`]).
pub fn username_hint(error: &UsernameError) -> String {
    match error {
        UsernameError::Empty => "Enter a username".into(),
        UsernameError::TooLong(typed) => {
            format!("At most {MAX_USERNAME_CHARS} characters ({typed} typed)")
        }
        UsernameError::NotPrintable(_) => "Only printable characters are allowed".into(),
        UsernameError::SurroundingSpace => "No spaces at the start or end".into(),
        UsernameError::Invisible(c) => {
            format!("Remove the invisible character U+{:04X}", *c as u32)
        }
    }
}

/// Why a typed server address cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    /// Nothing typed.
    #[error("Enter an address like example.org:7700")]
    Empty,
    /// No `:port` part.
    #[error("Add a port, e.g. {0}:7700")]
    MissingPort(String),
    /// Host part empty or malformed.
    #[error("Missing host name before ':'")]
    MissingHost,
    /// IPv6 literal without brackets, e.g. `::1:7700`.
    #[error("Put IPv6 addresses in brackets, e.g. [::1]:7700")]
    UnbracketedIpv6,
    /// Port is not a number in 1..=65535.
    #[error("Port must be a number from 1 to 65535")]
    BadPort,
    /// Spaces inside the address.
    #[error("Addresses cannot contain spaces")]
    ContainsSpace,
}

/// Checks a `host:port` address (surrounding whitespace ignored); IPv6 hosts need brackets.
pub fn validate_server_address(address: &str) -> Result<(), AddressError> {
    let address = address.trim();
    if address.is_empty() {
        return Err(AddressError::Empty);
    }
    if address.contains(char::is_whitespace) {
        return Err(AddressError::ContainsSpace);
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(AddressError::MissingPort(address.to_owned()));
    };
    if host.is_empty() || host == "[]" {
        return Err(AddressError::MissingHost);
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.contains(':') && !bracketed {
        return Err(AddressError::UnbracketedIpv6);
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(AddressError::BadPort),
    }
}

/// Draws the connect form. Text fields are edited in place in `view`; returns
/// [`UiAction::Connect`] when the user clicks Connect or presses Enter with valid input.
pub fn connect(ui: &mut Ui, view: &mut ConnectView) -> Vec<UiAction> {
    let mut actions = Vec::new();
    let mut submit = false;
    let error_color = ui.visuals().error_fg_color;

    ui.heading("Connect to a server");
    ui.add_space(4.0);
    let mut address_ok = false;
    let mut username_ok = false;
    Grid::new("connect_form")
        .num_columns(3)
        .spacing([8.0, 6.0])
        .show(ui, |ui| {
            let label = ui.label("Server address");
            // add_sized: inside a Grid a TextEdit only gets the column's previous width.
            let field = ui
                .add_sized(
                    [220.0, 20.0],
                    TextEdit::singleline(&mut view.server_address)
                        .hint_text("host:7700")
                        .desired_width(220.0),
                )
                .labelled_by(label.id);
            submit |= enter_pressed(ui, &field);
            if field.changed() {
                view.address_problem = None;
            }
            let check = validate_server_address(&view.server_address);
            address_ok = check.is_ok();
            let message = match (&check, &view.address_problem) {
                (Err(AddressError::Empty), _) => None,
                (Err(e), _) => Some(e.to_string()),
                (Ok(()), problem) => problem.clone(),
            };
            error_cell(ui, message, error_color);
            ui.end_row();

            let label = ui.label("Username");
            let field = ui
                .add_sized(
                    [220.0, 20.0],
                    TextEdit::singleline(&mut view.username)
                        .hint_text("your name")
                        .char_limit(MAX_USERNAME_CHARS * 2)
                        .desired_width(220.0),
                )
                .labelled_by(label.id);
            submit |= enter_pressed(ui, &field);
            if field.changed() {
                view.refusal = None;
            }
            let check = validate_username(&view.username);
            username_ok = check.is_ok();
            let message = match (&check, &view.refusal) {
                (Err(UsernameError::Empty), _) => None,
                (Err(e), _) => Some(username_hint(e)),
                (Ok(()), refusal) => refusal.clone(),
            };
            error_cell(ui, message, error_color);
            ui.end_row();
        });

    if let Some(remembered) = view.remembered_username.clone() {
        let offer = !remembered.is_empty() && remembered != view.username;
        if offer
            && ui
                .small_button(format!("Use last name \"{remembered}\""))
                .clicked()
        {
            view.username = remembered;
            view.refusal = None;
            username_ok = validate_username(&view.username).is_ok();
        }
    }

    ui.add_space(4.0);
    let can_connect = address_ok && username_ok && !view.connecting;
    ui.horizontal(|ui| {
        let button = ui
            .add_enabled(can_connect, Button::new("Connect"))
            .on_disabled_hover_text(if view.connecting {
                "Already connecting"
            } else {
                "Fix the fields above first"
            });
        if button.clicked() {
            submit = true;
        }
        if view.connecting {
            ui.spinner();
            ui.label("Connecting…");
        }
    });

    if let Some(prompt) = view.trust_prompt.clone() {
        ui.add_space(8.0);
        actions.extend(trust_prompt(ui, &prompt, view));
    }

    if submit && can_connect {
        actions.push(UiAction::Connect {
            address: view.server_address.trim().to_owned(),
            username: view.username.clone(),
        });
    }
    actions
}

/// The server's certificate to check before trusting it, with both fingerprints when it
/// changed. Nothing is trusted until "Trust and connect" is clicked.
fn trust_prompt(ui: &mut Ui, prompt: &TrustPrompt, view: &ConnectView) -> Vec<UiAction> {
    let mut actions = Vec::new();
    ui.group(|ui| {
        match &prompt.pinned {
            None => {
                ui.strong("First connection to this server: check its identity");
                ui.label(
                    "Ask its operator for the certificate fingerprint the server printed at \
                     start, and compare it with this one before you trust it:",
                );
            }
            Some(pinned) => {
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    RichText::new("This server's certificate changed").strong(),
                );
                ui.label(
                    "It may have been reinstalled, or someone may be impersonating it. \
                     Trusted before:",
                );
                ui.monospace(pinned);
                ui.label("Presented now (compare it with its operator before you trust it):");
            }
        }
        ui.monospace(&prompt.presented);
        ui.horizontal(|ui| {
            if ui.button("Trust and connect").clicked() {
                actions.push(UiAction::TrustCertificate {
                    fingerprint: prompt.presented.clone(),
                    address: view.server_address.trim().to_owned(),
                    username: view.username.clone(),
                });
            }
            if ui.button("Don't trust").clicked() {
                actions.push(UiAction::DistrustCertificate);
            }
        });
    });
    actions
}

fn enter_pressed(ui: &Ui, field: &Response) -> bool {
    field.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter))
}

fn error_cell(ui: &mut Ui, message: Option<String>, color: egui::Color32) {
    match message {
        Some(text) => {
            ui.label(RichText::new(text).color(color));
        }
        None => {
            ui.label("");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui_kittest::{kittest::Queryable, Harness};

    struct State {
        view: ConnectView,
        actions: Vec<UiAction>,
    }

    fn harness(view: ConnectView) -> Harness<'static, State> {
        Harness::new_ui_state(
            |ui, state: &mut State| {
                let actions = connect(ui, &mut state.view);
                state.actions.extend(actions);
            },
            State {
                view,
                actions: Vec::new(),
            },
        )
    }

    /// Issue 13: the first connection shows the fingerprint and trusts nothing until asked;
    /// a changed certificate shows both fingerprints.
    #[test]
    fn a_new_or_changed_certificate_is_shown_and_trusted_only_on_request() {
        let mut view = ConnectView::new("example.org:7700", Some("alice".into()));
        view.trust_prompt = Some(TrustPrompt {
            presented: "AB:CD:EF".into(),
            pinned: None,
        });
        let mut h = harness(view);
        h.run();
        h.get_by_label("AB:CD:EF");
        assert!(h.state().actions.is_empty(), "nothing trusted by itself");
        h.get_by_label("Trust and connect").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::TrustCertificate {
                fingerprint: "AB:CD:EF".into(),
                address: "example.org:7700".into(),
                username: "alice".into(),
            }]
        );

        let mut view = ConnectView::new("example.org:7700", Some("alice".into()));
        view.trust_prompt = Some(TrustPrompt {
            presented: "11:22".into(),
            pinned: Some("AB:CD:EF".into()),
        });
        let mut h = harness(view);
        h.run();
        h.get_by_label("This server's certificate changed");
        h.get_by_label("AB:CD:EF");
        h.get_by_label("11:22");
        h.get_by_label("Don't trust").click();
        h.run();
        assert_eq!(h.state().actions, vec![UiAction::DistrustCertificate]);
    }

    #[test]
    fn username_rules_match_the_server() {
        assert_eq!(validate_username(""), Err(UsernameError::Empty));
        assert_eq!(validate_username("alice"), Ok(()));
        assert_eq!(validate_username("Ünïcødé name"), Ok(()));
        assert_eq!(validate_username(&"x".repeat(32)), Ok(()));
        assert_eq!(
            validate_username(&"x".repeat(33)),
            Err(UsernameError::TooLong(33))
        );
        assert_eq!(
            validate_username(" alice"),
            Err(UsernameError::SurroundingSpace)
        );
        assert_eq!(
            validate_username("alice "),
            Err(UsernameError::SurroundingSpace)
        );
        assert_eq!(
            validate_username("al\tice"),
            Err(UsernameError::NotPrintable('\t'))
        );
    }

    #[test]
    fn username_hints_speak_to_the_person_typing() {
        let hint = |name: &str| username_hint(&validate_username(name).unwrap_err());
        assert_eq!(hint(""), "Enter a username");
        assert_eq!(hint(&"x".repeat(33)), "At most 32 characters (33 typed)");
        assert_eq!(hint("al\tice"), "Only printable characters are allowed");
        assert_eq!(hint("alice "), "No spaces at the start or end");
    }

    #[test]
    fn address_needs_host_and_port_in_range() {
        assert_eq!(validate_server_address("example.org:7700"), Ok(()));
        assert_eq!(validate_server_address(" 10.0.0.1:1 "), Ok(()));
        assert_eq!(validate_server_address("[::1]:65535"), Ok(()));
        assert_eq!(validate_server_address(""), Err(AddressError::Empty));
        assert_eq!(
            validate_server_address("example.org"),
            Err(AddressError::MissingPort("example.org".into()))
        );
        assert_eq!(
            validate_server_address(":7700"),
            Err(AddressError::MissingHost)
        );
        assert_eq!(
            validate_server_address("::1:7700"),
            Err(AddressError::UnbracketedIpv6)
        );
        assert_eq!(
            validate_server_address("host:0"),
            Err(AddressError::BadPort)
        );
        assert_eq!(
            validate_server_address("host:65536"),
            Err(AddressError::BadPort)
        );
        assert_eq!(
            validate_server_address("host:abc"),
            Err(AddressError::BadPort)
        );
        assert_eq!(
            validate_server_address("my host:7700"),
            Err(AddressError::ContainsSpace)
        );
    }

    #[test]
    fn typed_values_and_connect_click_produce_connect_action() {
        let mut h = harness(ConnectView::default());
        h.get_by_label("Server address").click();
        h.run();
        h.get_by_label("Server address").type_text("127.0.0.1:7700");
        h.run();
        h.get_by_label("Username").click();
        h.run();
        h.get_by_label("Username").type_text("alice");
        h.run();
        h.get_by_label("Connect").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Connect {
                address: "127.0.0.1:7700".into(),
                username: "alice".into(),
            }]
        );
    }

    #[test]
    fn enter_in_username_field_submits() {
        let mut h = harness(ConnectView::new("localhost:7700", None));
        h.get_by_label("Username").click();
        h.run();
        h.get_by_label("Username").type_text("bob");
        h.run();
        h.key_press(Key::Enter);
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Connect {
                address: "localhost:7700".into(),
                username: "bob".into(),
            }]
        );
    }

    #[test]
    fn invalid_username_shows_inline_error_and_connect_does_nothing() {
        let mut view = ConnectView::new("localhost:7700", None);
        view.username = " alice".into();
        let mut h = harness(view);
        h.get_by_label("No spaces at the start or end");
        h.get_by_label("Connect").click();
        h.run();
        h.key_press(Key::Enter);
        h.run();
        assert!(h.state().actions.is_empty());
    }

    #[test]
    fn invalid_port_shows_inline_error_next_to_address() {
        let mut h = harness(ConnectView::new("localhost:99999", Some("carol".into())));
        h.get_by_label("Port must be a number from 1 to 65535");
        h.get_by_label("Connect").click();
        h.run();
        assert!(h.state().actions.is_empty());
    }

    #[test]
    fn server_refusal_is_shown_until_username_is_edited() {
        let mut view = ConnectView::new("localhost:7700", Some("alice".into()));
        view.refusal = Some("Name taken".into());
        let mut h = harness(view);
        h.get_by_label("Name taken");
        h.get_by_label("Username").click();
        h.run();
        h.key_press(Key::End);
        h.run();
        h.get_by_label("Username").type_text("2");
        h.run();
        assert!(h.query_by_label("Name taken").is_none());
        assert_eq!(h.state().view.username, "alice2");
        assert_eq!(h.state().view.refusal, None);
    }

    #[test]
    fn connect_is_disabled_while_connecting() {
        let mut view = ConnectView::new("localhost:7700", Some("alice".into()));
        view.connecting = true;
        let mut h = harness(view);
        h.get_by_label("Connecting…");
        h.get_by_label("Connect").click();
        // The spinner keeps requesting repaints, so step instead of running to rest.
        h.step();
        assert!(h.state().actions.is_empty());
    }

    #[test]
    fn remembered_name_can_be_filled_in() {
        let mut view = ConnectView::new("localhost:7700", Some("dave".into()));
        view.username.clear();
        let mut h = harness(view);
        h.get_by_label("Use last name \"dave\"").click();
        h.run();
        assert_eq!(h.state().view.username, "dave");
    }
}
