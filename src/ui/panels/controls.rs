//! Local audio controls: mute, deafen, push-to-talk, noise suppression, device pickers and the
//! own input meter with the voice-activity threshold.

use egui::{ComboBox, Slider, Ui, Vec2};

use super::meters::{db_meter_with_threshold, METER_FLOOR_DB};
use crate::ui::actions::UiAction;
use crate::ui::view::ControlsView;
use crate::voice::{EchoTestResult, EchoTestStatus, EchoVerdict, VoiceSetting};

/// Text shown in a device picker when no specific device is chosen.
pub const SYSTEM_DEFAULT_DEVICE: &str = "System default";

/// Draws the controls. Every change is returned as an action; the view itself is read-only
/// because it mirrors settings owned elsewhere.
pub fn controls(ui: &mut Ui, view: &ControlsView) -> Vec<UiAction> {
    let mut actions = Vec::new();

    ui.horizontal(|ui| {
        let mut muted = view.muted;
        if ui
            .checkbox(&mut muted, "Mute")
            .on_hover_text("Stop sending your voice (M)")
            .changed()
        {
            actions.push(UiAction::Voice(VoiceSetting::Muted(muted)));
        }
        let mut deafened = view.deafened;
        if ui
            .checkbox(&mut deafened, "Deafen")
            .on_hover_text("Stop hearing others (D)")
            .changed()
        {
            actions.push(UiAction::Voice(VoiceSetting::Deafened(deafened)));
        }
    });
    if view.muted && view.talking_while_muted {
        muted_hint(ui, &mut actions);
    }

    let mut ptt = view.ptt_enabled;
    let ptt_label = if view.ptt_key.is_empty() {
        "Push-to-talk".to_owned()
    } else {
        format!("Push-to-talk ({})", view.ptt_key)
    };
    if ui
        .checkbox(&mut ptt, ptt_label)
        .on_hover_text("Send only while the key is held")
        .changed()
    {
        actions.push(UiAction::Voice(VoiceSetting::PushToTalk(ptt)));
    }
    if view.ptt_enabled {
        push_to_talk_key(ui, view, &mut actions);
    }
    microphone_processing(ui, view, &mut actions);
    let mut even = view.normalize_loudness;
    if ui
        .checkbox(&mut even, "Even out speakers' loudness")
        .on_hover_text("Bring quiet and loud speakers to the same level, before each one's volume")
        .changed()
    {
        actions.push(UiAction::Voice(VoiceSetting::NormalizeLoudness(even)));
    }
    let mut sounds = view.sounds;
    if ui
        .checkbox(&mut sounds, "Sounds")
        .on_hover_text("A short sound when someone joins or leaves, and when you mute or unmute")
        .changed()
    {
        actions.push(UiAction::Voice(VoiceSetting::Sounds(sounds)));
    }

    ui.add_space(4.0);
    if let Some(name) = device_picker(
        ui,
        "Input device",
        &view.input_devices,
        view.selected_input.as_deref(),
    ) {
        actions.push(UiAction::SelectInput(name));
    }
    if let Some(name) = device_picker(
        ui,
        "Output device",
        &view.output_devices,
        view.selected_output.as_deref(),
    ) {
        actions.push(UiAction::SelectOutput(name));
    }

    ui.add_space(4.0);
    let label = if view.mic_test {
        "Stop the microphone test"
    } else {
        "Test microphone"
    };
    if ui
        .selectable_label(view.mic_test, label)
        .on_hover_text(
            "Hear yourself as the others hear you: through the whole capture chain, the voice \
             threshold and the codec. Works before you join a call.",
        )
        .clicked()
    {
        actions.push(UiAction::Voice(VoiceSetting::MicTest(!view.mic_test)));
    }
    echo_test(ui, view, &mut actions);
    ui.label(if view.speaking {
        "Input level (speaking)"
    } else {
        "Input level"
    });
    let width = ui.available_width().clamp(80.0, 240.0);
    db_meter_with_threshold(
        ui,
        view.input_level_db,
        view.vad_threshold_db,
        view.speaking,
        Vec2::new(width, 10.0),
    );
    let mut threshold = view.vad_threshold_db.clamp(METER_FLOOR_DB, 0.0);
    if ui
        .add(
            Slider::new(&mut threshold, METER_FLOOR_DB..=0.0)
                .step_by(1.0)
                .suffix(" dB")
                .text("Voice threshold"),
        )
        .changed()
    {
        actions.push(UiAction::Voice(VoiceSetting::VadThreshold(threshold)));
    }
    actions
}

