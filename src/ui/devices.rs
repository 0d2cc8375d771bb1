//! Keeps the device pickers in step with what is plugged in, and brings back a device the
//! user picked when it returns (see [`crate::audio::device_watch`]).

use bevy::prelude::*;

use super::notices::Topic;
use super::view::ControlsView;
use super::UiState;
use crate::audio::device_watch::{changes, DeviceChange, DeviceWatch};
use crate::audio::{DeviceList, Direction, InputSource, OutputSink};
use crate::voice::VoiceCommand;

/// The watcher and the list the pickers show now.
#[derive(Resource)]
pub struct WatchedDevices {
    pub watch: DeviceWatch,
    pub shown: DeviceList,
}

/// What a new device list means for the window.
#[derive(Debug, Default)]
pub struct DeviceListUpdate {
    /// One line per device that came or went, for the notices.
    pub notices: Vec<String>,
    /// Switches back to the device the user picked, when it reappears.
    pub switches: Vec<VoiceCommand>,
}

/// Puts `new` into the pickers and says what changed from `old`. A picked device that comes
/// back is switched to again: while it was gone the audio engine used the system default.
pub fn apply_device_list(
    controls: &mut ControlsView,
    old: &DeviceList,
    new: &DeviceList,
) -> DeviceListUpdate {
    let names = |v: &[crate::audio::DeviceInfo]| v.iter().map(|d| d.name.clone()).collect();
    controls.input_devices = names(&new.inputs);
    controls.output_devices = names(&new.outputs);
    let mut update = DeviceListUpdate::default();
    for change in changes(old, new) {
        let (dir, name, added) = match &change {
            DeviceChange::Added(d, n) => (*d, n, true),
            DeviceChange::Removed(d, n) => (*d, n, false),
        };
        let picked = match dir {
            Direction::Input => controls.selected_input.as_ref(),
            Direction::Output => controls.selected_output.as_ref(),
        } == Some(name);
        let what = match dir {
            Direction::Input => "Microphone",
            Direction::Output => "Speaker",
        };
        update.notices.push(match (added, picked) {
            (true, true) => format!("{what} back: {name}"),
            (true, false) => format!("New {}: {name}", what.to_lowercase()),
            (false, true) => format!("{what} unplugged: {name} (using the system default)"),
            (false, false) => format!("{what} unplugged: {name}"),
        });
        if added && picked {
            update.switches.push(match dir {
                Direction::Input => {
                    VoiceCommand::SwitchInput(InputSource::Device(Some(name.clone())))
                }
                Direction::Output => {
                    VoiceCommand::SwitchOutput(OutputSink::Device(Some(name.clone())))
                }
            });
        }
    }
    update
}

/// Each frame: takes a changed device list from the watcher, if one came.
pub fn follow_device_list(
    watched: Option<ResMut<WatchedDevices>>,
    mut state: ResMut<UiState>,
    mut voice: EventWriter<VoiceCommand>,
) {
    let Some(mut watched) = watched else {
        return;
    };
    let Some(list) = watched.watch.try_latest() else {
        return;
    };
    let update = apply_device_list(&mut state.controls, &watched.shown, &list);
    for text in update.notices {
        state.notices.push(Topic::Other, text);
    }
    for cmd in update.switches {
        voice.write(cmd);
    }
    watched.shown = list;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::device_watch::test_list as list;

    #[test]
    fn a_new_headset_appears_in_the_pickers_with_a_notice() {
        let mut controls = ControlsView::default();
        let old = list(&["Built-in Mic"], &["Speakers"]);
        let new = list(
            &["Built-in Mic", "USB Headset"],
            &["Speakers", "USB Headset"],
        );
        let update = apply_device_list(&mut controls, &old, &new);
        assert_eq!(controls.input_devices, vec!["Built-in Mic", "USB Headset"]);
        assert_eq!(controls.output_devices, vec!["Speakers", "USB Headset"]);
        assert_eq!(
            update.notices,
            vec!["New microphone: USB Headset", "New speaker: USB Headset"]
        );
        assert!(update.switches.is_empty(), "nobody picked it yet");
    }

    #[test]
    fn the_picked_headset_unplugged_and_back_is_switched_to_again() {
        let mut controls = ControlsView {
            selected_input: Some("USB Headset".into()),
            ..Default::default()
        };
        let with = list(&["Built-in Mic", "USB Headset"], &["Speakers"]);
        let without = list(&["Built-in Mic"], &["Speakers"]);
        let gone = apply_device_list(&mut controls, &with, &without);
        assert_eq!(
            gone.notices,
            vec!["Microphone unplugged: USB Headset (using the system default)"]
        );
        assert!(gone.switches.is_empty());
        assert_eq!(
            controls.selected_input.as_deref(),
            Some("USB Headset"),
            "the choice stays"
        );
        let back = apply_device_list(&mut controls, &without, &with);
        assert_eq!(back.notices, vec!["Microphone back: USB Headset"]);
        assert!(matches!(
            back.switches.as_slice(),
            [VoiceCommand::SwitchInput(InputSource::Device(Some(n)))] if n == "USB Headset"
        ));
    }
}
