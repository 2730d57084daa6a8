//! One long-lived actor per managed domain: the only task that acts on it. It takes orders
//! (look again, a new policy, release the quarantine, stop) between actions; a new policy or a
//! stop cancels an action that can be abandoned (a graceful-shutdown wait, a hook) and waits
//! out one that cannot (a destroy-then-start). Every decision starts from a fresh observation,
//! and right before it acts the worker reads the state again and acts only if the planner,
//! given that state, still wants the same thing. Its crash-loop bookkeeping and what it
//! learns about the domain's intent go to the durable memory.
//!
//! Here: the actor (orders, looks, acting on drift); `recovery` restarts and heals, `flap`
//! backs off repairs another writer keeps undoing, `health` drives the guest-health machine.

mod flap;
mod health;
mod recovery;

pub(crate) use health::conn_guest;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, WeakUnboundedSender};
use tokio::sync::oneshot;
use tokio::time::Instant;
use virtwarden_policies::{Backoff, DesiredState, ManagedDomain};

use super::clock::sleep_until;
use super::network::NetKick;
use super::shared::Shared;
use super::startgate;
use crate::act::calls::{CallError, Calls};
use crate::act::execute_action;
use crate::act::shutdown::graceful_shutdown_async;
use crate::hypervisor::events::GuestEvent;
use crate::hypervisor::events::LifecycleEvent;
use crate::hypervisor::HypervisorError;
use crate::memory::{intent_after, Intent, Memory};
use crate::observe::{DomainState, ObservedDomain, ObservedHost};
use crate::plan::flap::{FlapDetector, FlapKind};
use crate::plan::health::{ProbeResult, ProbeTicket};
use crate::plan::restart::{Ladder, RestartTracker};
use crate::plan::{plan_with, Action, ActionKind};

/// What a worker is told.
#[derive(Debug)]
pub(super) enum Order {
    /// Look at the domain again; `round` is a resync round to acknowledge.
    Look { event: Option<LifecycleEvent>, round: Option<u64> },
    /// The domain's policy (possibly unchanged) after a reload.
    Policy(Box<ManagedDomain>),
    /// Lift the quarantine; the reply says what was done.
    Release(oneshot::Sender<Result<String, String>>),
    /// The domain is no longer managed (or the engine stops).
    Stop,
    /// A health probe the worker started finished.
    Probed { ticket: ProbeTicket, result: ProbeResult },
    /// libvirt reported a guest event (reset, watchdog, I/O error, agent, control error).
    Guest(GuestEvent),
    /// The health machine's timer: poll it (no look at the domain needed).
    HealthTick,
}

/// Retry delay after an observation failed (lost connections are handled by reconnecting).
const OBSERVE_RETRY: Duration = Duration::from_secs(1);

pub(super) struct Worker {
    shared: Arc<Shared>,
    managed: ManagedDomain,
    desired_one: DesiredState,
    tracker: RestartTracker,
    calls: Calls,
    rx: UnboundedReceiver<Order>,
    pending: VecDeque<Order>,
    last_event: Option<String>,
    quarantine_logged: bool,
    stopping: bool,
    /// Backs off repairs of the boot order and autostart when another writer keeps undoing them.
    flap: FlapDetector,
    /// Which of those kinds this worker counts in the backed-off gauge.
    counted: Vec<FlapKind>,
    /// What the memory holds of `flap`, to write only changes.
    flap_saved: Option<serde_json::Value>,
    /// Guest health, for a policy with `health`.
    health: Option<health::GuestHealth>,
    /// This worker's own inbox (probe tasks report through it); weak, so the inbox still closes
    /// when the engine drops its end.
    tx: WeakUnboundedSender<Order>,
    /// libvirt said the domain started since the last look (a new boot, whoever started it).
    fresh_start: bool,
    /// An order since the last pass needs the domain looked at (not only health polled).
    look_needed: bool,
    /// The domain has been seen defined by this worker.
    seen: bool,
    /// First seen `shut off (unknown)` — never started since libvirtd started (host boot, first
    /// install, a new policy) — and not yet started by us: starting it is a start, not a
    /// restart (no failure, no count, no backoff step).
    never_started: bool,
    /// The backoff wait last logged (logged once per wait).
    backoff_logged: Option<crate::plan::restart::Tick>,
    /// Waiting in `run` for an order or a timer, nothing else to do (not counted as busy).
    parked: bool,
    /// Parked with a timer armed.
    parked_timer: bool,
}

