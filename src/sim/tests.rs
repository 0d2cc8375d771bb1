//! Whole-system behaviour, as users would notice it, in the simulated world.

use std::time::Duration;

use super::adapter::PeerPath;
use super::network::{LinkProfile, NatKind};
use super::{UserSpec, World};

/// A talker counts as heard above this amplitude (tones are sent at 0.3)...
const HEARD: f32 = 0.05;
/// ...and as not heard below this one.
const SILENT: f32 = 0.01;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Alice (440 Hz), Bob (660 Hz) and Carol (880 Hz), each behind a home router; Bob's link is
/// lossy, jittery and reorders. Control latencies differ so that the server numbers them
/// 1, 2, 3 in this order.
fn three_users(seed: u64) -> (World, [usize; 3]) {
    let mut w = World::new(seed);
    let lossy = LinkProfile {
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(8),
        loss: 0.02,
        reorder: 0.05,
    };
    let a = w.add_user(UserSpec::new("alice", 440.0).control_latency(secs(0.010)));
    let b = w.add_user(
        UserSpec::new("bob", 660.0)
            .link(lossy)
            .control_latency(secs(0.020)),
    );
    let c = w.add_user(UserSpec::new("carol", 880.0).control_latency(secs(0.030)));
    (w, [a, b, c])
}

/// Connects everyone, joins them to Lobby and has them all talk from `talk_at`.
fn start_call(w: &mut World, users: &[usize], talk_at: Duration) {
    for &u in users {
        w.connect(u);
    }
    w.run_for(secs(0.5));
    for &u in users {
        w.join(u, "Lobby");
    }
    w.run_for(talk_at.saturating_sub(w.now()));
    for &u in users {
        w.set_talking(u, true);
    }
}

/// Asserts that in `from..to` each user hears exactly the others listed in `pairs`
/// (listener, talker, heard?), with the figures in the message.
fn assert_hearing(w: &World, from: Duration, to: Duration, pairs: &[(usize, usize, bool)]) {
    let mut wrong = Vec::new();
    for &(l, t, heard) in pairs {
        let level = w.hears(l, t, from, to);
        let ok = if heard { level > HEARD } else { level < SILENT };
        if !ok {
            wrong.push(format!(
                "listener {l} talker {t}: level {level:.4}, heard={heard}"
            ));
        }
    }
    assert!(wrong.is_empty(), "between {from:?} and {to:?}: {wrong:#?}");
}

/// Everyone hears everyone else and never themselves.
fn all_hear_all(users: &[usize]) -> Vec<(usize, usize, bool)> {
    let mut v = Vec::new();
    for &l in users {
        for &t in users {
            v.push((l, t, l != t));
        }
    }
    v
}

#[test]
fn a_call_of_three_hears_each_other_and_not_themselves() {
    let run = |seed| {
        let (mut w, users) = three_users(seed);
        start_call(&mut w, &users, secs(3.0));
        w.run_for(secs(10.0));
        (w, users)
    };
    let (mut w, users) = run(1);
    assert_hearing(&w, secs(5.0), secs(13.0), &all_hear_all(&users));
    for &a in &users {
        for &b in &users {
            if a != b {
                assert_eq!(w.path(a, b), Some(PeerPath::Direct), "{a} -> {b}");
            }
        }
    }
    assert!(w.net_stats().lost > 0, "Bob's link loses datagrams");
    // Deterministic: the same seed gives the same run, datagram for datagram.
    let (mut again, _) = run(1);
    assert_eq!(w.digest(), again.digest());
}

#[test]
fn another_seed_gives_another_run() {
    let digest = |seed| {
        let (mut w, users) = three_users(seed);
        start_call(&mut w, &users, secs(1.5));
        w.run_for(secs(1.0));
        w.digest()
    };
    assert_ne!(digest(1), digest(2));
}

