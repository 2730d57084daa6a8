//! Finding the address to probe: the policy's, else what libvirt learned about the domain's
//! NICs — from the guest agent, then the DHCP lease, then the host's ARP table — matched by MAC.
//! Not finding one is a probe result of its own, saying where we looked.

use std::net::IpAddr;

use crate::guest::{AddressSource, GuestAccess, GuestInterface};

/// The address libvirt reports for the domain's NICs, or why there is none.
pub fn discover(guest: &dyn GuestAccess, domain: &str) -> Result<(IpAddr, AddressSource), String> {
    let devices = guest.guest_devices(domain).map_err(|e| format!("cannot read the domain's NICs: {}", e.detail()))?;
    if devices.macs.is_empty() {
        return Err("the domain has no network interface".into());
    }
    let mut looked = Vec::new();
    for source in AddressSource::ORDER {
        match guest.interface_addresses(domain, source) {
            Ok(ifaces) => match pick_address(&devices.macs, &ifaces) {
                Some(addr) => return Ok((addr, source)),
                None => looked.push(format!("{}: none", source.word())),
            },
            Err(e) => looked.push(format!("{}: {}", source.word(), e.detail())),
        }
    }
    Err(format!("nothing known for {} ({})", devices.macs.join(", "), looked.join("; ")))
}

/// The first usable address of the first NIC (in definition order) that has one; IPv4 before
/// IPv6. Unspecified, multicast and IPv6 link-local addresses (unusable without a scope) are
/// not usable; the guest's loopback never matches a NIC's MAC.
pub fn pick_address(macs: &[String], ifaces: &[GuestInterface]) -> Option<IpAddr> {
    macs.iter().find_map(|mac| {
        let usable: Vec<IpAddr> = ifaces
            .iter()
            .filter(|i| i.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(mac)))
            .flat_map(|i| i.addrs.iter().copied())
            .filter(|a| usable(*a))
            .collect();
        usable.iter().find(|a| a.is_ipv4()).or(usable.first()).copied()
    })
}

fn usable(a: IpAddr) -> bool {
    if a.is_unspecified() || a.is_multicast() {
        return false;
    }
    match a {
        IpAddr::V4(_) => true,
        // fe80::/10
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 != 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(mac: Option<&str>, addrs: &[&str]) -> GuestInterface {
        GuestInterface {
            name: "eth0".into(),
            mac: mac.map(str::to_string),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn first_nic_first_ipv4_not_the_guests_loopback_or_link_local() {
        let macs = vec!["52:54:00:00:00:01".to_string(), "52:54:00:00:00:02".to_string()];
        let ifaces = [
            iface(Some("00:00:00:00:00:00"), &["127.0.0.1", "::1"]),
            iface(Some("52:54:00:00:00:01"), &["0.0.0.0", "ff02::1"]),
            iface(Some("52:54:00:00:00:02"), &["10.0.0.9"]),
            iface(Some("52:54:00:00:00:01"), &["fe80::1", "2001:db8::5", "10.0.0.5"]),
        ];
        assert_eq!(pick_address(&macs, &ifaces), Some("10.0.0.5".parse().unwrap()));
        let v6_only = [iface(Some("52:54:00:00:00:01"), &["fe80::1", "2001:db8::5"])];
        assert_eq!(pick_address(&macs, &v6_only), Some("2001:db8::5".parse().unwrap()));
        let link_local_only = [iface(Some("52:54:00:00:00:01"), &["fe80::1"])];
        assert_eq!(pick_address(&macs, &link_local_only), None);
    }

    #[test]
    fn macs_match_case_insensitively_and_unknown_macs_are_ignored() {
        let macs = vec!["52:54:00:aa:bb:cc".to_string()];
        assert_eq!(
            pick_address(&macs, &[iface(Some("52:54:00:AA:BB:CC"), &["192.0.2.7"])]),
            Some("192.0.2.7".parse().unwrap())
        );
        assert_eq!(pick_address(&macs, &[iface(Some("52:54:00:11:22:33"), &["192.0.2.8"])]), None);
        assert_eq!(pick_address(&macs, &[iface(None, &["192.0.2.9"])]), None);
    }
}
