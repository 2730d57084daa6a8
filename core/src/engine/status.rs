//! What the engine knows about each managed domain, for `virtwarden status`, the status file and
//! (later) Kubernetes enactments. Written atomically (temp file + rename).

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The status file's content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub updated: Option<DateTime<Utc>>,
    pub pid: u32,
    pub uri: String,
    pub connected: bool,
    /// Connected and the first resync round done (what `/readyz` and systemd's READY say).
    #[serde(default)]
    pub ready: bool,
    /// Policies in force (the last good load).
    pub policies: Vec<String>,
    /// Where the durable memory lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    /// The durable memory could not be read or written (what, and what was done about it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_error: Option<String>,
    /// The durable memory was lost (corrupt, unreadable, or deleted): what happened, and that
    /// down domains are left down until it is rebuilt or `virtwarden memory confirm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_lost: Option<String>,
    /// The last reload error, if the newest edit was rejected (the previous policy stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_error: Option<String>,
    pub domains: Vec<DomainStatus>,
    /// Host network (bridges, ports, taps, forwarding), when it is reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkStatus>,
}

/// The host network's reconciliation state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// Drift still present after the last pass (retried with backoff).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_actions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Objects another writer keeps changing back, whose repairs are backed off
    /// (`another writer keeps changing bridge br0 stp; backing off 20s, next repair at …`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flapping: Vec<String>,
}

/// One managed domain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainStatus {
    pub name: String,
    pub policy: String,
    /// As virsh prints it: `running (booted)`, `shut off (crashed)`, or `not defined`.
    pub state: String,
    /// Restarts virtwarden issued since it started.
    pub restarts: u32,
    pub restarts_in_window: u32,
    pub consecutive_failures: u32,
    /// Last failure: the lifecycle event and state reason, plus libvirt's error text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_at: Option<DateTime<Utc>>,
    /// The last error a repair attempt met — what `diagnose` found when it found something
    /// (`start failed: disk … not readable by libvirt-qemu: …`), else libvirt's text — kept
    /// after a later success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The diagnosis of the last failed repair, with evidence and the fix (cleared once it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<String>,
    /// e.g. `start (attempt 2)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<String>,
    /// `ok`, or the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<DateTime<Utc>>,
    /// A restart waiting for backoff, as logged: `restart in 4 s, backoff after 3 restarts in 10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// Why automatic restarts stopped, if they did (lift with `virtwarden release NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined_since: Option<DateTime<Utc>>,
    /// Its boot order or autostart that another writer keeps changing back (repairs backed off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flapping: Vec<String>,
    /// What virtwarden remembers about why the domain is off (kept across libvirtd restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remembered: Option<String>,
    /// The last `exec` remediation step that was refused (not run) and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_hook: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Guest health, for domains whose policy has `health`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthStatus>,
    /// The last guest event libvirt reported (`watchdog fired (action: none)`, `no space left on
    /// the host for vda (…): enospc, guest paused (a host problem …)`, `guest agent connected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_guest_event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_guest_event_at: Option<DateTime<Utc>>,
    /// Why its state is `stalled`: a libvirt call about it does not return (storage hung, a
    /// stuck job); it is asked nothing else until that call returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_since: Option<DateTime<Utc>>,
    /// What its start (or its stop) waits for (`startup`: `db1 (not running)`, `/mnt/images`,
    /// `order group 1 (+30s delay after db1)`, `a start slot …`); empty when it does not wait.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
}

