//! Micro-benchmarks of the voice datagram hot path: parsing and writing a voice datagram, and
//! classifying an incoming voice datagram in a `PeerTable` with 8 connected peers.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use p2p_voice::protocol::datagram::{Datagram, MAX_DATAGRAM_LEN, VOICE_HEADER_LEN};
use p2p_voice::voice::net::link::{LinkConfig, Transmit};
use p2p_voice::voice::net::peers::{Incoming, Outgoing, PeerTable};

/// A typical 20 ms Opus frame at ~32 kbit/s.
const PAYLOAD_LEN: usize = 80;

fn parse_and_write(c: &mut Criterion) {
    let payload = [0x5au8; PAYLOAD_LEN];
    let datagram = Datagram::Voice {
        from: 7,
        seq: 1234,
        timestamp: 1234 * 960,
        payload: &payload,
    };
    let bytes = datagram.to_vec().expect("voice datagram fits");
    let mut group = c.benchmark_group("datagram");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("parse_voice", |b| {
        b.iter(|| Datagram::parse(black_box(&bytes)).expect("valid"))
    });
    let mut out = [0u8; MAX_DATAGRAM_LEN];
    group.bench_function("write_voice", |b| {
        b.iter(|| black_box(&datagram).write(&mut out).expect("fits"))
    });
    group.finish();
}

/// A table whose 8 peers are connected: each echoed the punch we sent it (consent), so the
/// path is verified.
fn connected_table() -> (PeerTable, Vec<SocketAddr>) {
    let mut table = PeerTable::new(1, LinkConfig::default(), 42);
    let mut addrs = Vec::new();
    for id in 2..10u32 {
        let addr = SocketAddr::from(([198, 51, 100, id as u8], 7000));
        table.upsert_peer(Duration::ZERO, id, format!("peer{id}"), &[addr]);
        addrs.push(addr);
    }
    table.handle_timeout(Duration::ZERO);
    let mut acks = Vec::new();
    while let Some(out) = table.poll_transmit() {
        if let Outgoing::Direct(Transmit {
            to,
            datagram:
                Datagram::Punch {
                    from,
                    to: peer,
                    nonce,
                },
        }) = out
        {
            let ack = Datagram::PunchAck {
                from: peer,
                to: from,
                nonce,
            };
            acks.push((to, ack.to_vec().expect("fits")));
        }
    }
    for (addr, ack) in acks {
        table.handle_datagram(Duration::ZERO, addr, &ack);
    }
    while table.poll_transmit().is_some() {}
    assert_eq!(table.voice_targets().count(), 8);
    (table, addrs)
}

fn handle_voice(c: &mut Criterion) {
    let (mut table, addrs) = connected_table();
    let sender = 5u32;
    let from = addrs[(sender - 2) as usize];
    let payload = [0x5au8; PAYLOAD_LEN];
    let mut bytes = Datagram::Voice {
        from: sender,
        seq: 0,
        timestamp: 0,
        payload: &payload,
    }
    .to_vec()
    .expect("fits");
    let mut seq = 0u32;
    c.bench_function("peer_table/handle_voice_8_peers", |b| {
        b.iter(|| {
            // A fresh sequence number each time, so the replay window accepts it.
            seq = seq.wrapping_add(1);
            bytes[5..9].copy_from_slice(&seq.to_be_bytes());
            let now = Duration::from_micros(u64::from(seq) * 20);
            match table.handle_datagram(now, from, black_box(&bytes)) {
                Incoming::Voice { payload, .. } => {
                    assert_eq!(payload.len(), bytes.len() - VOICE_HEADER_LEN);
                }
                other => panic!("voice datagram was not accepted: {other:?}"),
            }
        })
    });
}

criterion_group!(benches, parse_and_write, handle_voice);
criterion_main!(benches);
