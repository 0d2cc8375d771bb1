//! Network namespaces for the NAT tests: a "public" segment with the server, and sites behind
//! routers that NAT and filter as real ones do (home, symmetric, carrier-grade, UDP-blocking,
//! port-forwarding; see ARCHITECTURE.md, the hard cases), plus the clients and server run
//! inside them. Needs root; [`namespaces_or_skip`] says where that cannot be.

use std::process::{Command, Stdio};

use super::{bin, is_root, peer_named, skip_unless_ci, summary, temp_path, tone_level};

pub struct Netns {
    pub names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

pub fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

pub fn nft(ns: &str, rules: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// How a site's router maps and filters UDP (see ARCHITECTURE.md, the hard cases).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// A home router: masquerade (endpoint-independent mapping, port-restricted filtering).
    Home,
    /// A symmetric NAT: `masquerade fully-random`, a new random port per destination, so a
    /// punch towards a peer leaves from a port nobody was told about.
    Symmetric,
    /// A home router whose firewall lets no UDP out but DNS (some corporate and hotel
    /// networks): only TCP reaches the server.
    UdpBlocked,
    /// A symmetric NAT whose owner forwarded TCP and UDP 7700 to the host behind it, as the
    /// README tells someone hosting a call: only the server's port is reachable from outside.
    SymmetricForwarding7700,
    /// A home router behind a carrier-grade NAT (RFC 6598 space, 100.64.0.0/10) that maps
    /// symmetrically, as mobile and many fibre carriers do: two layers, neither of them ours.
    Cgnat,
}

/// Public net 198.18.0.0/24 (a bridge in the `pub` namespace, server at .10); router A at
/// 198.18.0.1 NATs 10.1.0.0/24 (host A 10.1.0.2); router B at 198.18.0.2 NATs 10.2.0.0/24;
/// both home routers.
pub fn build(tag: &str) -> Result<Netns, String> {
    build_sites(tag, &[Nat::Home, Nat::Home])
}

/// The public net and one site per entry of `nats`, named a, b, c...: router X at
/// 198.18.0.N NATs 10.N.0.0/24 with host X at 10.N.0.2.
pub fn build_sites(tag: &str, nats: &[Nat]) -> Result<Netns, String> {
    let pub_ns = format!("pv{tag}pub");
    let mut names = vec![pub_ns.clone()];
    let sides: Vec<char> = ('a'..='z').take(nats.len()).collect();
    for (side, &nat) in sides.iter().zip(nats) {
        names.push(format!("pv{tag}r{side}"));
        if nat == Nat::Cgnat {
            names.push(format!("pv{tag}g{side}"));
        }
        names.push(format!("pv{tag}h{side}"));
    }
    let guard = Netns { names };
    for n in &guard.names {
        sh(&["ip", "netns", "add", n])?;
        in_ns(n, &["ip", "link", "set", "lo", "up"])?;
    }
    in_ns(&pub_ns, &["ip", "link", "add", "br0", "type", "bridge"])?;
    in_ns(
        &pub_ns,
        &["ip", "addr", "add", "198.18.0.10/24", "dev", "br0"],
    )?;
    in_ns(&pub_ns, &["ip", "link", "set", "br0", "up"])?;
    for (i, (side, &nat)) in sides.iter().zip(nats).enumerate() {
        let n = i + 1;
        let pub_ip = format!("198.18.0.{n}");
        let router = format!("pv{tag}r{side}");
        let host = format!("pv{tag}h{side}");
        // Router <-> public bridge.
        let up = format!("pv{tag}u{side}");
        sh(&[
            "ip", "link", "add", &up, "type", "veth", "peer", "name", "wan0", "netns", &router,
        ])?;
        sh(&["ip", "link", "set", &up, "netns", &pub_ns])?;
        in_ns(&pub_ns, &["ip", "link", "set", &up, "master", "br0"])?;
        in_ns(&pub_ns, &["ip", "link", "set", &up, "up"])?;
        in_ns(
            &router,
            &["ip", "addr", "add", &format!("{pub_ip}/24"), "dev", "wan0"],
        )?;
        in_ns(&router, &["ip", "link", "set", "wan0", "up"])?;
        if nat == Nat::Cgnat {
            // Carrier NAT (symmetric) on 100.64.N.0/24, the subscriber's home router at
            // 100.64.N.2 behind it, and the host behind that.
            let home = format!("pv{tag}g{side}");
            let carrier = format!("100.64.{n}");
            lan_link(&router, &home, "wan0", &format!("pv{tag}d{side}"), &carrier)?;
            in_ns(
                &home,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("{carrier}.1"),
                ],
            )?;
            nft(&router, &nat_tables("masquerade fully-random", "", "", ""))?;
            lan_link(
                &home,
                &host,
                "eth0",
                &format!("pv{tag}e{side}"),
                &format!("10.{n}.0"),
            )?;
            in_ns(
                &host,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.{n}.0.1"),
                ],
            )?;
            nft(&home, &nat_tables("masquerade", "", "", ""))?;
            continue;
        }
        let lan = format!("10.{n}.0");
        lan_link(&router, &host, "eth0", &format!("pv{tag}d{side}"), &lan)?;
        in_ns(
            &host,
            &["ip", "route", "add", "default", "via", &format!("{lan}.1")],
        )?;
        let masquerade = match nat {
            Nat::Home | Nat::UdpBlocked => "masquerade",
            Nat::Symmetric | Nat::SymmetricForwarding7700 | Nat::Cgnat => "masquerade fully-random",
        };
        let (forward_in, forward_accept) = if nat == Nat::SymmetricForwarding7700 {
            (
                format!(
                    r#"chain pre {{ type nat hook prerouting priority -100; iifname "wan0" tcp dport 7700 dnat to {lan}.2; iifname "wan0" udp dport 7700 dnat to {lan}.2; }}"#
                ),
                r#"iifname "wan0" ct status dnat accept;"#,
            )
        } else {
            (String::new(), "")
        };
        let udp_filter = if nat == Nat::UdpBlocked {
            r#"chain udp_out { type filter hook forward priority -10; policy accept; iifname "lan0" udp dport != 53 drop; }"#
        } else {
            ""
        };
        nft(
            &router,
            &nat_tables(masquerade, &forward_in, forward_accept, udp_filter),
        )?;
    }
    Ok(guard)
}

