//! TLS handshakes in progress, bounded in number and in time.
//!
//! A connection that opens TCP and then sends nothing, or half a ClientHello, costs the server
//! a file descriptor and a slot for as long as it stays. Thousands of them must not push out
//! the clients that really connect, so a handshake holds a place here until it completes:
//! at most `per_prefix` at once from one prefix (see [`super::prefix`]), at most `global` in
//! all, each for at most `deadline`.
//!
//! When the global table is full, a new connection does not wait and is not refused: the
//! oldest handshake that has not yet sent a complete ClientHello (a *stalled* one: it has
//! cost the attacker one TCP connect) makes room for it. A real client sends its ClientHello
//! at once and is answered within one read, so it leaves the stalled set before the flood
//! behind it can push it out; only when no handshake is stalled is the oldest answered one
//! evicted.
//!
//! Pure: time is an argument; the shell closes what [`HandshakeLimit::admit`] evicts and
//! [`HandshakeLimit::expired`] returns.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::prefix::Prefix;
use super::state::SessionId;

/// Default handshakes in progress from one prefix.
pub const DEFAULT_HANDSHAKES_PER_PREFIX: usize = 8;
/// Default handshakes in progress in all.
pub const DEFAULT_HANDSHAKES: usize = 512;
/// Default time a TLS handshake may take.
pub const DEFAULT_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// The handshake limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeRules {
    pub per_prefix: usize,
    pub global: usize,
    pub deadline: Duration,
}

impl Default for HandshakeRules {
    fn default() -> Self {
        Self {
            per_prefix: DEFAULT_HANDSHAKES_PER_PREFIX,
            global: DEFAULT_HANDSHAKES,
            deadline: DEFAULT_HANDSHAKE_DEADLINE,
        }
    }
}

/// The prefix already has the maximum of handshakes in progress.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("{prefix} already has {max} TLS handshakes in progress")]
pub struct TooManyHandshakes {
    pub prefix: Prefix,
    pub max: usize,
}

#[derive(Debug, Clone, Copy)]
struct Handshake {
    prefix: Prefix,
    started: Duration,
    answered: bool,
}

/// Handshakes in progress, by session.
#[derive(Debug)]
pub struct HandshakeLimit {
    rules: HandshakeRules,
    by_session: HashMap<SessionId, Handshake>,
    /// Only prefixes with a handshake in progress: an entry never holds 0.
    per_prefix: HashMap<Prefix, usize>,
    /// (started, session) of handshakes without a complete ClientHello, oldest first.
    stalled: BTreeSet<(Duration, SessionId)>,
    /// (started, session) of answered handshakes, oldest first.
    answered: BTreeSet<(Duration, SessionId)>,
}

impl HandshakeLimit {
    /// Caps below 1 are raised to 1.
    pub fn new(rules: HandshakeRules) -> Self {
        Self {
            rules: HandshakeRules {
                per_prefix: rules.per_prefix.max(1),
                global: rules.global.max(1),
                deadline: rules.deadline,
            },
            by_session: HashMap::new(),
            per_prefix: HashMap::new(),
            stalled: BTreeSet::new(),
            answered: BTreeSet::new(),
        }
    }

    /// Handshakes in progress.
    pub fn len(&self) -> usize {
        self.by_session.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_session.is_empty()
    }

    /// Whether `prefix` has as many handshakes in progress as it may.
    pub fn is_full(&self, prefix: Prefix) -> bool {
        self.per_prefix.get(&prefix).copied().unwrap_or(0) >= self.rules.per_prefix
    }

    /// A new connection `id` from `prefix` starts its handshake at `now`. Refused when the
    /// prefix is at its cap; when the global table is full, the handshake that has to make
    /// room is returned: the shell closes it (it is already forgotten here).
    pub fn admit(
        &mut self,
        now: Duration,
        id: SessionId,
        prefix: Prefix,
    ) -> Result<Option<SessionId>, TooManyHandshakes> {
        if self.is_full(prefix) {
            return Err(TooManyHandshakes {
                prefix,
                max: self.rules.per_prefix,
            });
        }
        let evicted = if self.by_session.len() >= self.rules.global {
            let oldest = self
                .stalled
                .first()
                .or_else(|| self.answered.first())
                .map(|&(_, id)| id);
            if let Some(old) = oldest {
                self.finished(old);
            }
            oldest
        } else {
            None
        };
        self.by_session.insert(
            id,
            Handshake {
                prefix,
                started: now,
                answered: false,
            },
        );
        *self.per_prefix.entry(prefix).or_default() += 1;
        self.stalled.insert((now, id));
        Ok(evicted)
    }

    /// `id` sent a complete ClientHello and was answered: it is no longer first in line for
    /// eviction. Unknown sessions are ignored.
    pub fn answered(&mut self, id: SessionId) {
        if let Some(h) = self.by_session.get_mut(&id) {
            if !h.answered {
                h.answered = true;
                self.stalled.remove(&(h.started, id));
                self.answered.insert((h.started, id));
            }
        }
    }

