//! libvirt checks: a job holding the domain for long (the "cannot acquire state change lock"
//! case), libvirt's state reason and control error, and the last error lines of the domain's
//! QEMU log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::{Check, DomainReport, Finding};
use super::source::{ControlState, DomainFacts};
use crate::observe::console::read_tail;
use crate::observe::DomainState;

/// libvirt waits this long for a domain's job lock before failing with "cannot acquire state
/// change lock"; a job older than this makes every other call on the domain fail.
pub const JOB_LOCK_WAIT: Duration = Duration::from_secs(30);

/// How many error lines of the QEMU log are quoted.
const LOG_LINES: usize = 3;

/// Where libvirt's QEMU driver writes per-domain logs for a connect URI (`None`: no QEMU).
pub fn qemu_log_dir(uri: &str) -> Option<PathBuf> {
    if uri.is_empty() || (uri.starts_with("qemu") && uri.ends_with("/system")) {
        return Some(PathBuf::from("/var/log/libvirt/qemu"));
    }
    if uri.starts_with("qemu") && uri.ends_with("/session") {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        return Some(cache.join("libvirt/qemu/log"));
    }
    None
}

pub fn check(domain: &str, facts: &DomainFacts, log_dir: Option<&Path>, out: &mut DomainReport) {
    if let Some(c) = &facts.control {
        let secs = c.since.as_secs();
        match &c.state {
            ControlState::Job if c.since >= JOB_LOCK_WAIT => {
                let job = facts
                    .job
                    .as_ref()
                    .map(|j| format!("; job info: {} job, {} s elapsed", j.kind, j.elapsed.as_secs()))
                    .unwrap_or_default();
                out.findings.push(Finding::error(
                    Check::Libvirt,
                    format!("a libvirt job has held {domain} for {secs} s: other operations fail with \"cannot acquire state change lock\""),
                    format!("control info: job for {secs} s{job}"),
                    format!(
                        "let it finish or abort it (virsh domjobabort {domain}); if no job shows, restart libvirtd (guests keep running)"
                    ),
                ));
            }
            ControlState::Occupied if c.since >= JOB_LOCK_WAIT => out.findings.push(Finding::error(
                Check::Libvirt,
                format!("QEMU's monitor has not answered libvirt for {secs} s"),
                format!("control info: occupied for {secs} s"),
                format!("QEMU may be hung: check its CPU and I/O; virsh destroy {domain} if it does not recover"),
            )),
            ControlState::Error(reason) => out.findings.push(Finding::error(
                Check::Libvirt,
                "libvirt lost control of the domain",
                format!("control info: error ({reason}) for {secs} s"),
                format!("virsh destroy {domain}, then start it; restart libvirtd if the monitor error persists"),
            )),
            _ => {}
        }
    }
    let log = log_dir.map(|d| d.join(format!("{domain}.log")));
    let log_errors = log.as_deref().map(last_session_errors).unwrap_or_default();
    let evidence = |state: String| {
        let mut e = format!("state {state}");
        if let (Some(path), false) = (&log, log_errors.is_empty()) {
            e.push_str(&format!("; {}: {}", path.display(), log_errors.join(" | ")));
        }
        e
    };
    let state = format!("{} ({})", facts.state.as_str(), facts.reason);
    match (facts.state, facts.reason.as_str()) {
        (DomainState::ShutOff, "failed") => out.findings.push(Finding::error(
            Check::Libvirt,
            "the last start failed",
            evidence(state),
            if log_errors.is_empty() {
                "see the other findings; libvirt failed before QEMU ran, so its log is silent: virsh start shows libvirt's error"
            } else {
                "fix what QEMU's error names (see the other findings), then start it"
            },
        )),
        (DomainState::ShutOff, "crashed") | (DomainState::Crashed, _) => out.findings.push(Finding::error(
            Check::Libvirt,
            "QEMU crashed",
            evidence(state),
            format!("read the QEMU log and the host's kernel log (OOM killer?), then start {domain}"),
        )),
        (DomainState::Paused, "I/O error") => out.findings.push(Finding::error(
            Check::Libvirt,
            "paused by a disk I/O error",
            evidence(state),
            format!("free space or fix the storage under its disks, then virsh resume {domain}"),
        )),
        (DomainState::Paused, "watchdog") | (DomainState::Paused, "crashed") => out.findings.push(Finding::error(
            Check::Libvirt,
            "paused after the guest failed",
            evidence(state),
            format!("read the guest's console, then virsh reset {domain} or destroy and start it"),
        )),
        (DomainState::ShutOff, _) if !log_errors.is_empty() => out.findings.push(Finding::warning(
            Check::Libvirt,
            "QEMU's log ends with errors",
            evidence(state),
            "fix what QEMU's error names, then start it",
        )),
        _ => {}
    }
}

