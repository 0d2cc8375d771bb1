//! The parts of the capture chain that WebRTC's audio processing module does best: a high-pass
//! filter, the AEC3 echo canceller and the AGC2 gain controller, through `sonora` (a pure-Rust
//! port of that module). Noise suppression stays with RNNoise in the capture chain, between the
//! echo canceller and the gain controller, because it scored better on speech in noise (see
//! `benches/echo.rs` and docs/BENCHMARKS.md).
//!
//! Why two sonora instances: the module runs its stages in one fixed order (high-pass, echo,
//! noise, gain) inside one call, and our chain needs RNNoise between echo and gain. The first
//! instance holds the high-pass filter and the echo canceller, the second only the gain
//! controller; each exists only while one of its stages is on.
//!
//! The echo reference is the mix handed to the speaker ([`EchoAndGain::analyze_render`], called
//! by the engine with each 10 ms chunk it plays out), so whatever the user hears from every
//! peer is what gets taken out of the microphone. AEC3 finds the delay between the two itself
//! (its matched filters cover about half a second: the playback queue, the device buffers and
//! the room together).
//!
//! Works on 48 kHz mono in 10 ms chunks; a capture frame is any whole number of them. Changing
//! a setting builds a new instance (a rare user action); processing itself reuses buffers.

use sonora::config::{AdaptiveDigital, EchoCanceller, GainController2, HighPassFilter};
use sonora::{AudioProcessing, Config, StreamConfig};

/// Samples in one 10 ms chunk at 48 kHz: the unit sonora processes.
pub const CHUNK: usize = 480;

const RATE_HZ: u32 = 48_000;

/// Which stages run (none by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessingConfig {
    /// Remove the speaker's sound from the microphone (AEC3).
    pub echo_cancel: bool,
    /// Bring the voice to a steady level (AGC2 adaptive digital gain with its limiter).
    pub gain_control: bool,
    /// Take out rumble and DC below about 80 Hz.
    pub high_pass: bool,
}

impl ProcessingConfig {
    /// Everything on.
    pub const ALL: Self = Self {
        echo_cancel: true,
        gain_control: true,
        high_pass: true,
    };

    /// What a real microphone gets by default: echo cancellation and gain control. Not the
    /// high-pass filter: WebRTC's (a steep 6th-order filter at about 90 Hz with notches at 35
    /// and 47 Hz) cost 0.2-0.4 PESQ-WB on clean recorded speech on its own and 0.3 in the
    /// whole chain through the binary (3.79 against 4.06; benches/echo.rs and
    /// benches/voice_quality.rs, docs/BENCHMARKS.md), more than the rumble it removes is worth
    /// to most users; it is one switch away for a desk with a thumping fan.
    pub const MICROPHONE: Self = Self {
        echo_cancel: true,
        gain_control: true,
        high_pass: false,
    };

    /// Everything off: what WAV files and tones get by default (they carry no room, no
    /// speaker and a level that was chosen on purpose).
    pub const NONE: Self = Self {
        echo_cancel: false,
        gain_control: false,
        high_pass: false,
    };
}

/// What the echo canceller reports about itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EchoStats {
    /// Echo return loss enhancement, dB: how much the canceller takes out of the echo.
    pub erle_db: f32,
    /// The delay it found between what was played and its echo in the microphone, ms.
    pub delay_ms: i32,
}

/// The high-pass filter, echo canceller and gain controller of one capture stream.
pub struct EchoAndGain {
    cfg: ProcessingConfig,
    /// High-pass filter and echo canceller (absent while both are off).
    front: Option<AudioProcessing>,
    /// Gain controller (absent while it is off).
    back: Option<AudioProcessing>,
    scratch: Vec<f32>,
}

