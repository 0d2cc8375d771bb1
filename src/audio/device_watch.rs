//! Devices plugged in or unplugged while the app runs.
//!
//! The device list is read once at start; a headset plugged in later would never show up in
//! the pickers. A watcher thread reads the list again every couple of seconds and hands over
//! each list that differs from the last. Enumeration talks to the sound server and can take a
//! while, so it runs on its own thread: neither the UI, the voice thread nor the audio engine
//! ever waits for it.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::{list_devices, AudioHost, DeviceList, Direction};

/// How often the list is read again. Two seconds: a plugged-in headset shows up about as fast
/// as a person looks for it.
pub const WATCH_PERIOD: Duration = Duration::from_secs(2);

/// One device that appeared or went away between two lists (by its shown name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    Added(Direction, String),
    Removed(Direction, String),
}

/// What changed from `old` to `new`, inputs first, in list order.
pub fn changes(old: &DeviceList, new: &DeviceList) -> Vec<DeviceChange> {
    let mut out = Vec::new();
    for (dir, before, after) in [
        (Direction::Input, &old.inputs, &new.inputs),
        (Direction::Output, &old.outputs, &new.outputs),
    ] {
        let has = |list: &[super::DeviceInfo], name: &str| list.iter().any(|d| d.name == name);
        for d in after.iter().filter(|d| !has(before, &d.name)) {
            out.push(DeviceChange::Added(dir, d.name.clone()));
        }
        for d in before.iter().filter(|d| !has(after, &d.name)) {
            out.push(DeviceChange::Removed(dir, d.name.clone()));
        }
    }
    out
}

/// A thread reading the device list every [`WATCH_PERIOD`]; it stops when this is dropped.
pub struct DeviceWatch {
    lists: Receiver<DeviceList>,
    _thread: JoinHandle<()>,
}

impl DeviceWatch {
    /// Starts watching `host`; `known` is the list already shown (a change is relative to it).
    pub fn spawn(host: AudioHost, known: DeviceList) -> std::io::Result<Self> {
        let (tx, lists) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("device-watch".into())
            .spawn(move || {
                let mut last = known;
                loop {
                    std::thread::sleep(WATCH_PERIOD);
                    // A host that fails to list now and then keeps its last list.
                    let Ok(list) = list_devices(host) else {
                        continue;
                    };
                    if list == last {
                        continue;
                    }
                    // The receiver takes one list at a time; a newer one waits for the next
                    // round, and a dropped receiver ends the thread.
                    match tx.try_send(list.clone()) {
                        Ok(()) => last = list,
                        Err(crossbeam_channel::TrySendError::Full(_)) => {}
                        Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
                    }
                }
            })?;
        Ok(Self {
            lists,
            _thread: thread,
        })
    }

    /// The newest list that differs from the one before, if one came.
    pub fn try_latest(&self) -> Option<DeviceList> {
        self.lists.try_recv().ok()
    }
}

/// A device list of these names (id = name), for tests here and in the window's.
#[cfg(test)]
pub(crate) fn test_list(inputs: &[&str], outputs: &[&str]) -> DeviceList {
    let info = |n: &&str| super::DeviceInfo {
        id: n.to_string(),
        name: n.to_string(),
        is_default: false,
    };
    DeviceList {
        host: "test".into(),
        inputs: inputs.iter().map(info).collect(),
        outputs: outputs.iter().map(info).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::test_list as list;
    use super::*;

    #[test]
    fn a_plugged_in_headset_and_an_unplugged_speaker_are_both_reported() {
        let before = list(&["Built-in Mic"], &["Speakers", "HDMI"]);
        let after = list(&["Built-in Mic", "USB Headset"], &["HDMI", "USB Headset"]);
        assert_eq!(
            changes(&before, &after),
            vec![
                DeviceChange::Added(Direction::Input, "USB Headset".into()),
                DeviceChange::Added(Direction::Output, "USB Headset".into()),
                DeviceChange::Removed(Direction::Output, "Speakers".into()),
            ]
        );
    }

    #[test]
    fn the_same_devices_in_another_order_are_no_change() {
        let a = list(&["A", "B"], &["C"]);
        let b = list(&["B", "A"], &["C"]);
        assert!(changes(&a, &b).is_empty());
    }
}
