//! Volume and local mute per person, kept across rejoins, reconnects and runs.
//!
//! The window rebuilds member entities on every overview, rejoin and reconnect, and a
//! reconnect brings new user ids; the voice engine keeps its settings by user id. Keyed by the
//! person, these settings survive all of that: a member entity starts from them, and the engine
//! is told again under the member's current id, so the window never shows "unmuted, 100 %" for
//! someone the engine still mutes, or the other way round.
//!
//! A person is (the server's canonical `host:port`, the username's look-alike key): the same
//! key the trust store (`known_peers.toml`) pins an identity key to, so a setting follows the
//! same person the verified mark does. Not the identity key itself: a member row appears (from
//! the overview) before the member's signed voice key, and with it the identity, is announced,
//! and a mute must hold from the first frame the row is shown. A name on another server is
//! another person.
//!
//! [`PersonSettings`] is pure; [`load_people`] and [`save_people`] are the file behind it,
//! `people.toml` in the config directory, written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bevy::prelude::*;
use serde::{Deserialize, Serialize};

use crate::protocol::{username_key, UserId};
use crate::voice::{PeerSettings, VoiceCommand, VoiceSetting};

/// Name of the per-person settings' file in the config directory.
pub const PEOPLE_FILE: &str = "people.toml";

/// What is kept for one person: the name as last seen (for the file) and the settings.
#[derive(Debug, Clone, PartialEq)]
struct Person {
    server: String,
    username: String,
    settings: PeerSettings,
}

/// The settings chosen for each person (see the module docs). Only people with a setting
/// other than the defaults are kept.
#[derive(Resource, Debug, Default, Clone, PartialEq)]
pub struct PersonSettings {
    by_person: BTreeMap<(String, String), Person>,
}

/// The map's key for `username` on `server`: the server as the trust store and the
/// certificate pins name it, the name as the server compares names.
fn key(server: &str, username: &str) -> (String, String) {
    (crate::protocol::server_key(server), username_key(username))
}

impl PersonSettings {
    /// What was chosen for `username` on `server` (unity gain, not muted, if nothing).
    pub fn get(&self, server: &str, username: &str) -> PeerSettings {
        self.by_person
            .get(&key(server, username))
            .map(|p| p.settings)
            .unwrap_or_default()
    }

    /// Remembers a setting the user made for `username` on `server`; other settings are not
    /// ours. Returns whether anything changed (then the file is worth writing).
    pub fn remember(&mut self, server: &str, username: &str, setting: &VoiceSetting) -> bool {
        let k = key(server, username);
        let before = self.get(server, username);
        let mut after = before;
        match *setting {
            VoiceSetting::PeerVolume { volume, .. } => after.volume = volume.clamp(0.0, 2.0),
            VoiceSetting::PeerMuted { muted, .. } => after.muted = muted,
            _ => return false,
        }
        if after == PeerSettings::default() {
            self.by_person.remove(&k);
        } else {
            self.by_person.insert(
                k,
                Person {
                    server: crate::protocol::server_key(server),
                    username: username.to_string(),
                    settings: after,
                },
            );
        }
        after != before
    }

    /// The commands that give the voice engine this person's settings under `user_id`. Both
    /// are always sent, defaults too: the engine remembers settings by id, and an id the
    /// server hands to someone else later (or the same id after a restart of the server) must
    /// not bring the previous holder's mute along.
    pub fn commands_for(&self, server: &str, username: &str, user_id: UserId) -> [VoiceCommand; 2] {
        let s = self.get(server, username);
        [
            VoiceCommand::Setting(VoiceSetting::PeerVolume {
                user_id,
                volume: s.volume,
            }),
            VoiceCommand::Setting(VoiceSetting::PeerMuted {
                user_id,
                muted: s.muted,
            }),
        ]
    }

    /// Every kept person as (server, username, settings), for the file.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, PeerSettings)> {
        self.by_person
            .values()
            .map(|p| (p.server.as_str(), p.username.as_str(), p.settings))
    }

    /// The settings of these people, as loaded from the file.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, String, PeerSettings)>) -> Self {
        let mut out = Self::default();
        for (server, username, settings) in entries {
            out.remember(
                &server,
                &username,
                &VoiceSetting::PeerVolume {
                    user_id: 0,
                    volume: settings.volume,
                },
            );
            out.remember(
                &server,
                &username,
                &VoiceSetting::PeerMuted {
                    user_id: 0,
                    muted: settings.muted,
                },
            );
        }
        out
    }
}

/// Why `people.toml` could not be written, worded for the status bar.
#[derive(Debug, thiserror::Error)]
pub enum PeopleFileError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One `[[person]]` of `people.toml`.
#[derive(Debug, Serialize, Deserialize)]
struct PersonEntry {
    server: String,
    username: String,
    #[serde(default = "unity")]
    volume: f32,
    #[serde(default)]
    muted: bool,
}

