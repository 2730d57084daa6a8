//! Observing and changing the host network for a plan: links and bridges through [`HostNet`],
//! forwarding through [`Forwarding`].

use std::time::Instant;

use serde::Serialize;

use crate::hostnet::{Forwarding, HostNet, NetError};
use crate::observe::{ForwardingState, ObservedNet, RaDefaultRoute};
use crate::plan::network::{NetAction, NetActionKind};

/// Read links, uplinks (default-route and global-address interfaces) and forwarding switches.
pub async fn observe_net<N: HostNet, F: Forwarding>(net: &N, fwd: &F) -> Result<ObservedNet, NetError> {
    let links = net.links().await?;
    let names = |indexes: Vec<u32>| -> Vec<String> {
        links.iter().filter(|l| indexes.contains(&l.index)).map(|l| l.name.clone()).collect()
    };
    let default_route = names(net.default_route_links().await?);
    let global_address = names(net.global_address_links().await?);
    let ra_default_route = names(net.ra_default_route_links().await?)
        .into_iter()
        .map(|name| RaDefaultRoute { accept_ra: fwd.accept_ra(&name).ok(), name })
        .collect();
    // A namespace without IPv6 has no ipv6 forwarding file: report it as unknown.
    let forwarding = ForwardingState { ipv4: fwd.ipv4().ok(), ipv6: fwd.ipv6().ok() };
    Ok(ObservedNet { links, forwarding, default_route, global_address, ra_default_route })
}

/// Carry out one network action.
pub async fn execute_net_action<N: HostNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    action: &NetAction,
) -> Result<(), NetError> {
    let subject = action.subject.as_str();
    match &action.kind {
        NetActionKind::CreateBridge => net.create_bridge(subject).await,
        NetActionKind::SetUp => net.set_up(subject).await,
        NetActionKind::SetStp { stp } => net.set_stp(subject, *stp).await,
        NetActionKind::Enslave { bridge } | NetActionKind::AttachTap { bridge, .. } => {
            net.enslave(subject, bridge).await
        }
        NetActionKind::SetAcceptRa { value } => fwd.set_accept_ra(subject, *value),
        NetActionKind::SetForwarding { family, on } => match family.as_str() {
            "ipv6" => fwd.set_ipv6(*on),
            _ => fwd.set_ipv4(*on),
        },
    }
}

/// What happened to one network action.
#[derive(Debug, Clone, Serialize)]
pub struct NetOutcome {
    pub action: NetAction,
    pub error: Option<String>,
    pub millis: u128,
}

/// Execute network actions in order, continuing past failures.
pub async fn apply_net_actions<N: HostNet, F: Forwarding>(net: &N, fwd: &F, actions: &[NetAction]) -> Vec<NetOutcome> {
    let mut out = Vec::with_capacity(actions.len());
    for action in actions {
        let started = Instant::now();
        let result = execute_net_action(net, fwd, action).await;
        let millis = started.elapsed().as_millis();
        match &result {
            Ok(()) => {
                tracing::info!(subject = %action.subject, action = action.kind.name(), millis, "network action done")
            }
            Err(e) => {
                tracing::warn!(subject = %action.subject, action = action.kind.name(), %e, "network action failed")
            }
        }
        out.push(NetOutcome { action: action.clone(), error: result.err().map(|e| e.to_string()), millis });
    }
    out
}