fn is_recovery(kind: &ActionKind) -> bool {
    matches!(kind, ActionKind::Start | ActionKind::Restart | ActionKind::Resume)
}

fn is_up(d: &ObservedDomain) -> bool {
    matches!(d.state, DomainState::Running | DomainState::Blocked)
}

fn desired_one(managed: &ManagedDomain) -> DesiredState {
    DesiredState { policies: vec![managed.policy.clone()], domains: vec![managed.clone()], ..Default::default() }
}

fn tracker_for(shared: &Shared, managed: &ManagedDomain) -> RestartTracker {
    let spec = &managed.spec;
    let remembered = shared.memory.read(|m| m.domains.get(&spec.name).map(|d| d.restarts.clone()));
    RestartTracker::with_state(
        Backoff::resolve(spec.backoff.as_ref()),
        Ladder::new(spec.remediation.as_deref()),
        remembered.unwrap_or_default(),
        shared.tick(),
    )
}

fn into_hv(e: crate::act::ActError) -> HypervisorError {
    match e {
        crate::act::ActError::Hypervisor(h) => h,
        other => HypervisorError::Failed { op: "act", domain: String::new(), message: other.to_string() },
    }
}

impl Drop for Worker {
    /// A worker that ends is no longer work under way, nor are the orders it never took.
    fn drop(&mut self) {
        // Woken first: a timer it had armed is given back too.
        self.set_parked(false, false);
        self.set_parked(true, false);
        self.rx.close();
        while self.rx.try_recv().is_ok() {
            self.shared.busy_sub();
        }
    }
}

impl Worker {
    pub(super) fn new(
        shared: Arc<Shared>,
        managed: ManagedDomain,
        tx: UnboundedSender<Order>,
        rx: UnboundedReceiver<Order>,
    ) -> Self {
        let tracker = tracker_for(&shared, &managed);
        let lost = {
            let s = shared.clone();
            Arc::new(move |why: String| s.connection_lost(why))
        };
        let calls = Calls::new(shared.limits.clone(), lost);
        let remembered = shared.memory.read(|m| m.domains.get(&managed.spec.name).and_then(|d| d.flap.clone()));
        let mut flap: FlapDetector = remembered
            .and_then(|v| {
                serde_json::from_value(v)
                    .map_err(|e| tracing::warn!(domain = %managed.spec.name, %e, "the remembered flap state is unreadable; starting afresh"))
                    .ok()
            })
            .unwrap_or_default();
        flap.set_settings(shared.config.flap);
        flap.resume(shared.tick());
        let health = managed.spec.health.as_ref().map(|h| health::GuestHealth::new(&managed.spec.name, h));
        let w = Worker {
            health,
            tx: tx.downgrade(),
            fresh_start: false,
            look_needed: true,
            desired_one: desired_one(&managed),
            shared,
            managed,
            tracker,
            calls,
            rx,
            pending: VecDeque::new(),
            last_event: None,
            quarantine_logged: false,
            stopping: false,
            flap_saved: None,
            flap,
            counted: Vec::new(),
            seen: false,
            never_started: false,
            backoff_logged: None,
            parked: false,
            parked_timer: false,
        };
        // Busy until it first parks (see `Shared::activity`).
        w.shared.busy_add();
        w.refresh_tracker_status();
        w
    }

    fn name(&self) -> &str {
        &self.managed.spec.name
    }

    /// Calls over the current connection.
    fn calls(&self) -> Calls {
        self.calls.with_connection(self.shared.hypervisor())
    }

