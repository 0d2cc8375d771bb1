//! Micro-benchmarks of the per-frame voice work: encode, decode, jitter buffer, mixing and the
//! capture chain. Each measures one 20 ms frame's worth of work, to compare with the 20 ms budget
//! of the voice thread.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use p2p_voice::voice::codec::{is_dtx_payload, FrameDuration, DEFAULT_BITRATE_BPS, MAX_PAYLOAD};
use p2p_voice::voice::rx::decoder::DECODER_COMPLEXITY;
use p2p_voice::voice::rx::dred::Redundancy;
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

/// Real speech where the package that ships it is installed (codec2-examples; each 16 kHz
/// sample repeated three times: crude, but what matters here is that the encoder codes speech
/// the way it codes speech, in SILK or hybrid mode, which is where the decoder's enhancement
/// runs), else the synthetic vowel.
fn speech_or_voiced() -> Vec<f32> {
    let speech = hound::WavReader::open("/usr/share/codec2/raw/speech_orig_16k.wav")
        .ok()
        .map(|r| {
            r.into_samples::<i16>()
                .filter_map(Result::ok)
                .flat_map(|s| [f32::from(s) / 32768.0; 3])
                .collect::<Vec<f32>>()
        });
    speech
        .filter(|s| s.len() >= 50 * N)
        .unwrap_or_else(|| voiced(50))
}

/// Packets of `input` at `bitrate` for `loss_percent` expected loss, DTX frames left out
/// (32 kb/s and 30 % put FEC and deep redundancy both in).
fn packets(input: &[f32], bitrate: u32, loss_percent: u8) -> Vec<Vec<u8>> {
    let mut enc = OpusEncoder::new(FrameDuration::Ms20, bitrate).unwrap();
    enc.set_expected_loss_percent(loss_percent).unwrap();
    let mut buf = [0u8; MAX_PAYLOAD];
    input
        .chunks_exact(N)
        .map(|pcm| {
            let len = enc.encode(pcm, &mut buf).unwrap();
            buf[..len].to_vec()
        })
        .filter(|p| !is_dtx_payload(p.len()))
        .collect()
}

fn decode_frame(c: &mut Criterion) {
    let packets = packets(&speech_or_voiced(), DEFAULT_BITRATE_BPS, 5);
    for (name, complexity) in [
        ("decode 20 ms frame (complexity 0)", 0),
        (
            "decode 20 ms frame (NoLACE, the default)",
            DECODER_COMPLEXITY,
        ),
    ] {
        let mut dec = OpusDecoder::with_complexity(complexity).unwrap();
        let mut out = [0.0f32; N];
        let mut packets = packets.iter().cycle();
        c.bench_function(name, |b| {
            b.iter(|| {
                dec.decode(black_box(packets.next().unwrap()), &mut out)
                    .unwrap()
            })
        });
    }
}

/// What a lost frame costs: deep concealment, or parsing a later packet's deep redundancy and
/// decoding a frame from it (done once per packet after a burst, then per lost frame).
fn recover_frame(c: &mut Criterion) {
    let packets = packets(&speech_or_voiced(), 32_000, 30);
    let mut dec = OpusDecoder::new().unwrap();
    let mut out = [0.0f32; N];
    let mut i = 0usize;
    c.bench_function("conceal 20 ms frame (deep PLC)", |b| {
        b.iter(|| {
            i += 1;
            if i % 4 == 0 {
                dec.decode(&packets[i % packets.len()], &mut out).unwrap();
            }
            dec.conceal(&mut out).unwrap()
        })
    });
    let mut dred = Redundancy::new().unwrap();
    let mut ts = 0u32;
    c.bench_function(
        "rebuild a lost frame from DRED (parse + rebuild + the packet itself)",
        |b| {
            b.iter(|| {
                ts = ts.wrapping_add(N as u32);
                let p = &packets[(ts as usize / N) % packets.len()];
                dred.parse(ts, black_box(p));
                if dred.covers(2 * N, N) {
                    dec.decode_redundancy(&dred, 2 * N, &mut out).unwrap();
                }
                dec.decode(p, &mut out).unwrap()
            })
        },
    );
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
    recover_frame,
    jitter_push_pop,
    mix_eight_peers,
    capture_with_denoise
);
criterion_main!(benches);
