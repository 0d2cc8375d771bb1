//! The microphone side of the voice plane: per input frame, the high-pass filter and echo
//! cancellation, noise suppression, gain control, voice activity detection, mute and
//! push-to-talk, deciding which frames to encode and send (in that order: the echo must be gone
//! before the noise suppressor and the gain controller judge the signal, and the voice detector
//! judges the level that will be sent).
//!
//! When voice activity starts, the last ~60 ms of frames that were not sent (the pre-roll) are
//! released before the current one, so word onsets that were still under the threshold survive.
//! Every frame carries its capture index so the caller can stamp it with the right timestamp
//! (`index * frame samples`): the pre-roll frames are older than the current one, and frames
//! not sent leave a timestamp gap that the receiver plays as silence.
//!
//! Noise suppression uses nnnoiseless (RNNoise), which works on 10 ms frames of 48 kHz samples in
//! the i16 range and adds 10 ms of latency. All buffers are allocated at construction; turning
//! suppression back on allocates a fresh suppressor state (a rare user action).

use std::time::Duration;

use nnnoiseless::DenoiseState;

use super::levels::{rms, rms_dbfs};
use super::processing::{EchoAndGain, EchoStats, ProcessingConfig};
use super::vad::{Vad, VadConfig};
use crate::voice::codec::FrameDuration;

/// Most pre-roll frames a chain can hold (60 ms of 10 ms frames).
pub const MAX_PREROLL_FRAMES: usize = 6;

/// Most frames one `process` call can release: the pre-roll plus the current frame.
pub const MAX_FRAMES_PER_OUTPUT: usize = MAX_PREROLL_FRAMES + 1;

const DENOISE_FRAME: usize = DenoiseState::FRAME_SIZE;
const I16_SCALE: f32 = 32_767.0;

/// When captured audio is transmitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransmitMode {
    /// Send while the voice activity detector hears speech (plus pre-roll and hangover).
    #[default]
    VoiceActivity,
    /// Send while the push-to-talk key is held (plus a short release tail), whatever the level.
    PushToTalk,
}

/// Settings of a [`CaptureChain`].
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureConfig {
    /// Frame duration of the input frames.
    pub frame: FrameDuration,
    /// Noise suppression at start (can be toggled later).
    pub denoise: bool,
    /// High-pass filter, echo cancellation and gain control at start (each can be toggled
    /// later).
    pub processing: ProcessingConfig,
    /// Voice activity detector tuning.
    pub vad: VadConfig,
    /// Audio released before a detected speech onset (at most [`MAX_PREROLL_FRAMES`] frames).
    pub preroll: Duration,
    /// The pre-roll is released only when the previous talkspurt ended at least this long
    /// ago. After a shorter pause the receivers are still playing the previous talkspurt
    /// (they wait [`JitterConfig::idle_after`](crate::voice::rx::jitter::JitterConfig) for
    /// more before they give up) and have already played those frames' time: the pre-roll
    /// would arrive late, and be counted as late. The onset frame alone arrives on time.
    pub preroll_after_pause: Duration,
    /// Voice activity or push-to-talk.
    pub mode: TransmitMode,
    /// How long sending continues after the push-to-talk key is released.
    pub ptt_release_tail: Duration,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self::for_frame(FrameDuration::Ms20)
    }
}

impl CaptureConfig {
    /// Defaults for the given frame duration.
    pub fn for_frame(frame: FrameDuration) -> Self {
        Self {
            frame,
            denoise: true,
            processing: ProcessingConfig::MICROPHONE,
            vad: VadConfig::for_frame(frame),
            preroll: Duration::from_millis(60),
            // Longer than the receivers' 200 ms idle_after, plus their delay.
            preroll_after_pause: Duration::from_millis(300),
            mode: TransmitMode::VoiceActivity,
            ptt_release_tail: Duration::from_millis(100),
        }
    }
}

/// One frame to encode and send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CapturedFrame<'a> {
    /// Capture index of the frame (0 for the first frame ever processed); its timestamp is
    /// `index * frame samples`.
    pub index: u64,
    /// The processed (noise-suppressed) samples.
    pub samples: &'a [f32],
}

