//! Crash-loop protection as a pure state machine: when a domain that should run is down, decide
//! whether to act now, wait (backoff), or stop trying (quarantine), and which remediation step
//! of the ladder to use. Time is passed in, so tests can assert the exact schedule.
//!
//! The first restart after a healthy run is immediate. A failure within `resetAfter` of the
//! last restart waits `initialDelay`, doubling up to `maxDelay` (plus jitter). More than
//! `maxRestarts` restarts within `window` quarantines the domain until `virtwarden release`.
//! Unlike KubeVirt, this also catches loops where the guest runs for a while and then crashes:
//! the count only resets after `resetAfter` of healthy uptime. The state is plain data
//! ([`TrackerState`]) so the engine can remember it across restarts.

use std::time::Duration;

use serde::Serialize;
use virtwarden_policies::{BackoffSettings, RemediationAction, RemediationStep, DEFAULT_EXEC_TIMEOUT};

pub use crate::memory::model::Tick;
use crate::memory::model::{Quarantine, TrackerState};

/// What to do about a domain that is down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Carry out `step` now; `attempt` counts from 1 within this failure streak.
    Act { step: Step, attempt: u32 },
    /// Backing off: look again at this time.
    WaitUntil(Tick),
    /// No more automatic restarts; the reason says why.
    Quarantined(String),
}

/// A resolved remediation step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub action: RemediationAction,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(skip)]
    pub timeout: Duration,
}

impl Step {
    pub fn start() -> Self {
        Step { action: RemediationAction::Start, command: Vec::new(), timeout: DEFAULT_EXEC_TIMEOUT.as_std() }
    }
}

/// The remediation ladder of one domain (default: `start` only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ladder(Vec<(u32, Step)>);

impl Ladder {
    pub fn new(steps: Option<&[RemediationStep]>) -> Self {
        let steps: Vec<(u32, Step)> = steps
            .unwrap_or_default()
            .iter()
            .map(|s| {
                (
                    s.after.unwrap_or(0),
                    Step {
                        action: s.action,
                        command: s.command.clone().unwrap_or_default(),
                        timeout: s.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT).as_std(),
                    },
                )
            })
            .collect();
        if steps.is_empty() {
            Ladder(vec![(0, Step::start())])
        } else {
            Ladder(steps)
        }
    }

    /// The step for `failures` consecutive failures: the last one whose `after` ≤ failures.
    /// Failures below the first step's `after` use the first step.
    pub fn pick(&self, failures: u32) -> &Step {
        let mut chosen = &self.0[0].1;
        for (after, step) in &self.0 {
            if *after <= failures {
                chosen = step;
            }
        }
        chosen
    }
}

/// How a restart attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Observed running again.
    Recovered,
    /// Still down (or the step failed).
    Failed,
    /// Not a real attempt: the connection to libvirt was lost or the call never returned, so
    /// nothing is known. It does not count, neither as a restart nor as a failure.
    Interrupted,
}

/// Per-domain restart bookkeeping: the policy's settings and ladder plus the remembered state.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    settings: BackoffSettings,
    ladder: Ladder,
    state: TrackerState,
}

impl RestartTracker {
    pub fn new(settings: BackoffSettings, ladder: Ladder) -> Self {
        RestartTracker { settings, ladder, state: TrackerState::default() }
    }

    /// Resume from remembered state. Times from a clock that has since jumped backwards are
    /// clamped to `now`, so a clock change cannot stall a domain for long.
    pub fn with_state(settings: BackoffSettings, ladder: Ladder, mut state: TrackerState, now: Tick) -> Self {
        for t in state.restarts.iter_mut() {
            *t = (*t).min(now);
        }
        state.last_restart = state.last_restart.map(|t| t.min(now));
        state.down_since = state.down_since.map(|t| t.min(now));
        let max_wait = now.saturating_add(settings.max_delay.as_std().saturating_mul(2));
        state.next_allowed = state.next_allowed.map(|t| t.min(max_wait));
        RestartTracker { settings, ladder, state }
    }

    /// The policy changed: new settings and ladder, same history.
    pub fn set_policy(&mut self, settings: BackoffSettings, ladder: Ladder) {
        self.settings = settings;
        self.ladder = ladder;
    }

    /// The state to remember.
    pub fn state(&self) -> &TrackerState {
        &self.state
    }

