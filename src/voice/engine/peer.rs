//! One remote member of our channel as the engine sees it: its cipher, its receive path and
//! the volume and mute chosen for it. Its link (hole punching, keepalive, address) lives next
//! to it in the net layer's [`PeerTable`](crate::voice::net::PeerTable), under the same id.

use std::collections::VecDeque;
use std::time::Duration;

use crate::audio::CHUNK_SAMPLES;
use crate::protocol::datagram::ReceiverReport;
use crate::voice::codec::{CodecError, FrameDuration};
use crate::voice::net::crypto::PeerCipher;
use crate::voice::rx::jitter::JitterConfig;
use crate::voice::rx::loudness::SpeakerLoudness;
use crate::voice::rx::receiver::{PeerReceiver, PlayoutKind};
use crate::voice::tx::levels::rms_dbfs;

/// A peer counts as speaking for this long after its last decoded audible frame.
const SPEAKING_HOLD: Duration = Duration::from_millis(250);
/// Level under which decoded audio does not count as speech for the speaking indicator.
const SPEAKING_FLOOR_DB: f32 = -50.0;

/// How loud one remote member plays here, as chosen in the UI. Belongs to the user, not to a
/// connection: it is kept while the user is not (or no longer) a peer and applies again when
/// they (re)appear.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerSettings {
    /// Gain applied in the mix, `0.0..=2.0`.
    pub volume: f32,
    /// Not mixed at all (their audio is still received and decoded, so meters keep moving).
    pub muted: bool,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            volume: 1.0,
            muted: false,
        }
    }
}

/// Everything the engine holds for one remote member besides its link.
///
/// Lifetime: created when the server announces the member (`upsert_peer`), dropped when it
/// leaves, when we leave the channel, or when our own id changes; its [`PeerSettings`] then go
/// back to the engine's remembered settings. Invariant: the engine holds a `Peer` for exactly
/// the ids its peer table holds a link for.
pub(super) struct Peer {
    /// Keys for this member. `None` while no valid key is known: then nothing at all is sent
    /// to it and nothing from it is accepted, never plaintext.
    pub(super) cipher: Option<PeerCipher>,
    /// Created by the first voice frame that arrives, replaced when the frame duration changes.
    pub(super) rx: Option<ReceivePath>,
    pub(super) settings: PeerSettings,
    /// Its last report on how our voice reaches it, and when that came.
    pub(super) heard: Option<(ReceiverReport, Duration)>,
    /// Text chat with this member: its own keys and its reliable stream (`None` while no
    /// valid key is known, like `cipher`).
    pub(super) chat: Option<super::chat::PeerChat>,
}

impl Peer {
    pub(super) fn new(settings: PeerSettings) -> Self {
        Self {
            cipher: None,
            rx: None,
            settings,
            heard: None,
            chat: None,
        }
    }

    /// Takes `report` (from this member, about our voice) unless it is not newer than the
    /// last one: a replayed or reordered copy must not bring back an old loss figure.
    pub(super) fn handle_report(&mut self, now: Duration, report: ReceiverReport) {
        if self.heard.is_none_or(|(last, _)| report.seq > last.seq) {
            self.heard = Some((report, now));
        }
    }

    /// The loss this member reported for our voice within the last `fresh`, in per cent.
    pub(super) fn reported_loss_percent(&self, now: Duration, fresh: Duration) -> Option<f32> {
        self.heard
            .filter(|(_, at)| now.saturating_sub(*at) <= fresh)
            .map(|(r, _)| f32::from(r.loss_permille.min(1000)) / 10.0)
    }

    /// The typical loss run (packets; 0: single losses) this member reported for our voice
    /// within the last `fresh`.
    pub(super) fn reported_loss_run(&self, now: Duration, fresh: Duration) -> Option<u8> {
        self.heard
            .filter(|(_, at)| now.saturating_sub(*at) <= fresh)
            .map(|(r, _)| r.loss_run)
    }

    /// The receive path for voice frames of `frame` duration, made (anew) if needed.
    pub(super) fn receive_path(
        &mut self,
        frame: FrameDuration,
    ) -> Result<&mut ReceivePath, CodecError> {
        if self.rx.as_ref().is_none_or(|rx| rx.frame != frame) {
            self.rx = Some(ReceivePath::new(frame)?);
        }
        Ok(self.rx.as_mut().expect("made above"))
    }
}

/// The receive path of one peer: jitter buffer + decoder, a small PCM queue to bridge the
/// peer's frame size and our playout chunk, and the figures the snapshot shows.
///
/// Made for one frame duration: a peer that switches between 10 and 20 ms frames gets a new one.
pub(super) struct ReceivePath {
    pub(super) receiver: PeerReceiver,
    pub(super) frame: FrameDuration,
    pcm: VecDeque<f32>,
    scratch: Vec<f32>,
    pub(super) out: Vec<f32>,
    last_audible: Option<Duration>,
    pub(super) level_db: f32,
    /// This peer's speech level and the gain that evens it out (used when normalising).
    pub(super) loudness: SpeakerLoudness,
    pub(super) decoded: u64,
    pub(super) fec: u64,
    pub(super) rebuilt: u64,
    pub(super) concealed: u64,
}

impl ReceivePath {
    pub(super) fn new(frame: FrameDuration) -> Result<Self, CodecError> {
        Ok(Self {
            receiver: PeerReceiver::with_config(JitterConfig::for_frame(frame))?,
            frame,
            pcm: VecDeque::with_capacity(4 * 960),
            scratch: vec![0.0; frame.samples()],
            out: vec![0.0; CHUNK_SAMPLES],
            last_audible: None,
            level_db: -120.0,
            loudness: SpeakerLoudness::new(),
            decoded: 0,
            fec: 0,
            rebuilt: 0,
            concealed: 0,
        })
    }

    /// Produces our next playout frame into `self.out`.
    pub(super) fn render(&mut self, now: Duration) {
        let want = self.out.len();
        let mut audible = false;
        while self.pcm.len() < want {
            let (kind, len) = self.receiver.pop_scaled(now, &mut self.scratch);
            match kind {
                PlayoutKind::Decoded => self.decoded += 1,
                PlayoutKind::Fec => self.fec += 1,
                PlayoutKind::Rebuilt => self.rebuilt += 1,
                PlayoutKind::Concealed => self.concealed += 1,
                PlayoutKind::Silence => {}
            }
            if matches!(
                kind,
                PlayoutKind::Decoded | PlayoutKind::Fec | PlayoutKind::Rebuilt
            ) {
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
            self.pcm.extend(self.scratch[..len].iter().copied());
        }
        for (o, s) in self.out.iter_mut().zip(self.pcm.drain(..want)) {
            *o = s;
        }
        self.level_db = rms_dbfs(&self.out);
        if audible {
            self.loudness.observe(&self.out);
        }
        if audible && self.level_db > SPEAKING_FLOOR_DB {
            self.last_audible = Some(now);
        }
    }

    pub(super) fn speaking(&self, now: Duration) -> bool {
        self.last_audible
            .is_some_and(|t| now.saturating_sub(t) < SPEAKING_HOLD)
    }
}
