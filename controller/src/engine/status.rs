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
                if let Some(t) = d.next_retry {
                    detail.push(format!("next retry {}", t.to_rfc3339()));
                }
                lines.push(detail.join("; "));
            }
        }
        if let Some(r) = &d.remembered {
            lines.push(format!("remembered: {r}"));
        }
        for f in &d.flapping {
            lines.push(format!("CONFLICT: {f}"));
        }
        if let Some(h) = &d.refused_hook {
            lines.push(format!("hook refused: {h}"));
        }
        let q = if d.quarantined.is_some() { "yes" } else { "no" };
        out.push_str(&format!("{:<20} {:<26} {:>8} {:<12} {}\n", d.name, d.state, d.restarts, q, lines[0]));
        for l in &lines[1..] {
            out.push_str(&format!("{pad}{l}\n"));
        }
        if let Some(refusal) = &d.refused_hook {
            out.push_str(&format!("{:<20} hook not run: {refusal}\n", ""));
        }
    }
    out
}
