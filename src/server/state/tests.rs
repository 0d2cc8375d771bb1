use super::*;
use crate::config::hash_password;
use crate::protocol::datagram::voice_header;
use crate::server::relay::RelayRules;
use std::net::IpAddr;

const S: Duration = Duration::from_secs(1);

fn channels() -> Vec<ChannelConfig> {
    vec![
        ChannelConfig {
            name: "Lobby".into(),
            password_hash: None,
            max_members: 16,
        },
        ChannelConfig {
            name: "Duo".into(),
            password_hash: None,
            max_members: 2,
        },
        ChannelConfig {
            name: "Private".into(),
            password_hash: Some(hash_password("letmein").unwrap()),
            max_members: 4,
        },
    ]
}

/// Each test session connects from its own address unless a test says otherwise, so the
/// per-address password limit only shows where a test means it to.
fn ip_of(id: SessionId) -> IpAddr {
    IpAddr::from([10, (id >> 16) as u8, (id >> 8) as u8, id as u8])
}

/// The server's address as the test clients reach it.
const SERVER_IP: [u8; 4] = [198, 51, 100, 1];

fn from_ip(ip: IpAddr) -> ConnectionAddrs {
    ConnectionAddrs::new(ip, IpAddr::from(SERVER_IP))
}

struct World {
    state: ServerState,
    now: Duration,
}

impl World {
    fn new() -> Self {
        Self {
            state: ServerState::new(channels(), ServerRules::default()),
            now: Duration::ZERO,
        }
    }

    fn send(&mut self, id: SessionId, msg: ClientMsg) -> Vec<Output> {
        self.state.handle_message(self.now, id, msg);
        self.drain()
    }

    /// Everything the state queued, running password checks synchronously as the shell's
    /// worker would (their outputs follow, as they would a moment later).
    fn drain(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(o) = self.state.poll_output() {
            if let Output::VerifyPassword {
                session,
                ticket,
                hash,
                password,
            } = &o
            {
                let ok = crate::config::verify_password(hash, password.as_str());
                self.state
                    .handle_password_checked(self.now, *session, *ticket, ok);
            }
            out.push(o);
        }
        out
    }

    fn connect(&mut self, id: SessionId) -> Vec<Output> {
        self.connect_from(id, ip_of(id))
    }

    fn connect_from(&mut self, id: SessionId, ip: IpAddr) -> Vec<Output> {
        self.state
            .handle_connected(self.now, id, from_ip(ip), 1000 + id);
        self.send(
            id,
            ClientMsg::Hello {
                protocol_version: PROTOCOL_VERSION,
                app_version: "t".into(),
            },
        )
    }

    fn login_from(&mut self, id: SessionId, name: &str, ip: IpAddr) -> Vec<Output> {
        self.connect_from(id, ip);
        self.send(
            id,
            ClientMsg::Identify {
                username: name.into(),
            },
        )
    }

    fn login(&mut self, id: SessionId, name: &str) -> Vec<Output> {
        self.login_from(id, name, ip_of(id))
    }

    fn join(&mut self, id: SessionId, channel: &str, pw: Option<&str>) -> Vec<Output> {
        self.send(
            id,
            ClientMsg::Join {
                channel: channel.into(),
                password: pw.map(Password::from),
            },
        )
    }
}

fn join_status(out: &[Output], id: SessionId) -> Option<Status> {
    out.iter().find_map(|o| match o {
        Output::Send(to, ServerMsg::Joined { status, .. }) if *to == id => Some(*status),
        _ => None,
    })
}

fn identify_status(out: &[Output]) -> Option<Status> {
    out.iter().find_map(|o| match o {
        Output::Send(_, ServerMsg::Identified { status, .. }) => Some(*status),
        _ => None,
    })
}

#[test]
fn hello_gets_welcome_with_the_session_token() {
    let mut w = World::new();
    let out = w.connect(1);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send(
            1,
            ServerMsg::Welcome {
                udp_token: 1001,
                protocol_version: PROTOCOL_VERSION,
                ..
            }
        )
    )));
}

#[test]
fn version_mismatch_is_refused_and_closed_with_a_reason() {
    let mut w = World::new();
    w.state.handle_connected(w.now, 1, from_ip(ip_of(1)), 5);
    let out = w.send(
        1,
        ClientMsg::Hello {
            protocol_version: 99,
            app_version: "x".into(),
        },
    );
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send(
            1,
            ServerMsg::Error {
                status: Status::VersionMismatch,
                ..
            }
        )
    )));
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Close(1, r) if r.to_string().contains("protocol 6"))));
}

#[test]
fn anything_before_hello_closes_the_connection() {
    let mut w = World::new();
    w.state.handle_connected(w.now, 1, from_ip(ip_of(1)), 5);
    let out = w.send(
        1,
        ClientMsg::Identify {
            username: "a".into(),
        },
    );
    assert!(matches!(out[..], [Output::Close(1, _)]));
}

#[test]
fn identify_sends_the_overview() {
    let mut w = World::new();
    let out = w.login(1, "alice");
    assert_eq!(identify_status(&out), Some(Status::Ok));
    let overview = out.iter().find_map(|o| match o {
        Output::Send(1, ServerMsg::Overview { channels }) => Some(channels.clone()),
        _ => None,
    });
    let channels = overview.expect("overview sent");
    assert_eq!(channels.len(), 3);
    assert!(channels[2].has_password);
    assert!(!channels[0].has_password);
}

