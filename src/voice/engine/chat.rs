//! Text chat in the engine: one [`ChatStream`] and one [`ChatCipher`] per peer, next to its
//! voice cipher, and the paths they take.
//!
//! A message goes to every member whose key we know when it is sent (the channel as the
//! server announced it then); a member who joins later does not get earlier messages (there
//! is no history on the server, nor replayed by peers). Each copy is sealed for its member
//! alone and takes the same path as that member's voice: direct, or in a `RelayTo` envelope
//! through a member or the server, which forward chat like any other sealed datagram (they
//! check only its author, see `protocol::datagram::peer_sender`) and cannot read it. A path
//! that comes up later carries what waited; while there is none, nothing is sent and no timer
//! spins.
//!
//! Relays cap what they forward (a member `MEMBER_RELAY_BYTES_PER_SEC` per pair, about twice a
//! voice stream; the server a budget per client) and drop what goes over. Chat shares that
//! budget with the voice it travels next to, and a long message is several full datagrams at
//! once, so on a relayed path chat is paced to [`RELAYED_CHAT_BYTES_PER_SEC`]: it never pushes
//! the pair over the cap (which would drop voice as well as chat). A long message then takes a
//! second or two through a relay; short ones go at once (the pacer's burst). If a datagram is
//! dropped anyway, the stream sends it again on its retransmission timer: delayed, never lost.
//! Direct paths are not paced.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::{route_target, DropReason, Route, VoiceEngine};
use crate::protocol::datagram::{relay_header, Datagram, DatagramKind};
use crate::protocol::UserId;
use crate::voice::net::chat::{check_text, ChatError, ChatFrame, ChatStream};
use crate::voice::net::chat_cipher::{ChatCipher, ChatCryptoError, MAX_CHAT_FRAME_LEN};
use crate::voice::net::crypto::PUBLIC_KEY_LEN;

/// Chat bytes per second to one peer on a relayed path: what a member relay's per-pair cap
/// leaves beside a 20 ms voice stream (about 6 kB/s of the 12 kB/s), with margin.
pub const RELAYED_CHAT_BYTES_PER_SEC: f64 = 4000.0;
/// What may go at once on a relayed path before pacing starts: one short message and its ack.
const RELAYED_CHAT_BURST: Duration = Duration::from_millis(500);

/// Most peers whose last chat epoch is remembered after they left (a long session sees many
/// come and go; the oldest ids are forgotten first).
const MAX_REMEMBERED_EPOCHS: usize = 4096;

/// A message from a member, delivered in order, once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub from: UserId,
    /// The member's name when the message arrived.
    pub from_name: String,
    pub text: String,
    /// The sender's wall clock when it wrote the message (Unix ms).
    pub sent_ms: u64,
}

/// What became of a message we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSent {
    /// The members it was queued for (each gets it once, in order, while in the channel).
    pub to: Vec<(UserId, String)>,
    /// Members it was not queued for because too much to them is still unacknowledged.
    pub queue_full: Vec<(UserId, String)>,
}

/// Chat news for the shells (voice thread -> ECS -> window or headless output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    Received(ChatMessage),
    /// Our own message went out (`sent_ms` is the time we gave it).
    Sent {
        text: String,
        sent_ms: u64,
        result: ChatSent,
    },
    /// Our message was refused before anything was sent.
    Refused {
        text: String,
        reason: ChatError,
    },
}

/// The chat keys and stream of one peer.
pub(super) struct PeerChat {
    pub(super) cipher: ChatCipher,
    pub(super) stream: ChatStream,
    pacer: Pacer,
}

/// Paces chat on a relayed path: a sent frame of `n` bytes books `n / rate` of the path's
/// time; frames may go while less than [`RELAYED_CHAT_BURST`] is booked ahead. Pure.
#[derive(Debug, Clone, Copy, Default)]
struct Pacer {
    booked_until: Duration,
}

impl Pacer {
    fn may_send(&self, now: Duration) -> bool {
        now + RELAYED_CHAT_BURST >= self.booked_until
    }

