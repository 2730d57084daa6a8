//! The one reader of libvirt domain XML (roxmltree, never pattern matching). One parse gives
//! [`DomainXmlFacts`]: boot order, disks with every source form, interfaces, consoles, channels,
//! firmware files, memory and security labels; observe, guest health and diagnose all read it.

use roxmltree::{Document, Node};
use virtwarden_policies::BootDevice;

use super::model::{BootConfig, BootStyle, Disk, Interface};

/// A domain definition libvirt gave us that we could not read.
#[derive(Debug, thiserror::Error)]
#[error("domain XML is not well-formed: {0}")]
pub struct XmlError(#[from] pub roxmltree::Error);

/// What virtwarden reads from one domain XML document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainXmlFacts {
    /// `kvm`, `qemu`, `test`, …
    pub domain_type: String,
    /// The memory the guest starts with, in KiB (`<currentMemory>`, else `<memory>`; 0: neither).
    pub memory_kib: u64,
    /// The boot order as device classes: per-device `<boot order>`, else `<os><boot>`.
    pub boot: BootConfig,
    /// `<os><boot dev=…>` in order, as written (also when devices carry `<boot order>`).
    pub os_boot: Vec<BootDevice>,
    pub os: OsFiles,
    pub disks: Vec<DiskXml>,
    pub interfaces: Vec<InterfaceXml>,
    /// `<serial>` and `<console>` devices, in document order.
    pub consoles: Vec<Console>,
    /// The target names of the `<channel>` devices (`org.qemu.guest_agent.0`, …).
    pub channels: Vec<String>,
    /// Domain-level `<seclabel>` elements.
    pub seclabels: Vec<SecLabel>,
}

impl DomainXmlFacts {
    /// The files serial ports and consoles write to, each once, in document order.
    pub fn console_logs(&self) -> Vec<&str> {
        let mut files: Vec<&str> = Vec::new();
        for file in self.consoles.iter().filter_map(Console::output_file) {
            if !files.contains(&file) {
                files.push(file);
            }
        }
        files
    }
}

/// `<os>`: firmware and direct-kernel-boot files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsFiles {
    pub loader: Option<String>,
    pub nvram: Option<String>,
    pub nvram_template: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
}

/// One `<disk>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskXml {
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `<disk type>`: `file`, `block`, `dir`, `network`, `volume`, … (libvirt's default: file).
    pub kind: String,
    /// `None`: no medium (an empty CD-ROM), or a `<source>` naming none of the forms below.
    pub source: Option<DiskSource>,
    /// `<driver type>`; libvirt's default is raw.
    pub driver_type: Option<String>,
    pub target: Option<String>,
    pub bus: Option<String>,
    pub readonly: bool,
    /// A `<seclabel model='dac' relabel='no'/>` inside `<source>`.
    pub no_relabel: bool,
    pub boot_order: Option<u32>,
}

impl DiskXml {
    /// `vda`, or the device kind when the disk has no target.
    pub fn label(&self) -> String {
        self.target.clone().unwrap_or_else(|| self.device.clone())
    }

    /// QEMU opens it read-only: `<readonly/>`, or a CD-ROM.
    pub fn is_readonly(&self) -> bool {
        self.readonly || self.device == "cdrom"
    }
}

/// Where a disk's data is: every `<source>` form, first match in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// `<source file=…>`: an image file.
    File(String),
    /// `<source dev=…>`: a block device.
    Dev(String),
    /// `<source dir=…>`: a host directory QEMU presents as a disk (a directory is its medium,
    /// not a mistake).
    Dir(String),
    /// `<source protocol=… name=…>`: an image on a storage server (nbd, iscsi, rbd, …).
    Network { protocol: Option<String>, name: String },
    /// `<source pool=… volume=…>`: a volume of a libvirt storage pool.
    Volume { pool: Option<String>, volume: String },
}

impl DiskSource {
    /// What it names, as the XML says: the path, the image on the server, or the volume.
    pub fn as_str(&self) -> &str {
        match self {
            DiskSource::File(p) | DiskSource::Dev(p) | DiskSource::Dir(p) => p,
            DiskSource::Network { name, .. } => name,
            DiskSource::Volume { volume, .. } => volume,
        }
    }

    /// The path QEMU opens on this host; `None` for network and pool storage.
    pub fn host_path(&self) -> Option<&str> {
        match self {
            DiskSource::File(p) | DiskSource::Dev(p) | DiskSource::Dir(p) => Some(p),
            DiskSource::Network { .. } | DiskSource::Volume { .. } => None,
        }
    }
}

