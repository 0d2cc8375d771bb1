//! The running audio path ([`AudioIo`]) and what configures and reports it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::ring::{CaptureRing, PlaybackRing};
use super::{device_thread, ring, AudioHost, AudioStats, SAMPLE_RATE};

/// Where captured audio comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum InputSource {
    /// A capture device: the system default (`None`) or one matched by name or id (see
    /// [`list_devices`]; exact match first, then a case-insensitive substring).
    Device(Option<String>),
    /// A WAV file (any rate, channels and format), converted once to 48 kHz mono; after the end
    /// it plays silence, or starts over when `looped`.
    Wav { path: PathBuf, looped: bool },
    /// A steady sine tone.
    Tone { hz: f32, amplitude: f32 },
    /// Digital silence at the real-time pace.
    Silence,
}

/// Where played audio goes.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputSink {
    /// A playback device: the system default (`None`) or one matched by name or id.
    Device(Option<String>),
    /// A 48 kHz mono 16-bit PCM WAV file, valid after [`AudioIo::stop`] or drop.
    Wav(PathBuf),
    /// Discards audio at the real-time pace.
    Null,
}

/// Which side of the audio path an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

/// Tunables for [`AudioIo::start`]. The defaults suit voice chat.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioConfig {
    /// The sound system real devices are opened on (default: cpal's choice, the native
    /// PulseAudio/PipeWire server when there is one, else ALSA).
    pub host: AudioHost,
    /// Capacity of the capture ring in samples (default 200 ms).
    pub capture_ring_samples: usize,
    /// Capacity of the playback ring in samples (default 200 ms).
    pub playback_ring_samples: usize,
    /// Device rate to ask for when the device supports it (default 48 kHz: no resampling).
    /// Other rates are converted with rubato on the engine thread.
    pub preferred_device_rate: u32,
    /// Fixed capture buffer in frames, if the device accepts it (default 480); `None` lets the
    /// backend choose. A refused size falls back to the backend's choice. (On PulseAudio the
    /// capture stream is our own, with 10 ms blocks; see `pulse_capture`.)
    pub device_buffer_frames: Option<u32>,
    /// Fixed playback buffer in frames (default 240, 5 ms): on PulseAudio the server keeps two
    /// of them for our stream, and our queue in front of it follows the callback size. Through
    /// PulseAudio devices 240 instead of 480 took mouth to ear from 102-104 ms to 86 ms with
    /// PESQ-WB unchanged (4.16 against 4.05-4.07); 120 left audible underruns (3.67).
    pub playback_buffer_frames: Option<u32>,
    /// Audio kept queued on the device side of playback, in milliseconds (default 10); more
    /// is kept automatically when the device's callbacks are larger (two callbacks).
    pub playback_queue_ms: u32,
    /// Capacity of the event channel; events beyond it are dropped (default 64).
    pub event_capacity: usize,
    /// Called by the device thread after it moved samples through a ring (new capture samples,
    /// or playback samples taken), so the ring's reader or writer can sleep until then instead
    /// of polling. Never called from a device callback.
    pub ring_wake: Option<RingWake>,
}

/// A thread-safe "the rings moved" notification (the voice thread passes its poll waker).
#[derive(Clone)]
pub struct RingWake(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for RingWake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingWake")
    }
}

impl PartialEq for RingWake {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            host: AudioHost::Auto,
            capture_ring_samples: 9_600,
            playback_ring_samples: 9_600,
            preferred_device_rate: SAMPLE_RATE,
            device_buffer_frames: Some(480),
            playback_buffer_frames: Some(240),
            playback_queue_ms: 10,
            event_capacity: 64,
            ring_wake: None,
        }
    }
}

