//! Observing and changing the host network for a plan: links and bridges through [`HostNet`],
//! forwarding through [`Forwarding`].

use std::time::Instant;

use serde::Serialize;

use super::uplink::{attach_port, give_back, set_forwarding, set_stp, take_over, TakeoverResult, UplinkJournal};
use crate::hostnet::uplink::UplinkNet;
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
    Ok(ObservedNet { links, forwarding, default_route, global_address, ra_default_route, ..Default::default() })
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
        // Guarded (a `guard`) only through apply_net_actions; alone it only sets.
        NetActionKind::SetStp { stp, .. } => net.set_stp(subject, *stp).await,
        // Guarded (a `guard`) only through apply_net_actions; alone it only attaches.
        NetActionKind::Enslave { bridge, .. } | NetActionKind::AttachTap { bridge, .. } => {
            net.enslave(subject, bridge).await
        }
        NetActionKind::SetAcceptRa { value } => fwd.set_accept_ra(subject, *value),
        // Runs through `take_over` (apply_net_actions); alone it only attaches the port.
        NetActionKind::TakeOverUplink { bridge, .. } => net.enslave(subject, bridge).await,
        // Needs the takeover's checkpoint: only through apply_net_actions.
        NetActionKind::ReleaseUplink { .. } => Ok(()),
        NetActionKind::SetForwarding { family, on, .. } => match family.as_str() {
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
    /// A guarded change's verification (uplink takeover or release, STP on an uplink bridge,
    /// forwarding): what decided, how long it took, the rollback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<TakeoverResult>,
}

/// Execute network actions in order, continuing past failures. Guarded changes — uplink
/// takeovers and releases, actions with a `guard` (STP, forwarding, a port attached to a bridge
/// that carries an uplink) — run as a transaction (checkpoint in
/// `journal`, verify, commit or roll back; see `act::uplink`).
pub async fn apply_net_actions<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    journal: &dyn UplinkJournal,
    actions: &[NetAction],
) -> Vec<NetOutcome> {
    let mut out = Vec::with_capacity(actions.len());
    // After a rollback that failed the host's network is in no known state: no further guarded
    // change is checkpointed or verified against it.
    let mut unknown_state = false;
    for action in actions {
        let started = Instant::now();
        let is_guarded = matches!(
            &action.kind,
            NetActionKind::TakeOverUplink { .. }
                | NetActionKind::ReleaseUplink { .. }
                | NetActionKind::SetStp { guard: Some(_), .. }
                | NetActionKind::SetForwarding { guard: Some(_), .. }
                | NetActionKind::Enslave { guard: Some(_), .. }
        );
        if unknown_state && is_guarded {
            let error = "not tried: an earlier rollback failed, the host's network is in no known state".to_string();
            tracing::warn!(subject = %action.subject, action = action.kind.name(), %error, "network action skipped");
            out.push(NetOutcome { action: action.clone(), error: Some(error), millis: 0, verification: None });
            continue;
        }
        let guarded = match &action.kind {
            NetActionKind::TakeOverUplink { bridge, takeover } => {
                Some(take_over(net, fwd, journal, &action.subject, bridge, takeover).await)
            }
            NetActionKind::ReleaseUplink { bridge, guard } => {
                Some(give_back(net, fwd, journal, &action.subject, bridge, guard).await)
            }
            NetActionKind::SetStp { stp, guard: Some(guard) } => {
                Some(set_stp(net, fwd, journal, &action.subject, *stp, guard).await)
            }
            NetActionKind::SetForwarding { family, on, guard: Some(guard) } => {
                Some(set_forwarding(net, fwd, journal, family, *on, guard).await)
            }
            NetActionKind::Enslave { bridge, guard: Some(guard) } => {
                Some(attach_port(net, fwd, journal, &action.subject, bridge, guard).await)
            }
            _ => None,
        };
        unknown_state |= guarded.as_ref().is_some_and(|r| r.rollback_failed);
        let (result, verification) = match guarded {
            Some(r) => (if r.verified { Ok(()) } else { Err(r.detail.clone()) }, Some(r)),
            None => (execute_net_action(net, fwd, action).await.map_err(|e| e.to_string()), None),
        };
        let millis = started.elapsed().as_millis();
        match &result {
            Ok(()) => {
                tracing::info!(subject = %action.subject, action = action.kind.name(), millis, "network action done")
            }
            Err(e) => {
                tracing::warn!(subject = %action.subject, action = action.kind.name(), %e, "network action failed")
            }
        }
        out.push(NetOutcome { action: action.clone(), error: result.err(), millis, verification });
    }
    out
}
