//! One peer's receive path: jitter buffer plus Opus decoder, producing one PCM frame per call.
//!
//! The voice thread pushes every voice datagram of the peer with [`PeerReceiver::push`] and, once
//! per frame period, asks for the frame to mix with [`PeerReceiver::pop_pcm`]. Corrupt payloads
//! never reach the speakers: they are concealed and counted.

use std::time::Duration;

use super::decoder::{has_fec, OpusDecoder};
use super::dred::Redundancy;
use super::jitter::{JitterBuffer, JitterConfig, JitterStats, Playout, PushOutcome};
use super::timescale::shorten as shorten_frame;
use crate::voice::codec::{CodecError, FrameDuration};

/// How the frame returned by [`PeerReceiver::pop_pcm`] was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlayoutKind {
    /// Decoded from the packet for this frame.
    Decoded,
    /// Recovered from the next packet's in-band FEC.
    Fec,
    /// Rebuilt from the deep redundancy (DRED) of a later packet.
    Rebuilt,
    /// Packet loss concealment (lost, late, undecodable, or inserted to grow the delay).
    Concealed,
    /// The peer is not talking; the frame is zeros.
    Silence,
}

/// Receive statistics of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReceiverStats {
    /// The jitter buffer's counters and estimates.
    pub jitter: JitterStats,
    /// Payloads that the decoder rejected (concealed instead).
    pub decode_errors: u64,
}

/// Jitter buffer and decoder for one remote peer.
///
/// Invariant: `pop_pcm` always fills the whole frame with finite samples, whatever arrived.
pub struct PeerReceiver {
    jitter: JitterBuffer,
    decoder: OpusDecoder,
    redundancy: Redundancy,
    frame: FrameDuration,
    decode_errors: u64,
}

impl PeerReceiver {
    /// Creates a receiver for a stream of `frame`-long packets with default jitter tuning.
    pub fn new(frame: FrameDuration) -> Result<Self, CodecError> {
        Self::with_config(JitterConfig::for_frame(frame))
    }

    /// Creates a receiver with explicit jitter buffer tuning.
    pub fn with_config(cfg: JitterConfig) -> Result<Self, CodecError> {
        Ok(Self {
            frame: cfg.frame,
            jitter: JitterBuffer::new(cfg),
            decoder: OpusDecoder::new()?,
            redundancy: Redundancy::new()?,
            decode_errors: 0,
        })
    }

    /// Frame duration of this stream; `pop_pcm` fills exactly `frame_duration().samples()`.
    pub fn frame_duration(&self) -> FrameDuration {
        self.frame
    }

    /// Hands over a voice packet that arrived at `now`.
    pub fn push(&mut self, now: Duration, seq: u32, timestamp: u32, payload: &[u8]) -> PushOutcome {
        self.jitter.push(now, seq, timestamp, payload)
    }

    /// Produces this frame period's audio into `out` (exactly one frame of samples), always a
    /// whole frame: the jitter buffer then takes excess delay out by dropping frames. A caller
    /// that can play a shorter frame uses [`Self::pop_scaled`] instead.
    ///
    /// # Panics
    /// If `out.len()` differs from the frame length: that is a wiring bug, not a network event.
    pub fn pop_pcm(&mut self, now: Duration, out: &mut [f32]) -> PlayoutKind {
        self.pop(now, out, false).0
    }

    /// Like [`Self::pop_pcm`], but when the jitter buffer wants delay taken out, a voiced or
    /// quiet frame comes out a pitch period shorter (time-scaling) instead of a frame being
    /// dropped later. Returns how the frame was made and how many samples of `out` it filled.
    ///
    /// # Panics
    /// If `out.len()` differs from the frame length.
    pub fn pop_scaled(&mut self, now: Duration, out: &mut [f32]) -> (PlayoutKind, usize) {
        self.pop(now, out, true)
    }

