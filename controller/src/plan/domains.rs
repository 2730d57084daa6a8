//! Planning one managed domain: state per the restart strategy, autostart, boot order.

use virtwarden_policies::{DesiredDomainState, ManagedDomain, RestartPolicy};

use super::{boot_list, on_off, Action, ActionKind, Note, Plan, Severity};
use crate::observe::{DomainState, ObservedDomain};

/// Shut-off reasons that mean the domain died rather than being stopped on purpose.
const FAILURE_REASONS: &[&str] = &["crashed", "failed", "daemon"];
/// Shut-off reasons that carry no intent (never started since defined, reverted snapshot).
const NEUTRAL_REASONS: &[&str] = &["unknown", "from snapshot"];
/// Pause reasons that are operations in progress; they end on their own.
const TRANSIENT_PAUSE_REASONS: &[&str] =
    &["migrating", "saving", "dumping", "shutting down", "creating snapshot", "starting up", "post-copy"];

pub(super) fn plan_domain(managed: &ManagedDomain, observed: Option<&ObservedDomain>, plan: &mut Plan) {
    let spec = &managed.spec;
    let name = spec.name.as_str();
    let Some(obs) = observed else {
        plan.notes.push(Note {
            subject: name.to_string(),
            severity: Severity::Warning,
            message: "not defined on this host → nothing to do (define it with `virsh define`)".into(),
        });
        return;
    };
    let mut wanted = Vec::new();
    let mut notes = Vec::new();
    config_actions(managed, obs, &mut wanted, &mut notes);
    state_actions(managed, obs, &mut wanted, &mut notes);

    let action = |kind: ActionKind, reason: String| Action {
        domain: name.to_string(),
        policy: managed.policy.clone(),
        kind,
        reason,
    };
    if spec.state == DesiredDomainState::Ignored {
        // Observe and report only: every would-be action becomes a note.
        let observed_notes = std::mem::take(&mut notes);
        for (kind, reason) in wanted {
            let a = action(kind, reason);
            notes.push(Note {
                subject: name.to_string(),
                severity: Severity::Info,
                message: format!("{} → would {} (state: ignored, not acting)", a.reason, a.kind.verb()),
            });
        }
        notes.extend(observed_notes);
    } else {
        plan.actions.extend(wanted.into_iter().map(|(k, r)| action(k, r)));
    }
    plan.notes.extend(notes);
}

type Wanted = Vec<(ActionKind, String)>;

fn note(notes: &mut Vec<Note>, subject: &str, severity: Severity, message: String) {
    notes.push(Note { subject: subject.to_string(), severity, message });
}

fn config_actions(managed: &ManagedDomain, obs: &ObservedDomain, wanted: &mut Wanted, notes: &mut Vec<Note>) {
    let spec = &managed.spec;
    let next_boot = if obs.state.is_active() { " (takes effect at next boot)" } else { "" };
    if let Some(order) = &spec.boot {
        if obs.boot.order != *order {
            if obs.persistent {
                let current = if obs.boot.order.is_empty() {
                    "libvirt's default".to_string()
                } else {
                    boot_list(&obs.boot.order)
                };
                wanted.push((
                    ActionKind::SetBootOrder { order: order.clone() },
                    format!("boot order {current}, policy wants {}{next_boot}", boot_list(order)),
                ));
            } else {
                note(
                    notes,
                    &spec.name,
                    Severity::Warning,
                    "transient domain: a boot order cannot be stored → skipped".into(),
                );
            }
        }
    }
    if let Some(on) = spec.autostart {
        if obs.autostart != on {
            if obs.persistent {
                wanted.push((
                    ActionKind::SetAutostart { on },
                    format!("autostart {}, policy wants {}", on_off(obs.autostart), on_off(on)),
                ));
            } else if on {
                note(
                    notes,
                    &spec.name,
                    Severity::Warning,
                    "transient domain: libvirt cannot autostart it → skipped".into(),
                );
            }
        }
    }
}

