//! What goes over the wire to a router that maps ports: PCP (RFC 6887) and NAT-PMP
//! (RFC 6886) datagrams, UPnP-IGD's SSDP search, device description and SOAP calls, and the
//! default route. Pure: encoders return bytes, parsers take bytes or text; the port-mapping
//! thread (`voice::port_mapping`) owns the sockets.
//!
//! Written here rather than taken from a crate: the Rust UPnP client (`igd-next`, through
//! `url`'s IDNA tables) and NAT-PMP client (`natpmp`, through `async-trait`) turn on extra
//! `syn` and `getrandom` features that every Bevy crate shares, which rebuilds all of them;
//! and the three protocols need only the handful of messages below.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The port PCP and NAT-PMP servers listen on, at the default gateway.
pub const PCP_PORT: u16 = 5351;
/// SSDP's multicast group and port.
pub const SSDP_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 255, 250)), 1900);
const UDP: u8 = 17;

/// Why a router's answer was not a mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("answer too short or malformed")]
    Malformed,
    #[error("answer to another request")]
    Unrelated,
    /// The server's result code (PCP: RFC 6887 section 7.4; NAT-PMP: RFC 6886 section 3.5).
    #[error("refused with result code {0}")]
    Refused(u16),
    /// The PCP server speaks another version (a NAT-PMP-only router answers so).
    #[error("unsupported protocol version")]
    UnsupportedVersion,
    /// UPnP: the SOAP fault's error code (718: port taken, 725: only permanent leases).
    #[error("UPnP error {0}")]
    Upnp(u16),
    #[error("HTTP status {0}")]
    Http(u16),
    #[error("no WANIPConnection or WANPPPConnection service in the description")]
    NoService,
}

/// A granted mapping as a router reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub external: SocketAddr,
    pub lifetime: Duration,
}

fn lifetime_secs(lifetime: Duration) -> u32 {
    lifetime.as_secs().min(u64::from(u32::MAX)) as u32
}

fn v6_form(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

// ---- PCP (RFC 6887) ----

/// PCP result code: the server knows not this version (NAT-PMP-only routers say so too).
const PCP_UNSUPP_VERSION: u8 = 1;

/// A PCP MAP request for UDP `internal_port` of `client` (our address as the router sees
/// it), suggesting `external_port`; lifetime zero deletes the mapping. `nonce` must be the
/// same for the renewals and the deletion of one mapping.
pub fn pcp_map_request(
    client: IpAddr,
    nonce: [u8; 12],
    internal_port: u16,
    external_port: u16,
    lifetime: Duration,
) -> [u8; 60] {
    let mut b = [0u8; 60];
    b[0] = 2; // version
    b[1] = 1; // request, opcode MAP
    b[4..8].copy_from_slice(&lifetime_secs(lifetime).to_be_bytes());
    b[8..24].copy_from_slice(&v6_form(client).octets());
    b[24..36].copy_from_slice(&nonce);
    b[36] = UDP;
    b[40..42].copy_from_slice(&internal_port.to_be_bytes());
    b[42..44].copy_from_slice(&external_port.to_be_bytes());
    // Suggested external address: "any" of our family.
    let any = match client {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    b[44..60].copy_from_slice(&v6_form(any).octets());
    b
}

/// The answer to [`pcp_map_request`] with this `nonce` and `internal_port`.
pub fn parse_pcp_map_response(
    b: &[u8],
    nonce: [u8; 12],
    internal_port: u16,
) -> Result<Granted, WireError> {
    if b.len() < 4 {
        return Err(WireError::Malformed);
    }
    if b[3] == PCP_UNSUPP_VERSION || b[0] != 2 {
        return Err(WireError::UnsupportedVersion);
    }
    if b[1] != 0x81 {
        return Err(WireError::Unrelated);
    }
    if b[3] != 0 {
        return Err(WireError::Refused(u16::from(b[3])));
    }
    if b.len() < 60 {
        return Err(WireError::Malformed);
    }
    if b[24..36] != nonce || b[36] != UDP || u16::from_be_bytes([b[40], b[41]]) != internal_port {
        return Err(WireError::Unrelated);
    }
    let lifetime = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let port = u16::from_be_bytes([b[42], b[43]]);
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[44..60]);
    let ip = Ipv6Addr::from(ip);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    Ok(Granted {
        external: SocketAddr::new(ip, port),
        lifetime: Duration::from_secs(u64::from(lifetime)),
    })
}

// ---- NAT-PMP (RFC 6886) ----

/// NAT-PMP's request for the router's public address.
pub const NATPMP_ADDRESS_REQUEST: [u8; 2] = [0, 0];

/// NAT-PMP's mapping request for UDP `internal_port`; lifetime zero (with external port
/// zero) deletes it.
pub fn natpmp_map_request(internal_port: u16, external_port: u16, lifetime: Duration) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = 1; // map UDP
    b[4..6].copy_from_slice(&internal_port.to_be_bytes());
    b[6..8].copy_from_slice(&external_port.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime_secs(lifetime).to_be_bytes());
    b
}