/// The server restarts mid-call and numbers the users the other way round (Carol reconnects
/// fastest): Alice and Carol get new ids, Bob keeps his. Voice carries on through the outage
/// (peers talk directly) and after the reintroduction, which needs every engine to seal and
/// tag with its new id. (The session retires every stale peer with `PeerGone` before
/// `Identified`, which drops their ciphers, so this passes even without the engine's own reset
/// on a new id; `a_user_who_connects_again_mid_call_is_heard_under_the_new_id` is the path
/// that needs it.)
#[test]
fn voice_continues_across_a_server_restart_that_renumbers_users() {
    let (mut w, users) = three_users(3);
    let [a, b, c] = users;
    start_call(&mut w, &users, secs(2.0));
    w.run_for(secs(4.0));
    let before: Vec<_> = users.iter().map(|&u| w.user_id(u).unwrap()).collect();
    assert_eq!(before, vec![1, 2, 3]);

    w.stop_server();
    w.set_control_latency(a, secs(0.030));
    w.set_control_latency(c, secs(0.010));
    w.run_for(secs(1.0));
    assert!(users.iter().all(|&u| !w.is_ready(u)));
    // 6..7 s: no server, the call goes on.
    assert_hearing(&w, secs(6.2), secs(7.0), &all_hear_all(&users));

    w.start_server();
    w.run_for(secs(10.0));
    let after: Vec<_> = users.iter().map(|&u| w.user_id(u).unwrap()).collect();
    assert_eq!(after, vec![3, 2, 1], "renumbered as reconnected");
    for &u in &users {
        assert_eq!(
            w.voice_self_id(u),
            w.user_id(u),
            "engine follows the session"
        );
        assert_eq!(w.channel(u), Some("Lobby"), "rejoined");
    }
    assert_hearing(&w, secs(12.0), secs(17.0), &all_hear_all(&users));
    for &(x, y) in &[(a, b), (b, a), (a, c), (c, b)] {
        assert_eq!(w.path(x, y), Some(PeerPath::Direct), "{x} -> {y}");
    }
}

/// Connecting again in the middle of a call (the user presses Connect) gives Alice a new id
/// while Bob and Carol keep theirs, and the session retires no peers on that path: only the
/// engine's own reset on a new self id keeps it from sealing for Bob and Carol under the old
/// id, which they no longer accept. (After a server restart the session's `PeerGone` for every
/// stale peer drops those ciphers anyway, so this is where that fix is visible.)
#[test]
fn a_user_who_connects_again_mid_call_is_heard_under_the_new_id() {
    let (mut w, users) = three_users(5);
    let [a, b, c] = users;
    start_call(&mut w, &users, secs(2.0));
    w.run_for(secs(3.0));
    let ids = |w: &World| users.map(|u| w.user_id(u));
    assert_eq!(ids(&w), [Some(1), Some(2), Some(3)]);
    w.connect(a);
    w.run_for(secs(1.0));
    assert!(w.is_ready(a));
    assert_eq!(ids(&w), [Some(4), Some(2), Some(3)]);
    w.join(a, "Lobby");
    w.run_for(secs(6.0));
    assert_hearing(&w, secs(8.0), secs(12.0), &all_hear_all(&users));
    assert_eq!(w.path(b, a), Some(PeerPath::Direct));
    assert_eq!(w.path(c, a), Some(PeerPath::Direct));
}

#[test]
fn a_user_who_leaves_is_not_heard_until_rejoining() {
    let (mut w, users) = three_users(4);
    let [a, b, c] = users;
    start_call(&mut w, &users, secs(2.0));
    w.run_for(secs(4.0));
    assert_hearing(&w, secs(4.0), secs(6.0), &all_hear_all(&users));

    w.leave(c);
    w.run_for(secs(5.0));
    assert_eq!(w.channel(c), None);
    assert_hearing(
        &w,
        secs(7.0),
        secs(11.0),
        &[
            (a, b, true),
            (b, a, true),
            (a, c, false),
            (b, c, false),
            (c, a, false),
            (c, b, false),
        ],
    );

    w.join(c, "Lobby");
    w.run_for(secs(5.0));
    assert_hearing(&w, secs(13.0), secs(16.0), &all_hear_all(&users));
}

