use super::peer::PeerSettings;
use super::*;
use crate::voice::net::impair::{ImpairConfig, Impairment};

/// The engine's calls in the shape these tests were written in: every datagram it wants
/// sent handed to a closure.
trait Pump {
    /// Fires due timers, then drains every datagram.
    fn drain(&mut self, now: Duration, f: impl FnMut(SocketAddr, &[u8]));
    /// Feeds one captured frame, then drains every datagram.
    fn capture(&mut self, now: Duration, pcm: &[f32], f: impl FnMut(SocketAddr, &[u8]));
}

impl Pump for VoiceEngine {
    fn drain(&mut self, now: Duration, mut f: impl FnMut(SocketAddr, &[u8])) {
        self.handle_timeout(now);
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        while let Some(t) = self.poll_transmit(now, &mut buf) {
            f(t.to, &buf[..t.len]);
        }
    }

    fn capture(&mut self, now: Duration, pcm: &[f32], mut f: impl FnMut(SocketAddr, &[u8])) {
        self.handle_capture(now, pcm);
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        while let Some(t) = self.poll_transmit(now, &mut buf) {
            f(t.to, &buf[..t.len]);
        }
    }
}

/// Tone amplitude averaged over 100 ms blocks: robust to the phase jumps that jitter
/// buffer adjustments cause, unlike one long Goertzel window.
fn goertzel_amplitude(samples: &[f32], hz: f32, rate: u32) -> f32 {
    let blocks: Vec<f32> = samples
        .chunks(4800)
        .map(|b| crate::audio::goertzel_amplitude(b, hz, rate))
        .collect();
    blocks.iter().sum::<f32>() / blocks.len().max(1) as f32
}

