//! Guest health inside a domain's worker: feeds the pure health machine (plan/health.rs) with
//! what the worker observes, libvirt's guest events and probe results; runs the probes it asks
//! for off the worker (through the engine's shared prober), and keeps status, metrics and the
//! engine's set of healthy domains in step. Verdicts are acted on by the worker (`heal`),
//! through the same ladder, backoff and quarantine as crashes.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;
use virtwarden_policies::{Health, Probe, RemediationAction};

use super::super::shared::Shared;
use super::super::status::HealthStatus;
use super::{Order, Worker};
use crate::guest::{AddressSource, GuestAccess, GuestInterface};
use crate::hypervisor::events::{FaultClass, GuestEvent, GuestEventKind};
use crate::hypervisor::HypervisorError;
use crate::memory::BadHealth;
use crate::observe::console::read_tail;
use crate::observe::guest_devices::GuestDevices;
use crate::observe::{DomainState, ObservedDomain};
use crate::plan::health::{
    wake_at, HealthMonitor, HealthSettings, ProbeResult, ProbeTicket, Step, Suspension, Verdict,
};
use crate::plan::restart::Step as LadderStep;
use crate::probe::ProbeSpec;

/// One domain's guest health as its worker keeps it.
pub(super) struct GuestHealth {
    monitor: HealthMonitor,
    spec: ProbeSpec,
    /// The serial console's log file, read from the live definition once per boot.
    console: Option<PathBuf>,
    devices_read: bool,
    /// When the machine wants to be polled again.
    pub(super) wake: Option<Instant>,
    probe: Option<tokio::task::AbortHandle>,
    /// A judgement not yet healed: set by a verdict, cleared by a passing probe, a new boot or
    /// the domain going down (crash handling takes over then).
    pub(super) verdict: Option<Verdict>,
    /// QEMU was up at the last observation.
    alive: bool,
    /// libvirt's runtime id of the domain at the last observation (changes on every start).
    runtime_id: Option<u32>,
    /// No observation yet (the worker just started, or `health` was just added).
    first_look: bool,
    /// The guest was already running when first seen and has not passed a probe since: its
    /// "boot" was not watched, so a missed boot deadline may as well be a wrong probe. Reported,
    /// not acted on, until it passes once or boots again.
    pub(super) adopted: bool,
    /// The metrics state label last set.
    label: Option<&'static str>,
    /// The address conflict last reported (logged and counted once per change).
    conflict: Option<String>,
}

impl GuestHealth {
    pub(super) fn new(domain: &str, h: &Health) -> Self {
        GuestHealth {
            monitor: HealthMonitor::new(HealthSettings::from_policy(h)),
            spec: ProbeSpec::from_policy(domain, h),
            console: None,
            devices_read: false,
            wake: None,
            probe: None,
            verdict: None,
            alive: false,
            runtime_id: None,
            first_look: true,
            adopted: false,
            label: None,
            conflict: None,
        }
    }

    fn set_policy(&mut self, domain: &str, h: &Health) {
        self.monitor.set_settings(HealthSettings::from_policy(h));
        let spec = ProbeSpec::from_policy(domain, h);
        if spec != self.spec {
            // A result of the old probe says nothing about the new one.
            self.abort_probe();
            self.monitor.probe_changed();
            self.spec = spec;
        }
    }

    fn new_boot(&mut self) {
        self.verdict = None;
        self.adopted = false;
        self.devices_read = false;
        self.console = None;
        self.abort_probe();
    }

    fn abort_probe(&mut self) {
        if let Some(p) = self.probe.take() {
            p.abort();
        }
    }

    /// True when the guest passes its probe now.
    pub(super) fn is_healthy(&self) -> bool {
        self.monitor.is_healthy()
    }
}

impl Drop for GuestHealth {
    fn drop(&mut self) {
        self.abort_probe();
    }
}

/// The word `guest_health`'s and `probe_duration_seconds`' labels use for a probe kind.
fn probe_kind(p: &Probe) -> &'static str {
    match p {
        Probe::Http(_) => "http",
        Probe::Tcp(_) => "tcp",
        Probe::GuestAgentPing(_) => "guest-agent-ping",
    }
}