    /// The backoff before attempt number `n` of a streak (`n` ≥ 1), before jitter.
    pub fn delay(&self, n: u32) -> Duration {
        let initial = self.settings.initial_delay.as_std();
        let max = self.settings.max_delay.as_std();
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(31));
        initial.saturating_mul(factor).min(max)
    }

    fn prune(&mut self, now: Tick) {
        let window = self.settings.window.as_std();
        while self.state.restarts.front().is_some_and(|t| now.saturating_sub(*t) >= window) {
            self.state.restarts.pop_front();
        }
    }

    fn schedule_retry(&mut self, now: Tick, jitter: f64) {
        let base = self.delay(self.state.consecutive);
        let extra = base.mul_f64(jitter.clamp(0.0, 1.0) * 0.1);
        self.state.next_allowed = Some(now.saturating_add(base).saturating_add(extra));
    }

    /// The domain should run and is down. `jitter` in [0, 1) spreads retries by up to 10 %.
    pub fn on_down(&mut self, now: Tick, jitter: f64) -> Decision {
        if let Some(q) = &self.state.quarantine {
            return Decision::Quarantined(q.reason.clone());
        }
        if self.state.down_since.is_none() {
            self.state.down_since = Some(now);
            let reset_after = self.settings.reset_after.as_std();
            let healthy = self.state.last_restart.is_none_or(|t| now.saturating_sub(t) >= reset_after);
            if healthy {
                self.state.consecutive = 0;
                self.state.next_allowed = None;
            } else {
                self.state.consecutive = self.state.consecutive.saturating_add(1);
                self.schedule_retry(now, jitter);
            }
        }
        if let Some(t) = self.state.next_allowed {
            if now < t {
                return Decision::WaitUntil(t);
            }
        }
        self.prune(now);
        if self.state.restarts.len() as u32 >= self.settings.max_restarts {
            let reason = format!(
                "{} restarts within {}; more would exceed backoff.maxRestarts (fix the cause, then `virtwarden release`)",
                self.state.restarts.len(),
                self.settings.window
            );
            self.state.quarantine = Some(Quarantine { reason: reason.clone(), since: now });
            self.state.next_allowed = None;
            return Decision::Quarantined(reason);
        }
        Decision::Act { step: self.ladder.pick(self.state.consecutive).clone(), attempt: self.state.consecutive + 1 }
    }

    /// A restart is being issued at `now`: it counts from here, so a crash of virtwarden in the
    /// middle of it cannot forget it.
    pub fn begin(&mut self, now: Tick) {
        self.state.restarts.push_back(now);
        self.state.last_restart = Some(now);
        self.state.total_restarts = self.state.total_restarts.saturating_add(1);
    }

    /// The attempt begun last ended at `now`.
    pub fn finish(&mut self, now: Tick, outcome: Outcome, jitter: f64) {
        match outcome {
            Outcome::Recovered => {
                self.state.down_since = None;
                self.state.next_allowed = None;
            }
            Outcome::Failed => {
                self.state.consecutive = self.state.consecutive.saturating_add(1);
                self.schedule_retry(now, jitter);
            }
            Outcome::Interrupted => {
                self.state.restarts.pop_back();
                self.state.last_restart = self.state.restarts.back().copied();
                self.state.total_restarts = self.state.total_restarts.saturating_sub(1);
            }
        }
    }

    /// A restart attempted at `now`; `recovered` says whether re-observing found it running.
    pub fn attempted(&mut self, now: Tick, recovered: bool, jitter: f64) {
        self.begin(now);
        self.finish(now, if recovered { Outcome::Recovered } else { Outcome::Failed }, jitter);
    }

    /// The domain was seen running (by us or someone else): the down streak ends. True when
    /// something changed (worth remembering).
    pub fn on_up(&mut self) -> bool {
        let changed = self.state.down_since.is_some() || self.state.next_allowed.is_some();
        self.state.down_since = None;
        self.state.next_allowed = None;
        changed
    }

    /// Lift a quarantine (`virtwarden release`): the streak and the window start afresh, the
    /// lifetime count stays. False when there was none.
    pub fn release(&mut self) -> bool {
        self.state.release().is_some()
    }

    pub fn quarantine(&self) -> Option<&Quarantine> {
        self.state.quarantine.as_ref()
    }

    pub fn quarantined(&self) -> Option<&str> {
        self.state.quarantine.as_ref().map(|q| q.reason.as_str())
    }

    pub fn next_retry(&self) -> Option<Tick> {
        self.state.next_allowed
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.state.consecutive
    }

    pub fn restarts_in_window(&self) -> usize {
        self.state.restarts.len()
    }

    pub fn total_restarts(&self) -> u32 {
        self.state.total_restarts
    }
}

#[cfg(test)]
mod tests {
    use virtwarden_policies::Duration as PD;

    use super::*;

    fn s(secs: u64) -> Tick {
        Duration::from_secs(secs)
    }
    fn ms(v: u64) -> Tick {
        Duration::from_millis(v)
    }

    fn tracker(max_restarts: u32) -> RestartTracker {
        RestartTracker::new(
            BackoffSettings {
                initial_delay: PD::from_secs(1),
                max_delay: PD::from_secs(8),
                reset_after: PD::from_secs(600),
                max_restarts,
                window: PD::from_secs(3600),
            },
            Ladder::new(None),
        )
    }

