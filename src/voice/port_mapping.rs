//! The port-mapping thread: the I/O shell around [`PortMapSchedule`].
//!
//! It asks the default gateway to forward our voice socket's UDP port, first with PCP, then
//! NAT-PMP (one datagram each to the gateway's port 5351, answered within milliseconds where
//! the router speaks them), then with UPnP-IGD (an SSDP search, then SOAP over HTTP), renews
//! the lease when the schedule says so, and removes it when the voice thread stops. Every
//! request blocks, which is why this is a thread of its own: it must never hold up the voice
//! loop or the call, which goes on punching meanwhile. What it learns reaches the voice
//! thread as [`VoiceCommand::PortMapping`](super::VoiceCommand::PortMapping), which announces
//! the mapped address as one more candidate.
//!
//! The protocols are libraries', not ours: `crab_nat` speaks PCP (RFC 6887) and NAT-PMP
//! (RFC 6886), `igd-next` speaks UPnP-IGD. `crab_nat` is async, so this thread owns a
//! current-thread tokio runtime and blocks on each request in turn; nothing else in the
//! program uses tokio. When to ask, renew and remove stays with our pure
//! [`PortMapSchedule`], which the tests drive without a router.
//!
//! A network without a mapping router costs two refused (or unanswered) datagrams and an
//! unanswered SSDP search of [`SSDP_TIMEOUT`], then another try after a back-off; nothing is
//! shown but a debug log line and a `null` in the headless summary.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bevy::log::{debug, info};
use crab_nat::{InternetProtocol, MappingFailure, PortMapping, PortMappingOptions, TimeoutConfig};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use igd_next::{AddAnyPortError, AddPortError, PortMappingProtocol, SearchOptions};
use thiserror::Error;

use super::net::gateway::default_gateway_v4;
use super::net::portmap::{MapEvent, MapProtocol, MapRequest, PortLease, PortMapSchedule};

/// How long an SSDP search waits for a gateway to answer (routers answer within
/// milliseconds; UPnP's customary several seconds would only delay giving up).
pub const SSDP_TIMEOUT: Duration = Duration::from_secs(2);
/// PCP and NAT-PMP: the first try, then one resend after 250 ms (RFC 6886's schedule), given
/// up after 750 ms in all: enough on a LAN, and a router without the service usually refuses
/// at once (ICMP port unreachable).
const PMP_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 1,
    max_retry_timeout: Some(Duration::from_millis(500)),
};
/// How long [`PortMapper::shutdown`] waits for the lease to be removed. A request that hangs
/// longer is abandoned: the lease then ends by itself within its lifetime.
pub const REMOVAL_WAIT: Duration = Duration::from_secs(3);
/// Shown in the router's mapping table, so its owner knows what opened the port.
const DESCRIPTION: &str = "p2p-voice";
/// PCP and NAT-PMP's port on the gateway, used to find our own address towards it.
const PMP_PORT: u16 = crab_nat::GATEWAY_PORT;
/// Where UPnP's SSDP searches go, used to find our own address when there is no gateway.
const SSDP_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 255, 250)), 1900);