fn state_actions(managed: &ManagedDomain, obs: &ObservedDomain, wanted: &mut Wanted, notes: &mut Vec<Note>) {
    let spec = &managed.spec;
    let name = spec.name.as_str();
    let seen = obs.state_text();
    match spec.state {
        DesiredDomainState::Ignored => {
            note(notes, name, Severity::Info, format!("{seen}; state: ignored → observed only"));
        }
        DesiredDomainState::Running => {
            let wants = "policy wants running";
            match obs.state {
                DomainState::Running | DomainState::Blocked | DomainState::ShuttingDown => {}
                DomainState::ShutOff => shut_off(spec.restart, obs, name, wanted, notes),
                DomainState::Crashed => match spec.restart {
                    RestartPolicy::Never => {
                        note(notes, name, Severity::Warning, format!("{seen}; restart: never → left as it is"))
                    }
                    _ => wanted.push((ActionKind::Restart, format!("{seen}, {wants}"))),
                },
                DomainState::Paused => {
                    let r = obs.reason.as_str();
                    if TRANSIENT_PAUSE_REASONS.contains(&r) {
                        note(notes, name, Severity::Info, format!("{seen}: an operation is in progress → not touched"));
                    } else if r == "user" && spec.restart != RestartPolicy::Always {
                        note(
                            notes,
                            name,
                            Severity::Info,
                            format!("{seen}: paused by an admin; honoured (restart: {})", restart_name(spec.restart)),
                        );
                    } else if spec.restart == RestartPolicy::Never {
                        note(notes, name, Severity::Warning, format!("{seen}; restart: never → left paused"));
                    } else {
                        wanted.push((ActionKind::Resume, format!("{seen}, {wants}")));
                    }
                }
                DomainState::PmSuspended => {
                    note(notes, name, Severity::Info, format!("{seen}: the guest suspended itself → not touched"));
                }
                DomainState::NoState => {
                    note(notes, name, Severity::Warning, format!("{seen}: libvirt reports no state → not touched"));
                }
            }
        }
        DesiredDomainState::Stopped => {
            let wants = "policy wants stopped";
            match obs.state {
                DomainState::ShutOff | DomainState::NoState => {}
                DomainState::Running | DomainState::Blocked | DomainState::ShuttingDown => {
                    wanted.push((ActionKind::Shutdown { timeout: spec.shutdown_timeout() }, format!("{seen}, {wants}")))
                }
                // A paused, suspended or crashed guest cannot handle an ACPI shutdown request.
                DomainState::Paused | DomainState::PmSuspended | DomainState::Crashed => {
                    wanted.push((ActionKind::Destroy, format!("{seen}, {wants} (it cannot shut down gracefully)")))
                }
            }
        }
    }
}

fn restart_name(r: RestartPolicy) -> &'static str {
    match r {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    }
}

/// A shut-off domain the policy wants running: start it or not, by restart strategy and reason.
fn shut_off(restart: RestartPolicy, obs: &ObservedDomain, name: &str, wanted: &mut Wanted, notes: &mut Vec<Note>) {
    let seen = obs.state_text();
    let reason = obs.reason.as_str();
    if reason == "migrated" {
        // Running it here as well could corrupt its disks: it runs on another host now.
        note(
            notes,
            name,
            Severity::Warning,
            format!("{seen}: it was migrated away; starting it here could run it twice → not started"),
        );
        return;
    }
    let failed = FAILURE_REASONS.contains(&reason);
    let neutral = NEUTRAL_REASONS.contains(&reason);
    match restart {
        RestartPolicy::Never => note(notes, name, Severity::Warning, format!("{seen}; restart: never → left off")),
        RestartPolicy::OnFailure if !failed && !neutral => note(
            notes,
            name,
            Severity::Info,
            format!(
                "{seen}: stopped on purpose; honoured (restart: on-failure) → start it by hand or use restart: always"
            ),
        ),
        RestartPolicy::Always | RestartPolicy::OnFailure => {
            wanted.push((ActionKind::Start, format!("{seen}, policy wants running")));
        }
    }
}

#[cfg(test)]
mod tests {
    use virtwarden_policies::{BootDevice, DesiredState, DomainPolicy};

    use super::*;
    use crate::observe::{BootConfig, BootStyle, ObservedHost};
    use crate::plan::plan;

    fn observed(name: &str, state: DomainState, reason: &str) -> ObservedDomain {
        ObservedDomain {
            name: name.into(),
            uuid: String::new(),
            state,
            reason: reason.into(),
            persistent: true,
            autostart: false,
            boot: BootConfig::default(),
            interfaces: vec![],
            disks: vec![],
        }
    }

    fn desired(policy: DomainPolicy) -> DesiredState {
        DesiredState { domains: vec![ManagedDomain { policy: "p".into(), spec: policy }], ..Default::default() }
    }

