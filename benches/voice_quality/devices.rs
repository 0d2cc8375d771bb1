// Included by voice_quality.rs: the call through PulseAudio virtual devices.

/// Modules loaded into a PulseAudio daemon for one device call (unloaded on drop), and the
/// daemon itself when this bench had to start it (stopped on drop).
///
/// The speech is played once into `q_both`, a combined sink feeding the talker's microphone
/// (`q_mic`, whose monitor the talker records) and the left channel of `q_ref`. The listener
/// plays what it hears into the right channel of `q_ref`. One stereo recording of
/// `q_ref.monitor` then holds the speech as it went into the microphone (left) and as it came
/// out of the listener's speaker (right): the lag between the channels is mouth to ear with
/// both device paths and their queues, and the right channel alone is what PESQ scores.
struct PulseRig {
    modules: Vec<String>,
    started_daemon: bool,
}

fn pactl_ok(args: &[&str]) -> Result<String, String> {
    let out = Command::new("pactl")
        .args(args)
        .output()
        .map_err(|e| format!("pactl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "pactl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl PulseRig {
    fn new() -> Result<Self, String> {
        let mut rig = Self {
            modules: Vec::new(),
            started_daemon: false,
        };
        if pactl_ok(&["info"]).is_err() {
            let status = Command::new("pulseaudio")
                .args([
                    "--daemonize=yes",
                    "--exit-idle-time=-1",
                    "--disallow-exit",
                    "-n",
                    "--load=module-native-protocol-unix",
                    "--load=module-always-sink",
                ])
                .status()
                .map_err(|e| format!("cannot run pulseaudio: {e}"))?;
            if !status.success() {
                return Err(format!("pulseaudio exited with {status}"));
            }
            rig.started_daemon = true;
            let deadline = Instant::now() + Duration::from_secs(5);
            while pactl_ok(&["info"]).is_err() {
                if Instant::now() > deadline {
                    return Err("pulseaudio does not answer `pactl info`".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let float = "format=float32le";
        for (module, args) in [
            ("module-null-sink", vec!["sink_name=q_mic", "rate=48000", "channels=1", float]),
            ("module-null-sink", vec!["sink_name=q_dump", "rate=48000", "channels=2", float]),
            ("module-null-sink", vec!["sink_name=q_ref", "rate=48000", "channels=2", float]),
            (
                "module-remap-sink",
                vec!["sink_name=q_left", "master=q_ref", "channels=1", "channel_map=mono",
                     "master_channel_map=front-left", "remix=no"],
            ),
            (
                "module-remap-sink",
                vec!["sink_name=q_right", "master=q_ref", "channels=1", "channel_map=mono",
                     "master_channel_map=front-right", "remix=no"],
            ),
            (
                "module-combine-sink",
                vec!["sink_name=q_both", "slaves=q_mic,q_left", "rate=48000", "channels=1"],
            ),
        ] {
            let mut full = vec!["load-module", module];
            full.extend(args);
            rig.modules.push(pactl_ok(&full)?);
        }
        Ok(rig)
    }

    /// The daemon's address for the clients (`PULSE_SERVER`).
    fn server() -> Result<String, String> {
        let info = pactl_ok(&["info"])?;
        info.lines()
            .find_map(|l| l.strip_prefix("Server String: "))
            .map(|s| {
                if s.starts_with('/') {
                    format!("unix:{s}")
                } else {
                    s.to_string()
                }
            })
            .ok_or_else(|| format!("no server string in `pactl info`: {info}"))
    }
}

impl Drop for PulseRig {
    fn drop(&mut self) {
        for m in self.modules.iter().rev() {
            let _ = pactl_ok(&["unload-module", m]);
        }
        if self.started_daemon {
            let _ = Command::new("pulseaudio").arg("--kill").status();
        }
    }
}

fn read_f32le(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_default()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// One call through PulseAudio virtual devices at both ends (see [`PulseRig`]): the talker
/// captures its microphone with the default capture chain of a device (echo cancellation,
/// noise suppression, gain control), the listener plays into a speaker sink.
fn run_device_call(scratch: &Scratch, case: &Case, utterances: &[Utterance]) -> CallResult {
    let rig = PulseRig::new().unwrap_or_else(|e| panic!("PulseAudio for the device call: {e}"));
    let pulse = PulseRig::server().expect("PulseAudio server address");
    // The clients find the daemon through the environment they inherit.
    std::env::set_var("PULSE_SERVER", &pulse);
    let (_server, addr) = start_server(scratch);
    let (input, starts) = script(utterances);
    let tag = case.label.replace([' ', '%', ','], "_");
    let raw = scratch.path(&format!("{tag}-script.f32"));
    let bytes: Vec<u8> = input.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(&raw, bytes).expect("write the script");
    let input_s = input.len() as f64 / RATE as f64;
    let frame = case.frame_ms.to_string();
    let device = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--audio-host", "pulseaudio", "--frame-ms", frame.as_str()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Both clients run until well after the script: it starts once the call is up.
    let call_s = input_s + 6.0;
    let mut ear = Proc::spawn(
        "ear",
        &client_args(addr, "ear", call_s, &device(&["--input-silence", "--output-device", "q_right"])),
        scratch,
    );
    let mut mouth = Proc::spawn(
        "mouth",
        &client_args(
            addr,
            "mouth",
            call_s + 1.0,
            &device(&["--input-device", "q_mic.monitor", "--output-device", "q_dump"]),
        ),
        scratch,
    );
    // Devices open and the peers find each other meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    let recording = scratch.path(&format!("{tag}-ref.f32"));
    let mut recorder = Command::new("parecord")
        .args(["--device=q_ref.monitor", "--raw", "--format=float32le", "--rate=48000"])
        .args(["--channels=2", "--latency-msec=10"])
        .arg(&recording)
        .spawn()
        .expect("parecord");
    std::thread::sleep(Duration::from_millis(300));
    let played = Command::new("pacat")
        .args(["--playback", "--device=q_both", "--raw", "--format=float32le"])
        .args(["--rate=48000", "--channels=1", "--latency-msec=10"])
        .arg(&raw)
        .status()
        .expect("pacat");
    assert!(played.success(), "pacat: {played}");
    std::thread::sleep(Duration::from_secs(1));
    let _ = recorder.kill();
    let _ = recorder.wait();
    ear.finish(Duration::from_secs_f64(call_s + 30.0));
    mouth.finish(Duration::from_secs_f64(call_s + 30.0));
    drop(rig);

    let stereo = read_f32le(&recording);
    let left: Vec<f32> = stereo.iter().step_by(2).copied().collect();
    let right: Vec<f32> = stereo.iter().skip(1).step_by(2).copied().collect();
    let (input16, left16, right16) = (to_16k(&input), to_16k(&left), to_16k(&right));
    let to16 = |s: usize| s * PESQ_RATE / RATE;
    let search = (SEARCH_S * PESQ_RATE as f64) as isize;
    // Where the script starts in the recording: the first utterance in the left channel,
    // about 0.3 s in (the recorder started that much earlier).
    let first = &input16[to16(starts[0])..to16(starts[0] + utterances[0].samples.len())];
    let (at, _) = locate(first, &left16, to16(starts[0]) as isize + 4_800, search);
    let script_at = at - to16(starts[0]) as isize;
    let mut scores = Vec::new();
    let mut latency_ms = Vec::new();
    for (u, &start) in utterances.iter().zip(&starts) {
        let (start16, len16) = (to16(start), to16(u.samples.len()));
        let speech = &input16[start16..(start16 + len16).min(input16.len())];
        let (spoken, _) = locate(speech, &left16, script_at + start16 as isize, search / 4);
        // Scored against the original script; found in the right channel relative to where
        // it went into the microphone.
        let s = score(
            &input16,
            start16,
            len16,
            &right16,
            spoken + (0.1 * PESQ_RATE as f64) as isize,
        );
        let heard_at = start16 as isize + (s.lag_ms * PESQ_RATE as f64 / 1000.0) as isize;
        latency_ms.push((heard_at - spoken) as f64 * 1000.0 / PESQ_RATE as f64);
        scores.push(s);
    }
    let mouth_summary = mouth.summary();
    let ear_summary = ear.summary();
    let (wire_kbps, frames_sent) = wire_kbps(&mouth_summary, case.frame_ms);
    let frame_s = f64::from(case.frame_ms) / 1000.0;
    let mouth_audio = &mouth_summary["audio"];
    let ear_audio = &ear_summary["audio"];
    eprintln!(
        "voice_quality: device call: talker's capture {}, missing {} ms; listener's output {}, \
         underrun {} samples, largest callback {} frames",
        mouth_audio["input"],
        mouth_audio["capture_missing_ms"],
        ear_audio["output"],
        ear_audio["playback_underrun_samples"],
        ear_audio["playback_block_max_frames"]
    );
    CallResult {
        scores,
        latency_ms,
        wire_kbps,
        sent_share: frames_sent * frame_s / (call_s + 1.0),
        // Real devices run on the wall clock: no virtual clock can slip.
        slip_ms: 0.0,
        ear: common_peer(&ear_summary, "mouth"),
    }
}

/// The summary entry for the peer named `name` (the listener may outlive the talker).
fn common_peer(summary: &Value, name: &str) -> Value {
    summary["peers"]
        .as_array()
        .into_iter()
        .chain(summary["departed_peers"].as_array())
        .flatten()
        .find(|p| p["username"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}
