//! What a simulated user hears: the loudness of each talker's tone in the client's playout.
//!
//! Every talker speaks one pure tone of its own, so "who does Alice hear" is a Goertzel
//! filter per talker frequency over Alice's mixed output. The output is measured in 100 ms
//! blocks, short enough to see a tone start and stop, long enough that the phase jumps a
//! jitter buffer causes when it stretches or drops a frame do not matter.

use std::time::Duration;

use super::SAMPLE_RATE;

/// Samples per measured block (100 ms at 48 kHz).
pub const BLOCK_SAMPLES: usize = 4_800;
const BLOCK: Duration = Duration::from_millis(100);

/// Amplitude (0..1 of full scale) of a pure tone at `hz` in `samples` (48 kHz).
pub fn goertzel_amplitude(samples: &[f32], hz: f32) -> f32 {
    crate::audio::goertzel_amplitude(samples, hz, SAMPLE_RATE)
}

/// One client's ears: tone amplitudes of every talker frequency per 100 ms of its playout.
#[derive(Debug, Clone)]
pub struct Ear {
    freqs: Vec<f32>,
    pending: Vec<f32>,
    /// Start of the block being filled.
    pending_start: Duration,
    /// (block start, amplitude per entry of `freqs`).
    blocks: Vec<(Duration, Vec<f32>)>,
}

impl Ear {
    /// Listens for the tones at `freqs` in output that starts at `start`.
    pub fn new(freqs: Vec<f32>, start: Duration) -> Self {
        Self {
            freqs,
            pending: Vec::with_capacity(BLOCK_SAMPLES),
            pending_start: start,
            blocks: Vec::new(),
        }
    }

    /// Played-out samples, in order, with no gaps.
    pub fn hear(&mut self, mut samples: &[f32]) {
        while !samples.is_empty() {
            let take = (BLOCK_SAMPLES - self.pending.len()).min(samples.len());
            self.pending.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.pending.len() == BLOCK_SAMPLES {
                let amps = self
                    .freqs
                    .iter()
                    .map(|&hz| goertzel_amplitude(&self.pending, hz))
                    .collect();
                self.blocks.push((self.pending_start, amps));
                self.pending.clear();
                self.pending_start += BLOCK;
            }
        }
    }

    /// Mean amplitude of the tone at `hz` over the blocks that lie within `from..to`; `None`
    /// when no measured block does (a window too short, or not played yet) or `hz` is not a
    /// talker's, so that "not heard" can never hold for want of measurements.
    pub fn level(&self, hz: f32, from: Duration, to: Duration) -> Option<f32> {
        let k = self.freqs.iter().position(|&f| f == hz)?;
        let within: Vec<f32> = self
            .blocks
            .iter()
            .filter(|(start, _)| *start >= from && *start + BLOCK <= to)
            .map(|(_, amps)| amps[k])
            .collect();
        if within.is_empty() {
            return None;
        }
        Some(within.iter().sum::<f32>() / within.len() as f32)
    }

    /// Every block measured so far: (start, amplitude per talker frequency).
    pub fn blocks(&self) -> &[(Duration, Vec<f32>)] {
        &self.blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hz: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| 0.3 * (i as f32 * hz * std::f32::consts::TAU / SAMPLE_RATE as f32).sin())
            .collect()
    }

    #[test]
    fn an_ear_tells_two_tones_apart() {
        let mut ear = Ear::new(vec![440.0, 660.0], Duration::ZERO);
        ear.hear(&tone(440.0, 48_000));
        let all = Duration::from_secs(1);
        assert!((ear.level(440.0, Duration::ZERO, all).unwrap() - 0.3).abs() < 0.02);
        assert!(ear.level(660.0, Duration::ZERO, all).unwrap() < 0.01);
        assert_eq!(
            ear.level(440.0, all, all + BLOCK / 2),
            None,
            "nothing measured"
        );
        assert_eq!(ear.blocks().len(), 10);
    }
}
