//! Opus decoder for one peer's stream. It exposes the three ways of producing a frame: a normal
//! decode, recovery of a lost frame from the next packet's in-band FEC, and packet loss
//! concealment. It does not allocate per frame.

use opusic_c::{Channels, Decoder, SampleRate};

use crate::voice::codec::{setup, CodecError};

/// Opus decoder for one incoming stream (one per peer: decoder state is per stream).
///
/// The output length of each call is the caller's frame length; it must be a multiple of 2.5 ms
/// (120 samples) and at most 120 ms.
pub struct OpusDecoder {
    inner: Decoder,
}

impl OpusDecoder {
    /// Creates a 48 kHz mono decoder.
    pub fn new() -> Result<Self, CodecError> {
        let inner = Decoder::new(Channels::Mono, SampleRate::Hz48000).map_err(setup("decoder"))?;
        Ok(Self { inner })
    }

    /// Decodes `payload` into `out`, returning the number of samples written.
    pub fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<usize, CodecError> {
        if payload.is_empty() {
            return Err(CodecError::EmptyPayload);
        }
        self.inner
            .decode_float_to_slice(payload, out, false)
            .map_err(|e| CodecError::Decode(e.message()))
    }

    /// Reconstructs the frame *before* `next_payload` (which was lost) from the in-band FEC data
    /// that `next_payload` carries; `out.len()` must be the lost frame's length. Without FEC data
    /// in the packet libopus conceals instead. Decode `next_payload` normally afterwards.
    pub fn decode_fec(
        &mut self,
        next_payload: &[u8],
        out: &mut [f32],
    ) -> Result<usize, CodecError> {
        if next_payload.is_empty() {
            return self.conceal(out);
        }
        self.inner
            .decode_float_to_slice(next_payload, out, true)
            .map_err(|e| CodecError::Decode(e.message()))
    }

    /// Fills `out` with packet loss concealment extrapolated from the previous frames.
    pub fn conceal(&mut self, out: &mut [f32]) -> Result<usize, CodecError> {
        self.inner
            .decode_float_to_slice(&[], out, false)
            .map_err(|e| CodecError::Decode(e.message()))
    }

    /// Forgets the stream history (use when a peer's stream restarts).
    pub fn reset(&mut self) -> Result<(), CodecError> {
        self.inner.reset().map_err(setup("decoder reset"))
    }
}
