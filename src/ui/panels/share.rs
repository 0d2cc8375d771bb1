//! Host mode's invitation: the addresses others type into their "Server" field to reach our
//! embedded server, each with a Copy button, so the host can paste it into a message instead
//! of finding the machine's address in the system settings.
//!
//! Which addresses: the ones of this machine that guests can reach (the LAN address the
//! system routes through, and a global IPv6 address if there is one), and the router's
//! public address when the voice plane's port mapping learnt it (then guests outside the LAN
//! can connect only if the router forwards the server's port, which is said next to it).

use std::net::{IpAddr, SocketAddr};

use egui::{RichText, Ui};

/// One address to share and what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareAddress {
    /// For whom it works, e.g. "On your network".
    pub label: String,
    /// What to type, `host:port`.
    pub address: String,
    /// A condition, shown on hover (e.g. the port forwarding it needs).
    pub hint: Option<String>,
    /// Guests who connected to this address so far (it works: tell the next ones the same).
    pub guests: u64,
}

/// The addresses to show for a server on `port`: `local` are this machine's addresses (any
/// port; the server's is used), `public` the router's public address if known. Loopback and
/// unspecified addresses are left out (they point at the guest's own machine); duplicates
/// once. Without any, loopback is offered for a guest on this machine, and says so.
pub fn share_addresses(
    local: &[SocketAddr],
    port: u16,
    public: Option<IpAddr>,
) -> Vec<ShareAddress> {
    let usable = |ip: &IpAddr| !ip.is_loopback() && !ip.is_unspecified();
    let mut out: Vec<ShareAddress> = Vec::new();
    let mut seen: Vec<IpAddr> = Vec::new();
    for ip in local.iter().map(|a| a.ip().to_canonical()).filter(usable) {
        if seen.contains(&ip) {
            continue;
        }
        seen.push(ip);
        let label = match ip {
            IpAddr::V6(_) => "Over IPv6",
            IpAddr::V4(v4) if v4.is_private() || v4.is_link_local() => "On your network",
            IpAddr::V4(_) => "From anywhere",
        };
        out.push(ShareAddress {
            label: label.into(),
            address: SocketAddr::new(ip, port).to_string(),
            hint: None,
            guests: 0,
        });
    }
    if let Some(ip) = public.map(|ip| ip.to_canonical()).filter(usable) {
        if !seen.contains(&ip) {
            out.push(ShareAddress {
                label: "From the internet".into(),
                address: SocketAddr::new(ip, port).to_string(),
                hint: Some(format!(
                    "Your router's public address. Guests outside your network reach you \
                     there only if the router forwards TCP and UDP port {port} to this machine."
                )),
                guests: 0,
            });
        }
    }
    if out.is_empty() {
        out.push(ShareAddress {
            label: "On this machine only".into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)).to_string(),
            hint: Some(
                "No network address found: only a client on this machine can connect.".into(),
            ),
            guests: 0,
        });
    }
    out
}

/// Marks each address with the guests who came in on it (`arrivals`: connections from other
/// machines by the address of ours they dialled, see `ServerStats::arrivals`), and adds the
/// addresses guests used that the list did not offer (a second network card, an address the
/// router forwards to), so the host sees which address works before telling the next guest.
pub fn with_arrivals(
    mut shown: Vec<ShareAddress>,
    arrivals: &std::collections::BTreeMap<IpAddr, u64>,
    port: u16,
) -> Vec<ShareAddress> {
    for (&ip, &count) in arrivals {
        let address = SocketAddr::new(ip.to_canonical(), port).to_string();
        match shown.iter_mut().find(|a| a.address == address) {
            Some(a) => a.guests += count,
            None => shown.push(ShareAddress {
                label: "Guests came in at".into(),
                address,
                hint: Some("An address of this machine that guests connected to".into()),
                guests: count,
            }),
        }
    }
    shown
}

