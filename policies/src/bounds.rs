//! Bounds on every duration, count and name a policy writes, each with the reason it exists, so
//! no accepted value can make the engine spin, overflow a deadline or hold unbounded memory.
//! [`check_duration`] is the one helper every duration field (health, startup too) goes through.

use crate::duration::Duration;
use crate::types::{DomainPolicy, HostPolicy, RemediationAction, RemediationStep};
use crate::validate::Issue;

/// The accepted range of one duration field and why each end is where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationBounds {
    pub min: Duration,
    pub max: Duration,
    /// Why shorter values are refused (shown as the hint).
    pub why_min: &'static str,
    /// Why longer values are refused (shown as the hint).
    pub why_max: &'static str,
}

/// `backoff.initialDelay`: the first backoff delay, doubled on every further failure.
pub const INITIAL_DELAY: DurationBounds = DurationBounds {
    min: Duration::from_millis(1),
    max: Duration::from_secs(3600),
    why_min: "the delay doubles from initialDelay and twice 0s is still 0s: a crash-looping domain would be restarted without any pause; write at least 1ms, e.g. 1s",
    why_max: "a first retry more than an hour after a failure is no longer a backoff; to stop restarting, use `restart: never` or a smaller maxRestarts",
};

/// `backoff.maxDelay`: the cap of the doubling delay.
pub const MAX_DELAY: DurationBounds = DurationBounds {
    min: Duration::from_millis(1),
    max: Duration::from_secs(24 * 3600),
    why_min: "0s would restart a crash-looping domain without any pause; write at least 1ms, e.g. 5m",
    why_max: "a domain retried less than once a day is abandoned without saying so; use maxRestarts to stop and report instead",
};

/// `backoff.resetAfter`: healthy uptime that ends a failure streak.
pub const RESET_AFTER: DurationBounds = DurationBounds {
    min: Duration::from_millis(1),
    max: Duration::from_secs(7 * 24 * 3600),
    why_min: "with 0s every crash would count as the first after a healthy run and be restarted at once, disabling the backoff; write at least 1ms (a tiny value still quarantines through maxRestarts and window)",
    why_max: "a domain that ran for a week is healthy; a longer resetAfter would keep crashes weeks apart in one backoff streak",
};

/// `backoff.window`: the sliding window `maxRestarts` counts in.
pub const WINDOW: DurationBounds = DurationBounds {
    min: Duration::from_secs(1),
    max: Duration::from_secs(30 * 24 * 3600),
    why_min: "maxRestarts counts the restarts within window; a window shorter than a second never holds more than one, so a crash loop would never be quarantined",
    why_max: "every restart is remembered for window; a month bounds that memory, and a month-old crash should not quarantine a domain today",
};

/// `shutdownTimeout`: how long a graceful shutdown may take before the domain is destroyed.
pub const SHUTDOWN_TIMEOUT: DurationBounds = DurationBounds {
    min: Duration::from_secs(1),
    max: Duration::from_secs(3600),
    why_min: "0s would destroy the domain (pull its plug) without giving the guest a chance to shut down cleanly; give it at least 1s, e.g. 60s",
    why_max: "a guest that has not shut down within an hour will not; after shutdownTimeout it is destroyed, so wait at most 1h",
};

/// `remediation[].timeout` of an `exec` step.
pub const EXEC_TIMEOUT: DurationBounds = DurationBounds {
    min: Duration::from_secs(1),
    max: Duration::from_secs(3600),
    why_min: "the hook is killed when its timeout ends; it needs at least 1s to start and do anything",
    why_max: "the domain's repairs wait while its hook runs; give a hook at most 1h, or let it start a service for longer work",
};

