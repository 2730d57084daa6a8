//! Observed host network: links, bridge attributes, ports, forwarding, and which interfaces
//! carry the default route. Plain data; the netlink reader fills it.

use serde::{Deserialize, Serialize};

/// Everything observed about the host network in one pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObservedNet {
    #[serde(default)]
    pub links: Vec<NetLink>,
    #[serde(default)]
    pub forwarding: ForwardingState,
    /// Interfaces that carry a default route (IPv4 or IPv6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<String>,
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

    /// Whether `bridge` or one of its ports carries the default route.
    pub fn carries_default_route(&self, bridge: &str) -> bool {
        self.uplinks.iter().any(|u| u == bridge || self.link(u).is_some_and(|l| l.master.as_deref() == Some(bridge)))
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
    /// The bridge this link is a port of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeAttrs>,
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
