//! Modal password prompt for joining a protected channel.

use egui::{Button, Context, Id, Key, Modal, RichText, TextEdit};

use crate::protocol::Password;
use crate::ui::actions::UiAction;
use crate::ui::view::PasswordPromptView;

/// Draws the modal prompt while the UI plugin keeps a [`PasswordPromptView`] around.
///
/// The password is edited in place. Returns [`UiAction::SubmitPassword`] on Join / Enter, and
/// [`UiAction::CancelPassword`] on Cancel, Escape or a click outside the dialog. The server's
/// answer ("Wrong password") is shown from `view.error`, so the user can retry.
pub fn password_prompt(ctx: &Context, view: &mut PasswordPromptView) -> Vec<UiAction> {
    let mut actions = Vec::new();
    let response = Modal::new(Id::new(("password_prompt", view.channel_id))).show(ctx, |ui| {
        ui.set_min_width(260.0);
        ui.heading(format!("Join {}", view.channel_name));
        ui.add_space(4.0);
        let label = ui.label("Password");
        let field = ui
            .add(
                TextEdit::singleline(&mut view.password)
                    .password(true)
                    .desired_width(240.0),
            )
            .labelled_by(label.id);
        if ui.memory(|m| m.focused().is_none()) && !field.lost_focus() {
            field.request_focus();
        }
        let mut submit = field.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
        if let Some(error) = &view.error {
            ui.label(RichText::new(error).color(ui.visuals().error_fg_color));
        }
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            if ui.add_enabled(!view.pending, Button::new("Join")).clicked() {
                submit = true;
            }
            if ui.button("Cancel").clicked() {
                actions.push(UiAction::CancelPassword);
            }
            if view.pending {
                ui.spinner();
            }
        });
        if submit && !view.pending {
            actions.push(UiAction::SubmitPassword {
                channel_id: view.channel_id,
                password: Password::take_from(&mut view.password),
            });
        }
    });
    if response.should_close() && !actions.contains(&UiAction::CancelPassword) {
        actions.push(UiAction::CancelPassword);
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui_kittest::{kittest::Queryable, Harness};

    struct State {
        view: PasswordPromptView,
        actions: Vec<UiAction>,
    }

    fn harness(view: PasswordPromptView) -> Harness<'static, State> {
        Harness::new_state(
            |ctx, state: &mut State| {
                let actions = password_prompt(ctx, &mut state.view);
                state.actions.extend(actions);
            },
            State {
                view,
                actions: Vec::new(),
            },
        )
    }

    fn prompt() -> PasswordPromptView {
        PasswordPromptView {
            channel_id: 4,
            channel_name: "Private".into(),
            ..PasswordPromptView::default()
        }
    }

    #[test]
    fn typed_password_and_join_click_submit_it() {
        let mut h = harness(prompt());
        h.get_by_label("Join Private");
        h.get_by_label("Password").type_text("hunter3");
        h.run();
        h.get_by_label("Join").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::SubmitPassword {
                channel_id: 4,
                password: "hunter3".into()
            }]
        );
    }

    #[test]
    fn password_field_is_focused_and_enter_submits() {
        let mut h = harness(prompt());
        assert!(h.get_by_label("Password").is_focused());
        h.get_by_label("Password").type_text("pw");
        h.run();
        h.key_press(Key::Enter);
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::SubmitPassword {
                channel_id: 4,
                password: "pw".into()
            }]
        );
    }

    #[test]
    fn password_is_masked_on_screen() {
        let mut h = harness(prompt());
        h.get_by_label("Password").type_text("secret");
        h.run();
        assert!(h.query_by_value("secret").is_none());
        assert!(h.query_by_label_contains("secret").is_none());
    }

    #[test]
    fn wrong_password_error_is_shown_and_retry_is_possible() {
        let mut view = prompt();
        view.password = "wrong".into();
        view.error = Some("Wrong password".into());
        let mut h = harness(view);
        h.get_by_label("Wrong password");
        h.get_by_label("Join").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::SubmitPassword {
                channel_id: 4,
                password: "wrong".into()
            }]
        );
    }

    #[test]
    fn cancel_click_emits_cancel_password() {
        let mut h = harness(prompt());
        h.get_by_label("Cancel").click();
        h.run();
        assert_eq!(h.state().actions, vec![UiAction::CancelPassword]);
    }

    #[test]
    fn escape_cancels() {
        let mut h = harness(prompt());
        h.key_press(Key::Escape);
        h.run();
        assert!(h.state().actions.contains(&UiAction::CancelPassword));
    }

    #[test]
    fn join_is_disabled_while_pending() {
        let mut view = prompt();
        view.pending = true;
        let mut h = harness(view);
        h.get_by_label("Join").click();
        // The spinner keeps requesting repaints, so step instead of running to rest.
        h.step();
        assert!(h.state().actions.is_empty());
    }
}
