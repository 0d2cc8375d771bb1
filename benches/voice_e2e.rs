//! End-to-end voice benchmarks through the real binary: a `p2p-voice server` process and
//! headless `p2p-voice client` processes on loopback, with real UDP, Opus, jitter buffers and
//! paced virtual audio devices (WAV files and tones instead of a microphone and a speaker).
//!
//! What it measures (see docs/BENCHMARKS.md, section "Voice plane"):
//! 1. mouth-to-ear latency of the software path, from clicks in client A's input WAV to their
//!    onsets in client B's output WAV, lined up with both clients' `audio_started` wall clocks;
//! 2. bytes per second of one voice stream on the wire, from A's summary;
//! 3. CPU of one client hearing 8 talkers, from /proc (process and per thread);
//! 4. the jitter buffer under a lossy, jittery link (B's summary and the longest silent gap).
//!
//! `cargo bench --bench voice_e2e` runs everything (about four minutes). Without `--bench` in
//! argv (how `cargo test --all-targets` runs benches) only a short latency smoke test runs.
//! Every child process is owned by a guard that kills it on drop, also when a check panics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_p2p-voice");
const RATE: u32 = 48_000;
const RATE_F: f64 = RATE as f64;
/// IPv4 (20) + UDP (8) header bytes per datagram.
const IPV4_UDP_OVERHEAD: u64 = 28;
/// An output sample counts as part of a burst above this absolute value.
const ONSET_THRESHOLD: f32 = 0.1;
/// A burst onset in the output must follow at least this much sub-threshold audio.
const ONSET_QUIET_MS: usize = 100;
/// 1 ms windows with an RMS below this count as silence when looking for gaps.
const GAP_RMS: f32 = 0.01;

// ---------------------------------------------------------------------------------------------
// Processes and files
// ---------------------------------------------------------------------------------------------

