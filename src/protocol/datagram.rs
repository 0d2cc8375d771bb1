//! The UDP datagram format of the voice plane, version 1. Pure: no sockets, no allocation on
//! the parse and write paths.
//!
//! Every datagram starts with one byte `(VERSION << 4) | kind`; all integers are big-endian.
//!
//! | kind | name        | body after byte 0                                     | total    |
//! |------|-------------|-------------------------------------------------------|----------|
//! | 0    | Register    | token u64                                             | 9        |
//! | 1    | RegisterAck | family u8 (4 or 6), ip (4 or 16 bytes), port u16      | 8 or 20  |
//! | 2    | Punch       | from u32, to u32, nonce u64                           | 17       |
//! | 3    | PunchAck    | from u32, to u32, nonce u64 (echo of the Punch)       | 17       |
//! | 4    | Ping        | from u32, to u32, sent_micros u64                     | 17       |
//! | 5    | Pong        | from u32, to u32, echo_micros u64 (echo of the Ping)  | 17       |
//! | 6    | Voice       | from u32, seq u32, timestamp u32 (48 kHz), payload    | 13 + n   |
//! | 7    | RelayTo     | to u32, a sealed peer datagram for peer `to`          | 5 + n    |
//! | 8    | RelayFrom   | from u32, a sealed peer datagram from peer `from`     | 5 + n    |
//! | 9    | Report      | from u32, to u32, seq u32, loss u16 (per mille), loss run u4, jitter u12 (ms) | 17 |
//! | 10   | Chat        | from u32, to u32, packet u32, sealed chat frame + tag  | 13 + n   |
//!
//! A Report tells a peer how its voice reaches us (loss over the last 128 packets, how long
//! its runs of loss typically are, arrival jitter), about once a second, so its encoder can size the redundancy for the loss its
//! listeners really see. Like the other fixed kinds between peers, it is followed by a tag; its
//! `seq` (strictly increasing per sender) keeps the tag's nonce unique and stale copies out.
//!
//! A Chat datagram carries one frame of the per-pair text chat (`voice::net::chat`: a piece of
//! a message, or an acknowledgement), sealed with the pair's chat keys, which are apart from
//! the voice and control keys; `packet` counts the sender's chat datagrams to this peer and is
//! the sealing nonce, so it never repeats under one key (`voice::net::chat_cipher`).
//!
//! The two relay kinds are envelopes: a peer that cannot reach another directly sends
//! `RelayTo` to a relay (a member both reach, or the server), which checks who sent it and
//! forwards the inner bytes unchanged as `RelayFrom` to the addressed peer. The inner datagram
//! stays sealed end to end (voice encrypted, control tagged), so a relay can drop or delay it
//! but neither read nor forge it.
//!
//! No datagram may exceed [`MAX_DATAGRAM_LEN`] bytes, which keeps it below common path MTUs
//! (1500 minus IP/UDP headers and tunnel overhead) so it is never fragmented. Fixed-size kinds
//! must have exactly their size: trailing bytes are refused, so a parsed datagram re-encodes to
//! the identical bytes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Version of the datagram format, carried in the high nibble of byte 0. It equals the
/// control protocol's `PROTOCOL_VERSION` and is bumped together with it.
pub const VERSION: u8 = 3;

/// Largest datagram (header included) that is written or accepted.
pub const MAX_DATAGRAM_LEN: usize = 1400;

/// Length of the Voice header (type byte, sender id, sequence number, timestamp) that precedes
/// the payload. These bytes are meant to be the AEAD associated data once voice is encrypted.
pub const VOICE_HEADER_LEN: usize = 13;

/// Largest Voice payload that fits in [`MAX_DATAGRAM_LEN`].
pub const MAX_VOICE_PAYLOAD: usize = MAX_DATAGRAM_LEN - VOICE_HEADER_LEN;

/// Length of the Chat header (type byte, sender id, recipient id, packet number) that precedes
/// the sealed frame; it is the frame's associated data.
pub const CHAT_HEADER_LEN: usize = 13;

/// Length of the RelayTo / RelayFrom envelope header (type byte, peer id).
pub const RELAY_HEADER_LEN: usize = 5;

/// Largest inner datagram a relay envelope can carry within [`MAX_DATAGRAM_LEN`]. Voice is
/// encoded small enough to fit (see `voice::engine`), so any path can carry any frame.
pub const MAX_RELAYED_LEN: usize = MAX_DATAGRAM_LEN - RELAY_HEADER_LEN;

