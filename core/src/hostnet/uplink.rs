//! The seam of uplink changes: a checkpoint of what a takeover of a port into a bridge moves,
//! and the takeover and restore themselves. The checkpoint holds the backend's own encoding of
//! addresses, routes and rules (netlink messages); only the backend reads it
//! ([`UplinkNet::describe`]).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use virtwarden_policies::VerifyProbe;

use super::NetError;

/// Everything a takeover of `port` into `bridge` changes, as it was before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Ask `link` to resolve `addr` (an ARP request or NDP solicitation) and say whether the
    /// neighbour entry is confirmed reachable.
    fn neighbour_reachable(
        &self,
        link: &str,
        addr: IpAddr,
    ) -> impl std::future::Future<Output = Result<bool, NetError>> + Send;
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
