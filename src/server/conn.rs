//! One accepted TCP connection: non-blocking reads into a [`FrameDecoder`], buffered writes.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;

use crate::protocol::{ClientMsg, FrameDecoder, FramingError};

/// A client that does not read its socket gets this much queued before it is dropped.
pub const MAX_QUEUED_OUTPUT: usize = 1024 * 1024;

/// Bytes read from one connection per tick before moving on, so a flooder cannot starve others.
const READ_BUDGET: usize = 256 * 1024;

/// What a read pass produced.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub messages: Vec<ClientMsg>,
    /// The connection ended; the string says why (for logs and for the Closing message).
    pub closed: Option<String>,
    /// Budget ran out before the socket was drained: read again next tick.
    pub more: bool,
}

/// The transport state of one session.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    decoder: FrameDecoder,
    out: Vec<u8>,
    out_start: usize,
    /// Close after the queued output is flushed.
    pub closing: bool,
    /// Flush attempts since `closing` was set.
    pub close_attempts: u32,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream,
            peer,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            out_start: 0,
            closing: false,
            close_attempts: 0,
        }
    }

    /// Reads what is available (up to the budget) and decodes complete messages.
    pub fn read(&mut self, scratch: &mut [u8]) -> ReadOutcome {
        let mut outcome = ReadOutcome::default();
        let mut total = 0;
        loop {
            if total >= READ_BUDGET {
                outcome.more = true;
                break;
            }
            let want = self.decoder.wanted().min(scratch.len());
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => {
                    outcome.closed = Some("connection closed by peer".into());
                    break;
                }
                Ok(n) => {
                    total += n;
                    self.decoder.push(&scratch[..n]);
                    if let Err(e) = self.drain(&mut outcome.messages) {
                        outcome.closed = Some(e.to_string());
                        return outcome;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    outcome.closed = Some(format!("read error: {e}"));
                    break;
                }
            }
        }
        outcome
    }

    fn drain(&mut self, into: &mut Vec<ClientMsg>) -> Result<(), FramingError> {
        while let Some(msg) = self.decoder.next::<ClientMsg>()? {
            into.push(msg);
        }
        Ok(())
    }

    /// Queues an encoded frame. Returns false when the client is too far behind.
    pub fn queue(&mut self, frame: &[u8]) -> bool {
        if self.out.len() - self.out_start + frame.len() > MAX_QUEUED_OUTPUT {
            return false;
        }
        self.out.extend_from_slice(frame);
        true
    }

    pub fn has_output(&self) -> bool {
        self.out_start < self.out.len()
    }

    /// Writes queued bytes until the socket would block. Err means the connection is dead.
    pub fn flush(&mut self) -> std::io::Result<()> {
        while self.out_start < self.out.len() {
            match self.stream.write(&self.out[self.out_start..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.out_start += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.out_start == self.out.len() {
            self.out.clear();
            self.out_start = 0;
        } else if self.out_start > 64 * 1024 {
            self.out.drain(..self.out_start);
            self.out_start = 0;
        }
        Ok(())
    }
}
