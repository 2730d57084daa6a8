//! Observed host network: links, bridge attributes, ports, forwarding, and the host's uplinks
//! (interfaces carrying a default route or a global address). Plain data; the netlink reader
//! fills it.

use serde::{Deserialize, Serialize};

/// Everything observed about the host network in one pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObservedNet {
    #[serde(default)]
    pub links: Vec<NetLink>,
    #[serde(default)]
    pub forwarding: ForwardingState,
    /// Interfaces that carry a default route: any routing table, IPv4 or IPv6, every nexthop of
    /// a multipath route and of a nexthop object (or group) included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_route: Vec<String>,
    /// Interfaces holding a global-scope address (IPv4 or IPv6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub global_address: Vec<String>,
    /// Interfaces whose IPv6 default route was learned from router advertisements (`proto ra`),
    /// with their `accept_ra` setting: turning IPv6 forwarding on drops those routes unless
    /// `accept_ra` is 2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ra_default_route: Vec<RaDefaultRoute>,
    /// Uplinks that a bridge with `allowUplinkChange` lists as ports and that are not its
    /// ports yet: what a takeover would move, and who else manages them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplink_ports: Vec<UplinkPort>,
    /// Uplink takeovers that failed verification and were rolled back (from the durable
    /// memory): held until the policy changes or an admin releases them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_uplinks: Vec<HeldUplink>,
    /// Uplinks virtwarden took over (from the durable memory), as `(port, bridge)`: when the
    /// policy no longer lists them they are given back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taken_over: Vec<(String, String)>,
    /// The gateways of the default routes (every table), with the link each is reached
    /// through: a guarded change must leave them answering.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_gateways: Vec<DefaultGateway>,
}

/// A default route's gateway and the link it is reached through.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefaultGateway {
    pub link: String,
    pub address: std::net::IpAddr,
}

/// What a guarded change (one that could cut the host off: checkpoint → apply → verify →
/// commit or roll back) does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardedChange {
    /// An uplink port's addresses, routes and rules move into a bridge.
    #[default]
    Takeover,
    /// They move back to the port (the policy let go of it).
    Release,
    /// STP or its timers on a bridge that carries an uplink.
    Stp,
    /// IP forwarding while the default route goes through a managed bridge.
    Forwarding,
    /// Another host interface attached to a bridge that carries an uplink (a second path to
    /// the LAN can loop it, a wrong one can take the bridge's traffic).
    Port,
}

/// A sysctl a guarded change writes or whose value decides whether the host stays reachable;
/// its checkpoint holds the value and a rollback writes it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "sysctl")]
pub enum Sysctl {
    Ipv4Forwarding,
    Ipv6Forwarding,
    AcceptRa { iface: String },
}

impl std::fmt::Display for Sysctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sysctl::Ipv4Forwarding => f.write_str("net.ipv4.ip_forward"),
            Sysctl::Ipv6Forwarding => f.write_str("net.ipv6.conf.all.forwarding"),
            Sysctl::AcceptRa { iface } => write!(f, "net.ipv6.conf.{iface}.accept_ra"),
        }
    }
}

/// An uplink port as a takeover into `bridge` would see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UplinkPort {
    pub name: String,
    pub bridge: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// `198.51.100.2/24 (valid 3600s, preferred 3600s)`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// `default via 198.51.100.1 table main`.
    #[serde(default)]
    pub routes: Vec<String>,
    /// `priority 100 iif eth0 table 10`.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Gateways of the default routes that move.
    #[serde(default)]
    pub gateways: Vec<std::net::IpAddr>,
    /// Other managers of the link: `DHCP client dhclient (pid 42)`, `NetworkManager (pid 7)`.
    #[serde(default)]
    pub managers: Vec<String>,
}

