//! The receive side of one peer: its jitter buffer and decoder, the bridge between its frame
//! size and our playout chunk, and what the UI shows of it.

use std::collections::VecDeque;
use std::time::Duration;

use super::{PLAYOUT_CHUNK, SPEAKING_FLOOR_DB, SPEAKING_HOLD};
use crate::voice::codec::{CodecError, FrameDuration};
use crate::voice::rx::jitter::JitterConfig;
use crate::voice::rx::receiver::{PeerReceiver, PlayoutKind};
use crate::voice::tx::levels::rms_dbfs;

/// Per-peer receive side: jitter buffer + decoder, a small PCM queue to bridge the peer's frame
/// size and ours, and local playback settings.
pub(super) struct PeerAudio {
    pub(super) receiver: PeerReceiver,
    pub(super) frame: FrameDuration,
    pub(super) pcm: VecDeque<f32>,
    pub(super) scratch: Vec<f32>,
    pub(super) out: Vec<f32>,
    pub(super) volume: f32,
    pub(super) muted: bool,
    pub(super) last_audible: Option<Duration>,
    pub(super) level_db: f32,
    pub(super) decoded: u64,
    pub(super) fec: u64,
    pub(super) concealed: u64,
}

impl PeerAudio {
    pub(super) fn new(frame: FrameDuration) -> Result<Self, CodecError> {
        Ok(Self {
            receiver: PeerReceiver::with_config(JitterConfig::for_frame(frame))?,
            frame,
            pcm: VecDeque::with_capacity(4 * 960),
            scratch: vec![0.0; frame.samples()],
            out: vec![0.0; PLAYOUT_CHUNK],
            volume: 1.0,
            muted: false,
            last_audible: None,
            level_db: -120.0,
            decoded: 0,
            fec: 0,
            concealed: 0,
        })
    }

    /// Produces our next playout frame into `self.out`.
    pub(super) fn render(&mut self, now: Duration) {
        let want = self.out.len();
        let mut audible = false;
        while self.pcm.len() < want {
            let kind = self.receiver.pop_pcm(now, &mut self.scratch);
            match kind {
                PlayoutKind::Decoded => self.decoded += 1,
                PlayoutKind::Fec => self.fec += 1,
                PlayoutKind::Concealed => self.concealed += 1,
                PlayoutKind::Silence => {}
            }
            if matches!(kind, PlayoutKind::Decoded | PlayoutKind::Fec) {
                audible = true;
            }
            if kind == PlayoutKind::Silence && !self.receiver.is_playing() {
                // Waiting for a talkspurt: hand out silence one playout chunk at a time, so
                // the first frame can start on any 10 ms boundary instead of only every whole
                // frame (up to 10 ms less delay with 20 ms frames). Only while idle: during a
                // pause in a talkspurt every pop advances the playout by one frame.
                self.pcm.resize(want, 0.0);
                break;
            }
            self.pcm.extend(self.scratch.iter().copied());
        }
        for (o, s) in self.out.iter_mut().zip(self.pcm.drain(..want)) {
            *o = s;
        }
        self.level_db = rms_dbfs(&self.out);
        if audible && self.level_db > SPEAKING_FLOOR_DB {
            self.last_audible = Some(now);
        }
    }

    pub(super) fn speaking(&self, now: Duration) -> bool {
        self.last_audible
            .is_some_and(|t| now.saturating_sub(t) < SPEAKING_HOLD)
    }
}
