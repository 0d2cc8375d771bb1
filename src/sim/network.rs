//! The simulated UDP network: access links with latency, jitter, loss and reordering drawn from
//! one seeded generator, and a NAT in front of every client.
//!
//! Every client sits in its own private network (`10.<n>.0.2`) behind its own NAT; the server
//! has a public address. A datagram leaves through the sender's NAT (which picks the external
//! source address), travels for the sum of both access links' delays, and enters through the
//! receiver's NAT, which filters it by what its client sent before. Private addresses are not
//! routed between sites, so a peer's announced local candidate never works here (as between
//! two homes on the Internet). Nothing here knows the voice protocol: it moves bytes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Small deterministic generator (SplitMix64): the whole simulation draws from seeded
/// instances of it, so one seed gives one outcome.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Uniform in `[0, max]`.
    pub fn upto(&mut self, max: Duration) -> Duration {
        max.mul_f64(self.unit())
    }
}

/// How a site's router treats UDP. The kinds of RFC 4787 that decide whether two peers can
/// punch a hole to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NatKind {
    /// No NAT, no firewall: the client's address is public and everything reaches it.
    Public,
    /// A home router (Linux masquerade): endpoint-independent mapping (one external port per
    /// internal socket, whatever the destination) with address-and-port-dependent
    /// ("port-restricted") filtering: a datagram gets in only from an address and port the
    /// client has sent to.
    Home,
    /// A symmetric NAT (carrier-grade NAT, `masquerade fully-random`): a new random external
    /// port for every destination, and only that destination may answer on it.
    Symmetric,
    /// A firewall that drops all UDP in both directions (TCP control still works).
    UdpBlocked,
}

impl NatKind {
    pub const ALL: [NatKind; 4] = [
        NatKind::Public,
        NatKind::Home,
        NatKind::Symmetric,
        NatKind::UdpBlocked,
    ];
}

/// One access link's impairments (the path between two hosts adds both of theirs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// One-way base delay.
    pub latency: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per datagram.
    pub jitter: Duration,
    /// Probability a datagram is lost on this link.
    pub loss: f64,
    /// Probability a datagram is held back by up to [`REORDER_HOLD`] more, so later ones
    /// overtake it.
    pub reorder: f64,
}

/// Longest extra hold of a reordered datagram.
pub const REORDER_HOLD: Duration = Duration::from_millis(40);

impl Default for LinkProfile {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(10),
            jitter: Duration::from_millis(2),
            loss: 0.0,
            reorder: 0.0,
        }
    }
}

/// A site's router: maps (internal socket, destination) to an external address on the way
/// out and filters on the way in, as its [`NatKind`] says.
#[derive(Debug, Clone)]
pub struct Nat {
    kind: NatKind,
    /// The router's public IP (for `Public`, the client's own).
    external_ip: IpAddr,
    /// (internal, destination or `None` when the mapping is endpoint-independent) -> port.
    mappings: BTreeMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// External port -> internal socket.
    reverse: BTreeMap<u16, SocketAddr>,
    /// (external port, remote address) pairs allowed in: created by sending out.
    permissions: BTreeSet<(u16, SocketAddr)>,
    /// Ports mapped on request (PCP, NAT-PMP, UPnP-IGD): external port -> internal socket,
    /// open to every remote address.
    forwarded: BTreeMap<u16, SocketAddr>,
    /// Flows that came in through a mapped port: (internal, remote) -> that port, which the
    /// answers leave from (as Linux conntrack sends replies of a DNATed flow).
    replies: BTreeMap<(SocketAddr, SocketAddr), u16>,
}

impl Nat {
    pub fn new(kind: NatKind, external_ip: IpAddr) -> Self {
        Self {
            kind,
            external_ip,
            mappings: BTreeMap::new(),
            reverse: BTreeMap::new(),
            permissions: BTreeSet::new(),
            forwarded: BTreeMap::new(),
            replies: BTreeMap::new(),
        }
    }

