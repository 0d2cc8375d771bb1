//! `ChatStream`: reliable, ordered text chat with one peer over unreliable datagrams. Pure:
//! time is an argument, no I/O; sealing is `super::chat_cipher`'s job, routing the engine's.
//!
//! Each direction of a pair is one stream of *fragments* numbered 0, 1, 2, ... (`seq`) within
//! an *epoch*. A message is cut into fragments of at most [`MAX_FRAGMENT_BYTES`] at character
//! boundaries; all but the last say "more follows". The receiver delivers fragments strictly
//! in `seq` order, each once, and joins a message's fragments before handing it on, so
//! messages come out in the order they were sent, each exactly once, whatever the network
//! did (loss, duplication, reordering, replay).
//!
//! - **Acks.** Every data frame that arrives (new or duplicate) makes the receiver due to
//!   send one [`ChatFrame::Ack`]: the next `seq` it expects (everything below arrived) and a
//!   bitmap of the 64 after it that are held out of order. Acks are idempotent, so a lost or
//!   duplicated ack costs nothing.
//! - **Retransmission.** Up to [`SEND_WINDOW`] fragments are in flight. One not acked after
//!   its retransmission timeout is sent again; the timeout starts at twice the smoothed round
//!   trip (Karn's rule: only fragments sent once give samples; [`INITIAL_RTO`] before any) and
//!   doubles with every attempt up to [`MAX_RTO`]. A fragment is retried until acked or until
//!   the stream is dropped (the peer left): chat with someone still in the channel is never
//!   silently lost.
//! - **Epochs.** A stream's epoch is fixed when it is made and larger than any epoch the
//!   same sender used before in its run (the engine counts them). A receiver that sees a larger
//!   epoch starts over at `seq` 0 (the sender made a new stream: we rejoined, or it did); a
//!   smaller one is a stale or replayed frame of an old stream and is dropped. The engine keeps
//!   the last epoch seen per peer key across streams, so a frame recorded before a peer left
//!   and replayed after it came back is not delivered again.
//! - **Bounds.** A message holds at most [`MAX_CHAT_CHARS`] characters; at most
//!   [`MAX_QUEUED_FRAGMENTS`] fragments wait per peer (a peer that acks nothing fills it, and
//!   further messages to it are refused with [`ChatError::QueueFull`]); a receiver holds at most
//!   [`REORDER_WINDOW`] fragments ahead of the next one it expects.
//!
//! Frames (the plaintext inside a sealed Chat datagram), big-endian:
//!
//! | tag | frame | body                                                                  |
//! |-----|-------|-----------------------------------------------------------------------|
//! | 1   | Data  | epoch u64, seq u32, flags u8 (bit 0: more follows), sent_ms u64, text |
//! | 2   | Ack   | epoch u64 (of the stream acked), next u32, held bitmap u64            |
//!
//! `sent_ms` is the sender's wall clock (Unix milliseconds) when the message was written,
//! the time shown with it.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::chat_cipher::MAX_CHAT_FRAME_LEN;

/// Most characters (Unicode scalar values) in one message, as in common chat apps.
pub const MAX_CHAT_CHARS: usize = 2000;

const DATA_TAG: u8 = 1;
const ACK_TAG: u8 = 2;
/// Tag, epoch, seq, flags, sent_ms.
const DATA_HEADER_LEN: usize = 1 + 8 + 4 + 1 + 8;
/// Tag, epoch, next, bitmap.
const ACK_LEN: usize = 1 + 8 + 4 + 8;

/// Most text bytes in one fragment: a data frame fills at most one sealed, relayed datagram.
pub const MAX_FRAGMENT_BYTES: usize = MAX_CHAT_FRAME_LEN - DATA_HEADER_LEN;

/// Most UTF-8 bytes of one message (every character may take four).
pub const MAX_MESSAGE_BYTES: usize = 4 * MAX_CHAT_CHARS;

/// Most fragments one message can take (with the receiver's reassembly bound in mind).
pub const MAX_FRAGMENTS_PER_MESSAGE: usize = MAX_MESSAGE_BYTES.div_ceil(MAX_FRAGMENT_BYTES - 3);

/// Most fragments waiting (unsent or unacked) for one peer: tens of messages.
pub const MAX_QUEUED_FRAGMENTS: usize = 128;

/// Most fragments in flight (sent, not yet acked) to one peer.
pub const SEND_WINDOW: usize = 16;

