//! How long a closing connection is kept, and how often leftovers are swept up.
//!
//! When the server closes a session it still wants the client to read why (the `Closing`
//! message and TLS close_notify), so the connection stays until that is written. A client that
//! does not read would keep it forever; after [`CLOSE_GRACE`] it is dropped with whatever is
//! left unsent. Connections that closed while nothing was queued for them are not written to
//! again, so a sweep every [`SWEEP_INTERVAL`] removes those.
//!
//! Pure: the shell says what a flush did and when; time is an argument.

use std::time::Duration;

/// A closing client that does not read gets this long to take its `Closing` message.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How often the shell looks for closed connections with nothing left to write (a walk over
/// every connection, so a few times a second rather than every tick).
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// What becomes of a connection after the shell tried to write its queued output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFlush {
    /// Nothing left to write; the connection stays.
    Idle,
    /// The socket would block with output left: write again later.
    FlushLater,
    /// Dead (the write failed), or closing and done (all written, or out of grace).
    Drop,
}

/// Decides [`AfterFlush`] from what the flush did: `write_failed` (the socket is dead),
/// `output_left` (bytes still queued), and `closing_since` (when the server closed the
/// session, if it did).
pub fn after_flush(
    now: Duration,
    write_failed: bool,
    output_left: bool,
    closing_since: Option<Duration>,
) -> AfterFlush {
    let closing_done =
        closing_since.is_some_and(|since| !output_left || now.saturating_sub(since) > CLOSE_GRACE);
    if write_failed || closing_done {
        AfterFlush::Drop
    } else if output_left {
        AfterFlush::FlushLater
    } else {
        AfterFlush::Idle
    }
}

/// Says when the next sweep of closed connections is due; the first comes one interval after
/// start.
#[derive(Debug, Default)]
pub struct SweepClock {
    last: Duration,
}

impl SweepClock {
    /// True (and restarts the interval) when a sweep is due at `now`.
    pub fn due(&mut self, now: Duration) -> bool {
        if now.saturating_sub(self.last) >= SWEEP_INTERVAL {
            self.last = now;
            true
        } else {
            false
        }
    }

    /// When the next sweep is due.
    pub fn next(&self) -> Duration {
        self.last + SWEEP_INTERVAL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_open_connection_is_never_dropped_for_being_slow_to_flush() {
        let now = Duration::from_secs(100);
        assert_eq!(after_flush(now, false, true, None), AfterFlush::FlushLater);
        assert_eq!(after_flush(now, false, false, None), AfterFlush::Idle);
    }

    #[test]
    fn a_dead_socket_is_dropped_at_once() {
        assert_eq!(after_flush(MS, true, true, None), AfterFlush::Drop);
        assert_eq!(after_flush(MS, true, false, Some(MS)), AfterFlush::Drop);
    }

    #[test]
    fn a_closing_connection_goes_once_its_last_message_is_written() {
        let since = Duration::from_secs(5);
        assert_eq!(
            after_flush(since + MS, false, true, Some(since)),
            AfterFlush::FlushLater
        );
        assert_eq!(
            after_flush(since + MS, false, false, Some(since)),
            AfterFlush::Drop
        );
    }

    #[test]
    fn a_closing_client_that_does_not_read_gets_the_grace_period_and_no_more() {
        let since = Duration::from_secs(5);
        assert_eq!(
            after_flush(since + CLOSE_GRACE, false, true, Some(since)),
            AfterFlush::FlushLater
        );
        assert_eq!(
            after_flush(since + CLOSE_GRACE + MS, false, true, Some(since)),
            AfterFlush::Drop
        );
    }

    #[test]
    fn sweeps_come_every_interval() {
        let mut sweep = SweepClock::default();
        assert!(!sweep.due(Duration::ZERO), "not right at start");
        assert!(!sweep.due(SWEEP_INTERVAL - MS));
        assert!(sweep.due(SWEEP_INTERVAL));
        assert_eq!(sweep.next(), 2 * SWEEP_INTERVAL);
        assert!(!sweep.due(SWEEP_INTERVAL + 100 * MS));
        assert!(sweep.due(3 * SWEEP_INTERVAL));
    }
}