/// Lock-free counters shared by the engine and the device callbacks.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) capture_overrun_samples: AtomicU64,
    pub(super) playback_underrun_samples: AtomicU64,
    pub(super) device_xruns: AtomicU64,
    pub(super) device_errors: AtomicU64,
    pub(super) paced_chunks_skipped: AtomicU64,
    pub(super) stream_restarts: AtomicU64,
    pub(super) devices_lost: AtomicU64,
    pub(super) capture_block_max_frames: AtomicU64,
    pub(super) capture_missing_ms: AtomicU64,
    pub(super) playback_block_max_frames: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> AudioStats {
        AudioStats {
            capture_overrun_samples: self.capture_overrun_samples.load(Ordering::Relaxed),
            playback_underrun_samples: self.playback_underrun_samples.load(Ordering::Relaxed),
            device_xruns: self.device_xruns.load(Ordering::Relaxed),
            device_errors: self.device_errors.load(Ordering::Relaxed),
            paced_chunks_skipped: self.paced_chunks_skipped.load(Ordering::Relaxed),
            stream_restarts: self.stream_restarts.load(Ordering::Relaxed),
            devices_lost: self.devices_lost.load(Ordering::Relaxed),
            capture_block_max_frames: self.capture_block_max_frames.load(Ordering::Relaxed),
            capture_missing_ms: self.capture_missing_ms.load(Ordering::Relaxed),
            playback_block_max_frames: self.playback_block_max_frames.load(Ordering::Relaxed),
        }
    }
}

/// Status reports from the audio engine, for the UI and logs.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioEvent {
    /// The engine runs; descriptions of the active input and output.
    Started {
        input_desc: String,
        output_desc: String,
    },
    /// No capture device could be opened; the capture ring stays empty.
    NoMicrophone(String),
    /// No playback device could be opened; playback is discarded at the real-time pace.
    NoSpeaker(String),
    /// The input was switched; description of the new one.
    InputChanged(String),
    /// The output was switched; description of the new one.
    OutputChanged(String),
    /// A device failed while running (e.g. unplugged) and was closed. Input falls back to
    /// nothing, output to the null sink; the engine tries to reopen the device every second
    /// until it works ([`AudioEvent::DeviceRestored`]) or the user switches.
    DeviceLost { which: Direction, reason: String },
    /// A lost device was reopened; description of it.
    DeviceRestored { which: Direction, desc: String },
    /// A device picked by name was lost and could not be reopened (unplugged): the system
    /// default took its place (`desc`). Switching to `lost` again brings it back.
    FellBackToDefault {
        which: Direction,
        lost: String,
        desc: String,
    },
    /// A switch asked for with [`AudioIo::request_input`] / [`AudioIo::request_output`]
    /// failed; the previous device keeps running (or the fallback, as after a failed switch).
    SwitchFailed { which: Direction, reason: String },
    /// A non-fatal backend report (e.g. the default route changed).
    DeviceWarning { which: Direction, reason: String },
    /// Glitch counters changed (sent at most once a second).
    Counters(AudioStats),
}

/// Errors at the edge of the audio module, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// A WAV file could not be read or written.
    #[error("WAV file {path}: {source}")]
    Wav {
        path: PathBuf,
        #[source]
        source: hound::Error,
    },
    /// No device matched.
    #[error("{0}")]
    NoDevice(String),
    /// A device exists but could not be used.
    #[error("audio device \"{device}\": {reason}")]
    Device { device: String, reason: String },
    /// The audio system itself could not be queried.
    #[error("audio system unavailable: {0}")]
    Host(String),
    /// A sample-rate converter could not be built.
    #[error("resampler: {0}")]
    Resampler(String),
    /// The engine thread is gone (stopped, or it crashed).
    #[error("the audio engine is not running")]
    EngineStopped,
}

