//! Sample-rate conversion between a device's rate and the internal 48 kHz, built on rubato.
//!
//! Used off the real-time callbacks only: on the engine thread for live streams and once at
//! load time for WAV files.

use rubato::{
    calculate_cutoff, FftFixedIn, Resampler, SincFixedIn, SincInterpolationParameters,
    SincInterpolationType, WindowFunction,
};

use super::AudioError;

/// Largest FFT block (in input frames) we accept before falling back to the sinc resampler.
/// Standard rate pairs (44.1k/48k, 16k/48k, 96k/48k...) stay far below it.
const MAX_FFT_BLOCK: usize = 8192;

enum Kernel {
    Passthrough,
    Fft(Box<FftFixedIn<f32>>),
    Sinc(Box<SincFixedIn<f32>>),
}

/// Streaming mono resampler that accepts input in pieces of any length.
///
/// Exists because rubato wants fixed-size blocks while devices and rings deliver whatever is
/// available. Invariants: all buffers are allocated in [`StreamResampler::new`], so
/// [`StreamResampler::process`] never allocates; when the rates are equal it is an exact
/// passthrough with zero delay.
pub struct StreamResampler {
    kernel: Kernel,
    from_hz: u32,
    to_hz: u32,
    pending: Vec<f32>,
    out: Vec<Vec<f32>>,
}

impl StreamResampler {
    /// A resampler from `from_hz` to `to_hz`, processing blocks of about `block_hint` input
    /// frames (smaller blocks mean less added latency).
    pub fn new(from_hz: u32, to_hz: u32, block_hint: usize) -> Result<Self, AudioError> {
        if from_hz == 0 || to_hz == 0 {
            return Err(AudioError::Resampler(format!(
                "invalid sample rates {from_hz} Hz -> {to_hz} Hz"
            )));
        }
        let block_hint = block_hint.max(16);
        let kernel = if from_hz == to_hz {
            Kernel::Passthrough
        } else {
            let gcd = gcd(from_hz as usize, to_hz as usize);
            let min_block = from_hz as usize / gcd;
            if min_block <= MAX_FFT_BLOCK {
                let fft =
                    FftFixedIn::<f32>::new(from_hz as usize, to_hz as usize, block_hint, 1, 1)
                        .map_err(|e| AudioError::Resampler(e.to_string()))?;
                Kernel::Fft(Box::new(fft))
            } else {
                let window = WindowFunction::BlackmanHarris2;
                let params = SincInterpolationParameters {
                    sinc_len: 128,
                    f_cutoff: calculate_cutoff(128, window),
                    interpolation: SincInterpolationType::Cubic,
                    oversampling_factor: 128,
                    window,
                };
                let ratio = f64::from(to_hz) / f64::from(from_hz);
                let sinc = SincFixedIn::<f32>::new(ratio, 1.0, params, block_hint, 1)
                    .map_err(|e| AudioError::Resampler(e.to_string()))?;
                Kernel::Sinc(Box::new(sinc))
            }
        };
        let (block_in, max_out) = match &kernel {
            Kernel::Passthrough => (0, 0),
            Kernel::Fft(r) => (r.input_frames_max(), r.output_frames_max()),
            Kernel::Sinc(r) => (r.input_frames_max(), r.output_frames_max()),
        };
        Ok(Self {
            kernel,
            from_hz,
            to_hz,
            pending: Vec::with_capacity(block_in),
            out: vec![vec![0.0; max_out]],
        })
    }

    /// Input rate in Hz.
    pub fn from_hz(&self) -> u32 {
        self.from_hz
    }

    /// Output rate in Hz.
    pub fn to_hz(&self) -> u32 {
        self.to_hz
    }

    /// True when input and output rates are equal and samples pass unchanged.
    pub fn is_passthrough(&self) -> bool {
        matches!(self.kernel, Kernel::Passthrough)
    }

    /// Output frames of delay the filter adds (0 for passthrough).
    pub fn delay_frames(&self) -> usize {
        match &self.kernel {
            Kernel::Passthrough => 0,
            Kernel::Fft(r) => r.output_delay(),
            Kernel::Sinc(r) => r.output_delay(),
        }
    }