fn engine(id: UserId) -> VoiceEngine {
    let mut cfg = VoiceConfig::default();
    cfg.capture.denoise = false;
    cfg.capture.processing = crate::voice::tx::ProcessingConfig::NONE;
    let mut e = VoiceEngine::new(cfg, id as u64).unwrap();
    e.set_self_id(id);
    e
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// With no microphone no frame ever arrives; the meter must still show the real threshold
/// (it used to show 0 dBFS, i.e. "never transmit").
#[test]
fn threshold_is_known_before_the_first_frame() {
    let e = engine(1);
    let db = e.snapshot(Duration::ZERO).vad_threshold_db;
    assert!((-90.0..-20.0).contains(&db), "{db}");
}

fn peer(id: UserId, port: u16, key: [u8; 32]) -> PeerInfo {
    PeerInfo {
        user_id: id,
        username: format!("u{id}"),
        local: vec![addr(port)],
        public: None,
        voice_key: Some(key),
        voice_key_proof: None,
    }
}

/// Runs A (talking `hz`) and B (silent) for `secs` over a simulated network; returns B's output.
fn call(hz: f32, secs: f64, impair: Option<ImpairConfig>) -> (Vec<f32>, VoiceSnapshot) {
    let (out, snap, _) = call_keeping_talker(hz, secs, impair);
    (out, snap)
}

/// [`call`], also handing back the talker A.
fn call_keeping_talker(
    hz: f32,
    secs: f64,
    impair: Option<ImpairConfig>,
) -> (Vec<f32>, VoiceSnapshot, VoiceEngine) {
    call_with(hz, 0.3, secs, impair, |_| {})
}

/// [`call_keeping_talker`] with the tone's amplitude and a change to the listener B.
fn call_with(
    hz: f32,
    amplitude: f32,
    secs: f64,
    impair: Option<ImpairConfig>,
    listener: impl FnOnce(&mut VoiceEngine),
) -> (Vec<f32>, VoiceSnapshot, VoiceEngine) {
    let (mut a, mut b) = (engine(1), engine(2));
    listener(&mut b);
    let now0 = Duration::ZERO;
    a.upsert_peer(now0, &peer(2, 2000, b.public_key()));
    b.upsert_peer(now0, &peer(1, 1000, a.public_key()));
    let mut net_to_b = Impairment::new(impair.unwrap_or_default());
    let mut to_a: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut out = Vec::new();
    let frame = 960;
    let mut phase = 0.0f32;
    let steps = (secs * 50.0) as usize;
    for step in 0..steps {
        let now = Duration::from_millis(20 * step as u64);
        let pcm: Vec<f32> = (0..frame)
            .map(|_| {
                phase = (phase + hz / 48_000.0).fract();
                amplitude * (phase * std::f32::consts::TAU).sin()
            })
            .collect();
        a.capture(now, &pcm, |to, bytes| {
            assert_eq!(to, addr(2000));
            net_to_b.push(now, addr(1000), bytes);
        });
        a.drain(now, |_, bytes| net_to_b.push(now, addr(1000), bytes));
        b.drain(now, |_, bytes| to_a.push((addr(2000), bytes.to_vec())));
        for (from, bytes) in to_a.drain(..) {
            a.handle_datagram(now, from, &bytes);
        }
        // Deliver in 1 ms slices so jitter is seen at its real arrival time.
        for ms in 0..20 {
            let t = now + Duration::from_millis(ms);
            while let Some((from, bytes)) = net_to_b.pop_due(t) {
                b.handle_datagram(t, from, &bytes);
            }
        }
        let mut mix = vec![0.0; frame];
        b.playout_frame(now + Duration::from_millis(19), &mut mix);
        out.extend(mix);
    }
    let snap = b.snapshot(Duration::from_secs_f64(secs));
    (out, snap, a)
}

/// The listener tells the talker what it loses of its voice; the talker sizes its FEC and
/// bit rate to that, not to the (clean) link it receives on. Before reports, a talker whose
/// listeners send nothing kept the 5 % floor whatever they lost: PESQ-WB 2.1 at 10 % loss,
/// against 3.6 with the hint right (docs/BENCHMARKS.md).
#[test]
fn the_talker_tunes_its_redundancy_to_the_loss_its_listener_reports() {
    let cfg: ImpairConfig = "loss=0.2,seed=5".parse().unwrap();
    let (out, listener, talker) = call_keeping_talker(440.0, 6.0, Some(cfg));
    // Still heard once the talker's packets carry deep redundancy (framed differently).
    let level = goertzel_amplitude(&out[4 * 48_000..], 440.0, 48_000);
    assert!(level > 0.1, "level {level} after the talker adapted");
    assert!(
        listener.peers[0].frames_decoded > 200,
        "{:?}",
        listener.peers[0]
    );
    let seen = listener.peers[0].loss_pct;
    assert!((12.0..30.0).contains(&seen), "listener's loss {seen}");
    let now = Duration::from_secs(6);
    let reported = talker.snapshot(now).peers[0].reported_loss_pct;
    let reported = reported.expect("the talker got reports");
    assert!(
        (reported - seen).abs() < 5.0,
        "reported {reported}, seen {seen}"
    );
    let hint = talker.encoder.expected_loss_percent();
    assert!((12..30).contains(&hint), "expected-loss hint {hint}");
    // Random loss comes in single packets: in-band FEC stays on.
    assert_eq!(talker.encoder.loss_shape(), LossShape::Scattered);

    // The same call without loss: the floor, and nothing reported lost.
    let (_, _, clean) = call_keeping_talker(440.0, 4.0, None);
    assert_eq!(clean.encoder.expected_loss_percent(), 5);
    let reported = clean.snapshot(Duration::from_secs(4)).peers[0].reported_loss_pct;
    assert_eq!(reported, Some(0.0));
}

/// Loss in bursts (mean 3 packets): the listener reports the runs, and the talker trades
/// in-band FEC (one packet) for deep redundancy (a whole burst) while they last; the
/// listener's buffer holds the delay that lets that redundancy arrive in time.
#[test]
fn bursty_loss_reported_by_the_listener_turns_fec_into_deep_redundancy() {
    let cfg: ImpairConfig = "loss=0.1,burst=3,seed=13".parse().unwrap();
    let (out, listener, talker) = call_keeping_talker(440.0, 12.0, Some(cfg));
    let level = goertzel_amplitude(&out[8 * 48_000..], 440.0, 48_000);
    assert!(level > 0.1, "level {level} after the talker adapted");
    assert_eq!(talker.encoder.loss_shape(), LossShape::Bursty);
    let heard = &listener.peers[0];
    assert!(heard.frames_rebuilt > 10, "{heard:?}");
    assert!(heard.target_ms >= 60.0, "{heard:?}");
}

/// A quiet talker plays at its own level, or, with loudness normalisation on, near the
/// common target (−23 dBFS RMS), without touching its per-peer volume.
#[test]
fn loudness_normalisation_brings_a_quiet_talker_up_to_the_common_level() {
    // 0.03 peak: about -33 dBFS RMS, 10 dB under the target.
    let level = |normalize: bool| {
        let (out, _, _) = call_with(440.0, 0.03, 5.0, None, |b| {
            b.apply(Duration::ZERO, VoiceSetting::NormalizeLoudness(normalize));
        });
        rms_dbfs(&out[3 * 48_000..])
    };
    let (plain, evened) = (level(false), level(true));
    assert!((plain + 33.0).abs() < 2.0, "as sent: {plain} dBFS");
    assert!(
        (evened - crate::voice::rx::loudness::TARGET_DBFS).abs() < 2.0,
        "normalised: {evened} dBFS"
    );
}

/// A Report is taken only from the peer it names, only when addressed to us, and only when
/// newer than the last one: a replayed old report cannot bring back an old loss figure.
#[test]
fn stale_and_misaddressed_reports_are_ignored() {
    let mut p = Peer::new(PeerSettings::default());
    let report = |seq, loss_permille| ReceiverReport {
        seq,
        loss_permille,
        ..ReceiverReport::default()
    };
    p.handle_report(ms(1_000), report(5, 100));
    p.handle_report(ms(1_100), report(4, 900));
    p.handle_report(ms(1_200), report(5, 900));
    assert_eq!(p.reported_loss_percent(ms(1_300), REPORT_FRESH), Some(10.0));
    assert_eq!(
        p.reported_loss_percent(ms(7_000), REPORT_FRESH),
        None,
        "too old"
    );

    let mut peers = BTreeMap::from([(3, Peer::new(PeerSettings::default()))]);
    let mut drops = DropCounters::default();
    let datagram = |from, to| Datagram::Report {
        from,
        to,
        report: report(1, 500),
    };
    take_report(&mut peers, &mut drops, 1, ms(0), 3, datagram(3, 2));
    take_report(&mut peers, &mut drops, 1, ms(0), 4, datagram(3, 1));
    assert_eq!(peers[&3].heard, None);
    assert_eq!((drops.wrong_recipient, drops.unknown_sender), (1, 1));
    take_report(&mut peers, &mut drops, 1, ms(0), 3, datagram(3, 1));
    assert_eq!(
        peers[&3].reported_loss_percent(ms(0), REPORT_FRESH),
        Some(50.0)
    );
}

#[test]
fn a_tone_sent_by_one_engine_is_heard_by_the_other() {
    let (out, snap) = call(440.0, 3.0, None);
    let tail = &out[48_000..];
    let level = goertzel_amplitude(tail, 440.0, 48_000);
    assert!(level > 0.15, "level {level} snap {snap:?}");
    assert!(goertzel_amplitude(tail, 1000.0, 48_000) < 0.01);
    assert_eq!(snap.peers.len(), 1);
    assert!(matches!(snap.peers[0].state, PeerState::Direct(_)));
    assert!(snap.peers[0].speaking);
}

#[test]
fn a_lossy_jittery_link_is_concealed_without_long_gaps() {
    let cfg: ImpairConfig = "loss=0.1,jitter_ms=30,duplicate=0.05,seed=9"
        .parse()
        .unwrap();
    let (out, snap) = call(500.0, 6.0, Some(cfg));
    let tail = &out[48_000..];
    let mut longest = 0;
    let mut run = 0;
    for c in tail.chunks(48) {
        let rms = (c.iter().map(|x| x * x).sum::<f32>() / 48.0).sqrt();
        if rms < 0.01 {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    assert!(longest <= 60, "gap of {longest} ms: {:?}", snap.peers[0]);
    let p = &snap.peers[0];
    assert!(p.frames_fec + p.frames_concealed > 10, "{p:?}");
    assert!(p.target_ms >= 20.0 && p.target_ms <= 121.0, "{p:?}");
}

/// Exchanges control datagrams between A (at `a_at`) and B (at `b_at`) for `rounds`
/// rounds of 20 ms: enough rounds bring their links up.
fn exchange(
    (a, a_at): (&mut VoiceEngine, SocketAddr),
    (b, b_at): (&mut VoiceEngine, SocketAddr),
    now: &mut Duration,
    rounds: usize,
) {
    for _ in 0..rounds {
        let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
        a.drain(*now, |to, d| {
            if to == b_at {
                to_b.push(d.to_vec())
            }
        });
        b.drain(*now, |to, d| {
            if to == a_at {
                to_a.push(d.to_vec())
            }
        });
        to_b.iter().for_each(|d| b.handle_datagram(*now, a_at, d));
        to_a.iter().for_each(|d| a.handle_datagram(*now, b_at, d));
        *now += Duration::from_millis(20);
    }
}

fn tone_frame(hz: f32) -> Vec<f32> {
    (0..960)
        .map(|i| 0.3 * (i as f32 * hz * std::f32::consts::TAU / 48_000.0).sin())
        .collect()
}

/// Destinations of the voice datagrams `e` sends for `frames` frames of a tone.
fn voice_destinations(e: &mut VoiceEngine, now: &mut Duration, frames: u64) -> Vec<SocketAddr> {
    let pcm = tone_frame(440.0);
    let mut to = Vec::new();
    for _ in 0..frames {
        e.capture(*now, &pcm, |dst, b| {
            if matches!(Datagram::parse(b), Ok(Datagram::Voice { .. })) {
                to.push(dst)
            }
        });
        *now += Duration::from_millis(20);
    }
    to
}

/// A (id 1, at :1000) and B (id 2, at :2000) with their link up, and the time reached.
fn linked_pair() -> (VoiceEngine, VoiceEngine, Duration) {
    let (mut a, mut b) = (engine(1), engine(2));
    a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
    b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
    let mut now = Duration::ZERO;
    exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 20);
    (a, b, now)
}

#[test]
fn muted_sender_sends_no_voice() {
    let (mut a, _b, mut now) = linked_pair();
    assert!(matches!(
        a.snapshot(now).peers[0].state,
        PeerState::Direct(_)
    ));
    a.set_muted(true);
    assert_eq!(voice_destinations(&mut a, &mut now, 50), vec![]);
    // The same link carries voice once unmuted: the silence above was the mute's doing.
    a.set_muted(false);
    assert!(voice_destinations(&mut a, &mut now, 50).len() > 20);
}

#[test]
fn registration_repeats_until_acknowledged_then_refreshes_slowly() {
    let mut e = engine(1);
    let server = addr(7700);
    e.set_server(Duration::ZERO, server, 42);
    let mut regs = 0;
    for ms in (0..1000).step_by(10) {
        e.drain(Duration::from_millis(ms), |to, b| {
            if to == server && matches!(Datagram::parse(b), Ok(Datagram::Register { token: 42 })) {
                regs += 1;
            }
        });
    }
    assert!(regs >= 3, "{regs}");
    let ack = Datagram::RegisterAck {
        observed: addr(5555),
    }
    .to_vec()
    .unwrap();
    e.handle_datagram(Duration::from_secs(1), server, &ack);
    assert_eq!(e.public_addr(), Some(addr(5555)));
    let mut later = 0;
    for ms in (1000..10_000).step_by(10) {
        e.drain(Duration::from_millis(ms), |to, _| {
            if to == server {
                later += 1;
            }
        });
    }
    assert_eq!(later, 0, "no re-registration within 15 s of an ack");
}

/// When the server answers none of our Registers, UDP is taken to be blocked: with a relaying
/// server, what is for the server (relay envelopes) goes to the tunnel instead, Registers
/// keep trying UDP slowly, and an answer after all turns the tunnel off.
#[test]
fn unanswered_registration_sends_server_traffic_through_the_tunnel_until_udp_answers() {
    let (mut a, b) = (engine(1), engine(2));
    let server = addr(7700);
    a.set_server(Duration::ZERO, server, 42);
    a.set_server_relays(true);
    a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
    let (mut regs_early, mut regs_late, mut relayed_udp, mut to_peer) = (0, 0, 0, 0);
    let mut tunnelled = Vec::new();
    let blocked_at = super::registration::UDP_BLOCKED_AFTER.as_millis() as u64;
    for ms in (0..8_000u64).step_by(10) {
        let now = Duration::from_millis(ms);
        a.drain(now, |to, bytes| match Datagram::parse(bytes) {
            Ok(Datagram::Register { .. }) if ms < blocked_at => regs_early += 1,
            Ok(Datagram::Register { .. }) => regs_late += 1,
            Ok(Datagram::RelayTo { .. }) if to == server => relayed_udp += 1,
            _ if to == addr(2000) => to_peer += 1,
            _ => {}
        });
        while let Some(d) = a.poll_tunnel() {
            tunnelled.push((ms, d));
        }
    }
    assert!(a.tunnels());
    let snap = a.snapshot(Duration::from_secs(8));
    assert!(snap.udp_blocked && snap.tunnelled, "{snap:?}");
    assert_eq!(snap.tunnel_datagrams, tunnelled.len() as u64);
    assert!(
        regs_early >= 5,
        "{regs_early} Registers before UDP counts as blocked"
    );
    assert!(
        (1..=2).contains(&regs_late),
        "{regs_late} Registers in the 6.5 s after: slow retries"
    );
    assert!(
        to_peer > 0,
        "punches to the peer's own address still go out on UDP"
    );
    assert!(!tunnelled.is_empty(), "relay probes go through the tunnel");
    assert!(tunnelled.iter().all(|(ms, d)| *ms >= blocked_at
        && matches!(Datagram::parse(d), Ok(Datagram::RelayTo { to: 2, .. }))));
    let before = relayed_udp;
    assert!(before > 0, "relay probes went out on UDP before the tunnel");

    // UDP answers after all: the tunnel is off, relay probes go to the server's UDP again.
    let ack = Datagram::RegisterAck {
        observed: addr(5555),
    }
    .to_vec()
    .unwrap();
    a.handle_datagram(Duration::from_secs(8), server, &ack);
    for ms in (8_000..10_000u64).step_by(10) {
        a.drain(Duration::from_millis(ms), |to, bytes| {
            if to == server && matches!(Datagram::parse(bytes), Ok(Datagram::RelayTo { .. })) {
                relayed_udp += 1;
            }
        });
    }
    assert!(!a.tunnels());
    assert_eq!(a.poll_tunnel(), None);
    assert!(relayed_udp > before);
}

/// Without a relaying server there is nothing to tunnel to: the engine only says UDP is
/// blocked, so the user is told why nobody hears them.
#[test]
fn blocked_udp_without_a_relaying_server_is_reported_not_tunnelled() {
    let mut a = engine(1);
    a.set_server(Duration::ZERO, addr(7700), 42);
    for ms in (0..3_000u64).step_by(10) {
        a.drain(Duration::from_millis(ms), |_, _| {});
    }
    let snap = a.snapshot(Duration::from_secs(3));
    assert!(snap.udp_blocked && !snap.tunnelled, "{snap:?}");
    assert!(!a.tunnels());
}

#[test]
fn voice_on_the_wire_is_sealed_for_each_peer_and_opaque_to_others() {
    let (mut a, mut b) = (engine(1), engine(2));
    let eve = engine(3);
    a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
    b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
    // Connect the link first (punches), then capture what A sends.
    let mut wire: Vec<Vec<u8>> = Vec::new();
    for step in 0..20u64 {
        let now = Duration::from_millis(step * 20);
        let mut to_b = Vec::new();
        a.drain(now, |_, bytes| to_b.push(bytes.to_vec()));
        for d in to_b {
            b.handle_datagram(now, addr(1000), &d);
        }
        let mut to_a = Vec::new();
        b.drain(now, |_, bytes| to_a.push(bytes.to_vec()));
        for d in to_a {
            a.handle_datagram(now, addr(2000), &d);
        }
        let pcm: Vec<f32> = (0..960).map(|i| 0.3 * (i as f32 * 0.0575).sin()).collect();
        a.capture(now, &pcm, |_, bytes| {
            if matches!(Datagram::parse(bytes), Ok(Datagram::Voice { .. })) {
                wire.push(bytes.to_vec())
            }
        });
    }
    assert!(!wire.is_empty(), "A sent voice");
    let mut dec = crate::voice::rx::OpusDecoder::new().unwrap();
    let mut out = vec![0.0; 960];
    for d in &wire {
        let Ok(Datagram::Voice { payload, .. }) = Datagram::parse(d) else {
            panic!("voice datagram expected");
        };
        // The payload is ciphertext: it carries a 16-byte tag and Opus cannot play it as is
        // (a decoder may accept garbage, but never produces the original signal).
        assert!(payload.len() > TAG_LEN);
        let _ = dec.decode(&payload[..payload.len() - TAG_LEN], &mut out);
    }
    // Eve, another channel member without the pair's key, gets nothing playable.
    let mut eve = eve;
    eve.upsert_peer(Duration::ZERO, &peer(1, 1000, [9; 32]));
    for d in &wire {
        eve.handle_datagram(Duration::from_secs(1), addr(1000), d);
    }
    let snap = eve.snapshot(Duration::from_secs(1));
    assert!(snap.peers.iter().all(|p| p.frames_decoded == 0));
    assert_eq!(snap.undecryptable, wire.len() as u64);
}

#[test]
fn forged_and_unkeyed_voice_is_dropped_and_counted() {
    let mut b = engine(2);
    let a = engine(1);
    b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
    let forged = Datagram::Voice {
        from: 1,
        seq: 5,
        timestamp: 960,
        payload: &[
            0xfc, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
        ],
    }
    .to_vec()
    .unwrap();
    b.handle_datagram(Duration::ZERO, addr(1000), &forged);
    let unknown = Datagram::Voice {
        from: 77,
        seq: 1,
        timestamp: 0,
        payload: &[1, 2, 3],
    }
    .to_vec()
    .unwrap();
    b.handle_datagram(Duration::ZERO, addr(1000), &unknown);
    let snap = b.snapshot(Duration::ZERO);
    assert_eq!(snap.undecryptable, 2);
    assert_eq!(snap.peers[0].frames_decoded, 0);
}

/// A spoofed punch (anyone can learn two user ids from the overview) must neither get an
/// answer nor move where our voice goes; the peer's own tagged punch from a new address
/// (its NAT rebound) still does.
#[test]
fn spoofed_punches_are_ignored_and_tagged_ones_still_move_the_link() {
    let (mut a, mut b) = (engine(1), engine(2));
    a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
    b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
    let direct_to = |b: &VoiceEngine, now| match &b.snapshot(now).peers[0].state {
        PeerState::Direct(addr) => Some(*addr),
        _ => None,
    };
    // Link up over the simulated network: A at :1000, B at :2000.
    let mut now = Duration::ZERO;
    for _ in 0..20 {
        let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
        a.drain(now, |_, d| to_b.push(d.to_vec()));
        b.drain(now, |_, d| to_a.push(d.to_vec()));
        to_b.iter()
            .for_each(|d| b.handle_datagram(now, addr(1000), d));
        to_a.iter()
            .for_each(|d| a.handle_datagram(now, addr(2000), d));
        now += Duration::from_millis(20);
    }
    assert_eq!(direct_to(&b, now), Some(addr(1000)));

    let attacker = addr(6666);
    let punch = Datagram::Punch {
        from: 1,
        to: 2,
        nonce: 99,
    }
    .to_vec()
    .unwrap();
    let mut zero_tag = punch.clone();
    zero_tag.extend_from_slice(&[0u8; TAG_LEN]);
    let eve = SessionKeys::generate();
    let eve_cipher = PeerCipher::new(&eve, 1, 2, b.public_key()).unwrap();
    let mut eve_tagged = punch.clone();
    eve_tagged.extend_from_slice(
        &eve_cipher
            .tag_control(&punch[..].try_into().unwrap())
            .unwrap(),
    );
    let before = b.snapshot(now).undecryptable;
    for forged in [&punch, &zero_tag, &eve_tagged] {
        b.handle_datagram(now, attacker, forged);
    }
    assert_eq!(b.snapshot(now).undecryptable, before + 3);
    let mut answers_to_attacker = 0;
    for _ in 0..10 {
        now += Duration::from_millis(20);
        b.drain(now, |to, _| {
            answers_to_attacker += usize::from(to == attacker)
        });
    }
    assert_eq!(answers_to_attacker, 0);
    assert_eq!(direct_to(&b, now), Some(addr(1000)));

    // A's real (tagged) keepalives now arrive from a new address: the link follows them.
    let moved = addr(1001);
    for _ in 0..1000 {
        let mut to_b = Vec::new();
        a.drain(now, |_, d| to_b.push(d.to_vec()));
        to_b.iter().for_each(|d| b.handle_datagram(now, moved, d));
        let mut to_a = Vec::new();
        b.drain(now, |_, d| to_a.push(d.to_vec()));
        to_a.iter()
            .for_each(|d| a.handle_datagram(now, addr(2000), d));
        now += Duration::from_millis(20);
        if direct_to(&b, now) == Some(moved) {
            break;
        }
    }
    assert_eq!(
        direct_to(&b, now),
        Some(moved),
        "a tagged punch from a new address is adopted"
    );
}

/// Voice is only ever sealed for a peer: one whose key is unknown gets nothing at all (not
/// even punches), and one whose key turns out invalid mid-call stops getting voice on a link
/// that is still up, while a keyed peer next to them keeps getting it.
#[test]
fn a_peer_without_a_voice_key_gets_no_voice() {
    let (mut a, mut b) = (engine(1), engine(2));
    a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
    b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
    let mut keyless = peer(3, 3000, [0; 32]);
    keyless.voice_key = None;
    a.upsert_peer(Duration::ZERO, &keyless);
    let mut now = Duration::ZERO;
    let mut to_keyless = 0;
    for _ in 0..20 {
        let mut to_b = Vec::new();
        a.drain(now, |to, d| {
            to_keyless += usize::from(to == addr(3000));
            if to == addr(2000) {
                to_b.push(d.to_vec());
            }
        });
        to_b.iter()
            .for_each(|d| b.handle_datagram(now, addr(1000), d));
        exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 1);
    }
    assert_eq!(
        to_keyless, 0,
        "nothing goes to a peer we cannot authenticate to"
    );
    let sent = voice_destinations(&mut a, &mut now, 50);
    assert!(sent.iter().filter(|&&d| d == addr(2000)).count() > 20);
    assert!(!sent.contains(&addr(3000)));

    // B's key is re-announced as an invalid (all-zero, low-order) point: the link stays
    // up, but there is no key to seal with any more, so no voice, never plaintext.
    a.upsert_peer(now, &peer(2, 2000, [0; 32]));
    assert!(matches!(
        a.snapshot(now).peers[0].state,
        PeerState::Direct(_)
    ));
    assert_eq!(voice_destinations(&mut a, &mut now, 50), vec![]);
}

/// A restarted server may give us a new id while a peer keeps its own: the voice keys and
/// the sender id we seal with must follow the new id, or the peer never hears us again.
#[test]
fn after_a_new_self_id_voice_is_sealed_under_the_new_id() {
    let (mut a, mut b, mut now) = linked_pair();
    a.set_self_id(3);
    a.upsert_peer(now, &peer(2, 2000, b.public_key()));
    b.remove_peer(1);
    b.upsert_peer(now, &peer(3, 1000, a.public_key()));
    exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 20);
    let pcm = tone_frame(440.0);
    let mut mix = vec![0.0; 960];
    for _ in 0..50 {
        let mut to_b = Vec::new();
        a.capture(now, &pcm, |to, d| {
            if to == addr(2000) {
                to_b.push(d.to_vec())
            }
        });
        to_b.iter()
            .for_each(|d| b.handle_datagram(now, addr(1000), d));
        b.playout_frame(now, &mut mix);
        now += Duration::from_millis(20);
    }
    let snap = b.snapshot(now);
    assert_eq!(snap.undecryptable, 0, "{snap:?}");
    let p = &snap.peers[0];
    assert_eq!(p.user_id, 3);
    assert!(matches!(p.state, PeerState::Direct(_)), "{p:?}");
    assert!(p.frames_decoded > 20, "{p:?}");
}

