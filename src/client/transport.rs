//! The client's TCP transport: name resolution off the main thread, non-blocking connect,
//! framed reads and buffered writes. Polled each frame; never blocks the caller.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};

use crossbeam_channel::Receiver;
use mio::net::TcpStream;

use crate::protocol::{encode_frame, ClientMsg, FrameDecoder, ServerMsg, DEFAULT_PORT};

/// What one poll of the transport produced.
#[derive(Debug, Default)]
pub struct Progress {
    pub connected: bool,
    pub messages: Vec<ServerMsg>,
    /// The transport failed or closed; the string is for people.
    pub lost: Option<String>,
}

enum State {
    Idle,
    Resolving(Receiver<Result<SocketAddr, String>>),
    Connecting(TcpStream),
    Open(TcpStream),
}

/// See the module docs.
pub struct Transport {
    state: State,
    decoder: FrameDecoder,
    out: Vec<u8>,
    scratch: Vec<u8>,
    remote: Option<SocketAddr>,
}

impl Default for Transport {
    fn default() -> Self {
        Self::new()
    }
}

/// Accepts "host", "host:port", "[v6]:port"; the default port is 7700.
pub fn resolve(server: &str) -> Result<SocketAddr, String> {
    let server = server.trim();
    if server.is_empty() {
        return Err("server address is empty".into());
    }
    let with_port = if server.parse::<SocketAddr>().is_ok() || has_port(server) {
        server.to_string()
    } else {
        format!("{server}:{DEFAULT_PORT}")
    };
    let mut addrs = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {server}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{server} has no address"))
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
    pub fn new() -> Self {
        Self {
            state: State::Idle,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            scratch: vec![0u8; 64 * 1024],
            remote: None,
        }
    }

    pub fn remote(&self) -> Option<SocketAddr> {
        self.remote
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Starts resolving and connecting in the background.
    pub fn open(&mut self, server: &str) {
        self.close();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let server = server.to_string();
        // DNS can take seconds: never on the frame thread.
        let _ = std::thread::Builder::new()
            .name("resolve".into())
            .spawn(move || {
                let _ = tx.send(resolve(&server));
            });
        self.state = State::Resolving(rx);
    }

    pub fn close(&mut self) {
        if let State::Open(s) | State::Connecting(s) = &self.state {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.state = State::Idle;
        self.decoder = FrameDecoder::new();
        self.out.clear();
    }

    /// Queues a message; it is written on the next poll.
    pub fn send(&mut self, msg: &ClientMsg) {
        if let Ok(frame) = encode_frame(msg) {
            self.out.extend_from_slice(&frame);
        }
    }

    /// Advances connecting, writes queued bytes, reads what arrived.
    pub fn poll(&mut self) -> Progress {
        let mut p = Progress::default();
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => {}
            State::Resolving(rx) => match rx.try_recv() {
                Ok(Ok(addr)) => match TcpStream::connect(addr) {
                    Ok(s) => {
                        self.remote = Some(addr);
                        self.state = State::Connecting(s);
                    }
                    Err(e) => p.lost = Some(format!("cannot connect to {addr}: {e}")),
                },
                Ok(Err(e)) => p.lost = Some(e),
                Err(crossbeam_channel::TryRecvError::Empty) => self.state = State::Resolving(rx),
                Err(_) => p.lost = Some("name resolution failed".into()),
            },
            State::Connecting(s) => match s.take_error() {
                Ok(Some(e)) | Err(e) => p.lost = Some(connect_error(self.remote, e)),
                Ok(None) => match s.peer_addr() {
                    Ok(_) => {
                        let _ = s.set_nodelay(true);
                        p.connected = true;
                        self.state = State::Open(s);
                    }
                    Err(e) if e.kind() == ErrorKind::NotConnected => {
                        self.state = State::Connecting(s)
                    }
                    Err(e) => p.lost = Some(connect_error(self.remote, e)),
                },
            },
            State::Open(s) => self.state = State::Open(s),
        }
        if let State::Open(s) = &mut self.state {
            if let Err(e) = write_all_nonblocking(s, &mut self.out) {
                p.lost = Some(format!("connection to server lost: {e}"));
            } else if let Err(e) =
                read_frames(s, &mut self.decoder, &mut self.scratch, &mut p.messages)
            {
                p.lost = Some(e);
            }
            if p.lost.is_some() {
                self.close();
            }
        }
        p
    }
}

fn connect_error(remote: Option<SocketAddr>, e: std::io::Error) -> String {
    let target = remote.map(|a| a.to_string()).unwrap_or_default();
    match e.kind() {
        ErrorKind::ConnectionRefused => {
            format!("no server at {target} (connection refused)")
        }
        _ => format!("cannot connect to {target}: {e}"),
    }
}

fn write_all_nonblocking(s: &mut TcpStream, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut written = 0;
    while written < out.len() {
        match s.write(&out[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    out.drain(..written);
    Ok(())
}

fn read_frames(
    s: &mut TcpStream,
    decoder: &mut FrameDecoder,
    scratch: &mut [u8],
    into: &mut Vec<ServerMsg>,
) -> Result<(), String> {
    loop {
        let want = decoder.wanted().min(scratch.len());
        match s.read(&mut scratch[..want]) {
            Ok(0) => return Err("server closed the connection".into()),
            Ok(n) => {
                decoder.push(&scratch[..n]);
                while let Some(msg) = decoder
                    .next::<ServerMsg>()
                    .map_err(|e| format!("bad data from server: {e}"))?
                {
                    into.push(msg);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("connection to server lost: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_default_port() {
        assert_eq!(resolve("127.0.0.1").unwrap().port(), DEFAULT_PORT);
        assert_eq!(resolve("127.0.0.1:9000").unwrap().port(), 9000);
        assert_eq!(resolve("[::1]:9000").unwrap().port(), 9000);
        assert_eq!(resolve("localhost:81").unwrap().port(), 81);
        assert!(resolve("").is_err());
        assert!(resolve("256.1.1.1:5").is_err());
    }
}