/// Whether two users end up hearing each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A direct link both ways, and each hears the other.
    Direct,
    /// Relayed by the server both ways, and each hears the other.
    ViaServer,
    /// Both sides gave up on the link, and neither hears the other.
    Unreachable,
}

use NatKind::{Home, Public, Symmetric, UdpBlocked};
use Outcome::{Direct, Unreachable, ViaServer};

/// What happens for every unordered pair of NAT kinds, with a server that does not relay (a
/// plain dedicated `server`) and with one that does (host mode, `server --relay`). A user
/// whose UDP is blocked is reached only through the relaying server, over its control
/// connection (the tunnel).
const OUTCOMES: [(NatKind, NatKind, Outcome, Outcome); 10] = [
    (Public, Public, Direct, Direct),
    (Public, Home, Direct, Direct),
    (Public, Symmetric, Direct, Direct),
    (Public, UdpBlocked, Unreachable, ViaServer),
    (Home, Home, Direct, Direct),
    (Home, Symmetric, Unreachable, ViaServer),
    (Home, UdpBlocked, Unreachable, ViaServer),
    (Symmetric, Symmetric, Unreachable, ViaServer),
    (Symmetric, UdpBlocked, Unreachable, ViaServer),
    (UdpBlocked, UdpBlocked, Unreachable, ViaServer),
];

/// Two users behind `x` and `y` in one call, talking, for longer than punching may take
/// before a link is declared unreachable (10 s). `Err` describes anything that is none of
/// the outcomes (one-sided links, links up without audio, ...).
fn pair_outcome(x: NatKind, y: NatKind, server_relays: bool) -> Result<Outcome, String> {
    let mut w = World::with_server_relay(10, server_relays);
    let a = w.add_user(UserSpec::new("a", 440.0).nat(x));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(y));
    start_call(&mut w, &[a, b], secs(1.0));
    w.run_for(secs(12.0));
    let paths = (w.path(a, b), w.path(b, a));
    let heard = (
        w.hears(a, b, secs(10.0), secs(13.0)),
        w.hears(b, a, secs(10.0), secs(13.0)),
    );
    let both = |p| paths == (Some(p), Some(p));
    let hear_both = heard.0 > HEARD && heard.1 > HEARD;
    if both(PeerPath::Direct) && hear_both {
        Ok(Direct)
    } else if both(PeerPath::Relayed(None)) && hear_both {
        Ok(ViaServer)
    } else if both(PeerPath::Unreachable) && heard.0 < SILENT && heard.1 < SILENT {
        Ok(Unreachable)
    } else {
        Err(format!("paths {paths:?}, levels {heard:?}"))
    }
}

/// A router that maps the user's port (PCP, NAT-PMP, UPnP-IGD) makes a symmetric NAT
/// reachable directly from the NATs that could not punch through to it (the table above),
/// with a server that does not relay; the peer's path is the mapped address.
#[test]
fn a_mapped_port_behind_a_symmetric_nat_connects_what_punching_cannot() {
    for other in [Home, Symmetric] {
        let mut w = World::with_server_relay(10, false);
        let a = w.add_user(UserSpec::new("a", 440.0).nat(Symmetric).port_mapped());
        let b = w.add_user(UserSpec::new("b", 660.0).nat(other));
        start_call(&mut w, &[a, b], secs(1.0));
        w.run_for(secs(12.0));
        assert_eq!(
            (w.path(a, b), w.path(b, a)),
            (Some(PeerPath::Direct), Some(PeerPath::Direct)),
            "symmetric with a mapping <-> {other:?}"
        );
        assert!(w.hears(a, b, secs(10.0), secs(13.0)) > HEARD, "{other:?}");
        assert!(w.hears(b, a, secs(10.0), secs(13.0)) > HEARD, "{other:?}");
    }
}

