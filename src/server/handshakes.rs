//! TLS handshakes in progress, bounded in number and in time.
//!
//! A connection that opens TCP and then sends nothing, or half a ClientHello, costs the server
//! a file descriptor and a slot for as long as it stays. Thousands of them must not push out
//! the clients that really connect, so a handshake holds a place here until it completes:
//! at most `per_prefix` at once from one prefix (see [`super::prefix`]), at most `global` in
//! all, each for at most `deadline`.
//!
//! When the global table is full, a new connection does not wait and is not refused: the
//! handshake that has gone longest without progress makes room for it. Progress is being
//! accepted, then having a complete ClientHello read and answered. A real client sends its
//! ClientHello at once and its Finished one round trip after the answer, so it is always
//! among the most recent to progress, and the whole table has to turn over before it can be
//! pushed out; an attacker's handshake stops progressing (nothing sent, half a ClientHello, or
//! no Finished after the answer) and goes first. Preferring only the handshakes that never
//! sent a complete ClientHello would not do: a flood of complete ClientHellos fills the table
//! with answered attackers, and every newcomer would then be the first to go.
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
    /// When it last made progress (accepted, answered).
    progressed: Duration,
    answered: bool,
}

/// Handshakes in progress, by session.
#[derive(Debug)]
pub struct HandshakeLimit {
    rules: HandshakeRules,
    by_session: HashMap<SessionId, Handshake>,
    /// Only prefixes with a handshake in progress: an entry never holds 0.
    per_prefix: HashMap<Prefix, usize>,
    /// (started, session), oldest first: the deadline order.
    by_start: BTreeSet<(Duration, SessionId)>,
    /// (last progress, session), least recent first: the eviction order.
    by_progress: BTreeSet<(Duration, SessionId)>,
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
            by_start: BTreeSet::new(),
            by_progress: BTreeSet::new(),
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
    /// prefix is at its cap; when the global table is full, the handshake that has gone
    /// longest without progress makes room and is returned: the shell closes it (it is
    /// already forgotten here).
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
            let oldest = self.by_progress.first().map(|&(_, id)| id);
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
                progressed: now,
                answered: false,
            },
        );
        *self.per_prefix.entry(prefix).or_default() += 1;
        self.by_start.insert((now, id));
        self.by_progress.insert((now, id));
        Ok(evicted)
    }

    /// `id` sent a complete ClientHello and was answered at `now`: it goes to the back of the
    /// eviction line. Only the first answer counts (a handshake has one ClientHello); unknown
    /// sessions are ignored.
    pub fn answered(&mut self, now: Duration, id: SessionId) {
        if let Some(h) = self.by_session.get_mut(&id) {
            if !h.answered {
                h.answered = true;
                self.by_progress.remove(&(h.progressed, id));
                h.progressed = now;
                self.by_progress.insert((now, id));
            }
        }
    }

    /// `id` completed its handshake, or its connection is gone: it no longer counts. Calling
    /// it again, or for a session never admitted, does nothing.
    pub fn finished(&mut self, id: SessionId) {
        let Some(h) = self.by_session.remove(&id) else {
            return;
        };
        self.by_start.remove(&(h.started, id));
        self.by_progress.remove(&(h.progressed, id));
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
        self.by_start
            .first()
            .map(|&(started, _)| started + self.rules.deadline)
    }

    /// Handshakes older than the deadline at `now`, forgotten here: the shell closes them.
    pub fn expired(&mut self, now: Duration) -> Vec<SessionId> {
        let deadline = self.rules.deadline;
        let out: Vec<SessionId> = self
            .by_start
            .iter()
            .take_while(|(t, _)| now.saturating_sub(*t) >= deadline)
            .map(|&(_, id)| id)
            .collect();
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
    fn a_full_table_evicts_the_handshake_that_progressed_least_recently() {
        let mut hs = limit(8, 3);
        hs.admit(Duration::ZERO, 1, prefix(1)).unwrap();
        hs.admit(MS, 2, prefix(2)).unwrap();
        hs.admit(2 * MS, 3, prefix(3)).unwrap();
        // The oldest is answered now: it goes to the back of the line.
        hs.answered(3 * MS, 1);
        assert_eq!(hs.admit(4 * MS, 4, prefix(4)), Ok(Some(2)));
        assert!(!hs.contains(2));
        assert_eq!(hs.admit(5 * MS, 5, prefix(5)), Ok(Some(3)));
        assert_eq!(hs.admit(6 * MS, 6, prefix(6)), Ok(Some(1)));
        // A second answer does not move it again.
        hs.answered(7 * MS, 4);
        hs.answered(8 * MS, 4);
        assert_eq!(hs.admit(9 * MS, 7, prefix(7)), Ok(Some(5)));
        assert_eq!(hs.len(), 3);
    }

    /// A flood of stalled handshakes (nothing sent) and one of answered ones (a complete
    /// ClientHello, then nothing): either way a newcomer that answers within a few hundred
    /// arrivals is never the one evicted.
    #[test]
    fn ten_thousand_stalled_or_answered_handshakes_cannot_push_out_a_progressing_one() {
        for flood_answers in [false, true] {
            let mut hs = limit(8, 512);
            let mut t = Duration::ZERO;
            let mut next_id = 1u64;
            let mut arrive = |hs: &mut HandshakeLimit, t: Duration| {
                let id = next_id;
                next_id += 1;
                let evicted = hs.admit(t, id, prefix(2 + id as u32 / 8)).unwrap();
                if flood_answers {
                    hs.answered(t, id);
                }
                evicted
            };
            for _ in 0..1_000 {
                t += MS / 10;
                arrive(&mut hs, t);
            }
            // A newcomer arrives, is answered 100 arrivals later, finishes 100 after that.
            hs.admit(t, 0, prefix(1)).unwrap();
            for step in 0..9_000 {
                t += MS / 10;
                assert_ne!(arrive(&mut hs, t), Some(0), "flood_answers {flood_answers}");
                if step == 100 {
                    hs.answered(t, 0);
                }
                if step == 200 {
                    assert!(hs.contains(0));
                    hs.finished(0);
                }
            }
            assert_eq!(hs.len(), 512);
        }
    }

    #[test]
    fn handshakes_past_the_deadline_expire() {
        let mut hs = limit(8, 100);
        hs.admit(Duration::ZERO, 1, prefix(1)).unwrap();
        hs.admit(Duration::from_secs(1), 2, prefix(1)).unwrap();
        hs.answered(Duration::from_secs(2), 2);
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