/// Only the server may tell us our public address: a `RegisterAck` from anyone else would
/// make us announce an address of the sender's choosing.
#[test]
fn a_register_ack_from_another_address_is_ignored_and_counted() {
    let mut e = engine(1);
    let server = addr(7700);
    e.set_server(Duration::ZERO, server, 42);
    let ack = |observed| Datagram::RegisterAck { observed }.to_vec().unwrap();
    e.handle_datagram(Duration::ZERO, addr(6666), &ack(addr(6666)));
    assert_eq!(e.public_addr(), None);
    assert_eq!(e.snapshot(Duration::ZERO).foreign_register_acks, 1);
    e.handle_datagram(Duration::ZERO, server, &ack(addr(5555)));
    assert_eq!(e.public_addr(), Some(addr(5555)));
    assert_eq!(e.snapshot(Duration::ZERO).foreign_register_acks, 1);
}

/// A speaks a tone to B for `frames` frames; returns the loudest sample of B's mix.
fn talk(a: &mut VoiceEngine, b: &mut VoiceEngine, now: &mut Duration, frames: usize) -> f32 {
    let pcm = tone_frame(440.0);
    let mut mix = vec![0.0; 960];
    let mut peak = 0.0f32;
    for _ in 0..frames {
        let mut to_b = Vec::new();
        a.capture(*now, &pcm, |to, d| {
            if to == addr(2000) {
                to_b.push(d.to_vec())
            }
        });
        to_b.iter()
            .for_each(|d| b.handle_datagram(*now, addr(1000), d));
        b.playout_frame(*now, &mut mix);
        peak = mix.iter().fold(peak, |m, x| m.max(x.abs()));
        *now += Duration::from_millis(20);
    }
    peak
}

