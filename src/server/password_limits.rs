//! How many channel passwords are being checked at once, and who is locked out after wrong
//! guesses.
//!
//! Each check is an argon2 hash, slow on purpose, run by a small worker pool
//! ([`super::password_pool`]). Two limits keep that pool from being a queue without end:
//! at most `max_checks` in flight in all and `max_checks_per_prefix` from one prefix (see
//! [`super::prefix`]). A join over either is answered at once with
//! [`Status::ServerBusy`](crate::protocol::Status::ServerBusy) ("try again in a moment"),
//! never queued.
//!
//! Wrong guesses lock out per (prefix, channel), and only verifications that really failed
//! count (a refused or pending join is no guess). The first `free_failures` cost nothing;
//! each further one locks that prefix out of that channel for `lockout_base`, doubling with
//! every failure up to `lockout_max`. So an attacker behind a shared NAT or a carrier NAT
//! gets at most one guess per `lockout_max` per channel, while everyone else behind the same
//! address can still join every other channel, and this one again within `lockout_max`.
//! A right password clears the record; a record without failures for `forget_after` is
//! dropped.
//!
//! Pure: time is an argument, tickets and channels are plain numbers from
//! [`ServerState`](super::state::ServerState).

use std::collections::HashMap;
use std::time::Duration;

use super::prefix::Prefix;

/// Default password checks in flight in all.
pub const DEFAULT_MAX_CHECKS: usize = 32;
/// Default password checks in flight from one prefix.
pub const DEFAULT_MAX_CHECKS_PER_PREFIX: usize = 4;
/// Default wrong passwords per (prefix, channel) before the lockout starts.
pub const DEFAULT_FREE_FAILURES: u32 = 5;
/// Default first lockout; it doubles with each further failure.
pub const DEFAULT_LOCKOUT_BASE: Duration = Duration::from_secs(1);
/// Default longest lockout.
pub const DEFAULT_LOCKOUT_MAX: Duration = Duration::from_secs(60);
/// Default time after the last failure when a record is forgotten.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(600);

/// The password-check limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordRules {
    pub max_checks: usize,
    pub max_checks_per_prefix: usize,
    pub free_failures: u32,
    pub lockout_base: Duration,
    pub lockout_max: Duration,
    pub forget_after: Duration,
}

impl Default for PasswordRules {
    fn default() -> Self {
        Self {
            max_checks: DEFAULT_MAX_CHECKS,
            max_checks_per_prefix: DEFAULT_MAX_CHECKS_PER_PREFIX,
            free_failures: DEFAULT_FREE_FAILURES,
            lockout_base: DEFAULT_LOCKOUT_BASE,
            lockout_max: DEFAULT_LOCKOUT_MAX,
            forget_after: DEFAULT_FORGET_AFTER,
        }
    }
}

/// Why a password is not checked now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CheckRefusal {
    /// Too many wrong guesses from this prefix for this channel.
    #[error("locked out of this channel until {until:?} after wrong passwords")]
    LockedOut { until: Duration },
    /// The server checks as many passwords as it may (in all, or for this prefix).
    #[error("the server is busy checking passwords")]
    Busy,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Duration,
    locked_until: Duration,
}

/// Checks in flight and failure records.
#[derive(Debug, Default)]
pub struct PasswordChecks {
    rules: PasswordRules,
    /// ticket -> (prefix, channel) of each check the workers have not answered yet.
    in_flight: HashMap<u64, (Prefix, usize)>,
    /// Only prefixes with a check in flight: an entry never holds 0.
    per_prefix: HashMap<Prefix, usize>,
    failures: HashMap<(Prefix, usize), Failures>,
}

impl PasswordChecks {
    pub fn new(rules: PasswordRules) -> Self {
        Self {
            rules: PasswordRules {
                max_checks: rules.max_checks.max(1),
                max_checks_per_prefix: rules.max_checks_per_prefix.max(1),
                ..rules
            },
            ..Self::default()
        }
    }

