//! Arbitrary datagrams into the end-to-end voice decryption and the peer-control tag check:
//! never a panic, never plaintext out of (or a control datagram accepted from) something the
//! sender did not seal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2p_voice::voice::net::crypto::{PeerCipher, SessionKeys};

fuzz_target!(|data: &[u8]| {
    let a = SessionKeys::from_secret_bytes([1; 32]);
    let b = SessionKeys::from_secret_bytes([2; 32]);
    let mut rx = PeerCipher::new(&b, 2, 1, a.public_key()).expect("valid keys");
    let mut out = vec![0u8; 2048];
    assert!(rx.open_datagram(data, &mut out).is_err());
    assert!(rx.verify_control(data).is_err());
});
