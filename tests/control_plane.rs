//! A real `p2p-voice server` on an ephemeral loopback port, with several clients over real
//! sockets: every rule of the control protocol, hostile input, and the headless CLI.

mod common;

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use p2p_voice::protocol::datagram::Datagram;
use p2p_voice::protocol::{ClientMsg, ServerMsg, Status};

const SMALL: &str = r#"
[[channel]]
name = "Lobby"
[[channel]]
name = "Duo"
max_members = 2
# password: letmein
[[channel]]
name = "Private"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$9YTXH9BRjaMqRyMe0mppWQ$Cff9lFJt8gwxHJt/j5Hv7WlSFQ6S10mkfJ+fjxXjUyU"
"#;

#[test]
fn identify_overview_join_and_notifications_reach_the_others() {
    let server = ServerProcess::start_with(Some(SMALL));
    let (mut alice, st, alice_id) = RawClient::login(server.addr, "alice");
    assert_eq!(st, Status::Ok);
    let overview = alice.expect(|m| matches!(m, ServerMsg::Overview { .. }));
    let ServerMsg::Overview { channels } = overview else {
        unreachable!()
    };
    let names: Vec<_> = channels.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["Lobby", "Duo", "Private"]);
    assert!(channels[2].has_password && !channels[0].has_password);

    let (mut bob, st, bob_id) = RawClient::login(server.addr, "bob");
    assert_eq!(st, Status::Ok);
    assert_eq!(alice.join("Lobby", None), Status::Ok);
    // bob, not in any channel, still sees alice join (he sees the overview).
    bob.expect(|m| matches!(m, ServerMsg::MemberJoined { channel, member } if channel == "Lobby" && Some(member.user_id) == alice_id));
    assert_eq!(bob.join("Lobby", None), Status::Ok);
    // Both learn each other's voice endpoints.
    bob.expect(
        |m| matches!(m, ServerMsg::PeerEndpoints { peer } if Some(peer.user_id) == alice_id),
    );
    alice
        .expect(|m| matches!(m, ServerMsg::PeerEndpoints { peer } if Some(peer.user_id) == bob_id));
    alice.expect(
        |m| matches!(m, ServerMsg::MemberJoined { member, .. } if Some(member.user_id) == bob_id),
    );

    bob.send(&ClientMsg::Leave);
    bob.expect(|m| {
        matches!(
            m,
            ServerMsg::Left {
                status: Status::Ok,
                ..
            }
        )
    });
    alice.expect(|m| matches!(m, ServerMsg::PeerGone { user_id } if Some(*user_id) == bob_id));
    alice
        .expect(|m| matches!(m, ServerMsg::MemberLeft { user_id, .. } if Some(*user_id) == bob_id));
}

#[test]
fn refusals_carry_the_right_status() {
    let server = ServerProcess::start_with(Some(SMALL));
    let (mut a, _, _) = RawClient::login(server.addr, "alice");
    let (_b, st, _) = RawClient::login(server.addr, "ALICE");
    assert_eq!(st, Status::NameTaken, "taken name");
    let (_c, st, _) = RawClient::login(server.addr, "  spaced");
    assert_eq!(st, Status::InvalidName, "invalid name");
    let (_d, st, _) = RawClient::login(server.addr, &"n".repeat(33));
    assert_eq!(st, Status::InvalidName, "too long");

    assert_eq!(a.join("Nowhere", None), Status::NoSuchChannel);
    assert_eq!(a.join("Private", Some("guess")), Status::WrongPassword);
    assert_eq!(a.join("Private", None), Status::WrongPassword);
    assert_eq!(a.join("Private", Some("letmein")), Status::Ok);
    assert_eq!(a.join("Private", Some("letmein")), Status::AlreadyInChannel);

    let (mut x, _, _) = RawClient::login(server.addr, "x");
    let (mut y, _, _) = RawClient::login(server.addr, "y");
    let (mut z, _, _) = RawClient::login(server.addr, "z");
    assert_eq!(x.join("Duo", None), Status::Ok);
    assert_eq!(y.join("Duo", None), Status::Ok);
    assert_eq!(z.join("Duo", None), Status::ChannelFull);

    let mut early = RawClient::connect(server.addr);
    early.hello();
    assert_eq!(early.join("Lobby", None), Status::NotIdentified);
}