/// A domain name's length limit: libvirt keeps a definition in `<name>.xml`, and a file name is
/// at most 255 bytes.
pub const MAX_DOMAIN_NAME_BYTES: usize = 251;
/// Arguments of an `exec` command, the program included.
pub const MAX_COMMAND_ARGS: usize = 256;
/// Bytes of one `exec` argument (PATH_MAX for the program, and plenty for an argument).
pub const MAX_ARG_BYTES: usize = 4096;
/// Steps of one remediation ladder.
pub const MAX_LADDER_STEPS: usize = 16;
/// Ports of one bridge: the kernel's BR_MAX_PORTS.
pub const MAX_BRIDGE_PORTS: usize = 1024;
/// `backoff.maxRestarts`: every restart in the window is remembered until it leaves the window.
pub const MAX_RESTARTS: u32 = 100_000;
/// Kubernetes' limits, so the same document is a valid custom resource: a label or annotation
/// key is an optional DNS-subdomain prefix (253), `/`, and a name (63).
pub const MAX_LABEL_KEY_BYTES: usize = 253 + 1 + 63;
pub const MAX_LABEL_VALUE_BYTES: usize = 63;
/// All annotations of one document together.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// Push an issue when `value` (if set) lies outside `bounds`. `path` is the field's dotted path;
/// its last segment names the field in the message.
pub fn check_duration(issues: &mut Vec<Issue>, path: &str, value: Option<Duration>, bounds: &DurationBounds) {
    let Some(value) = value else { return };
    let field = path.rsplit('.').next().unwrap_or(path);
    if value < bounds.min {
        issues.push(
            Issue::new(path, format!("{field} {value} is shorter than the minimum {}", bounds.min))
                .hint(bounds.why_min),
        );
    } else if value > bounds.max {
        issues.push(
            Issue::new(path, format!("{field} {value} is longer than the maximum {}", bounds.max)).hint(bounds.why_max),
        );
    }
}

/// Every bound of one document (called once from [`crate::validate::validate_document`]).
pub(crate) fn check_bounds(doc: &HostPolicy, issues: &mut Vec<Issue>) {
    check_metadata(doc, issues);
    for (i, d) in doc.spec.domains.iter().enumerate() {
        check_domain(&format!("spec.domains[{i}]"), d, issues);
    }
    for (i, b) in doc.spec.bridges.iter().enumerate() {
        if b.ports.len() > MAX_BRIDGE_PORTS {
            issues.push(
                Issue::new(
                    format!("spec.bridges[{i}].ports"),
                    format!("bridge lists {} ports; Linux bridges hold at most {MAX_BRIDGE_PORTS}", b.ports.len()),
                )
                .hint("the kernel refuses more ports (BR_MAX_PORTS); split them over several bridges"),
            );
        }
    }
}

fn check_metadata(doc: &HostPolicy, issues: &mut Vec<Issue>) {
    let k8s = "the same document must also be a valid Kubernetes object, and Kubernetes sets these limits";
    for (key, value) in &doc.metadata.labels {
        if key.len() > MAX_LABEL_KEY_BYTES {
            issues.push(
                Issue::new(
                    "metadata.labels",
                    format!("label key is {} bytes; at most {MAX_LABEL_KEY_BYTES}", key.len()),
                )
                .hint(k8s),
            );
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            issues.push(
                Issue::new(
                    "metadata.labels",
                    format!("label `{key}` has a {}-byte value; at most {MAX_LABEL_VALUE_BYTES}", value.len()),
                )
                .hint(k8s),
            );
        }
    }
    for key in doc.metadata.annotations.keys().filter(|k| k.len() > MAX_LABEL_KEY_BYTES) {
        issues.push(
            Issue::new(
                "metadata.annotations",
                format!("annotation key is {} bytes; at most {MAX_LABEL_KEY_BYTES}", key.len()),
            )
            .hint(k8s),
        );
    }
    let total: usize = doc.metadata.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ANNOTATIONS_BYTES {
        issues.push(
            Issue::new(
                "metadata.annotations",
                format!("annotations hold {total} bytes; at most {MAX_ANNOTATIONS_BYTES}"),
            )
            .hint(k8s),
        );
    }
}

