//! Semantic checks that serde cannot express: names, ranges, contradictions, the remediation
//! ladder. Each finding names the dotted path of the offending value so it can be located.

use std::collections::HashSet;

mod health;

use crate::types::{
    BridgePolicy, DesiredDomainState, DomainPolicy, HostPolicy, RemediationAction, RemediationStep, RestartPolicy,
    API_VERSION, FORWARD_DELAY_RANGE, HELLO_TIME_RANGE, KIND, MAX_AGE_RANGE,
};

/// One semantic problem in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted path of the offending value, e.g. `spec.domains[1].boot[0]`.
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
}

impl Issue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Issue { path: path.into(), message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Maximum interface name length in bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME_BYTES: usize = 15;

/// Why `name` is not a valid Linux interface name, if it is not.
pub fn interface_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("interface name is empty".into());
    }
    if name.len() > MAX_IFNAME_BYTES {
        return Some(format!(
            "interface name `{name}` is {} bytes long; Linux allows at most {MAX_IFNAME_BYTES}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("`{name}` is not a valid interface name"));
    }
    if let Some(c) = name.chars().find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control()) {
        return Some(format!("interface name `{name}` contains {c:?}, which Linux does not allow"));
    }
    None
}

/// Validate one document on its own. Cross-document checks live in [`crate::merge`].
pub fn validate_document(doc: &HostPolicy) -> Vec<Issue> {
    let mut issues = Vec::new();
    if doc.api_version != API_VERSION {
        issues.push(
            Issue::new("apiVersion", format!("unsupported apiVersion `{}`", doc.api_version))
                .hint(format!("use `apiVersion: {API_VERSION}`")),
        );
    }
    if doc.kind != KIND {
        issues.push(Issue::new("kind", format!("unsupported kind `{}`", doc.kind)).hint(format!("use `kind: {KIND}`")));
    }
    if let Some(problem) = object_name_problem(&doc.metadata.name) {
        issues.push(
            Issue::new("metadata.name", problem).hint("use lowercase letters, digits, '-' and '.', e.g. `web-tier`"),
        );
    }
    for (i, domain) in doc.spec.domains.iter().enumerate() {
        validate_domain(&format!("spec.domains[{i}]"), domain, &mut issues);
    }
    for (i, bridge) in doc.spec.bridges.iter().enumerate() {
        validate_bridge(&format!("spec.bridges[{i}]"), bridge, &mut issues);
    }
    crate::bounds::check_bounds(doc, &mut issues);
    issues
}

fn object_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("metadata.name is empty".into());
    }
    if name.len() > 253 {
        return Some(format!("metadata.name is {} characters long; at most 253 are allowed", name.len()));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !name.chars().all(ok_char) || !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Some(format!("metadata.name `{name}` is not a valid name"));
    }
    None
}

fn validate_domain(at: &str, d: &DomainPolicy, issues: &mut Vec<Issue>) {
    if d.name.is_empty() {
        issues.push(
            Issue::new(format!("{at}.name"), "domain name is empty").hint("use the name `virsh list --all` shows"),
        );
    } else if let Some(c) = d.name.chars().find(|c| *c == '/' || c.is_control()) {
        issues.push(
            Issue::new(
                format!("{at}.name"),
                format!("domain name `{}` contains {c:?}, which libvirt does not allow", d.name),
            )
            .hint("use the name `virsh list --all` shows"),
        );
    }
    if d.state == DesiredDomainState::Stopped && d.restart == RestartPolicy::Always {
        issues.push(
            Issue::new(format!("{at}.restart"), "`restart: always` contradicts `state: stopped`")
                .hint("use `restart: on-failure` or `never`, or `state: running`"),
        );
    }
    if let Some(boot) = &d.boot {
        if boot.is_empty() {
            issues.push(
                Issue::new(format!("{at}.boot"), "boot order is empty")
                    .hint("list at least one of hd, cdrom, network, fd, or remove `boot` to leave it as it is"),
            );
        }
        let mut seen = HashSet::new();
        for (i, dev) in boot.iter().enumerate() {
            if !seen.insert(*dev) {
                issues.push(
                    Issue::new(format!("{at}.boot[{i}]"), format!("boot device `{dev}` is listed twice"))
                        .hint("each device class may appear once in the boot order"),
                );
            }
        }
    }
    if let Some(b) = &d.backoff {
        if let (Some(initial), Some(max)) = (b.initial_delay, b.max_delay) {
            if initial > max {
                issues.push(
                    Issue::new(
                        format!("{at}.backoff.initialDelay"),
                        format!("initialDelay {initial} is longer than maxDelay {max}"),
                    )
                    .hint("initialDelay doubles up to maxDelay; make maxDelay at least initialDelay"),
                );
            }
        }
        if b.max_restarts == Some(0) {
            issues.push(
                Issue::new(format!("{at}.backoff.maxRestarts"), "maxRestarts must be at least 1")
                    .hint("use `restart: never` to never restart a domain"),
            );
        }
    }
    if let Some(ladder) = &d.remediation {
        validate_ladder(&format!("{at}.remediation"), ladder, issues);
    }
    crate::dependencies::validate_startup(at, d, issues);
    if let Some(h) = &d.health {
        health::validate_health(&format!("{at}.health"), h, issues);
    }
}

