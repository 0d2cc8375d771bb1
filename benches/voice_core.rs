//! Micro-benchmarks of the per-frame voice work: encode, decode, jitter buffer, mixing and the
//! capture chain. Each measures one 20 ms frame's worth of work, to compare with the 20 ms budget
//! of the voice thread.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use p2p_voice::voice::codec::{FrameDuration, DEFAULT_BITRATE_BPS, MAX_PAYLOAD};
use p2p_voice::voice::rx::jitter::{JitterBuffer, JitterConfig};
use p2p_voice::voice::rx::mixer::{MixInput, Mixer};
use p2p_voice::voice::rx::OpusDecoder;
use p2p_voice::voice::tx::capture::{CaptureChain, CaptureConfig};
use p2p_voice::voice::tx::OpusEncoder;

const N: usize = 960;

/// A speech-like frame sequence: a 150 Hz harmonic series with a slow envelope.
fn voiced(frames: usize) -> Vec<f32> {
    (0..frames * N)
        .map(|i| {
            let t = i as f32 / 48_000.0;
            let env = 0.6 + 0.4 * (2.0 * std::f32::consts::PI * 2.0 * t).sin();
            let s: f32 = (1..=8)
                .map(|h| (2.0 * std::f32::consts::PI * 150.0 * h as f32 * t).sin() / h as f32)
                .sum();
            0.2 * env * s
        })
        .collect()
}

fn encode_frame(c: &mut Criterion) {
    let input = voiced(50);
    let mut enc = OpusEncoder::new(FrameDuration::Ms20, DEFAULT_BITRATE_BPS).unwrap();
    let mut out = [0u8; MAX_PAYLOAD];
    let mut frames = input.chunks(N).cycle();
    c.bench_function("encode 20 ms frame", |b| {
        b.iter(|| {
            enc.encode(black_box(frames.next().unwrap()), &mut out)
                .unwrap()
        })
    });
}

fn decode_frame(c: &mut Criterion) {
    let input = voiced(50);
    let mut enc = OpusEncoder::new(FrameDuration::Ms20, DEFAULT_BITRATE_BPS).unwrap();
    let mut buf = [0u8; MAX_PAYLOAD];
    let packets: Vec<Vec<u8>> = input
        .chunks(N)
        .map(|pcm| {
            let len = enc.encode(pcm, &mut buf).unwrap();
            buf[..len].to_vec()
        })
        .collect();
    let mut dec = OpusDecoder::new().unwrap();
    let mut out = [0.0f32; N];
    let mut packets = packets.iter().cycle();
    c.bench_function("decode 20 ms frame", |b| {
        b.iter(|| {
            dec.decode(black_box(packets.next().unwrap()), &mut out)
                .unwrap()
        })
    });
}

fn jitter_push_pop(c: &mut Criterion) {
    let mut jb = JitterBuffer::new(JitterConfig::default());
    let payload = [0x55u8; 80];
    let mut i: u32 = 0;
    c.bench_function("jitter push + pop", |b| {
        b.iter(|| {
            let now = Duration::from_millis(u64::from(i) * 20);
            jb.push(now, i, i.wrapping_mul(N as u32), black_box(&payload));
            let played = matches!(
                jb.pop(now + Duration::from_millis(25)),
                p2p_voice::voice::rx::jitter::Playout::Packet { .. }
            );
            i = i.wrapping_add(1);
            played
        })
    });
}

fn mix_eight_peers(c: &mut Criterion) {
    let input = voiced(8);
    let peers: Vec<&[f32]> = input.chunks(N).collect();
    let mut mixer = Mixer::new(FrameDuration::Ms20);
    c.bench_function("mix 8 peers", |b| {
        b.iter(|| {
            let out = mixer.mix(peers.iter().map(|p| MixInput {
                samples: p,
                gain: 1.5,
                muted: false,
            }));
            black_box(out[0])
        })
    });
}

fn capture_with_denoise(c: &mut Criterion) {
    let input = voiced(50);
    let mut chain = CaptureChain::new(CaptureConfig::default());
    let mut frames = input.chunks(N).cycle();
    let mut frame_no = 0u64;
    c.bench_function("capture chain 20 ms, denoise on", |b| {
        b.iter(|| {
            frame_no += 1;
            let out = chain.process(
                Duration::from_millis(frame_no * 20),
                black_box(frames.next().unwrap()),
            );
            out.frame_count()
        })
    });
}

criterion_group!(
    benches,
    encode_frame,
    decode_frame,
    jitter_push_pop,
    mix_eight_peers,
    capture_with_denoise
);
criterion_main!(benches);