#[test]
fn taken_name_is_refused_case_insensitively() {
    let mut w = World::new();
    w.login(1, "alice");
    let out = w.login(2, "Alice");
    assert_eq!(identify_status(&out), Some(Status::NameTaken));
    // Once alice leaves, the name is free again.
    w.state.handle_closed(w.now, 1);
    w.drain();
    let out = w.send(
        2,
        ClientMsg::Identify {
            username: "Alice".into(),
        },
    );
    assert_eq!(identify_status(&out), Some(Status::Ok));
}

/// "аlice" with a Cyrillic а looks exactly like "alice" in everyone's list.
#[test]
fn a_look_alike_of_a_taken_name_is_refused() {
    let mut w = World::new();
    w.login(1, "alice");
    let out = w.login(2, "\u{430}lice");
    assert_eq!(identify_status(&out), Some(Status::NameTaken));
    let out = w.login(3, "al\u{200B}ice");
    assert_eq!(identify_status(&out), Some(Status::InvalidName));
    let out = w.login(4, "bob");
    assert_eq!(identify_status(&out), Some(Status::Ok));
}

#[test]
fn invalid_names_are_refused_with_the_reason() {
    let mut w = World::new();
    for bad in ["", " x", &"y".repeat(40), "a\u{0}b"] {
        let out = w.login(9, bad);
        assert_eq!(identify_status(&out), Some(Status::InvalidName), "{bad:?}");
        assert!(out.iter().any(|o| matches!(o,
            Output::Send(9, ServerMsg::Error { status: Status::InvalidName, message }) if message.contains("username"))));
        w.state.handle_closed(w.now, 9);
        w.drain();
    }
}

#[test]
fn second_identify_is_refused() {
    let mut w = World::new();
    w.login(1, "alice");
    let out = w.send(
        1,
        ClientMsg::Identify {
            username: "bob".into(),
        },
    );
    assert_eq!(identify_status(&out), Some(Status::AlreadyIdentified));
}

#[test]
fn join_before_identify_is_refused() {
    let mut w = World::new();
    w.connect(1);
    let out = w.join(1, "Lobby", None);
    assert_eq!(join_status(&out, 1), Some(Status::NotIdentified));
}

#[test]
fn join_notifies_everyone_and_introduces_peers() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.join(1, "Lobby", None);
    let out = w.join(2, "lobby", None);
    assert_eq!(join_status(&out, 2), Some(Status::Ok));
    assert!(out.iter().any(|o| matches!(o,
        Output::Broadcast { msg: ServerMsg::MemberJoined { channel, member }, .. } if channel == "Lobby" && member.username == "bob")));
    // Each side learns the other's endpoints.
    assert!(out.iter().any(|o| matches!(o,
        Output::Send(2, ServerMsg::PeerEndpoints { peer }) if peer.username == "alice")));
    assert!(out.iter().any(|o| matches!(o,
        Output::Send(1, ServerMsg::PeerEndpoints { peer }) if peer.username == "bob")));
    let overview = w.state.overview();
    assert_eq!(overview[0].members.len(), 2);
}

/// Presence news reaches everyone, but only the channel concerned needs it at once.
#[test]
fn presence_is_prompt_for_the_channel_concerned() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.login(3, "carol");
    w.join(1, "Lobby", None);
    w.join(3, "Gaming", None);
    let prompt_of = |out: &[Output]| -> Vec<SessionId> {
        out.iter()
            .find_map(|o| match o {
                Output::Broadcast { prompt, .. } => Some(prompt.clone()),
                _ => None,
            })
            .expect("a broadcast")
    };
    let mut joined = prompt_of(&w.join(2, "Lobby", None));
    joined.sort();
    assert_eq!(joined, vec![1, 2], "Lobby's members, the newcomer included");
    let mut left = prompt_of(&w.send(2, ClientMsg::Leave));
    left.sort();
    assert_eq!(left, vec![1, 2], "who stays, and the one leaving");
    w.state.handle_closed(w.now, 1);
    assert_eq!(prompt_of(&w.drain()), vec![1]);
}

#[test]
fn unknown_channel_is_refused() {
    let mut w = World::new();
    w.login(1, "alice");
    assert_eq!(
        join_status(&w.join(1, "Nope", None), 1),
        Some(Status::NoSuchChannel)
    );
}

#[test]
fn full_channel_is_refused() {
    let mut w = World::new();
    for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
        w.login(id, name);
    }
    assert_eq!(join_status(&w.join(1, "Duo", None), 1), Some(Status::Ok));
    assert_eq!(join_status(&w.join(2, "Duo", None), 2), Some(Status::Ok));
    assert_eq!(
        join_status(&w.join(3, "Duo", None), 3),
        Some(Status::ChannelFull)
    );
}

#[test]
fn wrong_password_is_refused_and_right_one_admits() {
    let mut w = World::new();
    w.login(1, "alice");
    assert_eq!(
        join_status(&w.join(1, "Private", Some("nope")), 1),
        Some(Status::WrongPassword)
    );
    assert_eq!(
        join_status(&w.join(1, "Private", None), 1),
        Some(Status::WrongPassword)
    );
    assert_eq!(
        join_status(&w.join(1, "Private", Some("letmein")), 1),
        Some(Status::Ok)
    );
}

#[test]
fn wrong_passwords_are_rate_limited_per_session() {
    let mut w = World::new();
    w.login(1, "alice");
    for _ in 0..5 {
        assert_eq!(
            join_status(&w.join(1, "Private", Some("x")), 1),
            Some(Status::WrongPassword)
        );
    }
    assert_eq!(
        join_status(&w.join(1, "Private", Some("letmein")), 1),
        Some(Status::RateLimited)
    );
    w.now += 61 * S;
    assert_eq!(
        join_status(&w.join(1, "Private", Some("letmein")), 1),
        Some(Status::Ok)
    );
}