/// The words shown while the voice detector hears us talk into a muted microphone.
pub const MUTED_HINT: &str = "You are muted: nobody hears you";

/// "You are muted", in the warning colour, with a button to unmute right there: people who
/// talk into a muted microphone look at the window to find out why nobody answers.
fn muted_hint(ui: &mut Ui, actions: &mut Vec<UiAction>) {
    ui.horizontal(|ui| {
        ui.label(egui::RichText::new(format!("🎤 {MUTED_HINT}")).color(ui.visuals().warn_fg_color));
        if ui
            .small_button("Unmute")
            .on_hover_text("Send your voice again (M)")
            .clicked()
        {
            actions.push(UiAction::Voice(VoiceSetting::Muted(false)));
        }
    });
}

/// The echo test's button, its progress while it runs and what it found.
fn echo_test(ui: &mut egui::Ui, view: &ControlsView, actions: &mut Vec<UiAction>) {
    let running = match view.echo_test {
        Some(EchoTestStatus::Running(p)) => Some(p),
        _ => None,
    };
    let label = if running.is_some() {
        "Stop the echo test"
    } else {
        "Echo test"
    };
    if ui
        .selectable_label(running.is_some(), label)
        .on_hover_text(
            "Plays a test sound through your speakers for a few seconds and measures how much \
             of it your microphone picks up, and how much the echo canceller takes out",
        )
        .clicked()
    {
        actions.push(UiAction::Voice(VoiceSetting::EchoTest(running.is_none())));
    }
    match view.echo_test {
        Some(EchoTestStatus::Running(p)) => {
            let doing = if p < 0.13 {
                "Listening to the room"
            } else {
                "Playing a test sound"
            };
            ui.add(egui::ProgressBar::new(p).text(doing).desired_width(200.0));
        }
        Some(EchoTestStatus::Done(result)) => {
            let text = echo_test_summary(&result);
            let text = match result.verdict {
                EchoVerdict::Remains => egui::RichText::new(text).color(ui.visuals().warn_fg_color),
                _ => egui::RichText::new(text),
            };
            ui.label(text);
        }
        None => {}
    }
}

/// What the echo test found, in words and figures.
pub fn echo_test_summary(r: &EchoTestResult) -> String {
    match r.verdict {
        EchoVerdict::NoEcho => "Echo test: your microphone does not hear your speakers \
                                (headphones?), so there is no echo to cancel."
            .to_owned(),
        EchoVerdict::Cancelled => format!(
            "Echo test: your microphone hears your speakers at {:.0} dB; the echo canceller \
             takes out {:.0} dB, down to the room's background. Others won't hear themselves.",
            r.coupling_db(),
            r.removed_db()
        ),
        EchoVerdict::Remains if !r.echo_cancellation => format!(
            "Echo test: your microphone hears your speakers at {:.0} dB and echo cancellation \
             is off: others hear themselves. Turn it on or use headphones.",
            r.coupling_db()
        ),
        EchoVerdict::Remains => format!(
            "Echo test: your microphone hears your speakers at {:.0} dB; the echo canceller \
             takes out only {:.0} dB, so others may hear themselves. Turn the speakers down or \
             use headphones.",
            r.coupling_db(),
            r.removed_db()
        ),
    }
}

