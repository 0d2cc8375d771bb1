//! Shortening a decoded frame by whole pitch periods, so that the jitter buffer can take delay
//! out without dropping a frame of speech: what WebRTC's NetEq calls "accelerate".
//!
//! A voiced frame repeats itself every pitch period `T`; cutting exactly one period out and
//! cross-fading across the cut leaves speech that sounds the same, only `T` shorter. A quiet
//! frame (a pause, the tail of a word) can be cut anywhere. A frame that is neither (a
//! consonant, a transition) is left alone: the caller tries again on the next frame. Pure,
//! allocation-free.

/// Shortest period searched: 2.5 ms (a 400 Hz voice).
const MIN_PERIOD: usize = 120;
/// Longest period searched: 12.5 ms (an 80 Hz voice), or half the frame if that is less.
const MAX_PERIOD: usize = 600;
/// Normalised correlation between a period and the next from which a frame counts as voiced.
const VOICED_CORRELATION: f32 = 0.9;
/// Below this RMS (about -45 dBFS) a frame is quiet enough to cut without looking for a period.
const QUIET_RMS: f32 = 0.0056;
/// How much a quiet frame loses: 5 ms.
const QUIET_CUT: usize = 240;

/// Removes one pitch period (or, from a quiet frame, 5 ms) from `frame` in place and returns
/// the new length; `None` (and `frame` untouched) when no cut would go unheard.
///
/// The first `T` samples of the result cross-fade from the frame's first period into its
/// second, so the result starts where the frame started (no step against what played
/// before) and ends where it ended (no step into the next frame).
pub fn shorten(frame: &mut [f32]) -> Option<usize> {
    let n = frame.len();
    let max_period = MAX_PERIOD.min(n / 2);
    if max_period < MIN_PERIOD {
        return None;
    }
    let energy: f32 = frame.iter().map(|s| s * s).sum();
    let rms = (energy / n as f32).sqrt();
    let period = if rms < QUIET_RMS {
        QUIET_CUT.min(max_period)
    } else {
        let (period, correlation) = best_period(frame, max_period)?;
        if correlation < VOICED_CORRELATION {
            return None;
        }
        period
    };
    for i in 0..period {
        let fade_in = (i as f32 + 0.5) / period as f32;
        frame[i] = frame[i] * (1.0 - fade_in) + frame[i + period] * fade_in;
    }
    frame.copy_within(2 * period.., period);
    Some(n - period)
}

/// The lag in `MIN_PERIOD..=max_period` at which the frame's start best matches what follows
/// it (normalised cross-correlation of `frame[..T]` with `frame[T..2T]`), and that correlation.
/// Lags that are multiples of a shorter good period score as well as it; the shortest peak
/// (local maximum) within 0.02 of the best is taken, so as little as possible is cut.
fn best_period(frame: &[f32], max_period: usize) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    let mut scores = [0.0f32; MAX_PERIOD + 1];
    for lag in MIN_PERIOD..=max_period {
        let (a, b) = (&frame[..lag], &frame[lag..2 * lag]);
        let (mut ab, mut aa, mut bb) = (0.0f32, 0.0f32, 0.0f32);
        for (x, y) in a.iter().zip(b) {
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        let c = ab / (aa * bb).sqrt().max(1e-12);
        scores[lag] = c;
        if best.is_none_or(|(_, bc)| c > bc) {
            best = Some((lag, c));
        }
    }
    let (best_lag, top) = best?;
    let peak = |lag: usize| {
        (lag == MIN_PERIOD || scores[lag] >= scores[lag - 1])
            && (lag == max_period || scores[lag] >= scores[lag + 1])
    };
    let lag = (MIN_PERIOD..=max_period)
        .find(|&lag| scores[lag] >= top - 0.02 && peak(lag))
        .unwrap_or(best_lag);
    Some((lag, scores[lag]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f32::consts::TAU;

    fn vowel(f0: f32, n: usize, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32 / 48_000.0;
                amp * (1..=6)
                    .map(|h| (TAU * f0 * h as f32 * t).sin() / h as f32)
                    .sum::<f32>()
            })
            .collect()
    }

    #[test]
    fn a_voiced_frame_loses_exactly_one_period_and_stays_periodic() {
        // 150 Hz: a period of 320 samples.
        let mut frame = vowel(150.0, 960, 0.2);
        let original = frame.clone();
        let len = shorten(&mut frame).expect("a steady vowel is cut");
        assert_eq!(len, 960 - 320);
        // Starts and ends where the frame did: nothing to click against its neighbours.
        assert!((frame[0] - original[0]).abs() < 1e-3);
        assert!((frame[len - 1] - original[959]).abs() < 1e-6);
        // And is the same vowel: the result matches the original, shifted by one period.
        let err: f32 = (0..len)
            .map(|i| (frame[i] - original[i + 320]).powi(2))
            .sum::<f32>()
            / len as f32;
        assert!(err < 1e-5, "mean squared error {err}");
    }

    #[test]
    fn a_quiet_frame_is_cut_by_five_ms_and_noise_is_left_alone() {
        let mut quiet = vowel(200.0, 960, 0.001);
        assert_eq!(shorten(&mut quiet), Some(960 - 240));

        // Loud white-ish noise (a consonant): no period to cut.
        let mut state = 0x1234_5678u32;
        let mut noise: Vec<f32> = (0..960)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32 - 0.5) * 0.5
            })
            .collect();
        let before = noise.clone();
        assert_eq!(shorten(&mut noise), None);
        assert_eq!(noise, before, "a refused cut leaves the frame as it was");
    }

    #[test]
    fn a_10_ms_frame_can_be_shortened_too() {
        // 250 Hz: a period of 192 samples, within half of a 480-sample frame.
        let mut frame = vowel(250.0, 480, 0.2);
        assert_eq!(shorten(&mut frame), Some(480 - 192));
        // Too short to hold two periods of anything we look for.
        assert_eq!(shorten(&mut [0.1; 200]), None);
    }
}