#[test]
fn joining_the_same_channel_twice_is_refused() {
    let mut w = World::new();
    w.login(1, "alice");
    w.join(1, "Lobby", None);
    assert_eq!(
        join_status(&w.join(1, "Lobby", None), 1),
        Some(Status::AlreadyInChannel)
    );
}

#[test]
fn switching_channel_leaves_the_old_one_first() {
    let mut w = World::new();
    w.login(1, "alice");
    w.join(1, "Lobby", None);
    let out = w.join(1, "Duo", None);
    let left = out
        .iter()
        .position(|o| matches!(o, Output::Broadcast { msg: ServerMsg::MemberLeft { channel, .. }, .. } if channel == "Lobby"));
    let joined = out
        .iter()
        .position(|o| matches!(o, Output::Broadcast { msg: ServerMsg::MemberJoined { channel, .. }, .. } if channel == "Duo"));
    assert!(left.unwrap() < joined.unwrap());
    assert!(w.state.overview()[0].members.is_empty());
}

#[test]
fn leave_notifies_and_tells_peers_to_stop_sending() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    let out = w.send(2, ClientMsg::Leave);
    assert!(
        out.iter().any(|o| matches!(o,
        Output::Send(2, ServerMsg::Left { status: Status::Ok, channel: Some(c) }) if c == "Lobby"))
    );
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Send(1, ServerMsg::PeerGone { .. }))));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Broadcast {
            msg: ServerMsg::MemberLeft { .. },
            ..
        }
    )));
    let out = w.send(2, ClientMsg::Leave);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send(
            2,
            ServerMsg::Left {
                status: Status::NotInChannel,
                ..
            }
        )
    )));
}

#[test]
fn closed_session_leaves_its_channel() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    w.state.handle_closed(w.now, 2);
    let out = w.drain();
    assert!(out.iter().any(|o| matches!(o,
        Output::Broadcast { msg: ServerMsg::MemberLeft { channel, .. }, .. } if channel == "Lobby")));
    assert_eq!(w.state.overview()[0].members.len(), 1);
    assert_eq!(w.state.session_count(), 1);
}

#[test]
fn silent_sessions_time_out_and_heartbeats_keep_them() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    for _ in 0..20 {
        w.now += S;
        w.send(1, ClientMsg::Heartbeat);
    }
    w.state.handle_timeout(w.now);
    let out = w.drain();
    assert_eq!(out.len(), 1);
    assert!(matches!(&out[0], Output::Close(2, r) if r.to_string().contains("heartbeat")));
}

#[test]
fn connections_that_never_identify_are_dropped() {
    let mut w = World::new();
    w.connect(1);
    for _ in 0..31 {
        w.now += S;
        w.send(1, ClientMsg::Heartbeat);
    }
    w.state.handle_timeout(w.now);
    let out = w.drain();
    assert!(matches!(&out[..], [Output::Close(1, r)] if r.to_string().contains("identify")));
}

#[test]
fn udp_registration_publishes_the_public_endpoint_to_channel_members() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    let public = SocketAddr::new(ip_of(2), 40000);
    w.state.handle_datagram(w.now, public, &register(1002));
    assert_eq!(w.state.poll_event(), Some(ServerEvent::UdpRegistered(2)));
    let out = w.drain();
    assert!(out.iter().any(|o| matches!(o,
        Output::Send(1, ServerMsg::PeerEndpoints { peer }) if peer.public == Some(public))));
    // Same address again: nothing to tell.
    w.state.handle_datagram(w.now, public, &register(1002));
    assert_eq!(w.state.poll_event(), Some(ServerEvent::UdpRegistered(2)));
    assert!(w.drain().is_empty());
    w.state.handle_datagram(w.now, public, &register(4242));
    assert_eq!(
        w.state.poll_event(),
        Some(ServerEvent::DatagramDropped {
            from: public,
            why: DatagramDrop::UnknownToken
        })
    );
}

fn register(token: u64) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    let len = Datagram::Register { token }.write(&mut buf).unwrap();
    buf[..len].to_vec()
}

/// The client learns its public (NAT-mapped) address from the answer to its Register.
#[test]
fn a_register_is_answered_with_the_address_it_came_from() {
    let mut w = World::new();
    w.login(1, "alice");
    let nat = SocketAddr::new(ip_of(1), 40000);
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    assert_eq!(w.state.poll_transmit(w.now, &mut buf), None);
    w.state.handle_datagram(w.now, nat, &register(1001));
    let t = w.state.poll_transmit(w.now, &mut buf).expect("an ack");
    assert_eq!(t.to, nat);
    assert_eq!(
        Datagram::parse(&buf[..t.len]),
        Ok(Datagram::RegisterAck { observed: nat })
    );
    assert_eq!(
        w.state.poll_transmit(w.now, &mut buf),
        None,
        "one ack per Register"
    );
}

