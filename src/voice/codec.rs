//! What the sending and the receiving side agree on about Opus: 48 kHz mono, 10 or 20 ms frames
//! ([`FrameDuration`]), payload limits, DTX, the TOC byte, and [`CodecError`].
//!
//! The codec itself is split by direction: the encoder lives with the capture chain
//! ([`super::tx::OpusEncoder`]) and the decoder with the receive path
//! ([`super::rx::OpusDecoder`]). This module holds only the facts both need, so neither side
//! depends on the other. The round-trip tests, which need both, live here too.

use std::time::Duration;

/// Sample rate of every PCM buffer in the voice plane: the audio layer's rate.
pub const SAMPLE_RATE_HZ: u32 = crate::audio::SAMPLE_RATE;

/// Largest Opus payload of one frame (RFC 6716 limit), the size to reserve for `encode`.
pub const MAX_PAYLOAD: usize = 1275;

/// Default encoder bit rate: clear wideband speech at a modest cost.
pub const DEFAULT_BITRATE_BPS: u32 = 24_000;

/// Payloads of at most this many bytes carry no audio: DTX emits them for silent frames.
pub const DTX_MAX_PAYLOAD: usize = 2;

/// Duration of one audio frame. Every buffer handed to the codec holds exactly
/// [`FrameDuration::samples`] mono samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FrameDuration {
    /// 10 ms (480 samples): lower latency, more packets.
    Ms10,
    /// 20 ms (960 samples): the default.
    #[default]
    Ms20,
}

impl FrameDuration {
    /// Samples per frame at 48 kHz mono.
    pub const fn samples(self) -> usize {
        match self {
            FrameDuration::Ms10 => 480,
            FrameDuration::Ms20 => 960,
        }
    }

    /// Frame length in milliseconds.
    pub const fn millis(self) -> u64 {
        match self {
            FrameDuration::Ms10 => 10,
            FrameDuration::Ms20 => 20,
        }
    }

    /// Frame length as a `Duration`.
    pub const fn duration(self) -> Duration {
        Duration::from_millis(self.millis())
    }
}

