//! The messages the status bar shows, each tagged with what it is about.
//!
//! A message that describes a passing condition (a peer we cannot reach, a lost device) must go
//! away when the condition does. Finding it again by its text (`starts_with("Cannot reach")`)
//! breaks as soon as the wording changes; the [`Topic`] says what the message is about, and the
//! code withdraws by topic.

use crate::protocol::UserId;
use crate::voice::AudioProblem;

/// What a notice is about.
#[derive(Debug, Clone, PartialEq)]
pub enum Topic {
    /// We cannot reach this peer; withdrawn when a direct path appears.
    Unreachable(UserId),
    /// A live audio problem; withdrawn when the voice plane no longer reports it.
    Audio(AudioProblem),
    /// Voice could not start at all.
    VoiceDisabled,
    /// This network lets no UDP reach the server; withdrawn if it starts to.
    UdpBlocked,
    /// Our identity key could not be loaded: peers refuse our voice.
    IdentityProblem,
    /// Everything else: stays until the user dismisses it or newer notices push it out.
    Other,
}

/// The notices shown, oldest first, at most [`Notices::CAPACITY`].
#[derive(Debug, Clone, Default)]
pub struct Notices {
    items: Vec<(Topic, String)>,
}

impl Notices {
    /// More than this many lines would push the call out of view.
    pub const CAPACITY: usize = 5;

    /// Shows `text` about `topic`, unless the newest notice already says exactly that.
    pub fn push(&mut self, topic: Topic, text: String) {
        if self
            .items
            .last()
            .is_some_and(|(t, s)| *t == topic && *s == text)
        {
            return;
        }
        self.items.push((topic, text));
        let n = self.items.len();
        if n > Self::CAPACITY {
            self.items.drain(..n - Self::CAPACITY);
        }
    }

    /// Shows `text` about `topic` unless a notice on that topic is already shown.
    pub fn push_once(&mut self, topic: Topic, text: String) {
        if !self.is_shown(&topic) {
            self.push(topic, text);
        }
    }

    /// Removes every notice about `topic`.
    pub fn withdraw(&mut self, topic: &Topic) {
        self.items.retain(|(t, _)| t != topic);
    }

    /// True if a notice about `topic` is shown.
    pub fn is_shown(&self, topic: &Topic) -> bool {
        self.items.iter().any(|(t, _)| t == topic)
    }

    /// Removes the notice at `index` (as drawn this frame); out of range does nothing.
    pub fn dismiss(&mut self, index: usize) {
        if index < self.items.len() {
            self.items.remove(index);
        }
    }

    /// The texts, oldest first, for the status bar.
    pub fn texts(&self) -> Vec<String> {
        self.items.iter().map(|(_, s)| s.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withdrawing_a_topic_keeps_the_others() {
        let mut n = Notices::default();
        n.push(Topic::Other, "Cannot join Private: wrong password".into());
        n.push(Topic::Unreachable(7), "Cannot reach bob: no reply".into());
        n.push(Topic::Unreachable(8), "Cannot reach eve: no reply".into());
        n.withdraw(&Topic::Unreachable(7));
        assert_eq!(
            n.texts(),
            vec![
                "Cannot join Private: wrong password".to_string(),
                "Cannot reach eve: no reply".to_string()
            ]
        );
    }

    #[test]
    fn the_same_notice_twice_in_a_row_is_shown_once_and_old_ones_make_room() {
        let mut n = Notices::default();
        n.push(Topic::Other, "a".into());
        n.push(Topic::Other, "a".into());
        assert_eq!(n.texts().len(), 1);
        for i in 0..10 {
            n.push(Topic::Other, format!("m{i}"));
        }
        assert_eq!(n.texts().len(), Notices::CAPACITY);
        assert_eq!(n.texts().last().unwrap(), "m9");
        n.dismiss(99);
        n.dismiss(0);
        assert_eq!(n.texts()[0], "m6");
    }

    #[test]
    fn push_once_does_not_repeat_a_shown_topic() {
        let mut n = Notices::default();
        n.push_once(Topic::VoiceDisabled, "Voice disabled: no socket".into());
        n.push(Topic::Other, "x".into());
        n.push_once(Topic::VoiceDisabled, "Voice disabled: no socket".into());
        assert_eq!(n.texts().len(), 2);
    }
}
