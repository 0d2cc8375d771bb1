//! Helpers shared by the integration tests: a real server process on an ephemeral loopback
//! port, and a raw protocol client over a real socket.
#![allow(dead_code)]

pub mod display;
pub mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use p2p_voice::protocol::{
    encode_frame, ClientMsg, FrameDecoder, ServerMsg, Status, APP_VERSION, PROTOCOL_VERSION,
};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_p2p-voice")
}

/// A `p2p-voice` command with its own, fresh settings directory (pinned certificates,
/// remembered username), so tests never share state with each other or the user.
pub fn p2p() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env("P2P_VOICE_CONFIG_DIR", temp_path("config"));
    cmd
}

/// A `p2p-voice server` child process; killed on drop.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its TLS certificate's fingerprint, as its `listening` line says.
    pub fingerprint: String,
    /// Where it keeps its TLS identity (kept across `restart`).
    pub data_dir: PathBuf,
    channels: Option<String>,
}

impl ServerProcess {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    pub fn start_with(channels: Option<&str>) -> Self {
        Self::start_on(channels, 0)
    }

    pub fn start_on(channels: Option<&str>, port: u16) -> Self {
        Self::start_in(channels, port, temp_path("server-data"), &[])
    }

    /// A server with extra command-line flags.
    pub fn start_args(extra: &[&str]) -> Self {
        Self::start_in(None, 0, temp_path("server-data"), extra)
    }

    /// Stops the server and starts it again on the same port with the same identity.
    pub fn restart(&mut self, down_for: std::time::Duration) {
        self.kill();
        std::thread::sleep(down_for);
        let next = Self::start_in(
            self.channels.as_deref(),
            self.addr.port(),
            self.data_dir.clone(),
            &[],
        );
        // The old process is already reaped by kill(); dropping `old` kills nothing new.
        let _old = std::mem::replace(self, next);
    }

    /// A server with a channels file and extra command-line flags.
    pub fn start_args_with(channels: Option<&str>, extra: &[&str]) -> Self {
        Self::start_in(channels, 0, temp_path("server-data"), extra)
    }

    /// A server that may open at most `nofile` files (sockets included), as under a typical
    /// service manager's limit, with extra command-line flags.
    pub fn start_with_fd_limit(channels: Option<&str>, extra: &[&str], nofile: u64) -> Self {
        Self::start_limited(channels, 0, temp_path("server-data"), extra, Some(nofile))
    }

    fn start_in(channels: Option<&str>, port: u16, data_dir: PathBuf, extra: &[&str]) -> Self {
        Self::start_limited(channels, port, data_dir, extra, None)
    }

