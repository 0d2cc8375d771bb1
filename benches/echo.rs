//! The capture chain against echo and noise, on real recorded speech, through the project's own
//! `CaptureChain` (the code the voice thread runs; no network, no devices):
//!
//! - **Single talk**: the far end talks, its voice comes back into the microphone through a
//!   simulated room (40, 80 or 150 ms of delay, a decaying reverberant impulse response, 10 dB
//!   of echo return loss, faint background noise) while the near end says nothing. ERLE (echo
//!   return loss enhancement: echo power in over power out, from the third second on) of the
//!   echo canceller alone and of the whole default chain (AEC3, RNNoise, AGC2).
//! - **Double talk**: the same, with a second person talking at the near end from the sixth
//!   second. PESQ-WB of what the chain sends, against the near talker alone; next to it the
//!   microphone as it is (echo included) and the chain with echo cancellation off.
//! - **Noise**: the near talker in white and in pink noise at 5, 10 and 15 dB SNR, through
//!   RNNoise (what the chain uses) and through WebRTC's noise suppressor (sonora, moderate and
//!   high), scored with PESQ-WB against the clean speech: the measurement behind keeping
//!   RNNoise.
//! - **Stages** (`ECHO_STAGES=1`): what each stage costs the near talker alone and in double
//!   talk, for both recordings as the near talker.
//! - **Cost**: the chain's processing time per 10 ms of audio.
//!
//! The speech comes from Debian packages (docs/BENCHMARKS.md, "Speech quality"): the far end
//! is codec2-examples' wideband recording, the near end the alsa-utils voice clips. Without them
//! the bench prints why and skips.
//!
//! `cargo bench --bench echo` runs everything (about a minute in release). Without `--bench` in
//! argv (how `cargo test --all-targets` runs benches) it runs one single-talk and one
//! double-talk case at 80 ms and checks the echo is attenuated by at least 15 dB and that a
//! PESQ score was computed.

use std::path::Path;
use std::time::{Duration, Instant};

use p2p_voice::audio::{load_wav_mono_48k, resample_buffer};
use p2p_voice::voice::tx::capture::{CaptureChain, CaptureConfig, TransmitMode};
use p2p_voice::voice::tx::ProcessingConfig;
use serde_json::json;
use sonora::config::{NoiseSuppression, NoiseSuppressionLevel};
use sonora::{AudioProcessing, Config, StreamConfig};

const RATE: usize = 48_000;
const PESQ_RATE: usize = 16_000;
const FRAME: usize = 960;
/// Speech is scaled to this peak (-6 dBFS), a usual microphone level.
const PEAK: f32 = 0.5;
/// ERLE is measured from here on: the canceller has had this long to converge.
const CONVERGED_S: f64 = 3.0;
/// The near talker starts here in double talk.
const NEAR_START_S: f64 = 6.0;

const FAR_END: &str = "/usr/share/codec2/raw/speech_orig_16k.wav";
const NEAR_END: &[&str] = &[
    "/usr/share/sounds/alsa/Front_Left.wav",
    "/usr/share/sounds/alsa/Front_Center.wav",
    "/usr/share/sounds/alsa/Front_Right.wav",
    "/usr/share/sounds/alsa/Side_Left.wav",
    "/usr/share/sounds/alsa/Side_Right.wav",
    "/usr/share/sounds/alsa/Rear_Left.wav",
    "/usr/share/sounds/alsa/Rear_Right.wav",
];

fn secs(s: f64) -> usize {
    (s * RATE as f64).round() as usize
}

fn load(paths: &[&str], package: &str) -> Result<Vec<f32>, String> {
    let mut out = Vec::new();
    for p in paths {
        let path = Path::new(p);
        if !path.exists() {
            return Err(format!("{p} is missing (Debian package {package})"));
        }
        if !out.is_empty() {
            out.extend(std::iter::repeat_n(0.0, secs(0.3)));
        }
        out.extend(load_wav_mono_48k(path).map_err(|e| format!("{p}: {e}"))?);
    }
    let peak = out.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for x in &mut out {
        *x *= PEAK / peak.max(1e-9);
    }
    Ok(out)
}

