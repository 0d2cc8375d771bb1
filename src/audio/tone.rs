//! Sine tone generator (a virtual microphone) and a Goertzel detector to find a tone again.

use std::f64::consts::TAU;

/// Phase-continuous sine generator.
///
/// Exists as a test and demo input that behaves like a microphone playing a steady tone.
/// Invariant: the phase stays in `[0, 1)`, so it never loses precision over long runs.
#[derive(Debug, Clone)]
pub struct ToneGenerator {
    phase: f64,
    step: f64,
    amplitude: f32,
}

impl ToneGenerator {
    /// A tone of `hz` at `sample_rate`, peak `amplitude` (clamped to `[0, 1]`).
    pub fn new(hz: f32, amplitude: f32, sample_rate: u32) -> Self {
        Self {
            phase: 0.0,
            step: f64::from(hz) / f64::from(sample_rate.max(1)),
            amplitude: amplitude.clamp(0.0, 1.0),
        }
    }

    /// Overwrites `out` with the next samples of the tone.
    pub fn fill(&mut self, out: &mut [f32]) {
        for s in out {
            *s = self.amplitude * (self.phase * TAU).sin() as f32;
            self.phase = (self.phase + self.step).fract();
        }
    }
}

/// Estimates the amplitude of the `hz` component of `samples` with the Goertzel algorithm.
///
/// A pure sine of peak `A` at exactly `hz` yields about `A`; other frequencies yield much less
/// (how much less depends on the window length). Returns 0 for an empty slice.
pub fn goertzel_amplitude(samples: &[f32], hz: f32, sample_rate: u32) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let w = TAU * f64::from(hz) / f64::from(sample_rate.max(1));
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    (2.0 * power.max(0.0).sqrt() / samples.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rising_zero_crossings(samples: &[f32]) -> usize {
        samples
            .windows(2)
            .filter(|w| w[0] < 0.0 && w[1] >= 0.0)
            .count()
    }

    #[test]
    fn tone_of_440_hz_has_440_rising_zero_crossings_per_second() {
        let mut tone = ToneGenerator::new(440.0, 0.5, 48_000);
        let mut second = vec![0.0f32; 48_000];
        // Fill in uneven pieces to prove the phase carries across calls.
        let (a, b) = second.split_at_mut(12_345);
        tone.fill(a);
        tone.fill(b);
        let crossings = rising_zero_crossings(&second);
        assert!((439..=441).contains(&crossings), "{crossings} crossings");
        let peak = second.iter().fold(0.0f32, |m, s| m.max(s.abs()));
        assert!((peak - 0.5).abs() < 0.01, "peak {peak}");
    }

    #[test]
    fn goertzel_finds_the_generated_tone_and_not_a_different_one() {
        let mut tone = ToneGenerator::new(1000.0, 0.8, 48_000);
        let mut buf = vec![0.0f32; 4800];
        tone.fill(&mut buf);
        let at_tone = goertzel_amplitude(&buf, 1000.0, 48_000);
        let elsewhere = goertzel_amplitude(&buf, 1500.0, 48_000);
        assert!((at_tone - 0.8).abs() < 0.05, "amplitude {at_tone}");
        assert!(elsewhere < 0.05, "leak {elsewhere}");
    }
}