    /// `id` completed its handshake, or its connection is gone: it no longer counts. Calling
    /// it again, or for a session never admitted, does nothing.
    pub fn finished(&mut self, id: SessionId) {
        let Some(h) = self.by_session.remove(&id) else {
            return;
        };
        self.stalled.remove(&(h.started, id));
        self.answered.remove(&(h.started, id));
        if let Some(n) = self.per_prefix.get_mut(&h.prefix) {
            *n -= 1;
            if *n == 0 {
                self.per_prefix.remove(&h.prefix);
            }
        }
    }

    /// Whether `id` is still handshaking (admitted and not finished).
    pub fn contains(&self, id: SessionId) -> bool {
        self.by_session.contains_key(&id)
    }

    /// When the oldest handshake runs out of time; `None` with none in progress.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let first = |s: &BTreeSet<(Duration, SessionId)>| s.first().map(|&(t, _)| t);
        let oldest = match (first(&self.stalled), first(&self.answered)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        oldest.map(|t| t + self.rules.deadline)
    }

    /// Handshakes older than the deadline at `now`, forgotten here: the shell closes them.
    pub fn expired(&mut self, now: Duration) -> Vec<SessionId> {
        let deadline = self.rules.deadline;
        let late = |s: &BTreeSet<(Duration, SessionId)>| -> Vec<SessionId> {
            s.iter()
                .take_while(|(t, _)| now.saturating_sub(*t) >= deadline)
                .map(|&(_, id)| id)
                .collect()
        };
        let mut out = late(&self.stalled);
        out.extend(late(&self.answered));
        for &id in &out {
            self.finished(id);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::prefix::PrefixWidths;

    const MS: Duration = Duration::from_millis(1);

    fn prefix(n: u32) -> Prefix {
        PrefixWidths::default().prefix_of(std::net::Ipv4Addr::from(0x7f00_0000 | n).into())
    }

    fn limit(per_prefix: usize, global: usize) -> HandshakeLimit {
        HandshakeLimit::new(HandshakeRules {
            per_prefix,
            global,
            deadline: Duration::from_secs(5),
        })
    }

    #[test]
    fn a_prefix_is_capped_and_a_finished_handshake_frees_its_place() {
        let mut hs = limit(2, 100);
        assert_eq!(hs.admit(Duration::ZERO, 1, prefix(2)), Ok(None));
        assert_eq!(hs.admit(Duration::ZERO, 2, prefix(2)), Ok(None));
        assert_eq!(
            hs.admit(Duration::ZERO, 3, prefix(2)),
            Err(TooManyHandshakes {
                prefix: prefix(2),
                max: 2
            })
        );
        assert_eq!(hs.admit(Duration::ZERO, 4, prefix(3)), Ok(None));
        hs.finished(1);
        hs.finished(1);
        assert_eq!(hs.admit(Duration::ZERO, 5, prefix(2)), Ok(None));
        assert!(hs.admit(Duration::ZERO, 6, prefix(2)).is_err());
        assert_eq!(hs.len(), 3);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_stalled_handshake_not_an_answered_one() {
        let mut hs = limit(8, 3);
        hs.admit(Duration::ZERO, 1, prefix(1)).unwrap();
        hs.admit(MS, 2, prefix(2)).unwrap();
        hs.admit(2 * MS, 3, prefix(3)).unwrap();
        // The oldest sent its ClientHello: it is kept, the next oldest goes.
        hs.answered(1);
        assert_eq!(hs.admit(3 * MS, 4, prefix(4)), Ok(Some(2)));
        assert!(!hs.contains(2));
        assert_eq!(hs.admit(4 * MS, 5, prefix(5)), Ok(Some(3)));
        assert_eq!(hs.admit(5 * MS, 6, prefix(6)), Ok(Some(4)));
        // Only answered ones left after the stalled go: then the oldest answered.
        hs.answered(5);
        hs.answered(6);
        assert_eq!(hs.admit(6 * MS, 7, prefix(7)), Ok(Some(1)));
        assert_eq!(hs.len(), 3);
    }

    #[test]
    fn ten_thousand_stalled_handshakes_cannot_push_out_an_answered_one() {
        let mut hs = limit(8, 512);
        hs.admit(Duration::ZERO, 0, prefix(1)).unwrap();
        hs.answered(0);
        for i in 1..10_000u64 {
            let evicted = hs
                .admit(i as u32 * MS / 10, i, prefix(2 + i as u32 / 8))
                .unwrap();
            assert_ne!(evicted, Some(0), "the real client was evicted at {i}");
        }
        assert!(hs.contains(0));
        assert_eq!(hs.len(), 512);
    }

    #[test]
    fn handshakes_past_the_deadline_expire() {
        let mut hs = limit(8, 100);
        hs.admit(Duration::ZERO, 1, prefix(1)).unwrap();
        hs.admit(Duration::from_secs(1), 2, prefix(1)).unwrap();
        hs.answered(2);
        assert_eq!(hs.poll_timeout(), Some(Duration::from_secs(5)));
        assert!(hs.expired(Duration::from_secs(4)).is_empty());
        assert_eq!(hs.expired(Duration::from_secs(5)), vec![1]);
        assert_eq!(hs.poll_timeout(), Some(Duration::from_secs(6)));
        assert_eq!(hs.expired(Duration::from_secs(6)), vec![2]);
        assert_eq!(hs.poll_timeout(), None);
        assert!(hs.is_empty());
        assert!(!hs.is_full(prefix(1)));
    }
}