/// Result of processing one input frame.
#[derive(Debug, Clone, Copy)]
pub struct CaptureOutput<'a> {
    history: &'a [Entry],
    to_send: [usize; MAX_FRAMES_PER_OUTPUT],
    to_send_len: usize,
    /// Level of the processed frame, dBFS (for the input meter).
    pub level_db: f32,
    /// The voice activity detector hears speech (also while muted, for a "you are muted" hint).
    pub speaking: bool,
    /// Level the VAD compared against, dBFS.
    pub threshold_db: f32,
    /// Frames are being sent (a talkspurt is in progress).
    pub transmitting: bool,
    /// This frame starts a talkspurt (the first frames released follow a pause).
    pub talkspurt_start: bool,
    /// Mean square of the frame just after echo cancellation (and the high-pass filter),
    /// before noise suppression: what the echo test compares with the raw microphone.
    pub after_echo_power: f32,
}

impl<'a> CaptureOutput<'a> {
    /// Frames to encode and send, oldest first (pre-roll before the current frame).
    pub fn frames(&self) -> impl ExactSizeIterator<Item = CapturedFrame<'a>> + '_ {
        let history = self.history;
        self.to_send[..self.to_send_len]
            .iter()
            .map(move |&i| CapturedFrame {
                index: history[i].index,
                samples: &history[i].samples,
            })
    }

    /// Number of frames to send.
    pub fn frame_count(&self) -> usize {
        self.to_send_len
    }
}

#[derive(Debug, Clone)]
struct Entry {
    index: u64,
    samples: Vec<f32>,
    /// Captured while unmuted and not yet sent, so it may be released as pre-roll.
    preroll_ok: bool,
}

/// Per-stream capture processing. See the module documentation.
///
/// Invariants: a frame is released at most once; nothing captured while muted is ever released;
/// no allocation per frame.
pub struct CaptureChain {
    cfg: CaptureConfig,
    denoiser: Box<DenoiseState<'static>>,
    denoise: bool,
    processing: EchoAndGain,
    vad: Vad,
    muted: bool,
    ptt_pressed: bool,
    ptt_released_at: Option<Duration>,
    history: Vec<Entry>,
    head: usize,
    next_index: u64,
    transmitting: bool,
    /// Capture index of the last frame released, if any.
    last_sent: Option<u64>,
    preroll_frames: usize,
    scratch_in: [f32; DENOISE_FRAME],
    scratch_out: [f32; DENOISE_FRAME],
}

impl CaptureChain {
    /// Creates a chain.
    pub fn new(cfg: CaptureConfig) -> Self {
        let frame_ms = cfg.frame.millis() as u128;
        let preroll_frames =
            (cfg.preroll.as_millis().div_ceil(frame_ms) as usize).min(MAX_PREROLL_FRAMES);
        let samples = cfg.frame.samples();
        let mut vad_cfg = cfg.vad.clone();
        vad_cfg.frame = cfg.frame;
        let history = (0..=preroll_frames)
            .map(|_| Entry {
                index: 0,
                samples: vec![0.0; samples],
                preroll_ok: false,
            })
            .collect();
        Self {
            denoiser: DenoiseState::new(),
            denoise: cfg.denoise,
            processing: EchoAndGain::new(cfg.processing),
            vad: Vad::new(vad_cfg),
            muted: false,
            ptt_pressed: false,
            ptt_released_at: None,
            history,
            head: 0,
            next_index: 0,
            transmitting: false,
            last_sent: None,
            preroll_frames,
            scratch_in: [0.0; DENOISE_FRAME],
            scratch_out: [0.0; DENOISE_FRAME],
            cfg,
        }
    }

    /// The frame duration `process` expects.
    pub fn frame_duration(&self) -> FrameDuration {
        self.cfg.frame
    }

    /// Turns noise suppression on or off (takes effect with the next frame).
    pub fn set_denoise(&mut self, on: bool) {
        if on && !self.denoise {
            // Start clean rather than replaying the audio held from before it was turned off.
            self.denoiser = DenoiseState::new();
        }
        self.denoise = on;
    }

