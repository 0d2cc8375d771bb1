//! The server's per-client limits through real sockets (issue 13 item 4): every per-address
//! cap counts by address prefix, new connections per second are limited, and TLS handshakes
//! are bounded in number and in time. Clients come from many loopback addresses (all of
//! 127.0.0.0/8 is loopback on Linux); the limits are set small in the channels file's
//! `[limits]` table so that the tests stay quick.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use common::*;
use p2p_voice::protocol::Status;

/// The built-in channels with a `[limits]` table.
fn with_limits(limits: &str) -> String {
    format!(
        "{}\n[limits]\n{limits}\n",
        p2p_voice::config::DEFAULT_CHANNELS_TOML
    )
}

fn loopback(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// These tests bind to 127.0.0.x, which needs Linux's whole-127/8 loopback.
fn many_loopback_addresses() -> bool {
    if UdpSocket::bind((loopback(77), 0)).is_ok() {
        return true;
    }
    skip_unless_ci("binding to 127.0.0.77 needs Linux's whole-127/8 loopback");
    false
}

fn login_from(from: Ipv4Addr, server: &ServerProcess, name: &str) -> Option<RawClient> {
    std::panic::catch_unwind(|| {
        let mut c = RawClient::connect_from(from, server.addr);
        c.hello();
        c.send(&p2p_voice::protocol::ClientMsg::Identify {
            username: name.into(),
        });
        c.expect(|m| matches!(m, p2p_voice::protocol::ServerMsg::Identified { .. }));
        c
    })
    .ok()
}

/// Issue 13: the cap keyed on the exact address, so a host with a whole prefix (an IPv6 /64,
/// 127.0.0.0/8) had no cap at all.
#[test]
fn connections_from_one_prefix_share_one_cap_whatever_address_they_use() {
    if !many_loopback_addresses() {
        return;
    }
    let server = ServerProcess::start_args_with(
        Some(&with_limits("ipv4_prefix = 24")),
        &["--max-connections-per-ip", "3"],
    );
    let in_one_24 = |i: u8| Ipv4Addr::new(127, 0, 5, i);
    let kept: Vec<RawClient> = (2..5)
        .map(|i| login_from(in_one_24(i), &server, &format!("u{i}")).expect("under the cap"))
        .collect();
    assert!(
        login_from(in_one_24(5), &server, "fourth").is_none(),
        "a fourth address of the same /24 was served"
    );
    // Another /24 (127.0.0.1's) has its own cap.
    let (mut other, st, _) = RawClient::login(server.addr, "elsewhere");
    assert_eq!(st, Status::Ok);
    assert_eq!(other.join("Lobby", None), Status::Ok);
    drop(kept);
}

/// Issue 13: only connections open at once were limited, not how fast they are opened.
#[test]
fn new_connections_beyond_the_rate_are_refused_and_the_prefix_recovers() {
    if !many_loopback_addresses() {
        return;
    }
    let server = ServerProcess::start_with(Some(&with_limits(
        "new_connections_per_sec = 1.0\nnew_connections_burst = 5.0",
    )));
    let from = loopback(9);
    let burst: Vec<RawClient> = (0..5)
        .map(|i| login_from(from, &server, &format!("b{i}")).expect("within the burst"))
        .collect();
    assert!(
        login_from(from, &server, "sixth").is_none(),
        "the sixth connection within a moment was served"
    );
    // Others are not affected, and a second later the address may connect again.
    assert_eq!(RawClient::login(server.addr, "other").1, Status::Ok);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(login_from(from, &server, "later").is_some());
    drop(burst);
}

/// Issue 13: a connection that never finished its TLS handshake held its slot until the
/// 15 s heartbeat timeout.
#[test]
fn a_handshake_that_does_not_finish_in_time_is_closed() {
    if !many_loopback_addresses() {
        return;
    }
    let server = ServerProcess::start_with(Some(&with_limits("handshake_timeout_ms = 300")));
    let mut silent = tcp_connect_from(loopback(11), server.addr).unwrap();
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(3)),
        "a silent connection was still open after 3 s"
    );
    // Its place was given back: the address may start its 8 handshakes again.
    let mut again: Vec<_> = (0..8)
        .map(|_| tcp_connect_from(loopback(11), server.addr).unwrap())
        .collect();
    // A refusal closes at once; the deadline (300 ms) is not near yet.
    std::thread::sleep(Duration::from_millis(30));
    assert!(!closed_by_server(&mut again[7], Duration::from_millis(60)));
    // A real client has all the time it needs.
    let (mut c, st, _) = RawClient::login(server.addr, "real");
    assert_eq!(st, Status::Ok);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.join("Lobby", None), Status::Ok);
}

