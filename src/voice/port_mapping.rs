//! The port-mapping thread: the I/O shell around [`PortMapSchedule`].
//!
//! It asks the default gateway to forward our voice socket's UDP port, first with PCP and
//! NAT-PMP (one datagram each to the gateway's port 5351, answered within milliseconds where
//! the router speaks them), then with UPnP-IGD (an SSDP search, then SOAP over HTTP), renews
//! the lease when the schedule says so, and removes it when the voice thread stops. Every
//! request blocks, which is why this is a thread of its own: it must never hold up the voice
//! loop or the call, which goes on punching meanwhile. What it learns reaches the voice
//! thread as [`VoiceCommand::PortMapping`](super::VoiceCommand::PortMapping), which announces
//! the mapped address as one more candidate. The messages are `net::portmap_wire`'s.
//!
//! A network without a mapping router costs two refused (or unanswered) datagrams and an
//! unanswered SSDP search of [`SSDP_TIMEOUT`], then another try after a back-off; nothing is
//! shown but a debug log line and a `null` in the headless summary.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bevy::log::{debug, info};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rand::Rng;
use thiserror::Error;

use super::net::portmap::{MapEvent, MapProtocol, MapRequest, PortLease, PortMapSchedule};
use super::net::portmap_wire::{self as wire, Granted, IgdService, WireError};

/// How long an SSDP search waits for a gateway to answer (routers answer within
/// milliseconds; UPnP's customary several seconds would only delay giving up).
pub const SSDP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one PCP or NAT-PMP exchange may take: the first try and one resend after
/// 250 ms (RFC 6886's schedule), enough on a LAN.
pub const PCP_TIMEOUT: Duration = Duration::from_millis(750);
/// Connect, read and write timeout of one HTTP exchange with a UPnP gateway.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`PortMapper::shutdown`] waits for the lease to be removed. A request that hangs
/// longer is abandoned: the lease then ends by itself within its lifetime.
pub const REMOVAL_WAIT: Duration = Duration::from_secs(3);
/// Shown in the router's mapping table, so its owner knows what opened the port.
const DESCRIPTION: &str = "p2p-voice";
/// Largest HTTP answer read from a gateway (descriptions are a few kB).
const MAX_HTTP_ANSWER: u64 = 256 * 1024;

/// Why one mapping request failed; only logged (the call never depends on it).
#[derive(Debug, Error)]
pub enum MapError {
    #[error("no default IPv4 gateway")]
    NoGateway,
    #[error("no answer")]
    NoAnswer,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the router reports no usable public address ({0})")]
    NoPublicAddress(IpAddr),
}

/// Handle to the running port-mapping thread. Dropping it stops the thread (removing the
/// lease, waiting at most [`REMOVAL_WAIT`]).
pub struct PortMapper {
    stop: Option<Sender<()>>,
    done: Receiver<()>,
    holds_lease: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl PortMapper {
    /// Starts mapping UDP `port` of this host; every [`MapEvent`] goes to `report`.
    pub fn spawn(
        port: u16,
        report: impl Fn(MapEvent) + Send + 'static,
    ) -> Result<Self, std::io::Error> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let holds_lease = Arc::new(AtomicBool::new(false));
        let holds = Arc::clone(&holds_lease);
        let join = std::thread::Builder::new()
            .name("port-mapping".into())
            .spawn(move || {
                run(port, &stop_rx, &holds, &report);
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            stop: Some(stop_tx),
            done: done_rx,
            holds_lease,
            join: Some(join),
        })
    }

    /// Stops the thread: removes the lease it holds (waiting at most [`REMOVAL_WAIT`] for
    /// that), or, holding none, returns at once; a search still running then ends on its own
    /// and removes what it may still get.
    pub fn shutdown(&mut self) {
        let Some(stop) = self.stop.take() else {
            return;
        };
        let _ = stop.send(());
        let wait = if self.holds_lease.load(Ordering::Acquire) {
            REMOVAL_WAIT
        } else {
            Duration::ZERO
        };
        if self.done.recv_timeout(wait).is_ok() {
            if let Some(join) = self.join.take() {
                let _ = join.join();
            }
        }
    }
}