/// How far ahead of the next expected fragment the receiver holds fragments; one further
/// ahead is dropped (and sent again later). Also the width of the ack bitmap.
pub const REORDER_WINDOW: u32 = 64;

/// Retransmission timeout before any round trip was measured.
pub const INITIAL_RTO: Duration = Duration::from_millis(300);
/// Shortest retransmission timeout (a LAN's round trip is far below it; acks are immediate).
pub const MIN_RTO: Duration = Duration::from_millis(120);
/// Longest retransmission timeout, reached by doubling.
pub const MAX_RTO: Duration = Duration::from_secs(4);

/// Why a message was not queued. The text a person reads is the `Display`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("the message is empty")]
    Empty,
    #[error("the message has {chars} characters; the limit is {MAX_CHAT_CHARS}")]
    TooLong { chars: usize },
    #[error("{queued} message pieces to this member are still waiting to be acknowledged; try again once it catches up")]
    QueueFull { queued: usize },
}

/// Why bytes are not a chat frame (an authenticated peer with another build, or a bug).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatFrameError {
    #[error("empty chat frame")]
    Empty,
    #[error("unknown chat frame tag {0}")]
    UnknownTag(u8),
    #[error("chat frame of {len} bytes is malformed")]
    Malformed { len: usize },
}

/// One frame of the chat protocol (see the module docs for the layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFrame<'a> {
    Data {
        epoch: u64,
        seq: u32,
        more: bool,
        sent_ms: u64,
        text: &'a [u8],
    },
    Ack {
        epoch: u64,
        next: u32,
        held: u64,
    },
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<'a> ChatFrame<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ChatFrameError> {
        let tag = *bytes.first().ok_or(ChatFrameError::Empty)?;
        let malformed = ChatFrameError::Malformed { len: bytes.len() };
        match tag {
            DATA_TAG => {
                if bytes.len() < DATA_HEADER_LEN || bytes[13] > 1 {
                    return Err(malformed);
                }
                Ok(Self::Data {
                    epoch: be_u64(bytes, 1),
                    seq: be_u32(bytes, 9),
                    more: bytes[13] == 1,
                    sent_ms: be_u64(bytes, 14),
                    text: &bytes[DATA_HEADER_LEN..],
                })
            }
            ACK_TAG => {
                if bytes.len() != ACK_LEN {
                    return Err(malformed);
                }
                Ok(Self::Ack {
                    epoch: be_u64(bytes, 1),
                    next: be_u32(bytes, 9),
                    held: be_u64(bytes, 13),
                })
            }
            other => Err(ChatFrameError::UnknownTag(other)),
        }
    }

    /// Writes the frame into `out` (at least [`MAX_CHAT_FRAME_LEN`] bytes) and returns its
    /// length. A data frame's text must be at most [`MAX_FRAGMENT_BYTES`].
    pub fn write(&self, out: &mut [u8]) -> usize {
        match *self {
            Self::Data {
                epoch,
                seq,
                more,
                sent_ms,
                text,
            } => {
                out[0] = DATA_TAG;
                out[1..9].copy_from_slice(&epoch.to_be_bytes());
                out[9..13].copy_from_slice(&seq.to_be_bytes());
                out[13] = u8::from(more);
                out[14..22].copy_from_slice(&sent_ms.to_be_bytes());
                out[DATA_HEADER_LEN..DATA_HEADER_LEN + text.len()].copy_from_slice(text);
                DATA_HEADER_LEN + text.len()
            }
            Self::Ack { epoch, next, held } => {
                out[0] = ACK_TAG;
                out[1..9].copy_from_slice(&epoch.to_be_bytes());
                out[9..13].copy_from_slice(&next.to_be_bytes());
                out[13..21].copy_from_slice(&held.to_be_bytes());
                ACK_LEN
            }
        }
    }
}

/// Checks a message before it is queued: not blank, at most [`MAX_CHAT_CHARS`] characters.
pub fn check_text(text: &str) -> Result<(), ChatError> {
    if text.trim().is_empty() {
        return Err(ChatError::Empty);
    }
    let chars = text.chars().count();
    if chars > MAX_CHAT_CHARS {
        return Err(ChatError::TooLong { chars });
    }
    Ok(())
}

/// Cuts `text` into pieces of at most `max` bytes, never inside a character.
fn fragments(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(max);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    out
}

/// A whole message the receiver put together, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatDelivery {
    pub text: String,
    /// The sender's wall clock when it wrote the message (Unix ms).
    pub sent_ms: u64,
}

