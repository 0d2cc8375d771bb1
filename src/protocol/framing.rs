//! Length-prefixed frames on the control connection: a `u32` big-endian length, then a
//! bincode-encoded message. Frames larger than [`MAX_FRAME_LEN`] are refused before any of their
//! body is buffered, so a hostile peer cannot make us allocate beyond the limit.

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

/// Largest accepted frame body, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

const HEADER_LEN: usize = 4;

/// Bytes a decoded message may allocate. Above the frame size because in-memory forms are
/// larger than their encoding (a `String` header is 24 bytes, its length prefix 1); still a hard
/// bound, so a small hostile frame cannot claim a huge allocation.
const MAX_DECODED_ALLOC: usize = 4 * MAX_FRAME_LEN;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODED_ALLOC>()
}

/// Why a frame could not be encoded or decoded. Any of these ends the connection.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge { len: usize },
    #[error("empty frame")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("frame has {0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Encodes one message as a complete frame (header + body).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FramingError> {
    let mut out = vec![0u8; HEADER_LEN];
    // Wiped after use: a body may hold a password (see `super::password`).
    let body = Zeroizing::new(
        bincode::serde::encode_to_vec(msg, bincode_config())
            .map_err(|e| FramingError::Malformed(e.to_string()))?,
    );
    if body.len() > MAX_FRAME_LEN {
        return Err(FramingError::TooLarge { len: body.len() });
    }
    out.reserve_exact(body.len());
    out[..HEADER_LEN].copy_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a stream of frames that arrives in arbitrary pieces: partial frames are kept until the