/// Size of Punch, PunchAck, Ping and Pong datagrams. On the wire between peers each is
/// followed by a 16-byte authentication tag (`voice::crypto::PeerCipher::tag_control`).
pub const PEER_CONTROL_LEN: usize = 17;
const REGISTER_LEN: usize = 9;
const REGISTER_ACK_V4_LEN: usize = 8;
const REGISTER_ACK_V6_LEN: usize = 20;

/// The kind nibble of byte 0. Exists so errors and counters can name a kind without a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DatagramKind {
    Register = 0,
    RegisterAck = 1,
    Punch = 2,
    PunchAck = 3,
    Ping = 4,
    Pong = 5,
    Voice = 6,
    RelayTo = 7,
    RelayFrom = 8,
    Report = 9,
    Chat = 10,
}

impl DatagramKind {
    fn from_nibble(kind: u8) -> Option<Self> {
        Some(match kind {
            0 => Self::Register,
            1 => Self::RegisterAck,
            2 => Self::Punch,
            3 => Self::PunchAck,
            4 => Self::Ping,
            5 => Self::Pong,
            6 => Self::Voice,
            7 => Self::RelayTo,
            8 => Self::RelayFrom,
            9 => Self::Report,
            10 => Self::Chat,
            _ => return None,
        })
    }

    /// Byte 0 of a datagram of this kind.
    pub const fn type_byte(self) -> u8 {
        (VERSION << 4) | self as u8
    }
}

/// One decoded voice-plane datagram. `Voice` borrows its payload from the received buffer
/// (zero-copy); every other kind is plain data, so `Datagram<'static>` can be queued freely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// Client to server: "this is the session holding `token`", so the server learns the
    /// client's public (NAT-mapped) address. The token was handed out over TCP.
    Register { token: u64 },
    /// Server to client: the source address the server saw for the client's Register.
    RegisterAck { observed: SocketAddr },
    /// Peer to peer hole-punching probe; `nonce` is echoed by the PunchAck.
    Punch { from: u32, to: u32, nonce: u64 },
    /// Answer to a Punch, sent to the Punch's source address, echoing its nonce.
    PunchAck { from: u32, to: u32, nonce: u64 },
    /// Keepalive and round-trip probe; `sent_micros` is the sender's clock.
    Ping {
        from: u32,
        to: u32,
        sent_micros: u64,
    },
    /// Answer to a Ping, echoing its `sent_micros`.
    Pong {
        from: u32,
        to: u32,
        echo_micros: u64,
    },
    /// How `from` receives `to`'s voice: see [`ReceiverReport`].
    Report {
        from: u32,
        to: u32,
        report: ReceiverReport,
    },
    /// One encoded audio frame from sender `from`. `timestamp` counts 48 kHz samples.
    Voice {
        from: u32,
        seq: u32,
        timestamp: u32,
        payload: &'a [u8],
    },
    /// Peer to relay: please forward `inner` (a sealed peer datagram we wrote) to peer `to`.
    RelayTo { to: u32, inner: &'a [u8] },
    /// Relay to peer: `inner` (a sealed peer datagram) was handed to the relay by peer `from`.
    RelayFrom { from: u32, inner: &'a [u8] },
    /// One sealed chat frame from `from` to `to`; `packet` is its sealing nonce.
    Chat {
        from: u32,
        to: u32,
        packet: u32,
        sealed: &'a [u8],
    },
}

/// What a Report datagram says about the voice its sender receives from its addressee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiverReport {
    /// Counts the sender's reports to this peer; a report not newer than the last is stale.
    pub seq: u32,
    /// Packets lost of the last 128, in per mille (0..=1000).
    pub loss_permille: u16,
    /// Typical length (packets, 2..=15) of the recent runs of loss when they come in bursts; 0
    /// when losses are single (or none). Bursts want deep redundancy rather than in-band FEC,
    /// which covers one packet. Written in the top 4 bits of the jitter field, which builds
    /// before it never read from a report: they take such a report as before.
    pub loss_run: u8,
    /// Arrival jitter in milliseconds (saturating at [`Self::MAX_JITTER_MS`]).
    pub jitter_ms: u16,
}

impl ReceiverReport {
    /// The largest jitter a report can carry (12 bits).
    pub const MAX_JITTER_MS: u16 = 0x0fff;
    /// The longest loss run a report can carry (4 bits).
    pub const MAX_LOSS_RUN: u8 = 15;

    fn to_value(self) -> u64 {
        let run = u64::from(self.loss_run.min(Self::MAX_LOSS_RUN));
        let jitter = u64::from(self.jitter_ms.min(Self::MAX_JITTER_MS));
        (u64::from(self.seq) << 32) | (u64::from(self.loss_permille) << 16) | (run << 12) | jitter
    }