/// Why one mapping request failed; only logged (the call never depends on it).
#[derive(Debug, Error)]
pub enum MapError {
    #[error("no default IPv4 gateway")]
    NoGateway,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Pmp(#[from] MappingFailure),
    #[error("UPnP search: {0}")]
    UpnpSearch(#[from] igd_next::SearchError),
    #[error("UPnP external address: {0}")]
    UpnpAddress(#[from] igd_next::GetExternalIpError),
    #[error("UPnP mapping: {0}")]
    UpnpAdd(#[from] AddPortError),
    #[error("UPnP mapping: {0}")]
    UpnpAddAny(#[from] AddAnyPortError),
    #[error("UPnP removal: {0}")]
    UpnpRemove(#[from] igd_next::RemovePortError),
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
        let routers = Routers::new()?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let holds_lease = Arc::new(AtomicBool::new(false));
        let holds = Arc::clone(&holds_lease);
        let join = std::thread::Builder::new()
            .name("port-mapping".into())
            .spawn(move || {
                run(port, routers, &stop_rx, &holds, &report);
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
fn run(
    port: u16,
    mut routers: Routers,
    stop: &Receiver<()>,
    holds: &AtomicBool,
    report: &dyn Fn(MapEvent),
) {
    let start = Instant::now();
    let mut schedule = PortMapSchedule::new(Duration::ZERO, port);
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
                MapRequest::Remove(lease) => match routers.remove(lease) {
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

/// What the thread holds of the routers: the PCP or NAT-PMP mapping granted (it carries what
/// renewing and deleting it need, such as PCP's nonce), the UPnP gateway that answered the
/// search, and the runtime `crab_nat`'s requests run on.
struct Routers {
    runtime: tokio::runtime::Runtime,
    pmp: Option<PortMapping>,
    upnp: Option<igd_next::Gateway>,
}

/// The IPv4 default gateway and our address towards it.
fn gateway() -> Option<(Ipv4Addr, Ipv4Addr)> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    let gw = default_gateway_v4(&table)?;
    match super::thread::route_source(SocketAddr::new(IpAddr::V4(gw), PMP_PORT))? {
        IpAddr::V4(local) => Some((gw, local)),
        IpAddr::V6(_) => None,
    }
}

/// A lease from what the router granted; an unspecified address or port 0 is no mapping.
fn lease(
    protocol: MapProtocol,
    external: SocketAddr,
    lifetime: Duration,
) -> Result<PortLease, MapError> {
    if external.ip().is_unspecified() || external.port() == 0 {
        return Err(MapError::NoPublicAddress(external.ip()));
    }
    Ok(PortLease {
        protocol,
        external,
        lifetime,
    })
}

/// Lease times in whole seconds, as all three protocols carry them.
fn seconds(lifetime: Duration) -> u32 {
    u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX)
}

impl Routers {
    fn new() -> Result<Self, std::io::Error> {
        Ok(Self {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?,
            pmp: None,
            upnp: None,
        })
    }

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
            if wants(MapProtocol::Pcp) || wants(MapProtocol::NatPmp) {
                match self.pmp_map(gw, local, port, external_port, lifetime) {
                    Ok(l) => return Ok(l),
                    Err(e) => {
                        debug!("port mapping: PCP/NAT-PMP: {e}");
                        last = e;
                    }
                }
            }
        }
        if wants(MapProtocol::Upnp) {
            // The address the router must forward to: ours on the route to it.
            let local = match gateway {
                Some((_, local)) => Some(local),
                None => match super::thread::route_source(SSDP_ADDR) {
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

    /// PCP, falling back to NAT-PMP where the router answers only that (crab_nat's order), or
    /// the renewal of the mapping we hold with the protocol that granted it.
    fn pmp_map(
        &mut self,
        gw: Ipv4Addr,
        local: Ipv4Addr,
        port: u16,
        external_port: u16,
        lifetime: Duration,
    ) -> Result<PortLease, MapError> {
        let internal = NonZeroU16::new(port).ok_or(MapError::NoPublicAddress(local.into()))?;
        let mapping = match self.pmp.take() {
            Some(mut held) => {
                let renewed = self.runtime.block_on(held.renew());
                match renewed {
                    Ok(()) => held,
                    // The router forgot us (it restarted, say): ask anew.
                    Err(_) => self.new_mapping(gw, local, internal, external_port, lifetime)?,
                }
            }
            None => self.new_mapping(gw, local, internal, external_port, lifetime)?,
        };
        let (protocol, ip) = match mapping.mapping_type() {
            crab_nat::PortMappingType::Pcp { external_ip, .. } => (MapProtocol::Pcp, external_ip),
            crab_nat::PortMappingType::NatPmp => {
                let ip = self.runtime.block_on(crab_nat::natpmp::external_address(
                    gw.into(),
                    Some(PMP_TIMEOUTS),
                ));
                let ip = ip.map_err(MappingFailure::from)?;
                (MapProtocol::NatPmp, IpAddr::V4(ip))
            }
        };
        let external = SocketAddr::new(ip, mapping.external_port().get());
        let lifetime = Duration::from_secs(u64::from(mapping.lifetime()));
        // Held even if the address is unusable, so that stopping still deletes it.
        self.pmp = Some(mapping);
        lease(protocol, external, lifetime)
    }

    /// A new PCP mapping, else a NAT-PMP one. crab_nat falls back by itself only when the
    /// router answers PCP with NAT-PMP's version; a router that ignores PCP altogether (many
    /// NAT-PMP-only ones) would get no NAT-PMP request from it, so we ask after any PCP failure.
    fn new_mapping(
        &self,
        gw: Ipv4Addr,
        local: Ipv4Addr,
        internal: NonZeroU16,
        external_port: u16,
        lifetime: Duration,
    ) -> Result<PortMapping, MappingFailure> {
        let udp = InternetProtocol::Udp;
        let asked = options(external_port, lifetime);
        match self.runtime.block_on(PortMapping::new(
            gw.into(),
            local.into(),
            udp,
            internal,
            asked,
        )) {
            Err(MappingFailure::Pcp(e)) => {
                debug!("port mapping: PCP: {e}; trying NAT-PMP");
                let natpmp = crab_nat::natpmp::port_mapping(gw.into(), udp, internal, asked);
                Ok(self.runtime.block_on(natpmp)?)
            }
            other => other,
        }
    }

    fn upnp_map(
        &mut self,
        internal: SocketAddr,
        external_port: u16,
        lifetime: Duration,
    ) -> Result<PortLease, MapError> {
        let gateway = match self.upnp.take() {
            Some(g) => g,
            None => igd_next::search_gateway(SearchOptions {
                bind_addr: SocketAddr::new(internal.ip(), 0),
                timeout: Some(SSDP_TIMEOUT),
                single_search_timeout: Some(SSDP_TIMEOUT),
                ..SearchOptions::default()
            })?,
        };
        let gateway = self.upnp.insert(gateway);
        let ip = gateway.get_external_ip()?;
        let wanted = if external_port == 0 {
            internal.port()
        } else {
            external_port
        };
        let udp = PortMappingProtocol::UDP;
        let add = |secs| gateway.add_port(udp, wanted, internal, secs, DESCRIPTION);
        let port = match add(seconds(lifetime)) {
            Ok(()) => wanted,
            // Old IGDv1 routers: a lease without end, which we still renew and remove.
            Err(AddPortError::OnlyPermanentLeasesSupported) => add(0).map(|()| wanted)?,
            // Our port is taken there (another host's mapping): let the router pick one.
            Err(AddPortError::PortInUse | AddPortError::SamePortValuesRequired) => {
                gateway.add_any_port(udp, internal, seconds(lifetime), DESCRIPTION)?
            }
            Err(e) => return Err(e.into()),
        };
        lease(MapProtocol::Upnp, SocketAddr::new(ip, port), lifetime)
    }

    fn remove(&mut self, lease: PortLease) -> Result<(), MapError> {
        match lease.protocol {
            MapProtocol::Pcp | MapProtocol::NatPmp => {
                let Some(mapping) = self.pmp.take() else {
                    return Ok(());
                };
                let dropped = self.runtime.block_on(mapping.try_drop());
                dropped.map_err(|(e, mapping)| {
                    self.pmp = Some(mapping);
                    MapError::from(e)
                })
            }
            MapProtocol::Upnp => {
                let gateway = self.upnp.as_ref().ok_or(MapError::NoGateway)?;
                gateway.remove_port(PortMappingProtocol::UDP, lease.external.port())?;
                Ok(())
            }
        }
    }
}

/// What we ask crab_nat for: our port's number outside too if free, for `lifetime`.
fn options(external_port: u16, lifetime: Duration) -> PortMappingOptions {
    PortMappingOptions {
        external_port: NonZeroU16::new(external_port),
        lifetime_seconds: Some(seconds(lifetime)),
        timeout_config: Some(PMP_TIMEOUTS),
    }
}
