//! Finding the address to probe, and keeping it the domain's. An address is used only if it is
//! the domain's: the policy's `address` (the operator's word, taken as written), else what is
//! known for the NIC whose MAC libvirt assigned — the guest agent's report for that interface,
//! libvirt's DHCP lease for that MAC, or the host's neighbour table on the bridge the NIC's tap
//! is attached to — and only inside that bridge's networks as the host holds them. Loopback,
//! link-local, the host's own addresses and another managed domain's are never probed. A second
//! MAC answering for the address on the domain's bridge is an address conflict: the probe would
//! reach someone else, so its result is no evidence either way.

use std::net::IpAddr;

use crate::guest::{AddressSource, GuestAccess, GuestInterface};
use crate::observe::guest_devices::GuestDevices;
use crate::observe::host_addrs::HostView;

/// One NIC of the domain as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundNic {
    /// The MAC libvirt assigned (lowercase).
    pub mac: String,
    /// The bridge its tap is attached to now, if any.
    pub bridge: Option<String>,
}

/// The domain's NICs with the bridges their taps are on: the kernel's word (sysfs) when it
/// shows the tap, else libvirt's (the live definition's `<source bridge>`): sysfs mounted in
/// another network namespace does not show our taps at all. A tap sysfs shows on no bridge is
/// on none.
pub fn bound_nics(devices: &GuestDevices, view: &HostView) -> Vec<BoundNic> {
    devices
        .nics
        .iter()
        .map(|n| BoundNic {
            mac: n.mac.clone(),
            bridge: match &n.tap {
                Some(t) if view.links.contains(t) => view.bridge_of.get(t).cloned(),
                Some(_) => n.bridge.clone(),
                None => None,
            },
        })
        .collect()
}

/// Why no address can be probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// Nothing is known; the text says where we looked. A probe failure like any other.
    NotFound(String),
    /// Only addresses that cannot be the domain's were offered (loopback, outside its network,
    /// …): not probed, no evidence.
    Untrusted(String),
    /// The address is claimed by someone else too (another MAC, the host, another domain):
    /// not probed or its result void, no evidence.
    Conflict(String),
}

/// Why one offered address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    Untrusted(String),
    Conflict(String),
}

/// Check an address offered for `nic` by `source`. `others`: addresses other managed domains use.
fn judge(ip: IpAddr, nic: &BoundNic, nics: &[BoundNic], view: &HostView, others: &[IpAddr]) -> Result<(), Refusal> {
    let untrusted = |why: &str| Err(Refusal::Untrusted(why.to_string()));
    if ip.is_loopback() {
        return untrusted("loopback");
    }
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return untrusted("not a unicast address");
    }
    if is_link_local(ip) {
        return untrusted("link-local; name it as the policy's `address` to probe it");
    }
    if let Some(a) = view.addrs.iter().find(|a| a.ip == ip) {
        return Err(Refusal::Conflict(format!("an address of this host's own ({})", a.dev)));
    }
    if others.contains(&ip) {
        return Err(Refusal::Conflict("used by another managed domain".into()));
    }
    let Some(bridge) = &nic.bridge else {
        return untrusted("its NIC's tap is on no bridge of this host's");
    };
    let nets: Vec<String> = view.on(bridge).map(|a| format!("{}/{}", a.ip, a.prefix)).collect();
    if !view.on(bridge).any(|a| a.contains(ip)) {
        return untrusted(&if nets.is_empty() {
            format!("{bridge} holds no address of this host's to check it against; give `address` in the policy")
        } else {
            format!("outside {bridge}'s networks ({})", nets.join(", "))
        });
    }
    if let Some(c) = neighbour_conflict(ip, nics, view) {
        return Err(Refusal::Conflict(c));
    }
    Ok(())
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Another MAC answers for `ip` on one of the domain's bridges: `10.0.0.2 is answered by
/// 02:… on br0, not by the domain's 52:54:…`.
pub fn neighbour_conflict(ip: IpAddr, nics: &[BoundNic], view: &HostView) -> Option<String> {
    let IpAddr::V4(v4) = ip else { return None };
    let bridges: Vec<&str> = nics.iter().filter_map(|n| n.bridge.as_deref()).collect();
    let ours = |mac: &str| nics.iter().any(|n| n.mac == mac);
    view.neighbours.iter().find(|e| e.ip == v4 && bridges.contains(&e.device.as_str()) && !ours(&e.mac)).map(|e| {
        let macs: Vec<&str> = nics.iter().map(|n| n.mac.as_str()).collect();
        format!("{ip} is answered by {} on {}, not by the domain's {}", e.mac, e.device, macs.join(", "))
    })
}

