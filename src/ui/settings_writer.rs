//! Remembers the user's choices in `settings.toml`, and the per-person volume and mute in
//! `people.toml` beside it, from a thread of its own, so a click never waits for the disk (a
//! slow or network home directory would otherwise stall a frame). Changes are applied in
//! order; several queued at once cost one write of each file. Both files are written
//! atomically ([`crate::config::write_atomically`]).

use std::path::PathBuf;
use std::thread::JoinHandle;

use bevy::prelude::*;
use crossbeam_channel::{Receiver, Sender};

use crate::client::person_settings::{save_people, PersonSettings};
use crate::config::ClientSettings;
use crate::voice::VoiceSetting;

/// One thing to remember.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsChange {
    /// Identified on a server: the name and address to offer next time.
    Identity {
        username: String,
        server: String,
    },
    PushToTalk(bool),
    /// The push-to-talk key (an egui key name).
    PttKey(String),
    /// Push-to-talk also while other windows have focus.
    PttOutsideWindow(bool),
    NoiseSuppression(bool),
    NormalizeLoudness(bool),
    EchoCancellation(bool),
    GainControl(bool),
    HighPass(bool),
    InputDevice(String),
    OutputDevice(String),
    /// Join, leave and mute sounds on or off.
    Sounds(bool),
}

/// What the writer thread is asked to do.
enum Job {
    Settings(SettingsChange),
    /// The whole per-person map as it is now (the newest one queued wins).
    People(PersonSettings),
}

impl SettingsChange {
    /// The part of a voice setting that is remembered across runs, if any (mute is not: a
    /// call that starts muted because of last week surprises people).
    pub fn from_voice(setting: &VoiceSetting) -> Option<Self> {
        match *setting {
            VoiceSetting::PushToTalk(on) => Some(Self::PushToTalk(on)),
            VoiceSetting::NoiseSuppression(on) => Some(Self::NoiseSuppression(on)),
            VoiceSetting::NormalizeLoudness(on) => Some(Self::NormalizeLoudness(on)),
            VoiceSetting::EchoCancellation(on) => Some(Self::EchoCancellation(on)),
            VoiceSetting::GainControl(on) => Some(Self::GainControl(on)),
            VoiceSetting::HighPass(on) => Some(Self::HighPass(on)),
            VoiceSetting::Sounds(on) => Some(Self::Sounds(on)),
            _ => None,
        }
    }

    fn apply(self, s: &mut ClientSettings) {
        match self {
            Self::Identity { username, server } => {
                s.username = Some(username);
                s.server = Some(server);
            }
            Self::PushToTalk(on) => s.push_to_talk = Some(on),
            Self::PttKey(key) => s.ptt_key = Some(key),
            Self::PttOutsideWindow(on) => s.ptt_outside_window = Some(on),
            Self::NoiseSuppression(on) => s.noise_suppression = Some(on),
            Self::NormalizeLoudness(on) => s.normalize_loudness = Some(on),
            Self::EchoCancellation(on) => s.echo_cancellation = Some(on),
            Self::GainControl(on) => s.gain_control = Some(on),
            Self::HighPass(on) => s.high_pass = Some(on),
            Self::InputDevice(name) => s.input_device = Some(name),
            Self::OutputDevice(name) => s.output_device = Some(name),
            Self::Sounds(on) => s.sounds = Some(on),
        }
    }
}

/// The UI's handle on the writer thread.
#[derive(Resource)]
pub struct SettingsWriter {
    tx: Option<Sender<Job>>,
    errors: Receiver<String>,
    thread: Option<JoinHandle<()>>,
}

impl SettingsWriter {
    /// Starts the writer for the settings file at `path` (`None`: no config directory on this
    /// system, so nothing is remembered); `people.toml` goes into the same directory.
    pub fn spawn(path: Option<PathBuf>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let (err_tx, errors) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("settings-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let Some(path) = &path else { continue };
                    let mut changes = Vec::new();
                    let mut people = None;
                    for job in std::iter::once(first).chain(rx.try_iter()) {
                        match job {
                            Job::Settings(change) => changes.push(change),
                            Job::People(p) => people = Some(p),
                        }
                    }
                    if !changes.is_empty() {
                        // Read what is on disk so a change made by another instance is kept.
                        let (mut settings, set_aside) = crate::config::load_toml(path);
                        // A file that could not be read nor moved aside is not saved over.
                        let blocked = set_aside.as_ref().is_some_and(|e| e.kept_as.is_none());
                        if let Some(e) = set_aside {
                            let _ = err_tx.send(if blocked {
                                format!("cannot remember settings: {e}")
                            } else {
                                format!("settings: {e}")
                            });
                        }
                        for change in changes {
                            change.apply(&mut settings);
                        }
                        if !blocked {
                            if let Err(e) = settings.save_to(path) {
                                let _ = err_tx.send(format!("cannot remember settings: {e}"));
                            }
                        }
                    }
                    if let (Some(people), Some(dir)) = (people, path.parent()) {
                        if let Err(e) = save_people(dir, &people) {
                            let _ = err_tx.send(format!("cannot remember volumes and mutes: {e}"));
                        }
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            errors,
            thread,
        }
    }

    /// Queues a change; returns at once.
    pub fn remember(&self, change: SettingsChange) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Settings(change));
        }
    }

    /// Queues the per-person settings as they are now, for `people.toml`; returns at once.
    pub fn remember_people(&self, people: &PersonSettings) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::People(people.clone()));
        }
    }

    /// Failures to write since the last call, worded for the status bar.
    pub fn errors(&self) -> impl Iterator<Item = String> + '_ {
        self.errors.try_iter()
    }
}