    /// Whether a password from `prefix` for `channel` may be checked at `now`.
    pub fn may_check(
        &self,
        now: Duration,
        prefix: Prefix,
        channel: usize,
    ) -> Result<(), CheckRefusal> {
        if let Some(f) = self.failures.get(&(prefix, channel)) {
            if now < f.locked_until {
                return Err(CheckRefusal::LockedOut {
                    until: f.locked_until,
                });
            }
        }
        let from_prefix = self.per_prefix.get(&prefix).copied().unwrap_or(0);
        if self.in_flight.len() >= self.rules.max_checks
            || from_prefix >= self.rules.max_checks_per_prefix
        {
            return Err(CheckRefusal::Busy);
        }
        Ok(())
    }

    /// A check with `ticket` went to the workers (after [`Self::may_check`] said yes).
    pub fn start(&mut self, ticket: u64, prefix: Prefix, channel: usize) {
        if self.in_flight.insert(ticket, (prefix, channel)).is_none() {
            *self.per_prefix.entry(prefix).or_default() += 1;
        }
    }

    /// The workers answered `ticket` at `now` (whether or not its session is still there):
    /// the check no longer counts, and a wrong password is recorded against its prefix and
    /// channel. Unknown tickets are ignored.
    pub fn finish(&mut self, now: Duration, ticket: u64, ok: bool) {
        let Some((prefix, channel)) = self.in_flight.remove(&ticket) else {
            return;
        };
        if let Some(n) = self.per_prefix.get_mut(&prefix) {
            *n -= 1;
            if *n == 0 {
                self.per_prefix.remove(&prefix);
            }
        }
        if ok {
            self.failures.remove(&(prefix, channel));
            return;
        }
        let rules = self.rules;
        let f = self.failures.entry((prefix, channel)).or_insert(Failures {
            count: 0,
            last: now,
            locked_until: Duration::ZERO,
        });
        f.count += 1;
        f.last = now;
        if let Some(beyond) = f.count.checked_sub(rules.free_failures + 1) {
            let lockout = rules
                .lockout_base
                .saturating_mul(1u32 << beyond.min(20))
                .min(rules.lockout_max);
            f.locked_until = now + lockout;
        }
    }