/// Domain status by name.
pub type StatusBook = BTreeMap<String, DomainStatus>;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot write status file {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("cannot read status file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("status file {path} is not valid: {source}")]
    Parse { path: String, source: serde_json::Error },
}

impl super::shared::Shared {
    /// Called with a remediation step's error, if any: when an `exec` step was refused (not
    /// run), say so in the domain's status, the metrics and the log.
    pub(crate) fn hook_refused(&self, domain: &str, err: Option<&crate::act::remediation::RemediationError>) {
        let Some(crate::act::remediation::RemediationError::Hook(hook)) = err else { return };
        let Some(reason) = hook.refusal() else { return };
        tracing::warn!(domain, kind = reason.kind(), error = %hook, "exec hook refused; it was not run");
        self.metrics.hook_refused(reason.kind());
        let text = hook.to_string();
        self.update_domain(domain, |s| s.refused_hook = Some(text));
    }
}

/// Write `report` to `path` atomically (readers see the old or the new file, never half of
/// one), readable by its owner only; the directory is created 0700.
pub fn write_atomically(path: &Path, report: &StatusReport) -> Result<(), StatusError> {
    let err = |source| StatusError::Write { path: path.display().to_string(), source };
    let text = serde_json::to_vec_pretty(report).map_err(|e| err(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsutil::ensure_private_dir(dir).map_err(err)?;
    }
    crate::fsutil::write_atomically(path, &text).map_err(err)
}

pub fn read(path: &Path) -> Result<StatusReport, StatusError> {
    let text = std::fs::read(path).map_err(|source| StatusError::Read { path: path.display().to_string(), source })?;
    serde_json::from_slice(&text).map_err(|source| StatusError::Parse { path: path.display().to_string(), source })
}

/// A table for people.
pub fn render_text(report: &StatusReport) -> String {
    let mut out = String::new();
    let updated = report.updated.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into());
    out.push_str(&format!(
        "virtwarden pid {} on {} ({}), updated {updated}\npolicies: {}\n",
        report.pid,
        report.uri,
        if report.connected { "connected" } else { "DISCONNECTED" },
        if report.policies.is_empty() { "none".to_string() } else { report.policies.join(", ") }
    ));
    if let Some(e) = &report.memory_error {
        out.push_str(&format!("MEMORY PROBLEM: {e}\n"));
    }
    if let Some(l) = &report.memory_lost {
        out.push_str(&format!("MEMORY LOST: {l}\n"));
    }
    if let Some(e) = &report.policy_error {
        out.push_str(&format!("last reload REJECTED (previous policy in force):\n{e}\n"));
    }
    if let Some(n) = &report.network {
        let state = if !n.flapping.is_empty() {
            "CONFLICT (another writer; backing off)"
        } else if !n.drift.is_empty() {
            "DRIFT (retrying)"
        } else {
            "in sync"
        };
        out.push_str(&format!("network: {state}\n"));
        for line in n.flapping.iter().chain(&n.drift).chain(&n.last_actions).chain(&n.notes) {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out.push_str(&format!("{:<20} {:<26} {:>8} {:<12} {}\n", "DOMAIN", "STATE", "RESTARTS", "QUARANTINED", "DETAIL"));
    let pad = format!("{:<20} {:<26} {:>8} {:<12} ", "", "", "", "");
    for d in &report.domains {
        let mut lines = Vec::new();
        match &d.quarantined {
            Some(reason) => {
                let since = d.quarantined_since.map(|t| format!(" since {}", t.to_rfc3339())).unwrap_or_default();
                lines.push(format!("quarantined{since}: {reason}"));
                if let Some(f) = &d.last_failure {
                    lines.push(format!("last failure: {f}"));
                }
                if let Some(e) = &d.last_error {
                    lines.push(format!("last error: {e}"));
                }
                lines.push(format!("to retry once fixed: virtwarden release {}", d.name));
            }
            None => {
                let mut detail = Vec::new();
                if let Some(f) = &d.last_failure {
                    detail.push(format!("failure: {f}"));
                }
                if let Some(e) = &d.last_error {
                    detail.push(format!("last error: {e}"));
                }
                if let Some(a) = &d.last_action {
                    detail.push(format!("action: {a} → {}", d.last_outcome.as_deref().unwrap_or("pending")));
                }
                match (&d.backoff, d.next_retry) {
                    (Some(b), Some(t)) => detail.push(format!("BACKOFF: {b} (next retry {})", t.to_rfc3339())),
                    (None, Some(t)) => detail.push(format!("next retry {}", t.to_rfc3339())),
                    _ => {}
                }
                lines.push(detail.join("; "));
            }
        }
        if let Some(r) = &d.remembered {
            lines.push(format!("remembered: {r}"));
        }
        if let Some(why) = &d.stalled {
            let since = d.stalled_since.map(|t| format!(" since {}", t.to_rfc3339())).unwrap_or_default();
            lines.push(format!("STALLED{since}: {why}"));
        }
        for f in &d.flapping {
            lines.push(format!("CONFLICT: {f}"));
        }
        if let Some(h) = &d.refused_hook {
            lines.push(format!("hook refused: {h}"));
        }
        if !d.waiting_for.is_empty() {
            let waits = format!("waits for {}", d.waiting_for.join(", "));
            match lines[0].is_empty() {
                true => lines[0] = waits,
                false => lines.push(waits),
            }
        }
        let q = if d.quarantined.is_some() { "yes" } else { "no" };
        out.push_str(&format!("{:<20} {:<26} {:>8} {:<12} {}\n", d.name, d.state, d.restarts, q, lines[0]));
        for l in &lines[1..] {
            out.push_str(&format!("{pad}{l}\n"));
        }
        if let Some(refusal) = &d.refused_hook {
            out.push_str(&format!("{:<20} hook not run: {refusal}\n", ""));
        }
        if let Some(h) = &d.health {
            out.push_str(&format!("{:<20} health: {}\n", "", h.line()));
        }
        if let Some(e) = &d.last_guest_event {
            let at = d.last_guest_event_at.map(|t| format!(" at {}", t.to_rfc3339())).unwrap_or_default();
            out.push_str(&format!("{:<20} guest event: {e}{at}\n", ""));
        }
    }
    out
}

// ---- Guest health (issue 11) ----

/// Where a guest's health stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthPhase {
    /// Not running: nothing to probe.
    #[default]
    Down,
    /// Started or reset, waiting for the first passing probe before the boot deadline.
    Booting,
    Healthy,
    /// Healthy before, then `failureThreshold` consecutive failures.
    Unhealthy,
    /// No probe passed within `bootTimeout` of a start or reset.
    BootFailed,
    /// Not probed: paused, shutting down or quarantined.
    Suspended,
}

impl HealthPhase {
    /// The `state` label of the `guest_health` metric (as in JSON).
    pub fn label(self) -> &'static str {
        match self {
            HealthPhase::Down => "down",
            HealthPhase::Booting => "booting",
            HealthPhase::Healthy => "healthy",
            HealthPhase::Unhealthy => "unhealthy",
            HealthPhase::BootFailed => "boot-failed",
            HealthPhase::Suspended => "suspended",
        }
    }

    /// For people.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthPhase::Down => "down",
            HealthPhase::Booting => "booting",
            HealthPhase::Healthy => "healthy",
            HealthPhase::Unhealthy => "unhealthy",
            HealthPhase::BootFailed => "boot failed",
            HealthPhase::Suspended => "suspended",
        }
    }
}

