//! Real devices through cpal: enumeration, opening, and the real-time callbacks.
//!
//! Callbacks only convert samples and move them through a lock-free ring at the device's own
//! rate (input: downmix to mono; output: mono copied to every channel). Resampling and the
//! bridge to the 48 kHz rings run on the engine thread via [`InputDevice::pump`] and
//! [`OutputDevice::pump`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{
    BufferSize, ErrorKind, FromSample, SampleFormat, SizedSample, StreamConfig,
    SupportedBufferSize, SupportedStreamConfig,
};
use crossbeam_channel::Sender;
use ringbuf::traits::{Consumer, Observer, Producer};
use ringbuf::{HeapCons, HeapProd};

use super::pulse_capture::{CaptureCounts, PulseCapture};
use super::resample::StreamResampler;
use super::ring::sample_ring;
use super::{AudioConfig, AudioError, AudioEvent, AudioHost, Counters, Direction, SAMPLE_RATE};

/// Samples converted per step inside a callback (a stack buffer: no allocation).
const CALLBACK_BLOCK: usize = 256;
/// How long a stream may take to start before we give up on it.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// One device as shown by `p2p-voice devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Stable identifier (on ALSA the PCM name, e.g. `default`, `pulse`, `hw:CARD=PCH,DEV=0`).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// True for the system default device of this direction.
    pub is_default: bool,
}

/// Input and output devices of one host, for choosing one by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceList {
    /// Name of the audio host (e.g. "ALSA").
    pub host: String,
    pub inputs: Vec<DeviceInfo>,
    pub outputs: Vec<DeviceInfo>,
}

/// Lists a host's capture and playback devices, marking the defaults.
pub fn list_devices(host: AudioHost) -> Result<DeviceList, AudioError> {
    let host = host.open()?;
    let default_in = host.default_input_device().and_then(|d| device_id(&d));
    let default_out = host.default_output_device().and_then(|d| device_id(&d));
    let describe = |d: cpal::Device, default: &Option<String>| {
        let id = device_id(&d).unwrap_or_default();
        DeviceInfo {
            name: device_name(&d),
            is_default: default.as_deref() == Some(id.as_str()),
            id,
        }
    };
    let inputs = host
        .input_devices()
        .map_err(|e| AudioError::Host(e.to_string()))?
        .map(|d| describe(d, &default_in))
        .collect();
    let outputs = host
        .output_devices()
        .map_err(|e| AudioError::Host(e.to_string()))?
        .map(|d| describe(d, &default_out))
        .collect();
    Ok(DeviceList {
        host: host.id().name().to_string(),
        inputs,
        outputs,
    })
}

fn device_host(d: &cpal::Device) -> Option<cpal::HostId> {
    d.id().ok().map(|id| id.host())
}

fn device_id(d: &cpal::Device) -> Option<String> {
    d.id().ok().map(|id| id.id().to_string())
}

fn device_name(d: &cpal::Device) -> String {
    d.description()
        .map(|desc| desc.name().to_string())
        .or_else(|_| d.id().map(|id| id.id().to_string()))
        .unwrap_or_else(|_| "unknown device".to_string())
}

/// The device to open, and the name of the host it is on (for its description).
fn find_device(
    host: AudioHost,
    name: Option<&str>,
    dir: Direction,
) -> Result<(cpal::Device, &'static str), AudioError> {
    let host = host.open()?;
    let host_name = host.id().name();
    let what = match dir {
        Direction::Input => "input",
        Direction::Output => "output",
    };
    let Some(wanted) = name else {
        let default = match dir {
            Direction::Input => host.default_input_device(),
            Direction::Output => host.default_output_device(),
        };
        return default.map(|d| (d, host_name)).ok_or_else(|| {
            AudioError::NoDevice(format!("no default {what} device on {host_name}"))
        });
    };
    let devices: Vec<cpal::Device> = match dir {
        Direction::Input => host.input_devices().map(|it| it.collect()),
        Direction::Output => host.output_devices().map(|it| it.collect()),
    }
    .map_err(|e| AudioError::Host(e.to_string()))?;
    let labels = |d: &cpal::Device| [device_id(d).unwrap_or_default(), device_name(d)];
    let exact = devices
        .iter()
        .position(|d| labels(d).iter().any(|l| l.eq_ignore_ascii_case(wanted)));
    let lower = wanted.to_lowercase();
    let partial = || {
        devices
            .iter()
            .position(|d| labels(d).iter().any(|l| l.to_lowercase().contains(&lower)))
    };
    match exact.or_else(partial) {
        Some(i) => Ok((
            devices.into_iter().nth(i).expect("index from position"),
            host_name,
        )),
        None => Err(AudioError::NoDevice(format!(
            "no {what} device named \"{wanted}\" (see `p2p-voice devices`)"
        ))),
    }
}

