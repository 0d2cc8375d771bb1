//! What travels on the wire: a captured call holds neither the channel password nor audio
//! anyone but the peers can play; a server whose certificate changes is refused.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use p2p_voice::protocol::datagram::Datagram;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_captured_call_holds_no_password_and_no_playable_audio() {
    let is_root = is_root();
    if !is_root || Command::new("tcpdump").arg("--version").output().is_err() {
        skip_unless_ci("capturing needs root and tcpdump");
        return;
    }
    let server = ServerProcess::start();
    let port = server.addr.port();
    let pcap = temp_path("call.pcap");
    let mut dump = Command::new("tcpdump")
        .args(["-i", "lo", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg(format!("udp or tcp port {port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tcpdump");
    std::thread::sleep(Duration::from_millis(1500));
    let a = HeadlessClient::spawn(
        server.addr,
        "alice",
        "Private",
        &["--input-tone", "700"],
        &["--password", "letmein", "--always-transmit"],
        4.0,
    );
    let b = HeadlessClient::spawn(
        server.addr,
        "bob",
        "Private",
        &["--input-silence"],
        &["--password", "letmein"],
        4.0,
    );
    let (a_lines, _) = a.finish();
    let (b_lines, heard) = b.finish();
    // Only this call's sockets count: other programs may use the loopback meanwhile.
    let voice_port = |lines: &[serde_json::Value]| -> u16 {
        lines
            .iter()
            .find(|l| l["event"] == "audio_started")
            .and_then(|l| l["voice_addr"].as_str())
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .expect("voice_addr")
    };
    let ours = [voice_port(&a_lines), voice_port(&b_lines), port];
    std::thread::sleep(Duration::from_millis(500));
    unsafe_sigterm(dump.id());
    let _ = dump.wait();
    // The call itself worked (so the capture holds a real call).
    assert!(tone_level(&heard[48_000..], 700.0) > 0.1, "bob heard alice");

    let packets = pcap_payloads(&std::fs::read(&pcap).unwrap());
    let mine = |p: &&(u8, u16, u16, Vec<u8>)| ours.contains(&p.1) || ours.contains(&p.2);
    let tcp: Vec<&Vec<u8>> = packets
        .iter()
        .filter(|p| p.0 == 6)
        .filter(mine)
        .map(|p| &p.3)
        .collect();
    let udp: Vec<&Vec<u8>> = packets
        .iter()
        .filter(|p| p.0 == 17)
        .filter(mine)
        .map(|p| &p.3)
        .collect();
    assert!(
        tcp.iter().map(|p| p.len()).sum::<usize>() > 1000,
        "TCP captured"
    );
    for p in tcp.iter().chain(udp.iter()) {
        assert!(!contains(p, b"letmein"), "password on the wire");
        assert!(!contains(p, b"Private"), "channel name on the wire");
    }
    // Voice datagrams carry ciphertext: decoding them as Opus gives nothing like the tone.
    let payloads: Vec<&[u8]> = udp
        .iter()
        .filter_map(|p| match Datagram::parse(p) {
            Ok(Datagram::Voice { payload, .. }) => Some(payload),
            _ => None,
        })
        .collect();
    assert!(payloads.len() > 100, "voice captured: {}", payloads.len());
    let captured = decode_as_opus(payloads.iter().copied());
    // Random bytes pass as an Opus packet roughly every other time (any TOC byte with code 0
    // is one frame of any length), so out of a hundred-odd packets many decode. If none do,
    // the decoder path is broken and "no tone" below would prove nothing.
    assert!(
        captured.frames >= 10,
        "only {} of {} captured voice payloads decoded as Opus: the leak check below would be vacuous",
        captured.frames,
        payloads.len()
    );
    // Control: the same decoding and measuring applied to plaintext Opus of the talker's tone
    // must find it, or a leak of exactly that would go unnoticed.
    let mut encoder = p2p_voice::voice::tx::OpusEncoder::new(
        p2p_voice::voice::codec::FrameDuration::Ms20,
        32_000,
    )
    .unwrap();
    let mut tone = p2p_voice::audio::ToneGenerator::new(700.0, 0.3, 48_000);
    let mut frame = [0.0f32; 960];
    let plaintext: Vec<Vec<u8>> = (0..payloads.len().min(200))
        .map(|_| {
            tone.fill(&mut frame);
            let mut out = vec![0u8; 1500];
            let n = encoder.encode(&frame, &mut out).unwrap();
            out.truncate(n);
            out
        })
        .collect();
    let control = decode_as_opus(plaintext.iter().map(|p| p.as_slice()));
    println!(
        "captured: {} voice payloads, {} decoded, 700 Hz {:.4} vs {:.4}; control: {} decoded, \
         700 Hz {:.4} vs {:.4}",
        payloads.len(),
        captured.frames,
        captured.at_tone(),
        captured.elsewhere(),
        control.frames,
        control.at_tone(),
        control.elsewhere()
    );
    assert!(
        control.sounds_like_tone(),
        "control: plaintext Opus of the tone is not recognised ({} frames, {} vs {})",
        control.frames,
        control.at_tone(),
        control.elsewhere()
    );
    assert!(
        !captured.sounds_like_tone(),
        "captured voice decodes to the talker's tone: {} vs {} ({} frames)",
        captured.at_tone(),
        captured.elsewhere(),
        captured.frames
    );
}

/// What an eavesdropper's Opus decoder makes of a stream of payloads.
struct Decoded {
    /// Payloads the decoder accepted.
    frames: usize,
    pcm: Vec<f32>,
}

impl Decoded {
    fn at_tone(&self) -> f32 {
        tone_level(&self.pcm, 700.0)
    }

    fn elsewhere(&self) -> f32 {
        [450.0, 950.0, 1300.0]
            .iter()
            .map(|&hz| tone_level(&self.pcm, hz))
            .fold(0.0f32, f32::max)
    }

    /// Whatever a decoder makes of ciphertext is loud coloured noise: a few times more energy
    /// at one frequency than another happens by chance. The real stream is a clean tone:
    /// ~0.3 at 700 Hz and ~0.003 elsewhere, a ratio of about 100.
    fn sounds_like_tone(&self) -> bool {
        self.at_tone() >= 20.0 * self.elsewhere().max(0.005)
    }
}

/// Decodes each payload as one Opus packet, keeping what decodes and counting it.
fn decode_as_opus<'a>(payloads: impl Iterator<Item = &'a [u8]>) -> Decoded {
    let mut decoder = p2p_voice::voice::rx::OpusDecoder::new().unwrap();
    let mut pcm = vec![0.0f32; 960];
    let mut out = Decoded {
        frames: 0,
        pcm: Vec::new(),
    };
    for payload in payloads {
        if let Ok(n) = decoder.decode(payload, &mut pcm) {
            out.frames += 1;
            out.pcm.extend_from_slice(&pcm[..n]);
        }
    }
    out
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill").arg(pid.to_string()).status();
}

#[test]
fn a_server_whose_certificate_changed_is_refused_until_accepted() {
    let config = temp_path("pins");
    let run = |server: &ServerProcess, extra: &[&str]| {
        Command::new(bin())
            .env("P2P_VOICE_CONFIG_DIR", &config)
            .args(["client", "--headless", "--server", &server.addr.to_string()])
            .args(["--username", "carol", "--duration", "1"])
            .args(extra)
            .output()
            .unwrap()
    };
    let mut server = ServerProcess::start();
    assert!(run(&server, &[]).status.success(), "first use pins");
    assert!(run(&server, &[]).status.success(), "same certificate");
    // Same address, new identity (a reinstalled server, or someone in the middle).
    let port = server.addr.port();
    server.kill();
    std::thread::sleep(Duration::from_millis(200));
    let impostor = ServerProcess::start_on(None, port);
    let out = run(&impostor, &[]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate changed"), "{stderr}");
    assert!(run(&impostor, &["--accept-new-cert"]).status.success());
    assert!(run(&impostor, &[]).status.success(), "re-pinned");
}

/// A headless client in Lobby with its config directory (identity and remembered peers) at
/// `config`, for `secs` seconds.
fn client_in(
    config: &std::path::Path,
    server: &ServerProcess,
    name: &str,
    input: &[&str],
    secs: f64,
) -> HeadlessClient {
    client_with(config, server, name, input, &[], secs)
}

fn client_with(
    config: &std::path::Path,
    server: &ServerProcess,
    name: &str,
    input: &[&str],
    extra: &[&str],
    secs: f64,
) -> HeadlessClient {
    let output = temp_path(&format!("{name}.wav"));
    let child = Command::new(bin())
        .env("P2P_VOICE_CONFIG_DIR", config)
        .args(["client", "--headless", "--server", &server.addr.to_string()])
        .args([
            "--username",
            name,
            "--channel",
            "Lobby",
            "--always-transmit",
        ])
        .args(["--duration", &secs.to_string(), "--output-wav"])
        .arg(&output)
        .args(input)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn headless client");
    HeadlessClient {
        child,
        output,
        name: name.into(),
    }
}

/// The first line of event `event` about `username`.
fn event_about<'a>(
    lines: &'a [serde_json::Value],
    event: &str,
    username: &str,
) -> Option<&'a serde_json::Value> {
    lines
        .iter()
        .find(|l| l["event"] == event && l["username"] == username)
}