fn validate_ladder(at: &str, ladder: &[RemediationStep], issues: &mut Vec<Issue>) {
    if ladder.is_empty() {
        issues.push(
            Issue::new(at, "remediation ladder is empty")
                .hint("list at least one step, or remove `remediation` to use the default (`start`)"),
        );
    }
    let mut previous: Option<u32> = None;
    for (i, step) in ladder.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let after = step.after.unwrap_or(0);
        if let Some(prev) = previous {
            if after <= prev {
                issues.push(
                    Issue::new(
                        format!("{here}.after"),
                        format!("step {} has `after: {after}`, not greater than the previous step's {prev}", i + 1),
                    )
                    .hint("steps are tried in order as consecutive failures grow; give each a larger `after`"),
                );
            }
        }
        previous = Some(after);
        if step.action == RemediationAction::Exec {
            match step.command.as_deref() {
                None | Some([]) => issues.push(
                    Issue::new(format!("{here}.action"), "`action: exec` needs a `command`")
                        .hint("add e.g. `command: [\"/usr/local/libexec/repair-vm\"]` (argv, no shell)"),
                ),
                Some([program, ..]) if !program.starts_with('/') => issues.push(
                    Issue::new(format!("{here}.command[0]"), format!("exec command `{program}` is not an absolute path"))
                        .hint("commands run without a shell or PATH lookup; write the full path, e.g. /usr/local/bin/repair-vm"),
                ),
                Some(_) => {}
            }
        } else {
            let action = step.action.as_str();
            if step.command.is_some() {
                issues.push(
                    Issue::new(
                        format!("{here}.command"),
                        format!("`command` is only used by `action: exec`, not `{action}`"),
                    )
                    .hint("remove `command` or use `action: exec`"),
                );
            }
            if step.timeout.is_some() {
                issues.push(
                    Issue::new(
                        format!("{here}.timeout"),
                        format!("`timeout` is only used by `action: exec`, not `{action}`"),
                    )
                    .hint("remove `timeout`"),
                );
            }
        }
    }
}

fn validate_bridge(at: &str, b: &BridgePolicy, issues: &mut Vec<Issue>) {
    let ifname_hint = "interface names are 1–15 bytes without '/', ':' or whitespace";
    if let Some(problem) = interface_name_problem(&b.name) {
        issues.push(Issue::new(format!("{at}.name"), format!("bridge {problem}")).hint(ifname_hint));
    }
    let mut seen = HashSet::new();
    for (i, port) in b.ports.iter().enumerate() {
        let here = format!("{at}.ports[{i}]");
        if let Some(problem) = interface_name_problem(port) {
            issues.push(Issue::new(here, format!("port {problem}")).hint(ifname_hint));
        } else if port == &b.name {
            issues.push(
                Issue::new(here, format!("bridge `{port}` cannot be a port of itself"))
                    .hint("list the host interfaces to enslave, not the bridge"),
            );
        } else if !seen.insert(port.as_str()) {
            issues.push(Issue::new(here, format!("port `{port}` is listed twice")).hint("remove the duplicate"));
        }
    }
    if let Some(stp) = &b.stp {
        let timers = [
            ("forwardDelay", stp.forward_delay, FORWARD_DELAY_RANGE),
            ("helloTime", stp.hello_time, HELLO_TIME_RANGE),
            ("maxAge", stp.max_age, MAX_AGE_RANGE),
        ];
        for (field, value, range) in timers {
            if let Some(v) = value {
                if !range.contains(&v) {
                    issues.push(
                        Issue::new(
                            format!("{at}.stp.{field}"),
                            format!(
                                "{field} {v} is outside the kernel's range {}–{} seconds",
                                range.start(),
                                range.end()
                            ),
                        )
                        .hint(format!(
                            "the kernel rejects {field} outside {}–{} s while STP is on",
                            range.start(),
                            range.end()
                        )),
                    );
                }
            }
        }
    }
}
