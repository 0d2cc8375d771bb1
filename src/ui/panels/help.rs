//! Keyboard shortcuts: the help window listing them and the function that turns key presses into
//! actions.

use egui::{Context, Event, Grid, Key, Window};

use crate::ui::actions::UiAction;
use crate::ui::view::ControlsView;
use crate::voice::VoiceSetting;

/// Default push-to-talk key name (an egui key name, see `egui::Key::from_name`).
pub const DEFAULT_PTT_KEY: &str = "Space";

/// One line of the help window: the key(s) and what they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortcut {
    /// Key label as shown, e.g. "F1".
    pub keys: String,
    /// What the key does.
    pub action: String,
}

/// The shortcuts [`keyboard_shortcuts`] implements, with the configured push-to-talk key.
pub fn default_shortcuts(ptt_key: &str) -> Vec<Shortcut> {
    let ptt = if ptt_key.is_empty() {
        DEFAULT_PTT_KEY
    } else {
        ptt_key
    };
    [
        ("M", "Mute / unmute microphone"),
        ("D", "Deafen / undeafen"),
        (ptt, "Push-to-talk (hold, when enabled)"),
        ("F1", "Show / hide this help"),
        ("F3", "Show / hide performance overlay"),
        ("Enter", "Submit the focused form"),
        ("Esc", "Close the password prompt"),
    ]
    .into_iter()
    .map(|(keys, action)| Shortcut {
        keys: keys.to_owned(),
        action: action.to_owned(),
    })
    .collect()
}

/// Draws the help window; call it only while help is shown. Closing it with its ✕ returns
/// [`UiAction::ToggleHelp`].
pub fn help_window(ctx: &Context, shortcuts: &[Shortcut]) -> Vec<UiAction> {
    let mut open = true;
    Window::new("Keyboard shortcuts")
        .open(&mut open)
        .collapsible(false)
        .resizable(false)
        .show(ctx, |ui| {
            Grid::new("shortcuts")
                .num_columns(2)
                .striped(true)
                .show(ui, |ui| {
                    for shortcut in shortcuts {
                        ui.monospace(&shortcut.keys);
                        ui.label(&shortcut.action);
                        ui.end_row();
                    }
                });
        });
    if open {
        Vec::new()
    } else {
        vec![UiAction::ToggleHelp]
    }
}

/// Turns this frame's key events into actions: M mute, D deafen, F1 help, F3 perf overlay and,
/// when push-to-talk is on, press/release of the push-to-talk key.
///
/// Letter shortcuts are ignored while a text field has keyboard focus (typing a username with an
/// "m" must not mute); the function keys and the push-to-talk release always work. Key repeats
/// are ignored.
pub fn keyboard_shortcuts(ctx: &Context, controls: &ControlsView) -> Vec<UiAction> {
    if controls.choosing_ptt_key {
        return chosen_ptt_key(ctx).into_iter().collect();
    }
    let typing = ctx.wants_keyboard_input();
    let ptt_key = controls
        .ptt_enabled
        .then(|| Key::from_name(&controls.ptt_key).or(Key::from_name(DEFAULT_PTT_KEY)))
        .flatten();
    let mut actions = Vec::new();
    ctx.input(|input| {
        for event in &input.events {
            let Event::Key {
                key,
                pressed,
                repeat: false,
                modifiers,
                ..
            } = event
            else {
                continue;
            };
            if Some(*key) == ptt_key && (!typing || !*pressed) {
                actions.push(UiAction::Voice(VoiceSetting::PttPressed(*pressed)));
                continue;
            }
            if !*pressed || modifiers.any() {
                continue;
            }
            match key {
                Key::F1 => actions.push(UiAction::ToggleHelp),
                Key::F3 => actions.push(UiAction::TogglePerfOverlay),
                Key::M if !typing => {
                    actions.push(UiAction::Voice(VoiceSetting::Muted(!controls.muted)))
                }
                Key::D if !typing => {
                    actions.push(UiAction::Voice(VoiceSetting::Deafened(!controls.deafened)))
                }
                _ => {}
            }
        }
    });
    actions
}