/// A guest's health as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthStatus {
    pub phase: HealthPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Unhealthy: what failed; boot failed: the summary and evidence; suspended: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// While booting: when it is judged "boot failed" without a passing probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_deadline: Option<DateTime<Utc>>,
    #[serde(default)]
    pub consecutive_failures: u32,
    /// The last probe: `http://10.0.0.2:80/healthz: ok` or what failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_latency_ms: Option<f64>,
    /// The address probed last (the policy's or the one discovered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Another MAC, the host or another domain claims the probe's address: probes are no
    /// evidence (neither pass nor failure) until it clears. Never a reason to reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_conflict: Option<String>,
}

impl HealthStatus {
    /// From the health machine's view; `now` is the engine's tick at `wall_now`.
    pub fn from_view(
        view: &crate::plan::health::HealthView,
        now: crate::plan::health::Tick,
        wall_now: DateTime<Utc>,
    ) -> Self {
        use crate::plan::health::HealthState as S;
        let wall = |t: crate::plan::health::Tick| {
            chrono::Duration::from_std(now.saturating_sub(t)).ok().map(|ago| wall_now - ago)
        };
        let mut out = HealthStatus { consecutive_failures: view.consecutive_failures, ..Default::default() };
        let (phase, since, detail, deadline) = match &view.state {
            S::Down => (HealthPhase::Down, None, None, None),
            S::Booting { since, deadline } => (HealthPhase::Booting, Some(*since), None, Some(*deadline)),
            S::Healthy { since } => (HealthPhase::Healthy, Some(*since), None, None),
            S::Unhealthy { since, what } => (HealthPhase::Unhealthy, Some(*since), Some(what.clone()), None),
            S::BootFailed { since, text } => (HealthPhase::BootFailed, Some(*since), Some(text.clone()), None),
            S::Suspended { since, why, .. } => (HealthPhase::Suspended, Some(*since), Some(why.clone()), None),
        };
        out.phase = phase;
        out.since = since.and_then(wall);
        out.detail = detail;
        // A deadline is ahead of now: add instead of subtract.
        out.boot_deadline =
            deadline.and_then(|d| chrono::Duration::from_std(d.saturating_sub(now)).ok().map(|ahead| wall_now + ahead));
        if let Some(p) = &view.last_probe {
            out.last_probe = Some(p.detail.clone());
            out.last_probe_ok = Some(p.ok);
            out.last_probe_at = wall(p.at);
            out.last_probe_latency_ms = Some(p.latency.as_secs_f64() * 1000.0);
            out.address = p.address.map(|a| a.to_string());
        }
        out.address_conflict = view.address_conflict.clone();
        out
    }