/// A LAN from `router` (its `lan0`, at `PREFIX.1/24`) to `inside` (its `inside_if`, at
/// `PREFIX.2/24`), with forwarding on in the router.
pub fn lan_link(
    router: &str,
    inside: &str,
    inside_if: &str,
    tmp: &str,
    prefix: &str,
) -> Result<(), String> {
    sh(&[
        "ip", "link", "add", tmp, "type", "veth", "peer", "name", inside_if, "netns", inside,
    ])?;
    sh(&["ip", "link", "set", tmp, "netns", router])?;
    in_ns(router, &["ip", "link", "set", tmp, "name", "lan0"])?;
    in_ns(
        router,
        &[
            "ip",
            "addr",
            "add",
            &format!("{prefix}.1/24"),
            "dev",
            "lan0",
        ],
    )?;
    in_ns(router, &["ip", "link", "set", "lan0", "up"])?;
    in_ns(router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    in_ns(
        inside,
        &[
            "ip",
            "addr",
            "add",
            &format!("{prefix}.2/24"),
            "dev",
            inside_if,
        ],
    )?;
    in_ns(inside, &["ip", "link", "set", inside_if, "up"])
}

/// A router's nftables: masquerade out of `wan0`, drop unsolicited incoming (at input too, so
/// an early punch creates no conntrack entry; see SETUP-NOTES.md), plus optional port
/// forwarding (`forward_in`, with `forward_accept` letting it through the guard) and an
/// outgoing filter.
pub fn nat_tables(
    masquerade: &str,
    forward_in: &str,
    forward_accept: &str,
    udp_filter: &str,
) -> String {
    format!(
        r#"
table ip nat {{
  chain post {{ type nat hook postrouting priority 100; oifname "wan0" {masquerade}; }}
  {forward_in}
}}
table inet guard {{
  chain forward_guard {{ type filter hook forward priority 0; policy accept; {forward_accept} iifname "wan0" ct state new drop; }}
  chain input_guard {{ type filter hook input priority 0; policy accept; iifname "wan0" ct state new drop; }}
  {udp_filter}
}}
"#
    )
}

pub fn client(ns: &str, name: &str, hz: &str, out: &std::path::Path) -> std::process::Child {
    client_of(ns, "198.18.0.10:7700", name, hz, out)
}

/// A client that runs `secs` seconds instead of 9 (one that must outlast the others).
pub fn client_for(
    ns: &str,
    name: &str,
    hz: &str,
    out: &std::path::Path,
    secs: &str,
) -> std::process::Child {
    client_with(ns, "198.18.0.10:7700", name, hz, out, secs)
}

pub fn client_of(
    ns: &str,
    server: &str,
    name: &str,
    hz: &str,
    out: &std::path::Path,
) -> std::process::Child {
    client_with(ns, server, name, hz, out, "9")
}

pub fn client_with(
    ns: &str,
    server: &str,
    name: &str,
    hz: &str,
    out: &std::path::Path,
    secs: &str,
) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", ns, bin()])
        .env("P2P_VOICE_CONFIG_DIR", temp_path("config"))
        .args([
            "client",
            "--headless",
            "--server",
            server,
            "--username",
            name,
            "--channel",
            "Lobby",
            "--input-tone",
            hz,
            "--always-transmit",
            "--duration",
            secs,
            "--output-wav",
        ])
        .arg(out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn client in namespace")
}

/// The namespace tag of one test (`suffix` keeps parallel tests apart), or `None` (after
/// `skip_unless_ci`) where namespaces cannot be made here.
pub fn namespaces_or_skip(suffix: char) -> Option<String> {
    if !is_root() {
        skip_unless_ci("the NAT test needs root to create network namespaces");
        return None;
    }
    if sh(&["nft", "--version"]).is_err() {
        skip_unless_ci("nftables (nft) is not installed");
        return None;
    }
    let tag = format!("{}{suffix}", std::process::id() % 10_000);
    // Skip only when the kernel or sandbox refuses namespaces; once they work, any failure to
    // build the network is a real failure of the test.
    let probe = format!("pv{tag}probe");
    if let Err(e) = sh(&["ip", "netns", "add", &probe]) {
        skip_unless_ci(&format!("cannot create network namespaces here: {e}"));
        return None;
    }
    let _ = sh(&["ip", "netns", "del", &probe]);
    Some(tag)
}

/// The JSON lines of a finished client, asserting it exited cleanly.
pub fn finish(c: std::process::Child) -> (Vec<serde_json::Value>, String) {
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "client failed: {text}");
    (
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        text,
    )
}