/// Check an address already chosen (the policy's, or one discovered earlier) against what the
/// host sees now. `discovered`: it came from the guest's side, so it must also not be another
/// managed domain's.
pub fn check_binding(
    ip: IpAddr,
    nics: &[BoundNic],
    view: &HostView,
    others: &[IpAddr],
    discovered: bool,
) -> Result<(), AddressError> {
    if discovered && others.contains(&ip) {
        return Err(AddressError::Conflict(format!("{ip} is used by another managed domain")));
    }
    match neighbour_conflict(ip, nics, view) {
        Some(c) => Err(AddressError::Conflict(c)),
        None => Ok(()),
    }
}

/// The domain's address and where it came from, with its NICs as the host sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub address: IpAddr,
    pub source: AddressSource,
    pub nics: Vec<BoundNic>,
}

/// The domain's NICs as the host sees them now (for checking a policy address).
pub fn read_nics(guest: &dyn GuestAccess, domain: &str) -> Result<(Vec<BoundNic>, HostView), String> {
    let devices = guest.guest_devices(domain).map_err(|e| format!("cannot read the domain's NICs: {}", e.detail()))?;
    let view = guest.host_view().map_err(|e| format!("cannot read the host's addresses: {e}"))?;
    Ok((bound_nics(&devices, &view), view))
}

