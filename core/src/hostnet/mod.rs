//! The host network's seams: links and bridges ([`HostNet`]), IP forwarding ([`Forwarding`]) and
//! uplink takeovers ([`uplink::UplinkNet`]). Their implementations (netlink, `/proc/sys`) live
//! in the `virtwarden` crate's `hostnet`; the engine and `act/` see only these traits. Each acts
//! on the network namespace of the calling process.

pub mod uplink;

use std::future::Future;

use crate::observe::{NetLink, StpSettings};

/// A failed network operation, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The backend's own error (netlink's), kept as the source.
    #[error("{op} {object}: {source}")]
    Netlink { op: &'static str, object: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{op} {object}: no such interface")]
    NoSuchLink { op: &'static str, object: String },
    #[error("{key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
    #[error("{op}: {source}")]
    Io { op: &'static str, source: std::io::Error },
}

/// Links and bridges.
pub trait HostNet: Send + Sync {
    /// Every link with its bridge attributes and master.
    fn links(&self) -> impl Future<Output = Result<Vec<NetLink>, NetError>> + Send;
    /// Indexes of the interfaces that carry a default route: IPv4 or IPv6, in any routing
    /// table, through every nexthop of a multipath route or a nexthop object (group).
    fn default_route_links(&self) -> impl Future<Output = Result<Vec<u32>, NetError>> + Send;
    /// Indexes of the interfaces carrying an IPv6 default route learned from router
    /// advertisements (`proto ra`), in any table.
    fn ra_default_route_links(&self) -> impl Future<Output = Result<Vec<u32>, NetError>> + Send;
    /// Indexes of the interfaces holding a global-scope address (IPv4 or IPv6).
    fn global_address_links(&self) -> impl Future<Output = Result<Vec<u32>, NetError>> + Send;
    fn create_bridge(&self, name: &str) -> impl Future<Output = Result<(), NetError>> + Send;
    fn set_up(&self, name: &str) -> impl Future<Output = Result<(), NetError>> + Send;
    fn set_stp(&self, bridge: &str, stp: StpSettings) -> impl Future<Output = Result<(), NetError>> + Send;
    /// Make `port` a port of `bridge`.
    fn enslave(&self, port: &str, bridge: &str) -> impl Future<Output = Result<(), NetError>> + Send;
}

/// IP forwarding of this network namespace, and the per-interface `accept_ra` that decides
/// whether an RA-learned default route survives IPv6 forwarding.
pub trait Forwarding: Send + Sync {
    fn ipv4(&self) -> Result<bool, NetError>;
    fn ipv6(&self) -> Result<bool, NetError>;
    fn set_ipv4(&self, on: bool) -> Result<(), NetError>;
    fn set_ipv6(&self, on: bool) -> Result<(), NetError>;
    /// `net.ipv6.conf.<iface>.accept_ra` (0, 1 or 2).
    fn accept_ra(&self, iface: &str) -> Result<u8, NetError>;
    fn set_accept_ra(&self, iface: &str, value: u8) -> Result<(), NetError>;
}
