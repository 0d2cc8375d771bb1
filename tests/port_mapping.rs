//! Port mapping against a real router daemon: `miniupnpd` (PCP, NAT-PMP and UPnP-IGD) on the
//! LAN side of a symmetric NAT, in network namespaces (`common/netns.rs`). Alice is behind
//! that router, Bob behind another symmetric NAT, and the server does not relay: hole
//! punching alone cannot connect them (each NAT picks a new public port per destination),
//! so they connect directly only if Bob is told the port Alice's router mapped for her.
//! After Alice exits, the mapping must be gone from the router. Skips (with the reason
//! printed) where namespaces or miniupnpd are missing, except under CI, where it fails.
//!
//! Checked by hand: with the mapping made 3 s late (after both had been punching each other's
//! server-seen addresses), Bob behind a home NAT still reached Alice at the mapped port, 0.1 s
//! after the mapping; Alice's router's conntrack entry for her earlier punches did not get in
//! the way.

mod common;

use std::process::{Child, Command, Stdio};

use common::netns::*;
use common::*;

/// Alice's router's public address. Not in 198.18.0.0/15 like the rest of the test's public
/// net: miniupnpd refuses to map on a WAN address in reserved space ("port forwarding is
/// impossible"), as it would be behind another NAT. It exists only inside the test's
/// namespaces, reached on-link over the public bridge.
const MAPPING_ROUTER_IP: &str = "198.20.0.1";

/// A process killed when the test ends, whatever happens.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two symmetric NATs (a, b) and the server's public net; router a re-addressed to
/// [`MAPPING_ROUTER_IP`], with the nftables chains miniupnpd fills and its DNATed flows let
/// through the router's guard (as a home router's firewall does for its forwards).
fn build_mapping_network(tag: &str) -> Netns {
    build_mapping_network_with(tag, Nat::Symmetric)
}