impl Drop for PortMapper {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The thread's loop: do what the schedule asks, sleep until it is due or we are stopped.
fn run(port: u16, stop: &Receiver<()>, holds: &AtomicBool, report: &dyn Fn(MapEvent)) {
    let start = Instant::now();
    let mut schedule = PortMapSchedule::new(Duration::ZERO, port);
    let mut routers = Routers::default();
    let mut stopping = false;
    loop {
        let now = start.elapsed();
        schedule.handle_timeout(now);
        if let Some(request) = schedule.poll_request(now) {
            match request {
                MapRequest::Map {
                    only,
                    external_port,
                    lifetime,
                } => match routers.map(port, only, external_port, lifetime) {
                    Ok(lease) => {
                        info!(
                            "port mapping: {} maps {} to our port {port} for {} s (after {} ms)",
                            lease.protocol,
                            lease.external,
                            lease.lifetime.as_secs(),
                            start.elapsed().as_millis()
                        );
                        schedule.handle_mapped(start.elapsed(), lease);
                    }
                    Err(e) => {
                        debug!("port mapping: none for port {port}: {e}");
                        schedule.handle_failed(start.elapsed());
                    }
                },
                MapRequest::Remove(lease) => match routers.remove(port, lease) {
                    Ok(()) => {
                        debug!("port mapping: removed {}", lease.external);
                        schedule.handle_removed();
                    }
                    Err(e) => {
                        debug!("port mapping: could not remove {}: {e}", lease.external);
                        schedule.handle_failed(start.elapsed());
                    }
                },
            }
            holds.store(schedule.lease().is_some(), Ordering::Release);
        }
        while let Some(event) = schedule.poll_event() {
            report(event);
        }
        if stopping && schedule.is_stopped() {
            return;
        }
        if !stopping && stop.try_recv().is_ok() {
            stopping = true;
            schedule.stop();
            continue;
        }
        let Some(due) = schedule.poll_timeout() else {
            if stopping {
                return;
            }
            // Nothing scheduled (cannot happen outside stopping); wait for the stop.
            let _ = stop.recv();
            stopping = true;
            schedule.stop();
            continue;
        };
        let wait = due.saturating_sub(start.elapsed());
        if wait.is_zero() {
            continue;
        }
        match stop.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) if !stopping => {
                stopping = true;
                schedule.stop();
            }
            _ => {}
        }
    }
}

/// What the thread knows of the routers: the PCP nonce of our mapping (the same for its
/// renewals and its deletion) and the UPnP service that answered the search.
struct Routers {
    nonce: [u8; 12],
    upnp: Option<IgdService>,
}

impl Default for Routers {
    fn default() -> Self {
        Self {
            nonce: rand::random(),
            upnp: None,
        }
    }
}

/// The IPv4 default gateway and our address towards it.
fn gateway() -> Option<(Ipv4Addr, Ipv4Addr)> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    let gw = wire::default_gateway_v4(&table)?;
    match super::thread::route_source(SocketAddr::new(IpAddr::V4(gw), wire::PCP_PORT))? {
        IpAddr::V4(local) => Some((gw, local)),
        IpAddr::V6(_) => None,
    }
}

fn lease(protocol: MapProtocol, g: Granted) -> Result<PortLease, MapError> {
    if g.external.ip().is_unspecified() || g.external.port() == 0 {
        return Err(MapError::NoPublicAddress(g.external.ip()));
    }
    Ok(PortLease {
        protocol,
        external: g.external,
        lifetime: g.lifetime,
    })
}

