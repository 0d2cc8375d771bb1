//! End-to-end test of the real device path (cpal open, callbacks, format and rate conversion,
//! ring buffers) against a PulseAudio null sink, whose monitor is the default source: a tone
//! written to the playback ring must come back in the capture ring.
//!
//! Starts PulseAudio itself when none is running (and stops it afterwards); skips, printing
//! why, where PulseAudio cannot start, except under CI (`CI` set), where it fails instead.

mod common;

use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use p2p_voice::audio::{
    goertzel_amplitude, list_devices, AudioConfig, AudioEvent, AudioHost, AudioIo, InputSource,
    OutputSink, ToneGenerator, SAMPLE_RATE,
};

use common::skip_unless_ci;

const TONE_HZ: f32 = 440.0;

/// Keeps a PulseAudio daemon available for the test; kills it on drop only if it started it.
/// Holding one also holds [`PULSE_LOCK`]: the tests in this file run one at a time, because
/// two of them starting the daemon at once make the second start fail ("Daemon startup
/// failed", as CI saw on a machine with no daemon running), and because they share the
/// daemon's default devices.
struct PulseGuard {
    started_here: bool,
    _serial: MutexGuard<'static, ()>,
}

static PULSE_LOCK: Mutex<()> = Mutex::new(());

fn pulse_is_up() -> bool {
    Command::new("pactl")
        .arg("info")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl PulseGuard {
    fn ensure() -> Result<Self, String> {
        // A test that failed while holding the lock poisons it; the daemon is still usable.
        let serial = PULSE_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // `scripts/with-pipewire.sh` runs these tests on PipeWire: they must use that server,
        // never start a PulseAudio beside it.
        if let Ok(expected) = std::env::var("P2P_VOICE_EXPECT_SOUND_SERVER") {
            let info = Command::new("pactl")
                .arg("info")
                .output()
                .map_err(|e| format!("pactl: {e}"))?;
            let info = String::from_utf8_lossy(&info.stdout);
            let name = info
                .lines()
                .find_map(|l| l.strip_prefix("Server Name: "))
                .unwrap_or("none");
            assert!(
                name.contains(&expected),
                "expected the sound server {expected}, found {name}"
            );
        }
        if pulse_is_up() {
            return Ok(Self {
                started_here: false,
                _serial: serial,
            });
        }
        let status = Command::new("pulseaudio")
            .args([
                "--daemonize=yes",
                "--exit-idle-time=-1",
                "--system=false",
                "--disallow-exit",
                "-n",
                "--load=module-null-sink sink_name=vsink",
                "--load=module-native-protocol-unix",
                "--load=module-always-sink",
            ])
            .status()
            .map_err(|e| format!("cannot run pulseaudio: {e}"))?;
        if !status.success() {
            return Err(format!("pulseaudio exited with {status}"));
        }
        let guard = Self {
            started_here: true,
            _serial: serial,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pulse_is_up() {
            if Instant::now() > deadline {
                return Err("pulseaudio started but does not answer `pactl info`".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(guard)
    }
}

impl Drop for PulseGuard {
    fn drop(&mut self) {
        if self.started_here {
            let _ = Command::new("pulseaudio").arg("--kill").status();
            // `--kill` only signals; the next test may start a daemon of its own as soon as
            // it takes the lock, and that fails while this one still holds its socket.
            let deadline = Instant::now() + Duration::from_secs(5);
            while pulse_is_up() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A running PulseAudio daemon for this test, or `None` after saying why not (a failure
/// under `CI`, see `skip_unless_ci`).
fn pulse_or_skip() -> Option<PulseGuard> {
    match PulseGuard::ensure() {
        Ok(guard) => Some(guard),
        Err(reason) => {
            skip_unless_ci(&format!("PulseAudio is not available: {reason}"));
            None
        }
    }
}

/// What one run of the device loop observed.
struct LoopResult {
    /// Seconds from start until the tone was first recognised in the capture, if ever.
    detected_after: Option<f32>,
    /// The last half second of capture (at detection, or at the deadline).
    window: Vec<f32>,
    captured_samples: usize,
    events: Vec<AudioEvent>,
}

const WINDOW: usize = 24_000;

/// Plays the voice thread's part: keeps a tone queued on playback and collects capture until
/// the tone shows up in the last half second of capture, or `deadline` passes. (PulseAudio's
/// ALSA plugin sometimes starts delivering capture only ~2 s after a stream opens.)
fn loop_tone_through_devices(cfg: AudioConfig, deadline: Duration) -> LoopResult {
    let mut io = AudioIo::start(&InputSource::Device(None), &OutputSink::Device(None), cfg)
        .expect("start with default devices");
    let mut capture = io.take_capture().expect("capture ring");
    let mut playback = io.take_playback().expect("playback ring");
    let mut tone = ToneGenerator::new(TONE_HZ, 0.5, SAMPLE_RATE);
    let mut chunk = [0.0f32; 480];
    let mut captured = Vec::new();
    let mut buf = vec![0.0f32; 9600];
    let start = Instant::now();
    let mut detected_after = None;
    while start.elapsed() < deadline {
        while playback.queued() < 1920 {
            tone.fill(&mut chunk);
            playback.push(&chunk);
        }
        let n = capture.pop_into(&mut buf);
        captured.extend_from_slice(&buf[..n]);
        if n > 0 && captured.len() >= WINDOW {
            let window = &captured[captured.len() - WINDOW..];
            if goertzel_amplitude(window, TONE_HZ, SAMPLE_RATE) > 0.1 {
                detected_after = Some(start.elapsed().as_secs_f32());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = io.stats();
    io.stop().expect("stop");
    println!("stats: {stats:?}");
    let from = captured.len().saturating_sub(WINDOW);
    LoopResult {
        detected_after,
        window: captured[from..].to_vec(),
        captured_samples: captured.len(),
        events: io.events().try_iter().collect(),
    }
}

#[test]
fn tone_played_to_the_default_output_comes_back_on_the_default_input() {
    let Some(_pulse) = pulse_or_skip() else {
        return;
    };
    match list_devices(AudioHost::Auto) {
        Ok(list) => println!("{list:#?}"),
        Err(e) => println!("device listing failed: {e}"),
    }
    // 48 kHz: no resampling. 44.1 kHz: the device side runs through rubato both ways.
    for rate in [48_000u32, 44_100] {
        let cfg = AudioConfig {
            preferred_device_rate: rate,
            ..AudioConfig::default()
        };
        let run = loop_tone_through_devices(cfg, Duration::from_secs(8));
        let events = &run.events;
        println!("device rate {rate}: events {events:#?}");
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, AudioEvent::NoMicrophone(_) | AudioEvent::NoSpeaker(_))),
            "device missing at {rate} Hz: {events:?}"
        );
        // PulseAudio's ALSA plugin occasionally starts failing `snd_pcm_avail_delay` with EIO
        // on a fresh stream; the engine restarts such a stream quietly (a DeviceWarning), and
        // should a device really be lost it must reopen it by itself (the tone check below
        // proves audio flows either way).
        let lost = events
            .iter()
            .filter(|e| matches!(e, AudioEvent::DeviceLost { .. }))
            .count();
        let restored = events
            .iter()
            .filter(|e| matches!(e, AudioEvent::DeviceRestored { .. }))
            .count();
        println!("device rate {rate}: {lost} device losses, {restored} restores");
        assert!(
            lost == 0 || restored > 0,
            "device lost and never restored at {rate} Hz: {events:?}"
        );
        // A device loss reported by cpal's error callback may race ahead of Started.
        assert!(
            events
                .iter()
                .any(|e| matches!(e, AudioEvent::Started { .. })),
            "{events:?}"
        );
        let at_tone = goertzel_amplitude(&run.window, TONE_HZ, SAMPLE_RATE);
        let off_tone = goertzel_amplitude(&run.window, 1000.0, SAMPLE_RATE);
        println!(
            "device rate {rate}: tone found after {:?} s, {} samples captured, 440 Hz amplitude {at_tone:.3}, 1 kHz {off_tone:.4}",
            run.detected_after, run.captured_samples
        );
        assert!(
            run.detected_after.is_some(),
            "tone never came back at {rate} Hz ({} samples captured, amplitude {at_tone})",
            run.captured_samples
        );
        assert!(off_tone < at_tone / 10.0, "tone not clean at {rate} Hz");
    }
}

/// The PulseAudio server's socket as `PULSE_SERVER` wants it. The native host finds the
/// server through `PULSE_SERVER` or `XDG_RUNTIME_DIR` (set in every desktop session); a
/// daemon started by root outside one lives under /tmp, so the clients are told.
fn pulse_server() -> Result<String, String> {
    let out = Command::new("pactl")
        .arg("info")
        .output()
        .map_err(|e| format!("pactl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Server String: "))
        .map(|s| {
            if s.starts_with('/') {
                format!("unix:{s}")
            } else {
                s.to_string()
            }
        })
        .ok_or_else(|| format!("no server string in `pactl info`: {text}"))
}

/// Null sinks loaded for one test (their monitors are the matching sources); unloaded on drop.
struct NullSinks(Vec<String>);

impl NullSinks {
    fn load(names: &[&str]) -> Self {
        let mut modules = Vec::new();
        for name in names {
            let out = Command::new("pactl")
                .args([
                    "load-module",
                    "module-null-sink",
                    &format!("sink_name={name}"),
                    "rate=48000",
                ])
                .output()
                .expect("pactl load-module");
            assert!(out.status.success(), "loading null sink {name}: {out:?}");
            modules.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        Self(modules)
    }
}

impl Drop for NullSinks {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new("pactl").args(["unload-module", m]).status();
        }
    }
}

/// Every 20 ms block of `samples` between `from_s` and `to_s` seconds that carries less than
/// a quarter of the median level of `hz`: what a listener hears as a gap or a dip.
fn tone_gaps(samples: &[f32], hz: f32, from_s: f32, to_s: f32) -> (f32, Vec<f32>) {
    let rate = SAMPLE_RATE as f32;
    let from = (from_s * rate) as usize;
    let to = ((to_s * rate) as usize).min(samples.len());
    assert!(
        to > from + SAMPLE_RATE as usize * 10,
        "recording too short: {} samples",
        samples.len()
    );
    let levels: Vec<f32> = samples[from..to]
        .chunks_exact(960)
        .map(|b| goertzel_amplitude(b, hz, SAMPLE_RATE))
        .collect();
    let mut sorted = levels.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[sorted.len() / 2];
    let gaps = levels
        .iter()
        .enumerate()
        .filter(|(_, l)| **l < median / 4.0)
        .map(|(i, _)| from_s + i as f32 * 0.02)
        .collect();
    (median, gaps)
}

/// Raw 48 kHz mono f32 recorded from a PulseAudio source by `parecord`.
fn read_f32le(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .expect("recording")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A headless member of Lobby for `secs` on cpal's native PulseAudio host, reached at
/// `pulse_server`, with the device arguments `args` (input, output, stages).
fn pulse_member(
    server: std::net::SocketAddr,
    pulse_server: &str,
    name: &str,
    secs: f64,
    args: &[&str],
) -> std::process::Child {
    common::p2p()
        .args(["client", "--headless", "--server", &server.to_string()])
        .args(["--username", name, "--channel", "Lobby"])
        .args(["--duration", &secs.to_string()])
        .args(["--audio-host", "pulseaudio"])
        .args(args)
        .env("PULSE_SERVER", pulse_server)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn device member")
}

/// The JSON lines a finished member printed; panics (with them) if it did not exit cleanly.
fn member_lines(out: std::process::Output, who: &str) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{who}: {}: {stdout}", out.status);
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A 30 s call with one member on real PulseAudio devices through cpal's native PulseAudio
/// host, the other on a tone and a WAV file. The device member captures a 660 Hz tone played
/// into a null sink (its monitor is the microphone) and plays what it hears into a second
/// null sink, whose monitor we record. Asserts what a user would notice: the native host was
/// used, no stream restarted and no device failed or reported errors, and the device path
/// adds no gap in either direction: every 20 ms dip in a tone must lie on one of the frames the
/// receiving jitter buffer reports it concealed or dropped. And the device member drops no
/// frame of what it hears: not at the start, when a backlog waits while its devices open, nor
/// later, when excess delay is taken out by time-scaling.
#[test]
fn a_30_s_call_on_the_native_pulseaudio_host_has_no_restart_error_or_gap() {
    let Some(_pulse) = pulse_or_skip() else {
        return;
    };
    let pulse_server = pulse_server().expect("PulseAudio server address");
    let _sinks = NullSinks::load(&["p2pv_mic", "p2pv_spk"]);
    const CALL_S: f32 = 30.0;
    const MIC_HZ: f32 = 660.0;
    const PEER_HZ: f32 = 440.0;

    // The "microphone": 40 s of a 660 Hz tone played into p2pv_mic.
    let mic_raw = common::temp_path("mic.f32");
    let mut tone = ToneGenerator::new(MIC_HZ, 0.3, SAMPLE_RATE);
    let mut samples = vec![0.0f32; SAMPLE_RATE as usize * 40];
    tone.fill(&mut samples);
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(&mic_raw, bytes).expect("write tone");
    let raw_args = [
        "--raw",
        "--format=float32le",
        "--rate=48000",
        "--channels=1",
    ];
    let mut player = Command::new("pacat")
        .args(["--playback", "--device=p2pv_mic"])
        .args(raw_args)
        .arg(&mic_raw)
        .spawn()
        .expect("pacat --playback");
    let speaker_raw = common::temp_path("speaker.f32");
    let mut recorder = Command::new("parecord")
        .args(["--device=p2pv_spk.monitor"])
        .args(raw_args)
        .arg(&speaker_raw)
        .spawn()
        .expect("parecord");

    let server = common::ServerProcess::start();
    let peer = common::HeadlessClient::spawn(
        server.addr,
        "tone",
        "Lobby",
        &["--input-tone", &PEER_HZ.to_string()],
        &["--always-transmit"],
        f64::from(CALL_S),
    );
    let device_member = pulse_member(
        server.addr,
        &pulse_server,
        "devices",
        f64::from(CALL_S),
        &[
            "--input-device",
            "p2pv_mic.monitor",
            "--output-device",
            "p2pv_spk",
            // A steady tone is what a noise suppressor is for removing, and a steady tone
            // heard while another plays is what an echo canceller cannot tell from echo (AEC3
            // held this one down for about 6 s before it found there was no echo path);
            // speech would keep both on. This test is about the device path; benches/echo.rs
            // measures the chain.
            "--noise-suppression",
            "off",
            "--echo-cancellation",
            "off",
            "--always-transmit",
        ],
    );
    let out = device_member.wait_with_output().expect("device member");
    let _ = recorder.kill();
    let _ = recorder.wait();
    let _ = player.kill();
    let _ = player.wait();
    let lines = member_lines(out, "device member");
    let (peer_lines, heard_by_peer) = peer.finish();
    let summary = common::summary(&lines);
    // How each side's jitter buffer fared: a frame it concealed or dropped is a dip in the
    // tone that is not the device path's doing (its clean-link behaviour is issue 11's item
    // 2), so each direction may show at most that many dips; any other is the device path's.
    // A 20 ms frame that is not aligned with the 20 ms analysis blocks touches two of them,
    // so each such frame may show as two dips. Frames played shortened count too: they come
    // in the same jittery moments as stretches, and their cross-fade is where a dip would be.
    let jitter_events = |s: &serde_json::Value, other: &str| {
        common::peer_named(s, other).map_or(0, |p| {
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            2 * (n("frames_concealed") + n("frames_dropped") + n("frames_shortened"))
        })
    };
    let capture_allowance = jitter_events(common::summary(&peer_lines), "devices");
    let playback_allowance = jitter_events(summary, "tone");
    for (who, s, other) in [
        ("tone member", common::summary(&peer_lines), "devices"),
        ("device member", summary, "tone"),
    ] {
        if let Some(p) = common::peer_named(s, other) {
            println!(
                "{who} receiving: decoded {} fec {} concealed {} stretched {} dropped {} shortened {} late {} \
                 packets_in {} target_ms {} jitter_ms {}",
                p["frames_decoded"],
                p["frames_fec"],
                p["frames_concealed"],
                p["frames_stretched"],
                p["frames_dropped"],
                p["frames_shortened"],
                p["late"],
                p["packets_in"],
                p["target_ms"],
                p["jitter_ms"]
            );
        }
    }
    let audio = &summary["audio"];
    println!("device member's audio path: {audio:#}");
    // Before session 8 the device member refused a backlog that overflowed its jitter buffer
    // while its devices opened, concealed the hole and dropped about 25 frames to get rid of
    // the delay it left: audible skips at the start of every call on devices.
    let heard = common::peer_named(summary, "tone").expect("device member hears the tone");
    assert_eq!(
        heard["frames_dropped"], 0,
        "the device member dropped frames instead of time-scaling: {heard}"
    );

    for side in ["input", "output"] {
        let desc = audio[side].as_str().unwrap_or_default();
        assert!(
            desc.contains("on PulseAudio"),
            "{side} is not on the native host: {desc:?}"
        );
    }
    for counter in [
        "stream_restarts",
        "devices_lost",
        "device_errors",
        "capture_overrun_samples",
    ] {
        assert_eq!(audio[counter], 0, "{counter} in {audio:#}");
    }
    // Audio the microphone never delivered. cpal's own PulseAudio capture stream let the
    // server keep only 10 ms for us, so a busy machine lost seconds of each call this way
    // (3.8 s of 31 s on a loaded 2-core VM), silently: no overrun, no error, just time
    // without samples, which listeners hear as jumps and buffer against.
    let missing = audio["capture_missing_ms"]
        .as_u64()
        .expect("capture_missing_ms");
    assert!(
        missing <= 100,
        "the microphone failed to deliver {missing} ms of audio: {audio:#}"
    );

    // Capture direction: the 660 Hz microphone tone, as the other member recorded it.
    let (level, gaps) = tone_gaps(&heard_by_peer, MIC_HZ, 3.0, CALL_S - 1.0);
    println!("peer heard the device microphone at {level:.3}, gaps at {gaps:?}");
    assert!(level > 0.05, "microphone tone not heard (level {level})");
    assert!(
        gaps.len() as u64 <= capture_allowance,
        "gaps in the captured tone at {gaps:?} s, more than the {capture_allowance} blocks \
         the frames the receiver concealed or dropped can touch"
    );

    // Playback direction: the peer's 440 Hz tone, as it left the device member's speaker.
    let played = read_f32le(&speaker_raw);
    let (level, gaps) = tone_gaps(&played, PEER_HZ, 3.0, played.len() as f32 / 48_000.0 - 1.0);
    println!(
        "speaker played the peer at {level:.3} over {:.1} s, gaps at {gaps:?}",
        played.len() as f32 / 48_000.0
    );
    assert!(level > 0.05, "peer's tone not played (level {level})");
    assert!(
        gaps.len() as u64 <= playback_allowance,
        "gaps in the played tone at {gaps:?} s, more than the {playback_allowance} blocks \
         the frames the receiver concealed or dropped can touch"
    );
}

fn rms_db(x: &[f32]) -> f64 {
    let p = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len().max(1) as f64;
    10.0 * p.max(1e-20).log10()
}

/// One call of `secs` between a talker (recorded speech) and a device member whose speaker is
/// fed straight back into its microphone by a PulseAudio loopback (a laptop without
/// headphones, with the speaker as loud at the microphone as the talker's voice). Returns the
/// level, dBFS, of what the talker heard back over the last 12 s, its own voice's level, and
/// the device member's summary.
fn call_through_a_speaker_loop(
    echo_cancellation: bool,
    secs: f64,
) -> (f64, f64, serde_json::Value) {
    let pulse_server = pulse_server().expect("PulseAudio server address");
    let _sinks = NullSinks::load(&["p2pv_spk"]);
    let server = common::ServerProcess::start();
    let talker = common::HeadlessClient::spawn(
        server.addr,
        "talker",
        "Lobby",
        &["--input-wav", SPEECH, "--loop-input"],
        &[],
        secs,
    );
    let on_off = if echo_cancellation { "on" } else { "off" };
    let device_member = pulse_member(
        server.addr,
        &pulse_server,
        "laptop",
        secs,
        &[
            // The microphone hears exactly what the speaker plays.
            "--input-device",
            "p2pv_spk.monitor",
            "--output-device",
            "p2pv_spk",
            // Everything else is the default capture chain of a microphone.
            "--echo-cancellation",
            on_off,
        ],
    );
    let out = device_member.wait_with_output().expect("device member");
    let lines = member_lines(out, "device member");
    let summary = common::summary(&lines).clone();
    let (_, heard_back) = talker.finish();
    let tail = heard_back.len().saturating_sub(SAMPLE_RATE as usize * 12);
    let speech = p2p_voice::audio::load_wav_mono_48k(std::path::Path::new(SPEECH)).expect("speech");
    (rms_db(&heard_back[tail..]), rms_db(&speech), summary)
}

/// Real recorded speech (codec2-examples, which `make test` installs).
const SPEECH: &str = "/usr/share/codec2/raw/speech_orig_16k.wav";

/// A laptop without headphones must not send the others their own voice back. The device
/// member's speaker is looped into its microphone at full level; with echo cancellation on
/// (the default for a microphone) the talker hears at least 15 dB less of its own voice back
/// than with it off, and with it off it does hear itself (the control: the loop is real).
#[test]
fn a_speaker_looped_into_the_microphone_does_not_send_the_talker_its_own_voice_back() {
    let Some(_pulse) = pulse_or_skip() else {
        return;
    };
    if !std::path::Path::new(SPEECH).exists() {
        skip_unless_ci(&format!(
            "{SPEECH} is missing (Debian package codec2-examples)"
        ));
        return;
    }
    let (off, own, _) = call_through_a_speaker_loop(false, 22.0);
    let (on, _, summary) = call_through_a_speaker_loop(true, 22.0);
    let capture = &summary["capture"];
    println!(
        "talker's own voice {own:.1} dBFS; heard back {off:.1} dBFS without echo cancellation, \
         {on:.1} dBFS with it; the canceller's figures: {capture}"
    );
    assert!(
        off > own - 20.0,
        "without echo cancellation the talker should hear itself back ({off:.1} dBFS against \
         its own {own:.1}): the loop is not working"
    );
    // Measured: nothing at all comes back in most runs (-200 dBFS), 20.8 dB down in the
    // worst run seen (the voice detector opened on a few frames of residual echo).
    assert!(
        on < off - 15.0,
        "echo cancellation took only {:.1} dB off the talker's voice coming back",
        off - on
    );
    assert_eq!(capture["echo_cancellation"], true, "{capture}");
}

/// Normalised cross-correlation of `clip` against `x` at every lag (step `step` samples).
fn correlate(clip: &[f32], x: &[f32], step: usize) -> Vec<(usize, f32)> {
    let energy = clip.iter().map(|v| v * v).sum::<f32>().sqrt();
    (0..x.len().saturating_sub(clip.len()))
        .step_by(step)
        .map(|lag| {
            let window = &x[lag..lag + clip.len()];
            let dot: f32 = clip.iter().zip(window).map(|(a, b)| a * b).sum();
            let e = window.iter().map(|v| v * v).sum::<f32>().sqrt();
            (lag, if e > 0.0 { dot / (energy * e) } else { 0.0 })
        })
        .collect()
}

/// Mouth to ear through real PulseAudio devices at both ends, with the default capture
/// chain: a speech clip is played once into a combined sink that feeds both the talker's
/// microphone and a reference sink; the listener plays what it hears into the same reference
/// sink; one recording of that sink holds the clip twice, and the distance between the two
/// is what a listener waits from mouth to ear (both device paths and their queues included).
/// Prints the figure for docs/BENCHMARKS.md (and each side's jitter buffer); asserts only that
/// the speech came through, not a time.
#[test]
fn mouth_to_ear_through_pulseaudio_devices_is_measured() {
    let Some(_pulse) = pulse_or_skip() else {
        return;
    };
    const CLIP: &str = "/usr/share/sounds/alsa/Front_Center.wav";
    if !std::path::Path::new(CLIP).exists() {
        skip_unless_ci(&format!("{CLIP} is missing (Debian package alsa-utils)"));
        return;
    }
    let pulse_server = pulse_server().expect("PulseAudio server address");
    let sinks = NullSinks::load(&["p2pv_mic", "p2pv_ref", "p2pv_dump"]);
    let combine = Command::new("pactl")
        .args([
            "load-module",
            "module-combine-sink",
            "sink_name=p2pv_both",
            "slaves=p2pv_mic,p2pv_ref",
            "rate=48000",
        ])
        .output()
        .expect("pactl load-module");
    assert!(combine.status.success(), "combine sink: {combine:?}");
    let combine_module = String::from_utf8_lossy(&combine.stdout).trim().to_string();
    // Unloaded on drop like the sinks (a NullSinks holds any module ids).
    let _unload = NullSinks(vec![combine_module]);

    // The clip every 3 s, 8 times, scaled to -6 dBFS peak.
    let clip = p2p_voice::audio::load_wav_mono_48k(std::path::Path::new(CLIP)).expect("clip");
    let peak = clip.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let clip: Vec<f32> = clip.iter().map(|v| v * 0.5 / peak).collect();
    let mut script = vec![0.0f32; SAMPLE_RATE as usize * 4];
    for _ in 0..8 {
        script.extend_from_slice(&clip);
        script.extend(std::iter::repeat_n(
            0.0,
            SAMPLE_RATE as usize * 3 - clip.len(),
        ));
    }
    let raw = common::temp_path("m2e-script.f32");
    let bytes: Vec<u8> = script.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(&raw, bytes).expect("write script");

    let server = common::ServerProcess::start();
    let member =
        |name: &str, args: &[&str]| pulse_member(server.addr, &pulse_server, name, 31.0, args);
    let ear = member("ear", &["--input-silence", "--output-device", "p2pv_ref"]);
    let mouth = member(
        "mouth",
        &[
            "--input-device",
            "p2pv_mic.monitor",
            "--output-device",
            "p2pv_dump",
        ],
    );
    // Let both open their devices and the call come up.
    std::thread::sleep(Duration::from_secs(4));
    let recording = common::temp_path("m2e-ref.f32");
    let raw_args = [
        "--raw",
        "--format=float32le",
        "--rate=48000",
        "--channels=1",
    ];
    let mut recorder = Command::new("parecord")
        .args(["--device=p2pv_ref.monitor"])
        .args(raw_args)
        .arg(&recording)
        .spawn()
        .expect("parecord");
    let mut player = Command::new("pacat")
        .args(["--playback", "--device=p2pv_both"])
        .args(raw_args)
        .arg(&raw)
        .spawn()
        .expect("pacat");
    let _ = player.wait();
    std::thread::sleep(Duration::from_secs(1));
    let _ = recorder.kill();
    let _ = recorder.wait();
    let mut ear_decoded = 0;
    for (who, c) in [("ear", ear), ("mouth", mouth)] {
        let lines = member_lines(c.wait_with_output().expect("device member"), who);
        let summary = common::summary(&lines);
        println!("{who}: audio {}", summary["audio"]);
        let other = if who == "ear" { "mouth" } else { "ear" };
        // The other may have left a moment earlier: `peer_named` looks in both lists.
        if let Some(p) = common::peer_named(summary, other) {
            println!(
                "{who}: hears {other} with {} frames decoded, jitter buffer {} ms (target {} ms)",
                p["frames_decoded"], p["buffer_ms"], p["target_ms"]
            );
            if who == "ear" {
                ear_decoded = p["frames_decoded"].as_u64().unwrap_or(0);
            }
        }
    }
    drop(sinks);
    let heard = read_f32le(&recording);
    // Each clip's direct copy is the best match; the call's copy the best match at least
    // 20 ms later within half a second.
    let probe = &clip[..clip.len().min(24_000)];
    let matches = correlate(probe, &heard, 48);
    println!(
        "recorded {:.1} s at {:.1} dBFS; best match {:?}",
        heard.len() as f64 / 48_000.0,
        rms_db(&heard),
        matches.iter().max_by(|a, b| a.1.total_cmp(&b.1))
    );
    let mut delays = Vec::new();
    let mut t = 0;
    while t < heard.len() {
        let window = t;
        t += SAMPLE_RATE as usize * 3;
        // The direct copy comes first: the earliest strong match in the window, then the
        // best match within 10 ms of it.
        let Some(&(first, _)) = matches
            .iter()
            .filter(|(lag, _)| *lag >= window)
            .take_while(|(lag, _)| *lag < window + SAMPLE_RATE as usize * 3)
            .find(|(_, c)| *c > 0.5)
        else {
            continue;
        };
        let Some(&(direct, _)) = matches
            .iter()
            .filter(|(lag, _)| *lag >= first && *lag < first + 480)
            .max_by(|a, b| a.1.total_cmp(&b.1))
        else {
            continue;
        };
        // The call's copy: the best match from 20 ms to 1 s later.
        let later = matches
            .iter()
            .filter(|(lag, _)| *lag >= direct + 960 && *lag < direct + 48_000)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some(&(call, cc)) = later {
            if cc > 0.3 {
                // Refine both to the sample.
                let fine = |around: usize| {
                    correlate(
                        probe,
                        &heard[around.saturating_sub(48)
                            ..(around + 48 + probe.len()).min(heard.len())],
                        1,
                    )
                    .into_iter()
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map_or(around, |(l, _)| around.saturating_sub(48) + l)
                };
                delays.push((fine(call) as f64 - fine(direct) as f64) / 48.0);
                // The next window starts after this clip's call copy.
                t = t.max(call + probe.len());
            }
        }
    }
    delays.sort_by(f64::total_cmp);
    println!(
        "mouth to ear through PulseAudio, default capture chain: {delays:.1?} ms ({} of 8 clips \
         found in the recording)",
        delays.len()
    );
    assert!(
        ear_decoded > 100,
        "the speech did not come through the call ({ear_decoded} frames decoded)"
    );
}

/// A headset unplugged mid-call: the device member picked it by name for both directions;
/// when its sink (and the monitor that is its microphone) disappears, the microphone falls
/// back to the system default (our capture stream ends with its source, and the engine
/// reopens the default and reports it), PulseAudio moves the playback stream to the default
/// sink itself, the call goes on, and the member still hears its peer to the end.
#[test]
fn an_unplugged_headset_gives_way_to_the_default_device_and_the_call_goes_on() {
    let Some(_pulse) = pulse_or_skip() else {
        return;
    };
    let pulse_server = pulse_server().expect("PulseAudio server address");
    let load = Command::new("pactl")
        .args([
            "load-module",
            "module-null-sink",
            "sink_name=p2pv_usb",
            "rate=48000",
            "sink_properties=device.description=USB-Headset",
        ])
        .output()
        .expect("pactl load-module");
    assert!(load.status.success(), "headset sink: {load:?}");
    let headset = String::from_utf8_lossy(&load.stdout).trim().to_string();
    // Unloaded by the test itself; this only covers a panic before that.
    let headset_guard = NullSinks(vec![headset.clone()]);

    const CALL_S: f64 = 12.0;
    let server = common::ServerProcess::start();
    let peer = common::HeadlessClient::spawn(
        server.addr,
        "tone",
        "Lobby",
        &["--input-tone", "440"],
        &["--always-transmit"],
        CALL_S,
    );
    let member = pulse_member(
        server.addr,
        &pulse_server,
        "headset",
        CALL_S,
        &[
            "--input-device",
            "USB-Headset",
            "--output-device",
            "USB-Headset",
        ],
    );
    std::thread::sleep(Duration::from_secs(4));
    let unplug = Command::new("pactl")
        .args(["unload-module", &headset])
        .status()
        .expect("pactl unload-module");
    assert!(unplug.success(), "unplugging the headset");
    std::mem::forget(headset_guard);

    let lines = member_lines(member.wait_with_output().expect("device member"), "headset");
    let _ = peer.finish();
    let summary = common::summary(&lines);
    let audio = &summary["audio"];
    println!("after the unplug: {audio:#}");
    assert!(
        audio["devices_lost"].as_u64().unwrap_or(0) >= 1,
        "the unplug was not noticed: {audio:#}"
    );
    let input = audio["input"].as_str().unwrap_or_default();
    assert!(
        !input.contains("USB-Headset") && input.contains("on PulseAudio"),
        "the microphone did not move to the default device: {input:?}"
    );
    // The peer's tone kept coming out: about one decoded frame per 20 ms of the call.
    let heard = common::peer_named(summary, "tone").expect("the member hears the tone");
    let decoded = heard["frames_decoded"].as_u64().unwrap_or(0);
    assert!(
        decoded as f64 > (CALL_S - 3.0) * 50.0,
        "only {decoded} frames decoded: the call did not go on after the unplug: {heard}"
    );
}

/// The echo test (`--echo-test`) on real PulseAudio devices, with the speaker fed back into
/// the microphone: the member plays into p2pv_espk, whose monitor a loopback carries with
/// 60 ms of delay into p2pv_eroom at half volume, whose monitor is the microphone. With echo
/// cancellation on (the default for devices) the test must find the echo and see it taken out
/// down to the background; with it off, find it left standing.
#[test]
fn the_echo_test_finds_a_pulseaudio_loopback_echo_and_the_canceller_removing_it() {
    let Some(_pulse) = pulse_or_skip() else {
        return;
    };
    let pulse_server = pulse_server().expect("PulseAudio server address");
    let _sinks = NullSinks::load(&["p2pv_espk", "p2pv_eroom", "p2pv_espk2", "p2pv_eroom2"]);
    let mut loopbacks = Vec::new();
    for (from, to) in [("p2pv_espk", "p2pv_eroom"), ("p2pv_espk2", "p2pv_eroom2")] {
        let out = Command::new("pactl")
            .args(["load-module", "module-loopback"])
            .arg(format!("source={from}.monitor"))
            .arg(format!("sink={to}"))
            .args([
                "latency_msec=60",
                "source_dont_move=true",
                "sink_dont_move=true",
            ])
            .output()
            .expect("pactl load-module module-loopback");
        assert!(out.status.success(), "loading the loopback: {out:?}");
        loopbacks.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let status = Command::new("pactl")
            .args(["set-sink-volume", to, "50%"])
            .status()
            .expect("pactl set-sink-volume");
        assert!(status.success());
    }
    struct Unload(Vec<String>);
    impl Drop for Unload {
        fn drop(&mut self) {
            for m in &self.0 {
                let _ = Command::new("pactl").args(["unload-module", m]).status();
            }
        }
    }
    let _loopbacks = Unload(loopbacks);

    let server = common::ServerProcess::start();
    let member = |name: &str, speaker: &str, room: &str, aec: &str| {
        pulse_member(
            server.addr,
            &pulse_server,
            name,
            9.0,
            &[
                "--input-device",
                &format!("{room}.monitor"),
                "--output-device",
                speaker,
                "--echo-cancellation",
                aec,
                "--echo-test",
            ],
        )
    };
    let with = member("aec-on", "p2pv_espk", "p2pv_eroom", "on");
    let without = member("aec-off", "p2pv_espk2", "p2pv_eroom2", "off");
    let result = |child: std::process::Child, who: &str| {
        let lines = member_lines(child.wait_with_output().expect("member exits"), who);
        lines
            .into_iter()
            .find(|l| l["event"] == "echo_test")
            .unwrap_or_else(|| panic!("{who} printed no echo_test line"))
    };
    let on = result(with, "aec-on");
    let off = result(without, "aec-off");
    println!("echo test, canceller on: {on}\necho test, canceller off: {off}");
    assert_eq!(on["verdict"], "cancelled", "{on}");
    assert!(on["removed_db"].as_f64().unwrap() >= 20.0, "{on}");
    let coupling = on["coupling_db"].as_f64().unwrap();
    assert!((-20.0..0.0).contains(&coupling), "half volume: {on}");
    assert_eq!(off["verdict"], "remains", "{off}");
    assert!(off["removed_db"].as_f64().unwrap().abs() < 2.0, "{off}");
}

/// `p2p-voice devices` names the host and the sound server behind it: on a PipeWire desktop
/// the host is "PulseAudio", and the server line says it is PipeWire.
#[test]
fn devices_names_the_host_and_the_sound_server_behind_it() {
    let Some(_pulse) = pulse_or_skip() else {
        return;
    };
    let pulse_server = pulse_server().expect("PulseAudio server address");
    let out = common::p2p()
        .args(["devices", "--audio-host", "pulseaudio"])
        .env("PULSE_SERVER", &pulse_server)
        .output()
        .expect("p2p-voice devices");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("audio host: PulseAudio"), "{text}");
    let server = text
        .lines()
        .find_map(|l| l.strip_prefix("sound server: "))
        .unwrap_or_else(|| panic!("no sound server line: {text}"));
    let expected = std::env::var("P2P_VOICE_EXPECT_SOUND_SERVER").unwrap_or("PulseAudio".into());
    // PulseAudio calls itself "pulseaudio 16.1", PipeWire "PulseAudio (on PipeWire 0.3.65)".
    assert!(
        server.to_lowercase().contains(&expected.to_lowercase()),
        "{server}"
    );
}
