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
/// Samples per short block (20 ms, one frame), for finding gaps.
const SHORT_SAMPLES: usize = 960;
const SHORT: Duration = Duration::from_millis(20);

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
    /// Amplitude per entry of `freqs` in each 20 ms of playout (from `start`).
    short: Vec<Vec<f32>>,
    short_pending: Vec<f32>,
    start: Duration,
}

impl Ear {
    /// Listens for the tones at `freqs` in output that starts at `start`.
    pub fn new(freqs: Vec<f32>, start: Duration) -> Self {
        Self {
            freqs,
            pending: Vec::with_capacity(BLOCK_SAMPLES),
            pending_start: start,
            blocks: Vec::new(),
            short: Vec::new(),
            short_pending: Vec::with_capacity(SHORT_SAMPLES),
            start,
        }
    }

    /// Played-out samples, in order, with no gaps.
    pub fn hear(&mut self, mut samples: &[f32]) {
        for chunk in samples.chunks(SHORT_SAMPLES) {
            let mut chunk = chunk;
            while !chunk.is_empty() {
                let take = (SHORT_SAMPLES - self.short_pending.len()).min(chunk.len());
                self.short_pending.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if self.short_pending.len() == SHORT_SAMPLES {
                    let amps = self
                        .freqs
                        .iter()
                        .map(|&hz| goertzel_amplitude(&self.short_pending, hz))
                        .collect();
                    self.short.push(amps);
                    self.short_pending.clear();
                }
            }
        }
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

    /// The longest run of 20 ms blocks within `from..to` in which the tone at `hz` is below a
    /// quarter of its median level there: the longest gap a listener would hear. `None` when
    /// nothing was measured in the window or `hz` is not a talker's.
    pub fn longest_gap(&self, hz: f32, from: Duration, to: Duration) -> Option<Duration> {
        let k = self.freqs.iter().position(|&f| f == hz)?;
        let first = from.saturating_sub(self.start).as_millis() / SHORT.as_millis();
        let last = to.saturating_sub(self.start).as_millis() / SHORT.as_millis();
        let levels: Vec<f32> = self
            .short
            .iter()
            .skip(first as usize)
            .take(last.saturating_sub(first) as usize)
            .map(|a| a[k])
            .collect();
        if levels.is_empty() {
            return None;
        }
        let mut sorted = levels.clone();
        sorted.sort_by(f32::total_cmp);
        let floor = sorted[sorted.len() / 2] / 4.0;
        let (mut run, mut longest) = (0u32, 0u32);
        for l in levels {
            run = if l < floor { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        Some(SHORT * longest)
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
        assert_eq!(
            ear.longest_gap(440.0, Duration::ZERO, all),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_gap_of_three_frames_is_found() {
        let mut ear = Ear::new(vec![440.0], Duration::ZERO);
        ear.hear(&tone(440.0, 24_000));
        ear.hear(&vec![0.0; 2_880]);
        ear.hear(&tone(440.0, 21_120));
        let all = Duration::from_secs(1);
        assert_eq!(
            ear.longest_gap(440.0, Duration::ZERO, all),
            Some(Duration::from_millis(60))
        );
    }
}
