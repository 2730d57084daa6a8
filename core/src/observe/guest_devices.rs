//! The devices of a domain that guest health needs: its NICs' MAC addresses (to match the
//! addresses libvirt reports), the serial console's log file (firmware evidence) and whether a
//! guest-agent channel exists: a view of the one parsed definition ([`super::domain_xml`]).

use std::path::PathBuf;

use super::domain_xml::{parse_domain_xml, DomainXmlFacts, XmlError};

/// The channel name QEMU's guest agent listens on.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// One NIC: the MAC libvirt assigned and the host's end of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nic {
    /// Lowercase.
    pub mac: String,
    /// `<target dev='vnet0'/>`: present while the domain runs.
    pub tap: Option<String>,
    /// `<source bridge='br0'/>` (libvirt fills it in for `type='network'` too while it runs):
    /// where libvirt says it attached the tap.
    pub bridge: Option<String>,
}

/// Health-relevant devices of one domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDevices {
    /// MAC addresses of the NICs, lowercase, in definition order.
    pub macs: Vec<String>,
    /// The NICs with their host-side device (the tap libvirt created, live definition only).
    pub nics: Vec<Nic>,
    /// Where a serial console's output is written, if one is logged to a file.
    pub console_log: Option<PathBuf>,
    /// A virtio channel for the QEMU guest agent is defined.
    pub agent_channel: bool,
}

pub fn parse_guest_devices(xml: &str) -> Result<GuestDevices, XmlError> {
    parse_domain_xml(xml).map(|d| GuestDevices::of(&d))
}

impl GuestDevices {
    /// The health view of a parsed definition: NICs that have a MAC, the first serial or console
    /// logged to a file, the agent channel.
    pub fn of(domain: &DomainXmlFacts) -> GuestDevices {
        let nics: Vec<Nic> = domain
            .interfaces
            .iter()
            .filter_map(|i| {
                let mac = i.mac.as_deref()?.to_ascii_lowercase();
                Some(Nic { mac, tap: i.target.clone(), bridge: i.source_bridge.clone() })
            })
            .collect();
        GuestDevices {
            macs: nics.iter().map(|n| n.mac.clone()).collect(),
            nics,
            console_log: domain.console_logs().first().map(PathBuf::from),
            agent_channel: domain.channels.iter().any(|c| c == AGENT_CHANNEL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_console_file_and_agent_channel() {
        let xml = "<domain><devices>\
            <interface type='bridge'><mac address='52:54:00:AA:bb:01'/><source bridge='br0'/><target dev='vnet3'/></interface>\
            <interface type='network'><mac address='52:54:00:aa:bb:02'/></interface>\
            <serial type='file'><source path='/var/log/libvirt/web.console'/><target port='0'/></serial>\
            <console type='file'><source path='/other'/></console>\
            <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
            </devices></domain>";
        let d = parse_guest_devices(xml).unwrap();
        assert_eq!(d.macs, ["52:54:00:aa:bb:01", "52:54:00:aa:bb:02"]);
        assert_eq!(
            d.nics[0],
            Nic { mac: "52:54:00:aa:bb:01".into(), tap: Some("vnet3".into()), bridge: Some("br0".into()) }
        );
        assert_eq!(d.nics[1].tap, None);
        assert_eq!(d.console_log, Some(PathBuf::from("/var/log/libvirt/web.console")));
        assert!(d.agent_channel);
    }

    #[test]
    fn a_pty_console_with_a_log_file_counts_and_one_without_does_not() {
        let logged =
            "<domain><devices><serial type='pty'><log file='/var/log/c.log' append='on'/></serial></devices></domain>";
        assert_eq!(parse_guest_devices(logged).unwrap().console_log, Some(PathBuf::from("/var/log/c.log")));
        let bare = "<domain><devices><serial type='pty'/><channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel></devices></domain>";
        let d = parse_guest_devices(bare).unwrap();
        assert_eq!(d, GuestDevices::default());
        assert!(parse_guest_devices("<domain>").is_err());
    }
}
