//! A clean link never hurts (issue 11, item 2): a real server and two real headless clients on
//! loopback; one sends a minute of recorded human speech (a looped WAV file, the default
//! capture chain: voice detection decides what is sent) and the other records what it hears.
//! Nothing is lost or delayed on the way, so the listener's jitter buffer must leave the
//! stream alone: no frame concealed (other than across the talker's pauses, counted apart),
//! none dropped, none rebuilt from FEC, none late, and no more delay than the jitter needs.
//! The recording itself must follow the speech at one steady lag, with no gap in it.
//!
//! The speech is `speech_orig_16k.wav` (10.8 s of sentences, male and female voices, 16 kHz)
//! from the Debian package `codec2-examples` (LGPL-2.1, see docs/BENCHMARKS.md), which
//! `make test` installs.

mod common;

use std::path::Path;

use common::{peer_named, skip_unless_ci, summary, HeadlessClient, ServerProcess};

const SPEECH: &str = "/usr/share/codec2/raw/speech_orig_16k.wav";
/// Length of both clients' runs: about 60 s of speech once they have found each other.
const CALL_S: f64 = 62.0;
const RATE: usize = 48_000;
/// Envelope resolution: 2 ms blocks.
const BLOCK: usize = 96;
/// Blocks per second.
const BLOCKS_PER_S: usize = RATE / BLOCK;
/// The recording is compared with the speech in windows of this many seconds.
const WINDOW_S: usize = 5;

/// Level of each `BLOCK`-sample block, as RMS.
fn envelope(samples: &[f32]) -> Vec<f32> {
    samples
        .chunks_exact(BLOCK)
        .map(|b| (b.iter().map(|x| x * x).sum::<f32>() / BLOCK as f32).sqrt())
        .collect()
}

/// Log level (dB-like, floored at -80 dB) of an envelope.
fn log_env(env: &[f32]) -> Vec<f32> {
    env.iter().map(|v| 20.0 * v.max(1e-4).log10()).collect()
}

/// Pearson correlation of two equally long series.
fn correlation(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len() as f32;
    let (ma, mb) = (a.iter().sum::<f32>() / n, b.iter().sum::<f32>() / n);
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        ab += (x - ma) * (y - mb);
        aa += (x - ma) * (x - ma);
        bb += (y - mb) * (y - mb);
    }
    ab / (aa * bb).sqrt().max(1e-9)
}

/// The lag (in blocks, within `lags`) at which `heard[from..to]` best matches `spoken`, and
/// how well.
fn best_lag(
    heard: &[f32],
    spoken: &[f32],
    from: usize,
    to: usize,
    lags: std::ops::Range<usize>,
) -> (usize, f32) {
    lags.map(|lag| {
        (
            lag,
            correlation(&heard[from..to], &spoken[from + lag..to + lag]),
        )
    })
    .fold((0, f32::MIN), |best, c| if c.1 > best.1 { c } else { best })
}