/// Issue 12's goal: moving from a relay to a direct path leaves no gap over 60 ms. Two
/// symmetric NATs talk through the relaying server; mid-call one router maps the port (a
/// direct path appears), the pair moves to it, and neither hears a gap around the move
/// (measured: none at all, in 20 ms blocks; a 300 ms outage of one link at the same moment
/// shows as a 320 ms gap, so the check can fail).
#[test]
fn moving_from_the_server_relay_to_a_direct_path_leaves_no_gap_over_60_ms() {
    let mut w = World::with_server_relay(21, true);
    let a = w.add_user(UserSpec::new("a", 440.0).nat(Symmetric));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(Symmetric));
    start_call(&mut w, &[a, b], secs(1.0));
    w.run_for(secs(6.0));
    assert_eq!(
        w.path(a, b),
        Some(PeerPath::Relayed(None)),
        "relayed at first"
    );
    let switch_at = w.now();
    w.map_port_now(a);
    w.run_for(secs(8.0));
    assert_eq!(
        (w.path(a, b), w.path(b, a)),
        (Some(PeerPath::Direct), Some(PeerPath::Direct)),
        "direct once the mapping is announced"
    );
    let window = (switch_at - secs(2.0), w.now() - secs(0.5));
    for (listener, talker) in [(a, b), (b, a)] {
        assert!(w.hears(listener, talker, window.0, window.1) > HEARD);
        let gap = w.longest_gap(listener, talker, window.0, window.1);
        assert!(
            gap <= Duration::from_millis(60),
            "user {listener} heard a gap of {gap:?} around the move to the direct path"
        );
    }
}