fn natpmp_header(b: &[u8], opcode: u8, len: usize) -> Result<(), WireError> {
    if b.len() < 4 || b[0] != 0 {
        return Err(WireError::Malformed);
    }
    if b[1] != opcode {
        return Err(WireError::Unrelated);
    }
    let result = u16::from_be_bytes([b[2], b[3]]);
    if result != 0 {
        return Err(WireError::Refused(result));
    }
    if b.len() < len {
        return Err(WireError::Malformed);
    }
    Ok(())
}

/// The router's public address from the answer to [`NATPMP_ADDRESS_REQUEST`].
pub fn parse_natpmp_address_response(b: &[u8]) -> Result<Ipv4Addr, WireError> {
    natpmp_header(b, 128, 12)?;
    Ok(Ipv4Addr::new(b[8], b[9], b[10], b[11]))
}

/// The external port and lifetime from the answer to [`natpmp_map_request`] for
/// `internal_port`, with the router's `public` address.
pub fn parse_natpmp_map_response(
    b: &[u8],
    internal_port: u16,
    public: Ipv4Addr,
) -> Result<Granted, WireError> {
    natpmp_header(b, 129, 16)?;
    if u16::from_be_bytes([b[8], b[9]]) != internal_port {
        return Err(WireError::Unrelated);
    }
    let port = u16::from_be_bytes([b[10], b[11]]);
    let lifetime = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
    Ok(Granted {
        external: SocketAddr::new(IpAddr::V4(public), port),
        lifetime: Duration::from_secs(u64::from(lifetime)),
    })
}

// ---- UPnP-IGD ----

/// The SSDP searches to multicast: for version 1 and version 2 gateways (a router answers
/// the version it implements or any below it; asking both finds either kind).
pub fn ssdp_searches() -> [String; 2] {
    ["1", "2"].map(|v| {
        format!(
            "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\
             ST: urn:schemas-upnp-org:device:InternetGatewayDevice:{v}\r\n\
             MAN: \"ssdp:discover\"\r\nMX: 1\r\n\r\n"
        )
    })
}

/// The `LOCATION` (device description URL) of an SSDP answer.
pub fn parse_ssdp_location(answer: &str) -> Option<HttpUrl> {
    let first = answer.lines().next()?;
    if !first.starts_with("HTTP/1.") || !first.contains(" 200") {
        return None;
    }
    answer.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("location")
            .then(|| HttpUrl::parse(value.trim()))
            .flatten()
    })
}

/// An `http://` URL with a literal address (all a gateway on our LAN gives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub addr: SocketAddr,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Option<HttpUrl> {
        let rest = url.strip_prefix("http://")?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = host
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| Some(SocketAddr::new(host.parse().ok()?, 80)))?;
        Some(HttpUrl {
            addr,
            path: path.to_string(),
        })
    }

    /// `reference` (absolute, or a path on this URL's host) resolved against this URL.
    pub fn join(&self, reference: &str) -> Option<HttpUrl> {
        if reference.starts_with("http://") {
            return HttpUrl::parse(reference);
        }
        let path = if reference.starts_with('/') {
            reference.to_string()
        } else {
            let dir = &self.path[..self.path.rfind('/').map_or(0, |i| i + 1)];
            format!("{}{reference}", if dir.is_empty() { "/" } else { dir })
        };
        Some(HttpUrl {
            addr: self.addr,
            path,
        })
    }
}

/// The service to ask for mappings: its type (the namespace of its SOAP calls) and control
/// URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgdService {
    pub service_type: String,
    pub control: HttpUrl,
}

