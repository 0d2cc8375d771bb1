//! End-to-end test of the real device path (cpal open, callbacks, format and rate conversion,
//! ring buffers) against a PulseAudio null sink, whose monitor is the default source: a tone
//! written to the playback ring must come back in the capture ring.
//!
//! Starts PulseAudio itself when none is running (and stops it afterwards); skips, printing
//! why, where PulseAudio cannot start, except under CI (`CI` set), where it fails instead.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use p2p_voice::audio::{
    goertzel_amplitude, list_devices, AudioConfig, AudioEvent, AudioIo, InputSource, OutputSink,
    ToneGenerator, SAMPLE_RATE,
};

use common::skip_unless_ci;

const TONE_HZ: f32 = 440.0;

/// Keeps a PulseAudio daemon available for the test; kills it on drop only if it started it.
struct PulseGuard {
    started_here: bool,
}

fn pulse_is_up() -> bool {
    Command::new("pactl")
        .arg("info")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl PulseGuard {
    fn ensure() -> Result<Self, String> {
        if pulse_is_up() {
            return Ok(Self {
                started_here: false,
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
        let guard = Self { started_here: true };
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
    let _pulse = match PulseGuard::ensure() {
        Ok(guard) => guard,
        Err(reason) => {
            skip_unless_ci(&format!("PulseAudio is not available: {reason}"));
            return;
        }
    };
    match list_devices() {
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