/// `x` repeated (with a short pause) until it is `len` samples long.
fn looped(x: &[f32], len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(x);
        out.extend(std::iter::repeat_n(0.0, secs(0.2)));
    }
    out.truncate(len);
    out
}

/// A deterministic noise source (xorshift), uniform in -1..1.
struct Noise(u32);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0 as f32 / u32::MAX as f32 * 2.0 - 1.0
    }
}

/// A room's impulse response: the direct echo after `delay_ms`, then reflections whose
/// envelope decays by 60 dB in 250 ms (a furnished room), overall gain set for 10 dB of echo
/// return loss.
fn room(delay_ms: usize) -> Vec<f32> {
    let delay = delay_ms * RATE / 1000;
    let tail = RATE / 4;
    let mut noise = Noise(0x5eed);
    let mut ir = vec![0.0f32; delay + tail];
    ir[delay] = 1.0;
    // One reflection every half millisecond (dense enough to sound like a room, sparse
    // enough to convolve quickly in a debug build).
    for i in (48..tail).step_by(24) {
        let t = i as f32 / RATE as f32;
        ir[delay + i] = noise.next() * 0.15 * (-6.9 * t / 0.25).exp();
    }
    let energy: f32 = ir.iter().map(|v| v * v).sum();
    let gain = (0.1f32 / energy).sqrt();
    ir.iter().map(|v| v * gain).collect()
}

/// `x` through `ir` (direct convolution over the non-zero taps).
fn convolve(x: &[f32], ir: &[f32]) -> Vec<f32> {
    let taps: Vec<(usize, f32)> = ir
        .iter()
        .enumerate()
        .filter(|(_, v)| v.abs() > 1e-5)
        .map(|(i, v)| (i, *v))
        .collect();
    (0..x.len())
        .map(|n| {
            taps.iter()
                .take_while(|(d, _)| *d <= n)
                .map(|(d, g)| x[n - d] * g)
                .sum()
        })
        .collect()
}

fn power(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len().max(1) as f64
}

fn db(ratio: f64) -> f64 {
    10.0 * ratio.max(1e-20).log10()
}

/// The chain as the voice thread runs it, sending every frame (push-to-talk held, so the
/// voice detector's decisions do not cut what is measured).
fn chain(denoise: bool, processing: ProcessingConfig) -> CaptureChain {
    let mut chain = CaptureChain::new(CaptureConfig {
        denoise,
        processing,
        mode: TransmitMode::PushToTalk,
        ..CaptureConfig::default()
    });
    chain.set_ptt_pressed(Duration::ZERO, true);
    chain
}

/// Plays `far` and captures `mic` frame by frame (render first, as the engine mixes before
/// the device thread hands over the next microphone frame). Returns what the chain sends and
/// the processing time.
fn run(chain: &mut CaptureChain, far: &[f32], mic: &[f32]) -> (Vec<f32>, Duration) {
    let mut out = Vec::with_capacity(mic.len());
    let mut busy = Duration::ZERO;
    for (i, (f, m)) in far
        .chunks_exact(FRAME)
        .zip(mic.chunks_exact(FRAME))
        .enumerate()
    {
        let start = Instant::now();
        chain.analyze_render(f);
        let now = Duration::from_millis(i as u64 * 20);
        let sent = chain.process(now, m);
        let frame: Vec<f32> = sent
            .frames()
            .last()
            .map(|f| f.samples.to_vec())
            .unwrap_or(vec![0.0; FRAME]);
        busy += start.elapsed();
        out.extend_from_slice(&frame);
    }
    (out, busy)
}

fn to_16k(x: &[f32]) -> Vec<f32> {
    resample_buffer(x, RATE as u32, PESQ_RATE as u32).expect("resample to 16 kHz")
}

fn to_i16(x: &[f32]) -> Vec<i16> {
    x.iter()
        .map(|v| (v.clamp(-1.0, 1.0) * 32_767.0).round() as i16)
        .collect()
}

