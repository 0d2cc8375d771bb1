//! Signal level measurement shared by the VAD, the capture chain and the level meters.
//!
//! All functions are pure and allocation free. Levels are expressed in dBFS, where 0 dBFS is a
//! full-scale sample (amplitude 1.0). Digital silence is reported as [`SILENCE_DBFS`] instead of
//! minus infinity so that the values can be averaged, compared and displayed safely.

/// The level reported for digital silence (and anything quieter), in dBFS.
///
/// Using a finite floor keeps every level comparable and keeps NaN and infinities out of meters.
pub const SILENCE_DBFS: f32 = -120.0;

/// Root mean square of a frame; 0.0 for an empty frame. Non-finite samples count as 0.
pub fn rms(frame: &[f32]) -> f32 {
    if frame.is_empty() {
        return 0.0;
    }
    let sum: f64 = frame
        .iter()
        .map(|&s| {
            if s.is_finite() {
                f64::from(s) * f64::from(s)
            } else {
                0.0
            }
        })
        .sum();
    (sum / frame.len() as f64).sqrt() as f32
}

/// Largest absolute sample value of a frame; 0.0 for an empty frame. Non-finite samples count as 0.
pub fn peak(frame: &[f32]) -> f32 {
    frame
        .iter()
        .map(|&s| if s.is_finite() { s.abs() } else { 0.0 })
        .fold(0.0, f32::max)
}

/// Converts a linear amplitude to dBFS, clamped below at [`SILENCE_DBFS`].
pub fn amplitude_to_dbfs(amplitude: f32) -> f32 {
    if !amplitude.is_finite() || amplitude <= 0.0 {
        return SILENCE_DBFS;
    }
    (20.0 * amplitude.log10()).max(SILENCE_DBFS)
}

/// Converts a dBFS value back to a linear amplitude (`0 dBFS -> 1.0`, `-6.02 dBFS -> 0.5`).
pub fn dbfs_to_amplitude(db: f32) -> f32 {
    10f32.powf(db / 20.0)
}

/// RMS level of a frame in dBFS. A full-scale sine measures about -3 dBFS.
pub fn rms_dbfs(frame: &[f32]) -> f32 {
    amplitude_to_dbfs(rms(frame))
}

/// Peak level of a frame in dBFS.
pub fn peak_dbfs(frame: &[f32]) -> f32 {
    amplitude_to_dbfs(peak(frame))
}

/// A frame's RMS and peak levels together, for meters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameLevel {
    /// RMS level in dBFS.
    pub rms_db: f32,
    /// Peak level in dBFS; always `>= rms_db`.
    pub peak_db: f32,
}

impl FrameLevel {
    /// Measures both levels of a frame in one call.
    pub fn measure(frame: &[f32]) -> Self {
        Self {
            rms_db: rms_dbfs(frame),
            peak_db: peak_dbfs(frame),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(amplitude: f32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| amplitude * (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 48_000.0).sin())
            .collect()
    }

    #[test]
    fn full_scale_sine_measures_minus_three_dbfs_rms_and_zero_peak() {
        let s = sine(1.0, 960);
        assert!((rms_dbfs(&s) + 3.01).abs() < 0.05, "{}", rms_dbfs(&s));
        assert!(peak_dbfs(&s).abs() < 0.01);
    }

    #[test]
    fn half_amplitude_is_six_db_lower() {
        let full = rms_dbfs(&sine(1.0, 960));
        let half = rms_dbfs(&sine(0.5, 960));
        assert!((full - half - 6.02).abs() < 0.05);
    }

    #[test]
    fn silence_and_empty_frames_report_the_silence_floor() {
        assert_eq!(rms_dbfs(&[0.0; 480]), SILENCE_DBFS);
        assert_eq!(peak_dbfs(&[]), SILENCE_DBFS);
        assert_eq!(rms(&[]), 0.0);
    }

    #[test]
    fn non_finite_samples_do_not_poison_levels() {
        let level = FrameLevel::measure(&[f32::NAN, f32::INFINITY, 0.5, -0.5]);
        assert!(level.rms_db.is_finite() && level.peak_db.is_finite());
        assert!((level.peak_db - amplitude_to_dbfs(0.5)).abs() < 1e-4);
        assert!(level.peak_db >= level.rms_db);
    }

    #[test]
    fn dbfs_round_trips_through_amplitude() {
        for db in [-60.0f32, -20.0, -6.0, 0.0] {
            assert!((amplitude_to_dbfs(dbfs_to_amplitude(db)) - db).abs() < 1e-3);
        }
    }
}