/// A scratch directory for WAV files, channel lists and logs; removed on drop.
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
            std::env::temp_dir().join(format!("p2p-voice-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("VOICE_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A JSON line printed by a child, with the instant the bench read it (also stored in the
/// value as `_read_unix_us`, wall clock).
type Line = (Instant, Value);

fn unix_us_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// How far a client's virtual audio clock fell behind the wall clock over its run, in ms:
/// the time from `audio_started` to reading its summary, minus the audio its output WAV holds.
/// A few ms is normal (shutdown); more means its device pacer skipped chunks because the
/// process was starved of CPU, and then sample positions no longer map to wall-clock times.
fn clock_slip_ms(summary: &Value, audio_started_us: f64, wav_samples: usize) -> f64 {
    let end_us = f(&summary["_read_unix_us"]);
    (end_us - audio_started_us) / 1000.0 - wav_samples as f64 * 1000.0 / RATE_F
}

/// Slip above which a latency run is reported as invalid.
const MAX_CLOCK_SLIP_MS: f64 = 30.0;

/// A child process whose stdout JSON lines are collected by a reader thread and whose stderr
/// goes to a log file. Killed on drop unless it has already exited.
struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
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
                    sink.lock().expect("lines lock").push((Instant::now(), v));
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn lines(&self) -> Vec<Line> {
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

    /// Waits until `pred` holds for the lines printed so far; panics after `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[Line]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.lines.lock().expect("lines lock")) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader catch the last lines before judging.
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
            if Instant::now() >= deadline {
                panic!(
                    "{}: no {what} within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit on its own and for its stdout to be read to the end.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
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
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The reader thread ends by itself when the pipe closes; it is not joined here so a
        // panic path never waits on it.
    }
}

/// `p2p-voice server` on an ephemeral loopback port.
struct Server {
    /// Kept for its drop guard.
    _proc: Proc,
    addr: SocketAddr,
}

impl Server {
    fn start(scratch: &Scratch, channels: Option<&str>) -> Self {
        let mut args: Vec<String> = ["server", "--bind", "127.0.0.1", "--port", "0", "--json"]
            .map(String::from)
            .to_vec();
        if let Some(text) = channels {
            let path = scratch.path("channels.toml");
            std::fs::write(&path, text).expect("write channels file");
            args.push("--channels".into());
            args.push(path.display().to_string());
        }
        let mut proc = Proc::spawn("server", &args, scratch);
        proc.wait_for("listening line", Duration::from_secs(20), |l| {
            l.iter().any(|(_, v)| v["addr"].is_string())
        });
        let addr = proc
            .lines()
            .iter()
            .find_map(|(_, v)| v["addr"].as_str().and_then(|a| a.parse().ok()))
            .expect("server address");
        Self { _proc: proc, addr }
    }
}

/// Options of one headless client.
struct ClientSpec<'a> {
    name: &'a str,
    channel: &'a str,
    /// `--input-wav F`, `--input-tone HZ` or `--input-silence`, plus any extra flags.
    args: Vec<String>,
    output_wav: Option<PathBuf>,
    duration_s: f64,
}

fn spawn_client(scratch: &Scratch, server: SocketAddr, spec: ClientSpec<'_>) -> Proc {
    let mut args: Vec<String> = vec![
        "client".into(),
        "--headless".into(),
        "--server".into(),
        server.to_string(),
        "--username".into(),
        spec.name.into(),
        "--channel".into(),
        spec.channel.into(),
        "--duration".into(),
        spec.duration_s.to_string(),
        "--noise-suppression".into(),
        "off".into(),
    ];
    if let Some(out) = &spec.output_wav {
        args.push("--output-wav".into());
        args.push(out.display().to_string());
    }
    args.extend(spec.args);
    Proc::spawn(spec.name, &args, scratch)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The client's `audio_started` wall clock, in microseconds since the Unix epoch.
fn audio_started_us(lines: &[Line]) -> Option<u64> {
    lines
        .iter()
        .find(|(_, v)| v["event"] == "audio_started")
        .and_then(|(_, v)| v["unix_us"].as_u64())
}

fn summary(p: &Proc) -> Value {
    p.lines()
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| {
            panic!(
                "{} printed no summary; stderr:\n{}",
                p.name,
                p.stderr_tail()
            )
        })
}

/// When the client first learned a peer's endpoints (voice can flow shortly after).
fn first_peer_at(p: &Proc) -> Option<Instant> {
    p.lines()
        .iter()
        .find(|(_, v)| v["event"] == "peer_endpoints")
        .map(|(t, _)| *t)
}

fn finish(p: &mut Proc, duration_s: f64) {
    let status = p.wait_exit(Duration::from_secs_f64(duration_s + 30.0));
    assert!(
        status.success(),
        "{} exited with {status}; stderr:\n{}",
        p.name,
        p.stderr_tail()
    );
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

/// Tone bursts on silence: the "mouth" signal of the latency runs.
#[derive(Debug, Clone, Copy)]
struct Bursts {
    first_s: f64,
    /// Not a multiple of the frame length, so onsets fall at every position within a frame
    /// (an onset at a frame start waits a whole frame before it can be encoded).
    period_ms: f64,
    burst_ms: u32,
    count: usize,
    hz: f32,
    amplitude: f32,
    /// Level of a quiet speech-like bed under the bursts (0 = digital silence). With a bed the
    /// encoder never switches to DTX, so the stream is continuous; on digital silence Opus DTX
    /// stops sending between bursts and every burst becomes a talkspurt.
    bed: f32,
}

impl Bursts {
    fn starts(&self) -> Vec<usize> {
        (0..self.count)
            .map(|i| ((self.first_s + self.period_ms * i as f64 / 1000.0) * RATE_F) as usize)
            .collect()
    }

    fn render(&self) -> Vec<f32> {
        let len = self.starts().last().copied().unwrap_or(0) + RATE as usize;
        let mut out = if self.bed > 0.0 {
            let bed = voiced(len as f64 / RATE_F);
            bed.iter().map(|x| x * self.bed).collect()
        } else {
            vec![0.0f32; len]
        };
        let n = (self.burst_ms * RATE / 1000) as usize;
        for s in self.starts() {
            for (k, o) in out[s..s + n].iter_mut().enumerate() {
                let t = k as f32 / RATE as f32;
                *o += self.amplitude * (std::f32::consts::TAU * self.hz * t).sin();
            }
        }
        out
    }

    /// Seconds of input, plus time for the last burst to come out.
    fn span_s(&self) -> f64 {
        self.first_s + self.period_ms * self.count as f64 / 1000.0
    }
}

/// A speech-like signal: a 150 Hz harmonic series under a slow 2 Hz envelope that never falls
/// silent (so a gap in the output is a gap of the path, not of the input).
fn voiced(seconds: f64) -> Vec<f32> {
    let n = (seconds * RATE_F) as usize;
    (0..n)
        .map(|i| {
            let t = i as f32 / RATE as f32;
            let env = 0.6 + 0.4 * (std::f32::consts::TAU * 2.0 * t).sin();
            let s: f32 = (1..=8)
                .map(|h| (std::f32::consts::TAU * 150.0 * h as f32 * t).sin() / h as f32)
                .sum();
            0.2 * env * s
        })
        .collect()
}

fn write_wav(path: &Path, samples: &[f32]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).expect("create input wav");
    for &s in samples {
        w.write_sample((s.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16)
            .expect("write input wav");
    }
    w.finalize().expect("finalize input wav");
}

fn read_wav(path: &Path) -> Vec<f32> {
    p2p_voice::audio::load_wav_mono_48k(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Sample indices where a burst starts: above the threshold after `ONSET_QUIET_MS` below it.
fn onsets(samples: &[f32]) -> Vec<usize> {
    let quiet_needed = ONSET_QUIET_MS * RATE as usize / 1000;
    let mut quiet = quiet_needed;
    let mut out = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        if s.abs() > ONSET_THRESHOLD {
            if quiet >= quiet_needed {
                out.push(i);
            }
            quiet = 0;
        } else {
            quiet += 1;
        }
    }
    out
}

/// Longest run of 1 ms windows whose RMS is under `GAP_RMS`, in ms, and the number of runs
/// longer than 20 ms.
fn silent_gaps(samples: &[f32]) -> (usize, usize) {
    let (mut longest, mut run, mut over_20) = (0, 0, 0);
    for c in samples.chunks(RATE as usize / 1000) {
        let rms = (c.iter().map(|x| x * x).sum::<f32>() / c.len() as f32).sqrt();
        if rms < GAP_RMS {
            run += 1;
            longest = longest.max(run);
            if run == 21 {
                over_20 += 1;
            }
        } else {
            run = 0;
        }
    }
    (longest, over_20)
}

// ---------------------------------------------------------------------------------------------
// Statistics and reporting
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Stats {
    median: f64,
    p95: f64,
    min: f64,
    max: f64,
}

fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let rank = |q: f64| v[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        p95: rank(0.95),
        min: v[0],
        max: v[n - 1],
    })
}

/// Prints one JSON result line, with the machine's 1-minute load average at that moment (the
/// machine is shared, and load shows up as scheduling jitter in these figures).
fn emit(mut record: Value) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok());
    record["loadavg_1m"] = json!(load);
    println!("{record}");
}

fn peer0(summary: &Value) -> Value {
    summary["peers"][0].clone()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------
// 1. Mouth-to-ear latency
// ---------------------------------------------------------------------------------------------

struct LatencyCase {
    label: &'static str,
    frame_ms: u32,
    always_transmit: bool,
    impair: Option<&'static str>,
    bursts: Bursts,
    /// Longest latency accepted when pairing a burst with an output onset.
    window_ms: f64,
    goal_ms: Option<f64>,
}

struct LatencyResult {
    latencies_ms: Vec<f64>,
    /// Where in its capture frame each found burst began, ms (same order as `latencies_ms`).
    phases_ms: Vec<f64>,
    sent: usize,
    /// Frames the mouth sent per second of its run (50 or 100 when the stream is continuous).
    mouth_frames_per_s: f64,
    /// Clock slip of the mouth and the ear, ms (see [`clock_slip_ms`]).
    slip_ms: (f64, f64),
    a_summary: Value,
    b_summary: Value,
}

fn run_latency(scratch: &Scratch, case: &LatencyCase) -> LatencyResult {
    let server = Server::start(scratch, None);
    let input = case.bursts.render();
    let in_path = scratch.path(&format!("{}-in.wav", case.label));
    let out_path = scratch.path(&format!("{}-out.wav", case.label));
    let mouth_out = scratch.path(&format!("{}-mouth-out.wav", case.label));
    write_wav(&in_path, &input);
    // B starts first and stops first, so its summary still lists A as a peer.
    let duration = case.bursts.span_s() + 0.6;
    let frame = case.frame_ms.to_string();

    let mut b_args = strings(&["--input-silence", "--frame-ms", &frame]);
    if let Some(spec) = case.impair {
        b_args.extend(strings(&["--impair", spec]));
    }
    let mut b = spawn_client(
        scratch,
        server.addr,
        ClientSpec {
            name: "ear",
            channel: "Lobby",
            args: b_args,
            output_wav: Some(out_path.clone()),
            duration_s: duration,
        },
    );
    let mut a_args = vec![
        "--input-wav".to_string(),
        in_path.display().to_string(),
        "--frame-ms".into(),
        frame.clone(),
    ];
    if case.always_transmit {
        a_args.push("--always-transmit".into());
    }
    let mut a = spawn_client(
        scratch,
        server.addr,
        ClientSpec {
            name: "mouth",
            channel: "Lobby",
            args: a_args,
            // Only to measure the mouth's clock slip: it hears nothing.
            output_wav: Some(mouth_out.clone()),
            duration_s: duration + 1.0,
        },
    );
    finish(&mut b, duration);
    finish(&mut a, duration + 1.0);

    let a_start = audio_started_us(&a.lines()).expect("mouth printed audio_started") as f64;
    let b_start = audio_started_us(&b.lines()).expect("ear printed audio_started") as f64;
    let heard = read_wav(&out_path);
    // Wall-clock seconds (relative to A's audio start) of each burst in and each onset out.
    let sent: Vec<f64> = onsets(&input).iter().map(|&s| s as f64 / RATE_F).collect();
    let offset = (b_start - a_start) / 1e6;
    let arrived: Vec<f64> = onsets(&heard)
        .iter()
        .map(|&s| offset + s as f64 / RATE_F)
        .collect();
    let mut latencies_ms = Vec::new();
    let mut phases_ms = Vec::new();
    let frame_s = f64::from(case.frame_ms) / 1000.0;
    for &t in &sent {
        // A small negative allowance so a clock misalignment shows up instead of hiding.
        if let Some(&u) = arrived
            .iter()
            .find(|&&u| (t - 0.02..=t + case.window_ms / 1000.0).contains(&u))
        {
            latencies_ms.push((u - t) * 1000.0);
            phases_ms.push((t % frame_s) * 1000.0);
        }
    }
    let a_summary = summary(&a);
    let b_summary = summary(&b);
    let slip_ms = (
        clock_slip_ms(&a_summary, a_start, read_wav(&mouth_out).len()),
        clock_slip_ms(&b_summary, b_start, heard.len()),
    );
    LatencyResult {
        slip_ms,
        latencies_ms,
        phases_ms,
        sent: sent.len(),
        mouth_frames_per_s: f(&a_summary["frames_sent"]) / (duration + 1.0),
        a_summary,
        b_summary,
    }
}

fn report_latency(case: &LatencyCase, r: &LatencyResult, table: &mut String) -> Option<Stats> {
    let s = stats(&r.latencies_ms);
    let bp = peer0(&r.b_summary);
    let slipped = r.slip_ms.0 > MAX_CLOCK_SLIP_MS || r.slip_ms.1 > MAX_CLOCK_SLIP_MS;
    let verdict = match (s, case.goal_ms) {
        _ if slipped => "INVALID: audio clock slipped (CPU starved)",
        (Some(s), Some(goal)) if s.median <= goal && s.p95 <= goal => "meets goal",
        (Some(_), Some(_)) => "MISSES goal",
        (None, _) => "NO BURSTS FOUND",
        (Some(_), None) => "-",
    };
    emit(json!({
        "bench": "voice_e2e", "case": case.label, "metric": "mouth_to_ear_ms",
        "frame_ms": case.frame_ms, "always_transmit": case.always_transmit, "impair": case.impair,
        "bursts_sent": r.sent, "bursts_found": r.latencies_ms.len(),
        "median": s.map(|s| s.median), "p95": s.map(|s| s.p95),
        "min": s.map(|s| s.min), "max": s.map(|s| s.max), "goal_ms": case.goal_ms,
        "all_ms": r.latencies_ms.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "onset_phase_in_frame_ms": r.phases_ms.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "ear_target_ms": bp["target_ms"], "ear_buffer_ms": bp["buffer_ms"],
        "ear_jitter_ms": bp["jitter_ms"], "ear_late": bp["late"],
        "mouth_frames_sent_per_s": r.mouth_frames_per_s,
        "clock_slip_ms": {"mouth": r.slip_ms.0, "ear": r.slip_ms.1},
    }));
    let cell = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
    let _ = writeln!(
        table,
        "| {:<30} | {:>5} | {:>6} | {:>6} | {:>6} | {:>6} | {:>6.0} | {:>6.0} | {:>5.0} | {:>4.0} | {} |",
        case.label,
        format!("{}/{}", r.latencies_ms.len(), r.sent),
        cell(s.map(|s| s.median)),
        cell(s.map(|s| s.p95)),
        cell(s.map(|s| s.min)),
        cell(s.map(|s| s.max)),
        f(&bp["target_ms"]),
        f(&bp["buffer_ms"]),
        r.mouth_frames_per_s,
        r.slip_ms.0.max(r.slip_ms.1),
        match case.goal_ms {
            Some(g) => format!("<= {g:.0} ms: {verdict}"),
            None => verdict.to_string(),
        }
    );
    s
}

// ---------------------------------------------------------------------------------------------
// 2. Bytes per second per stream
// ---------------------------------------------------------------------------------------------

fn run_bitrate(scratch: &Scratch, frame_ms: u32, table: &mut String) {
    let server = Server::start(scratch, None);
    let in_path = scratch.path("voiced.wav");
    if !in_path.exists() {
        write_wav(&in_path, &voiced(5.0));
    }
    let duration = 10.0;
    let frame = frame_ms.to_string();
    let mut b = spawn_client(
        scratch,
        server.addr,
        ClientSpec {
            name: "ear",
            channel: "Lobby",
            args: strings(&["--input-silence", "--frame-ms", &frame]),
            output_wav: None,
            duration_s: duration + 0.5,
        },
    );
    let mut a = spawn_client(
        scratch,
        server.addr,
        ClientSpec {
            name: "mouth",
            channel: "Lobby",
            args: vec![
                "--input-wav".into(),
                in_path.display().to_string(),
                "--loop-input".into(),
                "--always-transmit".into(),
                "--frame-ms".into(),
                frame,
            ],
            output_wav: None,
            duration_s: duration,
        },
    );
    a.wait_for("peer_endpoints", Duration::from_secs(20), |l| {
        l.iter().any(|(_, v)| v["event"] == "peer_endpoints")
    });
    finish(&mut a, duration);
    let ended = Instant::now();
    finish(&mut b, duration + 0.5);
    let since = first_peer_at(&a).expect("peer_endpoints seen");
    // The summary is printed a moment before exit; the exit is seen within ~20 ms.
    let secs = ended.duration_since(since).as_secs_f64();
    let p = peer0(&summary(&a));
    let bytes = p["bytes_out"].as_u64().unwrap_or(0);
    let packets = p["packets_out"].as_u64().unwrap_or(0);
    assert!(packets > 0, "mouth sent nothing: {p}");
    let pps = packets as f64 / secs;
    let payload_bps = bytes as f64 / secs;
    let wire_bps = (bytes + packets * IPV4_UDP_OVERHEAD) as f64 / secs;
    let per_packet = bytes as f64 / packets as f64;
    emit(json!({
        "bench": "voice_e2e", "case": format!("bitrate_{frame_ms}ms"), "metric": "stream_bytes_per_s",
        "frame_ms": frame_ms, "bitrate_setting_bps": 24_000, "seconds": secs,
        "bytes_out": bytes, "packets_out": packets, "packets_per_s": pps,
        "udp_payload_bytes_per_s": payload_bps, "with_ipv4_udp_bytes_per_s": wire_bps,
        "bytes_per_packet": per_packet,
    }));
    let _ = writeln!(
        table,
        "| {:>2} ms | {:>6.1} | {:>7.1} | {:>8.0} ({:>5.1} kb/s) | {:>8.0} ({:>5.1} kb/s) |",
        frame_ms,
        pps,
        per_packet,
        payload_bps,
        payload_bps * 8.0 / 1000.0,
        wire_bps,
        wire_bps * 8.0 / 1000.0
    );
}

// ---------------------------------------------------------------------------------------------
// 3. CPU of one client hearing 8 talkers
// ---------------------------------------------------------------------------------------------

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a configuration value; no pointers are involved.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (comm, utime + stime in clock ticks) from a /proc/.../stat file.
fn read_stat(path: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// Ticks of the whole process and of each of its threads (tid -> (name, ticks)).
fn sample_cpu(pid: u32) -> (u64, BTreeMap<u32, (String, u64)>) {
    let (_, total) = read_stat(Path::new(&format!("/proc/{pid}/stat")))
        .unwrap_or_else(|| panic!("process {pid} is gone"));
    let mut threads = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(s) = read_stat(&e.path().join("stat")) {
                threads.insert(tid, s);
            }
        }
    }
    (total, threads)
}

/// Busy and total jiffies of the whole machine, from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn run_cpu(scratch: &Scratch, table: &mut String) {
    const TALKERS: usize = 8;
    const WINDOW: Duration = Duration::from_secs(10);
    let server = Server::start(
        scratch,
        Some("[[channel]]\nname = \"Bench\"\nmax_members = 12\n"),
    );
    let duration = 30.0;
    let out_path = scratch.path("cpu-ear.wav");
    let mut ear = spawn_client(
        scratch,
        server.addr,
        ClientSpec {
            name: "ear",
            channel: "Bench",
            args: strings(&["--input-silence"]),
            output_wav: Some(out_path.clone()),
            duration_s: duration,
        },
    );
    let tones: Vec<f32> = (0..TALKERS).map(|i| 300.0 + 130.0 * i as f32).collect();
    let mut talkers: Vec<Proc> = tones
        .iter()
        .enumerate()
        .map(|(i, hz)| {
            spawn_client(
                scratch,
                server.addr,
                ClientSpec {
                    name: &format!("talker{i}"),
                    channel: "Bench",
                    args: vec![
                        "--input-tone".into(),
                        hz.to_string(),
                        "--always-transmit".into(),
                    ],
                    output_wav: None,
                    duration_s: duration,
                },
            )
        })
        .collect();
    ear.wait_for("8 peers", Duration::from_secs(20), |l| {
        let ids: BTreeSet<u64> = l
            .iter()
            .filter(|(_, v)| v["event"] == "peer_endpoints")
            .filter_map(|(_, v)| v["user_id"].as_u64())
            .collect();
        ids.len() >= TALKERS
    });
    // Punching, jitter buffers settling.
    std::thread::sleep(Duration::from_secs(3));
    let ticks = clock_ticks_per_s();
    let pids: Vec<u32> = std::iter::once(&ear)
        .chain(talkers.iter())
        .map(Proc::pid)
        .collect();
    let m0 = machine_jiffies();
    let before: Vec<_> = pids.iter().map(|&p| sample_cpu(p)).collect();
    let t0 = Instant::now();
    std::thread::sleep(WINDOW);
    let after: Vec<_> = pids.iter().map(|&p| sample_cpu(p)).collect();
    let secs = t0.elapsed().as_secs_f64();
    let m1 = machine_jiffies();
    let pct = |d: u64| d as f64 / ticks / secs * 100.0;

    // The measured client, per thread name.
    let (ear0, ear_threads0) = &before[0];
    let (ear1, ear_threads1) = &after[0];
    let ear_pct = pct(ear1 - ear0);
    let mut by_name: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (tid, (name, t1)) in ear_threads1 {
        let t0 = ear_threads0.get(tid).map_or(0, |(_, t)| *t);
        let e = by_name.entry(name.clone()).or_default();
        e.0 += 1;
        e.1 += t1.saturating_sub(t0);
    }
    let audio_path: u64 = ["voice", "audio-engine"]
        .iter()
        .filter_map(|n| by_name.get(*n).map(|(_, t)| *t))
        .sum();
    let audio_pct = pct(audio_path);
    let talker_pcts: Vec<f64> = (1..pids.len())
        .map(|i| pct(after[i].0 - before[i].0))
        .collect();
    let all_clients_pct: f64 = ear_pct + talker_pcts.iter().sum::<f64>();
    let machine_busy = if m1.1 > m0.1 {
        (m1.0 - m0.0) as f64 / (m1.1 - m0.1) as f64 * 100.0
    } else {
        f64::NAN
    };

    for t in &mut talkers {
        finish(t, duration);
    }
    finish(&mut ear, duration);
    let s = summary(&ear);
    let peers = s["peers"].as_array().cloned().unwrap_or_default();
    let direct = peers
        .iter()
        .filter(|p| p["link"]["state"] == "direct")
        .count();
    let decoding = peers
        .iter()
        .filter(|p| p["frames_decoded"].as_u64().unwrap_or(0) > 0)
        .count();
    let heard = read_wav(&out_path);
    let tail = &heard[heard.len().saturating_sub(3 * RATE as usize)..];
    let audible = tones
        .iter()
        .filter(|&&hz| p2p_voice::audio::goertzel_amplitude(tail, hz, RATE) > 0.02)
        .count();

    let threads_json: BTreeMap<&String, Value> = by_name
        .iter()
        .map(|(n, (count, t))| (n, json!({"threads": count, "pct_of_core": pct(*t)})))
        .collect();
    emit(json!({
        "bench": "voice_e2e", "case": "cpu_9_clients", "metric": "cpu_pct_of_one_core",
        "window_s": secs, "measured_client_pct": ear_pct, "audio_path_pct": audio_pct,
        "threads": threads_json, "talker_pcts": talker_pcts, "all_clients_pct": all_clients_pct,
        "machine_busy_pct_of_all_cores": machine_busy, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "peers_direct": direct, "peers_decoding": decoding, "tones_audible": audible, "goal_pct": 10.0,
    }));
    let _ = writeln!(
        table,
        "measured client (8 talkers, 1 listener): process {ear_pct:.1}% of one core, audio path \
         (voice + audio-engine threads) {audio_pct:.1}% -> goal < 10%: {}",
        if audio_pct < 10.0 {
            "meets goal"
        } else {
            "MISSES goal"
        }
    );
    let _ = writeln!(table, "  per thread name (count, % of one core):");
    for (n, (count, t)) in &by_name {
        let _ = writeln!(table, "    {n:<24} x{count:<2} {:>6.2}%", pct(*t));
    }
    let _ = writeln!(
        table,
        "  talkers (send to 8, hear 7): {}",
        talker_pcts
            .iter()
            .map(|p| format!("{p:.1}%"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        table,
        "  all 9 clients: {all_clients_pct:.1}% of one core; machine busy {machine_busy:.0}% of \
         all cores; ear links direct {direct}/8, decoding {decoding}/8, tones audible {audible}/8"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Jitter buffer under a lossy link
// ---------------------------------------------------------------------------------------------

fn run_lossy(scratch: &Scratch, table: &mut String) {
    let server = Server::start(scratch, None);
    let duration = 14.0;
    let out_path = scratch.path("lossy-out.wav");
    let mut b = spawn_client(
        scratch,
        server.addr,
        ClientSpec {
            name: "ear",
            channel: "Lobby",
            args: strings(&[
                "--input-silence",
                "--impair",
                "loss=0.1,jitter_ms=30,duplicate=0.05,seed=7",
            ]),
            output_wav: Some(out_path.clone()),
            duration_s: duration,
        },
    );
    let mut a = spawn_client(
        scratch,
        server.addr,
        ClientSpec {
            name: "mouth",
            channel: "Lobby",
            args: strings(&["--input-tone", "500", "--always-transmit"]),
            output_wav: None,
            duration_s: duration,
        },
    );
    finish(&mut a, duration);
    finish(&mut b, duration);
    let a_start = audio_started_us(&a.lines()).expect("audio_started") as f64;
    let b_start = audio_started_us(&b.lines()).expect("audio_started") as f64;
    let heard = read_wav(&out_path);
    let first = heard
        .chunks(48)
        .position(|c| (c.iter().map(|x| x * x).sum::<f32>() / c.len() as f32).sqrt() > 0.02)
        .map(|i| i * 48)
        .expect("the ear heard the mouth");
    // From 0.5 s after the first sound until 0.3 s before the mouth stopped (in B's samples).
    let a_end_in_b = ((a_start + duration * 1e6 - b_start) / 1e6 * RATE_F) as usize;
    let from = first + RATE as usize / 2;
    let to = heard
        .len()
        .min(a_end_in_b)
        .saturating_sub(3 * RATE as usize / 10);
    assert!(
        to > from + 3 * RATE as usize,
        "too little audio: onset {first}, end {to}"
    );
    let (gap, gaps_over_20) = silent_gaps(&heard[from..to]);
    let level = p2p_voice::audio::goertzel_amplitude(&heard[from..to], 500.0, RATE);
    let b_summary = summary(&b);
    let p = peer0(&b_summary);
    let slip = clock_slip_ms(&b_summary, b_start, heard.len());
    // Duplicated datagrams are dropped by replay protection before the jitter buffer sees them.
    let replays = &b_summary["dropped_datagrams"]["replay"];
    emit(json!({
        "bench": "voice_e2e", "case": "lossy_link", "metric": "jitter_buffer",
        "dropped_as_replay": replays,
        "clock_slip_ms": slip,
        "impair": "loss=0.1,jitter_ms=30,duplicate=0.05,seed=7",
        "buffer_ms": p["buffer_ms"], "target_ms": p["target_ms"], "loss_pct": p["loss_pct"],
        "jitter_ms": p["jitter_ms"], "frames_decoded": p["frames_decoded"],
        "frames_fec": p["frames_fec"], "frames_concealed": p["frames_concealed"],
        "late": p["late"], "duplicates": p["duplicates"], "packets_in": p["packets_in"],
        "judged_s": (to - from) as f64 / RATE_F, "longest_gap_ms": gap,
        "gaps_over_20ms": gaps_over_20, "tone_amplitude": level,
    }));
    let _ = writeln!(
        table,
        "| {:>6.1} | {:>6.1} | {:>5.1} | {:>6.1} | {:>8} | {:>5} | {:>6} | {:>4} | {:>12} | {:>6} ({} > 20 ms) over {:.1} s, ear clock slip {:.0} ms |",
        f(&p["buffer_ms"]),
        f(&p["target_ms"]),
        f(&p["loss_pct"]),
        f(&p["jitter_ms"]),
        p["frames_decoded"],
        p["frames_fec"],
        p["frames_concealed"],
        p["late"],
        format!("{}/{}", p["duplicates"], replays),
        format!("{gap} ms"),
        gaps_over_20,
        (to - from) as f64 / RATE_F,
        slip
    );
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

const LATENCY_HEADER: &str = "| case                           | found | median |    p95 |    min |    max | target | buffer | fr/s  | slip | goal |\n|--------------------------------|-------|--------|--------|--------|--------|--------|--------|-------|------|------|\n";

/// `cargo test --all-targets`: one short latency run with two clients.
fn smoke() {
    let scratch = Scratch::new();
    let case = LatencyCase {
        label: "smoke_20ms",
        frame_ms: 20,
        always_transmit: true,
        impair: None,
        bursts: Bursts {
            first_s: 1.0,
            period_ms: 503.1,
            burst_ms: 20,
            count: 4,
            hz: 1_000.0,
            amplitude: 0.5,
            bed: 0.1,
        },
        window_ms: 480.0,
        goal_ms: None,
    };
    let r = run_latency(&scratch, &case);
    let mut table = String::from(LATENCY_HEADER);
    report_latency(&case, &r, &mut table);
    println!("{table}");
    assert!(
        !r.latencies_ms.is_empty(),
        "no burst came out at the ear; ear summary {}",
        r.b_summary
    );
    for &ms in &r.latencies_ms {
        assert!(
            ms > 0.0 && ms < 1_000.0,
            "latency {ms:.1} ms is not plausible"
        );
    }
    println!("voice_e2e smoke: ok");
}

fn full() {
    let scratch = Scratch::new();
    let clicks = Bursts {
        first_s: 2.0,
        period_ms: 503.1,
        burst_ms: 20,
        count: 24,
        hz: 1_000.0,
        amplitude: 0.5,
        bed: 0.1,
    };
    let cases = [
        LatencyCase {
            label: "20ms frames, steady",
            frame_ms: 20,
            always_transmit: true,
            impair: None,
            bursts: clicks,
            window_ms: 450.0,
            goal_ms: Some(60.0),
        },
        LatencyCase {
            label: "10ms frames, steady",
            frame_ms: 10,
            always_transmit: true,
            impair: None,
            bursts: clicks,
            window_ms: 450.0,
            goal_ms: Some(40.0),
        },
        LatencyCase {
            label: "20ms, clicks on silence (DTX)",
            frame_ms: 20,
            always_transmit: true,
            impair: None,
            bursts: Bursts { bed: 0.0, ..clicks },
            window_ms: 450.0,
            goal_ms: None,
        },
        LatencyCase {
            label: "20ms frames, VAD-gated",
            frame_ms: 20,
            always_transmit: false,
            impair: None,
            // 200 ms talkspurts with 1 s pauses: each starts after the jitter buffer went idle.
            bursts: Bursts {
                first_s: 2.0,
                period_ms: 1_203.1,
                burst_ms: 200,
                count: 10,
                hz: 1_000.0,
                amplitude: 0.5,
                bed: 0.0,
            },
            window_ms: 600.0,
            goal_ms: None,
        },
        LatencyCase {
            label: "20ms frames, VAD, 3 s pauses",
            frame_ms: 20,
            always_transmit: false,
            impair: None,
            // Pauses longer than the jitter buffer's 2 s transit window: every talkspurt starts
            // without a recent fastest-path estimate.
            bursts: Bursts {
                first_s: 2.0,
                period_ms: 3_003.1,
                burst_ms: 200,
                count: 6,
                hz: 1_000.0,
                amplitude: 0.5,
                bed: 0.0,
            },
            window_ms: 600.0,
            goal_ms: None,
        },
        LatencyCase {
            label: "20ms frames, lossy link",
            frame_ms: 20,
            always_transmit: true,
            impair: Some("loss=0.1,jitter_ms=30,duplicate=0.05,seed=7"),
            bursts: clicks,
            window_ms: 450.0,
            goal_ms: None,
        },
    ];
    let mut latency = String::from(LATENCY_HEADER);
    for case in &cases {
        eprintln!("voice_e2e: latency run '{}'", case.label);
        let r = run_latency(&scratch, case);
        report_latency(case, &r, &mut latency);
        let ap = peer0(&r.a_summary);
        emit(json!({
            "bench": "voice_e2e", "case": case.label, "metric": "mouth_summary",
            "bytes_out": ap["bytes_out"], "packets_out": ap["packets_out"],
            "frames_sent": r.a_summary["frames_sent"],
        }));
    }

    eprintln!("voice_e2e: bitrate runs");
    let mut bitrate = String::from(
        "| frame | pkt/s  | B/pkt   | UDP payload B/s          | + IPv4/UDP headers B/s   |\n\
         |-------|--------|---------|--------------------------|--------------------------|\n",
    );
    run_bitrate(&scratch, 20, &mut bitrate);
    run_bitrate(&scratch, 10, &mut bitrate);

    eprintln!("voice_e2e: lossy link run");
    let mut lossy = String::from(
        "| buffer | target | loss% | jitter | decoded  | fec   | concl. | late | dups/replays | longest gap while talking |\n\
         |--------|--------|-------|--------|----------|-------|--------|------|--------------|---------------------------|\n",
    );
    run_lossy(&scratch, &mut lossy);

    eprintln!("voice_e2e: cpu run (9 clients)");
    let mut cpu = String::new();
    run_cpu(&scratch, &mut cpu);

    println!(
        "\n## Mouth-to-ear latency (ms; target/buffer = ear's jitter buffer at exit, fr/s = frames the mouth sent per second, slip = audio clock slip in ms, > 30 makes a run invalid)\n{latency}"
    );
    println!(
        "## One stream on the wire at 24 kb/s (speech-like input, always transmitting)\n{bitrate}"
    );
    println!(
        "## Jitter buffer, ear with --impair loss=0.1,jitter_ms=30,duplicate=0.05,seed=7\n{lossy}"
    );
    println!("## CPU while 8 peers talk (10 s window, % of one core)\n{cpu}");
}

fn main() {
    if std::env::args().any(|a| a == "--bench") {
        full();
    } else {
        smoke();
    }
}