/// Draws the invitation. Copying goes straight to the clipboard through egui; nothing else
/// happens here, so nothing is returned.
pub fn share_panel(ui: &mut Ui, addresses: &[ShareAddress]) {
    if addresses.is_empty() {
        return;
    }
    ui.label(RichText::new("Invite others: they connect to").strong());
    for (i, a) in addresses.iter().enumerate() {
        ui.push_id(("share", i), |ui| {
            ui.horizontal(|ui| {
                let label = ui.weak(&a.label);
                let address = ui.monospace(&a.address);
                if let Some(hint) = &a.hint {
                    label.on_hover_text(hint);
                    address.on_hover_text(hint);
                }
                if ui
                    .small_button("Copy")
                    .on_hover_text(format!("Copy {} to the clipboard", a.address))
                    .clicked()
                {
                    ui.ctx().copy_text(a.address.clone());
                }
                if a.guests > 0 {
                    let who = if a.guests == 1 { "guest" } else { "guests" };
                    ui.label(
                        RichText::new(format!("✓ {} {who} came in here", a.guests))
                            .small()
                            .color(egui::Color32::from_rgb(90, 190, 110)),
                    );
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui::OutputCommand;
    use egui_kittest::{kittest::Queryable, Harness};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lan_and_ipv6_addresses_get_the_servers_port_and_loopback_is_left_out() {
        let shown = share_addresses(
            &[
                addr("192.168.1.20:40000"),
                addr("127.0.0.1:40000"),
                addr("[2001:db8::5]:40000"),
                addr("[::ffff:192.168.1.20]:1"),
            ],
            7700,
            None,
        );
        let addresses: Vec<_> = shown.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(addresses, ["192.168.1.20:7700", "[2001:db8::5]:7700"]);
        assert_eq!(shown[0].label, "On your network");
        assert_eq!(shown[1].label, "Over IPv6");
    }

    #[test]
    fn guests_mark_the_address_they_used_and_an_unoffered_one_is_added() {
        let shown = share_addresses(&[addr("192.168.1.20:1")], 7700, None);
        let arrivals = std::collections::BTreeMap::from([
            ("192.168.1.20".parse().unwrap(), 2),
            ("::ffff:10.0.0.7".parse().unwrap(), 1),
        ]);
        let shown = with_arrivals(shown, &arrivals, 7700);
        assert_eq!(shown.len(), 2);
        assert_eq!(
            (shown[0].address.as_str(), shown[0].guests),
            ("192.168.1.20:7700", 2)
        );
        assert_eq!(
            (shown[1].address.as_str(), shown[1].guests),
            ("10.0.0.7:7700", 1)
        );
        assert_eq!(shown[1].label, "Guests came in at");

        let mut h = Harness::new_ui(|ui| share_panel(ui, &shown));
        h.run();
        h.get_by_label("✓ 2 guests came in here");
        h.get_by_label("✓ 1 guest came in here");
    }

    #[test]
    fn the_routers_public_address_comes_with_its_condition() {
        let shown = share_addresses(
            &[addr("192.168.1.20:1")],
            7700,
            Some("203.0.113.9".parse().unwrap()),
        );
        assert_eq!(shown.len(), 2);
        assert_eq!(shown[1].address, "203.0.113.9:7700");
        assert!(shown[1]
            .hint
            .as_deref()
            .unwrap()
            .contains("forwards TCP and UDP port 7700"));
        // A machine on a public address: the router's address is the same, shown once.
        let shown = share_addresses(
            &[addr("203.0.113.9:1")],
            7700,
            Some("203.0.113.9".parse().unwrap()),
        );
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].label, "From anywhere");
    }

    #[test]
    fn without_a_network_only_this_machine_is_offered_and_says_so() {
        let shown = share_addresses(&[addr("127.0.0.1:1")], 7700, None);
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].address, "127.0.0.1:7700");
        assert_eq!(shown[0].label, "On this machine only");
    }

    /// Issue 14 item 8: each address has its own Copy button, which puts that address on
    /// the clipboard.
    #[test]
    fn each_copy_button_copies_its_own_address() {
        let addresses = share_addresses(
            &[addr("192.168.1.20:1")],
            7700,
            Some("203.0.113.9".parse().unwrap()),
        );
        let mut h = Harness::builder()
            .with_size(egui::Vec2::new(400.0, 200.0))
            .build_ui(move |ui| share_panel(ui, &addresses));
        h.get_by_label("192.168.1.20:7700");
        h.get_by_label("203.0.113.9:7700");
        let copies: Vec<_> = h.get_all_by_label("Copy").collect();
        assert_eq!(copies.len(), 2);
        copies[1].click();
        h.step();
        let copied: Vec<_> = h
            .output()
            .platform_output
            .commands
            .iter()
            .filter_map(|c| match c {
                OutputCommand::CopyText(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(copied, ["203.0.113.9:7700"]);
    }
}