    fn pop(&mut self, now: Duration, out: &mut [f32], may_shorten: bool) -> (PlayoutKind, usize) {
        assert_eq!(
            out.len(),
            self.frame.samples(),
            "pop_pcm needs exactly one frame of samples"
        );
        let mut shorten = false;
        let result = match self.jitter.pop(now) {
            Playout::Packet {
                payload,
                shorten: wanted,
                ..
            } => {
                shorten = wanted && may_shorten;
                self.decoder
                    .decode(payload, out)
                    .map(|n| (n, PlayoutKind::Decoded))
            }
            Playout::Fec {
                timestamp,
                next_timestamp,
                next_payload,
            } => {
                // The next packet's FEC when it has some; its DRED when not (a packet coded
                // in CELT mode has no FEC); concealment when neither.
                if has_fec(next_payload) {
                    self.decoder
                        .decode_fec(next_payload, out)
                        .map(|n| (n, PlayoutKind::Fec))
                } else {
                    let offset = next_timestamp.wrapping_sub(timestamp) as usize;
                    rebuild(
                        &mut self.decoder,
                        &mut self.redundancy,
                        (next_timestamp, next_payload),
                        offset,
                        out,
                    )
                }
            }
            Playout::Rebuild {
                timestamp,
                later_timestamp,
                later_payload,
            } => {
                let offset = later_timestamp.wrapping_sub(timestamp) as usize;
                rebuild(
                    &mut self.decoder,
                    &mut self.redundancy,
                    (later_timestamp, later_payload),
                    offset,
                    out,
                )
            }
            Playout::Conceal { .. } => self
                .decoder
                .conceal(out)
                .map(|n| (n, PlayoutKind::Concealed)),
            Playout::Silence => {
                out.fill(0.0);
                return (PlayoutKind::Silence, out.len());
            }
        };
        let kind = match result {
            Ok((n, kind)) if n == out.len() => kind,
            Ok((n, _)) => {
                // A packet of another duration: keep what was decoded, pad with silence.
                self.decode_errors += 1;
                let len = out.len();
                out[n.min(len)..].fill(0.0);
                return (PlayoutKind::Concealed, len);
            }
            Err(_) => {
                self.decode_errors += 1;
                if self.decoder.conceal(out).is_err() {
                    out.fill(0.0);
                }
                return (PlayoutKind::Concealed, out.len());
            }
        };
        if shorten {
            if let Some(len) = shorten_frame(out) {
                self.jitter.note_shortened(out.len() - len);
                return (kind, len);
            }
        }
        (kind, out.len())
    }

    /// True while a talkspurt is being played; false while waiting for one to start.
    pub fn is_playing(&self) -> bool {
        self.jitter.is_playing()
    }

    /// Current receive statistics.
    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            jitter: self.jitter.stats(),
            decode_errors: self.decode_errors,
        }
    }

    /// Forgets the stream (the peer restarted its session).
    pub fn reset(&mut self) -> Result<(), CodecError> {
        self.jitter.reset();
        self.decode_errors = 0;
        self.redundancy.reset();
        self.decoder.reset()
    }
}

