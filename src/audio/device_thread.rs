//! The device thread: owns the backends, paces virtual devices, bridges devices to the rings.
//!
//! cpal streams are not `Send`, so they are created, kept and dropped here. The engine wakes
//! at each virtual device's 10 ms deadline and every couple of milliseconds while a real
//! device is open, and handles commands (switch, stop) in between.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ringbuf::traits::{Consumer, Observer, Producer};
use ringbuf::{HeapCons, HeapProd};

use super::cpal_backend::{InputDevice, Liveness, OutputDevice, STALL_LIMIT};
use super::file::{WavSink, WavSource};
use super::pacer::Pacer;
use super::tone::ToneGenerator;
use super::{
    AudioConfig, AudioError, AudioEvent, AudioStats, Counters, Direction, InputSource, OutputSink,
    CHUNK_SAMPLES, SAMPLE_RATE,
};

/// Period of virtual devices.
const CHUNK_PERIOD: Duration = Duration::from_millis(10);
/// Most chunks a virtual device replays at once after a stall (200 ms).
const MAX_BURST: u64 = 20;
/// How often the engine bridges real devices to the rings.
const DEVICE_POLL: Duration = Duration::from_millis(2);
/// Delay before reopening a device that failed while running.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// How often changed counters are reported.
const STATS_PERIOD: Duration = Duration::from_secs(1);

type Reply<T> = Sender<Result<T, AudioError>>;

/// Requests from [`super::AudioIo`] to the engine thread. A switch either carries a reply
/// channel (the caller waits) or none: then the outcome arrives as an event
/// ([`AudioEvent::InputChanged`] / [`AudioEvent::OutputChanged`] or
/// [`AudioEvent::SwitchFailed`]), so the voice thread never waits while devices are
/// enumerated and opened (which can take seconds).
pub(super) enum Command {
    SwitchInput(InputSource, Option<Reply<String>>),
    SwitchOutput(OutputSink, Option<Reply<String>>),
    Stop(Reply<()>),
}

/// Everything the engine thread needs at start.
pub(super) struct EngineParts {
    pub(super) input: InputSource,
    pub(super) output: OutputSink,
    pub(super) cfg: AudioConfig,
    pub(super) capture_prod: HeapProd<f32>,
    pub(super) playback_cons: HeapCons<f32>,
    pub(super) events: Sender<AudioEvent>,
    pub(super) counters: Arc<Counters>,
}

