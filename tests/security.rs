//! What travels on the wire: a captured call holds neither the channel password nor audio
//! anyone but the peers can play; a server whose certificate changes is refused.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use p2p_voice::protocol::datagram::Datagram;

/// Minimal pcap reader for Linux loopback captures (Ethernet framing, IPv4): yields
/// (protocol, source port, destination port, payload) for every TCP and UDP packet.
fn pcap_payloads(bytes: &[u8]) -> Vec<(u8, u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    if bytes.len() < 24 {
        return out;
    }
    let le = bytes[0] == 0xd4;
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let mut i = 24;
    while i + 16 <= bytes.len() {
        let caplen = u32_at(bytes, i + 8) as usize;
        let frame = &bytes[i + 16..(i + 16 + caplen).min(bytes.len())];
        i += 16 + caplen;
        // Ethernet header, then IPv4.
        if frame.len() < 14 + 20 || frame[12] != 0x08 || frame[13] != 0x00 {
            continue;
        }
        let ip = &frame[14..];
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let proto = ip[9];
        let total = (u16::from_be_bytes([ip[2], ip[3]]) as usize).min(ip.len());
        if total < ihl {
            continue;
        }
        let l4 = &ip[ihl..total];
        if l4.len() < 4 {
            continue;
        }
        let (sport, dport) = (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        );
        match proto {
            17 if l4.len() >= 8 => out.push((17, sport, dport, l4[8..].to_vec())),
            6 if l4.len() >= 20 => {
                let off = ((l4[12] >> 4) as usize) * 4;
                if l4.len() >= off {
                    out.push((6, sport, dport, l4[off..].to_vec()));
                }
            }
            _ => {}
        }
    }
    out
}

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
    let mut decoder = p2p_voice::voice::codec::OpusDecoder::new().unwrap();
    let mut pcm = vec![0.0f32; 960];
    let mut decoded = Vec::new();
    let mut voice_packets = 0;
    for p in &udp {
        if let Ok(Datagram::Voice { payload, .. }) = Datagram::parse(p) {
            voice_packets += 1;
            if let Ok(n) = decoder.decode(payload, &mut pcm) {
                decoded.extend_from_slice(&pcm[..n]);
            }
        }
    }
    assert!(voice_packets > 100, "voice captured: {voice_packets}");
    // Whatever a decoder makes of ciphertext is loud coloured noise: a few times more energy at
    // one frequency than another happens by chance. The real stream would be a clean tone:
    // ~0.3 at 700 Hz and ~0.003 elsewhere, a ratio of about 100.
    if !decoded.is_empty() {
        let at_tone = tone_level(&decoded, 700.0);
        let elsewhere = [450.0, 950.0, 1300.0]
            .iter()
            .map(|&hz| tone_level(&decoded, hz))
            .fold(0.0f32, f32::max);
        assert!(
            at_tone < 20.0 * elsewhere.max(0.005),
            "captured voice decodes to the talker's tone: {at_tone} vs {elsewhere}"
        );
    }
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