#[test]
fn a_minute_of_speech_over_a_clean_loopback_link_is_played_untouched() {
    if !Path::new(SPEECH).exists() {
        skip_unless_ci(&format!(
            "{SPEECH} is missing (install the Debian package codec2-examples; `make test` does)"
        ));
        return;
    }
    let server = ServerProcess::start();
    let talker = HeadlessClient::spawn(
        server.addr,
        "talker",
        "Lobby",
        &["--input-wav", SPEECH, "--loop-input"],
        &[],
        CALL_S,
    );
    let listener = HeadlessClient::spawn(
        server.addr,
        "listener",
        "Lobby",
        &["--input-silence"],
        &[],
        CALL_S,
    );
    let (talker_lines, _) = talker.finish();
    let (lines, heard) = listener.finish();
    let sum = summary(&lines);
    let p = peer_named(sum, "talker")
        .unwrap_or_else(|| panic!("listener never saw the talker: {sum}"))
        .clone();
    println!("listener's figures for the talker: {p}");
    println!("listener's audio path: {}", sum["audio"]);
    println!("talker's audio path: {}", summary(&talker_lines)["audio"]);
    let count = |k: &str| {
        p[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {p}"))
    };
    let ms = |k: &str| {
        p[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {p}"))
    };

    // About a minute of speech arrived and was played (the recording has pauses, which are
    // not sent; the clients need a second or two to find each other).
    assert!(count("frames_decoded") >= 2_000, "{p}");
    // Nothing on a clean link calls for concealment, FEC, insertions or drops, and nothing
    // arrives late. What the buffer plays across the talker's pauses before it knows they are
    // pauses is counted apart (frames_pause_concealed), and so are pre-roll frames that do not
    // fit the delay (frames_preroll_skipped).
    for k in ["frames_concealed", "frames_stretched", "frames_fec", "late"] {
        assert_eq!(count(k), 0, "{k} on a clean link: {p}");
    }
    // The one allowance: when the machine holds the listener's own voice thread up past the
    // 10 ms in its playback queue, its device plays silence (a playback underrun, counted)
    // and the delay really grows by that much. The buffer waits for a pause to take that
    // back, but a long stall in a long talkspurt is cut after 2 s: at most one frame per
    // 20 ms of underrun. Seen on the shared 2-core machine while others compiled (90 ms of
    // underrun, 3 frames dropped, in 1 of 8 runs); with no underrun nothing may be dropped.
    let underrun = sum["audio"]["playback_underrun_samples"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        count("frames_dropped") <= underrun.div_ceil(960),
        "frames dropped on a clean link beyond the {underrun} samples of the listener's \
         playback underrun: {p}"
    );
    // No more delay than the jitter needs: the 10 ms floor, or the measured jitter plus a
    // millisecond of slack for its estimate moving.
    let bound = (ms("jitter_ms") + 1.0).max(10.5);
    assert!(ms("target_ms") <= bound, "target above {bound} ms: {p}");

    // The recording follows the speech at one lag: a concealed, inserted or dropped frame
    // would break the match or move the lag by a frame (20 ms). A talkspurt that starts after
    // a long pause may start up to one 10 ms playout chunk earlier or later than the last.
    let spoken_once = p2p_voice::audio::load_wav_mono_48k(Path::new(SPEECH)).unwrap();
    let period = spoken_once.len() / BLOCK;
    let spoken_env = envelope(&spoken_once);
    let heard_env = envelope(&heard);
    // The talker's input, looped, long enough to hold the recording at any lag.
    let spoken: Vec<f32> = spoken_env
        .iter()
        .copied()
        .cycle()
        .take(heard_env.len() + 2 * period)
        .collect();
    let (spoken_log, heard_log) = (log_env(&spoken), log_env(&heard_env));
    let start = 4 * BLOCKS_PER_S;
    let end = heard_env.len().saturating_sub(2 * BLOCKS_PER_S);
    assert!(end > start + 40 * BLOCKS_PER_S, "recording too short");
    let window = WINDOW_S * BLOCKS_PER_S;
    let (lag, fit) = best_lag(&heard_log, &spoken_log, start, start + window, 0..period);
    assert!(fit > 0.8, "the recording does not match the speech ({fit})");
    let mut lags = Vec::new();
    let mut gaps = Vec::new();
    let mut from = start;
    while from + window <= end {
        // Within 100 ms of the first window's lag.
        let near = lag + period - 50..lag + period + 51;
        let (at, c) = best_lag(&heard_log, &spoken_log, from, from + window, near);
        let l = at as i64 - period as i64;
        println!(
            "window at {:.0} s: lag {} ms, match {c:.3}",
            from as f64 / BLOCKS_PER_S as f64,
            l * 2
        );
        // A playback underrun (allowed below) costs a window some of its match.
        assert!(c > 0.75, "window at block {from}: match {c}");
        lags.push(l);
        // No gap inside the speech: every 20 ms of speech (10 blocks above -30 dBFS) is heard
        // within 20 dB of its level.
        for b in (from..from + window).step_by(10) {
            let said = spoken[b + at..b + at + 10].iter().sum::<f32>() / 10.0;
            let got = heard_env[b..b + 10].iter().sum::<f32>() / 10.0;
            if said >= 0.03 && got <= 0.1 * said {
                gaps.push(b as f64 / BLOCKS_PER_S as f64);
            }
        }
        from += window;
    }
    // A gap can only come from the listener's own audio path: when the machine holds its
    // voice thread up past the 10 ms in the playback queue, the device plays silence (a
    // playback underrun, counted; seen on the shared 2-core machine while others compiled).
    // That is no jitter-buffer fault and is allowed: the silence itself, and since everything
    // after it plays later by that much, speech edges near it that the 5 s windows' single lag
    // no longer lines up (seen: 7 such blocks for 40 ms of underrun); four blocks per 20 ms of
    // underrun, plus two. Without an underrun, no gap at all.
    let allowed = if underrun == 0 {
        0
    } else {
        4 * underrun.div_ceil(960) as usize + 2
    };
    assert!(
        gaps.len() <= allowed,
        "gaps at {gaps:?} s of the recording ({allowed} allowed for {underrun} samples of \
         playback underrun)"
    );
    // The lag may move by one frame in the minute (a frame of excess delay given back in a
    // pause, which plays nothing twice and skips no speech), plus what a playback underrun
    // added (the device played silence, so everything after it is later by that much).
    let spread = lags.iter().max().unwrap() - lags.iter().min().unwrap();
    let underrun_ms = underrun / 48;
    assert!(
        spread * 2 <= 22 + underrun_ms as i64,
        "the lag moved by {} ms: {lags:?} (in 2 ms blocks; {underrun_ms} ms of underrun)",
        spread * 2
    );
}
