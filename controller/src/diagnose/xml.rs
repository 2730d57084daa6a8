//! The parts of a domain's XML the checks need — disks with their driver type and labels, the
//! boot order, firmware files, consoles, security labels, memory, interfaces — read with a real
//! XML parser (roxmltree).

use roxmltree::{Document, Node};
use virtwarden_policies::BootDevice;

use crate::observe::domain_xml::{child, XmlError};

/// What diagnose reads from one domain definition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainSpec {
    /// `kvm`, `qemu`, `test`, …
    pub domain_type: String,
    /// The memory the guest starts with, in KiB (`<currentMemory>`, else `<memory>`).
    pub memory_kib: u64,
    pub os: OsSpec,
    /// `<os><boot dev=…>` in order (empty when the devices carry `<boot order>`).
    pub os_boot: Vec<BootDevice>,
    pub disks: Vec<DiskSpec>,
    pub interfaces: Vec<InterfaceSpec>,
    /// Files a serial port or console writes to (`type='file'` or `<log file>`).
    pub console_logs: Vec<String>,
    /// Domain-level `<seclabel>` elements.
    pub seclabels: Vec<SecLabel>,
}

/// `<os>`: firmware and direct-kernel-boot files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsSpec {
    pub loader: Option<String>,
    pub nvram: Option<String>,
    pub nvram_template: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
}

/// One `<disk>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskSpec {
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `file`, `block`, `network`, `volume`, `dir`.
    pub kind: String,
    pub source: Option<String>,
    /// `<driver type>`; libvirt's default is raw.
    pub driver_type: Option<String>,
    pub target: Option<String>,
    pub readonly: bool,
    /// A `<seclabel model='dac' relabel='no'/>` inside `<source>`.
    pub no_relabel: bool,
    pub boot_order: Option<u32>,
}

impl DiskSpec {
    /// `vda`, or the source when the disk has no target.
    pub fn label(&self) -> String {
        self.target.clone().unwrap_or_else(|| self.device.clone())
    }

    /// QEMU opens it read-only: `<readonly/>`, or a CD-ROM.
    pub fn is_readonly(&self) -> bool {
        self.readonly || self.device == "cdrom"
    }
}

/// One `<interface>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// `bridge`, `network`, `direct`, …
    pub kind: String,
    /// The bridge (type bridge) or libvirt network (type network).
    pub source: Option<String>,
    /// The live tap, when running.
    pub target: Option<String>,
    pub mac: Option<String>,
    /// `<mtu size>`.
    pub mtu: Option<u32>,
    pub boot_order: Option<u32>,
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