/// Issue 13: identities persist in the config directory, both sides see one safety number,
/// a second call recognises the peer, and another identity under a known name (an impostor,
/// or a server swapping keys) is a loud `identity_changed` event whose voice is not played.
#[test]
fn identities_persist_and_a_changed_identity_is_reported_and_not_heard() {
    let server = ServerProcess::start();
    let (alice_dir, bob_dir) = (temp_path("alice-config"), temp_path("bob-config"));
    let call_with = |alice_dir: &std::path::Path, bob_extra: &[&str]| {
        let a = client_in(alice_dir, &server, "alice", &["--input-tone", "700"], 3.0);
        let b = client_with(
            &bob_dir,
            &server,
            "bob",
            &["--input-silence"],
            bob_extra,
            3.0,
        );
        let (a_lines, _) = a.finish();
        let (b_lines, heard) = b.finish();
        (a_lines, b_lines, heard)
    };
    let call = |alice_dir: &std::path::Path| call_with(alice_dir, &[]);

    let (a1, b1, heard1) = call(&alice_dir);
    let seen = event_about(&b1, "peer_identity", "alice").expect("bob checks alice");
    assert_eq!(seen["first_seen"], true, "{seen}");
    let number = seen["safety_number"].as_str().unwrap().to_string();
    assert_eq!(number.split(' ').count(), 8, "{number}");
    let seen_by_alice = event_about(&a1, "peer_identity", "bob").expect("alice checks bob");
    assert_eq!(
        seen_by_alice["safety_number"],
        number.as_str(),
        "one number on both sides"
    );
    assert!(tone_level(&heard1, 700.0) > 0.05, "bob hears alice");
    let alice_fp = a1
        .iter()
        .find(|l| l["event"] == "identified")
        .and_then(|l| l["identity_fingerprint"].as_str())
        .unwrap()
        .to_string();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(alice_dir.join("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let (a2, b2, _) = call(&alice_dir);
    let again = event_about(&b2, "peer_identity", "alice").expect("bob checks alice again");
    assert_eq!(again["first_seen"], false, "{again}");
    assert_eq!(again["safety_number"], number.as_str());
    let alice_fp2 = a2
        .iter()
        .find(|l| l["event"] == "identified")
        .and_then(|l| l["identity_fingerprint"].as_str());
    assert_eq!(
        alice_fp2,
        Some(alice_fp.as_str()),
        "the same identity after a restart"
    );

    // "alice" with another identity key.
    let impostor_dir = temp_path("impostor-config");
    let (_, b3, heard3) = call(&impostor_dir);
    let changed = event_about(&b3, "identity_changed", "alice").expect("a loud change");
    assert_eq!(
        changed["previous_fingerprint"],
        alice_fp.as_str(),
        "{changed}"
    );
    assert_ne!(changed["presented_fingerprint"], alice_fp.as_str());
    assert!(
        tone_level(&heard3, 700.0) < 0.01,
        "the changed identity's voice is not played"
    );

    // Bob checked with her: she reinstalled. Accepted, the new key is used and remembered.
    let (_, b4, heard4) = call_with(&impostor_dir, &["--accept-new-identity"]);
    assert!(event_about(&b4, "identity_changed", "alice").is_some());
    assert!(tone_level(&heard4, 700.0) > 0.05, "accepted, she is heard");
    let (_, b5, _) = call(&impostor_dir);
    assert!(event_about(&b5, "identity_changed", "alice").is_none());
    assert_eq!(
        event_about(&b5, "peer_identity", "alice").map(|l| l["first_seen"].clone()),
        Some(serde_json::Value::Bool(false)),
        "the accepted key is the remembered one now"
    );
}
