//! The engine's network task: one worker for bridges, ports, VM taps and forwarding. Netlink
//! link events and forwarding (netconf) notifications trigger it within milliseconds; the
//! resync and domain lifecycle events refresh its view of the domains' taps. Tap changes wait
//! while that view is stale; objects another writer keeps changing back are backed off.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio::time::Instant;
use virtwarden_policies::DesiredState;

use super::clock::sleep_until;
use super::{Msg, Shared};
use crate::act::network::{apply_net_actions, observe_net};
use crate::act::uplink::{observe_uplinks, restore_pending};
use crate::hostnet::uplink::UplinkNet;
use crate::hostnet::{Forwarding, HostNet};
use crate::observe::ObservedHost;
use crate::plan::flap::{tick_text, FlapDetector, FlapKey, FlapKind, FlapSettings, Verdict};
use crate::plan::network::{hold_tap_actions, plan_network, NetAction};
use crate::plan::restart::Tick;
use crate::plan::{Note, Severity};

/// Domains may have changed: all of them (resync, reload, reconnect) or one (its worker saw a
/// change), so the task refreshes its view of their taps. Network changes arrive on its own
/// netlink subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NetKick {
    AllDomains,
    Domain(String),
}

/// Retry delays for changes that did not stick.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Why tap changes wait.
const STALE: &str = "domain data is stale (libvirt disconnected); tap changes wait for it";

/// The domains as the network task knows them.
struct DomainView<'a> {
    host: &'a ObservedHost,
    /// False while libvirt is disconnected: a tap name may already belong to another domain.
    fresh: bool,
}

/// What one pass left behind.
struct PassResult {
    /// Drift still present that is not being backed off: retry soon.
    drift_left: bool,
    /// The earliest time (engine clock) a backed-off repair may go.
    wake_at: Option<Tick>,
}

pub struct NetworkTask {
    shared: Arc<Shared>,
    desired: watch::Receiver<Arc<DesiredState>>,
    kicks: UnboundedReceiver<NetKick>,
    domains: ObservedHost,
    flap: FlapDetector,
    /// The flap detector as last handed to the durable memory.
    remembered: serde_json::Value,
}

impl NetworkTask {
    pub(super) fn new(
        shared: Arc<Shared>,
        desired: watch::Receiver<Arc<DesiredState>>,
        kicks: UnboundedReceiver<NetKick>,
        flap: FlapSettings,
    ) -> Self {
        // A running backoff survives a restart: a writer that kept changing things back before
        // it is still expected to.
        let remembered = shared.memory.read(|m| m.network.clone());
        let mut detector = match serde_json::from_value::<FlapDetector>(remembered.clone()) {
            Ok(d) => d,
            Err(_) if remembered.is_null() => FlapDetector::default(),
            Err(e) => {
                tracing::warn!(%e, "the remembered network flap state is unreadable; starting afresh");
                FlapDetector::default()
            }
        };
        detector.set_settings(flap);
        // Only a backoff still running is carried across a restart (a reboot included).
        detector.resume(shared.tick());
        NetworkTask { shared, desired, kicks, domains: ObservedHost::default(), flap: detector, remembered }
    }

    /// Hand the flap detector's state to the durable memory when it changed.
    fn remember_flaps(&mut self) {
        let Ok(value) = serde_json::to_value(&self.flap) else { return };
        if value != self.remembered {
            self.shared.memory.update(|m| m.network = value.clone());
            self.remembered = value;
        }
    }

