//! One long-lived actor per managed domain: the only task that acts on it. It takes orders
//! (look again, a new policy, release the quarantine, stop) between actions; a new policy or a
//! stop cancels an action that can be abandoned (a graceful-shutdown wait, a hook) and waits
//! out one that cannot (a destroy-then-start). Every decision starts from a fresh observation,
//! and right before it acts the worker reads the state again and acts only if the planner,
//! given that state, still wants the same thing. Its crash-loop bookkeeping and what it
//! learns about the domain's intent go to the durable memory.

mod health;

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
use super::metrics::DriftLabel;
use super::network::NetKick;
use super::shared::Shared;
use super::startgate;
use super::status::DomainStatus;
use crate::act::calls::{CallError, Calls};
use crate::act::execute_action;
use crate::act::remediation::{RemediationContext, RemediationError, StepOutcome};
use crate::act::shutdown::graceful_shutdown_async;
use crate::hypervisor::events::GuestEvent;
use crate::hypervisor::events::LifecycleEvent;
use crate::hypervisor::HypervisorError;
use crate::memory::{intent_after, Intent, Memory};
use crate::observe::{DomainState, ObservedDomain, ObservedHost};
use crate::plan::flap::{tick_text, FlapDetector, FlapKey, FlapKind, Verdict};
use crate::plan::health::{ProbeResult, ProbeTicket, Verdict as HealthVerdict};
use crate::plan::restart::{Decision, Ladder, Outcome, RestartTracker};
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
        };
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
                let next = tokio::select! {
                    o = self.rx.recv() => o,
                    _ = sleep_until(wake) => Some(Order::Look { event: None, round: None }),
                    _ = sleep_until(health_wake) => Some(Order::HealthTick),
                };
                self.pending.push_back(next.unwrap_or(Order::Stop));
            }
            while let Ok(o) = self.rx.try_recv() {
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
                    let o = o.unwrap_or(Order::Stop);
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

    /// Correct configuration or state drift, unless another writer keeps undoing this
    /// correction: then it waits (doubling) and is reported instead of fought over. Returns when
    /// a held correction may go.
    async fn correct(&mut self, action: Action, observed: Option<&ObservedDomain>) -> Option<Instant> {
        let key = match action.kind {
            ActionKind::SetBootOrder { .. } => Some(FlapKey::new(FlapKind::BootOrder, self.name())),
            ActionKind::SetAutostart { .. } => Some(FlapKey::new(FlapKind::Autostart, self.name())),
            _ => None,
        };
        let Some(key) = key else {
            self.run_action(action, observed).await;
            return None;
        };
        let wanted = format!("{:?}", action.kind);
        if let Verdict::Wait { until } = self.flap.drifted(&key, &wanted, self.shared.tick()) {
            let note =
                format!("another writer keeps changing {key}: {} held until {}", action.kind.verb(), tick_text(until));
            self.shared.update_domain(self.name(), |s| s.notes.push(note));
            self.remember_flaps();
            return Some(self.shared.instant_at(until));
        }
        if self.run_action(action, observed).await && self.flap.repaired(&key, &wanted, self.shared.tick()) {
            tracing::warn!(domain = %self.name(), object = %key, "another writer keeps changing it; backing off");
            self.shared.metrics.writer_conflicts.get_or_create(&DriftLabel { kind: key.kind.as_str().into() }).inc();
        }
        self.remember_flaps();
        None
    }

    /// Forget objects that stayed put; keep status, the gauge and the memory in step. Returns
    /// when a backoff ends, so status is rewritten then (it never shows a past "next repair").
    fn settle_flaps(&mut self) -> Option<Instant> {
        let now = self.shared.tick();
        let calmed = self.flap.settle(now);
        for key in &calmed {
            tracing::info!(domain = %self.name(), object = %key, "no longer changed by another writer");
        }
        self.remember_flaps();
        self.flap.next_wakeup(now).map(|t| self.shared.instant_at(t))
    }

    fn remember_flaps(&mut self) {
        let now = self.shared.tick();
        let lines: Vec<String> = self.flap.flapping().iter().map(|r| r.line(now)).collect();
        let kinds: Vec<FlapKind> = self.flap.flapping().iter().map(|r| r.key.kind).collect();
        self.count_flapping(&kinds);
        let flap = (!self.flap.is_empty()).then(|| self.flap.clone());
        let saved = serde_json::to_value(&flap).ok();
        if saved != self.flap_saved {
            let name = self.name().to_string();
            let value = saved.clone().filter(|v| !v.is_null());
            self.shared.memory.update(|m| m.domains.entry(name).or_default().flap = value);
            self.flap_saved = saved;
        }
        self.shared.update_domain(self.name(), |s| s.flapping = lines);
    }

    /// Move this worker's share of the backed-off gauge to `kinds`.
    fn count_flapping(&mut self, kinds: &[FlapKind]) {
        for k in self.counted.iter().filter(|k| !kinds.contains(k)) {
            self.shared.metrics.backed_off.get_or_create(&DriftLabel { kind: k.as_str().into() }).dec();
        }
        for k in kinds.iter().filter(|k| !self.counted.contains(k)) {
            self.shared.metrics.backed_off.get_or_create(&DriftLabel { kind: k.as_str().into() }).inc();
        }
        self.counted = kinds.to_vec();
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

    async fn recover(&mut self, action: Action, observed: Option<ObservedDomain>) -> Option<Instant> {
        let now = self.shared.tick();
        let first = self.never_started && action.kind == ActionKind::Start && self.tracker.quarantine().is_none();
        let decision = if first {
            Decision::Act { step: crate::plan::restart::Step::start(), attempt: 1 }
        } else {
            self.tracker.on_down(now, fastrand::f64())
        };
        let failure = self.failure_text(observed.as_ref());
        match decision {
            Decision::WaitUntil(at) => self.back_off(at, failure),
            Decision::Quarantined(reason) => self.quarantined(&reason, failure, observed.as_ref()).await,
            Decision::Act { step, attempt } => {
                // Start ordering and the start slots (issue 13): the wait is no attempt, and a
                // stop or a new policy cancels it.
                let mut turn = None;
                if startgate::gates_start(&action.kind) {
                    let (gate, name) = (self.shared.startgate.clone(), self.name().to_string());
                    match self.guarded(true, async move { gate.wait_turn(&name).await }).await {
                        Some(startgate::Turn::Go(permit)) => turn = Some(permit),
                        _ => return Some(Instant::now()),
                    }
                }
                if let Err(changed) = self.still_wanted(&action, observed.as_ref()).await {
                    tracing::info!(domain = %self.name(), %changed, "state changed since observed; not restarting");
                    self.shared.update_domain(self.name(), |s| s.notes.push(format!("not restarted: {changed}")));
                    return Some(Instant::now() + OBSERVE_RETRY);
                }
                self.shared.metrics.drift("domain-down");
                if first {
                    tracing::info!(domain = %self.name(), reason = %action.reason, "starting (first start since libvirtd started; not a restart)");
                } else {
                    tracing::info!(domain = %self.name(), reason = %action.reason, step = step.action.as_str(), attempt, "restarting");
                }
                let kind = if first { Attempt::FirstStart } else { Attempt::Restart };
                let outcome = self.attempt(step, attempt, failure, observed.as_ref(), kind).await;
                if let Some(permit) = turn {
                    permit.finish(outcome == Outcome::Recovered);
                }
                self.look_again_after(outcome)
            }
        }
    }

    /// When to look again after an attempt: soon when it was interrupted (nothing is known),
    /// else when the backoff allows the next one.
    fn look_again_after(&self, outcome: Outcome) -> Option<Instant> {
        match outcome {
            Outcome::Interrupted => Some(Instant::now() + OBSERVE_RETRY),
            _ => self.tracker.next_retry().map(|t| self.shared.instant_at(t)),
        }
    }

    /// Backing off after `failure`: say so, look again at `at`.
    fn back_off(&mut self, at: crate::plan::restart::Tick, failure: String) -> Option<Instant> {
        self.remember();
        self.shared.update_domain(self.name(), |s| {
            s.last_failure = Some(failure);
            self.write_tracker_fields(s);
        });
        self.announce_backoff(at);
        Some(self.shared.instant_at(at))
    }

    /// A restart waits for backoff until `at`: logged once per wait, with its delay, and shown
    /// in status (`vm1: restart in 4 s, backoff after 3 restarts in 10m`).
    fn announce_backoff(&mut self, at: crate::plan::restart::Tick) {
        let wait = at.saturating_sub(self.shared.tick());
        let delay = match wait.as_millis() {
            ms if ms < 10_000 => format!("{:.1} s", wait.as_secs_f64()).replace(".0 s", " s"),
            _ => format!("{} s", wait.as_secs()),
        };
        let reset_after = Backoff::resolve(self.managed.spec.backoff.as_ref()).reset_after;
        let n = self.tracker.consecutive_failures();
        let text =
            format!("restart in {delay}, backoff after {n} restart{} in {reset_after}", if n == 1 { "" } else { "s" });
        if self.backoff_logged != Some(at) {
            self.backoff_logged = Some(at);
            tracing::info!(domain = %self.name(), delay_ms = wait.as_millis() as u64, "{}: {text}", self.name());
        }
        self.shared.update_domain(self.name(), |s| s.backoff = Some(text));
    }

    /// No more automatic repairs: remembered durably (logged once), probing stops, status says
    /// why. Nothing to look at again on our own.
    async fn quarantined(
        &mut self,
        reason: &str,
        failure: String,
        observed: Option<&ObservedDomain>,
    ) -> Option<Instant> {
        if !self.quarantine_logged {
            self.quarantine_logged = true;
            self.remember_durably().await;
            tracing::error!(domain = %self.name(), %reason, "quarantined: no more automatic repairs");
        }
        // Probing stops while quarantined (published before the quarantine itself).
        self.health_observed(observed);
        self.publish_health();
        self.shared.update_domain(self.name(), |s| {
            s.last_failure = Some(failure);
            s.last_failure_at.get_or_insert_with(chrono::Utc::now);
            self.write_tracker_fields(s);
        });
        None
    }

    /// Carry out one step of the ladder for `failure`: counted (durably) before it starts,
    /// cancellable if the step is, judged by observing the domain afterwards; status, metrics
    /// and memory follow. A step that brought QEMU up starts a new boot for health.
    async fn attempt(
        &mut self,
        step: crate::plan::restart::Step,
        attempt: u32,
        failure: String,
        observed: Option<&ObservedDomain>,
        kind: Attempt,
    ) -> Outcome {
        let (heal, first) = (kind == Attempt::Heal, kind == Attempt::FirstStart);
        // Counted before acting, so a crash of virtwarden cannot forget this restart.
        if !first {
            self.tracker.begin(self.shared.tick());
            self.remember_durably().await;
        }
        let ctx = RemediationContext {
            domain: self.name().to_string(),
            uuid: observed.map(|d| d.uuid.clone()).unwrap_or_default(),
            reason: failure.clone(),
            attempt,
            step: step.clone(),
            boot: self.managed.spec.boot.clone(),
        };
        let cancellable = self.shared.remediations.get(step.action).map(|r| r.cancellable()).unwrap_or(false);
        let shared = self.shared.clone();
        let calls = self.calls();
        let fut = async move {
            let r = shared.remediations.get(ctx.step.action)?;
            r.run(&ctx, &calls).await
        };
        let result = self.guarded(cancellable, fut).await;
        self.shared.hook_refused(self.name(), result.as_ref().and_then(|r| r.as_ref().err()));
        let looked = self.calls().observe(self.name()).await;
        let hung_after = matches!(&looked, Err(CallError::Hung { .. } | CallError::StillHung { .. }));
        if let Err(e) = &looked {
            self.stalled(Some(e));
        }
        let after = looked.ok().flatten();
        let recovered = after.as_ref().is_some_and(is_up);
        let (outcome, mut text) = classify(&result, recovered, after.as_ref(), heal);
        // Where operators look: a failed repair carries what diagnosis finds.
        let diagnosis = match (&result, outcome) {
            // A refused hook is its own, complete reason.
            (Some(Err(e)), _) if e.refused_hook().is_some() => None,
            (_, Outcome::Failed) if self.shared.explain.is_some() => self.explain(&text).await,
            _ => None,
        };
        if let Some(d) = &diagnosis {
            text = format!("{} failed: {d}", step.action.as_str());
        }
        let now = self.shared.tick();
        if !first {
            self.tracker.finish(now, outcome, fastrand::f64());
        } else if outcome == Outcome::Failed {
            // A first start that failed: what follows is a failure streak like any other.
            self.tracker.on_down(now, fastrand::f64());
            self.tracker.finish(now, outcome, fastrand::f64());
        }
        if first && outcome != Outcome::Interrupted {
            self.never_started = false;
        }
        self.remember();
        if outcome != Outcome::Interrupted {
            if !first {
                self.shared
                    .metrics
                    .restarts
                    .get_or_create(&super::metrics::DomainLabel { domain: self.name().to_string() })
                    .inc();
            }
            self.shared.metrics.action(step.action.as_str(), recovered);
        }
        match outcome {
            Outcome::Recovered if first => tracing::info!(domain = %self.name(), "started"),
            Outcome::Recovered => {
                tracing::info!(domain = %self.name(), attempt, "running again");
                self.last_event = None;
                if matches!(result, Some(Ok(StepOutcome::Done))) {
                    self.health_rebooted(step.action);
                }
            }
            Outcome::Failed => {
                tracing::warn!(domain = %self.name(), attempt, outcome = %text, "restart failed")
            }
            Outcome::Interrupted => {
                tracing::warn!(domain = %self.name(), attempt, outcome = %text, "restart interrupted; not counted")
            }
        }
        let state = match &after {
            _ if hung_after => "stalled".to_string(),
            Some(d) => d.state_text(),
            None => "not defined".into(),
        };
        self.shared.update_domain(self.name(), |s| {
            s.state = state;
            if !first {
                s.last_failure = Some(failure);
                s.last_failure_at = Some(chrono::Utc::now());
            }
            if outcome == Outcome::Failed {
                s.last_error = Some(text.clone());
                s.diagnosis = diagnosis;
            } else if outcome == Outcome::Recovered {
                s.diagnosis = None;
            }
            s.last_action = Some(match first {
                true => "start (first start)".to_string(),
                false => format!("{} (attempt {attempt})", step.action.as_str()),
            });
            s.last_outcome = Some(text);
            s.last_action_at = Some(chrono::Utc::now());
            self.write_tracker_fields(s);
        });
        self.publish_health();
        if outcome == Outcome::Failed {
            if let Some(at) = self.tracker.next_retry() {
                self.announce_backoff(at);
            }
        }
        outcome
    }

    /// Heal a running guest judged unhealthy or not booted: the same backoff, window and
    /// quarantine as a crash; the ladder's `start` becomes `reset` (see `health_step`). Acts
    /// only if, read again right before, the domain still runs and the verdict still stands.
    async fn heal(&mut self, observed: Option<ObservedDomain>) -> Option<Instant> {
        let verdict = self.verdict()?.clone();
        let failure = verdict.text();
        if matches!(verdict, HealthVerdict::BootFailed(_)) && self.health.as_ref().is_some_and(|h| h.adopted) {
            // Running before virtwarden watched it and never passed since: the probe itself may
            // be wrong. Report, don't reset.
            let note = format!(
                "{failure}: reported, not reset — the guest was already running when virtwarden began \
                 probing it and has never passed; check the probe (repairs start once it passes, or after its next start)"
            );
            tracing::warn!(domain = %self.name(), verdict = %failure, "not resetting a guest whose probe never passed since it was adopted");
            self.shared.update_domain(self.name(), |s| s.notes.push(note));
            return None;
        }
        let now = self.shared.tick();
        match self.tracker.on_down(now, fastrand::f64()) {
            Decision::WaitUntil(at) => self.back_off(at, failure),
            Decision::Quarantined(reason) => self.quarantined(&reason, failure, observed.as_ref()).await,
            Decision::Act { step, attempt } => {
                let step = health::health_step(
                    step,
                    self.managed.spec.remediation.is_some(),
                    self.tracker.consecutive_failures(),
                );
                match self.calls().state(self.name()).await {
                    Ok(Some((DomainState::Running | DomainState::Blocked, _))) => {}
                    other => {
                        let now = match other {
                            Ok(Some((st, reason))) => format!("now {} ({reason})", st.as_str()),
                            Ok(None) => "no longer defined".into(),
                            Err(e) => format!("cannot re-read its state: {e}"),
                        };
                        tracing::info!(domain = %self.name(), %now, "state changed since judged; not healing");
                        self.shared.update_domain(self.name(), |s| s.notes.push(format!("not healed: {now}")));
                        return Some(Instant::now() + OBSERVE_RETRY);
                    }
                }
                self.shared.metrics.drift(verdict.kind());
                tracing::info!(domain = %self.name(), verdict = %failure, step = step.action.as_str(), attempt, "healing");
                let outcome = self.attempt(step, attempt, failure, observed.as_ref(), Attempt::Heal).await;
                self.look_again_after(outcome)
            }
        }
    }

    /// Why the last repair failed, as `diagnose` finds it (read-only, bounded like any read).
    async fn explain(&self, error: &str) -> Option<String> {
        let explain = self.shared.explain.clone()?;
        let (name, error) = (self.name().to_string(), error.to_string());
        let found = self.calls().read("diagnose", move |hv| Ok(explain.explain(hv, &name, &error))).await;
        found.ok().flatten()
    }

    /// `virtwarden release`: lift the quarantine, keep it on disk, say what was done.
    async fn release(&mut self) -> String {
        let name = self.name().to_string();
        let reason = self.tracker.quarantined().map(str::to_string);
        if !self.tracker.release() {
            return format!("{name} is not quarantined");
        }
        self.quarantine_logged = false;
        self.remember_durably().await;
        tracing::info!(domain = %name, "quarantine released");
        self.refresh_tracker_status();
        format!("released {name} (was quarantined: {})", reason.unwrap_or_default())
    }

    fn refresh_tracker_status(&self) {
        self.shared.update_domain(self.name(), |s| self.write_tracker_fields(s));
    }

    /// Copy the crash-loop bookkeeping into a status entry (inside one status update, so
    /// readers never see the counters and the state disagree).
    fn write_tracker_fields(&self, s: &mut DomainStatus) {
        let t = &self.tracker;
        s.restarts = t.total_restarts();
        s.restarts_in_window = t.restarts_in_window() as u32;
        s.consecutive_failures = t.consecutive_failures();
        s.next_retry = t.next_retry().map(|at| self.shared.wall_clock_at(at));
        if s.next_retry.is_none() {
            s.backoff = None;
        }
        s.quarantined = t.quarantined().map(str::to_string);
        s.quarantined_since = t.quarantine().map(|q| self.shared.wall_clock_at(q.since));
    }
}

/// What an attempt is: a restart after a failure or stop, a repair of an unhealthy running
/// guest, or the first start of a domain never started since libvirtd started (not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Restart,
    Heal,
    FirstStart,
}

/// How an attempt ended, and the words for status.
/// `was_up`: the step acted on a running guest (a health repair), so "running afterwards" proves
/// nothing; only a step that was carried out counts.
fn classify(
    result: &Option<Result<StepOutcome, RemediationError>>,
    recovered: bool,
    after: Option<&ObservedDomain>,
    was_up: bool,
) -> (Outcome, String) {
    let now = || after.map(ObservedDomain::state_text).unwrap_or_else(|| "gone".into());
    match result {
        _ if recovered && !was_up => (Outcome::Recovered, "ok: running again".into()),
        Some(Ok(StepOutcome::Done)) if recovered => (Outcome::Recovered, "ok: running again, booting".into()),
        None => (Outcome::Interrupted, "cancelled: the policy changed or virtwarden is stopping".into()),
        Some(Ok(StepOutcome::LeftAlone(why))) => (Outcome::Interrupted, format!("left alone: {why}")),
        Some(Ok(StepOutcome::Done)) => (Outcome::Failed, format!("did not come up: {}", now())),
        Some(Err(e)) if e.is_interruption() => (Outcome::Interrupted, format!("interrupted: {e}")),
        Some(Err(e)) => (Outcome::Failed, e.detail()),
    }
}
