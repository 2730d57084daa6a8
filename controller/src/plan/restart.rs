//! Crash-loop protection as a pure state machine: when a domain that should run is down, decide
//! whether to act now, wait (backoff), or stop trying (quarantine), and which remediation step
//! of the ladder to use. Time is passed in, so tests can assert the exact schedule.
//!
//! The first restart after a healthy run is immediate. A failure within `resetAfter` of the
//! last restart waits `initialDelay`, doubling up to `maxDelay` (plus jitter). More than
//! `maxRestarts` restarts within `window` quarantines the domain until its policy changes or a
//! reload. Unlike KubeVirt, this also catches loops where the guest runs for a while and then
//! crashes: the count only resets after `resetAfter` of healthy uptime.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;
use virtwarden_policies::{BackoffSettings, RemediationAction, RemediationStep, DEFAULT_EXEC_TIMEOUT};

/// A point on the engine's monotonic clock (time since the engine started).
pub type Tick = Duration;

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

/// Per-domain restart bookkeeping.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    settings: BackoffSettings,
    ladder: Ladder,
    /// When restarts were issued, pruned to `window`.
    restarts: VecDeque<Tick>,
    last_restart: Option<Tick>,
    /// Failures in the current streak (0 for the first failure after a healthy run).
    consecutive: u32,
    /// Set while the domain is down and not yet recovered.
    down_since: Option<Tick>,
    next_allowed: Option<Tick>,
    quarantined: Option<String>,
    /// Restarts issued since the engine started (for status).
    pub total_restarts: u32,
}

impl RestartTracker {
    pub fn new(settings: BackoffSettings, ladder: Ladder) -> Self {
        RestartTracker {
            settings,
            ladder,
            restarts: VecDeque::new(),
            last_restart: None,
            consecutive: 0,
            down_since: None,
            next_allowed: None,
            quarantined: None,
            total_restarts: 0,
        }
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
        while self.restarts.front().is_some_and(|t| now.saturating_sub(*t) >= window) {
            self.restarts.pop_front();
        }
    }

    fn schedule_retry(&mut self, now: Tick, jitter: f64) {
        let base = self.delay(self.consecutive);
        let extra = base.mul_f64(jitter.clamp(0.0, 1.0) * 0.1);
        self.next_allowed = Some(now + base + extra);
    }

    /// The domain should run and is down. `jitter` in [0, 1) spreads retries by up to 10 %.
    pub fn on_down(&mut self, now: Tick, jitter: f64) -> Decision {
        if let Some(reason) = &self.quarantined {
            return Decision::Quarantined(reason.clone());
        }
        if self.down_since.is_none() {
            self.down_since = Some(now);
            let healthy = self.last_restart.is_none_or(|t| now.saturating_sub(t) >= self.settings.reset_after.as_std());
            if healthy {
                self.consecutive = 0;
                self.next_allowed = None;
            } else {
                self.consecutive += 1;
                self.schedule_retry(now, jitter);
            }
        }
        if let Some(t) = self.next_allowed {
            if now < t {
                return Decision::WaitUntil(t);
            }
        }
        self.prune(now);
        if self.restarts.len() as u32 >= self.settings.max_restarts {
            let reason = format!(
                "{} restarts within {}; more would exceed backoff.maxRestarts (reload or change the policy to retry)",
                self.restarts.len(),
                self.settings.window
            );
            self.quarantined = Some(reason.clone());
            self.next_allowed = None;
            return Decision::Quarantined(reason);
        }
        Decision::Act { step: self.ladder.pick(self.consecutive).clone(), attempt: self.consecutive + 1 }
    }

    /// A restart was attempted at `now`; `recovered` says whether re-observing found it running.
    pub fn attempted(&mut self, now: Tick, recovered: bool, jitter: f64) {
        self.restarts.push_back(now);
        self.last_restart = Some(now);
        self.total_restarts += 1;
        if recovered {
            self.down_since = None;
            self.next_allowed = None;
        } else {
            self.consecutive += 1;
            self.schedule_retry(now, jitter);
        }
    }

    /// The domain was seen running (by us or someone else): the down streak ends.
    pub fn on_up(&mut self) {
        self.down_since = None;
        self.next_allowed = None;
    }

    /// Lift a quarantine (reload); the history of restarts is kept.
    pub fn clear_quarantine(&mut self) {
        if self.quarantined.take().is_some() {
            self.restarts.clear();
            self.consecutive = 0;
            self.down_since = None;
            self.next_allowed = None;
        }
    }

    pub fn quarantined(&self) -> Option<&str> {
        self.quarantined.as_deref()
    }

    pub fn next_retry(&self) -> Option<Tick> {
        self.next_allowed
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    pub fn restarts_in_window(&self) -> usize {
        self.restarts.len()
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
        t.clear_quarantine();
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
