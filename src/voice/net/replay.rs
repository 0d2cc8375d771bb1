//! The replay window: which voice sequence numbers of one direction of one peer were already
//! accepted. There is exactly one per direction per peer, inside that peer's
//! [`PeerCipher`](super::crypto::PeerCipher), and it only ever records datagrams that
//! authenticated, so a forged datagram cannot push it forward and starve real ones.

/// Verdict of [`VoiceReplayWindow::check_and_update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// Not seen before: accept (the window now remembers it).
    Fresh,
    /// Already seen inside the window.
    Duplicate,
    /// Older than the window reaches: cannot tell, so drop.
    TooOld,
}

/// 64-packet sliding window over voice sequence numbers (as in IPsec / DTLS anti-replay):
/// remembers the highest sequence number seen and which of the 63 before it arrived, so
/// reordered packets within 64 are accepted once and duplicates or replays are dropped.
/// Sequence numbers compare with wrap-around (serial number arithmetic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VoiceReplayWindow {
    highest: Option<u32>,
    /// Bit i set: `highest - i` was seen. Bit 0 is `highest` itself.
    seen: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub too_old: u64,
}

impl VoiceReplayWindow {
    /// Window size in sequence numbers.
    pub const SIZE: u32 = 64;

    pub fn new() -> Self {
        Self::default()
    }

    /// Classifies `seq` and records it when fresh.
    pub fn check_and_update(&mut self, seq: u32) -> ReplayVerdict {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            self.seen = 1;
            self.accepted += 1;
            return ReplayVerdict::Fresh;
        };
        let ahead = seq.wrapping_sub(highest);
        if ahead != 0 && ahead < 1 << 31 {
            self.seen = if ahead >= Self::SIZE {
                1
            } else {
                (self.seen << ahead) | 1
            };
            self.highest = Some(seq);
            self.accepted += 1;
            return ReplayVerdict::Fresh;
        }
        let behind = highest.wrapping_sub(seq);
        if behind >= Self::SIZE {
            self.too_old += 1;
            return ReplayVerdict::TooOld;
        }
        let bit = 1u64 << behind;
        if self.seen & bit != 0 {
            self.duplicates += 1;
            ReplayVerdict::Duplicate
        } else {
            self.seen |= bit;
            self.accepted += 1;
            ReplayVerdict::Fresh
        }
    }

    /// Highest sequence number accepted so far.
    pub fn highest(&self) -> Option<u32> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_accepts_reordering_and_drops_duplicates_and_ancient_packets() {
        let mut w = VoiceReplayWindow::new();
        assert_eq!(w.check_and_update(100), ReplayVerdict::Fresh);
        assert_eq!(w.check_and_update(102), ReplayVerdict::Fresh);
        assert_eq!(w.check_and_update(101), ReplayVerdict::Fresh);
        assert_eq!(w.check_and_update(101), ReplayVerdict::Duplicate);
        assert_eq!(w.check_and_update(102), ReplayVerdict::Duplicate);
        assert_eq!(w.check_and_update(102 - 63), ReplayVerdict::Fresh);
        assert_eq!(w.check_and_update(102 - 64), ReplayVerdict::TooOld);
        assert_eq!(w.check_and_update(1_000), ReplayVerdict::Fresh);
        assert_eq!(w.check_and_update(102), ReplayVerdict::TooOld);
        assert_eq!(w.check_and_update(999), ReplayVerdict::Fresh);
        assert_eq!((w.accepted, w.duplicates, w.too_old), (6, 2, 2));
        assert_eq!(w.highest(), Some(1_000));
    }

    #[test]
    fn replay_window_handles_sequence_wrap_around() {
        let mut w = VoiceReplayWindow::new();
        assert_eq!(w.check_and_update(u32::MAX - 1), ReplayVerdict::Fresh);
        assert_eq!(w.check_and_update(1), ReplayVerdict::Fresh);
        assert_eq!(w.check_and_update(u32::MAX), ReplayVerdict::Fresh);
        assert_eq!(w.check_and_update(u32::MAX - 1), ReplayVerdict::Duplicate);
        assert_eq!(w.check_and_update(0), ReplayVerdict::Fresh);
        assert_eq!(w.highest(), Some(1));
    }
}
