//! The client's control transport: name resolution off the main thread, non-blocking connect,
//! TLS with the server's certificate pinned on first use, framed reads and buffered writes.
//! Polled each frame; never blocks the caller.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crossbeam_channel::Receiver;
use mio::net::TcpStream;

use std::sync::Arc;

use rustls::ClientConnection;
use zeroize::{Zeroize, Zeroizing};

use super::session::TransportError;
use crate::protocol::{encode_frame, ClientMsg, FrameDecoder, ServerMsg, DEFAULT_PORT};
use crate::tls::{cert_fingerprint, server_name, PinCheck, PinStore, TrustChoice};

/// What one poll of the transport produced.
#[derive(Debug, Default)]
pub struct Progress {
    /// The TLS session is up and the server's certificate matches its pin.
    pub connected: bool,
    pub messages: Vec<ServerMsg>,
    /// The transport failed or closed; [`TransportError::is_final`] says whether retrying
    /// can help.
    pub lost: Option<TransportError>,
}

enum State {
    Idle,
    /// Resolving the name and connecting (every address, happy-eyeballs style) off the
    /// frame thread.
    Resolving(Receiver<Result<(std::net::TcpStream, SocketAddr), TransportError>>),
    Connecting(TcpStream),
    Handshaking(TcpStream, Box<ClientConnection>),
    Open(TcpStream, Box<ClientConnection>),
}

/// See the module docs.
pub struct Transport {
    state: State,
    decoder: FrameDecoder,
    /// Plaintext queued until the TLS session can take it.
    out: Vec<u8>,
    scratch: Vec<u8>,
    remote: Option<SocketAddr>,
    server: String,
    tls: Arc<rustls::ClientConfig>,
    pins: PinStore,
    trust: TrustChoice,
    fingerprint: Option<String>,
}

impl Default for Transport {
    fn default() -> Self {
        Self::new(PinStore::in_memory(), false)
    }
}

/// Accepts "host", "host:port", "[v6]:port"; the default port is 7700. The first address.
pub fn resolve(server: &str) -> Result<SocketAddr, TransportError> {
    resolve_all(server)?
        .into_iter()
        .next()
        .ok_or_else(|| TransportError::NoAddress {
            server: server.trim().to_string(),
        })
}

/// Every address `server` resolves to, in the order to try them ([`eyeball_order`]).
pub fn resolve_all(server: &str) -> Result<Vec<SocketAddr>, TransportError> {
    let server = server.trim();
    if server.is_empty() {
        return Err(TransportError::EmptyAddress);
    }
    let with_port = with_default_port(server);
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|e| TransportError::Unresolvable {
            server: server.to_string(),
            detail: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(TransportError::NoAddress {
            server: server.to_string(),
        });
    }
    Ok(eyeball_order(addrs))
}

/// Happy Eyeballs (RFC 8305) order: IPv6 first, then alternating families, each family in
/// the resolver's order, so a broken IPv6 path costs one short head start, not the call.
pub fn eyeball_order(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let (mut v6, mut v4): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv6());
    v6.reverse();
    v4.reverse();
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    loop {
        match (v6.pop(), v4.pop()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// How long each address gets before the next one is tried alongside it.
const EYEBALL_HEAD_START: Duration = Duration::from_millis(250);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the first of `addrs` that answers: each attempt starts
/// [`EYEBALL_HEAD_START`] after the previous one unless one has already succeeded. Blocking:
/// runs on the resolver thread.
fn connect_first(
    addrs: &[SocketAddr],
) -> Result<(std::net::TcpStream, SocketAddr), TransportError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (i, &addr) in addrs.iter().enumerate() {
        let (attempt_tx, done) = (tx.clone(), Arc::clone(&done));
        let spawned = std::thread::Builder::new()
            .name("connect".into())
            .spawn(move || {
                std::thread::sleep(EYEBALL_HEAD_START * i as u32);
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let _ = attempt_tx.send((
                    addr,
                    std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT),
                ));
            });
        if spawned.is_err() {
            let _ = tx.send((
                addr,
                Err(std::io::Error::other("cannot start a connect thread")),
            ));
        }
    }
    drop(tx);
    let mut last = None;
    for (addr, result) in rx.iter().take(addrs.len()) {
        match result {
            Ok(stream) => {
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                return Ok((stream, addr));
            }
            Err(e) => last = Some(connect_error(Some(addr), e)),
        }
    }
    Err(last.unwrap_or(TransportError::ResolverGone))
}

fn with_default_port(server: &str) -> String {
    if server.parse::<SocketAddr>().is_ok() || has_port(server) {
        server.to_string()
    } else {
        format!("{server}:{DEFAULT_PORT}")
    }
}