/// While the push-to-talk key is being chosen: the first key pressed (with no modifier)
/// becomes it, Escape cancels; no other shortcut acts meanwhile.
fn chosen_ptt_key(ctx: &Context) -> Option<UiAction> {
    ctx.input(|input| {
        input.events.iter().find_map(|event| match event {
            Event::Key {
                key: Key::Escape,
                pressed: true,
                ..
            } => Some(UiAction::ChoosePttKey(false)),
            Event::Key {
                key,
                pressed: true,
                repeat: false,
                modifiers,
                ..
            } if !modifiers.any() => Some(UiAction::SetPttKey(key.name().to_owned())),
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui::CentralPanel;
    use egui_kittest::{kittest::Queryable, Harness};

    struct State {
        controls: ControlsView,
        text: String,
        show_field: bool,
        actions: Vec<UiAction>,
    }

    fn harness(controls: ControlsView, show_field: bool) -> Harness<'static, State> {
        Harness::new_state(
            |ctx, state: &mut State| {
                if state.show_field {
                    CentralPanel::default().show(ctx, |ui| {
                        let label = ui.label("Name");
                        ui.text_edit_singleline(&mut state.text)
                            .labelled_by(label.id);
                    });
                }
                let actions = keyboard_shortcuts(ctx, &state.controls);
                state.actions.extend(actions);
            },
            State {
                controls,
                text: String::new(),
                show_field,
                actions: Vec::new(),
            },
        )
    }

    #[test]
    fn letter_and_function_keys_map_to_actions() {
        let mut h = harness(ControlsView::default(), false);
        for key in [Key::M, Key::D, Key::F1, Key::F3] {
            h.key_press(key);
            h.run();
        }
        assert_eq!(
            h.state().actions,
            vec![
                UiAction::Voice(VoiceSetting::Muted(true)),
                UiAction::Voice(VoiceSetting::Deafened(true)),
                UiAction::ToggleHelp,
                UiAction::TogglePerfOverlay
            ]
        );
    }

    #[test]
    fn mute_shortcut_unmutes_when_muted() {
        let mut h = harness(
            ControlsView {
                muted: true,
                ..ControlsView::default()
            },
            false,
        );
        h.key_press(Key::M);
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::Muted(false))]
        );
    }

    #[test]
    fn letters_typed_into_a_text_field_are_not_shortcuts() {
        let mut h = harness(ControlsView::default(), true);
        h.get_by_label("Name").click();
        h.run();
        h.key_press(Key::M);
        h.run();
        assert!(h.state().actions.is_empty(), "{:?}", h.state().actions);
    }

    #[test]
    fn push_to_talk_key_reports_press_and_release_only_when_enabled() {
        let ptt = ControlsView {
            ptt_enabled: true,
            ptt_key: "Space".into(),
            ..ControlsView::default()
        };
        let mut h = harness(ptt, false);
        h.key_down(Key::Space);
        h.run();
        h.key_up(Key::Space);
        h.run();
        assert_eq!(
            h.state().actions,
            vec![
                UiAction::Voice(VoiceSetting::PttPressed(true)),
                UiAction::Voice(VoiceSetting::PttPressed(false))
            ]
        );

        let mut h = harness(ControlsView::default(), false);
        h.key_press(Key::Space);
        h.run();
        assert!(h.state().actions.is_empty());
    }

    #[test]
    fn while_choosing_the_key_the_next_key_is_taken_and_shortcuts_rest() {
        let choosing = ControlsView {
            ptt_enabled: true,
            ptt_key: "Space".into(),
            choosing_ptt_key: true,
            ..ControlsView::default()
        };
        let mut h = harness(choosing.clone(), false);
        h.key_press(Key::F9);
        h.run();
        assert_eq!(
            h.state().actions.first(),
            Some(&UiAction::SetPttKey("F9".into())),
            "{:?}",
            h.state().actions
        );
        // M would mute in the normal mode: here it is the new key, not a mute.
        let mut h = harness(choosing.clone(), false);
        h.key_press(Key::M);
        h.run();
        assert_eq!(
            h.state().actions.first(),
            Some(&UiAction::SetPttKey("M".into()))
        );
        let mut h = harness(choosing, false);
        h.key_press(Key::Escape);
        h.run();
        assert_eq!(
            h.state().actions.first(),
            Some(&UiAction::ChoosePttKey(false))
        );
    }

    #[test]
    fn help_lists_shortcuts_and_close_toggles_help() {
        let shortcuts = default_shortcuts("Space");
        let mut h = Harness::new_state(
            |ctx, actions: &mut Vec<UiAction>| {
                actions.extend(help_window(ctx, &shortcuts));
            },
            Vec::new(),
        );
        h.get_by_label("Mute / unmute microphone");
        h.get_by_label("Show / hide performance overlay");
        h.get_by_label("Space");
        h.get_by_label("Close window").click();
        h.run();
        assert_eq!(h.state(), &vec![UiAction::ToggleHelp]);
    }
}
