//! A worker's recoveries: restarting a domain that is down and healing a running guest judged
//! unhealthy, through the restart tracker's backoff, remediation ladder and quarantine; each
//! attempt counted durably before it starts and judged by observing the domain afterwards.

use tokio::time::Instant;
use virtwarden_policies::Backoff;

use super::super::startgate;
use super::super::status::DomainStatus;
use super::{health, is_up, Worker, OBSERVE_RETRY};
use crate::act::calls::CallError;
use crate::act::remediation::{RemediationContext, RemediationError, StepOutcome};
use crate::observe::{DomainState, ObservedDomain};
use crate::plan::health::Verdict as HealthVerdict;
use crate::plan::restart::{Decision, Outcome};
use crate::plan::{Action, ActionKind};

impl Worker {
    pub(super) async fn recover(&mut self, action: Action, observed: Option<ObservedDomain>) -> Option<Instant> {
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
                    .get_or_create(&super::super::metrics::DomainLabel { domain: self.name().to_string() })
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
    pub(super) async fn heal(&mut self, observed: Option<ObservedDomain>) -> Option<Instant> {
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
    pub(super) async fn release(&mut self) -> String {
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

    pub(super) fn refresh_tracker_status(&self) {
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