/// Starts `p2p-voice server` (with `extra` arguments) on the public net.
pub fn public_server(tag: &str, extra: &[&str]) -> std::process::Child {
    let pub_ns = format!("pv{tag}pub");
    let child = Command::new("ip")
        .args(["netns", "exec", &pub_ns, bin()])
        .env("P2P_VOICE_DATA_DIR", temp_path("relay-server-data"))
        .args(["server", "--bind", "198.18.0.10", "--port", "7700"])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("server in namespace");
    std::thread::sleep(std::time::Duration::from_millis(500));
    child
}

/// Milliseconds from the start of a client's output WAV (about when the process started,
/// before it connected, identified and joined) to the first 20 ms block where the tone `hz`
/// is heard: an upper bound of join-to-first-audio, printed for docs/BENCHMARKS.md (never
/// asserted: no test asserts wall-clock speed).
pub fn first_heard_ms(path: &std::path::Path, hz: f32) -> Option<usize> {
    let audio = p2p_voice::audio::load_wav_mono_48k(path).unwrap();
    audio
        .chunks(960)
        .position(|block| tone_level(block, hz) > 0.05)
        .map(|i| i * 20)
}

pub fn report_first_audio(case: &str, who: &str, path: &std::path::Path, hz: f32) {
    match first_heard_ms(path, hz) {
        Some(ms) => eprintln!("first-audio {case}: {who} hears {hz} Hz after {ms} ms"),
        None => eprintln!("first-audio {case}: {who} never hears {hz} Hz"),
    }
}