fn format_rank(f: SampleFormat) -> Option<u8> {
    Some(match f {
        SampleFormat::F32 => 0,
        SampleFormat::I16 => 1,
        SampleFormat::I32 => 2,
        SampleFormat::I24 => 3,
        SampleFormat::F64 => 4,
        SampleFormat::U16 => 5,
        SampleFormat::I8
        | SampleFormat::I64
        | SampleFormat::U8
        | SampleFormat::U24
        | SampleFormat::U32
        | SampleFormat::U64 => 6,
        _ => return None,
    })
}

/// Picks a stream config: the preferred rate if any supported range has it (best sample
/// format, channel count closest to the device default), else the device default.
fn choose_config(
    device: &cpal::Device,
    dir: Direction,
    preferred_rate: u32,
) -> Result<SupportedStreamConfig, AudioError> {
    let (default, ranges) = match dir {
        Direction::Input => (
            device.default_input_config(),
            device
                .supported_input_configs()
                .map(|r| r.collect::<Vec<_>>()),
        ),
        Direction::Output => (
            device.default_output_config(),
            device
                .supported_output_configs()
                .map(|r| r.collect::<Vec<_>>()),
        ),
    };
    let default_channels = default.as_ref().map(|c| c.channels()).unwrap_or(2);
    let best = ranges.unwrap_or_default().into_iter().filter_map(|r| {
        let rank = format_rank(r.sample_format())?;
        r.contains_rate(preferred_rate)
            .then(|| ((rank, r.channels().abs_diff(default_channels)), r))
    });
    if let Some((_, range)) = best.min_by_key(|(key, _)| *key) {
        return Ok(range.with_sample_rate(preferred_rate));
    }
    default.map_err(|e| AudioError::Device {
        device: device_name(device),
        reason: format!("no usable stream configuration: {e}"),
    })
}

/// State shared between a stream's callbacks and the engine thread (atomics only).
#[derive(Debug, Default)]
struct StreamShared {
    lost: AtomicBool,
    last_callback_frames: AtomicUsize,
    /// Callbacks so far: the engine's [`Watchdog`] checks that it keeps moving.
    callbacks: AtomicU64,
    /// Non-fatal errors the backend reported for this stream.
    errors: AtomicU64,
}

/// How long a running stream may go without a callback before it counts as lost.
pub(super) const STALL_LIMIT: Duration = Duration::from_secs(2);

/// Non-fatal backend errors within [`ERROR_WINDOW`] that make a stream worth restarting. A
/// healthy stream reports none; ALSA's PulseAudio plugin, once it starts failing
/// `snd_pcm_avail_delay` with EIO, reports thousands a second while cpal's worker spins.
const ERROR_BURST: u64 = 20;
const ERROR_WINDOW: Duration = Duration::from_secs(1);

/// What the engine thread learns when it looks at a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Liveness {
    Alive,
    /// The backend reported a fatal error; its `DeviceLost` event is already sent.
    Lost,
    /// No callback for [`STALL_LIMIT`] without any fatal error report: the engine says so.
    Stalled,
    /// Runs, but the backend keeps reporting errors ([`ERROR_BURST`] within
    /// [`ERROR_WINDOW`]): the engine restarts the stream quietly.
    Failing,
}