    pub(super) async fn run(&mut self) {
        let mut wake: Option<Instant> = None;
        loop {
            if self.pending.is_empty() && !self.stopping {
                let health_wake = self.health_wake();
                self.set_parked(true, wake.is_some() || health_wake.is_some());
                let next = tokio::select! {
                    o = self.rx.recv() => self.took(o),
                    _ = sleep_until(wake) => Some(Order::Look { event: None, round: None }),
                    _ = sleep_until(health_wake) => Some(Order::HealthTick),
                };
                self.set_parked(false, false);
                self.pending.push_back(next.unwrap_or(Order::Stop));
            }
            while let Ok(o) = self.rx.try_recv() {
                self.shared.busy_sub();
                self.pending.push_back(o);
            }
            let mut rounds = Vec::new();
            while let Some(o) = self.pending.pop_front() {
                if let Some(r) = self.absorb(o).await {
                    rounds.push(r);
                }
            }
            if self.stopping {
                self.ack(&rounds);
                self.count_flapping(&[]);
                // A last action may have published health after the domain was dropped.
                if self.health.take().is_some() {
                    self.shared.metrics.forget_health(self.name());
                    self.shared.set_healthy(self.name(), false);
                }
                return;
            }
            if std::mem::take(&mut self.look_needed) {
                let started = std::time::Instant::now();
                wake = self.reconcile(&rounds).await;
                self.shared.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
            } else {
                // Only health moved (a probe result, its timer, a guest event).
                if self.drive_health().await {
                    self.pending.push_back(Order::Look { event: None, round: None });
                }
            }
        }
    }

    /// Parked: waiting for an order or a timer with nothing else to do (the engine-idle signal).
    fn set_parked(&mut self, parked: bool, timer: bool) {
        if self.parked != parked {
            self.parked = parked;
            let timer = if parked { timer } else { std::mem::take(&mut self.parked_timer) };
            self.parked_timer = parked && timer;
            self.shared.park(parked, timer);
        }
    }

    /// An order taken from the inbox is no longer counted as work waiting to be taken.
    fn took(&self, o: Option<Order>) -> Option<Order> {
        if o.is_some() {
            self.shared.busy_sub();
        }
        o
    }

    /// Start again after a panic: what is remembered is the truth, in-memory state is not.
    pub(super) fn after_panic(&mut self, what: &str) {
        tracing::error!(domain = %self.name(), panic = %what, "domain worker panicked; restarting it");
        self.look_needed = true;
        self.shared.metrics.worker_panics.inc();
        self.tracker = tracker_for(&self.shared, &self.managed);
        self.shared.update_domain(self.name(), |s| {
            s.notes = vec![format!("internal error (worker restarted): {what}")];
        });
    }

    fn ack(&self, rounds: &[u64]) {
        for r in rounds {
            self.shared.ack_round(self.name(), *r);
        }
    }

    /// Take one order; returns a resync round to acknowledge after the next look.
    async fn absorb(&mut self, order: Order) -> Option<u64> {
        match order {
            Order::Look { event, round } => {
                self.look_needed = true;
                if let Some(ev) = event {
                    self.shared.metrics.event_lag_seconds.observe(ev.received.elapsed().as_secs_f64());
                    if ev.is_down() {
                        self.last_event = Some(ev.text());
                    }
                    if ev.is_started() {
                        self.fresh_start = true;
                    }
                    if ev.is_crash() {
                        // A guest panic is a guest fault like the others: a status line and a metric.
                        let line = format!("guest crashed ({})", ev.text());
                        self.shared.metrics.guest_event(self.name(), "crashed");
                        self.shared.update_domain(self.name(), |s| {
                            s.last_guest_event = Some(line);
                            s.last_guest_event_at = Some(chrono::Utc::now());
                        });
                    }
                }
                return round;
            }
            Order::Probed { ticket, result } => self.health_probed(ticket, result),
            Order::Guest(ev) => self.guest_event(ev),
            Order::HealthTick => {}
            Order::Policy(m) => {
                let m = *m;
                if m != self.managed {
                    tracing::info!(domain = %self.name(), "policy changed");
                    self.tracker.set_policy(
                        Backoff::resolve(m.spec.backoff.as_ref()),
                        Ladder::new(m.spec.remediation.as_deref()),
                    );
                    self.desired_one = desired_one(&m);
                    self.managed = m;
                    self.health_policy();
                }
                self.look_needed = true;
            }
            Order::Release(reply) => {
                self.look_needed = true;
                let _ = reply.send(Ok(self.release().await));
            }
            Order::Stop => self.stopping = true,
        }
        None
    }