/// The error lines QEMU (or libvirt) wrote during the domain's last run: lines after the last
/// `starting up` marker, without the command line, that say error/failed/denied.
pub fn last_session_errors(path: &Path) -> Vec<String> {
    let Ok(text) = read_tail(path) else { return Vec::new() };
    let session = text.rfind(": starting up").map_or(text.as_str(), |i| &text[i..]);
    let mut lines = session.lines().skip(1);
    // The command line: libvirt writes it one argument per line, each ending in a backslash.
    let mut rest = Vec::new();
    let mut in_command = true;
    for line in lines.by_ref() {
        if in_command {
            if !line.ends_with('\\') {
                in_command = false;
            }
            continue;
        }
        rest.push(line);
    }
    let errors: Vec<String> = rest
        .into_iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !l.contains("warning")
                && ["error", "could not", "cannot", "permission denied", "no such file", "failed", "not in "]
                    .iter()
                    .any(|k| l.contains(k))
        })
        .map(|l| strip_timestamp(l).to_string())
        .collect();
    errors[errors.len().saturating_sub(LOG_LINES)..].to_vec()
}

/// `2024-05-01T10:00:00.123456Z qemu-system-x86_64: …` → `qemu-system-x86_64: …`
fn strip_timestamp(line: &str) -> &str {
    let first = line.split_whitespace().next().unwrap_or("");
    if first.len() >= 20 && first.as_bytes()[4] == b'-' && first.contains('T') {
        line[first.len()..].trim_start()
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::source::{ControlInfo, JobInfo};

    const LOG: &str = "2026-01-01 10:00:00.000+0000: starting up libvirt version: 9.0.0, qemu version: 7.2.0\n\
LC_ALL=C \\\n/usr/bin/qemu-system-x86_64 \\\n-name guest=vm1 \\\n-msg timestamp=on\n\
char device redirected to /dev/pts/0 (label charserial0)\n\
2026-01-01T10:00:00.100000Z qemu-system-x86_64: warning: host doesn't support requested feature\n\
2026-01-01T10:00:00.123456Z qemu-system-x86_64: -blockdev {\"driver\":\"file\"}: Could not open '/srv/vm/a.qcow2': Permission denied\n\
2026-01-01 10:00:00.200+0000: shutting down, reason=failed\n";

    fn facts(state: DomainState, reason: &str) -> DomainFacts {
        DomainFacts { state, reason: reason.into(), xml: String::new(), control: None, job: None }
    }

    #[test]
    fn failed_start_quotes_the_qemu_log_of_the_last_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let old = "2025-01-01 10:00:00.000+0000: starting up libvirt\nLC_ALL=C \\\n-x\n2025-01-01T10:00:00.1Z qemu-system-x86_64: old error\n";
        std::fs::write(dir.path().join("vm1.log"), format!("{old}{LOG}")).unwrap();
        let mut out = DomainReport::new("vm1", None, String::new());
        check("vm1", &facts(DomainState::ShutOff, "failed"), Some(dir.path()), &mut out);
        assert_eq!(out.findings.len(), 1);
        assert_eq!(out.findings[0].what, "the last start failed");
        assert_eq!(
            out.findings[0].evidence,
            format!(
                "state shut off (failed); {}: qemu-system-x86_64: -blockdev {{\"driver\":\"file\"}}: Could not open '/srv/vm/a.qcow2': Permission denied | 2026-01-01 10:00:00.200+0000: shutting down, reason=failed",
                dir.path().join("vm1.log").display()
            )
        );
    }

    #[test]
    fn a_running_domain_with_an_old_job_holds_the_state_change_lock() {
        let mut f = facts(DomainState::Running, "booted");
        f.control = Some(ControlInfo { state: ControlState::Job, since: Duration::from_secs(95) });
        f.job = Some(JobInfo { kind: "unbounded".into(), elapsed: Duration::from_secs(95) });
        let mut out = DomainReport::new("vm1", None, String::new());
        check("vm1", &f, None, &mut out);
        assert_eq!(out.findings.len(), 1);
        assert!(out.findings[0].what.contains("cannot acquire state change lock"));
        assert_eq!(out.findings[0].evidence, "control info: job for 95 s; job info: unbounded job, 95 s elapsed");
        // A young job is normal.
        f.control = Some(ControlInfo { state: ControlState::Job, since: Duration::from_secs(2) });
        let mut out = DomainReport::new("vm1", None, String::new());
        check("vm1", &f, None, &mut out);
        assert!(out.findings.is_empty());
    }

    #[test]
    fn healthy_running_domain_and_log_dirs() {
        let mut out = DomainReport::new("vm1", None, String::new());
        check("vm1", &facts(DomainState::Running, "booted"), None, &mut out);
        assert!(out.findings.is_empty());
        assert_eq!(qemu_log_dir("qemu:///system"), Some(PathBuf::from("/var/log/libvirt/qemu")));
        assert_eq!(qemu_log_dir("test:///default"), None);
    }
}