    /// Maps a port of the router's public address to `internal`, as a router that speaks PCP,
    /// NAT-PMP or UPnP-IGD does when asked: the same port number if it is free. `None` where
    /// there is no router that maps (`Public`, `UdpBlocked`).
    pub fn map_port(&mut self, internal: SocketAddr) -> Option<SocketAddr> {
        if matches!(self.kind, NatKind::Public | NatKind::UdpBlocked) {
            return None;
        }
        let taken = |p: &u16| self.reverse.contains_key(p) || self.forwarded.contains_key(p);
        let port = (internal.port()..=u16::MAX)
            .chain(1024..internal.port())
            .find(|p| !taken(p))?;
        self.forwarded.insert(port, internal);
        Some(SocketAddr::new(self.external_ip, port))
    }

    pub fn kind(&self) -> NatKind {
        self.kind
    }

    pub fn external_ip(&self) -> IpAddr {
        self.external_ip
    }

    /// A datagram from `internal` to `dest` leaves: the source address the world sees, or
    /// `None` if the router drops it.
    pub fn outbound(
        &mut self,
        rng: &mut SimRng,
        internal: SocketAddr,
        dest: SocketAddr,
    ) -> Option<SocketAddr> {
        if let Some(&port) = self.replies.get(&(internal, dest)) {
            return Some(SocketAddr::new(self.external_ip, port));
        }
        let key = match self.kind {
            NatKind::Public => return Some(internal),
            NatKind::UdpBlocked => return None,
            NatKind::Home => (internal, None),
            NatKind::Symmetric => (internal, Some(dest)),
        };
        let port = match self.mappings.get(&key) {
            Some(&p) => p,
            None => {
                let p = loop {
                    let p = 20_000 + (rng.next_u64() % 40_000) as u16;
                    if !self.reverse.contains_key(&p) {
                        break p;
                    }
                };
                self.mappings.insert(key, p);
                self.reverse.insert(p, internal);
                p
            }
        };
        self.permissions.insert((port, dest));
        Some(SocketAddr::new(self.external_ip, port))
    }

    /// A datagram from `from` arrives at external address `to`: the internal socket it is
    /// for, or `None` if the router filters it.
    pub fn inbound(&mut self, from: SocketAddr, to: SocketAddr) -> Option<SocketAddr> {
        if to.ip() != self.external_ip {
            return None;
        }
        if let Some(&internal) = self.forwarded.get(&to.port()) {
            self.replies.insert((internal, from), to.port());
            return Some(internal);
        }
        match self.kind {
            NatKind::Public => Some(to),
            NatKind::UdpBlocked => None,
            // Symmetric permissions are per mapping already (one destination per port), so
            // both kinds filter the same way: only where this port has sent to.
            NatKind::Home | NatKind::Symmetric => {
                if self.permissions.contains(&(to.port(), from)) {
                    self.reverse.get(&to.port()).copied()
                } else {
                    None
                }
            }
        }
    }
}

/// Who is at the far end of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Server,
    Client(usize),
}

/// A datagram handed to its receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub at: Duration,
    pub to: Node,
    /// The source address as the receiver sees it (after every NAT).
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Counts of what the network did, for assertions and the trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub blocked_out: u64,
    pub filtered_in: u64,
    pub unroutable: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Duration,
    /// Destination host (its NAT filters at arrival, so holes punched meanwhile count).
    /// Ordered before `seq`: datagrams due at the same instant reach hosts in a fixed order,
    /// whatever order their senders ran in.
    to: Node,
    seq: u64,
    from: SocketAddr,
    dest: SocketAddr,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Site {
    /// Each sender draws from its own stream, so the order in which hosts run within one
    /// instant does not change anybody's luck.
    rng: SimRng,
    internal: SocketAddr,
    nat: Nat,
    link: LinkProfile,
}

/// See the module docs.
#[derive(Debug)]
pub struct Network {
    seed: u64,
    server_rng: SimRng,
    server_addr: SocketAddr,
    server_link: LinkProfile,
    sites: Vec<Site>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    stats: NetStats,
}

/// The voice port every simulated client binds.
pub const CLIENT_PORT: u16 = 40_000;