    /// Run `fut` while still taking orders. A stop or a changed policy cancels a cancellable
    /// action (the future is dropped; hooks and shutdown waits end with it) and is kept for
    /// after a non-cancellable one. Resync rounds are acknowledged at once: the action
    /// observes the domain itself. `None`: cancelled.
    async fn guarded<T>(&mut self, cancellable: bool, fut: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return Some(r),
                o = self.rx.recv(), if !self.stopping => {
                    let o = self.took(o).unwrap_or(Order::Stop);
                    let interrupts = match &o {
                        Order::Stop => true,
                        Order::Policy(m) => **m != self.managed,
                        _ => false,
                    };
                    match o {
                        Order::Look { round: Some(r), event } => {
                            self.shared.ack_round(self.name(), r);
                            self.pending.push_back(Order::Look { event, round: None });
                        }
                        Order::Stop => {
                            self.stopping = true;
                        }
                        other => self.pending.push_back(other),
                    }
                    if interrupts && cancellable {
                        return None;
                    }
                }
            }
        }
    }

    /// This domain's remembered state as a memory the planner reads.
    fn memory_view(&self) -> Memory {
        let mut m = Memory::empty();
        let (domain, lost) = self.shared.memory.read(|all| (all.domains.get(self.name()).cloned(), all.lost.clone()));
        if let Some(d) = domain {
            m.domains.insert(self.name().to_string(), d);
        }
        m.lost = lost;
        m
    }

    fn plan_for(&self, observed: Option<&ObservedDomain>) -> crate::plan::Plan {
        let host = ObservedHost {
            domains: observed.cloned().into_iter().collect(),
            networks: self.shared.networks(),
            net: self.shared.net_snapshot(),
        };
        plan_with(&self.desired_one, &host, &self.memory_view())
    }

    /// Keep the tracker's state in the memory; returns the version to flush for.
    fn remember(&self) -> u64 {
        let state = self.tracker.state().clone();
        let name = self.name().to_string();
        self.shared.memory.update(|m| m.domains.entry(name).or_default().restarts = state).1
    }

    /// Keep the tracker's state and wait (bounded) until it is on disk.
    async fn remember_durably(&self) {
        let v = self.remember();
        if !self.shared.memory.flush(v, self.shared.config.memory_flush).await {
            tracing::warn!(domain = %self.name(), "restart record not yet on disk; going ahead");
        }
    }

    fn set_intent(&self, intent: Option<Intent>) {
        let name = self.name().to_string();
        self.shared.memory.update(|m| m.domains.entry(name).or_default().intent = intent);
    }

    /// Learn the intent from an observation (a deliberate stop, a migration, a start).
    fn remember_intent(&self, observed: Option<&ObservedDomain>) {
        let current = self.shared.memory.read(|m| m.intent(self.name()).cloned());
        let next = intent_after(current.as_ref(), observed, self.shared.tick());
        if next != current {
            if let Some(i) = &next {
                tracing::info!(domain = %self.name(), intent = %i.describe(), "remembering");
            }
            self.set_intent(next);
        }
    }

    /// Look at the domain, act if needed; returns when to look again on our own. Resync
    /// `rounds` are acknowledged once the domain has been looked at, before any action, so
    /// readiness never waits for a repair.
    async fn reconcile(&mut self, rounds: &[u64]) -> Option<Instant> {
        let calls = self.calls();
        let looked = calls.observe(self.name()).await;
        // Start ordering: announced before the round is acknowledged (see `StartGate::announce`).
        let seen = looked.as_ref().ok().and_then(Option::as_ref);
        let _may_start = self.shared.startgate.announce(self.name(), startgate::may_start(&self.managed, seen));
        self.ack(rounds);
        let observed = match looked {
            Ok(o) => {
                self.stalled(None);
                o
            }
            Err(e) => {
                let note = match &e {
                    CallError::Disconnected | CallError::ConnectionLost { .. } => {
                        "waiting for libvirt (disconnected)".to_string()
                    }
                    other => format!("cannot observe: {other}"),
                };
                self.stalled(Some(&e));
                self.shared.update_domain(self.name(), |s| s.notes = vec![note]);
                return match e {
                    CallError::Disconnected | CallError::ConnectionLost { .. } => None,
                    _ => Some(Instant::now() + OBSERVE_RETRY),
                };
            }
        };
        self.note_first_look(observed.as_ref());
        if self.shared.publish_domain(self.name(), observed.clone()) {
            self.shared.kick_network(NetKick::Domain(self.name().to_string()));
        }
        self.remember_intent(observed.as_ref());
        if observed.as_ref().is_some_and(is_up) {
            self.shared.rebuilt(self.name());
        }
        self.health_observed(observed.as_ref());
        self.drive_health().await;
        let p = self.plan_for(observed.as_ref());
        let state = observed.as_ref().map(ObservedDomain::state_text).unwrap_or_else(|| "not defined".into());
        let notes: Vec<String> = p.notes.iter().map(|n| n.line()).collect();
        let remembered = self.shared.memory.read(|m| m.intent(self.name()).map(Intent::describe));
        self.shared.update_domain(self.name(), |s| {
            s.state = state;
            s.notes = notes;
            s.remembered = remembered;
        });
        // Up but judged unhealthy is not the end of a failure streak.
        if observed.as_ref().is_some_and(is_up) && self.verdict().is_none() && self.tracker.on_up() {
            self.remember();
        }
        let (recovery, others): (Vec<Action>, Vec<Action>) = p.actions.into_iter().partition(|a| is_recovery(&a.kind));
        let mut wake: Option<Instant> = None;
        for action in others {
            if let Some(until) = self.correct(action, observed.as_ref()).await {
                wake = Some(wake.map_or(until, |w| w.min(until)));
            }
            if self.stopping || !self.pending.is_empty() {
                // Something changed meanwhile (a new policy, a stop): decide again.
                return Some(Instant::now());
            }
        }
        if let Some(until) = self.settle_flaps() {
            wake = Some(wake.map_or(until, |w| w.min(until)));
        }
        let again = match recovery.into_iter().next() {
            Some(action) => self.recover(action, observed).await,
            None if self.verdict().is_some() && observed.as_ref().is_some_and(is_up) => self.heal(observed).await,
            None => {
                self.refresh_tracker_status();
                None
            }
        };
        match (wake, again) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Report the domain `stalled` while a libvirt call about it hangs (`e` is the error of the
    /// last look); the state libvirt last reported is unknown meanwhile. Cleared by a look that
    /// got an answer.
    fn stalled(&self, e: Option<&CallError>) {
        let hung = matches!(e, Some(CallError::Hung { .. } | CallError::StillHung { .. }));
        let was =
            self.shared.book.lock().unwrap_or_else(|p| p.into_inner()).get(self.name()).map(|s| s.stalled.is_some());
        match (hung, e) {
            (true, Some(e)) => {
                let reason = e.to_string();
                if was == Some(false) {
                    tracing::warn!(domain = %self.name(), %reason, "stalled: a libvirt call about this domain does not return");
                }
                self.shared.update_domain(self.name(), |s| {
                    s.state = "stalled".into();
                    s.stalled = Some(reason);
                    s.stalled_since.get_or_insert_with(chrono::Utc::now);
                });
            }
            _ if was == Some(true) && e.is_none() => {
                tracing::info!(domain = %self.name(), "no longer stalled: libvirt answers again");
                self.shared.update_domain(self.name(), |s| {
                    s.stalled = None;
                    s.stalled_since = None;
                });
            }
            _ => {}
        }
    }

    /// Act only on what still holds: read the state again and ask the planner whether, with
    /// that state, it still wants an action of this kind (any recovery, for recoveries).
    async fn still_wanted(&self, action: &Action, observed: Option<&ObservedDomain>) -> Result<(), String> {
        let Some(observed) = observed else {
            return Err("not defined".into());
        };
        let fresh = match self.calls().state(self.name()).await {
            Ok(Some(st)) => st,
            Ok(None) => return Err("no longer defined".into()),
            Err(e) => return Err(format!("cannot re-read its state: {e}")),
        };
        let mut now = observed.clone();
        (now.state, now.reason) = fresh;
        let p = self.plan_for(Some(&now));
        let same = |a: &Action| {
            if is_recovery(&action.kind) {
                is_recovery(&a.kind)
            } else {
                a.kind == action.kind
            }
        };
        if p.actions.iter().any(same) {
            Ok(())
        } else {
            Err(format!("now {}", now.state_text()))
        }
    }

    /// Carry out one action; true when it worked.
    async fn run_action(&mut self, action: Action, observed: Option<&ObservedDomain>) -> bool {
        // Stops for `state: stopped` go in reverse start order (issue 13).
        if startgate::gates_stop(&action.kind) {
            let (gate, name) = (self.shared.startgate.clone(), self.name().to_string());
            if self.guarded(true, async move { gate.wait_stop_turn(&name).await }).await != Some(true) {
                return false;
            }
        }
        if let Err(changed) = self.still_wanted(&action, observed).await {
            tracing::info!(domain = %self.name(), action = action.kind.name(), %changed, "state changed since observed; not acting");
            self.shared.update_domain(self.name(), |s| {
                s.notes.push(format!("{} not done: {changed}", action.kind.verb()));
            });
            return false;
        }
        self.shared.metrics.drift(action.kind.name());
        tracing::info!(domain = %self.name(), reason = %action.reason, action = action.kind.name(), "correcting drift");
        let calls = self.calls();
        let name = self.name().to_string();
        let result = match action.kind.clone() {
            ActionKind::Shutdown { timeout } => {
                self.guarded(true, graceful_shutdown_async(calls, name, timeout.as_std())).await
            }
            _ => {
                let a = action.clone();
                let fut =
                    async move { calls.act(a.kind.name(), move |hv| execute_action(hv, &a).map_err(into_hv)).await };
                self.guarded(false, fut).await
            }
        };
        let ok = matches!(result, Some(Ok(())));
        self.shared.metrics.action(action.kind.name(), ok);
        if ok && matches!(action.kind, ActionKind::Shutdown { .. } | ActionKind::Destroy) {
            // Our own stop, for `state: stopped`: not an admin's, should the policy change.
            self.set_intent(Some(Intent::StoppedByPolicy { at: self.shared.tick() }));
        }
        let outcome = match result {
            Some(Ok(())) => "ok".to_string(),
            Some(Err(e)) => {
                tracing::warn!(domain = %self.name(), action = action.kind.name(), %e, "action failed");
                e.to_string()
            }
            None => "cancelled: the policy changed or virtwarden is stopping".to_string(),
        };
        self.shared.update_domain(self.name(), |s| {
            s.last_action = Some(action.kind.verb());
            s.last_outcome = Some(outcome);
            s.last_action_at = Some(chrono::Utc::now());
        });
        ok
    }

    fn failure_text(&self, observed: Option<&ObservedDomain>) -> String {
        let state = observed.map(ObservedDomain::state_text).unwrap_or_else(|| "not defined".into());
        match &self.last_event {
            Some(ev) => format!("{ev}; {state}"),
            None => state,
        }
    }

    /// Whether the domain was never started since libvirtd started: `shut off (unknown)` when
    /// first seen, with no failure streak remembered; ends once it is seen in any other state.
    fn note_first_look(&mut self, observed: Option<&ObservedDomain>) {
        let never_started = observed
            .is_some_and(|d| d.state == DomainState::ShutOff && d.reason == crate::observe::StateReason::Unknown);
        if !self.seen && observed.is_some() {
            self.seen = true;
            self.never_started = never_started && self.tracker.state().down_since.is_none();
        } else if !never_started {
            self.never_started = false;
        }
    }
}
