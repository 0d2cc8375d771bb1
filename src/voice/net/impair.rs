//! A simulated bad network for received datagrams: loss (independent, or in bursts), delay
//! jitter (which also reorders), and duplicates, driven by a seeded generator so a test run is
//! reproducible.
//!
//! Bursty loss is a two-state Gilbert–Elliott chain (the "simple Gilbert" model: every datagram
//! in the bad state is lost, none in the good one), because real links lose packets in runs and
//! loss concealment copes very differently with one lost frame than with three in a row.
//!
//! Pure: `push(now, from, bytes)` files a datagram, `pop_due(now)` hands back the ones whose
//! simulated arrival time has come. The voice thread puts it in front of the engine when
//! `--impair` is given; tests and benchmarks use it to prove the jitter buffer copes.

use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

/// Impairment settings. Parsed from `loss=0.1,jitter_ms=30,duplicate=0.02,seed=7`; add
/// `burst=3` to lose the same share of datagrams in runs of 3 on average.
#[derive(Debug, Clone, PartialEq)]
pub struct ImpairConfig {
    /// Probability that a datagram is dropped (the long-run share when `burst` is set).
    pub loss: f64,
    /// Mean length of a run of lost datagrams (Gilbert–Elliott), or `None` for independent
    /// losses. At least 1.
    pub burst: Option<f64>,
    /// Extra delay drawn uniformly from 0..=jitter for each datagram (this reorders them).
    pub jitter: Duration,
    /// Fixed extra delay for every datagram.
    pub delay: Duration,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    pub seed: u64,
}

