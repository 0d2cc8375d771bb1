//! Opus speech encoder for our outgoing stream: VOIP application, in-band FEC, deep redundancy
//! (DRED), DTX. It does not allocate per frame.

use opusic_c::{Application, Bitrate, Channels, Encoder, InbandFec, SampleRate, Signal};

use crate::voice::codec::{setup, CodecError, FrameDuration, MAX_PAYLOAD};

/// How much speech before each packet its deep redundancy (DRED) may describe, in 10 ms units.
/// libopus spends bits on it only as the expected loss and the bit rate allow: with in-band FEC
/// on, only at high loss (none at a 20 % hint and 32 kb/s on recorded speech, 80-99 ms from
/// 30 %), with FEC off ([`LossShape::Bursty`]) from a 5 % hint; so a clean link pays nothing.
/// In practice a packet's DRED then reaches back four 20 ms frames (80-99 ms): asking for 150
/// or 200 ms reached no further at 32 kb/s (the bits run out first).
pub const DRED_DURATION_10MS: u8 = 10;

/// Reported loss from which the encoder spends [`LOSS_BOOST_BPS`] more.
const LOSS_BOOST_FROM_PERCENT: u8 = 3;
/// What lossy links get on top of the configured bit rate.
const LOSS_BOOST_BPS: u32 = 8_000;

/// The bit rate to encode at when our listeners lose `loss_percent` of our packets:
/// `base_bps` on a clean link, 8 kb/s more from 3 % loss. The redundancy that fills those bits
/// (FEC for single losses, DRED for bursts at high loss) is worth more than the kilobits: on
/// the codec alone, 32 kb/s scored 0.46 / 0.05 / 0.20 / 0.13 PESQ-WB above 24 kb/s at 5 / 10 /
/// 20 % random and 10 % bursty loss, while 28 kb/s gained nothing at 5 % (docs/BENCHMARKS.md).
/// A step, not a ramp, for that reason. Voice is a few kb/s on links that carry megabits, so
/// this does not feed congestion the way a video stream's increase would.
pub fn bitrate_for_loss(base_bps: u32, loss_percent: u8) -> u32 {
    if loss_percent >= LOSS_BOOST_FROM_PERCENT {
        base_bps + LOSS_BOOST_BPS
    } else {
        base_bps
    }
}

/// How the loss our listeners report comes, which decides the kind of redundancy we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossShape {
    /// Single losses, or none: in-band FEC, which rebuilds one lost packet from the next at
    /// near full quality (on the codec alone, 10 % random loss: 3.85 PESQ-WB with FEC, 3.13
    /// with deep redundancy in its place).
    #[default]
    Scattered,
    /// Runs of two or more lost packets: in-band FEC off, so that libopus gives its bits to
    /// deep redundancy (with FEC on it adds DRED only from about 20 % loss), which rebuilds a
    /// whole burst from the packet after it (10 % loss in bursts of 3: 3.19 against 2.82 with
    /// FEC, at a receiver delay that covers four frames; docs/BENCHMARKS.md).
    Bursty,
}

/// Listeners losing less than this much of our voice do not count for the shape: they need
/// little redundancy of either kind, and their runs say little.
pub const SHAPE_MIN_LOSS_PERCENT: f32 = 1.0;

impl LossShape {
    /// The shape of losses whose typical run is `loss_run` packets (0 or 1: single).
    pub fn from_loss_run(loss_run: u8) -> Self {
        if loss_run >= 2 {
            Self::Bursty
        } else {
            Self::Scattered
        }
    }

    /// The shape to encode for, from each listener's `(loss percent, typical run)`. One
    /// encoder serves every listener, and FEC is worth far more than deep redundancy to one
    /// who loses single packets (3.85 against 3.13 PESQ-WB at 10 %), so the loss counts as
    /// bursty only when every listener who loses a noticeable share
    /// ([`SHAPE_MIN_LOSS_PERCENT`]) loses it in runs.
    pub fn for_listeners(listeners: impl IntoIterator<Item = (f32, u8)>) -> Self {
        let mut shape = None;
        for (loss, run) in listeners {
            if loss < SHAPE_MIN_LOSS_PERCENT {
                continue;
            }
            match Self::from_loss_run(run) {
                Self::Scattered => return Self::Scattered,
                Self::Bursty => shape = Some(Self::Bursty),
            }
        }
        shape.unwrap_or(Self::Scattered)
    }
}

/// Opus speech encoder for one outgoing stream.
///
/// Invariant: configured as 48 kHz mono VOIP with DTX and deep redundancy on, and in-band FEC
/// on unless the loss is [`LossShape::Bursty`]; `encode` accepts only frames of the duration
/// chosen at construction.
pub struct OpusEncoder {
    inner: Encoder,
    frame: FrameDuration,
    expected_loss_percent: u8,
    loss_shape: LossShape,
}