impl Network {
    pub fn new(seed: u64, server_addr: SocketAddr) -> Self {
        Self {
            seed,
            server_rng: SimRng::new(seed ^ 0x5e5e_5e5e),
            server_addr,
            server_link: LinkProfile {
                latency: Duration::from_millis(5),
                jitter: Duration::ZERO,
                loss: 0.0,
                reorder: 0.0,
            },
            sites: Vec::new(),
            in_flight: BinaryHeap::new(),
            seq: 0,
            stats: NetStats::default(),
        }
    }

    /// Adds client site number `sites().len()` behind a `kind` router; returns the address
    /// the client's socket is bound to (public for [`NatKind::Public`], private otherwise).
    pub fn add_site(&mut self, kind: NatKind, link: LinkProfile) -> SocketAddr {
        let n = self.sites.len() as u8 + 1;
        let external_ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, n));
        let internal = match kind {
            NatKind::Public => SocketAddr::new(external_ip, CLIENT_PORT),
            _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, n, 0, 2)), CLIENT_PORT),
        };
        self.sites.push(Site {
            rng: SimRng::new(self.seed ^ u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            internal,
            nat: Nat::new(kind, external_ip),
            link,
        });
        internal
    }

    /// Has client site `client`'s router map its client's voice port (see [`Nat::map_port`]).
    pub fn map_port(&mut self, client: usize) -> Option<SocketAddr> {
        let site = &mut self.sites[client];
        site.nat.map_port(site.internal)
    }

    /// The public IP of client site `client`'s router (where its TCP connections come from).
    pub fn public_ip(&self, client: usize) -> IpAddr {
        self.sites[client].nat.external_ip()
    }

    pub fn set_link(&mut self, client: usize, link: LinkProfile) {
        self.sites[client].link = link;
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }

    /// Sends `bytes` from `from` to the address `dest` at `now`.
    pub fn send(&mut self, now: Duration, from: Node, dest: SocketAddr, bytes: &[u8]) {
        self.stats.sent += 1;
        let to = if dest == self.server_addr {
            Some((Node::Server, self.server_link))
        } else {
            self.sites
                .iter()
                .position(|s| s.nat.external_ip() == dest.ip())
                .map(|i| (Node::Client(i), self.sites[i].link))
        };
        let (src, out_link, rng) = match from {
            Node::Server => (
                Some(self.server_addr),
                self.server_link,
                &mut self.server_rng,
            ),
            Node::Client(i) => {
                let site = &mut self.sites[i];
                (
                    site.nat.outbound(&mut site.rng, site.internal, dest),
                    site.link,
                    &mut site.rng,
                )
            }
        };
        let Some(src) = src else {
            self.stats.blocked_out += 1;
            return;
        };
        let Some((to, in_link)) = to else {
            self.stats.unroutable += 1;
            return;
        };
        let lost = rng.chance(out_link.loss) | rng.chance(in_link.loss);
        let mut delay = out_link.latency
            + in_link.latency
            + rng.upto(out_link.jitter)
            + rng.upto(in_link.jitter);
        if rng.chance(out_link.reorder) | rng.chance(in_link.reorder) {
            delay += rng.upto(REORDER_HOLD);
        }
        if lost {
            self.stats.lost += 1;
            return;
        }
        self.seq += 1;
        self.in_flight.push(Reverse(InFlight {
            at: now + delay,
            to,
            seq: self.seq,
            from: src,
            dest,
            bytes: bytes.to_vec(),
        }));
    }

    /// When the next datagram arrives, if any is in flight.
    pub fn next_arrival(&self) -> Option<Duration> {
        self.in_flight.peek().map(|Reverse(f)| f.at)
    }

    /// The next datagram due by `now` that its receiver's router lets in.
    pub fn pop_due(&mut self, now: Duration) -> Option<Delivery> {
        while self.in_flight.peek().is_some_and(|Reverse(f)| f.at <= now) {
            let Reverse(f) = self.in_flight.pop()?;
            let to = match f.to {
                Node::Server => Some(f.to),
                Node::Client(i) => self.sites[i]
                    .nat
                    .inbound(f.from, f.dest)
                    .filter(|internal| *internal == self.sites[i].internal)
                    .map(|_| f.to),
            };
            match to {
                Some(to) => {
                    self.stats.delivered += 1;
                    return Some(Delivery {
                        at: f.at,
                        to,
                        from: f.from,
                        bytes: f.bytes,
                    });
                }
                None => self.stats.filtered_in += 1,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn home_router_keeps_one_port_for_every_destination_and_filters_by_port() {
        let mut rng = SimRng::new(1);
        let mut nat = Nat::new(NatKind::Home, "203.0.113.1".parse().unwrap());
        let inside = addr("10.1.0.2:40000");
        let a = nat
            .outbound(&mut rng, inside, addr("198.51.100.1:7700"))
            .unwrap();
        let b = nat
            .outbound(&mut rng, inside, addr("203.0.113.9:40000"))
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(nat.inbound(addr("203.0.113.9:40000"), a), Some(inside));
        assert_eq!(nat.inbound(addr("203.0.113.9:40001"), a), None);
        assert_eq!(nat.inbound(addr("203.0.113.8:40000"), a), None);
    }

    #[test]
    fn symmetric_nat_maps_each_destination_to_its_own_port() {
        let mut rng = SimRng::new(1);
        let mut nat = Nat::new(NatKind::Symmetric, "203.0.113.1".parse().unwrap());
        let inside = addr("10.1.0.2:40000");
        let server = addr("198.51.100.1:7700");
        let peer = addr("203.0.113.9:40000");
        let a = nat.outbound(&mut rng, inside, server).unwrap();
        let b = nat.outbound(&mut rng, inside, peer).unwrap();
        assert_ne!(a, b);
        // The peer may answer on its own mapping, not on the one made for the server.
        assert_eq!(nat.inbound(peer, b), Some(inside));
        assert_eq!(nat.inbound(peer, a), None);
    }

    #[test]
    fn a_mapped_port_lets_anyone_in_and_the_answers_leave_from_it() {
        let mut rng = SimRng::new(1);
        let mut nat = Nat::new(NatKind::Symmetric, "203.0.113.1".parse().unwrap());
        let inside = addr("10.1.0.2:40000");
        let peer = addr("203.0.113.9:40000");
        let mapped = nat.map_port(inside).unwrap();
        assert_eq!(mapped, addr("203.0.113.1:40000"), "the same port when free");
        // Sent to before: a symmetric NAT's own port for that destination...
        let own = nat.outbound(&mut rng, inside, peer).unwrap();
        assert_ne!(own, mapped);
        // ...does not stop the peer coming in through the mapping, answered from it.
        assert_eq!(nat.inbound(peer, mapped), Some(inside));
        assert_eq!(nat.outbound(&mut rng, inside, peer), Some(mapped));
        assert_eq!(nat.inbound(addr("198.51.100.7:1"), mapped), Some(inside));
        let mut blocked = Nat::new(NatKind::UdpBlocked, "203.0.113.2".parse().unwrap());
        assert_eq!(blocked.map_port(inside), None);
    }

    #[test]
    fn blocked_udp_goes_nowhere() {
        let mut rng = SimRng::new(1);
        let mut nat = Nat::new(NatKind::UdpBlocked, "203.0.113.1".parse().unwrap());
        assert_eq!(
            nat.outbound(&mut rng, addr("10.1.0.2:1"), addr("198.51.100.1:7700")),
            None
        );
    }

    #[test]
    fn loss_and_delay_follow_the_seed() {
        let run = |seed| {
            let mut net = Network::new(seed, addr("198.51.100.1:7700"));
            net.add_site(
                NatKind::Public,
                LinkProfile {
                    loss: 0.3,
                    reorder: 0.3,
                    ..LinkProfile::default()
                },
            );
            for i in 0..200u8 {
                net.send(Duration::ZERO, Node::Client(0), net.server_addr(), &[i]);
            }
            let mut got = Vec::new();
            while let Some(d) = net.pop_due(Duration::from_secs(1)) {
                got.push((d.at, d.bytes[0]));
            }
            got
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let got = run(7);
        assert!((100..180).contains(&got.len()), "{}", got.len());
        assert!(got.windows(2).any(|w| w[0].1 > w[1].1), "some reordering");
    }
}