    /// Drive a run-then-crash loop: the domain comes up every time and crashes `uptime` later.
    fn crash_loop(t: &mut RestartTracker, crashes: usize, uptime: Tick) -> Vec<Result<Tick, String>> {
        let mut now = s(100);
        let mut out = Vec::new();
        for _ in 0..crashes {
            loop {
                match t.on_down(now, 0.0) {
                    Decision::Act { .. } => {
                        t.attempted(now, true, 0.0);
                        out.push(Ok(now));
                        break;
                    }
                    Decision::WaitUntil(at) => now = at,
                    Decision::Quarantined(r) => {
                        out.push(Err(r));
                        return out;
                    }
                }
            }
            now += uptime;
        }
        out
    }

    #[test]
    fn first_restart_after_healthy_run_is_immediate_then_doubles_to_max() {
        let mut t = tracker(100);
        let times = crash_loop(&mut t, 7, s(5));
        let times: Vec<u64> = times.into_iter().map(|r| r.unwrap().as_secs()).collect();
        // crash at 100 → now; 105 → +1s; 111 → +2s; 118 → +4s; 127 → +8s; 140 → +8s (max); 153 → +8s
        assert_eq!(times, [100, 106, 113, 122, 135, 148, 161]);
    }

    #[test]
    fn healthy_uptime_resets_the_streak() {
        let mut t = tracker(100);
        let times = crash_loop(&mut t, 3, s(700));
        let times: Vec<u64> = times.into_iter().map(|r| r.unwrap().as_secs()).collect();
        assert_eq!(times, [100, 800, 1500], "every crash after 10m of uptime is restarted at once");
        assert_eq!(t.consecutive_failures(), 0);
    }

    #[test]
    fn more_than_max_restarts_in_window_quarantines_until_cleared() {
        let mut t = tracker(3);
        let out = crash_loop(&mut t, 10, s(1));
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 3);
        let reason = out.last().unwrap().clone().unwrap_err();
        assert!(reason.starts_with("3 restarts within 1h"), "{reason}");
        assert!(matches!(t.on_down(s(5000), 0.0), Decision::Quarantined(_)), "stays quarantined");
        t.release();
        assert!(matches!(t.on_down(s(5001), 0.0), Decision::Act { attempt: 1, .. }));
    }

    #[test]
    fn window_slides() {
        let mut t = tracker(2);
        assert!(matches!(t.on_down(s(0), 0.0), Decision::Act { .. }));
        t.attempted(s(0), true, 0.0);
        assert!(matches!(t.on_down(s(3000), 0.0), Decision::Act { .. }));
        t.attempted(s(3000), true, 0.0);
        // Third restart at 3700: the one at 0 has left the 1h window; healthy uptime also passed.
        assert!(matches!(t.on_down(s(3700), 0.0), Decision::Act { attempt: 1, .. }));
    }

    #[test]
    fn failed_start_attempts_back_off_and_walk_the_ladder() {
        let steps = vec![
            RemediationStep { action: RemediationAction::Start, after: None, command: None, timeout: None },
            RemediationStep { action: RemediationAction::DestroyStart, after: Some(2), command: None, timeout: None },
            RemediationStep {
                action: RemediationAction::Exec,
                after: Some(3),
                command: Some(vec!["/bin/fix".into()]),
                timeout: Some(PD::from_secs(5)),
            },
        ];
        let mut t = tracker(100);
        t.ladder = Ladder::new(Some(&steps));
        let mut now = ms(0);
        let mut seen = Vec::new();
        for _ in 0..5 {
            let (step, attempt) = loop {
                match t.on_down(now, 0.0) {
                    Decision::Act { step, attempt } => break (step, attempt),
                    Decision::WaitUntil(at) => now = at,
                    Decision::Quarantined(r) => panic!("{r}"),
                }
            };
            seen.push((now.as_millis(), attempt, step.action.as_str()));
            t.attempted(now, false, 0.0);
        }
        assert_eq!(
            seen,
            [(0, 1, "start"), (1000, 2, "start"), (3000, 3, "destroy-start"), (7000, 4, "exec"), (15000, 5, "exec"),]
        );
    }

    #[test]
    fn jitter_adds_at_most_ten_percent() {
        let mut t = tracker(100);
        t.on_down(s(0), 0.0);
        t.attempted(s(0), true, 0.0);
        match t.on_down(s(1), 0.999) {
            Decision::WaitUntil(at) => assert!(at > s(2) && at < ms(2101), "{at:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn waiting_does_not_count_as_another_failure() {
        let mut t = tracker(100);
        t.on_down(s(0), 0.0);
        t.attempted(s(0), true, 0.0);
        let first = t.on_down(s(1), 0.0);
        let again = t.on_down(ms(1500), 0.0);
        assert_eq!(first, again, "re-checking during the same outage keeps the same schedule");
        assert_eq!(t.consecutive_failures(), 1);
    }
}
