//! The engine's network task: one worker for bridges, ports, VM taps and forwarding. Netlink
//! link events and forwarding (netconf) notifications trigger it within milliseconds; the
//! resync and domain lifecycle events refresh its view of the domains' taps.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::watch;
use tokio::time::Instant;
use virtwarden_policies::DesiredState;

use super::{Msg, Shared};
use crate::act::network::{apply_net_actions, observe_net};
use crate::hostnet::events::spawn_listener;
use crate::hostnet::netlink::NetlinkHost;
use crate::hostnet::sysctl::ProcForwarding;
use crate::observe::ObservedHost;
use crate::plan::network::plan_network;

/// Domains may have changed: all of them (resync, reload, reconnect) or one (its worker saw a
/// change), so the task refreshes its view of their taps. Network changes arrive on its own
/// netlink subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NetKick {
    AllDomains,
    Domain(String),
}

/// Which domains to observe again before the next pass.
#[derive(Debug, Default)]
struct Refresh {
    all: bool,
    domains: std::collections::BTreeSet<String>,
}

impl Refresh {
    fn add(&mut self, kick: NetKick) {
        match kick {
            NetKick::AllDomains => self.all = true,
            NetKick::Domain(name) => {
                self.domains.insert(name);
            }
        }
    }
}

/// Retry delays for changes that did not stick.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub(super) struct NetworkTask {
    shared: Arc<Shared>,
    desired: watch::Receiver<Arc<DesiredState>>,
    kicks: UnboundedReceiver<NetKick>,
    domains: ObservedHost,
}

impl NetworkTask {
    pub(super) fn new(
        shared: Arc<Shared>,
        desired: watch::Receiver<Arc<DesiredState>>,
        kicks: UnboundedReceiver<NetKick>,
    ) -> Self {
        NetworkTask { shared, desired, kicks, domains: ObservedHost::default() }
    }

    pub(super) async fn run(mut self) {
        let net = match NetlinkHost::connect() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(%e, "no netlink: host-network reconciliation is off");
                return;
            }
        };
        let fwd = ProcForwarding::default();
        let (tx, mut events) = unbounded_channel();
        if let Err(e) = spawn_listener(tx) {
            tracing::warn!(%e, "no netlink notifications; the network is checked on resync only");
        }
        let mut retry: Option<Instant> = None;
        let mut delay = RETRY_MIN;
        let mut refresh = Refresh { all: true, ..Default::default() };
        loop {
            tokio::select! {
                k = self.kicks.recv() => match k {
                    Some(kick) => refresh.add(kick),
                    None => return,
                },
                Some(ev) = events.recv() => tracing::trace!(?ev, "netlink notification"),
                _ = sleep_until(retry) => {}
            }
            // Coalesce a burst of notifications into one pass.
            while let Ok(kick) = self.kicks.try_recv() {
                refresh.add(kick);
            }
            while events.try_recv().is_ok() {}
            if self.refresh_domains(&refresh).await {
                refresh = Refresh::default();
            }
            let started = std::time::Instant::now();
            let left = self.reconcile(&net, &fwd).await;
            self.shared.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
            if left {
                retry = Some(Instant::now() + delay);
                delay = (delay * 2).min(RETRY_MAX);
            } else {
                retry = None;
                delay = RETRY_MIN;
            }
        }
    }

    /// Bring the domain view up to date from what the domain workers last observed (the
    /// network task never calls libvirt itself, so a hung libvirt call cannot stall it).
    /// False while libvirt is disconnected: the view is stale.
    async fn refresh_domains(&mut self, _refresh: &Refresh) -> bool {
        self.domains =
            ObservedHost { domains: self.shared.domain_snapshots(), networks: self.shared.networks(), net: None };
        self.shared.hypervisor().is_some()
    }

    /// One pass: observe, plan, act, read back. Returns whether drift is left (retry later).
    async fn reconcile(&mut self, net: &NetlinkHost, fwd: &ProcForwarding) -> bool {
        let desired = self.desired.borrow().clone();
        let mut host = self.domains.clone();
        host.net = match observe_net(net, fwd).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(%e, "cannot observe the host network");
                return true;
            }
        };
        let (actions, notes) = plan_network(&desired, &host);
        let mut outcomes = Vec::new();
        if !actions.is_empty() {
            for a in &actions {
                self.shared.metrics.drift(a.kind.name());
                tracing::info!(subject = %a.subject, reason = %a.reason, action = a.kind.name(), "correcting network drift");
            }
            outcomes = apply_net_actions(net, fwd, &actions).await;
            for o in &outcomes {
                self.shared.metrics.action(o.action.kind.name(), o.error.is_none());
            }
            // Read back: what did not stick is reported with the attribute that differs.
            host.net = observe_net(net, fwd).await.ok();
        }
        let (left, left_notes) = plan_network(&desired, &host);
        for a in &left {
            tracing::warn!(subject = %a.subject, still = %a.reason, "network change did not stick; retrying with backoff");
        }
        *self.shared.net_snapshot.write().unwrap_or_else(|p| p.into_inner()) = host.net.clone();
        self.shared.update_network(|s| {
            if !outcomes.is_empty() {
                s.last_actions = outcomes
                    .iter()
                    .map(|o| match &o.error {
                        None => format!("ok: {}", o.action.line()),
                        Some(e) => format!("FAILED: {}: {e}", o.action.line()),
                    })
                    .collect();
                s.last_action_at = Some(chrono::Utc::now());
            }
            s.drift = left.iter().map(|a| a.line()).collect();
            s.notes = if left.is_empty() {
                left_notes.iter().map(|n| n.line()).collect()
            } else {
                notes.iter().map(|n| n.line()).collect()
            };
        });
        // Domains held back for a missing bridge can start once it exists.
        if !outcomes.is_empty() {
            let _ = self.shared.msg.send(Msg::KickAll);
        }
        !left.is_empty()
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