/// Volume and mute chosen in the UI belong to the user, not to a connection: chosen before
/// the user is a peer, they apply once it appears, and they survive it leaving and rejoining.
#[test]
fn peer_settings_chosen_before_a_peer_appears_apply_to_it_and_survive_a_rejoin() {
    let (mut a, mut b) = (engine(1), engine(2));
    b.set_peer_muted(1, true);
    b.set_peer_volume(1, 0.5);
    let chosen = PeerSettings {
        volume: 0.5,
        muted: true,
    };
    assert_eq!(b.peer_settings(1), chosen);
    assert_eq!(b.peer_settings(9), PeerSettings::default());
    a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
    b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
    assert_eq!(b.peer_settings(1), chosen);
    let mut now = Duration::ZERO;
    exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 20);

    let peak = talk(&mut a, &mut b, &mut now, 50);
    let p = &b.snapshot(now).peers[0];
    assert!(
        p.frames_decoded > 20,
        "A's voice arrives and is decoded: {p:?}"
    );
    assert_eq!(peak, 0.0, "but a muted peer is not mixed");

    b.set_peer_muted(1, false);
    let half = talk(&mut a, &mut b, &mut now, 50);
    assert!(
        half > 0.05 && half < 0.25,
        "unmuted at half volume: peak {half}"
    );

    b.remove_peer(1);
    assert_eq!(b.peer_settings(1).volume, 0.5);
    b.upsert_peer(now, &peer(1, 1000, a.public_key()));
    assert_eq!(
        b.peer_settings(1),
        PeerSettings {
            volume: 0.5,
            muted: false
        }
    );
}