    /// Whether noise suppression is on.
    pub fn denoise(&self) -> bool {
        self.denoise
    }

    /// Turns the high-pass filter, echo cancellation and gain control on or off.
    pub fn set_processing(&mut self, cfg: ProcessingConfig) {
        self.processing.set_config(cfg);
    }

    /// Which of the high-pass filter, echo cancellation and gain control run.
    pub fn processing(&self) -> ProcessingConfig {
        self.processing.config()
    }

    /// Tells the echo canceller what is being played: the final mix, as it goes to the
    /// speaker (any whole number of 10 ms chunks).
    pub fn analyze_render(&mut self, played: &[f32]) {
        self.processing.analyze_render(played);
    }

    /// The echo canceller's figures, while it runs.
    pub fn echo_stats(&self) -> Option<EchoStats> {
        self.processing.echo_stats()
    }

    /// Mutes the microphone: nothing is sent while muted.
    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    /// Whether the microphone is muted.
    pub fn is_muted(&self) -> bool {
        self.muted
    }

    /// Switches between voice activity and push-to-talk.
    pub fn set_mode(&mut self, mode: TransmitMode) {
        self.cfg.mode = mode;
    }

    /// The current transmit mode.
    pub fn mode(&self) -> TransmitMode {
        self.cfg.mode
    }

    /// Push-to-talk key state, with the time of the change.
    pub fn set_ptt_pressed(&mut self, now: Duration, pressed: bool) {
        if self.ptt_pressed && !pressed {
            self.ptt_released_at = Some(now);
        }
        self.ptt_pressed = pressed;
    }

    /// Changes the VAD margin above the noise floor, in dB.
    pub fn set_vad_threshold_db(&mut self, db: f32) {
        self.vad.set_threshold_above_floor_db(db);
    }

    /// The voice-activity threshold now, dBFS.
    pub fn vad_threshold_db(&self) -> f32 {
        self.vad.threshold_db()
    }

    /// Processes one captured frame at time `now`.
    ///
    /// # Panics
    /// If `input.len()` is not exactly one frame (a wiring bug).
    pub fn process(&mut self, now: Duration, input: &[f32]) -> CaptureOutput<'_> {
        let samples = self.cfg.frame.samples();
        assert_eq!(
            input.len(),
            samples,
            "capture needs exactly one frame of samples"
        );

        let slot = self.head;
        self.head = (self.head + 1) % self.history.len();
        let index = self.next_index;
        self.next_index += 1;
        let after_echo_power;
        {
            let entry = &mut self.history[slot];
            entry.index = index;
            for (dst, &s) in entry.samples.iter_mut().zip(input) {
                *dst = if s.is_finite() {
                    s.clamp(-1.0, 1.0)
                } else {
                    0.0
                };
            }
            self.processing.process_front(&mut entry.samples);
            after_echo_power = rms(&entry.samples).powi(2);
            if self.denoise {
                for chunk in entry.samples.chunks_mut(DENOISE_FRAME) {
                    for (dst, &s) in self.scratch_in.iter_mut().zip(chunk.iter()) {
                        *dst = s * I16_SCALE;
                    }
                    self.denoiser
                        .process_frame(&mut self.scratch_out, &self.scratch_in);
                    for (dst, &s) in chunk.iter_mut().zip(&self.scratch_out) {
                        *dst = (s / I16_SCALE).clamp(-1.0, 1.0);
                    }
                }
            }
            self.processing.process_back(&mut entry.samples);
        }

        let level_db = rms_dbfs(&self.history[slot].samples);
        let decision = self.vad.process_level(level_db);

        let wants_to_send = match self.cfg.mode {
            TransmitMode::VoiceActivity => decision.speaking,
            TransmitMode::PushToTalk => {
                self.ptt_pressed
                    || self
                        .ptt_released_at
                        .is_some_and(|t| now.saturating_sub(t) < self.cfg.ptt_release_tail)
            }
        };
        let send = wants_to_send && !self.muted;
        let talkspurt_start = send && !self.transmitting;