    /// One line for people: `unhealthy since … (tcp 10.0.0.2:22: connection refused); last
    /// probe failed 1.2 ms ago at …`.
    pub fn line(&self) -> String {
        let mut line = self.phase.as_str().to_string();
        if let Some(t) = self.since {
            line.push_str(&format!(" since {}", t.to_rfc3339()));
        }
        if let Some(d) = &self.detail {
            line.push_str(&format!(" ({d})"));
        }
        if let Some(t) = self.boot_deadline {
            line.push_str(&format!(", boot deadline {}", t.to_rfc3339()));
        }
        if let (Some(p), Some(ok)) = (&self.last_probe, self.last_probe_ok) {
            let latency = self.last_probe_latency_ms.map(|ms| format!(" in {ms:.1} ms")).unwrap_or_default();
            line.push_str(&format!("; last probe {}{latency}: {p}", if ok { "passed" } else { "failed" }));
        }
        if let Some(c) = &self.address_conflict {
            line.push_str(&format!("; address conflict: {c} (probes are no evidence; not acted on)"));
        }
        line
    }
}

#[cfg(test)]
mod health_tests {
    use std::time::Duration;

    use super::*;
    use crate::plan::health::{HealthMonitor, HealthSettings, ProbeFailure, ProbeResult, Step};

