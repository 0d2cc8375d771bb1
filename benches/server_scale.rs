//! Metadata-server scale harness (not a criterion bench).
//!
//! Starts the real `p2p-voice server` binary, opens N control connections (TLS, as real clients
//! do) from this one process (non-blocking sockets in one `mio::Poll`), walks each through
//! Hello -> Welcome -> Identify -> Identified/Overview -> Join, then churns channel membership at
//! a fixed rate for a fixed time: a random client sends `Leave` then `Join` to another channel,
//! and the latency sample is the time from sending that `Join` until the *observer* client of the
//! destination channel (one fixed member per channel) receives the matching `MemberJoined`.
//! A second figure times the same join as seen from the observer of a channel halfway round
//! (lobby-wide presence, which the server batches; see `src/server/fanout.rs`).
//!
//! Every socket is drained and decrypted continuously (each join/leave is broadcast to every
//! identified session and the server drops clients that fall 1 MiB behind). Only frames somebody
//! cares about are decoded: observers, clients still in their handshake, and clients waiting for
//! a `Joined`; everything else is skipped by its length prefix. Every client sends a `Heartbeat`
//! every 4 s (spread evenly), as real clients do.
//!
//! `cargo bench --bench server_scale` runs the full measurement. Environment:
//! `P2P_VOICE_SCALE_N` (clients, default 10000), `P2P_VOICE_SCALE_SECS` (churn seconds per rate,
//! default 20), `P2P_VOICE_SCALE_RATE` (ops/s, default 50; a comma list such as `5,10,25` runs
//! one phase per rate on the same connected clients), `P2P_VOICE_SCALE_CHANNELS` (default
//! N/10 clamped to 2..=100), `P2P_VOICE_SCALE_BATCH` (connections in their handshake at once,
//! default 256), `P2P_VOICE_SCALE_SEED`. Run without `--bench` (as `cargo test --all-targets`
//! does) it runs a small smoke version (50 clients, 2 s at 20 ops/s) and asserts that every join
//! was observed, so CI exercises the harness cheaply.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use p2p_voice::protocol::{
    encode_frame, ClientMsg, FrameDecoder, ServerMsg, Status, UserId, APP_VERSION, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How often each client sends a `Heartbeat` (the protocol asks for every 4 s; the server drops
/// sessions silent for 15 s). Heartbeats are spread evenly over the interval.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(4);

/// Upper bound on one `poll` wait, so heartbeats and churn ticks stay on time.
const MAX_POLL_WAIT: Duration = Duration::from_millis(5);

/// What to run; read from the environment in bench mode, fixed in smoke mode.
#[derive(Debug, Clone)]
struct Params {
    smoke: bool,
    clients: usize,
    churn_secs: f64,
    /// One churn phase per rate, in this order, on the same connected clients.
    churn_rates: Vec<f64>,
    channels: usize,
    max_members: u32,
    /// Connections allowed between `connect` and `Joined` at once (protects the listen backlog).
    batch: usize,
    /// Quiet time after setup so the O(N^2) setup broadcasts are drained before measuring.
    settle: Duration,
    /// How long to wait after the churn phase for the last joins to be observed.
    drain: Duration,
    seed: u64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        Err(_) => default,
    }
}

impl Params {
    fn new(bench: bool) -> Self {
        let (clients, churn_secs, churn_rates) = if bench {
            let rates = std::env::var("P2P_VOICE_SCALE_RATE").unwrap_or_else(|_| "50".into());
            let rates: Vec<f64> = rates
                .split(',')
                .map(|r| {
                    r.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("P2P_VOICE_SCALE_RATE: {r:?} is not a number"))
                })
                .collect();
            assert!(
                rates.iter().all(|r| *r > 0.0),
                "churn rates must be positive"
            );
            (
                env_or("P2P_VOICE_SCALE_N", 10_000usize),
                env_or("P2P_VOICE_SCALE_SECS", 20.0f64),
                rates,
            )
        } else {
            (50, 2.0, vec![20.0])
        };
        let default_channels = (clients / 10).clamp(2, 100);
        let channels = if bench {
            env_or("P2P_VOICE_SCALE_CHANNELS", default_channels)
        } else {
            default_channels
        };
        assert!(
            clients > channels,
            "need more clients ({clients}) than channels ({channels}): one observer per channel plus churners"
        );
        let per_channel = clients.div_ceil(channels) as u32;
        Self {
            smoke: !bench,
            clients,
            churn_secs,
            churn_rates,
            channels,
            max_members: (2 * per_channel).max(200),
            batch: if bench {
                env_or("P2P_VOICE_SCALE_BATCH", 256usize)
            } else {
                16
            },
            settle: if bench {
                Duration::from_secs(2)
            } else {
                Duration::from_millis(300)
            },
            drain: Duration::from_secs(5),
            seed: if bench {
                env_or("P2P_VOICE_SCALE_SEED", 1u64)
            } else {
                1
            },
        }
    }
}

/// Warnings and errors the server logged on stderr, kept for the report.
#[derive(Debug, Default)]
struct ServerLog {
    lines: u64,
    first: Vec<String>,
}