/// The cipher's window is the one replay window: a voice datagram that arrives twice is
/// dropped once and counted as a replay (not as a forgery), and the jitter buffer never sees
/// the second copy.
#[test]
fn a_duplicated_voice_datagram_is_dropped_by_the_cipher_and_counted_as_a_replay() {
    let (mut a, mut b, mut now) = linked_pair();
    let before = b.snapshot(now).drops.total();
    let pcm = tone_frame(440.0);
    let mut mix = vec![0.0; 960];
    let mut voice = 0;
    for _ in 0..50 {
        let mut to_b = Vec::new();
        a.capture(now, &pcm, |to, d| {
            if to == addr(2000) && matches!(Datagram::parse(d), Ok(Datagram::Voice { .. })) {
                to_b.push(d.to_vec())
            }
        });
        for d in &to_b {
            b.handle_datagram(now, addr(1000), d);
            b.handle_datagram(now, addr(1000), d);
            voice += 1;
        }
        b.playout_frame(now, &mut mix);
        now += Duration::from_millis(20);
    }
    assert!(voice > 20);
    let snap = b.snapshot(now);
    assert_eq!(snap.drops.replay, voice, "{snap:?}");
    assert_eq!(snap.drops.total(), before + voice);
    assert_eq!(snap.undecryptable, 0);
    let p = &snap.peers[0];
    assert_eq!(p.duplicates, 0, "{p:?}");
    assert!(p.frames_decoded > 20, "{p:?}");
    assert_eq!(
        DropReason::Replay(1).to_string(),
        "replayed or too old voice sequence number from peer 1"
    );
}

/// An attacker who recorded A's genuine, correctly tagged datagrams (punches, pings, acks)
/// replays every one of them from its own address: B answers at most with challenges it
/// cannot meet, and B's voice keeps going to A alone.
#[test]
fn replayed_genuine_control_from_a_third_address_does_not_divert_voice() {
    let (mut a, mut b) = (engine(1), engine(2));
    a.upsert_peer(Duration::ZERO, &peer(2, 2000, b.public_key()));
    b.upsert_peer(Duration::ZERO, &peer(1, 1000, a.public_key()));
    let mut now = Duration::ZERO;
    let mut recorded = Vec::new();
    for _ in 0..20 {
        let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
        a.drain(now, |_, d| to_b.push(d.to_vec()));
        b.drain(now, |_, d| to_a.push(d.to_vec()));
        for d in &to_b {
            b.handle_datagram(now, addr(1000), d);
        }
        to_a.iter()
            .for_each(|d| a.handle_datagram(now, addr(2000), d));
        recorded.extend(to_b);
        now += Duration::from_millis(20);
    }
    let direct_to = |b: &VoiceEngine, now| match &b.snapshot(now).peers[0].state {
        PeerState::Direct(addr) => Some(*addr),
        _ => None,
    };
    assert_eq!(direct_to(&b, now), Some(addr(1000)));
    assert!(recorded.len() > 3, "{} datagrams recorded", recorded.len());
    let attacker = addr(6666);
    for d in &recorded {
        b.handle_datagram(now, attacker, d);
        now += Duration::from_millis(5);
        b.drain(now, |_, _| {});
    }
    assert_eq!(direct_to(&b, now), Some(addr(1000)));
    let sent = voice_destinations(&mut b, &mut now, 20);
    assert!(!sent.is_empty());
    assert!(sent.iter().all(|&d| d == addr(1000)), "{sent:?}");
}