/// rest arrives, several frames in one read come out one by one.
///
/// Invariant: the internal buffer never holds more than one header plus [`MAX_FRAME_LEN`] bytes of
/// an unfinished frame; callers feed at most what [`FrameDecoder::wanted`] asks for.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Consumed prefix of `buf` (compacted lazily to avoid shifting on every frame).
    start: usize,
    poisoned: bool,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many more bytes may be fed before the decoder must be drained with [`Self::next`].
    /// A reader should read at most this many bytes at a time.
    pub fn wanted(&self) -> usize {
        let pending = self.buf.len() - self.start;
        (HEADER_LEN + MAX_FRAME_LEN).saturating_sub(pending).max(1)
    }

    /// Appends bytes received from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 16 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
            // The shift left copies of the undecoded bytes behind the new end.
            for b in self.buf.spare_capacity_mut() {
                b.write(0);
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Number of buffered bytes not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Returns the next complete message, `Ok(None)` if more bytes are needed, or an error that
    /// must end the connection (after which the decoder keeps returning it).
    // Not an Iterator: the message type is chosen per call and errors are terminal.
    #[allow(clippy::should_implement_trait)]
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FramingError> {
        if self.poisoned {
            return Err(FramingError::Malformed("stream already failed".into()));
        }
        let pending = &self.buf[self.start..];
        if pending.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([pending[0], pending[1], pending[2], pending[3]]) as usize;
        if len > MAX_FRAME_LEN {
            self.poisoned = true;
            return Err(FramingError::TooLarge { len });
        }
        if len == 0 {
            self.poisoned = true;
            return Err(FramingError::Empty);
        }
        if pending.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let body = &pending[HEADER_LEN..HEADER_LEN + len];
        let result = bincode::serde::decode_from_slice::<T, _>(body, bincode_config());
        // A decoded frame's bytes are wiped: it may have carried a password.
        self.buf[self.start..self.start + HEADER_LEN + len].zeroize();
        self.start += HEADER_LEN + len;
        match result {
            Ok((msg, used)) if used == len => Ok(Some(msg)),
            Ok((_, used)) => {
                self.poisoned = true;
                Err(FramingError::TrailingBytes(len - used))
            }
            Err(e) => {
                self.poisoned = true;
                Err(FramingError::Malformed(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::messages::{ChannelInfo, ClientMsg, MemberInfo, PeerInfo, ServerMsg};
    use super::super::status::Status;
    use super::*;

    #[test]
    fn a_decoded_frame_leaves_no_password_behind_in_the_decoder() {
        let join = ClientMsg::Join {
            channel: "Private".into(),
            password: Some(crate::protocol::Password::from("correct horse")),
        };
        let mut decoder = FrameDecoder::new();
        decoder.push(&encode_frame(&join).unwrap());
        decoder.push(&encode_frame(&ClientMsg::Heartbeat).unwrap()[..2]);
        assert_eq!(decoder.next::<ClientMsg>().unwrap(), Some(join));
        let needle = b"correct horse";
        assert!(
            !decoder.buf.windows(needle.len()).any(|w| w == needle),
            "the password is still in the decoder's buffer"
        );
    }
    use proptest::prelude::*;

    fn sample_messages() -> Vec<ServerMsg> {
        vec![
            ServerMsg::Overview {
                channels: vec![ChannelInfo {
                    name: "Lobby".into(),
                    has_password: false,
                    max_members: 16,
                    members: vec![MemberInfo {
                        user_id: 7,
                        username: "alice".into(),
                    }],
                }],
            },
            ServerMsg::Joined {
                status: Status::WrongPassword,
                channel: "Private".into(),
            },
            ServerMsg::HeartbeatAck,
        ]
    }

    #[test]
    fn several_frames_in_one_read_come_out_in_order() {
        let msgs = sample_messages();
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode_frame(m).unwrap());
        }
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        for m in &msgs {
            assert_eq!(dec.next::<ServerMsg>().unwrap().as_ref(), Some(m));
        }
        assert_eq!(dec.next::<ServerMsg>().unwrap(), None);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn partial_frames_wait_for_the_rest() {
        let frame = encode_frame(&ClientMsg::Identify {
            username: "bob".into(),
        })
        .unwrap();
        let mut dec = FrameDecoder::new();
        for (i, b) in frame.iter().enumerate() {
            assert_eq!(dec.next::<ClientMsg>().unwrap(), None, "byte {i}");
            dec.push(&[*b]);
        }
        assert_eq!(
            dec.next::<ClientMsg>().unwrap(),
            Some(ClientMsg::Identify {
                username: "bob".into()
            })
        );
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header_alone() {
        let mut dec = FrameDecoder::new();
        dec.push(&(10u32 * 1024 * 1024).to_be_bytes());
        assert_eq!(
            dec.next::<ClientMsg>(),
            Err(FramingError::TooLarge {
                len: 10 * 1024 * 1024
            })
        );
        // Stays failed: the stream cannot be resynchronised.
        assert!(dec.next::<ClientMsg>().is_err());
    }

    #[test]
    fn garbage_body_is_malformed() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            dec.next::<ClientMsg>(),
            Err(FramingError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_refused() {
        let mut frame = encode_frame(&ClientMsg::Heartbeat).unwrap();
        frame.push(0);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let mut dec = FrameDecoder::new();
        dec.push(&frame);
        assert_eq!(dec.next::<ClientMsg>(), Err(FramingError::TrailingBytes(1)));
    }

    fn arb_addr() -> impl Strategy<Value = std::net::SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port))),
        ]
    }

    fn arb_status() -> impl Strategy<Value = Status> {
        prop_oneof![
            Just(Status::Ok),
            Just(Status::NoSuchChannel),
            Just(Status::WrongPassword),
            Just(Status::ChannelFull),
            Just(Status::NameTaken),
            Just(Status::InvalidName),
            Just(Status::NotIdentified),
            Just(Status::AlreadyInChannel),
            Just(Status::VersionMismatch),
        ]
    }

    fn arb_client_msg() -> impl Strategy<Value = ClientMsg> {
        prop_oneof![
            (any::<u32>(), ".{0,20}").prop_map(|(v, a)| ClientMsg::Hello {
                protocol_version: v,
                app_version: a
            }),
            ".{0,40}".prop_map(|u| ClientMsg::Identify { username: u }),
            (".{0,40}", proptest::option::of(".{0,40}")).prop_map(|(c, p)| ClientMsg::Join {
                channel: c,
                password: p.map(crate::protocol::Password::new)
            }),
            Just(ClientMsg::Leave),
            Just(ClientMsg::Heartbeat),
            (
                proptest::collection::vec(arb_addr(), 0..5),
                proptest::option::of(any::<[u8; 32]>()),
                proptest::option::of(arb_proof()),
            )
                .prop_map(|(local, voice_key, voice_key_proof)| {
                    ClientMsg::AnnounceEndpoints {
                        local,
                        voice_key,
                        voice_key_proof,
                    }
                }),
            Just(ClientMsg::Disconnect),
        ]
    }

    fn arb_proof() -> impl Strategy<Value = crate::protocol::VoiceKeyProof> {
        (any::<[u8; 32]>(), any::<[[u8; 32]; 2]>()).prop_map(|(identity_key, signature)| {
            crate::protocol::VoiceKeyProof {
                identity_key,
                signature,
            }
        })
    }

    fn arb_member() -> impl Strategy<Value = MemberInfo> {
        (any::<u32>(), ".{0,32}").prop_map(|(user_id, username)| MemberInfo { user_id, username })
    }

    fn arb_server_msg() -> impl Strategy<Value = ServerMsg> {
        prop_oneof![
            (
                any::<u32>(),
                ".{0,10}",
                any::<u64>(),
                any::<u32>(),
                any::<bool>()
            )
                .prop_map(|(v, a, t, h, relay)| ServerMsg::Welcome {
                    protocol_version: v,
                    app_version: a,
                    udp_token: t,
                    heartbeat_timeout_ms: h,
                    relay,
                }),
            (arb_status(), proptest::option::of(any::<u32>()), ".{0,32}").prop_map(
                |(status, user_id, username)| ServerMsg::Identified {
                    status,
                    user_id,
                    username
                }
            ),
            proptest::collection::vec(
                (
                    ".{0,20}",
                    any::<bool>(),
                    any::<u32>(),
                    proptest::collection::vec(arb_member(), 0..4)
                )
                    .prop_map(|(name, has_password, max_members, members)| {
                        ChannelInfo {
                            name,
                            has_password,
                            max_members,
                            members,
                        }
                    }),
                0..4
            )
            .prop_map(|channels| ServerMsg::Overview { channels }),
            (arb_status(), ".{0,20}")
                .prop_map(|(status, channel)| ServerMsg::Joined { status, channel }),
            (".{0,20}", arb_member())
                .prop_map(|(channel, member)| ServerMsg::MemberJoined { channel, member }),
            (".{0,20}", any::<u32>())
                .prop_map(|(channel, user_id)| ServerMsg::MemberLeft { channel, user_id }),
            (
                any::<u32>(),
                ".{0,20}",
                proptest::collection::vec(arb_addr(), 0..3),
                proptest::option::of(arb_addr()),
                proptest::option::of(any::<[u8; 32]>()),
                proptest::option::of(arb_proof()),
            )
                .prop_map(
                    |(user_id, username, local, public, voice_key, voice_key_proof)| {
                        ServerMsg::PeerEndpoints {
                            peer: PeerInfo {
                                user_id,
                                username,
                                local,
                                public,
                                voice_key,
                                voice_key_proof,
                            },
                        }
                    }
                ),
            any::<u32>().prop_map(|user_id| ServerMsg::PeerGone { user_id }),
            Just(ServerMsg::HeartbeatAck),
            (arb_status(), ".{0,40}")
                .prop_map(|(status, message)| ServerMsg::Error { status, message }),
            ".{0,40}".prop_map(|reason| ServerMsg::Closing { reason }),
        ]
    }

    proptest! {
        #[test]
        fn every_client_message_round_trips(msg in arb_client_msg(), split in 0usize..64) {
            let frame = encode_frame(&msg).unwrap();
            let split = split.min(frame.len());
            let mut dec = FrameDecoder::new();
            dec.push(&frame[..split]);
            let first = dec.next::<ClientMsg>().unwrap();
            if split < frame.len() {
                prop_assert_eq!(first, None);
                dec.push(&frame[split..]);
                prop_assert_eq!(dec.next::<ClientMsg>().unwrap(), Some(msg));
            } else {
                prop_assert_eq!(first, Some(msg));
            }
        }

        #[test]
        fn every_server_message_round_trips(msg in arb_server_msg()) {
            let frame = encode_frame(&msg).unwrap();
            let mut dec = FrameDecoder::new();
            dec.push(&frame);
            prop_assert_eq!(dec.next::<ServerMsg>().unwrap(), Some(msg));
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_overgrow(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let mut dec = FrameDecoder::new();
            for chunk in chunks {
                let take = chunk.len().min(dec.wanted());
                dec.push(&chunk[..take]);
                prop_assert!(dec.buffered() <= HEADER_LEN + MAX_FRAME_LEN);
                while let Ok(Some(_)) = dec.next::<ClientMsg>() {}
                let _ = dec.next::<ServerMsg>();
            }
        }

        #[test]
        fn arbitrary_frame_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 1..2000)) {
            let mut dec = FrameDecoder::new();
            dec.push(&(body.len() as u32).to_be_bytes());
            dec.push(&body);
            let _ = dec.next::<ClientMsg>();
            let mut dec = FrameDecoder::new();
            dec.push(&(body.len() as u32).to_be_bytes());
            dec.push(&body);
            let _ = dec.next::<ServerMsg>();
        }
    }
}