/// Counters of one stream, for the snapshot and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChatStats {
    /// Data frames sent, first sends and retransmissions.
    pub data_sent: u64,
    pub retransmitted: u64,
    pub messages_delivered: u64,
    /// Data frames that arrived again (already delivered or held): answered, not delivered.
    pub duplicates: u64,
    /// Frames of an older epoch than the current one (stale or replayed).
    pub stale: u64,
    /// Data frames too far ahead of the next expected one.
    pub beyond_window: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    seq: u32,
    more: bool,
    sent_ms: u64,
    text: String,
    last_sent: Option<Duration>,
    attempts: u32,
    acked: bool,
}

#[derive(Debug, Clone)]
struct Held {
    more: bool,
    sent_ms: u64,
    text: Vec<u8>,
}

/// See the module docs. One per peer, both directions.
///
/// Invariants: `pending[i].seq == pending[0].seq + i` (the queue is contiguous from the
/// oldest fragment not yet cumulatively acked); `held` keys are in
/// `next_expected + 1 .. next_expected + REORDER_WINDOW`; every delivered message was
/// assembled from fragments taken in `seq` order, each once.
#[derive(Debug, Clone)]
pub struct ChatStream {
    // Sending half.
    epoch: u64,
    next_seq: u32,
    pending: VecDeque<Pending>,
    srtt: Option<Duration>,
    // Receiving half.
    /// Epochs up to this one belong to streams of the peer that an earlier `ChatStream` of
    /// ours received: refused.
    floor: Option<u64>,
    peer_epoch: Option<u64>,
    next_expected: u32,
    held: BTreeMap<u32, Held>,
    /// The message being put together: its first fragment's time, its bytes so far, and
    /// whether it went over the limits (then it is dropped when its last fragment comes).
    assembling: Option<(u64, Vec<u8>, usize, bool)>,
    ack_due: bool,
    delivered: VecDeque<ChatDelivery>,
    pub stats: ChatStats,
}

impl ChatStream {
    /// A stream whose sending half uses `epoch`; `seen_epoch` is the last epoch an earlier
    /// stream of ours received from this peer (under the same key): frames of that epoch or
    /// older stay refused.
    pub fn new(epoch: u64, seen_epoch: Option<u64>) -> Self {
        Self {
            epoch,
            next_seq: 0,
            pending: VecDeque::new(),
            srtt: None,
            floor: seen_epoch,
            peer_epoch: None,
            next_expected: 0,
            held: BTreeMap::new(),
            assembling: None,
            ack_due: false,
            delivered: VecDeque::new(),
            stats: ChatStats::default(),
        }
    }

    /// The newest epoch of the peer's streams this one knows of (kept by the engine when this
    /// stream goes, for the next one's `seen_epoch`).
    pub fn peer_epoch(&self) -> Option<u64> {
        self.peer_epoch.max(self.floor)
    }