/// PESQ-WB of `degraded` against `reference` (48 kHz, same timeline; the chain's own delay,
/// RNNoise's 10 ms, is found by correlation within 30 ms).
fn pesq(reference: &[f32], degraded: &[f32]) -> Result<f64, String> {
    let r = to_16k(reference);
    let d = to_16k(degraded);
    let corr = |lag: usize| -> f64 {
        r.iter()
            .zip(d.iter().skip(lag))
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum()
    };
    let lag = (0..480)
        .max_by(|&a, &b| corr(a).total_cmp(&corr(b)))
        .unwrap_or(0);
    let n = r.len().min(d.len() - lag);
    let (r, d) = (to_i16(&r[..n]), to_i16(&d[lag..lag + n]));
    std::panic::catch_unwind(|| pesq::pesq_wb(&r, &d))
        .map_err(|_| "the pesq crate panicked".to_string())?
        .map(f64::from)
        .map_err(|e| e.to_string())
}

struct Speech {
    far: Vec<f32>,
    near: Vec<f32>,
}

fn speech() -> Result<Speech, String> {
    Ok(Speech {
        far: load(&[FAR_END], "codec2-examples")?,
        near: load(NEAR_END, "alsa-utils")?,
    })
}

/// A microphone that hears the far end through `room` and faint background noise.
fn echo_path(far: &[f32], delay_ms: usize) -> Vec<f32> {
    let mut noise = Noise(99);
    convolve(far, &room(delay_ms))
        .into_iter()
        .map(|e| e + noise.next() * 0.0005)
        .collect()
}

struct SingleTalk {
    erle_aec_db: f64,
    erle_chain_db: f64,
    reported_delay_ms: Option<i32>,
    reported_erle_db: Option<f32>,
    busy_per_10ms_us: f64,
}

fn single_talk(s: &Speech, delay_ms: usize, len: usize) -> SingleTalk {
    let far = looped(&s.far, len);
    let mic = echo_path(&far, delay_ms);
    let from = secs(CONVERGED_S);
    let aec_only = ProcessingConfig {
        echo_cancel: true,
        ..ProcessingConfig::NONE
    };
    let mut aec = chain(false, aec_only);
    let (out_aec, _) = run(&mut aec, &far, &mic);
    let mut full = chain(true, ProcessingConfig::MICROPHONE);
    let (out_full, busy) = run(&mut full, &far, &mic);
    let mic_power = power(&mic[from..]);
    SingleTalk {
        erle_aec_db: db(mic_power / power(&out_aec[from..])),
        erle_chain_db: db(mic_power / power(&out_full[from..])),
        reported_delay_ms: aec.echo_stats().map(|e| e.delay_ms),
        reported_erle_db: aec.echo_stats().map(|e| e.erle_db),
        busy_per_10ms_us: busy.as_secs_f64() * 1e6 / (len as f64 / 480.0),
    }
}

struct DoubleTalk {
    pesq_mic: Result<f64, String>,
    pesq_no_aec: Result<f64, String>,
    pesq_chain: Result<f64, String>,
    pesq_chain_no_echo: Result<f64, String>,
}

fn double_talk(s: &Speech, delay_ms: usize) -> DoubleTalk {
    let start = secs(NEAR_START_S);
    let len = (start + s.near.len() + secs(0.5)).next_multiple_of(FRAME);
    let far = looped(&s.far, len);
    let mut near = vec![0.0f32; len];
    near[start..start + s.near.len()].copy_from_slice(&s.near);
    let echo = echo_path(&far, delay_ms);
    let mic: Vec<f32> = echo.iter().zip(&near).map(|(e, n)| e + n).collect();
    let window = start - secs(0.2)..len;
    let score = |out: &[f32]| pesq(&near[window.clone()], &out[window.clone()]);
    let no_aec = ProcessingConfig {
        echo_cancel: false,
        ..ProcessingConfig::MICROPHONE
    };
    let silence = vec![0.0f32; len];
    DoubleTalk {
        pesq_mic: score(&mic),
        pesq_no_aec: score(&run(&mut chain(true, no_aec), &far, &mic).0),
        pesq_chain: score(&run(&mut chain(true, ProcessingConfig::MICROPHONE), &far, &mic).0),
        pesq_chain_no_echo: score(
            &run(
                &mut chain(true, ProcessingConfig::MICROPHONE),
                &silence,
                &near,
            )
            .0,
        ),
    }
}

