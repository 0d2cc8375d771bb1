//! WAV-backed virtual devices: a file as microphone, a file as speaker.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use hound::{SampleFormat, WavReader, WavSpec, WavWriter};

use super::resample::resample_buffer;
use super::{AudioError, SAMPLE_RATE};

/// Reads a WAV file of any rate, channel count and PCM/float format, and returns it as 48 kHz
/// mono `f32` (channels averaged, then resampled once).
pub fn load_wav_mono_48k(path: &Path) -> Result<Vec<f32>, AudioError> {
    let wav_err = |source| AudioError::Wav {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = WavReader::open(path).map_err(wav_err)?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels.max(1));
    let interleaved: Vec<f32> = match spec.sample_format {
        SampleFormat::Float => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(wav_err)?,
        SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(wav_err)?
        }
    };
    let inv = 1.0 / channels as f32;
    let mono: Vec<f32> = interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() * inv)
        .collect();
    resample_buffer(&mono, spec.sample_rate, SAMPLE_RATE)
}

/// A loaded WAV file acting as a microphone.
///
/// Invariant: `samples` are 48 kHz mono; after the end it yields silence, or restarts when
/// `looped` (an empty file always yields silence).
#[derive(Debug, Clone)]
pub struct WavSource {
    samples: Vec<f32>,
    pos: usize,
    looped: bool,
}

impl WavSource {
    /// Loads and converts `path` (see [`load_wav_mono_48k`]).
    pub fn open(path: &Path, looped: bool) -> Result<Self, AudioError> {
        Ok(Self::from_samples(load_wav_mono_48k(path)?, looped))
    }

    /// Wraps samples that are already 48 kHz mono.
    pub fn from_samples(samples: Vec<f32>, looped: bool) -> Self {
        Self {
            samples,
            pos: 0,
            looped,
        }
    }

    /// Overwrites `out` with the next samples.
    pub fn fill(&mut self, out: &mut [f32]) {
        let mut written = 0;
        while written < out.len() {
            if self.pos >= self.samples.len() {
                if self.looped && !self.samples.is_empty() {
                    self.pos = 0;
                } else {
                    out[written..].fill(0.0);
                    return;
                }
            }
            let n = (self.samples.len() - self.pos).min(out.len() - written);
            out[written..written + n].copy_from_slice(&self.samples[self.pos..self.pos + n]);
            self.pos += n;
            written += n;
        }
    }
}

/// A WAV file acting as a speaker: 48 kHz, mono, 16-bit PCM.
///
/// Invariant: the header is finalized exactly once, by [`WavSink::finalize`] or on drop, so the
/// file is a valid WAV whatever way the sink ends.
pub struct WavSink {
    writer: Option<WavWriter<BufWriter<File>>>,
    path: PathBuf,
    samples_written: u64,
}

impl WavSink {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, AudioError> {
        let spec = WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: SampleFormat::Int,
        };
        let writer = WavWriter::create(path, spec).map_err(|source| AudioError::Wav {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            writer: Some(writer),
            path: path.to_path_buf(),
            samples_written: 0,
        })
    }

    /// Appends samples (clamped to `[-1, 1]`).
    pub fn write(&mut self, samples: &[f32]) -> Result<(), AudioError> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        for &s in samples {
            let v = (s.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16;
            writer.write_sample(v).map_err(|source| AudioError::Wav {
                path: self.path.clone(),
                source,
            })?;
        }
        self.samples_written += samples.len() as u64;
        Ok(())
    }

    /// Samples written so far.
    pub fn samples_written(&self) -> u64 {
        self.samples_written
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the final header; later writes are ignored. Returns the samples written.
    pub fn finalize(&mut self) -> Result<u64, AudioError> {
        if let Some(writer) = self.writer.take() {
            writer.finalize().map_err(|source| AudioError::Wav {
                path: self.path.clone(),
                source,
            })?;
        }
        Ok(self.samples_written)
    }
}

impl Drop for WavSink {
    fn drop(&mut self) {
        let _ = self.finalize();
    }
}

#[cfg(test)]
mod tests {
    use super::super::tone::{goertzel_amplitude, ToneGenerator};
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("p2p-voice-audio-{}-{name}", std::process::id()))
    }

    #[test]
    fn stereo_44k_wav_loads_as_48k_mono_with_the_same_tone_frequency() {
        let path = temp_path("stereo44k.wav");
        let spec = WavSpec {
            channels: 2,
            sample_rate: 44_100,
            bits_per_sample: 16,
            sample_format: SampleFormat::Int,
        };
        let mut w = WavWriter::create(&path, spec).unwrap();
        let mut tone = ToneGenerator::new(440.0, 0.5, 44_100);
        let mut buf = vec![0.0f32; 44_100];
        tone.fill(&mut buf);
        for s in &buf {
            let v = (s * 32767.0) as i16;
            w.write_sample(v).unwrap();
            w.write_sample(v).unwrap();
        }
        w.finalize().unwrap();

        let mono = load_wav_mono_48k(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(mono.len(), 48_000);
        let mid = &mono[4800..43_200];
        let at_440 = goertzel_amplitude(mid, 440.0, 48_000);
        let at_404 = goertzel_amplitude(mid, 440.0 * 44_100.0 / 48_000.0, 48_000);
        assert!(at_440 > 0.45, "440 Hz amplitude {at_440}");
        assert!(at_404 < 0.05, "pitch-shifted energy {at_404}");
    }

    #[test]
    fn missing_wav_file_is_an_error_naming_the_path() {
        let err = load_wav_mono_48k(Path::new("/nonexistent/voice.wav")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/voice.wav"), "{err}");
    }

    #[test]
    fn wav_source_plays_once_then_silence_or_loops() {
        let mut once = WavSource::from_samples(vec![1.0, 2.0, 3.0], false);
        let mut out = [9.0; 5];
        once.fill(&mut out);
        assert_eq!(out, [1.0, 2.0, 3.0, 0.0, 0.0]);
        let mut looped = WavSource::from_samples(vec![1.0, 2.0, 3.0], true);
        looped.fill(&mut out);
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0]);
    }

    #[test]
    fn wav_sink_file_is_valid_after_drop_without_finalize() {
        let path = temp_path("sink-drop.wav");
        {
            let mut sink = WavSink::create(&path).unwrap();
            sink.write(&[0.5; 4800]).unwrap();
        }
        let reader = WavReader::open(&path).unwrap();
        assert_eq!(reader.spec().sample_rate, 48_000);
        assert_eq!(reader.spec().channels, 1);
        assert_eq!(reader.duration(), 4800);
        std::fs::remove_file(&path).ok();
    }
}
