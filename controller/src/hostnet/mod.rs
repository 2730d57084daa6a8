//! The host network behind two small traits: links and bridges over netlink ([`HostNet`]), and
//! IP forwarding through `/proc/sys` ([`Forwarding`]). Both act on the network namespace of the
//! calling process. The traits (and `uplink::UplinkNet`) are the core crate's
//! (`virtwarden_core::hostnet`); their implementations are here.

pub mod events;
pub mod icmp;
pub mod managers;
pub mod netlink;
pub mod nexthop;
pub mod sysctl;
pub mod uplink;

pub use virtwarden_core::hostnet::{Forwarding, HostNet, NetError};

/// Convert kernel centiseconds to whole seconds (rounded).
pub fn centis_to_secs(cs: u32) -> u32 {
    (cs + 50) / 100
}

/// The engine's host-network task on this namespace's netlink and `/proc/sys`, woken by netlink
/// notifications. The front ends hand it to the engine; the engine builds no backend itself.
pub fn netlink_runner() -> crate::engine::NetworkRunner {
    std::sync::Arc::new(|task: crate::engine::network::NetworkTask| {
        Box::pin(async move {
            let net = match netlink::NetlinkHost::connect() {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(%e, "no netlink: host-network reconciliation is off");
                    return;
                }
            };
            let (tx, notifications) = tokio::sync::mpsc::unbounded_channel();
            if let Err(e) = events::spawn_listener(tx) {
                tracing::warn!(%e, "no netlink notifications; the network is checked on resync only");
            }
            task.run_with(net, sysctl::ProcForwarding::default(), notifications).await;
        })
    })
}