/// The push-to-talk key and where it works: a button that takes the next key pressed, the
/// "outside this window" switch, and a line saying where the key works and why.
fn push_to_talk_key(ui: &mut egui::Ui, view: &ControlsView, actions: &mut Vec<UiAction>) {
    ui.indent("ptt", |ui| {
        ui.horizontal(|ui| {
            ui.label("Key:");
            let text = if view.choosing_ptt_key {
                "Press a key (Esc cancels)".to_owned()
            } else {
                view.ptt_key.clone()
            };
            if ui
                .selectable_label(view.choosing_ptt_key, text)
                .on_hover_text("Click, then press the key to hold while you talk")
                .clicked()
            {
                actions.push(UiAction::ChoosePttKey(!view.choosing_ptt_key));
            }
        });
        let mut outside = view.ptt_outside_window;
        if ui
            .checkbox(&mut outside, "Also while other windows have focus")
            .on_hover_text(
                "The key is taken from other applications while push-to-talk is on, so only \
                 function keys and Insert can be used this way",
            )
            .changed()
        {
            actions.push(UiAction::SetPttOutsideWindow(outside));
        }
        if let Some(hint) = view.ptt_scope.hint(&view.ptt_key) {
            ui.label(egui::RichText::new(hint).small().weak());
        }
    });
}

/// One capture stage's checkbox: whether it is on, its label, its hover text, its setting.
type Stage<'a> = (bool, &'a str, &'a str, fn(bool) -> VoiceSetting);

/// The capture chain's stages, in the order they run, each with a checkbox.
fn microphone_processing(ui: &mut egui::Ui, view: &ControlsView, actions: &mut Vec<UiAction>) {
    // Only the delay is shown: AEC3's own ERLE figure reads near 0 dB on calls where the
    // echo is fully removed (its linear filter's estimate, not what reaches the others).
    let echo_hint = match view.echo {
        Some((_, delay)) if view.echo_cancellation => format!(
            "Takes what your speaker plays out of your microphone, so others don't hear \
             themselves (speaker-to-microphone delay found: {delay} ms)"
        ),
        _ => "Takes what your speaker plays out of your microphone, so others don't hear \
              themselves"
            .to_owned(),
    };
    let stages: [Stage; 4] = [
        (
            view.high_pass,
            "Low-cut filter",
            "Removes rumble and hum below about 80 Hz",
            VoiceSetting::HighPass,
        ),
        (
            view.echo_cancellation,
            "Echo cancellation",
            &echo_hint,
            VoiceSetting::EchoCancellation,
        ),
        (
            view.noise_suppression,
            "Noise suppression",
            "Removes steady background noise (fans, hiss, traffic)",
            VoiceSetting::NoiseSuppression,
        ),
        (
            view.gain_control,
            "Automatic gain",
            "Keeps your voice at a steady level, however close you are to the microphone",
            VoiceSetting::GainControl,
        ),
    ];
    for (on, label, hint, setting) in stages {
        let mut on = on;
        if ui.checkbox(&mut on, label).on_hover_text(hint).changed() {
            actions.push(UiAction::Voice(setting(on)));
        }
    }
}

