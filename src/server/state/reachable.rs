//! Which of a member's addresses another member can use.
//!
//! In host mode the host's own client talks to the embedded server over 127.0.0.1, so the
//! server sees its UDP registration come from `127.0.0.1:PORT` and its only local candidate is
//! loopback. Handed to a guest on another machine, those addresses point at the guest's own
//! machine: the guest punches itself and the host is "unreachable". The host's voice socket is
//! bound to every interface of the server's machine, though, so the address the guest used to
//! reach the server, with the host's voice port, reaches the host's client too. That holds for
//! a guest on the internet (the server's public address) and for one on the host's LAN (its
//! LAN address) alike.

use std::net::{IpAddr, SocketAddr};

/// Where a connection's two ends are, as its TCP socket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionAddrs {
    /// The client's address (its NAT's public address for a client behind one).
    pub peer: IpAddr,
    /// The server's address this client reached; for a client on the server's own machine,
    /// loopback.
    pub local: IpAddr,
}

impl ConnectionAddrs {
    /// Both ends as seen on one socket; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn new(peer: IpAddr, local: IpAddr) -> Self {
        Self {
            peer: peer.to_canonical(),
            local: local.to_canonical(),
        }
    }

    /// True when the client runs on the server's machine and came in over loopback.
    pub fn is_loopback(&self) -> bool {
        self.peer.is_loopback()
    }
}

/// A member's candidate addresses as `recipient` should see them: unchanged for a recipient on
/// the server's machine; for any other, loopback addresses are dropped, and a public address
/// on loopback (the member runs beside the server) becomes the server address the recipient
/// reached, with the member's port.
pub fn endpoints_for(
    local: &[SocketAddr],
    public: Option<SocketAddr>,
    recipient: ConnectionAddrs,
) -> (Vec<SocketAddr>, Option<SocketAddr>) {
    if recipient.is_loopback() {
        return (local.to_vec(), public);
    }
    let usable = local
        .iter()
        .copied()
        .filter(|a| !a.ip().to_canonical().is_loopback())
        .collect();
    let public = public.map(|p| {
        if p.ip().to_canonical().is_loopback() {
            SocketAddr::new(recipient.local, p.port())
        } else {
            p
        }
    });
    (usable, public)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn conn(peer: &str, local: &str) -> ConnectionAddrs {
        ConnectionAddrs::new(peer.parse().unwrap(), local.parse().unwrap())
    }

    #[test]
    fn a_guest_is_told_the_hosts_address_it_dialled_never_loopback() {
        let host_local = [addr("127.0.0.1:5000")];
        let host_public = Some(addr("127.0.0.1:5000"));
        // A guest from the internet reached the server at its public address ...
        let internet = conn("203.0.113.9", "198.51.100.1");
        assert_eq!(
            endpoints_for(&host_local, host_public, internet),
            (vec![], Some(addr("198.51.100.1:5000")))
        );
        // ... a guest on the LAN at its LAN address.
        let lan = conn("192.168.1.20", "192.168.1.10");
        assert_eq!(
            endpoints_for(&host_local, host_public, lan),
            (vec![], Some(addr("192.168.1.10:5000")))
        );
    }

    #[test]
    fn the_host_and_remote_members_see_each_other_unchanged() {
        let guest_local = [addr("10.1.0.2:6000")];
        let guest_public = Some(addr("198.18.0.1:40001"));
        let host = conn("127.0.0.1", "127.0.0.1");
        assert_eq!(
            endpoints_for(&guest_local, guest_public, host),
            (guest_local.to_vec(), guest_public)
        );
        // Two remote members: nothing to rewrite.
        let other = conn("203.0.113.9", "198.51.100.1");
        assert_eq!(
            endpoints_for(&guest_local, guest_public, other),
            (guest_local.to_vec(), guest_public)
        );
    }

    #[test]
    fn mapped_ipv6_addresses_count_as_ipv4() {
        let c = ConnectionAddrs::new(
            "::ffff:127.0.0.1".parse().unwrap(),
            "::ffff:127.0.0.1".parse().unwrap(),
        );
        assert!(c.is_loopback());
        let guest = conn("::ffff:203.0.113.9", "::ffff:198.51.100.1");
        assert_eq!(
            endpoints_for(&[], Some(addr("[::ffff:127.0.0.1]:5000")), guest),
            (vec![], Some(addr("198.51.100.1:5000")))
        );
    }
}