    #[test]
    fn unhealthy_guest_shows_since_what_and_the_last_probe() {
        let s = |v| Duration::from_secs(v);
        let mut m = HealthMonitor::new(HealthSettings {
            period: s(10),
            timeout: s(2),
            failure_threshold: 1,
            boot_timeout: s(60),
        });
        m.started(s(0));
        let result = |outcome| ProbeResult {
            target: "tcp 10.0.0.2:22".into(),
            address: Some("10.0.0.2".parse().unwrap()),
            latency: Duration::from_micros(1500),
            outcome,
        };
        for (t, outcome) in [(10, Ok(())), (20, Err(ProbeFailure::Refused))] {
            let Step::Probe(ticket) = m.poll(s(t), || None) else { panic!() };
            m.probe_done(s(t), ticket, &result(outcome));
        }
        let wall_now = DateTime::parse_from_rfc3339("2025-01-01T00:01:00Z").unwrap().with_timezone(&Utc);
        let h = HealthStatus::from_view(&m.view(), s(30), wall_now);
        assert_eq!(h.phase, HealthPhase::Unhealthy);
        assert_eq!(h.since.unwrap().to_rfc3339(), "2025-01-01T00:00:50+00:00");
        assert_eq!(h.address.as_deref(), Some("10.0.0.2"));
        assert_eq!(h.last_probe_latency_ms, Some(1.5));
        assert_eq!(
            h.line(),
            "unhealthy since 2025-01-01T00:00:50+00:00 (tcp 10.0.0.2:22: connection refused); \
             last probe failed in 1.5 ms: tcp 10.0.0.2:22: connection refused"
        );
        let report = StatusReport {
            domains: vec![DomainStatus { name: "web1".into(), health: Some(h), ..Default::default() }],
            ..Default::default()
        };
        let text = render_text(&report);
        assert!(text.contains("health: unhealthy since"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["domains"][0]["health"]["phase"], "unhealthy");
        for p in [HealthPhase::Down, HealthPhase::BootFailed, HealthPhase::Suspended] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.label(), "JSON and metric label agree");
            assert!(crate::engine::metrics::HEALTH_STATES.contains(&p.label()));
        }
        let back: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn an_address_conflict_is_shown_beside_a_healthy_phase_in_json_and_text() {
        let s = |v| Duration::from_secs(v);
        let mut m = HealthMonitor::new(HealthSettings {
            period: s(10),
            timeout: s(2),
            failure_threshold: 1,
            boot_timeout: s(60),
        });
        m.started(s(0));
        let result =
            |outcome| ProbeResult { target: "tcp 10.0.0.2:22".into(), address: None, latency: Duration::ZERO, outcome };
        let conflict = "10.0.0.2 is answered by 02:00:00:00:00:66 on br0, not by the domain's 52:54:00:00:00:01";
        for (t, outcome) in [(10, Ok(())), (20, Err(ProbeFailure::Conflict(conflict.into())))] {
            let Step::Probe(ticket) = m.poll(s(t), || None) else { panic!() };
            assert_eq!(m.probe_done(s(t), ticket, &result(outcome)), None, "threshold 1, yet no verdict");
        }
        let wall_now = DateTime::parse_from_rfc3339("2025-01-01T00:01:00Z").unwrap().with_timezone(&Utc);
        let h = HealthStatus::from_view(&m.view(), s(30), wall_now);
        assert_eq!(h.phase, HealthPhase::Healthy);
        assert_eq!(h.address_conflict.as_deref(), Some(conflict));
        assert!(
            h.line().ends_with(&format!("; address conflict: {conflict} (probes are no evidence; not acted on)")),
            "{}",
            h.line()
        );
        assert_eq!(serde_json::to_value(&h).unwrap()["addressConflict"], conflict);
    }

    #[test]
    fn booting_guest_shows_its_deadline() {
        let mut m = HealthMonitor::new(HealthSettings {
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            failure_threshold: 3,
            boot_timeout: Duration::from_secs(300),
        });
        m.started(Duration::from_secs(100));
        let wall_now = DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let h = HealthStatus::from_view(&m.view(), Duration::from_secs(160), wall_now);
        assert_eq!(h.phase, HealthPhase::Booting);
        assert_eq!(h.boot_deadline.unwrap().to_rfc3339(), "2025-01-01T00:04:00+00:00");
        assert_eq!(h.since.unwrap().to_rfc3339(), "2024-12-31T23:59:00+00:00");
    }
}

#[cfg(test)]
mod storage_tests {
    use super::*;

    #[test]
    fn a_stalled_domain_and_a_lost_memory_are_shown() {
        let since = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let report = StatusReport {
            memory_lost: Some("memory.json is not valid (at 2026-01-01T00:00:00Z); …".into()),
            domains: vec![DomainStatus {
                name: "web1".into(),
                state: "stalled".into(),
                stalled: Some("libvirt call `observe` did not return within 15s; this domain waits for it".into()),
                stalled_since: Some(since),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render_text(&report);
        assert!(text.contains("MEMORY LOST: memory.json is not valid"), "{text}");
        assert!(
            text.contains("STALLED since 2026-01-01T00:00:00+00:00: libvirt call `observe` did not return within 15s"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["memoryLost"].is_string());
        assert_eq!(json["domains"][0]["state"], "stalled");
        assert!(json["domains"][0]["stalledSince"].is_string());
    }
}
