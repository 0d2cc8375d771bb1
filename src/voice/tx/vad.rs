//! Energy-based voice activity detection with an adaptive noise floor.
//!
//! The frame level (RMS, dBFS) is compared with a noise floor plus a configurable margin. The
//! floor follows quiet frames quickly and creeps up slowly under sustained sound, so steady
//! background noise stops counting as speech after a few seconds while speech, which always has
//! short pauses, keeps its floor low. A hangover keeps the decision "speaking" for a while after
//! the last loud frame so word endings are not cut.

use std::time::Duration;

use super::levels::{rms_dbfs, SILENCE_DBFS};
use crate::voice::codec::FrameDuration;

/// Tuning of the [`Vad`].
#[derive(Debug, Clone, PartialEq)]
pub struct VadConfig {
    /// Frame duration the detector is fed with.
    pub frame: FrameDuration,
    /// How far above the noise floor a frame must be to count as speech, in dB.
    pub threshold_above_floor_db: f32,
    /// Frames quieter than this are never speech, whatever the floor (dBFS).
    pub absolute_min_db: f32,
    /// How long the decision stays "speaking" after the last loud frame.
    pub hangover: Duration,
    /// Floor assumed before anything was measured (dBFS).
    pub initial_floor_db: f32,
    /// How fast the floor rises under sustained sound, in dB per second.
    pub floor_rise_db_per_s: f32,
    /// Time constant with which the floor falls to quieter frames.
    pub floor_fall: Duration,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self::for_frame(FrameDuration::Ms20)
    }
}

impl VadConfig {
    /// Defaults for the given frame duration.
    pub fn for_frame(frame: FrameDuration) -> Self {
        Self {
            frame,
            threshold_above_floor_db: 10.0,
            absolute_min_db: -65.0,
            hangover: Duration::from_millis(300),
            initial_floor_db: -70.0,
            floor_rise_db_per_s: 3.0,
            floor_fall: Duration::from_millis(100),
        }
    }
}

/// The detector's verdict on one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadDecision {
    /// Speech in this frame or within the hangover after it.
    pub speaking: bool,
    /// True only for frames that are themselves above the threshold (no hangover).
    pub loud: bool,
    /// RMS level of the frame, dBFS.
    pub level_db: f32,
    /// Level a frame had to exceed to count as speech, dBFS.
    pub threshold_db: f32,
}

/// Voice activity detector for one capture stream.
///
/// Invariant: the floor stays within `[SILENCE_DBFS, 0]` and is finite.
#[derive(Debug, Clone)]
pub struct Vad {
    cfg: VadConfig,
    floor_db: f32,
    hangover_left: Duration,
}

