//! Control messages exchanged over the TCP connection between a client and the metadata server.
//!
//! The server only introduces clients: who is here, which channels exist, who is in them, and
//! where each member can be reached over UDP. Voice never travels on this connection.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::password::Password;
use super::status::Status;

/// Server-assigned identifier of a connected user; also the sender id in voice datagrams.
pub type UserId = u32;

/// Client to server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Must be the first message on a connection.
    Hello {
        protocol_version: u32,
        app_version: String,
    },
    /// Claim a username (unique on the server).
    Identify { username: String },
    /// Enter a channel; leaves the current one first. The password only matters for protected channels.
    Join {
        channel: String,
        password: Option<Password>,
    },
    /// Leave the current channel but stay connected.
    Leave,
    /// Keeps the session alive; the server drops sessions silent for longer than its timeout.
    Heartbeat,
    /// The client's own local UDP addresses (LAN candidates for hole punching) and its voice
    /// public key (X25519, new every session): peers derive end-to-end voice keys from it, so
    /// the server relays the key but cannot decrypt voice.
    ///
    /// `voice_key_proof` signs the voice key with the client's long-term identity key (see
    /// `identity`), so peers can tell the key is the member's and not one the server put in.
    AnnounceEndpoints {
        local: Vec<SocketAddr>,
        voice_key: Option<[u8; 32]>,
        voice_key_proof: Option<VoiceKeyProof>,
    },
    /// Orderly goodbye; the server closes the connection.
    Disconnect,
    /// A datagram for the server's UDP port (a `RelayTo` envelope around a sealed peer
    /// datagram), carried here because this network lets no UDP through to the server. The
    /// server handles it as if it came from this session's UDP address, with the same relay
    /// rules and budget; at most [`MAX_DATAGRAM_LEN`](super::datagram::MAX_DATAGRAM_LEN)
    /// bytes. Not counted against the control message rate (voice is ~50 a second): the relay
    /// budget bounds it.
    Tunnel { datagram: Vec<u8> },
}

/// One member of a channel as shown in the overview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub user_id: UserId,
    pub username: String,
}

/// One channel as shown in the overview. Never carries the password or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub name: String,
    pub has_password: bool,
    pub max_members: u32,
    pub members: Vec<MemberInfo>,
}

/// How to reach a channel member over UDP: LAN addresses first, then the public address the
/// server observed (if any yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub user_id: UserId,
    pub username: String,
    pub local: Vec<SocketAddr>,
    pub public: Option<SocketAddr>,
    /// The member's voice public key, once announced.
    pub voice_key: Option<[u8; 32]>,
    /// The member's identity key and its signature over `voice_key`, as the member announced
    /// them (the server passes them on unchanged and cannot forge them).
    pub voice_key_proof: Option<VoiceKeyProof>,
}

/// A member's long-term Ed25519 identity key and its signature over the member's voice key
/// for this server, name and user id (the binding is spelled out in `identity::KeyBinding`).
/// Plain bytes here: the protocol carries them, `identity` checks them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceKeyProof {
    pub identity_key: [u8; 32],
    /// The 64-byte Ed25519 signature as its two halves (serde has no 64-byte arrays).
    pub signature: [[u8; 32]; 2],
}

impl VoiceKeyProof {
    /// The signature as one 64-byte array.
    pub fn signature_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.signature[0]);
        out[32..].copy_from_slice(&self.signature[1]);
        out
    }
}

impl PeerInfo {
    /// Candidate addresses in the order they should be tried.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let mut out = self.local.clone();
        if let Some(p) = self.public {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to a compatible `Hello`. `udp_token` is what the client sends in its UDP
    /// `Register` datagram so the server can learn its public address.
    Welcome {
        protocol_version: u32,
        app_version: String,
        udp_token: u64,
        heartbeat_timeout_ms: u32,
        /// Whether this server forwards sealed peer datagrams for members that cannot reach
        /// each other (host mode, or `server --relay`). A client says so when a peer is
        /// unreachable and the server does not relay.
        relay: bool,
    },
    /// Result of `Identify`.
    Identified {
        status: Status,
        user_id: Option<UserId>,
        username: String,
    },
    /// The whole picture, sent after identification.
    Overview { channels: Vec<ChannelInfo> },
    /// Result of `Join`.
    Joined { status: Status, channel: String },
    /// Result of `Leave`.
    Left {
        status: Status,
        channel: Option<String>,
    },
    /// Someone entered a channel (sent to every identified session).
    MemberJoined { channel: String, member: MemberInfo },
    /// Someone left a channel or the server (sent to every identified session).
    MemberLeft { channel: String, user_id: UserId },
    /// Voice endpoints of a member of our channel (on join, and whenever they change).
    PeerEndpoints { peer: PeerInfo },
    /// A member of our channel is gone from it: stop sending to it.
    PeerGone { user_id: UserId },
    /// Answer to `Heartbeat`.
    HeartbeatAck,
    /// A request failed; `message` is for people.
    Error { status: Status, message: String },
    /// The server is closing this connection, with the reason.
    Closing { reason: String },
    /// More members of a channel for the overview just sent: a big server's overview does not
    /// fit one frame, so members follow in parts of at most [`OVERVIEW_PART_MEMBERS`].
    OverviewMembers {
        channel: String,
        members: Vec<MemberInfo>,
    },
    /// A datagram the server would have sent to this client's UDP address (a `RelayFrom`
    /// envelope), for a client that tunnels because its network blocks UDP.
    Tunnel { datagram: Vec<u8> },
}

/// Members per `OverviewMembers` part: even with 32-character names of 4-byte characters a part
/// stays well inside the 64 KiB frame limit.
pub const OVERVIEW_PART_MEMBERS: usize = 400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_candidates_put_local_first_and_skip_duplicates() {
        let a: SocketAddr = "192.168.1.2:5000".parse().unwrap();
        let b: SocketAddr = "203.0.113.9:6000".parse().unwrap();
        let p = PeerInfo {
            user_id: 1,
            username: "a".into(),
            local: vec![a],
            public: Some(b),
            voice_key: None,
            voice_key_proof: None,
        };
        assert_eq!(p.candidates(), vec![a, b]);
        let same = PeerInfo {
            public: Some(a),
            ..p
        };
        assert_eq!(same.candidates(), vec![a]);
    }
}