fn host_of(server: &str) -> String {
    let s = with_default_port(server.trim());
    let host = s.rsplit_once(':').map(|(h, _)| h).unwrap_or(&s);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

fn has_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.ends_with(':') && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

impl Transport {
    /// `pins` remembers server certificates; `accept_new_cert` replaces a pin that no longer
    /// matches (the user said they trust the server's new certificate).
    pub fn new(pins: PinStore, accept_new_cert: bool) -> Self {
        Self {
            state: State::Idle,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            scratch: vec![0u8; 64 * 1024],
            remote: None,
            server: String::new(),
            tls: crate::tls::client_config(),
            pins,
            trust: TrustChoice {
                accept_any_change: accept_new_cert,
                ..TrustChoice::default()
            },
            fingerprint: None,
        }
    }

    /// Refuse a server never seen before with [`TransportError::NotYetTrusted`] instead of
    /// pinning it: the desktop app shows the fingerprint and asks.
    pub fn ask_before_first_use(&mut self) {
        self.trust.pin_first_use = false;
    }

    /// The user compared and accepted `fingerprint`: pin it on the next connection, whether
    /// the server is new or its certificate changed.
    pub fn accept_certificate(&mut self, fingerprint: String) {
        self.trust.accepted = Some(fingerprint);
    }

    pub fn remote(&self) -> Option<SocketAddr> {
        self.remote
    }

    /// Fingerprint of the connected server's certificate.
    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(..))
    }

    /// Starts resolving and connecting in the background.
    pub fn open(&mut self, server: &str) {
        self.close();
        self.server = with_default_port(server.trim());
        let (tx, rx) = crossbeam_channel::bounded(1);
        let server = server.to_string();
        // DNS can take seconds: never on the frame thread.
        let _ = std::thread::Builder::new()
            .name("resolve".into())
            .spawn(move || {
                let _ = tx.send(resolve_all(&server).and_then(|addrs| connect_first(&addrs)));
            });
        self.state = State::Resolving(rx);
    }

    pub fn close(&mut self) {
        match &mut self.state {
            State::Open(s, tls) | State::Handshaking(s, tls) => {
                tls.send_close_notify();
                let _ = tls.write_tls(s);
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            State::Connecting(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            _ => {}
        }
        self.state = State::Idle;
        self.decoder = FrameDecoder::new();
        self.out.clear();
    }

    /// Queues a message; it is written on the next poll.
    pub fn send(&mut self, msg: &ClientMsg) {
        if let Ok(mut frame) = encode_frame(msg) {
            self.out.extend_from_slice(&frame);
            // Frames may carry a password: no copy outlives its sending.
            frame.zeroize();
        }
    }

    /// Advances connecting and the TLS handshake, writes queued bytes, reads what arrived.
    pub fn poll(&mut self) -> Progress {
        let mut p = Progress::default();
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => {}
            State::Resolving(rx) => match rx.try_recv() {
                Ok(Ok((stream, addr))) => match stream.set_nonblocking(true) {
                    Ok(()) => {
                        self.remote = Some(addr);
                        self.state = State::Connecting(TcpStream::from_std(stream));
                    }
                    Err(e) => p.lost = Some(connect_error(Some(addr), e)),
                },
                Ok(Err(e)) => p.lost = Some(e),
                Err(crossbeam_channel::TryRecvError::Empty) => self.state = State::Resolving(rx),
                Err(_) => p.lost = Some(TransportError::ResolverGone),
            },
            State::Connecting(s) => match s.take_error() {
                Ok(Some(e)) | Err(e) => p.lost = Some(connect_error(self.remote, e)),
                Ok(None) => match s.peer_addr() {
                    Ok(_) => {
                        let _ = s.set_nodelay(true);
                        match ClientConnection::new(
                            self.tls.clone(),
                            server_name(&host_of(&self.server)),
                        ) {
                            Ok(tls) => self.state = State::Handshaking(s, Box::new(tls)),
                            Err(e) => p.lost = Some(TransportError::TlsSetup(e.to_string())),
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::NotConnected => {
                        self.state = State::Connecting(s)
                    }
                    Err(e) => p.lost = Some(connect_error(self.remote, e)),
                },
            },
            State::Handshaking(mut s, mut tls) => {
                match pump_tls(
                    &mut s,
                    &mut tls,
                    &mut self.decoder,
                    &mut self.scratch,
                    &mut p.messages,
                ) {
                    Err(e) => p.lost = Some(e),
                    Ok(()) if tls.is_handshaking() => self.state = State::Handshaking(s, tls),
                    Ok(()) => match self.check_pin(&tls) {
                        Ok(()) => {
                            p.connected = true;
                            self.state = State::Open(s, tls);
                        }
                        Err(why) => p.lost = Some(why),
                    },
                }
            }
            State::Open(s, tls) => self.state = State::Open(s, tls),
        }
        if let State::Open(s, tls) = &mut self.state {
            if !self.out.is_empty() {
                match tls.writer().write(&self.out) {
                    Ok(n) => {
                        // Written bytes are wiped (a Join carries a password); a partial
                        // write keeps the rest in a fresh buffer so no stale copy stays behind.
                        if n == self.out.len() {
                            self.out.zeroize();
                        } else {
                            let rest = Zeroizing::new(self.out[n..].to_vec());
                            self.out.zeroize();
                            self.out.extend_from_slice(&rest);
                        }
                    }
                    Err(e) => p.lost = Some(TransportError::Lost(e.to_string())),
                }
            }
            if p.lost.is_none() {
                if let Err(e) = pump_tls(
                    s,
                    tls,
                    &mut self.decoder,
                    &mut self.scratch,
                    &mut p.messages,
                ) {
                    p.lost = Some(e);
                }
            }
        }
        if p.lost.is_some() {
            self.close();
        }
        p
    }

    fn check_pin(&mut self, tls: &ClientConnection) -> Result<(), TransportError> {
        let Some(cert) = tls.peer_certificates().and_then(|c| c.first()) else {
            return Err(TransportError::NoCertificate);
        };
        let fp = cert_fingerprint(cert);
        self.fingerprint = Some(fp.clone());
        match self.pins.check(&self.server, &fp, &self.trust) {
            PinCheck::Known | PinCheck::Pinned => Ok(()),
            PinCheck::Unknown { presented } => Err(TransportError::NotYetTrusted { presented }),
            PinCheck::Unreadable { path, reason } => {
                Err(TransportError::PinStoreUnreadable { path, reason })
            }
            PinCheck::Changed { pinned, presented } => Err(TransportError::CertificateChanged {
                pinned,
                presented,
                pin_store: self
                    .pins
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "the pin store".into()),
            }),
        }
    }
}

/// Moves TLS records both ways and decodes any plaintext that arrived.
fn pump_tls(
    s: &mut TcpStream,
    tls: &mut ClientConnection,
    decoder: &mut FrameDecoder,
    scratch: &mut [u8],
    into: &mut Vec<ServerMsg>,
) -> Result<(), TransportError> {
    while tls.wants_write() {
        match tls.write_tls(s) {
            Ok(0) => return Err(TransportError::LostOnWrite),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(TransportError::Lost(e.to_string())),
        }
    }
    loop {
        match tls.read_tls(s) {
            Ok(0) => return Err(TransportError::Closed),
            Ok(_) => {
                tls.process_new_packets()
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                loop {
                    let want = decoder.wanted().min(scratch.len());
                    match tls.reader().read(&mut scratch[..want]) {
                        Ok(0) => return Err(TransportError::Closed),
                        Ok(n) => {
                            decoder.push(&scratch[..n]);
                            scratch[..n].zeroize();
                            while let Some(msg) = decoder
                                .next::<ServerMsg>()
                                .map_err(|e| TransportError::BadData(e.to_string()))?
                            {
                                into.push(msg);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(TransportError::Lost(e.to_string())),
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(TransportError::Lost(e.to_string())),
        }
    }
    // Handshake replies produced by what we just read.
    while tls.wants_write() {
        match tls.write_tls(s) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(TransportError::Lost(e.to_string())),
        }
    }
    Ok(())
}

fn connect_error(remote: Option<SocketAddr>, e: std::io::Error) -> TransportError {
    let target = remote.map(|a| a.to_string()).unwrap_or_default();
    match e.kind() {
        ErrorKind::ConnectionRefused => TransportError::Refused { target },
        _ => TransportError::ConnectFailed {
            target,
            detail: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_tried_ipv6_first_then_alternating_families() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let resolved = vec![
            a("192.0.2.1:7700"),
            a("192.0.2.2:7700"),
            a("[2001:db8::1]:7700"),
            a("[2001:db8::2]:7700"),
            a("[2001:db8::3]:7700"),
        ];
        assert_eq!(
            eyeball_order(resolved),
            vec![
                a("[2001:db8::1]:7700"),
                a("192.0.2.1:7700"),
                a("[2001:db8::2]:7700"),
                a("192.0.2.2:7700"),
                a("[2001:db8::3]:7700"),
            ]
        );
        assert_eq!(
            eyeball_order(vec![a("192.0.2.1:1")]),
            vec![a("192.0.2.1:1")]
        );
    }

    /// The first address refuses, the second listens: the connection is made to the second,
    /// after the head start, and a refusal alone is reported as one.
    #[test]
    fn a_dead_first_address_costs_only_its_head_start() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live = listener.local_addr().unwrap();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (_, addr) = connect_first(&[dead, live]).expect("the live one answers");
        assert_eq!(addr, live);
        assert!(matches!(
            connect_first(&[dead]),
            Err(TransportError::Refused { .. })
        ));
    }

    #[test]
    fn addresses_get_the_default_port() {
        assert_eq!(resolve("127.0.0.1").unwrap().port(), DEFAULT_PORT);
        assert_eq!(resolve("127.0.0.1:9000").unwrap().port(), 9000);
        assert_eq!(resolve("[::1]:9000").unwrap().port(), 9000);
        assert_eq!(resolve("localhost:81").unwrap().port(), 81);
        assert!(resolve("").is_err());
        assert!(resolve("256.1.1.1:5").is_err());
    }

    #[test]
    fn host_names_for_tls_drop_the_port() {
        assert_eq!(host_of("example.org"), "example.org");
        assert_eq!(host_of("example.org:9"), "example.org");
        assert_eq!(host_of("[::1]:9"), "::1");
        assert_eq!(host_of("10.0.0.1"), "10.0.0.1");
    }
}