/// Speech with pauses over a clean link, A to B: what B plays while A pauses is pause
/// concealment, and nothing is concealed, dropped or late (issue 11: on a clean link the
/// receiver counted 38-79 concealed and 8-24 dropped frames a minute, all at pauses). The
/// pauses come in three lengths: within the voice detector's hangover (only DTX stops
/// sending), just after it (a short stop: no pre-roll), and long (pre-roll with the onset).
#[test]
fn pauses_in_speech_over_a_clean_link_are_not_loss() {
    let (mut a, mut b, mut now) = linked_pair();
    let pcm = tone_frame(300.0);
    let quiet = vec![0.0f32; 960];
    let mut mix = vec![0.0; CHUNK_SAMPLES];
    let mut frame = 0u64;
    for pause in [10u64, 25, 60, 10, 25, 60, 25, 60] {
        for step in 0..(50 + pause) {
            let input = if step < 50 { &pcm } else { &quiet };
            let mut to_b = Vec::new();
            a.capture(now, input, |to, d| {
                if to == addr(2000) {
                    to_b.push(d.to_vec())
                }
            });
            // Loopback: each datagram arrives 1-3 ms after it was sent.
            let arrival = now + Duration::from_micros(1_000 + (frame * 737) % 2_000);
            to_b.iter()
                .for_each(|d| b.handle_datagram(arrival, addr(1000), d));
            // B's device takes a 10 ms chunk at 5 and at 15 ms into each frame period.
            for at in [5, 15] {
                b.playout_frame(now + Duration::from_millis(at), &mut mix);
            }
            now += Duration::from_millis(20);
            frame += 1;
        }
    }
    let snap = b.snapshot(now);
    let p = &snap.peers[0];
    assert!(p.frames_decoded > 350, "{p:?}");
    assert_eq!(
        (
            p.frames_concealed,
            p.frames_dropped,
            p.late,
            p.frames_stretched
        ),
        (0, 0, 0, 0),
        "concealed, dropped, late, stretched: {p:?}"
    );
    assert!(p.frames_pause_concealed > 0, "{p:?}");
}

/// A's voice datagrams for B (at :2000) over `frames` frames of a tone, as sent.
fn record_voice_for_b(a: &mut VoiceEngine, now: &mut Duration, frames: usize) -> Vec<Vec<u8>> {
    let pcm = tone_frame(440.0);
    let mut recorded = Vec::new();
    for _ in 0..frames {
        a.capture(*now, &pcm, |to, d| {
            if to == addr(2000) && matches!(Datagram::parse(d), Ok(Datagram::Voice { .. })) {
                recorded.push(d.to_vec())
            }
        });
        *now += Duration::from_millis(20);
    }
    recorded
}

/// Found by reading the code (issue 13): the voice keys depended only on the per-run key
/// pairs and the two ids, so after B left and rejoined (same ids) its new cipher had the old
/// keys and an empty replay window, and voice recorded before was accepted again from a
/// spoofed address. Now B takes a new key pair when it leaves, and the recording is refused.
#[test]
fn a_rejoin_takes_fresh_keys_so_voice_recorded_before_is_refused() {
    let (mut a, mut b, mut now) = linked_pair();
    let recorded = record_voice_for_b(&mut a, &mut now, 20);
    assert!(recorded.len() > 10);
    let old_key = b.public_key();
    // B leaves and joins again; the server announces each to the other anew.
    b.clear_peers();
    a.remove_peer(2);
    b.upsert_peer(now, &peer(1, 1000, a.public_key()));
    a.upsert_peer(now, &peer(2, 2000, b.public_key()));
    exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 20);
    let before = b.snapshot(now).undecryptable;
    for d in &recorded {
        b.handle_datagram(now, addr(1000), d);
    }
    let snap = b.snapshot(now);
    assert_eq!(
        snap.undecryptable,
        before + recorded.len() as u64,
        "every recorded datagram is refused: {snap:?}"
    );
    assert_eq!(snap.peers[0].frames_decoded, 0);
    assert_ne!(b.public_key(), old_key, "a new key pair for the new join");
    // And the call under the new keys works.
    assert!(talk(&mut a, &mut b, &mut now, 50) > 0.1);
}

/// The other side of the same hole: B stays, A leaves and comes back announcing the voice
/// key it had before (an old client, or a server replaying A's old announcement). A cipher
/// from the same two keys would restart the replay window, so that key is refused.
#[test]
fn a_peer_back_with_a_voice_key_it_used_before_gets_no_cipher() {
    let (mut a, mut b, mut now) = linked_pair();
    let recorded = record_voice_for_b(&mut a, &mut now, 20);
    b.remove_peer(1);
    b.upsert_peer(now, &peer(1, 1000, a.public_key()));
    assert_eq!(b.reused_keys_refused(), 1);
    let before = b.snapshot(now).undecryptable;
    for d in &recorded {
        b.handle_datagram(now, addr(1000), d);
    }
    let snap = b.snapshot(now);
    assert_eq!(snap.undecryptable, before + recorded.len() as u64);
    assert_eq!(snap.peers[0].frames_decoded, 0);
    // A new key from A (it rejoined for real) is taken.
    a.clear_peers();
    a.upsert_peer(now, &peer(2, 2000, b.public_key()));
    b.upsert_peer(now, &peer(1, 1000, a.public_key()));
    exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 20);
    assert!(talk(&mut a, &mut b, &mut now, 50) > 0.1);
}

/// A server that announces A's next key and then A's earlier one again (both genuinely A's,
/// so signatures check out) must not get a fresh cipher from the earlier key past the replay
/// window: a key whose cipher was replaced is retired like one whose peer left.
#[test]
fn a_voice_key_swapped_back_to_an_earlier_one_gets_no_cipher() {
    let (mut a, mut b, mut now) = linked_pair();
    let first = a.public_key();
    let recorded = record_voice_for_b(&mut a, &mut now, 20);
    b.upsert_peer(now, &peer(1, 1000, [42; 32]));
    b.upsert_peer(now, &peer(1, 1000, first));
    assert_eq!(b.reused_keys_refused(), 1);
    let before = b.snapshot(now).undecryptable;
    for d in &recorded {
        b.handle_datagram(now, addr(1000), d);
    }
    assert_eq!(
        b.snapshot(now).undecryptable,
        before + recorded.len() as u64
    );
}

/// Keys drawn from a seed repeat (the simulation relies on it) and still change per join.
#[test]
fn seeded_key_rotation_repeats_and_changes_every_reset() {
    let keys = |seed| {
        let mut e = engine(1);
        e.set_key_seed([seed; 32]);
        (0..3)
            .map(|_| {
                e.clear_peers();
                e.public_key()
            })
            .collect::<Vec<_>>()
    };
    let k = keys(5);
    assert_eq!(k, keys(5));
    assert_ne!(k[0], k[1]);
    assert_ne!(k[1], k[2]);
    assert_ne!(k, keys(6));
}

