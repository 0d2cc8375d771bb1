//! The echo test: does your microphone hear your speakers, and does the echo canceller take
//! that out before the others hear it?
//!
//! It listens to the room for a moment (the background level), then plays a test sound into
//! the call's output, where the echo canceller sees it as it sees everything the speaker plays,
//! and compares what the microphone picks up before and after echo cancellation (before noise
//! suppression, which would also hide a test sound and so flatter the canceller). The sound is
//! bursts of noise the length of syllables, tilted like speech: broadband, so the canceller's
//! delay estimator locks on within a second, and only the last part of the playing time is
//! measured, once it has.
//!
//! Pure: fed by the playout ([`EchoTest::render`]) and the capture ([`EchoTest::capture`]),
//! both counting samples at 48 kHz; no allocation.

/// Listening to the room before the sound starts.
const QUIET_SAMPLES: u64 = 48_000 * 6 / 10;
/// Playing the test sound.
const PLAY_SAMPLES: u64 = 48_000 * 4;
/// The canceller's time to converge: measured from here into the playing time.
const SETTLE_SAMPLES: u64 = 48_000 * 3 / 2;
/// Background measured from here (skips whatever was still sounding when the test began).
const BACKGROUND_FROM: u64 = 48_000 / 5;
/// One syllable: sound then pause, with soft edges.
const SYLLABLE_SAMPLES: u64 = 48_000 / 4;
const SOUNDING_SAMPLES: u64 = 48_000 * 18 / 100;
const EDGE_SAMPLES: u64 = 48_000 / 50;
/// Amplitude of the noise before its envelope: about -20 dBFS RMS while sounding.
const AMPLITUDE: f32 = 0.17;

/// The microphone hears the speaker when the test sound raises it this far above the room.
const HEARD_ABOVE_BACKGROUND_DB: f32 = 6.0;
/// What is left after cancellation counts as gone within this much of the room's level...
const GONE_WITHIN_DB: f32 = 3.0;
/// ...or below this level, whatever the room: 30-40 dB under speech, and under the voice
/// detector's gate (a virtual device's room is digital silence, which no residue can match).
const INAUDIBLE_DBFS: f32 = -60.0;

/// How the echo test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoVerdict {
    /// The microphone does not hear the speakers (headphones, or the speaker turned down).
    NoEcho,
    /// It hears them, and after echo cancellation nothing is left above the room's level.
    Cancelled,
    /// It hears them, and some of it still reaches the others.
    Remains,
}

/// The figures of a finished echo test, all in dB (levels in dBFS, mean power over the
/// measured time).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EchoTestResult {
    /// The room before the sound (raw microphone).
    pub background_db: f32,
    /// The test sound as it went to the speaker.
    pub played_db: f32,
    /// The raw microphone while the sound played.
    pub picked_up_db: f32,
    /// The same after echo cancellation.
    pub after_cancel_db: f32,
    /// Whether echo cancellation was on.
    pub echo_cancellation: bool,
    pub verdict: EchoVerdict,
}

impl EchoTestResult {
    /// How much of the sound the microphone hears (raw level against the level played).
    pub fn coupling_db(&self) -> f32 {
        self.picked_up_db - self.played_db
    }

    /// How much the echo canceller took out.
    pub fn removed_db(&self) -> f32 {
        self.picked_up_db - self.after_cancel_db
    }
}

/// Where the echo test stands, for the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EchoTestStatus {
    /// Running; `0.0..1.0` of its time gone.
    Running(f32),
    Done(EchoTestResult),
}

/// Mean power over a span, summed in f64 (seconds of samples).
#[derive(Debug, Default, Clone, Copy)]
struct Power {
    sum: f64,
    samples: u64,
}

impl Power {
    fn add(&mut self, mean_square: f32, samples: usize) {
        self.sum += f64::from(mean_square) * samples as f64;
        self.samples += samples as u64;
    }

    fn db(&self) -> f32 {
        if self.samples == 0 {
            return -120.0;
        }
        (10.0 * (self.sum / self.samples as f64).max(1e-12).log10()) as f32
    }
}