/// A combo box listing `devices`; returns the name the user picked, if it differs.
fn device_picker(
    ui: &mut Ui,
    label: &str,
    devices: &[String],
    selected: Option<&str>,
) -> Option<String> {
    let mut picked = None;
    ComboBox::from_label(label)
        .selected_text(selected.unwrap_or(SYSTEM_DEFAULT_DEVICE))
        .width(200.0)
        .show_ui(ui, |ui| {
            if devices.is_empty() {
                ui.weak("No devices found");
            }
            for name in devices {
                let is_selected = selected == Some(name.as_str());
                if ui.selectable_label(is_selected, name).clicked() && !is_selected {
                    picked = Some(name.clone());
                }
            }
        });
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui::accesskit::Role;
    use egui_kittest::{kittest::Queryable, Harness};

    struct State {
        view: ControlsView,
        actions: Vec<UiAction>,
    }

    fn harness(view: ControlsView) -> Harness<'static, State> {
        Harness::builder()
            .with_size(Vec2::new(400.0, 500.0))
            .build_ui_state(
                |ui, state: &mut State| {
                    let actions = controls(ui, &state.view);
                    state.actions.extend(actions);
                },
                State {
                    view,
                    actions: Vec::new(),
                },
            )
    }

    fn view() -> ControlsView {
        ControlsView {
            ptt_key: "Space".into(),
            input_devices: vec!["Built-in Mic".into(), "USB Headset".into()],
            output_devices: vec!["Speakers".into()],
            selected_input: Some("Built-in Mic".into()),
            input_level_db: -20.0,
            vad_threshold_db: -40.0,
            speaking: true,
            ..ControlsView::default()
        }
    }

    /// Issue 14 item 4: the microphone test starts and stops from one button whose label says
    /// which it will do.
    #[test]
    fn the_microphone_test_button_starts_and_stops_the_test() {
        let mut h = harness(view());
        h.get_by_label("Test microphone").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::MicTest(true))]
        );
        let mut on = view();
        on.mic_test = true;
        let mut h = harness(on);
        assert!(h.query_by_label("Test microphone").is_none());
        h.get_by_label("Stop the microphone test").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::MicTest(false))]
        );
    }

    /// Issue 14 item 6: talking into a muted microphone shows the hint, whose button
    /// unmutes; not muted, or muted and silent, no hint.
    #[test]
    fn talking_while_muted_shows_the_hint_and_its_button_unmutes() {
        let mut v = view();
        v.muted = true;
        v.talking_while_muted = true;
        let mut h = harness(v.clone());
        h.get_by_label_contains(MUTED_HINT);
        h.get_by_label("Unmute").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::Muted(false))]
        );
        v.talking_while_muted = false;
        assert!(harness(v.clone())
            .query_by_label_contains(MUTED_HINT)
            .is_none());
        v.muted = false;
        v.talking_while_muted = true;
        assert!(harness(v).query_by_label_contains(MUTED_HINT).is_none());
    }

    #[test]
    fn the_sounds_checkbox_turns_the_sounds_off_and_on() {
        let mut v = view();
        v.sounds = true;
        let mut h = harness(v);
        h.get_by_label("Sounds").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::Sounds(false))]
        );
    }

    #[test]
    fn mute_toggle_emits_set_mute_true() {
        let mut h = harness(view());
        h.get_by_label("Mute").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::Muted(true))]
        );
    }

    #[test]
    fn unmute_when_muted_emits_set_mute_false() {
        let mut v = view();
        v.muted = true;
        let mut h = harness(v);
        h.get_by_label("Mute").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::Muted(false))]
        );
    }

    #[test]
    fn toggles_emit_deafen_ptt_loudness_and_each_capture_stage() {
        let mut h = harness(view());
        h.get_by_label("Deafen").click();
        h.run();
        h.get_by_label("Push-to-talk (Space)").click();
        h.run();
        h.get_by_label("Noise suppression").click();
        h.run();
        h.get_by_label("Even out speakers' loudness").click();
        h.run();
        for stage in ["Low-cut filter", "Echo cancellation", "Automatic gain"] {
            h.get_by_label(stage).click();
            h.run();
        }
        assert_eq!(
            h.state().actions,
            vec![
                UiAction::Voice(VoiceSetting::Deafened(true)),
                UiAction::Voice(VoiceSetting::PushToTalk(true)),
                UiAction::Voice(VoiceSetting::NoiseSuppression(true)),
                UiAction::Voice(VoiceSetting::NormalizeLoudness(true)),
                UiAction::Voice(VoiceSetting::HighPass(true)),
                UiAction::Voice(VoiceSetting::EchoCancellation(true)),
                UiAction::Voice(VoiceSetting::GainControl(true)),
            ]
        );
    }

    #[test]
    fn push_to_talk_shows_its_key_where_it_works_and_lets_both_change() {
        use crate::ui::ptt_scope::{PttScope, WindowOnly};
        let mut v = view();
        v.ptt_enabled = true;
        v.ptt_outside_window = true;
        v.ptt_scope = PttScope::WindowOnly(WindowOnly::TypingKey);
        let mut h = harness(v.clone());
        h.get_by_label_contains("it is a typing key");
        h.get_by_label("Space").click();
        h.run();
        h.get_by_label("Also while other windows have focus")
            .click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![
                UiAction::ChoosePttKey(true),
                UiAction::SetPttOutsideWindow(false)
            ]
        );

        v.ptt_key = "F9".into();
        v.ptt_scope = PttScope::Everywhere;
        let h = harness(v.clone());
        h.get_by_label("F9 works in every window");

        v.choosing_ptt_key = true;
        let mut h = harness(v);
        h.get_by_label("Press a key (Esc cancels)").click();
        h.run();
        assert_eq!(h.state().actions, vec![UiAction::ChoosePttKey(false)]);

        let h = harness(view());
        assert!(
            h.query_by_label("Also while other windows have focus")
                .is_none(),
            "the key row shows only with push-to-talk on"
        );
    }

    #[test]
    fn the_echo_test_starts_shows_progress_and_says_what_it_found() {
        use crate::voice::{EchoTestResult, EchoTestStatus, EchoVerdict};
        let mut h = harness(view());
        h.get_by_label("Echo test").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::EchoTest(true))]
        );

        let mut v = view();
        v.echo_test = Some(EchoTestStatus::Running(0.5));
        let mut h = harness(v.clone());
        h.get_by_label("Stop the echo test").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::Voice(VoiceSetting::EchoTest(false))]
        );

        let result = EchoTestResult {
            background_db: -65.0,
            played_db: -22.0,
            picked_up_db: -32.0,
            after_cancel_db: -66.0,
            echo_cancellation: true,
            verdict: EchoVerdict::Cancelled,
        };
        v.echo_test = Some(EchoTestStatus::Done(result));
        let h = harness(v.clone());
        h.get_by_label_contains(
            "hears your speakers at -10 dB; the echo canceller takes out 34 dB",
        );
        v.echo_test = Some(EchoTestStatus::Done(EchoTestResult {
            after_cancel_db: -32.0,
            echo_cancellation: false,
            verdict: EchoVerdict::Remains,
            ..result
        }));
        let h = harness(v);
        h.get_by_label_contains("echo cancellation is off");
    }

    #[test]
    fn picking_an_input_device_emits_select_input() {
        let mut h = harness(view());
        h.get_by_role_and_label(Role::ComboBox, "Input device")
            .click();
        h.run();
        h.get_by_label("USB Headset").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::SelectInput("USB Headset".into())]
        );
    }

    #[test]
    fn picking_the_current_device_again_emits_nothing() {
        let mut h = harness(view());
        h.get_by_role_and_label(Role::ComboBox, "Input device")
            .click();
        h.run();
        h.get_by_label("Built-in Mic").click();
        h.run();
        assert!(h.state().actions.is_empty());
    }

    #[test]
    fn picking_an_output_device_emits_select_output() {
        let mut h = harness(view());
        h.get_by_role_and_label(Role::ComboBox, "Output device")
            .click();
        h.run();
        h.get_by_label("Speakers").click();
        h.run();
        assert_eq!(
            h.state().actions,
            vec![UiAction::SelectOutput("Speakers".into())]
        );
    }

    #[test]
    fn input_meter_reports_level_and_threshold() {
        let h = harness(view());
        h.get_by_label("Input level -20 dB, threshold -40 dB");
        h.get_by_label("Input level (speaking)");
    }
}
