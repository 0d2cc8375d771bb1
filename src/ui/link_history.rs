//! The last minute of each peer's loss and jitter, one sample a second, for the sparklines in
//! the member's details. [`LinkHistory`] is a fixed ring (no allocation, `Copy`-sized for the
//! views); [`PeerLinkHistory`] carries it on the user entity and [`record_link_history`]
//! samples the mirrored [`LinkStatus`] into it.

use std::time::Duration;

use bevy::prelude::*;

use crate::client::LinkStatus;
use crate::voice::PeerState;

/// Samples kept: a minute at one a second.
pub const HISTORY_LEN: usize = 60;
/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// A bounded history of a link's loss (per cent) and jitter (ms), oldest first.
///
/// Invariant: at most [`HISTORY_LEN`] samples; a sample taken while no voice flowed (punching,
/// unreachable) is NaN, which the sparkline draws as a gap.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkHistory {
    loss_pct: [f32; HISTORY_LEN],
    jitter_ms: [f32; HISTORY_LEN],
    /// Index of the oldest sample.
    start: usize,
    len: usize,
}

impl Default for LinkHistory {
    fn default() -> Self {
        Self {
            loss_pct: [f32::NAN; HISTORY_LEN],
            jitter_ms: [f32::NAN; HISTORY_LEN],
            start: 0,
            len: 0,
        }
    }
}

impl LinkHistory {
    /// Appends one sample (`None`: no voice flowed), dropping the oldest when full.
    pub fn push(&mut self, sample: Option<(f32, f32)>) {
        let (loss, jitter) = sample.unwrap_or((f32::NAN, f32::NAN));
        let at = (self.start + self.len) % HISTORY_LEN;
        self.loss_pct[at] = loss;
        self.jitter_ms[at] = jitter;
        if self.len == HISTORY_LEN {
            self.start = (self.start + 1) % HISTORY_LEN;
        } else {
            self.len += 1;
        }
    }

    /// Number of samples kept.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ordered<'a>(&'a self, values: &'a [f32; HISTORY_LEN]) -> impl Iterator<Item = f32> + 'a {
        (0..self.len).map(move |i| values[(self.start + i) % HISTORY_LEN])
    }

    /// Loss samples in per cent, oldest first (NaN: no voice then).
    pub fn loss_pct(&self) -> impl Iterator<Item = f32> + '_ {
        self.ordered(&self.loss_pct)
    }

    /// Jitter samples in milliseconds, oldest first (NaN: no voice then).
    pub fn jitter_ms(&self) -> impl Iterator<Item = f32> + '_ {
        self.ordered(&self.jitter_ms)
    }

    /// A link's figures as one sample: only while voice flows.
    pub fn sample_of(status: &LinkStatus) -> Option<(f32, f32)> {
        matches!(status.state, PeerState::Direct(_) | PeerState::Relayed(_))
            .then_some((status.loss_pct, status.jitter_ms))
    }
}

/// The history on a peer's user entity (added by [`record_link_history`] to every entity with
/// a [`LinkStatus`]).
#[derive(Component, Debug, Clone, Default)]
pub struct PeerLinkHistory(pub LinkHistory);

/// Once a second, each peer's current loss and jitter into its history; a peer new since the
/// last sample gets an empty history.
pub fn record_link_history(
    time: Res<Time<Real>>,
    mut next_at: Local<Duration>,
    mut commands: Commands,
    fresh: Query<Entity, (With<LinkStatus>, Without<PeerLinkHistory>)>,
    mut peers: Query<(&LinkStatus, &mut PeerLinkHistory)>,
) {
    for e in &fresh {
        commands.entity(e).insert(PeerLinkHistory::default());
    }
    let now = time.elapsed();
    if now < *next_at {
        return;
    }
    *next_at = now + SAMPLE_EVERY;
    for (status, mut history) in &mut peers {
        history.0.push(LinkHistory::sample_of(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_minute_oldest_first() {
        let mut h = LinkHistory::default();
        for i in 0..(HISTORY_LEN + 5) {
            h.push(Some((i as f32, 2.0 * i as f32)));
        }
        assert_eq!(h.len(), HISTORY_LEN);
        let loss: Vec<f32> = h.loss_pct().collect();
        assert_eq!(loss.first(), Some(&5.0), "the five oldest are gone");
        assert_eq!(loss.last(), Some(&(HISTORY_LEN as f32 + 4.0)));
        assert!(loss.windows(2).all(|w| w[1] == w[0] + 1.0), "in order");
        assert_eq!(h.jitter_ms().last(), Some(2.0 * (HISTORY_LEN as f32 + 4.0)));
    }

    #[test]
    fn a_second_without_voice_is_a_gap() {
        let mut h = LinkHistory::default();
        h.push(Some((1.0, 3.0)));
        h.push(None);
        let loss: Vec<f32> = h.loss_pct().collect();
        assert_eq!(loss[0], 1.0);
        assert!(loss[1].is_nan());
        let punching = LinkStatus::default();
        assert_eq!(LinkHistory::sample_of(&punching), None);
        let direct = LinkStatus {
            state: PeerState::Direct(([10, 0, 0, 2], 1).into()),
            loss_pct: 4.0,
            jitter_ms: 7.0,
            ..LinkStatus::default()
        };
        assert_eq!(LinkHistory::sample_of(&direct), Some((4.0, 7.0)));
    }

    #[test]
    fn peers_get_a_history_sampled_once_a_second() {
        let mut app = App::new();
        let mut clock = Time::<Real>::default();
        clock.update_with_duration(Duration::ZERO); // starts the clock; later calls advance it
        app.insert_resource(clock)
            .add_systems(Update, record_link_history);
        let bob = app
            .world_mut()
            .spawn(LinkStatus {
                state: PeerState::Direct(([10, 0, 0, 2], 1).into()),
                loss_pct: 2.0,
                jitter_ms: 5.0,
                ..LinkStatus::default()
            })
            .id();
        let advance = |app: &mut App| {
            app.world_mut()
                .resource_mut::<Time<Real>>()
                .update_with_duration(SAMPLE_EVERY);
        };
        let history = |app: &App| {
            let h = &app.world().get::<PeerLinkHistory>(bob).unwrap().0;
            (
                h.loss_pct().collect::<Vec<_>>(),
                h.jitter_ms().collect::<Vec<_>>(),
            )
        };
        app.update(); // adds the history; the next sample is a second away
        app.update();
        assert_eq!(history(&app), (vec![], vec![]));
        advance(&mut app);
        app.update();
        app.update(); // the same instant: not due again
        assert_eq!(history(&app), (vec![2.0], vec![5.0]));
        app.world_mut().get_mut::<LinkStatus>(bob).unwrap().loss_pct = 3.0;
        advance(&mut app);
        app.update();
        assert_eq!(history(&app), (vec![2.0, 3.0], vec![5.0, 5.0]));
    }
}