fn fmt(r: &Result<f64, String>) -> String {
    match r {
        Ok(v) => format!("{v:.2}"),
        Err(e) => format!("error: {e}"),
    }
}

/// `clean` with noise at `snr_db` below it (white, or pink by a one-pole low-pass).
fn noisy(clean: &[f32], snr_db: f64, pink: bool) -> Vec<f32> {
    let mut noise = Noise(7);
    let mut state = 0.0f32;
    let raw: Vec<f32> = (0..clean.len())
        .map(|_| {
            let w = noise.next();
            if pink {
                state = 0.97 * state + 0.03 * w * 6.0;
                state
            } else {
                w
            }
        })
        .collect();
    let speech_power = power(clean);
    let gain = (speech_power / power(&raw) / 10f64.powf(snr_db / 10.0)).sqrt() as f32;
    clean.iter().zip(&raw).map(|(c, n)| c + n * gain).collect()
}

fn webrtc_ns(x: &[f32], level: NoiseSuppressionLevel) -> Vec<f32> {
    let stream = StreamConfig::new(RATE as u32, 1);
    let mut apm = AudioProcessing::builder()
        .config(Config {
            noise_suppression: Some(NoiseSuppression {
                level,
                ..NoiseSuppression::default()
            }),
            ..Config::default()
        })
        .capture_config(stream)
        .render_config(stream)
        .build();
    let mut out = vec![0.0f32; x.len()];
    for (i, o) in x.chunks_exact(480).zip(out.chunks_exact_mut(480)) {
        apm.process_capture_f32(&[i], &mut [o])
            .expect("48 kHz mono");
    }
    out
}

fn rnnoise(x: &[f32]) -> Vec<f32> {
    let silence = vec![0.0f32; x.len()];
    run(&mut chain(true, ProcessingConfig::NONE), &silence, x).0
}

/// Where the double-talk score goes: the near talker through each stage on its own, with and
/// without the far end's echo (80 ms room).
fn stages(s: &Speech) {
    let start = secs(NEAR_START_S);
    let len = (start + s.near.len() + secs(0.5)).next_multiple_of(FRAME);
    let far = looped(&s.far, len);
    let mut near = vec![0.0f32; len];
    near[start..start + s.near.len()].copy_from_slice(&s.near);
    let echo = echo_path(&far, 80);
    let mic: Vec<f32> = echo.iter().zip(&near).map(|(e, n)| e + n).collect();
    let silence = vec![0.0f32; len];
    let window = start - secs(0.2)..len;
    let score = |out: &[f32]| fmt(&pesq(&near[window.clone()], &out[window.clone()]));
    let none = ProcessingConfig::NONE;
    let cases: [(&str, bool, ProcessingConfig); 7] = [
        ("nothing", false, none),
        (
            "high-pass",
            false,
            ProcessingConfig {
                high_pass: true,
                ..none
            },
        ),
        (
            "AEC3",
            false,
            ProcessingConfig {
                echo_cancel: true,
                ..none
            },
        ),
        ("RNNoise", true, none),
        (
            "AGC2",
            false,
            ProcessingConfig {
                gain_control: true,
                ..none
            },
        ),
        (
            "default (AEC3, RNNoise, AGC2)",
            true,
            ProcessingConfig::MICROPHONE,
        ),
        ("default and high-pass", true, ProcessingConfig::ALL),
    ];
    println!("| stages | near talker alone | double talk (80 ms room) |");
    println!("|---|---|---|");
    for (label, denoise, processing) in cases {
        let alone = run(&mut chain(denoise, processing), &silence, &near).0;
        let double = run(&mut chain(denoise, processing), &far, &mic).0;
        let level = db(power(&double[window.clone()]) / power(&near[window.clone()]));
        println!(
            "| {label} | {} | {} | {level:+.1} dB |",
            score(&alone),
            score(&double)
        );
    }
}

