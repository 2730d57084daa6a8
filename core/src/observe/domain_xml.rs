//! Reading the parts of a domain's XML that virtwarden cares about: boot order,
//! interfaces, disks. A real XML parser (roxmltree), never pattern matching.

use roxmltree::{Document, Node};
use virtwarden_policies::BootDevice;

use super::model::{BootConfig, BootStyle, Disk, Interface};

/// A domain definition libvirt gave us that we could not read.
#[derive(Debug, thiserror::Error)]
#[error("domain XML is not well-formed: {0}")]
pub struct XmlError(#[from] pub roxmltree::Error);

/// The facts extracted from one domain XML document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainXmlFacts {
    pub boot: BootConfig,
    pub interfaces: Vec<Interface>,
    pub disks: Vec<Disk>,
}

pub fn parse_domain_xml(xml: &str) -> Result<DomainXmlFacts, XmlError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    let devices = child(root, "devices");
    let mut facts = DomainXmlFacts { boot: boot_config(root), ..Default::default() };
    if let Some(devices) = devices {
        for dev in devices.children().filter(Node::is_element) {
            match dev.tag_name().name() {
                "interface" => facts.interfaces.push(interface(dev)),
                "disk" => facts.disks.push(disk(dev)),
                _ => {}
            }
        }
    }
    Ok(facts)
}

pub fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| n.is_element() && n.tag_name().name() == name)
}

fn attr_of(node: Node, child_name: &str, attr: &str) -> Option<String> {
    child(node, child_name).and_then(|c| c.attribute(attr)).map(str::to_string)
}

fn interface(dev: Node) -> Interface {
    let kind = dev.attribute("type").unwrap_or("").to_string();
    let source =
        child(dev, "source").and_then(|s| s.attribute("bridge").or(s.attribute("network")).or(s.attribute("dev")));
    Interface {
        kind,
        source: source.map(str::to_string),
        target: attr_of(dev, "target", "dev"),
        mac: attr_of(dev, "mac", "address"),
        virtualport: attr_of(dev, "virtualport", "type"),
    }
}

fn disk(dev: Node) -> Disk {
    let source = child(dev, "source")
        .and_then(|s| s.attribute("file").or(s.attribute("dev")).or(s.attribute("name")).or(s.attribute("volume")));
    Disk {
        device: dev.attribute("device").unwrap_or("disk").to_string(),
        source: source.map(str::to_string),
        driver_type: attr_of(dev, "driver", "type"),
        target: attr_of(dev, "target", "dev"),
        bus: attr_of(dev, "target", "bus"),
    }
}

/// The boot device class a device element stands for, if it is bootable.
pub(crate) fn device_boot_class(dev: Node) -> Option<BootDevice> {
    match dev.tag_name().name() {
        "interface" => Some(BootDevice::Network),
        "disk" => match dev.attribute("device").unwrap_or("disk") {
            "disk" | "lun" => Some(BootDevice::Hd),
            "cdrom" => Some(BootDevice::Cdrom),
            "floppy" => Some(BootDevice::Fd),
            _ => None,
        },
        _ => None,
    }
}

/// Devices carrying `<boot order='N'/>`, with N, in document order.
pub(crate) fn per_device_boot<'a, 'i>(root: Node<'a, 'i>) -> Vec<(Node<'a, 'i>, u32)> {
    let Some(devices) = child(root, "devices") else {
        return Vec::new();
    };
    devices
        .children()
        .filter(Node::is_element)
        .filter_map(|dev| {
            let order = child(dev, "boot")?.attribute("order")?.parse().ok()?;
            Some((dev, order))
        })
        .collect()
}

fn boot_config(root: Node) -> BootConfig {
    let per_device = per_device_boot(root);
    if !per_device.is_empty() {
        let mut sorted = per_device;
        sorted.sort_by_key(|(_, order)| *order);
        let mut order: Vec<BootDevice> = Vec::new();
        for class in sorted.iter().filter_map(|(dev, _)| device_boot_class(*dev)) {
            if !order.contains(&class) {
                order.push(class);
            }
        }
        return BootConfig { style: BootStyle::PerDevice, order };
    }
    let os_boot: Vec<BootDevice> = child(root, "os")
        .map(|os| {
            os.children()
                .filter(|n| n.is_element() && n.tag_name().name() == "boot")
                .filter_map(|b| b.attribute("dev").and_then(BootDevice::parse))
                .collect()
        })
        .unwrap_or_default();
    if os_boot.is_empty() {
        BootConfig::default()
    } else {
        BootConfig { style: BootStyle::Os, order: os_boot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_os_style_boot_interfaces_and_disks() {
        let xml = r#"<domain type='kvm'><name>a</name>
          <os><type>hvm</type><boot dev='network'/><boot dev='hd'/></os>
          <devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
            <interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/>
              <target dev='vnet3'/></interface>
            <interface type='bridge'><source bridge='ovsbr0'/><virtualport type='openvswitch'>
              <parameters interfaceid='09b11c53-8b5c-4eeb-8f00-d84eaa0aaa4f'/></virtualport>
              <target dev='vnet4'/></interface>
          </devices></domain>"#;
        let f = parse_domain_xml(xml).unwrap();
        assert_eq!(f.boot, BootConfig { style: BootStyle::Os, order: vec![BootDevice::Network, BootDevice::Hd] });
        assert_eq!(f.interfaces[0].source.as_deref(), Some("br0"));
        assert_eq!(f.interfaces[0].target.as_deref(), Some("vnet3"));
        assert_eq!(f.interfaces[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(f.interfaces[0].virtualport, None);
        assert_eq!(f.interfaces[1].virtualport.as_deref(), Some("openvswitch"));
        assert_eq!(f.disks[0].driver_type.as_deref(), Some("qcow2"));
        assert_eq!(f.disks[0].source.as_deref(), Some("/img/a.qcow2"));
        assert_eq!(f.disks[1].device, "cdrom");
        assert_eq!(f.disks[1].source, None);
    }

    #[test]
    fn per_device_boot_order_is_sorted_and_collapsed_into_classes() {
        let xml = r#"<domain><os><type>hvm</type></os><devices>
            <disk device='disk'><boot order='3'/></disk>
            <disk device='disk'><boot order='2'/></disk>
            <interface type='network'><source network='default'/><boot order='1'/></interface>
          </devices></domain>"#;
        let f = parse_domain_xml(xml).unwrap();
        assert_eq!(
            f.boot,
            BootConfig { style: BootStyle::PerDevice, order: vec![BootDevice::Network, BootDevice::Hd] }
        );
    }

    #[test]
    fn malformed_xml_is_an_error_not_a_panic() {
        assert!(parse_domain_xml("<domain><os>").is_err());
    }
}