        let mut to_send = [0usize; MAX_FRAMES_PER_OUTPUT];
        let mut to_send_len = 0;
        let frame_ms = self.cfg.frame.millis();
        let pause_frames = self.cfg.preroll_after_pause.as_millis() as u64 / frame_ms.max(1);
        let long_pause = self
            .last_sent
            .is_none_or(|last| index - last > pause_frames);
        if talkspurt_start && self.cfg.mode == TransmitMode::VoiceActivity && long_pause {
            // Oldest first: walk back from the frame before this one while frames are eligible.
            let len = self.history.len();
            let mut eligible = 0;
            while eligible < self.preroll_frames {
                let i = (slot + len - 1 - eligible) % len;
                let entry = &self.history[i];
                if !entry.preroll_ok || entry.index + 1 + eligible as u64 != index {
                    break;
                }
                eligible += 1;
            }
            for back in (1..=eligible).rev() {
                to_send[to_send_len] = (slot + len - back) % len;
                to_send_len += 1;
            }
        }
        if send {
            to_send[to_send_len] = slot;
            to_send_len += 1;
        }
        for &i in &to_send[..to_send_len] {
            self.history[i].preroll_ok = false;
        }
        if send {
            self.last_sent = Some(index);
        }
        self.history[slot].preroll_ok = !self.muted && !send;
        self.transmitting = send;

