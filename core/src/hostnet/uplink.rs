//! The seam of uplink changes: a checkpoint of what a takeover of a port into a bridge moves,
//! and the takeover and restore themselves. The checkpoint holds the backend's own encoding of
//! addresses, routes and rules (netlink messages); only the backend reads it
//! ([`UplinkNet::describe`]).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use virtwarden_policies::VerifyProbe;

use super::NetError;
use crate::observe::{BridgeAttrs, GuardedChange, Sysctl};

/// A sysctl's value before a guarded change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SysctlValue {
    #[serde(flatten)]
    pub sysctl: Sysctl,
    pub value: u8,
}

/// What the neighbour table says of a gateway during verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Neighbour {
    /// Confirmed reachable (an answer to the kernel's ARP/NDP request).
    Reachable,
    /// Not (yet) answered.
    Unanswered,
    /// Set by an admin (permanent) or on a NOARP link: the kernel never asks, so it proves
    /// nothing about the path.
    SetByAdmin,
}

/// Everything a guarded change changes, as it was before: for a takeover of `port` into
/// `bridge` (or its release) the links, addresses, routes and rules; for an STP change the
/// bridge's STP settings; for a forwarding change the sysctls; for a port attached to an
/// uplink bridge nothing but the names (the port was in no bridge).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub bridge: String,
    pub port: String,
    pub port_mac: Option<String>,
    pub port_mtu: Option<u32>,
    /// The port's bridge before (normally none).
    pub port_master: Option<String>,
    pub bridge_mac: Option<String>,
    pub bridge_mtu: Option<u32>,
    /// The port's addresses that move (global and site scope), as `RTM_NEWADDR` messages.
    pub addresses: Vec<String>,
    /// Routes through the port that move (all tables; not the kernel's own), as `RTM_NEWROUTE`.
    pub routes: Vec<String>,
    /// Policy rules naming the port (`iif`/`oif`), as `RTM_NEWRULE`.
    pub rules: Vec<String>,
    /// The bridge policy the change came from (a change restored after a crash stays held
    /// until the policy differs).
    #[serde(default)]
    pub fingerprint: String,
    /// Which change this checkpoint guards (`bridge` is `forwarding` and `port` the family for
    /// a forwarding change; `port` is empty for an STP change).
    #[serde(default)]
    pub change: GuardedChange,
    /// The bridge's STP settings before an STP change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_stp: Option<BridgeAttrs>,
    /// Sysctls before the change, in the order a rollback writes them back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sysctls: Vec<SysctlValue>,
}

/// What a checkpoint moves, in words, and the gateways that must answer afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moves {
    /// `198.51.100.2/24 (valid 3600s)`.
    pub addresses: Vec<String>,
    /// `default via 198.51.100.1 table 254`.
    pub routes: Vec<String>,
    /// `priority 100 iif eth0 table 10`.
    pub rules: Vec<String>,
    /// The default gateways the moved routes use (sorted, once each).
    pub gateways: Vec<IpAddr>,
}

/// Takeover and restore on the host: the checkpoint/restore seam of uplink changes.
pub trait UplinkNet: Send + Sync {
    /// Read what a takeover of `port` into `bridge` changes.
    fn checkpoint(
        &self,
        bridge: &str,
        port: &str,
    ) -> impl std::future::Future<Output = Result<Checkpoint, NetError>> + Send;
    /// Give the bridge the port's MAC and MTU, move addresses, routes and rules, enslave.
    fn take_over(&self, cp: &Checkpoint) -> impl std::future::Future<Output = Result<(), NetError>> + Send;
    /// Put everything back as `cp` says. Idempotent: a half-applied takeover (or one already
    /// undone) is restored too, so it is safe after a crash.
    fn restore(&self, cp: &Checkpoint) -> impl std::future::Future<Output = Result<(), NetError>> + Send;
    /// Make `port` a port of `bridge` without changing the bridge's MAC (set explicitly first,
    /// so the kernel does not take a lower one from the new port: DHCP reservations and switch
    /// port security keep seeing the same address).
    fn attach(&self, port: &str, bridge: &str) -> impl std::future::Future<Output = Result<(), NetError>> + Send;
    /// Undo [`UplinkNet::attach`]: detach `port` if it is a port of `bridge`; nothing when it
    /// is gone, or a port of something else now (not ours to take out). Touches nothing else.
    fn detach(&self, port: &str, bridge: &str) -> impl std::future::Future<Output = Result<(), NetError>> + Send;
    /// The gateways of every default route (IPv4 and IPv6, every table, every nexthop of a
    /// multipath route), with the index of the link each is reached through.
    fn default_gateways(&self) -> impl std::future::Future<Output = Result<Vec<(u32, IpAddr)>, NetError>> + Send;
    /// Drop the neighbour entry of `addr` on `link` unless an admin set it (permanent), so the
    /// next [`UplinkNet::neighbour_reachable`] needs a fresh answer from it.
    fn forget_neighbour(
        &self,
        link: &str,
        addr: IpAddr,
    ) -> impl std::future::Future<Output = Result<(), NetError>> + Send;
    /// Ask `link` to resolve `addr` (an ARP request or NDP solicitation) and say whether the
    /// neighbour entry is confirmed reachable, or one an admin set (permanent, or a NOARP link),
    /// which the kernel never asks: no answer can be checked.
    fn neighbour_reachable(
        &self,
        link: &str,
        addr: IpAddr,
    ) -> impl std::future::Future<Output = Result<Neighbour, NetError>> + Send;
    /// One attempt of a policy's verify probe, within `timeout`.
    fn probe(
        &self,
        probe: &VerifyProbe,
        timeout: std::time::Duration,
    ) -> impl std::future::Future<Output = bool> + Send;
    /// What `cp` (a checkpoint this backend took) moves, in words, and its default gateways.
    fn describe(&self, cp: &Checkpoint) -> Moves;
    /// Who else manages `link` (index `index`) in this namespace, each as `dhclient (pid 123)`
    /// (DHCP clients, NetworkManager, systemd-networkd); empty when none.
    fn managers(&self, link: &str, index: u32) -> Vec<String>;
}