impl Default for ImpairConfig {
    fn default() -> Self {
        Self {
            loss: 0.0,
            burst: None,
            jitter: Duration::ZERO,
            delay: Duration::ZERO,
            duplicate: 0.0,
            seed: 1,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad --impair setting {0:?}: expected e.g. loss=0.1,burst=3,jitter_ms=30,delay_ms=0,duplicate=0.02,seed=7")]
pub struct ImpairParseError(pub String);

impl std::str::FromStr for ImpairConfig {
    type Err = ImpairParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cfg = ImpairConfig::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let err = || ImpairParseError(part.to_string());
            let (k, v) = part.split_once('=').ok_or_else(err)?;
            let num: f64 = v.trim().parse().map_err(|_| err())?;
            if !num.is_finite() || num < 0.0 {
                return Err(err());
            }
            match k.trim() {
                "loss" if num <= 1.0 => cfg.loss = num,
                "burst" if num >= 1.0 => cfg.burst = Some(num),
                "duplicate" if num <= 1.0 => cfg.duplicate = num,
                "jitter_ms" => cfg.jitter = Duration::from_secs_f64(num / 1000.0),
                "delay_ms" => cfg.delay = Duration::from_secs_f64(num / 1000.0),
                "seed" => cfg.seed = num as u64,
                _ => return Err(err()),
            }
        }
        Ok(cfg)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Pending {
    due: Duration,
    order: u64,
    from: SocketAddr,
    bytes: Vec<u8>,
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Min-heap on (due, order).
        (other.due, other.order).cmp(&(self.due, self.order))
    }
}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Impairment {
    cfg: ImpairConfig,
    rng: u64,
    /// Gilbert–Elliott state: the last datagram fell in a loss burst.
    in_burst: bool,
    queue: BinaryHeap<Pending>,
    order: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

impl Impairment {
    pub fn new(cfg: ImpairConfig) -> Self {
        Self {
            rng: cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            in_burst: false,
            cfg,
            queue: BinaryHeap::new(),
            order: 0,
            dropped: 0,
            duplicated: 0,
        }
    }

    /// xorshift64*: deterministic, good enough for simulated networks.
    fn next_f64(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn delay(&mut self) -> Duration {
        self.cfg.delay + self.cfg.jitter.mul_f64(self.next_f64())
    }

    /// Whether the next datagram is lost. With a mean burst length `b` and a loss share `p`,
    /// a burst ends with probability `1/b` per datagram and one starts with probability
    /// `p / (b (1 - p))`, so the chain spends the share `p` of datagrams in the bad state.
    fn lose_next(&mut self) -> bool {
        let loss = self.cfg.loss;
        match self.cfg.burst {
            None => self.next_f64() < loss,
            Some(_) if loss >= 1.0 => true,
            Some(burst) => {
                let flip = if self.in_burst {
                    1.0 / burst
                } else {
                    (loss / (burst * (1.0 - loss))).min(1.0)
                };
                if self.next_f64() < flip {
                    self.in_burst = !self.in_burst;
                }
                self.in_burst
            }
        }
    }

    pub fn push(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        if self.lose_next() {
            self.dropped += 1;
            return;
        }
        let copies = if self.next_f64() < self.cfg.duplicate {
            self.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let due = now + self.delay();
            self.order += 1;
            self.queue.push(Pending {
                due,
                order: self.order,
                from,
                bytes: bytes.to_vec(),
            });
        }
    }

    /// The next datagram whose time has come.
    pub fn pop_due(&mut self, now: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        if self.queue.peek().is_some_and(|p| p.due <= now) {
            self.queue.pop().map(|p| (p.from, p.bytes))
        } else {
            None
        }
    }

    /// When the next held datagram falls due, if any.
    pub fn next_due(&self) -> Option<Duration> {
        self.queue.peek().map(|p| p.due)
    }

    pub fn pending(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn parses_settings_and_refuses_nonsense() {
        let c: ImpairConfig = "loss=0.1,jitter_ms=30,duplicate=0.02,seed=7"
            .parse()
            .unwrap();
        assert_eq!(c.loss, 0.1);
        assert_eq!(c.jitter, Duration::from_millis(30));
        assert_eq!(c.seed, 7);
        assert!("loss=2".parse::<ImpairConfig>().is_err());
        assert!("bogus=1".parse::<ImpairConfig>().is_err());
        assert!("loss".parse::<ImpairConfig>().is_err());
    }

    #[test]
    fn same_seed_same_fate_and_rates_are_close_to_asked() {
        let run = || {
            let cfg: ImpairConfig = "loss=0.1,jitter_ms=30,duplicate=0.05,seed=3"
                .parse()
                .unwrap();
            let mut imp = Impairment::new(cfg);
            let mut got = Vec::new();
            for i in 0..10_000u32 {
                let now = Duration::from_millis(20 * i as u64);
                imp.push(now, addr(), &i.to_be_bytes());
                while let Some((_, b)) = imp.pop_due(now) {
                    got.push(u32::from_be_bytes(b[..4].try_into().unwrap()));
                }
            }
            (got, imp.dropped, imp.duplicated)
        };
        let (a, dropped, dup) = run();
        assert_eq!(a, run().0);
        assert!((800..1200).contains(&dropped), "{dropped}");
        assert!((300..700).contains(&dup), "{dup}");
        // Jitter of 30 ms on a 20 ms cadence reorders some packets.
        assert!(a.windows(2).any(|w| w[1] < w[0]));
    }

    #[test]
    fn parses_burst_length_and_refuses_bursts_shorter_than_one() {
        let c: ImpairConfig = "loss=0.1,burst=3,seed=2".parse().unwrap();
        assert_eq!(c.burst, Some(3.0));
        assert_eq!(c.loss, 0.1);
        assert_eq!("loss=0.1".parse::<ImpairConfig>().unwrap().burst, None);
        assert!("loss=0.1,burst=0.5".parse::<ImpairConfig>().is_err());
    }

    /// Pushes `n` numbered datagrams 20 ms apart with no delay and returns which were lost.
    fn lost_pattern(spec: &str, n: u32) -> Vec<bool> {
        let mut imp = Impairment::new(spec.parse().unwrap());
        (0..n)
            .map(|i| {
                let now = Duration::from_millis(20 * u64::from(i));
                imp.push(now, addr(), &i.to_be_bytes());
                imp.pop_due(now).is_none()
            })
            .collect()
    }

    /// Lengths of the runs of consecutive lost datagrams.
    fn bursts(lost: &[bool]) -> Vec<usize> {
        lost.split(|l| !l)
            .filter(|r| !r.is_empty())
            .map(<[bool]>::len)
            .collect()
    }

    #[test]
    fn bursty_loss_keeps_the_asked_rate_and_mean_burst_length() {
        let lost = lost_pattern("loss=0.1,burst=3,seed=11", 100_000);
        let rate = lost.iter().filter(|&&l| l).count() as f64 / lost.len() as f64;
        assert!((0.09..0.11).contains(&rate), "loss rate {rate}");
        let runs = bursts(&lost);
        let mean = runs.iter().sum::<usize>() as f64 / runs.len() as f64;
        assert!((2.7..3.3).contains(&mean), "mean burst {mean}");
        // Independent loss at the same rate has a mean run of about 1 / (1 - 0.1) = 1.1.
        let indep = bursts(&lost_pattern("loss=0.1,seed=11", 100_000));
        let mean_indep = indep.iter().sum::<usize>() as f64 / indep.len() as f64;
        assert!(mean_indep < 1.3, "independent mean run {mean_indep}");
    }

    #[test]
    fn bursty_loss_is_deterministic_by_seed() {
        let a = lost_pattern("loss=0.2,burst=3,seed=5", 5_000);
        assert_eq!(a, lost_pattern("loss=0.2,burst=3,seed=5", 5_000));
        assert_ne!(a, lost_pattern("loss=0.2,burst=3,seed=6", 5_000));
        assert!(lost_pattern("loss=1,burst=3", 100).iter().all(|&l| l));
        assert!(!lost_pattern("loss=0,burst=3", 100).iter().any(|&l| l));
    }

    #[test]
    fn nothing_is_delivered_early() {
        let cfg = ImpairConfig {
            delay: Duration::from_millis(50),
            ..Default::default()
        };
        let mut imp = Impairment::new(cfg);
        imp.push(Duration::ZERO, addr(), b"x");
        assert!(imp.pop_due(Duration::from_millis(49)).is_none());
        assert!(imp.pop_due(Duration::from_millis(50)).is_some());
    }
}