/// Removes ANSI colour sequences (ESC [ ... letter) from a log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// The server child process. Killed (and its channels file removed) on drop, also on panic.
struct ServerGuard {
    child: Child,
    addr: SocketAddr,
    channels_file: PathBuf,
    /// Throwaway directory for the server's TLS identity.
    data_dir: PathBuf,
    log: Arc<Mutex<ServerLog>>,
}

impl ServerGuard {
    fn start(params: &Params) -> Self {
        let channels_file = std::env::temp_dir().join(format!(
            "p2p-voice-scale-{}-channels.toml",
            std::process::id()
        ));
        let mut toml = String::new();
        for c in 0..params.channels {
            toml.push_str(&format!(
                "[[channel]]\nname = \"{}\"\nmax_members = {}\n\n",
                channel_name(c),
                params.max_members
            ));
        }
        // All simulated clients come from 127.0.0.1 and connect at once: lift the per-prefix
        // connection rate and handshake caps (the connection cap is lifted below).
        toml.push_str(
            "[limits]\nnew_connections_per_sec = 1e9\nnew_connections_burst = 1e9\n\
             max_handshakes_per_prefix = 1000000\nmax_handshakes = 1000000\n",
        );
        std::fs::write(&channels_file, toml).expect("write channels file");
        let data_dir = std::env::temp_dir().join(format!(
            "p2p-voice-scale-{}-server-data",
            std::process::id()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_p2p-voice"))
            .args(["server", "--bind", "127.0.0.1", "--port", "0", "--json"])
            .arg("--channels")
            .arg(&channels_file)
            .arg("--data-dir")
            .arg(&data_dir)
            // All simulated clients come from 127.0.0.1; lift the per-IP cap above N.
            .arg("--max-connections-per-ip")
            .arg((params.clients + 64).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start p2p-voice server");
        let log = Arc::new(Mutex::new(ServerLog::default()));
        let stderr = child.stderr.take().expect("server stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if !(line.contains(" WARN ") || line.contains(" ERROR ")) {
                    continue;
                }
                let mut log = sink.lock().expect("server log lock");
                log.lines += 1;
                if log.first.len() < 5 {
                    log.first.push(line);
                }
            }
        });
        let stdout = child.stdout.take().expect("server stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut guard = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            channels_file,
            data_dir,
            log,
        };
        let line = match lines.next() {
            Some(Ok(line)) => line,
            other => panic!(
                "server did not announce its address ({other:?}); its log: {:?}",
                guard
                    .log
                    .lock()
                    .map(|l| l.first.clone())
                    .unwrap_or_default()
            ),
        };
        let v: serde_json::Value = serde_json::from_str(&line).expect("listening line is JSON");
        guard.addr = v["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line}"));
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        guard
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if the server already died.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.channels_file);
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

fn channel_name(c: usize) -> String {
    format!("scale-{c:03}")
}

/// Raises this process's soft open-file limit to the hard limit; returns (before, after).
fn raise_fd_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (0, 0);
        }
        let before = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return (before, before);
        }
        (before, lim.rlim_cur)
    }
}

/// Soft "Max open files" of another process, from /proc/<pid>/limits.
fn process_fd_limit(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of a process (all its threads), in seconds.
fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        return None;
    }
    Some((utime + stime) as f64 / ticks as f64)
}

/// Time all threads of a process spent waiting on a run queue (runnable but not running), in
/// seconds, from /proc/<pid>/task/*/schedstat. A high share means the process was starved of CPU
/// by others rather than limited by its own work.
fn process_runqueue_wait_secs(pid: u32) -> Option<f64> {
    let mut total_ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total_ns += text
            .split_whitespace()
            .nth(1)
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total_ns as f64 / 1e9)
}

/// The 1-minute load average, to show how busy the (shared) machine was.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU time (user + system) this harness process has used, in seconds.
fn own_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    AwaitWelcome,
    AwaitIdentified,
    AwaitJoined,
    Ready,
    Dead,
}

/// One simulated client: its socket and TLS session, where it is in the protocol, and a frame
/// splitter that skips frames nobody needs without decoding them.
struct Client {
    stream: TcpStream,
    /// The control connection is TLS; plaintext frames go through this.
    tls: rustls::ClientConnection,
    phase: Phase,
    user_id: UserId,
    /// Channel the client is in (or is joining during setup).
    channel: usize,
    /// Set for the one fixed member of each channel that timestamps `MemberJoined`.
    observer_of: Option<usize>,
    /// Destination of a churn `Join` whose `Joined` has not arrived yet.
    churn_dest: Option<usize>,
    overview: OverviewSeen,
    hdr: [u8; 4],
    hdr_len: usize,
    body_left: usize,
    decoding: bool,
    frame: Vec<u8>,
}

/// Whether the `Overview` that follows `Identified` arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OverviewSeen {
    No,
    Decoded,
    /// Arrived, but the protocol's own decoder refuses it (a real client would disconnect).
    Undecodable,
}