#[test]
fn version_mismatch_is_explained_then_closed() {
    let server = ServerProcess::start();
    let mut c = RawClient::connect(server.addr);
    c.send(&ClientMsg::Hello {
        protocol_version: 999,
        app_version: "future".into(),
    });
    let err = c.expect(|m| matches!(m, ServerMsg::Error { .. }));
    assert!(
        matches!(err, ServerMsg::Error { status: Status::VersionMismatch, ref message } if message.contains("999"))
    );
    assert!(c.closed_within(WAIT));
}

#[test]
fn a_client_that_drops_its_socket_is_seen_leaving() {
    let server = ServerProcess::start();
    let (mut alice, _, _) = RawClient::login(server.addr, "alice");
    let (mut bob, _, bob_id) = RawClient::login(server.addr, "bob");
    assert_eq!(alice.join("Lobby", None), Status::Ok);
    assert_eq!(bob.join("Lobby", None), Status::Ok);
    drop(bob);
    alice
        .expect(|m| matches!(m, ServerMsg::MemberLeft { user_id, .. } if Some(*user_id) == bob_id));
    // The name is free again.
    let (_bob2, st, _) = RawClient::login(server.addr, "bob");
    assert_eq!(st, Status::Ok);
}

#[test]
fn hostile_connections_are_closed_and_others_keep_being_served() {
    let server = ServerProcess::start();
    let (mut alice, _, _) = RawClient::login(server.addr, "alice");
    assert_eq!(alice.join("Lobby", None), Status::Ok);

    // Garbage bytes.
    let mut garbage = RawClient::connect(server.addr);
    garbage
        .stream
        .write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    assert!(garbage.closed_within(WAIT), "garbage connection closed");

    // A frame announcing 10 MiB.
    let mut huge = RawClient::connect(server.addr);
    huge.stream
        .write_all(&(10u32 * 1024 * 1024).to_be_bytes())
        .unwrap();
    assert!(
        huge.closed_within(WAIT),
        "oversized frame connection closed"
    );
    assert!(huge
        .seen
        .iter()
        .any(|m| matches!(m, ServerMsg::Closing { reason } if reason.contains("exceeds"))));

    // A half-written frame left hanging does not block anyone.
    let mut hanging = TcpStream::connect(server.addr).unwrap();
    hanging.write_all(&[0, 0, 0, 100, 1, 2]).unwrap();

    // Garbage UDP to the server's port is dropped.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        udp.send_to(&i.to_be_bytes(), server.addr).unwrap();
    }

    // Everyone else is still served promptly.
    let (mut bob, st, _) = RawClient::login(server.addr, "bob");
    assert_eq!(st, Status::Ok);
    assert_eq!(bob.join("Lobby", None), Status::Ok);
    alice.expect(
        |m| matches!(m, ServerMsg::MemberJoined { member, .. } if member.username == "bob"),
    );
    drop(hanging);
}

#[test]
fn udp_registration_reveals_the_public_endpoint_to_channel_members() {
    let server = ServerProcess::start();
    let (mut alice, _, _) = RawClient::login(server.addr, "alice");
    assert_eq!(alice.join("Lobby", None), Status::Ok);
    let mut bob = RawClient::connect(server.addr);
    let token = bob.hello();
    bob.send(&ClientMsg::Identify {
        username: "bob".into(),
    });
    assert_eq!(bob.join("Lobby", None), Status::Ok);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let register = Datagram::Register { token }.to_vec().unwrap();
    let mut buf = [0u8; 1500];
    let mut observed = None;
    for _ in 0..20 {
        udp.send_to(&register, server.addr).unwrap();
        if let Ok((n, _)) = udp.recv_from(&mut buf) {
            if let Ok(Datagram::RegisterAck { observed: o }) = Datagram::parse(&buf[..n]) {
                observed = Some(o);
                break;
            }
        }
    }
    assert_eq!(observed, Some(udp.local_addr().unwrap()));
    let me = udp.local_addr().unwrap();
    alice.expect(|m| matches!(m, ServerMsg::PeerEndpoints { peer } if peer.public == Some(me)));
}