/// Notices a stream whose callbacks stopped without the backend saying so (a sound server
/// that hung, a driver that gave up after a "non-fatal" error). Pure: time is an argument.
#[derive(Debug, Clone)]
pub(super) struct Watchdog {
    seen: u64,
    progress_at: Instant,
    window_start: Instant,
    errors_at_window_start: u64,
}

impl Watchdog {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            seen: 0,
            progress_at: now,
            window_start: now,
            errors_at_window_start: 0,
        }
    }

    /// `errors` is the stream's count of non-fatal errors at `now`.
    pub(super) fn failing(&mut self, errors: u64, now: Instant) -> bool {
        let burst = errors.saturating_sub(self.errors_at_window_start) >= ERROR_BURST;
        if burst || now.saturating_duration_since(self.window_start) >= ERROR_WINDOW {
            self.window_start = now;
            self.errors_at_window_start = errors;
        }
        burst
    }

    /// `callbacks` is the stream's callback count at `now`.
    pub(super) fn stalled(&mut self, callbacks: u64, now: Instant) -> bool {
        if callbacks != self.seen {
            self.seen = callbacks;
            self.progress_at = now;
            return false;
        }
        now.saturating_duration_since(self.progress_at) > STALL_LIMIT
    }
}

impl StreamShared {
    fn liveness(&self, watchdog: &mut Watchdog, now: Instant) -> Liveness {
        if self.lost.load(Ordering::Acquire) {
            Liveness::Lost
        } else if watchdog.stalled(self.callbacks.load(Ordering::Relaxed), now) {
            Liveness::Stalled
        } else if watchdog.failing(self.errors.load(Ordering::Relaxed), now) {
            Liveness::Failing
        } else {
            Liveness::Alive
        }
    }
}

fn error_callback(
    which: Direction,
    shared: Arc<StreamShared>,
    counters: Arc<Counters>,
    events: Sender<AudioEvent>,
) -> impl FnMut(cpal::Error) + Send + 'static {
    move |err: cpal::Error| match err.kind() {
        ErrorKind::Xrun => {
            counters.device_xruns.fetch_add(1, Ordering::Relaxed);
        }
        ErrorKind::DeviceChanged | ErrorKind::RealtimeDenied => {
            let _ = events.try_send(AudioEvent::DeviceWarning {
                which,
                reason: err.to_string(),
            });
        }
        // The backend reports these while the stream keeps running (cpal's ALSA worker carries
        // on after them). One is no reason to cut the sound and show an error; a burst makes
        // the engine restart the stream quietly, and a stream that stops calling back is
        // caught by the watchdog (see `Liveness`).
        ErrorKind::BackendError | ErrorKind::Other | ErrorKind::DeviceBusy => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            counters.device_errors.fetch_add(1, Ordering::Relaxed);
        }
        // The rest end the stream: the device is gone or the stream cannot go on.
        _ => {
            if !shared.lost.swap(true, Ordering::AcqRel) {
                let _ = events.try_send(AudioEvent::DeviceLost {
                    which,
                    reason: err.to_string(),
                });
            }
        }
    }
}

fn describe(
    device: &cpal::Device,
    host_name: &str,
    config: &StreamConfig,
    format: SampleFormat,
) -> String {
    format!(
        "{} on {host_name} ({} Hz, {} ch, {format})",
        device_name(device),
        config.sample_rate,
        config.channels
    )
}

/// Dispatches a runtime [`SampleFormat`] to a concrete sample type named `$T` in `$body`.
macro_rules! with_sample_type {
    ($format:expr, $T:ident => $body:expr) => {
        match $format {
            SampleFormat::I8 => {
                type $T = i8;
                $body
            }
            SampleFormat::I16 => {
                type $T = i16;
                $body
            }
            SampleFormat::I24 => {
                type $T = cpal::I24;
                $body
            }
            SampleFormat::I32 => {
                type $T = i32;
                $body
            }
            SampleFormat::I64 => {
                type $T = i64;
                $body
            }
            SampleFormat::U8 => {
                type $T = u8;
                $body
            }
            SampleFormat::U16 => {
                type $T = u16;
                $body
            }
            SampleFormat::U24 => {
                type $T = cpal::U24;
                $body
            }
            SampleFormat::U32 => {
                type $T = u32;
                $body
            }
            SampleFormat::U64 => {
                type $T = u64;
                $body
            }
            SampleFormat::F32 => {
                type $T = f32;
                $body
            }
            SampleFormat::F64 => {
                type $T = f64;
                $body
            }
            other => Err(cpal::Error::with_message(
                ErrorKind::UnsupportedConfig,
                format!("sample format {other} is not supported"),
            )),
        }
    };
}