    /// Checks in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// When a failure record is next due to be forgotten; `None` with none kept.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.failures
            .values()
            .map(|f| f.last + self.rules.forget_after)
            .min()
    }

    /// Forgets failure records without a failure for `forget_after`.
    pub fn handle_timeout(&mut self, now: Duration) {
        let forget = self.rules.forget_after;
        self.failures
            .retain(|_, f| now.saturating_sub(f.last) < forget);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::prefix::PrefixWidths;

    const S: Duration = Duration::from_secs(1);

    fn prefix(s: &str) -> Prefix {
        PrefixWidths::default().prefix_of(s.parse().unwrap())
    }

    fn fail(checks: &mut PasswordChecks, now: Duration, ticket: u64, p: Prefix, channel: usize) {
        checks.may_check(now, p, channel).unwrap();
        checks.start(ticket, p, channel);
        checks.finish(now, ticket, false);
    }

    #[test]
    fn checks_in_flight_are_capped_globally_and_per_prefix() {
        let mut checks = PasswordChecks::new(PasswordRules {
            max_checks: 3,
            max_checks_per_prefix: 2,
            ..PasswordRules::default()
        });
        let (a, b, c) = (
            prefix("203.0.113.1"),
            prefix("203.0.113.2"),
            prefix("203.0.113.3"),
        );
        checks.start(1, a, 0);
        checks.start(2, a, 0);
        assert_eq!(checks.may_check(S, a, 0), Err(CheckRefusal::Busy));
        assert_eq!(checks.may_check(S, b, 0), Ok(()));
        checks.start(3, b, 0);
        assert_eq!(
            checks.may_check(S, c, 0),
            Err(CheckRefusal::Busy),
            "global cap"
        );
        // An answer frees its place, whoever asked.
        checks.finish(S, 1, true);
        assert_eq!(checks.may_check(S, c, 0), Ok(()));
        assert_eq!(checks.may_check(S, a, 0), Ok(()));
        assert_eq!(checks.in_flight(), 2);
        checks.finish(S, 99, false);
        assert_eq!(checks.in_flight(), 2, "unknown tickets change nothing");
    }

    #[test]
    fn the_lockout_starts_after_the_free_failures_and_doubles_up_to_the_max() {
        let mut checks = PasswordChecks::new(PasswordRules {
            free_failures: 2,
            lockout_base: S,
            lockout_max: 4 * S,
            ..PasswordRules::default()
        });
        let p = prefix("203.0.113.1");
        let mut now = Duration::ZERO;
        fail(&mut checks, now, 1, p, 0);
        fail(&mut checks, now, 2, p, 0);
        assert_eq!(checks.may_check(now, p, 0), Ok(()), "two free failures");
        for (ticket, expected) in (3..).zip([1, 2, 4, 4]) {
            fail(&mut checks, now, ticket, p, 0);
            let until = now + expected * S;
            assert_eq!(
                checks.may_check(now, p, 0),
                Err(CheckRefusal::LockedOut { until })
            );
            assert!(checks
                .may_check(until - Duration::from_millis(1), p, 0)
                .is_err());
            now = until;
            assert_eq!(checks.may_check(now, p, 0), Ok(()));
        }
    }

    #[test]
    fn a_lockout_is_per_prefix_and_channel_and_a_right_password_clears_it() {
        let mut checks = PasswordChecks::new(PasswordRules {
            free_failures: 0,
            ..PasswordRules::default()
        });
        let nat = prefix("203.0.113.1");
        fail(&mut checks, Duration::ZERO, 1, nat, 0);
        assert!(checks.may_check(Duration::ZERO, nat, 0).is_err());
        // Others behind the same address can still join another channel; other addresses
        // this one.
        assert_eq!(checks.may_check(Duration::ZERO, nat, 1), Ok(()));
        assert_eq!(
            checks.may_check(Duration::ZERO, prefix("203.0.113.2"), 0),
            Ok(())
        );
        // Once the lockout is over, a right password clears the record.
        checks.start(2, nat, 0);
        checks.finish(S, 2, true);
        fail(&mut checks, S, 3, nat, 0);
        assert_eq!(
            checks.may_check(S, nat, 0),
            Err(CheckRefusal::LockedOut { until: 2 * S }),
            "back to the first lockout"
        );
    }

    #[test]
    fn only_failed_verifications_count() {
        let mut checks = PasswordChecks::new(PasswordRules {
            free_failures: 0,
            ..PasswordRules::default()
        });
        let p = prefix("203.0.113.1");
        // Asking many times, and a check still running, lock nobody out.
        for _ in 0..100 {
            assert_eq!(checks.may_check(Duration::ZERO, p, 0), Ok(()));
        }
        checks.start(1, p, 0);
        assert_eq!(checks.may_check(Duration::ZERO, p, 0), Ok(()));
    }

    #[test]
    fn old_records_are_forgotten() {
        let mut checks = PasswordChecks::new(PasswordRules {
            free_failures: 0,
            lockout_max: 1000 * S,
            lockout_base: 1000 * S,
            forget_after: 10 * S,
            ..PasswordRules::default()
        });
        let p = prefix("203.0.113.1");
        fail(&mut checks, Duration::ZERO, 1, p, 0);
        assert_eq!(checks.poll_timeout(), Some(10 * S));
        checks.handle_timeout(9 * S);
        assert!(checks.may_check(9 * S, p, 0).is_err());
        checks.handle_timeout(10 * S);
        assert_eq!(checks.poll_timeout(), None);
        assert_eq!(checks.may_check(10 * S, p, 0), Ok(()));
    }
}