#[test]
fn unknown_tokens_garbage_and_peer_traffic_get_no_answer_and_are_counted() {
    let mut w = World::new();
    w.login(1, "alice");
    let from: SocketAddr = "203.0.113.9:5000".parse().unwrap();
    let mut voice = [0u8; MAX_DATAGRAM_LEN];
    let len = Datagram::Ping {
        from: 1,
        to: 2,
        sent_micros: 0,
    }
    .write(&mut voice)
    .unwrap();
    w.state.handle_datagram(w.now, from, &register(7));
    w.state.handle_datagram(w.now, from, &[0xff, 1, 2]);
    w.state.handle_datagram(w.now, from, &voice[..len]);
    let mut why = Vec::new();
    while let Some(event) = w.state.poll_event() {
        match event {
            ServerEvent::DatagramDropped { from: f, why: w } if f == from => why.push(w),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(
        why[..],
        [
            DatagramDrop::UnknownToken,
            DatagramDrop::Malformed(_),
            DatagramDrop::Unexpected
        ]
    ));
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    assert_eq!(w.state.poll_transmit(w.now, &mut buf), None);
    assert!(w.state.session_view(1).unwrap().public_endpoint.is_none());
}

#[test]
fn closing_a_session_queues_its_close_before_telling_its_channel() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    w.state.close(2, CloseReason::TooSlow);
    let out = w.drain();
    assert_eq!(out[0], Output::Close(2, CloseReason::TooSlow));
    assert!(out[1..]
        .iter()
        .any(|o| matches!(o, Output::Send(1, ServerMsg::PeerGone { .. }))));
    assert!(!out[1..].iter().any(|o| matches!(o, Output::Close(..))));
    assert_eq!(w.state.session_count(), 1);
    // Closing again, or a message from the closed session, does nothing.
    w.state.close(2, CloseReason::PeerClosed);
    assert!(w.drain().is_empty());
    assert!(w.send(2, ClientMsg::Heartbeat).is_empty());
}

#[test]
fn a_lost_connection_leaves_without_a_close() {
    let mut w = World::new();
    w.login(1, "alice");
    w.join(1, "Lobby", None);
    w.state.handle_closed(w.now, 1);
    let out = w.drain();
    assert!(!out.iter().any(|o| matches!(o, Output::Close(..))));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Broadcast {
            msg: ServerMsg::MemberLeft { .. },
            ..
        }
    )));
    assert_eq!(w.state.session_count(), 0);
}

#[test]
fn goodbye_closes_with_its_reason() {
    let mut w = World::new();
    w.login(1, "alice");
    let out = w.send(1, ClientMsg::Disconnect);
    assert_eq!(out, vec![Output::Close(1, CloseReason::Goodbye)]);
}

#[test]
fn the_version_error_and_the_close_say_the_same() {
    let mut w = World::new();
    w.state.handle_connected(w.now, 1, from_ip(ip_of(1)), 5);
    let out = w.send(
        1,
        ClientMsg::Hello {
            protocol_version: 99,
            app_version: "x".into(),
        },
    );
    let reason = CloseReason::VersionMismatch { client: 99 };
    assert_eq!(
        out,
        vec![
            Output::Send(
                1,
                ServerMsg::Error {
                    status: Status::VersionMismatch,
                    message: reason.to_string(),
                }
            ),
            Output::Close(1, reason),
        ]
    );
}

/// The timers are checked every [`EXPIRY_CHECK_INTERVAL`], not on every call, and only while
/// there is something to time out.
#[test]
fn timers_are_checked_when_poll_timeout_says() {
    let mut w = World::new();
    assert_eq!(w.state.poll_timeout(), None, "nothing to time out");
    w.login(1, "alice");
    let first = w.state.poll_timeout().expect("a session can time out");
    w.state.handle_timeout(first);
    let next = w.state.poll_timeout().unwrap();
    assert_eq!(next, first + EXPIRY_CHECK_INTERVAL);
    w.now = 16 * S;
    w.state.handle_timeout(w.now);
    assert!(matches!(
        &w.drain()[..],
        [Output::Close(
            1,
            CloseReason::HeartbeatTimeout { silent_secs: 16 }
        )]
    ));
    assert_eq!(w.state.poll_timeout(), None);
}

#[test]
fn a_check_before_it_is_due_does_nothing() {
    let mut w = World::new();
    w.login(1, "alice");
    let ms = Duration::from_millis(1);
    // Not silent for long enough yet (the timeout is 15 s).
    w.state.handle_timeout(15 * S);
    assert!(w.drain().is_empty());
    // Silent for long enough, but the next check is not due: nothing happens yet...
    w.state.handle_timeout(15 * S + EXPIRY_CHECK_INTERVAL - ms);
    assert!(w.drain().is_empty());
    // ...and when it is due, the session is closed.
    w.state.handle_timeout(15 * S + EXPIRY_CHECK_INTERVAL);
    assert_eq!(w.drain().len(), 1);
}

