//! Opus decoder for one peer's stream. It exposes the ways of producing a frame: a normal
//! decode, recovery of a lost frame from the next packet's in-band FEC, rebuilding lost frames
//! from the deep redundancy (DRED) that a later packet carries, and packet loss concealment.
//! It does not allocate per frame.
//!
//! This talks to libopus 1.6 through `opusic_c::sys` rather than `opusic_c::Decoder`: DRED
//! must decode into the same decoder state as the normal path, at any offset before the
//! packet that carries it (the crate's `Dred` wrapper owns its own decoder and only decodes
//! the frame just before the packet), and the decoder's complexity selects the neural
//! concealment and enhancement that make losses and low bit rates sound better.

use std::ffi::c_int;
use std::ptr::NonNull;

use opusic_c::{sys, ErrorCode};

use super::dred::Redundancy;
use crate::voice::codec::{CodecError, SAMPLE_RATE_HZ};

/// Decoder complexity: 5 and up turn on deep packet loss concealment, 6 the LACE and 7 the
/// NoLACE enhancement of SILK speech (libopus 1.5+, OSCE). On this project's 2-core VM a
/// speech frame takes 0.14-0.18 ms to decode at 7 against 0.034 ms at 0, and a concealed one
/// about 0.5 ms (docs/BENCHMARKS.md): under 1 % of a core per talking peer. It lifts PESQ-WB
/// at every loss rate we measured (+0.05 clean, +0.2 under 20 % and bursty loss).
pub const DECODER_COMPLEXITY: u8 = 7;

/// Opus decoder for one incoming stream (one per peer: decoder state is per stream).
///
/// The output length of each call is the caller's frame length; it must be a multiple of 2.5 ms
/// (120 samples) and at most 120 ms.
///
/// Invariant: `raw` is a live libopus decoder owned by this value alone (freed on drop).
pub struct OpusDecoder {
    raw: NonNull<sys::OpusDecoder>,
}

// SAFETY: the decoder is plain memory owned by this value; libopus keeps no thread-local or
// shared state for it, so it may move between threads (it is never shared: no `Sync`).
unsafe impl Send for OpusDecoder {}

fn error(code: c_int) -> &'static str {
    ErrorCode::from(code).message()
}

fn setup_error(what: &'static str, code: c_int) -> CodecError {
    CodecError::Setup {
        what,
        reason: error(code),
    }
}

impl OpusDecoder {
    /// Creates a 48 kHz mono decoder with [`DECODER_COMPLEXITY`].
    pub fn new() -> Result<Self, CodecError> {
        Self::with_complexity(DECODER_COMPLEXITY)
    }

    /// Creates a 48 kHz mono decoder; `complexity` 0..=10 (see [`DECODER_COMPLEXITY`]).
    pub fn with_complexity(complexity: u8) -> Result<Self, CodecError> {
        let mut code: c_int = 0;
        // SAFETY: plain constructor; `code` outlives the call.
        let raw = unsafe { sys::opus_decoder_create(SAMPLE_RATE_HZ as i32, 1, &mut code) };
        let raw = match NonNull::new(raw) {
            Some(raw) if code == sys::OPUS_OK => raw,
            _ => return Err(setup_error("decoder", code)),
        };
        let decoder = Self { raw };
        // SAFETY: live decoder; the request takes one int argument.
        let code = unsafe {
            sys::opus_decoder_ctl(
                decoder.raw.as_ptr(),
                sys::OPUS_SET_COMPLEXITY_REQUEST,
                c_int::from(complexity.min(10)),
            )
        };
        if code != sys::OPUS_OK {
            return Err(setup_error("decoder complexity", code));
        }
        Ok(decoder)
    }