/// Rebuilds the lost frame `offset` samples before the `later` packet (timestamp, payload)
/// from that packet's DRED, or conceals it when the redundancy does not reach that far back.
fn rebuild(
    decoder: &mut OpusDecoder,
    redundancy: &mut Redundancy,
    (later_timestamp, later_payload): (u32, &[u8]),
    offset: usize,
    out: &mut [f32],
) -> Result<(usize, PlayoutKind), CodecError> {
    redundancy.parse(later_timestamp, later_payload);
    if redundancy.covers(offset, out.len()) {
        decoder
            .decode_redundancy(redundancy, offset, out)
            .map(|n| (n, PlayoutKind::Rebuilt))
    } else {
        decoder.conceal(out).map(|n| (n, PlayoutKind::Concealed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::voice::codec::{DEFAULT_BITRATE_BPS, MAX_PAYLOAD};
    use crate::voice::tx::OpusEncoder;

    /// Speech-like frame `index` of a continuous voiced signal (150 Hz with harmonics).
    fn voiced_frame(index: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = (index * n + i) as f32 / 48_000.0;
                let s: f32 = (1..=8)
                    .map(|h| (2.0 * std::f32::consts::PI * 150.0 * h as f32 * t).sin() / h as f32)
                    .sum();
                0.2 * s
            })
            .collect()
    }

    /// `frames` 20 ms packets of the voiced signal at `bitrate`, encoded for `loss_percent`
    /// expected loss (`None`: the encoder's starting hint).
    fn voiced_packets(frames: usize, bitrate: u32, loss_percent: Option<u8>) -> Vec<Vec<u8>> {
        let n = FrameDuration::Ms20.samples();
        let mut enc = OpusEncoder::new(FrameDuration::Ms20, bitrate).unwrap();
        if let Some(loss) = loss_percent {
            enc.set_expected_loss_percent(loss).unwrap();
        }
        let mut payload = [0u8; MAX_PAYLOAD];
        (0..frames)
            .map(|i| {
                let len = enc.encode(&voiced_frame(i, n), &mut payload).unwrap();
                payload[..len].to_vec()
            })
            .collect()
    }

    #[test]
    fn lossy_stream_is_decoded_recovered_and_concealed_like_a_direct_decoder() {
        let frame = FrameDuration::Ms20;
        let n = frame.samples();
        let packets = voiced_packets(100, DEFAULT_BITRATE_BPS, Some(20));
        // Every 10th packet is lost; a single loss is recoverable from the next packet's FEC.
        let lost = |i: usize| i % 10 == 5;

        let mut rx = PeerReceiver::new(frame).unwrap();
        let mut reference = OpusDecoder::new().unwrap();
        let mut out = vec![0.0f32; n];
        let mut expected = vec![0.0f32; n];
        let mut next_frame = 0;
        let mut kinds = Vec::new();
        for i in 0..100usize {
            let now = Duration::from_millis(i as u64 * 20);
            if !lost(i) {
                rx.push(
                    now + Duration::from_millis(5),
                    i as u32,
                    (i * n) as u32,
                    &packets[i],
                );
            }
            let kind = rx.pop_pcm(now + Duration::from_millis(6), &mut out);
            if kind == PlayoutKind::Silence {
                continue;
            }
            // The same frame decoded directly, as the receiver should have done it.
            let f = next_frame;
            next_frame += 1;
            // libopus leaves FEC out of a packet now and then (it decides per frame);
            // without it and without deep redundancy (none at 24 kb/s), the frame is concealed.
            let want = if lost(f) && has_fec(&packets[f + 1]) {
                reference
                    .decode_fec(&packets[f + 1], &mut expected)
                    .unwrap();
                PlayoutKind::Fec
            } else if lost(f) {
                reference.conceal(&mut expected).unwrap();
                PlayoutKind::Concealed
            } else {
                reference.decode(&packets[f], &mut expected).unwrap();
                PlayoutKind::Decoded
            };
            assert_eq!(kind, want, "frame {f}");
            assert_eq!(out, expected, "frame {f} differs from a direct decode");
            kinds.push(kind);
        }
        assert!(kinds.len() >= 98);
        // libopus leaves FEC out of the later packets of this steady synthetic vowel: those
        // losses are concealed, as `want` expects.
        let fec = kinds.iter().filter(|&&k| k == PlayoutKind::Fec).count();
        assert!(fec >= 3, "only {fec} of 10 losses had FEC: {kinds:?}");
        let stats = rx.stats();
        assert_eq!(stats.jitter.lost, 10);
        assert_eq!(stats.jitter.fec_recovered, 10);
        assert_eq!(stats.decode_errors, 0);
    }

    fn error_energy(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
    }

    /// A burst of three lost packets, with a buffer deep enough that the packet after the
    /// burst is at hand when the first lost frame is due: every lost frame is rebuilt from that
    /// packet's deep redundancy (or FEC for the last one), and the rebuilt frames are closer to
    /// what was sent than concealment is.
    #[test]
    fn a_burst_of_losses_is_rebuilt_from_the_next_packets_deep_redundancy() {
        let frame = FrameDuration::Ms20;
        let n = frame.samples();
        // 32 kb/s and 30 % expected loss: enough bits for libopus to add DRED next to FEC.
        let packets = voiced_packets(80, 32_000, Some(30));
        let burst = 50..53;
        let cfg = JitterConfig {
            min_delay: Duration::from_millis(90),
            ..JitterConfig::for_frame(frame)
        };
        let mut rx = PeerReceiver::with_config(cfg).unwrap();
        let mut heard = Vec::new();
        let mut kinds = Vec::new();
        let mut out = vec![0.0f32; n];
        for (i, packet) in packets.iter().enumerate() {
            let now = Duration::from_millis(i as u64 * 20);
            if !burst.contains(&i) {
                rx.push(now, i as u32, (i * n) as u32, packet);
            }
            let kind = rx.pop_pcm(now + Duration::from_millis(1), &mut out);
            if kind != PlayoutKind::Silence {
                kinds.push(kind);
                heard.extend_from_slice(&out);
            }
        }
        // Frame f of the stream is kinds[f] (the talkspurt starts at frame 0).
        let rebuilt: Vec<PlayoutKind> = burst.clone().map(|f| kinds[f]).collect();
        assert_eq!(
            &rebuilt[..2],
            &[PlayoutKind::Rebuilt, PlayoutKind::Rebuilt],
            "{rebuilt:?}"
        );
        assert!(
            matches!(rebuilt[2], PlayoutKind::Fec | PlayoutKind::Rebuilt),
            "{rebuilt:?}"
        );

        // The same stream decoded with every packet, and with plain concealment of the burst.
        let decode = |conceal: bool| {
            let mut dec = OpusDecoder::new().unwrap();
            let mut pcm = vec![0.0f32; 80 * n];
            for (i, chunk) in pcm.chunks_mut(n).enumerate() {
                if conceal && burst.contains(&i) {
                    dec.conceal(chunk).unwrap();
                } else {
                    dec.decode(&packets[i], chunk).unwrap();
                }
            }
            pcm
        };
        let (reference, concealed) = (decode(false), decode(true));
        // The burst and the frame after it, where the decoder finds its way back. (Deep
        // concealment extrapolates this steady synthetic vowel well; on speech the gap is
        // wider, see the PESQ figures in docs/BENCHMARKS.md.)
        let span = burst.start * n..(burst.end + 1) * n;
        let rebuilt_err = error_energy(&reference[span.clone()], &heard[span.clone()]);
        let concealed_err = error_energy(&reference[span.clone()], &concealed[span]);
        assert!(
            rebuilt_err < concealed_err * 0.75,
            "rebuilt error {rebuilt_err} is not clearly below concealment's {concealed_err}"
        );
    }

    /// The same bursts of three on a link with the default tuning (10 ms floor): after the
    /// first bursts the buffer holds enough delay that every later burst is rebuilt from the
    /// deep redundancy of the packet after it (FEC for its last frame), with nothing
    /// concealed. At the one-frame FEC lookahead the first two frames of each were concealed.
    #[test]
    fn repeated_bursts_raise_the_delay_until_each_burst_is_rebuilt() {
        let frame = FrameDuration::Ms20;
        let n = frame.samples();
        let frames = 400;
        let packets = voiced_packets(frames, 32_000, Some(30));
        let lost = |i: usize| i % 25 < 3 && i >= 25;
        let mut rx = PeerReceiver::new(frame).unwrap();
        let mut kinds = Vec::new();
        let mut out = vec![0.0f32; n];
        for (i, packet) in packets.iter().enumerate().take(frames) {
            let now = Duration::from_millis(i as u64 * 20);
            if !lost(i) {
                rx.push(now, i as u32, (i * n) as u32, packet);
            }
            kinds.push(rx.pop_pcm(now + Duration::from_millis(1), &mut out));
        }
        // From 4.5 s on (the delay grew during the first bursts): nothing concealed, and
        // most of each burst rebuilt from DRED (the last frame may come from FEC).
        let later = &kinds[225..];
        let concealed = later
            .iter()
            .filter(|&&k| k == PlayoutKind::Concealed)
            .count();
        let rebuilt = later.iter().filter(|&&k| k == PlayoutKind::Rebuilt).count();
        let bursts = (225..frames).filter(|&i| i % 25 == 0).count();
        assert_eq!(concealed, 0, "{later:?}");
        assert!(
            rebuilt >= 2 * bursts,
            "{rebuilt} rebuilt in {bursts} bursts: {later:?}"
        );
        let stats = rx.stats().jitter;
        assert!(stats.burst_cover >= Duration::from_millis(60), "{stats:?}");
    }

    /// A talker whose clock runs 3 % fast sends more audio than we play; the excess delay must
    /// go. Time-scaled (`pop_scaled`, what the engine uses), it goes by shortening voiced
    /// frames by a pitch period and no frame of speech is dropped; without time-scaling
    /// (`pop_pcm`) whole frames are dropped.
    #[test]
    fn a_fast_talker_clock_is_absorbed_by_shortening_frames_not_dropping_them() {
        let frame = FrameDuration::Ms20;
        let n = frame.samples();
        let frames = 1000; // 20 s
        let packets = voiced_packets(frames, DEFAULT_BITRATE_BPS, None);
        let run = |scaled: bool| {
            let mut rx = PeerReceiver::new(frame).unwrap();
            let mut out = vec![0.0f32; n];
            let (mut next, mut queued) = (0usize, 0usize);
            // We play 10 ms chunks in real time; frame i arrives at 0.97 * 20 ms * i.
            for step in 0..(frames as u64 * 2 - 10) {
                let now_ms = step as f64 * 10.0;
                while next < frames && next as f64 * 20.0 * 0.97 <= now_ms {
                    let at = Duration::from_secs_f64(next as f64 * 0.0194);
                    rx.push(at, next as u32, (next * n) as u32, &packets[next]);
                    next += 1;
                }
                let now = Duration::from_secs_f64(now_ms / 1000.0);
                while queued < 480 {
                    queued += if scaled {
                        rx.pop_scaled(now, &mut out).1
                    } else {
                        rx.pop_pcm(now, &mut out);
                        n
                    };
                }
                queued -= 480;
            }
            rx.stats().jitter
        };
        let scaled = run(true);
        assert_eq!(scaled.dropped, 0, "{scaled:?}");
        assert!(scaled.shortened > 10, "{scaled:?}");
        // 3 % of 20 s is 600 ms that had to go, and went.
        let taken = scaled.shortened_by.as_secs_f64();
        assert!(
            (0.45..0.75).contains(&taken),
            "shortened by {taken} s: {scaled:?}"
        );
        assert!(scaled.current_delay < scaled.target_delay + Duration::from_millis(40));

        let dropping = run(false);
        assert!(dropping.dropped > 10, "{dropping:?}");
        assert_eq!(dropping.shortened, 0);
    }

    #[test]
    fn corrupt_payload_is_concealed_and_counted() {
        let mut rx = PeerReceiver::new(FrameDuration::Ms20).unwrap();
        let mut out = vec![1.0f32; 960];
        rx.push(Duration::ZERO, 0, 0, &[0xFF]);
        let kind = rx.pop_pcm(Duration::from_millis(20), &mut out);
        assert_eq!(kind, PlayoutKind::Concealed);
        assert_eq!(rx.stats().decode_errors, 1);
        assert!(out.iter().all(|s| s.abs() < 1e-3));
    }

    #[test]
    fn nothing_received_plays_silence() {
        let mut rx = PeerReceiver::new(FrameDuration::Ms10).unwrap();
        let mut out = vec![1.0f32; 480];
        assert_eq!(
            rx.pop_pcm(Duration::from_millis(10), &mut out),
            PlayoutKind::Silence
        );
        assert!(out.iter().all(|&s| s == 0.0));
    }

    #[test]
    #[should_panic(expected = "exactly one frame")]
    fn wrong_output_length_is_a_wiring_bug() {
        let mut rx = PeerReceiver::new(FrameDuration::Ms20).unwrap();
        rx.pop_pcm(Duration::ZERO, &mut [0.0; 480]);
    }
}
