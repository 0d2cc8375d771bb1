//! Short sounds for what happens in the call (someone joins or leaves, we mute or unmute),
//! mixed into the playout by the engine, so they reach the one output stream the call already
//! has: no second device to open, and the echo canceller sees them as part of what the
//! speaker plays, so they are not sent back to the others.
//!
//! The sounds are ours: [`synthesize`] makes them from a few sine partials with a soft attack
//! and an exponential decay, deterministically; `cargo run --example make_sounds` writes them
//! to `assets/sounds/*.wav` (48 kHz mono, 16-bit), which are compiled into the binary and
//! decoded once when the engine starts. Nothing is allocated or decoded while playing.

use std::sync::Arc;

use super::mixer::soft_limit;

/// Sample rate of the cues (the engine's).
pub const CUE_RATE: u32 = 48_000;

/// What a sound announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cue {
    /// A member joined our channel (or we joined one with members in it).
    Join,
    /// A member left our channel.
    Leave,
    /// We muted our microphone.
    Mute,
    /// We unmuted it.
    Unmute,
}

impl Cue {
    /// Every cue, in file order.
    pub const ALL: [Cue; 4] = [Cue::Join, Cue::Leave, Cue::Mute, Cue::Unmute];

    /// The file's name in `assets/sounds/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Cue::Join => "join.wav",
            Cue::Leave => "leave.wav",
            Cue::Mute => "mute.wav",
            Cue::Unmute => "unmute.wav",
        }
    }

    fn embedded(self) -> &'static [u8] {
        match self {
            Cue::Join => include_bytes!("../../../assets/sounds/join.wav"),
            Cue::Leave => include_bytes!("../../../assets/sounds/leave.wav"),
            Cue::Mute => include_bytes!("../../../assets/sounds/mute.wav"),
            Cue::Unmute => include_bytes!("../../../assets/sounds/unmute.wav"),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One partial of a note: frequency ratio to the note's pitch, and relative amplitude.
const BELL: [Partial; 3] = [(1.0, 1.0), (2.0, 0.35), (3.0, 0.12)];
const SOFT: [Partial; 2] = [(1.0, 1.0), (2.0, 0.15)];

/// One note: (start in s, pitch in Hz, length in s).
type Note = (f64, f64, f64);
/// One partial: (frequency ratio to the pitch, relative amplitude).
type Partial = (f64, f64);

/// The notes of a cue, its timbre and its peak level.
fn score(cue: Cue) -> (&'static [Note], &'static [Partial], f64) {
    // A rising fourth for joining, the same falling for leaving (E5, A5); a quieter, softer
    // falling/rising fifth an octave lower for mute and unmute (C5, G4), shorter.
    match cue {
        Cue::Join => (&[(0.0, 659.26, 0.16), (0.09, 880.0, 0.22)], &BELL, 0.28),
        Cue::Leave => (&[(0.0, 880.0, 0.16), (0.09, 659.26, 0.22)], &BELL, 0.28),
        Cue::Mute => (&[(0.0, 523.25, 0.09), (0.06, 392.0, 0.12)], &SOFT, 0.22),
        Cue::Unmute => (&[(0.0, 392.0, 0.09), (0.06, 523.25, 0.12)], &SOFT, 0.22),
    }
}

/// The cue's samples at [`CUE_RATE`]: the same values on every run and machine (up to the
/// last bits of `sin`, below one 16-bit step).
pub fn synthesize(cue: Cue) -> Vec<f32> {
    let (notes, partials, peak) = score(cue);
    let rate = f64::from(CUE_RATE);
    let end = notes
        .iter()
        .map(|&(at, _, len)| at + len)
        .fold(0.0, f64::max);
    let total = (end * rate).ceil() as usize;
    let norm: f64 = partials.iter().map(|&(_, a)| a).sum();
    let mut out = vec![0.0f32; total];
    for &(at, pitch, len) in notes {
        let first = (at * rate).round() as usize;
        let count = (len * rate).round() as usize;
        for i in 0..count.min(total - first) {
            let t = i as f64 / rate;
            // 4 ms attack (no click), then a decay to -60 dB over the note, and a 10 ms
            // fade at the very end so the tail also starts and stops at zero.
            let attack = (t / 0.004).min(1.0);
            let decay = (-6.9 * t / len).exp();
            let release = ((len - t) / 0.010).clamp(0.0, 1.0);
            let envelope = attack * decay * release;
            let tone: f64 = partials
                .iter()
                .map(|&(ratio, amp)| amp * (std::f64::consts::TAU * pitch * ratio * t).sin())
                .sum();
            out[first + i] += (peak * envelope * tone / norm) as f32;
        }
    }
    out
}

/// Decodes a 16-bit mono WAV at [`CUE_RATE`]; `None` if it is anything else.
fn decode_wav(bytes: &[u8]) -> Option<Vec<f32>> {
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes)).ok()?;
    let spec = reader.spec();
    if spec.channels != 1 || spec.sample_rate != CUE_RATE || spec.bits_per_sample != 16 {
        return None;
    }
    reader
        .into_samples::<i16>()
        .map(|s| s.ok().map(|s| f32::from(s) / 32_768.0))
        .collect()
}

/// The four cues' samples, shared (cloning is four reference counts).
#[derive(Debug, Clone)]
pub struct CueSounds {
    samples: [Arc<[f32]>; 4],
}

impl CueSounds {
    /// The sounds compiled into the binary from `assets/sounds/`; a file that does not decode
    /// (a checkout without the assets) is synthesized instead, so a cue is never missing.
    pub fn embedded() -> Self {
        Self {
            samples: Cue::ALL.map(|cue| {
                decode_wav(cue.embedded())
                    .unwrap_or_else(|| synthesize(cue))
                    .into()
            }),
        }
    }