#[test]
fn headless_client_prints_json_and_exits_zero() {
    let server = ServerProcess::start();
    let addr = server.addr.to_string();
    let (mut watcher, _, _) = RawClient::login(server.addr, "watcher");
    let out = p2p()
        .args([
            "client",
            "--headless",
            "--server",
            &addr,
            "--username",
            "alice",
            "--channel",
            "Lobby",
            "--duration",
            "1.5",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}: {stdout}", out.status);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(kinds.contains(&"overview"), "{kinds:?}");
    assert!(kinds.contains(&"joined"), "{kinds:?}");
    // The client says which certificate it pinned: the one the server says it has.
    let connected = events.iter().find(|e| e["event"] == "connected").unwrap();
    assert!(!server.fingerprint.is_empty());
    assert_eq!(connected["server_fingerprint"], server.fingerprint.as_str());
    watcher.expect(
        |m| matches!(m, ServerMsg::MemberJoined { member, .. } if member.username == "alice"),
    );
    watcher.expect(|m| matches!(m, ServerMsg::MemberLeft { .. }));
}

/// The channel password can come from the environment, out of the process list.
#[test]
fn the_channel_password_can_come_from_the_environment() {
    let server = ServerProcess::start();
    let out = p2p()
        .env("P2P_VOICE_PASSWORD", "letmein")
        .args(["client", "--headless", "--server"])
        .arg(server.addr.to_string())
        .args([
            "--username",
            "eve",
            "--channel",
            "Private",
            "--duration",
            "1.5",
        ])
        .output()
        .unwrap();
    let stderr = assert_joined_private(&out);
    assert!(!stderr.contains("warning: --password"), "{stderr}");
}

/// Asserts a headless run succeeded and joined Private; returns its stderr.
fn assert_joined_private(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| e["event"] == "joined" && e["channel"] == "Private"),
        "{stdout}"
    );
    stderr
}

