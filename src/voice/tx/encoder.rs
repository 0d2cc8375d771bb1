//! Opus speech encoder for our outgoing stream: VOIP application, in-band FEC, deep redundancy
//! (DRED), DTX. It does not allocate per frame.

use opusic_c::{Application, Bitrate, Channels, Encoder, InbandFec, SampleRate, Signal};

use crate::voice::codec::{setup, CodecError, FrameDuration, MAX_PAYLOAD};

/// How much speech before each packet its deep redundancy (DRED) may describe, in 10 ms units.
/// 100 ms rebuilds a burst of five 20 ms frames from the first packet after it. libopus
/// spends bits on it only as the expected loss and the bit rate allow: with in-band FEC on, only
/// above about 28 kb/s and 10 % loss (see [`bitrate_for_loss`]), so a clean link pays nothing.
pub const DRED_DURATION_10MS: u8 = 10;

/// Extra bit rate per percent of expected loss, and the most loss that adds more.
const BPS_PER_LOSS_PERCENT: u32 = 800;
const MAX_LOSS_BOOST_PERCENT: u32 = 10;

/// The bit rate to encode at when peers lose `loss_percent` of our packets: `base_bps` on a
/// clean link, up to 8 kb/s more at 10 % loss and above. On a lossy (not congested) link the
/// redundancy that fills those bits (FEC for single losses, DRED for bursts) is worth more than
/// the kilobits: in our codec measurements 32 kb/s with FEC scored 0.1-0.6 PESQ-WB above
/// 24 kb/s at 5-20 % loss (docs/BENCHMARKS.md).
pub fn bitrate_for_loss(base_bps: u32, loss_percent: u8) -> u32 {
    base_bps + u32::from(loss_percent).min(MAX_LOSS_BOOST_PERCENT) * BPS_PER_LOSS_PERCENT
}

/// Opus speech encoder for one outgoing stream.
///
/// Invariant: configured as 48 kHz mono VOIP with in-band FEC and DTX on; `encode` accepts only
/// frames of the duration chosen at construction.
pub struct OpusEncoder {
    inner: Encoder,
    frame: FrameDuration,
    expected_loss_percent: u8,
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
    /// in-band FEC. Feed it the loss measured by the receiving peers.
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
