//! One task per managed domain: at most one action in flight for it, and a slow domain never
//! delays another. Every decision starts from a fresh observation of the domain.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use virtwarden_policies::{Backoff, DesiredState, ManagedDomain};

use super::Shared;
use crate::act::remediation::RemediationContext;
use crate::act::{execute_action, ActError};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::libvirt::events::LifecycleEvent;
use crate::observe::{DomainState, ObservedDomain, ObservedHost};
use crate::plan::restart::{Decision, Ladder, RestartTracker};
use crate::plan::{plan, Action, ActionKind};

/// Why a worker should look at its domain again.
#[derive(Debug, Default)]
pub(super) struct Kick {
    pub event: Option<LifecycleEvent>,
    pub clear_quarantine: bool,
}

impl Kick {
    fn merge(&mut self, other: Kick) {
        if other.event.is_some() {
            self.event = other.event;
        }
        self.clear_quarantine |= other.clear_quarantine;
    }
}

/// Retry delay after an observation failed (the connection manager handles lost connections).
const OBSERVE_RETRY: Duration = Duration::from_secs(1);

pub(super) struct Worker {
    shared: Arc<Shared>,
    managed: ManagedDomain,
    desired_one: DesiredState,
    tracker: RestartTracker,
    last_event: Option<String>,
    quarantine_logged: bool,
    rx: UnboundedReceiver<Kick>,
}

fn is_recovery(kind: &ActionKind) -> bool {
    matches!(kind, ActionKind::Start | ActionKind::Restart | ActionKind::Resume)
}

fn is_up(d: &ObservedDomain) -> bool {
    matches!(d.state, DomainState::Running | DomainState::Blocked)
}

impl Worker {
    pub(super) fn new(shared: Arc<Shared>, managed: ManagedDomain, rx: UnboundedReceiver<Kick>) -> Self {
        let spec = &managed.spec;
        let tracker =
            RestartTracker::new(Backoff::resolve(spec.backoff.as_ref()), Ladder::new(spec.remediation.as_deref()));
        let desired_one = DesiredState {
            policies: vec![managed.policy.clone()],
            domains: vec![managed.clone()],
            ..Default::default()
        };
        Worker { shared, managed, desired_one, tracker, last_event: None, quarantine_logged: false, rx }
    }

    fn name(&self) -> &str {
        &self.managed.spec.name
    }

    pub(super) async fn run(mut self) {
        let mut wake: Option<Instant> = None;
        loop {
            let mut kick = tokio::select! {
                k = self.rx.recv() => match k {
                    Some(k) => k,
                    None => break,
                },
                _ = sleep_until(wake) => Kick::default(),
            };
            while let Ok(more) = self.rx.try_recv() {
                kick.merge(more);
            }
            if kick.clear_quarantine {
                self.tracker.clear_quarantine();
                self.quarantine_logged = false;
            }
            if let Some(ev) = &kick.event {
                self.shared.metrics.event_lag_seconds.observe(ev.received.elapsed().as_secs_f64());
                if ev.is_down() {
                    self.last_event = Some(ev.text());
                }
            }
            let started = std::time::Instant::now();
            wake = self.reconcile().await;
            self.shared.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
        }
    }

