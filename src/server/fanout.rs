//! When lobby-wide presence news goes out.
//!
//! Every join and leave is news for every identified client (the live overview), but only the
//! members of the channel concerned need it at once. On a big server, writing each event to
//! each client as it happens costs one TLS record and one `write` per client per event: at
//! 10,000 clients and a few dozen joins a second that alone fills a core, and the channel's own
//! members wait behind the rest of the lobby. So the shell sends an event promptly to the
//! channel concerned and keeps it back for everyone else, who get everything that accumulated
//! in one record after [`batch_delay`]. The delay grows with the number of clients, which caps
//! these batched writes at about [`BATCHED_WRITES_PER_SEC`] however busy the server is.
//!
//! Pure: time is an argument; the shell owns the sockets.

use std::collections::VecDeque;
use std::time::Duration;

use super::state::SessionId;

/// Batched writes per second the delay aims for at most: about a tenth of one core for TLS
/// sealing and `write` on the machine in docs/BENCHMARKS.md.
pub const BATCHED_WRITES_PER_SEC: u64 = 20_000;

/// Small servers still batch for a moment: a burst of joins (a team arriving) goes out as one.
pub const MIN_BATCH_DELAY: Duration = Duration::from_millis(10);

/// A person watching another channel's member list never waits longer than this.
pub const MAX_BATCH_DELAY: Duration = Duration::from_millis(500);

/// Wall time per tick the shell spends writing batches of presence news. One broadcast starts
/// a batch at every client at once; written in one go, 10,000 of them would hold the tick (and
/// every join waiting behind it) for well over 100 ms. A millisecond a tick still writes tens
/// of thousands a second, more than [`BATCHED_WRITES_PER_SEC`] asks for.
pub const BATCH_TIME_BUDGET: Duration = Duration::from_millis(1);

/// Batches taken from the queue between two looks at the clock: reading the clock per batch
/// would cost more than some of the writes.
pub const BATCH_CHUNK: usize = 16;

/// How long a client's batch of lobby-wide news may wait, given how many clients there are.
pub fn batch_delay(sessions: usize) -> Duration {
    let micros = sessions as u64 * 1_000_000 / BATCHED_WRITES_PER_SEC;
    Duration::from_micros(micros).clamp(MIN_BATCH_DELAY, MAX_BATCH_DELAY)
}

/// Sessions with news kept back, in the order their batches fall due.
#[derive(Debug, Default)]
pub struct Batches {
    queue: VecDeque<(Duration, SessionId)>,
}

impl Batches {
    /// `id` has just started a batch at `now`; it falls due after [`batch_delay`].
    pub fn schedule(&mut self, id: SessionId, now: Duration, sessions: usize) {
        self.queue.push_back((now + batch_delay(sessions), id));
    }

    /// Moves up to `budget` sessions whose batch is due at `now` into `out`, oldest first.
    /// The budget keeps one tick short when many batches fall due together (one broadcast
    /// starts a batch at every client at once); the rest go out over the next ticks.
    pub fn take_due(&mut self, now: Duration, budget: usize, out: &mut Vec<SessionId>) {
        let mut taken = 0;
        while taken < budget {
            match self.queue.front() {
                Some(&(due, id)) if due <= now => {
                    self.queue.pop_front();
                    out.push(id);
                    taken += 1;
                }
                _ => break,
            }
        }
    }

    /// The next chunk (up to [`BATCH_CHUNK`]) of sessions whose batch is due at `now`, into
    /// `out` (cleared first), unless the shell has already `spent` [`BATCH_TIME_BUDGET`] of
    /// this tick writing batches. False when there is nothing more to write this tick; what is
    /// left stays queued, in order, for the next. The first chunk of a tick is always given,
    /// so the queue moves however slow the writes are.
    pub fn next_chunk(&mut self, now: Duration, spent: Duration, out: &mut Vec<SessionId>) -> bool {
        out.clear();
        if spent >= BATCH_TIME_BUDGET {
            return false;
        }
        self.take_due(now, BATCH_CHUNK, out);
        !out.is_empty()
    }

    /// When the oldest batch falls due, if any is scheduled.
    pub fn next_due(&self) -> Option<Duration> {
        self.queue.front().map(|&(due, _)| due)
    }