impl std::fmt::Debug for EchoAndGain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoAndGain")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl EchoAndGain {
    /// Builds the stages `cfg` turns on.
    pub fn new(cfg: ProcessingConfig) -> Self {
        Self {
            cfg,
            front: build_front(cfg),
            back: build_back(cfg),
            scratch: vec![0.0; CHUNK],
        }
    }

    /// The stages that run now.
    pub fn config(&self) -> ProcessingConfig {
        self.cfg
    }

    /// Turns stages on or off. A stage group whose settings change starts fresh (an echo
    /// canceller switched back on adapts again within a second or two).
    pub fn set_config(&mut self, cfg: ProcessingConfig) {
        if cfg == self.cfg {
            return;
        }
        if (cfg.echo_cancel, cfg.high_pass) != (self.cfg.echo_cancel, self.cfg.high_pass) {
            self.front = build_front(cfg);
        }
        if cfg.gain_control != self.cfg.gain_control {
            self.back = build_back(cfg);
        }
        self.cfg = cfg;
    }

    /// Tells the echo canceller what is being played (the final mix, any whole number of
    /// 10 ms chunks). Does nothing while echo cancellation is off.
    pub fn analyze_render(&mut self, played: &[f32]) {
        if !self.cfg.echo_cancel {
            return;
        }
        let Some(apm) = self.front.as_mut() else {
            return;
        };
        for chunk in played.chunks_exact(CHUNK) {
            // The render output is unused (no render processing is configured); the call
            // can only fail on a stream format we never pass.
            let _ = apm.process_render_f32(&[chunk], &mut [&mut self.scratch[..]]);
        }
    }

    /// High-pass filter and echo cancellation, in place (any whole number of 10 ms chunks).
    pub fn process_front(&mut self, samples: &mut [f32]) {
        if let Some(apm) = self.front.as_mut() {
            run_in_place(apm, samples, &mut self.scratch);
        }
    }

    /// Gain control, in place (any whole number of 10 ms chunks).
    pub fn process_back(&mut self, samples: &mut [f32]) {
        if let Some(apm) = self.back.as_mut() {
            run_in_place(apm, samples, &mut self.scratch);
        }
    }

    /// The echo canceller's own figures, while it runs and once it has some.
    pub fn echo_stats(&self) -> Option<EchoStats> {
        if !self.cfg.echo_cancel {
            return None;
        }
        let stats = self.front.as_ref()?.statistics();
        Some(EchoStats {
            erle_db: stats.echo_return_loss_enhancement? as f32,
            delay_ms: stats.delay_ms?,
        })
    }
}

fn run_in_place(apm: &mut AudioProcessing, samples: &mut [f32], scratch: &mut [f32]) {
    for chunk in samples.chunks_exact_mut(CHUNK) {
        if apm
            .process_capture_f32(&[&chunk[..]], &mut [&mut scratch[..]])
            .is_ok()
        {
            chunk.copy_from_slice(scratch);
        }
    }
}

fn build_front(cfg: ProcessingConfig) -> Option<AudioProcessing> {
    if !cfg.echo_cancel && !cfg.high_pass {
        return None;
    }
    let config = Config {
        high_pass_filter: cfg.high_pass.then(HighPassFilter::default),
        echo_canceller: cfg.echo_cancel.then(|| EchoCanceller {
            // The user switches the high-pass filter on its own.
            enforce_high_pass_filtering: cfg.high_pass,
            ..EchoCanceller::default()
        }),
        ..Config::default()
    };
    Some(build(config))
}

fn build_back(cfg: ProcessingConfig) -> Option<AudioProcessing> {
    if !cfg.gain_control {
        return None;
    }
    let config = Config {
        gain_controller2: Some(GainController2 {
            // We cannot move the system's microphone volume; only the digital gain.
            input_volume_controller: false,
            adaptive_digital: Some(AdaptiveDigital {
                // A voice at a normal level needs little; start neutral rather than loud.
                initial_gain_db: 0.0,
                max_gain_db: 30.0,
                ..AdaptiveDigital::default()
            }),
            ..GainController2::default()
        }),
        ..Config::default()
    };
    Some(build(config))
}

