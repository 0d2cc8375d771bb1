//! Text chat across three real headless clients and a real server over loopback: everyone
//! gets everyone else's messages, in order, once, with sender and time; and a capture of the
//! loopback holds none of the text, on TCP (the server never sees chat) or UDP (sealed per
//! member). Also measures delivery time (sender's `--say` to the receiver's printed line).

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use p2p_voice::protocol::datagram::{Datagram, DatagramKind};

const NAMES: [&str; 3] = ["alice", "bob", "carol"];

/// What `name` says: short lines with words found nowhere else, a long one that takes several
/// datagrams, and one with non-ASCII text.
fn script(name: &str) -> Vec<String> {
    let mut lines: Vec<String> = (0..4)
        .map(|i| format!("{name} zebraword{i} see https://example.org/{name}/{i}"))
        .collect();
    lines.push(format!("{name} longtext {}", "quokka-lantern ".repeat(120)));
    lines.push(format!("{name} grüße 😀 naïve"));
    lines
}

/// Starts the three clients in Lobby, each saying its script once both others are connected.
fn chat_call(server: &ServerProcess, secs: f64) -> BTreeMap<&'static str, Vec<serde_json::Value>> {
    let clients: Vec<HeadlessClient> = NAMES
        .iter()
        .map(|name| {
            let mut extra = vec!["--say-peers".to_string(), "2".to_string()];
            for line in script(name) {
                extra.push("--say".into());
                extra.push(line);
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            HeadlessClient::spawn(
                server.addr,
                name,
                "Lobby",
                &["--input-silence"],
                &extra,
                secs,
            )
        })
        .collect();
    NAMES
        .iter()
        .copied()
        .zip(clients)
        .map(|(name, c)| (name, c.finish().0))
        .collect()
}

fn chat_lines<'a>(lines: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["event"] == event).collect()
}

/// Checks every client got every other's script, in order, once, from the right sender, and
/// that each sent to both others; returns the delivery times in ms (received - written).
fn assert_everyone_heard_everyone(
    runs: &BTreeMap<&'static str, Vec<serde_json::Value>>,
) -> Vec<u64> {
    let mut delays = Vec::new();
    for (&me, lines) in runs {
        let sent = chat_lines(lines, "chat_sent");
        assert_eq!(
            sent.len(),
            script(me).len(),
            "{me} sent its script: {sent:?}"
        );
        for s in &sent {
            let mut to: Vec<&str> = s["to"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            to.sort();
            let others: Vec<&str> = NAMES.iter().copied().filter(|n| *n != me).collect();
            assert_eq!(to, others, "{me} sent to both others");
        }
        let got = chat_lines(lines, "chat");
        for &other in NAMES.iter().filter(|n| **n != me) {
            let from_other: Vec<&str> = got
                .iter()
                .filter(|l| l["from"] == other)
                .map(|l| l["text"].as_str().unwrap())
                .collect();
            assert_eq!(
                from_other,
                script(other),
                "{me} got {other}'s messages, in order, each once"
            );
        }
        assert_eq!(
            got.len(),
            2 * script(me).len(),
            "nothing else, nothing twice"
        );
        // At the end, every member acknowledged everything we sent it.
        let sum = summary(lines);
        for &other in NAMES.iter().filter(|n| **n != me) {
            let p = peer_named(sum, other).unwrap_or_else(|| panic!("{me} knows {other}"));
            assert_eq!(p["chat"]["unacked"], 0, "{me} -> {other}: {p}");
            assert_eq!(
                p["chat"]["delivered"],
                script(other).len(),
                "{other} -> {me}: {p}"
            );
        }
        for l in &got {
            let (time, received) = (
                l["time"].as_u64().unwrap(),
                l["received_ms"].as_u64().unwrap(),
            );
            assert!(received >= time, "{l}");
            delays.push(received - time);
        }
    }
    delays
}

fn report_delays(mut delays: Vec<u64>) {
    delays.sort_unstable();
    let n = delays.len();
    println!(
        "chat delivery (written -> printed) over {n} messages: median {} ms, p90 {} ms, max {} ms",
        delays[n / 2],
        delays[n * 9 / 10],
        delays[n - 1]
    );
}

#[test]
fn three_clients_get_each_others_chat_in_order_once() {
    let server = ServerProcess::start();
    let runs = chat_call(&server, 7.0);
    report_delays(assert_everyone_heard_everyone(&runs));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether a UDP payload is a chat datagram, bare or in a relay envelope.
fn is_chat(payload: &[u8]) -> bool {
    match Datagram::parse(payload) {
        Ok(Datagram::Chat { .. }) => true,
        Ok(Datagram::RelayTo { inner, .. } | Datagram::RelayFrom { inner, .. }) => {
            inner.first() == Some(&DatagramKind::Chat.type_byte())
        }
        _ => false,
    }
}

#[test]
fn captured_chat_holds_no_message_text_on_tcp_or_udp() {
    if !is_root() || Command::new("tcpdump").arg("--version").output().is_err() {
        skip_unless_ci("capturing needs root and tcpdump");
        return;
    }
    let server = ServerProcess::start();
    let port = server.addr.port();
    let pcap = temp_path("chat.pcap");
    let mut dump = Command::new("tcpdump")
        .args(["-i", "lo", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg(format!("udp or tcp port {port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tcpdump");
    std::thread::sleep(Duration::from_millis(1500));
    let runs = chat_call(&server, 7.0);
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill").arg(dump.id().to_string()).status();
    let _ = dump.wait();
    // The chat itself worked, so the capture holds it.
    assert_everyone_heard_everyone(&runs);

    let voice_port = |lines: &[serde_json::Value]| -> u16 {
        lines
            .iter()
            .find(|l| l["event"] == "audio_started")
            .and_then(|l| l["voice_addr"].as_str())
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .expect("voice_addr")
    };
    let mut ours: Vec<u16> = runs.values().map(|l| voice_port(l)).collect();
    ours.push(port);
    let packets = pcap_payloads(&std::fs::read(&pcap).unwrap());
    let mine: Vec<&(u8, u16, u16, Vec<u8>)> = packets
        .iter()
        .filter(|p| ours.contains(&p.1) || ours.contains(&p.2))
        .collect();
    let tcp_bytes: usize = mine.iter().filter(|p| p.0 == 6).map(|p| p.3.len()).sum();
    assert!(tcp_bytes > 1000, "TCP captured: {tcp_bytes} bytes");
    let chat: Vec<&Vec<u8>> = mine
        .iter()
        .filter(|p| p.0 == 17 && is_chat(&p.3))
        .map(|p| &p.3)
        .collect();
    // Each of the 3 x 6 messages went to 2 members (the long ones in several datagrams), plus
    // the acks: the text did cross this wire, sealed.
    assert!(chat.len() >= 3 * 6 * 2 * 2, "chat captured: {}", chat.len());
    assert!(
        chat.iter().any(|d| d.len() > 1000),
        "the long messages' fragments are in the capture"
    );
    let needles: Vec<String> = NAMES
        .iter()
        .flat_map(|n| {
            let mut v: Vec<String> = (0..4).map(|i| format!("zebraword{i}")).collect();
            v.push(format!("example.org/{n}"));
            v
        })
        .chain(["quokka".to_string(), "grüße".to_string(), "😀".to_string()])
        .collect();
    for (proto, sport, dport, payload) in &mine {
        for needle in &needles {
            assert!(
                !contains(payload, needle.as_bytes()),
                "{needle:?} in clear on the wire ({} {sport} -> {dport})",
                if *proto == 6 { "TCP" } else { "UDP" }
            );
        }
    }
}
