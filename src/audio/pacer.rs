//! Real-time pacing for virtual devices: turns a monotonic clock into "chunks due now".

use std::time::{Duration, Instant};

/// Counts how many fixed-length chunks a virtual device owes at a given instant.
///
/// Exists so file, tone and null devices behave like hardware: one chunk per period on
/// average, whatever the thread's wake-up jitter. Invariants: the schedule is anchored to the
/// start instant (chunk `k` is due at `start + k * period`), so lateness never accumulates into
/// drift; a late thread catches up with a burst of at most `max_burst` chunks, and chunks
/// beyond that are skipped (counted) rather than replayed in a flood.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    period: Duration,
    issued: u64,
    max_burst: u64,
    skipped: u64,
}

impl Pacer {
    /// A schedule whose first chunk is due one `period` after `start`.
    pub fn new(start: Instant, period: Duration, max_burst: u64) -> Self {
        Self {
            start,
            period: period.max(Duration::from_micros(100)),
            issued: 0,
            max_burst: max_burst.max(1),
            skipped: 0,
        }
    }

    /// Number of chunks to process at `now`; the caller must process exactly that many.
    pub fn due(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let target = (elapsed / self.period.as_nanos()) as u64;
        let owed = target.saturating_sub(self.issued);
        if owed > self.max_burst {
            self.skipped += owed - self.max_burst;
            self.issued = target;
            self.max_burst
        } else {
            self.issued += owed;
            owed
        }
    }

    /// When the next chunk becomes due.
    pub fn next_deadline(&self) -> Instant {
        let nanos = self.period.as_nanos() * u128::from(self.issued + 1);
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Chunks skipped because the thread was too late to catch up.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_MS: Duration = Duration::from_millis(10);

    #[test]
    fn jittery_wakeups_over_ten_simulated_minutes_do_not_drift() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, TEN_MS, 50);
        let mut t = start;
        let mut total = 0;
        // Wake-ups that are always a little late, by 0..7 ms in a repeating pattern.
        for i in 0..60_000u64 {
            t = pacer.next_deadline() + Duration::from_micros((i * 1_337) % 7_000);
            total += pacer.due(t);
        }
        let expected = (t - start).as_nanos() / TEN_MS.as_nanos();
        assert_eq!(u128::from(total), expected);
        assert_eq!(pacer.skipped(), 0);
    }

    #[test]
    fn a_late_thread_catches_up_in_a_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, TEN_MS, 50);
        assert_eq!(pacer.due(start + Duration::from_millis(5)), 0);
        assert_eq!(pacer.due(start + Duration::from_millis(95)), 9);
        assert_eq!(pacer.due(start + Duration::from_millis(99)), 0);
        assert_eq!(pacer.next_deadline(), start + Duration::from_millis(100));
    }

    #[test]
    fn a_stall_longer_than_the_burst_limit_skips_the_excess() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, TEN_MS, 5);
        assert_eq!(pacer.due(start + Duration::from_secs(1)), 5);
        assert_eq!(pacer.skipped(), 95);
        assert_eq!(pacer.due(start + Duration::from_millis(1010)), 1);
    }

    #[test]
    fn real_clock_run_issues_about_one_chunk_per_period() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, TEN_MS, 50);
        let mut total = 0;
        while start.elapsed() < Duration::from_millis(300) {
            total += pacer.due(Instant::now());
            std::thread::sleep(
                pacer
                    .next_deadline()
                    .saturating_duration_since(Instant::now()),
            );
        }
        total += pacer.due(Instant::now());
        let expected = start.elapsed().as_millis() as u64 / 10;
        assert!(
            total.abs_diff(expected) <= 2,
            "{total} chunks, expected {expected}"
        );
    }
}
