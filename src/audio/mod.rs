//! Audio input and output: real devices through cpal, and virtual devices (WAV files, a tone,
//! silence, a null speaker) for headless runs and tests.
//!
//! Everything the rest of the program sees is 48 kHz mono `f32` in `[-1, 1]`, moved through
//! two lock-free SPSC rings: [`CaptureRing`] (microphone -> voice thread) and [`PlaybackRing`]
//! (voice thread -> speaker). A device thread owns the backends (cpal streams are not `Send`),
//! paces virtual devices in real time, resamples device rates to and from 48 kHz off the
//! real-time callbacks, and bridges the device side to the rings, so the rings stay the same
//! objects when devices are switched. This module knows nothing of the network.
//!
//! A missing microphone or speaker is never fatal: the capture ring simply stays empty
//! ([`AudioEvent::NoMicrophone`]) and playback is drained by a paced null sink
//! ([`AudioEvent::NoSpeaker`]).

//!
//! Only the format (rate, chunk), the glitch counters' snapshot and the tone tools are built
//! without the `app` feature: the voice engine needs them, and the fuzz build has the engine
//! but no devices.

#[cfg(feature = "app")]
mod cpal_backend;
#[cfg(feature = "app")]
mod device_thread;
#[cfg(feature = "app")]
pub mod device_watch;
#[cfg(feature = "app")]
mod file;
#[cfg(feature = "app")]
mod host;
#[cfg(feature = "app")]
mod io;
#[cfg(feature = "app")]
mod pacer;
#[cfg(feature = "app")]
mod pulse_capture;
#[cfg(feature = "app")]
pub use pulse_capture::sound_server_name;
#[cfg(feature = "app")]
mod resample;
#[cfg(feature = "app")]
mod ring;
mod tone;

#[cfg(feature = "app")]
pub use self::cpal_backend::{list_devices, DeviceInfo, DeviceList};
#[cfg(feature = "app")]
pub use self::file::{load_wav_mono_48k, WavSink, WavSource};
#[cfg(feature = "app")]
pub use self::host::{AudioHost, UnknownAudioHost};
#[cfg(feature = "app")]
use self::io::Counters;
#[cfg(feature = "app")]
pub use self::io::{
    AudioConfig, AudioError, AudioEvent, AudioIo, Direction, InputSource, OutputSink, RingWake,
};
#[cfg(feature = "app")]
pub use self::pacer::Pacer;
#[cfg(feature = "app")]
pub use self::resample::{resample_buffer, StreamResampler};
#[cfg(feature = "app")]
pub use self::ring::{CaptureRing, PlaybackRing};
pub use self::tone::{goertzel_amplitude, ToneGenerator};

/// The internal sample rate in Hz.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples per 10 ms chunk at [`SAMPLE_RATE`]: the pace of virtual devices, and the step in
/// which the voice plane mixes and hands audio to the speaker (whatever its codec frame), so a
/// frame that arrives just after a mix waits at most one chunk.
pub const CHUNK_SAMPLES: usize = 480;

/// Snapshot of the audio path's glitch counters (all cumulative since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AudioStats {
    /// Captured samples dropped because a ring was full (voice thread or engine too slow).
    pub capture_overrun_samples: u64,
    /// Output samples played as silence because no audio was queued.
    pub playback_underrun_samples: u64,
    /// Over/underruns reported by the device backend itself.
    pub device_xruns: u64,
    /// Non-fatal errors the backend reported while the stream kept running.
    pub device_errors: u64,
    /// 10 ms chunks a virtual device skipped because its thread stalled too long.
    pub paced_chunks_skipped: u64,
    /// Streams closed and reopened because the backend kept reporting errors (each one a
    /// short skip the user hears).
    pub stream_restarts: u64,
    /// Devices that failed while running and were closed (unplugged, server gone).
    pub devices_lost: u64,
    /// Largest block one capture callback delivered, in device frames: a device that hands
    /// over audio in bursts makes its sender's packets leave in bursts, and every listener's
    /// jitter buffer then waits for the burst (mouth-to-ear latency).
    pub capture_block_max_frames: u64,
    /// Audio the capture device has failed to deliver so far, against real time since its
    /// first block (a device or sound server that drops audio when its reader is late; a
    /// stream whose clock runs slow). A healthy device stays within a block or two.
    pub capture_missing_ms: u64,
    /// Largest block one playback callback asked for, in device frames.
    pub playback_block_max_frames: u64,
}