/// Text of the first `<tag>...</tag>` in `xml` (namespace prefixes on the tag allowed).
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = xml[from..].find('<').map(|i| i + from) {
        let end = xml[i..].find('>')? + i;
        let name = xml[i + 1..end].split_whitespace().next().unwrap_or("");
        let local = name.rsplit(':').next().unwrap_or(name);
        if local == tag && !name.starts_with('/') {
            let body = &xml[end + 1..];
            let close = body.find(&format!("</{name}>"))?;
            return Some(body[..close].trim());
        }
        from = end + 1;
    }
    None
}

/// The WANIPConnection (or, on PPP links, WANPPPConnection) service of a device
/// description fetched from `location`. An IP connection is preferred when both exist.
pub fn parse_igd_description(xml: &str, location: &HttpUrl) -> Result<IgdService, WireError> {
    let mut found: Option<IgdService> = None;
    for block in xml.split("<service>").skip(1) {
        let block = block.split("</service>").next().unwrap_or(block);
        let (Some(kind), Some(control)) =
            (element(block, "serviceType"), element(block, "controlURL"))
        else {
            continue;
        };
        let ip = kind.contains(":service:WANIPConnection:");
        if !ip && !kind.contains(":service:WANPPPConnection:") {
            continue;
        }
        let Some(control) = location.join(control) else {
            continue;
        };
        let service = IgdService {
            service_type: kind.to_string(),
            control,
        };
        if ip {
            return Ok(service);
        }
        found.get_or_insert(service);
    }
    found.ok_or(WireError::NoService)
}

/// A SOAP call to `service`: the HTTP request to send to `service.control.addr`.
fn soap_request(service: &IgdService, action: &str, args: &[(&str, String)]) -> Vec<u8> {
    let mut body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:{action} xmlns:u=\"{}\">",
        service.service_type
    );
    for (name, value) in args {
        body.push_str(&format!("<{name}>{value}</{name}>"));
    }
    body.push_str(&format!("</u:{action}></s:Body></s:Envelope>\r\n"));
    format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
         SOAPAction: \"{}#{action}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        service.control.path,
        service.control.addr,
        service.service_type,
        body.len()
    )
    .into_bytes()
}

/// The HTTP GET of a device description.
pub fn description_request(url: &HttpUrl) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        url.path, url.addr
    )
    .into_bytes()
}

pub fn external_ip_request(service: &IgdService) -> Vec<u8> {
    soap_request(service, "GetExternalIPAddress", &[])
}

/// AddPortMapping of UDP `external_port` to `internal`; lifetime zero asks for a permanent
/// one (for routers that know no other).
pub fn add_port_request(
    service: &IgdService,
    external_port: u16,
    internal: SocketAddr,
    lifetime: Duration,
    description: &str,
) -> Vec<u8> {
    soap_request(
        service,
        "AddPortMapping",
        &[
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", external_port.to_string()),
            ("NewProtocol", "UDP".into()),
            ("NewInternalPort", internal.port().to_string()),
            ("NewInternalClient", internal.ip().to_string()),
            ("NewEnabled", "1".into()),
            ("NewPortMappingDescription", description.into()),
            ("NewLeaseDuration", lifetime_secs(lifetime).to_string()),
        ],
    )
}

pub fn delete_port_request(service: &IgdService, external_port: u16) -> Vec<u8> {
    soap_request(
        service,
        "DeletePortMapping",
        &[
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", external_port.to_string()),
            ("NewProtocol", "UDP".into()),
        ],
    )
}

/// The body of a whole HTTP/1.1 response (`Content-Length`, chunked, or read to the close),
/// or its status when not 2xx; SOAP faults (status 500) become [`WireError::Upnp`].
pub fn parse_http_response(raw: &[u8]) -> Result<String, WireError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(WireError::Malformed)?;
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or(WireError::Malformed)?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(body).ok_or(WireError::Malformed)?
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.get(..len).ok_or(WireError::Malformed)?.to_string()
    } else {
        body.to_string()
    };
    if (200..300).contains(&status) {
        return Ok(body);
    }
    match element(&body, "errorCode").and_then(|c| c.parse().ok()) {
        Some(code) => Err(WireError::Upnp(code)),
        None => Err(WireError::Http(status)),
    }
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// The address in a GetExternalIPAddress answer.
pub fn parse_external_ip(body: &str) -> Result<IpAddr, WireError> {
    element(body, "NewExternalIPAddress")
        .and_then(|s| s.parse().ok())
        .ok_or(WireError::Malformed)
}