    /// Fragments queued and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.pending.iter().filter(|p| !p.acked).count()
    }

    /// Queues `text` (checked with [`check_text`]) written at `sent_ms`, in fragments.
    pub fn push_message(&mut self, sent_ms: u64, text: &str) -> Result<(), ChatError> {
        check_text(text)?;
        let pieces = fragments(text, MAX_FRAGMENT_BYTES);
        if self.pending.len() + pieces.len() > MAX_QUEUED_FRAGMENTS {
            return Err(ChatError::QueueFull {
                queued: self.pending.len(),
            });
        }
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            self.pending.push_back(Pending {
                seq: self.next_seq,
                more: i < last,
                sent_ms,
                text: piece.to_owned(),
                last_sent: None,
                attempts: 0,
                acked: false,
            });
            self.next_seq += 1;
        }
        Ok(())
    }

    /// A frame from the peer, already authenticated.
    pub fn handle_frame(&mut self, now: Duration, frame: ChatFrame<'_>) {
        match frame {
            ChatFrame::Data {
                epoch,
                seq,
                more,
                sent_ms,
                text,
            } => self.handle_data(epoch, seq, more, sent_ms, text),
            ChatFrame::Ack { epoch, next, held } => self.handle_ack(now, epoch, next, held),
        }
    }

    fn handle_data(&mut self, epoch: u64, seq: u32, more: bool, sent_ms: u64, text: &[u8]) {
        if self.floor.is_some_and(|floor| epoch <= floor) {
            self.stats.stale += 1;
            return;
        }
        match self.peer_epoch {
            Some(current) if epoch < current => {
                self.stats.stale += 1;
                return;
            }
            Some(current) if epoch == current => {}
            _ => {
                // The peer's new stream: start over.
                self.peer_epoch = Some(epoch);
                self.next_expected = 0;
                self.held.clear();
                self.assembling = None;
            }
        }
        // Even a duplicate is answered: our earlier ack may be what was lost.
        self.ack_due = true;
        if seq < self.next_expected || self.held.contains_key(&seq) {
            self.stats.duplicates += 1;
            return;
        }
        if seq - self.next_expected >= REORDER_WINDOW {
            self.stats.beyond_window += 1;
            return;
        }
        self.held.insert(
            seq,
            Held {
                more,
                sent_ms,
                text: text.to_vec(),
            },
        );
        while let Some(h) = self.held.remove(&self.next_expected) {
            self.next_expected += 1;
            self.assemble(h);
        }
    }

    fn assemble(&mut self, h: Held) {
        let (_, bytes, count, over) = self
            .assembling
            .get_or_insert_with(|| (h.sent_ms, Vec::new(), 0, false));
        *count += 1;
        if *over
            || bytes.len() + h.text.len() > MAX_MESSAGE_BYTES
            || *count > MAX_FRAGMENTS_PER_MESSAGE
        {
            // A peer sending more than any message may hold: drop the whole message.
            *over = true;
            bytes.clear();
        } else {
            bytes.extend_from_slice(&h.text);
        }
        if h.more {
            return;
        }
        let Some((sent_ms, bytes, _, over)) = self.assembling.take() else {
            return;
        };
        if over {
            return;
        }
        self.stats.messages_delivered += 1;
        self.delivered.push_back(ChatDelivery {
            text: displayable(&bytes),
            sent_ms,
        });
    }

    fn handle_ack(&mut self, now: Duration, epoch: u64, next: u32, held: u64) {
        if epoch != self.epoch {
            self.stats.stale += 1;
            return;
        }
        while self.pending.front().is_some_and(|p| p.seq < next) {
            let p = self.pending.pop_front().expect("checked");
            if !p.acked {
                self.sample_rtt(now, &p);
            }
        }
        let mut samples = Vec::new();
        for p in self.pending.iter_mut() {
            let offset = p.seq.wrapping_sub(next).wrapping_sub(1);
            if !p.acked && offset < REORDER_WINDOW && held & (1u64 << offset) != 0 {
                p.acked = true;
                samples.push(p.clone());
            }
        }
        for p in &samples {
            self.sample_rtt(now, p);
        }
    }

    /// Karn's rule: a fragment sent more than once does not tell which send was acked.
    fn sample_rtt(&mut self, now: Duration, p: &Pending) {
        if p.attempts != 1 {
            return;
        }
        let Some(at) = p.last_sent else {
            return;
        };
        let sample = now.saturating_sub(at);
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(s) => (s * 7 + sample) / 8,
        });
    }

    /// The retransmission timeout after `attempts` sends.
    fn rto(&self, attempts: u32) -> Duration {
        let base = self.srtt.map_or(INITIAL_RTO, |s| (s * 2).max(MIN_RTO));
        let factor = 1u32 << attempts.saturating_sub(1).min(6);
        (base * factor).min(MAX_RTO)
    }

    /// The next frame to send, written into `out` (at least [`MAX_CHAT_FRAME_LEN`] bytes):
    /// an ack if one is due, else a fragment sent for the first time or again. Returns its
    /// length; call until `None`.
    pub fn poll_transmit(&mut self, now: Duration, out: &mut [u8]) -> Option<usize> {
        if self.ack_due {
            self.ack_due = false;
            if let Some(epoch) = self.peer_epoch {
                let mut held = 0u64;
                for &seq in self.held.keys() {
                    let offset = seq - self.next_expected - 1;
                    held |= 1u64 << offset;
                }
                let ack = ChatFrame::Ack {
                    epoch,
                    next: self.next_expected,
                    held,
                };
                return Some(ack.write(out));
            }
        }
        let index = self.due_fragment(now)?;
        let epoch = self.epoch;
        let p = &mut self.pending[index];
        if p.attempts > 0 {
            self.stats.retransmitted += 1;
        }
        p.attempts += 1;
        p.last_sent = Some(now);
        self.stats.data_sent += 1;
        let frame = ChatFrame::Data {
            epoch,
            seq: p.seq,
            more: p.more,
            sent_ms: p.sent_ms,
            text: p.text.as_bytes(),
        };
        Some(frame.write(out))
    }

    /// The length of the frame [`ChatStream::poll_transmit`] would write at `now`, without
    /// taking it: lets the caller pace a path (a relay's budget) before anything counts as
    /// sent.
    pub fn next_len(&self, now: Duration) -> Option<usize> {
        if self.ack_due && self.peer_epoch.is_some() {
            return Some(ACK_LEN);
        }
        let p = &self.pending[self.due_fragment(now)?];
        Some(DATA_HEADER_LEN + p.text.len())
    }

    /// The first fragment in the window that is unsent, or unacked past its timeout.
    fn due_fragment(&self, now: Duration) -> Option<usize> {
        (0..self.pending.len().min(SEND_WINDOW)).find(|&i| {
            let p = &self.pending[i];
            !p.acked && p.last_sent.is_none_or(|t| now >= t + self.rto(p.attempts))
        })
    }

    /// When [`ChatStream::poll_transmit`] has something next: `Duration::ZERO` (at once) for a
    /// due ack or an unsent fragment in the window, else the earliest retransmission.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.ack_due && self.peer_epoch.is_some() {
            return Some(Duration::ZERO);
        }
        self.pending
            .iter()
            .take(SEND_WINDOW)
            .filter(|p| !p.acked)
            .map(|p| match p.last_sent {
                None => Duration::ZERO,
                Some(t) => t + self.rto(p.attempts),
            })
            .min()
    }

    /// The next message delivered in order.
    pub fn poll_delivered(&mut self) -> Option<ChatDelivery> {
        self.delivered.pop_front()
    }
}

