//! Writes the app's cue sounds to `assets/sounds/` (48 kHz mono, 16-bit WAV) from
//! `p2p_voice::voice::rx::cues::synthesize`, so the files are made by our own code and share
//! the project's licence. Deterministic: running it again gives the same files.
//!
//! `cargo run --example make_sounds [DIR]` (default `assets/sounds`).

use p2p_voice::voice::rx::cues::{synthesize, Cue, CUE_RATE};

fn main() -> Result<(), hound::Error> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "assets/sounds".into());
    std::fs::create_dir_all(&dir)?;
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: CUE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    for cue in Cue::ALL {
        let path = std::path::Path::new(&dir).join(cue.file_name());
        let mut w = hound::WavWriter::create(&path, spec)?;
        let samples = synthesize(cue);
        for s in &samples {
            w.write_sample((s * 32_768.0).round().clamp(-32_768.0, 32_767.0) as i16)?;
        }
        w.finalize()?;
        println!(
            "{} ({} ms)",
            path.display(),
            samples.len() * 1000 / CUE_RATE as usize
        );
    }
    Ok(())
}