impl Drop for SettingsWriter {
    /// Writes what is queued before the app exits, then stops the thread.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("p2p-voice-settings-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn changes_reach_the_file_in_order_and_keep_what_was_there() {
        let dir = temp_dir("order");
        let path = dir.join("settings.toml");
        std::fs::create_dir_all(&dir).unwrap();
        ClientSettings {
            ptt_key: Some("F5".into()),
            ..Default::default()
        }
        .save_to(&path)
        .unwrap();
        let w = SettingsWriter::spawn(Some(path.clone()));
        w.remember(SettingsChange::Identity {
            username: "alice".into(),
            server: "example.org:7700".into(),
        });
        w.remember(SettingsChange::InputDevice("USB mic".into()));
        w.remember(SettingsChange::PushToTalk(true));
        w.remember(SettingsChange::PushToTalk(false));
        drop(w);
        let s = ClientSettings::load_from(&path);
        assert_eq!(s.username.as_deref(), Some("alice"));
        assert_eq!(s.server.as_deref(), Some("example.org:7700"));
        assert_eq!(s.input_device.as_deref(), Some("USB mic"));
        assert_eq!(s.push_to_talk, Some(false), "the last change wins");
        assert_eq!(
            s.ptt_key.as_deref(),
            Some("F5"),
            "untouched settings are kept"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn per_person_settings_go_to_people_toml_beside_the_settings() {
        let dir = temp_dir("people");
        let w = SettingsWriter::spawn(Some(dir.join("settings.toml")));
        let mut people = PersonSettings::default();
        let mute = VoiceSetting::PeerMuted {
            user_id: 3,
            muted: true,
        };
        people.remember("h:7700", "bob", &mute);
        w.remember_people(&people);
        w.remember(SettingsChange::Sounds(false));
        drop(w);
        let loaded = crate::client::person_settings::load_people(Some(&dir)).0;
        assert!(loaded.get("h:7700", "bob").muted);
        let s = ClientSettings::load_from(&dir.join("settings.toml"));
        assert_eq!(s.sounds, Some(false));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A settings file broken by hand is not overwritten by the next change: it is set aside
    /// whole, the change goes to a new file, and the window is told.
    /// The writer's first reported errors (waits up to 10 s for one).
    fn first_errors(w: &SettingsWriter) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut errors = Vec::new();
        while errors.is_empty() && std::time::Instant::now() < deadline {
            errors.extend(w.errors());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        errors
    }

    #[test]
    fn a_broken_settings_file_is_set_aside_not_overwritten() {
        let dir = temp_dir("broken");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("settings.toml");
        let broken = "username = \"alice\"\nptt_key = F9\n";
        std::fs::write(&path, broken).unwrap();
        let w = SettingsWriter::spawn(Some(path.clone()));
        w.remember(SettingsChange::Sounds(false));
        let errors = first_errors(&w);
        drop(w);
        assert!(
            errors[0].starts_with("settings: ") && errors[0].contains("line 2"),
            "{errors:?}"
        );
        let kept: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("settings.toml.unreadable-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(std::fs::read_to_string(&kept[0]).unwrap(), broken);
        assert_eq!(ClientSettings::load_from(&path).sounds, Some(false));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_is_reported_not_fatal() {
        let dir = temp_dir("fail");
        std::fs::create_dir_all(&dir).unwrap();
        // The settings path is a directory: the write must fail.
        let path = dir.join("settings.toml");
        std::fs::create_dir_all(&path).unwrap();
        let w = SettingsWriter::spawn(Some(path));
        w.remember(SettingsChange::NoiseSuppression(false));
        let errors = first_errors(&w);
        assert!(
            errors[0].starts_with("cannot remember settings"),
            "{errors:?}"
        );
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
