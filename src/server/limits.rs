//! How many connections one address prefix (see [`super::prefix`]) may hold open at once.
//!
//! One host must not be able to take all of the server's file descriptors, but a household or
//! an office behind one NAT shares an address, so the cap is per prefix and generous. It keys
//! on the prefix, not the exact address: a host owning an IPv6 /64 (or 127.0.0.0/8) would
//! otherwise get one cap per address it cares to use. The
//! count has to stay exact over the server's lifetime: a leak (a connection that failed to set
//! up after being counted) slowly locks an address out, an underflow lets it open unlimited
//! connections. [`ConnectionLimit::admit`] ties the count to the setup so neither can happen.
//!
//! Pure: no sockets; the shell says which prefix connected and when it left.

use std::collections::HashMap;

use super::prefix::Prefix;

/// Default cap: a household or office behind one NAT fits, one host cannot take the server's
/// file descriptors.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;

/// The prefix already holds the maximum; the connection is refused (and counted).
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("{prefix} already has {max} connections open")]
pub struct OverLimit {
    pub prefix: Prefix,
    pub max: usize,
}

/// Why [`ConnectionLimit::admit`] did not admit a connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmitError<E> {
    #[error(transparent)]
    OverLimit(#[from] OverLimit),
    /// Setting the connection up failed after it was counted; the count was given back.
    #[error("connection setup failed: {0}")]
    Setup(E),
}

/// Open connections per prefix, capped.
#[derive(Debug)]
pub struct ConnectionLimit {
    max_per_ip: usize,
    /// Only prefixes with at least one connection: an entry never holds 0.
    open: HashMap<Prefix, usize>,
}

impl ConnectionLimit {
    /// A cap of 0 would refuse everyone; it is raised to 1.
    pub fn new(max_per_ip: usize) -> Self {
        Self {
            max_per_ip: max_per_ip.max(1),
            open: HashMap::new(),
        }
    }

    pub fn max_per_ip(&self) -> usize {
        self.max_per_ip
    }

    /// Connections `prefix` holds now.
    pub fn open(&self, prefix: Prefix) -> usize {
        self.open.get(&prefix).copied().unwrap_or(0)
    }

    /// Whether `prefix` is at the cap (a new connection from it would be refused).
    pub fn is_full(&self, prefix: Prefix) -> bool {
        self.open(prefix) >= self.max_per_ip
    }

    /// Counts a new connection from `prefix`, or refuses it when `prefix` is at the cap.
    pub fn try_acquire(&mut self, prefix: Prefix) -> Result<(), OverLimit> {
        let count = self.open.entry(prefix).or_default();
        if *count >= self.max_per_ip {
            return Err(OverLimit {
                prefix,
                max: self.max_per_ip,
            });
        }
        *count += 1;
        Ok(())
    }

    /// One connection from `prefix` is gone. A release with nothing acquired is ignored, so
    /// a double release cannot open the cap for that prefix.
    pub fn release(&mut self, prefix: Prefix) {
        if let Some(n) = self.open.get_mut(&prefix) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&prefix);
            }
        }
    }

    /// Counts a connection from `prefix` and runs `setup` for it; if `setup` fails the count
    /// is given back, so only connections that were really set up hold a slot (each must
    /// later be [`released`](Self::release)).
    pub fn admit<T, E>(
        &mut self,
        prefix: Prefix,
        setup: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, AdmitError<E>> {
        self.try_acquire(prefix)?;
        setup().map_err(|e| {
            self.release(prefix);
            AdmitError::Setup(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::server::prefix::PrefixWidths;

    fn ip(last: u8) -> Prefix {
        PrefixWidths::default().prefix_of(std::net::IpAddr::from([203, 0, 113, last]))
    }

    #[test]
    fn addresses_of_one_ipv6_slash_64_share_one_cap() {
        let mut limit = ConnectionLimit::new(2);
        let widths = PrefixWidths::default();
        for host in 1..=2u16 {
            let addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, host);
            assert!(limit.try_acquire(widths.prefix_of(addr.into())).is_ok());
        }
        let third = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0xffff, 0, 0, 3);
        assert!(limit.try_acquire(widths.prefix_of(third.into())).is_err());
        let next_net = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1);
        assert!(limit.try_acquire(widths.prefix_of(next_net.into())).is_ok());
    }

    #[test]
    fn an_address_is_capped_and_others_are_not() {
        let mut limit = ConnectionLimit::new(2);
        assert!(limit.try_acquire(ip(1)).is_ok());
        assert!(limit.try_acquire(ip(1)).is_ok());
        assert_eq!(
            limit.try_acquire(ip(1)),
            Err(OverLimit {
                prefix: ip(1),
                max: 2
            })
        );
        assert!(limit.try_acquire(ip(2)).is_ok(), "another address");
        assert_eq!(limit.open(ip(1)), 2);
    }

    #[test]
    fn a_release_frees_a_slot() {
        let mut limit = ConnectionLimit::new(1);
        limit.try_acquire(ip(1)).unwrap();
        assert!(limit.try_acquire(ip(1)).is_err());
        limit.release(ip(1));
        assert_eq!(limit.open(ip(1)), 0);
        assert!(limit.try_acquire(ip(1)).is_ok());
    }

    #[test]
    fn a_release_without_acquire_cannot_underflow_or_open_the_cap() {
        let mut limit = ConnectionLimit::new(1);
        limit.release(ip(1));
        limit.release(ip(1));
        assert_eq!(limit.open(ip(1)), 0);
        limit.try_acquire(ip(1)).unwrap();
        // A double release after one acquire leaves the count at 0, not "minus one".
        limit.release(ip(1));
        limit.release(ip(1));
        limit.try_acquire(ip(1)).unwrap();
        assert!(limit.try_acquire(ip(1)).is_err(), "the cap still holds");
    }

    #[test]
    fn a_failed_setup_after_acquire_gives_the_slot_back() {
        let mut limit = ConnectionLimit::new(1);
        let failed: Result<(), _> = limit.admit(ip(1), || Err("TLS setup failed"));
        assert_eq!(failed, Err(AdmitError::Setup("TLS setup failed")));
        assert_eq!(limit.open(ip(1)), 0);
        assert_eq!(limit.admit(ip(1), || Ok::<_, ()>(7)), Ok(7));
        assert_eq!(limit.open(ip(1)), 1);
        // At the cap, setup does not even run.
        let mut ran = false;
        let refused = limit.admit(ip(1), || {
            ran = true;
            Ok::<_, ()>(())
        });
        assert_eq!(
            refused,
            Err(AdmitError::OverLimit(OverLimit {
                prefix: ip(1),
                max: 1
            }))
        );
        assert!(!ran);
    }

    #[test]
    fn a_cap_of_zero_still_admits_one() {
        let mut limit = ConnectionLimit::new(0);
        assert_eq!(limit.max_per_ip(), 1);
        assert!(limit.try_acquire(ip(1)).is_ok());
        assert!(limit.try_acquire(ip(1)).is_err());
    }
}