/// Find the domain's address: sources in [`AddressSource::ORDER`], each address judged.
pub fn discover(guest: &dyn GuestAccess, domain: &str, others: &[IpAddr]) -> Result<Found, AddressError> {
    let (nics, view) = read_nics(guest, domain).map_err(AddressError::NotFound)?;
    if nics.is_empty() {
        return Err(AddressError::NotFound("the domain has no network interface".into()));
    }
    let mut looked = Vec::new();
    let mut refused = Vec::new();
    let mut conflict = false;
    for source in AddressSource::ORDER {
        let offered: Vec<GuestInterface> = match source {
            // The neighbour table on the tap's own bridge only (libvirt's ARP source matches the
            // MAC on any interface).
            AddressSource::Arp => nics
                .iter()
                .filter_map(|n| n.bridge.as_ref().map(|b| (n, b)))
                .map(|(n, b)| GuestInterface {
                    name: b.clone(),
                    mac: Some(n.mac.clone()),
                    addrs: view
                        .neighbours
                        .iter()
                        .filter(|e| &e.device == b && e.mac == n.mac)
                        .map(|e| IpAddr::V4(e.ip))
                        .collect(),
                })
                .collect(),
            _ => match guest.interface_addresses(domain, source) {
                Ok(ifaces) => ifaces,
                Err(e) => {
                    looked.push(format!("{}: {}", source.word(), e.detail()));
                    continue;
                }
            },
        };
        let mut any = false;
        for nic in &nics {
            let mut claims: Vec<(IpAddr, String)> = offered
                .iter()
                .filter(|i| i.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(&nic.mac)))
                .flat_map(|i| i.addrs.iter().map(move |a| (*a, i.name.clone())))
                .collect();
            // IPv4 first, otherwise in the source's order.
            claims.sort_by_key(|(a, _)| !a.is_ipv4());
            for (ip, iface) in claims {
                any = true;
                match judge(ip, nic, &nics, &view, others) {
                    Ok(()) => return Ok(Found { address: ip, source, nics }),
                    Err(r) => {
                        let (why, is_conflict) = match r {
                            Refusal::Untrusted(w) => (w, false),
                            Refusal::Conflict(w) => (w, true),
                        };
                        conflict |= is_conflict;
                        let on = crate::guest_text::guest_word(&iface, 16);
                        refused.push(format!("{} reports {ip} on {on}: {why}", source.word()));
                    }
                }
            }
        }
        if !any {
            looked.push(format!("{}: none", source.word()));
        }
    }
    if !refused.is_empty() {
        let text = format!("not probed: {}", refused.join("; "));
        return Err(if conflict { AddressError::Conflict(text) } else { AddressError::Untrusted(text) });
    }
    let macs: Vec<&str> = nics.iter().map(|n| n.mac.as_str()).collect();
    Err(AddressError::NotFound(format!("nothing known for {} ({})", macs.join(", "), looked.join("; "))))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::observe::arp::ArpEntry;
    use crate::observe::guest_devices::GuestDevices;
    use crate::observe::host_addrs::HostAddr;

    const MAC: &str = "52:54:00:00:00:01";

    fn nics() -> Vec<BoundNic> {
        vec![BoundNic { mac: MAC.into(), bridge: Some("br0".into()) }]
    }

    fn view(neighbours: &[(&str, &str, &str)]) -> HostView {
        let addr = |ip: &str, prefix, dev: &str| HostAddr { ip: ip.parse().unwrap(), prefix, dev: dev.into() };
        HostView {
            addrs: vec![
                addr("127.0.0.1", 8, "lo"),
                addr("10.77.0.1", 24, "br0"),
                addr("fe80::1", 64, "br0"),
                addr("2001:db8::1", 64, "br0"),
                addr("192.168.1.5", 24, "eth0"),
            ],
            bridge_of: HashMap::from([("vnet0".into(), "br0".into())]),
            links: ["vnet0".to_string(), "br0".to_string()].into(),
            neighbours: neighbours
                .iter()
                .map(|(ip, mac, dev)| ArpEntry {
                    ip: ip.parse().unwrap(),
                    mac: mac.to_string(),
                    device: dev.to_string(),
                })
                .collect(),
        }
    }

    fn judged(ip: &str, others: &[IpAddr]) -> Result<(), Refusal> {
        judge(ip.parse().unwrap(), &nics()[0], &nics(), &view(&[]), others)
    }

    #[test]
    fn only_addresses_on_the_bridges_network_that_nobody_else_holds_are_the_domains() {
        assert_eq!(judged("10.77.0.2", &[]), Ok(()));
        assert_eq!(judged("2001:db8::5", &[]), Ok(()));
        assert_eq!(judged("127.0.0.1", &[]), Err(Refusal::Untrusted("loopback".into())));
        assert_eq!(judged("::1", &[]), Err(Refusal::Untrusted("loopback".into())));
        assert!(matches!(judged("169.254.0.7", &[]), Err(Refusal::Untrusted(w)) if w.starts_with("link-local")));
        assert!(matches!(judged("fe80::7", &[]), Err(Refusal::Untrusted(w)) if w.starts_with("link-local")));
        assert_eq!(judged("10.77.0.1", &[]), Err(Refusal::Conflict("an address of this host's own (br0)".into())));
        assert_eq!(judged("192.168.1.5", &[]), Err(Refusal::Conflict("an address of this host's own (eth0)".into())));
        let other = ["10.77.0.3".parse().unwrap()];
        assert_eq!(judged("10.77.0.3", &other), Err(Refusal::Conflict("used by another managed domain".into())));
        assert_eq!(
            judged("192.168.1.9", &[]),
            Err(Refusal::Untrusted("outside br0's networks (10.77.0.1/24, fe80::1/64, 2001:db8::1/64)".into()))
        );
        let loose = BoundNic { mac: MAC.into(), bridge: None };
        assert!(judge("10.77.0.2".parse().unwrap(), &loose, std::slice::from_ref(&loose), &view(&[]), &[]).is_err());
    }

    #[test]
    fn the_kernel_says_which_bridge_a_tap_is_on_and_libvirt_only_when_sysfs_cannot_see_it() {
        use crate::observe::guest_devices::Nic;
        let nic = |tap: &str| Nic { mac: MAC.into(), tap: Some(tap.into()), bridge: Some("br9".into()) };
        let devices = GuestDevices { nics: vec![nic("vnet0"), nic("vnet7")], ..Default::default() };
        let mut v = view(&[]);
        let got = bound_nics(&devices, &v);
        assert_eq!(got[0].bridge.as_deref(), Some("br0"), "sysfs: on br0, whatever the XML says");
        assert_eq!(got[1].bridge.as_deref(), Some("br9"), "not in this sysfs: libvirt's word");
        v.links.insert("vnet7".into());
        assert_eq!(bound_nics(&devices, &v)[1].bridge, None, "detached: on no bridge");
    }

    #[test]
    fn a_second_mac_answering_on_the_domains_bridge_is_a_conflict_elsewhere_it_is_not() {
        let spoofed = view(&[("10.77.0.2", "02:00:00:00:00:66", "br0")]);
        let c = neighbour_conflict("10.77.0.2".parse().unwrap(), &nics(), &spoofed).unwrap();
        assert_eq!(c, "10.77.0.2 is answered by 02:00:00:00:00:66 on br0, not by the domain's 52:54:00:00:00:01");
        let ours = view(&[("10.77.0.2", MAC, "br0"), ("10.77.0.2", "02:00:00:00:00:66", "eth0")]);
        assert_eq!(neighbour_conflict("10.77.0.2".parse().unwrap(), &nics(), &ours), None);
        assert!(matches!(
            check_binding("10.77.0.2".parse().unwrap(), &nics(), &spoofed, &[], false),
            Err(AddressError::Conflict(_))
        ));
        let other = ["10.77.0.2".parse().unwrap()];
        assert!(check_binding("10.77.0.2".parse().unwrap(), &nics(), &ours, &other, true).is_err());
        assert_eq!(check_binding("10.77.0.2".parse().unwrap(), &nics(), &ours, &other, false), Ok(()));
    }
}