pub fn parse(xml: &str) -> Result<DomainSpec, XmlError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    let mut spec = DomainSpec {
        domain_type: root.attribute("type").unwrap_or("").to_string(),
        memory_kib: child(root, "currentMemory").or(child(root, "memory")).and_then(memory_kib).unwrap_or(0),
        ..Default::default()
    };
    if let Some(os) = child(root, "os") {
        let text = |name: &str| child(os, name).and_then(|n| n.text()).map(str::trim).filter(|t| !t.is_empty());
        spec.os.loader = text("loader").map(str::to_string);
        spec.os.nvram = text("nvram").map(str::to_string);
        spec.os.nvram_template = child(os, "nvram").and_then(|n| n.attribute("template")).map(str::to_string);
        spec.os.kernel = text("kernel").map(str::to_string);
        spec.os.initrd = text("initrd").map(str::to_string);
        spec.os_boot = elements(os, "boot").filter_map(|b| b.attribute("dev").and_then(BootDevice::parse)).collect();
    }
    spec.seclabels = elements(root, "seclabel").map(seclabel).collect();
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(Node::is_element) {
            match dev.tag_name().name() {
                "disk" => spec.disks.push(disk(dev)),
                "interface" => spec.interfaces.push(interface(dev)),
                "serial" | "console" => {
                    let file = (dev.attribute("type") == Some("file"))
                        .then(|| child(dev, "source").and_then(|s| s.attribute("path")))
                        .flatten()
                        .or_else(|| child(dev, "log").and_then(|l| l.attribute("file")));
                    if let Some(f) = file {
                        if !spec.console_logs.iter().any(|c| c == f) {
                            spec.console_logs.push(f.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(spec)
}

fn elements<'a, 'i: 'a>(node: Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children().filter(move |n| n.is_element() && n.tag_name().name() == name)
}

fn boot_order(dev: Node) -> Option<u32> {
    child(dev, "boot")?.attribute("order")?.parse().ok()
}

fn disk(dev: Node) -> DiskSpec {
    let source = child(dev, "source");
    let path = source.and_then(|s| {
        s.attribute("file")
            .or(s.attribute("dev"))
            .or(s.attribute("dir"))
            .or(s.attribute("name"))
            .or(s.attribute("volume"))
    });
    DiskSpec {
        device: dev.attribute("device").unwrap_or("disk").to_string(),
        kind: dev.attribute("type").unwrap_or("file").to_string(),
        source: path.map(str::to_string),
        driver_type: child(dev, "driver").and_then(|d| d.attribute("type")).map(str::to_string),
        target: child(dev, "target").and_then(|t| t.attribute("dev")).map(str::to_string),
        readonly: child(dev, "readonly").is_some(),
        no_relabel: source
            .map(|s| {
                elements(s, "seclabel")
                    .any(|l| l.attribute("model") == Some("dac") && l.attribute("relabel") == Some("no"))
            })
            .unwrap_or(false),
        boot_order: boot_order(dev),
    }
}

fn interface(dev: Node) -> InterfaceSpec {
    let source =
        child(dev, "source").and_then(|s| s.attribute("bridge").or(s.attribute("network")).or(s.attribute("dev")));
    InterfaceSpec {
        kind: dev.attribute("type").unwrap_or("").to_string(),
        source: source.map(str::to_string),
        target: child(dev, "target").and_then(|t| t.attribute("dev")).map(str::to_string),
        mac: child(dev, "mac").and_then(|m| m.attribute("address")).map(str::to_string),
        mtu: child(dev, "mtu").and_then(|m| m.attribute("size")).and_then(|s| s.parse().ok()),
        boot_order: boot_order(dev),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_checks_need() {
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
            <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/>
              <target dev='vnet3'/><mtu size='9000'/></interface>
            <serial type='file'><source path='/var/log/a.console'/></serial>
            <console type='file'><source path='/var/log/a.console'/></console>
            <serial type='pty'><log file='/var/log/a.pty.log'/></serial>
          </devices></domain>"#;
        let s = parse(xml).unwrap();
        assert_eq!(s.domain_type, "kvm");
        assert_eq!(s.memory_kib, 512 * 1024);
        assert_eq!(s.os.loader.as_deref(), Some("/usr/share/OVMF/OVMF_CODE.fd"));
        assert_eq!(s.os.nvram_template.as_deref(), Some("/usr/share/OVMF/OVMF_VARS.fd"));
        assert_eq!(s.os_boot, vec![BootDevice::Cdrom, BootDevice::Hd]);
        assert_eq!(s.seclabels[0].label.as_deref(), Some("qemu:kvm"));
        assert!(s.seclabels[0].no_relabel);
        assert!(s.disks[0].no_relabel);
        assert_eq!(s.disks[0].driver_type.as_deref(), Some("qcow2"));
        assert!(s.disks[1].is_readonly() && s.disks[1].source.is_none());
        assert_eq!((s.disks[2].kind.as_str(), s.disks[2].boot_order), ("block", Some(1)));
        assert_eq!(s.interfaces[0].mtu, Some(9000));
        assert_eq!(s.interfaces[0].target.as_deref(), Some("vnet3"));
        assert_eq!(s.console_logs, vec!["/var/log/a.console", "/var/log/a.pty.log"]);
    }

    #[test]
    fn memory_defaults_to_kib() {
        let s = parse("<domain type='qemu'><memory>65536</memory></domain>").unwrap();
        assert_eq!(s.memory_kib, 65536);
    }
}
