//! Speech quality as heard, through the real binary: a `p2p-voice server` process and two
//! headless `p2p-voice client` processes on loopback. The talker reads real recorded human
//! speech from a WAV file (`--input-wav`, the default capture chain: voice activity detection
//! decides what is sent); the listener writes what it hears to a WAV file and impairs what it
//! receives (`--impair loss=...`, also Gilbert–Elliott bursts). Each utterance is found in the
//! listener's output by cross-correlation, cut out, resampled to 16 kHz and scored with PESQ-WB
//! (ITU-T P.862.2, MOS-LQO, the pure-Rust `pesq` crate).
//!
//! The "PulseAudio devices" condition runs the same speech through PulseAudio virtual devices
//! at both ends instead (a null sink's monitor as the microphone, with a device's default
//! capture chain; a null sink as the speaker), recorded so that mouth to ear includes both
//! device paths and their queues (see `PulseRig`). It needs `pulseaudio`, `pactl`, `pacat`
//! and `parecord` (Debian: pulseaudio, pulseaudio-utils).
//!
//! Also reported per call: the wire bit rate while transmitting (IPv4 + UDP headers included,
//! from the talker's summary), the mouth-to-ear latency of each utterance (cross-correlation lag
//! lined up with both clients' `audio_started` wall clocks), the listener's jitter-buffer
//! figures, and "Opus alone": the same speech through the project's encoder and decoder at the
//! same bit rate with no network, the ceiling the call could reach.
//!
//! The speech comes from Debian packages (see docs/BENCHMARKS.md, "Speech quality (PESQ-WB)"):
//! `codec2-examples` and `alsa-utils`, which `make bench` / `make test` install. This bench
//! installs nothing; without the files it prints why and skips.
//!
//! `cargo bench --bench voice_quality` runs every condition twice (about fifteen minutes;
//! `VOICE_QUALITY_RUNS=N` changes the count, `VOICE_QUALITY_ONLY=TEXT` runs only the conditions
//! whose label contains TEXT, `VOICE_QUALITY_KEEP=1` keeps the WAVs; in the "microphone
//! chain" case `VOICE_QUALITY_MIC_CHAIN="--gain-control off"` and the like switch the
//! talker's stages, to find what each costs). Without
//! `--bench` in argv (how `cargo test --all-targets` runs benches) it runs one short call at 0 %
//! loss and checks only that a score was computed and that speech came out.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use p2p_voice::audio::{load_wav_mono_48k, resample_buffer};
use p2p_voice::voice::codec::{FrameDuration, MAX_PAYLOAD};
use p2p_voice::voice::rx::OpusDecoder;
use p2p_voice::voice::tx::OpusEncoder;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_p2p-voice");
const RATE: usize = 48_000;
/// PESQ-WB works at 16 kHz only.
const PESQ_RATE: usize = 16_000;
/// IPv4 (20) + UDP (8) header bytes per datagram.
const IPV4_UDP_OVERHEAD: f64 = 28.0;
/// The clients' default Opus bit rate (`--bitrate`), also used for "Opus alone".
const BITRATE_BPS: u32 = 24_000;
/// Pause put between the clips of one utterance.
const CLIP_PAUSE_S: f64 = 0.3;
/// Every utterance is scaled to this peak (-6 dBFS), a usual microphone level.
const PEAK: f32 = 0.5;
/// Silence before the first utterance of a call: the clients find each other meanwhile.
const LEAD_S: f64 = 2.5;
/// Silence between utterances of a call, and after the last one.
const GAP_S: f64 = 1.5;
/// Silence kept around an utterance when it is scored (PESQ wants a little on both sides).
const MARGIN_S: f64 = 0.2;
/// How far from its expected place (0.1 s after it was spoken) an utterance is looked for.
const SEARCH_S: f64 = 1.0;

// ---------------------------------------------------------------------------------------------
// Speech
// ---------------------------------------------------------------------------------------------

/// One utterance of 8-12 s made of recorded clips shipped by a Debian package.
struct Source {
    name: &'static str,
    package: &'static str,
    clips: &'static [&'static str],
}

