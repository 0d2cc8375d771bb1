//! How much a relay forwards: a token bucket of bytes, shared by the two kinds of relay (a
//! member bridging two others, and the server) so that neither can be turned into a flood.
//! Pure: time is an argument.

use std::time::Duration;

/// A token bucket of bytes: `rate` bytes per second sustained, `burst` at once.
#[derive(Debug, Clone, Copy)]
pub struct RelayBudget {
    tokens: f64,
    counted_at: Duration,
}

impl RelayBudget {
    /// A full bucket of `burst` bytes at `now`.
    pub fn new(now: Duration, burst: f64) -> Self {
        Self {
            tokens: burst,
            counted_at: now,
        }
    }

    /// Takes `len` bytes from the bucket if they are there, refilling it at `rate` bytes per
    /// second since the last call, up to `burst`.
    pub fn try_spend(&mut self, now: Duration, len: usize, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_sub(self.counted_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.counted_at = now;
        let len = len as f64;
        if self.tokens >= len {
            self.tokens -= len;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_the_rate_and_its_burst_and_refills_with_time() {
        let (rate, burst) = (10_000.0, 10_000.0);
        let mut budget = RelayBudget::new(Duration::ZERO, burst);
        let sent = (0..200)
            .filter(|_| budget.try_spend(Duration::ZERO, 100, rate, burst))
            .count();
        assert_eq!(sent, 100, "the burst, then nothing");
        assert!(!budget.try_spend(Duration::from_millis(5), 100, rate, burst));
        assert!(budget.try_spend(Duration::from_millis(15), 100, rate, burst));
        // Two seconds later the bucket is full again, not fuller.
        let sent = (0..200)
            .filter(|_| budget.try_spend(Duration::from_secs(2), 100, rate, burst))
            .count();
        assert_eq!(sent, 100);
    }
}
