//! Mixes the decoded frames of all peers into the one frame sent to the speakers.
//!
//! Each peer has a gain (the listener's volume, 0..2, times loudness normalisation, up to 4)
//! and can be muted locally; deafen silences the whole output. The
//! sum goes through a soft limiter: samples up to -6 dBFS pass unchanged, louder ones are bent
//! smoothly towards full scale so the output never leaves [-1, 1] and never wraps or clicks the
//! way a hard clip does. The mixing buffer is allocated once, at construction.

use crate::voice::codec::FrameDuration;

/// Largest gain a peer's frame is mixed with (+18 dB): the listener's volume (up to 2, +6 dB)
/// times loudness normalisation (up to 4, +12 dB; `voice::rx::loudness`).
pub const MAX_GAIN: f32 = 8.0;

/// Level below which the limiter leaves samples untouched: 0.5, about -6 dBFS.
pub const LIMITER_KNEE: f32 = 0.5;

/// The limiter's transfer curve: identity up to [`LIMITER_KNEE`], then a tanh shoulder that
/// approaches but never reaches 1.0. Continuous with slope 1 at the knee, odd, and monotonic;
/// non-finite input gives 0.
pub fn soft_limit(x: f32) -> f32 {
    if !x.is_finite() {
        return 0.0;
    }
    let magnitude = x.abs();
    if magnitude <= LIMITER_KNEE {
        return x;
    }
    let headroom = 1.0 - LIMITER_KNEE;
    let bent = LIMITER_KNEE + headroom * ((magnitude - LIMITER_KNEE) / headroom).tanh();
    bent.min(1.0).copysign(x)
}

/// One peer's contribution to a mix.
#[derive(Debug, Clone, Copy)]
pub struct MixInput<'a> {
    /// The peer's decoded frame.
    pub samples: &'a [f32],
    /// Linear gain, clamped to `0..=MAX_GAIN`.
    pub gain: f32,
    /// Locally muted peers are skipped.
    pub muted: bool,
}

/// Sums peer frames with per-peer gain and a soft limiter into a preallocated frame.
///
/// Invariants: the output frame always has the length given at construction, every output sample
/// is finite and within [-1, 1], and no allocation happens after construction.
#[derive(Debug, Clone)]
pub struct Mixer {
    acc: Vec<f32>,
    deafened: bool,
    mixed: usize,
}

impl Mixer {
    /// Creates a mixer for frames of the given duration.
    pub fn new(frame: FrameDuration) -> Self {
        Self::with_frame_samples(frame.samples())
    }

    /// Creates a mixer for frames of `samples` samples.
    pub fn with_frame_samples(samples: usize) -> Self {
        Self {
            acc: vec![0.0; samples],
            deafened: false,
            mixed: 0,
        }
    }

    /// Deafen: the output is silence whatever the peers send.
    pub fn set_deafened(&mut self, deafened: bool) {
        self.deafened = deafened;
    }

    /// Whether the output is deafened.
    pub fn is_deafened(&self) -> bool {
        self.deafened
    }

    /// Starts a new frame (clears the accumulator).
    pub fn begin(&mut self) {
        self.acc.fill(0.0);
        self.mixed = 0;
    }

    /// Adds one peer's frame. Returns whether it contributed (false when muted, gain 0 or
    /// deafened). A shorter frame contributes to the first samples only; non-finite samples
    /// count as silence.
    pub fn add(&mut self, input: MixInput<'_>) -> bool {
        let gain = if input.gain.is_finite() {
            input.gain.clamp(0.0, MAX_GAIN)
        } else {
            0.0
        };
        if input.muted || gain == 0.0 || self.deafened {
            return false;
        }
        for (acc, &s) in self.acc.iter_mut().zip(input.samples) {
            if s.is_finite() {
                *acc += s * gain;
            }
        }
        self.mixed += 1;
        true
    }

    /// Applies the limiter and returns the finished frame.
    pub fn finish(&mut self) -> &[f32] {
        if self.deafened {
            self.acc.fill(0.0);
        } else {
            for s in &mut self.acc {
                *s = soft_limit(*s);
            }
        }
        &self.acc
    }

    /// Number of peers that contributed to the current frame.
    pub fn mixed_peers(&self) -> usize {
        self.mixed
    }

