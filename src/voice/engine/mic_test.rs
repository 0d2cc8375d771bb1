//! The microphone test: hearing yourself as the others hear you.
//!
//! While it is on, every frame the capture chain lets through (after echo cancellation, noise
//! suppression, gain control, the voice detector and mute) is decoded from the very packet
//! that goes to the peers and played back to you, so what you hear includes the codec. When
//! the voice detector keeps the gate shut you hear silence, as the others would. It works in a
//! call and out of one (the point is to try the microphone before joining). With speakers
//! instead of headphones, the echo canceller sees the playback like any other and keeps it
//! from howling.
//!
//! Pure: fed from [`super::VoiceEngine::handle_capture`], drained by the playout; no
//! allocation after construction.

use std::collections::VecDeque;

use crate::voice::codec::CodecError;
use crate::voice::rx::OpusDecoder;

/// Most audio kept waiting for the playout (a stalled playout must not build up a delay).
const MAX_QUEUED_SAMPLES: usize = 48_000 / 5;

pub(super) struct MicTest {
    decoder: OpusDecoder,
    queued: VecDeque<f32>,
    scratch: Vec<f32>,
}

impl MicTest {
    pub(super) fn new() -> Result<Self, CodecError> {
        Ok(Self {
            decoder: OpusDecoder::new()?,
            queued: VecDeque::with_capacity(MAX_QUEUED_SAMPLES),
            // The longest Opus frame (120 ms at 48 kHz).
            scratch: vec![0.0; 5_760],
        })
    }

    /// One packet as sent to the peers.
    pub(super) fn push_packet(&mut self, packet: &[u8]) {
        // A packet our own encoder made always decodes; if not, that frame is silent.
        if let Ok(n) = self.decoder.decode(packet, &mut self.scratch) {
            for i in 0..n {
                let s = self.scratch[i];
                self.push_sample(s);
            }
        }
    }

    /// A frame the gate kept shut: `samples` of silence. The frames that open a talkspurt
    /// come together (the voice detector's pre-roll) and leave a backlog; a pause lets it
    /// drain instead of adding silence behind it, so the delay never builds up.
    pub(super) fn push_silence(&mut self, samples: usize) {
        if self.queued.len() >= 2 * samples {
            return;
        }
        for _ in 0..samples {
            self.push_sample(0.0);
        }
    }

    fn push_sample(&mut self, s: f32) {
        if self.queued.len() == MAX_QUEUED_SAMPLES {
            self.queued.pop_front();
        }
        self.queued.push_back(s);
    }

    /// Adds the next `out.len()` samples of yourself to `out` (what is not there yet stays
    /// as it is).
    pub(super) fn mix_into(&mut self, out: &mut [f32]) {
        for o in out.iter_mut() {
            let Some(s) = self.queued.pop_front() else {
                break;
            };
            *o += s;
        }
    }
}