/// The step to take for a health verdict. A running guest is reset, not started: the ladder's
/// `start` (the default ladder is `start` alone) becomes `reset`; a policy without a ladder
/// escalates to `destroy-start` from the second consecutive failure.
pub(super) fn health_step(step: LadderStep, has_ladder: bool, consecutive: u32) -> LadderStep {
    let action = match step.action {
        RemediationAction::Start if !has_ladder && consecutive >= 2 => RemediationAction::DestroyStart,
        RemediationAction::Start => RemediationAction::Reset,
        other => other,
    };
    LadderStep { action, ..step }
}

/// [`GuestAccess`] over whatever connection the engine holds now (it reconnects).
pub(crate) struct ConnGuest(pub(crate) Weak<Shared>);

impl ConnGuest {
    fn with<T>(
        &self,
        op: &'static str,
        domain: &str,
        f: impl FnOnce(&dyn GuestAccess) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        let failed =
            |message: &str| HypervisorError::Failed { op, domain: domain.to_string(), message: message.into() };
        let shared = self.0.upgrade().ok_or_else(|| failed("the engine stopped"))?;
        let hv = shared.hypervisor().ok_or_else(|| failed("not connected to libvirt"))?;
        let guest = hv.guest_access().ok_or_else(|| failed("this connection cannot reach guests"))?;
        f(guest)
    }
}

impl GuestAccess for ConnGuest {
    fn guest_devices(&self, domain: &str) -> Result<GuestDevices, HypervisorError> {
        self.with("dumpxml", domain, |g| g.guest_devices(domain))
    }

    fn interface_addresses(&self, domain: &str, source: AddressSource) -> Result<Vec<GuestInterface>, HypervisorError> {
        // A backend whose addresses are made up (libvirt's test driver: from its network's
        // range) would send probes to whatever host really has that address.
        let made_up = self.0.upgrade().is_some_and(|s| !s.capabilities.real_guest_addresses);
        if made_up {
            return Err(HypervisorError::Failed {
                op: "domifaddr",
                domain: domain.to_string(),
                message: "libvirt's test driver makes addresses up; give `address` in the policy".into(),
            });
        }
        self.with("domifaddr", domain, |g| g.interface_addresses(domain, source))
    }

    fn agent_ping(&self, domain: &str, timeout: Duration) -> Result<(), HypervisorError> {
        self.with("guest-ping", domain, |g| g.agent_ping(domain, timeout))
    }
}

impl Worker {
    /// The policy's `health` changed (or appeared, or went away).
    pub(super) fn health_policy(&mut self) {
        let name = self.name().to_string();
        match (self.managed.spec.health.clone(), &mut self.health) {
            (Some(h), Some(g)) => g.set_policy(&name, &h),
            (Some(h), None) => self.health = Some(GuestHealth::new(&name, &h)),
            (None, Some(_)) => {
                self.health = None;
                self.forget_health();
            }
            (None, None) => {}
        }
    }

    /// The domain is no longer probed: drop its status, metrics and healthy mark.
    pub(super) fn forget_health(&self) {
        let name = self.name().to_string();
        self.shared.memory.update(|m| {
            if let Some(d) = m.domains.get_mut(&name) {
                d.bad_health = None;
            }
        });
        self.shared.metrics.forget_health(self.name());
        self.shared.set_healthy(self.name(), false);
        self.shared.update_domain(self.name(), |s| s.health = None);
    }