#[test]
fn every_nat_pairing_has_its_outcome_with_and_without_a_relaying_server() {
    let mut listed: Vec<_> = OUTCOMES
        .iter()
        .map(|&(x, y, _, _)| (x.min(y), x.max(y)))
        .collect();
    listed.sort();
    let mut all = Vec::new();
    for (i, &x) in NatKind::ALL.iter().enumerate() {
        for &y in &NatKind::ALL[i..] {
            all.push((x.min(y), x.max(y)));
        }
    }
    all.sort();
    assert_eq!(
        listed, all,
        "the table lists each unordered pair of NAT kinds once"
    );
    let mut wrong = Vec::new();
    for &(x, y, plain, relaying) in &OUTCOMES {
        for (server_relays, expected) in [(false, plain), (true, relaying)] {
            let got = pair_outcome(x, y, server_relays);
            if got != Ok(expected) {
                wrong.push(format!(
                    "{x:?} <-> {y:?} (server relays: {server_relays}): expected {expected:?}, got {got:?}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Three members: two behind symmetric NATs cannot punch to each other, but both reach a
/// third on a public address, which forwards their sealed voice; the server does not relay.
#[test]
fn a_member_bridges_two_that_cannot_reach_each_other() {
    let mut w = World::with_server_relay(11, false);
    let a = w.add_user(UserSpec::new("a", 440.0).nat(Symmetric));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(Symmetric));
    let c = w.add_user(UserSpec::new("c", 880.0).nat(Public));
    start_call(&mut w, &[a, b, c], secs(1.0));
    w.run_for(secs(12.0));
    let cid = w.user_id(c);
    assert_eq!(w.path(a, b), Some(PeerPath::Relayed(cid)));
    assert_eq!(w.path(b, a), Some(PeerPath::Relayed(cid)));
    assert_eq!(w.path(a, c), Some(PeerPath::Direct));
    assert_hearing(&w, secs(10.0), secs(13.0), &all_hear_all(&[a, b, c]));
    // Receiver reports cross the member relay too: each talker knows what the other loses.
    assert_eq!(w.reported_loss(a, b), Some(0.0));
    assert_eq!(w.reported_loss(b, a), Some(0.0));
}

/// With both a member and the server able to relay, the member carries the pair (the design
/// keeps the server out of voice where it can).
#[test]
fn a_member_relay_is_preferred_to_the_server() {
    let mut w = World::with_server_relay(12, true);
    let a = w.add_user(UserSpec::new("a", 440.0).nat(Symmetric));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(Symmetric));
    let c = w.add_user(UserSpec::new("c", 880.0).nat(Public));
    start_call(&mut w, &[a, b, c], secs(1.0));
    w.run_for(secs(12.0));
    let cid = w.user_id(c);
    assert_eq!(w.path(a, b), Some(PeerPath::Relayed(cid)));
    assert_eq!(w.path(b, a), Some(PeerPath::Relayed(cid)));
    assert_hearing(&w, secs(10.0), secs(13.0), &all_hear_all(&[a, b, c]));
}

/// Relayed audio flows long before punching gives up: the relay path starts with punching.
#[test]
fn a_relayed_pair_hears_each_other_within_two_seconds_of_joining() {
    let mut w = World::with_server_relay(13, true);
    let a = w.add_user(UserSpec::new("a", 440.0).nat(Symmetric));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(Symmetric));
    start_call(&mut w, &[a, b], secs(1.0));
    w.run_for(secs(4.0));
    assert_eq!(w.path(a, b), Some(PeerPath::Relayed(None)));
    assert_hearing(&w, secs(3.0), secs(4.0), &all_hear_all(&[a, b]));
}

/// A channel of three where one member's network blocks UDP: the two others talk directly,
/// and each of them reaches the blocked one through the server (over its TLS tunnel); all
/// three hear both others, and nobody hears themselves.
#[test]
fn a_member_whose_udp_is_blocked_is_in_the_whole_call_through_the_tunnel() {
    let mut w = World::with_server_relay(21, true);
    let a = w.add_user(UserSpec::new("a", 440.0).nat(UdpBlocked));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(Home));
    let c = w.add_user(UserSpec::new("c", 880.0).nat(Home));
    start_call(&mut w, &[a, b, c], secs(1.0));
    w.run_for(secs(8.0));
    assert_eq!(w.path(b, c), Some(PeerPath::Direct));
    assert_eq!(w.path(c, b), Some(PeerPath::Direct));
    for (x, y) in [(a, b), (b, a), (a, c), (c, a)] {
        assert_eq!(w.path(x, y), Some(PeerPath::Relayed(None)), "{x} -> {y}");
    }
    let (from, to) = (secs(6.0), secs(9.0));
    for (listener, talker) in [(a, b), (a, c), (b, a), (c, a), (b, c), (c, b)] {
        let level = w.hears(listener, talker, from, to);
        assert!(level > HEARD, "{listener} hears {talker} at {level}");
    }
    for u in [a, b, c] {
        assert!(w.hears(u, u, from, to) < SILENT, "{u} hears itself");
    }
    // Receiver reports go through the tunnel both ways, like voice.
    for (talker, listener) in [(a, b), (b, a), (a, c), (c, a), (b, c)] {
        assert_eq!(
            w.reported_loss(talker, listener),
            Some(0.0),
            "{talker} <- {listener}"
        );
    }
}

/// Alice and Bob in a call, hearing each other, identities first seen.
fn alice_and_bob(seed: u64) -> (World, usize, usize) {
    let mut w = World::new(seed);
    let a = w.add_user(UserSpec::new("alice", 440.0).control_latency(secs(0.010)));
    let b = w.add_user(UserSpec::new("bob", 660.0).control_latency(secs(0.020)));
    start_call(&mut w, &[a, b], secs(1.0));
    w.run_for(secs(2.0));
    assert_hearing(&w, secs(2.0), secs(3.0), &all_hear_all(&[a, b]));
    (w, a, b)
}

/// Alice leaves the channel and comes back (a new voice key, announced anew), and the call
/// runs on for a while.
fn alice_rejoins(w: &mut World, a: usize) {
    w.leave(a);
    w.run_for(secs(0.5));
    w.join(a, "Lobby");
    w.set_talking(a, true);
    w.run_for(secs(2.5));
}

#[test]
fn identities_are_remembered_across_a_rejoin_and_both_sides_see_one_safety_number() {
    use crate::client::session::PeerIdentityStatus;
    let (mut w, a, b) = alice_and_bob(31);
    let ab = w.safety_number(a, b).expect("alice has bob's identity");
    assert_eq!(Some(ab.clone()), w.safety_number(b, a));
    assert_eq!(ab.split(' ').count(), 8);
    assert!(matches!(
        w.peer_identity(b, a),
        Some(PeerIdentityStatus::Trusted { .. })
    ));
    alice_rejoins(&mut w, a);
    let now = w.now();
    assert_hearing(&w, now - secs(1.0), now, &all_hear_all(&[a, b]));
    assert!(
        matches!(
            w.peer_identity(b, a),
            Some(PeerIdentityStatus::Trusted { .. })
        ),
        "a new voice key under the same identity is no change: {:?}",
        w.peer_identity(b, a)
    );
    assert_eq!(w.safety_number(b, a), Some(ab), "the safety number stays");
}

/// Issue 13: a server that swaps keys after first contact is detected. Here, when Alice
/// rejoins, the server tells Bob a voice key of its own, signed by an identity key of its own
/// (it cannot sign with Alice's): Bob reports Alice's identity as changed and uses no voice
/// key of hers until he accepts, so the server hears nothing and Bob hears no one in Alice's
/// name. The same server that keeps Alice's signature but swaps the key is refused outright.
#[test]
fn a_key_swapping_server_is_caught_after_first_contact() {
    use crate::client::session::PeerIdentityStatus;
    use crate::identity::{sign_voice_key, IdentityKey, KeyBinding};
    use crate::protocol::ServerMsg;
    use crate::voice::net::crypto::SessionKeys;

    for keep_alices_signature in [false, true] {
        let (mut w, a, b) = alice_and_bob(32);
        let alice_identity = w.peer_identity(b, a).and_then(|s| s.identity()).unwrap();
        let mallory = IdentityKey::from_secret_bytes([66; 32]);
        let mallory_voice = SessionKeys::from_secret_bytes([77; 32]).public_key();
        let signer = mallory.clone();
        w.set_hostile_server(move |to, msg| {
            let ServerMsg::PeerEndpoints { peer } = msg else {
                return;
            };
            if to != b || peer.username != "alice" || peer.voice_key.is_none() {
                return;
            }
            peer.voice_key = Some(mallory_voice);
            if !keep_alices_signature {
                let binding = KeyBinding {
                    server: super::adapter::SIM_SERVER_BINDING,
                    username: &peer.username,
                    user_id: peer.user_id,
                };
                peer.voice_key_proof = Some(sign_voice_key(&signer, &binding, &mallory_voice));
            }
        });
        alice_rejoins(&mut w, a);
        let seen = w.peer_identity(b, a);
        if keep_alices_signature {
            assert!(
                matches!(seen, Some(PeerIdentityStatus::Refused(_))),
                "{seen:?}"
            );
        } else {
            assert_eq!(
                seen,
                Some(PeerIdentityStatus::Changed {
                    previous: alice_identity,
                    presented: mallory.public_key(),
                })
            );
            // Shown with the new identity's safety number, for the user to check.
            assert!(w.safety_number(b, a).is_some());
        }
        let now = w.now();
        assert_hearing(&w, now - secs(1.0), now, &[(b, a, false)]);
    }
}

/// The texts of chat messages as (sender, text), without their times.
fn texts(got: Vec<(String, String, u64)>) -> Vec<(String, String)> {
    got.into_iter()
        .map(|(from, text, _)| (from, text))
        .collect()
}

/// Chat reaches members that can only reach each other through a third member (which forwards
/// sealed chat it cannot read, next to the voice), in order and once; the bridge gets its own
/// copy directly. Messages sent before the relay path is up wait for it.
#[test]
fn chat_crosses_a_member_relay_in_order_once() {
    let mut w = World::with_server_relay(11, false);
    let a = w.add_user(UserSpec::new("a", 440.0).nat(Symmetric));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(Symmetric));
    let c = w.add_user(UserSpec::new("c", 880.0).nat(Public));
    start_call(&mut w, &[a, b, c], secs(1.0));
    // Right after joining: the peers are known, no relay path is up yet.
    w.run_for(secs(0.5));
    assert_eq!(w.send_chat(a, "early bird"), 2);
    w.run_for(secs(11.0));
    let cid = w.user_id(c);
    assert_eq!(w.path(a, b), Some(PeerPath::Relayed(cid)));
    for i in 0..10 {
        w.send_chat(a, &format!("a says {i}"));
    }
    w.send_chat(b, "b answers");
    w.run_for(secs(3.0));
    let mut want = vec![("a".to_string(), "early bird".to_string())];
    want.extend((0..10).map(|i| ("a".to_string(), format!("a says {i}"))));
    assert_eq!(texts(w.take_chat(b)), want);
    // Order holds per sender; how two senders' messages interleave depends on the network.
    let at_c = texts(w.take_chat(c));
    let from = |who: &str| -> Vec<(String, String)> {
        at_c.iter().filter(|(f, _)| f == who).cloned().collect()
    };
    assert_eq!(from("a"), want);
    assert_eq!(from("b"), [("b".to_string(), "b answers".to_string())]);
    assert_eq!(at_c.len(), 12);
    assert_eq!(
        texts(w.take_chat(a)),
        [("b".to_string(), "b answers".to_string())]
    );
    assert_eq!(w.undecryptable(c), 0);
}

/// Through the relaying server over a lossy, reordering link: chat still arrives complete, in
/// order, once (the server, like a member, forwards what it cannot read).
#[test]
fn chat_crosses_the_server_relay_over_a_lossy_link() {
    let mut w = World::with_server_relay(13, true);
    let lossy = LinkProfile {
        latency: Duration::from_millis(30),
        jitter: Duration::from_millis(10),
        loss: 0.2,
        reorder: 0.1,
    };
    let a = w.add_user(UserSpec::new("a", 440.0).nat(Symmetric).link(lossy));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(Symmetric));
    start_call(&mut w, &[a, b], secs(1.0));
    w.run_for(secs(3.0));
    assert_eq!(w.path(a, b), Some(PeerPath::Relayed(None)));
    let long = "words ".repeat(300);
    for i in 0..20 {
        w.send_chat(a, &format!("line {i}"));
    }
    w.send_chat(a, &long);
    w.run_for(secs(15.0));
    let mut want: Vec<(String, String)> = (0..20)
        .map(|i| ("a".to_string(), format!("line {i}")))
        .collect();
    want.push(("a".to_string(), long));
    assert_eq!(texts(w.take_chat(b)), want);
}