impl OpusEncoder {
    /// Creates an encoder for frames of `frame` duration at `bitrate_bps` (e.g.
    /// [`DEFAULT_BITRATE_BPS`](crate::voice::codec::DEFAULT_BITRATE_BPS)).
    pub fn new(frame: FrameDuration, bitrate_bps: u32) -> Result<Self, CodecError> {
        let mut inner = Encoder::new(Channels::Mono, SampleRate::Hz48000, Application::Voip)
            .map_err(setup("encoder"))?;
        inner
            .set_bitrate(Bitrate::Value(bitrate_bps))
            .map_err(setup("bit rate"))?;
        inner
            .set_signal(Signal::Voice)
            .map_err(setup("signal type"))?;
        inner
            .set_inband_fec(InbandFec::Mode1)
            .map_err(setup("in-band FEC"))?;
        inner.set_dtx(true).map_err(setup("DTX"))?;
        inner
            .set_dred_duration(DRED_DURATION_10MS)
            .map_err(setup("deep redundancy"))?;
        let mut encoder = Self {
            inner,
            frame,
            expected_loss_percent: 0,
            loss_shape: LossShape::Scattered,
        };
        // FEC only carries redundancy when a loss rate is expected; start with a modest hint
        // until measurements arrive.
        encoder.set_expected_loss_percent(5)?;
        Ok(encoder)
    }

    /// The frame duration `encode` expects.
    pub fn frame_duration(&self) -> FrameDuration {
        self.frame
    }

    /// Changes the target bit rate.
    pub fn set_bitrate(&mut self, bitrate_bps: u32) -> Result<(), CodecError> {
        self.inner
            .set_bitrate(Bitrate::Value(bitrate_bps))
            .map_err(setup("bit rate"))
    }

    /// Tells the encoder how much packet loss to expect (0..=100, clamped), which sizes the
    /// in-band FEC and the deep redundancy. Feed it the loss measured by the receiving peers.
    pub fn set_expected_loss_percent(&mut self, percent: u8) -> Result<(), CodecError> {
        let percent = percent.min(100);
        self.inner
            .set_packet_loss(percent)
            .map_err(setup("expected packet loss"))?;
        self.expected_loss_percent = percent;
        Ok(())
    }

    /// The loss hint last set.
    pub fn expected_loss_percent(&self) -> u8 {
        self.expected_loss_percent
    }

    /// Chooses the redundancy for how the loss comes: in-band FEC for single losses, deep
    /// redundancy alone for bursts (see [`LossShape`]).
    pub fn set_loss_shape(&mut self, shape: LossShape) -> Result<(), CodecError> {
        if shape == self.loss_shape {
            return Ok(());
        }
        let fec = match shape {
            LossShape::Scattered => InbandFec::Mode1,
            LossShape::Bursty => InbandFec::Off,
        };
        self.inner
            .set_inband_fec(fec)
            .map_err(setup("in-band FEC"))?;
        self.loss_shape = shape;
        Ok(())
    }

    /// The loss shape last set.
    pub fn loss_shape(&self) -> LossShape {
        self.loss_shape
    }

    /// Encodes one frame of samples in [-1, 1] into `out` (reserve [`MAX_PAYLOAD`] bytes) and
    /// returns the payload length. Check
    /// [`is_dtx_payload`](crate::voice::codec::is_dtx_payload) before sending it.
    pub fn encode(&mut self, pcm: &[f32], out: &mut [u8]) -> Result<usize, CodecError> {
        let expected = self.frame.samples();
        if pcm.len() != expected {
            return Err(CodecError::WrongFrameLength {
                expected,
                got: pcm.len(),
            });
        }
        let limit = out.len().min(MAX_PAYLOAD);
        self.inner
            .encode_float_to_slice(pcm, &mut out[..limit])
            .map_err(|e| CodecError::Encode(e.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_is_bursty_only_when_every_listener_who_loses_loses_in_runs() {
        use LossShape::*;
        assert_eq!(LossShape::for_listeners([]), Scattered);
        assert_eq!(LossShape::for_listeners([(10.0, 3)]), Bursty);
        // A clean listener does not count either way.
        assert_eq!(LossShape::for_listeners([(10.0, 3), (0.2, 0)]), Bursty);
        // One who loses single packets keeps FEC for everyone.
        assert_eq!(LossShape::for_listeners([(10.0, 3), (8.0, 1)]), Scattered);
        assert_eq!(LossShape::for_listeners([(8.0, 1), (10.0, 3)]), Scattered);
        assert_eq!(LossShape::for_listeners([(0.5, 4)]), Scattered);
    }

    #[test]
    fn lossy_links_get_the_boost_and_clean_ones_do_not() {
        assert_eq!(bitrate_for_loss(24_000, 0), 24_000);
        assert_eq!(bitrate_for_loss(24_000, 2), 24_000);
        assert_eq!(bitrate_for_loss(24_000, 3), 32_000);
        assert_eq!(bitrate_for_loss(24_000, 50), 32_000);
    }
}