/// A guarded change (an uplink takeover or release, STP on an uplink bridge, a port attached to
/// one, forwarding) rolled back after failed verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeldUplink {
    pub bridge: String,
    pub port: String,
    /// Why verification failed.
    pub reason: String,
    /// When it was rolled back (RFC 3339).
    pub at: String,
    /// The bridge's policy when it failed: a changed policy is tried again.
    pub fingerprint: String,
    /// Which change is held (`bridge` is `forwarding` and `port` the family for forwarding,
    /// `port` is empty for STP).
    #[serde(default)]
    pub change: GuardedChange,
}

impl HeldUplink {
    /// The held change in words: `up0 → br0`, `STP of br0`, `ipv6 forwarding`, `attach of eth1
    /// to br0`.
    pub fn what(&self) -> String {
        match self.change {
            GuardedChange::Takeover => format!("{} → {}", self.port, self.bridge),
            GuardedChange::Release => format!("release of {} from {}", self.port, self.bridge),
            GuardedChange::Stp => format!("STP of {}", self.bridge),
            GuardedChange::Forwarding => format!("{} forwarding", self.port),
            GuardedChange::Port => format!("attach of {} to {}", self.port, self.bridge),
        }
    }
}

/// An interface whose IPv6 default route comes from router advertisements.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RaDefaultRoute {
    pub name: String,
    /// `net.ipv6.conf.<name>.accept_ra` (0, 1 or 2); `None` when it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_ra: Option<u8>,
}

impl ObservedNet {
    pub fn link(&self, name: &str) -> Option<&NetLink> {
        self.links.iter().find(|l| l.name == name)
    }

    /// Names of the ports of `bridge`, in name order.
    pub fn ports_of(&self, bridge: &str) -> Vec<&str> {
        let mut v: Vec<&str> =
            self.links.iter().filter(|l| l.master.as_deref() == Some(bridge)).map(|l| l.name.as_str()).collect();
        v.sort();
        v
    }

    /// Why `iface` is an uplink of the host, if it is one: changing it can cut the host off.
    pub fn uplink_reason(&self, iface: &str) -> Option<&'static str> {
        if self.default_route.iter().any(|u| u == iface) {
            Some("carries a default route")
        } else if self.global_address.iter().any(|u| u == iface) {
            Some("holds a global address")
        } else {
            None
        }
    }

    /// The uplink `bridge` carries — itself or one of its ports — described for a plan line
    /// (`br0 carries a default route`, `eth0 (a port of br0) holds a global address`).
    pub fn bridge_uplink(&self, bridge: &str) -> Option<String> {
        if let Some(why) = self.uplink_reason(bridge) {
            return Some(format!("{bridge} {why}"));
        }
        self.ports_of(bridge)
            .into_iter()
            .find_map(|p| self.uplink_reason(p).map(|why| format!("{p} (a port of {bridge}) {why}")))
    }
}

/// One network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetLink {
    pub name: String,
    #[serde(default)]
    pub index: u32,
    /// `bridge`, `veth`, `tun`, … (absent for plain NICs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub up: bool,
    /// The link-layer address, lower-case `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The bridge this link is a port of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeAttrs>,
    /// The MTU (0: not read).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtu: u32,
    /// Its STP state as a port of `master`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_state: Option<PortState>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The STP state of a bridge port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortState {
    Disabled,
    Listening,
    Learning,
    Forwarding,
    Blocking,
}

impl PortState {
    pub fn as_str(self) -> &'static str {
        match self {
            PortState::Disabled => "disabled",
            PortState::Listening => "listening",
            PortState::Learning => "learning",
            PortState::Forwarding => "forwarding",
            PortState::Blocking => "blocking",
        }
    }
}

/// Bridge attributes, timers in whole seconds (netlink carries centiseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BridgeAttrs {
    pub stp: bool,
    pub forward_delay: u32,
    pub hello_time: u32,
    pub max_age: u32,
    pub priority: u16,
}

/// IP forwarding switches of this network namespace (`None`: could not be read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForwardingState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
}

/// Bridge STP settings to apply (timers in seconds; `None` leaves one as it is): what the
/// planner wants and the host network backend sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StpSettings {
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_delay: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
}