    /// Given samples for each cue (tests).
    pub fn from_samples(samples: [Vec<f32>; 4]) -> Self {
        Self {
            samples: samples.map(Into::into),
        }
    }

    /// The samples of `cue`.
    pub fn get(&self, cue: Cue) -> &[f32] {
        &self.samples[cue.index()]
    }
}

/// Plays one cue at a time into the playout. Invariants: nothing is allocated after
/// construction; a new cue replaces the one playing (two members joining at once chime once,
/// not twice as loud); off, nothing is added.
#[derive(Debug, Clone)]
pub struct CuePlayer {
    sounds: CueSounds,
    enabled: bool,
    /// The cue playing and the next sample of it.
    playing: Option<(Cue, usize)>,
}

impl CuePlayer {
    pub fn new(sounds: CueSounds, enabled: bool) -> Self {
        Self {
            sounds,
            enabled,
            playing: None,
        }
    }

    /// Turns the sounds on or off; off also stops the one playing.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.playing = None;
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Starts `cue` from its beginning (if sounds are on).
    pub fn play(&mut self, cue: Cue) {
        if self.enabled {
            self.playing = Some((cue, 0));
        }
    }

    /// The cue playing, if any.
    pub fn playing(&self) -> Option<Cue> {
        self.playing.map(|(cue, _)| cue)
    }

    /// Adds the next `out.len()` samples of the playing cue to `out` (already limited to
    /// [-1, 1]) and limits the sum again. Returns whether anything was added; with nothing
    /// playing `out` is left exactly as it was.
    pub fn mix_into(&mut self, out: &mut [f32]) -> bool {
        let Some((cue, pos)) = self.playing else {
            return false;
        };
        let samples = self.sounds.get(cue);
        let rest = samples.get(pos..).unwrap_or_default();
        let n = rest.len().min(out.len());
        for (o, &s) in out.iter_mut().zip(&rest[..n]) {
            *o = soft_limit(*o + s);
        }
        self.playing = (pos + n < samples.len()).then_some((cue, pos + n));
        n > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn player(on: bool) -> CuePlayer {
        CuePlayer::new(
            CueSounds::from_samples([vec![0.25; 30], vec![-0.25; 30], vec![0.1; 5], vec![0.2; 5]]),
            on,
        )
    }

    #[test]
    fn a_cue_is_added_to_the_playout_across_chunks_then_stops() {
        let mut p = player(true);
        p.play(Cue::Join);
        let mut chunk = [0.1f32; 20];
        assert!(p.mix_into(&mut chunk));
        assert!(chunk.iter().all(|&s| (s - 0.35).abs() < 1e-6), "{chunk:?}");
        let mut chunk = [0.0f32; 20];
        assert!(p.mix_into(&mut chunk));
        assert!(chunk[..10].iter().all(|&s| (s - 0.25).abs() < 1e-6));
        assert!(chunk[10..].iter().all(|&s| s == 0.0), "the cue ended");
        assert_eq!(p.playing(), None);
        let mut chunk = [0.3f32; 20];
        assert!(!p.mix_into(&mut chunk));
        assert_eq!(chunk, [0.3; 20], "untouched when nothing plays");
    }

    #[test]
    fn turned_off_nothing_plays_and_the_playing_cue_stops() {
        let mut p = player(false);
        p.play(Cue::Join);
        let mut chunk = [0.0f32; 20];
        assert!(!p.mix_into(&mut chunk));
        assert_eq!(chunk, [0.0; 20]);
        p.set_enabled(true);
        p.play(Cue::Leave);
        p.set_enabled(false);
        assert!(!p.mix_into(&mut chunk));
        assert_eq!(chunk, [0.0; 20]);
    }

    #[test]
    fn a_new_cue_replaces_the_playing_one_and_the_sum_stays_in_range() {
        let mut p = player(true);
        p.play(Cue::Join);
        p.play(Cue::Join);
        p.play(Cue::Unmute);
        let mut chunk = [0.9f32; 8];
        p.mix_into(&mut chunk);
        assert_eq!(p.playing(), None, "only unmute's 5 samples played");
        assert!(chunk[..5].iter().all(|&s| s > 0.5 && s < 1.0), "{chunk:?}");
        assert_eq!(chunk[5..], [0.9; 3], "after the cue, untouched");
    }

    /// The committed WAVs are what the generator makes (so the licence of our own sounds
    /// holds), and they decode: the app does not fall back to synthesizing.
    #[test]
    fn the_shipped_sounds_are_the_generators_and_sound_like_cues() {
        for cue in Cue::ALL {
            let decoded = decode_wav(cue.embedded())
                .unwrap_or_else(|| panic!("{} does not decode", cue.file_name()));
            let made = synthesize(cue);
            assert_eq!(decoded.len(), made.len(), "{}", cue.file_name());
            for (a, b) in decoded.iter().zip(&made) {
                assert!((a - b).abs() <= 2.0 / 32_768.0, "{}", cue.file_name());
            }
            let secs = made.len() as f32 / CUE_RATE as f32;
            assert!((0.1..=0.5).contains(&secs), "{secs} s");
            let peak = made.iter().fold(0.0f32, |m, s| m.max(s.abs()));
            assert!((0.1..0.5).contains(&peak), "peak {peak}: audible, not loud");
            assert!(
                made[0].abs() < 1e-3 && made[made.len() - 1].abs() < 1e-3,
                "no clicks"
            );
        }
        assert_ne!(synthesize(Cue::Join), synthesize(Cue::Leave));
    }
}