/// Builds a stream, first with the requested fixed buffer size and, if the device refuses it,
/// with the backend's default.
fn build_with_fallback<S>(
    config: &SupportedStreamConfig,
    buffer_frames: Option<u32>,
    mut build: impl FnMut(StreamConfig) -> Result<S, cpal::Error>,
) -> Result<(S, StreamConfig), cpal::Error> {
    let mut stream_config = config.config();
    if let (Some(frames), SupportedBufferSize::Range { min, max }) =
        (buffer_frames, config.buffer_size())
    {
        if (*min..=*max).contains(&frames) {
            stream_config.buffer_size = BufferSize::Fixed(frames);
            if let Ok(stream) = build(stream_config) {
                return Ok((stream, stream_config));
            }
        }
    }
    stream_config.buffer_size = BufferSize::Default;
    build(stream_config).map(|s| (s, stream_config))
}

/// An open capture stream plus the non-real-time half of its path to the capture ring.
///
/// Invariant: the callback is the only producer of `ring`, the engine thread its only consumer.
pub(super) struct InputDevice {
    /// When the first block arrived, and device frames delivered since (that block excluded):
    /// the audio a device should have delivered by now against what it did (see
    /// [`InputDevice::pump`]).
    first_block: Option<Instant>,
    delivered_frames: u64,
    device_rate: u32,
    _stream: CaptureStream,
    ring: HeapCons<f32>,
    resampler: StreamResampler,
    scratch: Vec<f32>,
    shared: Arc<StreamShared>,
    watchdog: Watchdog,
    desc: String,
}

impl InputDevice {
    /// Opens the default or named capture device and starts it.
    pub(super) fn open(
        name: Option<&str>,
        cfg: &AudioConfig,
        events: &Sender<AudioEvent>,
        counters: &Arc<Counters>,
    ) -> Result<Self, AudioError> {
        let (device, host_name) = find_device(cfg.host, name, Direction::Input)?;
        if device_host(&device) == Some(cpal::HostId::PulseAudio) {
            return Self::open_pulse(&device, counters);
        }
        let supported = choose_config(&device, Direction::Input, cfg.preferred_device_rate)?;
        let rate = supported.sample_rate();
        let channels = usize::from(supported.channels().max(1));
        let format = supported.sample_format();
        let shared = Arc::new(StreamShared::default());
        // Half a second at the device rate: far more than one callback, bounded latency.
        let capacity = (rate as usize / 2).max(4 * CALLBACK_BLOCK);
        let mut cons_slot = None;
        let (stream, config) = build_with_fallback(&supported, cfg.device_buffer_frames, |sc| {
            let (prod, cons) = sample_ring(capacity);
            let on_error = error_callback(
                Direction::Input,
                Arc::clone(&shared),
                Arc::clone(counters),
                events.clone(),
            );
            let shared = Arc::clone(&shared);
            let counters = Arc::clone(counters);
            let stream = with_sample_type!(format, T => device.build_input_stream::<T, _, _>(
                sc,
                capture_callback::<T>(channels, prod, shared, counters),
                on_error,
                Some(OPEN_TIMEOUT),
            ))?;
            cons_slot = Some(cons);
            Ok(stream)
        })
        .map_err(|e| AudioError::Device {
            device: device_name(&device),
            reason: e.to_string(),
        })?;
        stream.play().map_err(|e| AudioError::Device {
            device: device_name(&device),
            reason: e.to_string(),
        })?;
        let ring = cons_slot.expect("set by the successful build");
        Ok(Self {
            resampler: StreamResampler::new(rate, SAMPLE_RATE, rate as usize / 100)?,
            scratch: vec![0.0; capacity],
            desc: describe(&device, host_name, &config, format),
            first_block: None,
            delivered_frames: 0,
            device_rate: rate,
            _stream: CaptureStream::Cpal(stream),
            ring,
            shared,
            watchdog: Watchdog::new(Instant::now()),
        })
    }