fn check_domain(at: &str, d: &DomainPolicy, issues: &mut Vec<Issue>) {
    if d.name.len() > MAX_DOMAIN_NAME_BYTES {
        issues.push(
            Issue::new(
                format!("{at}.name"),
                format!("domain name is {} bytes long; at most {MAX_DOMAIN_NAME_BYTES}", d.name.len()),
            )
            .hint("libvirt stores a domain's definition as `<name>.xml`, and file names are at most 255 bytes"),
        );
    }
    check_duration(issues, &format!("{at}.shutdownTimeout"), d.shutdown_timeout, &SHUTDOWN_TIMEOUT);
    if let Some(b) = &d.backoff {
        let at = format!("{at}.backoff");
        check_duration(issues, &format!("{at}.initialDelay"), b.initial_delay, &INITIAL_DELAY);
        check_duration(issues, &format!("{at}.maxDelay"), b.max_delay, &MAX_DELAY);
        check_duration(issues, &format!("{at}.resetAfter"), b.reset_after, &RESET_AFTER);
        check_duration(issues, &format!("{at}.window"), b.window, &WINDOW);
        if b.max_restarts.is_some_and(|n| n > MAX_RESTARTS) {
            issues.push(
                Issue::new(format!("{at}.maxRestarts"), format!("maxRestarts is larger than {MAX_RESTARTS}"))
                    .hint("every restart within window is remembered; to restart without limit, use a short window"),
            );
        }
    }
    if let Some(ladder) = &d.remediation {
        let at = format!("{at}.remediation");
        if ladder.len() > MAX_LADDER_STEPS {
            issues.push(
                Issue::new(&at, format!("the ladder has {} steps; at most {MAX_LADDER_STEPS}", ladder.len()))
                    .hint("each step escalates from the one before; a few well-chosen steps are enough"),
            );
        }
        for (i, step) in ladder.iter().enumerate() {
            check_step(&format!("{at}[{i}]"), step, issues);
        }
    }
}

fn check_step(at: &str, step: &RemediationStep, issues: &mut Vec<Issue>) {
    if step.action != RemediationAction::Exec {
        return;
    }
    check_duration(issues, &format!("{at}.timeout"), step.timeout, &EXEC_TIMEOUT);
    let Some(argv) = &step.command else { return };
    if argv.len() > MAX_COMMAND_ARGS {
        issues.push(
            Issue::new(
                format!("{at}.command"),
                format!("command has {} arguments; at most {MAX_COMMAND_ARGS}", argv.len()),
            )
            .hint("pass a configuration file to the hook instead of many arguments"),
        );
    }
    for (i, arg) in argv.iter().enumerate() {
        let here = format!("{at}.command[{i}]");
        if arg.contains('\0') {
            issues.push(
                Issue::new(here, "argument contains a NUL byte")
                    .hint("the kernel ends an argument at a NUL byte; remove it"),
            );
        } else if arg.len() > MAX_ARG_BYTES {
            issues.push(
                Issue::new(here, format!("argument is {} bytes long; at most {MAX_ARG_BYTES}", arg.len()))
                    .hint("pass long data in a file the hook reads"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues_for(value: &str, bounds: &DurationBounds) -> Vec<Issue> {
        let mut issues = Vec::new();
        check_duration(&mut issues, "spec.x.initialDelay", Some(value.parse().unwrap()), bounds);
        issues
    }

    #[test]
    fn durations_inside_the_bounds_pass_and_outside_are_named_with_the_reason() {
        assert!(issues_for("1ms", &INITIAL_DELAY).is_empty());
        assert!(issues_for("1h", &INITIAL_DELAY).is_empty());
        let below = issues_for("0s", &INITIAL_DELAY);
        assert_eq!(below.len(), 1);
        assert_eq!(below[0].path, "spec.x.initialDelay");
        assert_eq!(below[0].message, "initialDelay 0s is shorter than the minimum 1ms");
        assert_eq!(below[0].hint.as_deref(), Some(INITIAL_DELAY.why_min));
        let above = issues_for("1h1s", &INITIAL_DELAY);
        assert_eq!(above[0].message, "initialDelay 1h1s is longer than the maximum 1h");
        assert_eq!(above[0].hint.as_deref(), Some(INITIAL_DELAY.why_max));
    }

    #[test]
    fn the_documented_defaults_lie_inside_their_bounds() {
        use crate::types::{BackoffSettings, DEFAULT_EXEC_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT};
        let d = BackoffSettings::DEFAULT;
        for (value, b) in [
            (d.initial_delay, INITIAL_DELAY),
            (d.max_delay, MAX_DELAY),
            (d.reset_after, RESET_AFTER),
            (d.window, WINDOW),
            (DEFAULT_SHUTDOWN_TIMEOUT, SHUTDOWN_TIMEOUT),
            (DEFAULT_EXEC_TIMEOUT, EXEC_TIMEOUT),
        ] {
            assert!(b.min <= value && value <= b.max && b.max < Duration::MAX, "{value} outside {b:?}");
        }
    }
}
