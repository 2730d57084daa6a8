//! Bounds of a domain's `health:` block: probe periods and deadlines a host can keep, a
//! threshold that means something, a request the probe can actually send.

use std::net::IpAddr;
use std::time::Duration;

use super::Issue;
use crate::health::{Health, Probe};

/// Shortest probe period: faster probing costs CPU on the host and in the guest for no
/// detection gain (libvirt events already report QEMU dying at once).
pub const MIN_PERIOD: Duration = Duration::from_secs(1);
/// Longest probe period: beyond it a dead guest goes unnoticed for too long to call it healing.
pub const MAX_PERIOD: Duration = Duration::from_secs(3600);
/// Largest `failureThreshold`.
pub const MAX_FAILURE_THRESHOLD: u32 = 100;
/// Longest `bootTimeout` (a day: firmware updates and fsck can be slow, but not slower).
pub const MAX_BOOT_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Check `h`, found at dotted path `at` (e.g. `spec.domains[0].health`).
pub fn validate_health(at: &str, h: &Health, issues: &mut Vec<Issue>) {
    let period = h.period().as_std();
    let timeout = h.timeout().as_std();
    let period_ok = (MIN_PERIOD..=MAX_PERIOD).contains(&period);
    if let Some(p) = h.period {
        if !period_ok {
            issues.push(
                Issue::new(format!("{at}.period"), format!("period {p} is outside 1s–1h"))
                    .hint("probe at most once a second and at least once an hour, e.g. `period: 10s`"),
            );
        }
    }
    if h.timeout.is_some() && timeout.is_zero() {
        issues.push(Issue::new(format!("{at}.timeout"), "timeout must be longer than 0s").hint("e.g. `timeout: 2s`"));
    } else if period_ok && timeout >= period {
        issues.push(
            Issue::new(
                format!("{at}.timeout"),
                format!("timeout {} is not shorter than the period {}", h.timeout(), h.period()),
            )
            .hint("a probe must end before the next one is due; shorten `timeout` or lengthen `period`"),
        );
    }
    if let Some(n) = h.failure_threshold {
        if !(1..=MAX_FAILURE_THRESHOLD).contains(&n) {
            issues.push(
                Issue::new(format!("{at}.failureThreshold"), format!("failureThreshold {n} is outside 1–100"))
                    .hint("the number of consecutive failed probes that make a healthy guest unhealthy, e.g. 3"),
            );
        }
    }
    let boot = h.boot_timeout();
    if period_ok && boot.0 < period {
        issues.push(
            Issue::new(
                format!("{at}.bootTimeout"),
                format!("bootTimeout {boot} is shorter than the period {}", h.period()),
            )
            .hint("the guest needs at least one probe after a start; make bootTimeout at least the period"),
        );
    } else if boot.0 > MAX_BOOT_TIMEOUT {
        issues.push(
            Issue::new(format!("{at}.bootTimeout"), format!("bootTimeout {boot} is longer than 1d"))
                .hint("a guest that has not come up within a day is not booting; e.g. `bootTimeout: 5m`"),
        );
    }
    if let Some(addr) = h.address {
        if let Some(problem) = address_problem(addr) {
            issues.push(
                Issue::new(format!("{at}.address"), format!("address {addr} {problem}"))
                    .hint("the guest's own unicast address, or remove `address` to find it through libvirt"),
            );
        }
    }
    match &h.probe {
        Probe::Http(http) => {
            port_issue(&format!("{at}.probe.http.port"), http.port, issues);
            if let Some(path) = &http.path {
                if !path.starts_with('/') {
                    issues.push(
                        Issue::new(
                            format!("{at}.probe.http.path"),
                            format!("HTTP path `{path}` does not start with `/`"),
                        )
                        .hint("write the path part of the URL, e.g. `/healthz`"),
                    );
                } else if let Some(c) = path.chars().find(|c| c.is_whitespace() || c.is_control()) {
                    issues.push(
                        Issue::new(format!("{at}.probe.http.path"), format!("HTTP path `{path}` contains {c:?}"))
                            .hint("percent-encode it, e.g. a space as %20"),
                    );
                }
            }
        }
        Probe::Tcp(tcp) => port_issue(&format!("{at}.probe.tcp.port"), tcp.port, issues),
        Probe::GuestAgentPing(_) => {
            if h.address.is_some() {
                issues.push(
                    Issue::new(format!("{at}.address"), "`address` is not used by the guestAgentPing probe")
                        .hint("the agent is reached through libvirt, not the network; remove `address`"),
                );
            }
        }
    }
}

