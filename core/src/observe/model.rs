//! Observed values: what libvirt reports about the host, as plain data the planner reads.
//! Serializable so golden tests can write an observed host down as YAML.

use serde::{Deserialize, Serialize};
use virtwarden_policies::BootDevice;

/// Everything observed about the host in one pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObservedHost {
    #[serde(default)]
    pub domains: Vec<ObservedDomain>,
    /// libvirt networks and the bridge each uses (for taps of `type='network'` interfaces).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<ObservedNetwork>,
    /// The host network, when it was observed (absent: network checks are skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<super::net::ObservedNet>,
}

impl ObservedHost {
    pub fn domain(&self, name: &str) -> Option<&ObservedDomain> {
        self.domains.iter().find(|d| d.name == name)
    }

    /// The bridge an interface is plugged into: its source bridge, or its libvirt network's.
    pub fn bridge_of(&self, iface: &Interface) -> Option<String> {
        match iface.kind.as_str() {
            "bridge" => iface.source.clone(),
            "network" => {
                let net = iface.source.as_deref()?;
                self.networks.iter().find(|n| n.name == net).and_then(|n| n.bridge.clone())
            }
            _ => None,
        }
    }
}

/// A libvirt network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObservedNetwork {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default)]
    pub active: bool,
}

/// One libvirt domain as observed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObservedDomain {
    pub name: String,
    #[serde(default)]
    pub uuid: String,
    pub state: DomainState,
    /// The state reason (`crashed`, `shutdown`, `user`, … as `virsh domstate --reason` says).
    #[serde(default)]
    pub reason: super::StateReason,
    #[serde(default = "yes")]
    pub persistent: bool,
    #[serde(default)]
    pub autostart: bool,
    /// Boot order of the persistent definition (what the next boot uses).
    #[serde(default)]
    pub boot: BootConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// libvirt's runtime id of an active domain: a new one on every start, so a restart is seen
    /// even when its STARTED event was missed (libvirt was away). Not part of any output.
    #[serde(skip)]
    pub id: Option<u32>,
}

fn yes() -> bool {
    true
}

impl ObservedDomain {
    /// `shut off (crashed)`, as virsh prints it.
    pub fn state_text(&self) -> String {
        format!("{} ({})", self.state.as_str(), self.reason)
    }
}

/// libvirt's domain states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    NoState,
    Running,
    Blocked,
    Paused,
    /// Being shut down.
    ShuttingDown,
    ShutOff,
    Crashed,
    PmSuspended,
}

impl DomainState {
    /// The words virsh uses.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::NoState => "no state",
            DomainState::Running => "running",
            DomainState::Blocked => "idle",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "in shutdown",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pmsuspended",
        }
    }

    /// QEMU is alive (the guest may still be paused or suspended).
    pub fn is_active(self) -> bool {
        !matches!(self, DomainState::ShutOff | DomainState::NoState)
    }
}

/// Which boot-order notation a definition uses; libvirt forbids mixing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootStyle {
    /// Neither: libvirt's default applies.
    #[default]
    None,
    /// `<os><boot dev='…'/></os>`.
    Os,
    /// `<boot order='N'/>` inside devices.
    PerDevice,
}

/// The boot order as device classes, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootConfig {
    #[serde(default)]
    pub style: BootStyle,
    #[serde(default)]
    pub order: Vec<BootDevice>,
}

/// A network interface of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Interface {
    /// `bridge`, `network`, `direct`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Source bridge (type bridge) or network name (type network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The live tap device (`vnet0`), when running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `<virtualport type='…'>` (`openvswitch`, `802.1Qbh`, …): the port belongs to a switch
    /// other than a Linux bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtualport: Option<String>,
}

/// A disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
}