    fn start_limited(
        channels: Option<&str>,
        port: u16,
        data_dir: PathBuf,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Self {
        let mut cmd = Command::new(bin());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args([
            "server",
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--json",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(extra);
        if let Some(text) = channels {
            let path = temp_path("channels.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--channels").arg(path);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .expect("server printed its address")
            .expect("read server stdout");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
        let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
        let fingerprint = v["fingerprint"].as_str().unwrap_or_default().to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            addr,
            fingerprint,
            data_dir,
            channels: channels.map(String::from),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "p2p-voice-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64)
}

/// A client speaking the protocol directly over a blocking socket with timeouts.
pub struct RawClient {
    pub stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    decoder: FrameDecoder,
    pub seen: Vec<ServerMsg>,
}

pub const WAIT: Duration = Duration::from_secs(10);

impl RawClient {
    pub fn connect(addr: SocketAddr) -> Self {
        Self::connect_with_timeout(addr, Duration::from_millis(100))
    }

    /// Connects from the loopback address `from` (any of 127.0.0.0/8 on Linux), so a test can
    /// be many clients at many addresses.
    pub fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> Self {
        let tcp = tcp_connect_from(from, addr).expect("connect");
        tcp.set_nonblocking(false).unwrap();
        // Wait for the connect to finish: a blocking write of nothing returns at once, so poll.
        let deadline = Instant::now() + WAIT;
        while tcp.peer_addr().is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Self::over(tcp, Duration::from_millis(500))
    }

    /// Connects with `read_timeout` on the socket. The TLS handshake runs inside the first
    /// `send`, so a server slower than the timeout to answer it makes that send fail: a
    /// client measuring a loaded server needs a realistic timeout, not the 100 ms of
    /// [`RawClient::connect`].
    pub fn connect_with_timeout(addr: SocketAddr, read_timeout: Duration) -> Self {
        Self::over(TcpStream::connect(addr).expect("connect"), read_timeout)
    }

    fn over(tcp: TcpStream, read_timeout: Duration) -> Self {
        tcp.set_read_timeout(Some(read_timeout)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = rustls::ClientConnection::new(
            p2p_voice::tls::client_config(),
            p2p_voice::tls::server_name("127.0.0.1"),
        )
        .unwrap();
        let stream = rustls::StreamOwned::new(tls, tcp);
        Self {
            stream,
            decoder: FrameDecoder::new(),
            seen: Vec::new(),
        }
    }

    pub fn send(&mut self, msg: &ClientMsg) {
        self.stream.write_all(&encode_frame(msg).unwrap()).unwrap();
        self.stream.flush().unwrap();
    }

    pub fn hello(&mut self) -> u64 {
        self.send(&ClientMsg::Hello {
            protocol_version: PROTOCOL_VERSION,
            app_version: APP_VERSION.into(),
        });
        match self.expect(|m| matches!(m, ServerMsg::Welcome { .. })) {
            ServerMsg::Welcome { udp_token, .. } => udp_token,
            _ => unreachable!(),
        }
    }

    /// Hello + Identify; returns the status and user id.
    pub fn login(addr: SocketAddr, name: &str) -> (Self, Status, Option<u32>) {
        let mut c = Self::connect(addr);
        c.hello();
        c.send(&ClientMsg::Identify {
            username: name.into(),
        });
        match c.expect(|m| matches!(m, ServerMsg::Identified { .. })) {
            ServerMsg::Identified {
                status, user_id, ..
            } => (c, status, user_id),
            _ => unreachable!(),
        }
    }

    pub fn join(&mut self, channel: &str, password: Option<&str>) -> Status {
        self.send(&ClientMsg::Join {
            channel: channel.into(),
            password: password.map(p2p_voice::protocol::Password::from),
        });
        match self.expect(|m| matches!(m, ServerMsg::Joined { .. })) {
            ServerMsg::Joined { status, .. } => status,
            _ => unreachable!(),
        }
    }

    /// Reads one message, or None on timeout / closed connection.
    pub fn recv(&mut self, timeout: Duration) -> Option<ServerMsg> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            match self.decoder.next::<ServerMsg>() {
                Ok(Some(m)) => {
                    self.seen.push(m.clone());
                    return Some(m);
                }
                Ok(None) => {}
                Err(e) => panic!("bad frame from server: {e}"),
            }
            if Instant::now() >= deadline {
                return None;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    /// Waits for a message matching `pred` (others are kept in `seen`).
    pub fn expect(&mut self, pred: impl Fn(&ServerMsg) -> bool) -> ServerMsg {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(m) = self.recv(Duration::from_millis(200)) {
                if pred(&m) {
                    return m;
                }
            }
        }
        panic!("expected message not received; saw {:?}", self.seen);
    }

    /// True when the server closed the connection within the timeout.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                    while let Ok(Some(m)) = self.decoder.next::<ServerMsg>() {
                        self.seen.push(m);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// Starts a non-blocking TCP connect to `to` from the loopback address `from` (port chosen by
/// the kernel); the connection may still be in progress when this returns. std cannot bind a
/// TCP socket before connecting, hence libc.
pub fn tcp_connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::net::SocketAddrV4;
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("the test server listens on IPv4")
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own; the addresses live across the calls.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(SocketAddrV4::new(from, 0));
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(to);
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(stream)
    }
}

/// Whether the server closed `stream` (end of stream or reset) within `within`, reading and
/// discarding anything it sent.
pub fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A headless client process that talks (tone/WAV) and records what it hears.
pub struct HeadlessClient {
    pub child: Child,
    pub output: PathBuf,
    pub name: String,
}

impl HeadlessClient {
    /// One member per `(name, hz)` in Lobby, each playing its tone for `secs` (`extra` as for
    /// [`HeadlessClient::spawn`]): the usual cast of a call test.
    pub fn tone_members(
        server: SocketAddr,
        tones: &[(&str, f32)],
        extra: &[&str],
        secs: f64,
    ) -> Vec<HeadlessClient> {
        tones
            .iter()
            .map(|(name, hz)| {
                HeadlessClient::spawn(
                    server,
                    name,
                    "Lobby",
                    &["--input-tone", &hz.to_string()],
                    extra,
                    secs,
                )
            })
            .collect()
    }

    pub fn spawn(
        server: SocketAddr,
        name: &str,
        channel: &str,
        input: &[&str],
        extra: &[&str],
        secs: f64,
    ) -> Self {
        let output = temp_path(&format!("{name}.wav"));
        let mut cmd = p2p();
        cmd.args([
            "client",
            "--headless",
            "--server",
            &server.to_string(),
            "--username",
            name,
            "--channel",
            channel,
            "--duration",
            &secs.to_string(),
            "--output-wav",
        ])
        .arg(&output)
        .args(input)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn headless client");
        Self {
            child,
            output,
            name: name.into(),
        }
    }

    /// Waits for exit; returns the JSON lines printed and the recorded audio.
    pub fn finish(mut self) -> (Vec<serde_json::Value>, Vec<f32>) {
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "{} exited with {status}: {stdout}",
            self.name
        );
        let lines = stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let audio = p2p_voice::audio::load_wav_mono_48k(&self.output).expect("output wav");
        (lines, audio)
    }
}

/// The `summary` line a headless client prints at exit.
pub fn summary(lines: &[serde_json::Value]) -> &serde_json::Value {
    lines
        .iter()
        .find(|l| l["event"] == "summary")
        .expect("summary line")
}

/// Amplitude of `hz` in `samples` (48 kHz), averaged over 100 ms blocks so that phase jumps
/// from jitter-buffer adjustments do not cancel it out.
pub fn tone_level(samples: &[f32], hz: f32) -> f32 {
    let blocks: Vec<f32> = samples
        .chunks(4800)
        .map(|b| p2p_voice::audio::goertzel_amplitude(b, hz, 48_000))
        .collect();
    blocks.iter().sum::<f32>() / blocks.len().max(1) as f32
}

/// Index of the first sample where audio becomes audible (1 ms RMS above `threshold`).
pub fn onset(samples: &[f32], threshold: f32) -> Option<usize> {
    samples
        .chunks(48)
        .position(|c| (c.iter().map(|x| x * x).sum::<f32>() / c.len() as f32).sqrt() > threshold)
        .map(|i| i * 48)
}

/// Longest run of consecutive 1 ms windows whose RMS is below `threshold`, in ms.
pub fn longest_silence_ms(samples: &[f32], threshold: f32) -> usize {
    let mut longest = 0;
    let mut run = 0;
    for c in samples.chunks(48) {
        let rms = (c.iter().map(|x| x * x).sum::<f32>() / c.len() as f32).sqrt();
        if rms < threshold {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    longest
}

/// Whether the tests run under CI: the environment variable `CI` is set and not empty.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Called by a test that cannot run here (no root, no namespaces, no PulseAudio, no tcpdump)
/// just before it returns early. Outside CI it prints the reason and the test passes, so a
/// developer's machine without the packages still runs the rest. Under CI it panics instead:
/// CI runs as root with every package installed, so a missing prerequisite there means a
/// broken machine or a broken test, and a printed SKIPPED would hide it behind a pass.
pub fn skip_unless_ci(reason: &str) {
    if in_ci() {
        panic!("cannot run under CI (CI is set, so this does not skip): {reason}");
    }
    println!("SKIPPED: {reason}");
}

/// Whether the tests run as root (namespaces, packet capture).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The summary's entry for the peer called `name`, still in the call or departed (a peer
/// whose run ended a moment before ours has left the call by the time we sum up).
pub fn peer_named<'a>(summary: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    ["peers", "departed_peers"]
        .iter()
        .filter_map(|k| summary[*k].as_array())
        .flatten()
        .find(|p| p["username"] == name)
}

/// A talker (500 Hz tone, always transmitting) and a silent listener in Lobby for 8 s;
/// `listener_extra` adds flags to the listener (e.g. `--impair`).
pub fn talker_and_listener(
    server: SocketAddr,
    listener_extra: &[&str],
) -> (HeadlessClient, HeadlessClient) {
    let talker = HeadlessClient::spawn(
        server,
        "talker",
        "Lobby",
        &["--input-tone", "500"],
        &["--always-transmit"],
        8.0,
    );
    let listener = HeadlessClient::spawn(
        server,
        "listener",
        "Lobby",
        &["--input-silence"],
        listener_extra,
        8.0,
    );
    (talker, listener)
}

/// The part of a listener's recording during which the talker talks without pause: from
/// 0.5 s after the first sound until 0.3 s before the end. Any silence in it is a gap.
pub fn while_talking(audio: &[f32]) -> &[f32] {
    let start = onset(audio, 0.02).expect("listener heard the talker");
    let from = start + 24_000;
    let to = audio.len().saturating_sub(14_400);
    assert!(
        to > from + 48_000 * 3,
        "too little audio: onset {start}, len {}",
        audio.len()
    );
    &audio[from..to]
}

/// Minimal pcap reader for Linux captures (Ethernet framing, IPv4): yields
/// (protocol, source port, destination port, payload) for every TCP and UDP packet.
pub fn pcap_payloads(bytes: &[u8]) -> Vec<(u8, u16, u16, Vec<u8>)> {
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