    /// Feed what was just observed: a new boot, a stop, a pause, a shutdown, a quarantine.
    pub(super) fn health_observed(&mut self, observed: Option<&ObservedDomain>) {
        let now = self.shared.tick();
        let fresh = std::mem::take(&mut self.fresh_start);
        let quarantined = self.tracker.quarantined().is_some();
        let Some(h) = &mut self.health else { return };
        let qemu_up = |d: &&ObservedDomain| {
            matches!(
                d.state,
                DomainState::Running
                    | DomainState::Blocked
                    | DomainState::Paused
                    | DomainState::ShuttingDown
                    | DomainState::PmSuspended
            )
        };
        let first_look = std::mem::take(&mut h.first_look);
        let Some(d) = observed.filter(qemu_up) else {
            if h.alive {
                h.alive = false;
                h.monitor.stopped();
                h.new_boot();
            }
            h.runtime_id = None;
            return;
        };
        // Restarted while we did not watch (libvirt away, the STARTED event missed).
        let restarted = h.alive && d.id.is_some() && h.runtime_id.is_some() && d.id != h.runtime_id;
        h.runtime_id = d.id;
        if !h.alive || fresh || restarted {
            h.alive = true;
            h.monitor.started(now);
            h.new_boot();
            h.adopted = first_look && !fresh;
            self.shared.prober.forget_address(&self.managed.spec.name);
        }
        // Observed just now: libvirt answers.
        let mut set_aside = h.monitor.lift(now, &Suspension::Disconnected);
        let paused = Suspension::Paused { reason: String::new() };
        match d.state {
            DomainState::Paused => h.monitor.suspend(now, Suspension::Paused { reason: d.reason.to_string() }),
            DomainState::PmSuspended => h.monitor.suspend(now, Suspension::Paused { reason: "pmsuspended".into() }),
            _ => set_aside |= h.monitor.lift(now, &paused),
        }
        if d.state == DomainState::ShuttingDown {
            h.monitor.suspend(now, Suspension::ShuttingDown);
        } else {
            set_aside |= h.monitor.lift(now, &Suspension::ShuttingDown);
        }
        if quarantined {
            h.monitor.suspend(now, Suspension::Quarantined);
        } else {
            set_aside |= h.monitor.lift(now, &Suspension::Quarantined);
        }
        if set_aside && h.verdict.take().is_some() {
            // Judged afresh (a new bootTimeout window) rather than healed on old evidence.
            tracing::info!(domain = %self.managed.spec.name, "probing again after a suspension; the earlier verdict is set aside");
        }
    }

    /// Probes are suspended while libvirt is not connected (their failures would say nothing
    /// about the guest); lifted by the next successful observation.
    fn suspend_if_disconnected(&mut self) {
        if self.shared.hypervisor().is_some() {
            return;
        }
        let now = self.shared.tick();
        if let Some(h) = &mut self.health {
            h.monitor.suspend(now, Suspension::Disconnected);
        }
    }

    /// We reset or restarted the guest: a new boot with a new deadline.
    pub(super) fn health_rebooted(&mut self, action: RemediationAction) {
        let now = self.shared.tick();
        let Some(h) = &mut self.health else { return };
        match action {
            RemediationAction::Reset => h.monitor.reset(now),
            _ => h.monitor.started(now),
        }
        h.alive = true;
        h.new_boot();
        // The next observation brings the new runtime id; it is this boot, not another one.
        h.runtime_id = None;
        self.fresh_start = false;
        self.shared.prober.forget_address(&self.managed.spec.name);
    }