/// First body byte of an encoded `ServerMsg::Overview` (bincode's variant index).
fn overview_tag() -> u8 {
    static TAG: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *TAG.get_or_init(|| {
        encode_frame(&ServerMsg::Overview { channels: vec![] }).expect("encodes")[4]
    })
}

impl Client {
    fn wants_decode(&self) -> bool {
        self.observer_of.is_some() || self.phase != Phase::Ready || self.churn_dest.is_some()
    }
}

/// Feeds received bytes through the client's frame splitter; decodes the frames it wants.
fn split_frames(
    c: &mut Client,
    mut data: &[u8],
    decoder: &mut FrameDecoder,
    out: &mut Vec<ServerMsg>,
    counters: &mut Counters,
) -> Result<(), String> {
    while !data.is_empty() {
        if c.body_left == 0 {
            let take = (4 - c.hdr_len).min(data.len());
            c.hdr[c.hdr_len..c.hdr_len + take].copy_from_slice(&data[..take]);
            c.hdr_len += take;
            data = &data[take..];
            if c.hdr_len < 4 {
                break;
            }
            let len = u32::from_be_bytes(c.hdr) as usize;
            if len == 0 || len > MAX_FRAME_LEN {
                return Err(format!("server sent a frame header of {len} bytes"));
            }
            c.body_left = len;
            c.decoding = c.wants_decode();
            if c.decoding {
                c.frame.clear();
                c.frame.extend_from_slice(&c.hdr);
            }
            continue;
        }
        let take = c.body_left.min(data.len());
        if c.decoding {
            c.frame.extend_from_slice(&data[..take]);
        }
        c.body_left -= take;
        data = &data[take..];
        if c.body_left == 0 {
            c.hdr_len = 0;
            if c.decoding {
                decoder.push(&c.frame);
                match decoder.next::<ServerMsg>() {
                    Ok(Some(msg)) => out.push(msg),
                    Ok(None) => return Err("complete frame did not decode".into()),
                    Err(e) => {
                        // What a real client's FrameDecoder would do with this frame: it would
                        // drop the connection. Count it, note which message it was, go on.
                        *decoder = FrameDecoder::new();
                        counters.decode_errors += 1;
                        let tag = c.frame.get(4).copied();
                        if tag == Some(overview_tag()) {
                            c.overview = OverviewSeen::Undecodable;
                        }
                        counters.problem(format!(
                            "frame of {} bytes (variant tag {tag:?}) does not decode: {e}",
                            c.frame.len() - 4
                        ));
                    }
                }
                counters.frames_decoded += 1;
            } else {
                counters.frames_skipped += 1;
            }
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Counters {
    bytes_in: u64,
    frames_decoded: u64,
    frames_skipped: u64,
    ready: usize,
    in_flight: usize,
    dead: usize,
    overview_missing: usize,
    overview_undecodable: usize,
    decode_errors: u64,
    join_refused: u64,
    server_errors: u64,
    /// First few reasons why the server closed or refused something.
    problems: Vec<String>,
}

impl Counters {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 8 {
            self.problems.push(text);
        }
    }
}

/// All clients in one poll loop.
struct Harness {
    params: Params,
    addr: SocketAddr,
    poll: Poll,
    events: Events,
    clients: Vec<Client>,
    decoder: FrameDecoder,
    tls_config: Arc<rustls::ClientConfig>,
    /// Ciphertext as read from a socket.
    raw: Vec<u8>,
    /// Plaintext out of TLS.
    scratch: Vec<u8>,
    decoded: Vec<ServerMsg>,
    ready_tokens: Vec<usize>,
    channel_names: Vec<String>,
    user_to_client: HashMap<UserId, usize>,
    /// Churned users whose `MemberJoined` has not been observed: (Join sent at, destination).
    pending: HashMap<UserId, (Instant, usize)>,
    samples: Vec<Duration>,
    /// The same joins as seen from a channel the user neither left nor joined (lobby-wide
    /// presence, which the server batches): (Join sent at, destination, watching channel).
    pending_far: HashMap<UserId, (Instant, usize, usize)>,
    far_samples: Vec<Duration>,
    counters: Counters,
    hb_start: Instant,
    hb_sent: u64,
    rng: StdRng,
}

impl Harness {
    fn new(params: Params, addr: SocketAddr) -> Self {
        let channel_names = (0..params.channels).map(channel_name).collect();
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            addr,
            poll: Poll::new().expect("create poll"),
            events: Events::with_capacity(4096),
            clients: Vec::with_capacity(params.clients),
            decoder: FrameDecoder::new(),
            tls_config: p2p_voice::tls::client_config(),
            raw: vec![0u8; 64 * 1024],
            scratch: vec![0u8; 64 * 1024],
            decoded: Vec::new(),
            ready_tokens: Vec::new(),
            channel_names,
            user_to_client: HashMap::new(),
            pending: HashMap::new(),
            samples: Vec::new(),
            pending_far: HashMap::new(),
            far_samples: Vec::new(),
            counters: Counters::default(),
            hb_start: Instant::now(),
            hb_sent: 0,
            rng,
            params,
        }
    }

    /// Starts connections until `batch` are in their handshake or all N exist.
    fn connect_more(&mut self) {
        while self.clients.len() < self.params.clients
            && self.counters.in_flight < self.params.batch
        {
            let i = self.clients.len();
            let mut stream = TcpStream::connect(self.addr)
                .unwrap_or_else(|e| panic!("connect #{i} to {}: {e}", self.addr));
            self.poll
                .registry()
                .register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .unwrap_or_else(|e| panic!("register client #{i}: {e}"));
            let channel = i % self.params.channels;
            let tls = rustls::ClientConnection::new(
                Arc::clone(&self.tls_config),
                p2p_voice::tls::server_name("127.0.0.1"),
            )
            .expect("TLS client session");
            self.clients.push(Client {
                stream,
                tls,
                phase: Phase::Connecting,
                user_id: 0,
                channel,
                observer_of: (i < self.params.channels).then_some(channel),
                churn_dest: None,
                overview: OverviewSeen::No,
                hdr: [0; 4],
                hdr_len: 0,
                body_left: 0,
                decoding: false,
                frame: Vec::new(),
            });
            self.counters.in_flight += 1;
        }
    }

    /// Queues a message in the client's TLS session (buffered by rustls until the handshake is
    /// done) and writes what can be written.
    fn send(&mut self, i: usize, msg: &ClientMsg) {
        let frame = encode_frame(msg).expect("client message encodes");
        let c = &mut self.clients[i];
        if c.phase == Phase::Dead {
            return;
        }
        if let Err(e) = c.tls.writer().write_all(&frame) {
            self.kill(i, format!("TLS writer refused a frame: {e}"));
            return;
        }
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.clients[i];
        while c.tls.wants_write() {
            match c.tls.write_tls(&mut c.stream) {
                Ok(0) => {
                    self.kill(i, "write returned 0".into());
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.kill(i, format!("write error: {e}"));
                    return;
                }
            }
        }
    }

    fn kill(&mut self, i: usize, why: String) {
        let c = &mut self.clients[i];
        if c.phase == Phase::Dead {
            return;
        }
        if c.phase != Phase::Ready {
            self.counters.in_flight = self.counters.in_flight.saturating_sub(1);
        }
        c.phase = Phase::Dead;
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.counters.dead += 1;
        self.counters.problem(format!("client #{i} lost: {why}"));
    }

    /// Sends the next `Heartbeat`s so that every client sends one per interval.
    fn heartbeats(&mut self) {
        let n = self.clients.len().max(1) as f64;
        let due =
            (self.hb_start.elapsed().as_secs_f64() / HEARTBEAT_INTERVAL.as_secs_f64() * n) as u64;
        while self.hb_sent < due {
            let i = (self.hb_sent % self.clients.len().max(1) as u64) as usize;
            self.hb_sent += 1;
            if i < self.clients.len()
                && !matches!(
                    self.clients[i].phase,
                    Phase::Connecting | Phase::AwaitWelcome | Phase::Dead
                )
            {
                self.send(i, &ClientMsg::Heartbeat);
            }
        }
    }

    /// Waits up to `timeout` for socket events and handles them. Observers are served first in
    /// each batch so their timestamps are not inflated by the harness reading other sockets.
    fn pump(&mut self, timeout: Duration) {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                panic!("poll failed: {e}");
            }
        }
        self.ready_tokens.clear();
        self.ready_tokens
            .extend(self.events.iter().map(|e| e.token().0));
        let tokens = std::mem::take(&mut self.ready_tokens);
        for pass_observers in [true, false] {
            for &i in &tokens {
                if self.clients[i].observer_of.is_some() == pass_observers {
                    self.service(i);
                }
            }
        }
        self.ready_tokens = tokens;
    }

    fn service(&mut self, i: usize) {
        if self.clients[i].phase == Phase::Connecting && !self.finish_connect(i) {
            return;
        }
        if self.clients[i].phase == Phase::Dead {
            return;
        }
        self.read(i);
        // Reading may complete the handshake (releasing buffered frames) or produce TLS replies.
        if self.clients[i].phase != Phase::Dead && self.clients[i].tls.wants_write() {
            self.flush(i);
        }
    }

    /// Completes a non-blocking connect; true once connected (Hello sent).
    fn finish_connect(&mut self, i: usize) -> bool {
        let c = &mut self.clients[i];
        match c.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                self.kill(i, format!("connect failed: {e}"));
                return false;
            }
        }
        match c.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return false,
            Err(e) => {
                self.kill(i, format!("connect failed: {e}"));
                return false;
            }
        }
        let _ = c.stream.set_nodelay(true);
        c.phase = Phase::AwaitWelcome;
        self.send(
            i,
            &ClientMsg::Hello {
                protocol_version: PROTOCOL_VERSION,
                app_version: APP_VERSION.into(),
            },
        );
        true
    }

    /// Reads the socket until it is empty: ciphertext into `raw`, through TLS into plaintext,
    /// plaintext through the frame splitter.
    fn read(&mut self, i: usize) {
        let mut decoded = std::mem::take(&mut self.decoded);
        let mut raw = std::mem::take(&mut self.raw);
        'socket: loop {
            let c = &mut self.clients[i];
            let n = match c.stream.read(&mut raw) {
                Ok(0) => {
                    self.kill(i, "server closed the connection".into());
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.kill(i, format!("read error: {e}"));
                    break;
                }
            };
            let now = Instant::now();
            self.counters.bytes_in += n as u64;
            let mut cipher = &raw[..n];
            while !cipher.is_empty() {
                let c = &mut self.clients[i];
                if let Err(e) = c.tls.read_tls(&mut cipher) {
                    self.kill(i, format!("TLS read: {e}"));
                    break 'socket;
                }
                if let Err(e) = c.tls.process_new_packets() {
                    self.kill(i, format!("TLS error: {e}"));
                    break 'socket;
                }
                loop {
                    let c = &mut self.clients[i];
                    let m = match c.tls.reader().read(&mut self.scratch) {
                        Ok(0) => {
                            self.kill(i, "server ended the TLS session".into());
                            break 'socket;
                        }
                        Ok(m) => m,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            self.kill(i, format!("TLS read: {e}"));
                            break 'socket;
                        }
                    };
                    if let Err(e) = split_frames(
                        c,
                        &self.scratch[..m],
                        &mut self.decoder,
                        &mut decoded,
                        &mut self.counters,
                    ) {
                        panic!("client #{i}: {e}");
                    }
                    for msg in decoded.drain(..) {
                        self.handle(i, msg, now);
                    }
                    if self.clients[i].phase == Phase::Dead {
                        break 'socket;
                    }
                }
            }
            // A short read emptied the socket: with edge-triggered readiness any later data
            // raises a new event, so the extra read that would return WouldBlock is skipped.
            if n < raw.len() {
                break;
            }
        }
        self.raw = raw;
        decoded.clear();
        self.decoded = decoded;
    }

    fn handle(&mut self, i: usize, msg: ServerMsg, now: Instant) {
        let phase = self.clients[i].phase;
        match msg {
            ServerMsg::Welcome { .. } if phase == Phase::AwaitWelcome => {
                self.clients[i].phase = Phase::AwaitIdentified;
                self.send(
                    i,
                    &ClientMsg::Identify {
                        username: format!("scale{i}"),
                    },
                );
            }
            ServerMsg::Identified {
                status, user_id, ..
            } if phase == Phase::AwaitIdentified => {
                let Some(user_id) = user_id.filter(|_| status == Status::Ok) else {
                    panic!("client #{i} not identified: {status:?}");
                };
                let c = &mut self.clients[i];
                c.user_id = user_id;
                c.phase = Phase::AwaitJoined;
                let channel = self.channel_names[c.channel].clone();
                self.user_to_client.insert(user_id, i);
                self.send(
                    i,
                    &ClientMsg::Join {
                        channel,
                        password: None,
                    },
                );
            }
            ServerMsg::Overview { .. } => self.clients[i].overview = OverviewSeen::Decoded,
            ServerMsg::Joined { status, channel } => match phase {
                Phase::AwaitJoined => {
                    assert_eq!(status, Status::Ok, "client #{i} could not join {channel}");
                    let c = &mut self.clients[i];
                    c.phase = Phase::Ready;
                    match c.overview {
                        OverviewSeen::No => self.counters.overview_missing += 1,
                        OverviewSeen::Undecodable => self.counters.overview_undecodable += 1,
                        OverviewSeen::Decoded => {}
                    }
                    if c.observer_of.is_none() {
                        c.frame = Vec::new();
                    }
                    self.counters.ready += 1;
                    self.counters.in_flight -= 1;
                }
                Phase::Ready => {
                    let c = &mut self.clients[i];
                    if let Some(dest) = c.churn_dest.take() {
                        if status == Status::Ok {
                            c.channel = dest;
                        } else {
                            let user = c.user_id;
                            self.counters.join_refused += 1;
                            self.pending.remove(&user);
                            self.counters
                                .problem(format!("churn join to {channel} refused: {status:?}"));
                        }
                        c.frame = Vec::new();
                    }
                }
                _ => {}
            },
            ServerMsg::MemberJoined { channel, member } => {
                let Some(obs) = self.clients[i].observer_of else {
                    return;
                };
                if let Some(&(sent, dest, far)) = self.pending_far.get(&member.user_id) {
                    if far == obs && channel == self.channel_names[dest] {
                        self.pending_far.remove(&member.user_id);
                        self.far_samples.push(now.duration_since(sent));
                    }
                }
                if channel != self.channel_names[obs] {
                    return;
                }
                if let Some(&(sent, dest)) = self.pending.get(&member.user_id) {
                    if dest == obs {
                        self.pending.remove(&member.user_id);
                        self.samples.push(now.duration_since(sent));
                    }
                }
            }
            ServerMsg::Error { status, message } => {
                self.counters.server_errors += 1;
                self.counters
                    .problem(format!("server error to #{i}: {status:?}: {message}"));
            }
            ServerMsg::Closing { reason } => {
                self.counters
                    .problem(format!("server closing #{i}: {reason}"));
            }
            _ => {}
        }
    }

    /// One churn operation: a random non-observer with nothing pending leaves its channel and
    /// joins another. Returns false if no such client was found.
    fn churn_once(&mut self) -> bool {
        let n = self.clients.len();
        let first_churner = self.params.channels;
        for _ in 0..32 {
            let i = self.rng.gen_range(first_churner..n);
            let c = &self.clients[i];
            if c.phase != Phase::Ready
                || c.churn_dest.is_some()
                || self.pending.contains_key(&c.user_id)
                || self.pending_far.contains_key(&c.user_id)
            {
                continue;
            }
            let mut dest = self.rng.gen_range(0..self.params.channels - 1);
            if dest >= c.channel {
                dest += 1;
            }
            let user = c.user_id;
            let channel = self.channel_names[dest].clone();
            self.clients[i].churn_dest = Some(dest);
            self.send(i, &ClientMsg::Leave);
            let sent = Instant::now();
            self.send(
                i,
                &ClientMsg::Join {
                    channel,
                    password: None,
                },
            );
            self.pending.insert(user, (sent, dest));
            let far = (dest + self.params.channels / 2) % self.params.channels;
            if far != dest {
                self.pending_far.insert(user, (sent, dest, far));
            }
            return true;
        }
        false
    }
}