/// A burst of the longest messages over a member relay, while both ends talk: the bridge's
/// per-pair budget (`MEMBER_RELAY_BYTES_PER_SEC`) is shared with the voice, so chat on a
/// relayed path is paced to leave room (nothing refused at the bridge, the voice unbroken),
/// and every message arrives.
#[test]
fn a_burst_of_long_messages_over_a_member_relay_stays_within_its_budget() {
    let mut w = World::with_server_relay(11, false);
    let a = w.add_user(UserSpec::new("a", 440.0).nat(Symmetric));
    let b = w.add_user(UserSpec::new("b", 660.0).nat(Symmetric));
    let c = w.add_user(UserSpec::new("c", 880.0).nat(Public));
    start_call(&mut w, &[a, b, c], secs(1.0));
    w.run_for(secs(11.0));
    let cid = w.user_id(c);
    assert_eq!(w.path(a, b), Some(PeerPath::Relayed(cid)));
    let refused_before = w.relay_refused(c);
    let longest: Vec<String> = (0..5)
        .map(|i| {
            format!(
                "{i} {}",
                "é".repeat(crate::voice::net::chat::MAX_CHAT_CHARS - 2)
            )
        })
        .collect();
    for text in &longest {
        w.send_chat(a, text);
    }
    // 5 x 4 kB at 4 kB/s.
    w.run_for(secs(8.0));
    let got: Vec<String> = w.take_chat(b).into_iter().map(|(_, t, _)| t).collect();
    assert_eq!(got, longest);
    assert_eq!(
        w.relay_refused(c),
        refused_before,
        "the bridge refused nothing"
    );
    assert_hearing(&w, secs(12.0), secs(20.0), &all_hear_all(&[a, b, c]));
}