fn build(config: Config) -> AudioProcessing {
    let stream = StreamConfig::new(RATE_HZ, 1);
    AudioProcessing::builder()
        .config(config)
        .capture_config(stream)
        .render_config(stream)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Speech-like noise: white noise under a syllable-rate envelope, so the canceller sees
    /// the pauses and level changes of speech.
    fn far_end(samples: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..samples)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let noise = s as f32 / u32::MAX as f32 * 2.0 - 1.0;
                let t = i as f32 / RATE_HZ as f32;
                let syllables = (0.5 + 0.5 * (t * 2.0 * std::f32::consts::PI * 3.0).sin()).powi(2);
                noise * 0.25 * syllables
            })
            .collect()
    }

    /// Voiced speech, as a voice detector hears it: a glottal pulse train with vibrato
    /// (110-130 Hz) through three formant resonators that glide between two vowels, in
    /// syllables.
    fn vowels(samples: usize) -> Vec<f32> {
        let fs = RATE_HZ as f32;
        let mut phase = 0.0f32;
        // Two-pole resonators: (state1, state2) per formant.
        let mut state = [(0.0f32, 0.0f32); 3];
        (0..samples)
            .map(|i| {
                let t = i as f32 / fs;
                let pitch = 120.0 + 10.0 * (t * 2.0 * std::f32::consts::PI * 0.7).sin();
                phase += pitch / fs;
                let pulse = if phase >= 1.0 {
                    phase -= 1.0;
                    1.0
                } else {
                    0.0
                };
                let glide = 0.5 + 0.5 * (t * 2.0 * std::f32::consts::PI * 0.4).sin();
                let formants = [
                    (700.0 - 400.0 * glide, 80.0),
                    (1200.0 + 1000.0 * glide, 100.0),
                    (2600.0, 150.0),
                ];
                let mut y = 0.0;
                for ((f, bw), (s1, s2)) in formants.iter().zip(state.iter_mut()) {
                    let r = (-std::f32::consts::PI * bw / fs).exp();
                    let a1 = 2.0 * r * (2.0 * std::f32::consts::PI * f / fs).cos();
                    let out = pulse + a1 * *s1 - r * r * *s2;
                    *s2 = *s1;
                    *s1 = out;
                    y += out * (1.0 - r);
                }
                let syllables = (0.5 + 0.5 * (t * 2.0 * std::f32::consts::PI * 2.5).sin()).powi(2);
                y * syllables
            })
            .collect()
    }

    /// A room: the far end delayed by `delay_ms`, through a decaying impulse response, 6 dB
    /// quieter.
    fn echo_of(far: &[f32], delay_ms: usize) -> Vec<f32> {
        let delay = delay_ms * RATE_HZ as usize / 1000;
        let taps: Vec<(usize, f32)> = (0..12)
            .map(|k| (delay + k * 97, 0.5 * (-(k as f32) / 3.0).exp()))
            .collect();
        (0..far.len())
            .map(|n| {
                taps.iter()
                    .filter(|(d, _)| n >= *d)
                    .map(|(d, g)| far[n - d] * g)
                    .sum()
            })
            .collect()
    }

    fn power(x: &[f32]) -> f32 {
        x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32
    }

    /// Plays `far` to the canceller and captures `mic`, frame by frame as the engine does
    /// (render first, then capture), returning what comes out of the microphone side.
    fn run(stage: &mut EchoAndGain, far: &[f32], mic: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(mic.len());
        for (f, m) in far.chunks_exact(960).zip(mic.chunks_exact(960)) {
            stage.analyze_render(f);
            let mut frame = m.to_vec();
            stage.process_front(&mut frame);
            stage.process_back(&mut frame);
            out.extend_from_slice(&frame);
        }
        out
    }

    #[test]
    fn the_chunk_is_the_audio_layers_chunk() {
        assert_eq!(CHUNK, crate::audio::CHUNK_SAMPLES);
    }

    #[test]
    fn echo_on_a_simulated_room_path_is_taken_out_by_at_least_20_db() {
        let secs = 8;
        let far = far_end(RATE_HZ as usize * secs, 7);
        let mic = echo_of(&far, 80);
        let mut on = EchoAndGain::new(ProcessingConfig {
            echo_cancel: true,
            ..ProcessingConfig::NONE
        });
        let out = run(&mut on, &far, &mic);
        // After the canceller has converged (the last 4 s).
        let tail = RATE_HZ as usize * 4;
        let erle = 10.0 * (power(&mic[tail..]) / power(&out[tail..]).max(1e-12)).log10();
        assert!(erle >= 20.0, "echo reduced by only {erle:.1} dB");
        let stats = on.echo_stats().expect("the canceller reports figures");
        assert!(stats.delay_ms >= 60 && stats.delay_ms <= 110, "{stats:?}");

        // The same path with the canceller off leaves the echo as it was.
        let mut off = EchoAndGain::new(ProcessingConfig::NONE);
        let out = run(&mut off, &far, &mic);
        let erle_off = 10.0 * (power(&mic[tail..]) / power(&out[tail..]).max(1e-12)).log10();
        assert!(erle_off.abs() < 0.5, "{erle_off:.1} dB without a canceller");
        assert!(off.echo_stats().is_none());
    }

    #[test]
    fn the_near_talker_survives_while_the_far_end_talks() {
        let secs = 8;
        let far = far_end(RATE_HZ as usize * secs, 11);
        let echo = echo_of(&far, 120);
        // The near talker: a 300 Hz tone at -20 dBFS, from the fourth second on.
        let start = RATE_HZ as usize * 4;
        let near: Vec<f32> = (0..far.len())
            .map(|n| {
                if n < start {
                    0.0
                } else {
                    0.1 * (n as f32 * 2.0 * std::f32::consts::PI * 300.0 / RATE_HZ as f32).sin()
                }
            })
            .collect();
        let mic: Vec<f32> = echo.iter().zip(&near).map(|(e, n)| e + n).collect();
        let mut stage = EchoAndGain::new(ProcessingConfig {
            echo_cancel: true,
            ..ProcessingConfig::NONE
        });
        let out = run(&mut stage, &far, &mic);
        let near_power = power(&near[start + 24_000..]);
        let out_power = power(&out[start + 24_000..]);
        let loss_db = 10.0 * (near_power / out_power.max(1e-12)).log10();
        assert!(
            loss_db < 6.0,
            "the near talker lost {loss_db:.1} dB in double talk"
        );
    }

    #[test]
    fn gain_control_lifts_a_quiet_voice_and_leaves_silence_alone() {
        let secs = 10;
        let quiet: Vec<f32> = vowels(RATE_HZ as usize * secs)
            .iter()
            .map(|v| v * 0.5)
            .collect();
        let mut stage = EchoAndGain::new(ProcessingConfig {
            gain_control: true,
            ..ProcessingConfig::NONE
        });
        let silence = vec![0.0; quiet.len()];
        let out = run(&mut stage, &silence, &quiet);
        let tail = RATE_HZ as usize * 6;
        let gain_db = 10.0 * (power(&out[tail..]) / power(&quiet[tail..])).log10();
        let level = 10.0 * power(&quiet[tail..]).log10();
        eprintln!("input {level:.1} dBFS, gain {gain_db:.1} dB");
        assert!(gain_db > 6.0, "a quiet voice gained only {gain_db:.1} dB");
        assert!(out.iter().all(|v| v.abs() <= 1.0));

        let mut stage = EchoAndGain::new(ProcessingConfig {
            gain_control: true,
            ..ProcessingConfig::NONE
        });
        let out = run(&mut stage, &silence, &silence);
        assert!(power(&out) < 1e-8);
    }

    #[test]
    fn switching_stages_takes_effect_and_an_unchanged_config_keeps_the_state() {
        let mut stage = EchoAndGain::new(ProcessingConfig::NONE);
        let mut frame: Vec<f32> = (0..960)
            .map(|n| 0.2 + (n as f32 * 0.01).sin() * 0.1)
            .collect();
        let before = frame.clone();
        stage.process_front(&mut frame);
        assert_eq!(frame, before, "nothing runs while everything is off");

        stage.set_config(ProcessingConfig {
            high_pass: true,
            ..ProcessingConfig::NONE
        });
        // A DC offset is what a high-pass filter removes.
        let mut out = Vec::new();
        for _ in 0..50 {
            let mut frame = vec![0.2f32; 960];
            stage.process_front(&mut frame);
            out = frame;
        }
        let mean = out.iter().sum::<f32>() / out.len() as f32;
        assert!(mean.abs() < 0.02, "DC left after the high-pass: {mean}");
        assert!(stage.config().high_pass);
    }
}