/// A running audio path: one input, one output, the two rings between them and the voice
/// thread, and an event stream.
///
/// Invariants: the rings handed out by [`AudioIo::take_capture`] / [`AudioIo::take_playback`]
/// stay valid and keep flowing across [`AudioIo::switch_input`] / [`AudioIo::switch_output`];
/// after [`AudioIo::stop`] (or drop) all devices are closed and a WAV output is finalized.
pub struct AudioIo {
    capture: Option<CaptureRing>,
    playback: Option<PlaybackRing>,
    events: Receiver<AudioEvent>,
    commands: Sender<device_thread::Command>,
    engine: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl AudioIo {
    /// Starts the engine with `input` and `output`.
    ///
    /// Device problems are not errors: they become [`AudioEvent::NoMicrophone`] /
    /// [`AudioEvent::NoSpeaker`]. Errors are for things the user asked for explicitly and that
    /// cannot work: an unreadable input WAV, an uncreatable output WAV.
    pub fn start(
        input: &InputSource,
        output: &OutputSink,
        cfg: AudioConfig,
    ) -> Result<AudioIo, AudioError> {
        let (capture_prod, capture_cons) = ring::sample_ring(cfg.capture_ring_samples);
        let (playback_prod, playback_cons) = ring::sample_ring(cfg.playback_ring_samples);
        let (event_tx, events) = crossbeam_channel::bounded(cfg.event_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let (handle, commands) = device_thread::spawn(device_thread::EngineParts {
            input: input.clone(),
            output: output.clone(),
            cfg,
            capture_prod,
            playback_cons,
            events: event_tx,
            counters: Arc::clone(&counters),
        })?;
        Ok(AudioIo {
            capture: Some(CaptureRing::new(capture_cons)),
            playback: Some(PlaybackRing::new(playback_prod)),
            events,
            commands,
            engine: Some(handle),
            counters,
        })
    }

    /// Hands the capture ring to its single reader (the voice thread); `None` if already taken.
    pub fn take_capture(&mut self) -> Option<CaptureRing> {
        self.capture.take()
    }

    /// Hands the playback ring to its single writer (the voice thread); `None` if already taken.
    pub fn take_playback(&mut self) -> Option<PlaybackRing> {
        self.playback.take()
    }

    /// The capture ring, while not taken.
    pub fn capture_mut(&mut self) -> Option<&mut CaptureRing> {
        self.capture.as_mut()
    }

    /// The playback ring, while not taken.
    pub fn playback_mut(&mut self) -> Option<&mut PlaybackRing> {
        self.playback.as_mut()
    }

    /// Status events; the receiver can be cloned and moved to another thread.
    pub fn events(&self) -> &Receiver<AudioEvent> {
        &self.events
    }

    /// Current glitch counters.
    pub fn stats(&self) -> AudioStats {
        self.counters.snapshot()
    }

    /// Replaces the input; returns the new input's description. On failure the previous input
    /// keeps running (or, if it cannot be reopened, input becomes nothing with a
    /// [`AudioEvent::NoMicrophone`]). The capture ring stays the same object.
    pub fn switch_input(&self, input: InputSource) -> Result<String, AudioError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(device_thread::Command::SwitchInput(input, Some(reply)))?;
        answer.recv().map_err(|_| AudioError::EngineStopped)?
    }

    /// Asks for another input without waiting: the outcome arrives as
    /// [`AudioEvent::InputChanged`] or [`AudioEvent::SwitchFailed`]. Opening a device can take
    /// seconds; a caller with a call to keep going (the voice thread) must not wait for it.
    pub fn request_input(&self, input: InputSource) -> Result<(), AudioError> {
        self.send(device_thread::Command::SwitchInput(input, None))
    }

    /// Replaces the output (finalizing a WAV output); returns the new output's description.
    /// On failure the previous output keeps running (or playback falls back to the null sink
    /// with a [`AudioEvent::NoSpeaker`]). The playback ring stays the same object.
    pub fn switch_output(&self, output: OutputSink) -> Result<String, AudioError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(device_thread::Command::SwitchOutput(output, Some(reply)))?;
        answer.recv().map_err(|_| AudioError::EngineStopped)?
    }

    /// Asks for another output without waiting: the outcome arrives as
    /// [`AudioEvent::OutputChanged`] or [`AudioEvent::SwitchFailed`].
    pub fn request_output(&self, output: OutputSink) -> Result<(), AudioError> {
        self.send(device_thread::Command::SwitchOutput(output, None))
    }

    /// Closes devices, finalizes a WAV output and joins the engine thread. Idempotent; also
    /// done on drop (where errors are ignored).
    pub fn stop(&mut self) -> Result<(), AudioError> {
        let Some(handle) = self.engine.take() else {
            return Ok(());
        };
        let (reply, answer) = crossbeam_channel::bounded(1);
        let result = match self.commands.send(device_thread::Command::Stop(reply)) {
            Ok(()) => answer.recv().unwrap_or(Err(AudioError::EngineStopped)),
            Err(_) => Err(AudioError::EngineStopped),
        };
        let _ = handle.join();
        result
    }

    fn send(&self, cmd: device_thread::Command) -> Result<(), AudioError> {
        if self.engine.is_none() {
            return Err(AudioError::EngineStopped);
        }
        self.commands
            .send(cmd)
            .map_err(|_| AudioError::EngineStopped)
    }
}