    fn book(&mut self, now: Duration, len: usize) {
        let cost = Duration::from_secs_f64(len as f64 / RELAYED_CHAT_BYTES_PER_SEC);
        self.booked_until = self.booked_until.max(now) + cost;
    }

    /// When `may_send` is next true.
    fn ready_at(&self) -> Duration {
        self.booked_until.saturating_sub(RELAYED_CHAT_BURST)
    }
}

/// The engine's chat state besides each peer's [`PeerChat`].
///
/// Invariants: `next_epoch` and `last_packet` only grow during a run, so every stream we make
/// has a larger epoch than the last (a receiver can tell new from stale) and no packet number
/// is sealed twice under any key (keys repeat when a member leaves and comes back within the
/// same sessions).
pub(super) struct ChatPlane {
    next_epoch: u64,
    last_packet: u32,
    /// Last epoch seen from each peer that went, with the key it was seen under.
    seen: BTreeMap<UserId, ([u8; PUBLIC_KEY_LEN], u64)>,
    events: VecDeque<ChatEvent>,
    frame: Vec<u8>,
}

impl Default for ChatPlane {
    fn default() -> Self {
        Self {
            next_epoch: 0,
            last_packet: 0,
            seen: BTreeMap::new(),
            events: VecDeque::new(),
            frame: vec![0u8; MAX_CHAT_FRAME_LEN],
        }
    }
}

impl ChatPlane {
    /// Keeps the receiving epoch of a peer's chat that is going away.
    pub(super) fn remember(&mut self, id: UserId, chat: Option<&PeerChat>) {
        let Some(chat) = chat else {
            return;
        };
        if let Some(epoch) = chat.stream.peer_epoch() {
            self.seen.insert(id, (chat.cipher.peer_public(), epoch));
            while self.seen.len() > MAX_REMEMBERED_EPOCHS {
                self.seen.pop_first();
            }
        }
    }
}

impl VoiceEngine {
    /// Sends `text`, written at `sent_ms` (wall clock, Unix ms), to every member whose key we
    /// know, each copy sealed for that member. Refused when blank or longer than
    /// `MAX_CHAT_CHARS`; a member with too much unacknowledged is skipped and named.
    pub fn send_chat(
        &mut self,
        now: Duration,
        sent_ms: u64,
        text: &str,
    ) -> Result<ChatSent, ChatError> {
        check_text(text)?;
        let mut sent = ChatSent {
            to: Vec::new(),
            queue_full: Vec::new(),
        };
        let name = |id: UserId| {
            self.table
                .as_ref()
                .and_then(|t| t.peer(id))
                .map(|p| p.name.clone())
                .unwrap_or_default()
        };
        for (&id, peer) in self.peers.iter_mut() {
            let Some(chat) = peer.chat.as_mut() else {
                continue;
            };
            match chat.stream.push_message(sent_ms, text) {
                Ok(()) => sent.to.push((id, name(id))),
                Err(ChatError::QueueFull { .. }) => sent.queue_full.push((id, name(id))),
                Err(e) => return Err(e),
            }
        }
        self.flush_chat(now);
        Ok(sent)
    }

    /// The next chat message delivered (in order, once per message).
    pub fn poll_chat_event(&mut self) -> Option<ChatEvent> {
        self.chat.events.pop_front()
    }