impl Routers {
    /// Maps `port` with `only` that protocol (renewal) or each in turn (search).
    fn map(
        &mut self,
        port: u16,
        only: Option<MapProtocol>,
        external_port: u16,
        lifetime: Duration,
    ) -> Result<PortLease, MapError> {
        let wants = |p| only.is_none_or(|o| o == p);
        let gateway = gateway();
        let mut last = MapError::NoGateway;
        if let Some((gw, local)) = gateway {
            if wants(MapProtocol::Pcp) {
                let request = wire::pcp_map_request(
                    IpAddr::V4(local),
                    self.nonce,
                    port,
                    external_port,
                    lifetime,
                );
                let nonce = self.nonce;
                match exchange(gw, &request, |b| {
                    wire::parse_pcp_map_response(b, nonce, port)
                })
                .and_then(|g| lease(MapProtocol::Pcp, g))
                {
                    Ok(l) => return Ok(l),
                    Err(e) => {
                        debug!("port mapping: PCP: {e}");
                        last = e;
                    }
                }
            }
            if wants(MapProtocol::NatPmp) {
                match natpmp_map(gw, port, external_port, lifetime) {
                    Ok(l) => return Ok(l),
                    Err(e) => {
                        debug!("port mapping: NAT-PMP: {e}");
                        last = e;
                    }
                }
            }
        }
        if wants(MapProtocol::Upnp) {
            // The address the router must forward to: ours on the route to it.
            let local = match gateway {
                Some((_, local)) => Some(local),
                None => match super::thread::route_source(wire::SSDP_ADDR) {
                    Some(IpAddr::V4(local)) => Some(local),
                    _ => None,
                },
            };
            if let Some(local) = local {
                let mapped = self.upnp_map(
                    SocketAddr::new(IpAddr::V4(local), port),
                    external_port,
                    lifetime,
                );
                if mapped.is_err() {
                    // Perhaps another router now, or it restarted on another port: search again.
                    self.upnp = None;
                }
                return mapped;
            }
        }
        Err(last)
    }

    fn upnp_map(
        &mut self,
        internal: SocketAddr,
        external_port: u16,
        lifetime: Duration,
    ) -> Result<PortLease, MapError> {
        let service = match self.upnp.take() {
            Some(s) => s,
            None => upnp_search(internal.ip())?,
        };
        let service = self.upnp.insert(service);
        let ip = wire::parse_external_ip(&http(
            service.control.addr,
            &wire::external_ip_request(service),
        )?)?;
        let add = |port: u16, lifetime: Duration| {
            http(
                service.control.addr,
                &wire::add_port_request(service, port, internal, lifetime, DESCRIPTION),
            )
            .map(|_| port)
        };
        let port = match add(external_port, lifetime) {
            Ok(port) => port,
            // Old IGDv1 routers: a lease without end, which we still renew and remove.
            Err(MapError::Wire(WireError::Upnp(725))) => add(external_port, Duration::ZERO)?,
            // Our port is taken there (another host's mapping): a few others will do.
            Err(MapError::Wire(WireError::Upnp(_))) => {
                let mut result = Err(MapError::NoAnswer);
                for _ in 0..4 {
                    result = add(rand::thread_rng().gen_range(1024..=65535), lifetime);
                    if result.is_ok() {
                        break;
                    }
                }
                result?
            }
            Err(e) => return Err(e),
        };
        lease(
            MapProtocol::Upnp,
            Granted {
                external: SocketAddr::new(ip, port),
                lifetime,
            },
        )
    }

    fn remove(&mut self, port: u16, lease: PortLease) -> Result<(), MapError> {
        match lease.protocol {
            MapProtocol::Pcp => {
                let (gw, local) = gateway().ok_or(MapError::NoGateway)?;
                let request =
                    wire::pcp_map_request(IpAddr::V4(local), self.nonce, port, 0, Duration::ZERO);
                let nonce = self.nonce;
                exchange(gw, &request, |b| {
                    wire::parse_pcp_map_response(b, nonce, port)
                })
                .map(|_| ())
            }
            MapProtocol::NatPmp => {
                let (gw, _) = gateway().ok_or(MapError::NoGateway)?;
                // RFC 6886: lifetime 0 and external port 0 delete the mapping.
                let request = wire::natpmp_map_request(port, 0, Duration::ZERO);
                exchange(gw, &request, |b| {
                    wire::parse_natpmp_map_response(b, port, Ipv4Addr::UNSPECIFIED)
                })
                .map(|_| ())
            }
            MapProtocol::Upnp => {
                let service = self.upnp.as_ref().ok_or(MapError::NoGateway)?;
                http(
                    service.control.addr,
                    &wire::delete_port_request(service, lease.external.port()),
                )
                .map(|_| ())
            }
        }
    }
}