/// Asserts `who` heard the tone at `hz` in its recording `path` without a gap over 100 ms
/// once the path was up: from half a second after the tone is first heard to half a second
/// before the end, no run of 20 ms blocks in which it is missing is longer (issue 12's rule).
/// Prints the longest gap found.
pub fn assert_heard_without_gaps(who: &str, path: &std::path::Path, hz: f32) {
    let longest = longest_gap_after_path_up(who, path, hz);
    eprintln!("gap: {who} hearing {hz} Hz: longest gap {longest} ms");
    assert!(
        longest <= 100,
        "{who} heard a {longest} ms gap in {hz} Hz after the path came up"
    );
}

/// The longest run of 20 ms blocks, ms, in which the tone at `hz` is missing from `who`'s
/// recording `path`, from half a second after it is first heard to half a second before
/// the end.
pub fn longest_gap_after_path_up(who: &str, path: &std::path::Path, hz: f32) -> usize {
    let audio = p2p_voice::audio::load_wav_mono_48k(path).unwrap();
    let first = first_heard_ms(path, hz).unwrap_or_else(|| panic!("{who} never hears {hz} Hz"));
    let from = (first + 500) * 48;
    let to = audio.len().saturating_sub(24_000);
    assert!(
        to > from + 48_000,
        "{who}: too little audio after the path came up"
    );
    let (mut run, mut longest) = (0, 0);
    for block in audio[from..to].chunks_exact(960) {
        run = if tone_level(block, hz) < 0.05 {
            run + 20
        } else {
            0
        };
        longest = longest.max(run);
    }
    longest
}

/// The last 3 s of a client's output WAV.
pub fn tail_of(path: &std::path::Path) -> Vec<f32> {
    let audio = p2p_voice::audio::load_wav_mono_48k(path).unwrap();
    audio[audio.len() - 48_000 * 3..].to_vec()
}

/// Alice (440 Hz) and Bob (660 Hz), whose finished runs are `results` (in that order) and
/// recordings `out_a` / `out_b`, talked through the server's relay: each summary shows the
/// other relayed by the server with audio decoded, and each hears the other in its last 3 s.
/// First audio is printed for `case`.
pub fn assert_pair_relayed_by_server(
    results: &[(Vec<serde_json::Value>, String)],
    case: &str,
    out_a: &std::path::Path,
    out_b: &std::path::Path,
) {
    for ((lines, text), (me, other)) in results.iter().zip([("alice", "bob"), ("bob", "alice")]) {
        let s = summary(lines);
        let peer = peer_named(s, other).unwrap_or_else(|| panic!("{me}: {text}"));
        assert_eq!(peer["link"]["state"], "relayed", "{me}: {text}");
        assert_eq!(peer["link"]["via"], "server", "{me}: {peer}");
        assert!(peer["frames_decoded"].as_u64().unwrap() > 100, "{peer}");
    }
    report_first_audio(case, "alice", out_a, 660.0);
    report_first_audio(case, "bob", out_b, 440.0);
    assert!(tone_level(&tail_of(out_a), 660.0) > 0.1, "alice hears bob");
    assert!(tone_level(&tail_of(out_b), 440.0) > 0.1, "bob hears alice");
    assert_heard_without_gaps("alice", out_a, 660.0);
    assert_heard_without_gaps("bob", out_b, 440.0);
}