fn port_issue(at: &str, port: u16, issues: &mut Vec<Issue>) {
    if port == 0 {
        issues.push(Issue::new(at, "port 0 cannot be probed").hint("the port the guest's service listens on, 1–65535"));
    }
}

/// Why a host cannot probe `addr`, if it cannot.
fn address_problem(addr: IpAddr) -> Option<&'static str> {
    if addr.is_unspecified() {
        return Some("is the unspecified address");
    }
    if addr.is_multicast() {
        return Some("is a multicast address");
    }
    if let IpAddr::V4(v4) = addr {
        if v4.is_broadcast() {
            return Some("is the broadcast address");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{GuestAgentPing, HttpProbe, TcpProbe};

    fn health(probe: Probe) -> Health {
        Health { probe, address: None, period: None, timeout: None, failure_threshold: None, boot_timeout: None }
    }

    fn paths(h: &Health) -> Vec<String> {
        let mut issues = Vec::new();
        validate_health("h", h, &mut issues);
        issues.into_iter().map(|i| i.path).collect::<Vec<_>>()
    }

    fn secs(s: u64) -> Option<crate::Duration> {
        Some(crate::Duration::from_secs(s))
    }

    #[test]
    fn defaults_are_valid() {
        assert!(paths(&health(Probe::Tcp(TcpProbe { port: 22 }))).is_empty());
        assert!(paths(&health(Probe::GuestAgentPing(GuestAgentPing {}))).is_empty());
        let http = health(Probe::Http(HttpProbe { port: 80, path: Some("/healthz?x=1".into()) }));
        assert!(paths(&http).is_empty());
    }

    #[test]
    fn bounds_are_inclusive() {
        let mut h = health(Probe::Tcp(TcpProbe { port: 22 }));
        h.period = secs(1);
        h.timeout = Some(crate::Duration::from_millis(999));
        h.boot_timeout = secs(1);
        h.failure_threshold = Some(1);
        assert!(paths(&h).is_empty());
        h.period = secs(3600);
        h.boot_timeout = secs(86_400);
        h.failure_threshold = Some(100);
        assert!(paths(&h).is_empty());
    }

    #[test]
    fn each_problem_is_reported_at_its_field() {
        let tcp = || health(Probe::Tcp(TcpProbe { port: 22 }));
        let cases: Vec<(Health, &str)> = vec![
            (Health { period: Some(crate::Duration::from_millis(500)), ..tcp() }, "h.period"),
            (Health { period: secs(3601), boot_timeout: secs(7200), ..tcp() }, "h.period"),
            (Health { timeout: secs(0), ..tcp() }, "h.timeout"),
            (Health { timeout: secs(10), ..tcp() }, "h.timeout"),
            (Health { failure_threshold: Some(0), ..tcp() }, "h.failureThreshold"),
            (Health { failure_threshold: Some(101), ..tcp() }, "h.failureThreshold"),
            (Health { boot_timeout: secs(5), ..tcp() }, "h.bootTimeout"),
            (Health { boot_timeout: secs(86_401), ..tcp() }, "h.bootTimeout"),
            (Health { address: Some("0.0.0.0".parse().unwrap()), ..tcp() }, "h.address"),
            (Health { address: Some("ff02::1".parse().unwrap()), ..tcp() }, "h.address"),
            (Health { address: Some("255.255.255.255".parse().unwrap()), ..tcp() }, "h.address"),
            (health(Probe::Tcp(TcpProbe { port: 0 })), "h.probe.tcp.port"),
            (health(Probe::Http(HttpProbe { port: 0, path: None })), "h.probe.http.port"),
            (health(Probe::Http(HttpProbe { port: 80, path: Some("healthz".into()) })), "h.probe.http.path"),
            (health(Probe::Http(HttpProbe { port: 80, path: Some("/a b".into()) })), "h.probe.http.path"),
            (
                Health {
                    address: Some("192.0.2.1".parse().unwrap()),
                    ..health(Probe::GuestAgentPing(GuestAgentPing {}))
                },
                "h.address",
            ),
        ];
        for (h, want) in cases {
            assert_eq!(paths(&h), [want], "{h:?}");
        }
    }
}