    fn from_value(value: u64) -> Self {
        Self {
            seq: (value >> 32) as u32,
            loss_permille: (value >> 16) as u16,
            loss_run: ((value >> 12) & 0xf) as u8,
            jitter_ms: (value & 0x0fff) as u16,
        }
    }
}

/// Why a datagram could not be parsed or written. Every malformed input maps to one of these;
/// parsing never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("empty datagram")]
    Empty,
    #[error("datagram of {len} bytes exceeds the {max}-byte limit", max = MAX_DATAGRAM_LEN)]
    TooLarge { len: usize },
    #[error(
        "datagram format version {found} is not supported (this build speaks version {VERSION})"
    )]
    WrongVersion { found: u8 },
    #[error("unknown datagram kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("{kind:?} datagram is truncated: needs {needed} bytes, got {got}")]
    Truncated {
        kind: DatagramKind,
        needed: usize,
        got: usize,
    },
    #[error("{kind:?} datagram has {extra} unexpected trailing bytes")]
    TrailingBytes { kind: DatagramKind, extra: usize },
    #[error("RegisterAck carries unknown address family {family} (expected 4 or 6)")]
    BadAddressFamily { family: u8 },
    #[error("output buffer holds {available} bytes but the datagram needs {needed}")]
    BufferTooSmall { needed: usize, available: usize },
}

/// The Voice header bytes for `(from, seq, timestamp)`: exactly what [`Datagram::write`] puts
/// before the payload. Used as AEAD associated data so the header cannot be altered.
pub fn voice_header(from: u32, seq: u32, timestamp: u32) -> [u8; VOICE_HEADER_LEN] {
    let mut h = [0u8; VOICE_HEADER_LEN];
    h[0] = DatagramKind::Voice.type_byte();
    h[1..5].copy_from_slice(&from.to_be_bytes());
    h[5..9].copy_from_slice(&seq.to_be_bytes());
    h[9..13].copy_from_slice(&timestamp.to_be_bytes());
    h
}

/// The Chat header bytes for `(from, to, packet)`: exactly what [`Datagram::write`] puts before
/// the sealed frame, and the frame's associated data.
pub fn chat_header(from: u32, to: u32, packet: u32) -> [u8; CHAT_HEADER_LEN] {
    let mut h = [0u8; CHAT_HEADER_LEN];
    h[0] = DatagramKind::Chat.type_byte();
    h[1..5].copy_from_slice(&from.to_be_bytes());
    h[5..9].copy_from_slice(&to.to_be_bytes());
    h[9..13].copy_from_slice(&packet.to_be_bytes());
    h
}

/// The envelope header of a relay datagram of `kind` naming `peer`: what [`Datagram::write`]
/// puts before the inner bytes. Lets a sender seal the inner datagram in place after it.
pub fn relay_header(kind: DatagramKind, peer: u32) -> [u8; RELAY_HEADER_LEN] {
    let mut h = [0u8; RELAY_HEADER_LEN];
    h[0] = kind.type_byte();
    h[1..5].copy_from_slice(&peer.to_be_bytes());
    h
}

