//! One accepted TCP connection: TLS over a non-blocking socket, decrypted bytes into a
//! [`FrameDecoder`], outgoing frames buffered (and encrypted) by rustls.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;
use rustls::ServerConnection;
use zeroize::Zeroize;

use std::time::Duration;

use super::close_reason::CloseReason;
use super::prefix::Prefix;
use super::slow_clients::{admit_output, MAX_QUEUED_OUTPUT};
use crate::protocol::{ClientMsg, FrameDecoder, FramingError};

/// Bytes read from one connection per tick before moving on, so a flooder cannot starve others.
const READ_BUDGET: usize = 256 * 1024;

/// What a read pass produced.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub messages: Vec<ClientMsg>,
    /// The connection ended, and why (for logs, counters and the Closing message).
    pub closed: Option<CloseReason>,
    /// Budget ran out before the socket was drained: read again next tick.
    pub more: bool,
}

/// The transport state of one session.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// What the per-address limits count this connection under.
    pub prefix: Prefix,
    tls: ServerConnection,
    decoder: FrameDecoder,
    /// Set when the server closed the session: close once the queued output is flushed (or
    /// the grace period of [`super::close_timing`] runs out).
    pub closing_since: Option<Duration>,
    /// Encoded frames that may wait (lobby-wide presence news), not yet handed to TLS. They
    /// go out together as one record in one write; anything prompt queued after them pushes
    /// them out first, so the client sees every message in the order it was produced.
    deferred: Vec<u8>,
    /// The last broadcast this connection got promptly; the lobby-wide pass skips it.
    pub prompted: u64,
    /// Bytes handed to TLS since the socket last took everything (an upper bound of what
    /// waits: TLS framing aside). Zero after a flush that emptied the buffer.
    unflushed: usize,
}

impl Conn {
    pub fn new(
        stream: TcpStream,
        peer: SocketAddr,
        prefix: Prefix,
        mut tls: ServerConnection,
    ) -> Self {
        // Bounds what a client that does not read can make us buffer.
        tls.set_buffer_limit(Some(MAX_QUEUED_OUTPUT));
        Self {
            stream,
            peer,
            prefix,
            tls,
            decoder: FrameDecoder::new(),
            closing_since: None,
            deferred: Vec::new(),
            prompted: 0,
            unflushed: 0,
        }
    }

    /// Reads what is available (up to the budget), decrypts it and decodes complete messages.
    pub fn read(&mut self, scratch: &mut [u8]) -> ReadOutcome {
        let mut outcome = ReadOutcome::default();
        let mut total = 0;
        loop {
            if total >= READ_BUDGET {
                outcome.more = true;
                break;
            }
            match self.tls.read_tls(&mut self.stream) {
                Ok(0) => {
                    outcome.closed = Some(CloseReason::PeerClosed);
                    break;
                }
                Ok(n) => {
                    total += n;
                    if let Err(e) = self.tls.process_new_packets() {
                        // Tell the client why, if the alert still gets out.
                        let _ = self.tls.write_tls(&mut self.stream);
                        outcome.closed = Some(CloseReason::Tls(e.to_string()));
                        return outcome;
                    }
                    if let Err(why) = self.drain_plaintext(scratch, &mut outcome.messages) {
                        outcome.closed = Some(why);
                        return outcome;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    outcome.closed = Some(CloseReason::Read(e.to_string()));
                    break;
                }
            }
        }
        outcome
    }

    fn drain_plaintext(
        &mut self,
        scratch: &mut [u8],
        into: &mut Vec<ClientMsg>,
    ) -> Result<(), CloseReason> {
        loop {
            let want = self.decoder.wanted().min(scratch.len());
            match self.tls.reader().read(&mut scratch[..want]) {
                Ok(0) => return Err(CloseReason::PeerClosed),
                Ok(n) => {
                    self.decoder.push(&scratch[..n]);
                    // Plaintext may hold a password; the decoder wipes its own copy.
                    scratch[..n].zeroize();
                    self.drain(into)?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(CloseReason::Read(e.to_string())),
            }
        }
    }

    fn drain(&mut self, into: &mut Vec<ClientMsg>) -> Result<(), FramingError> {
        while let Some(msg) = self.decoder.next::<ClientMsg>()? {
            into.push(msg);
        }
        Ok(())
    }

    /// Whether the TLS handshake is still going on.
    pub fn is_handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    pub fn is_closing(&self) -> bool {
        self.closing_since.is_some()
    }

    /// Queues an encoded frame for the next flush (after anything deferred before it).
    /// `Err(TooSlow)` when the client is too far behind (rustls's buffer, capped at
    /// [`MAX_QUEUED_OUTPUT`], is full).
    pub fn queue(&mut self, frame: &[u8]) -> Result<(), CloseReason> {
        self.release_deferred()?;
        match self.tls.writer().write(frame) {
            Ok(n) if n == frame.len() => {
                self.unflushed += n;
                Ok(())
            }
            _ => Err(CloseReason::TooSlow),
        }
    }

    /// Keeps an encoded frame back until [`Conn::release_deferred`] or the next
    /// [`Conn::queue`]. Returns `Ok(true)` when it is the first one waiting (the caller
    /// schedules the release), `Err(TooSlow)` when the client is too far behind.
    pub fn defer(&mut self, frame: &[u8]) -> Result<bool, CloseReason> {
        admit_output(self.deferred.len(), frame.len())?;
        let first = self.deferred.is_empty();
        self.deferred.extend_from_slice(frame);
        Ok(first)
    }

    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Hands the deferred frames to TLS in one write (one record per 16 KiB).
    /// `Err(TooSlow)` when the client is too far behind.
    pub fn release_deferred(&mut self) -> Result<(), CloseReason> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let ok =
            matches!(self.tls.writer().write(&self.deferred), Ok(n) if n == self.deferred.len());
        self.unflushed += self.deferred.len();
        self.deferred.clear();
        if self.deferred.capacity() > 64 * 1024 {
            self.deferred.shrink_to(4096);
        }
        if ok {
            Ok(())
        } else {
            Err(CloseReason::TooSlow)
        }
    }

    /// Ends the TLS session cleanly after what is queued.
    pub fn send_close_notify(&mut self) {
        self.tls.send_close_notify();
    }

    pub fn has_output(&self) -> bool {
        self.tls.wants_write()
    }

    /// Bytes of output the client's socket has not taken yet (see `slow_clients`).
    pub fn unflushed(&self) -> usize {
        self.unflushed
    }

    /// Writes queued bytes until the socket would block. Err means the connection is dead.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if !self.tls.wants_write() {
            self.unflushed = 0;
        }
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.stream) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if !self.tls.wants_write() {
            self.unflushed = 0;
        }
        Ok(())
    }
}
