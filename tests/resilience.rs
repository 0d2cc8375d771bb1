//! Calls survive the rendezvous server: voice keeps flowing peer to peer while the server is
//! down, clients say they are reconnecting, and everyone is back in the channel (once) when it
//! returns.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use p2p_voice::protocol::ServerMsg;

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

#[test]
fn killing_the_server_mid_call_does_not_stop_the_voice() {
    let mut server = ServerProcess::start();
    let tones = [("ann", 440.0f32), ("ben", 660.0), ("cat", 990.0)];
    let clients = HeadlessClient::tone_members(server.addr, &tones, &["--always-transmit"], 12.0);
    std::thread::sleep(Duration::from_secs(3));
    let killed_at = SystemTime::now();
    // Same port, same TLS identity: the clients' pinned certificate still matches.
    server.restart(Duration::from_millis(3500));
    // The server is back no earlier than this.
    let restarted_at = killed_at + Duration::from_millis(3500);
    // Everyone comes back, exactly once.
    let (mut watcher, _, _) = RawClient::login(server.addr, "watcher");
    let mut back = std::collections::BTreeSet::new();
    if let ServerMsg::Overview { channels } =
        watcher.expect(|m| matches!(m, ServerMsg::Overview { .. }))
    {
        for m in &channels[0].members {
            back.insert(m.username.clone());
        }
    }
    while back.len() < 3 {
        if let ServerMsg::MemberJoined { channel, member } =
            watcher.expect(|m| matches!(m, ServerMsg::MemberJoined { .. }))
        {
            assert_eq!(channel, "Lobby");
            assert!(
                back.insert(member.username.clone()),
                "duplicate {}",
                member.username
            );
        }
    }
    for (client, (name, own)) in clients.into_iter().zip(tones) {
        let (lines, audio) = client.finish();
        let started = lines
            .iter()
            .find(|l| l["event"] == "audio_started")
            .and_then(|l| l["unix_us"].as_i64())
            .expect("audio_started line");
        assert!(
            lines
                .iter()
                .any(|l| l["event"] == "disconnected" && l["retry_in_ms"].is_u64()),
            "{name} reported the outage and a retry"
        );
        // The outage window, in this client's output samples.
        let from = ((unix_us(killed_at) + 500_000 - started) * 48 / 1000) as usize;
        let to = ((unix_us(restarted_at) - 200_000 - started) * 48 / 1000) as usize;
        assert!(
            to > from + 48_000 && to <= audio.len(),
            "{name}: window {from}..{to} of {}",
            audio.len()
        );
        let outage = &audio[from..to];
        for (other, hz) in tones {
            if other == name {
                continue;
            }
            let level = tone_level(outage, hz);
            assert!(
                level > 0.05,
                "{name} hears {other} during the outage: {level}"
            );
        }
        let own_level = tone_level(outage, own);
        assert!(own_level < 0.02, "{name} hears its own tone: {own_level}");
        let gap = longest_silence_ms(outage, 0.01);
        assert!(gap <= 60, "{name}: {gap} ms gap during the outage");
        // And after the return, the links to both others (under their new ids) were direct
        // again. A peer whose run ended a moment before ours is in `departed_peers`.
        let rejoined = lines
            .iter()
            .rposition(|l| l["event"] == "identified")
            .expect("identified again after the restart");
        let new_ids: std::collections::BTreeSet<u64> = lines[rejoined..]
            .iter()
            .filter(|l| l["event"] == "peer_endpoints")
            .filter_map(|l| l["user_id"].as_u64())
            .collect();
        assert_eq!(new_ids.len(), 2, "{name} learned both others again");
        let s = summary(&lines);
        let mut linked = std::collections::BTreeSet::new();
        for p in s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(s["departed_peers"].as_array().unwrap())
        {
            let id = p["user_id"].as_u64().unwrap();
            if new_ids.contains(&id) && p["link"]["state"] == "direct" {
                linked.insert(id);
            }
        }
        assert_eq!(linked, new_ids, "{name}: {s}");
    }
}

#[test]
fn a_burst_of_malformed_connections_does_not_disturb_a_call() {
    use std::io::Write;
    let server = ServerProcess::start();
    let (talker, listener) = talker_and_listener(server.addr, &[]);
    std::thread::sleep(Duration::from_secs(3));
    // 1,000 connections in a burst, each sending garbage.
    let addr = server.addr;
    let flood = std::thread::spawn(move || {
        let mut open = Vec::new();
        for i in 0..1000u32 {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                let _ = s.write_all(&i.to_be_bytes().repeat(64));
                open.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        open.len()
    });
    let opened = flood.join().unwrap();
    assert!(opened > 0);
    // The server still answers promptly.
    let (_late, st, _) = RawClient::login(server.addr, "late");
    assert_eq!(st, p2p_voice::protocol::Status::Ok);
    let (_, _) = talker.finish();
    let (_, audio) = listener.finish();
    let gap = longest_silence_ms(while_talking(&audio), 0.01);
    assert!(gap <= 60, "longest gap {gap} ms during the flood");
}