/// One NAT-PMP mapping: the router's public address, then the mapping of our port.
fn natpmp_map(
    gateway: Ipv4Addr,
    port: u16,
    external_port: u16,
    lifetime: Duration,
) -> Result<PortLease, MapError> {
    let public = exchange(
        gateway,
        &wire::NATPMP_ADDRESS_REQUEST,
        wire::parse_natpmp_address_response,
    )?;
    let request = wire::natpmp_map_request(port, external_port, lifetime);
    let granted = exchange(gateway, &request, |b| {
        wire::parse_natpmp_map_response(b, port, public)
    })?;
    lease(MapProtocol::NatPmp, granted)
}

/// Sends `request` to the gateway's PCP/NAT-PMP port and returns the first answer `parse`
/// accepts; resends once after 250 ms, gives up after [`PCP_TIMEOUT`]. A router without
/// the service usually refuses at once (ICMP port unreachable).
fn exchange<T>(
    gateway: Ipv4Addr,
    request: &[u8],
    parse: impl Fn(&[u8]) -> Result<T, WireError>,
) -> Result<T, MapError> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect((gateway, wire::PCP_PORT))?;
    let start = Instant::now();
    let mut resend = Duration::from_millis(250);
    socket.send(request)?;
    let mut buf = [0u8; 1100];
    loop {
        let elapsed = start.elapsed();
        if elapsed >= PCP_TIMEOUT {
            return Err(MapError::NoAnswer);
        }
        if elapsed >= resend {
            socket.send(request)?;
            resend = PCP_TIMEOUT;
        }
        socket.set_read_timeout(Some(resend.min(PCP_TIMEOUT) - elapsed))?;
        match socket.recv(&mut buf) {
            Ok(n) => match parse(&buf[..n]) {
                // Somebody else's answer (an earlier request's): keep waiting.
                Err(WireError::Unrelated) => {}
                other => return other.map_err(MapError::from),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Finds the UPnP gateway's connection service: SSDP search from `local`, then its
/// device description.
fn upnp_search(local: IpAddr) -> Result<IgdService, MapError> {
    let socket = UdpSocket::bind((local, 0))?;
    for search in wire::ssdp_searches() {
        socket.send_to(search.as_bytes(), wire::SSDP_ADDR)?;
    }
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    loop {
        let left = SSDP_TIMEOUT.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(MapError::NoAnswer);
        }
        socket.set_read_timeout(Some(left))?;
        let n = match socket.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(MapError::NoAnswer)
            }
            Err(e) => return Err(e.into()),
        };
        let Some(location) = wire::parse_ssdp_location(&String::from_utf8_lossy(&buf[..n])) else {
            continue;
        };
        match http(location.addr, &wire::description_request(&location))
            .and_then(|xml| Ok(wire::parse_igd_description(&xml, &location)?))
        {
            Ok(service) => return Ok(service),
            Err(e) => debug!("port mapping: UPnP device at {}: {e}", location.addr),
        }
    }
}

/// One HTTP exchange (the request says `Connection: close`): the answer's body.
fn http(addr: SocketAddr, request: &[u8]) -> Result<String, MapError> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    stream.write_all(request)?;
    let mut raw = Vec::new();
    if let Err(e) = stream.take(MAX_HTTP_ANSWER).read_to_end(&mut raw) {
        // A router that keeps the connection open: what came before the timeout may be whole.
        if raw.is_empty() {
            return Err(e.into());
        }
    }
    Ok(wire::parse_http_response(&raw)?)
}
