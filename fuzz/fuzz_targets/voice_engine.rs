//! A peer that holds real keys but means harm, driving the whole receive path of a
//! `VoiceEngine`: voice datagrams that are correctly sealed (so they get past the AEAD, unlike
//! `sealed_voice`'s) with sequence numbers and timestamps that jump anywhere, payloads that are
//! malformed Opus (any TOC byte, frame counts, padding), replays of earlier datagrams, and raw
//! garbage, interleaved with time passing and the mix being played out. Never a panic, and
//! the output stays finite and within the limiter's range.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use p2p_voice::protocol::datagram::MAX_DATAGRAM_LEN;
use p2p_voice::protocol::PeerInfo;
use p2p_voice::voice::net::crypto::{PeerCipher, SessionKeys};
use p2p_voice::voice::tx::ProcessingConfig;
use p2p_voice::voice::{VoiceConfig, VoiceEngine};

const ATTACKER: u32 = 1;
const VICTIM: u32 = 2;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn engine(id: u32, secret: [u8; 32]) -> VoiceEngine {
    let mut cfg = VoiceConfig::default();
    cfg.capture.denoise = false;
    cfg.capture.processing = ProcessingConfig::NONE;
    let mut e = VoiceEngine::new(cfg, u64::from(id)).expect("engine");
    e.set_self_id(id);
    e.set_keys(SessionKeys::from_secret_bytes(secret));
    e
}

fn member(id: u32, port: u16, key: [u8; 32]) -> PeerInfo {
    PeerInfo {
        user_id: id,
        username: format!("u{id}"),
        local: vec![addr(port)],
        public: None,
        voice_key: Some(key),
        voice_key_proof: None,
    }
}

/// The fuzz input, read a field at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fuzz_target!(|data: &[u8]| {
    let attacker_secret = [1u8; 32];
    let mut a = engine(ATTACKER, attacker_secret);
    let mut b = engine(VICTIM, [2u8; 32]);
    let mut now = Duration::ZERO;
    a.upsert_peer(now, &member(VICTIM, 2000, b.public_key()));
    b.upsert_peer(now, &member(ATTACKER, 1000, a.public_key()));
    // Link up honestly first (punches both ways), so B accepts voice from A's address.
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    for _ in 0..10 {
        a.handle_timeout(now);
        while let Some(t) = a.poll_transmit(now, &mut buf) {
            b.handle_datagram(now, addr(1000), &buf[..t.len]);
        }
        b.handle_timeout(now);
        while let Some(t) = b.poll_transmit(now, &mut buf) {
            a.handle_datagram(now, addr(2000), &buf[..t.len]);
        }
        now += Duration::from_millis(20);
    }

    // The attacker's own cipher for B, from A's keys: what it seals, B opens.
    let keys = SessionKeys::from_secret_bytes(attacker_secret);
    let victim_key = b.public_key();
    let new_cipher = || PeerCipher::new(&keys, ATTACKER, VICTIM, victim_key).expect("keys");
    let mut cipher = new_cipher();
    let (mut seq, mut ts) = (1_000u32, 48_000u32);
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut mix = vec![0f32; 960];
    let mut input = Input(data);
    while !input.is_empty() {
        match input.u8() % 5 {
            // A sealed voice datagram: sequence and timestamp moved by anything.
            0 => {
                let op = input.u8();
                seq = match op % 4 {
                    0 => seq.wrapping_add(1),
                    1 => seq.wrapping_add(u32::from(input.u8())),
                    2 => seq.wrapping_sub(u32::from(input.u8())),
                    _ => input.u32(),
                };
                ts = match (op / 4) % 4 {
                    0 => ts.wrapping_add(960),
                    1 => ts.wrapping_add(u32::from(input.u8()) * 480),
                    2 => ts.wrapping_sub(u32::from(input.u8()) * 480),
                    _ => input.u32(),
                };
                let len = usize::from(input.u8()) * 2;
                let payload = input.bytes(len).to_vec();
                let mut out = vec![0u8; MAX_DATAGRAM_LEN];
                // Sealing refuses a sequence number that does not move forward: a fresh
                // cipher (same keys) seals it anyway, as an attacker with the keys could.
                let n = match cipher.seal_datagram(seq, ts, &payload, &mut out) {
                    Ok(n) => n,
                    Err(_) => {
                        cipher = new_cipher();
                        match cipher.seal_datagram(seq, ts, &payload, &mut out) {
                            Ok(n) => n,
                            Err(_) => continue,
                        }
                    }
                };
                out.truncate(n);
                b.handle_datagram(now, addr(1000), &out);
                if sent.len() < 64 {
                    sent.push(out);
                }
            }
            // A replay of something sent before, from A's address or another one.
            1 => {
                let i = usize::from(input.u8());
                let from = if input.u8() % 2 == 0 {
                    addr(1000)
                } else {
                    addr(4000)
                };
                if let Some(d) = sent.get(i % sent.len().max(1)) {
                    b.handle_datagram(now, from, d);
                }
            }
            // Raw bytes: garbage of any kind byte.
            2 => {
                let len = usize::from(input.u8()) * 4;
                let raw = input.bytes(len).to_vec();
                b.handle_datagram(now, addr(1000), &raw);
            }
            // Time passes: timers fire, the mix plays out.
            3 => {
                for _ in 0..=input.u8() % 16 {
                    now += Duration::from_millis(20);
                    b.handle_timeout(now);
                    b.playout_frame(now, &mut mix);
                    assert!(mix.iter().all(|s| s.is_finite() && s.abs() <= 1.0));
                    while b.poll_transmit(now, &mut buf).is_some() {}
                }
            }
            // The snapshot (what the UI and the headless summary read) of whatever state.
            _ => {
                let _ = b.snapshot(now);
            }
        }
    }
    now += Duration::from_millis(20);
    b.playout_frame(now, &mut mix);
    assert!(mix.iter().all(|s| s.is_finite() && s.abs() <= 1.0));
});