impl Drop for AudioIo {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::goertzel_amplitude;
    use std::path::Path;
    use std::time::{Duration, Instant};

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("p2p-voice-io-{}-{name}", std::process::id()))
    }

    fn wav_len(path: &Path) -> u32 {
        hound::WavReader::open(path).unwrap().duration()
    }

    fn drain_events(io: &AudioIo) -> Vec<AudioEvent> {
        io.events().try_iter().collect()
    }

    const _: () = {
        const fn assert_send<T: Send>() {}
        assert_send::<AudioIo>();
        assert_send::<CaptureRing>();
        assert_send::<PlaybackRing>();
    };

    #[test]
    fn tone_looped_through_to_a_wav_output_lasts_as_long_as_the_run() {
        let path = temp_path("loop.wav");
        let mut io = AudioIo::start(
            &InputSource::Tone {
                hz: 440.0,
                amplitude: 0.5,
            },
            &OutputSink::Wav(path.clone()),
            AudioConfig::default(),
        )
        .unwrap();
        let mut cap = io.take_capture().unwrap();
        let mut play = io.take_playback().unwrap();
        assert!(io.take_capture().is_none());
        let start = Instant::now();
        let mut buf = [0.0f32; 480];
        while start.elapsed() < Duration::from_millis(600) {
            let n = cap.pop_into(&mut buf);
            play.push(&buf[..n]);
            std::thread::sleep(Duration::from_millis(2));
        }
        io.stop().unwrap();
        let elapsed = start.elapsed().as_secs_f64();
        let written = wav_len(&path) as f64;
        let expected = elapsed * 48_000.0;
        assert!(
            (written - expected).abs() < expected * 0.5,
            "wrote {written} samples in {elapsed:.3} s"
        );
        let samples: Vec<f32> = hound::WavReader::open(&path)
            .unwrap()
            .samples::<i16>()
            .map(|s| f32::from(s.unwrap()) / 32768.0)
            .collect();
        std::fs::remove_file(&path).ok();
        // Judge the middle of the run in 100 ms blocks: a loaded machine may starve the copy
        // loop at the edges, which is not what this test is about.
        let middle = &samples[samples.len() / 4..samples.len() * 3 / 4];
        let blocks: Vec<f32> = middle
            .chunks(4800)
            .map(|b| goertzel_amplitude(b, 440.0, SAMPLE_RATE))
            .collect();
        let amp = blocks.iter().sum::<f32>() / blocks.len().max(1) as f32;
        assert!(amp > 0.2, "440 Hz amplitude in output {amp}");
    }

    #[test]
    fn missing_devices_are_reported_not_fatal_and_playback_is_still_drained() {
        let mut io = AudioIo::start(
            &InputSource::Device(Some("no-such-microphone-xyz".into())),
            &OutputSink::Device(Some("no-such-speaker-xyz".into())),
            AudioConfig::default(),
        )
        .unwrap();
        let events = drain_events(&io);
        assert!(
            events.iter().any(
                |e| matches!(e, AudioEvent::NoMicrophone(r) if r.contains("no-such-microphone-xyz"))
            ),
            "{events:?}"
        );
        assert!(
            events.iter().any(|e| matches!(e, AudioEvent::NoSpeaker(_))),
            "{events:?}"
        );
        assert!(
            matches!(events.last(), Some(AudioEvent::Started { .. })),
            "{events:?}"
        );
        let play = io.playback_mut().unwrap();
        assert_eq!(play.push(&[0.1; 960]), 960);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(io.playback_mut().unwrap().queued(), 0);
        assert_eq!(io.capture_mut().unwrap().available(), 0);
        io.stop().unwrap();
    }

    #[test]
    fn unreadable_input_wav_is_an_error_at_start() {
        let err = AudioIo::start(
            &InputSource::Wav {
                path: "/nonexistent/in.wav".into(),
                looped: false,
            },
            &OutputSink::Null,
            AudioConfig::default(),
        )
        .err()
        .expect("start must fail");
        assert!(matches!(err, AudioError::Wav { .. }), "{err}");
    }

    #[test]
    fn switching_input_keeps_the_same_capture_ring_flowing() {
        let mut io = AudioIo::start(
            &InputSource::Silence,
            &OutputSink::Null,
            AudioConfig::default(),
        )
        .unwrap();
        let mut cap = io.take_capture().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = vec![0.0f32; 9600];
        let n = cap.pop_into(&mut buf);
        assert!(n > 0 && buf[..n].iter().all(|&s| s == 0.0));
        let desc = io
            .switch_input(InputSource::Tone {
                hz: 1000.0,
                amplitude: 0.7,
            })
            .unwrap();
        assert!(desc.contains("1000"), "{desc}");
        std::thread::sleep(Duration::from_millis(150));
        let n = cap.pop_into(&mut buf);
        assert!(n >= 4800, "only {n} samples after the switch");
        let amp = goertzel_amplitude(&buf[n - 4800..n], 1000.0, SAMPLE_RATE);
        assert!(amp > 0.6, "tone amplitude {amp}");
        assert!(drain_events(&io)
            .iter()
            .any(|e| matches!(e, AudioEvent::InputChanged(_))));
        io.stop().unwrap();
    }

    #[test]
    fn failed_input_switch_keeps_the_previous_input() {
        let mut io = AudioIo::start(
            &InputSource::Tone {
                hz: 500.0,
                amplitude: 0.5,
            },
            &OutputSink::Null,
            AudioConfig::default(),
        )
        .unwrap();
        let result = io.switch_input(InputSource::Wav {
            path: "/nonexistent/x.wav".into(),
            looped: true,
        });
        assert!(result.is_err());
        let cap = io.capture_mut().unwrap();
        cap.clear();
        std::thread::sleep(Duration::from_millis(100));
        assert!(io.capture_mut().unwrap().available() >= 480);
        io.stop().unwrap();
    }

    /// The voice thread asks for switches without waiting; it learns the outcome from events,
    /// and a failed request leaves the old input running.
    #[test]
    fn a_requested_switch_reports_its_outcome_as_an_event() {
        let mut io = AudioIo::start(
            &InputSource::Tone {
                hz: 500.0,
                amplitude: 0.5,
            },
            &OutputSink::Null,
            AudioConfig::default(),
        )
        .unwrap();
        let next_switch_event = |io: &AudioIo| loop {
            match io.events().recv_timeout(Duration::from_secs(5)) {
                Ok(e @ (AudioEvent::SwitchFailed { .. } | AudioEvent::InputChanged(_))) => {
                    return e
                }
                Ok(_) => continue,
                Err(e) => panic!("no outcome of the switch: {e}"),
            }
        };
        io.request_input(InputSource::Wav {
            path: "/nonexistent/x.wav".into(),
            looped: true,
        })
        .unwrap();
        assert!(matches!(
            next_switch_event(&io),
            AudioEvent::SwitchFailed {
                which: Direction::Input,
                ..
            }
        ));
        io.capture_mut().unwrap().clear();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            io.capture_mut().unwrap().available() >= 480,
            "old input runs"
        );
        io.request_input(InputSource::Silence).unwrap();
        assert!(matches!(
            next_switch_event(&io),
            AudioEvent::InputChanged(_)
        ));
        io.stop().unwrap();
        assert!(io.request_input(InputSource::Silence).is_err());
    }

    #[test]
    fn wav_output_is_finalized_when_switched_away_and_on_drop() {
        let first = temp_path("first.wav");
        let second = temp_path("second.wav");
        let io = AudioIo::start(
            &InputSource::Silence,
            &OutputSink::Wav(first.clone()),
            AudioConfig::default(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        io.switch_output(OutputSink::Wav(second.clone())).unwrap();
        assert!(wav_len(&first) >= 480, "first file finalized with audio");
        std::thread::sleep(Duration::from_millis(100));
        drop(io);
        assert!(wav_len(&second) >= 480, "second file finalized on drop");
        std::fs::remove_file(&first).ok();
        std::fs::remove_file(&second).ok();
    }

    #[test]
    fn stop_is_idempotent_and_later_switches_fail_cleanly() {
        let mut io = AudioIo::start(
            &InputSource::Silence,
            &OutputSink::Null,
            AudioConfig::default(),
        )
        .unwrap();
        io.stop().unwrap();
        io.stop().unwrap();
        assert!(matches!(
            io.switch_input(InputSource::Silence),
            Err(AudioError::EngineStopped)
        ));
    }
}
