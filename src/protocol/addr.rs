//! Socket addresses between the cores and dual-stack sockets.
//!
//! A socket bound to `[::]` takes both IPv6 and IPv4 traffic, and reports an IPv4 peer as an
//! IPv4-mapped IPv6 address (`[::ffff:192.0.2.7]:5000`). The cores compare addresses (is
//! this the server? which peer's candidate is this?) and hand them to other clients, who may
//! have IPv4-only sockets, so inside the program every address is canonical: IPv4 as IPv4.
//! The shells convert at the socket: [`canonical`] on what they receive, [`for_socket`] on
//! what they send.

use std::net::{IpAddr, SocketAddr};

/// `addr` with an IPv4-mapped IPv6 address turned back into IPv4; anything else unchanged.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `to` as a socket bound to `local` can send to it: an IPv6 socket takes IPv4 destinations
/// as IPv4-mapped addresses; an IPv4 socket is handed `to` unchanged (an IPv6 destination
/// then fails at the socket, which is the truth: it cannot reach one).
pub fn for_socket(to: SocketAddr, local: SocketAddr) -> SocketAddr {
    match (local, to) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapped_addresses_become_ipv4_and_others_stay() {
        assert_eq!(canonical(a("[::ffff:192.0.2.7]:5000")), a("192.0.2.7:5000"));
        assert_eq!(canonical(a("192.0.2.7:5000")), a("192.0.2.7:5000"));
        assert_eq!(canonical(a("[2001:db8::7]:5000")), a("[2001:db8::7]:5000"));
        // ::1 is not IPv4-mapped (to_ipv4 would call it 0.0.0.1).
        assert_eq!(canonical(a("[::1]:5000")), a("[::1]:5000"));
    }

    #[test]
    fn a_dual_stack_socket_gets_ipv4_destinations_mapped() {
        let dual = a("[::]:7700");
        let v4 = a("0.0.0.0:7700");
        assert_eq!(
            for_socket(a("192.0.2.7:5000"), dual),
            a("[::ffff:192.0.2.7]:5000")
        );
        assert_eq!(
            for_socket(a("[2001:db8::7]:5000"), dual),
            a("[2001:db8::7]:5000")
        );
        assert_eq!(for_socket(a("192.0.2.7:5000"), v4), a("192.0.2.7:5000"));
        assert_eq!(
            canonical(for_socket(a("192.0.2.7:5000"), dual)),
            a("192.0.2.7:5000")
        );
    }
}