    fn lines(policy: DomainPolicy, obs: ObservedDomain) -> Vec<String> {
        let p = plan(&desired(policy), &ObservedHost { domains: vec![obs], networks: vec![], net: None });
        p.actions.iter().map(|a| a.line()).chain(p.notes.iter().map(|n| n.line())).collect()
    }

    fn with_restart(r: RestartPolicy) -> DomainPolicy {
        DomainPolicy { restart: r, ..DomainPolicy::named("web1") }
    }

    #[test]
    fn crash_is_restarted_under_on_failure_and_always() {
        for r in [RestartPolicy::OnFailure, RestartPolicy::Always] {
            assert_eq!(
                lines(with_restart(r), observed("web1", DomainState::ShutOff, "crashed")),
                ["web1: shut off (crashed), policy wants running → start"]
            );
        }
    }

    #[test]
    fn guest_shutdown_is_honoured_under_on_failure_only() {
        let obs = || observed("web1", DomainState::ShutOff, "shutdown");
        let l = lines(with_restart(RestartPolicy::OnFailure), obs());
        assert_eq!(l.len(), 1);
        assert!(l[0].starts_with("note: web1: shut off (shutdown): stopped on purpose; honoured"), "{l:?}");
        assert_eq!(
            lines(with_restart(RestartPolicy::Always), obs()),
            ["web1: shut off (shutdown), policy wants running → start"]
        );
    }

    #[test]
    fn never_only_reports() {
        let l = lines(with_restart(RestartPolicy::Never), observed("web1", DomainState::ShutOff, "crashed"));
        assert_eq!(l, ["warning: web1: shut off (crashed); restart: never → left off"]);
    }

    #[test]
    fn migrated_away_domain_is_never_started() {
        let l = lines(with_restart(RestartPolicy::Always), observed("web1", DomainState::ShutOff, "migrated"));
        assert_eq!(l.len(), 1);
        assert!(l[0].starts_with("warning: web1: shut off (migrated): it was migrated away"), "{l:?}");
    }

    #[test]
    fn stopped_policy_shuts_down_running_and_destroys_paused() {
        let stop = || DomainPolicy { state: DesiredDomainState::Stopped, ..DomainPolicy::named("web1") };
        assert_eq!(
            lines(stop(), observed("web1", DomainState::Running, "booted")),
            ["web1: running (booted), policy wants stopped → shut down (destroy after 1m)"]
        );
        assert_eq!(
            lines(stop(), observed("web1", DomainState::Paused, "user")),
            ["web1: paused (user), policy wants stopped (it cannot shut down gracefully) → destroy"]
        );
    }

    #[test]
    fn config_comes_before_start_and_ignored_only_reports() {
        let policy =
            DomainPolicy { autostart: Some(true), boot: Some(vec![BootDevice::Hd]), ..DomainPolicy::named("web1") };
        let mut obs = observed("web1", DomainState::ShutOff, "unknown");
        obs.boot = BootConfig { style: BootStyle::Os, order: vec![BootDevice::Network, BootDevice::Hd] };
        assert_eq!(
            lines(policy.clone(), obs.clone()),
            [
                "web1: boot order [network, hd], policy wants [hd] → set boot order [hd]",
                "web1: autostart off, policy wants on → set autostart on",
                "web1: shut off (unknown), policy wants running → start",
            ]
        );
        let ignored = DomainPolicy { state: DesiredDomainState::Ignored, ..policy };
        let l = lines(ignored, obs);
        assert_eq!(l.len(), 3);
        assert!(
            l[..2].iter().all(|l| l.starts_with("note: web1: ") && l.contains("(state: ignored, not acting)")),
            "{l:?}"
        );
        assert_eq!(l[2], "note: web1: shut off (unknown); state: ignored → observed only");
    }

    #[test]
    fn missing_domain_is_reported_not_an_error() {
        let p = plan(&desired(DomainPolicy::named("ghost")), &ObservedHost::default());
        assert!(p.actions.is_empty());
        assert_eq!(p.notes[0].subject, "ghost");
    }

    #[test]
    fn unmanaged_domains_never_appear() {
        let host = ObservedHost {
            domains: vec![observed("legacy", DomainState::ShutOff, "crashed")],
            networks: vec![],
            net: None,
        };
        let p = plan(&desired(DomainPolicy::named("web1")), &host);
        assert!(p.actions.iter().all(|a| a.domain != "legacy"));
        assert!(p.notes.iter().all(|n| n.subject != "legacy"));
    }
}