const SOURCES: [Source; 3] = [
    Source {
        name: "codec2 wideband",
        package: "codec2-examples",
        clips: &["/usr/share/codec2/raw/speech_orig_16k.wav"],
    },
    Source {
        name: "alsa-utils voice",
        package: "alsa-utils",
        clips: &[
            "/usr/share/sounds/alsa/Front_Left.wav",
            "/usr/share/sounds/alsa/Front_Center.wav",
            "/usr/share/sounds/alsa/Front_Right.wav",
            "/usr/share/sounds/alsa/Side_Left.wav",
            "/usr/share/sounds/alsa/Side_Right.wav",
            "/usr/share/sounds/alsa/Rear_Left.wav",
            "/usr/share/sounds/alsa/Rear_Right.wav",
        ],
    },
    Source {
        name: "codec2 narrowband",
        package: "codec2-examples",
        clips: &[
            "/usr/share/codec2/wav/hts1a.wav",
            "/usr/share/codec2/wav/hts2a.wav",
            "/usr/share/codec2/wav/forig.wav",
            "/usr/share/codec2/wav/big_dog.wav",
        ],
    },
];

struct Utterance {
    name: &'static str,
    /// 48 kHz mono.
    samples: Vec<f32>,
}

/// The clips of `source` joined with short pauses and scaled to [`PEAK`], or why not.
fn load_utterance(source: &Source) -> Result<Utterance, String> {
    let mut samples = Vec::new();
    for (i, clip) in source.clips.iter().enumerate() {
        let path = Path::new(clip);
        if !path.exists() {
            return Err(format!(
                "{} is missing (install the Debian package {}; `make bench` does)",
                path.display(),
                source.package
            ));
        }
        let clip = load_wav_mono_48k(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if i > 0 {
            samples.extend(std::iter::repeat_n(0.0, secs(CLIP_PAUSE_S)));
        }
        samples.extend(clip);
    }
    let peak = samples.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    if peak <= 0.0 {
        return Err(format!("{} is silent", source.name));
    }
    for x in &mut samples {
        *x *= PEAK / peak;
    }
    Ok(Utterance {
        name: source.name,
        samples,
    })
}

fn secs(s: f64) -> usize {
    (s * RATE as f64).round() as usize
}

/// A call's input: lead silence, then each utterance followed by a gap. Returns the samples and
/// where each utterance starts.
fn script(utterances: &[Utterance]) -> (Vec<f32>, Vec<usize>) {
    let mut out = vec![0.0f32; secs(LEAD_S)];
    let mut starts = Vec::new();
    for u in utterances {
        starts.push(out.len());
        out.extend_from_slice(&u.samples);
        out.extend(std::iter::repeat_n(0.0, secs(GAP_S)));
    }
    (out, starts)
}

// ---------------------------------------------------------------------------------------------
// Processes and files (the same guards as benches/voice_e2e.rs)
// ---------------------------------------------------------------------------------------------

/// A scratch directory for WAV files and logs; removed on drop unless VOICE_QUALITY_KEEP is set.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("p2p-voice-quality-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("VOICE_QUALITY_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("voice_quality: kept {}", self.dir.display());
        }
    }
}