    /// Poll the machine: start the probe it asks for, note a verdict, schedule the next poll;
    /// then publish. Reads the definition's devices once per boot (agent channel, console log).
    /// True when a new verdict came up.
    pub(super) async fn drive_health(&mut self) -> bool {
        self.suspend_if_disconnected();
        let Some(h) = &self.health else { return false };
        if h.alive && !h.devices_read {
            let name = self.name().to_string();
            let devices = self
                .calls()
                .read("guest devices", move |hv| match hv.guest_access() {
                    Some(g) => g.guest_devices(&name).map(Some),
                    None => Ok(None),
                })
                .await;
            if let Some(h) = &mut self.health {
                if let Ok(found) = devices {
                    let d = found.unwrap_or_default();
                    h.monitor.set_agent_channel(d.agent_channel);
                    h.console = d.console_log;
                    h.devices_read = true;
                }
            }
        }
        // The console tail is read off the runtime (a file; at most once a period while a booting
        // guest fails, and at its deadline) when the machine may ask for it.
        let console = match self.health.as_ref().and_then(|h| h.console.clone()) {
            Some(path) if self.health.as_ref().is_some_and(|h| h.monitor.may_read_console(self.shared.tick())) => {
                tokio::task::spawn_blocking(move || read_tail(&path).ok()).await.ok().flatten()
            }
            _ => None,
        };
        let now = self.shared.tick();
        let name = self.name().to_string();
        let Some(h) = &mut self.health else { return false };
        let mut judged = false;
        loop {
            let console = console.clone();
            match h.monitor.poll(now, || console) {
                Step::Probe(ticket) => {
                    h.wake = None;
                    let (shared, spec, tx) = (self.shared.clone(), h.spec.clone(), self.tx.clone());
                    // A probe in flight is work under way (aborted or not, it ends with the task).
                    let busy = crate::engine::shared::Busy::new(shared.clone());
                    let task = tokio::spawn(async move {
                        let result = shared.prober.probe(&spec).await;
                        shared.metrics.probe(&spec.domain, probe_kind(&spec.probe), &result);
                        if let Some(tx) = tx.upgrade() {
                            shared.order(&tx, Order::Probed { ticket, result });
                        }
                        drop(busy);
                    });
                    h.probe = Some(task.abort_handle());
                    break;
                }
                Step::WaitUntil(t) => {
                    h.wake = Some(self.shared.instant_at(wake_at(t)));
                    break;
                }
                Step::Idle => {
                    h.wake = None;
                    break;
                }
                Step::Verdict(v) => {
                    tracing::warn!(domain = %name, verdict = %v.text(), "guest judged {}", v.kind());
                    h.verdict = Some(v);
                    judged = true;
                }
            }
        }
        self.publish_health();
        judged
    }

    /// A probe finished.
    pub(super) fn health_probed(&mut self, ticket: ProbeTicket, result: ProbeResult) {
        // A result that arrives while libvirt is away is no evidence (the suspension voids it).
        self.suspend_if_disconnected();
        let now = self.shared.tick();
        let name = self.name().to_string();
        let Some(h) = &mut self.health else { return };
        if h.monitor.in_flight() == Some(ticket) {
            h.probe = None;
        }
        if let Some(v) = h.monitor.probe_done(now, ticket, &result) {
            tracing::warn!(domain = %name, verdict = %v.text(), "guest judged {}", v.kind());
            h.verdict = Some(v);
            self.look_needed = true;
        }
        if h.monitor.is_healthy() {
            h.adopted = false;
            if h.verdict.take().is_some() {
                tracing::info!(domain = %name, "guest healthy again");
            }
        }
    }

    /// libvirt reported a guest event: evidence for the health machine, a status line and a
    /// metric; a fault makes the worker look now (and probe now, when it probes).
    pub(super) fn guest_event(&mut self, ev: GuestEvent) {
        let now = self.shared.tick();
        let text = ev.kind.text();
        self.shared.metrics.guest_event(self.name(), ev.kind.label());
        let class = ev.kind.class();
        match class {
            FaultClass::Evidence => tracing::debug!(domain = %self.name(), event = %text, "guest event"),
            FaultClass::Fault => tracing::warn!(domain = %self.name(), event = %text, "guest fault"),
            FaultClass::HostProblem => {
                tracing::error!(domain = %self.name(), event = %text, "host problem; not resetting the guest")
            }
        }
        let line = match class {
            FaultClass::HostProblem => format!("{text} (a host problem: free space on the host; not reset)"),
            _ => text,
        };
        let at = chrono::Utc::now();
        self.shared.update_domain(self.name(), |s| {
            s.last_guest_event = Some(line);
            s.last_guest_event_at = Some(at);
        });
        if class == FaultClass::Fault {
            self.look_needed = true;
        }
        let Some(h) = &mut self.health else { return };
        match &ev.kind {
            // A new boot: what was judged of the previous one no longer holds.
            GuestEventKind::Reboot if h.monitor.guest_rebooted(now) => {
                h.verdict = None;
                h.adopted = false;
            }
            GuestEventKind::Agent { connected, .. } => h.monitor.agent_changed(*connected),
            _ if class == FaultClass::Fault => h.monitor.probe_soon(now),
            _ => {}
        }
    }