impl Vad {
    /// Creates a detector.
    pub fn new(cfg: VadConfig) -> Self {
        Self {
            floor_db: cfg.initial_floor_db.clamp(SILENCE_DBFS, 0.0),
            cfg,
            hangover_left: Duration::ZERO,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &VadConfig {
        &self.cfg
    }

    /// Changes the margin above the noise floor (e.g. from a sensitivity slider).
    pub fn set_threshold_above_floor_db(&mut self, db: f32) {
        if db.is_finite() {
            self.cfg.threshold_above_floor_db = db.max(0.0);
        }
    }

    /// Current noise floor estimate, dBFS.
    pub fn noise_floor_db(&self) -> f32 {
        self.floor_db
    }

    /// The level a frame must exceed to count as voice, dBFS: what the input meter draws,
    /// also before the first frame (no microphone yet).
    pub fn threshold_db(&self) -> f32 {
        (self.floor_db + self.cfg.threshold_above_floor_db).max(self.cfg.absolute_min_db)
    }

    /// Classifies one frame and updates the noise floor.
    pub fn process(&mut self, frame: &[f32]) -> VadDecision {
        self.process_level(rms_dbfs(frame))
    }

    /// Classifies a frame whose RMS level (dBFS) is already known.
    pub fn process_level(&mut self, level_db: f32) -> VadDecision {
        let level_db = if level_db.is_finite() {
            level_db.clamp(SILENCE_DBFS, 0.0)
        } else {
            SILENCE_DBFS
        };
        let threshold_db = self.threshold_db();
        let loud = level_db > threshold_db;

        let frame = self.cfg.frame.duration();
        if loud {
            self.hangover_left = self.cfg.hangover;
        } else {
            self.hangover_left = self.hangover_left.saturating_sub(frame);
        }
        let speaking = loud || !self.hangover_left.is_zero();

        let dt = frame.as_secs_f32();
        if level_db < self.floor_db {
            let alpha = 1.0 - (-dt / self.cfg.floor_fall.as_secs_f32().max(1e-3)).exp();
            self.floor_db += (level_db - self.floor_db) * alpha;
        } else {
            let rise = self.cfg.floor_rise_db_per_s * dt;
            self.floor_db = (self.floor_db + rise).min(level_db);
        }
        self.floor_db = self.floor_db.clamp(SILENCE_DBFS, 0.0);

        VadDecision {
            speaking,
            loud,
            level_db,
            threshold_db,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic white noise with the given RMS.
    fn noise(rms: f32, len: usize, seed: &mut u32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 17;
                *seed ^= *seed << 5;
                let uniform = *seed as f32 / u32::MAX as f32 * 2.0 - 1.0;
                uniform * rms * 3f32.sqrt()
            })
            .collect()
    }

    fn tone(amplitude: f32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| amplitude * (2.0 * std::f32::consts::PI * 220.0 * i as f32 / 48_000.0).sin())
            .collect()
    }

    #[test]
    fn speech_over_quiet_background_is_detected_at_once() {
        let mut vad = Vad::new(VadConfig::default());
        let mut seed = 1;
        for _ in 0..50 {
            assert!(!vad.process(&noise(0.0003, 960, &mut seed)).speaking);
        }
        let d = vad.process(&tone(0.1, 960));
        assert!(d.speaking && d.loud);
        assert!(d.level_db > d.threshold_db);
    }

    #[test]
    fn hangover_keeps_speaking_for_about_300_ms() {
        let mut vad = Vad::new(VadConfig::default());
        let silence = [0.0f32; 960];
        for _ in 0..20 {
            vad.process(&silence);
        }
        vad.process(&tone(0.1, 960));
        let tail: Vec<bool> = (0..20).map(|_| vad.process(&silence).speaking).collect();
        let held = tail.iter().take_while(|&&s| s).count();
        assert_eq!(
            held, 14,
            "300 ms hangover = 15 frames including the loud one"
        );
        assert!(tail[held..].iter().all(|&s| !s));
    }

    #[test]
    fn steady_noise_stops_counting_as_speech_once_the_floor_adapts() {
        let mut vad = Vad::new(VadConfig::default());
        let mut seed = 7;
        let decisions: Vec<VadDecision> = (0..750)
            .map(|_| vad.process(&noise(0.03, 960, &mut seed)))
            .collect();
        assert!(
            decisions[0].speaking,
            "noise 40 dB above the initial floor starts as speech"
        );
        assert!(
            decisions[600..].iter().all(|d| !d.speaking),
            "after 12 s the floor has caught up"
        );
        assert!(
            (vad.noise_floor_db() - (-30.5)).abs() < 3.0,
            "{}",
            vad.noise_floor_db()
        );
    }

    #[test]
    fn speech_with_pauses_keeps_the_floor_low() {
        let mut vad = Vad::new(VadConfig::default());
        let mut seed = 3;
        let mut speaking_frames = 0;
        // 20 s of 400 ms words separated by 200 ms pauses over quiet noise.
        for i in 0..1000 {
            let word = i % 30 < 20;
            let frame = if word {
                tone(0.1, 960)
            } else {
                noise(0.001, 960, &mut seed)
            };
            if vad.process(&frame).speaking && word {
                speaking_frames += 1;
            }
        }
        assert!(
            speaking_frames >= 660,
            "speech frames detected: {speaking_frames}"
        );
        assert!(vad.noise_floor_db() < -45.0, "{}", vad.noise_floor_db());
    }

    #[test]
    fn digital_silence_is_never_speech_and_threshold_has_an_absolute_minimum() {
        let mut vad = Vad::new(VadConfig::default());
        for _ in 0..100 {
            let d = vad.process(&[0.0; 960]);
            assert!(!d.speaking);
            assert!(d.threshold_db >= -65.0);
        }
        assert!(
            !vad.process(&tone(0.0003, 960)).speaking,
            "-73 dBFS is below the minimum"
        );
    }

    #[test]
    fn threshold_margin_is_configurable() {
        let mut vad = Vad::new(VadConfig::default());
        for _ in 0..50 {
            vad.process(&[0.0; 960]);
        }
        vad.set_threshold_above_floor_db(110.0);
        assert!(!vad.process(&tone(0.1, 960)).loud);
        vad.set_threshold_above_floor_db(10.0);
        assert!(vad.process(&tone(0.1, 960)).loud);
    }
}