#[test]
fn announced_local_endpoints_reach_peers_and_are_capped() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    let many: Vec<SocketAddr> = (0..20)
        .map(|i| format!("10.0.0.{i}:5000").parse().unwrap())
        .collect();
    let out = w.send(
        2,
        ClientMsg::AnnounceEndpoints {
            local: many,
            voice_key: Some([7; 32]),
            voice_key_proof: None,
        },
    );
    let peer = out
        .iter()
        .find_map(|o| match o {
            Output::Send(1, ServerMsg::PeerEndpoints { peer }) => Some(peer.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(peer.local.len(), 8);
    assert_eq!(peer.voice_key, Some([7; 32]));
}

#[test]
fn overview_never_contains_password_hashes() {
    let w = World::new();
    let text = format!("{:?}", w.state.overview());
    assert!(!text.contains("argon2"));
}

#[test]
fn a_flooding_session_is_closed_and_normal_use_is_not() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    // Normal use: a heartbeat every 4 s and bursts of a few clicks never trip the limit.
    for _ in 0..100 {
        w.now += Duration::from_secs(4);
        let out = w.send(1, ClientMsg::Heartbeat);
        assert!(!out.iter().any(|o| matches!(o, Output::Close(..))));
    }
    // A flood within one instant is cut off after the burst.
    let mut closed_after = None;
    for i in 0..200 {
        let out = w.send(2, ClientMsg::Heartbeat);
        if out
            .iter()
            .any(|o| matches!(o, Output::Close(2, r) if r.to_string().contains("too many")))
        {
            closed_after = Some(i);
            break;
        }
    }
    assert!(
        closed_after.is_some_and(|n| (55..=62).contains(&n)),
        "{closed_after:?}"
    );
}

/// Channels with two protected ones, for the lockout tests.
fn two_vaults() -> World {
    let mut chans = channels();
    chans.push(ChannelConfig {
        name: "Vault".into(),
        password_hash: Some(hash_password("opensesame").unwrap()),
        max_members: 4,
    });
    World {
        state: ServerState::new(chans, ServerRules::default()),
        now: Duration::ZERO,
    }
}

#[test]
fn wrong_passwords_lock_out_their_prefix_and_channel_across_reconnects() {
    let mut w = two_vaults();
    let ip: IpAddr = "2001:db8:0:1::5".parse().unwrap();
    // Five free failures over two connections, then the sixth starts a lockout of 1 s.
    for (round, guesses) in [(0u64, 5), (1, 1)] {
        let id = 10 + round;
        w.login_from(id, &format!("guess{round}"), ip);
        for _ in 0..guesses {
            assert_eq!(
                join_status(&w.join(id, "Private", Some("x")), id),
                Some(Status::WrongPassword)
            );
        }
        w.state.handle_closed(w.now, id);
        w.drain();
    }
    // A fresh connection from the same /64 is locked out of that channel...
    w.login_from(20, "fresh", "2001:db8:0:1::ffff".parse().unwrap());
    assert_eq!(
        join_status(&w.join(20, "Private", Some("letmein")), 20),
        Some(Status::RateLimited)
    );
    // ...but not of another one, and another /64 is not locked out at all.
    assert_eq!(
        join_status(&w.join(20, "Vault", Some("opensesame")), 20),
        Some(Status::Ok)
    );
    w.login_from(21, "other", "2001:db8:0:2::5".parse().unwrap());
    assert_eq!(
        join_status(&w.join(21, "Private", Some("letmein")), 21),
        Some(Status::Ok)
    );
    // The lockout ends.
    w.now += S;
    w.login_from(22, "later", ip);
    assert_eq!(
        join_status(&w.join(22, "Private", Some("letmein")), 22),
        Some(Status::Ok)
    );
}

/// Issue 13: the lockout was per IP address across all channels, so one attacker behind a
/// shared NAT or CGNAT locked everyone there out of every protected channel.
#[test]
fn a_guesser_behind_a_shared_address_does_not_lock_out_its_neighbours_elsewhere() {
    let mut w = two_vaults();
    let nat: IpAddr = "100.64.0.1".parse().unwrap();
    // 25 guesses at Private within a minute, one connection each (the old per-address limit
    // locked the address out of every channel after 20).
    for i in 0..25u64 {
        w.now += S;
        w.login_from(100 + i, &format!("attacker{i}"), nat);
        w.join(100 + i, "Private", Some("guess"));
        w.state.handle_closed(w.now, 100 + i);
        w.drain();
    }
    w.login_from(1, "neighbour", nat);
    assert_eq!(
        join_status(&w.join(1, "Vault", Some("opensesame")), 1),
        Some(Status::Ok)
    );
}

/// Issue 13: a check still running was answered `RateLimited`, as if the client had guessed
/// too often.
#[test]
fn a_join_while_its_password_is_checked_is_told_pending_not_rate_limited() {
    let mut w = World::new();
    w.login(1, "alice");
    let join = |w: &mut World| {
        w.state.handle_message(
            w.now,
            1,
            ClientMsg::Join {
                channel: "Private".into(),
                password: Some("letmein".into()),
            },
        );
        std::iter::from_fn(|| w.state.poll_output()).collect::<Vec<_>>()
    };
    let first = join(&mut w);
    let Some(Output::VerifyPassword { ticket, .. }) = first.first() else {
        panic!("{first:?}");
    };
    let ticket = *ticket;
    assert_eq!(
        join_status(&join(&mut w), 1),
        Some(Status::PasswordCheckPending)
    );
    w.state.handle_password_checked(w.now, 1, ticket, true);
    assert_eq!(join_status(&w.drain(), 1), Some(Status::Ok));
}

/// Issue 13: every session could have a check queued, so the argon2 queue had no bound and
/// one address could run one guess per connection in parallel (64 with the connection cap).
#[test]
fn password_checks_in_flight_are_capped_globally_and_per_prefix_and_the_rest_told_busy() {
    let mut w = World::new();
    let ask = |w: &mut World, id: SessionId| {
        w.state.handle_message(
            w.now,
            id,
            ClientMsg::Join {
                channel: "Private".into(),
                password: Some("guess".into()),
            },
        );
        std::iter::from_fn(|| w.state.poll_output()).collect::<Vec<_>>()
    };
    // Five sessions from one address: four checks go out, the fifth is told to retry.
    let nat: IpAddr = "203.0.113.9".parse().unwrap();
    let mut tickets = Vec::new();
    for id in 1..=5u64 {
        w.login_from(id, &format!("n{id}"), nat);
        let out = ask(&mut w, id);
        match out.first() {
            Some(Output::VerifyPassword { ticket, .. }) => tickets.push((id, *ticket)),
            _ => assert_eq!(join_status(&out, id), Some(Status::ServerBusy), "{id}"),
        }
    }
    assert_eq!(tickets.len(), 4);
    // 40 more from as many addresses: 32 in flight in all.
    let mut busy = 0;
    for id in 100..140u64 {
        w.login(id, &format!("u{id}"));
        let out = ask(&mut w, id);
        match out.first() {
            Some(Output::VerifyPassword { ticket, .. }) => tickets.push((id, *ticket)),
            _ => {
                assert_eq!(join_status(&out, id), Some(Status::ServerBusy));
                busy += 1;
            }
        }
    }
    assert_eq!(tickets.len(), 32);
    assert_eq!(busy, 12);
    assert_eq!(w.state.password_checks_in_flight(), 32);
    // An answer frees a place even when its session has gone meanwhile.
    let (gone, ticket) = tickets[0];
    w.state.handle_closed(w.now, gone);
    w.state.handle_password_checked(w.now, gone, ticket, false);
    assert_eq!(w.state.password_checks_in_flight(), 31);
    w.drain();
    assert!(matches!(
        ask(&mut w, 139).first(),
        Some(Output::VerifyPassword { .. })
    ));
}

#[test]
fn a_big_overview_is_sent_in_parts_that_each_fit_a_frame() {
    let mut big = channels();
    big[0].max_members = 5_000;
    let mut w = World {
        state: ServerState::new(big, ServerRules::default()),
        now: Duration::ZERO,
    };
    for i in 0..1_000u64 {
        // 32-character names of 4-byte characters: the largest a member can be.
        w.login(100 + i, &format!("{:\u{1F600}<28}{i:04}", ""));
        w.join(100 + i, "Lobby", None);
    }
    let out = w.login(1, "late");
    let mut members = 0;
    let mut parts = 0;
    for o in &out {
        match o {
            Output::Send(1, msg @ ServerMsg::Overview { .. }) => {
                assert!(crate::protocol::encode_frame(msg).is_ok());
            }
            Output::Send(1, msg @ ServerMsg::OverviewMembers { members: m, .. }) => {
                let frame = crate::protocol::encode_frame(msg).expect("part fits a frame");
                // ...and a client can decode it (the decoder's allocation bound is not hit).
                let mut dec = crate::protocol::FrameDecoder::new();
                dec.push(&frame);
                assert!(matches!(dec.next::<ServerMsg>(), Ok(Some(_))));
                members += m.len();
                parts += 1;
            }
            _ => {}
        }
    }
    assert_eq!(members, 1_000);
    assert!(parts >= 3);
}

/// Host mode: the host's own client reaches the embedded server over loopback, so the server
/// sees it at 127.0.0.1. A guest from elsewhere must be told an address it can reach (the one
/// it dialled, with the host's voice port), never loopback; the host sees the guest as is.
#[test]
fn a_guest_is_told_the_host_at_the_address_it_dialled_not_loopback() {
    let mut w = World::new();
    let loopback = IpAddr::from([127, 0, 0, 1]);
    w.state
        .handle_connected(w.now, 1, ConnectionAddrs::new(loopback, loopback), 1001);
    w.send(
        1,
        ClientMsg::Hello {
            protocol_version: PROTOCOL_VERSION,
            app_version: "t".into(),
        },
    );
    w.send(
        1,
        ClientMsg::Identify {
            username: "host".into(),
        },
    );
    let host_voice: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    w.send(
        1,
        ClientMsg::AnnounceEndpoints {
            local: vec![host_voice],
            voice_key: Some([7; 32]),
            voice_key_proof: None,
        },
    );
    w.state.handle_datagram(w.now, host_voice, &register(1001));
    w.join(1, "Lobby", None);
    let guest_ip = IpAddr::from([203, 0, 113, 9]);
    w.login_from(2, "guest", guest_ip);
    let out = w.join(2, "Lobby", None);
    let told: Vec<&PeerInfo> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send(2, ServerMsg::PeerEndpoints { peer }) => Some(peer),
            _ => None,
        })
        .collect();
    assert_eq!(told.len(), 1, "{out:?}");
    let reachable: SocketAddr = (SERVER_IP, 5000).into();
    assert_eq!(told[0].candidates(), vec![reachable], "{:?}", told[0]);
    // The host hears of the guest unchanged (here: no UDP address yet, nothing rewritten).
    assert!(out.iter().any(|o| matches!(o,
        Output::Send(1, ServerMsg::PeerEndpoints { peer }) if peer.username == "guest")));
    // When the guest's address changes, the host still sees it as it is ...
    let guest_nat: SocketAddr = "203.0.113.9:40001".parse().unwrap();
    w.state.handle_datagram(w.now, guest_nat, &register(1002));
    let out = w.drain();
    assert!(out.iter().any(|o| matches!(o,
        Output::Send(1, ServerMsg::PeerEndpoints { peer }) if peer.public == Some(guest_nat))));
    // ... and when the host's changes (a second later), the guest gets the reachable form
    // again.
    w.now += S;
    let moved: SocketAddr = "127.0.0.1:5001".parse().unwrap();
    w.state.handle_datagram(w.now, moved, &register(1001));
    let out = w.drain();
    assert!(out.iter().any(|o| matches!(o,
        Output::Send(2, ServerMsg::PeerEndpoints { peer })
            if peer.candidates() == vec![SocketAddr::from((SERVER_IP, 5001))])));
}

