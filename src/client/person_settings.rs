//! Volume and local mute per person, for the whole run.
//!
//! The window rebuilds member entities on every overview, rejoin and reconnect, and a
//! reconnect brings new user ids; the voice engine keeps its settings by user id. Keyed by the
//! person (the username's look-alike key), these settings survive all of that: a member entity
//! starts from them, and the engine is told again under the member's current id, so the window
//! never shows "unmuted, 100 %" for someone the engine still mutes, or the other way round.

use std::collections::HashMap;

use bevy::prelude::*;

use crate::protocol::{username_key, UserId};
use crate::voice::{PeerSettings, VoiceCommand, VoiceSetting};

/// The settings chosen for each person during this run.
#[derive(Resource, Debug, Default)]
pub struct PersonSettings {
    by_person: HashMap<String, PeerSettings>,
}

impl PersonSettings {
    /// What was chosen for `username` (unity gain, not muted, if nothing).
    pub fn get(&self, username: &str) -> PeerSettings {
        self.by_person
            .get(&username_key(username))
            .copied()
            .unwrap_or_default()
    }

    /// Remembers a setting the user made for `username`; other settings are not ours.
    pub fn remember(&mut self, username: &str, setting: &VoiceSetting) {
        let entry = self.by_person.entry(username_key(username)).or_default();
        match *setting {
            VoiceSetting::PeerVolume { volume, .. } => entry.volume = volume,
            VoiceSetting::PeerMuted { muted, .. } => entry.muted = muted,
            _ => {}
        }
    }

    /// The commands that give the voice engine this person's settings under `user_id`; none
    /// while they are the defaults the engine starts from.
    pub fn commands_for(&self, username: &str, user_id: UserId) -> Vec<VoiceCommand> {
        let s = self.get(username);
        let mut out = Vec::new();
        if s.volume != PeerSettings::default().volume {
            out.push(VoiceCommand::Setting(VoiceSetting::PeerVolume {
                user_id,
                volume: s.volume,
            }));
        }
        if s.muted {
            out.push(VoiceCommand::Setting(VoiceSetting::PeerMuted {
                user_id,
                muted: true,
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_person_keeps_their_settings_under_a_new_id() {
        let mut p = PersonSettings::default();
        assert!(
            p.commands_for("bob", 2).is_empty(),
            "defaults need no command"
        );
        p.remember(
            "bob",
            &VoiceSetting::PeerMuted {
                user_id: 2,
                muted: true,
            },
        );
        p.remember(
            "Bob",
            &VoiceSetting::PeerVolume {
                user_id: 2,
                volume: 0.5,
            },
        );
        assert_eq!(
            p.get("BOB"),
            PeerSettings {
                volume: 0.5,
                muted: true
            }
        );
        // After a reconnect bob is user 7: the engine hears of both settings under 7.
        assert_eq!(
            p.commands_for("bob", 7),
            vec![
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
        assert!(p.commands_for("carol", 8).is_empty());
    }
}