    /// Makes (or remakes, for a new key) the chat keys and stream of peer `id`.
    pub(super) fn update_chat_peer(&mut self, our_id: UserId, id: UserId, key: [u8; 32]) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer
            .chat
            .as_ref()
            .is_some_and(|c| c.cipher.peer_public() == key)
        {
            return;
        }
        self.chat.remember(id, peer.chat.as_ref());
        peer.chat = None;
        let Ok(cipher) = ChatCipher::new(&self.keys, our_id, id, key) else {
            return;
        };
        let seen = self
            .chat
            .seen
            .get(&id)
            .filter(|(k, _)| *k == key)
            .map(|&(_, epoch)| epoch);
        self.chat.next_epoch += 1;
        peer.chat = Some(PeerChat {
            cipher,
            stream: ChatStream::new(self.chat.next_epoch, seen),
            pacer: Pacer::default(),
        });
    }

    /// A Chat datagram arrived (directly, or inside a `RelayFrom` naming `relayed_by_origin`):
    /// opened by its sender's chat cipher, then handed to that peer's stream; whatever it
    /// delivers becomes events, and the ack goes out at once.
    pub(super) fn handle_chat(
        &mut self,
        now: Duration,
        bytes: &[u8],
        relayed_origin: Option<UserId>,
    ) {
        let from = match Datagram::parse(bytes) {
            Ok(Datagram::Chat { from, .. }) => from,
            Ok(_) => {
                self.drops.unexpected_kind += 1;
                return;
            }
            Err(e) => {
                self.drops.count(&DropReason::Garbage(e));
                return;
            }
        };
        if relayed_origin.is_some_and(|origin| origin != from) {
            self.drops.unknown_sender += 1;
            return;
        }
        let Some(peer) = self.peers.get_mut(&from) else {
            self.drops.unknown_sender += 1;
            return;
        };
        let Some(chat) = peer.chat.as_mut() else {
            self.undecryptable += 1;
            return;
        };
        let n = match chat.cipher.open(bytes, &mut self.chat.frame) {
            Ok(n) => n,
            Err(ChatCryptoError::Replay { .. }) => {
                self.drops.replay += 1;
                return;
            }
            Err(_) => {
                self.undecryptable += 1;
                return;
            }
        };
        let Ok(frame) = ChatFrame::parse(&self.chat.frame[..n]) else {
            self.drops.unexpected_kind += 1;
            return;
        };
        chat.stream.handle_frame(now, frame);
        let from_name = self
            .table
            .as_ref()
            .and_then(|t| t.peer(from))
            .map(|p| p.name.clone())
            .unwrap_or_default();
        while let Some(d) = chat.stream.poll_delivered() {
            self.chat.events.push_back(ChatEvent::Received(ChatMessage {
                from,
                from_name: from_name.clone(),
                text: d.text,
                sent_ms: d.sent_ms,
            }));
        }
        self.flush_chat(now);
    }

    /// Seals whatever every peer's chat stream wants sent (acks, first sends, retransmissions)
    /// onto the path its voice takes. Peers without a path keep theirs waiting.
    pub(super) fn flush_chat(&mut self, now: Duration) {
        let Some(table) = &self.table else {
            return;
        };
        self.targets.clear();
        self.targets.extend(table.voice_targets());
        for &(peer_id, route) in &self.targets {
            let Some(chat) = self.peers.get_mut(&peer_id).and_then(|p| p.chat.as_mut()) else {
                continue;
            };
            let (Some(addr), at) = route_target(table, &self.registration, route) else {
                continue;
            };
            let paced = at > 0;
            while let Some(len) = chat.stream.next_len(now) {
                if paced && !chat.pacer.may_send(now) {
                    break;
                }
                let Some(n) = chat.stream.poll_transmit(now, &mut self.chat.frame) else {
                    break;
                };
                if paced {
                    chat.pacer.book(now, len);
                }
                let Some(packet) = self.chat.last_packet.checked_add(1) else {
                    // 2^32 chat datagrams in one run: no nonce left; say nothing more.
                    break;
                };
                if at > 0 {
                    self.sealed[..at]
                        .copy_from_slice(&relay_header(DatagramKind::RelayTo, peer_id));
                }
                let Ok(len) =
                    chat.cipher
                        .seal(packet, &self.chat.frame[..n], &mut self.sealed[at..])
                else {
                    continue;
                };
                self.chat.last_packet = packet;
                self.outbox.push(addr, &self.sealed[..at + len]);
            }
        }
    }

    /// When a chat stream with a path next has something to send (and, on a relayed path,
    /// its pacer lets it).
    pub(super) fn chat_timeout(&self) -> Option<Duration> {
        let table = self.table.as_ref()?;
        table
            .voice_targets()
            .filter_map(|(id, route)| {
                let chat = self.peers.get(&id)?.chat.as_ref()?;
                let due = chat.stream.poll_timeout()?;
                Some(match route {
                    Route::Direct(_) => due,
                    Route::Relayed(_) => due.max(chat.pacer.ready_at()),
                })
            })
            .min()
    }
}