/// One `<interface>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceXml {
    /// `bridge`, `network`, `direct`, …
    pub kind: String,
    /// `<mac address>`, as written.
    pub mac: Option<String>,
    /// `<source bridge>` (libvirt fills it in for a running `type='network'` too).
    pub source_bridge: Option<String>,
    /// `<source network>`: the libvirt network.
    pub source_network: Option<String>,
    /// `<source dev>` (`type='direct'`, …).
    pub source_dev: Option<String>,
    /// `<target dev>`: the live tap, while the domain runs.
    pub target: Option<String>,
    /// `<model type>` (`virtio`, `e1000`, …).
    pub model: Option<String>,
    /// `<virtualport type>` (`openvswitch`, `802.1Qbh`, …).
    pub virtualport: Option<String>,
    /// `<mtu size>`.
    pub mtu: Option<u32>,
    pub boot_order: Option<u32>,
}

impl InterfaceXml {
    /// The source observe and diagnose go by, by type: a `network` interface's libvirt network
    /// (its live XML names the network's bridge too, which is not a network name), a `bridge`
    /// interface's bridge; for other types the bridge, else the network, else the device.
    pub fn source(&self) -> Option<&str> {
        match self.kind.as_str() {
            "network" => self.source_network.as_deref(),
            "bridge" => self.source_bridge.as_deref(),
            _ => self.source_bridge.as_deref().or(self.source_network.as_deref()).or(self.source_dev.as_deref()),
        }
    }
}

/// A `<serial>` or `<console>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Console {
    /// `pty`, `file`, `unix`, …
    pub kind: String,
    /// `<source path>`.
    pub source_path: Option<String>,
    /// `<log file>`.
    pub log_file: Option<String>,
}

impl Console {
    /// The file its output is written to: a `type='file'` source, or a `<log file>` beside any
    /// type.
    pub fn output_file(&self) -> Option<&str> {
        let from_source = if self.kind == "file" { self.source_path.as_deref() } else { None };
        from_source.or(self.log_file.as_deref())
    }
}

/// A `<seclabel>` element.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecLabel {
    /// `dac`, `selinux`, `apparmor`, or empty (the first driver).
    pub model: String,
    /// `dynamic`, `static`, `none`.
    pub kind: String,
    /// `relabel='no'`.
    pub no_relabel: bool,
    /// `<label>` (for DAC: `user:group`, either as a name or `+uid`).
    pub label: Option<String>,
}

/// The planner's view of an interface.
impl From<&InterfaceXml> for Interface {
    fn from(i: &InterfaceXml) -> Interface {
        Interface {
            kind: i.kind.clone(),
            source: i.source().map(str::to_string),
            target: i.target.clone(),
            mac: i.mac.clone(),
            virtualport: i.virtualport.clone(),
        }
    }
}

/// The planner's view of a disk.
impl From<&DiskXml> for Disk {
    fn from(d: &DiskXml) -> Disk {
        Disk {
            device: d.device.clone(),
            source: d.source.as_ref().map(|s| s.as_str().to_string()),
            driver_type: d.driver_type.clone(),
            target: d.target.clone(),
            bus: d.bus.clone(),
        }
    }
}

