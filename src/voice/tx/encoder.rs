//! Opus speech encoder for our outgoing stream: VOIP application, in-band FEC, DTX. It does not
//! allocate per frame.

use opusic_c::{Application, Bitrate, Channels, Encoder, InbandFec, SampleRate, Signal};

use crate::voice::codec::{setup, CodecError, FrameDuration, MAX_PAYLOAD};

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