/// The user id the server gave a session, from its `Identified` answer.
fn user_id(out: &[Output]) -> UserId {
    out.iter()
        .find_map(|o| match o {
            Output::Send(_, ServerMsg::Identified { user_id, .. }) => *user_id,
            _ => None,
        })
        .expect("identified")
}

fn relay_to(to: UserId, inner: &[u8]) -> Vec<u8> {
    Datagram::RelayTo { to, inner }.to_vec().unwrap()
}

/// Why datagrams were dropped since the last call, whether they came over UDP or a tunnel.
fn drops(w: &mut World) -> Vec<DatagramDrop> {
    std::iter::from_fn(|| w.state.poll_event())
        .filter_map(|e| match e {
            ServerEvent::DatagramDropped { why, .. } | ServerEvent::TunnelDropped { why, .. } => {
                Some(why)
            }
            _ => None,
        })
        .collect()
}

/// A world whose server relays, each client at most `kbps`.
fn relaying_world(kbps: u32) -> World {
    let mut w = World::new();
    w.state = ServerState::new(
        channels(),
        ServerRules {
            relay: Some(RelayRules::per_client_kbps(kbps)),
            ..ServerRules::default()
        },
    );
    w
}

/// A relaying server forwards a member's sealed datagram, unchanged, to another member of its
/// channel as `RelayFrom`, and refuses everything else: forged authors, other channels,
/// unregistered sources, and more than the per-client budget.
#[test]
fn a_relaying_server_forwards_sealed_datagrams_within_a_channel_and_its_budget_only() {
    let mut w = relaying_world(8); // 1000 B/s, 1000 B burst
    let alice = user_id(&w.login(1, "alice"));
    let bob = user_id(&w.login(2, "bob"));
    let dave = user_id(&w.login(4, "dave"));
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    w.join(4, "Duo", None);
    let (a, b, d) = (
        SocketAddr::new(ip_of(1), 40000),
        SocketAddr::new(ip_of(2), 50000),
        SocketAddr::new(ip_of(4), 50000),
    );
    for (from, token) in [(a, 1001), (b, 1002), (d, 1004)] {
        w.state.handle_datagram(w.now, from, &register(token));
    }
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    while w.state.poll_transmit(w.now, &mut buf).is_some() {}
    w.drain();
    drops(&mut w);

    let mut inner = voice_header(alice, 1, 960).to_vec();
    inner.extend_from_slice(&[0x5a; 100]); // ciphertext and tag, opaque to the server
    w.state.handle_datagram(w.now, a, &relay_to(bob, &inner));
    let t = w.state.poll_transmit(w.now, &mut buf).expect("forwarded");
    assert_eq!(t.to, b);
    assert_eq!(
        Datagram::parse(&buf[..t.len]),
        Ok(Datagram::RelayFrom {
            from: alice,
            inner: &inner
        })
    );
    assert!(w.state.relays());

    let forged = voice_header(bob, 1, 960);
    w.state.handle_datagram(w.now, a, &relay_to(bob, &forged));
    w.state.handle_datagram(w.now, a, &relay_to(dave, &inner));
    w.state.handle_datagram(
        w.now,
        "192.0.2.1:1".parse().unwrap(),
        &relay_to(bob, &inner),
    );
    w.state.handle_datagram(w.now, a, &relay_to(alice, &inner));
    assert_eq!(w.state.poll_transmit(w.now, &mut buf), None);
    // The burst is 1000 bytes; 118 went out: seven more fit, the eighth does not.
    for _ in 0..8 {
        w.state.handle_datagram(w.now, a, &relay_to(bob, &inner));
    }
    let forwarded = std::iter::from_fn(|| w.state.poll_transmit(w.now, &mut buf)).count();
    assert_eq!(forwarded, 7);
    use super::RelayRefusal as R;
    assert_eq!(
        drops(&mut w),
        [
            R::ForgedSender,
            R::NotInSameChannel,
            R::UnknownSource,
            R::NotInSameChannel,
            R::OverBudget
        ]
        .map(DatagramDrop::Relay)
    );
    // A second later the budget allows more.
    w.now += S;
    w.state.handle_datagram(w.now, a, &relay_to(bob, &inner));
    assert!(w.state.poll_transmit(w.now, &mut buf).is_some());
}