    /// Mixes a whole set of inputs in one call (`begin`, `add` each, `finish`).
    pub fn mix<'a>(&mut self, inputs: impl IntoIterator<Item = MixInput<'a>>) -> &[f32] {
        self.begin();
        for input in inputs {
            self.add(input);
        }
        self.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(samples: &[f32], gain: f32) -> MixInput<'_> {
        MixInput {
            samples,
            gain,
            muted: false,
        }
    }

    #[test]
    fn quiet_signals_are_summed_exactly() {
        let a = [0.1f32, -0.2, 0.05, 0.0];
        let b = [0.2f32, 0.1, -0.3, 0.25];
        let mut mixer = Mixer::with_frame_samples(4);
        let out = mixer.mix([input(&a, 1.0), input(&b, 1.0)]).to_vec();
        for i in 0..4 {
            assert!((out[i] - (a[i] + b[i])).abs() < 1e-6);
        }
        assert_eq!(mixer.mixed_peers(), 2);
    }

    #[test]
    fn gain_scales_and_is_clamped_to_eight() {
        let a = [0.01f32; 4];
        let mut mixer = Mixer::with_frame_samples(4);
        assert!((mixer.mix([input(&a, 0.5)])[0] - 0.005).abs() < 1e-6);
        assert!((mixer.mix([input(&a, 20.0)])[0] - 0.08).abs() < 1e-6);
        assert_eq!(mixer.mix([input(&a, -1.0)])[0], 0.0);
        assert_eq!(mixer.mix([input(&a, f32::NAN)])[0], 0.0);
    }

    #[test]
    fn muted_peers_are_skipped() {
        let a = [0.3f32; 4];
        let mut mixer = Mixer::with_frame_samples(4);
        let muted = MixInput {
            samples: &a,
            gain: 1.0,
            muted: true,
        };
        let out = mixer.mix([muted, input(&[0.1; 4], 1.0)]);
        assert!((out[0] - 0.1).abs() < 1e-6);
        assert_eq!(mixer.mixed_peers(), 1);
    }

    #[test]
    fn deafen_silences_the_output() {
        let mut mixer = Mixer::with_frame_samples(4);
        mixer.set_deafened(true);
        assert!(mixer.mix([input(&[0.9; 4], 2.0)]).iter().all(|&s| s == 0.0));
        mixer.set_deafened(false);
        assert!(mixer.mix([input(&[0.1; 4], 1.0)])[0] > 0.0);
    }

    #[test]
    fn eight_loud_peers_stay_within_full_scale_without_wrapping() {
        let loud = [0.9f32, -0.9, 0.7, -0.7];
        let mut mixer = Mixer::with_frame_samples(4);
        let out = mixer.mix((0..8).map(|_| input(&loud, 2.0)));
        for (o, l) in out.iter().zip(loud) {
            assert!(o.abs() <= 1.0 && o.abs() > 0.99, "{o}");
            assert_eq!(o.signum(), l.signum(), "sign must survive limiting");
        }
    }

    #[test]
    fn limiter_is_identity_below_minus_six_dbfs_and_smooth_at_the_knee() {
        for x in [-0.5f32, -0.25, 0.0, 0.3, 0.5] {
            assert_eq!(soft_limit(x), x);
        }
        let just_above = soft_limit(LIMITER_KNEE + 1e-3);
        assert!(
            (just_above - (LIMITER_KNEE + 1e-3)).abs() < 1e-5,
            "slope 1 at the knee"
        );
        assert!(soft_limit(0.8) < 0.8 && soft_limit(0.8) > 0.7);
        assert!(soft_limit(1e9) <= 1.0);
        assert_eq!(soft_limit(f32::INFINITY), 0.0);
    }

    #[test]
    fn short_and_non_finite_inputs_do_not_corrupt_the_frame() {
        let mut mixer = Mixer::with_frame_samples(4);
        let out = mixer.mix([input(&[0.2, f32::NAN], 1.0)]);
        assert_eq!(out, &[0.2, 0.0, 0.0, 0.0]);
    }

    proptest! {
        #[test]
        fn limiter_output_is_bounded_monotonic_and_sign_preserving(a in -100.0f32..100.0, b in -100.0f32..100.0) {
            let (ya, yb) = (soft_limit(a), soft_limit(b));
            prop_assert!(ya.abs() <= 1.0);
            prop_assert!(a == 0.0 || ya.signum() == a.signum());
            if a < b {
                prop_assert!(ya <= yb);
            }
        }

        #[test]
        fn any_mix_stays_in_full_scale(frames in prop::collection::vec((prop::collection::vec(-1.0f32..=1.0, 16), 0.0f32..=2.0), 0..12)) {
            let mut mixer = Mixer::with_frame_samples(16);
            let out = mixer.mix(frames.iter().map(|(s, g)| input(s, *g)));
            prop_assert_eq!(out.len(), 16);
            prop_assert!(out.iter().all(|s| s.is_finite() && s.abs() <= 1.0));
        }
    }
}