    /// True when no batch is scheduled (a batch pushed out early by a prompt message keeps
    /// its slot until the slot comes up).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delay_grows_with_the_server_and_stays_bounded() {
        assert_eq!(batch_delay(0), MIN_BATCH_DELAY);
        assert_eq!(batch_delay(10), MIN_BATCH_DELAY);
        assert_eq!(batch_delay(10_000), MAX_BATCH_DELAY);
        assert_eq!(batch_delay(5_000), 250 * MS);
        assert_eq!(batch_delay(1_000_000), MAX_BATCH_DELAY);
        // The cap on batched writes holds wherever the delay is not clamped.
        for n in [1_000usize, 5_000, 10_000] {
            let per_sec = n as f64 / batch_delay(n).as_secs_f64();
            assert!(
                per_sec <= BATCHED_WRITES_PER_SEC as f64 + 1.0,
                "{n}: {per_sec}"
            );
        }
    }

    #[test]
    fn batches_fall_due_in_order_after_the_delay() {
        let mut b = Batches::default();
        b.schedule(1, Duration::ZERO, 100);
        b.schedule(2, 3 * MS, 100);
        let mut out = Vec::new();
        b.take_due(9 * MS, 10, &mut out);
        assert!(out.is_empty(), "nothing is due before the delay");
        b.take_due(10 * MS, 10, &mut out);
        assert_eq!(out, vec![1]);
        b.take_due(13 * MS, 10, &mut out);
        assert_eq!(out, vec![1, 2]);
        assert!(b.is_empty());
    }

    /// The shell writes chunks until the time budget is spent; the rest waits for the next
    /// tick, first come first served.
    #[test]
    fn the_time_budget_ends_a_tick_and_the_rest_waits_in_order() {
        let mut b = Batches::default();
        for id in 0..100 {
            b.schedule(id, Duration::ZERO, 100);
        }
        let now = batch_delay(100);
        assert_eq!(b.next_due(), Some(now));
        // Each chunk costs 0.4 ms of writing: three chunks fit before the budget is spent.
        let per_chunk = BATCH_TIME_BUDGET * 2 / 5;
        let mut chunk = Vec::new();
        let mut tick = Vec::new();
        let mut spent = Duration::ZERO;
        while b.next_chunk(now, spent, &mut chunk) {
            assert!(chunk.len() <= BATCH_CHUNK);
            tick.extend_from_slice(&chunk);
            spent += per_chunk;
        }
        assert_eq!(tick, (0..3 * BATCH_CHUNK as u64).collect::<Vec<_>>());
        // Next tick starts with a fresh budget where this one stopped.
        assert!(b.next_chunk(now, Duration::ZERO, &mut chunk));
        assert_eq!(chunk[0], 3 * BATCH_CHUNK as u64);
    }

    #[test]
    fn a_tick_always_writes_one_chunk_however_slow_and_none_early() {
        let mut b = Batches::default();
        b.schedule(1, Duration::ZERO, 10);
        let mut chunk = vec![99];
        assert!(!b.next_chunk(Duration::ZERO, Duration::ZERO, &mut chunk));
        assert!(chunk.is_empty(), "not due yet");
        assert!(b.next_chunk(MIN_BATCH_DELAY, Duration::ZERO, &mut chunk));
        assert_eq!(chunk, vec![1]);
        assert!(!b.next_chunk(MIN_BATCH_DELAY, Duration::ZERO, &mut chunk));
        b.schedule(2, Duration::ZERO, 10);
        assert!(
            !b.next_chunk(MIN_BATCH_DELAY, BATCH_TIME_BUDGET, &mut chunk),
            "spent"
        );
        assert_eq!(b.next_due(), Some(MIN_BATCH_DELAY));
    }

    #[test]
    fn the_budget_spreads_a_crowd_over_ticks() {
        let mut b = Batches::default();
        for id in 0..1000 {
            b.schedule(id, Duration::ZERO, 1000);
        }
        let now = batch_delay(1000);
        let mut ticks = 0;
        let mut seen = Vec::new();
        while !b.is_empty() {
            let before = seen.len();
            b.take_due(now, 300, &mut seen);
            assert!(seen.len() - before <= 300);
            ticks += 1;
        }
        assert_eq!(ticks, 4);
        assert_eq!(
            seen,
            (0..1000).collect::<Vec<_>>(),
            "first come, first served"
        );
    }
}