#[test]
fn a_server_without_relay_forwards_nothing_and_says_so_in_welcome() {
    let mut w = World::new();
    let out = w.connect(1);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Send(1, ServerMsg::Welcome { relay: false, .. }))));
    let alice = user_id(&w.send(
        1,
        ClientMsg::Identify {
            username: "alice".into(),
        },
    ));
    let bob = user_id(&w.login(2, "bob"));
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    let a = SocketAddr::new(ip_of(1), 40000);
    w.state.handle_datagram(w.now, a, &register(1001));
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    while w.state.poll_transmit(w.now, &mut buf).is_some() {}
    drops(&mut w);
    let inner = voice_header(alice, 1, 960);
    w.state.handle_datagram(w.now, a, &relay_to(bob, &inner));
    assert_eq!(w.state.poll_transmit(w.now, &mut buf), None);
    assert_eq!(
        drops(&mut w),
        [DatagramDrop::Relay(super::RelayRefusal::Disabled)]
    );
}

/// A token seen on the wire cannot register another address: the Register must come from the
/// IP its session's TCP connection comes from.
#[test]
fn a_register_from_another_ip_than_the_connection_is_refused() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    w.drain();
    let victim: SocketAddr = "192.0.2.50:9".parse().unwrap();
    w.state.handle_datagram(w.now, victim, &register(1001));
    assert_eq!(
        drops(&mut w),
        [DatagramDrop::RegisterFromElsewhere],
        "no ack goes to the victim, and bob is not told of it"
    );
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    assert_eq!(w.state.poll_transmit(w.now, &mut buf), None);
    assert!(w.drain().is_empty());
}