/// Nearest-rank percentile of sorted samples, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

/// Everything one run measured.
#[derive(Debug)]
struct Report {
    clients: usize,
    channels: usize,
    target_rate: f64,
    achieved_rate: f64,
    ops: u64,
    samples: usize,
    unobserved: usize,
    join_refused: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Lobby-wide presence: join to `MemberJoined` at a member of an unrelated channel.
    far_samples: usize,
    far_unobserved: usize,
    far_p50_ms: f64,
    far_p99_ms: f64,
    far_max_ms: f64,
    server_cpu_pct: f64,
    harness_cpu_pct: f64,
    server_wait_pct: f64,
    harness_wait_pct: f64,
    load: (f64, f64),
    server_setup_cpu_pct: f64,
    setup_secs: f64,
    churn_secs: f64,
    dead_clients: usize,
    overview_missing: usize,
    overview_undecodable: usize,
    decode_errors: u64,
    server_fd_soft_limit: Option<u64>,
    harness_fd_limit: (u64, u64),
    bytes_in: u64,
    frames_decoded: u64,
    frames_skipped: u64,
    server_log_lines: u64,
    server_log_first: Vec<String>,
    problems: Vec<String>,
}

fn run(params: Params) -> Vec<Report> {
    let mut server = ServerGuard::start(&params);
    // The server is started first so it runs with the limit it would get from this shell.
    let harness_fd_limit = raise_fd_limit();
    let server_fd_soft_limit = process_fd_limit(server.pid());
    if let Some(limit) = server_fd_soft_limit {
        if limit < params.clients as u64 + 64 {
            eprintln!(
                "WARNING: the server's soft open-file limit is {limit}, below the {} clients of this run",
                params.clients
            );
        }
    }
    assert!(
        harness_fd_limit.1 >= params.clients as u64 + 64,
        "this process may open only {} files; {} clients need more (raise the hard limit)",
        harness_fd_limit.1,
        params.clients
    );

    let mut h = Harness::new(params.clone(), server.addr);
    let pid = server.pid();

    // Setup: connect in batches and walk every client into its channel.
    let setup_deadline =
        Duration::from_secs(60) + Duration::from_millis(20) * params.clients as u32;
    let setup_cpu0 = process_cpu_secs(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    let mut last_progress = t0;
    while h.counters.ready < params.clients {
        h.connect_more();
        h.heartbeats();
        h.pump(MAX_POLL_WAIT);
        if h.counters.dead > 0 {
            panic!(
                "setup: {} clients lost after {} ready: {:?}",
                h.counters.dead, h.counters.ready, h.counters.problems
            );
        }
        if let Some(status) = server.exited() {
            panic!("server exited during setup: {status}");
        }
        assert!(
            t0.elapsed() < setup_deadline,
            "setup did not finish in {setup_deadline:?}: {} of {} clients ready",
            h.counters.ready,
            params.clients
        );
        if !params.smoke && last_progress.elapsed() > Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "  setup: {} / {} clients ready after {:.1} s",
                h.counters.ready,
                params.clients,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let setup = t0.elapsed();
    let server_setup_cpu_pct =
        (process_cpu_secs(pid).unwrap_or(0.0) - setup_cpu0) / setup.as_secs_f64() * 100.0;

    let mut reports = Vec::new();
    for &rate in &params.churn_rates {
        // Let the setup broadcasts (O(N^2) bytes), or the previous phase's backlog, drain first.
        let settle_end = Instant::now() + params.settle;
        while Instant::now() < settle_end {
            h.heartbeats();
            h.pump(MAX_POLL_WAIT);
        }

        // Churn at a fixed rate for a fixed time.
        if !params.smoke {
            eprintln!(
                "  setup done in {:.1} s; churning at {} ops/s for {} s",
                setup.as_secs_f64(),
                rate,
                params.churn_secs
            );
        }
        let cpu0 = process_cpu_secs(pid).unwrap_or(0.0);
        let own0 = own_cpu_secs();
        let wait0 = process_runqueue_wait_secs(pid).unwrap_or(0.0);
        let own_wait0 = process_runqueue_wait_secs(std::process::id()).unwrap_or(0.0);
        let load_before = load_average();
        h.samples.clear();
        h.far_samples.clear();
        let refused0 = h.counters.join_refused;
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(params.churn_secs);
        let period = Duration::from_secs_f64(1.0 / rate);
        let mut next_op = start;
        let mut ops = 0u64;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            while next_op <= now && next_op < end {
                if h.churn_once() {
                    ops += 1;
                }
                next_op += period;
            }
            h.heartbeats();
            let wait = next_op
                .min(end)
                .saturating_duration_since(Instant::now())
                .min(MAX_POLL_WAIT);
            h.pump(wait);
        }
        let churn = start.elapsed();
        let server_cpu_pct =
            (process_cpu_secs(pid).unwrap_or(0.0) - cpu0) / churn.as_secs_f64() * 100.0;
        let harness_cpu_pct = (own_cpu_secs() - own0) / churn.as_secs_f64() * 100.0;
        let server_wait_pct =
            (process_runqueue_wait_secs(pid).unwrap_or(0.0) - wait0) / churn.as_secs_f64() * 100.0;
        let harness_wait_pct = (process_runqueue_wait_secs(std::process::id()).unwrap_or(0.0)
            - own_wait0)
            / churn.as_secs_f64()
            * 100.0;
        let load = (load_before, load_average());

        // Wait for the last joins to be observed.
        let drain_end = Instant::now() + params.drain;
        while !(h.pending.is_empty() && h.pending_far.is_empty()) && Instant::now() < drain_end {
            h.heartbeats();
            h.pump(MAX_POLL_WAIT);
        }
        if let Some(status) = server.exited() {
            h.counters
                .problem(format!("server exited during the run: {status}"));
        }

        let mut sorted = h.samples.clone();
        sorted.sort_unstable();
        let mut far = h.far_samples.clone();
        far.sort_unstable();
        let log = server.log.lock().expect("server log lock");
        reports.push(Report {
            clients: params.clients,
            channels: params.channels,
            target_rate: rate,
            achieved_rate: ops as f64 / churn.as_secs_f64(),
            ops,
            samples: sorted.len(),
            unobserved: h.pending.len(),
            join_refused: h.counters.join_refused - refused0,
            p50_ms: percentile_ms(&sorted, 50.0),
            p90_ms: percentile_ms(&sorted, 90.0),
            p99_ms: percentile_ms(&sorted, 99.0),
            max_ms: sorted.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
            far_samples: far.len(),
            far_unobserved: h.pending_far.len(),
            far_p50_ms: percentile_ms(&far, 50.0),
            far_p99_ms: percentile_ms(&far, 99.0),
            far_max_ms: far.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
            server_cpu_pct,
            harness_cpu_pct,
            server_wait_pct,
            harness_wait_pct,
            load,
            server_setup_cpu_pct,
            setup_secs: setup.as_secs_f64(),
            churn_secs: churn.as_secs_f64(),
            dead_clients: h.counters.dead,
            overview_missing: h.counters.overview_missing,
            overview_undecodable: h.counters.overview_undecodable,
            decode_errors: h.counters.decode_errors,
            server_fd_soft_limit,
            harness_fd_limit,
            bytes_in: h.counters.bytes_in,
            frames_decoded: h.counters.frames_decoded,
            frames_skipped: h.counters.frames_skipped,
            server_log_lines: log.lines,
            server_log_first: log.first.clone(),
            problems: h.counters.problems.clone(),
        });
        drop(log);
        // Joins still unobserved belong to this phase; later phases start clean.
        h.pending.clear();
        h.pending_far.clear();
    }
    // Kill the server before the client sockets close, so TIME_WAIT lands on the server side and
    // back-to-back runs do not run out of ephemeral ports.
    drop(server);
    drop(h);
    reports
}

fn print_report(r: &Report) {
    println!(
        "metadata server scale ({} clients, {} channels)",
        r.clients, r.channels
    );
    let rows: [(&str, String); 19] = [
        ("clients (N)", r.clients.to_string()),
        ("setup time for N clients", format!("{:.2} s", r.setup_secs)),
        (
            "server CPU during setup",
            format!("{:.0} % of one core", r.server_setup_cpu_pct),
        ),
        (
            "churn rate target / achieved",
            format!(
                "{:.0} / {:.1} ops/s over {:.1} s",
                r.target_rate, r.achieved_rate, r.churn_secs
            ),
        ),
        (
            "samples / ops",
            format!(
                "{} / {} (unobserved {}, refused {})",
                r.samples, r.ops, r.unobserved, r.join_refused
            ),
        ),
        ("join->MemberJoined p50", format!("{:.2} ms", r.p50_ms)),
        ("join->MemberJoined p90", format!("{:.2} ms", r.p90_ms)),
        ("join->MemberJoined p99", format!("{:.2} ms", r.p99_ms)),
        ("join->MemberJoined max", format!("{:.2} ms", r.max_ms)),
        (
            "same, other channel's view",
            format!(
                "p50 {:.1} / p99 {:.1} / max {:.1} ms ({} samples, unobserved {})",
                r.far_p50_ms, r.far_p99_ms, r.far_max_ms, r.far_samples, r.far_unobserved
            ),
        ),
        (
            "server CPU during churn",
            format!("{:.0} % of one core", r.server_cpu_pct),
        ),
        (
            "harness CPU during churn",
            format!("{:.0} % of one core", r.harness_cpu_pct),
        ),
        (
            "run-queue wait server / harness",
            format!(
                "{:.0} % / {:.0} % (runnable but not running)",
                r.server_wait_pct, r.harness_wait_pct
            ),
        ),
        (
            "load average before / after churn",
            format!("{:.2} / {:.2}", r.load.0, r.load.1),
        ),
        ("clients dropped", r.dead_clients.to_string()),
        (
            "Overview not sent / undecodable",
            format!(
                "{} / {} clients",
                r.overview_missing, r.overview_undecodable
            ),
        ),
        ("frames failing to decode", r.decode_errors.to_string()),
        (
            "fd soft limit server / harness",
            format!(
                "{} / {} (harness was {})",
                r.server_fd_soft_limit
                    .map_or("?".to_string(), |l| l.to_string()),
                r.harness_fd_limit.1,
                r.harness_fd_limit.0
            ),
        ),
        (
            "received",
            format!(
                "{:.1} MB, {} frames decoded, {} skipped",
                r.bytes_in as f64 / 1e6,
                r.frames_decoded,
                r.frames_skipped
            ),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<32} {v}");
    }
    if r.server_log_lines > 0 {
        println!("  server warnings: {} lines, first:", r.server_log_lines);
        for l in &r.server_log_first {
            println!("    {l}");
        }
    }
    for p in &r.problems {
        println!("  problem: {p}");
    }
    let json = serde_json::json!({
        "bench": "server_scale",
        "clients": r.clients,
        "channels": r.channels,
        "setup_s": r.setup_secs,
        "target_rate": r.target_rate,
        "achieved_rate": r.achieved_rate,
        "churn_s": r.churn_secs,
        "ops": r.ops,
        "samples": r.samples,
        "unobserved": r.unobserved,
        "join_refused": r.join_refused,
        "p50_ms": r.p50_ms,
        "p90_ms": r.p90_ms,
        "p99_ms": r.p99_ms,
        "max_ms": r.max_ms,
        "far_samples": r.far_samples,
        "far_unobserved": r.far_unobserved,
        "far_p50_ms": r.far_p50_ms,
        "far_p99_ms": r.far_p99_ms,
        "far_max_ms": r.far_max_ms,
        "server_cpu_pct": r.server_cpu_pct,
        "server_setup_cpu_pct": r.server_setup_cpu_pct,
        "harness_cpu_pct": r.harness_cpu_pct,
        "server_runqueue_wait_pct": r.server_wait_pct,
        "harness_runqueue_wait_pct": r.harness_wait_pct,
        "loadavg_before": r.load.0,
        "loadavg_after": r.load.1,
        "dead_clients": r.dead_clients,
        "overview_missing": r.overview_missing,
        "overview_undecodable": r.overview_undecodable,
        "decode_errors": r.decode_errors,
        "server_fd_soft_limit": r.server_fd_soft_limit,
        "server_warn_lines": r.server_log_lines,
    });
    println!("{json}");
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let params = Params::new(bench);
    let smoke = params.smoke;
    let reports = run(params);
    for report in &reports {
        print_report(report);
    }
    if reports.len() > 1 {
        println!("summary (N, rate -> achieved, p50 / p99 / max ms, server CPU %, unobserved, other channel p50 / p99 ms):");
        for r in &reports {
            println!(
                "  {:>6} {:>6.0} -> {:>6.1}  {:>9.2} / {:>9.2} / {:>9.2}  {:>4.0} %  {}  {:>7.1} / {:>7.1}",
                r.clients,
                r.target_rate,
                r.achieved_rate,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.server_cpu_pct,
                r.unobserved,
                r.far_p50_ms,
                r.far_p99_ms
            );
        }
    }
    if smoke {
        let report = &reports[0];
        assert!(report.ops > 0, "smoke run issued no churn operations");
        assert_eq!(
            report.dead_clients, 0,
            "clients were dropped: {:?}",
            report.problems
        );
        assert_eq!(
            report.decode_errors, 0,
            "undecodable frames: {:?}",
            report.problems
        );
        assert_eq!(
            report.join_refused, 0,
            "joins were refused: {:?}",
            report.problems
        );
        assert_eq!(
            report.samples as u64, report.ops,
            "every churn join must be observed by the destination's observer ({} unobserved)",
            report.unobserved
        );
        assert_eq!(
            report.far_samples as u64, report.ops,
            "every churn join must reach the rest of the lobby too ({} unobserved)",
            report.far_unobserved
        );
    }
}