    /// Run a blocking hypervisor call on the blocking pool, bounded by the engine's slots.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Hypervisor) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Option<Result<T, HypervisorError>> {
        let hv = self.shared.hypervisor()?;
        let _slot = self.shared.libvirt_slots.acquire().await.ok()?;
        match tokio::task::spawn_blocking(move || f(hv.as_ref())).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(domain = %self.name(), %e, "hypervisor call panicked");
                None
            }
        }
    }

    async fn observe(&self) -> Option<Result<Option<ObservedDomain>, HypervisorError>> {
        let name = self.name().to_string();
        self.blocking(move |hv| hv.observe_domain(&name)).await
    }

    /// Look at the domain, act if needed; returns when to look again on our own.
    async fn reconcile(&mut self) -> Option<Instant> {
        let observed = match self.observe().await? {
            Ok(o) => o,
            Err(e) => {
                self.shared.hypervisor_error(&e);
                self.shared.update_domain(self.name(), |s| s.notes = vec![format!("cannot observe: {e}")]);
                return Some(Instant::now() + OBSERVE_RETRY);
            }
        };
        // The network task's latest view (if it runs), so a start waits for a missing bridge.
        let host = ObservedHost {
            domains: observed.clone().into_iter().collect(),
            networks: vec![],
            net: self.shared.net_snapshot(),
        };
        let p = plan(&self.desired_one, &host);
        let state = observed.as_ref().map(ObservedDomain::state_text).unwrap_or_else(|| "not defined".into());
        let notes: Vec<String> = p.notes.iter().map(|n| n.line()).collect();
        self.shared.update_domain(self.name(), |s| {
            s.state = state.clone();
            s.notes = notes;
        });
        if observed.as_ref().is_some_and(is_up) {
            self.tracker.on_up();
        }
        let (recovery, others): (Vec<Action>, Vec<Action>) = p.actions.into_iter().partition(|a| is_recovery(&a.kind));
        for action in others {
            self.run_action(action).await;
        }
        match recovery.into_iter().next() {
            Some(action) => self.recover(action, observed).await,
            None => {
                self.refresh_tracker_status();
                None
            }
        }
    }

    async fn run_action(&self, action: Action) {
        self.shared.metrics.drift(action.kind.name());
        tracing::info!(domain = %self.name(), reason = %action.reason, action = action.kind.name(), "correcting drift");
        let a = action.clone();
        let result = self.blocking(move |hv| execute_with_retry(hv, &a).map_err(into_hv)).await;
        let ok = matches!(result, Some(Ok(())));
        self.shared.metrics.action(action.kind.name(), ok);
        let outcome = match result {
            Some(Ok(())) => "ok".to_string(),
            Some(Err(e)) => {
                self.shared.hypervisor_error(&e);
                tracing::warn!(domain = %self.name(), action = action.kind.name(), %e, "action failed");
                e.to_string()
            }
            None => "not attempted: disconnected".to_string(),
        };
        self.shared.update_domain(self.name(), |s| {
            s.last_action = Some(action.kind.verb());
            s.last_outcome = Some(outcome);
            s.last_action_at = Some(chrono::Utc::now());
        });
    }

    fn failure_text(&self, observed: Option<&ObservedDomain>) -> String {
        let state = observed.map(ObservedDomain::state_text).unwrap_or_else(|| "not defined".into());
        match &self.last_event {
            Some(ev) => format!("{ev}; {state}"),
            None => state,
        }
    }

    async fn recover(&mut self, action: Action, observed: Option<ObservedDomain>) -> Option<Instant> {
        let now = self.shared.tick();
        let decision = self.tracker.on_down(now, fastrand::f64());
        let failure = self.failure_text(observed.as_ref());
        match decision {
            Decision::WaitUntil(at) => {
                self.shared.update_domain(self.name(), |s| s.last_failure = Some(failure));
                self.refresh_tracker_status();
                Some(self.shared.instant_at(at))
            }
            Decision::Quarantined(reason) => {
                self.shared.update_domain(self.name(), |s| {
                    s.last_failure = Some(failure);
                    s.last_failure_at = Some(chrono::Utc::now());
                    self.write_tracker_fields(s);
                });
                if !self.quarantine_logged {
                    self.quarantine_logged = true;
                    tracing::warn!(domain = %self.name(), %reason, "quarantined: no more automatic restarts");
                }
                None
            }
            Decision::Act { step, attempt } => {
                self.shared.metrics.drift("domain-down");
                tracing::info!(domain = %self.name(), reason = %action.reason, step = step.action.as_str(), attempt, "restarting");
                let ctx = RemediationContext {
                    domain: self.name().to_string(),
                    uuid: observed.as_ref().map(|d| d.uuid.clone()).unwrap_or_default(),
                    reason: failure.clone(),
                    attempt,
                    step: step.clone(),
                    boot: self.managed.spec.boot.clone(),
                };
                let shared = self.shared.clone();
                let result = self
                    .blocking(move |hv| {
                        retry_transient(|| shared.remediations.run(&ctx, hv)).map_err(|e| HypervisorError::Failed {
                            op: "remediate",
                            domain: ctx.domain.clone(),
                            message: e.to_string(),
                        })
                    })
                    .await;
                let after = self.observe().await.and_then(Result::ok).flatten();
                let recovered = after.as_ref().is_some_and(is_up);
                let done = self.shared.tick();
                self.tracker.attempted(done, recovered, fastrand::f64());
                self.shared
                    .metrics
                    .restarts
                    .get_or_create(&super::metrics::DomainLabel { domain: self.name().to_string() })
                    .inc();
                self.shared.metrics.action(step.action.as_str(), recovered);
                let outcome = match (&result, recovered) {
                    (Some(Ok(())), true) => "ok: running again".to_string(),
                    (Some(Ok(())), false) => {
                        format!(
                            "did not come up: {}",
                            after.as_ref().map(ObservedDomain::state_text).unwrap_or_else(|| "gone".into())
                        )
                    }
                    (Some(Err(e)), _) => e.detail(),
                    (None, _) => "not attempted: disconnected".into(),
                };
                if recovered {
                    tracing::info!(domain = %self.name(), attempt, "running again");
                    self.last_event = None;
                } else {
                    tracing::warn!(domain = %self.name(), attempt, %outcome, "restart failed");
                }
                let state = after.as_ref().map(ObservedDomain::state_text).unwrap_or_else(|| "not defined".into());
                self.shared.update_domain(self.name(), |s| {
                    s.state = state;
                    s.last_failure = Some(failure);
                    s.last_failure_at = Some(chrono::Utc::now());
                    if !recovered {
                        s.last_error = Some(outcome.clone());
                    }
                    s.last_action = Some(format!("{} (attempt {attempt})", step.action.as_str()));
                    s.last_outcome = Some(outcome);
                    s.last_action_at = Some(chrono::Utc::now());
                    self.write_tracker_fields(s);
                });
                self.tracker.next_retry().map(|t| self.shared.instant_at(t))
            }
        }
    }

    fn refresh_tracker_status(&self) {
        self.shared.update_domain(self.name(), |s| self.write_tracker_fields(s));
    }

    /// Copy the crash-loop bookkeeping into a status entry (inside one status update, so
    /// readers never see the counters and the state disagree).
    fn write_tracker_fields(&self, s: &mut crate::engine::status::DomainStatus) {
        let t = &self.tracker;
        s.restarts = t.total_restarts;
        s.restarts_in_window = t.restarts_in_window() as u32;
        s.consecutive_failures = t.consecutive_failures();
        s.next_retry = t.next_retry().map(|at| self.shared.wall_clock_at(at));
        s.quarantined = t.quarantined().map(str::to_string);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn into_hv(e: ActError) -> HypervisorError {
    match e {
        ActError::Hypervisor(h) => h,
        other => HypervisorError::Failed { op: "act", domain: String::new(), message: other.to_string() },
    }
}

/// Transient libvirt errors (a held job lock, a timeout) are retried a few times with backoff.
fn retry_transient<T, E: std::fmt::Display + TransientCheck>(op: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    use backon::{BlockingRetryable, ExponentialBuilder};
    op.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(5)
            .with_jitter(),
    )
    .sleep(std::thread::sleep)
    .when(E::is_transient)
    .notify(|e, after| tracing::warn!(%e, ?after, "transient libvirt error; retrying"))
    .call()
}

/// Errors that know whether retrying soon may help.
pub(crate) trait TransientCheck {
    fn is_transient(&self) -> bool;
}

impl TransientCheck for ActError {
    fn is_transient(&self) -> bool {
        matches!(self, ActError::Hypervisor(h) if h.is_transient())
    }
}

impl TransientCheck for crate::act::remediation::RemediationError {
    fn is_transient(&self) -> bool {
        matches!(self, crate::act::remediation::RemediationError::Hypervisor(h) if h.is_transient())
    }
}

fn execute_with_retry(hv: &dyn Hypervisor, action: &Action) -> Result<(), ActError> {
    retry_transient(|| execute_action(hv, action))
}
