//! Voice end to end over loopback: a real server, real headless clients, real UDP, Opus and
//! jitter buffers; assertions on the audio that comes out.

mod common;

use common::*;

const TONES: [(&str, f32); 3] = [("ann", 440.0), ("ben", 660.0), ("cat", 990.0)];

#[test]
fn three_clients_each_hear_the_other_two_and_not_themselves() {
    let server = ServerProcess::start();
    let clients = HeadlessClient::tone_members(server.addr, &TONES, &[], 7.0);
    let mut most_peers = 0;
    for (client, (name, own)) in clients.into_iter().zip(TONES) {
        let (lines, audio) = client.finish();
        // Each was introduced to both others.
        let introduced: std::collections::BTreeSet<&str> = lines
            .iter()
            .filter(|l| l["event"] == "peer_endpoints")
            .filter_map(|l| l["username"].as_str())
            .collect();
        assert_eq!(introduced.len(), 2, "{name}: {introduced:?}");
        // The summary is taken at exit; a peer that already exited is gone from it.
        let s = summary(&lines);
        let peers = s["peers"].as_array().unwrap();
        most_peers = most_peers.max(peers.len());
        for p in peers {
            assert_eq!(p["link"]["state"], "direct", "{name}: {p}");
            assert_eq!(p["auth_failures"], 0, "{name}: {p}");
        }
        // Judge 2..5 s into the run, when everyone is connected and nobody has left.
        assert!(audio.len() > 48_000 * 5, "{name}: {} samples", audio.len());
        let tail = &audio[48_000 * 2..48_000 * 5];
        let own_level = tone_level(tail, own);
        for (other, hz) in TONES {
            if other == name {
                continue;
            }
            let level = tone_level(tail, hz);
            assert!(
                level > 0.1,
                "{name} should hear {other} ({hz} Hz): amplitude {level}"
            );
            assert!(
                level > 20.0 * own_level,
                "{name}: {other} at {level} vs own tone at {own_level}"
            );
        }
        assert!(own_level < 0.01, "{name} hears itself: {own_level}");
    }
    assert_eq!(
        most_peers, 2,
        "the first to leave saw both others in its summary"
    );
}

#[test]
fn lossy_link_output_has_no_gap_longer_than_60ms() {
    let server = ServerProcess::start();
    let (talker, listener) = talker_and_listener(
        server.addr,
        &["--impair", "loss=0.1,jitter_ms=30,duplicate=0.05,seed=42"],
    );
    let (_, _) = talker.finish();
    let (lines, audio) = listener.finish();
    let s = summary(&lines);
    // The talker's run may end a moment before ours: then it is among the departed.
    let peer = peer_named(s, "talker").unwrap_or_else(|| panic!("{s}"));
    let talking = while_talking(&audio);
    let gap = longest_silence_ms(talking, 0.01);
    assert!(gap <= 60, "longest gap {gap} ms; peer stats {peer}");
    assert!(tone_level(talking, 500.0) > 0.05);
    // The simulated loss really happened and was repaired.
    let repaired =
        peer["frames_fec"].as_u64().unwrap() + peer["frames_concealed"].as_u64().unwrap();
    assert!(repaired > 10, "{peer}");
    // The simulated duplicates were recognised and dropped (never played twice).
    assert!(
        s["dropped_datagrams"]["replay"].as_u64().unwrap() > 0,
        "{s}"
    );
    let buffer = peer["target_ms"].as_f64().unwrap();
    assert!((20.0..=140.0).contains(&buffer), "{peer}");
}
