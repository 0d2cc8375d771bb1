//! A hostile metadata server talking to the client's `ControlSession`: after an honest
//! welcome, identification and join, every message comes from the fuzz input, decoded
//! through the real frame decoder (so anything a server could put on the wire), mixed with
//! peer announcements the harness signs with fuzz-chosen identities and voice keys (random
//! bytes would never pass the signature check, and the identity logic behind it is where a
//! lying server aims), time passing and the user's own actions. Never a panic.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use p2p_voice::client::session::{ControlSession, TransportError};
use p2p_voice::identity::{sign_voice_key, IdentityKey, KeyBinding};
use p2p_voice::protocol::{
    FrameDecoder, MemberInfo, PeerInfo, ServerMsg, Status, PROTOCOL_VERSION,
};

const SERVER: &str = "127.0.0.1:7700";
const FINGERPRINT: &str = "AA:BB";
const NAMES: [&str; 4] = ["alice", "bob", "аlice", "fuzzer"];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn key(&mut self) -> [u8; 32] {
        let mut k = [0u8; 32];
        let b = self.bytes(32);
        k[..b.len()].copy_from_slice(b);
        k
    }
}

fn drain(s: &mut ControlSession) {
    while s.poll_action().is_some() {}
    while s.poll_event().is_some() {}
    while s.poll_tunnelled().is_some() {}
}

fuzz_target!(|data: &[u8]| {
    let mut now = Duration::ZERO;
    let mut s = ControlSession::new();
    s.set_identity(IdentityKey::from_secret_bytes([9; 32]));
    s.connect(now, SERVER, "fuzzer");
    s.transport_connected(now);
    s.set_server_binding(FINGERPRINT);
    s.handle_message(
        now,
        ServerMsg::Welcome {
            protocol_version: PROTOCOL_VERSION,
            app_version: "fuzz".into(),
            udp_token: 1,
            heartbeat_timeout_ms: 15_000,
            relay: true,
        },
    );
    s.handle_message(
        now,
        ServerMsg::Identified {
            status: Status::Ok,
            user_id: Some(1),
            username: "fuzzer".into(),
        },
    );
    s.join(now, "Lobby", None);
    s.handle_message(
        now,
        ServerMsg::Joined {
            status: Status::Ok,
            channel: "Lobby".into(),
        },
    );
    drain(&mut s);

    let identities = [
        IdentityKey::from_secret_bytes([1; 32]),
        IdentityKey::from_secret_bytes([2; 32]),
    ];
    let mut input = Input(data);
    while !input.0.is_empty() {
        match input.u8() % 6 {
            // Anything the server could frame: length-prefixed bytes from the input.
            0 => {
                let len = usize::from(input.u8()) + usize::from(input.u8()) * 256;
                let body = input.bytes(len).to_vec();
                let mut frame = (body.len() as u32).to_be_bytes().to_vec();
                frame.extend_from_slice(&body);
                let mut decoder = FrameDecoder::new();
                decoder.push(&frame);
                if let Ok(Some(msg)) = decoder.next::<ServerMsg>() {
                    s.handle_message(now, msg);
                }
            }
            // A member announced with a voice key signed by one of two identities, bound to
            // this server or not, for a name and id of the input's choosing.
            1 => {
                let user_id = u32::from(input.u8() % 8);
                let username = NAMES[usize::from(input.u8() % 4)].to_string();
                let signer = &identities[usize::from(input.u8() % 2)];
                let bound_to = if input.u8() % 4 == 0 {
                    "elsewhere"
                } else {
                    FINGERPRINT
                };
                let signed_id = if input.u8() % 4 == 0 {
                    user_id ^ 1
                } else {
                    user_id
                };
                let voice_key = input.key();
                let binding = KeyBinding {
                    server: bound_to,
                    username: &username,
                    user_id: signed_id,
                };
                let proof = sign_voice_key(signer, &binding, &voice_key);
                let peer = PeerInfo {
                    user_id,
                    username: username.clone(),
                    local: vec![([127, 0, 0, 1], 1000 + user_id as u16).into()],
                    public: None,
                    voice_key: Some(voice_key),
                    voice_key_proof: Some(proof),
                };
                s.handle_message(
                    now,
                    ServerMsg::MemberJoined {
                        channel: "Lobby".into(),
                        member: MemberInfo { user_id, username },
                    },
                );
                s.handle_message(now, ServerMsg::PeerEndpoints { peer });
            }
            // A member leaves.
            2 => {
                let user_id = u32::from(input.u8() % 8);
                s.handle_message(now, ServerMsg::PeerGone { user_id });
            }
            // The user acts: accepts or verifies an identity, leaves, joins again.
            3 => {
                let user_id = u32::from(input.u8() % 8);
                match input.u8() % 4 {
                    0 => {
                        s.accept_identity(now, user_id);
                    }
                    1 => {
                        s.set_verified(user_id, true);
                    }
                    2 => s.leave(now),
                    _ => s.join(now, "Lobby", None),
                }
            }
            // Time passes (heartbeats, retries, timeouts).
            4 => {
                now += Duration::from_millis(u64::from(input.u8()) * 100);
                s.handle_timeout(now);
            }
            // The connection drops (the session schedules its reconnect).
            _ => {
                if input.u8() % 8 == 0 {
                    s.transport_lost(now, TransportError::Lost("fuzz".into()));
                }
            }
        }
        drain(&mut s);
        let _ = s.safety_number(u32::from(input.u8() % 8));
    }
});
