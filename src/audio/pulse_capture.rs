//! Capture on PulseAudio's native protocol, with the buffer a voice call needs.
//!
//! cpal's PulseAudio host turns a fixed buffer size into one server-side figure for both the
//! block it delivers and the whole record buffer. With 10 ms blocks the server keeps at most
//! 10 ms for us, so each time the reading thread is 10 ms late (a busy machine) PulseAudio
//! throws captured audio away: on a loaded 2-core VM, 3.8 s of a 31 s call were lost, and the
//! listener's jitter buffer grew to its 120 ms ceiling over the jumps. With cpal's default
//! buffer nothing is lost, but the blocks are about 170 ms, so packets leave in bursts and
//! every listener buffers for them. This stream asks for 10 ms blocks and a one-second
//! server-side buffer: a late reader gets its audio late, never loses it. It uses the
//! `pulseaudio` crate that cpal's host is built on, for the one setting cpal does not expose.
//!
//! PulseAudio converts to mono 32-bit float at 48 kHz for us, so the callback only decodes
//! bytes and pushes them into the lock-free ring, like the cpal capture callback.

use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;

use pulseaudio::protocol;
use ringbuf::traits::Producer;
use ringbuf::HeapProd;

use super::{AudioError, SAMPLE_RATE};

/// Bytes of one sample: mono `f32`.
const SAMPLE_BYTES: usize = 4;
/// Delivery block: what PulseAudio sends at a time (and the latency it aims for).
const BLOCK_FRAMES: u32 = SAMPLE_RATE / 100;
/// Server-side buffer: how late the reader may be before audio is lost.
const SERVER_BUFFER_FRAMES: u32 = SAMPLE_RATE;
/// Samples decoded per step inside the callback (a stack buffer: no allocation).
const DECODE_BLOCK: usize = 256;

/// Counters the callback keeps, read by the engine thread's watchdog and stats.
pub(super) trait CaptureCounts: Send + Sync + 'static {
    /// One callback delivered `frames` frames, of which `dropped` did not fit in the ring.
    fn delivered(&self, frames: usize, dropped: usize);
}

/// An open record stream; audio flows into the ring given to [`PulseCapture::open`] until it
/// is dropped (which deletes the stream on the server).
pub(super) struct PulseCapture {
    _stream: pulseaudio::RecordStream,
    _client: pulseaudio::Client,
    desc: String,
}