/// Every chat message an engine has delivered so far.
fn chat_received(e: &mut VoiceEngine) -> Vec<ChatMessage> {
    std::iter::from_fn(|| e.poll_chat_event())
        .filter_map(|ev| match ev {
            ChatEvent::Received(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// Chat between two linked engines: delivered once, in order, with sender and time; the wire
/// holds no text; and a message sent before the link is up waits for it.
#[test]
fn chat_is_sealed_on_the_wire_delivered_in_order_once_and_acked() {
    let (mut a, mut b, mut now) = linked_pair();
    let sent = a
        .send_chat(now, 1_700_000_000_123, "first: see https://example.org")
        .unwrap();
    assert_eq!(sent.to, vec![(2, "u2".to_string())]);
    a.send_chat(now, 1_700_000_000_456, "second").unwrap();
    let mut wire = Vec::new();
    a.drain(now, |to, d| {
        assert_eq!(to, addr(2000));
        wire.push(d.to_vec());
    });
    let chat: Vec<&Vec<u8>> = wire
        .iter()
        .filter(|d| d[0] == DatagramKind::Chat.type_byte())
        .collect();
    assert_eq!(chat.len(), 2);
    for d in &wire {
        for needle in [&b"first"[..], b"example", b"second"] {
            assert!(
                !d.windows(needle.len()).any(|w| w == needle),
                "plaintext on the wire"
            );
        }
    }
    // Duplicated and reordered on the way: still once, in order.
    for d in [chat[1], chat[0], chat[1], chat[0]] {
        b.handle_datagram(now, addr(1000), d);
    }
    let got = chat_received(&mut b);
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["first: see https://example.org", "second"]);
    assert_eq!((got[0].from, got[0].from_name.as_str()), (1, "u1"));
    assert_eq!(got[0].sent_ms, 1_700_000_000_123);
    // B acks; A has nothing left to send after the ack.
    exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 5);
    assert_eq!(a.peers[&2].chat.as_ref().unwrap().stream.unacked(), 0);
    assert!(chat_received(&mut b).is_empty());

    // A third engine whose link is not up yet: the message waits, then arrives.
    let mut c = engine(3);
    a.upsert_peer(now, &peer(3, 3000, c.public_key()));
    c.upsert_peer(now, &peer(1, 1000, a.public_key()));
    let sent = a.send_chat(now, 1, "to both").unwrap();
    assert_eq!(sent.to.len(), 2);
    for _ in 0..40 {
        let (mut to_c, mut to_a) = (Vec::new(), Vec::new());
        a.drain(now, |to, d| {
            if to == addr(3000) {
                to_c.push(d.to_vec())
            }
        });
        c.drain(now, |_, d| to_a.push(d.to_vec()));
        to_c.iter()
            .for_each(|d| c.handle_datagram(now, addr(1000), d));
        to_a.iter()
            .for_each(|d| a.handle_datagram(now, addr(3000), d));
        now += Duration::from_millis(20);
    }
    let got = chat_received(&mut c);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].text, "to both");
}

/// A member who leaves and comes back (same keys, so the same chat keys) gets a new stream:
/// new messages arrive, and a recording of the old stream's datagrams replayed to it is not
/// delivered again.
#[test]
fn chat_recorded_before_a_rejoin_is_not_delivered_again() {
    let (mut a, mut b, mut now) = linked_pair();
    a.send_chat(now, 1, "before").unwrap();
    let mut recorded = Vec::new();
    a.drain(now, |_, d| {
        if d[0] == DatagramKind::Chat.type_byte() {
            recorded.push(d.to_vec())
        }
    });
    recorded
        .iter()
        .for_each(|d| b.handle_datagram(now, addr(1000), d));
    assert_eq!(chat_received(&mut b).len(), 1);
    // A leaves and rejoins (with a fresh key pair, as every join takes): B forgets and
    // relearns it, A forgets and relearns B.
    b.remove_peer(1);
    a.clear_peers();
    b.upsert_peer(now, &peer(1, 1000, a.public_key()));
    a.upsert_peer(now, &peer(2, 2000, b.public_key()));
    exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 20);
    // Replayed before A's new stream said anything: sealed under A's old keys, and from an
    // older epoch, the recording opens under nothing B now holds.
    recorded
        .iter()
        .for_each(|d| b.handle_datagram(now, addr(1000), d));
    assert!(chat_received(&mut b).is_empty(), "the replay is refused");
    a.send_chat(now, 2, "after").unwrap();
    exchange((&mut a, addr(1000)), (&mut b, addr(2000)), &mut now, 3);
    let got: Vec<String> = chat_received(&mut b).into_iter().map(|m| m.text).collect();
    assert_eq!(got, ["after"]);
    recorded
        .iter()
        .for_each(|d| b.handle_datagram(now, addr(1000), d));
    assert!(chat_received(&mut b).is_empty(), "and refused again later");
}

#[test]
fn blank_and_overlong_chat_is_refused_before_anything_is_sent() {
    let (mut a, _b, now) = linked_pair();
    assert_eq!(
        a.send_chat(now, 0, " "),
        Err(crate::voice::net::chat::ChatError::Empty)
    );
    let long = "y".repeat(crate::voice::net::chat::MAX_CHAT_CHARS + 1);
    assert!(matches!(
        a.send_chat(now, 0, &long),
        Err(crate::voice::net::chat::ChatError::TooLong { .. })
    ));
    let mut sent = 0;
    a.drain(now, |_, d| {
        sent += usize::from(d[0] == DatagramKind::Chat.type_byte())
    });
    assert_eq!(sent, 0);
}

/// The engine's whole output for `frames` 20 ms frames with nobody talking.
fn playout(e: &mut VoiceEngine, now: Duration, frames: usize) -> Vec<f32> {
    let mut out = vec![0.0; 960 * frames];
    e.playout_frame(now, &mut out);
    out
}

/// Issue 14 item 6: a member joining is heard as the join sound in our output, the same
/// samples as the shipped file (the output path the call already uses, no second device);
/// leaving and muting have their own; with sounds off (the default: headless, tests) the
/// output stays silent.
#[test]
fn a_member_joining_plays_the_join_sound_into_the_output() {
    use crate::voice::rx::cues::{Cue, CueSounds};
    let sounds = CueSounds::embedded();
    let mut e = engine(1);
    e.upsert_peer(ms(0), &peer(2, 2000, [7; 32]));
    assert!(
        playout(&mut e, ms(0), 20).iter().all(|&s| s == 0.0),
        "sounds are off by default"
    );

    e.apply(ms(0), VoiceSetting::Sounds(true));
    assert!(e.snapshot(ms(0)).sounds);
    e.upsert_peer(ms(0), &peer(3, 3000, [8; 32]));
    let join = sounds.get(Cue::Join);
    let out = playout(&mut e, ms(0), 20);
    assert!(out.len() > join.len());
    for (i, (&o, &s)) in out.iter().zip(join).enumerate() {
        assert!((o - s).abs() < 1e-6, "sample {i}: {o} vs {s}");
    }
    assert!(out[join.len()..].iter().all(|&s| s == 0.0), "played once");

    // A re-announcement (a new voice key) of a known member is not a join.
    e.upsert_peer(ms(0), &peer(3, 3000, [9; 32]));
    assert!(playout(&mut e, ms(0), 20).iter().all(|&s| s == 0.0));

    e.remove_peer(3);
    let out = playout(&mut e, ms(0), 20);
    assert!((out[2000] - sounds.get(Cue::Leave)[2000]).abs() < 1e-6);

    e.set_muted(true);
    let out = playout(&mut e, ms(0), 20);
    assert!((out[1000] - sounds.get(Cue::Mute)[1000]).abs() < 1e-6);
    e.set_muted(true);
    assert!(
        playout(&mut e, ms(0), 20).iter().all(|&s| s == 0.0),
        "muting again is no change, no sound"
    );
    e.set_muted(false);
    let out = playout(&mut e, ms(0), 20);
    assert!((out[1000] - sounds.get(Cue::Unmute)[1000]).abs() < 1e-6);

    // We leave the channel: the leave sound too.
    e.clear_peers();
    let out = playout(&mut e, ms(0), 20);
    assert!((out[2000] - sounds.get(Cue::Leave)[2000]).abs() < 1e-6);

    e.apply(ms(0), VoiceSetting::Sounds(false));
    e.upsert_peer(ms(0), &peer(4, 4000, [10; 32]));
    assert!(
        playout(&mut e, ms(0), 20).iter().all(|&s| s == 0.0),
        "turned off"
    );
}