/// The sender id written in a peer datagram's bytes (Punch, PunchAck, Ping, Pong, Report, Voice,
/// Chat),
/// without parsing or authenticating the rest: what a relay checks against the address the
/// datagram came from. `None` for any other kind or a truncated header.
pub fn peer_sender(bytes: &[u8]) -> Option<u32> {
    let first = *bytes.first()?;
    if first >> 4 != VERSION || bytes.len() < 5 {
        return None;
    }
    match DatagramKind::from_nibble(first & 0x0f)? {
        DatagramKind::Punch
        | DatagramKind::PunchAck
        | DatagramKind::Ping
        | DatagramKind::Pong
        | DatagramKind::Report
        | DatagramKind::Voice
        | DatagramKind::Chat => Some(be_u32(bytes, 1)),
        _ => None,
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Checks that a fixed-size kind has exactly `needed` bytes.
fn exact(kind: DatagramKind, bytes: &[u8], needed: usize) -> Result<(), DatagramError> {
    match bytes.len() {
        n if n < needed => Err(DatagramError::Truncated {
            kind,
            needed,
            got: n,
        }),
        n if n > needed => Err(DatagramError::TrailingBytes {
            kind,
            extra: n - needed,
        }),
        _ => Ok(()),
    }
}

impl<'a> Datagram<'a> {
    /// Decodes one received datagram. The Voice payload borrows from `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DatagramError> {
        let first = *bytes.first().ok_or(DatagramError::Empty)?;
        if bytes.len() > MAX_DATAGRAM_LEN {
            return Err(DatagramError::TooLarge { len: bytes.len() });
        }
        let version = first >> 4;
        if version != VERSION {
            return Err(DatagramError::WrongVersion { found: version });
        }
        let kind = DatagramKind::from_nibble(first & 0x0f)
            .ok_or(DatagramError::UnknownKind { kind: first & 0x0f })?;
        match kind {
            DatagramKind::Register => {
                exact(kind, bytes, REGISTER_LEN)?;
                Ok(Self::Register {
                    token: be_u64(bytes, 1),
                })
            }
            DatagramKind::RegisterAck => {
                let family = *bytes.get(1).ok_or(DatagramError::Truncated {
                    kind,
                    needed: REGISTER_ACK_V4_LEN,
                    got: bytes.len(),
                })?;
                let observed = match family {
                    4 => {
                        exact(kind, bytes, REGISTER_ACK_V4_LEN)?;
                        let mut ip = [0u8; 4];
                        ip.copy_from_slice(&bytes[2..6]);
                        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), be_u16(bytes, 6)))
                    }
                    6 => {
                        exact(kind, bytes, REGISTER_ACK_V6_LEN)?;
                        let mut ip = [0u8; 16];
                        ip.copy_from_slice(&bytes[2..18]);
                        SocketAddr::V6(SocketAddrV6::new(
                            Ipv6Addr::from(ip),
                            be_u16(bytes, 18),
                            0,
                            0,
                        ))
                    }
                    family => return Err(DatagramError::BadAddressFamily { family }),
                };
                Ok(Self::RegisterAck { observed })
            }
            DatagramKind::Punch
            | DatagramKind::PunchAck
            | DatagramKind::Ping
            | DatagramKind::Pong
            | DatagramKind::Report => {
                exact(kind, bytes, PEER_CONTROL_LEN)?;
                let (from, to, value) = (be_u32(bytes, 1), be_u32(bytes, 5), be_u64(bytes, 9));
                Ok(match kind {
                    DatagramKind::Punch => Self::Punch {
                        from,
                        to,
                        nonce: value,
                    },
                    DatagramKind::PunchAck => Self::PunchAck {
                        from,
                        to,
                        nonce: value,
                    },
                    DatagramKind::Ping => Self::Ping {
                        from,
                        to,
                        sent_micros: value,
                    },
                    DatagramKind::Pong => Self::Pong {
                        from,
                        to,
                        echo_micros: value,
                    },
                    _ => Self::Report {
                        from,
                        to,
                        report: ReceiverReport::from_value(value),
                    },
                })
            }
            DatagramKind::Voice => {
                if bytes.len() < VOICE_HEADER_LEN {
                    return Err(DatagramError::Truncated {
                        kind,
                        needed: VOICE_HEADER_LEN,
                        got: bytes.len(),
                    });
                }
                Ok(Self::Voice {
                    from: be_u32(bytes, 1),
                    seq: be_u32(bytes, 5),
                    timestamp: be_u32(bytes, 9),
                    payload: &bytes[VOICE_HEADER_LEN..],
                })
            }
            DatagramKind::Chat => {
                if bytes.len() < CHAT_HEADER_LEN {
                    return Err(DatagramError::Truncated {
                        kind,
                        needed: CHAT_HEADER_LEN,
                        got: bytes.len(),
                    });
                }
                Ok(Self::Chat {
                    from: be_u32(bytes, 1),
                    to: be_u32(bytes, 5),
                    packet: be_u32(bytes, 9),
                    sealed: &bytes[CHAT_HEADER_LEN..],
                })
            }
            DatagramKind::RelayTo | DatagramKind::RelayFrom => {
                // An envelope always carries something: the smallest inner datagram is 9 bytes.
                if bytes.len() <= RELAY_HEADER_LEN {
                    return Err(DatagramError::Truncated {
                        kind,
                        needed: RELAY_HEADER_LEN + 1,
                        got: bytes.len(),
                    });
                }
                let peer = be_u32(bytes, 1);
                let inner = &bytes[RELAY_HEADER_LEN..];
                Ok(match kind {
                    DatagramKind::RelayTo => Self::RelayTo { to: peer, inner },
                    _ => Self::RelayFrom { from: peer, inner },
                })
            }
        }
    }

    /// The kind of this datagram.
    pub fn kind(&self) -> DatagramKind {
        match self {
            Self::Register { .. } => DatagramKind::Register,
            Self::RegisterAck { .. } => DatagramKind::RegisterAck,
            Self::Punch { .. } => DatagramKind::Punch,
            Self::PunchAck { .. } => DatagramKind::PunchAck,
            Self::Ping { .. } => DatagramKind::Ping,
            Self::Pong { .. } => DatagramKind::Pong,
            Self::Report { .. } => DatagramKind::Report,
            Self::Voice { .. } => DatagramKind::Voice,
            Self::RelayTo { .. } => DatagramKind::RelayTo,
            Self::RelayFrom { .. } => DatagramKind::RelayFrom,
            Self::Chat { .. } => DatagramKind::Chat,
        }
    }

    /// The sending peer's id for peer-to-peer kinds; `None` for Register, RegisterAck and the
    /// relay envelopes (whose sender is whoever the relay or the forwarding peer is).
    pub fn sender(&self) -> Option<u32> {
        match *self {
            Self::Register { .. }
            | Self::RegisterAck { .. }
            | Self::RelayTo { .. }
            | Self::RelayFrom { .. } => None,
            Self::Punch { from, .. }
            | Self::PunchAck { from, .. }
            | Self::Ping { from, .. }
            | Self::Pong { from, .. }
            | Self::Report { from, .. }
            | Self::Voice { from, .. }
            | Self::Chat { from, .. } => Some(from),
        }
    }

    /// The addressed peer's id for Punch, PunchAck, Ping and Pong. Voice carries no recipient:
    /// one encoded frame goes to every peer.
    pub fn recipient(&self) -> Option<u32> {
        match *self {
            Self::Punch { to, .. }
            | Self::PunchAck { to, .. }
            | Self::Ping { to, .. }
            | Self::Pong { to, .. }
            | Self::Report { to, .. }
            | Self::Chat { to, .. } => Some(to),
            _ => None,
        }
    }

    /// Number of bytes [`Datagram::write`] produces.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Register { .. } => REGISTER_LEN,
            Self::RegisterAck {
                observed: SocketAddr::V4(_),
            } => REGISTER_ACK_V4_LEN,
            Self::RegisterAck {
                observed: SocketAddr::V6(_),
            } => REGISTER_ACK_V6_LEN,
            Self::Punch { .. }
            | Self::PunchAck { .. }
            | Self::Ping { .. }
            | Self::Pong { .. }
            | Self::Report { .. } => PEER_CONTROL_LEN,
            Self::Voice { payload, .. } => VOICE_HEADER_LEN + payload.len(),
            Self::RelayTo { inner, .. } | Self::RelayFrom { inner, .. } => {
                RELAY_HEADER_LEN + inner.len()
            }
            Self::Chat { sealed, .. } => CHAT_HEADER_LEN + sealed.len(),
        }
    }

    /// Encodes into `out` without allocating and returns the number of bytes written.
    /// A RegisterAck for an IPv6 address drops flow info and scope id (not meaningful remotely).
    pub fn write(&self, out: &mut [u8]) -> Result<usize, DatagramError> {
        let len = self.encoded_len();
        if len > MAX_DATAGRAM_LEN {
            return Err(DatagramError::TooLarge { len });
        }
        if out.len() < len {
            return Err(DatagramError::BufferTooSmall {
                needed: len,
                available: out.len(),
            });
        }
        let out = &mut out[..len];
        out[0] = self.kind().type_byte();
        match *self {
            Self::Register { token } => out[1..9].copy_from_slice(&token.to_be_bytes()),
            Self::RegisterAck { observed } => match observed {
                SocketAddr::V4(a) => {
                    out[1] = 4;
                    out[2..6].copy_from_slice(&a.ip().octets());
                    out[6..8].copy_from_slice(&a.port().to_be_bytes());
                }
                SocketAddr::V6(a) => {
                    out[1] = 6;
                    out[2..18].copy_from_slice(&a.ip().octets());
                    out[18..20].copy_from_slice(&a.port().to_be_bytes());
                }
            },
            Self::Punch {
                from,
                to,
                nonce: value,
            }
            | Self::PunchAck {
                from,
                to,
                nonce: value,
            }
            | Self::Ping {
                from,
                to,
                sent_micros: value,
            }
            | Self::Pong {
                from,
                to,
                echo_micros: value,
            } => {
                out[1..5].copy_from_slice(&from.to_be_bytes());
                out[5..9].copy_from_slice(&to.to_be_bytes());
                out[9..17].copy_from_slice(&value.to_be_bytes());
            }
            Self::Report { from, to, report } => {
                out[1..5].copy_from_slice(&from.to_be_bytes());
                out[5..9].copy_from_slice(&to.to_be_bytes());
                out[9..17].copy_from_slice(&report.to_value().to_be_bytes());
            }
            Self::Voice {
                from,
                seq,
                timestamp,
                payload,
            } => {
                out[..VOICE_HEADER_LEN].copy_from_slice(&voice_header(from, seq, timestamp));
                out[VOICE_HEADER_LEN..].copy_from_slice(payload);
            }
            Self::RelayTo { to: peer, inner } | Self::RelayFrom { from: peer, inner } => {
                out[..RELAY_HEADER_LEN].copy_from_slice(&relay_header(self.kind(), peer));
                out[RELAY_HEADER_LEN..].copy_from_slice(inner);
            }
            Self::Chat {
                from,
                to,
                packet,
                sealed,
            } => {
                out[..CHAT_HEADER_LEN].copy_from_slice(&chat_header(from, to, packet));
                out[CHAT_HEADER_LEN..].copy_from_slice(sealed);
            }
        }
        Ok(len)
    }

    /// Encodes into a fresh `Vec` (convenience for tests and cold paths).
    pub fn to_vec(&self) -> Result<Vec<u8>, DatagramError> {
        let mut v = vec![0u8; self.encoded_len()];
        self.write(&mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn voice_layout_is_type_byte_then_big_endian_header_then_payload() {
        let d = Datagram::Voice {
            from: 0x0102_0304,
            seq: 0x0506_0708,
            timestamp: 0x090a_0b0c,
            payload: &[0xaa, 0xbb],
        };
        let bytes = d.to_vec().unwrap();
        assert_eq!(
            bytes,
            [0x36, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0xaa, 0xbb]
        );
        assert_eq!(
            &bytes[..VOICE_HEADER_LEN],
            &voice_header(0x0102_0304, 0x0506_0708, 0x090a_0b0c)
        );
    }

    #[test]
    fn voice_payload_is_borrowed_from_the_input() {
        let bytes = Datagram::Voice {
            from: 1,
            seq: 2,
            timestamp: 3,
            payload: b"opus",
        }
        .to_vec()
        .unwrap();
        match Datagram::parse(&bytes).unwrap() {
            Datagram::Voice { payload, .. } => {
                assert_eq!(payload, b"opus");
                assert_eq!(payload.as_ptr(), bytes[VOICE_HEADER_LEN..].as_ptr());
            }
            other => panic!("expected voice, got {other:?}"),
        }
    }

    #[test]
    fn report_packs_its_fields_into_the_fixed_control_layout() {
        let d = Datagram::Report {
            from: 7,
            to: 9,
            report: ReceiverReport {
                seq: 0x0102_0304,
                loss_permille: 1000,
                loss_run: 5,
                jitter_ms: 0xbcd,
            },
        };
        let bytes = d.to_vec().unwrap();
        assert_eq!(bytes.len(), PEER_CONTROL_LEN);
        assert_eq!(bytes[0], DatagramKind::Report.type_byte());
        assert_eq!(&bytes[9..], &[1, 2, 3, 4, 0x03, 0xe8, 0x5b, 0xcd]);
        assert_eq!(Datagram::parse(&bytes).unwrap(), d);
        // A report from a build before loss runs (a 16-bit jitter under 4096 ms) reads as
        // single losses; values too large for their bits saturate.
        let old = [&bytes[..13], &[0x03, 0xe8, 0x00, 0x2a]].concat();
        let Datagram::Report { report, .. } = Datagram::parse(&old).unwrap() else {
            panic!("a report")
        };
        assert_eq!((report.loss_run, report.jitter_ms), (0, 42));
        let big = ReceiverReport {
            loss_run: 200,
            jitter_ms: u16::MAX,
            ..ReceiverReport::default()
        };
        let back = ReceiverReport::from_value(big.to_value());
        assert_eq!((back.loss_run, back.jitter_ms), (15, 0x0fff));
        assert_eq!((d.sender(), d.recipient()), (Some(7), Some(9)));
    }

    #[test]
    fn register_ack_round_trips_v4_and_v6() {
        for observed in [v4("203.0.113.7:40000"), v4("[2001:db8::1]:7700")] {
            let d = Datagram::RegisterAck { observed };
            let bytes = d.to_vec().unwrap();
            assert_eq!(bytes.len(), d.encoded_len());
            assert_eq!(Datagram::parse(&bytes).unwrap(), d);
        }
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut bytes = Datagram::Register { token: 9 }.to_vec().unwrap();
        // An older build's datagram (version 1: peer control without tags).
        bytes[0] = (1 << 4) | (bytes[0] & 0x0f);
        assert_eq!(
            Datagram::parse(&bytes),
            Err(DatagramError::WrongVersion { found: 1 })
        );
    }

    #[test]
    fn unknown_kind_is_refused() {
        assert_eq!(
            Datagram::parse(&[(VERSION << 4) | 11, 0, 0]),
            Err(DatagramError::UnknownKind { kind: 11 })
        );
    }

    #[test]
    fn empty_truncated_and_trailing_inputs_are_refused() {
        assert_eq!(Datagram::parse(&[]), Err(DatagramError::Empty));
        let ping = Datagram::Ping {
            from: 1,
            to: 2,
            sent_micros: 3,
        }
        .to_vec()
        .unwrap();
        assert_eq!(
            Datagram::parse(&ping[..16]),
            Err(DatagramError::Truncated {
                kind: DatagramKind::Ping,
                needed: 17,
                got: 16
            })
        );
        let mut long = ping.clone();
        long.push(0);
        assert_eq!(
            Datagram::parse(&long),
            Err(DatagramError::TrailingBytes {
                kind: DatagramKind::Ping,
                extra: 1
            })
        );
        assert!(matches!(
            Datagram::parse(&[DatagramKind::Voice.type_byte(), 0, 0, 0]),
            Err(DatagramError::Truncated {
                needed: VOICE_HEADER_LEN,
                ..
            })
        ));
        assert!(matches!(
            Datagram::parse(&[DatagramKind::RegisterAck.type_byte()]),
            Err(DatagramError::Truncated { .. })
        ));
        assert_eq!(
            Datagram::parse(&[DatagramKind::RegisterAck.type_byte(), 5, 0, 0, 0, 0, 0, 0]),
            Err(DatagramError::BadAddressFamily { family: 5 })
        );
    }

    #[test]
    fn oversized_datagrams_are_refused_on_parse_and_write() {
        let mut big = vec![0u8; MAX_DATAGRAM_LEN + 1];
        big[..VOICE_HEADER_LEN].copy_from_slice(&voice_header(1, 2, 3));
        assert_eq!(
            Datagram::parse(&big),
            Err(DatagramError::TooLarge {
                len: MAX_DATAGRAM_LEN + 1
            })
        );
        let max = &big[..MAX_DATAGRAM_LEN];
        assert!(Datagram::parse(max).is_ok());
        let payload = vec![0u8; MAX_VOICE_PAYLOAD + 1];
        let d = Datagram::Voice {
            from: 1,
            seq: 2,
            timestamp: 3,
            payload: &payload,
        };
        let mut out = [0u8; 2048];
        assert_eq!(
            d.write(&mut out),
            Err(DatagramError::TooLarge {
                len: MAX_DATAGRAM_LEN + 1
            })
        );
    }

    #[test]
    fn write_into_a_short_buffer_fails_without_writing_past_it() {
        let d = Datagram::Punch {
            from: 1,
            to: 2,
            nonce: 3,
        };
        let mut out = [0u8; 10];
        assert_eq!(
            d.write(&mut out),
            Err(DatagramError::BufferTooSmall {
                needed: 17,
                available: 10
            })
        );
    }

    #[test]
    fn errors_read_as_sentences() {
        let e = DatagramError::WrongVersion { found: 4 };
        assert_eq!(
            e.to_string(),
            "datagram format version 4 is not supported (this build speaks version 3)"
        );
        assert_eq!(
            DatagramError::TooLarge { len: 1500 }.to_string(),
            "datagram of 1500 bytes exceeds the 1400-byte limit"
        );
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        ]
    }

    /// Owned description of a datagram so proptest can generate voice payloads.
    fn arb_datagram() -> impl Strategy<Value = (u8, u32, u32, u64, SocketAddr, Vec<u8>)> {
        (
            0u8..11,
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            arb_addr(),
            proptest::collection::vec(any::<u8>(), 0..=MAX_VOICE_PAYLOAD),
        )
    }

    fn build(
        (kind, a, b, c, addr, payload): &(u8, u32, u32, u64, SocketAddr, Vec<u8>),
    ) -> Datagram<'_> {
        let (a, b, c) = (*a, *b, *c);
        match kind {
            0 => Datagram::Register { token: c },
            1 => Datagram::RegisterAck { observed: *addr },
            2 => Datagram::Punch {
                from: a,
                to: b,
                nonce: c,
            },
            3 => Datagram::PunchAck {
                from: a,
                to: b,
                nonce: c,
            },
            4 => Datagram::Ping {
                from: a,
                to: b,
                sent_micros: c,
            },
            5 => Datagram::Pong {
                from: a,
                to: b,
                echo_micros: c,
            },
            6 => Datagram::Voice {
                from: a,
                seq: b,
                timestamp: c as u32,
                payload,
            },
            // Envelopes carry at least one byte and fit the datagram limit.
            7 => Datagram::RelayTo {
                to: a,
                inner: relay_inner(payload),
            },
            8 => Datagram::RelayFrom {
                from: a,
                inner: relay_inner(payload),
            },
            9 => Datagram::Report {
                from: a,
                to: b,
                report: ReceiverReport::from_value(c),
            },
            _ => Datagram::Chat {
                from: a,
                to: b,
                packet: c as u32,
                sealed: &payload[..payload.len().min(MAX_DATAGRAM_LEN - CHAT_HEADER_LEN)],
            },
        }
    }

    fn relay_inner(payload: &[u8]) -> &[u8] {
        const ONE: &[u8] = &[0x36];
        match payload.len() {
            0 => ONE,
            n => &payload[..n.min(MAX_RELAYED_LEN)],
        }
    }

    #[test]
    fn relay_envelopes_carry_the_inner_bytes_unchanged_and_name_no_sender() {
        let inner = voice_header(3, 9, 960);
        let to = Datagram::RelayTo {
            to: 0x0a0b_0c0d,
            inner: &inner,
        };
        let bytes = to.to_vec().unwrap();
        assert_eq!(bytes[0], DatagramKind::RelayTo.type_byte());
        assert_eq!(&bytes[1..5], &[0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(&bytes[5..], &inner);
        assert_eq!(Datagram::parse(&bytes), Ok(to));
        assert_eq!(to.sender(), None);
        assert_eq!(to.recipient(), None);
        assert_eq!(peer_sender(&inner), Some(3));
        assert_eq!(
            peer_sender(&bytes),
            None,
            "an envelope is not a peer datagram"
        );
        let empty = relay_header(DatagramKind::RelayFrom, 1);
        assert!(matches!(
            Datagram::parse(&empty),
            Err(DatagramError::Truncated { .. })
        ));
        // Any voice frame the engine sends still fits in an envelope.
        assert_eq!(MAX_RELAYED_LEN + RELAY_HEADER_LEN, MAX_DATAGRAM_LEN);
    }

    #[test]
    fn chat_is_a_sealed_body_behind_a_header_naming_both_ends_and_relays_see_its_sender() {
        let d = Datagram::Chat {
            from: 0x0102_0304,
            to: 0x0506_0708,
            packet: 0x090a_0b0c,
            sealed: &[0xaa, 0xbb],
        };
        let bytes = d.to_vec().unwrap();
        assert_eq!(
            bytes,
            [0x3a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0xaa, 0xbb]
        );
        assert_eq!(
            &bytes[..CHAT_HEADER_LEN],
            &chat_header(0x0102_0304, 0x0506_0708, 0x090a_0b0c)
        );
        assert_eq!(Datagram::parse(&bytes), Ok(d));
        assert_eq!(
            (d.sender(), d.recipient()),
            (Some(0x0102_0304), Some(0x0506_0708))
        );
        // A relay (member or server) checks the inner datagram's author: chat must name it,
        // or relays would refuse to forward chat as forged.
        assert_eq!(peer_sender(&bytes), Some(0x0102_0304));
        assert!(matches!(
            Datagram::parse(&bytes[..CHAT_HEADER_LEN - 1]),
            Err(DatagramError::Truncated {
                kind: DatagramKind::Chat,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn every_datagram_round_trips(spec in arb_datagram()) {
            let d = build(&spec);
            let mut buf = [0u8; MAX_DATAGRAM_LEN];
            let n = d.write(&mut buf).unwrap();
            prop_assert_eq!(n, d.encoded_len());
            prop_assert_eq!(Datagram::parse(&buf[..n]).unwrap(), d);
            prop_assert_eq!(d.to_vec().unwrap(), buf[..n].to_vec());
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_valid_ones_reencode_identically(
            bytes in proptest::collection::vec(any::<u8>(), 0..1600)
        ) {
            if let Ok(d) = Datagram::parse(&bytes) {
                prop_assert_eq!(d.to_vec().unwrap(), bytes);
            }
        }

        #[test]
        fn bytes_with_a_valid_type_byte_never_panic(
            kind in 0u8..16,
            rest in proptest::collection::vec(any::<u8>(), 0..40)
        ) {
            let mut bytes = vec![(VERSION << 4) | kind];
            bytes.extend_from_slice(&rest);
            if let Ok(d) = Datagram::parse(&bytes) {
                prop_assert_eq!(d.to_vec().unwrap(), bytes);
            }
        }
    }
}