    /// Feeds `input`; calls `emit` with each block of resampled output as it becomes ready.
    /// Input that does not fill a whole block is kept for the next call.
    pub fn process(&mut self, mut input: &[f32], mut emit: impl FnMut(&[f32])) {
        if let Kernel::Passthrough = self.kernel {
            if !input.is_empty() {
                emit(input);
            }
            return;
        }
        while !input.is_empty() {
            let need = match &self.kernel {
                Kernel::Passthrough => unreachable!("handled above"),
                Kernel::Fft(r) => r.input_frames_next(),
                Kernel::Sinc(r) => r.input_frames_next(),
            };
            let take = need.saturating_sub(self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < need {
                break;
            }
            let wave_in = [&self.pending[..]];
            let result = match &mut self.kernel {
                Kernel::Passthrough => unreachable!("handled above"),
                Kernel::Fft(r) => r.process_into_buffer(&wave_in, &mut self.out, None),
                Kernel::Sinc(r) => r.process_into_buffer(&wave_in, &mut self.out, None),
            };
            self.pending.clear();
            // Buffers are sized from the resampler itself, so an error here means a bug in the
            // sizing; dropping one block is the only real-time-friendly reaction.
            if let Ok((_, produced)) = result {
                emit(&self.out[0][..produced]);
            }
        }
    }

    /// Forgets buffered input and filter state (used when a stream restarts).
    pub fn reset(&mut self) {
        self.pending.clear();
        match &mut self.kernel {
            Kernel::Passthrough => {}
            Kernel::Fft(r) => r.reset(),
            Kernel::Sinc(r) => r.reset(),
        }
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Resamples a whole mono buffer from `from_hz` to `to_hz`, compensating the filter delay so
/// the output is time-aligned and `round(len * to / from)` samples long.
pub fn resample_buffer(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, AudioError> {
    if from_hz == to_hz {
        return Ok(samples.to_vec());
    }
    let mut rs = StreamResampler::new(from_hz, to_hz, 1024)?;
    let expected = ((samples.len() as u128 * u128::from(to_hz) + u128::from(from_hz) / 2)
        / u128::from(from_hz)) as usize;
    let delay = rs.delay_frames();
    let mut out = Vec::with_capacity(expected + delay + 4096);
    rs.process(samples, |block| out.extend_from_slice(block));
    let zeros = [0.0f32; 1024];
    while out.len() < expected + delay {
        rs.process(&zeros, |block| out.extend_from_slice(block));
    }
    out.drain(..delay);
    out.truncate(expected);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::tone::{goertzel_amplitude, ToneGenerator};
    use super::*;

    #[test]
    fn streaming_resampler_produces_output_at_the_rate_ratio() {
        for (from, to) in [
            (44_100u32, 48_000u32),
            (48_000, 44_100),
            (16_000, 48_000),
            (48_000, 96_000),
        ] {
            let mut rs = StreamResampler::new(from, to, 480).unwrap();
            let mut produced = 0usize;
            let input = vec![0.1f32; 333];
            let pieces = (from as usize * 2) / input.len(); // about two seconds of input
            for _ in 0..pieces {
                rs.process(&input, |b| produced += b.len());
            }
            let consumed = pieces * input.len();
            let expected = consumed as f64 * f64::from(to) / f64::from(from);
            // At most one block is still buffered inside the resampler.
            let slack = 2.0 * f64::from(to) * 0.05;
            assert!(
                (produced as f64 - expected).abs() <= slack,
                "{from}->{to}: produced {produced}, expected about {expected}"
            );
        }
    }

    #[test]
    fn equal_rates_pass_samples_through_unchanged() {
        let mut rs = StreamResampler::new(48_000, 48_000, 480).unwrap();
        assert!(rs.is_passthrough());
        let mut out = Vec::new();
        rs.process(&[0.25, -0.5, 0.75], |b| out.extend_from_slice(b));
        assert_eq!(out, vec![0.25, -0.5, 0.75]);
    }

    #[test]
    fn whole_buffer_resampling_keeps_length_and_tone_frequency() {
        let mut tone = ToneGenerator::new(1000.0, 0.5, 44_100);
        let mut input = vec![0.0f32; 44_100];
        tone.fill(&mut input);
        let out = resample_buffer(&input, 44_100, 48_000).unwrap();
        assert_eq!(out.len(), 48_000);
        let mid = &out[4800..43_200];
        let at_tone = goertzel_amplitude(mid, 1000.0, 48_000);
        let shifted = goertzel_amplitude(mid, 1000.0 * 44_100.0 / 48_000.0, 48_000);
        assert!(at_tone > 0.45, "tone amplitude {at_tone}");
        assert!(shifted < 0.05, "energy at the wrong frequency {shifted}");
    }

    #[test]
    fn odd_rate_pairs_fall_back_to_sinc_and_still_resample() {
        let out = resample_buffer(&vec![0.0f32; 44_101], 44_101, 48_000).unwrap();
        assert_eq!(out.len(), 48_000);
    }
}