    /// A PulseAudio source, recorded natively with small blocks and a large server buffer
    /// (see [`super::pulse_capture`] for why cpal's own stream is not used there).
    fn open_pulse(device: &cpal::Device, counters: &Arc<Counters>) -> Result<Self, AudioError> {
        let source = device_id(device).ok_or_else(|| AudioError::Device {
            device: device_name(device),
            reason: "PulseAudio source without a name".into(),
        })?;
        let shared = Arc::new(StreamShared::default());
        // Half a second, as for cpal streams; the blocks are 10 ms.
        let capacity = SAMPLE_RATE as usize / 2;
        let (prod, ring) = sample_ring(capacity);
        let counts = Arc::new(PulseCounts {
            shared: Arc::clone(&shared),
            counters: Arc::clone(counters),
        });
        let capture =
            PulseCapture::open(&source, &device_name(device), prod, counts, OPEN_TIMEOUT)?;
        Ok(Self {
            resampler: StreamResampler::new(SAMPLE_RATE, SAMPLE_RATE, SAMPLE_RATE as usize / 100)?,
            scratch: vec![0.0; capacity],
            desc: capture.desc().to_string(),
            first_block: None,
            delivered_frames: 0,
            device_rate: SAMPLE_RATE,
            _stream: CaptureStream::Pulse(capture),
            ring,
            shared,
            watchdog: Watchdog::new(Instant::now()),
        })
    }

    /// Human-readable description (name, rate, channels, format).
    pub(super) fn desc(&self) -> &str {
        &self.desc
    }

    /// Whether the stream still runs (see [`Liveness`]).
    pub(super) fn liveness(&mut self, now: Instant) -> Liveness {
        self.shared.liveness(&mut self.watchdog, now)
    }

    /// Moves everything captured so far to `out` at 48 kHz; samples that do not fit are
    /// dropped and counted as capture overruns. Also records how far the device has fallen
    /// behind real time since its first block (`capture_missing_ms`, the latest figure: a
    /// block that is merely late is made up when it comes): audio a device or its server
    /// threw away never shows up as an overrun here, only as time without samples.
    pub(super) fn pump(&mut self, out: &mut HeapProd<f32>, counters: &Counters, now: Instant) {
        loop {
            let n = self.ring.pop_slice(&mut self.scratch);
            if n == 0 {
                if let Some(first) = self.first_block {
                    let expected = now.saturating_duration_since(first).as_secs_f64();
                    let got = self.delivered_frames as f64 / f64::from(self.device_rate);
                    let missing_ms = ((expected - got) * 1000.0).max(0.0) as u64;
                    counters
                        .capture_missing_ms
                        .store(missing_ms, Ordering::Relaxed);
                }
                return;
            }
            match self.first_block {
                None => self.first_block = Some(now),
                Some(_) => self.delivered_frames += n as u64,
            }
            let mut dropped = 0;
            self.resampler.process(&self.scratch[..n], |block| {
                dropped += block.len() - out.push_slice(block);
            });
            if dropped > 0 {
                counters
                    .capture_overrun_samples
                    .fetch_add(dropped as u64, Ordering::Relaxed);
            }
        }
    }
}

