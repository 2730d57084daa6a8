//! The devices of a domain that guest health needs: its NICs' MAC addresses (to match the
//! addresses libvirt reports), the serial console's log file (firmware evidence) and whether a
//! guest-agent channel exists.

use std::path::PathBuf;

use roxmltree::{Document, Node};

use super::domain_xml::{child, XmlError};

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
    let doc = Document::parse(xml)?;
    let mut out = GuestDevices::default();
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(out);
    };
    for dev in devices.children().filter(Node::is_element) {
        match dev.tag_name().name() {
            "interface" => {
                if let Some(mac) = child(dev, "mac").and_then(|m| m.attribute("address")) {
                    let mac = mac.to_ascii_lowercase();
                    let tap = child(dev, "target").and_then(|t| t.attribute("dev")).map(str::to_string);
                    let bridge = child(dev, "source").and_then(|s| s.attribute("bridge")).map(str::to_string);
                    out.macs.push(mac.clone());
                    out.nics.push(Nic { mac, tap, bridge });
                }
            }
            // The first serial or console device that is logged to a file: a `type='file'`
            // source, or a `<log file=…>` beside any other type.
            "serial" | "console" if out.console_log.is_none() => out.console_log = console_file(dev),
            "channel" => {
                let target = child(dev, "target");
                if target.is_some_and(|t| t.attribute("name") == Some(AGENT_CHANNEL)) {
                    out.agent_channel = true;
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn console_file(dev: Node) -> Option<PathBuf> {
    let source = || child(dev, "source").and_then(|s| s.attribute("path"));
    let from_source = (dev.attribute("type") == Some("file")).then(source).flatten();
    let from_log = child(dev, "log").and_then(|l| l.attribute("file"));
    from_source.or(from_log).map(PathBuf::from)
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