pub fn parse_domain_xml(xml: &str) -> Result<DomainXmlFacts, XmlError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    let mut facts = DomainXmlFacts {
        domain_type: root.attribute("type").unwrap_or("").to_string(),
        memory_kib: child(root, "currentMemory").or(child(root, "memory")).and_then(memory_kib).unwrap_or(0),
        seclabels: elements(root, "seclabel").map(seclabel).collect(),
        ..Default::default()
    };
    if let Some(os) = child(root, "os") {
        let text = |name: &str| child(os, name).and_then(|n| n.text()).map(str::trim).filter(|t| !t.is_empty());
        facts.os = OsFiles {
            loader: text("loader").map(str::to_string),
            nvram: text("nvram").map(str::to_string),
            nvram_template: attr_of(os, "nvram", "template"),
            kernel: text("kernel").map(str::to_string),
            initrd: text("initrd").map(str::to_string),
        };
        facts.os_boot = elements(os, "boot").filter_map(|b| b.attribute("dev").and_then(BootDevice::parse)).collect();
    }
    facts.boot = boot_config(root, &facts.os_boot);
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(Node::is_element) {
            match dev.tag_name().name() {
                "interface" => facts.interfaces.push(interface(dev)),
                "disk" => facts.disks.push(disk(dev)),
                "serial" | "console" => facts.consoles.push(console(dev)),
                "channel" => facts.channels.extend(attr_of(dev, "target", "name")),
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

fn elements<'a, 'i: 'a>(node: Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children().filter(move |n| n.is_element() && n.tag_name().name() == name)
}

fn boot_order(dev: Node) -> Option<u32> {
    child(dev, "boot")?.attribute("order")?.parse().ok()
}

fn interface(dev: Node) -> InterfaceXml {
    let source = |attr: &str| child(dev, "source").and_then(|s| s.attribute(attr)).map(str::to_string);
    InterfaceXml {
        kind: dev.attribute("type").unwrap_or("").to_string(),
        mac: attr_of(dev, "mac", "address"),
        source_bridge: source("bridge"),
        source_network: source("network"),
        source_dev: source("dev"),
        target: attr_of(dev, "target", "dev"),
        model: attr_of(dev, "model", "type"),
        virtualport: attr_of(dev, "virtualport", "type"),
        mtu: child(dev, "mtu").and_then(|m| m.attribute("size")).and_then(|s| s.parse().ok()),
        boot_order: boot_order(dev),
    }
}

fn disk(dev: Node) -> DiskXml {
    let source = child(dev, "source");
    DiskXml {
        device: dev.attribute("device").unwrap_or("disk").to_string(),
        kind: dev.attribute("type").unwrap_or("file").to_string(),
        source: source.and_then(disk_source),
        driver_type: attr_of(dev, "driver", "type"),
        target: attr_of(dev, "target", "dev"),
        bus: attr_of(dev, "target", "bus"),
        readonly: child(dev, "readonly").is_some(),
        no_relabel: source.is_some_and(|s| {
            elements(s, "seclabel").any(|l| l.attribute("model") == Some("dac") && l.attribute("relabel") == Some("no"))
        }),
        boot_order: boot_order(dev),
    }
}

fn disk_source(s: Node) -> Option<DiskSource> {
    let attr = |name: &str| s.attribute(name).map(str::to_string);
    if let Some(p) = attr("file") {
        Some(DiskSource::File(p))
    } else if let Some(p) = attr("dev") {
        Some(DiskSource::Dev(p))
    } else if let Some(p) = attr("dir") {
        Some(DiskSource::Dir(p))
    } else if let Some(name) = attr("name") {
        Some(DiskSource::Network { protocol: attr("protocol"), name })
    } else {
        attr("volume").map(|volume| DiskSource::Volume { pool: attr("pool"), volume })
    }
}

fn console(dev: Node) -> Console {
    Console {
        kind: dev.attribute("type").unwrap_or("").to_string(),
        source_path: attr_of(dev, "source", "path"),
        log_file: attr_of(dev, "log", "file"),
    }
}

fn seclabel(n: Node) -> SecLabel {
    SecLabel {
        model: n.attribute("model").unwrap_or("").to_string(),
        kind: n.attribute("type").unwrap_or("dynamic").to_string(),
        no_relabel: n.attribute("relabel") == Some("no"),
        label: child(n, "label").and_then(|l| l.text()).map(|t| t.trim().to_string()),
    }
}

/// `<memory unit='MiB'>64</memory>` in KiB.
fn memory_kib(n: Node) -> Option<u64> {
    let value: u64 = n.text()?.trim().parse().ok()?;
    let bytes_per_unit: u64 = match n.attribute("unit").unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    Some(value.saturating_mul(bytes_per_unit) / 1024)
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
    devices.children().filter(Node::is_element).filter_map(|dev| Some((dev, boot_order(dev)?))).collect()
}

fn boot_config(root: Node, os_boot: &[BootDevice]) -> BootConfig {
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
    if os_boot.is_empty() {
        BootConfig::default()
    } else {
        BootConfig { style: BootStyle::Os, order: os_boot.to_vec() }
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
        assert_eq!(f.interfaces[0].source(), Some("br0"));
        assert_eq!(f.interfaces[0].target.as_deref(), Some("vnet3"));
        assert_eq!(f.interfaces[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(f.interfaces[0].virtualport, None);
        assert_eq!(f.interfaces[1].virtualport.as_deref(), Some("openvswitch"));
        assert_eq!(f.disks[0].driver_type.as_deref(), Some("qcow2"));
        assert_eq!(f.disks[0].source, Some(DiskSource::File("/img/a.qcow2".into())));
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
    fn reads_firmware_memory_labels_consoles_and_every_disk_source_form() {
        let xml = r#"<domain type='kvm'><name>a</name>
          <memory unit='GiB'>2</memory><currentMemory unit='MiB'>512</currentMemory>
          <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
            <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/a_VARS.fd</nvram>
            <boot dev='cdrom'/><boot dev='hd'/></os>
          <seclabel type='static' model='dac' relabel='no'><label>qemu:kvm</label></seclabel>
          <devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='/img/a.qcow2'><seclabel model='dac' relabel='no'/></source><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
            <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb'/><boot order='1'/></disk>
            <disk type='dir' device='disk'><source dir='/srv/share'/><target dev='vdc'/></disk>
            <disk type='network' device='disk'><source protocol='rbd' name='pool/image'/><target dev='vdd'/></disk>
            <disk type='volume' device='disk'><source pool='default' volume='b.img'/><target dev='vde'/></disk>
            <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default' bridge='virbr0'/>
              <target dev='vnet3'/><model type='virtio'/><mtu size='9000'/></interface>
            <serial type='file'><source path='/var/log/a.console'/></serial>
            <console type='file'><source path='/var/log/a.console'/></console>
            <serial type='pty'><source path='/dev/pts/3'/><log file='/var/log/a.pty.log'/></serial>
            <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
          </devices></domain>"#;
        let f = parse_domain_xml(xml).unwrap();
        assert_eq!(f.domain_type, "kvm");
        assert_eq!(f.memory_kib, 512 * 1024);
        assert_eq!(f.os.loader.as_deref(), Some("/usr/share/OVMF/OVMF_CODE.fd"));
        assert_eq!(f.os.nvram_template.as_deref(), Some("/usr/share/OVMF/OVMF_VARS.fd"));
        assert_eq!(f.os_boot, vec![BootDevice::Cdrom, BootDevice::Hd]);
        assert_eq!(f.boot, BootConfig { style: BootStyle::PerDevice, order: vec![BootDevice::Hd] });
        assert_eq!(f.seclabels[0].label.as_deref(), Some("qemu:kvm"));
        assert!(f.seclabels[0].no_relabel);
        assert!(f.disks[0].no_relabel);
        assert!(f.disks[1].is_readonly() && f.disks[1].source.is_none());
        assert_eq!((f.disks[2].kind.as_str(), f.disks[2].boot_order), ("block", Some(1)));
        let sources: Vec<Option<DiskSource>> = f.disks.iter().map(|d| d.source.clone()).collect();
        assert_eq!(
            sources,
            [
                Some(DiskSource::File("/img/a.qcow2".into())),
                None,
                Some(DiskSource::Dev("/dev/sdb".into())),
                Some(DiskSource::Dir("/srv/share".into())),
                Some(DiskSource::Network { protocol: Some("rbd".into()), name: "pool/image".into() }),
                Some(DiskSource::Volume { pool: Some("default".into()), volume: "b.img".into() }),
            ]
        );
        let paths: Vec<Option<&str>> = f.disks.iter().map(|d| d.source.as_ref()?.host_path()).collect();
        assert_eq!(paths, [Some("/img/a.qcow2"), None, Some("/dev/sdb"), Some("/srv/share"), None, None]);
        let i = &f.interfaces[0];
        assert_eq!((i.source_network.as_deref(), i.source_bridge.as_deref()), (Some("default"), Some("virbr0")));
        // A running network interface is on network `default`, not on a network called `virbr0`.
        assert_eq!(i.source(), Some("default"));
        assert_eq!((i.model.as_deref(), i.mtu, i.target.as_deref()), (Some("virtio"), Some(9000), Some("vnet3")));
        assert_eq!(f.consoles[2].source_path.as_deref(), Some("/dev/pts/3"));
        assert_eq!(f.console_logs(), vec!["/var/log/a.console", "/var/log/a.pty.log"]);
        assert_eq!(f.channels, vec!["org.qemu.guest_agent.0"]);
    }

    #[test]
    fn memory_defaults_to_kib() {
        let f = parse_domain_xml("<domain type='qemu'><memory>65536</memory></domain>").unwrap();
        assert_eq!(f.memory_kib, 65536);
    }

    #[test]
    fn malformed_xml_is_an_error_not_a_panic() {
        assert!(parse_domain_xml("<domain><os>").is_err());
    }
}