/// A running echo test.
pub(super) struct EchoTest {
    rendered: u64,
    captured: u64,
    /// xorshift state for the noise, and a one-pole low-pass that tilts it like speech.
    noise: u32,
    tilt: f32,
    played: Power,
    background: Power,
    raw: Power,
    after: Power,
}

impl EchoTest {
    pub(super) fn new() -> Self {
        Self {
            rendered: 0,
            captured: 0,
            noise: 0x9E37_79B9,
            tilt: 0.0,
            played: Power::default(),
            background: Power::default(),
            raw: Power::default(),
            after: Power::default(),
        }
    }

    /// Adds the test sound for the next `out.len()` samples to what the speaker plays.
    pub(super) fn render(&mut self, out: &mut [f32]) {
        let mut power = 0.0f64;
        let start = self.rendered;
        for o in out.iter_mut() {
            let s = self.sample(self.rendered);
            self.rendered += 1;
            *o += s;
            power += f64::from(s) * f64::from(s);
        }
        if in_measured_span(start) {
            self.played
                .add((power / out.len().max(1) as f64) as f32, out.len());
        }
    }

    /// One captured frame: its mean square raw and after echo cancellation. Returns the result
    /// once the test is over.
    pub(super) fn capture(
        &mut self,
        raw_power: f32,
        after_power: f32,
        samples: usize,
        echo_cancellation: bool,
    ) -> Option<EchoTestResult> {
        let at = self.captured;
        self.captured += samples as u64;
        if (BACKGROUND_FROM..QUIET_SAMPLES).contains(&at) {
            self.background.add(raw_power, samples);
        } else if in_measured_span(at) {
            self.raw.add(raw_power, samples);
            self.after.add(after_power, samples);
        }
        (self.captured >= QUIET_SAMPLES + PLAY_SAMPLES).then(|| self.result(echo_cancellation))
    }

    /// How far along the test is, `0.0..1.0`.
    pub(super) fn progress(&self) -> f32 {
        (self.captured as f32 / (QUIET_SAMPLES + PLAY_SAMPLES) as f32).min(1.0)
    }

    fn result(&self, echo_cancellation: bool) -> EchoTestResult {
        let background_db = self.background.db();
        let picked_up_db = self.raw.db();
        let after_cancel_db = self.after.db();
        let verdict = if picked_up_db - background_db < HEARD_ABOVE_BACKGROUND_DB {
            EchoVerdict::NoEcho
        } else if after_cancel_db <= (background_db + GONE_WITHIN_DB).max(INAUDIBLE_DBFS) {
            EchoVerdict::Cancelled
        } else {
            EchoVerdict::Remains
        };
        EchoTestResult {
            background_db,
            played_db: self.played.db(),
            picked_up_db,
            after_cancel_db,
            echo_cancellation,
            verdict,
        }
    }

    /// The test sound at sample `n` of the test (silence before and after the playing time).
    fn sample(&mut self, n: u64) -> f32 {
        if !(QUIET_SAMPLES..QUIET_SAMPLES + PLAY_SAMPLES).contains(&n) {
            return 0.0;
        }
        let in_syllable = (n - QUIET_SAMPLES) % SYLLABLE_SAMPLES;
        if in_syllable >= SOUNDING_SAMPLES {
            return 0.0;
        }
        let edge = in_syllable.min(SOUNDING_SAMPLES - 1 - in_syllable);
        let envelope = if edge < EDGE_SAMPLES {
            let x = edge as f32 / EDGE_SAMPLES as f32;
            0.5 - 0.5 * (std::f32::consts::PI * x).cos()
        } else {
            1.0
        };
        // xorshift32: white noise in -1..1.
        self.noise ^= self.noise << 13;
        self.noise ^= self.noise >> 17;
        self.noise ^= self.noise << 5;
        let white = self.noise as f32 / u32::MAX as f32 * 2.0 - 1.0;
        // A gentle low-pass (pole 0.6): more energy low than high, as in speech.
        self.tilt = 0.6 * self.tilt + 0.4 * white;
        AMPLITUDE * 2.0 * self.tilt * envelope
    }
}