fn unity() -> f32 {
    1.0
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PeopleFile {
    #[serde(default)]
    person: Vec<PersonEntry>,
}

/// The people kept in `dir/people.toml` (`None`: no config directory). A missing file keeps
/// nobody; so does an unreadable one, which is set aside first (renamed, so the next save
/// cannot overwrite the user's choices) and reported: these are conveniences, so a broken file
/// costs a run without them, never the call and never the file.
pub fn load_people(dir: Option<&Path>) -> (PersonSettings, Option<crate::config::SetAside>) {
    let Some(dir) = dir else {
        return (PersonSettings::default(), None);
    };
    let (file, set_aside) = crate::config::load_toml::<PeopleFile>(&dir.join(PEOPLE_FILE));
    let people = PersonSettings::from_entries(file.person.into_iter().map(|p| {
        let volume = if p.volume.is_finite() { p.volume } else { 1.0 };
        (
            p.server,
            p.username,
            PeerSettings {
                volume,
                muted: p.muted,
            },
        )
    }));
    (people, set_aside)
}

/// Writes `people` to `dir/people.toml` atomically (see [`crate::config::write_atomically`]).
pub fn save_people(dir: &Path, people: &PersonSettings) -> Result<(), PeopleFileError> {
    let path = dir.join(PEOPLE_FILE);
    let file = PeopleFile {
        person: people
            .entries()
            .map(|(server, username, s)| PersonEntry {
                server: server.to_string(),
                username: username.to_string(),
                volume: s.volume,
                muted: s.muted,
            })
            .collect(),
    };
    let text = toml::to_string(&file).unwrap_or_default();
    crate::config::write_atomically(&path, text.as_bytes())
        .map_err(|source| PeopleFileError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn muted(m: bool) -> VoiceSetting {
        VoiceSetting::PeerMuted {
            user_id: 2,
            muted: m,
        }
    }

    fn volume(v: f32) -> VoiceSetting {
        VoiceSetting::PeerVolume {
            user_id: 2,
            volume: v,
        }
    }

    #[test]
    fn a_person_keeps_their_settings_under_a_new_id() {
        let mut p = PersonSettings::default();
        assert!(p.remember("h:7700", "bob", &muted(true)));
        assert!(p.remember("h:7700", "Bob", &volume(0.5)));
        assert!(!p.remember("h:7700", "bob", &volume(0.5)), "no change");
        assert_eq!(
            p.get("H:7700", "BOB"),
            PeerSettings {
                volume: 0.5,
                muted: true
            },
            "one person whatever the case of the server's name or the username"
        );
        // After a reconnect bob is user 7: the engine hears of both settings under 7.
        assert_eq!(
            p.commands_for("h:7700", "bob", 7),
            [
                VoiceCommand::Setting(VoiceSetting::PeerVolume {
                    user_id: 7,
                    volume: 0.5
                }),
                VoiceCommand::Setting(VoiceSetting::PeerMuted {
                    user_id: 7,
                    muted: true
                }),
            ]
        );
    }

    /// An id the server gives to carol after bob left must not carry bob's mute in the engine.
    #[test]
    fn someone_without_settings_gets_the_defaults_told_explicitly() {
        let p = PersonSettings::default();
        assert_eq!(
            p.commands_for("h:7700", "carol", 2),
            [
                VoiceCommand::Setting(VoiceSetting::PeerVolume {
                    user_id: 2,
                    volume: 1.0
                }),
                VoiceCommand::Setting(VoiceSetting::PeerMuted {
                    user_id: 2,
                    muted: false
                }),
            ]
        );
    }

    #[test]
    fn the_same_name_on_another_server_is_another_person() {
        let mut p = PersonSettings::default();
        p.remember("h:7700", "bob", &muted(true));
        assert!(!p.get("other.example:7700", "bob").muted);
        assert!(!p.get("h:7701", "bob").muted);
        assert!(p.get("h:7700", "bob").muted);
    }

    #[test]
    fn look_alike_names_are_one_person_as_the_server_says() {
        let mut p = PersonSettings::default();
        // A Cyrillic а: the server gives this name to whoever has "alice".
        p.remember("h:7700", "\u{430}lice", &muted(true));
        assert!(p.get("h:7700", "alice").muted);
    }

    #[test]
    fn back_to_the_defaults_forgets_the_person() {
        let mut p = PersonSettings::default();
        p.remember("h:7700", "bob", &muted(true));
        p.remember("h:7700", "bob", &volume(1.5));
        assert_eq!(p.entries().count(), 1);
        p.remember("h:7700", "bob", &muted(false));
        p.remember("h:7700", "bob", &volume(1.0));
        assert_eq!(p.entries().count(), 0, "nothing worth a line in the file");
    }

    #[test]
    fn volume_is_kept_within_the_mixers_range() {
        let mut p = PersonSettings::default();
        p.remember("h:7700", "bob", &volume(7.0));
        assert_eq!(p.get("h:7700", "bob").volume, 2.0);
    }

    #[test]
    fn people_survive_a_round_trip_through_the_file() {
        let dir = std::env::temp_dir().join(format!("pv-people-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut p = PersonSettings::default();
        p.remember("Example.org:7700", "Bob", &muted(true));
        p.remember("example.org:7700", "carol", &volume(0.25));
        save_people(&dir, &p).unwrap();
        let (loaded, set_aside) = load_people(Some(&dir));
        assert_eq!(set_aside, None);
        assert_eq!(loaded, p);
        assert!(loaded.get("example.org:7700", "bob").muted);
        assert_eq!(loaded.get("example.org:7700", "carol").volume, 0.25);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [PEOPLE_FILE]);
        // A broken file keeps nobody and does not stop the app; it is set aside whole, so
        // the next save cannot replace what the user had, and the reason names the line.
        let broken = "[[person]]\nserver = \"h:7700\"\nusername = \"bob\"\nvolume = \"loud\"\n";
        std::fs::write(dir.join(PEOPLE_FILE), broken).unwrap();
        let (loaded, set_aside) = load_people(Some(&dir));
        assert_eq!(loaded, PersonSettings::default());
        let set_aside = set_aside.expect("reported");
        assert!(set_aside.reason.starts_with("line 4"), "{set_aside}");
        let kept = set_aside.kept_as.clone().expect("moved aside");
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), broken);
        assert!(!dir.join(PEOPLE_FILE).exists());
        assert!(
            set_aside.to_string().contains("it was kept as"),
            "{set_aside}"
        );
        assert_eq!(load_people(None), (PersonSettings::default(), None));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