    /// Where domain data comes from and whether it is fresh: the domain workers' latest
    /// observations (see `refresh_domains`), fresh only while libvirt is connected.
    fn domain_view(&self) -> DomainView<'_> {
        DomainView { host: &self.domains, fresh: self.shared.hypervisor().is_some() }
    }

    /// Run on the given backends; `notifications` wake it (besides the engine's kicks) — any
    /// message counts, its content is only logged.
    pub async fn run_with<N: HostNet + UplinkNet, F: Forwarding, E: std::fmt::Debug>(
        mut self,
        net: N,
        fwd: F,
        mut notifications: UnboundedReceiver<E>,
    ) {
        // Before anything else: an uplink change interrupted by our own stop is undone.
        let restored = restore_pending(&net, &fwd, &*self.shared.memory).await;
        if !restored.is_empty() {
            self.shared.metrics.action("restore-uplink-checkpoint", true);
            self.shared.update_network(|s| {
                s.last_actions = restored
                    .iter()
                    .map(|r| format!("restored at start: uplink change {r} (interrupted by a stop)"))
                    .collect();
                s.last_action_at = Some(chrono::Utc::now());
            });
        }
        let mut retry: Option<Instant> = None;
        let mut delay = RETRY_MIN;
        loop {
            tokio::select! {
                k = self.kicks.recv() => match k {
                    Some(kick) => tracing::trace!(?kick, "network kick"),
                    None => return,
                },
                Some(ev) = notifications.recv() => tracing::trace!(?ev, "network notification"),
                _ = sleep_until(retry) => {}
            }
            // Coalesce a burst of notifications into one pass.
            while self.kicks.try_recv().is_ok() {}
            while notifications.try_recv().is_ok() {}
            self.refresh_domains();
            let started = std::time::Instant::now();
            let pass = self.reconcile(&net, &fwd).await;
            self.shared.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
            retry = None;
            if pass.drift_left {
                retry = Some(Instant::now() + delay);
                delay = (delay * 2).min(RETRY_MAX);
            } else {
                delay = RETRY_MIN;
            }
            if let Some(at) = pass.wake_at {
                let wake = self.shared.instant_at(at);
                retry = Some(retry.map_or(wake, |r| r.min(wake)));
            }
        }
    }

    /// Bring the domain view up to date from what the domain workers last observed (the
    /// network task never calls libvirt itself, so a hung libvirt call cannot stall it).
    /// Whether it is fresh is the connection's state (see `domain_view`).
    fn refresh_domains(&mut self) {
        self.domains =
            ObservedHost { domains: self.shared.domain_snapshots(), networks: self.shared.networks(), net: None };
    }

    /// One pass: observe, plan, act, read back.
    async fn reconcile<N: HostNet + UplinkNet, F: Forwarding>(&mut self, net: &N, fwd: &F) -> PassResult {
        let desired = self.desired.borrow().clone();
        let view = self.domain_view();
        let fresh = view.fresh;
        let mut host = view.host.clone();
        host.net = match observe_net(net, fwd).await {
            Ok(mut n) => {
                observe_uplinks(net, &mut n, &desired, &*self.shared.memory).await;
                Some(n)
            }
            Err(e) => {
                tracing::warn!(%e, "cannot observe the host network");
                return PassResult { drift_left: true, wake_at: None };
            }
        };
        let plan = |host: &ObservedHost| {
            let (mut actions, mut notes) = plan_network(&desired, host);
            if !fresh {
                hold_tap_actions(&mut actions, &mut notes, STALE);
            }
            (actions, notes)
        };
        let (planned, mut notes) = plan(&host);
        let now = self.shared.tick();
        let actions = self.admit(planned, now, &mut notes);
        let mut outcomes = Vec::new();
        if !actions.is_empty() {
            for a in &actions {
                self.shared.metrics.drift(a.kind.name());
                tracing::info!(subject = %a.subject, reason = %a.reason, action = a.kind.name(), "correcting network drift");
            }
            outcomes = apply_net_actions(net, fwd, &*self.shared.memory, &actions).await;
            for o in &outcomes {
                self.shared.metrics.action(o.action.kind.name(), o.error.is_none());
                if o.verification.as_ref().is_some_and(|v| v.rollback_millis.is_some()) {
                    self.shared.metrics.uplink_rollbacks.inc();
                }
                if o.error.is_none() {
                    self.repaired(&o.action, now);
                }
            }
            // Read back: what did not stick is reported with the attribute that differs.
            host.net = match observe_net(net, fwd).await {
                Ok(mut n) => {
                    observe_uplinks(net, &mut n, &desired, &*self.shared.memory).await;
                    Some(n)
                }
                Err(_) => None,
            };
        }
        let (mut left, mut left_notes) = plan(&host);
        // Backed-off objects are reported as conflicts, not retried as drift.
        left.retain(|a| match self.flap.wait_until(&a.flap_key(), now) {
            Some(until) => {
                left_notes.push(held_note(a, &a.flap_key(), until));
                false
            }
            None => true,
        });
        for a in &left {
            tracing::warn!(subject = %a.subject, still = %a.reason, "network change did not stick; retrying with backoff");
        }
        for key in self.flap.settle(now) {
            tracing::info!(object = %key, "no longer changed by another writer; repairs are immediate again");
        }
        self.remember_flaps();
        let flapping: Vec<String> = self.flap.flapping().iter().map(|r| r.line(now)).collect();
        let mut backed_off: BTreeMap<&str, usize> =
            [FlapKind::Bridge, FlapKind::Stp, FlapKind::Port, FlapKind::Tap, FlapKind::Forwarding]
                .iter()
                .map(|k| (k.as_str(), 0))
                .collect();
        for r in self.flap.flapping() {
            *backed_off.entry(r.key.kind.as_str()).or_default() += 1;
        }
        for (kind, n) in backed_off {
            self.shared.metrics.set_backed_off(kind, n);
        }
        let held = host.net.as_ref().map_or(0, |n| n.held_uplinks.len());
        self.shared.metrics.uplink_held.set(held as i64);
        *self.shared.net_snapshot.write().unwrap_or_else(|p| p.into_inner()) = host.net.clone();
        self.shared.update_network(|s| {
            if !outcomes.is_empty() {
                s.last_actions = outcomes
                    .iter()
                    .map(|o| match (&o.error, &o.verification) {
                        (None, Some(v)) => format!("ok: {} ({})", o.action.line(), v.detail),
                        (None, None) => format!("ok: {}", o.action.line()),
                        (Some(e), _) => format!("FAILED: {}: {e}", o.action.line()),
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
            s.flapping = flapping;
        });
        // Domains held back for a missing bridge can start once it exists.
        if !outcomes.is_empty() {
            let _ = self.shared.msg.send(Msg::KickAll);
        }
        PassResult { drift_left: !left.is_empty(), wake_at: self.flap.next_wakeup(now) }
    }

    /// The planned repairs that may go now; the others wait for their object's backoff and are
    /// noted.
    fn admit(&mut self, planned: Vec<NetAction>, now: Tick, notes: &mut Vec<Note>) -> Vec<NetAction> {
        planned
            .into_iter()
            .filter(|a| {
                let key = a.flap_key();
                match self.flap.drifted(&key, &a.flap_wanted(), now) {
                    Verdict::Repair => true,
                    Verdict::Wait { until } => {
                        tracing::debug!(subject = %a.subject, until = %tick_text(until), "repair held: another writer keeps changing it");
                        notes.push(held_note(a, &key, until));
                        false
                    }
                }
            })
            .collect()
    }

    /// Count a repair; warn when it shows another writer at work.
    fn repaired(&mut self, action: &NetAction, now: Tick) {
        let key = action.flap_key();
        if self.flap.repaired(&key, &action.flap_wanted(), now) {
            self.shared.metrics.writer_conflict(key.kind.as_str());
            let next = self.flap.wait_until(&key, now).map(tick_text);
            tracing::warn!(object = %key, ?next, "another writer keeps changing it back; backing off its repairs");
        }
    }
}

/// `br0: stp off, … → held: another writer keeps changing bridge br0 stp; next repair at …`.
fn held_note(a: &NetAction, key: &FlapKey, until: Tick) -> Note {
    Note {
        subject: a.subject.clone(),
        severity: Severity::Warning,
        message: format!(
            "{} → held: another writer keeps changing {key}; next repair at {}",
            a.reason,
            tick_text(until)
        ),
    }
}