/// Starts the engine thread and waits until its initial input and output are set up.
pub(super) fn spawn(parts: EngineParts) -> Result<(JoinHandle<()>, Sender<Command>), AudioError> {
    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let handle = std::thread::Builder::new()
        .name("audio-engine".into())
        .spawn(move || match Engine::new(parts) {
            Ok(engine) => {
                let _ = ready_tx.send(Ok(()));
                engine.run(cmd_rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| AudioError::Host(format!("cannot start the audio thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((handle, cmd_tx)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(AudioError::EngineStopped)
        }
    }
}

enum VirtualSource {
    Wav(WavSource),
    Tone(ToneGenerator),
    Silence,
}

impl VirtualSource {
    fn fill(&mut self, out: &mut [f32]) {
        match self {
            VirtualSource::Wav(w) => w.fill(out),
            VirtualSource::Tone(t) => t.fill(out),
            VirtualSource::Silence => out.fill(0.0),
        }
    }
}

enum Capture {
    /// No input: the capture ring stays empty.
    Missing,
    Virtual {
        source: VirtualSource,
        pacer: Pacer,
    },
    Device(Box<InputDevice>),
}

enum VirtualSink {
    Wav(WavSink),
    Null,
}

enum Playback {
    Virtual { sink: VirtualSink, pacer: Pacer },
    Device(Box<OutputDevice>),
}

impl Playback {
    fn null() -> Self {
        Playback::Virtual {
            sink: VirtualSink::Null,
            pacer: Pacer::new(Instant::now(), CHUNK_PERIOD, MAX_BURST),
        }
    }

    /// Closes the output; a WAV file gets its final header.
    fn close(self) -> Result<(), AudioError> {
        match self {
            Playback::Virtual {
                sink: VirtualSink::Wav(mut w),
                ..
            } => w.finalize().map(|_| ()),
            _ => Ok(()),
        }
    }
}

struct Engine {
    cfg: AudioConfig,
    events: Sender<AudioEvent>,
    counters: Arc<Counters>,
    capture_prod: HeapProd<f32>,
    playback_cons: HeapCons<f32>,
    input: InputSource,
    output: OutputSink,
    capture: Capture,
    playback: Playback,
    chunk: Vec<f32>,
    last_stats: AudioStats,
    next_stats: Instant,
    /// When to try reopening a lost input device (only while `input` is a device).
    reopen_input_at: Option<Instant>,
    /// When to try reopening a lost output device (only while `output` is a device).
    reopen_output_at: Option<Instant>,
}

impl Engine {
    fn new(parts: EngineParts) -> Result<Self, AudioError> {
        let mut engine = Engine {
            cfg: parts.cfg,
            events: parts.events,
            counters: parts.counters,
            capture_prod: parts.capture_prod,
            playback_cons: parts.playback_cons,
            input: parts.input.clone(),
            output: parts.output.clone(),
            capture: Capture::Missing,
            playback: Playback::null(),
            chunk: vec![0.0; CHUNK_SAMPLES],
            last_stats: AudioStats::default(),
            next_stats: Instant::now() + STATS_PERIOD,
            reopen_input_at: None,
            reopen_output_at: None,
        };
        let input_desc = match engine.open_capture(&parts.input) {
            Ok((capture, desc)) => {
                engine.capture = capture;
                desc
            }
            Err(e) if matches!(parts.input, InputSource::Device(_)) => {
                engine.emit(AudioEvent::NoMicrophone(e.to_string()));
                format!("none ({e})")
            }
            Err(e) => return Err(e),
        };
        let output_desc = match engine.open_playback(&parts.output) {
            Ok((playback, desc)) => {
                engine.playback = playback;
                desc
            }
            Err(e) if matches!(parts.output, OutputSink::Device(_)) => {
                engine.emit(AudioEvent::NoSpeaker(e.to_string()));
                format!("null sink ({e})")
            }
            Err(e) => return Err(e),
        };
        engine.emit(AudioEvent::Started {
            input_desc,
            output_desc,
        });
        Ok(engine)
    }

    fn emit(&self, event: AudioEvent) {
        if matches!(event, AudioEvent::DeviceLost { .. }) {
            self.counters.devices_lost.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.events.try_send(event);
    }

    fn open_capture(&self, src: &InputSource) -> Result<(Capture, String), AudioError> {
        let pacer = || Pacer::new(Instant::now(), CHUNK_PERIOD, MAX_BURST);
        Ok(match src {
            InputSource::Device(name) => {
                let dev =
                    InputDevice::open(name.as_deref(), &self.cfg, &self.events, &self.counters)?;
                let desc = dev.desc().to_string();
                (Capture::Device(Box::new(dev)), desc)
            }
            InputSource::Wav { path, looped } => (
                Capture::Virtual {
                    source: VirtualSource::Wav(WavSource::open(path, *looped)?),
                    pacer: pacer(),
                },
                format!(
                    "WAV file {}{}",
                    path.display(),
                    if *looped { " (looped)" } else { "" }
                ),
            ),
            InputSource::Tone { hz, amplitude } => (
                Capture::Virtual {
                    source: VirtualSource::Tone(ToneGenerator::new(*hz, *amplitude, SAMPLE_RATE)),
                    pacer: pacer(),
                },
                format!("tone {hz} Hz at amplitude {amplitude}"),
            ),
            InputSource::Silence => (
                Capture::Virtual {
                    source: VirtualSource::Silence,
                    pacer: pacer(),
                },
                "silence".to_string(),
            ),
        })
    }

    fn open_playback(&self, sink: &OutputSink) -> Result<(Playback, String), AudioError> {
        Ok(match sink {
            OutputSink::Device(name) => {
                let dev =
                    OutputDevice::open(name.as_deref(), &self.cfg, &self.events, &self.counters)?;
                let desc = dev.desc().to_string();
                (Playback::Device(Box::new(dev)), desc)
            }
            OutputSink::Wav(path) => (
                Playback::Virtual {
                    sink: VirtualSink::Wav(WavSink::create(path)?),
                    pacer: Pacer::new(Instant::now(), CHUNK_PERIOD, MAX_BURST),
                },
                format!("WAV file {}", path.display()),
            ),
            OutputSink::Null => (Playback::null(), "null sink".to_string()),
        })
    }

    fn run(mut self, commands: Receiver<Command>) {
        loop {
            self.service(Instant::now());
            let wait = self.next_wake().saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(Command::SwitchInput(src, reply)) => {
                    let result = self.switch_input(src);
                    self.answer(Direction::Input, result, reply);
                }
                Ok(Command::SwitchOutput(sink, reply)) => {
                    let result = self.switch_output(sink);
                    self.answer(Direction::Output, result, reply);
                }
                Ok(Command::Stop(reply)) => {
                    let _ = reply.send(self.shutdown());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.shutdown();
                    return;
                }
            }
        }
    }

    /// Hands a switch's outcome to whoever waits for it, or reports a failure as an event
    /// (success already emitted `InputChanged` / `OutputChanged`).
    fn answer(
        &self,
        which: Direction,
        result: Result<String, AudioError>,
        reply: Option<Reply<String>>,
    ) {
        match (reply, result) {
            (Some(reply), result) => {
                let _ = reply.send(result);
            }
            (None, Ok(_)) => {}
            (None, Err(e)) => self.emit(AudioEvent::SwitchFailed {
                which,
                reason: e.to_string(),
            }),
        }
    }

    fn switch_input(&mut self, src: InputSource) -> Result<String, AudioError> {
        // A device may allow only one open stream, so close ours before reopening one.
        if matches!(src, InputSource::Device(_)) && matches!(self.capture, Capture::Device(_)) {
            self.capture = Capture::Missing;
        }
        match self.open_capture(&src) {
            Ok((capture, desc)) => {
                self.capture = capture;
                self.input = src;
                self.reopen_input_at = None;
                self.emit(AudioEvent::InputChanged(desc.clone()));
                Ok(desc)
            }
            Err(e) => {
                if matches!(self.capture, Capture::Missing) {
                    let previous = self.input.clone();
                    match self.open_capture(&previous) {
                        Ok((capture, _)) => self.capture = capture,
                        Err(again) => self.emit(AudioEvent::NoMicrophone(again.to_string())),
                    }
                }
                Err(e)
            }
        }
    }

    fn switch_output(&mut self, sink: OutputSink) -> Result<String, AudioError> {
        let reopen_same_kind = matches!(
            (&sink, &self.playback),
            (OutputSink::Device(_), Playback::Device(_))
        ) || matches!(
            (&sink, &self.playback),
            (
                OutputSink::Wav(_),
                Playback::Virtual {
                    sink: VirtualSink::Wav(_),
                    ..
                }
            )
        );
        let mut closed = false;
        if reopen_same_kind {
            let old = std::mem::replace(&mut self.playback, Playback::null());
            self.report_close(old);
            closed = true;
        }
        match self.open_playback(&sink) {
            Ok((playback, desc)) => {
                let old = std::mem::replace(&mut self.playback, playback);
                self.report_close(old);
                self.output = sink;
                self.reopen_output_at = None;
                self.emit(AudioEvent::OutputChanged(desc.clone()));
                Ok(desc)
            }
            Err(e) => {
                if closed {
                    let previous = self.output.clone();
                    match self.open_playback(&previous) {
                        Ok((playback, _)) => self.playback = playback,
                        Err(again) => self.emit(AudioEvent::NoSpeaker(again.to_string())),
                    }
                }
                Err(e)
            }
        }
    }

    fn report_close(&self, old: Playback) {
        if let Err(e) = old.close() {
            self.emit(AudioEvent::DeviceLost {
                which: Direction::Output,
                reason: e.to_string(),
            });
        }
    }

    fn shutdown(&mut self) -> Result<(), AudioError> {
        self.capture = Capture::Missing;
        std::mem::replace(&mut self.playback, Playback::null()).close()
    }

    /// Does all work that is due at `now`.
    fn service(&mut self, now: Instant) {
        let moved = (
            self.capture_prod.occupied_len(),
            self.playback_cons.occupied_len(),
        );
        self.service_devices(now);
        let after = (
            self.capture_prod.occupied_len(),
            self.playback_cons.occupied_len(),
        );
        if after.0 > moved.0 || after.1 < moved.1 {
            if let Some(wake) = &self.cfg.ring_wake {
                (wake.0)();
            }
        }
    }

    fn service_devices(&mut self, now: Instant) {
        let counters = &*self.counters;
        let mut capture_lost = false;
        let mut stalled: Vec<Direction> = Vec::new();
        let mut restart: Vec<Direction> = Vec::new();
        match &mut self.capture {
            Capture::Missing => {}
            Capture::Virtual { source, pacer } => {
                let skipped = pacer.skipped();
                for _ in 0..pacer.due(now) {
                    source.fill(&mut self.chunk);
                    let pushed = self.capture_prod.push_slice(&self.chunk);
                    let dropped = (self.chunk.len() - pushed) as u64;
                    if dropped > 0 {
                        counters
                            .capture_overrun_samples
                            .fetch_add(dropped, Ordering::Relaxed);
                    }
                }
                counters
                    .paced_chunks_skipped
                    .fetch_add(pacer.skipped() - skipped, Ordering::Relaxed);
            }
            Capture::Device(dev) => match dev.liveness(now) {
                Liveness::Alive => dev.pump(&mut self.capture_prod, counters, now),
                // DeviceLost was already sent by the stream's error callback.
                Liveness::Lost => capture_lost = true,
                Liveness::Stalled => {
                    capture_lost = true;
                    stalled.push(Direction::Input);
                }
                Liveness::Failing => restart.push(Direction::Input),
            },
        }
        if capture_lost {
            self.capture = Capture::Missing;
            self.reopen_input_at = Some(now + REOPEN_DELAY);
        }

        let mut playback_failure = None;
        match &mut self.playback {
            Playback::Virtual { sink, pacer } => {
                let skipped = pacer.skipped();
                for _ in 0..pacer.due(now) {
                    let got = self.playback_cons.pop_slice(&mut self.chunk);
                    if got < self.chunk.len() {
                        self.chunk[got..].fill(0.0);
                        counters
                            .playback_underrun_samples
                            .fetch_add((self.chunk.len() - got) as u64, Ordering::Relaxed);
                    }
                    if let VirtualSink::Wav(w) = sink {
                        if let Err(e) = w.write(&self.chunk) {
                            playback_failure = Some(e.to_string());
                            break;
                        }
                    }
                }
                counters
                    .paced_chunks_skipped
                    .fetch_add(pacer.skipped() - skipped, Ordering::Relaxed);
            }
            Playback::Device(dev) => match dev.liveness(now) {
                Liveness::Alive => dev.pump(&mut self.playback_cons),
                Liveness::Failing => {
                    dev.pump(&mut self.playback_cons);
                    restart.push(Direction::Output);
                }
                lost => {
                    if lost == Liveness::Stalled {
                        stalled.push(Direction::Output);
                    }
                    // Keep draining the ring at the real pace until the device is back.
                    self.playback = Playback::null();
                    self.reopen_output_at = Some(now + REOPEN_DELAY);
                }
            },
        }
        if let Some(reason) = playback_failure {
            let old = std::mem::replace(&mut self.playback, Playback::null());
            let _ = old.close();
            self.emit(AudioEvent::DeviceLost {
                which: Direction::Output,
                reason,
            });
        }

        for which in restart {
            self.restart_device(now, which);
        }
        for which in stalled {
            self.emit(AudioEvent::DeviceLost {
                which,
                reason: format!(
                    "the device stopped delivering audio for more than {} s",
                    STALL_LIMIT.as_secs()
                ),
            });
        }
        self.reopen_lost_devices(now);

        if now >= self.next_stats {
            self.next_stats = now + STATS_PERIOD;
            let stats = self.counters.snapshot();
            if stats != self.last_stats {
                self.last_stats = stats;
                self.emit(AudioEvent::Counters(stats));
            }
        }
    }

    /// Closes and reopens a device whose backend keeps reporting errors. Said as a warning
    /// when it works (the sound barely skips); a loss, with the usual retries, when not.
    fn restart_device(&mut self, now: Instant, which: Direction) {
        self.counters
            .stream_restarts
            .fetch_add(1, Ordering::Relaxed);
        let reopened = match which {
            Direction::Input => {
                self.capture = Capture::Missing;
                let input = self.input.clone();
                self.open_capture(&input).map(|(capture, desc)| {
                    self.capture = capture;
                    desc
                })
            }
            Direction::Output => {
                let _ = std::mem::replace(&mut self.playback, Playback::null()).close();
                let output = self.output.clone();
                self.open_playback(&output).map(|(playback, desc)| {
                    self.playback = playback;
                    desc
                })
            }
        };
        match reopened {
            Ok(desc) => self.emit(AudioEvent::DeviceWarning {
                which,
                reason: format!("restarted after repeated errors from the sound system: {desc}"),
            }),
            Err(e) => {
                match which {
                    Direction::Input => self.reopen_input_at = Some(now + REOPEN_DELAY),
                    Direction::Output => self.reopen_output_at = Some(now + REOPEN_DELAY),
                }
                self.emit(AudioEvent::DeviceLost {
                    which,
                    reason: format!("it kept failing and could not be reopened: {e}"),
                });
            }
        }
    }

    /// Tries to reopen devices that failed while running, every [`REOPEN_DELAY`] until it
    /// works or the user switches to something else. A device the user picked by name that
    /// cannot be reopened (unplugged) gives way to the system default at the first failed try
    /// ([`AudioEvent::FellBackToDefault`]): the call goes on through the default device, and
    /// retrying stops (each try enumerates devices on this thread, which would stall the
    /// running fallback). The user's choice is kept, so switching to it again when it comes
    /// back (the window does this when the device list shows it) needs nothing else.
    fn reopen_lost_devices(&mut self, now: Instant) {
        if self.reopen_input_at.is_some_and(|t| now >= t) {
            let input = self.input.clone();
            match self.open_capture(&input) {
                Ok((capture, desc)) => {
                    self.capture = capture;
                    self.reopen_input_at = None;
                    self.emit(AudioEvent::DeviceRestored {
                        which: Direction::Input,
                        desc,
                    });
                }
                Err(_) => {
                    self.reopen_input_at = Some(now + REOPEN_DELAY);
                    if let InputSource::Device(Some(lost)) = &input {
                        if let Ok((capture, desc)) = self.open_capture(&InputSource::Device(None)) {
                            self.capture = capture;
                            self.reopen_input_at = None;
                            self.emit(AudioEvent::FellBackToDefault {
                                which: Direction::Input,
                                lost: lost.clone(),
                                desc,
                            });
                        }
                    }
                }
            }
        }
        if self.reopen_output_at.is_some_and(|t| now >= t) {
            let output = self.output.clone();
            match self.open_playback(&output) {
                Ok((playback, desc)) => {
                    self.playback = playback;
                    self.reopen_output_at = None;
                    self.emit(AudioEvent::DeviceRestored {
                        which: Direction::Output,
                        desc,
                    });
                }
                Err(_) => {
                    self.reopen_output_at = Some(now + REOPEN_DELAY);
                    if let OutputSink::Device(Some(lost)) = &output {
                        if let Ok((playback, desc)) = self.open_playback(&OutputSink::Device(None))
                        {
                            self.playback = playback;
                            self.reopen_output_at = None;
                            self.emit(AudioEvent::FellBackToDefault {
                                which: Direction::Output,
                                lost: lost.clone(),
                                desc,
                            });
                        }
                    }
                }
            }
        }
    }

    /// The next instant at which [`Engine::service`] has work.
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = self.next_stats;
        for t in [self.reopen_input_at, self.reopen_output_at]
            .into_iter()
            .flatten()
        {
            wake = wake.min(t);
        }
        match &self.capture {
            Capture::Missing => {}
            Capture::Virtual { pacer, .. } => wake = wake.min(pacer.next_deadline()),
            Capture::Device(_) => wake = wake.min(now + DEVICE_POLL),
        }
        match &self.playback {
            Playback::Virtual { pacer, .. } => wake = wake.min(pacer.next_deadline()),
            Playback::Device(_) => wake = wake.min(now + DEVICE_POLL),
        }
        wake
    }
}
