//! A datagram as it arrives on the voice socket, parsed exactly once.
//!
//! Peer datagrams are sealed: a control datagram (Punch, PunchAck, Ping, Pong) is followed on
//! the wire by a tag, a voice datagram's payload is ciphertext and tag. [`Received::parse`]
//! reads the kind byte to know where the datagram ends, parses it, and keeps the wire bytes the
//! peer's cipher needs; once the cipher has verified or opened it, the typed
//! [`Datagram`] flows on to the peer table and the link without being parsed again.

use crate::protocol::datagram::{Datagram, DatagramError, DatagramKind, PEER_CONTROL_LEN};

/// The kinds that peers tag with their control key.
const CONTROL_KINDS: [DatagramKind; 5] = [
    DatagramKind::Punch,
    DatagramKind::PunchAck,
    DatagramKind::Ping,
    DatagramKind::Pong,
    DatagramKind::Report,
];

/// One parsed datagram, not yet authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received<'a> {
    /// A peer control datagram; `tagged` is everything that arrived (datagram and tag), what
    /// [`PeerCipher::verify_control`](super::crypto::PeerCipher::verify_control) checks.
    Control {
        datagram: Datagram<'a>,
        tagged: &'a [u8],
    },
    /// A voice datagram whose payload is still sealed; `sealed` is everything that arrived,
    /// what [`PeerCipher::open_datagram`](super::crypto::PeerCipher::open_datagram) opens.
    Voice {
        from: u32,
        seq: u32,
        timestamp: u32,
        sealed: &'a [u8],
    },
    /// Not sealed: the server's `RegisterAck`, or a kind peers never send.
    Plain(Datagram<'a>),
}

impl<'a> Received<'a> {
    /// Parses `bytes`; a datagram of a control kind is parsed without its trailing tag.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DatagramError> {
        let control = bytes
            .first()
            .is_some_and(|&b| CONTROL_KINDS.iter().any(|k| k.type_byte() == b));
        if control {
            let datagram = Datagram::parse(&bytes[..bytes.len().min(PEER_CONTROL_LEN)])?;
            return Ok(Self::Control {
                datagram,
                tagged: bytes,
            });
        }
        Ok(match Datagram::parse(bytes)? {
            Datagram::Voice {
                from,
                seq,
                timestamp,
                ..
            } => Self::Voice {
                from,
                seq,
                timestamp,
                sealed: bytes,
            },
            other => Self::Plain(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::datagram::voice_header;

    #[test]
    fn tagged_control_is_parsed_without_its_tag_and_voice_keeps_its_sealed_bytes() {
        let punch = Datagram::Punch {
            from: 1,
            to: 2,
            nonce: 7,
        };
        let mut wire = punch.to_vec().unwrap();
        wire.extend_from_slice(&[0xaa; 16]);
        assert_eq!(
            Received::parse(&wire),
            Ok(Received::Control {
                datagram: punch,
                tagged: &wire
            })
        );

        let mut voice = voice_header(3, 9, 960).to_vec();
        voice.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            Received::parse(&voice),
            Ok(Received::Voice {
                from: 3,
                seq: 9,
                timestamp: 960,
                sealed: &voice
            })
        );

        let ack = Datagram::RegisterAck {
            observed: "192.0.2.1:9".parse().unwrap(),
        };
        let bytes = ack.to_vec().unwrap();
        assert_eq!(Received::parse(&bytes), Ok(Received::Plain(ack)));
        assert!(Received::parse(&[]).is_err());
        assert!(Received::parse(&wire[..5]).is_err(), "truncated control");
    }
}
