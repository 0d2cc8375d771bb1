//! Opus deep redundancy (DRED, libopus 1.5+): a packet can carry a compact neural description
//! of the speech before it, up to about a second. When several packets in a row are lost, the
//! first packet that arrives after the gap can rebuild every lost frame it covers, where in-band
//! FEC only rebuilds the one frame just before it.
//!
//! [`Redundancy`] parses a packet's DRED once (running the DRED decoder network) and remembers
//! which packet it came from, so a burst of lost frames rebuilt from the same later packet
//! costs one parse; [`super::OpusDecoder::decode_redundancy`] then decodes each lost frame at
//! its offset. Everything is allocated at construction.

use std::ffi::c_int;
use std::ptr::NonNull;

use opusic_c::{sys, ErrorCode};

use crate::voice::codec::{CodecError, SAMPLE_RATE_HZ};

/// The most redundancy we ask a packet to describe: one second, libopus' maximum.
const MAX_REDUNDANCY_SAMPLES: i32 = SAMPLE_RATE_HZ as i32;

/// DRED decoder and the parsed redundancy of one packet.
///
/// Invariant: `decoder` and `state` are live libopus objects owned by this value alone;
/// `parsed` names the packet (by timestamp) that `state` describes and how far back it reaches.
pub struct Redundancy {
    decoder: NonNull<sys::OpusDREDDecoder>,
    state: NonNull<sys::OpusDRED>,
    parsed: Option<Parsed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    timestamp: u32,
    /// Samples before the packet's start that the redundancy rebuilds (0: none).
    reach: usize,
    /// Samples just before the packet that it does not cover (silence at the end of it).
    end: usize,
}

// SAFETY: both objects are plain memory owned by this value (no thread-local or shared state in
// libopus); it moves between threads but is never shared (no `Sync`).
unsafe impl Send for Redundancy {}

impl Redundancy {
    /// Allocates the DRED decoder (its network weights are built into libopus) and state.
    pub fn new() -> Result<Self, CodecError> {
        let setup = |code: c_int| CodecError::Setup {
            what: "DRED decoder",
            reason: ErrorCode::from(code).message(),
        };
        let mut code: c_int = 0;
        // SAFETY: plain constructors; `code` outlives the calls.
        let decoder = NonNull::new(unsafe { sys::opus_dred_decoder_create(&mut code) })
            .filter(|_| code == sys::OPUS_OK)
            .ok_or_else(|| setup(code))?;
        // SAFETY: as above.
        let state = NonNull::new(unsafe { sys::opus_dred_alloc(&mut code) })
            .filter(|_| code == sys::OPUS_OK);
        let Some(state) = state else {
            // SAFETY: created above, not used again.
            unsafe { sys::opus_dred_decoder_destroy(decoder.as_ptr()) };
            return Err(setup(code));
        };
        Ok(Self {
            decoder,
            state,
            parsed: None,
        })
    }

    /// Parses the redundancy of `payload` (the packet at `timestamp`) unless that packet is the
    /// one parsed last. Returns how many samples before the packet's start it can rebuild
    /// (0: the packet carries none).
    pub fn parse(&mut self, timestamp: u32, payload: &[u8]) -> usize {
        if let Some(p) = self.parsed.filter(|p| p.timestamp == timestamp) {
            return p.reach;
        }
        let mut end: c_int = 0;
        // SAFETY: live DRED decoder and state; reads `len` bytes of `payload`; `end` outlives
        // the call. Processing is not deferred, so the state is ready to decode from.
        let reach = unsafe {
            sys::opus_dred_parse(
                self.decoder.as_ptr(),
                self.state.as_ptr(),
                payload.as_ptr(),
                payload.len().min(i32::MAX as usize) as i32,
                MAX_REDUNDANCY_SAMPLES,
                SAMPLE_RATE_HZ as i32,
                &mut end,
                0,
            )
        };
        let parsed = Parsed {
            timestamp,
            reach: usize::try_from(reach).unwrap_or(0),
            end: usize::try_from(end).unwrap_or(0),
        };
        self.parsed = Some(parsed);
        parsed.reach
    }

    /// True when the packet parsed last can rebuild the `frame_len`-sample frame that starts
    /// `offset` samples before the packet's own audio (`offset == frame_len` for the frame just
    /// before it).
    pub fn covers(&self, offset: usize, frame_len: usize) -> bool {
        self.parsed.is_some_and(|p| {
            p.reach > 0 && offset <= p.reach && offset > p.end && offset >= frame_len
        })
    }

    /// Forgets the packet parsed last (the stream restarted).
    pub fn reset(&mut self) {
        self.parsed = None;
    }

    pub(super) fn state(&self) -> *const sys::OpusDRED {
        self.state.as_ptr()
    }
}

impl Drop for Redundancy {
    fn drop(&mut self) {
        // SAFETY: created in `new`, freed once here.
        unsafe {
            sys::opus_dred_free(self.state.as_ptr());
            sys::opus_dred_decoder_destroy(self.decoder.as_ptr());
        }
    }
}