    fn decode_raw(
        &mut self,
        payload: &[u8],
        out: &mut [f32],
        fec: bool,
    ) -> Result<usize, CodecError> {
        let (data, len) = if payload.is_empty() {
            (std::ptr::null(), 0)
        } else {
            (
                payload.as_ptr(),
                payload.len().min(i32::MAX as usize) as i32,
            )
        };
        // SAFETY: live decoder; `data` is null (concealment) or `len` readable bytes; `out`
        // holds `out.len()` writable samples, which is the frame size passed (mono).
        let n = unsafe {
            sys::opus_decode_float(
                self.raw.as_ptr(),
                data,
                len,
                out.as_mut_ptr(),
                out.len().min(i32::MAX as usize) as c_int,
                c_int::from(fec),
            )
        };
        usize::try_from(n).map_err(|_| CodecError::Decode(error(n)))
    }

    /// Decodes `payload` into `out`, returning the number of samples written.
    pub fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Result<usize, CodecError> {
        if payload.is_empty() {
            return Err(CodecError::EmptyPayload);
        }
        self.decode_raw(payload, out, false)
    }

    /// Reconstructs the frame *before* `next_payload` (which was lost) from the in-band FEC data
    /// that `next_payload` carries; `out.len()` must be the lost frame's length. Without FEC data
    /// in the packet libopus conceals instead (see [`has_fec`]). Decode `next_payload` normally
    /// afterwards.
    pub fn decode_fec(
        &mut self,
        next_payload: &[u8],
        out: &mut [f32],
    ) -> Result<usize, CodecError> {
        if next_payload.is_empty() {
            return self.conceal(out);
        }
        self.decode_raw(next_payload, out, true)
    }

    /// Rebuilds the lost frame that ended `offset_samples` before the start of the packet whose
    /// redundancy `dred` holds (so `out.len()` for the frame just before it); the offset must
    /// be within [`Redundancy::covers`]. Returns the samples written.
    pub fn decode_redundancy(
        &mut self,
        dred: &Redundancy,
        offset_samples: usize,
        out: &mut [f32],
    ) -> Result<usize, CodecError> {
        // SAFETY: live decoder and a DRED state parsed by `dred`'s own decoder; `out` holds
        // `out.len()` writable samples, the frame size passed (mono).
        let n = unsafe {
            sys::opus_decoder_dred_decode_float(
                self.raw.as_ptr(),
                dred.state(),
                offset_samples.min(i32::MAX as usize) as i32,
                out.as_mut_ptr(),
                out.len().min(i32::MAX as usize) as i32,
            )
        };
        usize::try_from(n).map_err(|_| CodecError::Decode(error(n)))
    }

    /// Fills `out` with packet loss concealment extrapolated from the previous frames (deep
    /// PLC at [`DECODER_COMPLEXITY`]).
    pub fn conceal(&mut self, out: &mut [f32]) -> Result<usize, CodecError> {
        self.decode_raw(&[], out, false)
    }

    /// Forgets the stream history (use when a peer's stream restarts).
    pub fn reset(&mut self) -> Result<(), CodecError> {
        // SAFETY: live decoder; the request takes no argument.
        let code = unsafe { sys::opus_decoder_ctl(self.raw.as_ptr(), sys::OPUS_RESET_STATE) };
        if code == sys::OPUS_OK {
            Ok(())
        } else {
            Err(setup_error("decoder reset", code))
        }
    }
}

impl Drop for OpusDecoder {
    fn drop(&mut self) {
        // SAFETY: created by `opus_decoder_create`, freed once here.
        unsafe { sys::opus_decoder_destroy(self.raw.as_ptr()) }
    }
}

/// True when `payload` carries in-band FEC (LBRR) data for the frame before it.
pub fn has_fec(payload: &[u8]) -> bool {
    if payload.is_empty() {
        return false;
    }
    // SAFETY: reads `len` bytes of `payload`.
    let r = unsafe {
        sys::opus_packet_has_lbrr(
            payload.as_ptr(),
            payload.len().min(i32::MAX as usize) as i32,
        )
    };
    r > 0
}