/// What keeps a capture device running: a cpal stream, or our own PulseAudio record stream.
enum CaptureStream {
    Cpal(#[allow(dead_code)] cpal::Stream),
    Pulse(#[allow(dead_code)] PulseCapture),
}

/// The PulseAudio callback's counters: the watchdog's callback count and the glitch stats.
struct PulseCounts {
    shared: Arc<StreamShared>,
    counters: Arc<Counters>,
}

impl CaptureCounts for PulseCounts {
    fn delivered(&self, frames: usize, dropped: usize) {
        self.shared
            .last_callback_frames
            .store(frames, Ordering::Relaxed);
        self.shared.callbacks.fetch_add(1, Ordering::Relaxed);
        self.counters
            .capture_block_max_frames
            .fetch_max(frames as u64, Ordering::Relaxed);
        if dropped > 0 {
            self.counters
                .capture_overrun_samples
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }
}

/// The real-time capture callback: downmix to mono, push to the device ring. No allocation,
/// no locks, no blocking.
fn capture_callback<T>(
    channels: usize,
    mut prod: HeapProd<f32>,
    shared: Arc<StreamShared>,
    counters: Arc<Counters>,
) -> impl FnMut(&[T], &cpal::InputCallbackInfo) + Send + 'static
where
    T: SizedSample + Send + 'static,
    f32: FromSample<T>,
{
    move |data: &[T], _info| {
        let (frames, dropped) = downmix_into(data, channels, &mut prod);
        shared.last_callback_frames.store(frames, Ordering::Relaxed);
        shared.callbacks.fetch_add(1, Ordering::Relaxed);
        counters
            .capture_block_max_frames
            .fetch_max(frames as u64, Ordering::Relaxed);
        if dropped > 0 {
            counters
                .capture_overrun_samples
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }
}

/// Averages each interleaved frame of `data` to one mono `f32` and pushes it to `prod`.
/// Returns (frames seen, frames dropped because the ring was full). Real-time safe.
fn downmix_into<T>(data: &[T], channels: usize, prod: &mut HeapProd<f32>) -> (usize, usize)
where
    T: SizedSample,
    f32: FromSample<T>,
{
    let scale = 1.0 / channels as f32;
    let mut block = [0.0f32; CALLBACK_BLOCK];
    let mut dropped = 0usize;
    let mut frames = 0usize;
    for frames_in in data.chunks(CALLBACK_BLOCK * channels) {
        let mut n = 0;
        for frame in frames_in.chunks_exact(channels) {
            let sum: f32 = frame.iter().map(|&s| f32::from_sample_(s)).sum();
            block[n] = sum * scale;
            n += 1;
        }
        dropped += n - prod.push_slice(&block[..n]);
        frames += n;
    }
    (frames, dropped)
}

/// An open playback stream plus the non-real-time half of its path from the playback ring.
///
/// Invariant: the engine thread is the only producer of `ring`, the callback its only consumer;
/// the engine keeps about `queue_frames` (or two callbacks, if more) queued, never the whole
/// playback ring, so latency stays bounded and the voice thread feels back-pressure.
pub(super) struct OutputDevice {
    _stream: cpal::Stream,
    ring: HeapProd<f32>,
    resampler: StreamResampler,
    scratch: Vec<f32>,
    shared: Arc<StreamShared>,
    watchdog: Watchdog,
    rate: u32,
    queue_frames: usize,
    desc: String,
}

impl OutputDevice {
    /// Opens the default or named playback device and starts it.
    pub(super) fn open(
        name: Option<&str>,
        cfg: &AudioConfig,
        events: &Sender<AudioEvent>,
        counters: &Arc<Counters>,
    ) -> Result<Self, AudioError> {
        let (device, host_name) = find_device(cfg.host, name, Direction::Output)?;
        let supported = choose_config(&device, Direction::Output, cfg.preferred_device_rate)?;
        let rate = supported.sample_rate();
        let channels = usize::from(supported.channels().max(1));
        let format = supported.sample_format();
        let shared = Arc::new(StreamShared::default());
        let capacity = (rate as usize / 2).max(4 * CALLBACK_BLOCK);
        let mut prod_slot = None;
        let (stream, config) = build_with_fallback(&supported, cfg.playback_buffer_frames, |sc| {
            let (prod, cons) = sample_ring(capacity);
            let on_error = error_callback(
                Direction::Output,
                Arc::clone(&shared),
                Arc::clone(counters),
                events.clone(),
            );
            let shared = Arc::clone(&shared);
            let counters = Arc::clone(counters);
            let stream = with_sample_type!(format, T => device.build_output_stream::<T, _, _>(
                sc,
                playback_callback::<T>(channels, cons, shared, counters),
                on_error,
                Some(OPEN_TIMEOUT),
            ))?;
            prod_slot = Some(prod);
            Ok(stream)
        })
        .map_err(|e| AudioError::Device {
            device: device_name(&device),
            reason: e.to_string(),
        })?;
        stream.play().map_err(|e| AudioError::Device {
            device: device_name(&device),
            reason: e.to_string(),
        })?;
        let ring = prod_slot.expect("set by the successful build");
        Ok(Self {
            resampler: StreamResampler::new(SAMPLE_RATE, rate, SAMPLE_RATE as usize / 100)?,
            scratch: vec![0.0; SAMPLE_RATE as usize / 2],
            queue_frames: (rate as usize * cfg.playback_queue_ms.max(1) as usize / 1000)
                .min(capacity / 2),
            desc: describe(&device, host_name, &config, format),
            _stream: stream,
            ring,
            shared,
            watchdog: Watchdog::new(Instant::now()),
            rate,
        })
    }

    /// Human-readable description (name, rate, channels, format).
    pub(super) fn desc(&self) -> &str {
        &self.desc
    }

    /// Whether the stream still runs (see [`Liveness`]).
    pub(super) fn liveness(&mut self, now: Instant) -> Liveness {
        self.shared.liveness(&mut self.watchdog, now)
    }

    /// Tops the device queue up from `src` (48 kHz) to the target fill level.
    pub(super) fn pump(&mut self, src: &mut HeapCons<f32>) {
        let callback = self.shared.last_callback_frames.load(Ordering::Relaxed);
        let target = self
            .queue_frames
            .max(2 * callback)
            .min(self.ring.capacity().get());
        let missing = target.saturating_sub(self.ring.occupied_len());
        if missing == 0 {
            return;
        }
        let wanted = (missing * SAMPLE_RATE as usize).div_ceil(self.rate as usize);
        let wanted = wanted.min(self.scratch.len());
        let n = src.pop_slice(&mut self.scratch[..wanted]);
        let ring = &mut self.ring;
        self.resampler.process(&self.scratch[..n], |block| {
            // The target leaves headroom, so this only drops if the callback stalled for long.
            ring.push_slice(block);
        });
    }
}

/// The real-time playback callback: pop mono, copy it to every channel, silence (counted) when
/// the queue runs dry. No allocation, no locks, no blocking.
fn playback_callback<T>(
    channels: usize,
    mut cons: HeapCons<f32>,
    shared: Arc<StreamShared>,
    counters: Arc<Counters>,
) -> impl FnMut(&mut [T], &cpal::OutputCallbackInfo) + Send + 'static
where
    T: SizedSample + FromSample<f32> + Send + 'static,
{
    move |data: &mut [T], _info| {
        let (frames, missing) = fill_output(data, channels, &mut cons);
        shared.last_callback_frames.store(frames, Ordering::Relaxed);
        shared.callbacks.fetch_add(1, Ordering::Relaxed);
        counters
            .playback_block_max_frames
            .fetch_max(frames as u64, Ordering::Relaxed);
        if missing > 0 {
            counters
                .playback_underrun_samples
                .fetch_add(missing as u64, Ordering::Relaxed);
        }
    }
}

/// Fills interleaved `data` by popping mono samples from `cons` and copying each to every
/// channel; frames without a queued sample become silence. Returns (frames, silent frames).
/// Real-time safe.
fn fill_output<T>(data: &mut [T], channels: usize, cons: &mut HeapCons<f32>) -> (usize, usize)
where
    T: SizedSample + FromSample<f32>,
{
    let mut block = [0.0f32; CALLBACK_BLOCK];
    let mut missing = 0usize;
    let mut frames = 0usize;
    for frames_out in data.chunks_mut(CALLBACK_BLOCK * channels) {
        let n = frames_out.len() / channels;
        let got = cons.pop_slice(&mut block[..n]);
        if got < n {
            block[got..n].fill(0.0);
            missing += n - got;
        }
        for (frame, &s) in frames_out.chunks_exact_mut(channels).zip(&block[..n]) {
            frame.fill(T::from_sample(s));
        }
        frames += n;
    }
    (frames, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_fires_only_after_callbacks_stop_for_the_limit() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut w = Watchdog::new(t0);
        // A stream that has not called back yet gets the full limit to start.
        assert!(!w.stalled(0, ms(1_999)));
        assert!(w.stalled(0, ms(2_001)));
        let mut w = Watchdog::new(t0);
        for i in 1..100u64 {
            assert!(!w.stalled(i, ms(i * 10)), "moving callbacks are alive");
        }
        assert!(!w.stalled(99, ms(990 + 2_000)));
        assert!(w.stalled(99, ms(990 + 2_001)));
        // Callbacks resume: alive again at once.
        assert!(!w.stalled(100, ms(5_000)));
    }

    #[test]
    fn a_burst_of_errors_means_failing_and_a_few_do_not() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut w = Watchdog::new(t0);
        // One error every 100 ms: about ten a second, below the burst.
        for i in 0..50u64 {
            assert!(!w.failing(i, ms(i * 100)), "at {i}");
        }
        // Then 25 errors within a few milliseconds.
        assert!(w.failing(75, ms(5_010)));
    }

    #[test]
    fn non_fatal_backend_errors_are_counted_and_fatal_ones_mark_the_stream_lost() {
        let shared = Arc::new(StreamShared::default());
        let counters = Arc::new(Counters::default());
        let (tx, rx) = crossbeam_channel::bounded(8);
        let mut on_error = error_callback(
            Direction::Output,
            Arc::clone(&shared),
            Arc::clone(&counters),
            tx,
        );
        on_error(cpal::Error::with_message(
            ErrorKind::BackendError,
            "snd_pcm_avail_delay: I/O error (5)",
        ));
        on_error(ErrorKind::Xrun.into());
        assert!(!shared.lost.load(Ordering::Acquire));
        assert!(
            rx.try_recv().is_err(),
            "no event for what the stream survives"
        );
        let stats = counters.snapshot();
        assert_eq!((stats.device_errors, stats.device_xruns), (1, 1));
        on_error(ErrorKind::DeviceNotAvailable.into());
        assert!(shared.lost.load(Ordering::Acquire));
        assert!(matches!(
            rx.try_recv(),
            Ok(AudioEvent::DeviceLost {
                which: Direction::Output,
                ..
            })
        ));
    }
    use cpal::Sample;

    #[test]
    fn stereo_i16_input_is_averaged_to_mono_f32() {
        let (mut prod, mut cons) = sample_ring(4096);
        // 600 frames (more than one internal block): left full scale, right silent.
        let data: Vec<i16> = (0..600).flat_map(|_| [i16::MAX, 0]).collect();
        assert_eq!(downmix_into(&data, 2, &mut prod), (600, 0));
        let mut out = vec![0.0; 700];
        assert_eq!(cons.pop_slice(&mut out), 600);
        assert!(out[..600].iter().all(|&s| (s - 0.5).abs() < 1e-3));
    }

    #[test]
    fn full_capture_ring_drops_and_reports_the_excess() {
        let (mut prod, _cons) = sample_ring(100);
        let data = vec![0.25f32; 150];
        assert_eq!(downmix_into(&data, 1, &mut prod), (150, 50));
    }

    #[test]
    fn mono_is_copied_to_every_output_channel_and_underrun_is_silence() {
        let (mut prod, mut cons) = sample_ring(4096);
        prod.push_slice(&[0.5; 300]);
        let mut data = vec![u16::MAX; 400 * 3];
        assert_eq!(fill_output(&mut data, 3, &mut cons), (400, 100));
        let expected = u16::from_sample(0.5f32);
        assert!(data[..900].iter().all(|&s| s == expected));
        assert!(data[900..].iter().all(|&s| s == u16::EQUILIBRIUM));
    }

    #[test]
    fn format_ranking_prefers_float_and_rejects_dsd() {
        assert!(format_rank(SampleFormat::F32) < format_rank(SampleFormat::I16));
        assert_eq!(format_rank(SampleFormat::DsdU8), None);
    }
}
