//! Which router to ask for a port mapping: the IPv4 default gateway, read from Linux's routing
//! table. Pure (the shell reads `/proc/net/route` and hands the text in), so it is tested on
//! a sample table. PCP and NAT-PMP must be sent to exactly this address (RFC 6886 §3); UPnP
//! finds its router by multicast instead.

use std::net::Ipv4Addr;

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

    #[test]
    fn default_gateway_from_the_routing_table() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_gateway_v4(table), Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(default_gateway_v4("Iface\tDestination\n"), None);
    }

    #[test]
    fn a_route_that_is_down_or_has_no_gateway_is_not_the_default() {
        let table = "Iface\tDestination\tGateway \tFlags\n\
                     eth0\t00000000\t0100010A\t0002\n\
                     eth1\t00000000\t00000000\t0001\n";
        assert_eq!(default_gateway_v4(table), None);
    }
}
