//! Arbitrary UDP payloads into the datagram parser and a peer table: never a panic, and any
//! datagram that parses writes back to the same bytes.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use p2p_voice::protocol::datagram::Datagram;
use p2p_voice::voice::net::link::LinkConfig;
use p2p_voice::voice::net::peers::PeerTable;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Datagram::parse(data) {
        let bytes = d.to_vec().expect("a parsed datagram writes");
        assert_eq!(bytes, data);
    }
    let from: SocketAddr = ([127, 0, 0, 1], 4000).into();
    let mut table = PeerTable::new(1, LinkConfig::default(), 7);
    table.upsert_peer(Duration::ZERO, 2, "peer", &[from]);
    let _ = table.handle_datagram(Duration::from_millis(5), from, data);
    table.handle_timeout(Duration::from_millis(10));
    while table.poll_transmit().is_some() {}
});
