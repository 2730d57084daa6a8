//! What a diagnosis finds, as plain data, and its text for people: per domain, one line per
//! finding — what is wrong, the evidence, the fix.

use serde::Serialize;

/// Which family of checks found it. Causes first: libvirt's own view (a failed start, a
/// crash) mostly restates what the others explain, so it sorts last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    Disk,
    Boot,
    Network,
    Host,
    Libvirt,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Disk => "disk",
            Check::Boot => "boot",
            Check::Libvirt => "libvirt",
            Check::Network => "network",
            Check::Host => "host",
        }
    }
}

/// How bad it is. Both count as problems (exit 3); errors come first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The domain cannot start, boot or be reached because of it.
    Error,
    /// Likely trouble (slow, partial, or about to fail).
    Warning,
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: Check,
    pub severity: Severity,
    /// What is wrong, e.g. `disk /srv/vm/a.qcow2 not readable by libvirt-qemu`.
    pub what: String,
    /// What was seen: a path with its mode and owner, the bytes found, libvirt's error.
    pub evidence: String,
    /// What to do about it.
    pub fix: String,
}

impl Finding {
    pub fn error(check: Check, what: impl Into<String>, evidence: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding { check, severity: Severity::Error, what: what.into(), evidence: evidence.into(), fix: fix.into() }
    }

    pub fn warning(check: Check, what: impl Into<String>, evidence: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding { check, severity: Severity::Warning, what: what.into(), evidence: evidence.into(), fix: fix.into() }
    }

    /// `disk /srv/vm/a.qcow2 not readable by libvirt-qemu: /srv/vm is 0700 root:root (fix: …)`
    pub fn line(&self) -> String {
        format!("{}: {} (fix: {})", self.what, self.evidence, self.fix)
    }
}

/// Everything found about one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainReport {
    pub domain: String,
    /// The policy that manages it; `None`: read only because it was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// As virsh prints it (`shut off (failed)`), or `not defined`.
    pub state: String,
    pub findings: Vec<Finding>,
    /// Checks that could not run, and why (not problems).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

impl DomainReport {
    pub fn new(domain: &str, policy: Option<String>, state: String) -> Self {
        DomainReport { domain: domain.to_string(), policy, state, findings: Vec::new(), skipped: Vec::new() }
    }

    /// Errors first, then by check family, keeping each check's own order.
    pub fn sort(&mut self) {
        self.findings.sort_by_key(|f| (f.severity, f.check));
    }
}

/// A whole diagnosis.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub domains: Vec<DomainReport>,
}

impl Report {
    pub fn problems(&self) -> usize {
        self.domains.iter().map(|d| d.findings.len()).sum()
    }
}

/// Stable, greppable text; golden tests compare it byte for byte.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    for d in &report.domains {
        render_domain(d, &mut out);
        for s in &d.skipped {
            out.push_str(&format!("  skipped {s}\n"));
        }
        if d.findings.is_empty() {
            out.push_str("  ok: no problems found\n");
        }
    }
    let n = report.problems();
    let bad = report.domains.iter().filter(|d| !d.findings.is_empty()).count();
    let total = report.domains.len();
    if n == 0 {
        out.push_str(&format!("no problems found in {total} domain{}\n", plural(total)));
    } else {
        out.push_str(&format!("{n} problem{} found in {bad} of {total} domain{}\n", plural(n), plural(total)));
    }
    out
}

/// Only the domains that have findings and only their findings (for `plan`).
pub fn render_findings(reports: &[DomainReport]) -> String {
    let mut out = String::new();
    for d in reports.iter().filter(|d| !d.findings.is_empty()) {
        render_domain(d, &mut out);
    }
    out
}

fn render_domain(d: &DomainReport, out: &mut String) {
    let managed = match &d.policy {
        Some(p) => format!("managed by {p}"),
        None => "not managed: read only".to_string(),
    };
    out.push_str(&format!("{}: {}, {}\n", d.domain, d.state, managed));
    for f in &d.findings {
        let severity = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        out.push_str(&format!(
            "  {:<7} {:<7} {}: {} → fix: {}\n",
            severity,
            f.check.as_str(),
            f.what,
            f.evidence,
            f.fix
        ));
    }
}

/// An I/O error as words, without Rust's ` (os error 2)` suffix.
pub fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_groups_findings_per_domain_errors_first() {
        let mut a = DomainReport::new("a", Some("web".into()), "shut off (failed)".into());
        a.findings.push(Finding::warning(Check::Network, "w", "e1", "f1"));
        a.findings.push(Finding::error(Check::Disk, "disk /x missing", "stat /x: no such file", "restore it"));
        a.sort();
        a.skipped.push("firewall: iptables-save not found".into());
        let b = DomainReport::new("b", None, "running (booted)".into());
        let text = render_text(&Report { domains: vec![a, b] });
        assert_eq!(
            text,
            "a: shut off (failed), managed by web\n\
             \x20 error   disk    disk /x missing: stat /x: no such file → fix: restore it\n\
             \x20 warning network w: e1 → fix: f1\n\
             \x20 skipped firewall: iptables-save not found\n\
             b: running (booted), not managed: read only\n\
             \x20 ok: no problems found\n\
             2 problems found in 1 of 2 domains\n"
        );
    }

    #[test]
    fn one_line_for_status_and_events() {
        let f = Finding::error(
            Check::Disk,
            "disk /srv/vm/a.qcow2 not readable by libvirt-qemu",
            "/srv/vm is 0700 root:root",
            "chmod o+x /srv/vm",
        );
        assert_eq!(
            f.line(),
            "disk /srv/vm/a.qcow2 not readable by libvirt-qemu: /srv/vm is 0700 root:root (fix: chmod o+x /srv/vm)"
        );
    }
}
