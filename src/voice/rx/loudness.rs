//! Per-speaker loudness normalisation: one person's microphone is quiet, another's loud, and in
//! most voice chats the listener ends up re-adjusting each speaker's volume. When it is on, each
//! peer's decoded audio is brought towards the same speech level before the listener's own
//! per-peer volume applies.
//!
//! [`SpeakerLoudness`] follows the level of a peer's *speech* (chunks above a floor; pauses and
//! background noise do not count, so silence is never pumped up), slowly, and turns it into a
//! gain towards [`TARGET_DBFS`], limited to +-12 dB so a whisper is not turned into a shout
//! nor line noise into speech. Pure and allocation-free: it sees the same 10 ms chunks the
//! mixer does.

use crate::voice::tx::levels::rms_dbfs;

/// Speech level every speaker is brought towards (RMS of speech chunks): a comfortable level
/// with room below the mixer's limiter for several people at once.
pub const TARGET_DBFS: f32 = -23.0;
/// The most the gain may lift or cut, in dB.
pub const MAX_GAIN_DB: f32 = 12.0;
/// Chunks quieter than this are pauses or background noise, not speech: they do not move the
/// level estimate.
const SPEECH_FLOOR_DBFS: f32 = -50.0;
/// How fast the level estimate follows the speech, per chunk (10 ms): about 2 s.
const LEVEL_ALPHA: f32 = 0.005;
/// How fast the applied gain follows its target, per chunk: about 0.5 s, slow enough that no
/// step is heard.
const GAIN_ALPHA: f32 = 0.02;

/// The speech level of one peer and the gain that evens it out.
///
/// Invariant: `gain_db` stays within +-[`MAX_GAIN_DB`]; before any speech it is 0 dB.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeakerLoudness {
    level_db: Option<f32>,
    gain_db: f32,
}

impl Default for SpeakerLoudness {
    fn default() -> Self {
        Self::new()
    }
}

impl SpeakerLoudness {
    pub fn new() -> Self {
        Self {
            level_db: None,
            gain_db: 0.0,
        }
    }

    /// Takes the next chunk of this peer's decoded audio (before any gain).
    pub fn observe(&mut self, chunk: &[f32]) {
        let db = rms_dbfs(chunk);
        if db > SPEECH_FLOOR_DBFS {
            // The first speech sets the estimate at once: a new speaker is evened out within a
            // word, then followed slowly.
            let level = match self.level_db {
                None => db,
                Some(level) => level + LEVEL_ALPHA * (db - level),
            };
            self.level_db = Some(level);
        }
        let target = self.level_db.map_or(0.0, |level| {
            (TARGET_DBFS - level).clamp(-MAX_GAIN_DB, MAX_GAIN_DB)
        });
        self.gain_db += GAIN_ALPHA * (target - self.gain_db);
    }

    /// The linear gain to apply now.
    pub fn gain(&self) -> f32 {
        10f32.powf(self.gain_db / 20.0)
    }

    /// The estimated speech level in dBFS, once speech was heard.
    pub fn level_db(&self) -> Option<f32> {
        self.level_db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `seconds` of 10 ms chunks of a 300 Hz tone at `rms_db` dBFS RMS, every fifth chunk
    /// silent: speech with gaps.
    fn talk(l: &mut SpeakerLoudness, rms_db: f32, seconds: usize) {
        let amp = 10f32.powf(rms_db / 20.0) * std::f32::consts::SQRT_2;
        for c in 0..seconds * 100 {
            let chunk: Vec<f32> = if c % 5 == 4 {
                vec![0.0; 480]
            } else {
                (0..480)
                    .map(|i| amp * (2.0 * std::f32::consts::PI * 300.0 * i as f32 / 48_000.0).sin())
                    .collect()
            };
            l.observe(&chunk);
        }
    }

    fn out_db(l: &SpeakerLoudness, rms_db: f32) -> f32 {
        rms_db + 20.0 * l.gain().log10()
    }

    #[test]
    fn a_quiet_and_a_loud_speaker_end_up_within_a_decibel_of_each_other() {
        let (mut quiet, mut loud) = (SpeakerLoudness::new(), SpeakerLoudness::new());
        talk(&mut quiet, -33.0, 3);
        talk(&mut loud, -15.0, 3);
        let (q, l) = (out_db(&quiet, -33.0), out_db(&loud, -15.0));
        assert!(
            (q - TARGET_DBFS).abs() < 1.0,
            "quiet speaker plays at {q} dBFS"
        );
        assert!(
            (l - TARGET_DBFS).abs() < 1.0,
            "loud speaker plays at {l} dBFS"
        );
    }

    #[test]
    fn silence_and_noise_are_not_pumped_up_and_the_gain_is_bounded() {
        let mut l = SpeakerLoudness::new();
        let hiss: Vec<f32> = (0..480)
            .map(|i| if i % 2 == 0 { 1e-4 } else { -1e-4 })
            .collect();
        for _ in 0..500 {
            l.observe(&hiss);
            l.observe(&[0.0; 480]);
        }
        assert_eq!(l.level_db(), None);
        assert!((l.gain() - 1.0).abs() < 1e-6, "gain {}", l.gain());

        talk(&mut l, -45.0, 5); //: a whisper, 22 dB under the target
        let max = 10f32.powf(MAX_GAIN_DB / 20.0);
        assert!(
            l.gain() <= max + 1e-4 && l.gain() > max * 0.9,
            "gain {}",
            l.gain()
        );
    }

    #[test]
    fn the_gain_moves_slowly_enough_not_to_be_heard() {
        let mut l = SpeakerLoudness::new();
        talk(&mut l, -35.0, 3);
        let before = l.gain();
        let loud = vec![0.4f32; 480];
        l.observe(&loud);
        let step_db = 20.0 * (l.gain() / before).log10();
        assert!(
            step_db.abs() < 0.5,
            "one chunk moved the gain by {step_db} dB"
        );
    }
}