/// Alternating two source ports of one socket, as fast as possible for two seconds: the
/// channel hears of alice's address about once a second (not 9 bytes in for 150 bytes of TLS
/// out to every member each time), the excess Registers are refused, and the last address
/// still reaches bob.
#[test]
fn alternating_source_ports_reach_the_channel_at_most_once_a_second() {
    let mut w = World::new();
    w.login(1, "alice");
    w.login(2, "bob");
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    w.drain();
    let ports = [40000, 40001];
    let mut told = 0;
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    let mut refused = 0;
    for i in 0..400u64 {
        w.now = Duration::from_millis(5 * i);
        let from = SocketAddr::new(ip_of(1), ports[(i % 2) as usize]);
        w.state.handle_datagram(w.now, from, &register(1001));
        w.state.handle_timeout(w.now);
        while w.state.poll_transmit(w.now, &mut buf).is_some() {}
        refused += drops(&mut w)
            .iter()
            .filter(|d| **d == DatagramDrop::RegisterRateLimited)
            .count();
        told += w
            .drain()
            .iter()
            .filter(|o| matches!(o, Output::Send(2, ServerMsg::PeerEndpoints { .. })))
            .count();
    }
    assert!((2..=3).contains(&told), "bob was told {told} times in 2 s");
    assert!(refused > 350, "{refused} of 400 Registers refused");
    // Once things calm down, bob learns where alice ended up.
    w.now += 2 * S;
    w.state.handle_timeout(w.now);
    let last = w.state.session_view(1).unwrap().public_endpoint;
    assert!(last.is_some());
}

/// A client whose network blocks UDP tunnels its relay envelopes over its TCP connection:
/// the server relays them as if they came from its UDP address (same checks, same budget, no
/// message-rate limit), and what is relayed to it goes back through the tunnel.
#[test]
fn a_tunnelling_client_is_relayed_both_ways_through_its_connection() {
    let mut w = relaying_world(80); // 10 kB/s, 10 kB burst
    let alice = user_id(&w.login(1, "alice"));
    let bob = user_id(&w.login(2, "bob"));
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    // Bob has UDP; alice never registers (her Registers never arrive).
    let b = SocketAddr::new(ip_of(2), 50000);
    w.state.handle_datagram(w.now, b, &register(1002));
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    while w.state.poll_transmit(w.now, &mut buf).is_some() {}
    w.drain();
    drops(&mut w);

    // Alice -> bob: in through her connection, out on UDP to bob.
    let mut inner = voice_header(alice, 1, 960).to_vec();
    inner.extend_from_slice(&[0x5a; 100]);
    let out = w.send(
        1,
        ClientMsg::Tunnel {
            datagram: relay_to(bob, &inner),
        },
    );
    assert!(out.is_empty(), "{out:?}");
    let t = w
        .state
        .poll_transmit(w.now, &mut buf)
        .expect("relayed to bob");
    assert_eq!(t.to, b);
    assert_eq!(
        Datagram::parse(&buf[..t.len]),
        Ok(Datagram::RelayFrom {
            from: alice,
            inner: &inner
        })
    );

    // Bob -> alice: in on UDP, out through alice's connection, not to any UDP address.
    let mut reply = voice_header(bob, 1, 960).to_vec();
    reply.extend_from_slice(&[0xa5; 100]);
    w.state.handle_datagram(w.now, b, &relay_to(alice, &reply));
    assert_eq!(w.state.poll_transmit(w.now, &mut buf), None);
    let out = w.drain();
    let expected = Datagram::RelayFrom {
        from: bob,
        inner: &reply,
    }
    .to_vec()
    .unwrap();
    assert_eq!(
        out,
        vec![Output::Send(1, ServerMsg::Tunnel { datagram: expected })]
    );

    // Voice rate: 60 tunnelled datagrams in one second do not trip the 20/s message limit
    // (the relay budget is what bounds them: 10 kB of 118-byte envelopes is 84).
    for _ in 0..60 {
        w.send(
            1,
            ClientMsg::Tunnel {
                datagram: relay_to(bob, &inner),
            },
        );
    }
    assert!(w.state.is_identified(1), "alice was closed");
    let forwarded = std::iter::from_fn(|| w.state.poll_transmit(w.now, &mut buf)).count();
    assert_eq!(forwarded, 60);

    // What is refused over UDP is refused through the tunnel too, and said why.
    let forged = voice_header(bob, 2, 960);
    let too_long = vec![0u8; MAX_DATAGRAM_LEN + 1];
    for datagram in [relay_to(bob, &forged), register(1001), too_long] {
        w.send(1, ClientMsg::Tunnel { datagram });
    }
    use super::RelayRefusal as R;
    assert_eq!(
        drops(&mut w),
        [
            DatagramDrop::Relay(R::ForgedSender),
            DatagramDrop::Unexpected,
            DatagramDrop::TooLong {
                len: MAX_DATAGRAM_LEN + 1
            },
        ]
    );
    assert_eq!(w.state.poll_transmit(w.now, &mut buf), None);
}

/// Without relaying a tunnel carries nothing; it is counted, and the session stays.
#[test]
fn a_server_without_relay_drops_tunnelled_datagrams() {
    let mut w = World::new();
    let alice = user_id(&w.login(1, "alice"));
    let bob = user_id(&w.login(2, "bob"));
    w.join(1, "Lobby", None);
    w.join(2, "Lobby", None);
    w.drain();
    drops(&mut w);
    let inner = voice_header(alice, 1, 960);
    let out = w.send(
        1,
        ClientMsg::Tunnel {
            datagram: relay_to(bob, &inner),
        },
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        drops(&mut w),
        [DatagramDrop::Relay(super::RelayRefusal::Disabled)]
    );
    assert!(w.state.is_identified(1));
}