        CaptureOutput {
            history: &self.history,
            to_send,
            to_send_len,
            level_db,
            speaking: decision.speaking,
            threshold_db: decision.threshold_db,
            transmitting: send,
            talkspurt_start,
            after_echo_power,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f32::consts::PI;

    const N: usize = 960;

    struct Source {
        sample: usize,
        seed: u32,
    }

    impl Source {
        fn new() -> Self {
            Self {
                sample: 0,
                seed: 12345,
            }
        }

        fn noise(&mut self, rms: f32) -> Vec<f32> {
            (0..N)
                .map(|_| {
                    self.sample += 1;
                    self.seed ^= self.seed << 13;
                    self.seed ^= self.seed >> 17;
                    self.seed ^= self.seed << 5;
                    (self.seed as f32 / u32::MAX as f32 * 2.0 - 1.0) * rms * 3f32.sqrt()
                })
                .collect()
        }

        /// A voiced, speech-like frame: 140 Hz with harmonics, plus faint noise.
        fn voice(&mut self) -> Vec<f32> {
            let floor = self.noise(0.0005);
            floor
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let t = (self.sample - N + i) as f32 / 48_000.0;
                    let v: f32 = (1..=10)
                        .map(|h| (2.0 * PI * 140.0 * h as f32 * t).sin() / h as f32)
                        .sum();
                    0.08 * v + n
                })
                .collect()
        }
    }

    fn at(frame: u64) -> Duration {
        Duration::from_millis(frame * 20)
    }

    fn indices(out: &CaptureOutput<'_>) -> Vec<u64> {
        out.frames().map(|f| f.index).collect()
    }

    #[test]
    fn speech_onset_is_detected_within_two_frames_and_preroll_comes_first() {
        for denoise in [true, false] {
            let mut chain = CaptureChain::new(CaptureConfig {
                denoise,
                ..CaptureConfig::default()
            });
            let mut src = Source::new();
            for f in 0..100 {
                let out = chain.process(at(f), &src.noise(0.0005));
                assert_eq!(out.frame_count(), 0, "quiet background is not sent");
            }
            let mut started = None;
            for f in 100..103 {
                let out = chain.process(at(f), &src.voice());
                if out.frame_count() > 0 {
                    assert!(out.talkspurt_start && out.speaking && out.transmitting);
                    assert_eq!(
                        indices(&out),
                        vec![f - 3, f - 2, f - 1, f],
                        "pre-roll first"
                    );
                    started = Some(f);
                    break;
                }
            }
            let started = started.expect("speech was not detected within 2 frames");
            assert!(
                started <= 101,
                "denoise {denoise}: detected at frame {started}"
            );
            let out = chain.process(at(started + 1), &src.voice());
            assert_eq!(indices(&out), vec![started + 1], "then one frame at a time");
            assert!(!out.talkspurt_start);
        }
    }

    /// After a short pause the receivers are still playing the previous talkspurt and have
    /// played the pause's time already: a pre-roll would reach them late (counted as late
    /// packets on a clean link, issue 11). It comes only after a pause they have given up on.
    #[test]
    fn pre_roll_is_sent_only_after_a_pause_of_at_least_300_ms() {
        for quiet in [16u64, 20, 25, 29, 31, 40, 60] {
            let mut chain = CaptureChain::new(CaptureConfig {
                denoise: false,
                processing: ProcessingConfig::NONE,
                ..CaptureConfig::default()
            });
            let mut src = Source::new();
            let mut f = 0;
            let mut last_sent = None;
            for _ in 0..50 {
                chain.process(at(f), &src.noise(0.0005));
                f += 1;
            }
            for _ in 0..30 {
                let out = chain.process(at(f), &src.voice());
                if let Some(last) = indices(&out).last() {
                    last_sent = Some(*last);
                }
                f += 1;
            }
            for _ in 0..quiet {
                let out = chain.process(at(f), &src.noise(0.0005));
                if let Some(last) = indices(&out).last() {
                    last_sent = Some(*last);
                }
                f += 1;
            }
            let out = loop {
                let out = chain.process(at(f), &src.voice());
                f += 1;
                if out.frame_count() > 0 {
                    break out;
                }
            };
            let sent = indices(&out);
            let onset = *sent.last().unwrap();
            let unsent = onset - last_sent.unwrap() - 1;
            assert!(
                unsent > 0,
                "quiet {quiet}: the hangover covered the whole pause"
            );
            if unsent < 15 {
                assert_eq!(sent, vec![onset], "pause of {unsent} frames: onset only");
            } else {
                assert_eq!(
                    sent,
                    (onset - 3..=onset).collect::<Vec<u64>>(),
                    "pause of {unsent} frames: pre-roll first"
                );
            }
        }
    }

    #[test]
    fn muted_microphone_sends_nothing_but_still_reports_speech() {
        let mut chain = CaptureChain::new(CaptureConfig::default());
        chain.set_muted(true);
        let mut src = Source::new();
        for f in 0..50 {
            chain.process(at(f), &src.noise(0.0005));
        }
        let mut heard = false;
        for f in 50..100 {
            let out = chain.process(at(f), &src.voice());
            assert_eq!(out.frame_count(), 0);
            heard |= out.speaking;
        }
        assert!(heard);
    }

    #[test]
    fn unmuting_mid_speech_does_not_release_audio_captured_while_muted() {
        let mut chain = CaptureChain::new(CaptureConfig::default());
        let mut src = Source::new();
        chain.set_muted(true);
        for f in 0..60 {
            chain.process(at(f), &src.voice());
        }
        chain.set_muted(false);
        let out = chain.process(at(60), &src.voice());
        assert_eq!(indices(&out), vec![60]);
    }

    #[test]
    fn push_to_talk_sends_only_while_pressed_plus_release_tail() {
        let mut chain = CaptureChain::new(CaptureConfig {
            mode: TransmitMode::PushToTalk,
            ..CaptureConfig::default()
        });
        let mut src = Source::new();
        for f in 0..20 {
            assert_eq!(
                chain.process(at(f), &src.voice()).frame_count(),
                0,
                "not pressed"
            );
        }
        chain.set_ptt_pressed(at(20), true);
        for f in 20..30 {
            let out = chain.process(at(f), &src.noise(0.0005));
            assert_eq!(indices(&out), vec![f], "pressed: every frame, no pre-roll");
        }
        chain.set_ptt_pressed(at(30), false);
        let sent: Vec<usize> = (30..40)
            .map(|f| chain.process(at(f), &src.voice()).frame_count())
            .collect();
        assert_eq!(sent, vec![1, 1, 1, 1, 1, 0, 0, 0, 0, 0], "100 ms tail");
    }

    #[test]
    fn noise_only_input_stops_being_speech_after_the_floor_adapts() {
        for denoise in [false, true] {
            let mut chain = CaptureChain::new(CaptureConfig {
                denoise,
                ..CaptureConfig::default()
            });
            let mut src = Source::new();
            let mut last_sent = 0;
            for f in 0..750 {
                let out = chain.process(at(f), &src.noise(0.02));
                if out.frame_count() > 0 {
                    last_sent = f;
                }
                if f >= 600 {
                    assert!(!out.speaking, "denoise {denoise}: frame {f} still speech");
                }
            }
            assert!(last_sent < 600);
        }
    }

    #[test]
    fn noise_suppression_attenuates_steady_noise_and_can_be_toggled() {
        let mut chain = CaptureChain::new(CaptureConfig {
            processing: ProcessingConfig::NONE,
            ..CaptureConfig::default()
        });
        let mut src = Source::new();
        let mut level = 0.0;
        for f in 0..200 {
            level = chain.process(at(f), &src.noise(0.02)).level_db;
        }
        assert!(
            level < -44.0,
            "denoised noise at {level} dBFS (input -34 dBFS)"
        );
        chain.set_denoise(false);
        let raw = chain.process(at(200), &src.noise(0.02)).level_db;
        assert!((raw + 34.0).abs() < 1.0, "{raw}");
        chain.set_denoise(true);
        assert!(chain.denoise());
    }

    /// The far end's voice coming back through a room: 100 ms late, a few reflections.
    fn room_echo(played: &[f32], history: &mut Vec<f32>) -> Vec<f32> {
        history.extend_from_slice(played);
        let delay = 4_800;
        let end = history.len();
        (end - played.len()..end)
            .map(|n| {
                (0..6)
                    .filter_map(|k| n.checked_sub(delay + k * 131))
                    .enumerate()
                    .map(|(k, i)| history[i] * 0.6 * (-(k as f32) / 2.0).exp())
                    .sum()
            })
            .collect()
    }

    #[test]
    fn the_far_ends_echo_alone_is_not_sent_back_with_echo_cancellation_on() {
        for echo_cancel in [true, false] {
            let mut chain = CaptureChain::new(CaptureConfig {
                processing: ProcessingConfig {
                    echo_cancel,
                    ..ProcessingConfig::ALL
                },
                ..CaptureConfig::default()
            });
            let mut far = Source::new();
            let mut near = Source::new();
            let mut history = Vec::new();
            let mut sent_late = 0;
            // 10 s of the far end talking; the near end says nothing, its microphone hears
            // the room's echo over faint noise.
            for f in 0..500 {
                let played = far.voice();
                chain.analyze_render(&played);
                let background = near.noise(0.0003);
                let mic: Vec<f32> = room_echo(&played, &mut history)
                    .iter()
                    .zip(&background)
                    .map(|(e, b)| e + b)
                    .collect();
                let out = chain.process(at(f), &mic);
                // Once the canceller has had 3 s to adapt.
                if f >= 150 {
                    sent_late += out.frame_count();
                }
            }
            if echo_cancel {
                assert!(
                    sent_late <= 10,
                    "{sent_late} frames of echo sent back with echo cancellation on"
                );
                assert!(chain.echo_stats().is_some(), "figures while it runs");
            } else {
                assert!(
                    sent_late > 300,
                    "without a canceller the echo is sent ({sent_late})"
                );
                assert!(chain.echo_stats().is_none());
            }
        }
    }

    #[test]
    fn ten_ms_frames_use_a_six_frame_preroll() {
        let mut chain = CaptureChain::new(CaptureConfig {
            denoise: false,
            ..CaptureConfig::for_frame(FrameDuration::Ms10)
        });
        let quiet = vec![0.0f32; 480];
        for f in 0..50 {
            chain.process(Duration::from_millis(f * 10), &quiet);
        }
        let loud: Vec<f32> = (0..480).map(|i| 0.2 * (i as f32 * 0.05).sin()).collect();
        let out = chain.process(Duration::from_millis(500), &loud);
        assert_eq!(indices(&out), (44..=50).collect::<Vec<u64>>());
    }
}