/// Issue 13: half-open handshakes were not bounded: a host could hold as many as its
/// connection cap, and many hosts every descriptor the server has.
#[test]
fn handshakes_in_progress_are_capped_per_prefix_and_in_all() {
    if !many_loopback_addresses() {
        return;
    }
    let server = ServerProcess::start_with(Some(&with_limits(
        "max_handshakes_per_prefix = 2\nmax_handshakes = 4",
    )));
    // Two half-open handshakes from one address are kept; a third is closed at once.
    let mut a1 = tcp_connect_from(loopback(21), server.addr).unwrap();
    let a2 = tcp_connect_from(loopback(21), server.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut a3 = tcp_connect_from(loopback(21), server.addr).unwrap();
    assert!(
        closed_by_server(&mut a3, Duration::from_secs(1)),
        "a third half-open handshake from one address was kept"
    );
    // Two more from another address fill the table; the next one pushes out the oldest.
    let _b1 = tcp_connect_from(loopback(22), server.addr).unwrap();
    let _b2 = tcp_connect_from(loopback(22), server.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _c1 = tcp_connect_from(loopback(23), server.addr).unwrap();
    assert!(
        closed_by_server(&mut a1, Duration::from_secs(1)),
        "the oldest half-open handshake was kept with the table full"
    );
    // A real client still gets in, past the full table.
    let (mut c, st, _) = RawClient::login(server.addr, "real");
    assert_eq!(st, Status::Ok);
    assert_eq!(c.join("Lobby", None), Status::Ok);
    drop(a2);
}

/// Slots never leak: however a connection ends (it sends garbage, it hangs up in the middle of
/// the handshake or after logging in), its place under the per-prefix caps is given back at
/// once, so the same address can fill them again. All of it takes less than the 5 s handshake
/// deadline, which would otherwise hide a leaked handshake place.
#[test]
fn slots_are_given_back_however_a_connection_ends() {
    use std::io::Write;
    if !many_loopback_addresses() {
        return;
    }
    let server = ServerProcess::start_args_with(
        Some(&with_limits(
            "max_handshakes_per_prefix = 3\n\
             new_connections_per_sec = 1000.0\nnew_connections_burst = 1000.0",
        )),
        &["--max-connections-per-ip", "3"],
    );
    let from = loopback(31);
    let fill = |round: &str| -> Vec<RawClient> {
        (0..3)
            .map(|i| {
                login_from(from, &server, &format!("{round}{i}"))
                    .unwrap_or_else(|| panic!("{round}: slot {i} was not free"))
            })
            .collect()
    };
    for round in 0..3 {
        // Garbage instead of a ClientHello: a TLS error.
        let mut garbage: Vec<_> = (0..3)
            .map(|_| tcp_connect_from(from, server.addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        for s in &mut garbage {
            let _ = s.write_all(&[0x42; 64]);
            assert!(closed_by_server(s, Duration::from_secs(3)), "round {round}");
        }
        std::thread::sleep(Duration::from_millis(100));
        drop(fill(&format!("b{round}-")));
        // Half a ClientHello, then the client hangs up.
        for _ in 0..3 {
            let mut s = tcp_connect_from(from, server.addr).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x80, 0x01]);
        }
        std::thread::sleep(Duration::from_millis(200));
        drop(fill(&format!("c{round}-")));
        std::thread::sleep(Duration::from_millis(200));
    }
    let kept = fill("last");
    assert!(
        login_from(from, &server, "fourth").is_none(),
        "the cap still holds"
    );
    drop(kept);
}

/// Issue 13: every session could queue a password check, so the argon2 queue had no bound,
/// and a join sent while a check was running was answered "too many attempts". Now a full
/// queue answers "busy" at once and a repeated join "pending"; neither counts as a guess.
#[test]
fn a_full_password_queue_answers_busy_and_a_repeated_join_pending() {
    use p2p_voice::protocol::{ClientMsg, ServerMsg};
    let server = ServerProcess::start_with(Some(&with_limits("max_password_checks = 1")));
    let (mut a, _, _) = RawClient::login(server.addr, "a");
    let (mut b, _, _) = RawClient::login(server.addr, "b");
    let join = ClientMsg::Join {
        channel: "Private".into(),
        password: Some("letmein".into()),
    };
    // argon2 takes tens of milliseconds: the second and third arrive while it runs.
    a.send(&join);
    a.send(&join);
    b.send(&join);
    let status = |c: &mut RawClient| match c.expect(|m| matches!(m, ServerMsg::Joined { .. })) {
        ServerMsg::Joined { status, .. } => status,
        _ => unreachable!(),
    };
    assert_eq!(status(&mut a), Status::PasswordCheckPending);
    assert_eq!(status(&mut a), Status::Ok);
    assert_eq!(status(&mut b), Status::ServerBusy);
    // Once the check is done there is room, and the right password still works.
    assert_eq!(b.join("Private", Some("letmein")), Status::Ok);
}