fn build_mapping_network_with(tag: &str, bob_nat: Nat) -> Netns {
    let net = build_sites(tag, &[Nat::Symmetric, bob_nat]).expect("build the network");
    let (pub_ns, ra, rb) = (
        format!("pv{tag}pub"),
        format!("pv{tag}ra"),
        format!("pv{tag}rb"),
    );
    let ip32 = format!("{MAPPING_ROUTER_IP}/32");
    for step in [
        vec!["ip", "addr", "flush", "dev", "wan0"],
        vec!["ip", "addr", "add", &ip32, "dev", "wan0"],
        vec![
            "ip",
            "route",
            "add",
            "198.18.0.0/24",
            "dev",
            "wan0",
            "src",
            MAPPING_ROUTER_IP,
        ],
    ] {
        in_ns(&ra, &step).unwrap();
    }
    in_ns(&pub_ns, &["ip", "route", "add", &ip32, "dev", "br0"]).unwrap();
    in_ns(&rb, &["ip", "route", "add", &ip32, "dev", "wan0"]).unwrap();
    // miniupnpd's nftables backend adds its rules to these chains (its default names).
    nft(
        &ra,
        r#"
table inet filter {
  chain forward { type filter hook forward priority -5; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 99; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
insert rule inet guard forward_guard iifname "wan0" ct status dnat accept
"#,
    )
    .unwrap();
    net
}

/// What Alice's router offers.
#[derive(Clone, Copy)]
struct Offer {
    /// PCP answered (else its datagrams are dropped before miniupnpd sees them, as on a
    /// NAT-PMP-only router that ignores them).
    pcp: bool,
    /// NAT-PMP and PCP (miniupnpd's one switch for both); UPnP-IGD is always on.
    natpmp: bool,
    /// The longest lease granted over PCP and NAT-PMP.
    max_lease_s: u32,
}

const EVERYTHING: Offer = Offer {
    pcp: true,
    natpmp: true,
    max_lease_s: 86_400,
};

/// miniupnpd on router a's LAN, offering `offer`; its log goes to a temp file.
fn start_miniupnpd(tag: &str, offer: Offer) -> Daemon {
    let ra = format!("pv{tag}ra");
    if !offer.pcp {
        // PCP datagrams carry version 2 in their first byte, NAT-PMP ones version 0.
        nft(
            &ra,
            r#"
table inet no_pcp {
  chain input { type filter hook input priority -10; policy accept; iifname "lan0" udp dport 5351 @th,64,8 2 drop; }
}
"#,
        )
        .unwrap();
    }
    let conf = temp_path("miniupnpd.conf");
    let pid = temp_path("miniupnpd.pid");
    let log = temp_path("miniupnpd.log");
    std::fs::write(
        &conf,
        format!(
            "ext_ifname=wan0\nlistening_ip=lan0\nport=0\nenable_upnp=yes\nenable_natpmp={}\n\
             secure_mode=yes\nsystem_uptime=no\nmin_lifetime={}\nmax_lifetime={}\n\
             uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n\
             allow 1024-65535 10.1.0.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            if offer.natpmp { "yes" } else { "no" },
            offer.max_lease_s.saturating_sub(1).min(60),
            offer.max_lease_s,
        ),
    )
    .unwrap();
    eprintln!("miniupnpd log: {}", log.display());
    let child = Command::new("ip")
        .args(["netns", "exec", &ra, "miniupnpd", "-d", "-f"])
        .arg(&conf)
        .arg("-P")
        .arg(&pid)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start miniupnpd");
    std::thread::sleep(std::time::Duration::from_millis(300));
    Daemon(child)
}

/// The DNAT rules miniupnpd keeps for its mappings.
fn mapping_rules(tag: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("pv{tag}ra"),
            "nft",
            "list",
            "chain",
        ])
        .args(["inet", "filter", "prerouting_miniupnpd"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("dnat"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn client_mapping(ns: &str, name: &str, hz: &str, out: &std::path::Path, mapping: &str) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, bin()])
        .env("P2P_VOICE_CONFIG_DIR", temp_path("config"))
        .args(["client", "--headless", "--server", "198.18.0.10:7700"])
        .args(["--username", name, "--channel", "Lobby", "--input-tone", hz])
        .args([
            "--always-transmit",
            "--duration",
            "9",
            "--port-mapping",
            mapping,
        ])
        .arg("--output-wav")
        .arg(out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn client in namespace")
}

/// Where namespaces or miniupnpd are missing: `None` after `skip_unless_ci`.
fn mapping_tag(suffix: char) -> Option<String> {
    let tag = namespaces_or_skip(suffix)?;
    if sh(&["sh", "-c", "command -v miniupnpd"]).is_err() {
        skip_unless_ci("miniupnpd is not installed (Debian: miniupnpd-nftables)");
        return None;
    }
    Some(tag)
}

/// Alice (440 Hz, behind the mapping router) and Bob (660 Hz) in a call of 9 s; the server
/// does not relay. Returns both runs and their recordings.
fn call(
    tag: &str,
    alice_mapping: &str,
) -> (
    Vec<(Vec<serde_json::Value>, String)>,
    [std::path::PathBuf; 2],
) {
    let mut server = public_server(tag, &[]);
    let out_a = temp_path("pm-a.wav");
    let out_b = temp_path("pm-b.wav");
    let a = client_mapping(&format!("pv{tag}ha"), "alice", "440", &out_a, alice_mapping);
    let b = client_mapping(&format!("pv{tag}hb"), "bob", "660", &out_b, "on");
    let results: Vec<_> = [a, b].into_iter().map(finish).collect();
    let _ = server.kill();
    let _ = server.wait();
    (results, [out_a, out_b])
}

/// The mapping Alice reports is `protocol`'s, on her router's public address; Bob reaches her
/// directly at exactly that address; both hear each other; and the mapping is gone once
/// Alice has exited.
fn assert_mapped_call(tag: &str, protocol: &str, bob_nat: &str) -> serde_json::Value {
    let (results, [out_a, out_b]) = call(tag, "on");
    let (alice, alice_text) = (&summary(&results[0].0), &results[0].1);
    let (bob, bob_text) = (&summary(&results[1].0), &results[1].1);
    let mapping = &alice["port_mapping"];
    assert_eq!(mapping["protocol"], protocol, "alice: {alice_text}");
    let external = mapping["external"].as_str().unwrap();
    assert!(
        external.starts_with(&format!("{MAPPING_ROUTER_IP}:")),
        "{mapping}"
    );
    eprintln!(
        "port mapping ({protocol}): {external} after {} ms",
        mapping["mapped_after_ms"]
    );
    // Bob's router maps nothing.
    assert!(bob["port_mapping"].is_null(), "bob: {bob}");
    let to_alice = peer_named(bob, "alice").unwrap_or_else(|| panic!("bob: {bob_text}"));
    assert_eq!(to_alice["link"]["state"], "direct", "bob: {bob_text}");
    assert_eq!(to_alice["link"]["addr"], external, "bob: {to_alice}");
    assert!(
        to_alice["frames_decoded"].as_u64().unwrap() > 100,
        "{to_alice}"
    );
    let to_bob = peer_named(alice, "bob").unwrap_or_else(|| panic!("alice: {alice_text}"));
    assert_eq!(to_bob["link"]["state"], "direct", "alice: {alice_text}");
    assert!(to_bob["frames_decoded"].as_u64().unwrap() > 100, "{to_bob}");
    let case = format!("symmetric NAT with {protocol} mapping - {bob_nat} NAT");
    report_first_audio(&case, "alice", &out_a, 660.0);
    report_first_audio(&case, "bob", &out_b, 440.0);
    assert!(tone_level(&tail_of(&out_a), 660.0) > 0.1, "alice hears bob");
    assert!(tone_level(&tail_of(&out_b), 440.0) > 0.1, "bob hears alice");
    assert_heard_without_gaps("alice", &out_a, 660.0);
    assert_heard_without_gaps("bob", &out_b, 440.0);
    assert_eq!(
        mapping_rules(tag),
        "",
        "alice's mapping is removed when she exits"
    );
    mapping.clone()
}

#[test]
fn a_client_behind_a_symmetric_nat_is_reached_at_the_port_its_router_mapped_with_pcp() {
    let Some(tag) = mapping_tag('p') else {
        return;
    };
    let _net = build_mapping_network(&tag);
    let _daemon = start_miniupnpd(&tag, EVERYTHING);
    assert_mapped_call(&tag, "pcp", "symmetric");
}

#[test]
fn a_client_behind_a_symmetric_nat_is_reached_at_the_port_its_router_mapped_with_upnp() {
    let Some(tag) = mapping_tag('u') else {
        return;
    };
    let _net = build_mapping_network(&tag);
    let _daemon = start_miniupnpd(
        &tag,
        Offer {
            natpmp: false,
            ..EVERYTHING
        },
    );
    assert_mapped_call(&tag, "upnp", "symmetric");
}

/// The same network with Alice's port mapping switched off: nothing connects them directly
/// (so the tests above show the mapping at work, not punching), and no mapping is made.
#[test]
fn with_port_mapping_off_the_same_pair_is_not_linked_directly_and_nothing_is_mapped() {
    let Some(tag) = mapping_tag('o') else {
        return;
    };
    let _net = build_mapping_network(&tag);
    let _daemon = start_miniupnpd(&tag, EVERYTHING);
    let (results, _) = call(&tag, "off");
    let (alice, alice_text) = (&summary(&results[0].0), &results[0].1);
    assert!(alice["port_mapping"].is_null(), "alice: {alice}");
    let to_bob = peer_named(alice, "bob").unwrap_or_else(|| panic!("alice: {alice_text}"));
    assert_ne!(to_bob["link"]["state"], "direct", "alice: {to_bob}");
    assert_eq!(mapping_rules(&tag), "");
}

/// Bob behind a home NAT instead (endpoint-independent mapping, port-restricted filtering):
/// without the mapping, home NAT to symmetric NAT is unreachable too (issue 12's table).
#[test]
fn a_peer_behind_a_home_nat_reaches_the_mapped_port_too() {
    let Some(tag) = mapping_tag('h') else {
        return;
    };
    let _net = build_mapping_network_with(&tag, Nat::Home);
    let _daemon = start_miniupnpd(&tag, EVERYTHING);
    assert_mapped_call(&tag, "pcp", "home");
}

/// A router that answers NAT-PMP but not PCP: the client falls back to NAT-PMP.
#[test]
fn a_client_behind_a_symmetric_nat_is_reached_at_the_port_its_router_mapped_with_natpmp() {
    let Some(tag) = mapping_tag('n') else {
        return;
    };
    let _net = build_mapping_network(&tag);
    let _daemon = start_miniupnpd(
        &tag,
        Offer {
            pcp: false,
            ..EVERYTHING
        },
    );
    assert_mapped_call(&tag, "natpmp", "symmetric");
}

/// A router granting only 4 s leases: the client renews every 2 s, so the mapping (which
/// miniupnpd deletes once a lease runs out) carries the call to its end.
#[test]
fn a_short_lease_is_renewed_through_the_call() {
    let Some(tag) = mapping_tag('r') else {
        return;
    };
    let _net = build_mapping_network(&tag);
    let _daemon = start_miniupnpd(
        &tag,
        Offer {
            max_lease_s: 4,
            ..EVERYTHING
        },
    );
    let mapping = assert_mapped_call(&tag, "pcp", "symmetric");
    assert_eq!(mapping["lifetime_s"], 4, "{mapping}");
}
