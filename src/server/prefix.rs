//! The key every per-address limit counts by: an address prefix, not the exact address.
//!
//! A host on IPv6 usually owns a whole /64 (and can pick any address in it), and on Linux all
//! of 127.0.0.0/8 is loopback: a cap keyed on the exact address lets such a host open
//! unlimited connections. Every per-address cap of the server therefore keys on a [`Prefix`]:
//! the address with its host bits cleared, by default the whole IPv4 address (/32, a NAT or a
//! CGNAT address is one household or carrier customer already) and the /64 of an IPv6
//! address. IPv4-mapped IPv6 addresses (what a `::` socket reports for IPv4 clients) are
//! treated as the IPv4 address they carry, or they would all fall into one /64.
//!
//! Pure: a value type and the masking.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Default IPv4 prefix length: the address itself.
pub const DEFAULT_IPV4_PREFIX: u8 = 32;
/// Default IPv6 prefix length: the /64 a single host or home network gets.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// How many leading bits of an address say who it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixWidths {
    /// 1..=32; out-of-range values are clamped.
    pub ipv4: u8,
    /// 1..=128; out-of-range values are clamped.
    pub ipv6: u8,
}

impl Default for PrefixWidths {
    fn default() -> Self {
        Self {
            ipv4: DEFAULT_IPV4_PREFIX,
            ipv6: DEFAULT_IPV6_PREFIX,
        }
    }
}

/// An address with its host bits cleared, and how many bits were kept. Two addresses with the
/// same prefix count as one client for every per-address limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prefix {
    V4 { net: [u8; 4], len: u8 },
    V6 { net: [u8; 16], len: u8 },
}

impl PrefixWidths {
    /// The prefix `ip` belongs to.
    pub fn prefix_of(&self, ip: IpAddr) -> Prefix {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let len = self.ipv4.clamp(1, 32);
                let mask = u32::MAX << (32 - u32::from(len));
                Prefix::V4 {
                    net: (u32::from(v4) & mask).to_be_bytes(),
                    len,
                }
            }
            IpAddr::V6(v6) => {
                let len = self.ipv6.clamp(1, 128);
                let mask = u128::MAX << (128 - u32::from(len));
                Prefix::V6 {
                    net: (u128::from(v6) & mask).to_be_bytes(),
                    len,
                }
            }
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Prefix::V4 { net, len } => write!(f, "{}/{len}", Ipv4Addr::from(net)),
            Prefix::V6 { net, len } => write!(f, "{}/{len}", Ipv6Addr::from(net)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_addresses_are_their_own_prefix_by_default() {
        let w = PrefixWidths::default();
        assert_eq!(
            w.prefix_of(ip("203.0.113.7")),
            w.prefix_of(ip("203.0.113.7"))
        );
        assert_ne!(
            w.prefix_of(ip("203.0.113.7")),
            w.prefix_of(ip("203.0.113.8"))
        );
        assert_eq!(w.prefix_of(ip("203.0.113.7")).to_string(), "203.0.113.7/32");
    }

    #[test]
    fn a_whole_ipv6_slash_64_is_one_prefix() {
        let w = PrefixWidths::default();
        let a = w.prefix_of(ip("2001:db8:1:2:aaaa::1"));
        let b = w.prefix_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(a, b);
        assert_ne!(a, w.prefix_of(ip("2001:db8:1:3::1")));
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn ipv4_mapped_ipv6_counts_as_the_ipv4_address() {
        let w = PrefixWidths::default();
        assert_eq!(
            w.prefix_of(ip("::ffff:127.0.0.2")),
            w.prefix_of(ip("127.0.0.2"))
        );
        // Not all of ::ffff:0:0/96 in one /64.
        assert_ne!(
            w.prefix_of(ip("::ffff:127.0.0.2")),
            w.prefix_of(ip("::ffff:127.0.0.3"))
        );
    }

    #[test]
    fn widths_are_configurable_and_clamped() {
        let w = PrefixWidths { ipv4: 8, ipv6: 48 };
        assert_eq!(w.prefix_of(ip("127.1.2.3")), w.prefix_of(ip("127.200.0.1")));
        assert_eq!(w.prefix_of(ip("127.1.2.3")).to_string(), "127.0.0.0/8");
        assert_eq!(
            w.prefix_of(ip("2001:db8:1:2::1")),
            w.prefix_of(ip("2001:db8:1:ffff::1"))
        );
        let silly = PrefixWidths { ipv4: 0, ipv6: 200 };
        assert_eq!(silly.prefix_of(ip("10.0.0.1")).to_string(), "0.0.0.0/1");
        assert_ne!(
            silly.prefix_of(ip("2001:db8::1")),
            silly.prefix_of(ip("2001:db8::2"))
        );
    }
}