    /// Status, the health metric, the engine's healthy set, and the durable memory of a
    /// verdict not yet followed by a passing probe (what `plan` notes).
    pub(super) fn publish_health(&mut self) {
        let bad = match &self.health {
            Some(h) if h.verdict.is_some() => h.verdict.as_ref().map(Verdict::text),
            _ => None,
        };
        let name = self.managed.spec.name.clone();
        let known = self.shared.memory.read(|m| m.domains.get(&name).and_then(|d| d.bad_health.clone()));
        let healthy = self.health.as_ref().is_some_and(GuestHealth::is_healthy);
        let changed = match (&bad, &known) {
            (Some(v), Some(k)) => *v != k.verdict,
            (Some(_), None) => true,
            // Cleared once the guest passes (or health is no longer asked for).
            (None, Some(_)) => healthy || self.health.is_none(),
            (None, None) => false,
        };
        if changed {
            let remembered = bad.map(|verdict| BadHealth { verdict, at: self.shared.tick() });
            self.shared.memory.update(|m| m.domains.entry(name).or_default().bad_health = remembered);
        }
        let Some(h) = &mut self.health else { return };
        let view = h.monitor.view();
        let status = HealthStatus::from_view(&view, self.shared.tick(), chrono::Utc::now());
        if h.conflict != view.address_conflict {
            let name = &self.managed.spec.name;
            match &view.address_conflict {
                Some(c) => {
                    tracing::warn!(domain = %name, conflict = %c, "address conflict: probes are no evidence until it clears; not acting on them")
                }
                None => tracing::info!(domain = %name, "address conflict cleared"),
            }
            self.shared.metrics.set_address_conflict(name, view.address_conflict.is_some());
            h.conflict = view.address_conflict.clone();
        }
        let label = status.phase.label();
        if h.label != Some(label) {
            h.label = Some(label);
            self.shared.metrics.health_state(&self.managed.spec.name, label);
        }
        let healthy = h.is_healthy();
        self.shared.set_healthy(&self.managed.spec.name, healthy);
        self.shared.update_domain(&self.managed.spec.name, |s| s.health = Some(status));
    }

    /// When the health machine wants the worker back.
    pub(super) fn health_wake(&self) -> Option<Instant> {
        self.health.as_ref().and_then(|h| h.wake)
    }

    /// A verdict waits to be healed.
    pub(super) fn verdict(&self) -> Option<&Verdict> {
        self.health.as_ref().and_then(|h| h.verdict.as_ref())
    }
}

/// A handle the prober's guest access uses to find the current connection.
pub(crate) fn conn_guest(shared: &Weak<Shared>) -> Arc<dyn GuestAccess> {
    Arc::new(ConnGuest(shared.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(action: RemediationAction) -> LadderStep {
        LadderStep { action, command: Vec::new(), timeout: Duration::from_secs(60) }
    }

    #[test]
    fn a_running_guest_is_reset_not_started_and_the_default_ladder_escalates_to_a_fresh_qemu() {
        let pick = |a, ladder, n| health_step(step(a), ladder, n).action;
        assert_eq!(pick(RemediationAction::Start, false, 0), RemediationAction::Reset);
        assert_eq!(pick(RemediationAction::Start, false, 1), RemediationAction::Reset);
        assert_eq!(pick(RemediationAction::Start, false, 2), RemediationAction::DestroyStart);
        // A policy's own ladder: `start` means "bring it back" (a reset); other steps as written.
        assert_eq!(pick(RemediationAction::Start, true, 5), RemediationAction::Reset);
        assert_eq!(pick(RemediationAction::Exec, true, 2), RemediationAction::Exec);
        assert_eq!(pick(RemediationAction::DestroyStart, true, 1), RemediationAction::DestroyStart);
    }
}