/// The IPv4 default gateway in Linux's `/proc/net/route` (gateway in host byte order hex).
pub fn default_gateway_v4(proc_net_route: &str) -> Option<Ipv4Addr> {
    proc_net_route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gateway, flags) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let flags = u16::from_str_radix(flags, 16).ok()?;
        // RTF_UP | RTF_GATEWAY, destination 0.0.0.0.
        if *dest != "00000000" || flags & 0x3 != 0x3 {
            return None;
        }
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        Some(Ipv4Addr::from(raw.to_le_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: [u8; 12] = [7; 12];

    fn pcp_answer(result: u8, port: u16, ip: [u8; 4], lifetime: u32) -> Vec<u8> {
        let mut b = vec![0u8; 60];
        b[0] = 2;
        b[1] = 0x81;
        b[3] = result;
        b[4..8].copy_from_slice(&lifetime.to_be_bytes());
        b[24..36].copy_from_slice(&NONCE);
        b[36] = 17;
        b[40..42].copy_from_slice(&40_000u16.to_be_bytes());
        b[42..44].copy_from_slice(&port.to_be_bytes());
        b[44..60].copy_from_slice(&Ipv4Addr::from(ip).to_ipv6_mapped().octets());
        b
    }

    #[test]
    fn pcp_map_request_has_the_rfc_layout() {
        let b = pcp_map_request(
            IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)),
            NONCE,
            40_000,
            40_001,
            Duration::from_secs(1200),
        );
        assert_eq!(&b[..4], &[2, 1, 0, 0]);
        assert_eq!(u32::from_be_bytes([b[4], b[5], b[6], b[7]]), 1200);
        assert_eq!(
            &b[8..24],
            &Ipv4Addr::new(10, 1, 0, 2).to_ipv6_mapped().octets()
        );
        assert_eq!(&b[24..36], &NONCE);
        assert_eq!(b[36], 17);
        assert_eq!(u16::from_be_bytes([b[40], b[41]]), 40_000);
        assert_eq!(u16::from_be_bytes([b[42], b[43]]), 40_001);
        assert_eq!(&b[44..60], &Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    }

    #[test]
    fn pcp_answer_gives_the_assigned_address_and_lifetime() {
        let g = parse_pcp_map_response(&pcp_answer(0, 51_000, [198, 20, 0, 1], 600), NONCE, 40_000)
            .unwrap();
        assert_eq!(g.external, "198.20.0.1:51000".parse().unwrap());
        assert_eq!(g.lifetime, Duration::from_secs(600));
    }

    #[test]
    fn pcp_refusals_and_strangers_are_errors() {
        assert_eq!(
            parse_pcp_map_response(&pcp_answer(2, 1, [1, 1, 1, 1], 0), NONCE, 40_000),
            Err(WireError::Refused(2))
        );
        assert_eq!(
            parse_pcp_map_response(&pcp_answer(0, 1, [1, 1, 1, 1], 60), [8; 12], 40_000),
            Err(WireError::Unrelated)
        );
        // A NAT-PMP-only router answers a PCP request with its own version and an error.
        assert_eq!(
            parse_pcp_map_response(&[0, 0x81, 0, 1], NONCE, 40_000),
            Err(WireError::UnsupportedVersion)
        );
        assert_eq!(
            parse_pcp_map_response(&[2, 0x81, 0, 0], NONCE, 40_000),
            Err(WireError::Malformed)
        );
    }

    #[test]
    fn natpmp_round_trip() {
        let req = natpmp_map_request(40_000, 40_000, Duration::from_secs(1200));
        assert_eq!(req, [0, 1, 0, 0, 0x9c, 0x40, 0x9c, 0x40, 0, 0, 4, 0xb0]);
        let addr = [0, 128, 0, 0, 0, 0, 0, 9, 198, 20, 0, 1];
        let ip = parse_natpmp_address_response(&addr).unwrap();
        assert_eq!(ip, Ipv4Addr::new(198, 20, 0, 1));
        let map = [
            0, 129, 0, 0, 0, 0, 0, 9, 0x9c, 0x40, 0xc7, 0x38, 0, 0, 2, 0x58,
        ];
        let g = parse_natpmp_map_response(&map, 40_000, ip).unwrap();
        assert_eq!(g.external, "198.20.0.1:51000".parse().unwrap());
        assert_eq!(g.lifetime, Duration::from_secs(600));
        assert_eq!(
            parse_natpmp_map_response(&map, 40_001, ip),
            Err(WireError::Unrelated)
        );
        let refused = [0, 129, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_natpmp_map_response(&refused, 40_000, ip),
            Err(WireError::Refused(2))
        );
    }

    #[test]
    fn ssdp_answer_gives_the_description_url() {
        let answer = "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n\
                      ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
                      Location: http://10.1.0.1:40153/rootDesc.xml\r\n\r\n";
        assert_eq!(
            parse_ssdp_location(answer),
            Some(HttpUrl {
                addr: "10.1.0.1:40153".parse().unwrap(),
                path: "/rootDesc.xml".into()
            })
        );
        assert_eq!(parse_ssdp_location("NOTIFY * HTTP/1.1\r\n\r\n"), None);
    }

    const DESCRIPTION: &str = r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceList><device><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType><controlURL>/ctl/PPP</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>ctl/IPConn</controlURL></service>
</serviceList></device></deviceList></device></deviceList></device></root>"#;

    #[test]
    fn description_gives_the_ip_connection_service() {
        let location = HttpUrl::parse("http://10.1.0.1:40153/rootDesc.xml").unwrap();
        let s = parse_igd_description(DESCRIPTION, &location).unwrap();
        assert_eq!(
            s.service_type,
            "urn:schemas-upnp-org:service:WANIPConnection:2"
        );
        assert_eq!(s.control.path, "/ctl/IPConn");
        assert_eq!(s.control.addr, location.addr);
        let ppp_only = DESCRIPTION.replace("WANIPConnection", "WANCommonInterfaceConfig");
        let s = parse_igd_description(&ppp_only, &location).unwrap();
        assert_eq!(s.control.path, "/ctl/PPP");
        assert_eq!(
            parse_igd_description("<root/>", &location),
            Err(WireError::NoService)
        );
    }

    #[test]
    fn soap_add_port_names_the_service_action_and_arguments() {
        let location = HttpUrl::parse("http://10.1.0.1:40153/rootDesc.xml").unwrap();
        let s = parse_igd_description(DESCRIPTION, &location).unwrap();
        let req = String::from_utf8(add_port_request(
            &s,
            40_000,
            "10.1.0.2:40000".parse().unwrap(),
            Duration::from_secs(1200),
            "p2p-voice",
        ))
        .unwrap();
        assert!(req.starts_with("POST /ctl/IPConn HTTP/1.1\r\nHost: 10.1.0.1:40153\r\n"));
        assert!(req.contains(
            "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping\""
        ));
        let body = req.split_once("\r\n\r\n").unwrap().1;
        assert!(req.contains(&format!("Content-Length: {}\r\n", body.len())));
        for part in [
            "<NewExternalPort>40000</NewExternalPort>",
            "<NewProtocol>UDP</NewProtocol>",
            "<NewInternalClient>10.1.0.2</NewInternalClient>",
            "<NewLeaseDuration>1200</NewLeaseDuration>",
        ] {
            assert!(body.contains(part), "{part} in {body}");
        }
    }

    #[test]
    fn http_answers_bodies_and_faults() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_http_response(ok).unwrap(), "hello");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(chunked).unwrap(), "hello world");
        let fault = b"HTTP/1.1 500 Internal Server Error\r\n\r\n<s:Envelope><s:Body><s:Fault><detail>\
                      <UPnPError><errorCode>718</errorCode></UPnPError></detail></s:Fault></s:Body></s:Envelope>";
        assert_eq!(parse_http_response(fault), Err(WireError::Upnp(718)));
        assert_eq!(
            parse_http_response(b"HTTP/1.1 404 Not Found\r\n\r\n"),
            Err(WireError::Http(404))
        );
        let ip = "<s:Envelope><s:Body><u:GetExternalIPAddressResponse xmlns:u=\"x\">\
                  <NewExternalIPAddress>198.20.0.1</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>";
        assert_eq!(
            parse_external_ip(ip),
            Ok(IpAddr::V4(Ipv4Addr::new(198, 20, 0, 1)))
        );
    }

    #[test]
    fn default_gateway_from_the_routing_table() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_gateway_v4(table), Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(default_gateway_v4("Iface\tDestination\n"), None);
    }
}