/// The "you are muted" hint: the voice detector keeps listening while muted, and the
/// snapshot says we talk into a muted microphone, for a moment after the last word, and not
/// once unmuted (or while silent).
#[test]
fn talking_while_muted_is_reported_for_the_hint_and_nothing_is_sent() {
    let mut e = engine(1);
    e.upsert_peer(ms(0), &peer(2, 2000, [7; 32]));
    let mut now = ms(0);
    let silence = vec![0.0; 960];
    for _ in 0..20 {
        e.capture(now, &silence, |_, _| {});
        now += ms(20);
    }
    e.set_muted(true);
    assert!(!e.snapshot(now).talking_while_muted, "silent: no hint");
    let voice = tone_frame(300.0);
    let mut sent_voice = 0;
    for _ in 0..25 {
        e.capture(now, &voice, |_, d| {
            if matches!(Datagram::parse(d), Ok(Datagram::Voice { .. })) {
                sent_voice += 1;
            }
        });
        now += ms(20);
    }
    assert_eq!(sent_voice, 0, "muted: nothing sent");
    assert!(e.snapshot(now).talking_while_muted);
    assert!(e.snapshot(now + ms(1000)).talking_while_muted, "held");
    assert!(!e.snapshot(now + ms(2000)).talking_while_muted, "then gone");
    e.set_muted(false);
    assert!(!e.snapshot(now).talking_while_muted, "unmuted: no hint");
}

/// Root mean square of `x` (the test tone restarts its phase every frame, which a Goertzel
/// filter over several frames would read as a much weaker tone).
fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt()
}

/// Captures `frames` frames of a 440 Hz tone, playing out between them; returns what played.
fn speak_and_listen(e: &mut VoiceEngine, now: &mut Duration, frames: usize) -> Vec<f32> {
    let mut played = Vec::new();
    let mut mix = vec![0.0f32; 960];
    for _ in 0..frames {
        e.handle_capture(*now, &tone_frame(440.0));
        e.playout_frame(*now, &mut mix);
        played.extend_from_slice(&mix);
        *now += ms(20);
    }
    played
}

/// The microphone test plays back what the others would hear, before any call (the engine
/// has no channel here), and nothing once it is off again.
#[test]
fn the_microphone_test_plays_your_voice_back_out_of_a_call_and_stops_when_off() {
    // Short runs: the voice detector takes a tone that goes on for seconds for background
    // noise, and the test then (rightly) plays silence.
    let mut e = engine(1);
    let mut now = Duration::ZERO;
    let off = speak_and_listen(&mut e, &mut now, 20);
    assert!(rms(&off) < 0.01, "heard itself with the test off");
    e.apply(now, VoiceSetting::MicTest(true));
    assert!(e.mic_test());
    let on = speak_and_listen(&mut e, &mut now, 40);
    let level = rms(&on[10 * 960..]);
    assert!(level > 0.1, "the test plays back only {level}");
    e.apply(now, VoiceSetting::MicTest(false));
    let after = speak_and_listen(&mut e, &mut now, 20);
    assert!(
        rms(&after[5 * 960..]) < 0.01,
        "still heard itself after the test stopped"
    );
}

/// Muted, the test plays silence: you hear what the others hear, which is nothing.
#[test]
fn the_microphone_test_is_silent_while_muted() {
    let mut e = engine(1);
    let mut now = Duration::ZERO;
    e.apply(now, VoiceSetting::MicTest(true));
    e.apply(now, VoiceSetting::Muted(true));
    let played = speak_and_listen(&mut e, &mut now, 100);
    assert!(rms(&played) < 0.01);
}

/// Runs the echo test through the engine and the real echo canceller, with a made-up room
/// between what the engine plays and what it captures: the direct sound after 60 ms at
/// `coupling`, three weaker reflections, and a faint steady hiss.
fn echo_test_in_a_room(echo_cancel: bool, coupling: f32) -> crate::voice::EchoTestResult {
    use crate::voice::EchoTestStatus;
    let mut cfg = VoiceConfig::default();
    cfg.capture.denoise = false;
    cfg.capture.processing = crate::voice::tx::ProcessingConfig {
        echo_cancel,
        ..crate::voice::tx::ProcessingConfig::NONE
    };
    let mut e = VoiceEngine::new(cfg, 1).unwrap();
    let taps = [
        (2_880usize, 1.0f32),
        (3_400, 0.4),
        (4_100, 0.2),
        (5_300, 0.1),
    ];
    let mut played: Vec<f32> = vec![0.0; 6_000];
    let mut mix = vec![0.0f32; 960];
    let mut mic = vec![0.0f32; 960];
    let mut hiss = 12_345u32;
    let mut now = Duration::ZERO;
    e.apply(now, VoiceSetting::EchoTest(true));
    for _ in 0..500 {
        e.playout_frame(now, &mut mix);
        played.extend_from_slice(&mix);
        let start = played.len() - 960;
        for (i, m) in mic.iter_mut().enumerate() {
            let echo: f32 = taps.iter().map(|&(d, g)| g * played[start + i - d]).sum();
            hiss ^= hiss << 13;
            hiss ^= hiss >> 17;
            hiss ^= hiss << 5;
            let noise = (hiss as f32 / u32::MAX as f32 - 0.5) * 0.002;
            *m = coupling * echo + noise;
        }
        e.handle_capture(now, &mic);
        now += ms(20);
        if let Some(EchoTestStatus::Done(r)) = e.snapshot(now).echo_test {
            return r;
        }
    }
    panic!("the echo test did not finish in 10 s");
}

/// The echo test tells the three rooms apart: speakers the microphone hears, with the echo
/// canceller on and off, and headphones (nothing reaches the microphone).
#[test]
fn the_echo_test_measures_what_the_canceller_takes_out_of_a_room() {
    use crate::voice::EchoVerdict;
    let on = echo_test_in_a_room(true, 0.3);
    assert_eq!(on.verdict, EchoVerdict::Cancelled, "{on:?}");
    assert!(on.removed_db() >= 20.0, "{on:?}");
    assert!((-14.0..-4.0).contains(&on.coupling_db()), "{on:?}");

    let off = echo_test_in_a_room(false, 0.3);
    assert_eq!(off.verdict, EchoVerdict::Remains, "{off:?}");
    assert!(off.removed_db().abs() < 1.0, "{off:?}");
    assert!(!off.echo_cancellation);

    let headphones = echo_test_in_a_room(true, 0.0);
    assert_eq!(headphones.verdict, EchoVerdict::NoEcho, "{headphones:?}");
}

/// Starting the echo test stops the microphone test (hearing yourself would count as echo),
/// and the other way round.
#[test]
fn the_echo_test_and_the_microphone_test_exclude_each_other() {
    use crate::voice::EchoTestStatus;
    let mut e = engine(1);
    e.apply(ms(0), VoiceSetting::MicTest(true));
    e.apply(ms(0), VoiceSetting::EchoTest(true));
    assert!(!e.mic_test());
    assert!(matches!(e.echo_test(), Some(EchoTestStatus::Running(_))));
    e.apply(ms(0), VoiceSetting::MicTest(true));
    assert!(e.mic_test());
    assert_eq!(e.echo_test(), None);
}