fn smoke() {
    let s = match speech() {
        Ok(s) => s,
        Err(why) => {
            println!("echo smoke: skipped: {why}");
            return;
        }
    };
    let st = single_talk(&s, 80, secs(8.0));
    println!(
        "echo smoke: single talk 80 ms: ERLE {:.1} dB (AEC3 alone) / {:.1} dB (default chain), AEC3's own figures: delay {:?} ms, ERLE {:?} dB",
        st.erle_aec_db, st.erle_chain_db, st.reported_delay_ms, st.reported_erle_db
    );
    assert!(
        st.erle_aec_db >= 15.0,
        "the echo canceller took out only {:.1} dB of echo",
        st.erle_aec_db
    );
    let dt = double_talk(&s, 80);
    let score = dt
        .pesq_chain
        .unwrap_or_else(|e| panic!("no PESQ-WB score in double talk: {e}"));
    assert!((-0.5..=4.7).contains(&score), "PESQ-WB {score}");
    println!("echo smoke: ok (double talk PESQ-WB {score:.2})");
}

fn full() {
    let s = match speech() {
        Ok(s) => s,
        Err(why) => {
            println!("echo: skipped: {why}");
            return;
        }
    };
    if std::env::var_os("ECHO_STAGES").is_some() {
        stages(&s);
        // And with the two talkers swapped (the male wideband recording at the near end).
        let swapped = Speech {
            far: s.near.clone(),
            near: s.far.clone(),
        };
        stages(&swapped);
        return;
    }
    println!("| delay | ERLE AEC3 alone | ERLE default chain | delay found | double talk: mic as is | chain without AEC | default chain | default chain, no echo |");
    println!("|---|---|---|---|---|---|---|---|");
    for delay in [40, 80, 150] {
        let st = single_talk(&s, delay, secs(20.0));
        let dt = double_talk(&s, delay);
        println!(
            "| {delay} ms | {:.1} dB | {:.1} dB | {} ms | {} | {} | {} | {} |",
            st.erle_aec_db,
            st.erle_chain_db,
            st.reported_delay_ms.map_or("-".into(), |d| d.to_string()),
            fmt(&dt.pesq_mic),
            fmt(&dt.pesq_no_aec),
            fmt(&dt.pesq_chain),
            fmt(&dt.pesq_chain_no_echo),
        );
        println!(
            "{}",
            json!({
                "bench": "echo", "case": "room", "delay_ms": delay,
                "erle_aec_db": st.erle_aec_db, "erle_chain_db": st.erle_chain_db,
                "delay_found_ms": st.reported_delay_ms,
                "chain_us_per_10ms": st.busy_per_10ms_us,
                "pesq_double_talk_mic": dt.pesq_mic.as_ref().ok(),
                "pesq_double_talk_no_aec": dt.pesq_no_aec.as_ref().ok(),
                "pesq_double_talk_chain": dt.pesq_chain.as_ref().ok(),
                "pesq_chain_no_echo": dt.pesq_chain_no_echo.as_ref().ok(),
            })
        );
        if delay == 80 {
            println!(
                "default chain cost: {:.0} us per 10 ms of audio (this build)",
                st.busy_per_10ms_us
            );
        }
    }

    println!();
    println!("| noise | SNR | noisy | RNNoise | WebRTC NS moderate | WebRTC NS high |");
    println!("|---|---|---|---|---|---|");
    let clean = {
        let mut c = vec![0.0f32; secs(0.5)];
        c.extend_from_slice(&s.near);
        c.extend(std::iter::repeat_n(0.0, secs(0.5)));
        c
    };
    for pink in [false, true] {
        for snr in [5.0, 10.0, 15.0] {
            let x = noisy(&clean, snr, pink);
            let scores = [
                pesq(&clean, &x),
                pesq(&clean, &rnnoise(&x)),
                pesq(&clean, &webrtc_ns(&x, NoiseSuppressionLevel::Moderate)),
                pesq(&clean, &webrtc_ns(&x, NoiseSuppressionLevel::High)),
            ];
            let kind = if pink { "pink" } else { "white" };
            println!(
                "| {kind} | {snr:.0} dB | {} | {} | {} | {} |",
                fmt(&scores[0]),
                fmt(&scores[1]),
                fmt(&scores[2]),
                fmt(&scores[3])
            );
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--bench") {
        full();
    } else {
        smoke();
    }
}