/// Whether a sample position lies in the measured part of the playing time.
fn in_measured_span(n: u64) -> bool {
    (QUIET_SAMPLES + SETTLE_SAMPLES..QUIET_SAMPLES + PLAY_SAMPLES).contains(&n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a test against a made-up room: the microphone hears `coupling` of what played
    /// after `delay` samples, over a steady background; the "canceller" keeps `kept` of the
    /// echo.
    fn run(coupling: f32, kept: f32, background: f32) -> EchoTestResult {
        let mut t = EchoTest::new();
        let mut line = std::collections::VecDeque::from(vec![0.0f32; 4_800]);
        let mut out = [0.0f32; 960];
        loop {
            out.fill(0.0);
            t.render(&mut out);
            let mut raw = 0.0;
            let mut after = 0.0;
            for &s in &out {
                line.push_back(s);
                let echo = line.pop_front().unwrap_or(0.0) * coupling;
                raw += echo * echo + background * background;
                after += (echo * kept) * (echo * kept) + background * background;
            }
            let n = out.len() as f32;
            if let Some(r) = t.capture(raw / n, after / n, out.len(), true) {
                return r;
            }
        }
    }

    #[test]
    fn the_sound_plays_only_after_the_quiet_part_at_about_minus_20_dbfs() {
        let mut t = EchoTest::new();
        let mut quiet = vec![0.0f32; QUIET_SAMPLES as usize];
        t.render(&mut quiet);
        assert!(quiet.iter().all(|&s| s == 0.0));
        for _ in 0..PLAY_SAMPLES / 960 {
            let mut chunk = [0.0f32; 960];
            t.render(&mut chunk);
        }
        let db = t.played.db();
        assert!((-26.0..-16.0).contains(&db), "played at {db} dBFS");
    }

    #[test]
    fn no_echo_path_reads_as_no_echo() {
        let r = run(0.0, 1.0, 0.001);
        assert_eq!(r.verdict, EchoVerdict::NoEcho, "{r:?}");
    }

    #[test]
    fn an_echo_taken_out_to_the_background_reads_as_cancelled_with_its_figures() {
        // -10 dB coupling (0.316), the canceller keeps 1 % (-40 dB), background -60 dBFS.
        let r = run(0.316, 0.01, 0.001);
        assert_eq!(r.verdict, EchoVerdict::Cancelled, "{r:?}");
        assert!((r.coupling_db() + 10.0).abs() < 1.0, "{r:?}");
        assert!(r.removed_db() > 25.0, "{r:?}");
        assert!((r.background_db + 60.0).abs() < 0.5, "{r:?}");
    }

    #[test]
    fn in_a_silent_room_an_echo_taken_below_hearing_reads_as_cancelled() {
        // A virtual device: no background at all; the canceller keeps 0.1 % (-60 dB).
        let r = run(0.316, 0.001, 0.0);
        assert_eq!(r.verdict, EchoVerdict::Cancelled, "{r:?}");
        // The same room with only 10 dB taken out.
        let r = run(0.316, 0.316, 0.0);
        assert_eq!(r.verdict, EchoVerdict::Remains, "{r:?}");
    }

    #[test]
    fn an_echo_left_standing_reads_as_remains() {
        let r = run(0.316, 0.5, 0.001);
        assert_eq!(r.verdict, EchoVerdict::Remains, "{r:?}");
        assert!(r.removed_db() < 7.0, "{r:?}");
    }

    #[test]
    fn progress_runs_from_zero_to_one() {
        let mut t = EchoTest::new();
        assert_eq!(t.progress(), 0.0);
        let mut done = None;
        while done.is_none() {
            done = t.capture(0.0, 0.0, 960, true);
        }
        assert_eq!(t.progress(), 1.0);
    }
}
