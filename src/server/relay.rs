//! Relaying sealed peer datagrams through the server, for pairs of members that cannot reach
//! each other directly and that no other member can bridge (symmetric and carrier NATs).
//!
//! The original design keeps the server out of voice, so relaying is the operator's choice:
//! on in host mode (the host is in the call anyway), off for a dedicated `server` unless it is
//! started with `--relay`. What is relayed is a peer datagram sealed end to end (voice
//! encrypted, control tagged with the pair's keys): the server checks who sent it and to whom
//! it goes, and caps how much each client may send through it, but it cannot read or forge it.
//!
//! Pure: the budget takes time as an argument.

pub use crate::protocol::relay_budget::RelayBudget;

/// The operator's relay settings; `ServerRules::relay` is `None` when relaying is off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayRules {
    /// Sustained bytes per second one client may send through the relay (all its peers
    /// together). A 20 ms Opus stream at 24 kb/s is about 6 kB/s on the wire.
    pub bytes_per_sec: f64,
    /// What it may send at once above the rate (a talkspurt start, a burst of punches).
    pub burst_bytes: f64,
}

impl RelayRules {
    /// A cap of `kbps` kilobits per second per client, with one second of burst.
    pub fn per_client_kbps(kbps: u32) -> Self {
        let bytes_per_sec = f64::from(kbps) * 1000.0 / 8.0;
        Self {
            bytes_per_sec,
            burst_bytes: bytes_per_sec,
        }
    }
}

impl Default for RelayRules {
    /// 256 kb/s per client: voice to four relayed peers at 10 ms frames, with room to spare.
    fn default() -> Self {
        Self::per_client_kbps(DEFAULT_RELAY_KBPS)
    }
}

/// Default per-client relay cap in kb/s (`--relay-kbps`).
pub const DEFAULT_RELAY_KBPS: u32 = 256;

/// Why the server refused to forward a `RelayTo`. Counted, never answered: answering would
/// let anyone use the server to reflect traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayRefusal {
    #[error("this server does not relay (start it with --relay)")]
    Disabled,
    #[error("relay request from an address no session registered")]
    UnknownSource,
    #[error("relay request from a session outside any channel")]
    NotInChannel,
    #[error("inner datagram not written by the session that sent it")]
    ForgedSender,
    #[error("relay request for someone who is not in the sender's channel")]
    NotInSameChannel,
    #[error("the addressed member has no registered UDP address yet")]
    NoEndpoint,
    #[error("the sender is over its relay budget")]
    OverBudget,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kbps_cap_is_bytes_per_second_with_one_second_of_burst() {
        let rules = RelayRules::per_client_kbps(80); // 10 000 B/s, 10 000 B burst
        assert_eq!(rules.bytes_per_sec, 10_000.0);
        assert_eq!(rules.burst_bytes, 10_000.0);
    }
}
