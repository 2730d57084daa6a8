//! One node's enactment of one policy: Kubernetes conditions and per-domain/per-bridge detail,
//! computed from the engine's status (pure).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use virtwarden_crd::{condition, reason, BridgeEnactment, DomainEnactment, HostPolicyEnactmentStatus};
use virtwarden_policies::DesiredState;

use crate::engine::status::StatusReport;

/// What the node knows about one policy.
pub struct PolicyView<'a> {
    pub name: &'a str,
    pub generation: Option<i64>,
    pub desired: &'a DesiredState,
    pub conflicts: &'a [String],
    pub invalid: &'a [String],
}

/// A condition as of `now` for the object's `generation`.
pub fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Conditions carry the previous transition time when their status did not change.
pub fn keep_transition_times(new: &mut [Condition], old: &[Condition]) {
    for c in new {
        if let Some(o) = old.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

pub fn enactment_status(view: &PolicyView, report: &StatusReport, now: Time) -> HostPolicyEnactmentStatus {
    let domains: Vec<DomainEnactment> = report
        .domains
        .iter()
        .filter(|d| d.policy == view.name)
        .map(|d| DomainEnactment {
            name: d.name.clone(),
            state: d.state.clone(),
            restarts: d.restarts,
            last_failure: d.last_failure.clone(),
            quarantined: d.quarantined.is_some(),
            refused_hook: d.refused_hook.clone(),
            waiting_for: d.waiting_for.clone(),
            health: d.health.as_ref().map(|h| match &h.detail {
                // Boot-failed details already start with "boot failed: ".
                Some(detail) if detail.starts_with("boot failed") => detail.clone(),
                Some(detail) => format!("{}: {detail}", h.phase.as_str()),
                None => h.phase.as_str().to_string(),
            }),
        })
        .collect();
    let drift: Vec<String> = report.network.as_ref().map(|n| n.drift.clone()).unwrap_or_default();
    let bridges: Vec<BridgeEnactment> = view
        .desired
        .bridges
        .iter()
        .filter(|b| b.policy == view.name)
        .map(|b| {
            let mine: Vec<String> =
                drift.iter().filter(|l| l.starts_with(&format!("{}:", b.spec.name))).cloned().collect();
            BridgeEnactment {
                name: b.spec.name.clone(),
                present: !mine.iter().any(|l| l.contains("create bridge")),
                drift: mine,
            }
        })
        .collect();
    let g = view.generation;
    // Right after a policy change the engine may not have reported a new domain yet: that is
    // not convergence.
    let unseen: Vec<&str> = view
        .desired
        .domains
        .iter()
        .filter(|m| m.policy == view.name && !domains.iter().any(|d| d.name == m.spec.name))
        .map(|m| m.spec.name.as_str())
        .collect();
    let not_running: Vec<&DomainEnactment> = domains
        .iter()
        .filter(|d| {
            let wants_running = view
                .desired
                .domain(&d.name)
                .is_some_and(|m| m.spec.state == virtwarden_policies::DesiredDomainState::Running);
            let sick = d.health.as_deref().is_some_and(|h| h.starts_with("unhealthy") || h.starts_with("boot failed"));
            wants_running && (!d.state.starts_with("running") || sick)
        })
        .collect();
    let (available, progressing, degraded, why, message) = if !view.invalid.is_empty() {
        (false, false, true, reason::INVALID_POLICY, view.invalid.join("; "))
    } else if let Some(d) = domains.iter().find(|d| d.quarantined) {
        (false, false, true, reason::CRASH_LOOP, format!("domain {} is quarantined", d.name))
    } else if let Some((d, hook)) = not_running.iter().find_map(|d| d.refused_hook.as_ref().map(|h| (d, h))) {
        // The ladder reached an exec step this node may not run: a person has to act.
        (false, false, true, reason::HOOK_REFUSED, format!("domain {}: exec step refused, not run: {hook}", d.name))
    } else if !view.conflicts.is_empty() {
        (true, false, true, reason::CONFLICT, view.conflicts.join("; "))
    } else if !unseen.is_empty() {
        (false, true, false, reason::REMEDIATING, format!("not yet observed: {}", unseen.join(", ")))
    } else if !report.connected {
        (false, true, false, reason::REMEDIATING, "libvirt is not connected".to_string())
    } else if !not_running.is_empty() || bridges.iter().any(|b| !b.drift.is_empty()) {
        let names: Vec<&str> = not_running.iter().map(|d| d.name.as_str()).collect();
        (false, true, false, reason::REMEDIATING, format!("not yet converged: {}", names.join(", ")))
    } else {
        (true, false, false, reason::CONVERGED, "the node matches the policy".to_string())
    };
    let conditions = vec![
        cond(condition::AVAILABLE, available, why, message.clone(), g, &now),
        cond(condition::PROGRESSING, progressing, why, message.clone(), g, &now),
        cond(condition::DEGRADED, degraded, why, message, g, &now),
    ];
    HostPolicyEnactmentStatus { observed_generation: g, conditions, domains, bridges }
}

#[cfg(test)]
mod tests {
    use virtwarden_policies::{DomainPolicy, ManagedDomain};

    use super::*;
    use crate::engine::status::DomainStatus;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    fn desired() -> DesiredState {
        DesiredState {
            domains: vec![ManagedDomain { policy: "web".into(), spec: DomainPolicy::named("web1") }],
            ..Default::default()
        }
    }

    fn report(state: &str, quarantined: bool) -> StatusReport {
        StatusReport {
            connected: true,
            domains: vec![DomainStatus {
                name: "web1".into(),
                policy: "web".into(),
                state: state.into(),
                restarts: 2,
                quarantined: quarantined.then(|| "10 restarts within 1h".to_string()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn status_of(s: &HostPolicyEnactmentStatus, t: &str) -> (String, String) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn converged_remediating_crashloop_conflict_invalid() {
        let d = desired();
        let view = |conflicts: &'static [String], invalid: &'static [String]| PolicyView {
            name: "web",
            generation: Some(3),
            desired: &d,
            conflicts,
            invalid,
        };
        let s = enactment_status(&view(&[], &[]), &report("running (booted)", false), now());
        assert_eq!(status_of(&s, "Available"), ("True".into(), "Converged".into()));
        assert_eq!(s.domains[0].restarts, 2);
        let s = enactment_status(&view(&[], &[]), &report("shut off (crashed)", false), now());
        assert_eq!(status_of(&s, "Progressing"), ("True".into(), "Remediating".into()));
        let s = enactment_status(&view(&[], &[]), &report("shut off (crashed)", true), now());
        assert_eq!(status_of(&s, "Degraded"), ("True".into(), "CrashLoop".into()));
        assert!(s.domains[0].quarantined);
        static C: [String; 0] = [];
        let conflict: &'static [String] =
            Box::leak(vec!["domain `x` is also declared by policy db".to_string()].into_boxed_slice());
        let s = enactment_status(&view(conflict, &C), &report("running (booted)", false), now());
        assert_eq!(status_of(&s, "Degraded"), ("True".into(), "Conflict".into()));
        let invalid: &'static [String] =
            Box::leak(vec!["spec.domains[0].restart: contradicts".to_string()].into_boxed_slice());
        let s = enactment_status(&view(&C, invalid), &report("running (booted)", false), now());
        assert_eq!(status_of(&s, "Degraded"), ("True".into(), "InvalidPolicy".into()));
        assert_eq!(status_of(&s, "Available").0, "False");
    }

    #[test]
    fn guest_health_shows_per_domain_and_a_sick_guest_is_not_converged() {
        use crate::engine::status::{HealthPhase, HealthStatus};
        let d = desired();
        let view = PolicyView { name: "web", generation: Some(1), desired: &d, conflicts: &[], invalid: &[] };
        let mut r = report("running (booted)", false);
        r.domains[0].health = Some(HealthStatus { phase: HealthPhase::Healthy, ..Default::default() });
        let s = enactment_status(&view, &r, now());
        assert_eq!(s.domains[0].health.as_deref(), Some("healthy"));
        assert_eq!(status_of(&s, "Available"), ("True".into(), "Converged".into()));
        r.domains[0].health = Some(HealthStatus {
            phase: HealthPhase::Unhealthy,
            detail: Some("tcp 10.0.0.2:22: connection refused".into()),
            ..Default::default()
        });
        let s = enactment_status(&view, &r, now());
        assert_eq!(s.domains[0].health.as_deref(), Some("unhealthy: tcp 10.0.0.2:22: connection refused"));
        assert_eq!(status_of(&s, "Progressing"), ("True".into(), "Remediating".into()));
        r.domains[0].health = Some(HealthStatus {
            phase: HealthPhase::BootFailed,
            detail: Some("boot failed: SeaBIOS: No bootable device".into()),
            ..Default::default()
        });
        let s = enactment_status(&view, &r, now());
        assert_eq!(s.domains[0].health.as_deref(), Some("boot failed: SeaBIOS: No bootable device"));
        assert_eq!(status_of(&s, "Available").0, "False");
        // A start that waits says what for.
        let mut r = report("shut off (unknown)", false);
        r.domains[0].waiting_for = vec!["db1 (not running)".into(), "/mnt/images".into()];
        let s = enactment_status(&view, &r, now());
        assert_eq!(s.domains[0].waiting_for, ["db1 (not running)", "/mnt/images"]);
    }

    #[test]
    fn a_desired_domain_the_engine_has_not_reported_yet_is_not_converged() {
        let d = desired();
        let view = PolicyView { name: "web", generation: Some(1), desired: &d, conflicts: &[], invalid: &[] };
        let empty = StatusReport { connected: true, ..Default::default() };
        let s = enactment_status(&view, &empty, now());
        assert_eq!(status_of(&s, "Available"), ("False".into(), "Remediating".into()));
        assert!(s.conditions[0].message.contains("web1"), "{:?}", s.conditions);
    }

    #[test]
    fn a_refused_exec_step_on_a_down_domain_degrades_with_its_reason() {
        let d = desired();
        let view = PolicyView { name: "web", generation: Some(1), desired: &d, conflicts: &[], invalid: &[] };
        let mut r = report("shut off (crashed)", false);
        r.domains[0].refused_hook = Some("/opt/repair is outside --allow-exec-dir".into());
        let s = enactment_status(&view, &r, now());
        assert_eq!(s.domains[0].refused_hook.as_deref(), Some("/opt/repair is outside --allow-exec-dir"));
        assert_eq!(status_of(&s, "Degraded"), ("True".into(), "HookRefused".into()));
        // Once the domain runs again the refusal stays visible on the domain only.
        let mut r = report("running (booted)", false);
        r.domains[0].refused_hook = Some("/opt/repair is outside --allow-exec-dir".into());
        let s = enactment_status(&view, &r, now());
        assert_eq!(status_of(&s, "Available"), ("True".into(), "Converged".into()));
        assert!(s.domains[0].refused_hook.is_some());
    }
}