impl PulseCapture {
    /// Connects to the PulseAudio server of this session (`PULSE_SERVER`, `XDG_RUNTIME_DIR`)
    /// and starts recording from the source named `source` (PulseAudio's name, which is also
    /// cpal's device id on that host). Gives up after `timeout` if the server does not answer.
    pub(super) fn open(
        source: &str,
        description: &str,
        prod: HeapProd<f32>,
        counts: Arc<dyn CaptureCounts>,
        timeout: Duration,
    ) -> Result<Self, AudioError> {
        let failed = |reason: String| AudioError::Device {
            device: description.to_string(),
            reason,
        };
        let source_name = CString::new(source).map_err(|_| failed("NUL in name".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // The handshake and stream creation block on the server; a hung server must not hang
        // the audio engine, so they run on a thread we stop waiting for.
        std::thread::Builder::new()
            .name("pulse-capture-open".into())
            .spawn(move || {
                let _ = tx.send(connect_and_record(source_name, prod, counts));
            })
            .map_err(|e| failed(format!("cannot start a thread: {e}")))?;
        let (client, stream) = rx
            .recv_timeout(timeout)
            .map_err(|_| failed("PulseAudio did not answer".into()))?
            .map_err(|e| failed(e.to_string()))?;
        let attr = stream.buffer_attr();
        let spec = stream.sample_spec();
        let desc = format!(
            "{description} on PulseAudio ({} Hz, {} ch, f32, {} ms blocks, {} ms server buffer)",
            spec.sample_rate,
            spec.channels,
            attr.fragment_size as usize * 1000 / (SAMPLE_BYTES * spec.sample_rate as usize),
            attr.max_length as usize * 1000 / (SAMPLE_BYTES * spec.sample_rate as usize),
        );
        Ok(Self {
            _stream: stream,
            _client: client,
            desc,
        })
    }

    /// Human-readable description, with the blocks and buffer the server granted.
    pub(super) fn desc(&self) -> &str {
        &self.desc
    }
}

fn connect_and_record(
    source_name: CString,
    prod: HeapProd<f32>,
    counts: Arc<dyn CaptureCounts>,
) -> Result<(pulseaudio::Client, pulseaudio::RecordStream), pulseaudio::ClientError> {
    let app = CString::new("p2p-voice").expect("no NUL");
    let client = pulseaudio::Client::from_env(app)?;
    let params = record_params(source_name);
    let mut decoder = BlockDecoder::new(prod);
    let stream =
        futures::executor::block_on(client.create_record_stream(params, move |bytes: &[u8]| {
            let (frames, dropped) = decoder.push(bytes);
            counts.delivered(frames, dropped);
        }))?;
    Ok((client, stream))
}

/// What we ask the server for: mono f32 at 48 kHz in 10 ms blocks, a second of server-side
/// buffer, and the source's latency adjusted to the block (so the source itself does not
/// deliver in large chunks).
fn record_params(source_name: CString) -> protocol::RecordStreamParams {
    let bytes = |frames: u32| frames * SAMPLE_BYTES as u32;
    protocol::RecordStreamParams {
        sample_spec: protocol::SampleSpec {
            format: protocol::SampleFormat::Float32Le,
            channels: 1,
            sample_rate: SAMPLE_RATE,
        },
        channel_map: protocol::ChannelMap::mono(),
        source_name: Some(source_name),
        buffer_attr: protocol::stream::BufferAttr {
            max_length: bytes(SERVER_BUFFER_FRAMES),
            fragment_size: bytes(BLOCK_FRAMES),
            ..Default::default()
        },
        flags: protocol::stream::StreamFlags {
            adjust_latency: true,
            // When the source goes away (a headset unplugged) the stream ends instead of
            // being moved to another source behind our back: the engine then falls back to
            // the default itself, says so, and returns to the headset when it is back.
            no_move: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Turns the byte stream PulseAudio delivers into samples in the ring. Real-time safe: no
/// allocation, no locks. A sample split across two deliveries is carried over.
struct BlockDecoder {
    prod: HeapProd<f32>,
    carry: [u8; SAMPLE_BYTES],
    carried: usize,
}

impl BlockDecoder {
    fn new(prod: HeapProd<f32>) -> Self {
        Self {
            prod,
            carry: [0; SAMPLE_BYTES],
            carried: 0,
        }
    }

    /// Pushes the samples in `bytes`; returns (samples decoded, samples the full ring refused).
    fn push(&mut self, mut bytes: &[u8]) -> (usize, usize) {
        let mut block = [0.0f32; DECODE_BLOCK];
        let mut n = 0;
        let (mut frames, mut dropped) = (0, 0);
        if self.carried > 0 {
            let take = (SAMPLE_BYTES - self.carried).min(bytes.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&bytes[..take]);
            self.carried += take;
            bytes = &bytes[take..];
            if self.carried == SAMPLE_BYTES {
                block[0] = f32::from_le_bytes(self.carry);
                n = 1;
                self.carried = 0;
            }
        }
        let mut samples = bytes.chunks_exact(SAMPLE_BYTES);
        for s in samples.by_ref() {
            block[n] = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            n += 1;
            if n == DECODE_BLOCK {
                dropped += n - self.prod.push_slice(&block);
                frames += n;
                n = 0;
            }
        }
        dropped += n - self.prod.push_slice(&block[..n]);
        frames += n;
        let rest = samples.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
        (frames, dropped)
    }
}

/// The sound server behind the PulseAudio protocol, as it names itself ("PulseAudio (on
/// PipeWire 0.3.65) 15.0.0" under pipewire-pulse), or `None` when none answers. For `p2p-voice
/// devices`: on a PipeWire desktop the host says "PulseAudio", and this says what runs.
pub fn sound_server_name() -> Option<String> {
    let app = CString::new("p2p-voice").expect("no NUL");
    let client = pulseaudio::Client::from_env(app).ok()?;
    let info = futures::executor::block_on(client.server_info()).ok()?;
    let text = |s: Option<CString>| s.map(|s| s.to_string_lossy().into_owned());
    let name = text(info.server_name)?;
    Some(match text(info.server_version) {
        Some(version) => format!("{name} {version}"),
        None => name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::ring::sample_ring;
    use ringbuf::traits::Consumer;

    fn le(samples: &[f32]) -> Vec<u8> {
        samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    #[test]
    fn samples_split_across_deliveries_arrive_whole_and_in_order() {
        let (prod, mut cons) = sample_ring(4_096);
        let mut decoder = BlockDecoder::new(prod);
        let samples: Vec<f32> = (0..1_000).map(|i| i as f32 / 1_000.0).collect();
        let bytes = le(&samples);
        // Deliveries of odd sizes, so most samples straddle a boundary.
        let mut total = 0;
        for chunk in bytes.chunks(7) {
            total += decoder.push(chunk).0;
        }
        assert_eq!(total, samples.len());
        let mut out = vec![0.0; samples.len()];
        assert_eq!(cons.pop_slice(&mut out), samples.len());
        assert_eq!(out, samples);
    }

    #[test]
    fn a_full_ring_refuses_and_counts_the_excess() {
        let (prod, _cons) = sample_ring(100);
        let mut decoder = BlockDecoder::new(prod);
        let (frames, dropped) = decoder.push(&le(&[0.5; 1_000]));
        assert_eq!(frames, 1_000);
        assert_eq!(dropped, 1_000 - 100);
    }

    #[test]
    fn the_server_is_asked_for_10_ms_blocks_and_a_second_of_buffer() {
        let p = record_params(CString::new("mic").unwrap());
        assert_eq!(p.buffer_attr.fragment_size, 480 * 4);
        assert_eq!(p.buffer_attr.max_length, 48_000 * 4);
        assert!(p.flags.adjust_latency);
        assert!(p.flags.no_move);
        assert_eq!(p.sample_spec.channels, 1);
    }
}