/// `--password-file` (issue 13): the password comes from the file's first line, out of the
/// process list, and wins over a wrong one in the environment.
#[test]
fn the_channel_password_can_come_from_a_file() {
    let server = ServerProcess::start();
    let dir = std::env::temp_dir().join(format!("p2p-voice-pwfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "letmein\n").unwrap();
    let out = p2p()
        .env("P2P_VOICE_PASSWORD", "wrong")
        .args(["client", "--headless", "--server"])
        .arg(server.addr.to_string())
        .args([
            "--username",
            "eve",
            "--channel",
            "Private",
            "--duration",
            "1.5",
        ])
        .arg("--password-file")
        .arg(&file)
        .output()
        .unwrap();
    assert_joined_private(&out);
    // A file that is missing is a clear error, not an empty password.
    let missing = p2p()
        .args(["client", "--headless", "--server"])
        .arg(server.addr.to_string())
        .args([
            "--username",
            "eve2",
            "--channel",
            "Private",
            "--duration",
            "1",
        ])
        .arg("--password-file")
        .arg(dir.join("nope"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("cannot read the password file"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn headless_client_exits_non_zero_with_the_servers_message_on_refusal() {
    let server = ServerProcess::start();
    let addr = server.addr.to_string();
    let out = p2p()
        .args([
            "client",
            "--headless",
            "--server",
            &addr,
            "--username",
            "alice",
            "--channel",
            "Private",
            "--password",
            "nope",
            "--duration",
            "10",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrong password"), "{stderr}");
    // A password on the command line is visible in `ps`: the client says so.
    assert!(stderr.contains("P2P_VOICE_PASSWORD"), "{stderr}");

    let _taken = RawClient::login(server.addr, "bob");
    let out = p2p()
        .args([
            "client",
            "--headless",
            "--server",
            &addr,
            "--username",
            "bob",
            "--duration",
            "10",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already taken"));
}

#[test]
fn headless_client_reconnects_and_rejoins_after_the_server_restarts() {
    let mut server = ServerProcess::start();
    let addr = server.addr.to_string();
    let mut child = p2p()
        .args([
            "client",
            "--headless",
            "--server",
            &addr,
            "--username",
            "carol",
            "--channel",
            "Lobby",
            "--duration",
            "12",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut watcher, _, _) = RawClient::login(server.addr, "watcher");
    watcher.expect(
        |m| matches!(m, ServerMsg::MemberJoined { member, .. } if member.username == "carol"),
    );
    server.restart(Duration::from_millis(300));
    let (mut watcher2, _, _) = RawClient::login(server.addr, "watcher2");
    watcher2.expect(|m| matches!(m, ServerMsg::MemberJoined { channel, member } if member.username == "carol" && channel == "Lobby"));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn hash_password_prints_a_hash_the_server_accepts() {
    let out = p2p()
        .args(["hash-password", "--password", "hunter2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"));
    let channels = format!("[[channel]]\nname = \"Vault\"\npassword_hash = \"{hash}\"\n");
    let server = ServerProcess::start_with(Some(&channels));
    let (mut a, _, _) = RawClient::login(server.addr, "a");
    assert_eq!(a.join("Vault", Some("hunter1")), Status::WrongPassword);
    assert_eq!(a.join("Vault", Some("hunter2")), Status::Ok);
}

/// Typed at a terminal, the password is not echoed (nor left on screen); the hash printed is
/// of what was typed. `script` (util-linux) gives the command a pseudo-terminal.
#[test]
fn hash_password_does_not_echo_what_is_typed_at_a_terminal() {
    use std::io::Write;
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_unless_ci("`script` (util-linux) is not installed");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_p2p-voice");
    let mut child = std::process::Command::new("script")
        .args(["-qec", &format!("{bin} hash-password"), "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Give the prompt time to switch echo off, as a person would.
    std::thread::sleep(std::time::Duration::from_millis(500));
    stdin.write_all(b"swordfish\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("swordfish"),
        "the password was echoed: {text}"
    );
    let hash = text
        .split_whitespace()
        .find(|w| w.starts_with("$argon2id$"))
        .unwrap_or_else(|| panic!("no hash in {text}"));
    assert!(
        p2p_voice::config::verify_password(hash, "swordfish"),
        "{hash}"
    );
}

#[test]
fn bad_channels_file_fails_with_a_clear_message() {
    let path = temp_path("bad.toml");
    std::fs::write(&path, "[[channel]]\nname = \"A\"\nmax_members = 0\n").unwrap();
    let out = p2p()
        .args(["server", "--port", "0", "--channels"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_members"));
}

#[test]
fn a_message_flood_is_cut_off_and_does_not_delay_others() {
    let server = ServerProcess::start();
    let (mut alice, _, _) = RawClient::login(server.addr, "alice");
    assert_eq!(alice.join("Lobby", None), Status::Ok);
    let (mut flooder, _, _) = RawClient::login(server.addr, "flooder");
    let frame = p2p_voice::protocol::encode_frame(&ClientMsg::Heartbeat).unwrap();
    let burst: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 5_000)
        .collect();
    // The server may close while we are still writing: that is the point.
    let _ = flooder.stream.write_all(&burst);
    assert!(flooder.closed_within(WAIT), "flooder disconnected");
    assert!(flooder
        .seen
        .iter()
        .any(|m| matches!(m, ServerMsg::Closing { reason } if reason.contains("too many"))));
    let (mut bob, st, _) = RawClient::login(server.addr, "bob");
    assert_eq!(st, Status::Ok);
    assert_eq!(bob.join("Lobby", None), Status::Ok);
    alice.expect(
        |m| matches!(m, ServerMsg::MemberJoined { member, .. } if member.username == "bob"),
    );
}

#[test]
fn connections_beyond_the_per_ip_limit_are_refused_and_others_still_served() {
    let server = ServerProcess::start_args(&["--max-connections-per-ip", "4"]);
    let mut kept: Vec<RawClient> = (0..4)
        .map(|i| RawClient::login(server.addr, &format!("u{i}")).0)
        .collect();
    // The fifth from the same address is closed before TLS completes.
    let refused = std::panic::catch_unwind(|| RawClient::login(server.addr, "fifth"));
    assert!(refused.is_err(), "fifth connection was served");
    // Once one leaves, there is room again.
    drop(kept.pop());
    std::thread::sleep(Duration::from_millis(300));
    let (_again, st, _) = RawClient::login(server.addr, "again");
    assert_eq!(st, Status::Ok);
    assert_eq!(kept[0].join("Lobby", None), Status::Ok);
}

#[test]
fn a_killed_client_process_disappears_from_the_others() {
    let server = ServerProcess::start();
    let (mut watcher, _, _) = RawClient::login(server.addr, "watcher");
    let mut child = p2p()
        .args(["client", "--headless", "--server", &server.addr.to_string()])
        .args([
            "--username",
            "doomed",
            "--channel",
            "Lobby",
            "--duration",
            "30",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let joined = watcher.expect(
        |m| matches!(m, ServerMsg::MemberJoined { member, .. } if member.username == "doomed"),
    );
    let ServerMsg::MemberJoined { member, .. } = joined else {
        unreachable!()
    };
    // SIGKILL: no goodbye, no chance to clean up.
    child.kill().unwrap();
    let _ = child.wait();
    watcher.expect(
        |m| matches!(m, ServerMsg::MemberLeft { user_id, .. } if *user_id == member.user_id),
    );
}

/// Lobby-wide presence news is batched for those outside the channel; the batch must still
/// reach them in order, and must never arrive after (and contradict) a prompt message.
#[test]
fn batched_presence_keeps_its_order_for_onlookers() {
    let server = ServerProcess::start_with(Some(SMALL));
    let (mut walker, _, walker_id) = RawClient::login(server.addr, "walker");
    let (mut onlooker, _, _) = RawClient::login(server.addr, "onlooker");
    onlooker.expect(|m| matches!(m, ServerMsg::Overview { .. }));
    // The walker hops between two channels faster than a batch falls due.
    for i in 0..10 {
        let channel = if i % 2 == 0 { "Lobby" } else { "Duo" };
        assert_eq!(walker.join(channel, None), Status::Ok);
    }
    // The onlooker joins Duo right away: everything batched so far must come before its
    // `Joined`, and the Duo member (the walker) is announced to it by endpoints.
    assert_eq!(onlooker.join("Duo", None), Status::Ok);
    let before_join: Vec<ServerMsg> = onlooker.seen.clone();
    let mut where_walker: Option<String> = None;
    let mut hops = 0;
    for m in &before_join {
        match m {
            ServerMsg::MemberJoined { channel, member } if Some(member.user_id) == walker_id => {
                assert!(
                    where_walker.is_none(),
                    "joined {channel} while still in {where_walker:?}"
                );
                where_walker = Some(channel.clone());
                hops += 1;
            }
            ServerMsg::MemberLeft { channel, user_id } if Some(*user_id) == walker_id => {
                assert_eq!(
                    where_walker.as_deref(),
                    Some(channel.as_str()),
                    "left a channel it was not in"
                );
                where_walker = None;
            }
            _ => {}
        }
    }
    assert_eq!(
        hops, 10,
        "every hop arrives, in order, before the onlooker's own join: {before_join:?}"
    );
    assert_eq!(where_walker.as_deref(), Some("Duo"));
    onlooker.expect(
        |m| matches!(m, ServerMsg::PeerEndpoints { peer } if Some(peer.user_id) == walker_id),
    );
}