/// Why an encode or decode failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// libopus refused to create or configure a codec.
    #[error("could not set up the Opus {what}: {reason}")]
    Setup {
        /// What was being set up ("encoder", "decoder", "bit rate", ...).
        what: &'static str,
        /// libopus' explanation.
        reason: &'static str,
    },
    /// The PCM buffer does not hold exactly one frame.
    #[error("audio frame has {got} samples but {expected} were expected")]
    WrongFrameLength {
        /// Samples per frame for the configured duration.
        expected: usize,
        /// Samples actually passed.
        got: usize,
    },
    /// An empty payload was passed to `decode`; use `conceal` for missing frames.
    #[error("cannot decode an empty Opus payload")]
    EmptyPayload,
    /// libopus failed to encode a frame.
    #[error("Opus encoding failed: {0}")]
    Encode(&'static str),
    /// libopus failed to decode a payload (typically a corrupt packet).
    #[error("Opus decoding failed: {0}")]
    Decode(&'static str),
}

pub(super) fn setup(what: &'static str) -> impl Fn(opusic_c::ErrorCode) -> CodecError {
    move |e| CodecError::Setup {
        what,
        reason: e.message(),
    }
}

/// True when an encoded payload of `len` bytes carries no audio (a DTX frame) and need not be
/// sent: the receiver's jitter buffer plays silence for gaps that follow an intact sequence.
pub fn is_dtx_payload(len: usize) -> bool {
    len <= DTX_MAX_PAYLOAD
}

/// Frame duration announced by an Opus packet's TOC byte (RFC 6716 section 3.1), if it is one
/// we can play (10 or 20 ms, one frame per packet). A packet that carries deep redundancy
/// (DRED) or other extensions in its padding is framed with code 3 and a frame count of one;
/// that is one frame too.
pub fn opus_frame_duration(payload: &[u8]) -> Option<FrameDuration> {
    let toc = *payload.first()?;
    let one_frame = match toc & 0x03 {
        0 => true,
        // Code 3: the next byte holds the frame count in its low six bits.
        3 => payload.get(1).is_some_and(|&count| count & 0x3f == 1),
        _ => false,
    };
    if !one_frame {
        return None; // several frames per packet: our senders never do that
    }
    let config = toc >> 3;
    let tenth_ms = match config {
        0..=11 => [100, 200, 400, 600][(config % 4) as usize],
        12..=15 => [100, 200][(config % 2) as usize],
        _ => [25, 50, 100, 200][(config % 4) as usize],
    };
    match tenth_ms {
        100 => Some(FrameDuration::Ms10),
        200 => Some(FrameDuration::Ms20),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::rx::OpusDecoder;
    use super::super::tx::OpusEncoder;
    use super::*;
    use std::f32::consts::PI;

    /// A voiced, speech-like test signal: a 150 Hz harmonic series with slow vibrato and an
    /// amplitude envelope, so that it changes from frame to frame.
    fn voiced(len: usize) -> Vec<f32> {
        let mut phase = 0.0f32;
        (0..len)
            .map(|i| {
                let t = i as f32 / SAMPLE_RATE_HZ as f32;
                let f0 = 150.0 + 30.0 * (2.0 * PI * 3.0 * t).sin();
                phase += 2.0 * PI * f0 / SAMPLE_RATE_HZ as f32;
                let env = 0.6 + 0.4 * (2.0 * PI * 2.0 * t).sin();
                let s: f32 = (1..=8).map(|h| (phase * h as f32).sin() / h as f32).sum();
                0.2 * env * s
            })
            .collect()
    }

    fn tone(freq: f32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| 0.5 * (2.0 * PI * freq * i as f32 / SAMPLE_RATE_HZ as f32).sin())
            .collect()
    }

    /// Best normalized cross-correlation of `b` delayed by 0..max_lag against `a`.
    fn best_correlation(a: &[f32], b: &[f32], max_lag: usize) -> f32 {
        (0..max_lag)
            .map(|lag| {
                let n = a.len() - max_lag;
                let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
                for i in 0..n {
                    let x = f64::from(a[i]);
                    let y = f64::from(b[i + lag]);
                    ab += x * y;
                    aa += x * x;
                    bb += y * y;
                }
                (ab / (aa.sqrt() * bb.sqrt()).max(1e-12)) as f32
            })
            .fold(f32::MIN, f32::max)
    }

    fn error_energy(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x - y) * f64::from(x - y))
            .sum()
    }

    #[test]
    fn frame_durations_have_the_documented_sizes() {
        assert_eq!(FrameDuration::Ms20.samples(), 960);
        assert_eq!(FrameDuration::Ms10.samples(), 480);
        assert_eq!(FrameDuration::Ms10.duration(), Duration::from_millis(10));
        assert_eq!(FrameDuration::default(), FrameDuration::Ms20);
    }

    #[test]
    fn tone_survives_encode_and_decode_for_both_frame_sizes() {
        for frame in [FrameDuration::Ms20, FrameDuration::Ms10] {
            let n = frame.samples();
            let input = tone(440.0, n * 50);
            let mut enc = OpusEncoder::new(frame, DEFAULT_BITRATE_BPS).unwrap();
            let mut dec = OpusDecoder::new().unwrap();
            let mut payload = [0u8; MAX_PAYLOAD];
            let mut output = vec![0.0f32; input.len()];
            for (pcm, out) in input.chunks(n).zip(output.chunks_mut(n)) {
                let len = enc.encode(pcm, &mut payload).unwrap();
                assert!(len > DTX_MAX_PAYLOAD, "a loud tone is never a DTX frame");
                assert_eq!(dec.decode(&payload[..len], out).unwrap(), n);
            }
            // Skip the first frames (encoder start-up) and allow up to 20 ms of codec delay.
            let corr = best_correlation(&input[n * 5..], &output[n * 5..], 960);
            assert!(corr > 0.9, "{frame:?}: correlation {corr}");
        }
    }

    #[test]
    fn wrong_frame_length_is_refused_with_a_clear_error() {
        let mut enc = OpusEncoder::new(FrameDuration::Ms20, DEFAULT_BITRATE_BPS).unwrap();
        let mut out = [0u8; MAX_PAYLOAD];
        let err = enc.encode(&[0.0; 480], &mut out).unwrap_err();
        assert_eq!(
            err,
            CodecError::WrongFrameLength {
                expected: 960,
                got: 480
            }
        );
        assert!(err.to_string().contains("480"));
    }

    #[test]
    fn corrupt_and_empty_payloads_are_errors_not_panics() {
        let mut dec = OpusDecoder::new().unwrap();
        let mut out = [0.0f32; 960];
        assert_eq!(dec.decode(&[], &mut out), Err(CodecError::EmptyPayload));
        // TOC byte announcing code 3 (arbitrary frame count) with a missing count byte.
        assert!(matches!(
            dec.decode(&[0xFF], &mut out),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn dtx_turns_silence_into_tiny_payloads() {
        let mut enc = OpusEncoder::new(FrameDuration::Ms20, DEFAULT_BITRATE_BPS).unwrap();
        let mut out = [0u8; MAX_PAYLOAD];
        let silence = [0.0f32; 960];
        let lens: Vec<usize> = (0..100)
            .map(|_| enc.encode(&silence, &mut out).unwrap())
            .collect();
        let tiny = lens.iter().filter(|&&l| is_dtx_payload(l)).count();
        assert!(
            tiny >= 80,
            "only {tiny} of 100 silent frames were DTX: {lens:?}"
        );
    }

    #[test]
    fn fec_recovers_a_lost_frame_better_than_concealment() {
        let frame = FrameDuration::Ms20;
        let n = frame.samples();
        let input = voiced(n * 60);
        let mut enc = OpusEncoder::new(frame, 32_000).unwrap();
        enc.set_expected_loss_percent(20).unwrap();
        let mut payload = [0u8; MAX_PAYLOAD];
        let packets: Vec<Vec<u8>> = input
            .chunks(n)
            .map(|pcm| {
                let len = enc.encode(pcm, &mut payload).unwrap();
                payload[..len].to_vec()
            })
            .collect();

        // Reference: everything received. Then lose frames 30, 40 and 50 in two other decoders.
        let decode_all = |lost: &[usize], use_fec: bool| {
            let mut dec = OpusDecoder::new().unwrap();
            let mut out = vec![0.0f32; input.len()];
            for (i, chunk) in out.chunks_mut(n).enumerate() {
                if lost.contains(&i) {
                    if use_fec {
                        dec.decode_fec(&packets[i + 1], chunk).unwrap();
                    } else {
                        dec.conceal(chunk).unwrap();
                    }
                } else {
                    dec.decode(&packets[i], chunk).unwrap();
                }
            }
            out
        };
        let lost = [30, 40, 50];
        let reference = decode_all(&[], false);
        let with_fec = decode_all(&lost, true);
        let with_plc = decode_all(&lost, false);
        let (mut fec_err, mut plc_err) = (0.0, 0.0);
        for &i in &lost {
            let range = i * n..(i + 1) * n;
            fec_err += error_energy(&reference[range.clone()], &with_fec[range.clone()]);
            plc_err += error_energy(&reference[range.clone()], &with_plc[range]);
        }
        assert!(
            fec_err < plc_err * 0.5,
            "FEC error {fec_err} is not clearly below PLC error {plc_err}"
        );
    }

    #[test]
    fn concealment_produces_a_full_frame_without_any_packet() {
        let mut dec = OpusDecoder::new().unwrap();
        let mut out = [1.0f32; 480];
        assert_eq!(dec.conceal(&mut out).unwrap(), 480);
        assert!(
            out.iter().all(|s| s.abs() < 1e-3),
            "PLC of nothing is silence"
        );
    }

    #[test]
    fn opus_toc_gives_the_frame_duration() {
        // CELT fullband 20 ms, one frame: config 31 -> 0b11111_0_00.
        assert_eq!(opus_frame_duration(&[31 << 3]), Some(FrameDuration::Ms20));
        assert_eq!(opus_frame_duration(&[30 << 3]), Some(FrameDuration::Ms10));
        // SILK 60 ms: not playable by us.
        assert_eq!(opus_frame_duration(&[3 << 3]), None);
        assert_eq!(opus_frame_duration(&[]), None);
        // Two frames per packet.
        assert_eq!(opus_frame_duration(&[(31 << 3) | 1]), None);
        // Code 3 (padding, where DRED travels) with one frame, and with three.
        assert_eq!(
            opus_frame_duration(&[(31 << 3) | 3, 0x40 | 1, 9]),
            Some(FrameDuration::Ms20)
        );
        assert_eq!(opus_frame_duration(&[(31 << 3) | 3, 3]), None);
        assert_eq!(opus_frame_duration(&[(31 << 3) | 3]), None);
    }
}