fn unix_us_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A child whose stdout JSON lines are collected by a reader thread (each stamped with
/// `_read_unix_us`) and whose stderr goes to a log file. Killed on drop unless it has exited.
struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<JoinHandle<()>>,
    stderr: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    fn spawn(name: &str, args: &[String], scratch: &Scratch) -> Self {
        let stderr = scratch.path(&format!("{name}.stderr.log"));
        let err_file = std::fs::File::create(&stderr).expect("create stderr log");
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN} for {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut v) = serde_json::from_str::<Value>(&line) {
                    if v.is_object() {
                        v["_read_unix_us"] = json!(unix_us_now());
                    }
                    sink.lock().expect("lines lock").push(v);
                }
            }
        });
        Self {
            name: name.to_string(),
            child,
            lines,
            reader: Some(reader),
            stderr,
            exited: None,
        }
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lines lock").clone()
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let start = text.len().saturating_sub(2_000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.lines.lock().expect("lines lock")) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                if pred(&self.lines.lock().expect("lines lock")) {
                    return;
                }
                panic!(
                    "{} exited ({status}) before {what}; stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {timeout:?}; stderr:\n{}",
                self.name,
                self.stderr_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a successful exit and for stdout to be read to the end.
    fn finish(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.exited = Some(status);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        assert!(
            status.success(),
            "{} exited with {status}; stderr:\n{}",
            self.name,
            self.stderr_tail()
        );
    }

    fn audio_started_us(&self) -> f64 {
        self.lines()
            .iter()
            .find(|v| v["event"] == "audio_started")
            .and_then(|v| v["unix_us"].as_u64())
            .unwrap_or_else(|| panic!("{} printed no audio_started", self.name)) as f64
    }

    fn summary(&self) -> Value {
        self.lines()
            .into_iter()
            .find(|v| v["event"] == "summary")
            .unwrap_or_else(|| {
                panic!(
                    "{} printed no summary; stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                )
            })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `p2p-voice server` on an ephemeral loopback port; killed on drop.
fn start_server(scratch: &Scratch) -> (Proc, SocketAddr) {
    let args = ["server", "--bind", "127.0.0.1", "--port", "0", "--json"].map(String::from);
    let mut proc = Proc::spawn("server", &args, scratch);
    proc.wait_for("listening line", Duration::from_secs(20), |l| {
        l.iter().any(|v| v["addr"].is_string())
    });
    let addr = proc
        .lines()
        .iter()
        .find_map(|v| v["addr"].as_str().and_then(|a| a.parse().ok()))
        .expect("server address");
    (proc, addr)
}

fn client_args(server: SocketAddr, name: &str, duration_s: f64, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "client",
        "--headless",
        "--server",
        &server.to_string(),
        "--username",
        name,
        "--channel",
        "Lobby",
        "--duration",
        &format!("{duration_s:.2}"),
    ]
    .map(String::from)
    .to_vec();
    args.extend_from_slice(extra);
    args
}

fn write_wav(path: &Path, samples: &[f32]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE as u32,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).expect("create input wav");
    for &s in samples {
        w.write_sample(to_i16(s)).expect("write input wav");
    }
    w.finalize().expect("finalize input wav");
}

fn to_i16(x: f32) -> i16 {
    (x.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16
}

// ---------------------------------------------------------------------------------------------
// Scoring
// ---------------------------------------------------------------------------------------------

/// 48 kHz -> 16 kHz with the crate's own resampler (rubato, band-limited, delay compensated).
/// Reference and degraded signal go through the same filter, so it cancels out of the score.
fn to_16k(samples: &[f32]) -> Vec<f32> {
    resample_buffer(samples, RATE as u32, PESQ_RATE as u32).expect("resample to 16 kHz")
}

/// Mean absolute value per 1 ms block, with the mean removed (for a coarse alignment).
fn envelope(x: &[f32]) -> Vec<f32> {
    let block = PESQ_RATE / 1000;
    let env: Vec<f32> = x
        .chunks(block)
        .map(|c| c.iter().map(|v| v.abs()).sum::<f32>() / c.len() as f32)
        .collect();
    let mean = env.iter().sum::<f32>() / env.len().max(1) as f32;
    env.into_iter().map(|e| e - mean).collect()
}

/// Normalised cross-correlation of `a` against `b` starting at `b[at..]` (zeros past the end).
fn ncc(a: &[f32], b: &[f32], at: isize) -> f32 {
    let (mut ab, mut bb) = (0.0f64, 0.0f64);
    for (i, &x) in a.iter().enumerate() {
        let j = at + i as isize;
        let y = if j >= 0 && (j as usize) < b.len() {
            b[j as usize]
        } else {
            0.0
        };
        ab += f64::from(x) * f64::from(y);
        bb += f64::from(y) * f64::from(y);
    }
    let aa: f64 = a.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    if aa <= 0.0 || bb <= 0.0 {
        0.0
    } else {
        (ab / (aa * bb).sqrt()) as f32
    }
}

/// Where `reference` (16 kHz) starts in `heard` (16 kHz), searching `expected ± search`
/// samples: first on 1 ms envelopes, then sample by sample around the best envelope lag.
/// Returns the position and its normalised correlation.
fn locate(reference: &[f32], heard: &[f32], expected: isize, search: isize) -> (isize, f32) {
    let block = (PESQ_RATE / 1000) as isize;
    let (er, eh) = (envelope(reference), envelope(heard));
    let coarse = ((expected - search) / block..=(expected + search) / block)
        .map(|l| (l, ncc(&er, &eh, l)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(expected, |(l, _)| l * block);
    (coarse - 2 * block..=coarse + 2 * block)
        .map(|l| (l, ncc(reference, heard, l)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((coarse, 0.0))
}

/// `x[from..from + len]`, zero-padded where it runs past either end.
fn cut(x: &[f32], from: isize, len: usize) -> Vec<f32> {
    (0..len as isize)
        .map(|i| {
            let j = from + i;
            if j >= 0 && (j as usize) < x.len() {
                x[j as usize]
            } else {
                0.0
            }
        })
        .collect()
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt()
}

/// One utterance found in what was heard.
struct Scored {
    pesq: Result<f32, String>,
    /// Where the utterance came out minus where it went in, ms of the clients' audio clocks
    /// (add the difference of their `audio_started` wall clocks for mouth-to-ear).
    lag_ms: f64,
    correlation: f32,
    /// RMS of the cut degraded segment over that of the reference.
    level_ratio: f32,
}

/// Below this correlation with the input, an utterance is taken not to have come out at all.
const MIN_FOUND_CORRELATION: f32 = 0.3;

/// Scores the utterance at `start..start + len` of `input16` against `heard16`, where it is
/// expected to begin at `expected` (all 16 kHz samples).
fn score(input16: &[f32], start: usize, len: usize, heard16: &[f32], expected: isize) -> Scored {
    let margin = (MARGIN_S * PESQ_RATE as f64) as usize;
    let reference = cut(input16, start as isize - margin as isize, len + 2 * margin);
    let speech = &input16[start..(start + len).min(input16.len())];
    let search = (SEARCH_S * PESQ_RATE as f64) as isize;
    let (at, correlation) = locate(speech, heard16, expected, search);
    let degraded = cut(heard16, at - margin as isize, len + 2 * margin);
    let as_i16 = |x: &[f32]| x.iter().map(|&v| to_i16(v)).collect::<Vec<i16>>();
    let level_ratio = rms(&degraded) / rms(&reference).max(1e-9);
    let (reference16, degraded16) = (as_i16(&reference), as_i16(&degraded));
    // pesq 0.2.0 overflows an index on some inputs (seen once in a 20 % loss call, debug
    // build): score that utterance as an error instead of losing the whole run.
    let pesq = std::panic::catch_unwind(|| pesq::pesq_wb(&reference16, &degraded16))
        .map_err(|_| "the pesq crate panicked on this pair".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        // pesq scores silence against speech 4.6: speech that did not come out is a failure,
        // not a score (a call that broke off looked perfect before this check).
        .and_then(|p| {
            if correlation < MIN_FOUND_CORRELATION || level_ratio < 0.1 {
                Err(format!(
                    "the speech is not in the output (correlation {correlation:.2}, level {level_ratio:.2})"
                ))
            } else {
                Ok(p)
            }
        });
    Scored {
        pesq,
        lag_ms: (at - start as isize) as f64 * 1000.0 / PESQ_RATE as f64,
        correlation,
        level_ratio,
    }
}

/// The speech through the project's Opus encoder and decoder, no network: 24 kb/s, in-band
/// FEC and DTX as the client sets them, DTX frames decoded as the receiver would.
fn opus_alone(samples: &[f32], frame: FrameDuration) -> Vec<f32> {
    let mut enc = OpusEncoder::new(frame, BITRATE_BPS).expect("encoder");
    let mut dec = OpusDecoder::new().expect("decoder");
    let n = frame.samples();
    let mut payload = vec![0u8; MAX_PAYLOAD];
    let mut pcm = vec![0.0f32; n];
    let mut out = Vec::with_capacity(samples.len() + n);
    // Opus delays by 6.5 ms: push one extra frame of silence so the tail comes out.
    let padded: Vec<f32> = samples
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0.0, 2 * n - samples.len() % n))
        .collect();
    for chunk in padded.chunks_exact(n) {
        let len = enc.encode(chunk, &mut payload).expect("encode");
        let got = if len == 0 {
            dec.conceal(&mut pcm).expect("conceal")
        } else {
            dec.decode(&payload[..len], &mut pcm).expect("decode")
        };
        out.extend_from_slice(&pcm[..got]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Case {
    label: &'static str,
    frame_ms: u32,
    always_transmit: bool,
    /// `--impair` of the listener.
    impair: Option<&'static str>,
    /// Loss share asked of the impairment, for the table.
    loss_pct: u32,
    bursty: bool,
    /// The talker runs the capture chain a microphone gets by default (echo cancellation,
    /// noise suppression, gain control; the high-pass filter off) on the WAV, instead of the
    /// file default (all off).
    mic_chain: bool,
    /// The PESQ-WB goal for this condition.
    goal: Option<f64>,
    /// Through PulseAudio virtual devices at both ends instead of WAV files (see
    /// `PulseRig`): the talker gets a device's default capture chain.
    devices: bool,
}

struct CallResult {
    scores: Vec<Scored>,
    /// Mouth-to-ear latency of each utterance, ms.
    latency_ms: Vec<f64>,
    /// Talker's voice datagrams with IPv4 + UDP headers, kb/s while it transmitted.
    wire_kbps: f64,
    /// Share of the call's frames the talker sent (VAD gates the rest).
    sent_share: f64,
    /// The larger audio clock slip of the two clients, ms (see [`clock_slip_ms`]).
    slip_ms: f64,
    ear: Value,
}

/// How far a client's virtual audio clock fell behind the wall clock over its run, in ms: the
/// time from `audio_started` to reading its summary, minus the audio its output WAV holds. A
/// few ms is normal (shutdown); more means its device pacer skipped chunks because the process
/// was starved of CPU, and sample positions then no longer map to wall-clock times.
fn clock_slip_ms(summary: &Value, audio_started_us: f64, wav_samples: usize) -> f64 {
    (f(&summary["_read_unix_us"]) - audio_started_us) / 1000.0
        - wav_samples as f64 * 1000.0 / RATE as f64
}

/// Slip above which a call's figures are marked invalid.
const MAX_CLOCK_SLIP_MS: f64 = 30.0;

include!("voice_quality/devices.rs");

fn run_call(scratch: &Scratch, case: &Case, utterances: &[Utterance]) -> CallResult {
    if case.devices {
        return run_device_call(scratch, case, utterances);
    }
    let (_server, addr) = start_server(scratch);
    let (input, starts) = script(utterances);
    let tag = case.label.replace([' ', '%', ','], "_");
    let in_path = scratch.path(&format!("{tag}-in.wav"));
    let out_path = scratch.path(&format!("{tag}-out.wav"));
    write_wav(&in_path, &input);
    let input_s = input.len() as f64 / RATE as f64;
    let frame = case.frame_ms.to_string();

    // The listener starts first and stops first, so its summary still lists the talker.
    let mut ear_extra = vec![
        "--input-silence".to_string(),
        "--frame-ms".into(),
        frame.clone(),
        "--output-wav".into(),
        out_path.display().to_string(),
    ];
    if let Some(spec) = case.impair {
        ear_extra.extend(["--impair".to_string(), spec.to_string()]);
    }
    let ear_s = input_s + 0.5;
    let mut ear = Proc::spawn("ear", &client_args(addr, "ear", ear_s, &ear_extra), scratch);
    // The talker's own output only measures its audio clock slip: it hears nothing.
    let mouth_out = scratch.path(&format!("{tag}-mouth-out.wav"));
    let mut mouth_extra = vec![
        "--input-wav".to_string(),
        in_path.display().to_string(),
        "--output-wav".into(),
        mouth_out.display().to_string(),
        "--frame-ms".into(),
        frame,
    ];
    if case.always_transmit {
        mouth_extra.push("--always-transmit".into());
    }
    if case.mic_chain {
        // To find what a stage costs: e.g. VOICE_QUALITY_MIC_CHAIN="--gain-control off".
        let overrides = std::env::var("VOICE_QUALITY_MIC_CHAIN").unwrap_or_default();
        let overrides: Vec<&str> = overrides.split_whitespace().collect();
        for stage in [
            "--high-pass",
            "--echo-cancellation",
            "--noise-suppression",
            "--gain-control",
        ] {
            let value = overrides
                .iter()
                .position(|f| *f == stage)
                .and_then(|i| overrides.get(i + 1))
                // The high-pass filter is off by default (ProcessingConfig::MICROPHONE).
                .unwrap_or(if stage == "--high-pass" {
                    &"off"
                } else {
                    &"on"
                });
            mouth_extra.extend([stage.to_string(), value.to_string()]);
        }
    }
    let mouth_s = input_s + 1.5;
    let mut mouth = Proc::spawn(
        "mouth",
        &client_args(addr, "mouth", mouth_s, &mouth_extra),
        scratch,
    );
    ear.finish(Duration::from_secs_f64(ear_s + 30.0));
    mouth.finish(Duration::from_secs_f64(mouth_s + 30.0));

    let a_start = mouth.audio_started_us();
    let b_start = ear.audio_started_us();
    let offset_ms = (b_start - a_start) / 1000.0;
    let heard = load_wav_mono_48k(&out_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", out_path.display()));
    let (input16, heard16) = (to_16k(&input), to_16k(&heard));
    let to16 = |s: usize| s * PESQ_RATE / RATE;
    let mut scores = Vec::new();
    let mut latency_ms = Vec::new();
    for (u, &start) in utterances.iter().zip(&starts) {
        // In the ear's samples: spoken at `start` of the mouth's clock, heard ~0.1 s later.
        let expected_ms = start as f64 * 1000.0 / RATE as f64 - offset_ms + 100.0;
        let expected = (expected_ms * PESQ_RATE as f64 / 1000.0) as isize;
        let s = score(
            &input16,
            to16(start),
            to16(u.samples.len()),
            &heard16,
            expected,
        );
        latency_ms.push(s.lag_ms + offset_ms);
        scores.push(s);
    }

    let mouth_summary = mouth.summary();
    let ear_summary = ear.summary();
    let mouth_len = load_wav_mono_48k(&mouth_out).map_or(0, |w| w.len());
    let slip_ms = clock_slip_ms(&ear_summary, b_start, heard.len()).max(clock_slip_ms(
        &mouth_summary,
        a_start,
        mouth_len,
    ));
    let (wire_kbps, frames_sent) = wire_kbps(&mouth_summary, case.frame_ms);
    let frame_s = f64::from(case.frame_ms) / 1000.0;
    let sent_share = frames_sent * frame_s / mouth_s;
    CallResult {
        scores,
        latency_ms,
        wire_kbps,
        sent_share,
        slip_ms,
        ear: ear_summary["peers"][0].clone(),
    }
}

/// The talker's voice datagrams with IPv4 + UDP headers, in kb/s while it transmitted, and
/// the frames it sent (from its summary).
fn wire_kbps(talker: &Value, frame_ms: u32) -> (f64, f64) {
    let frames_sent = f(&talker["frames_sent"]);
    let bytes_sent = f(&talker["bytes_sent"]);
    let frame_s = f64::from(frame_ms) / 1000.0;
    let kbps = (bytes_sent + frames_sent * IPV4_UDP_OVERHEAD) * 8.0
        / (frames_sent * frame_s).max(1e-9)
        / 1000.0;
    (kbps, frames_sent)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Mean, min and max of the scores that were computed.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let ok: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if ok.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = ok.iter().sum::<f64>() / ok.len() as f64;
    let min = ok.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ok.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, min, max)
}

fn pesq_values(scores: &[Scored]) -> Vec<f64> {
    scores
        .iter()
        .map(|s| s.pesq.as_ref().map_or(f64::NAN, |&p| f64::from(p)))
        .collect()
}

/// Prints one JSON result line with the 1-minute load average (the machine is shared).
fn emit(mut record: Value) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok());
    record["loadavg_1m"] = json!(load);
    println!("{record}");
}

const HEADER: &str = "| case | PESQ-WB mean (min-max) | goal | Opus alone | wire kb/s while sending | sent | mouth-to-ear ms | concealed | dropped | stretched | fec | rebuilt | loss% seen | target ms | jitter ms |\n\
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";

fn report(case: &Case, run: usize, utterances: &[Utterance], r: &CallResult, table: &mut String) {
    let frame = if case.frame_ms == 10 {
        FrameDuration::Ms10
    } else {
        FrameDuration::Ms20
    };
    // "Opus alone" for the same utterances and frame length.
    let alone: Vec<f64> = utterances
        .iter()
        .map(|u| {
            let decoded = opus_alone(&u.samples, frame);
            let (x, y) = (to_16k(&u.samples), to_16k(&decoded));
            let s = score(&x, 0, x.len(), &y, 0);
            s.pesq.map_or(f64::NAN, f64::from)
        })
        .collect();
    let values = pesq_values(&r.scores);
    let (mean, min, max) = spread(&values);
    let (alone_mean, _, _) = spread(&alone);
    let p = &r.ear;
    let per_utterance: Vec<Value> = utterances
        .iter()
        .zip(&r.scores)
        .zip(&r.latency_ms)
        .zip(&alone)
        .map(|(((u, s), lat), a)| {
            json!({
                "speech": u.name, "pesq_wb": s.pesq.as_ref().ok(), "error": s.pesq.as_ref().err(),
                "opus_alone": a, "mouth_to_ear_ms": lat, "correlation": s.correlation,
                "level_ratio": s.level_ratio,
            })
        })
        .collect();
    emit(json!({
        "bench": "voice_quality", "case": case.label, "run": run, "frame_ms": case.frame_ms,
        "always_transmit": case.always_transmit, "impair": case.impair,
        "mic_chain": case.mic_chain,
        "pesq_wb_mean": mean, "pesq_wb_min": min, "pesq_wb_max": max, "goal": case.goal,
        "opus_alone_mean": alone_mean, "wire_kbps_while_sending": r.wire_kbps,
        "sent_share": r.sent_share, "mouth_to_ear_ms_median": median(&r.latency_ms),
        "clock_slip_ms": r.slip_ms,
        "utterances": per_utterance,
        "ear": {
            "frames_decoded": p["frames_decoded"], "frames_concealed": p["frames_concealed"],
            "frames_dropped": p["frames_dropped"], "frames_stretched": p["frames_stretched"],
            "frames_fec": p["frames_fec"], "frames_rebuilt": p["frames_rebuilt"],
            "late": p["late"], "loss_pct": p["loss_pct"],
            "target_ms": p["target_ms"], "buffer_ms": p["buffer_ms"], "jitter_ms": p["jitter_ms"],
        },
    }));
    let latency = if r.slip_ms > MAX_CLOCK_SLIP_MS {
        format!(
            "{:.0} (INVALID: clock slip {:.0} ms)",
            median(&r.latency_ms),
            r.slip_ms
        )
    } else {
        format!("{:.0}", median(&r.latency_ms))
    };
    let goal = match case.goal {
        // Chunks the starved pacer skipped are missing from the output: the score is void too.
        _ if r.slip_ms > MAX_CLOCK_SLIP_MS => "INVALID (CPU starved)".into(),
        Some(g) if mean >= g => format!(">= {g:.1}: meets"),
        Some(g) => format!(">= {g:.1}: MISSES"),
        None => "-".into(),
    };
    let _ = writeln!(
        table,
        "| {} #{run} | {:.2} ({:.2}-{:.2}) | {} | {:.2} | {:.1} | {:.0}% | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.1} |",
        case.label,
        mean,
        min,
        max,
        goal,
        alone_mean,
        r.wire_kbps,
        r.sent_share * 100.0,
        latency,
        p["frames_concealed"],
        p["frames_dropped"],
        p["frames_stretched"],
        p["frames_fec"],
        p["frames_rebuilt"],
        f(&p["loss_pct"]),
        f(&p["target_ms"]),
        f(&p["jitter_ms"]),
    );
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// The utterances whose files are present; prints why any are not.
fn available_speech() -> Vec<Utterance> {
    SOURCES
        .iter()
        .filter_map(|s| match load_utterance(s) {
            Ok(u) => Some(u),
            Err(why) => {
                println!("voice_quality: skipping '{}': {why}", s.name);
                None
            }
        })
        .collect()
}

/// `cargo test --all-targets`: one call of a few seconds at 0 % loss. Checks that a score was
/// computed and that speech came out; no quality threshold, no wall-clock figure.
fn smoke() {
    let Some(mut u) = available_speech().into_iter().next() else {
        println!("voice_quality smoke: skipped, no recorded speech installed");
        return;
    };
    u.samples.truncate(secs(5.0));
    let case = Case {
        label: "smoke 20ms VAD 0%",
        frame_ms: 20,
        always_transmit: false,
        impair: None,
        loss_pct: 0,
        bursty: false,
        mic_chain: false,
        goal: None,
        devices: false,
    };
    let scratch = Scratch::new();
    let utterances = [u];
    let r = run_call(&scratch, &case, &utterances);
    let mut table = String::from(HEADER);
    report(&case, 1, &utterances, &r, &mut table);
    println!("{table}");
    let s = &r.scores[0];
    let score = s
        .pesq
        .as_ref()
        .unwrap_or_else(|e| panic!("no PESQ-WB score: {e}; ear summary {}", r.ear));
    assert!(
        (-0.5..=4.7).contains(score),
        "PESQ-WB {score} is outside the scale"
    );
    assert!(
        f(&r.ear["frames_decoded"]) > 0.0,
        "the listener decoded nothing: {}",
        r.ear
    );
    assert!(
        s.level_ratio > 0.1 && s.correlation > 0.15,
        "the listener did not hear the speech (level ratio {:.3}, correlation {:.2})",
        s.level_ratio,
        s.correlation
    );
    println!("voice_quality smoke: ok (PESQ-WB {score:.2})");
}

fn full() {
    let utterances = available_speech();
    if utterances.is_empty() {
        println!("voice_quality: skipped, no recorded speech installed");
        return;
    }
    let vad = |label, frame_ms, impair, loss_pct, bursty, goal| Case {
        label,
        frame_ms,
        always_transmit: false,
        impair,
        loss_pct,
        bursty,
        mic_chain: false,
        goal,
        devices: false,
    };
    let cases = [
        vad("20 ms, VAD, 0 %", 20, None, 0, false, Some(4.2)),
        vad(
            "20 ms, VAD, 5 % random",
            20,
            Some("loss=0.05,seed=5"),
            5,
            false,
            Some(4.0),
        ),
        vad(
            "20 ms, VAD, 10 % random",
            20,
            Some("loss=0.1,seed=10"),
            10,
            false,
            Some(3.7),
        ),
        vad(
            "20 ms, VAD, 20 % random",
            20,
            Some("loss=0.2,seed=20"),
            20,
            false,
            Some(3.2),
        ),
        vad(
            "20 ms, VAD, 10 % bursty (mean 3)",
            20,
            Some("loss=0.1,burst=3,seed=13"),
            10,
            true,
            Some(3.5),
        ),
        Case {
            mic_chain: true,
            ..vad(
                "20 ms, VAD, 0 %, microphone chain",
                20,
                None,
                0,
                false,
                None,
            )
        },
        Case {
            devices: true,
            ..vad(
                "20 ms, VAD, 0 %, PulseAudio devices",
                20,
                None,
                0,
                false,
                None,
            )
        },
        Case {
            always_transmit: true,
            ..vad("20 ms, always-transmit, 0 %", 20, None, 0, false, None)
        },
        Case {
            always_transmit: true,
            ..vad(
                "20 ms, always-transmit, 10 % random",
                20,
                Some("loss=0.1,seed=10"),
                10,
                false,
                None,
            )
        },
        vad("10 ms, VAD, 0 %", 10, None, 0, false, None),
        vad(
            "10 ms, VAD, 10 % random",
            10,
            Some("loss=0.1,seed=10"),
            10,
            false,
            None,
        ),
    ];
    // The same call can score quite differently from run to run (the jitter buffer's drops and
    // concealment depend on scheduling), so each condition runs VOICE_QUALITY_RUNS times.
    let runs: usize = std::env::var("VOICE_QUALITY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    // VOICE_QUALITY_ONLY=text runs only the conditions whose label contains it.
    let only = std::env::var("VOICE_QUALITY_ONLY").unwrap_or_default();
    let scratch = Scratch::new();
    let mut table = String::from(HEADER);
    for run in 1..=runs {
        for case in cases.iter().filter(|c| c.label.contains(only.as_str())) {
            eprintln!(
                "voice_quality: run {run}/{runs}, call '{}' (loss {} %{})",
                case.label,
                case.loss_pct,
                if case.bursty { ", bursty" } else { "" }
            );
            let r = run_call(&scratch, case, &utterances);
            report(case, run, &utterances, &r, &mut table);
        }
    }
    println!(
        "\n## Speech quality (PESQ-WB), {} utterances: {}\n{table}",
        utterances.len(),
        utterances
            .iter()
            .map(|u| format!("{} ({:.1} s)", u.name, u.samples.len() as f64 / RATE as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn main() {
    if std::env::args().any(|a| a == "--bench") {
        full();
    } else {
        smoke();
    }
}
