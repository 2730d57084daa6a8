//! Planning one managed domain: state per the restart strategy, autostart, boot order.

use virtwarden_policies::{DesiredDomainState, ManagedDomain, RestartPolicy};

use super::{boot_list, on_off, Action, ActionKind, Note, Plan, Severity};
use crate::memory::{Intent, MemoryLoss};
use crate::observe::{DomainState, ObservedDomain, StateReason};

pub(super) fn plan_domain(
    managed: &ManagedDomain,
    observed: Option<&ObservedDomain>,
    intent: Option<&Intent>,
    lost: Option<&MemoryLoss>,
    plan: &mut Plan,
) {
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
    state_actions(managed, obs, intent, &mut wanted, &mut notes);
    if let Some(loss) = lost {
        hold_while_lost(managed, obs, loss, &mut wanted, &mut notes);
    }

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

fn state_actions(
    managed: &ManagedDomain,
    obs: &ObservedDomain,
    intent: Option<&Intent>,
    wanted: &mut Wanted,
    notes: &mut Vec<Note>,
) {
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
                DomainState::ShutOff => shut_off(spec.restart, obs, intent, name, wanted, notes),
                DomainState::Crashed => match spec.restart {
                    RestartPolicy::Never => {
                        note(notes, name, Severity::Warning, format!("{seen}; restart: never → left as it is"))
                    }
                    _ => wanted.push((ActionKind::Restart, format!("{seen}, {wants}"))),
                },
                DomainState::Paused => {
                    let r = obs.reason;
                    if r.is_operation_in_progress() {
                        note(notes, name, Severity::Info, format!("{seen}: an operation is in progress → not touched"));
                    } else if r == StateReason::User && spec.restart != RestartPolicy::Always {
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

/// The memory that would say why a down domain is down (an admin's stop, a quarantine) is lost:
/// a start could undo either, so a down domain is reported and left down — unless its policy
/// says `restart: always` (which starts it whatever the memory says) — until it is seen
/// running again or an admin confirms (`virtwarden memory confirm`).
fn hold_while_lost(
    managed: &ManagedDomain,
    obs: &ObservedDomain,
    loss: &MemoryLoss,
    wanted: &mut Wanted,
    notes: &mut Vec<Note>,
) {
    let spec = &managed.spec;
    if spec.restart == RestartPolicy::Always || !matches!(obs.state, DomainState::ShutOff | DomainState::Crashed) {
        return;
    }
    let before = wanted.len();
    wanted.retain(|(kind, _)| !matches!(kind, ActionKind::Start | ActionKind::Restart));
    if wanted.len() != before {
        note(
            notes,
            &spec.name,
            Severity::Warning,
            format!(
                "{}; virtwarden's memory was lost ({}) so it cannot tell an admin's stop or a quarantine from a crash → left down until it is seen running or `virtwarden memory confirm`",
                obs.state_text(),
                loss.describe()
            ),
        );
    }
}

fn restart_name(r: RestartPolicy) -> &'static str {
    match r {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    }
}

/// A shut-off domain the policy wants running: start it or not, by restart strategy, reason and
/// the remembered intent (libvirt reports `shut off (unknown)` for every inactive domain after
/// it restarts, so the reason alone would turn an admin's stop into a start).
fn shut_off(
    restart: RestartPolicy,
    obs: &ObservedDomain,
    intent: Option<&Intent>,
    name: &str,
    wanted: &mut Wanted,
    notes: &mut Vec<Note>,
) {
    let seen = obs.state_text();
    let reason = obs.reason;
    let forgotten = reason == StateReason::Unknown;
    let migrated_away = match intent {
        Some(i @ Intent::MigratedAway { .. }) if forgotten => Some(format!("; remembered: {}", i.describe())),
        _ if reason == StateReason::Migrated => Some(String::new()),
        _ => None,
    };
    if let Some(remembered) = migrated_away {
        // Running it here as well could corrupt its disks: it runs on another host now.
        note(
            notes,
            name,
            Severity::Warning,
            format!("{seen}{remembered}: it was migrated away; starting it here could run it twice → not started"),
        );
        return;
    }
    // What the stop meant: a crash, a deliberate stop (possibly remembered across a libvirtd
    // restart), or nothing (never started; or virtwarden itself stopped it for its policy).
    let remembered_stop = match intent {
        Some(i @ Intent::StoppedOnPurpose { .. }) if forgotten => Some(i.describe()),
        _ => None,
    };
    let ours = matches!(intent, Some(Intent::StoppedByPolicy { .. })) && (forgotten || reason.is_deliberate_stop());
    let deliberate = !ours && (reason.is_deliberate_stop() || remembered_stop.is_some());
    match restart {
        RestartPolicy::Never => note(notes, name, Severity::Warning, format!("{seen}; restart: never → left off")),
        RestartPolicy::OnFailure if deliberate => {
            let why = match &remembered_stop {
                Some(r) => format!("remembered: {r}"),
                None => "stopped on purpose".to_string(),
            };
            note(
                notes,
                name,
                Severity::Info,
                format!("{seen}: {why}; honoured (restart: on-failure) → start it by hand or use restart: always"),
            )
        }
        RestartPolicy::Always | RestartPolicy::OnFailure => {
            let why = if ours { " (stopped earlier by its policy)" } else { "" };
            wanted.push((ActionKind::Start, format!("{seen}{why}, policy wants running")));
        }
    }
}

#[cfg(test)]
mod tests {
    use virtwarden_policies::{BootDevice, DesiredState, DomainPolicy};

    use super::*;
    use crate::memory::{DomainMemory, Memory, MemoryLoss};
    use crate::observe::{BootConfig, BootStyle, ObservedHost};
    use crate::plan::restart::Tick;
    use crate::plan::{plan, plan_with};

    fn observed(name: &str, state: DomainState, reason: &str) -> ObservedDomain {
        ObservedDomain {
            name: name.into(),
            uuid: String::new(),
            state,
            reason: StateReason::from_words(reason),
            persistent: true,
            autostart: false,
            boot: BootConfig::default(),
            interfaces: vec![],
            disks: vec![],
            id: None,
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

    fn lines_remembering(policy: DomainPolicy, obs: ObservedDomain, intent: Intent) -> Vec<String> {
        let mut memory = Memory::empty();
        memory.domains.insert(obs.name.clone(), DomainMemory { intent: Some(intent), ..Default::default() });
        let p = plan_with(&desired(policy), &ObservedHost { domains: vec![obs], networks: vec![], net: None }, &memory);
        p.actions.iter().map(|a| a.line()).chain(p.notes.iter().map(|n| n.line())).collect()
    }

    #[test]
    fn a_remembered_admin_stop_outlives_libvirtd_forgetting_it() {
        // After libvirtd restarts, every inactive domain is `shut off (unknown)`.
        let forgotten = || observed("web1", DomainState::ShutOff, "unknown");
        let admin = || Intent::StoppedOnPurpose { reason: StateReason::Destroyed, at: Tick::from_secs(1_700_000_000) };
        let l = lines_remembering(with_restart(RestartPolicy::OnFailure), forgotten(), admin());
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(
            l[0].starts_with("note: web1: shut off (unknown): remembered: stopped on purpose (destroyed) at 2023-11-14T22:13:20Z; honoured"),
            "{l:?}"
        );
        // `always` undoes an admin stop anyway; a domain never seen before starts (host boot).
        assert_eq!(
            lines_remembering(with_restart(RestartPolicy::Always), forgotten(), admin()),
            ["web1: shut off (unknown), policy wants running → start"]
        );
        assert_eq!(
            lines(with_restart(RestartPolicy::OnFailure), forgotten()),
            ["web1: shut off (unknown), policy wants running → start"]
        );
    }

    #[test]
    fn a_domain_last_seen_migrated_is_never_started_from_unknown() {
        let migrated = Intent::MigratedAway { at: Tick::from_secs(1_700_000_000) };
        let l = lines_remembering(
            with_restart(RestartPolicy::Always),
            observed("web1", DomainState::ShutOff, "unknown"),
            migrated,
        );
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(l[0].starts_with("warning: web1: shut off (unknown); remembered: migrated away at"), "{l:?}");
        assert!(l[0].ends_with("→ not started"), "{l:?}");
    }

    #[test]
    fn a_stop_virtwarden_made_for_the_policy_is_not_an_admin_stop() {
        let ours = Intent::StoppedByPolicy { at: Tick::from_secs(1) };
        assert_eq!(
            lines_remembering(
                with_restart(RestartPolicy::OnFailure),
                observed("web1", DomainState::ShutOff, "shutdown"),
                ours
            ),
            ["web1: shut off (shutdown) (stopped earlier by its policy), policy wants running → start"]
        );
    }

    #[test]
    fn a_lost_memory_leaves_down_domains_down_unless_restart_always() {
        let mut memory = Memory::empty();
        memory.lost = Some(MemoryLoss {
            why: "memory.json is not valid".into(),
            at: Tick::from_secs(1_700_000_000),
            rebuilt: Default::default(),
        });
        let host = |reason| ObservedHost {
            domains: vec![observed("web1", DomainState::ShutOff, reason)],
            networks: vec![],
            net: None,
        };
        let lines = |policy, memory: &Memory, reason| {
            let p = plan_with(&desired(policy), &host(reason), memory);
            p.actions.iter().map(|a| a.line()).chain(p.notes.iter().map(|n| n.line())).collect::<Vec<_>>()
        };
        for reason in ["crashed", "unknown"] {
            let l = lines(with_restart(RestartPolicy::OnFailure), &memory, reason);
            assert_eq!(l.len(), 1, "{l:?}");
            assert!(
                l[0].starts_with(&format!("warning: web1: shut off ({reason}); virtwarden's memory was lost (memory.json is not valid (at 2023-11-14T22:13:20Z))")),
                "{l:?}"
            );
            assert!(l[0].ends_with("`virtwarden memory confirm`"), "{l:?}");
        }
        assert_eq!(
            lines(with_restart(RestartPolicy::Always), &memory, "crashed"),
            ["web1: shut off (crashed), policy wants running → start"]
        );
        // Seen running since the loss: what is remembered about it is current again.
        memory.lost.as_mut().unwrap().rebuilt.insert("web1".into());
        assert_eq!(
            lines(with_restart(RestartPolicy::OnFailure), &memory, "crashed"),
            ["web1: shut off (crashed), policy wants running → start"]
        );
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