/// The text as it may be shown: invalid UTF-8 (only a broken or hostile peer sends it) and
/// control characters other than newline and tab (terminal escapes) become U+FFFD.
fn displayable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                char::REPLACEMENT_CHARACTER
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Everything `s` wants to send at `now`, as owned frames.
    fn drain(s: &mut ChatStream, now: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_CHAT_FRAME_LEN];
        while let Some(n) = s.poll_transmit(now, &mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn feed(s: &mut ChatStream, now: Duration, frames: &[Vec<u8>]) {
        for f in frames {
            s.handle_frame(now, ChatFrame::parse(f).unwrap());
        }
    }

    fn delivered(s: &mut ChatStream) -> Vec<String> {
        std::iter::from_fn(|| s.poll_delivered())
            .map(|d| d.text)
            .collect()
    }

    fn is_data(f: &[u8]) -> bool {
        matches!(ChatFrame::parse(f), Ok(ChatFrame::Data { .. }))
    }

    /// Tiny deterministic PRNG (xorshift64) for the lossy network.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    /// Runs A -> B with `loss`% loss, `dup`% duplication and random reordering (frames held
    /// back up to 5 steps) in both directions, 10 ms steps, until `until`. Returns B's
    /// deliveries.
    fn lossy_run(
        a: &mut ChatStream,
        b: &mut ChatStream,
        seed: u64,
        loss: u64,
        dup: u64,
    ) -> Vec<String> {
        let mut rng = Rng(seed);
        // (due step, to B?, frame)
        let mut flight: Vec<(u64, bool, Vec<u8>)> = Vec::new();
        let mut got = Vec::new();
        for step in 0..6000u64 {
            let now = ms(10 * step);
            for (to_b, s) in [(true, &mut *a), (false, &mut *b)] {
                for f in drain(s, now) {
                    if rng.chance(loss) {
                        continue;
                    }
                    let copies = if rng.chance(dup) { 2 } else { 1 };
                    for _ in 0..copies {
                        flight.push((step + 1 + rng.next() % 5, to_b, f.clone()));
                    }
                }
            }
            let (due, later): (Vec<_>, Vec<_>) =
                flight.drain(..).partition(|(at, _, _)| *at <= step);
            flight = later;
            for (_, to_b, f) in due {
                let s = if to_b { &mut *b } else { &mut *a };
                s.handle_frame(now, ChatFrame::parse(&f).unwrap());
            }
            got.extend(delivered(b));
            if a.unacked() == 0 && flight.is_empty() && step > 10 {
                break;
            }
        }
        got
    }

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let mut buf = [0u8; MAX_CHAT_FRAME_LEN];
        for f in [
            ChatFrame::Data {
                epoch: 1 << 40,
                seq: 7,
                more: true,
                sent_ms: 1_700_000_000_000,
                text: "héllo".as_bytes(),
            },
            ChatFrame::Ack {
                epoch: 3,
                next: 9,
                held: 0b101,
            },
        ] {
            let n = f.write(&mut buf);
            assert_eq!(ChatFrame::parse(&buf[..n]), Ok(f));
        }
        assert_eq!(ChatFrame::parse(&[]), Err(ChatFrameError::Empty));
        assert_eq!(
            ChatFrame::parse(&[9, 0]),
            Err(ChatFrameError::UnknownTag(9))
        );
        assert!(ChatFrame::parse(&[DATA_TAG; 10]).is_err());
        assert!(ChatFrame::parse(&[ACK_TAG; 22]).is_err());
    }

    #[test]
    fn a_message_on_a_clean_link_arrives_once_and_is_acked() {
        let (mut a, mut b) = (ChatStream::new(1, None), ChatStream::new(5, None));
        a.push_message(42, "hello").unwrap();
        let out = drain(&mut a, ms(0));
        assert_eq!(out.len(), 1);
        assert!(
            drain(&mut a, ms(0)).is_empty(),
            "sent once, not again at once"
        );
        feed(&mut b, ms(10), &out);
        assert_eq!(
            b.poll_delivered(),
            Some(ChatDelivery {
                text: "hello".into(),
                sent_ms: 42
            })
        );
        let acks = drain(&mut b, ms(10));
        assert_eq!(acks.len(), 1);
        feed(&mut a, ms(20), &acks);
        assert_eq!(a.unacked(), 0);
        assert_eq!(a.poll_timeout(), None, "nothing left to do");
        assert_eq!(a.srtt, Some(ms(20)));
    }

    #[test]
    fn a_lost_fragment_is_sent_again_with_growing_gaps() {
        let mut a = ChatStream::new(1, None);
        a.push_message(0, "are you there?").unwrap();
        let mut sends = Vec::new();
        let mut now = ms(0);
        while now < ms(20_000) {
            if !drain(&mut a, now).is_empty() {
                sends.push(now);
            }
            now = a.poll_timeout().unwrap().max(now + ms(1));
        }
        let gaps: Vec<u64> = sends
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect();
        assert_eq!(&gaps[..5], &[300, 600, 1200, 2400, 4000], "{gaps:?}");
        assert!(
            gaps[5..].iter().all(|&g| g == 4000),
            "capped at MAX_RTO: {gaps:?}"
        );
        assert_eq!(a.stats.retransmitted as usize, sends.len() - 1);
    }

    #[test]
    fn duplicates_and_replays_are_delivered_once_and_still_acked() {
        let (mut a, mut b) = (ChatStream::new(1, None), ChatStream::new(2, None));
        a.push_message(1, "one").unwrap();
        a.push_message(2, "two").unwrap();
        let out = drain(&mut a, ms(0));
        assert_eq!(out.len(), 2);
        feed(&mut b, ms(1), &out);
        feed(&mut b, ms(2), &out);
        feed(&mut b, ms(3), &out[..1]);
        assert_eq!(delivered(&mut b), ["one", "two"]);
        assert_eq!(b.stats.duplicates, 3);
        // Every arrival made an ack due; one ack answers them all.
        let acks = drain(&mut b, ms(3));
        assert_eq!(acks.len(), 1);
        assert_eq!(
            ChatFrame::parse(&acks[0]),
            Ok(ChatFrame::Ack {
                epoch: 1,
                next: 2,
                held: 0
            })
        );
        // A replay much later (a recording of the wire) is still not delivered again.
        feed(&mut b, ms(60_000), &out);
        assert!(delivered(&mut b).is_empty());
    }

    #[test]
    fn reordered_fragments_are_held_and_delivered_in_order() {
        let (mut a, mut b) = (ChatStream::new(1, None), ChatStream::new(2, None));
        for t in ["first", "second", "third"] {
            a.push_message(0, t).unwrap();
        }
        let out = drain(&mut a, ms(0));
        feed(&mut b, ms(1), &out[2..3]);
        feed(&mut b, ms(1), &out[1..2]);
        assert!(delivered(&mut b).is_empty(), "waits for the first");
        let ack = drain(&mut b, ms(1));
        assert_eq!(
            ChatFrame::parse(&ack[0]),
            Ok(ChatFrame::Ack {
                epoch: 1,
                next: 0,
                held: 0b11
            })
        );
        // The selective ack stops A resending the two that arrived.
        feed(&mut a, ms(2), &ack);
        assert_eq!(a.unacked(), 1);
        let again = drain(&mut a, ms(400));
        assert_eq!(again.len(), 1);
        assert_eq!(again, out[..1].to_vec());
        feed(&mut b, ms(401), &out[..1]);
        assert_eq!(delivered(&mut b), ["first", "second", "third"]);
    }

    #[test]
    fn a_long_message_is_cut_at_character_boundaries_and_joined_again() {
        let (mut a, mut b) = (ChatStream::new(1, None), ChatStream::new(2, None));
        // 2000 four-byte characters: the longest message there is, in bytes.
        let text: String = std::iter::repeat_n('😀', MAX_CHAT_CHARS).collect();
        a.push_message(9, &text).unwrap();
        let out = drain(&mut a, ms(0));
        assert!(
            out.len() > 1 && out.len() <= MAX_FRAGMENTS_PER_MESSAGE,
            "{}",
            out.len()
        );
        assert!(out.iter().all(|f| f.len() <= MAX_CHAT_FRAME_LEN));
        // Backwards, to be sure joining follows seq and not arrival.
        for f in out.iter().rev() {
            feed(&mut b, ms(1), std::slice::from_ref(f));
        }
        assert_eq!(delivered(&mut b), [text]);
    }

    #[test]
    fn empty_too_long_and_over_queue_messages_are_refused_with_reasons() {
        let mut a = ChatStream::new(1, None);
        assert_eq!(a.push_message(0, "  \n"), Err(ChatError::Empty));
        let long = "x".repeat(MAX_CHAT_CHARS + 1);
        assert_eq!(
            a.push_message(0, &long),
            Err(ChatError::TooLong {
                chars: MAX_CHAT_CHARS + 1
            })
        );
        assert_eq!(
            ChatError::TooLong { chars: 2001 }.to_string(),
            "the message has 2001 characters; the limit is 2000"
        );
        assert!(a.push_message(0, &"x".repeat(MAX_CHAT_CHARS)).is_ok());
        while a.push_message(0, "more").is_ok() {}
        assert_eq!(a.pending.len(), MAX_QUEUED_FRAGMENTS);
        assert!(matches!(
            a.push_message(0, "one more"),
            Err(ChatError::QueueFull { .. })
        ));
        // Only SEND_WINDOW go out before any ack.
        assert_eq!(drain(&mut a, ms(0)).len(), SEND_WINDOW);
    }

    #[test]
    fn a_new_epoch_starts_over_and_an_old_one_is_refused() {
        let mut b = ChatStream::new(2, None);
        let mut old = ChatStream::new(1, None);
        old.push_message(0, "before").unwrap();
        let before = drain(&mut old, ms(0));
        feed(&mut b, ms(0), &before);
        assert_eq!(delivered(&mut b), ["before"]);
        // The sender left and came back: a new stream, a larger epoch, seq 0 again.
        let mut new = ChatStream::new(3, None);
        new.push_message(0, "after").unwrap();
        let after = drain(&mut new, ms(1));
        feed(&mut b, ms(1), &after);
        assert_eq!(delivered(&mut b), ["after"]);
        // The old stream's frame replayed now is stale, and draws no ack.
        drain(&mut b, ms(1));
        feed(&mut b, ms(2), &before);
        assert!(delivered(&mut b).is_empty());
        assert!(drain(&mut b, ms(2)).is_empty());
        assert_eq!(b.stats.stale, 1);
        // A stream made later for the same peer remembers the epoch: still refused.
        // That includes the last epoch it received, not only older ones.
        let mut b2 = ChatStream::new(4, b.peer_epoch());
        feed(&mut b2, ms(3), &before);
        feed(&mut b2, ms(3), &after);
        assert!(delivered(&mut b2).is_empty());
        assert_eq!(b2.stats.stale, 2);
        // An ack for another epoch of ours does not ack anything.
        old.push_message(0, "x").unwrap();
        let stale_ack = ChatFrame::Ack {
            epoch: 99,
            next: 10,
            held: 0,
        };
        old.handle_frame(ms(4), stale_ack);
        assert_eq!(old.unacked(), 2);
    }

    #[test]
    fn fragments_too_far_ahead_are_dropped_then_resent() {
        let mut b = ChatStream::new(2, None);
        let mut buf = [0u8; MAX_CHAT_FRAME_LEN];
        let n = ChatFrame::Data {
            epoch: 1,
            seq: REORDER_WINDOW,
            more: false,
            sent_ms: 0,
            text: b"far",
        }
        .write(&mut buf);
        feed(&mut b, ms(0), &[buf[..n].to_vec()]);
        assert_eq!(b.stats.beyond_window, 1);
        assert!(b.held.is_empty());
    }

    #[test]
    fn control_characters_are_not_passed_on() {
        let (mut a, mut b) = (ChatStream::new(1, None), ChatStream::new(2, None));
        a.push_message(0, "red\u{1b}[31m\nline two\ttab").unwrap();
        feed(&mut b, ms(0), &drain(&mut a, ms(0)));
        assert_eq!(delivered(&mut b), ["red\u{fffd}[31m\nline two\ttab"]);
    }

    /// Loss, duplication and reordering in both directions (acks too): every message arrives,
    /// in order, once.
    #[test]
    fn over_a_bad_network_every_message_arrives_in_order_once() {
        for seed in 1..=20u64 {
            let (mut a, mut b) = (ChatStream::new(1, None), ChatStream::new(2, None));
            let sent: Vec<String> = (0..40)
                .map(|i| format!("message {i} of seed {seed}"))
                .collect();
            for t in &sent {
                a.push_message(0, t).unwrap();
            }
            // One long one too.
            let long = "long ".repeat(390);
            a.push_message(0, &long).unwrap();
            let mut want = sent.clone();
            want.push(long);
            let got = lossy_run(&mut a, &mut b, seed * 7919, 30, 20);
            assert_eq!(got, want, "seed {seed}");
            assert_eq!(a.unacked(), 0, "seed {seed}: everything acked");
            assert!(a.stats.retransmitted > 0, "seed {seed}: the loss was real");
        }
    }

    #[test]
    fn next_len_tells_what_poll_transmit_writes_without_taking_it() {
        let (mut a, mut b) = (ChatStream::new(1, None), ChatStream::new(2, None));
        a.push_message(0, "twelve bytes").unwrap();
        assert_eq!(a.next_len(ms(0)), Some(DATA_HEADER_LEN + 12));
        assert_eq!(a.next_len(ms(0)), Some(DATA_HEADER_LEN + 12), "not taken");
        let out = drain(&mut a, ms(0));
        assert_eq!(out[0].len(), DATA_HEADER_LEN + 12);
        assert_eq!(a.next_len(ms(1)), None, "in flight, not yet due");
        feed(&mut b, ms(1), &out);
        assert_eq!(b.next_len(ms(1)), Some(ACK_LEN));
    }

    proptest::proptest! {
        /// A peer (authenticated, but broken or hostile) can send any frames: the stream never
        /// panics, never holds more than its window, and delivers only whole messages within
        /// the limits.
        #[test]
        fn arbitrary_frames_never_panic_or_overflow_the_bounds(
            frames in proptest::collection::vec(
                (0u8..3, 0u64..4, 0u32..80, proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..1400)),
                0..200,
            )
        ) {
            let mut s = ChatStream::new(1, None);
            s.push_message(0, "ours").unwrap();
            let mut buf = vec![0u8; MAX_CHAT_FRAME_LEN];
            for (i, (kind, epoch, seq, more, text)) in frames.iter().enumerate() {
                let now = ms(i as u64);
                match kind {
                    0 => s.handle_frame(now, ChatFrame::Data { epoch: *epoch, seq: *seq, more: *more, sent_ms: 0, text }),
                    1 => s.handle_frame(now, ChatFrame::Ack { epoch: *epoch, next: *seq, held: u64::from(*seq) << 7 }),
                    _ => {
                        let _ = ChatFrame::parse(text);
                    }
                }
                while s.poll_transmit(now, &mut buf).is_some() {}
                proptest::prop_assert!(s.held.len() <= REORDER_WINDOW as usize);
                while let Some(d) = s.poll_delivered() {
                    proptest::prop_assert!(d.text.len() <= 3 * MAX_MESSAGE_BYTES);
                }
            }
        }
    }

    #[test]
    fn data_frames_are_identified() {
        let mut a = ChatStream::new(1, None);
        a.push_message(0, "x").unwrap();
        assert!(drain(&mut a, ms(0)).iter().all(|f| is_data(f)));
    }
}
