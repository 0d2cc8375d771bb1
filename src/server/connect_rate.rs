//! How many new connections one address prefix may open per second.
//!
//! A cap on connections open at once does not stop a client that opens and closes them in a
//! loop, and each new connection costs the server a TLS handshake on its one thread. So each
//! prefix (see [`super::prefix`]) has a token bucket of new connections: a burst for a
//! household whose clients all reconnect after an outage, then a steady rate.
//!
//! Pure: time is an argument. Buckets that have refilled are forgotten, so the table holds
//! only prefixes that connected within the last `burst / rate` seconds.

use std::collections::HashMap;
use std::time::Duration;

use super::prefix::Prefix;
use crate::protocol::relay_budget::RelayBudget;

/// Default sustained new connections per second per prefix.
pub const DEFAULT_NEW_CONNECTIONS_PER_SEC: f64 = 10.0;
/// Default burst of new connections per prefix.
pub const DEFAULT_NEW_CONNECTIONS_BURST: f64 = 20.0;

/// The prefix opened connections faster than its rate; the connection is refused.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("{prefix} opens connections faster than {per_sec} per second")]
pub struct TooFast {
    pub prefix: Prefix,
    pub per_sec: u32,
}

/// New connections per prefix: a token bucket each.
#[derive(Debug)]
pub struct ConnectRate {
    rate: f64,
    burst: f64,
    buckets: HashMap<Prefix, (RelayBudget, Duration)>,
    /// When full buckets are next swept from the table.
    next_sweep: Duration,
}

impl ConnectRate {
    /// `rate` connections per second sustained after a burst of `burst` (both at least 1).
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
            buckets: HashMap::new(),
            next_sweep: Duration::ZERO,
        }
    }

    /// Counts a new connection from `prefix` at `now`, or refuses it when the prefix is out of
    /// tokens.
    pub fn try_admit(&mut self, now: Duration, prefix: Prefix) -> Result<(), TooFast> {
        self.sweep(now);
        let (rate, burst) = (self.rate, self.burst);
        let (bucket, last) = self
            .buckets
            .entry(prefix)
            .or_insert_with(|| (RelayBudget::new(now, burst), now));
        *last = now;
        if bucket.try_spend(now, 1, rate, burst) {
            Ok(())
        } else {
            Err(TooFast {
                prefix,
                per_sec: rate as u32,
            })
        }
    }

    /// Prefixes with a bucket that has not refilled yet.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Forgets buckets that are full again (their prefix has not connected for long enough
    /// that a fresh bucket is the same thing). At most once a second.
    fn sweep(&mut self, now: Duration) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + Duration::from_secs(1);
        let refill = Duration::from_secs_f64(self.burst / self.rate);
        self.buckets
            .retain(|_, (_, last)| now.saturating_sub(*last) < refill);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::prefix::PrefixWidths;

    const MS: Duration = Duration::from_millis(1);

    fn prefix(s: &str) -> Prefix {
        PrefixWidths::default().prefix_of(s.parse().unwrap())
    }

    #[test]
    fn a_burst_then_the_rate_and_other_prefixes_are_not_affected() {
        let mut rate = ConnectRate::new(10.0, 20.0);
        let p = prefix("203.0.113.1");
        let t = Duration::from_secs(5);
        for _ in 0..20 {
            assert!(rate.try_admit(t, p).is_ok());
        }
        assert_eq!(
            rate.try_admit(t, p),
            Err(TooFast {
                prefix: p,
                per_sec: 10
            })
        );
        assert!(rate.try_admit(t, prefix("203.0.113.2")).is_ok());
        // 100 ms later one more token is there, not two.
        assert!(rate.try_admit(t + 100 * MS, p).is_ok());
        assert!(rate.try_admit(t + 100 * MS, p).is_err());
    }

    #[test]
    fn one_ipv6_slash_64_shares_one_bucket() {
        let mut rate = ConnectRate::new(1.0, 2.0);
        let t = Duration::ZERO;
        assert!(rate.try_admit(t, prefix("2001:db8::1")).is_ok());
        assert!(rate.try_admit(t, prefix("2001:db8::2")).is_ok());
        assert!(rate.try_admit(t, prefix("2001:db8::ffff:3")).is_err());
    }

    #[test]
    fn refilled_buckets_are_forgotten() {
        let mut rate = ConnectRate::new(10.0, 20.0);
        for i in 0..100u8 {
            rate.try_admit(Duration::ZERO, prefix(&format!("198.51.100.{i}")))
                .unwrap();
        }
        assert_eq!(rate.tracked(), 100);
        // Two seconds refill a bucket of 20 at 10/s.
        rate.try_admit(Duration::from_secs(3), prefix("203.0.113.9"))
            .unwrap();
        assert_eq!(rate.tracked(), 1);
    }
}
